//! Daily rollups: what the insight stage counts per UTC day so that a goal
//! is evaluated from a few hundred rows instead of the event log.
//!
//! A [`TrackerSpec`] names one thing to count; goals that need the same
//! thing share its tracker. Three shapes:
//!
//! - **Totals** (`events`, `identity`): each event (or identity change)
//!   adds to its day directly — a count, a property's sum, profiles created
//!   and merged.
//! - **Per profile** (`activity`, `conversion`): each profile has a small
//!   [`ProfileState`] (its runs of active days; its first `from` event and
//!   the `to` events around it), and the days hold the sum over profiles of
//!   each state's [`TrackerSpec::contribution`]. When an event or a merge
//!   changes a state, the stage adds the new contribution minus the old.
//!
//! Per-profile states form a join semilattice: [`ProfileState::merge`] of
//! the states of two sets of events is the state of their union, whatever
//! the order events were observed in. That is what makes the rollup exact
//! under identity merges (a merged-away profile's state is merged into the
//! survivor's) and under backfill (a tracker created later reads the log's
//! past in pages while new events are applied as they come: every event is
//! observed once, in whatever order). The property tests check the
//! incremental rollup against a reference computed from the final owners.
//!
//! **Bounds.** An activity state keeps at most [`MAX_RUNS`] runs of
//! consecutive active days (the oldest go first); a conversion state keeps
//! the `to` times before the first `from` and the first one after it, at
//! most [`MAX_TO_TIMES`] (the oldest go first), which is exact unless a
//! profile does `to` that many times before an older `from` arrives late.

use crate::profile::ProfileId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A UTC calendar day, numbered from 1970-01-01 (day 0).
pub type Day = i32;

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;

/// The day an instant (milliseconds since the epoch) falls on.
pub fn day_of(ms: i64) -> Day {
    ms.div_euclid(DAY_MS).clamp(i64::from(Day::MIN), i64::from(Day::MAX)) as Day
}

/// Midnight UTC starting `day`, in milliseconds since the epoch.
pub fn day_start_ms(day: Day) -> i64 {
    i64::from(day) * DAY_MS
}

/// Runs of active days an activity state keeps at most.
pub const MAX_RUNS: usize = 1_024;
/// `to` times a conversion state keeps at most.
pub const MAX_TO_TIMES: usize = 64;

/// The series a tracker writes per day.
pub mod series {
    /// Events counted.
    pub const COUNT: &str = "count";
    /// A numeric property's sum over the events counted.
    pub const SUM: &str = "sum";
    /// Profiles whose first activity fell on the day.
    pub const NEW: &str = "new";
    /// The change, from the day before, in profiles active within the
    /// tracker's window; the prefix sum is the number active at the day's end.
    pub const ACTIVE_CHANGE: &str = "active_change";
    /// Profiles whose first `from` event fell on the day.
    pub const STARTED: &str = "started";
    /// Of those, the profiles that did `to` within the window after it.
    pub const CONVERTED: &str = "converted";
    /// Profiles the resolver created.
    pub const CREATED: &str = "created";
    /// Profiles merged into another.
    pub const MERGED: &str = "merged";
}

/// Which time an event is counted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventClock {
    /// When it happened (its corrected Segment `timestamp`).
    Happened,
    /// When Tandem received it.
    Received,
}

/// One thing the insight stage counts per day.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TrackerSpec {
    /// `track` events named `event` (every event of any type when `None`):
    /// their number and, with `property`, the sum of that property where it
    /// is a JSON number.
    Events {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        property: Option<String>,
        clock: EventClock,
    },
    /// Profiles with any event: new ones per day, and how many were active
    /// within `window_days` days at each day's end.
    Activity { window_days: u32 },
    /// Profiles whose first `from` event fell on a day, and how many of them
    /// did `to` at or after it and no later than `within_ms` after it.
    Conversion { from: String, to: String, within_ms: i64 },
    /// Profiles the resolver created and merged per day.
    Identity,
}

impl TrackerSpec {
    /// The tracker's stored key: its canonical JSON, equal for equal specs.
    pub fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether it keeps one state per profile (and so needs each event's
    /// profile and the merges).
    pub fn keeps_profiles(&self) -> bool {
        matches!(self, TrackerSpec::Activity { .. } | TrackerSpec::Conversion { .. })
    }

    /// Whether it reads events from the log (else only identity changes).
    pub fn reads_events(&self) -> bool {
        !matches!(self, TrackerSpec::Identity)
    }

    /// Whether it reads the identity changes (creations and merges).
    pub fn reads_identity(&self) -> bool {
        self.keeps_profiles() || matches!(self, TrackerSpec::Identity)
    }

    /// Whether its events need their properties read.
    pub fn reads_properties(&self) -> bool {
        matches!(self, TrackerSpec::Events { property: Some(_), .. })
    }

    /// Adds what one event counts for a totals tracker (nothing for the others).
    pub fn observe_totals(&self, event: &ObservedEvent<'_>, rollup: &mut Rollup) {
        let TrackerSpec::Events { event: name, property, clock } = self else { return };
        if name.as_deref().is_some_and(|name| event.track != Some(name)) {
            return;
        }
        let day = day_of(match clock {
            EventClock::Happened => event.timestamp_ms,
            EventClock::Received => event.received_at_ms,
        });
        rollup.add(day, series::COUNT, 1.0);
        if let Some(property) = property {
            if let Some(value) =
                event.properties.and_then(|properties| properties.get(property)).and_then(Value::as_f64)
            {
                rollup.add(day, series::SUM, value);
            }
        }
    }

    /// Applies one event to its profile's state (for per-profile trackers);
    /// returns whether the state changed.
    pub fn observe_profile(&self, state: &mut ProfileState, event: &ObservedEvent<'_>) -> bool {
        match self {
            TrackerSpec::Activity { .. } => state.observe_activity(day_of(event.timestamp_ms)),
            TrackerSpec::Conversion { from, to, .. } => {
                let mut changed = false;
                if event.track == Some(from.as_str()) {
                    changed |= state.observe_from(event.timestamp_ms);
                }
                if event.track == Some(to.as_str()) {
                    changed |= state.observe_to(event.timestamp_ms);
                }
                changed
            }
            TrackerSpec::Events { .. } | TrackerSpec::Identity => false,
        }
    }

    /// Adds what one identity change counts (for the identity tracker).
    pub fn observe_identity(&self, change: &IdentityEvent, rollup: &mut Rollup) {
        if !matches!(self, TrackerSpec::Identity) {
            return;
        }
        let day = day_of(change.recorded_at_ms);
        match &change.kind {
            IdentityEventKind::Created(_) => rollup.add(day, series::CREATED, 1.0),
            IdentityEventKind::Merged { merged, .. } => rollup.add(day, series::MERGED, merged.len() as f64),
        }
    }

    /// What one profile's state adds to the days of a per-profile tracker.
    pub fn contribution(&self, state: &ProfileState) -> Rollup {
        let mut rollup = Rollup::default();
        match self {
            TrackerSpec::Activity { window_days } => {
                let Some(&(first, _)) = state.runs.first() else { return rollup };
                rollup.add(first, series::NEW, 1.0);
                // Active within N days at the end of day D: some active day
                // d with d <= D < d + N. A run [s, e] covers [s, e + N).
                let window = (*window_days).max(1) as i64;
                let mut covered: Option<(i64, i64)> = None;
                for &(start, end) in &state.runs {
                    let (start, end) = (i64::from(start), i64::from(end) + window);
                    covered = match covered {
                        Some((open, close)) if start <= close => Some((open, close.max(end))),
                        Some((open, close)) => {
                            add_interval(&mut rollup, open, close);
                            Some((start, end))
                        }
                        None => Some((start, end)),
                    };
                }
                if let Some((open, close)) = covered {
                    add_interval(&mut rollup, open, close);
                }
            }
            TrackerSpec::Conversion { within_ms, .. } => {
                let Some(first) = state.first_from_ms else { return rollup };
                let day = day_of(first);
                rollup.add(day, series::STARTED, 1.0);
                let deadline = first.saturating_add(*within_ms);
                if state.to_ms.iter().any(|at| (first..=deadline).contains(at)) {
                    rollup.add(day, series::CONVERTED, 1.0);
                }
            }
            TrackerSpec::Events { .. } | TrackerSpec::Identity => {}
        }
        rollup
    }
}

/// +1 on the first day of `[open, close)` and -1 on the day after it.
fn add_interval(rollup: &mut Rollup, open: i64, close: i64) {
    let clamp = |day: i64| day.clamp(i64::from(Day::MIN), i64::from(Day::MAX)) as Day;
    rollup.add(clamp(open), series::ACTIVE_CHANGE, 1.0);
    if close <= i64::from(Day::MAX) {
        rollup.add(clamp(close), series::ACTIVE_CHANGE, -1.0);
    }
}

/// One event as a tracker sees it.
#[derive(Clone, Copy, Debug)]
pub struct ObservedEvent<'a> {
    /// The profile it belongs to, if the resolver tied it to one.
    pub owner: Option<ProfileId>,
    pub timestamp_ms: i64,
    pub received_at_ms: i64,
    /// A `track` event's name.
    pub track: Option<&'a str>,
    /// Its `properties`, when a tracker asked for them.
    pub properties: Option<&'a Map<String, Value>>,
}

/// A creation or merge the resolver recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityEvent {
    pub recorded_at_ms: i64,
    pub kind: IdentityEventKind,
}

/// What an [`IdentityEvent`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityEventKind {
    /// A new profile.
    Created(ProfileId),
    /// `merged` became part of `into`.
    Merged { into: ProfileId, merged: Vec<ProfileId> },
}

/// Values to add per day and series; adding two adds them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollup {
    values: BTreeMap<(Day, &'static str), f64>,
}

impl Rollup {
    /// Adds `value` to a day's series.
    pub fn add(&mut self, day: Day, series: &'static str, value: f64) {
        *self.values.entry((day, series)).or_default() += value;
    }

    /// Adds every value of `other` times `sign` (1 or -1).
    pub fn add_all(&mut self, other: &Rollup, sign: f64) {
        for ((day, series), value) in &other.values {
            self.add(*day, series, value * sign);
        }
    }

    /// The values, without those that cancelled out to zero.
    pub fn nonzero(&self) -> impl Iterator<Item = (Day, &'static str, f64)> + '_ {
        self.values.iter().filter(|(_, value)| **value != 0.0).map(|((day, series), value)| (*day, *series, *value))
    }

    /// Whether every value cancelled out.
    pub fn is_empty(&self) -> bool {
        self.nonzero().next().is_none()
    }
}

/// One profile's state in a per-profile tracker. Each tracker uses its own
/// fields: activity the runs, conversion the times.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileState {
    /// Runs of consecutive active days, `[first, last]`, sorted, disjoint
    /// and not adjacent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<(Day, Day)>,
    /// The earliest `from` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_from_ms: Option<i64>,
    /// `to` events: every one before `first_from_ms` and the first at or
    /// after it (every one while there is no `from`), sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ms: Vec<i64>,
}

impl ProfileState {
    /// The state as stored.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A stored state; `None` when the text is not one.
    pub fn from_text(text: &str) -> Option<ProfileState> {
        serde_json::from_str(text).ok()
    }

    /// Notes activity on `day`; returns whether it was new.
    fn observe_activity(&mut self, day: Day) -> bool {
        let index = self.runs.partition_point(|&(_, end)| end < day);
        if self.runs.get(index).is_some_and(|&(start, _)| start <= day) {
            return false;
        }
        self.runs.insert(index, (day, day));
        self.normalize_runs();
        true
    }

    /// Sorts runs and joins overlapping or adjacent ones, keeping the newest
    /// [`MAX_RUNS`].
    fn normalize_runs(&mut self) {
        self.runs.sort_unstable();
        let mut joined: Vec<(Day, Day)> = Vec::with_capacity(self.runs.len());
        for &(start, end) in &self.runs {
            match joined.last_mut() {
                Some(last) if i64::from(start) <= i64::from(last.1) + 1 => last.1 = last.1.max(end),
                _ => joined.push((start, end)),
            }
        }
        if joined.len() > MAX_RUNS {
            joined.drain(..joined.len() - MAX_RUNS);
        }
        self.runs = joined;
    }

    fn observe_from(&mut self, at_ms: i64) -> bool {
        if self.first_from_ms.is_some_and(|first| first <= at_ms) {
            return false;
        }
        self.first_from_ms = Some(at_ms);
        self.trim_to_times();
        true
    }

    fn observe_to(&mut self, at_ms: i64) -> bool {
        let before = self.to_ms.clone();
        let index = self.to_ms.partition_point(|&known| known < at_ms);
        if self.to_ms.get(index) != Some(&at_ms) {
            self.to_ms.insert(index, at_ms);
        }
        self.trim_to_times();
        self.to_ms != before
    }

    /// Keeps the `to` times that can still matter: all before the first
    /// `from` (a `from` arriving late, earlier still, may need them) and the
    /// first at or after it.
    fn trim_to_times(&mut self) {
        if let Some(first) = self.first_from_ms {
            let after = self.to_ms.partition_point(|&at| at < first);
            self.to_ms.truncate((after + 1).min(self.to_ms.len()));
        }
        if self.to_ms.len() > MAX_TO_TIMES {
            self.to_ms.drain(..self.to_ms.len() - MAX_TO_TIMES);
        }
    }

    /// The state of the union of the events behind `self` and `other`.
    pub fn merge(&mut self, other: &ProfileState) {
        if !other.runs.is_empty() {
            self.runs.extend_from_slice(&other.runs);
            self.normalize_runs();
        }
        self.first_from_ms = match (self.first_from_ms, other.first_from_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.to_ms.extend_from_slice(&other.to_ms);
        self.to_ms.sort_unstable();
        self.to_ms.dedup();
        self.trim_to_times();
    }

    /// Whether the state holds nothing (a profile with no counted event).
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.first_from_ms.is_none() && self.to_ms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use std::collections::{BTreeSet, HashMap};

    fn event(owner: u64, day: Day, track: &str) -> (ProfileId, i64, String) {
        (ProfileId(owner), day_start_ms(day) + 3_600_000, track.to_owned())
    }

    fn observed(owner: ProfileId, at: i64, track: &str) -> ObservedEvent<'_> {
        ObservedEvent { owner: Some(owner), timestamp_ms: at, received_at_ms: at, track: Some(track), properties: None }
    }

    /// The stage's bookkeeping in miniature: states per profile and the
    /// rollup of contributions, kept by adding new minus old.
    #[derive(Default)]
    struct Incremental {
        states: HashMap<ProfileId, ProfileState>,
        rollup: Rollup,
    }

    impl Incremental {
        fn observe(&mut self, spec: &TrackerSpec, owner: ProfileId, at: i64, track: &str) {
            let state = self.states.entry(owner).or_default();
            let old = spec.contribution(state);
            if spec.observe_profile(state, &observed(owner, at, track)) {
                self.rollup.add_all(&old, -1.0);
                self.rollup.add_all(&spec.contribution(state), 1.0);
            }
        }

        fn merge(&mut self, spec: &TrackerSpec, from: ProfileId, into: ProfileId) {
            let Some(gone) = self.states.remove(&from) else { return };
            self.rollup.add_all(&spec.contribution(&gone), -1.0);
            let survivor = self.states.entry(into).or_default();
            self.rollup.add_all(&spec.contribution(survivor), -1.0);
            survivor.merge(&gone);
            self.rollup.add_all(&spec.contribution(survivor), 1.0);
        }

        fn value(&self, day: Day, series: &str) -> f64 {
            self.rollup.nonzero().filter(|(d, s, _)| *d == day && *s == series).map(|(_, _, v)| v).sum()
        }

        fn through(&self, day: Day, series: &str) -> f64 {
            self.rollup.nonzero().filter(|(d, s, _)| *d <= day && *s == series).map(|(_, _, v)| v).sum()
        }
    }

    #[test]
    fn activity_counts_new_and_active_customers_per_day() {
        let spec = TrackerSpec::Activity { window_days: 7 };
        let mut incremental = Incremental::default();
        for (owner, at, track) in [event(1, 10, "a"), event(1, 12, "a"), event(2, 12, "b"), event(1, 30, "a")] {
            incremental.observe(&spec, owner, at, &track);
        }
        assert_eq!(incremental.value(10, series::NEW), 1.0);
        assert_eq!(incremental.value(12, series::NEW), 1.0);
        let active = |day| incremental.through(day, series::ACTIVE_CHANGE);
        assert_eq!(active(9), 0.0);
        assert_eq!(active(10), 1.0);
        assert_eq!(active(12), 2.0);
        assert_eq!(active(18), 2.0, "day 12 + 6");
        assert_eq!(active(19), 0.0, "both quiet for seven days");
        assert_eq!(active(30), 1.0);
    }

    #[test]
    fn conversion_counts_the_first_from_and_a_to_within_the_window() {
        let spec = TrackerSpec::Conversion { from: "Viewed".into(), to: "Bought".into(), within_ms: 2 * DAY_MS };
        let mut incremental = Incremental::default();
        // Ann buys the next day; Bob buys too late; Cy bought before viewing.
        for (owner, at, track) in [
            event(1, 5, "Viewed"),
            event(1, 6, "Bought"),
            event(2, 5, "Viewed"),
            event(2, 9, "Bought"),
            event(3, 4, "Bought"),
            event(3, 6, "Viewed"),
        ] {
            incremental.observe(&spec, owner, at, &track);
        }
        assert_eq!(incremental.value(5, series::STARTED), 2.0);
        assert_eq!(incremental.value(5, series::CONVERTED), 1.0);
        assert_eq!(incremental.value(6, series::STARTED), 1.0);
        assert_eq!(incremental.value(6, series::CONVERTED), 0.0);
        // A late, earlier view moves Cy's start to day 3, one day before the purchase.
        incremental.observe(&spec, ProfileId(3), day_start_ms(3), "Viewed");
        assert_eq!(incremental.value(6, series::STARTED), 0.0);
        assert_eq!(incremental.value(3, series::CONVERTED), 1.0);
    }

    #[test]
    fn totals_count_events_and_sum_a_numeric_property() {
        let spec = TrackerSpec::Events {
            event: Some("Order Completed".into()),
            property: Some("revenue".into()),
            clock: EventClock::Happened,
        };
        let properties = json!({"revenue": 12.5}).as_object().cloned().unwrap();
        let text = json!({"revenue": "12"}).as_object().cloned().unwrap();
        let mut rollup = Rollup::default();
        let at = day_start_ms(100);
        for (track, properties) in
            [("Order Completed", Some(&properties)), ("Order Completed", Some(&text)), ("Viewed", Some(&properties))]
        {
            let event =
                ObservedEvent { owner: None, timestamp_ms: at, received_at_ms: 0, track: Some(track), properties };
            spec.observe_totals(&event, &mut rollup);
        }
        let values: Vec<_> = rollup.nonzero().collect();
        assert_eq!(values, vec![(100, series::COUNT, 2.0), (100, series::SUM, 12.5)]);
        let received = TrackerSpec::Events { event: None, property: None, clock: EventClock::Received };
        let mut rollup = Rollup::default();
        received.observe_totals(
            &ObservedEvent { owner: None, timestamp_ms: at, received_at_ms: 0, track: None, properties: None },
            &mut rollup,
        );
        assert_eq!(rollup.nonzero().collect::<Vec<_>>(), vec![(0, series::COUNT, 1.0)]);
    }

    #[test]
    fn specs_have_stable_keys_and_states_round_trip_as_text() {
        let spec = TrackerSpec::Conversion { from: "a".into(), to: "b".into(), within_ms: 5 };
        assert_eq!(spec.key(), r#"{"kind":"conversion","from":"a","to":"b","within_ms":5}"#);
        assert_eq!(serde_json::from_str::<TrackerSpec>(&spec.key()).unwrap(), spec);
        let state = ProfileState { runs: vec![(1, 3)], first_from_ms: Some(9), to_ms: vec![4, 10] };
        assert_eq!(ProfileState::from_text(&state.to_text()), Some(state));
        assert_eq!(ProfileState::from_text("nonsense"), None);
    }

    /// One step of a random history: an event for a profile, or a merge of
    /// one profile into another.
    #[derive(Clone, Debug)]
    enum Step {
        Event { profile: u64, day: Day, minute: i64, to: bool },
        Merge { from: u64, into: u64 },
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        let step = prop_oneof![
            4 => (0u64..8, 0..40, 0i64..1_440, any::<bool>())
                .prop_map(|(profile, day, minute, to)| Step::Event { profile, day, minute, to }),
            1 => (0u64..8, 0u64..8).prop_map(|(from, into)| Step::Merge { from, into }),
        ];
        prop::collection::vec(step, 1..80)
    }

    /// Reference: every event's final owner (following merges), then the
    /// metric computed from each final profile's events directly.
    fn final_owners(steps: &[Step]) -> Vec<(u64, i64, bool)> {
        let mut into: HashMap<u64, u64> = HashMap::new();
        let live = |into: &HashMap<u64, u64>, mut id: u64| {
            while let Some(next) = into.get(&id) {
                id = *next;
            }
            id
        };
        let mut events = Vec::new();
        for step in steps {
            match step {
                Step::Event { profile, day, minute, to } => {
                    events.push((*profile, day_start_ms(*day) + minute * 60_000, *to));
                }
                Step::Merge { from, into: target } => {
                    let (from, target) = (live(&into, *from), live(&into, *target));
                    if from != target {
                        into.insert(from, target);
                    }
                }
            }
        }
        events.into_iter().map(|(profile, at, to)| (live(&into, profile), at, to)).collect()
    }

    /// Replays the steps as the stage would, in two passes that split the
    /// events (as a backfill and the live stage do): owners are each
    /// event's owner when it is applied, merges fold states.
    fn incremental(spec: &TrackerSpec, steps: &[Step], split: usize, to_first: bool) -> Incremental {
        let mut into: HashMap<u64, u64> = HashMap::new();
        let live = |into: &HashMap<u64, u64>, mut id: u64| {
            while let Some(next) = into.get(&id) {
                id = *next;
            }
            id
        };
        let mut state = Incremental::default();
        let mut held_back = Vec::new();
        for (index, step) in steps.iter().enumerate() {
            match step {
                Step::Event { profile, day, minute, to } => {
                    let at = day_start_ms(*day) + minute * 60_000;
                    if index < split {
                        // Applied later, with its owner at that time.
                        held_back.push((*profile, at, *to));
                    } else {
                        let owner = live(&into, *profile);
                        state.observe(spec, ProfileId(owner), at, if *to { "to" } else { "from" });
                    }
                }
                Step::Merge { from, into: target } => {
                    let (from, target) = (live(&into, *from), live(&into, *target));
                    if from != target {
                        into.insert(from, target);
                        state.merge(spec, ProfileId(from), ProfileId(target));
                    }
                }
            }
        }
        if to_first {
            held_back.reverse();
        }
        for (profile, at, to) in held_back {
            let owner = live(&into, profile);
            state.observe(spec, ProfileId(owner), at, if to { "to" } else { "from" });
        }
        state
    }

    proptest! {
        /// New customers per day and customers active within the window at
        /// each day's end equal a direct count over the final profiles,
        /// whatever the merges, the order and the split between backfill
        /// and live events.
        #[test]
        fn activity_rollups_equal_a_direct_count(
            steps in steps(), window in 1u32..10, split in 0usize..80, reversed in any::<bool>()
        ) {
            let spec = TrackerSpec::Activity { window_days: window };
            let kept = incremental(&spec, &steps, split, reversed);
            let mut days: HashMap<u64, BTreeSet<Day>> = HashMap::new();
            for (owner, at, _) in final_owners(&steps) {
                days.entry(owner).or_default().insert(day_of(at));
            }
            for day in -2..52 {
                let new = days.values().filter(|set| set.first() == Some(&day)).count() as f64;
                prop_assert_eq!(kept.value(day, series::NEW), new, "new on day {}", day);
                let active = days
                    .values()
                    .filter(|set| set.iter().any(|d| *d <= day && day < d + window as Day))
                    .count() as f64;
                prop_assert_eq!(kept.through(day, series::ACTIVE_CHANGE), active, "active on day {}", day);
            }
        }

        /// Conversions per day of the first `from` equal a direct reading of
        /// each final profile's events.
        #[test]
        fn conversion_rollups_equal_a_direct_count(
            steps in steps(), within_hours in 1i64..200, split in 0usize..80, reversed in any::<bool>()
        ) {
            let within_ms = within_hours * 3_600_000;
            let spec = TrackerSpec::Conversion { from: "from".into(), to: "to".into(), within_ms };
            let kept = incremental(&spec, &steps, split, reversed);
            let mut events: HashMap<u64, Vec<(i64, bool)>> = HashMap::new();
            for (owner, at, to) in final_owners(&steps) {
                events.entry(owner).or_default().push((at, to));
            }
            let mut started: BTreeMap<Day, f64> = BTreeMap::new();
            let mut converted: BTreeMap<Day, f64> = BTreeMap::new();
            for list in events.values() {
                let Some(first) = list.iter().filter(|(_, to)| !to).map(|(at, _)| *at).min() else { continue };
                *started.entry(day_of(first)).or_default() += 1.0;
                if list.iter().any(|(at, to)| *to && first <= *at && *at <= first + within_ms) {
                    *converted.entry(day_of(first)).or_default() += 1.0;
                }
            }
            for day in -2..52 {
                prop_assert_eq!(kept.value(day, series::STARTED), started.get(&day).copied().unwrap_or(0.0));
                prop_assert_eq!(kept.value(day, series::CONVERTED), converted.get(&day).copied().unwrap_or(0.0));
            }
        }

        /// Merging states is order-free: the state of a union does not
        /// depend on how the events were split or in which order merged.
        #[test]
        fn merging_states_is_commutative_and_associative(
            days in prop::collection::vec((0..60 as Day, 0i64..100_000, any::<bool>()), 0..40), cut in 0usize..40
        ) {
            let spec = TrackerSpec::Conversion { from: "from".into(), to: "to".into(), within_ms: 1 };
            let build = |slice: &[(Day, i64, bool)]| {
                let mut state = ProfileState::default();
                for (day, at, to) in slice {
                    state.observe_activity(*day);
                    spec.observe_profile(&mut state, &observed(ProfileId(1), *at, if *to { "to" } else { "from" }));
                }
                state
            };
            let cut = cut.min(days.len());
            let (left, right) = (build(&days[..cut]), build(&days[cut..]));
            let mut one = left.clone();
            one.merge(&right);
            let mut other = right.clone();
            other.merge(&left);
            prop_assert_eq!(&one, &other);
            prop_assert_eq!(&one, &build(&days));
        }
    }
}
