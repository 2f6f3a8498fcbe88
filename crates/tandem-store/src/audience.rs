//! The audience stage's storage interface: audience definitions, each
//! profile's membership with its enter/exit history, the per-profile
//! evaluation state of every audience (a serialized
//! [`AudienceState`]) with its due-timer (when time alone changes the
//! answer), and the stage's cursor in `stage_cursors`, all written together
//! by [`AudienceStore::commit_audience`] so a crash replays from exactly the
//! last committed effects.
//!
//! Computed traits live here too: their definitions with their backfill
//! progress, and per (trait, profile) the incremental state
//! ([`ComputedTraitState`]), the current value and a due-timer. The audience
//! stage keeps them in the same commit as memberships, so an audience that
//! tests a computed trait reads a value computed from exactly the events
//! the stage has applied.

use serde::Serialize;
use serde_json::Value;
use tandem_core::audience::{AudienceState, ComputedTraitDefinition, ComputedTraitState, Condition};
use tandem_core::{LogPosition, ProfileId};

use crate::{Stage, StoreError};

impl Stage {
    /// The audience stage.
    pub const AUDIENCE: Stage = Stage("audience");
}

/// How many profiles entered and left an audience on one UTC day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DailyChanges {
    /// Midnight UTC starting the day, in milliseconds since the epoch.
    pub day_start_ms: i64,
    pub entered: u64,
    pub exited: u64,
}

/// One day of an audience's size: the members at the end of that UTC day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DailySize {
    pub day_start_ms: i64,
    pub size: u64,
}

/// The size at the end of each day that saw a change, from the day's
/// entries and exits (the history starts empty).
pub fn size_over_time(changes: &[DailyChanges]) -> Vec<DailySize> {
    let mut size: u64 = 0;
    changes
        .iter()
        .map(|day| {
            size = (size + day.entered).saturating_sub(day.exited);
            DailySize { day_start_ms: day.day_start_ms, size }
        })
        .collect()
}

/// An audience as defined by a person: a unique name and its rule.
#[derive(Clone, Debug, PartialEq)]
pub struct AudienceDefinition {
    pub name: String,
    pub rule: Condition,
    pub created_at_ms: i64,
}

/// How far the stage has evaluated a new audience over the profiles that
/// existed before it: profiles are backfilled by id, a page at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backfill {
    /// Profiles with an id above `after` (all of them for `None`) are not
    /// evaluated yet.
    Pending { after: Option<ProfileId> },
    /// Every profile is evaluated; new events keep the audience current.
    Done,
}

/// A stored audience with its current number of members.
#[derive(Clone, Debug, PartialEq)]
pub struct AudienceRecord {
    pub definition: AudienceDefinition,
    pub size: u64,
    pub backfill: Backfill,
}

/// A profile's current membership of one audience.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Membership {
    pub audience: String,
    pub profile: ProfileId,
    /// When the profile entered (the time of the event, or of the timer,
    /// that made it a member), in milliseconds.
    pub entered_at_ms: i64,
}

/// Whether a profile entered or left an audience.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipChangeKind {
    Entered,
    Exited,
}

impl MembershipChangeKind {
    /// The change as stored and shown: `entered` or `exited`.
    pub fn as_str(self) -> &'static str {
        match self {
            MembershipChangeKind::Entered => "entered",
            MembershipChangeKind::Exited => "exited",
        }
    }
}

/// One entry of a membership's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MembershipChange {
    pub audience: String,
    pub profile: ProfileId,
    pub kind: MembershipChangeKind,
    pub at_ms: i64,
}

/// One profile's evaluation state for one audience, and when its answer
/// next changes without a new event (its due-timer), if ever.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredAudienceState {
    pub audience: String,
    pub profile: ProfileId,
    pub state: AudienceState,
    pub next_change_at_ms: Option<i64>,
}

/// A state to write (`state: Some`) or to remove (`None`).
#[derive(Clone, Debug, PartialEq)]
pub struct AudienceStateWrite {
    pub audience: String,
    pub profile: ProfileId,
    pub state: Option<AudienceState>,
    pub next_change_at_ms: Option<i64>,
}

/// What the audience stage writes in one transaction.
#[derive(Clone, Debug, Default)]
pub struct AudienceCommit {
    /// The stage position the effects start from.
    pub from: LogPosition,
    /// The stage position once committed (`from` for timer and backfill
    /// work, which reads no new event).
    pub to: LogPosition,
    /// The resolver's epoch the effects were computed in, kept in the
    /// stage's `stage_cursors` row: when a repair moves the resolver to a
    /// new epoch, the stage evaluates every audience again.
    pub epoch: u64,
    pub states: Vec<AudienceStateWrite>,
    /// Applied in order: `Entered` adds the membership, `Exited` removes
    /// it; each that changed a membership is appended to the history (one
    /// that changed nothing, such as a second stage applying the same
    /// timer, is dropped).
    pub changes: Vec<MembershipChange>,
    /// Backfill progress of new audiences.
    pub backfill: Vec<(String, Backfill)>,
    /// Computed-trait states and values to write or remove; those of a
    /// computed trait that no longer exists are not written.
    pub computed: Vec<ComputedTraitWrite>,
    /// Backfill progress of new computed traits.
    pub computed_backfill: Vec<(String, Backfill)>,
}

/// A computed trait as stored: its unique name, definition and how far the
/// stage has computed it over the profiles that existed before it.
#[derive(Clone, Debug, PartialEq)]
pub struct ComputedTraitRecord {
    pub name: String,
    pub definition: ComputedTraitDefinition,
    pub created_at_ms: i64,
    pub backfill: Backfill,
}

/// One profile's state and value of one computed trait, and when the value
/// next changes without a new event (its due-timer), if ever.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredComputedTrait {
    pub name: String,
    pub profile: ProfileId,
    pub state: ComputedTraitState,
    /// `None` when the function has no value for no events (`min`, `last`…).
    pub value: Option<Value>,
    pub next_change_at_ms: Option<i64>,
}

/// A computed-trait state to write (`state: Some`) or to remove (`None`).
#[derive(Clone, Debug, PartialEq)]
pub struct ComputedTraitWrite {
    pub name: String,
    pub profile: ProfileId,
    pub state: Option<ComputedTraitState>,
    pub value: Option<Value>,
    pub next_change_at_ms: Option<i64>,
}

/// What became of an [`AudienceCommit`]; only `Committed` wrote anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AudienceCommitOutcome {
    Committed,
    /// The stage's position is no longer the commit's `from`: another
    /// audience stage applied those events first.
    StalePosition,
}

/// The audience stage's storage.
pub trait AudienceStore: Send + Sync + 'static {
    /// Stores a new audience, to be backfilled; refused with
    /// [`StoreError::AudienceExists`] when the name is taken.
    fn create_audience(&self, definition: &AudienceDefinition) -> Result<(), StoreError>;

    /// Every audience, by name.
    fn list_audiences(&self) -> Result<Vec<AudienceRecord>, StoreError>;

    /// One audience by name.
    fn audience(&self, name: &str) -> Result<Option<AudienceRecord>, StoreError>;

    /// Removes an audience with its memberships, history and states;
    /// [`StoreError::AudienceNotFound`] when there is none of that name.
    fn delete_audience(&self, name: &str) -> Result<(), StoreError>;

    /// Members of an audience with a profile id above `after`, by id, at most `limit`.
    fn audience_members(
        &self,
        name: &str,
        after: Option<ProfileId>,
        limit: usize,
    ) -> Result<Vec<Membership>, StoreError>;

    /// The audiences a profile is a member of now, by audience name.
    fn profile_audiences(&self, profile: ProfileId) -> Result<Vec<Membership>, StoreError>;

    /// The memberships of many profiles at once, in no order.
    fn memberships_of(&self, profiles: &[ProfileId]) -> Result<Vec<Membership>, StoreError>;

    /// A profile's history in one audience, oldest first.
    fn membership_history(&self, name: &str, profile: ProfileId) -> Result<Vec<MembershipChange>, StoreError>;

    /// An audience's entries and exits per UTC day, oldest day first: what
    /// its size over time is computed from.
    fn audience_changes_by_day(&self, name: &str) -> Result<Vec<DailyChanges>, StoreError>;

    /// The stored states of these profiles, for every audience, in no order.
    fn audience_states(&self, profiles: &[ProfileId]) -> Result<Vec<StoredAudienceState>, StoreError>;

    /// States whose timer is due at `now_ms` (at or before it), soonest
    /// first, at most `limit`.
    fn due_audience_states(&self, now_ms: i64, limit: usize) -> Result<Vec<StoredAudienceState>, StoreError>;

    /// Profiles that have audience states or memberships but no longer name
    /// a live profile (merged away, or replaced by a repair), at most `limit`.
    fn retired_audience_profiles(&self, limit: usize) -> Result<Vec<ProfileId>, StoreError>;

    /// Writes the stage's effects and moves its cursor from `commit.from` to
    /// `commit.to`, in one transaction. States, memberships and history of an
    /// audience that no longer exists (deleted while the stage evaluated it)
    /// are not written.
    fn commit_audience(&self, commit: &AudienceCommit) -> Result<AudienceCommitOutcome, StoreError>;

    /// Stores a new computed trait, to be backfilled; refused with
    /// [`StoreError::ComputedTraitExists`] when the name is taken.
    fn create_computed_trait(
        &self,
        name: &str,
        definition: &ComputedTraitDefinition,
        created_at_ms: i64,
    ) -> Result<(), StoreError>;

    /// Every computed trait, by name.
    fn list_computed_traits(&self) -> Result<Vec<ComputedTraitRecord>, StoreError>;

    /// One computed trait by name.
    fn computed_trait(&self, name: &str) -> Result<Option<ComputedTraitRecord>, StoreError>;

    /// Removes a computed trait with its states and values;
    /// [`StoreError::ComputedTraitNotFound`] when there is none of that name.
    fn delete_computed_trait(&self, name: &str) -> Result<(), StoreError>;

    /// The stored computed traits of these profiles, in no order.
    fn computed_trait_states(&self, profiles: &[ProfileId]) -> Result<Vec<StoredComputedTrait>, StoreError>;

    /// Computed-trait states whose timer is due at `now_ms` (at or before
    /// it), soonest first, at most `limit`.
    fn due_computed_trait_states(&self, now_ms: i64, limit: usize) -> Result<Vec<StoredComputedTrait>, StoreError>;
}

pub(crate) fn computed_state_to_text(state: &ComputedTraitState) -> Result<String, StoreError> {
    serde_json::to_string(state).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn computed_state_from_text(text: &str) -> Result<ComputedTraitState, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn definition_to_text(definition: &ComputedTraitDefinition) -> Result<String, StoreError> {
    serde_json::to_string(definition).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn definition_from_text(text: &str) -> Result<ComputedTraitDefinition, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn value_to_text(value: Option<&Value>) -> Option<String> {
    value.map(Value::to_string)
}

pub(crate) fn value_from_text(text: Option<&str>) -> Result<Option<Value>, StoreError> {
    text.map(serde_json::from_str).transpose().map_err(|error| StoreError::Backend(Box::new(error)))
}

/// A state as stored: JSON text.
pub(crate) fn state_to_text(state: &AudienceState) -> Result<String, StoreError> {
    serde_json::to_string(state).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn state_from_text(text: &str) -> Result<AudienceState, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn rule_to_text(rule: &Condition) -> Result<String, StoreError> {
    serde_json::to_string(rule).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn rule_from_text(text: &str) -> Result<Condition, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Backend(Box::new(error)))
}

/// The stored form of [`Backfill`]: `backfilled` and the last profile id done
/// (0 for none).
pub(crate) fn backfill_columns(backfill: Backfill) -> (bool, i64) {
    match backfill {
        Backfill::Done => (true, 0),
        Backfill::Pending { after } => (false, after.map_or(0, |id| id.0 as i64)),
    }
}

pub(crate) fn backfill_from_columns(backfilled: bool, after: i64) -> Backfill {
    if backfilled {
        Backfill::Done
    } else {
        Backfill::Pending { after: (after > 0).then_some(ProfileId(after as u64)) }
    }
}

pub(crate) fn change_kind_from_text(text: &str) -> MembershipChangeKind {
    if text == "entered" {
        MembershipChangeKind::Entered
    } else {
        MembershipChangeKind::Exited
    }
}
