//! The compiled form of an audience rule and its batch evaluator: given what
//! is known of one profile at an instant, is it a member, and when would the
//! answer change if no new event arrived? The incremental evaluator
//! ([`super::incremental`]) answers through the same compiled tree; only
//! where the event conditions' answers come from differs (`EventLeaves`).
//!
//! Time is counted in whole milliseconds (event timestamps and `now` are
//! floored to the millisecond). An event is `within 7d` of `now` while
//! `now < timestamp + 7d`: it leaves the window at exactly `timestamp + 7d`.
//! Events stamped after `now` (a device clock ahead) count as within every
//! `within` window. `between A and B` takes events from `A` (included) to `B`
//! (excluded), whatever `now` is.

use super::compare::{EventMatcher, ValueTest};
use super::{Comparison, Condition, Window};
use crate::event::Event;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// What the evaluator may know of one profile.
#[derive(Clone, Copy, Debug)]
pub struct ProfileFacts<'a> {
    /// The profile's traits (newest value per trait).
    pub traits: &'a Map<String, Value>,
    /// The profile's computed traits by name.
    pub computed_traits: &'a Map<String, Value>,
    /// The profile's events, in any order.
    pub events: &'a [Event],
    /// The audiences the profile is a member of now.
    pub audiences: &'a BTreeSet<String>,
}

/// Which event timestamps a condition looks at, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimeRange {
    Always,
    /// Events while `now < timestamp + length`.
    Within(i64),
    /// `start <= timestamp < end`.
    Between(i64, i64),
}

impl TimeRange {
    pub fn new(window: Option<&Window>) -> TimeRange {
        match window {
            None => TimeRange::Always,
            // A validated window always has a length.
            Some(Window::Within(length)) => TimeRange::Within(length.millis().unwrap_or(i64::MAX)),
            Some(Window::Between { start, end }) => TimeRange::Between(ceil_millis(start), ceil_millis(end)),
        }
    }

    pub fn contains(self, timestamp_ms: i64, now_ms: i64) -> bool {
        match self {
            TimeRange::Always => true,
            TimeRange::Within(length) => now_ms < timestamp_ms.saturating_add(length),
            TimeRange::Between(start, end) => start <= timestamp_ms && timestamp_ms < end,
        }
    }

    /// The earliest timestamp in the window at `now_ms` (the range may also
    /// end, for `between`).
    pub fn earliest(self, now_ms: i64) -> i64 {
        match self {
            TimeRange::Always => i64::MIN,
            TimeRange::Within(length) => now_ms.saturating_sub(length).saturating_add(1),
            TimeRange::Between(start, _) => start,
        }
    }
}

/// The first whole millisecond at or after `time`, so that a millisecond
/// timestamp is at or after it exactly when the precise time is.
fn ceil_millis(time: &DateTime<Utc>) -> i64 {
    time.timestamp() * 1000 + i64::from(time.timestamp_subsec_nanos().div_ceil(1_000_000))
}

pub(crate) fn millis(time: &DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

#[derive(Clone, Debug, PartialEq)]
enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    Trait {
        name: String,
        test: ValueTest,
    },
    ComputedTrait {
        name: String,
        test: ValueTest,
    },
    /// An event leaf ([`Leaf`]) by its index in [`CompiledAudience::leaves`].
    Events(usize),
    InAudience(String),
}

/// A condition on the event history; the only part of a rule whose answer
/// depends on events and on time.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Leaf {
    /// `performed` is `count >= 1`.
    Count {
        matcher: EventMatcher,
        range: TimeRange,
        comparison: Comparison,
        threshold: u64,
    },
    Funnel {
        steps: Vec<EventMatcher>,
        range: TimeRange,
    },
}

/// Where the answers of event leaves come from: a full history (batch) or
/// an incremental state ([`super::incremental`]).
pub(crate) trait EventLeaves {
    /// The number of events counted by `leaf` at `now_ms`, or any number
    /// above its threshold when it is above it.
    fn count(&self, index: usize, leaf: &Leaf, now_ms: i64) -> u64;
    /// Whether the funnel `leaf` is completed at `now_ms`.
    fn funnel_completed(&self, index: usize, leaf: &Leaf, now_ms: i64) -> bool;
    /// For a count `within` a window: the timestamps of the events it counts
    /// at `now_ms`, each with how many events carry it — all of them, or at
    /// least the threshold + 1 newest.
    fn counted_timestamps(&self, index: usize, leaf: &Leaf, now_ms: i64) -> BTreeMap<i64, u64>;
    /// For a funnel `within` a window: each step's matching timestamps in the
    /// window at `now_ms`.
    fn funnel_timestamps(&self, index: usize, leaf: &Leaf, now_ms: i64) -> Vec<BTreeSet<i64>>;
}

/// The values of a profile that are read as they are (no history): what
/// the incremental evaluator needs besides its state.
#[derive(Clone, Copy, Debug)]
pub struct ProfileValues<'a> {
    /// The profile's traits (newest value per trait).
    pub traits: &'a Map<String, Value>,
    /// The profile's computed traits by name.
    pub computed_traits: &'a Map<String, Value>,
    /// The audiences the profile is a member of now.
    pub audiences: &'a BTreeSet<String>,
}

impl ProfileFacts<'_> {
    /// The facts without the history.
    pub fn values(&self) -> ProfileValues<'_> {
        ProfileValues { traits: self.traits, computed_traits: self.computed_traits, audiences: self.audiences }
    }
}

/// A validated audience rule, ready to evaluate many times
/// (see [`Condition::compile`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledAudience {
    root: Node,
    leaves: Vec<Leaf>,
}

impl CompiledAudience {
    /// Compiles a tree that [`Condition::validate`] accepted.
    pub(crate) fn new(condition: &Condition) -> CompiledAudience {
        let mut leaves = Vec::new();
        let root = compile(condition, &mut leaves);
        CompiledAudience { root, leaves }
    }

    /// The rule's event leaves, in the order of their indices.
    pub(crate) fn leaves(&self) -> &[Leaf] {
        &self.leaves
    }

    /// Whether the profile is a member at `now`.
    pub fn is_member(&self, facts: &ProfileFacts<'_>, now: DateTime<Utc>) -> bool {
        self.evaluate(&facts.values(), &History(facts.events), millis(&now))
    }

    /// The earliest instant after `now` at which [`Self::is_member`] gives
    /// another answer for the same facts — a qualifying event leaving a
    /// `within` window, or the last matching event of a
    /// `not performed … within` leaving it — or `None` when time alone never
    /// changes it. The audience stage sets a durable timer for it; a new
    /// event, a changed trait or another audience's change calls for a new
    /// evaluation anyway.
    ///
    /// Each `within` condition's answer changes at most twice as its events
    /// leave (a count falls; a funnel stops being completed once): those
    /// instants are found from the events' timestamps, then the rule is
    /// evaluated at each in order until its answer changes.
    pub fn next_change_at(&self, facts: &ProfileFacts<'_>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.next_change(&facts.values(), &History(facts.events), millis(&now))
    }

    /// The names of the `track` events the rule's event conditions count:
    /// no other event changes any of its answers, so an evaluation may be
    /// given only these.
    pub fn event_names(&self) -> BTreeSet<&str> {
        self.leaves
            .iter()
            .flat_map(|leaf| match leaf {
                Leaf::Count { matcher, .. } => std::slice::from_ref(matcher),
                Leaf::Funnel { steps, .. } => steps.as_slice(),
            })
            .map(|matcher| matcher.event.as_str())
            .collect()
    }

    /// The earliest event timestamp, in milliseconds, that any of the
    /// rule's event conditions counts at `now`, or `None` when the rule
    /// reads no events: [`Self::is_member`] at `now` gives the same answer
    /// given only the events stamped at or after it.
    pub fn earliest_counted_ms(&self, now: DateTime<Utc>) -> Option<i64> {
        let now_ms = millis(&now);
        self.leaves
            .iter()
            .map(|leaf| match leaf {
                Leaf::Count { range, .. } | Leaf::Funnel { range, .. } => range.earliest(now_ms),
            })
            .min()
    }

    pub(crate) fn evaluate(&self, values: &ProfileValues<'_>, events: &impl EventLeaves, now_ms: i64) -> bool {
        evaluate(&self.root, &self.leaves, values, events, now_ms)
    }

    pub(crate) fn next_change(
        &self,
        values: &ProfileValues<'_>,
        events: &impl EventLeaves,
        now_ms: i64,
    ) -> Option<DateTime<Utc>> {
        let mut instants = BTreeSet::new();
        for (index, leaf) in self.leaves.iter().enumerate() {
            match leaf {
                Leaf::Count { range: TimeRange::Within(length), comparison, threshold, .. } => {
                    let counted = events.counted_timestamps(index, leaf, now_ms);
                    let mut count: u64 = counted.values().sum();
                    let mut answer = comparison.holds(count, *threshold);
                    for (timestamp, events) in counted {
                        count -= events;
                        if comparison.holds(count, *threshold) != answer {
                            answer = !answer;
                            instants.insert(timestamp.saturating_add(*length));
                        }
                    }
                }
                Leaf::Funnel { range: TimeRange::Within(length), .. } => {
                    let steps = events.funnel_timestamps(index, leaf, now_ms);
                    if let Some(start) = funnel_latest_start(&steps) {
                        instants.insert(start.saturating_add(*length));
                    }
                }
                Leaf::Count { .. } | Leaf::Funnel { .. } => {}
            }
        }
        let answer = self.evaluate(values, events, now_ms);
        instants
            .into_iter()
            .find(|&instant| self.evaluate(values, events, instant) != answer)
            .and_then(DateTime::from_timestamp_millis)
    }
}

fn compile(condition: &Condition, leaves: &mut Vec<Leaf>) -> Node {
    let mut leaf = |leaf: Leaf| {
        leaves.push(leaf);
        Node::Events(leaves.len() - 1)
    };
    match condition {
        Condition::And { conditions } => Node::And(conditions.iter().map(|c| compile(c, leaves)).collect()),
        Condition::Or { conditions } => Node::Or(conditions.iter().map(|c| compile(c, leaves)).collect()),
        Condition::Not { condition } => Node::Not(Box::new(compile(condition, leaves))),
        Condition::Trait(test) => {
            Node::Trait { name: test.name.clone(), test: ValueTest::new(test.operator, test.value.as_ref()) }
        }
        Condition::ComputedTrait(test) => {
            Node::ComputedTrait { name: test.name.clone(), test: ValueTest::new(test.operator, test.value.as_ref()) }
        }
        Condition::Performed(performed) => leaf(Leaf::Count {
            matcher: EventMatcher::new(&performed.event, &performed.filters),
            range: TimeRange::new(performed.window.as_ref()),
            comparison: Comparison::GreaterOrEqual,
            threshold: 1,
        }),
        Condition::Count(count) => leaf(Leaf::Count {
            matcher: EventMatcher::new(&count.event, &count.filters),
            range: TimeRange::new(count.window.as_ref()),
            comparison: count.operator,
            threshold: count.value,
        }),
        Condition::Funnel(funnel) => leaf(Leaf::Funnel {
            steps: funnel.steps.iter().map(|step| EventMatcher::new(&step.event, &step.filters)).collect(),
            range: TimeRange::new(funnel.window.as_ref()),
        }),
        Condition::InAudience { audience } => Node::InAudience(audience.clone()),
    }
}

fn evaluate(node: &Node, leaves: &[Leaf], values: &ProfileValues<'_>, events: &impl EventLeaves, now_ms: i64) -> bool {
    match node {
        Node::And(nodes) => nodes.iter().all(|node| evaluate(node, leaves, values, events, now_ms)),
        Node::Or(nodes) => nodes.iter().any(|node| evaluate(node, leaves, values, events, now_ms)),
        Node::Not(node) => !evaluate(node, leaves, values, events, now_ms),
        Node::Trait { name, test } => test.passes(values.traits.get(name)),
        Node::ComputedTrait { name, test } => test.passes(values.computed_traits.get(name)),
        Node::Events(index) => match &leaves[*index] {
            leaf @ Leaf::Count { comparison, threshold, .. } => {
                comparison.holds(events.count(*index, leaf, now_ms), *threshold)
            }
            leaf @ Leaf::Funnel { .. } => events.funnel_completed(*index, leaf, now_ms),
        },
        Node::InAudience(audience) => values.audiences.contains(audience),
    }
}

/// A full history: every leaf reads every event.
struct History<'a>(&'a [Event]);

impl EventLeaves for History<'_> {
    fn count(&self, _: usize, leaf: &Leaf, now_ms: i64) -> u64 {
        let Leaf::Count { matcher, range, threshold, .. } = leaf else { return 0 };
        let counted = |event: &&Event| range.contains(millis(&event.timestamp), now_ms) && matcher.matches(event);
        // One past the threshold decides every comparison.
        let enough = usize::try_from(threshold.saturating_add(1)).unwrap_or(usize::MAX);
        self.0.iter().filter(counted).take(enough).count() as u64
    }

    /// The same greedy walk as [`funnel_completed`], one pass over the
    /// events per step and nothing allocated: the earliest match of each
    /// step strictly after the previous step's.
    fn funnel_completed(&self, _: usize, leaf: &Leaf, now_ms: i64) -> bool {
        let Leaf::Funnel { steps, range } = leaf else { return false };
        let mut from = i64::MIN;
        for step in steps {
            let earliest = self
                .0
                .iter()
                .map(|event| (millis(&event.timestamp), event))
                .filter(|(timestamp, event)| {
                    *timestamp >= from && range.contains(*timestamp, now_ms) && step.matches(event)
                })
                .map(|(timestamp, _)| timestamp)
                .min();
            match earliest {
                Some(timestamp) => from = timestamp.saturating_add(1),
                None => return false,
            }
        }
        true
    }

    fn counted_timestamps(&self, _: usize, leaf: &Leaf, now_ms: i64) -> BTreeMap<i64, u64> {
        let mut counted = BTreeMap::new();
        if let Leaf::Count { matcher, range, .. } = leaf {
            for event in self.0 {
                let timestamp = millis(&event.timestamp);
                if range.contains(timestamp, now_ms) && matcher.matches(event) {
                    *counted.entry(timestamp).or_default() += 1;
                }
            }
        }
        counted
    }

    fn funnel_timestamps(&self, _: usize, leaf: &Leaf, now_ms: i64) -> Vec<BTreeSet<i64>> {
        let Leaf::Funnel { steps, range } = leaf else { return Vec::new() };
        steps
            .iter()
            .map(|step| {
                self.0
                    .iter()
                    .filter(|event| step.matches(event))
                    .map(|event| millis(&event.timestamp))
                    .filter(|&timestamp| range.contains(timestamp, now_ms))
                    .collect()
            })
            .collect()
    }
}

/// The latest first-step timestamp of any way to take one timestamp from
/// each step's set strictly increasing; `None` when there is none. Taking,
/// from the last step back, the latest timestamp before the next step's is
/// optimal: a later step leaves the most room for the one before.
pub(crate) fn funnel_latest_start(steps: &[BTreeSet<i64>]) -> Option<i64> {
    let mut before = i64::MAX;
    for timestamps in steps.iter().rev() {
        before = *timestamps.range(..before).next_back()?;
    }
    (!steps.is_empty()).then_some(before)
}

/// Whether one timestamp from each step's set, the first at or after
/// `earliest`, can be taken strictly increasing. Taking the earliest of each
/// step after the previous one is optimal: an earlier step leaves the most
/// room for the next.
pub(crate) fn funnel_completed<S: std::borrow::Borrow<BTreeSet<i64>>>(
    steps: impl IntoIterator<Item = S>,
    earliest: i64,
) -> bool {
    let mut from = earliest;
    for timestamps in steps {
        match timestamps.borrow().range(from..).next() {
            Some(&timestamp) => from = timestamp.saturating_add(1),
            None => return false,
        }
    }
    true
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audience::text::tests::{condition, event_name, value};
    use crate::audience::{Operator, PropertyFilter};
    use crate::event::EventType;
    use crate::ids::{MessageId, SourceId};
    use proptest::prelude::*;
    use serde_json::json;

    /// 2026-03-01T00:00:00Z, the `now` of these tests.
    pub(crate) const NOW_MS: i64 = 1_772_323_200_000;
    const MINUTE: i64 = 60_000;
    const DAY: i64 = 86_400_000;

    pub(crate) fn track(name: &str, timestamp_ms: i64, properties: Value) -> Event {
        let timestamp = DateTime::from_timestamp_millis(timestamp_ms).unwrap();
        Event {
            message_id: MessageId::new(format!("m-{name}-{timestamp_ms}-{properties}")),
            event_type: EventType::Track,
            user_id: Some("u1".into()),
            anonymous_id: None,
            event: Some(name.into()),
            name: None,
            category: None,
            group_id: None,
            previous_id: None,
            properties: properties.as_object().cloned(),
            traits: None,
            context: Map::new(),
            integrations: Map::new(),
            timestamp,
            original_timestamp: None,
            sent_at: None,
            received_at: timestamp,
            source_id: SourceId::new("src_test"),
            extra: Map::new(),
        }
    }

    pub(crate) fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    #[derive(Debug)]
    pub(crate) struct Profile {
        traits: Map<String, Value>,
        computed_traits: Map<String, Value>,
        events: Vec<Event>,
        audiences: BTreeSet<String>,
    }

    impl Profile {
        fn with_events(events: Vec<Event>) -> Profile {
            Profile { traits: Map::new(), computed_traits: Map::new(), events, audiences: BTreeSet::new() }
        }

        pub(crate) fn with_history(self, events: Vec<Event>) -> Profile {
            Profile { events, ..self }
        }

        pub(crate) fn facts(&self) -> ProfileFacts<'_> {
            ProfileFacts {
                traits: &self.traits,
                computed_traits: &self.computed_traits,
                events: &self.events,
                audiences: &self.audiences,
            }
        }
    }

    fn compiled(text: &str) -> CompiledAudience {
        Condition::parse(text).unwrap().compile().unwrap()
    }

    #[test]
    fn traits_computed_traits_and_memberships_decide() {
        let mut profile = Profile::with_events(Vec::new());
        profile.traits = json!({"plan": "pro", "age": 31, "tags": ["vip", "new"]}).as_object().cloned().unwrap();
        profile.computed_traits = json!({"ltv": 120.5}).as_object().cloned().unwrap();
        profile.audiences.insert("newsletter".into());
        let now = at(NOW_MS);
        let member = |text: &str| compiled(text).is_member(&profile.facts(), now);
        assert!(member(r#"trait plan = "pro" and trait age >= 30 and trait tags contains "vip""#));
        assert!(member(r#"computed ltv > 100 and in audience "newsletter""#));
        assert!(!member(r#"trait plan != "pro" or trait email exists or in audience "vip""#));
        assert!(member(r#"not trait email exists and not trait email = "a@b.c""#));
        assert!(!member(r#"trait email != "a@b.c""#), "a missing trait passes no comparison");
    }

    #[test]
    fn counts_filter_by_properties_and_window() {
        let profile = Profile::with_events(vec![
            track("Order Completed", NOW_MS - 2 * DAY, json!({"total": 80, "currency": "EUR"})),
            track("Order Completed", NOW_MS - 10 * DAY, json!({"total": 60})),
            track("Order Completed", NOW_MS - 40 * DAY, json!({"total": 90})),
            track("Order Completed", NOW_MS - DAY, json!({"total": 20})),
        ]);
        let rule = compiled(r#"count(event "Order Completed" where total > 50, within 30d) >= 2"#);
        assert!(rule.is_member(&profile.facts(), at(NOW_MS)));
        // The order of ten days ago leaves the window 20 days from now.
        assert_eq!(rule.next_change_at(&profile.facts(), at(NOW_MS)), Some(at(NOW_MS + 20 * DAY)));
        assert!(!rule.is_member(&profile.facts(), at(NOW_MS + 20 * DAY)));
        assert!(rule.is_member(&profile.facts(), at(NOW_MS + 20 * DAY - 1)));
        let filtered = compiled(r#"count(event "Order Completed" where total > 50 and currency = "EUR") = 1"#);
        assert!(filtered.is_member(&profile.facts(), at(NOW_MS)));
        assert_eq!(filtered.next_change_at(&profile.facts(), at(NOW_MS)), None, "no window, no change by time");
        let between = compiled(r#"count(event "Order Completed", between 2026-01-01 and 2026-02-01) = 1"#);
        assert!(between.is_member(&profile.facts(), at(NOW_MS)), "the order 40 days ago was in January");
    }

    #[test]
    fn not_performed_within_becomes_true_when_the_last_event_leaves() {
        let profile = Profile::with_events(vec![
            track("Ticket Opened", NOW_MS - 6 * DAY, json!({})),
            track("Ticket Opened", NOW_MS - 3 * DAY, json!({})),
        ]);
        let rule = compiled(r#"not performed "Ticket Opened" within 7d"#);
        assert!(!rule.is_member(&profile.facts(), at(NOW_MS)));
        assert_eq!(rule.next_change_at(&profile.facts(), at(NOW_MS)), Some(at(NOW_MS + 4 * DAY)));
    }

    #[test]
    fn funnels_need_each_step_strictly_after_the_one_before() {
        let viewed = track("Product Viewed", NOW_MS - 3 * DAY, json!({"category": "shoes"}));
        let ordered = track("Order Completed", NOW_MS - 2 * DAY, json!({}));
        let rule = compiled(r#"performed "Product Viewed" where category = "shoes" then "Order Completed" within 7d"#);
        let in_order = Profile::with_events(vec![ordered.clone(), viewed.clone()]);
        assert!(rule.is_member(&in_order.facts(), at(NOW_MS)));
        assert_eq!(rule.next_change_at(&in_order.facts(), at(NOW_MS)), Some(at(NOW_MS + 4 * DAY)));
        let same_instant = Profile::with_events(vec![
            track("Product Viewed", NOW_MS - DAY, json!({"category": "shoes"})),
            track("Order Completed", NOW_MS - DAY, json!({})),
        ]);
        assert!(!rule.is_member(&same_instant.facts(), at(NOW_MS)));
        let reversed =
            Profile::with_events(vec![track("Order Completed", NOW_MS - 4 * DAY, json!({})), viewed.clone()]);
        assert!(!rule.is_member(&reversed.facts(), at(NOW_MS)));
    }

    #[test]
    fn between_bounds_below_a_millisecond_round_up() {
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00.0005Z").unwrap().with_timezone(&Utc);
        let end = DateTime::parse_from_rfc3339("2026-01-01T00:00:01Z").unwrap().with_timezone(&Utc);
        let range = TimeRange::new(Some(&Window::Between { start, end }));
        let start_ms = start.timestamp_millis();
        assert_eq!(range, TimeRange::Between(start_ms + 1, start_ms + 1000));
        assert!(!range.contains(start_ms, NOW_MS), "the event's millisecond began before the window");
        assert!(range.contains(start_ms + 1, NOW_MS));
    }

    #[test]
    fn events_from_the_future_count_within_windows() {
        let profile = Profile::with_events(vec![track("Ticket Opened", NOW_MS + MINUTE, json!({}))]);
        let rule = compiled(r#"performed "Ticket Opened" within 1m"#);
        assert!(rule.is_member(&profile.facts(), at(NOW_MS)));
        assert_eq!(rule.next_change_at(&profile.facts(), at(NOW_MS)), Some(at(NOW_MS + 2 * MINUTE)));
    }

    // The naive reference: the rule's meaning written as plainly as possible,
    // straight from the tree, sharing no code with the compiled evaluator.

    fn reference_test(actual: Option<&Value>, operator: Operator, expected: Option<&Value>) -> bool {
        let actual = match actual {
            None | Some(Value::Null) => return false,
            Some(actual) => actual,
        };
        if operator == Operator::Exists {
            return true;
        }
        let expected = expected.unwrap();
        let same = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => a == b,
        };
        let order = match (actual, expected) {
            (Value::Number(a), Value::Number(b)) => a.as_f64().unwrap().partial_cmp(&b.as_f64().unwrap()),
            (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
            _ => None,
        };
        match operator {
            Operator::Equal => same(actual, expected),
            Operator::NotEqual => !same(actual, expected),
            Operator::Less => order == Some(std::cmp::Ordering::Less),
            Operator::LessOrEqual => order.is_some() && order != Some(std::cmp::Ordering::Greater),
            Operator::Greater => order == Some(std::cmp::Ordering::Greater),
            Operator::GreaterOrEqual => order.is_some() && order != Some(std::cmp::Ordering::Less),
            Operator::Contains => match actual {
                Value::String(text) => expected.as_str().is_some_and(|part| text.contains(part)),
                Value::Array(items) => items.iter().any(|item| same(item, expected)),
                _ => false,
            },
            Operator::Exists => unreachable!(),
        }
    }

    pub(crate) fn reference_event_matches(event: &Event, name: &str, filters: &[PropertyFilter]) -> bool {
        if event.event_type != EventType::Track || event.event.as_deref() != Some(name) {
            return false;
        }
        filters.iter().all(|filter| {
            let mut value = event.properties.as_ref().map(|p| Value::Object(p.clone()));
            for key in filter.property.split('.') {
                value = value.and_then(|v| v.get(key).cloned());
            }
            reference_test(value.as_ref(), filter.operator, filter.value.as_ref())
        })
    }

    fn reference_in_window(event: &Event, window: Option<&Window>, now: DateTime<Utc>) -> bool {
        let timestamp = at(event.timestamp.timestamp_millis());
        match window {
            None => true,
            Some(Window::Within(length)) => {
                let length = chrono::Duration::milliseconds(length.amount * length.unit.millis());
                now - timestamp < length
            }
            Some(Window::Between { start, end }) => *start <= timestamp && timestamp < *end,
        }
    }

    fn reference_funnel(
        steps: &[crate::audience::FunnelStep],
        window: Option<&Window>,
        events: &[Event],
        after: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> bool {
        let Some((step, rest)) = steps.split_first() else { return true };
        events.iter().any(|event| {
            after.is_none_or(|after| event.timestamp > after)
                && reference_in_window(event, window, now)
                && reference_event_matches(event, &step.event, &step.filters)
                && reference_funnel(rest, window, events, Some(event.timestamp), now)
        })
    }

    fn reference(condition: &Condition, profile: &Profile, now: DateTime<Utc>) -> bool {
        match condition {
            Condition::And { conditions } => conditions.iter().all(|c| reference(c, profile, now)),
            Condition::Or { conditions } => conditions.iter().any(|c| reference(c, profile, now)),
            Condition::Not { condition } => !reference(condition, profile, now),
            Condition::Trait(t) => reference_test(profile.traits.get(&t.name), t.operator, t.value.as_ref()),
            Condition::ComputedTrait(t) => {
                reference_test(profile.computed_traits.get(&t.name), t.operator, t.value.as_ref())
            }
            Condition::Performed(p) => profile.events.iter().any(|event| {
                reference_in_window(event, p.window.as_ref(), now)
                    && reference_event_matches(event, &p.event, &p.filters)
            }),
            Condition::Count(c) => {
                let mut count = 0;
                for event in &profile.events {
                    if reference_in_window(event, c.window.as_ref(), now)
                        && reference_event_matches(event, &c.event, &c.filters)
                    {
                        count += 1;
                    }
                }
                c.operator.holds(count, c.value)
            }
            Condition::Funnel(f) => reference_funnel(&f.steps, f.window.as_ref(), &profile.events, None, now),
            Condition::InAudience { audience } => profile.audiences.contains(audience),
        }
    }

    pub(crate) fn properties() -> impl Strategy<Value = Value> {
        (
            prop::option::of(value()),
            prop::option::of(prop::sample::select(vec!["EUR", "USD"])),
            prop::option::of(prop::sample::select(vec!["A-1", "B-2", "pro"])),
            prop::option::of(value()),
        )
            .prop_map(|(total, currency, sku, exists)| {
                let mut properties = Map::new();
                if let Some(total) = total {
                    properties.insert("total".into(), total);
                }
                if let Some(currency) = currency {
                    properties.insert("currency".into(), json!(currency));
                }
                if let Some(sku) = sku {
                    properties.insert("product".into(), json!({"sku": sku}));
                }
                if let Some(exists) = exists {
                    properties.insert("exists".into(), exists);
                }
                Value::Object(properties)
            })
    }

    /// Histories around [`NOW_MS`], at whole minutes, so that several events
    /// share an instant and windows of minutes, hours and days all matter.
    pub(crate) fn history() -> impl Strategy<Value = Vec<Event>> {
        let offset = prop_oneof![-10i64..3, (-8 * 24 * 60i64)..(24 * 60), (-100 * 24 * 60i64)..0];
        prop::collection::vec((event_name(), offset, properties()), 0..10).prop_map(|events| {
            events
                .into_iter()
                .map(|(name, minutes, properties)| track(&name, NOW_MS + minutes * MINUTE, properties))
                .collect()
        })
    }

    fn traits() -> impl Strategy<Value = std::collections::BTreeMap<String, Value>> {
        let trait_value = prop_oneof![
            4 => value(),
            1 => Just(Value::Null),
            1 => prop::collection::vec(value(), 0..3).prop_map(Value::Array),
        ];
        prop::collection::btree_map(crate::audience::text::tests::name(), trait_value, 0..5)
    }

    pub(crate) fn profile() -> impl Strategy<Value = Profile> {
        let audiences = prop::collection::btree_set(prop::sample::select(vec!["vip", "churned", "and"]), 0..3);
        (traits(), traits(), history(), audiences).prop_map(|(traits, computed, events, audiences)| Profile {
            traits: traits.into_iter().collect(),
            computed_traits: computed.into_iter().collect(),
            events,
            audiences: audiences.into_iter().map(str::to_owned).collect(),
        })
    }

    /// Instants after [`NOW_MS`], often on whole minutes (where events
    /// stamped on whole minutes leave windows) or just before.
    pub(crate) fn offset() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(0i64),
            0i64..(40 * DAY),
            (0i64..(9 * 24 * 60)).prop_map(|minutes| minutes * 60_000),
            (1i64..(9 * 24 * 60)).prop_map(|minutes| minutes * 60_000 - 1),
        ]
    }

    /// Single event conditions over histories of one event name, where
    /// counts near their thresholds and windows' edges are common.
    pub(crate) fn event_leaf() -> impl Strategy<Value = Condition> {
        let within = (1i64..4, prop::sample::select(vec!["m", "h", "d"]));
        (0u64..4, prop::sample::select(vec!["=", "!=", "<", "<=", ">", ">="]), within, any::<bool>()).prop_map(
            |(threshold, comparison, (amount, unit), funnel)| {
                let text = if funnel {
                    format!(r#"performed "Order Completed" then "Order Completed" within {amount}{unit}"#)
                } else {
                    format!(r#"count(event "Order Completed", within {amount}{unit}) {comparison} {threshold}"#)
                };
                Condition::parse(&text).unwrap()
            },
        )
    }

    pub(crate) fn dense_history() -> impl Strategy<Value = Vec<Event>> {
        prop::collection::vec(prop_oneof![-10i64..3, (-4 * 24 * 60i64)..60], 0..8).prop_map(|minutes| {
            minutes.into_iter().map(|minute| track("Order Completed", NOW_MS + minute * 60_000, json!({}))).collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn compiled_evaluation_equals_the_naive_reference(
            condition in prop_oneof![condition(), event_leaf()],
            profile in profile(),
            dense in prop::option::of(dense_history()),
            later in offset(),
        ) {
            let profile = match dense {
                Some(events) => profile.with_history(events),
                None => profile,
            };
            let compiled = condition.compile().unwrap();
            let now = at(NOW_MS + later);
            prop_assert_eq!(compiled.is_member(&profile.facts(), now), reference(&condition, &profile, now), "{}", condition);
        }

        #[test]
        fn only_the_named_events_from_the_earliest_counted_time_decide_the_answer(
            condition in prop_oneof![condition(), event_leaf()],
            profile in profile(),
            later in offset(),
        ) {
            let compiled = condition.compile().unwrap();
            let now = at(NOW_MS + later);
            let names = compiled.event_names();
            let earliest = compiled.earliest_counted_ms(now);
            let read: Vec<Event> = profile
                .events
                .iter()
                .filter(|event| {
                    earliest.is_some_and(|earliest| millis(&event.timestamp) >= earliest)
                        && event.event.as_deref().is_some_and(|name| names.contains(name))
                })
                .cloned()
                .collect();
            let facts = profile.facts();
            prop_assert_eq!(
                compiled.is_member(&ProfileFacts { events: &read, ..facts }, now),
                compiled.is_member(&facts, now),
                "{}", condition
            );
        }

        #[test]
        fn the_answer_holds_until_next_change_at_and_changes_there(
            condition in prop_oneof![condition(), event_leaf()],
            profile in profile(),
            dense in prop::option::of(dense_history()),
            probes in prop::collection::vec(prop_oneof![0i64..(120 * DAY), offset()], 1..6),
        ) {
            let profile = match dense {
                Some(events) => profile.with_history(events),
                None => profile,
            };
            let compiled = condition.compile().unwrap();
            let now = at(NOW_MS);
            let answer = reference(&condition, &profile, now);
            let next = compiled.next_change_at(&profile.facts(), now);
            if let Some(next) = next {
                prop_assert!(next > now);
                prop_assert_ne!(reference(&condition, &profile, next), answer, "{} changes at {}", condition, next);
                let just_before = next - chrono::Duration::milliseconds(1);
                prop_assert_eq!(reference(&condition, &profile, just_before), answer, "{}", condition);
            }
            for probe in probes {
                let instant = now + chrono::Duration::milliseconds(probe);
                if next.is_none_or(|next| instant < next) {
                    prop_assert_eq!(reference(&condition, &profile, instant), answer, "{} at {}", condition, instant);
                }
            }
        }
    }
}
