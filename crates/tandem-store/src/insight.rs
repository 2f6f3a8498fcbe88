//! The insight stage's storage interface: goals (their settings, as a
//! person defined them), the trackers they need ([`TrackerSpec`]: shared by
//! every goal that needs the same thing, removed with the last of them),
//! each tracker's values per UTC day and its per-profile states, the
//! stage's cursor in `stage_cursors`, and the figures kept beside the log —
//! snapshots of counters once a minute and ingest latency histograms per
//! day.
//!
//! [`InsightStore::commit_insight`] writes a batch's day values, states,
//! backfill progress and the new cursor in one transaction, refused as
//! [`InsightCommitOutcome::StalePosition`] when another stage moved the
//! cursor first, so a crash replays exactly what was not committed. Rows of
//! a tracker that no longer exists (its last goal was deleted while the
//! stage worked) are not written, and a tracker created again later has a
//! new id, so nothing computed for the old one lands in it.

use serde::Serialize;
use tandem_core::insight::goals::GoalSettings;
use tandem_core::insight::rollup::{Day, IdentityEvent, IdentityEventKind, ProfileState, TrackerSpec};
use tandem_core::{IdentityChange, LogPosition, ProfileId};

use crate::{Stage, StoreError};

impl Stage {
    /// The insight stage: daily rollups for goals.
    pub const INSIGHT: Stage = Stage("insight");
}

/// A stored goal.
#[derive(Clone, Debug, PartialEq)]
pub struct GoalRecord {
    pub settings: GoalSettings,
    pub created_at_ms: i64,
}

/// A tracker's id: never reused, so rows computed for a deleted tracker
/// never land in a new one of the same spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct TrackerId(pub i64);

/// How far a tracker has read the log's past.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerBackfill {
    /// New: the stage has not started it yet.
    NotStarted,
    /// The stage applies every event after `through` as it comes, and reads
    /// the events up to `through` (its position when it started the
    /// tracker) a page at a time; those up to `after` are done.
    Running { after: LogPosition, through: LogPosition },
    /// Every event up to the stage's position is counted.
    Done,
}

/// A stored tracker.
#[derive(Clone, Debug, PartialEq)]
pub struct TrackerRecord {
    pub id: TrackerId,
    pub spec: TrackerSpec,
    pub backfill: TrackerBackfill,
}

/// One stored day value of a tracker.
#[derive(Clone, Debug, PartialEq)]
pub struct DayValue {
    pub series: String,
    pub day: Day,
    pub value: f64,
}

/// A value to add to a tracker's day.
#[derive(Clone, Debug, PartialEq)]
pub struct DayAdd {
    pub tracker: TrackerId,
    pub series: &'static str,
    pub day: Day,
    pub value: f64,
}

/// A profile's state to write (`Some`) or remove (`None`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileStateWrite {
    pub tracker: TrackerId,
    pub profile: ProfileId,
    pub state: Option<ProfileState>,
}

/// A tracker's backfill moved on: `from` is where the stage read it, `to`
/// where it is once committed. A tracker found anywhere but `from` (another
/// stage committed that page first, say the command line beside a server on
/// the embedded store) makes the whole commit
/// [`InsightCommitOutcome::StalePosition`], so no page is counted twice; a
/// tracker that no longer exists is skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackfillMove {
    pub tracker: TrackerId,
    pub from: TrackerBackfill,
    pub to: TrackerBackfill,
}

/// What the insight stage writes in one transaction.
#[derive(Clone, Debug, Default)]
pub struct InsightCommit {
    /// The stage position the effects start from.
    pub from: LogPosition,
    /// The stage position once committed (`from` for backfill work).
    pub to: LogPosition,
    /// The resolver's epoch the effects were computed in.
    pub epoch: u64,
    /// Forget every tracker's days and states and mark each not started
    /// (the resolver's epoch moved: a repair or an erasure rewrote
    /// profiles, which no merge of states can follow). Applied first.
    pub restart_all: bool,
    /// Backfill progress, each move from where the stage read it.
    pub backfill: Vec<BackfillMove>,
    pub days: Vec<DayAdd>,
    pub states: Vec<ProfileStateWrite>,
}

/// What became of an [`InsightCommit`]; only `Committed` wrote anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsightCommitOutcome {
    Committed,
    /// The stage's position is no longer the commit's `from`, or a
    /// backfill is no longer where the commit read it: another insight
    /// stage applied those events first.
    StalePosition,
}

/// Cumulative counters the stage snapshots, read cheaply from the other
/// stages' tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InsightCounters {
    /// Events stored in the log.
    pub events: u64,
    /// Tracking-plan violations counted.
    pub violations: u64,
    /// Items destinations accepted.
    pub delivered: u64,
    /// Items in dead-letter lists now.
    pub dead_letters: u64,
}

/// The insight stage's storage.
pub trait InsightStore: Send + Sync + 'static {
    /// Stores a goal and the trackers it needs (those that exist already are
    /// shared); refused with [`StoreError::GoalExists`] when the name is
    /// taken. New trackers wait for the stage to start them.
    fn create_goal(
        &self,
        settings: &GoalSettings,
        trackers: &[TrackerSpec],
        created_at_ms: i64,
    ) -> Result<(), StoreError>;

    /// Every goal, by name.
    fn list_goals(&self) -> Result<Vec<GoalRecord>, StoreError>;

    /// One goal by name.
    fn goal(&self, name: &str) -> Result<Option<GoalRecord>, StoreError>;

    /// Removes a goal, and the trackers no other goal needs with their days
    /// and states; [`StoreError::GoalNotFound`] when there is none of that name.
    fn delete_goal(&self, name: &str) -> Result<(), StoreError>;

    /// Every tracker, by id.
    fn trackers(&self) -> Result<Vec<TrackerRecord>, StoreError>;

    /// A tracker's day values from `from_day` (from its first when `None`)
    /// to `to_day`, both included, by series then day.
    fn tracker_days(&self, tracker: TrackerId, from_day: Option<Day>, to_day: Day)
        -> Result<Vec<DayValue>, StoreError>;

    /// The stored states of these profiles in these trackers, in no order.
    fn profile_states(
        &self,
        trackers: &[TrackerId],
        profiles: &[ProfileId],
    ) -> Result<Vec<(TrackerId, ProfileId, ProfileState)>, StoreError>;

    /// The creations and merges the resolver recorded for events after
    /// `after` up to `up_to`, in the order it recorded them.
    fn identity_events(&self, after: LogPosition, up_to: LogPosition) -> Result<Vec<IdentityEvent>, StoreError>;

    /// Writes the stage's effects and moves its cursor from `commit.from`
    /// to `commit.to`, in one transaction.
    fn commit_insight(&self, commit: &InsightCommit) -> Result<InsightCommitOutcome, StoreError>;

    /// The counters the stage snapshots.
    fn insight_counters(&self) -> Result<InsightCounters, StoreError>;

    /// Records each key's value as `day`'s (replacing an earlier one of the
    /// same day).
    fn record_snapshots(&self, day: Day, values: &[(String, f64)]) -> Result<(), StoreError>;

    /// The snapshots of `keys` from `from_day` to `to_day` (both included),
    /// and for each key the last one before `from_day`, by key then day.
    fn snapshots(&self, keys: &[String], from_day: Day, to_day: Day) -> Result<Vec<(String, Day, f64)>, StoreError>;

    /// Adds ingest latency counts `(day, bucket, count)`.
    fn add_ingest_latency(&self, counts: &[(Day, u16, u64)]) -> Result<(), StoreError>;

    /// Ingest latency counts from `from_day` to `to_day` (both included).
    fn ingest_latency(&self, from_day: Day, to_day: Day) -> Result<Vec<(Day, u16, u64)>, StoreError>;
}

/// Settings as stored: JSON text.
pub(crate) fn settings_to_text(settings: &GoalSettings) -> Result<String, StoreError> {
    serde_json::to_string(settings).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn settings_from_text(text: &str) -> Result<GoalSettings, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn spec_from_text(text: &str) -> Result<TrackerSpec, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn state_from_text(text: &str) -> Result<ProfileState, StoreError> {
    ProfileState::from_text(text)
        .ok_or_else(|| StoreError::Backend(format!("unreadable insight profile state {text:?}").into()))
}

/// The stored form of [`TrackerBackfill`]: started, done, after, through.
pub(crate) fn backfill_columns(backfill: TrackerBackfill) -> (bool, bool, i64, i64) {
    match backfill {
        TrackerBackfill::NotStarted => (false, false, 0, 0),
        TrackerBackfill::Running { after, through } => (true, false, after.0 as i64, through.0 as i64),
        TrackerBackfill::Done => (true, true, 0, 0),
    }
}

pub(crate) fn backfill_from_columns(started: bool, done: bool, after: i64, through: i64) -> TrackerBackfill {
    match (started, done) {
        (false, _) => TrackerBackfill::NotStarted,
        (true, true) => TrackerBackfill::Done,
        (true, false) => {
            TrackerBackfill::Running { after: LogPosition(after as u64), through: LogPosition(through as u64) }
        }
    }
}

/// A history row's change as an [`IdentityEvent`], when it is a creation
/// or a merge.
pub(crate) fn identity_event(change: &str, recorded_at_ms: i64) -> Result<Option<IdentityEvent>, StoreError> {
    let change: IdentityChange = serde_json::from_str(change).map_err(|error| StoreError::Backend(Box::new(error)))?;
    let kind = match change {
        IdentityChange::Created { profile, .. } => IdentityEventKind::Created(profile),
        IdentityChange::Merged { profile, merged, .. } => IdentityEventKind::Merged { into: profile, merged },
        _ => return Ok(None),
    };
    Ok(Some(IdentityEvent { recorded_at_ms, kind }))
}
