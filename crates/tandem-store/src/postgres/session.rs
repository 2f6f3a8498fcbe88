//! The console's sessions in PostgreSQL, shared by every node: starting one
//! prunes expired rows and keeps the table under its cap in the same
//! transaction. Two nodes starting sessions at the same moment may each
//! see room for one more, so the table can exceed its cap by a session per
//! node for a moment; the next start trims it back.

use super::sources::token_from_row;
use super::PostgresStore;
use crate::session::{ConsoleSessionStore, NewConsoleSession, StoredConsoleSession};
use crate::StoreError;

impl ConsoleSessionStore for PostgresStore {
    fn start_console_session(
        &self,
        session: &NewConsoleSession,
        now_ms: i64,
        max_sessions: usize,
    ) -> Result<(), StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            transaction.execute("DELETE FROM console_sessions WHERE expires_at <= $1", &[&now_ms])?;
            let stored: i64 = transaction.query_one("SELECT COUNT(*) FROM console_sessions", &[])?.try_get(0)?;
            let beyond = stored + 1 - max_sessions.max(1) as i64;
            if beyond > 0 {
                transaction.execute(
                    "DELETE FROM console_sessions WHERE id_sha256 IN (
                        SELECT id_sha256 FROM console_sessions
                        ORDER BY token_id IS NOT NULL, expires_at LIMIT $1)",
                    &[&beyond],
                )?;
            }
            transaction.execute(
                "INSERT INTO console_sessions (id_sha256, csrf, token_id, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&session.id_digest, &session.csrf, &session.token_id, &session.created_at_ms, &session.expires_at_ms],
            )?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn console_session(&self, id_digest: &str, now_ms: i64) -> Result<Option<StoredConsoleSession>, StoreError> {
        self.with_client(|client| {
            let Some(row) = client.query_opt(
                // The token's columns first, in `token_from_row`'s order.
                "SELECT t.id, t.name, t.created_at, t.role, t.expires_at, t.last_used_at,
                        s.csrf, s.created_at, s.expires_at, s.token_id
                 FROM console_sessions s LEFT JOIN api_tokens t ON t.id = s.token_id
                 WHERE s.id_sha256 = $1 AND s.expires_at > $2",
                &[&id_digest, &now_ms],
            )?
            else {
                return Ok(None);
            };
            // A session naming a token that no longer exists reads as absent.
            let token = match (row.try_get::<_, Option<String>>(9)?, row.try_get::<_, Option<String>>(0)?) {
                (None, _) => None,
                (Some(_), None) => return Ok(None),
                (Some(_), Some(_)) => Some(token_from_row(&row)?),
            };
            Ok(Some(StoredConsoleSession {
                csrf: row.try_get(6)?,
                token,
                created_at_ms: row.try_get(7)?,
                expires_at_ms: row.try_get(8)?,
            }))
        })
    }

    fn extend_console_session(&self, id_digest: &str, expires_at_ms: i64) -> Result<bool, StoreError> {
        self.with_client(|client| {
            let changed = client.execute(
                "UPDATE console_sessions SET expires_at = GREATEST(expires_at, $2) WHERE id_sha256 = $1",
                &[&id_digest, &expires_at_ms],
            )?;
            Ok(changed > 0)
        })
    }

    fn end_console_session(&self, id_digest: &str) -> Result<bool, StoreError> {
        self.with_client(|client| {
            Ok(client.execute("DELETE FROM console_sessions WHERE id_sha256 = $1", &[&id_digest])? > 0)
        })
    }

    fn prune_console_sessions(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.with_client(
            |client| Ok(client.execute("DELETE FROM console_sessions WHERE expires_at <= $1", &[&now_ms])?),
        )
    }

    fn count_console_sessions(&self) -> Result<u64, StoreError> {
        self.with_client(|client| {
            let count: i64 = client.query_one("SELECT COUNT(*) FROM console_sessions", &[])?.try_get(0)?;
            Ok(count as u64)
        })
    }
}
