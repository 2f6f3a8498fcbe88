//! The incremental audience evaluator: per profile and per rule, a small
//! state updated one event at a time (in any timestamp order) that answers
//! exactly as the batch evaluator does over the whole history, so the
//! audience stage never rereads a profile's history to keep a membership
//! current.
//!
//! What each event condition keeps, and why it is enough:
//! - a count without a window or with `between`: the number of matching
//!   events, stopped at threshold + 1 (any number above the threshold
//!   compares the same);
//! - a count `within D`: the timestamps of the threshold + 1 newest matching
//!   events. The events in the window are always the newest ones, so the
//!   kept timestamps in the window number min(count, threshold + 1);
//! - a funnel: per step, the timestamps of matching events (without a window
//!   or with `between`, until the funnel completes, which is then for good;
//!   `within D`, those still in the window).
//!
//! [`CompiledAudience::age_to`] drops what has left every `within` window,
//! which bounds the memory by the events inside the windows; an event that
//! arrives already out of its window as of the last aging is ignored, since
//! time only moves forward. A state belongs to the rule that made it: when a
//! rule changes, build new states from the history.

use super::evaluate::{funnel_completed, millis, CompiledAudience, EventLeaves, Leaf, ProfileValues, TimeRange};
use crate::event::Event;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// One profile's incremental state for one audience rule, made by
/// [`CompiledAudience::new_state`]. Serializable, so the stage can store it
/// with the profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AudienceState {
    leaves: Vec<LeafState>,
    /// The latest instant the state was aged to, in milliseconds.
    aged_to_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LeafState {
    /// Matching events, counted up to threshold + 1.
    Counter(u64),
    /// The newest matching events' timestamps (threshold + 1 at most), each
    /// with how many events carry it.
    Newest(BTreeMap<i64, u64>),
    /// Each step's matching timestamps; `completed` once a funnel without a
    /// `within` window is done, its sets then emptied.
    Funnel { steps: Vec<BTreeSet<i64>>, completed: bool },
}

impl AudienceState {
    /// How many timestamps the state holds (what its memory grows with).
    pub fn timestamp_count(&self) -> usize {
        self.leaves
            .iter()
            .map(|leaf| match leaf {
                LeafState::Counter(_) => 0,
                LeafState::Newest(newest) => newest.len(),
                LeafState::Funnel { steps, .. } => steps.iter().map(BTreeSet::len).sum(),
            })
            .sum()
    }
}

impl CompiledAudience {
    /// A fresh state for one profile, as if it had no events.
    pub fn new_state(&self) -> AudienceState {
        let leaves = self
            .leaves()
            .iter()
            .map(|leaf| match leaf {
                Leaf::Count { range: TimeRange::Within(_), .. } => LeafState::Newest(BTreeMap::new()),
                Leaf::Count { .. } => LeafState::Counter(0),
                Leaf::Funnel { steps, .. } => {
                    LeafState::Funnel { steps: vec![BTreeSet::new(); steps.len()], completed: false }
                }
            })
            .collect();
        AudienceState { leaves, aged_to_ms: None }
    }

    /// Whether `event` can change one of the rule's event conditions: the
    /// stage need neither observe nor re-evaluate for any other event
    /// (unless it changed the traits the rule reads).
    pub fn reads_event(&self, event: &Event) -> bool {
        self.leaves().iter().any(|leaf| match leaf {
            Leaf::Count { matcher, .. } => matcher.matches(event),
            Leaf::Funnel { steps, .. } => steps.iter().any(|step| step.matches(event)),
        })
    }

    /// Adds one of the profile's events; each event once.
    pub fn observe(&self, state: &mut AudienceState, event: &Event) {
        let timestamp = millis(&event.timestamp);
        let aged_to = state.aged_to_ms;
        for (leaf, leaf_state) in self.leaves().iter().zip(&mut state.leaves) {
            let range = match leaf {
                Leaf::Count { range, .. } | Leaf::Funnel { range, .. } => *range,
            };
            let admitted = match range {
                TimeRange::Always => true,
                TimeRange::Between(..) => range.contains(timestamp, timestamp),
                TimeRange::Within(_) => aged_to.is_none_or(|aged_to| range.contains(timestamp, aged_to)),
            };
            if !admitted {
                continue;
            }
            match (leaf, leaf_state) {
                (Leaf::Count { matcher, threshold, .. }, LeafState::Counter(count)) if matcher.matches(event) => {
                    *count = (*count + 1).min(threshold.saturating_add(1));
                }
                (Leaf::Count { matcher, threshold, .. }, LeafState::Newest(newest)) if matcher.matches(event) => {
                    *newest.entry(timestamp).or_default() += 1;
                    let mut kept: u64 = newest.values().sum();
                    while kept > threshold.saturating_add(1) {
                        let Some(mut oldest) = newest.first_entry() else { break };
                        *oldest.get_mut() -= 1;
                        if *oldest.get() == 0 {
                            oldest.remove();
                        }
                        kept -= 1;
                    }
                }
                (Leaf::Funnel { steps: matchers, range }, LeafState::Funnel { steps, completed }) if !*completed => {
                    for (matcher, timestamps) in matchers.iter().zip(steps.iter_mut()) {
                        if matcher.matches(event) {
                            timestamps.insert(timestamp);
                        }
                    }
                    let lasting = !matches!(range, TimeRange::Within(_));
                    if lasting && funnel_completed(steps.iter(), i64::MIN) {
                        *completed = true;
                        steps.iter_mut().for_each(BTreeSet::clear);
                    }
                }
                _ => {}
            }
        }
    }

    /// Forgets what has left every `within` window at `now`. An earlier
    /// `now` than a previous call changes nothing.
    pub fn age_to(&self, state: &mut AudienceState, now: DateTime<Utc>) {
        let aged_to = state.aged_to_ms.map_or(millis(&now), |aged_to| aged_to.max(millis(&now)));
        state.aged_to_ms = Some(aged_to);
        for (leaf, leaf_state) in self.leaves().iter().zip(&mut state.leaves) {
            let range = match leaf {
                Leaf::Count { range, .. } | Leaf::Funnel { range, .. } => *range,
            };
            if !matches!(range, TimeRange::Within(_)) {
                continue;
            }
            let earliest = range.earliest(aged_to);
            match leaf_state {
                LeafState::Newest(newest) => *newest = newest.split_off(&earliest),
                LeafState::Funnel { steps, .. } => {
                    steps.iter_mut().for_each(|timestamps| *timestamps = timestamps.split_off(&earliest))
                }
                LeafState::Counter(_) => {}
            }
        }
    }

    /// Whether the profile is a member at `now` (at or after the last
    /// [`Self::age_to`]), from its state and its current values.
    pub fn is_member_by_state(&self, state: &AudienceState, values: &ProfileValues<'_>, now: DateTime<Utc>) -> bool {
        self.evaluate(values, state, millis(&now))
    }

    /// [`CompiledAudience::next_change_at`] from the state.
    pub fn next_change_at_by_state(
        &self,
        state: &AudienceState,
        values: &ProfileValues<'_>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.next_change(values, state, millis(&now))
    }
}

impl EventLeaves for AudienceState {
    fn count(&self, index: usize, leaf: &Leaf, now_ms: i64) -> u64 {
        match (self.leaves.get(index), leaf) {
            (Some(LeafState::Counter(count)), _) => *count,
            (Some(LeafState::Newest(newest)), Leaf::Count { range, .. }) => {
                newest.range(range.earliest(now_ms)..).map(|(_, count)| count).sum()
            }
            _ => 0,
        }
    }

    fn funnel_completed(&self, index: usize, leaf: &Leaf, now_ms: i64) -> bool {
        match (self.leaves.get(index), leaf) {
            (Some(LeafState::Funnel { completed: true, .. }), _) => true,
            (Some(LeafState::Funnel { steps, .. }), Leaf::Funnel { range, .. }) => {
                funnel_completed(steps.iter(), range.earliest(now_ms))
            }
            _ => false,
        }
    }

    fn counted_timestamps(&self, index: usize, leaf: &Leaf, now_ms: i64) -> BTreeMap<i64, u64> {
        match (self.leaves.get(index), leaf) {
            (Some(LeafState::Newest(newest)), Leaf::Count { range, .. }) => {
                newest.range(range.earliest(now_ms)..).map(|(timestamp, count)| (*timestamp, *count)).collect()
            }
            _ => BTreeMap::new(),
        }
    }

    fn funnel_timestamps(&self, index: usize, leaf: &Leaf, now_ms: i64) -> Vec<BTreeSet<i64>> {
        match (self.leaves.get(index), leaf) {
            (Some(LeafState::Funnel { steps, .. }), Leaf::Funnel { range, .. }) => {
                steps.iter().map(|timestamps| timestamps.range(range.earliest(now_ms)..).copied().collect()).collect()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::evaluate::tests::{at, dense_history, event_leaf, history, offset, profile, track, NOW_MS};
    use crate::audience::text::tests::condition;
    use crate::audience::Condition;
    use proptest::prelude::*;
    use serde_json::{json, Map};

    const DAY: i64 = 86_400_000;

    #[test]
    fn a_windowed_count_keeps_only_the_newest_events_it_needs() {
        let rule = Condition::parse(r#"count(event "Order Completed", within 30d) >= 2"#).unwrap().compile().unwrap();
        let mut state = rule.new_state();
        for days_ago in [1, 20, 5, 29, 3] {
            rule.observe(&mut state, &track("Order Completed", NOW_MS - days_ago * DAY, json!({})));
        }
        assert_eq!(state.timestamp_count(), 3, "threshold + 1 timestamps");
        let (traits, audiences) = (Map::new(), BTreeSet::new());
        let values = ProfileValues { traits: &traits, computed_traits: &traits, audiences: &audiences };
        let now = at(NOW_MS);
        rule.age_to(&mut state, now);
        assert!(rule.is_member_by_state(&state, &values, now));
        // Kept: the orders of 1, 3 and 5 days ago. The one of 5 days ago leaving
        // in 25 days changes nothing; the count falls below 2 when the one of
        // 3 days ago leaves, in 27 days.
        assert_eq!(rule.next_change_at_by_state(&state, &values, now), Some(at(NOW_MS + 27 * DAY)));
        rule.age_to(&mut state, at(NOW_MS + 28 * DAY));
        assert_eq!(state.timestamp_count(), 1);
        assert!(!rule.is_member_by_state(&state, &values, at(NOW_MS + 28 * DAY)));
        rule.observe(&mut state, &track("Order Completed", NOW_MS - 10 * DAY, json!({})));
        assert_eq!(state.timestamp_count(), 1, "an event already out of the window is ignored");
    }

    #[test]
    fn only_matching_events_are_read() {
        let rule = Condition::parse(r#"count(event "A" where x > 1) >= 1 or performed "B" then "C" where y exists"#)
            .unwrap()
            .compile()
            .unwrap();
        assert!(rule.reads_event(&track("A", NOW_MS, json!({"x": 2}))));
        assert!(!rule.reads_event(&track("A", NOW_MS, json!({"x": 1}))));
        assert!(rule.reads_event(&track("B", NOW_MS, json!({}))));
        assert!(!rule.reads_event(&track("C", NOW_MS, json!({}))));
        assert!(!rule.reads_event(&track("D", NOW_MS, json!({"x": 2, "y": 1}))));
    }

    #[test]
    fn aging_keeps_an_event_until_the_instant_it_leaves() {
        let rule = Condition::parse(r#"performed "Ticket Opened" within 7d"#).unwrap().compile().unwrap();
        let (traits, audiences) = (Map::new(), BTreeSet::new());
        let values = ProfileValues { traits: &traits, computed_traits: &traits, audiences: &audiences };
        let mut state = rule.new_state();
        rule.observe(&mut state, &track("Ticket Opened", NOW_MS, json!({})));
        let leaves = NOW_MS + 7 * DAY;
        rule.age_to(&mut state, at(leaves - 1));
        assert!(rule.is_member_by_state(&state, &values, at(leaves - 1)));
        assert_eq!(rule.next_change_at_by_state(&state, &values, at(leaves - 1)), Some(at(leaves)));
        rule.age_to(&mut state, at(leaves));
        assert_eq!(state.timestamp_count(), 0);
        assert!(!rule.is_member_by_state(&state, &values, at(leaves)));
    }

    #[test]
    fn a_funnel_without_a_window_is_done_for_good_and_forgets_its_steps() {
        let rule = Condition::parse(r#"performed "Product Viewed" then "Order Completed""#).unwrap().compile().unwrap();
        let mut state = rule.new_state();
        rule.observe(&mut state, &track("Order Completed", NOW_MS - DAY, json!({})));
        rule.observe(&mut state, &track("Product Viewed", NOW_MS - 2 * DAY, json!({})));
        assert_eq!(state.timestamp_count(), 0);
        let (traits, audiences) = (Map::new(), BTreeSet::new());
        let values = ProfileValues { traits: &traits, computed_traits: &traits, audiences: &audiences };
        assert!(rule.is_member_by_state(&state, &values, at(NOW_MS + 1000 * DAY)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn incremental_in_any_order_equals_batch(
            condition in prop_oneof![condition(), event_leaf()],
            profile in profile(),
            shuffled in prop_oneof![history(), dense_history()].prop_flat_map(|events| Just(events).prop_shuffle()),
            agings in prop::collection::vec(offset(), 0..4),
            later in offset(),
        ) {
            let rule = condition.compile().unwrap();
            // The profile's history, observed in another order.
            let mut events = shuffled.clone();
            events.sort_by_key(|event| event.timestamp);
            let profile = profile.with_history(events);
            let now = at(NOW_MS + later);
            let mut agings: Vec<_> = agings.into_iter().map(|back| at(NOW_MS + later - back)).collect();
            agings.sort();
            let mut state = rule.new_state();
            for (index, event) in shuffled.iter().enumerate() {
                if let Some(aging) = agings.get(index) {
                    rule.age_to(&mut state, *aging);
                }
                rule.observe(&mut state, event);
            }
            let mut state: AudienceState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
            let facts = profile.facts();
            let values = facts.values();
            prop_assert_eq!(rule.is_member_by_state(&state, &values, now), rule.is_member(&facts, now), "{}", condition);
            prop_assert_eq!(
                rule.next_change_at_by_state(&state, &values, now),
                rule.next_change_at(&facts, now),
                "{}", condition
            );
            rule.age_to(&mut state, now);
            prop_assert_eq!(rule.is_member_by_state(&state, &values, now), rule.is_member(&facts, now), "{}", condition);
            prop_assert_eq!(
                rule.next_change_at_by_state(&state, &values, now),
                rule.next_change_at(&facts, now),
                "{}", condition
            );
        }
    }
}
