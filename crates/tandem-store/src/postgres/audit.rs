//! The audit log in PostgreSQL: an append locks the table against other
//! appends (readers are not blocked) so no two entries share a predecessor,
//! also across nodes.

use super::PostgresStore;
use crate::audit::{action_prefix_pattern, AuditFilter, AuditStore};
use crate::StoreError;
use postgres::Row;
use tandem_core::govern::audit::{AuditDraft, AuditEntry, GENESIS_HASH};

const COLUMNS: &str = "seq, at, actor, role, action, target, before, after, prev_hash, hash";

fn entry_from_row(row: &Row) -> Result<AuditEntry, StoreError> {
    let json = |index: usize| -> Result<Option<serde_json::Value>, StoreError> {
        Ok(row.try_get::<_, Option<String>>(index)?.map(|text| serde_json::from_str(&text).unwrap_or_default()))
    };
    Ok(AuditEntry {
        seq: row.try_get(0)?,
        at_ms: row.try_get(1)?,
        actor: row.try_get(2)?,
        role: row.try_get(3)?,
        action: row.try_get(4)?,
        target: row.try_get(5)?,
        before: json(6)?,
        after: json(7)?,
        prev_hash: row.try_get(8)?,
        hash: row.try_get(9)?,
    })
}

impl AuditStore for PostgresStore {
    fn append_audit(&self, draft: AuditDraft) -> Result<AuditEntry, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            transaction.batch_execute("LOCK TABLE audit_log IN EXCLUSIVE MODE")?;
            let newest = transaction.query_opt("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1", &[])?;
            let (seq, prev_hash) = match newest {
                Some(row) => (row.try_get::<_, i64>(0)?, row.try_get::<_, String>(1)?),
                None => (0, GENESIS_HASH.to_owned()),
            };
            let entry = AuditEntry::chain(draft, seq + 1, &prev_hash);
            transaction.execute(
                &format!("INSERT INTO audit_log ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"),
                &[
                    &entry.seq,
                    &entry.at_ms,
                    &entry.actor,
                    &entry.role,
                    &entry.action,
                    &entry.target,
                    &entry.before.as_ref().map(|value| value.to_string()),
                    &entry.after.as_ref().map(|value| value.to_string()),
                    &entry.prev_hash,
                    &entry.hash,
                ],
            )?;
            transaction.commit()?;
            Ok(entry)
        })
    }

    fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = if filter.limit == 0 { i64::MAX } else { filter.limit as i64 };
        let action_prefix = filter.action.as_deref().map(action_prefix_pattern);
        self.with_client(|client| {
            client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM audit_log
                         WHERE seq > $1
                           AND ($2::TEXT IS NULL OR actor = $2)
                           AND ($3::TEXT IS NULL OR action = $3 OR action LIKE $4 ESCAPE '\\')
                           AND ($5::BIGINT IS NULL OR at >= $5)
                           AND ($7::BIGINT IS NULL OR seq < $7)
                         ORDER BY {} LIMIT $6",
                        filter.order()
                    ),
                    &[
                        &filter.after_seq,
                        &filter.actor,
                        &filter.action,
                        &action_prefix,
                        &filter.since_ms,
                        &limit,
                        &filter.before_seq,
                    ],
                )?
                .iter()
                .map(entry_from_row)
                .collect()
        })
    }
}
