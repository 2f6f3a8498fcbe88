//! The identity graph's storage interface: the resolver's state, batched
//! look-ups, commits answered with a typed outcome, and the profile reads the
//! API and the CLI make.

use serde::Serialize;
use std::sync::Arc;
use tandem_core::{Identifier, IdentityChange, IdentityRules, LogPosition, Profile, ProfileId};

use crate::log::LogEntry;
use crate::StoreError;

/// Where the resolver stands, without any profile: what it needs to continue
/// where it stopped. Profiles are read as events need them.
#[derive(Clone, Debug, Default)]
pub struct IdentityState {
    pub next_profile_id: u64,
    /// The last log position applied.
    pub position: LogPosition,
    /// Changes whenever someone other than the resolver rewrites identity
    /// state (rules, repairs); a commit made against an older epoch is refused.
    pub epoch: u64,
    pub rules: IdentityRules,
    /// Live (not merged-away) profiles.
    pub live_profiles: u64,
}

/// The condition selecting merges and drops in `identity_history`, the
/// same text as the partial index over them (both backends' migrations), so
/// the index serves [`IdentityStore::merges_and_drops`]. A change is stored
/// as JSON that starts with its tag.
pub(crate) const MERGES_AND_DROPS: &str = r#"(dropped IS NOT NULL OR substr(change, 1, 16) = '{"kind":"merged"')"#;

/// A history entry from its stored columns, which every backend keeps alike
/// (position, profile, the change as JSON text, when).
pub(crate) fn history_record(
    position: Option<i64>,
    profile: Option<i64>,
    change: &str,
    recorded_at_ms: i64,
) -> Result<HistoryRecord, StoreError> {
    Ok(HistoryRecord {
        position: position.map(|position| LogPosition(position as u64)),
        profile: profile.map(|profile| ProfileId(profile as u64)),
        change: serde_json::from_str(change).map_err(|error| StoreError::Backend(Box::new(error)))?,
        recorded_at_ms,
    })
}

/// One entry of a profile's identity history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HistoryRecord {
    /// The event that caused it; `None` for an admin's repair.
    pub position: Option<LogPosition>,
    pub profile: Option<ProfileId>,
    pub change: IdentityChange,
    pub recorded_at_ms: i64,
}

/// An event tied to the profile it belongs to, with the event's time (its
/// Segment `timestamp`), which orders the profile's timeline. The resolver
/// has read the event, so it passes the time along rather than the store
/// looking each event up again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLink {
    pub position: LogPosition,
    pub timestamp_ms: i64,
    pub profile: ProfileId,
}

/// The profiles a commit writes in full, each as its compact record
/// ([`tandem_core::profile_record`]). A resolver batch holds up to hundreds
/// of thousands of them while it is written: as records they take about
/// 200 bytes each, against some 3 KB as decoded profiles, and the batch
/// encodes each once rather than cloning it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitProfiles(Vec<(ProfileId, Arc<[u8]>)>);

impl CommitProfiles {
    /// Adds `profile`'s current state.
    pub fn push(&mut self, profile: &Profile) {
        self.0.push((profile.id, tandem_core::profile_record::encode(profile).into()));
    }

    /// Adds a profile's record as already encoded, shared with whoever else
    /// holds it (the resolver's records) rather than copied.
    pub fn push_record(&mut self, id: ProfileId, record: Arc<[u8]>) {
        self.0.push((id, record));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each profile's id and record, in the order they were added.
    pub fn records(&self) -> impl Iterator<Item = (ProfileId, &[u8])> {
        self.0.iter().map(|(id, record)| (*id, &record[..]))
    }

    /// Each profile's id and record as shared, to keep a record without copying it.
    pub fn shared_records(&self) -> impl Iterator<Item = (ProfileId, &Arc<[u8]>)> {
        self.0.iter().map(|(id, record)| (*id, record))
    }

    /// Each profile decoded, for a backend that stores another encoding.
    pub fn decoded(&self) -> impl Iterator<Item = Result<Profile, StoreError>> + '_ {
        self.0.iter().map(|(_, record)| {
            tandem_core::profile_record::decode_record(record).map_err(|error| StoreError::Backend(Box::new(error)))
        })
    }
}

impl<'a> FromIterator<&'a Profile> for CommitProfiles {
    fn from_iter<I: IntoIterator<Item = &'a Profile>>(profiles: I) -> Self {
        let mut encoded = CommitProfiles::default();
        for profile in profiles {
            encoded.push(profile);
        }
        encoded
    }
}

impl From<Vec<Profile>> for CommitProfiles {
    fn from(profiles: Vec<Profile>) -> Self {
        profiles.iter().collect()
    }
}

/// What the resolver (or a repair) writes in one transaction.
#[derive(Clone, Debug, Default)]
pub struct IdentityCommit {
    /// The epoch the changes were computed against.
    pub epoch: u64,
    /// The resolver position the changes start from.
    pub from: LogPosition,
    /// The resolver position once committed.
    pub to: LogPosition,
    /// Live profiles to write in full.
    pub profiles: CommitProfiles,
    /// Profiles merged away, in the order it happened: (from, into).
    pub merged: Vec<(ProfileId, ProfileId)>,
    /// Identifiers and the profile that now holds each.
    pub identifiers: Vec<(Identifier, ProfileId)>,
    /// Which profile each event belongs to.
    pub events: Vec<EventLink>,
    pub history: Vec<HistoryRecord>,
    /// Events the resolver could not use, kept so that none is skipped
    /// silently; the list is about the log, so a repair only adds to it.
    pub unresolved: Vec<UnresolvedEvent>,
    pub next_profile_id: u64,
    /// New identity rules to store with the changes (a repair's block).
    pub rules: Option<IdentityRules>,
}

/// A repair's rewrite of part of the graph: the profiles it replaces and
/// the events it replayed, with what resolving those events again gave.
#[derive(Clone, Debug, Default)]
pub struct IdentityRepair {
    /// The new state of the replayed part: `from` and `to` are both the
    /// resolver position the repair read up to; `merged` retires old ids
    /// that no longer name a profile of their own, pointing each at the
    /// profile that now holds its earliest event; `rules` are the new rules.
    pub commit: IdentityCommit,
    /// The old profiles whose identifiers, timeline links and state the
    /// repair replaces.
    pub replaced_profiles: Vec<ProfileId>,
    /// The events replayed: their identity history is replaced.
    pub replayed: Vec<LogPosition>,
}

/// An event in the log that the resolver could not use, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnresolvedEvent {
    pub position: LogPosition,
    pub reason: String,
}

/// A place in a profile's timeline, which is ordered by event time
/// (`timestamp`), then by log position to break ties. Written as
/// `TIMESTAMPMS_POSITION` (for example `1700000000000_42`) where it crosses
/// the API as an opaque paging cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimelineCursor {
    pub timestamp_ms: i64,
    pub position: LogPosition,
}

impl TimelineCursor {
    /// The cursor just at `entry`: a page read before it starts after it.
    pub fn at(entry: &LogEntry) -> Self {
        TimelineCursor { timestamp_ms: entry.timestamp_ms, position: entry.position }
    }
}

impl std::fmt::Display for TimelineCursor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}_{}", self.timestamp_ms, self.position.0)
    }
}

/// A timeline cursor that is not `TIMESTAMPMS_POSITION`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a timeline cursor looks like 1700000000000_42 (as given in next_before)")]
pub struct TimelineCursorError;

impl std::str::FromStr for TimelineCursor {
    type Err = TimelineCursorError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (timestamp, position) = text.rsplit_once('_').ok_or(TimelineCursorError)?;
        Ok(TimelineCursor {
            timestamp_ms: timestamp.parse().map_err(|_| TimelineCursorError)?,
            position: LogPosition(position.parse().map_err(|_| TimelineCursorError)?),
        })
    }
}

/// What became of an [`IdentityCommit`]; only `Committed` wrote anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// The resolver's position is no longer the commit's `from`: someone else
    /// applied those events first.
    StalePosition,
    /// The rules changed or a repair rewrote the graph since the changes were
    /// computed against `epoch`.
    EpochChanged,
}

/// The identity stage's storage.
pub trait IdentityStore: Send + Sync + 'static {
    /// Where the resolver stands, as it last committed (no profiles).
    fn identity_state(&self) -> Result<IdentityState, StoreError>;

    /// Writes resolver output and moves the resolver's cursor from
    /// `commit.from` to `commit.to`, in one transaction.
    fn commit_identity(&self, commit: &IdentityCommit) -> Result<CommitOutcome, StoreError>;

    /// Replaces part of the graph with a repair's replay, in one
    /// transaction: `replaced_profiles` with their identifiers and timeline
    /// links, and the history of the `replayed` events, are removed; `commit`
    /// is written in their place (a replaced id it neither writes nor retires
    /// no longer names a profile), and a new epoch starts.
    /// Refused unless the resolver is still at `commit.from` in `commit.epoch`.
    fn repair_identity(&self, repair: &IdentityRepair) -> Result<CommitOutcome, StoreError>;

    /// Where identifiers were dropped (blocked, or over a limit): the event
    /// and the profile it went to, if any, for every event that carried one
    /// of `identifiers` without linking it, in no order.
    fn dropped_at(&self, identifiers: &[Identifier]) -> Result<Vec<(LogPosition, Option<ProfileId>)>, StoreError>;

    /// The identity rules in force, without loading the graph.
    fn identity_rules(&self) -> Result<IdentityRules, StoreError>;

    /// Replaces the identity rules and starts a new epoch.
    fn set_identity_rules(&self, rules: &IdentityRules) -> Result<(), StoreError>;

    /// The live profile holding each identifier that has one, in no order.
    fn identifier_owners(&self, identifiers: &[Identifier]) -> Result<Vec<(Identifier, ProfileId)>, StoreError>;

    /// The live profiles with these ids (merged-away ids are skipped), in no order.
    fn profiles(&self, ids: &[ProfileId]) -> Result<Vec<Profile>, StoreError>;

    /// Events the resolver could not use, after `after`, oldest first.
    fn unresolved_events(&self, after: LogPosition, limit: usize) -> Result<Vec<UnresolvedEvent>, StoreError>;

    /// A profile by id, following merges to the profile that absorbed it.
    fn profile(&self, id: ProfileId) -> Result<Option<Profile>, StoreError>;

    /// The profile holding an identifier.
    fn profile_by_identifier(&self, identifier: &Identifier) -> Result<Option<Profile>, StoreError>;

    /// A profile's events (with those of every profile merged into it),
    /// newest first by event time — `timestamp` descending, then log position
    /// descending — strictly before `before` when given.
    fn profile_events(
        &self,
        id: ProfileId,
        before: Option<TimelineCursor>,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError>;

    /// The events of many profiles at once (each with those of every
    /// profile merged into it) stamped at or after `since_ms`, each with
    /// the profile whose timeline holds it, in no order; an id that names
    /// no live profile has none. What evaluates a rule over a sample of
    /// profiles reads, instead of one timeline at a time.
    fn events_of_profiles(&self, ids: &[ProfileId], since_ms: i64) -> Result<Vec<(ProfileId, LogEntry)>, StoreError>;

    /// The identity history of a profile and of every profile merged into it, oldest first.
    fn identity_history(&self, id: ProfileId) -> Result<Vec<HistoryRecord>, StoreError>;

    /// Merges and drops across every profile, newest first: entries with a
    /// history id below `before` when given, at most `limit`, each with its
    /// id (pass the last as `before` for the next page). Reads only those
    /// entries, however much other history there is.
    fn merges_and_drops(&self, before: Option<u64>, limit: usize) -> Result<Vec<(u64, HistoryRecord)>, StoreError>;

    /// Which profile each event belongs to, for events in `(after, up_to]`.
    fn event_owners(&self, after: LogPosition, up_to: LogPosition)
        -> Result<Vec<(LogPosition, ProfileId)>, StoreError>;

    /// Live (not merged-away) profiles with an id above `after`, by id, at
    /// most `limit`; decoded as [`IdentityStore::profile`] decodes one.
    fn list_profiles(&self, after: Option<ProfileId>, limit: usize) -> Result<Vec<Profile>, StoreError>;

    /// The ids [`IdentityStore::list_profiles`] would list, without reading
    /// or decoding the profiles: what samples a rule that tests no trait.
    fn list_profile_ids(&self, after: Option<ProfileId>, limit: usize) -> Result<Vec<ProfileId>, StoreError>;

    /// Identifiers of type `kind` whose value starts with `prefix` and sorts
    /// after `after`, by value, at most `limit`, with the profile holding each.
    fn identifiers_with_prefix(
        &self,
        kind: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Identifier, ProfileId)>, StoreError>;
}
