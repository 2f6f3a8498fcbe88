//! Console sessions: a random id in a cookie (`HttpOnly; SameSite=Strict;
//! Path=/`) naming a session kept in the store
//! ([`tandem_store::ConsoleSessionStore`]), so a restart signs no one out
//! and every node over the same store knows every session. A session
//! starts anonymous (it carries the CSRF token of the sign-in form) and is
//! replaced by a new one, under a new id, once an admin token signs in; it
//! then names that token by id. Every session has its own CSRF token, which
//! each POST must echo.
//!
//! The store keeps the SHA-256 of the id, never the id, and never the
//! token's secret: each request reads the session with its token as stored
//! now, so a revoked token (whose sessions are deleted with it) or an
//! expired one ends its sessions at the next request.
//!
//! Expiry slides: a session ends [`SESSION_TTL`] after its last request.
//! Writing the new expiry on every request would make each page view a
//! write, so a request moves it only once it is [`EXTEND_AFTER`] old; the
//! session then lasts between `SESSION_TTL - EXTEND_AFTER` and
//! `SESSION_TTL` after the last request. The cookie is sent again with the
//! same id each time (its `Max-Age` slides with it).

use crate::error::{ApiError, ErrorCode};
use crate::insight::Clock;
use std::sync::Arc;
use std::time::Duration;
use tandem_store::{session_id_digest, NewConsoleSession, Store, StoreError, TokenInfo};

/// The cookie naming a console session.
pub const COOKIE: &str = "tandem_session";
/// How long a session lives after its last request.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 60 * 60);
/// How old a session's expiry must be before a request writes a new one.
pub const EXTEND_AFTER: Duration = Duration::from_secs(5 * 60);
/// Sessions kept at most; beyond it, starting one deletes the anonymous
/// sessions nearest their expiry first, then signed-in ones.
const MAX_SESSIONS: usize = 10_000;

/// One live session.
#[derive(Clone, Debug)]
pub struct Session {
    /// The id the cookie carries (the store has only its digest).
    pub id: String,
    pub csrf: String,
    /// The signed-in token as stored now; `None` before signing in.
    pub token: Option<TokenInfo>,
    /// When the session ends unless a request moves it.
    pub expires_at_ms: i64,
    /// Whether reading it moved its expiry (the cookie is then sent again).
    pub extended: bool,
}

/// The console's sessions, in the store.
pub struct Sessions {
    store: Arc<dyn Store>,
    clock: Clock,
}

/// A random value to use as a session id or CSRF token: 244 random bits
/// from the operating system, as hex.
pub fn random_token() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

fn ttl_ms() -> i64 {
    SESSION_TTL.as_millis() as i64
}

fn storage_error(error: StoreError) -> ApiError {
    tracing::error!(%error, "console session storage failed");
    ApiError::new(ErrorCode::Unavailable, "sessions cannot be read or written right now, retry later")
}

impl Sessions {
    /// Sessions in `store`, timed by the system clock.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_clock(store, crate::insight::system_clock())
    }

    /// Sessions in `store`, timed by `clock` (milliseconds since the epoch).
    pub fn with_clock(store: Arc<dyn Store>, clock: Clock) -> Self {
        Sessions { store, clock }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(store.as_ref()))
            .await
            .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
            .map_err(storage_error)
    }

    /// Starts a session, anonymous or signed in by `token`, and returns it.
    pub async fn start(&self, token: Option<TokenInfo>) -> Result<Session, ApiError> {
        let now_ms = (self.clock)();
        let session = Session {
            id: random_token(),
            csrf: random_token(),
            token,
            expires_at_ms: now_ms + ttl_ms(),
            extended: false,
        };
        let stored = NewConsoleSession {
            id_digest: session_id_digest(&session.id),
            csrf: session.csrf.clone(),
            token_id: session.token.as_ref().map(|token| token.id.clone()),
            created_at_ms: now_ms,
            expires_at_ms: session.expires_at_ms,
        };
        self.blocking(move |store| store.start_console_session(&stored, now_ms, MAX_SESSIONS)).await?;
        Ok(session)
    }

    /// The live session with this id: `None` when there is none, it has
    /// expired, or its token was revoked or has expired (the session is
    /// then ended). Moves its expiry when the last move is
    /// [`EXTEND_AFTER`] old, and records the token's use with it.
    pub async fn get(&self, id: &str) -> Result<Option<Session>, ApiError> {
        let now_ms = (self.clock)();
        let digest = session_id_digest(id);
        let id = id.to_owned();
        self.blocking(move |store| {
            let Some(stored) = store.console_session(&digest, now_ms)? else {
                return Ok(None);
            };
            if stored.token.as_ref().is_some_and(|token| token.is_expired(now_ms)) {
                store.end_console_session(&digest)?;
                return Ok(None);
            }
            let mut session = Session {
                id,
                csrf: stored.csrf,
                token: stored.token,
                expires_at_ms: stored.expires_at_ms,
                extended: false,
            };
            let wanted = now_ms + ttl_ms();
            if wanted - session.expires_at_ms >= EXTEND_AFTER.as_millis() as i64 {
                if !store.extend_console_session(&digest, wanted)? {
                    return Ok(None);
                }
                if let Some(token) = &session.token {
                    // As for the API's tokens, a failure to note the use
                    // refuses nothing.
                    if let Err(error) = store.touch_token(&token.id, now_ms) {
                        tracing::warn!(%error, "recording a token's last use failed");
                    }
                }
                session.expires_at_ms = wanted;
                session.extended = true;
            }
            Ok(Some(session))
        })
        .await
    }

    /// Ends a session (signing out, or replacing it by a signed-in one).
    pub async fn end(&self, id: &str) -> Result<(), ApiError> {
        let digest = session_id_digest(id);
        self.blocking(move |store| store.end_console_session(&digest).map(drop)).await
    }
}

/// The session id of a request's `Cookie` header.
pub fn session_id(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// The `Set-Cookie` value carrying a session id.
pub fn cookie(id: &str) -> String {
    format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", SESSION_TTL.as_secs())
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn cleared_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// Whether `given` is the session's CSRF token, compared in constant time.
pub fn csrf_matches(session: &Session, given: &str) -> bool {
    let (expected, given) = (session.csrf.as_bytes(), given.as_bytes());
    expected.len() == given.len() && expected.iter().zip(given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use tandem_core::govern::Role;

    const MINUTE_MS: i64 = 60 * 1000;

    /// Sessions over a fresh store, on a clock the test moves.
    fn sessions() -> (tempfile::TempDir, Arc<dyn Store>, Sessions, Arc<AtomicI64>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(tandem_store::SqliteStore::open(dir.path()).unwrap());
        let now = Arc::new(AtomicI64::new(1_000_000));
        let clock = now.clone();
        let sessions = Sessions::with_clock(store.clone(), Arc::new(move || clock.load(Ordering::SeqCst)));
        (dir, store, sessions, now)
    }

    #[tokio::test]
    async fn a_session_is_found_by_its_cookie_and_ends() {
        let (_dir, store, sessions, _) = sessions();
        let session = sessions.start(None).await.unwrap();
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::COOKIE, format!("a=b; {COOKIE}={}", session.id).parse().unwrap());
        let id = session_id(&headers).unwrap();
        assert_eq!(sessions.get(&id).await.unwrap().unwrap().csrf, session.csrf);
        assert!(csrf_matches(&session, &session.csrf));
        assert!(!csrf_matches(&session, "wrong"));
        assert!(store.console_session(&session.id, 0).unwrap().is_none(), "the store does not know the id itself");
        sessions.end(&id).await.unwrap();
        assert!(sessions.get(&id).await.unwrap().is_none());
        assert_eq!(store.count_console_sessions().unwrap(), 0);
        assert_ne!(random_token(), random_token());
    }

    #[tokio::test]
    async fn expiry_slides_with_a_write_only_every_few_minutes() {
        let (_dir, store, sessions, now) = sessions();
        let started_at = now.load(Ordering::SeqCst);
        let session = sessions.start(None).await.unwrap();
        let stored_expiry =
            || store.console_session(&session_id_digest(&session.id), 0).unwrap().unwrap().expires_at_ms;
        now.fetch_add(4 * MINUTE_MS, Ordering::SeqCst);
        let read = sessions.get(&session.id).await.unwrap().unwrap();
        assert!(!read.extended, "a read within the first minutes writes nothing");
        assert_eq!(stored_expiry(), started_at + ttl_ms());
        now.fetch_add(2 * MINUTE_MS, Ordering::SeqCst);
        let read = sessions.get(&session.id).await.unwrap().unwrap();
        assert!(read.extended);
        assert_eq!(stored_expiry(), started_at + 6 * MINUTE_MS + ttl_ms());
        // Idle for less than the lifetime: still there; idle for longer: gone.
        now.fetch_add(ttl_ms() - MINUTE_MS, Ordering::SeqCst);
        assert!(sessions.get(&session.id).await.unwrap().is_some());
        now.fetch_add(ttl_ms(), Ordering::SeqCst);
        assert!(sessions.get(&session.id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_expired_token_ends_its_session_and_extending_records_its_use() {
        let (_dir, store, sessions, now) = sessions();
        let expires_at = now.load(Ordering::SeqCst) + 30 * MINUTE_MS;
        let (token, _) = store.create_token_with("desk", Role::Support, Some(expires_at)).unwrap();
        let session = sessions.start(Some(token.clone())).await.unwrap();
        now.fetch_add(10 * MINUTE_MS, Ordering::SeqCst);
        let read = sessions.get(&session.id).await.unwrap().unwrap();
        assert_eq!(read.token.as_ref().map(|token| token.role), Some(Role::Support));
        let used = store.list_tokens().unwrap()[0].last_used_at_ms;
        assert_eq!(used, Some(now.load(Ordering::SeqCst)), "moving the expiry records the token's use");
        now.fetch_add(25 * MINUTE_MS, Ordering::SeqCst);
        assert!(sessions.get(&session.id).await.unwrap().is_none(), "the token has expired");
        assert_eq!(store.count_console_sessions().unwrap(), 0, "and its session was ended");
    }
}
