//! The event log's storage interface: append (with `messageId` dedup and
//! quarantine in the same transaction), read after a position, dedup pruning,
//! and ingestion counters. Every later stage reads the log through it.

use serde::Serialize;
use std::collections::BTreeMap;
use tandem_core::{EventType, LogPosition, LogRecord, MessageId, SourceId};

use crate::{Stage, StoreError};

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
    /// Tracking-plan violations found in this request's messages, counted
    /// in the same transaction.
    pub violations: Vec<crate::govern::PlanViolationRecord>,
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
    /// When the event happened (its corrected `timestamp`), in milliseconds.
    pub timestamp_ms: i64,
    /// The event as Segment JSON, including `receivedAt` and `sourceId`.
    pub payload: String,
}

/// Which events of the log to read, by what storage can index: the source,
/// the type, the event's time and a position range, oldest or newest first.
/// Filters on the payload (event name, user) are [`crate::browse::EventQuery`]'s.
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
    /// When the source's latest event (stored or duplicate) was received;
    /// `None` before its first.
    pub last_received_ms: Option<i64>,
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
    /// Events the resolver could not use (listed by `unresolved_events`).
    pub unresolved: u64,
}

/// A stage's place in the log: the last position whose effects it committed,
/// and the epoch those effects were computed in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageCursor {
    pub position: LogPosition,
    pub epoch: u64,
}

impl Stage {
    /// The drain stage, which appends an external event stream (NATS
    /// JetStream) into the log. It reads the stream, not the log, so it is
    /// not among [`Stage::ALL`] and keeps its place in `stream_cursors`
    /// ([`EventLog::drained_sequence`]) rather than in `stage_cursors`.
    pub const DRAIN: Stage = Stage("drain");
}

/// Which stream sequences one drain commit covers: the sequence the drain
/// believes is recorded (`after`) and the last one it is appending (`through`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamRange {
    pub after: u64,
    pub through: u64,
}

/// What became of one [`EventLog::append_drained`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainCommit {
    /// The batches were appended (their outcomes in order) and the stream's
    /// recorded sequence is now the range's `through`.
    Appended(Vec<IngestOutcome>),
    /// The recorded sequence was not the range's `after` (another node
    /// drained meanwhile): nothing was written; resume after `recorded`.
    Stale { recorded: u64 },
}

/// The event log: what the collect stage writes and every later stage reads.
///
/// **Append order.** Positions are assigned when an append commits, and a
/// later commit always gets higher positions than an earlier one: a reader
/// that has read everything up to position N never later finds an event at
/// a position ≤ N, so "read after my cursor" never skips an event. The SQLite
/// backend keeps this by assigning positions inside the database's single
/// write lock (also across processes: the CLI importer appends through the
/// same lock); a backend with concurrent writers must assign positions at
/// commit or make readers stop at a committed watermark.
pub trait EventLog: Send + Sync + 'static {
    /// Appends every batch in one transaction and returns their outcomes in
    /// order. Nothing is visible, and nothing may be acknowledged, until this
    /// returns `Ok`. An event whose `(source, messageId)` was stored at or
    /// after `dedup_since_ms` is counted as a duplicate and not stored again.
    fn append(&self, batches: &[IngestBatch], dedup_since_ms: i64) -> Result<Vec<IngestOutcome>, StoreError>;

    /// Appends batches taken from an external event stream (the drain
    /// stage's) and records `drained.through` as the stream's last drained
    /// sequence in the same transaction, so a crash neither loses nor
    /// repeats a message: the drain resumes after the recorded sequence.
    /// Refuses ([`DrainCommit::Stale`]) when the recorded sequence is not
    /// `drained.after`. Dedup is [`EventLog::append`]'s.
    fn append_drained(
        &self,
        stream: &str,
        drained: StreamRange,
        batches: &[IngestBatch],
        dedup_since_ms: i64,
    ) -> Result<DrainCommit, StoreError>;

    /// The last sequence of `stream` appended by [`EventLog::append_drained`];
    /// 0 before the first.
    fn drained_sequence(&self, stream: &str) -> Result<u64, StoreError>;

    /// The position of the newest committed event; 0 when the log is empty.
    fn head(&self) -> Result<LogPosition, StoreError>;

    /// Where a stage stands in the log (its `stage_cursors` row); `None`
    /// for a stage that has never committed.
    fn stage_cursor(&self, stage: Stage) -> Result<Option<StageCursor>, StoreError>;

    /// Events after `after`, oldest first.
    fn read_log(&self, after: LogPosition, limit: usize) -> Result<Vec<LogEntry>, StoreError>;

    /// Quarantined messages with an id above `after_id`, oldest first.
    fn list_quarantine(&self, after_id: u64, limit: usize) -> Result<Vec<QuarantineEntry>, StoreError>;

    /// Quarantined messages newest first, those with an id below `before`
    /// when given (a page's last), at most `limit`: the console's listing.
    fn recent_quarantine(&self, before: Option<u64>, limit: usize) -> Result<Vec<QuarantineEntry>, StoreError>;

    /// Ingestion counts, with the resolver's position and the profile count
    /// so one read gives figures that agree with one another.
    fn stats(&self) -> Result<IngestStats, StoreError>;

    /// Forgets the `messageId`s received before the dedup window, except
    /// those stored with [`Dedup::Forever`]; returns how many.
    fn forget_message_ids(&self, received_before_ms: i64) -> Result<u64, StoreError>;

    /// Events matching `filter`, in its order, at most `limit`: what
    /// [`crate::browse`] pages through for people.
    fn filter_log(&self, filter: &LogFilter, limit: usize) -> Result<Vec<LogEntry>, StoreError>;
}
