//! SQLite queries of the delivery stage: destinations, each destination's
//! outbox in enqueue order, dead letters, and the outbox stage's commit.

use super::SqliteStore;
use crate::audience::change_kind_from_text;
use crate::outbox::{definition_from_text, definition_to_text};
use crate::{
    DeadLetter, DeadLetterFilter, DestinationRecord, FailedAttempt, MembershipChange, OutboxCommit,
    OutboxCommitOutcome, OutboxCounts, OutboxItem, OutboxItemId, OutboxStore, StoreError,
};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tandem_core::activate::DestinationDefinition;
use tandem_core::{LogPosition, ProfileId};

pub(super) const RECORD_QUERY: &str = "SELECT d.name, d.definition, d.created_at, d.delivered,
        (SELECT COUNT(*) FROM outbox o WHERE o.destination = d.name AND o.attempts = 0),
        (SELECT COUNT(*) FROM outbox o WHERE o.destination = d.name AND o.attempts > 0),
        (SELECT COUNT(*) FROM dead_letters l WHERE l.destination = d.name), d.paused,
        (SELECT o.enqueued_at FROM outbox o WHERE o.destination = d.name ORDER BY o.id LIMIT 1),
        d.last_delivered_at
     FROM destinations d";

/// A [`DeadLetterFilter`] in SQL: `?2` the time, `?3` the profile, each
/// ignored when NULL.
const FILTER: &str = "(?2 IS NULL OR dead_at >= ?2) AND (?3 IS NULL OR profile_id = ?3)
     AND (?4 IS NULL OR id = ?4) AND (?5 IS NULL OR id > ?5)";

/// The filter's profile, item and page start as SQL integers.
fn filter_ids(filter: &DeadLetterFilter) -> [Option<i64>; 3] {
    [filter.profile.map(|id| id.0 as i64), filter.item.map(|id| id.0 as i64), filter.after.map(|id| id.0 as i64)]
}

type RecordRow = (String, String, i64, i64, i64, i64, i64, bool, Option<i64>, Option<i64>);

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RecordRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
        row.get(9)?,
    ))
}

fn decode_record(
    (
        _,
        definition,
        created_at_ms,
        delivered,
        pending,
        retrying,
        dead,
        paused,
        head_enqueued_at_ms,
        last_delivered_at_ms,
    ): RecordRow,
) -> Result<DestinationRecord, StoreError> {
    Ok(DestinationRecord {
        definition: definition_from_text(&definition)?,
        created_at_ms,
        counts: OutboxCounts {
            pending: pending as u64,
            retrying: retrying as u64,
            delivered: delivered as u64,
            dead: dead as u64,
        },
        paused,
        head_enqueued_at_ms,
        last_delivered_at_ms,
    })
}

fn item_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxItem> {
    Ok(OutboxItem {
        id: OutboxItemId(row.get::<_, i64>(0)? as u64),
        destination: row.get(1)?,
        position: LogPosition(row.get::<_, i64>(2)? as u64),
        payload: row.get(3)?,
        attempts: row.get::<_, i64>(4)? as u32,
        first_failed_at_ms: row.get(5)?,
        next_attempt_at_ms: row.get(6)?,
        last_error: row.get(7)?,
        enqueued_at_ms: row.get(8)?,
    })
}

fn dead_letter_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: OutboxItemId(row.get::<_, i64>(0)? as u64),
        destination: row.get(1)?,
        position: LogPosition(row.get::<_, i64>(2)? as u64),
        payload: row.get(3)?,
        attempts: row.get::<_, i64>(4)? as u32,
        last_error: row.get(5)?,
        dead_at_ms: row.get(6)?,
        profile: row.get::<_, Option<i64>>(7)?.map(|id| ProfileId(id as u64)),
    })
}

fn commit(connection: &mut Connection, commit: &OutboxCommit) -> Result<OutboxCommitOutcome, StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let position: i64 = transaction
        .query_row("SELECT position FROM stage_cursors WHERE stage = ?1", [commit.cursor.stage().0], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    if position as u64 != commit.from.0 {
        return Ok(OutboxCommitOutcome::StalePosition);
    }
    {
        let mut enqueue = transaction.prepare_cached(
            "INSERT INTO outbox (destination, position, payload, profile_id, enqueued_at)
             SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM destinations WHERE name = ?1)",
        )?;
        for item in &commit.items {
            let profile = item.profile.map(|id| id.0 as i64);
            enqueue.execute(params![item.destination, item.position.0 as i64, item.payload, profile, commit.at_ms])?;
        }
    }
    transaction.execute(
        "INSERT INTO stage_cursors (stage, position, epoch) VALUES (?1, ?2, 0)
         ON CONFLICT (stage) DO UPDATE SET position = excluded.position",
        params![commit.cursor.stage().0, commit.to.0 as i64],
    )?;
    super::govern::write_consent(&transaction, &commit.consent)?;
    for (destination, counts) in &commit.withheld {
        super::govern::add_withheld(&transaction, destination, counts)?;
    }
    transaction.commit()?;
    Ok(OutboxCommitOutcome::Committed)
}

impl OutboxStore for SqliteStore {
    fn set_destination_paused(&self, name: &str, paused: bool) -> Result<(), StoreError> {
        self.with_writer(|connection| {
            let changed =
                connection.execute("UPDATE destinations SET paused = ?2 WHERE name = ?1", params![name, paused])?;
            if changed == 0 {
                return Err(StoreError::DestinationNotFound(name.to_owned()));
            }
            Ok(())
        })
    }

    fn create_destination(&self, definition: &DestinationDefinition, created_at_ms: i64) -> Result<(), StoreError> {
        let text = definition_to_text(definition)?;
        self.with_writer(|connection| {
            let inserted = connection.execute(
                "INSERT INTO destinations (name, definition, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO NOTHING",
                params![definition.name, text, created_at_ms],
            )?;
            if inserted == 0 {
                return Err(StoreError::DestinationExists(definition.name.clone()));
            }
            Ok(())
        })
    }

    fn list_destinations(&self) -> Result<Vec<DestinationRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(&format!("{RECORD_QUERY} ORDER BY d.name"))?;
            let rows = statement.query_map([], record_from_row)?.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(decode_record).collect()
        })
    }

    fn destination(&self, name: &str) -> Result<Option<DestinationRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(&format!("{RECORD_QUERY} WHERE d.name = ?1"))?;
            statement.query_row([name], record_from_row).optional()?.map(decode_record).transpose()
        })
    }

    fn delete_destination(&self, name: &str) -> Result<(), StoreError> {
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if transaction.execute("DELETE FROM destinations WHERE name = ?1", [name])? == 0 {
                return Err(StoreError::DestinationNotFound(name.to_owned()));
            }
            transaction.execute("DELETE FROM outbox WHERE destination = ?1", [name])?;
            transaction.execute("DELETE FROM dead_letters WHERE destination = ?1", [name])?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn commit_outbox(&self, outbox_commit: &OutboxCommit) -> Result<OutboxCommitOutcome, StoreError> {
        self.with_stage_writer(|connection| commit(connection, outbox_commit))
    }

    fn membership_changes_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, MembershipChange)>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, audience, profile_id, change, at FROM audience_history WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = statement.query_map(params![after as i64, limit as i64], |row| {
                Ok((
                    row.get::<_, i64>(0)? as u64,
                    MembershipChange {
                        audience: row.get(1)?,
                        profile: ProfileId(row.get::<_, i64>(2)? as u64),
                        kind: change_kind_from_text(&row.get::<_, String>(3)?),
                        at_ms: row.get(4)?,
                    },
                ))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn outbox_head(&self, destination: &str, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, destination, position, payload, attempts, first_failed_at, next_attempt_at, last_error,
                        enqueued_at
                 FROM outbox WHERE destination = ?1 ORDER BY id LIMIT ?2",
            )?;
            let items = statement.query_map(params![destination, limit as i64], item_from_row)?;
            Ok(items.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn mark_delivered(&self, destination: &str, ids: &[OutboxItemId]) -> Result<(), StoreError> {
        self.with_stage_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut removed = 0;
            {
                let mut remove = transaction.prepare_cached("DELETE FROM outbox WHERE id = ?1 AND destination = ?2")?;
                for id in ids {
                    removed += remove.execute(params![id.0 as i64, destination])? as i64;
                }
            }
            if removed > 0 {
                transaction.execute(
                    "UPDATE destinations SET delivered = delivered + ?2, last_delivered_at = ?3 WHERE name = ?1",
                    params![destination, removed, chrono::Utc::now().timestamp_millis()],
                )?;
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn record_failure(&self, id: OutboxItemId, failure: &FailedAttempt) -> Result<(), StoreError> {
        self.with_stage_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            match failure {
                FailedAttempt::Retry { first_failed_at_ms, next_attempt_at_ms, error } => {
                    transaction.execute(
                        "UPDATE outbox SET attempts = attempts + 1, first_failed_at = ?2, next_attempt_at = ?3,
                             last_error = ?4
                         WHERE id = ?1",
                        params![id.0 as i64, first_failed_at_ms, next_attempt_at_ms, error],
                    )?;
                }
                FailedAttempt::DeadLetter { at_ms, error } => {
                    transaction.execute(
                        "INSERT INTO dead_letters
                             (id, destination, position, payload, attempts, last_error, dead_at, profile_id, enqueued_at)
                         SELECT id, destination, position, payload, attempts + 1, ?2, ?3, profile_id, enqueued_at
                         FROM outbox WHERE id = ?1",
                        params![id.0 as i64, error, at_ms],
                    )?;
                    transaction.execute("DELETE FROM outbox WHERE id = ?1", [id.0 as i64])?;
                }
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn dead_letters(
        &self,
        destination: Option<&str>,
        filter: &DeadLetterFilter,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT id, destination, position, payload, attempts, last_error, dead_at, profile_id
                 FROM dead_letters WHERE (?1 IS NULL OR destination = ?1) AND {FILTER} ORDER BY id LIMIT ?6"
            ))?;
            let [profile, item, after] = filter_ids(filter);
            let letters = statement.query_map(
                params![destination, filter.since_ms, profile, item, after, limit as i64],
                dead_letter_from_row,
            )?;
            Ok(letters.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn replay_dead_letters(&self, destination: &str, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let exists = transaction
                .query_row("SELECT 1 FROM destinations WHERE name = ?1", [destination], |_| Ok(()))
                .optional()?;
            if exists.is_none() {
                return Err(StoreError::DestinationNotFound(destination.to_owned()));
            }
            // The original id puts each item back at its place in the order.
            let [profile, item, after] = filter_ids(filter);
            let replayed = transaction.execute(
                &format!(
                    "INSERT INTO outbox (id, destination, position, payload, profile_id, enqueued_at)
                     SELECT id, destination, position, payload, profile_id, enqueued_at FROM dead_letters
                     WHERE destination = ?1 AND {FILTER}"
                ),
                params![destination, filter.since_ms, profile, item, after],
            )?;
            transaction.execute(
                &format!("DELETE FROM dead_letters WHERE destination = ?1 AND {FILTER}"),
                params![destination, filter.since_ms, profile, item, after],
            )?;
            transaction.commit()?;
            Ok(replayed as u64)
        })
    }
}
