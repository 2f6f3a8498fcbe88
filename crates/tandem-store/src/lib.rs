//! Storage for Tandem: the one interface ([`Store`]) through which every stage
//! reads and writes, the embedded SQLite backend behind it, and the shared
//! test suite ([`store_test_suite!`]) that every backend must pass.
//!
//! The interface is synchronous: backends are driven from dedicated threads
//! (the log writer) or blocking tasks, which lets the embedded backend group
//! many requests into one transaction without an async runtime in the way.

pub mod browse;
pub mod sqlite;
pub mod suite;

use serde::Serialize;
use std::collections::BTreeMap;
use tandem_core::source::SourceError;
use tandem_core::webhook::WebhookSettings;
use tandem_core::{
    EventType, Identifier, IdentityChange, IdentityRules, LogPosition, LogRecord, MessageId, Profile, ProfileId,
    Source, SourceId, SourceKind, WriteKey,
};

pub use sqlite::SqliteStore;

/// What went wrong in storage, in the caller's terms.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a source named {0:?} already exists")]
    SourceExists(String),
    #[error("no source named {0:?}")]
    SourceNotFound(String),
    #[error("source {name:?} has {events} events in the log, which keep naming it; rotate its write key to stop senders instead")]
    SourceInUse { name: String, events: u64 },
    #[error("no token {0:?}")]
    TokenNotFound(String),
    #[error(transparent)]
    InvalidSource(#[from] SourceError),
    #[error("the data directory was written by a newer tandem (schema {found}, this build knows {known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("storage failure: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A message refused by validation, kept with its reason instead of dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantineRecord {
    pub source_id: SourceId,
    pub received_at_ms: i64,
    /// Position in its batch, when it came in one.
    pub batch_index: Option<u32>,
    pub code: String,
    pub field: Option<String>,
    pub message: String,
    /// The message as the client sent it.
    pub payload: String,
}

/// What one request asks the log to store: its valid events and its refusals.
#[derive(Clone, Debug, Default)]
pub struct IngestBatch {
    pub records: Vec<LogRecord>,
    pub rejected: Vec<QuarantineRecord>,
    pub dedup: Dedup,
}

/// How long the `messageId`s of a batch keep later copies out of the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dedup {
    /// Within the dedup window, as Segment does for SDK retries.
    #[default]
    Window,
    /// For good: imported rows and webhook deliveries, whose ids are derived
    /// from the record, so the same file imported months later adds nothing.
    Forever,
}

/// What became of one [`IngestBatch`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Events newly appended to the log.
    pub stored: u32,
    /// Events whose `messageId` the source had sent within the dedup window.
    pub duplicates: u32,
    pub quarantined: u32,
}

/// One event as read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub position: LogPosition,
    pub source_id: SourceId,
    pub message_id: MessageId,
    pub event_type: EventType,
    pub received_at_ms: i64,
    /// The event as Segment JSON, including `receivedAt` and `sourceId`.
    pub payload: String,
}

/// Which events of the log to read, by what storage can index: the source,
/// the type, the event's time and a position range, oldest or newest first.
/// Filters on the payload (event name, user) are [`browse::EventQuery`]'s.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogFilter {
    pub source_id: Option<SourceId>,
    pub event_type: Option<EventType>,
    /// Event time (`timestamp`) at or after, in milliseconds since the epoch.
    pub since_ms: Option<i64>,
    /// Event time before, in milliseconds since the epoch.
    pub until_ms: Option<i64>,
    /// Only positions above this one.
    pub after: Option<LogPosition>,
    /// Only positions below this one.
    pub before: Option<LogPosition>,
    /// Newest (highest position) first instead of oldest first.
    pub newest_first: bool,
}

/// A quarantined message as read back: its id and what was recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantineEntry {
    pub id: u64,
    pub record: QuarantineRecord,
}

/// Ingestion counts for one source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceStats {
    pub source_id: SourceId,
    pub name: String,
    pub events: u64,
    pub events_by_type: BTreeMap<String, u64>,
    pub duplicates: u64,
    pub rejected: u64,
}

/// Ingestion counts for the whole log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IngestStats {
    /// The position of the newest event; 0 when the log is empty.
    pub log_head: LogPosition,
    pub events: u64,
    pub events_by_type: BTreeMap<String, u64>,
    pub duplicates: u64,
    pub rejected: u64,
    pub sources: Vec<SourceStats>,
    /// The last log position the resolver has applied.
    pub resolver_position: LogPosition,
    /// Events in the log the resolver has not applied yet.
    pub resolver_lag: u64,
    /// Live (not merged-away) profiles.
    pub profiles: u64,
}

/// Everything the resolver needs to continue where it stopped.
#[derive(Clone, Debug, Default)]
pub struct IdentitySnapshot {
    pub profiles: Vec<Profile>,
    pub merged_into: Vec<(ProfileId, ProfileId)>,
    pub next_profile_id: u64,
    /// The last log position applied.
    pub position: LogPosition,
    /// Changes whenever someone other than the resolver rewrites identity
    /// state (rules, repairs); a commit made against an older epoch is refused.
    pub epoch: u64,
    pub rules: IdentityRules,
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

/// What the resolver (or a repair) writes in one transaction.
#[derive(Clone, Debug, Default)]
pub struct IdentityCommit {
    /// The epoch the changes were computed against.
    pub epoch: u64,
    /// The resolver position the changes start from; ignored when `replace`.
    pub from: LogPosition,
    /// The resolver position once committed.
    pub to: LogPosition,
    /// Clear all identity state first (a rebuild), and start a new epoch.
    pub replace: bool,
    /// Live profiles to write in full.
    pub profiles: Vec<Profile>,
    /// Profiles merged away, in the order it happened: (from, into).
    pub merged: Vec<(ProfileId, ProfileId)>,
    /// Identifiers and the profile that now holds each.
    pub identifiers: Vec<(Identifier, ProfileId)>,
    /// Which profile each event belongs to.
    pub events: Vec<(LogPosition, ProfileId)>,
    pub history: Vec<HistoryRecord>,
    pub next_profile_id: u64,
    /// New identity rules to store with the changes (a repair's block).
    pub rules: Option<IdentityRules>,
}

/// An admin API token as listed (the secret itself is shown once, at creation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub created_at_ms: i64,
}

/// Everything the pipeline needs from storage.
pub trait Store: Send + Sync + 'static {
    /// Registers a source with a fresh id and write key.
    fn create_source(&self, name: &str, kind: SourceKind) -> Result<Source, StoreError>;

    fn list_sources(&self) -> Result<Vec<Source>, StoreError>;

    /// Makes the named source take webhooks with these settings.
    fn set_webhook(&self, name: &str, settings: &WebhookSettings) -> Result<Source, StoreError>;

    /// A source that takes webhooks, with its settings; `None` for any other id.
    fn webhook(&self, id: &SourceId) -> Result<Option<(Source, WebhookSettings)>, StoreError>;

    fn source_by_write_key(&self, write_key: &WriteKey) -> Result<Option<Source>, StoreError>;

    /// The source with this name; [`StoreError::SourceNotFound`] when there is none.
    fn source_by_name(&self, name: &str) -> Result<Source, StoreError>;

    /// Appends every batch in one transaction and returns their outcomes in
    /// order. Nothing is visible, and nothing may be acknowledged, until this
    /// returns `Ok`. An event whose `(source, messageId)` was stored at or
    /// after `dedup_since_ms` is counted as a duplicate and not stored again.
    fn append(&self, batches: &[IngestBatch], dedup_since_ms: i64) -> Result<Vec<IngestOutcome>, StoreError>;

    /// Events after `after`, oldest first.
    fn read_log(&self, after: LogPosition, limit: usize) -> Result<Vec<LogEntry>, StoreError>;

    /// Quarantined messages with an id above `after_id`, oldest first.
    fn list_quarantine(&self, after_id: u64, limit: usize) -> Result<Vec<QuarantineEntry>, StoreError>;

    fn stats(&self) -> Result<IngestStats, StoreError>;

    /// Forgets the `messageId`s received before the dedup window, except
    /// those stored with [`Dedup::Forever`]; returns how many.
    fn forget_message_ids(&self, received_before_ms: i64) -> Result<u64, StoreError>;

    /// The identity state as the resolver last committed it.
    fn load_identity(&self) -> Result<IdentitySnapshot, StoreError>;

    /// Writes resolver (or repair) output with its new position, in one
    /// transaction. Returns `false`, writing nothing, when the epoch or the
    /// position moved since the changes were computed.
    fn commit_identity(&self, commit: &IdentityCommit) -> Result<bool, StoreError>;

    /// Replaces the identity rules and starts a new epoch.
    fn set_identity_rules(&self, rules: &IdentityRules) -> Result<(), StoreError>;

    /// A profile by id, following merges to the profile that absorbed it.
    fn profile(&self, id: ProfileId) -> Result<Option<Profile>, StoreError>;

    /// The profile holding an identifier.
    fn profile_by_identifier(&self, identifier: &Identifier) -> Result<Option<Profile>, StoreError>;

    /// A profile's events, newest first, before `before` (exclusive) when given.
    fn profile_events(
        &self,
        id: ProfileId,
        before: Option<LogPosition>,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError>;

    /// The identity history of a profile and of every profile merged into it, oldest first.
    fn identity_history(&self, id: ProfileId) -> Result<Vec<HistoryRecord>, StoreError>;

    /// Which profile each event belongs to, for events in `(after, up_to]`.
    fn event_owners(&self, after: LogPosition, up_to: LogPosition)
        -> Result<Vec<(LogPosition, ProfileId)>, StoreError>;

    /// Creates an admin API token; returns its listing and the secret.
    fn create_token(&self, name: &str) -> Result<(TokenInfo, String), StoreError>;

    /// The token a secret belongs to.
    fn verify_token(&self, secret: &str) -> Result<Option<TokenInfo>, StoreError>;

    // Browsing, for people (CLI and admin API); see [`browse`].

    /// Events matching `filter`, in its order, at most `limit`.
    fn filter_log(&self, filter: &LogFilter, limit: usize) -> Result<Vec<LogEntry>, StoreError>;

    /// Live (not merged-away) profiles with an id above `after`, by id, at
    /// most `limit`; decoded as [`Store::profile`] decodes one.
    fn list_profiles(&self, after: Option<ProfileId>, limit: usize) -> Result<Vec<Profile>, StoreError>;

    /// Identifiers of type `kind` whose value starts with `prefix` and sorts
    /// after `after`, by value, at most `limit`, with the profile holding each.
    fn identifiers_with_prefix(
        &self,
        kind: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Identifier, ProfileId)>, StoreError>;

    // Administration of sources and tokens.

    /// Every admin token, oldest first (never their secrets).
    fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError>;

    /// Deletes a token by id, so its secret no longer verifies.
    fn revoke_token(&self, id: &str) -> Result<TokenInfo, StoreError>;

    /// Gives a source a new name; its id, key and events stay.
    fn rename_source(&self, name: &str, new_name: &str) -> Result<Source, StoreError>;

    /// Gives a source a new write key; the old one stops working.
    fn rotate_write_key(&self, name: &str) -> Result<Source, StoreError>;

    /// Deletes a source that has no events in the log (the log is append-only
    /// and its events name their source); [`StoreError::SourceInUse`] otherwise.
    fn delete_source(&self, name: &str) -> Result<Source, StoreError>;
}
