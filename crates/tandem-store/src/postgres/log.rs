//! The event log in PostgreSQL: appends (with `messageId` dedup, quarantine
//! and the ingest counters in the same transaction), reads after a position,
//! filtered reads, dedup pruning and the ingestion figures.
//!
//! **Append order.** Readers follow the log with "events after my cursor",
//! so a position must never become visible after a higher one did (see
//! [`EventLog`]). PostgreSQL makes transactions visible in commit order, but
//! a sequence hands out numbers in *start* order: two concurrent appends
//! could take positions 5 and 6 and commit 6 first, and a reader that saw 6
//! would never read 5. So every append first locks the one row of
//! `log_head` (`SELECT … FOR UPDATE`), takes its positions from that counter
//! and writes the new head before committing. The row lock is held until
//! commit, and the next append can read the counter only after that commit,
//! so positions are handed out in commit order. Appends are serialized on
//! that row, which is why each one writes many batches with a few bulk
//! statements (`unnest` of arrays) rather than a statement per event; the
//! server's log writer already groups concurrent requests into one append.
//! The dedup pruner and source deletion take the same lock, so they never
//! interleave with an append's reads of what they delete.

use super::{text_from_bytes, PostgresStore};
use crate::{
    Dedup, DrainCommit, EventLog, IngestBatch, IngestOutcome, IngestStats, LogEntry, LogFilter, QuarantineEntry,
    QuarantineRecord, SourceStats, Stage, StageCursor, StoreError, StreamRange,
};
use postgres::types::ToSql;
use postgres::{GenericClient, IsolationLevel, Row, Transaction};
use std::collections::{HashMap, HashSet};
use tandem_core::{EventType, LogPosition, MessageId, SourceId};

/// The `received_at` of a message id kept for good ([`Dedup::Forever`]):
/// never inside a pruning bound, never outside a dedup window.
const KEPT_FOREVER: i64 = i64::MAX;

/// The columns [`log_entry_from_row`] reads, in its order.
pub(super) const LOG_ENTRY_COLUMNS: &str =
    "e.position, e.source_id, e.message_id, e.event_type, e.received_at, e.timestamp_ms, e.payload";

/// Takes the append lock: locks the log head until the transaction ends and
/// returns the head position.
pub(super) fn lock_log_head(transaction: &mut Transaction<'_>) -> Result<i64, StoreError> {
    Ok(transaction.query_one("SELECT position FROM log_head WHERE id = 1 FOR UPDATE", &[])?.try_get(0)?)
}

pub(super) fn log_entry_from_row(row: &Row) -> Result<LogEntry, StoreError> {
    let event_type: String = row.try_get(3)?;
    Ok(LogEntry {
        position: LogPosition(row.try_get::<_, i64>(0)? as u64),
        source_id: SourceId::new(row.try_get::<_, String>(1)?),
        message_id: MessageId::new(text_from_bytes(row.try_get(2)?)?),
        event_type: event_type.parse().map_err(|error| StoreError::Backend(Box::new(error)))?,
        received_at_ms: row.try_get(4)?,
        timestamp_ms: row.try_get(5)?,
        payload: text_from_bytes(row.try_get(6)?)?,
    })
}

fn entries(rows: Vec<Row>) -> Result<Vec<LogEntry>, StoreError> {
    rows.iter().map(log_entry_from_row).collect()
}

fn append(
    transaction: &mut Transaction<'_>,
    batches: &[IngestBatch],
    dedup_since_ms: i64,
) -> Result<Vec<IngestOutcome>, StoreError> {
    let head = lock_log_head(transaction)?;

    // Only the first copy of a (source, message id) within this append is
    // offered to `message_ids`; later copies are duplicates of it.
    let mut offered: HashSet<(&str, &str)> = HashSet::new();
    let mut first_copy = Vec::new();
    let (mut sources, mut message_ids, mut claimed_at) = (Vec::new(), Vec::new(), Vec::new());
    for batch in batches {
        for record in &batch.records {
            let first = offered.insert((record.source_id.as_str(), record.message_id.as_str()));
            first_copy.push(first);
            if first {
                sources.push(record.source_id.as_str());
                message_ids.push(record.message_id.as_str().as_bytes());
                claimed_at.push(match batch.dedup {
                    Dedup::Window => record.received_at_ms,
                    Dedup::Forever => KEPT_FOREVER,
                });
            }
        }
    }
    // A message id is claimed when it is new, or when its last sighting fell
    // out of the dedup window; the answer is the (1-based) offers claimed.
    let claimed: HashSet<i64> = if sources.is_empty() {
        HashSet::new()
    } else {
        transaction
            .query(
                "WITH offered AS (
                    SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[]) WITH ORDINALITY
                        AS offer (source_id, message_id, received_at, ordinal)
                 ), claimed AS (
                    INSERT INTO message_ids (source_id, message_id, received_at)
                    SELECT source_id, message_id, received_at FROM offered
                    ON CONFLICT (source_id, message_id) DO UPDATE SET received_at = excluded.received_at
                    WHERE message_ids.received_at < $4
                    RETURNING source_id, message_id
                 )
                 SELECT offered.ordinal FROM offered JOIN claimed USING (source_id, message_id)",
                &[&sources, &message_ids, &claimed_at, &dedup_since_ms],
            )?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?
    };

    let mut outcomes = Vec::with_capacity(batches.len());
    // Stored, duplicates, and the latest receipt per source and type.
    let mut counters: HashMap<(&str, EventType), (i64, i64, i64)> = HashMap::new();
    let mut events = EventColumns::default();
    let mut quarantine = QuarantineColumns::default();
    let (mut record_index, mut offer) = (0, 0_i64);
    let mut position = head;
    for batch in batches {
        let mut outcome = IngestOutcome::default();
        for record in &batch.records {
            let stored = if first_copy[record_index] {
                offer += 1;
                claimed.contains(&offer)
            } else {
                false
            };
            record_index += 1;
            let counter = counters.entry((record.source_id.as_str(), record.event_type)).or_default();
            counter.2 = counter.2.max(record.received_at_ms);
            if stored {
                position += 1;
                events.push(position, record);
                outcome.stored += 1;
                counter.0 += 1;
            } else {
                outcome.duplicates += 1;
                counter.1 += 1;
            }
        }
        for rejected in &batch.rejected {
            quarantine.push(rejected);
            outcome.quarantined += 1;
        }
        outcomes.push(outcome);
    }

    if !events.positions.is_empty() {
        transaction.execute(
            "INSERT INTO events (position, source_id, message_id, event_type, received_at, timestamp_ms, payload)
             SELECT * FROM unnest(
                 $1::bigint[], $2::text[], $3::bytea[], $4::text[], $5::bigint[], $6::bigint[], $7::bytea[]
             )",
            &[
                &events.positions,
                &events.sources,
                &events.message_ids,
                &events.types,
                &events.received_at,
                &events.timestamps,
                &events.payloads,
            ],
        )?;
        transaction.execute("UPDATE log_head SET position = $1 WHERE id = 1", &[&position])?;
    }
    if !quarantine.sources.is_empty() {
        // Rows are numbered in array order, so quarantine ids follow the batches.
        transaction.execute(
            "INSERT INTO quarantine (source_id, received_at, batch_index, code, field, message, payload)
             SELECT source_id, received_at, batch_index, code, field, message, payload
             FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::bytea[], $6::bytea[], $7::bytea[])
                 WITH ORDINALITY
                 AS rejected (source_id, received_at, batch_index, code, field, message, payload, ordinal)
             ORDER BY ordinal",
            &[
                &quarantine.sources,
                &quarantine.received_at,
                &quarantine.batch_indexes,
                &quarantine.codes,
                &quarantine.fields,
                &quarantine.messages,
                &quarantine.payloads,
            ],
        )?;
    }
    for batch in batches {
        super::govern::record_violations(transaction, &batch.violations)?;
    }
    if !counters.is_empty() {
        let (mut sources, mut types, mut stored, mut duplicates) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut last_received = Vec::new();
        for ((source, event_type), (stored_count, duplicate_count, last_received_ms)) in &counters {
            sources.push(*source);
            types.push(event_type.as_str());
            stored.push(*stored_count);
            duplicates.push(*duplicate_count);
            last_received.push(*last_received_ms);
        }
        transaction.execute(
            "INSERT INTO ingest_counters (source_id, event_type, stored, duplicates, last_received_at)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
             ON CONFLICT (source_id, event_type) DO UPDATE
             SET stored = ingest_counters.stored + excluded.stored,
                 duplicates = ingest_counters.duplicates + excluded.duplicates,
                 last_received_at = GREATEST(ingest_counters.last_received_at, excluded.last_received_at)",
            &[&sources, &types, &stored, &duplicates, &last_received],
        )?;
    }
    Ok(outcomes)
}

/// The new events of one append, column by column, for one `unnest` insert.
#[derive(Default)]
struct EventColumns<'a> {
    positions: Vec<i64>,
    sources: Vec<&'a str>,
    message_ids: Vec<&'a [u8]>,
    types: Vec<&'static str>,
    received_at: Vec<i64>,
    timestamps: Vec<i64>,
    payloads: Vec<&'a [u8]>,
}

impl<'a> EventColumns<'a> {
    fn push(&mut self, position: i64, record: &'a tandem_core::LogRecord) {
        self.positions.push(position);
        self.sources.push(record.source_id.as_str());
        self.message_ids.push(record.message_id.as_str().as_bytes());
        self.types.push(record.event_type.as_str());
        self.received_at.push(record.received_at_ms);
        self.timestamps.push(record.timestamp_ms);
        self.payloads.push(record.payload.as_bytes());
    }
}

/// The refused messages of one append, column by column.
#[derive(Default)]
struct QuarantineColumns<'a> {
    sources: Vec<&'a str>,
    received_at: Vec<i64>,
    batch_indexes: Vec<Option<i64>>,
    codes: Vec<&'a str>,
    fields: Vec<Option<&'a [u8]>>,
    messages: Vec<&'a [u8]>,
    payloads: Vec<&'a [u8]>,
}

impl<'a> QuarantineColumns<'a> {
    fn push(&mut self, rejected: &'a QuarantineRecord) {
        self.sources.push(rejected.source_id.as_str());
        self.received_at.push(rejected.received_at_ms);
        self.batch_indexes.push(rejected.batch_index.map(i64::from));
        self.codes.push(&rejected.code);
        self.fields.push(rejected.field.as_deref().map(str::as_bytes));
        self.messages.push(rejected.message.as_bytes());
        self.payloads.push(rejected.payload.as_bytes());
    }
}

impl EventLog for PostgresStore {
    fn append(&self, batches: &[IngestBatch], dedup_since_ms: i64) -> Result<Vec<IngestOutcome>, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            let outcomes = append(&mut transaction, batches, dedup_since_ms)?;
            transaction.commit()?;
            Ok(outcomes)
        })
    }

    fn append_drained(
        &self,
        stream: &str,
        drained: StreamRange,
        batches: &[IngestBatch],
        dedup_since_ms: i64,
    ) -> Result<DrainCommit, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            transaction.execute(
                "INSERT INTO stream_cursors (stream, sequence) VALUES ($1, 0) ON CONFLICT (stream) DO NOTHING",
                &[&stream],
            )?;
            // Locked until commit: two drains that both believe they hold the
            // lease check and move the sequence one after the other.
            let recorded: i64 = transaction
                .query_one("SELECT sequence FROM stream_cursors WHERE stream = $1 FOR UPDATE", &[&stream])?
                .try_get(0)?;
            if recorded as u64 != drained.after {
                return Ok(DrainCommit::Stale { recorded: recorded as u64 });
            }
            let outcomes = append(&mut transaction, batches, dedup_since_ms)?;
            transaction.execute(
                "UPDATE stream_cursors SET sequence = $2 WHERE stream = $1",
                &[&stream, &(drained.through as i64)],
            )?;
            transaction.commit()?;
            Ok(DrainCommit::Appended(outcomes))
        })
    }

    fn drained_sequence(&self, stream: &str) -> Result<u64, StoreError> {
        self.with_client(|client| {
            let row = client.query_opt("SELECT sequence FROM stream_cursors WHERE stream = $1", &[&stream])?;
            Ok(match row {
                Some(row) => row.try_get::<_, i64>(0)? as u64,
                None => 0,
            })
        })
    }

    fn head(&self) -> Result<LogPosition, StoreError> {
        self.with_client(head)
    }

    fn stage_cursor(&self, stage: Stage) -> Result<Option<StageCursor>, StoreError> {
        self.with_client(|client| {
            let row = client.query_opt("SELECT position, epoch FROM stage_cursors WHERE stage = $1", &[&stage.0])?;
            row.map(|row| {
                Ok(StageCursor {
                    position: LogPosition(row.try_get::<_, i64>(0)? as u64),
                    epoch: row.try_get::<_, i64>(1)? as u64,
                })
            })
            .transpose()
        })
    }

    fn read_log(&self, after: LogPosition, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.with_client(|client| {
            entries(client.query(
                &format!("SELECT {LOG_ENTRY_COLUMNS} FROM events e WHERE e.position > $1 ORDER BY e.position LIMIT $2"),
                &[&(after.0 as i64), &(limit as i64)],
            )?)
        })
    }

    fn list_quarantine(&self, after_id: u64, limit: usize) -> Result<Vec<QuarantineEntry>, StoreError> {
        self.with_client(|client| {
            let rows = client.query(
                &format!("SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id > $1 ORDER BY id LIMIT $2"),
                &[&(after_id as i64), &(limit as i64)],
            )?;
            rows.iter().map(quarantine_from_row).collect()
        })
    }

    fn recent_quarantine(&self, before: Option<u64>, limit: usize) -> Result<Vec<QuarantineEntry>, StoreError> {
        let before = before.map_or(i64::MAX, |id| id.min(i64::MAX as u64) as i64);
        self.with_client(|client| {
            let rows = client.query(
                &format!("SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id < $1 ORDER BY id DESC LIMIT $2"),
                &[&before, &(limit as i64)],
            )?;
            rows.iter().map(quarantine_from_row).collect()
        })
    }

    fn stats(&self) -> Result<IngestStats, StoreError> {
        self.with_client(|client| {
            // One snapshot, so the figures agree with one another.
            let mut transaction =
                client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?;
            let stats = read_stats(&mut transaction)?;
            transaction.commit()?;
            Ok(stats)
        })
    }

    fn forget_message_ids(&self, received_before_ms: i64) -> Result<u64, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            lock_log_head(&mut transaction)?;
            // The literal bound lets the planner use the partial index.
            let forgotten = transaction.execute(
                "DELETE FROM message_ids WHERE received_at < $1 AND received_at < 9223372036854775807",
                &[&received_before_ms],
            )?;
            transaction.commit()?;
            Ok(forgotten)
        })
    }

    fn filter_log(&self, filter: &LogFilter, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.with_client(|client| filter_log(client, filter, limit))
    }
}

fn head(client: &mut impl GenericClient) -> Result<LogPosition, StoreError> {
    let head: i64 = client.query_one("SELECT position FROM log_head WHERE id = 1", &[])?.try_get(0)?;
    Ok(LogPosition(head as u64))
}

fn filter_log(client: &mut impl GenericClient, filter: &LogFilter, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
    let mut conditions = Vec::new();
    let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::new();
    let mut condition = |sql: &str, value: Box<dyn ToSql + Sync>| {
        values.push(value);
        conditions.push(format!("{sql} ${}", values.len()));
    };
    if let Some(source) = &filter.source_id {
        condition("e.source_id =", Box::new(source.as_str().to_owned()));
    }
    if let Some(event_type) = filter.event_type {
        condition("e.event_type =", Box::new(event_type.as_str()));
    }
    if let Some(since) = filter.since_ms {
        condition("e.timestamp_ms >=", Box::new(since));
    }
    if let Some(until) = filter.until_ms {
        condition("e.timestamp_ms <", Box::new(until));
    }
    if let Some(after) = filter.after {
        condition("e.position >", Box::new(after.0 as i64));
    }
    if let Some(before) = filter.before {
        condition("e.position <", Box::new(before.0 as i64));
    }
    let clause = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
    let order = if filter.newest_first { "DESC" } else { "ASC" };
    values.push(Box::new(limit as i64));
    let sql = format!(
        "SELECT {LOG_ENTRY_COLUMNS} FROM events e {clause} ORDER BY e.position {order} LIMIT ${}",
        values.len()
    );
    let parameters: Vec<&(dyn ToSql + Sync)> = values.iter().map(|value| value.as_ref()).collect();
    entries(client.query(&sql, &parameters)?)
}

const QUARANTINE_COLUMNS: &str = "id, source_id, received_at, batch_index, code, field, message, payload";

fn quarantine_from_row(row: &Row) -> Result<QuarantineEntry, StoreError> {
    let batch_index: Option<i64> = row.try_get(3)?;
    let field: Option<Vec<u8>> = row.try_get(5)?;
    Ok(QuarantineEntry {
        id: row.try_get::<_, i64>(0)? as u64,
        record: QuarantineRecord {
            source_id: SourceId::new(row.try_get::<_, String>(1)?),
            received_at_ms: row.try_get(2)?,
            batch_index: batch_index.and_then(|index| u32::try_from(index).ok()),
            code: row.try_get(4)?,
            field: field.map(text_from_bytes).transpose()?,
            message: text_from_bytes(row.try_get(6)?)?,
            payload: text_from_bytes(row.try_get(7)?)?,
        },
    })
}

fn read_stats(transaction: &mut Transaction<'_>) -> Result<IngestStats, StoreError> {
    let mut stats = IngestStats::default();
    let mut per_source: Vec<SourceStats> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    for row in transaction.query("SELECT id, name FROM sources ORDER BY listed_order", &[])? {
        let id: String = row.try_get(0)?;
        index_of.insert(id.clone(), per_source.len());
        per_source.push(SourceStats { source_id: SourceId::new(id), name: row.try_get(1)?, ..SourceStats::default() });
    }
    let counters = "SELECT source_id, event_type, stored, duplicates, last_received_at FROM ingest_counters";
    for row in transaction.query(counters, &[])? {
        let source_id: String = row.try_get(0)?;
        let event_type: String = row.try_get(1)?;
        let stored = row.try_get::<_, i64>(2)? as u64;
        let duplicates = row.try_get::<_, i64>(3)? as u64;
        let last_received_ms: Option<i64> = row.try_get(4)?;
        stats.events += stored;
        stats.duplicates += duplicates;
        *stats.events_by_type.entry(event_type.clone()).or_default() += stored;
        if let Some(&index) = index_of.get(&source_id) {
            let source = &mut per_source[index];
            source.events += stored;
            source.duplicates += duplicates;
            *source.events_by_type.entry(event_type).or_default() += stored;
            source.last_received_ms = source.last_received_ms.max(last_received_ms);
        }
    }
    for row in transaction.query("SELECT source_id, COUNT(*) FROM quarantine GROUP BY source_id", &[])? {
        let source_id: String = row.try_get(0)?;
        let rejected = row.try_get::<_, i64>(1)? as u64;
        stats.rejected += rejected;
        if let Some(&index) = index_of.get(&source_id) {
            per_source[index].rejected += rejected;
        }
    }
    stats.log_head = head(transaction)?;
    stats.sources = per_source;
    let resolver: i64 = transaction
        .query_one("SELECT position FROM stage_cursors WHERE stage = $1", &[&Stage::RESOLVE.0])?
        .try_get(0)?;
    stats.resolver_position = LogPosition(resolver as u64);
    stats.resolver_lag = stats.log_head.0.saturating_sub(stats.resolver_position.0);
    let profiles: i64 =
        transaction.query_one("SELECT live_profiles FROM identity_state WHERE id = 1", &[])?.try_get(0)?;
    stats.profiles = profiles as u64;
    let unresolved: i64 = transaction.query_one("SELECT COUNT(*) FROM unresolved_events", &[])?.try_get(0)?;
    stats.unresolved = unresolved as u64;
    Ok(stats)
}
