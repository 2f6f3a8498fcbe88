//! The audit log in SQLite: appends chain under the single writer's
//! `IMMEDIATE` transaction, so no two entries share a predecessor.
//!
//! Every read of PII in clear appends an entry before it answers, so at
//! thousands of profile reads a second the appends were one synced
//! transaction each. Appends wait in [`AuditQueue`]: whoever gets the
//! writer next writes every waiting entry in one transaction, in the order
//! they came, and the callers whose entries it wrote find them done when
//! their turn comes. An entry is durable before its caller returns, as
//! before.

use super::SqliteStore;
use crate::audit::{action_prefix_pattern, AuditFilter, AuditStore};
use crate::StoreError;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::HashMap;
use std::sync::Mutex;
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
        let ticket = self.audit_queue.push(draft);
        self.with_writer(|connection| {
            // An earlier caller's transaction may have written this entry
            // with its own; otherwise this one writes every waiting entry.
            if let Some(done) = self.audit_queue.take_done(ticket) {
                return done;
            }
            let (tickets, drafts): (Vec<u64>, Vec<AuditDraft>) = self.audit_queue.take_waiting().into_iter().unzip();
            let written = append_all(connection, drafts);
            self.audit_queue.finish(tickets, written);
            self.audit_queue
                .take_done(ticket)
                .unwrap_or_else(|| Err(StoreError::Backend("the audit entry was not written".into())))
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

/// Appends `drafts` in order in one transaction, chained after the newest entry.
fn append_all(connection: &mut Connection, drafts: Vec<AuditDraft>) -> Result<Vec<AuditEntry>, StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let newest: Option<(i64, String)> = transaction
        .prepare_cached("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let (mut seq, mut prev_hash) = newest.unwrap_or((0, GENESIS_HASH.to_owned()));
    let mut entries = Vec::new();
    {
        let mut insert = transaction.prepare_cached(&format!(
            "INSERT INTO audit_log ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        ))?;
        for draft in drafts {
            let entry = AuditEntry::chain(draft, seq + 1, &prev_hash);
            insert.execute(params![
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
            seq = entry.seq;
            prev_hash = entry.hash.clone();
            entries.push(entry);
        }
    }
    transaction.commit()?;
    Ok(entries)
}

/// Audit entries waiting to be appended, and the outcome of those written
/// for callers that have not come back for it yet.
#[derive(Default)]
pub(super) struct AuditQueue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    next_ticket: u64,
    waiting: Vec<(u64, AuditDraft)>,
    /// Each written entry, or the error its transaction failed with.
    done: HashMap<u64, Result<AuditEntry, String>>,
}

impl AuditQueue {
    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, draft: AuditDraft) -> u64 {
        let mut state = self.state();
        state.next_ticket += 1;
        let ticket = state.next_ticket;
        state.waiting.push((ticket, draft));
        ticket
    }

    fn take_waiting(&self) -> Vec<(u64, AuditDraft)> {
        std::mem::take(&mut self.state().waiting)
    }

    fn finish(&self, tickets: Vec<u64>, written: Result<Vec<AuditEntry>, StoreError>) {
        let mut state = self.state();
        match written {
            Ok(entries) => state.done.extend(tickets.into_iter().zip(entries.into_iter().map(Ok))),
            Err(error) => {
                let error = error.to_string();
                state.done.extend(tickets.into_iter().map(|ticket| (ticket, Err(error.clone()))));
            }
        }
    }

    fn take_done(&self, ticket: u64) -> Option<Result<AuditEntry, StoreError>> {
        let done = self.state().done.remove(&ticket)?;
        Some(done.map_err(|error| StoreError::Backend(error.into())))
    }
}
