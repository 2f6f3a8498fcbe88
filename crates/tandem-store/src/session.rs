//! The web console's sessions: the storage interface, and the policy every
//! backend shares (how a session id is stored). Sessions live in the store,
//! not in a server's memory, so a restart signs no one out and every node
//! behind a load balancer knows every session.
//!
//! A row holds the SHA-256 of the session id, never the id itself: the id is
//! the bearer credential the cookie carries, and a copy of the store (a
//! backup, a read replica, someone reading the table) must not hand out
//! working sessions, just as token secrets are kept only as digests
//! ([`crate::sources::secret_digest`]). A signed-in session names its token
//! by id, never by secret; reading the session reads the token as stored
//! now, so a revoked token (its row deleted, which also deletes its
//! sessions) or an expired one signs its sessions out.

use crate::{StoreError, TokenInfo};

/// How a session id is stored: its SHA-256, as hex.
pub fn session_id_digest(id: &str) -> String {
    crate::sources::secret_digest(id)
}

/// A session to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewConsoleSession {
    /// [`session_id_digest`] of the id the cookie carries.
    pub id_digest: String,
    /// The token every form of the session must echo.
    pub csrf: String,
    /// The id of the token signed in; `None` for the anonymous session of
    /// the sign-in form.
    pub token_id: Option<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A live session as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredConsoleSession {
    pub csrf: String,
    /// The signed-in token as stored now (its role, its expiry); `None` for
    /// an anonymous session.
    pub token: Option<TokenInfo>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// Storage for the console's sessions.
pub trait ConsoleSessionStore: Send + Sync + 'static {
    /// Stores a new session. First deletes every session expired at
    /// `now_ms`, then, if `max_sessions` or more remain, the ones nearest
    /// their expiry until there is room for this one — anonymous sessions
    /// before signed-in ones, so a flood of sign-in forms cannot sign
    /// anyone out.
    fn start_console_session(
        &self,
        session: &NewConsoleSession,
        now_ms: i64,
        max_sessions: usize,
    ) -> Result<(), StoreError>;

    /// The session whose id has this digest, unless it has expired at
    /// `now_ms` or names a token that no longer exists (such a session
    /// reads as absent; it is deleted at its expiry).
    fn console_session(&self, id_digest: &str, now_ms: i64) -> Result<Option<StoredConsoleSession>, StoreError>;

    /// Moves a session's expiry to `expires_at_ms` (never earlier than it
    /// was); whether the session still exists.
    fn extend_console_session(&self, id_digest: &str, expires_at_ms: i64) -> Result<bool, StoreError>;

    /// Deletes a session; whether there was one.
    fn end_console_session(&self, id_digest: &str) -> Result<bool, StoreError>;

    /// Deletes every session expired at `now_ms`; how many there were.
    fn prune_console_sessions(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// How many sessions are stored, expired or not.
    fn count_console_sessions(&self) -> Result<u64, StoreError>;
}
