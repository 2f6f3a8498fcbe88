//! The audit log in SQLite: appends chain under the single writer's
//! `IMMEDIATE` transaction, so no two entries share a predecessor.

use super::SqliteStore;
use crate::audit::{action_prefix_pattern, AuditFilter, AuditStore};
use crate::StoreError;
use rusqlite::{params, OptionalExtension, TransactionBehavior};
use tandem_core::govern::audit::{AuditDraft, AuditEntry, GENESIS_HASH};

const COLUMNS: &str = "seq, at, actor, role, action, target, before, after, prev_hash, hash";

fn entry_from_row(row: &rusqlite::Row) -> rusqlite::Result<AuditEntry> {
    let json = |index: usize| -> rusqlite::Result<Option<serde_json::Value>> {
        Ok(row.get::<_, Option<String>>(index)?.map(|text| serde_json::from_str(&text).unwrap_or_default()))
    };
    Ok(AuditEntry {
        seq: row.get(0)?,
        at_ms: row.get(1)?,
        actor: row.get(2)?,
        role: row.get(3)?,
        action: row.get(4)?,
        target: row.get(5)?,
        before: json(6)?,
        after: json(7)?,
        prev_hash: row.get(8)?,
        hash: row.get(9)?,
    })
}

impl AuditStore for SqliteStore {
    fn append_audit(&self, draft: AuditDraft) -> Result<AuditEntry, StoreError> {
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let newest: Option<(i64, String)> = transaction
                .prepare_cached("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")?
                .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            let (seq, prev_hash) = newest.unwrap_or((0, GENESIS_HASH.to_owned()));
            let entry = AuditEntry::chain(draft, seq + 1, &prev_hash);
            transaction
                .prepare_cached(&format!(
                    "INSERT INTO audit_log ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
                ))?
                .execute(params![
                    entry.seq,
                    entry.at_ms,
                    entry.actor,
                    entry.role,
                    entry.action,
                    entry.target,
                    entry.before.as_ref().map(|value| value.to_string()),
                    entry.after.as_ref().map(|value| value.to_string()),
                    entry.prev_hash,
                    entry.hash,
                ])?;
            transaction.commit()?;
            Ok(entry)
        })
    }

    fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = if filter.limit == 0 { i64::MAX } else { filter.limit as i64 };
        let action_prefix = filter.action.as_deref().map(action_prefix_pattern);
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM audit_log
                 WHERE seq > ?1
                   AND (?2 IS NULL OR actor = ?2)
                   AND (?3 IS NULL OR action = ?3 OR action LIKE ?4 ESCAPE '\\')
                   AND (?5 IS NULL OR at >= ?5)
                   AND (?7 IS NULL OR seq < ?7)
                 ORDER BY {} LIMIT ?6",
                filter.order()
            ))?;
            let rows = statement.query_map(
                params![
                    filter.after_seq,
                    filter.actor,
                    filter.action,
                    action_prefix,
                    filter.since_ms,
                    limit,
                    filter.before_seq
                ],
                entry_from_row,
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}
