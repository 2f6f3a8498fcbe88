//! The console's sessions in SQLite: one row per session, keyed by the
//! digest of its id; starting one prunes expired rows and keeps the table
//! under its cap in the same transaction.

use super::manage::token_from_row;
use super::SqliteStore;
use crate::session::{ConsoleSessionStore, NewConsoleSession, StoredConsoleSession};
use crate::StoreError;
use rusqlite::{params, OptionalExtension};

impl ConsoleSessionStore for SqliteStore {
    fn start_console_session(
        &self,
        session: &NewConsoleSession,
        now_ms: i64,
        max_sessions: usize,
    ) -> Result<(), StoreError> {
        self.with_writer(|connection| {
            let transaction = connection.transaction()?;
            transaction.prepare_cached("DELETE FROM console_sessions WHERE expires_at <= ?1")?.execute([now_ms])?;
            let stored: i64 =
                transaction.prepare_cached("SELECT COUNT(*) FROM console_sessions")?.query_row([], |row| row.get(0))?;
            let beyond = stored + 1 - max_sessions.max(1) as i64;
            if beyond > 0 {
                transaction
                    .prepare_cached(
                        "DELETE FROM console_sessions WHERE id_sha256 IN (
                            SELECT id_sha256 FROM console_sessions
                            ORDER BY token_id IS NOT NULL, expires_at LIMIT ?1)",
                    )?
                    .execute([beyond])?;
            }
            transaction
                .prepare_cached(
                    "INSERT INTO console_sessions (id_sha256, csrf, token_id, created_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    session.id_digest,
                    session.csrf,
                    session.token_id,
                    session.created_at_ms,
                    session.expires_at_ms
                ])?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn console_session(&self, id_digest: &str, now_ms: i64) -> Result<Option<StoredConsoleSession>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT t.id, t.name, t.created_at, t.role, t.expires_at, t.last_used_at,
                        s.csrf, s.created_at, s.expires_at, s.token_id
                 FROM console_sessions s LEFT JOIN api_tokens t ON t.id = s.token_id
                 WHERE s.id_sha256 = ?1 AND s.expires_at > ?2",
            )?;
            let found = statement
                .query_row(params![id_digest, now_ms], |row| {
                    // A session naming a token that no longer exists reads
                    // as absent (`None`), an anonymous one as `Some(None)`.
                    let token = match (row.get::<_, Option<String>>(9)?, row.get::<_, Option<String>>(0)?) {
                        (None, _) => Some(None),
                        (Some(_), None) => None,
                        (Some(_), Some(_)) => Some(Some(token_from_row(row)?)),
                    };
                    let Some(token) = token else {
                        return Ok(None);
                    };
                    Ok(Some(StoredConsoleSession {
                        csrf: row.get(6)?,
                        token,
                        created_at_ms: row.get(7)?,
                        expires_at_ms: row.get(8)?,
                    }))
                })
                .optional()?;
            Ok(found.flatten())
        })
    }

    fn extend_console_session(&self, id_digest: &str, expires_at_ms: i64) -> Result<bool, StoreError> {
        self.with_writer(|connection| {
            let changed = connection
                .prepare_cached("UPDATE console_sessions SET expires_at = MAX(expires_at, ?2) WHERE id_sha256 = ?1")?
                .execute(params![id_digest, expires_at_ms])?;
            Ok(changed > 0)
        })
    }

    fn end_console_session(&self, id_digest: &str) -> Result<bool, StoreError> {
        self.with_writer(|connection| {
            let deleted =
                connection.prepare_cached("DELETE FROM console_sessions WHERE id_sha256 = ?1")?.execute([id_digest])?;
            Ok(deleted > 0)
        })
    }

    fn prune_console_sessions(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.with_writer(|connection| {
            let deleted =
                connection.prepare_cached("DELETE FROM console_sessions WHERE expires_at <= ?1")?.execute([now_ms])?;
            Ok(deleted as u64)
        })
    }

    fn count_console_sessions(&self) -> Result<u64, StoreError> {
        self.with_reader(|connection| {
            let count: i64 =
                connection.prepare_cached("SELECT COUNT(*) FROM console_sessions")?.query_row([], |row| row.get(0))?;
            Ok(count as u64)
        })
    }
}
