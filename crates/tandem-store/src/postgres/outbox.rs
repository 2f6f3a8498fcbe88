//! The delivery stage in PostgreSQL: destinations, each destination's
//! outbox in enqueue order, dead letters, and the outbox stage's commit,
//! which locks the stage's `stage_cursors` row before checking its position
//! so two outbox stages (on two nodes) cannot both enqueue one event.
//! Payloads are `BYTEA` (see `postgres.rs` on NUL characters).

use super::{text_from_bytes, PostgresStore};
use crate::audience::change_kind_from_text;
use crate::outbox::{definition_from_text, definition_to_text};
use crate::{
    DeadLetter, DeadLetterFilter, DestinationRecord, FailedAttempt, MembershipChange, OutboxCommit,
    OutboxCommitOutcome, OutboxCounts, OutboxItem, OutboxItemId, OutboxStore, StoreError,
};
use postgres::Row;
use tandem_core::activate::DestinationDefinition;
use tandem_core::{LogPosition, ProfileId};

const RECORD_QUERY: &str = "SELECT d.name, d.definition, d.created_at, d.delivered,
        (SELECT COUNT(*) FROM outbox o WHERE o.destination = d.name AND o.attempts = 0),
        (SELECT COUNT(*) FROM outbox o WHERE o.destination = d.name AND o.attempts > 0),
        (SELECT COUNT(*) FROM dead_letters l WHERE l.destination = d.name), d.paused,
        (SELECT o.enqueued_at FROM outbox o WHERE o.destination = d.name ORDER BY o.id LIMIT 1),
        d.last_delivered_at
     FROM destinations d";

fn decode_record(row: &Row) -> Result<DestinationRecord, StoreError> {
    let definition: String = row.try_get(1)?;
    Ok(DestinationRecord {
        definition: definition_from_text(&definition)?,
        created_at_ms: row.try_get(2)?,
        counts: OutboxCounts {
            delivered: row.try_get::<_, i64>(3)? as u64,
            pending: row.try_get::<_, i64>(4)? as u64,
            retrying: row.try_get::<_, i64>(5)? as u64,
            dead: row.try_get::<_, i64>(6)? as u64,
        },
        paused: row.try_get(7)?,
        head_enqueued_at_ms: row.try_get(8)?,
        last_delivered_at_ms: row.try_get(9)?,
    })
}

fn decode_item(row: &Row) -> Result<OutboxItem, StoreError> {
    Ok(OutboxItem {
        id: OutboxItemId(row.try_get::<_, i64>(0)? as u64),
        destination: row.try_get(1)?,
        position: LogPosition(row.try_get::<_, i64>(2)? as u64),
        payload: text_from_bytes(row.try_get(3)?)?,
        attempts: row.try_get::<_, i32>(4)? as u32,
        first_failed_at_ms: row.try_get(5)?,
        next_attempt_at_ms: row.try_get(6)?,
        last_error: row.try_get(7)?,
        enqueued_at_ms: row.try_get(8)?,
    })
}

/// A [`DeadLetterFilter`] in SQL: `$2` the time, `$3` the profile, each
/// ignored when NULL.
const FILTER: &str = "($2::bigint IS NULL OR dead_at >= $2) AND ($3::bigint IS NULL OR profile_id = $3)
     AND ($4::bigint IS NULL OR id = $4) AND ($5::bigint IS NULL OR id > $5)";

/// The filter's profile, item and page start as SQL integers.
fn filter_ids(filter: &DeadLetterFilter) -> [Option<i64>; 3] {
    [filter.profile.map(|id| id.0 as i64), filter.item.map(|id| id.0 as i64), filter.after.map(|id| id.0 as i64)]
}

fn decode_dead_letter(row: &Row) -> Result<DeadLetter, StoreError> {
    Ok(DeadLetter {
        id: OutboxItemId(row.try_get::<_, i64>(0)? as u64),
        destination: row.try_get(1)?,
        position: LogPosition(row.try_get::<_, i64>(2)? as u64),
        payload: text_from_bytes(row.try_get(3)?)?,
        attempts: row.try_get::<_, i32>(4)? as u32,
        last_error: row.try_get(5)?,
        dead_at_ms: row.try_get(6)?,
        profile: row.try_get::<_, Option<i64>>(7)?.map(|id| ProfileId(id as u64)),
    })
}

impl OutboxStore for PostgresStore {
    fn set_destination_paused(&self, name: &str, paused: bool) -> Result<(), StoreError> {
        self.with_client(|client| {
            let changed = client.execute("UPDATE destinations SET paused = $2 WHERE name = $1", &[&name, &paused])?;
            if changed == 0 {
                return Err(StoreError::DestinationNotFound(name.to_owned()));
            }
            Ok(())
        })
    }

    fn create_destination(&self, definition: &DestinationDefinition, created_at_ms: i64) -> Result<(), StoreError> {
        let text = definition_to_text(definition)?;
        self.with_client(|client| {
            let inserted = client.execute(
                "INSERT INTO destinations (name, definition, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&definition.name, &text, &created_at_ms],
            )?;
            if inserted == 0 {
                return Err(StoreError::DestinationExists(definition.name.clone()));
            }
            Ok(())
        })
    }

    fn list_destinations(&self) -> Result<Vec<DestinationRecord>, StoreError> {
        self.with_client(|client| {
            client.query(&format!("{RECORD_QUERY} ORDER BY d.name"), &[])?.iter().map(decode_record).collect()
        })
    }

    fn destination(&self, name: &str) -> Result<Option<DestinationRecord>, StoreError> {
        self.with_client(|client| {
            client
                .query_opt(&format!("{RECORD_QUERY} WHERE d.name = $1"), &[&name])?
                .as_ref()
                .map(decode_record)
                .transpose()
        })
    }

    fn delete_destination(&self, name: &str) -> Result<(), StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            if transaction.execute("DELETE FROM destinations WHERE name = $1", &[&name])? == 0 {
                return Err(StoreError::DestinationNotFound(name.to_owned()));
            }
            transaction.execute("DELETE FROM outbox WHERE destination = $1", &[&name])?;
            transaction.execute("DELETE FROM dead_letters WHERE destination = $1", &[&name])?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn commit_outbox(&self, commit: &OutboxCommit) -> Result<OutboxCommitOutcome, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            transaction.execute(
                "INSERT INTO stage_cursors (stage, position, epoch) VALUES ($1, 0, 0) ON CONFLICT (stage) DO NOTHING",
                &[&commit.cursor.stage().0],
            )?;
            let position: i64 = transaction
                .query_one(
                    "SELECT position FROM stage_cursors WHERE stage = $1 FOR UPDATE",
                    &[&commit.cursor.stage().0],
                )?
                .try_get(0)?;
            if position as u64 != commit.from.0 {
                return Ok(OutboxCommitOutcome::StalePosition);
            }
            let enqueue = transaction.prepare(
                "INSERT INTO outbox (destination, position, payload, profile_id, enqueued_at)
                 SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM destinations WHERE name = $1)",
            )?;
            for item in &commit.items {
                let profile = item.profile.map(|id| id.0 as i64);
                let values: [&(dyn postgres::types::ToSql + Sync); 5] =
                    [&item.destination, &(item.position.0 as i64), &item.payload.as_bytes(), &profile, &commit.at_ms];
                transaction.execute(&enqueue, &values)?;
            }
            transaction.execute(
                "UPDATE stage_cursors SET position = $2 WHERE stage = $1",
                &[&commit.cursor.stage().0, &(commit.to.0 as i64)],
            )?;
            super::govern::write_consent(&mut transaction, &commit.consent)?;
            for (destination, counts) in &commit.withheld {
                super::govern::add_withheld(&mut transaction, destination, counts)?;
            }
            transaction.commit()?;
            Ok(OutboxCommitOutcome::Committed)
        })
    }

    fn membership_changes_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, MembershipChange)>, StoreError> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT id, audience, profile_id, change, at FROM audience_history WHERE id > $1 ORDER BY id LIMIT $2",
                &[&(after as i64), &(limit as i64)],
            )?;
            rows.iter()
                .map(|row| {
                    let change: String = row.try_get(3)?;
                    Ok((
                        row.try_get::<_, i64>(0)? as u64,
                        MembershipChange {
                            audience: row.try_get(1)?,
                            profile: ProfileId(row.try_get::<_, i64>(2)? as u64),
                            kind: change_kind_from_text(&change),
                            at_ms: row.try_get(4)?,
                        },
                    ))
                })
                .collect()
        })
    }

    fn outbox_head(&self, destination: &str, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT id, destination, position, payload, attempts, first_failed_at, next_attempt_at, last_error,
                            enqueued_at
                     FROM outbox WHERE destination = $1 ORDER BY id LIMIT $2",
                    &[&destination, &(limit as i64)],
                )?
                .iter()
                .map(decode_item)
                .collect()
        })
    }

    fn mark_delivered(&self, destination: &str, ids: &[OutboxItemId]) -> Result<(), StoreError> {
        let ids: Vec<i64> = ids.iter().map(|id| id.0 as i64).collect();
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            let removed = transaction
                .execute("DELETE FROM outbox WHERE id = ANY($1) AND destination = $2", &[&ids, &destination])?
                as i64;
            if removed > 0 {
                transaction.execute(
                    "UPDATE destinations SET delivered = delivered + $2, last_delivered_at = $3 WHERE name = $1",
                    &[&destination, &removed, &chrono::Utc::now().timestamp_millis()],
                )?;
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn record_failure(&self, id: OutboxItemId, failure: &FailedAttempt) -> Result<(), StoreError> {
        let id = id.0 as i64;
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            match failure {
                FailedAttempt::Retry { first_failed_at_ms, next_attempt_at_ms, error } => {
                    transaction.execute(
                        "UPDATE outbox SET attempts = attempts + 1, first_failed_at = $2, next_attempt_at = $3,
                             last_error = $4
                         WHERE id = $1",
                        &[&id, first_failed_at_ms, next_attempt_at_ms, error],
                    )?;
                }
                FailedAttempt::DeadLetter { at_ms, error } => {
                    transaction.execute(
                        "INSERT INTO dead_letters
                             (id, destination, position, payload, attempts, last_error, dead_at, profile_id, enqueued_at)
                         SELECT id, destination, position, payload, attempts + 1, $2, $3, profile_id, enqueued_at
                         FROM outbox WHERE id = $1",
                        &[&id, error, at_ms],
                    )?;
                    transaction.execute("DELETE FROM outbox WHERE id = $1", &[&id])?;
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
        let [profile, item, after] = filter_ids(filter);
        self.with_client(|client| {
            client
                .query(
                    &format!(
                        "SELECT id, destination, position, payload, attempts, last_error, dead_at, profile_id
                         FROM dead_letters WHERE ($1::text IS NULL OR destination = $1) AND {FILTER}
                         ORDER BY id LIMIT $6"
                    ),
                    &[&destination, &filter.since_ms, &profile, &item, &after, &(limit as i64)],
                )?
                .iter()
                .map(decode_dead_letter)
                .collect()
        })
    }

    fn replay_dead_letters(&self, destination: &str, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        let [profile, item, after] = filter_ids(filter);
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            if transaction
                .query_opt("SELECT 1 FROM destinations WHERE name = $1 FOR UPDATE", &[&destination])?
                .is_none()
            {
                return Err(StoreError::DestinationNotFound(destination.to_owned()));
            }
            // The original id puts each item back at its place in the order.
            let replayed = transaction.execute(
                &format!(
                    "INSERT INTO outbox (id, destination, position, payload, profile_id, enqueued_at)
                     SELECT id, destination, position, payload, profile_id, enqueued_at FROM dead_letters
                     WHERE destination = $1 AND {FILTER}"
                ),
                &[&destination, &filter.since_ms, &profile, &item, &after],
            )?;
            transaction.execute(
                &format!("DELETE FROM dead_letters WHERE destination = $1 AND {FILTER}"),
                &[&destination, &filter.since_ms, &profile, &item, &after],
            )?;
            transaction.commit()?;
            Ok(replayed)
        })
    }
}
