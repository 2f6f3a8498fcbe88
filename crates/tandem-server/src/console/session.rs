//! Console sessions: a random id in a cookie (`HttpOnly; SameSite=Strict;
//! Path=/`) naming a session kept in memory until it expires. A session
//! starts anonymous (it carries the CSRF token of the sign-in form) and is
//! replaced by a new one, under a new id, once an admin token signs in; it
//! then carries that token and its role. Every session has its own CSRF
//! token, which each POST must echo.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cookie naming a console session.
pub const COOKIE: &str = "tandem_session";
/// How long a session lives after its last request.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 60 * 60);
/// Sessions kept at most; the oldest expiring ones go first beyond it.
const MAX_SESSIONS: usize = 10_000;

/// A signed-in token: its secret (kept in memory only, to check on each
/// request that the token is still valid) and what it is.
#[derive(Clone, Debug)]
pub struct SignedIn {
    pub secret: String,
    pub token: tandem_store::TokenInfo,
}

/// One session.
#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    pub csrf: String,
    pub signed_in: Option<SignedIn>,
    expires: Instant,
}

/// Every live session, by id.
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

/// A random value to use as a session id or CSRF token: 244 random bits
/// from the operating system, as hex.
pub fn random_token() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

impl Sessions {
    /// Starts a session (anonymous, or signed in) and returns it.
    pub fn start(&self, signed_in: Option<SignedIn>) -> Session {
        let session =
            Session { id: random_token(), csrf: random_token(), signed_in, expires: Instant::now() + SESSION_TTL };
        let mut by_id = self.by_id.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        by_id.retain(|_, session| session.expires > now);
        if by_id.len() >= MAX_SESSIONS {
            if let Some(oldest) = by_id.values().min_by_key(|session| session.expires).map(|s| s.id.clone()) {
                by_id.remove(&oldest);
            }
        }
        by_id.insert(session.id.clone(), session.clone());
        session
    }

    /// The live session with this id, its expiry pushed back.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        match by_id.get_mut(id) {
            Some(session) if session.expires > now => {
                session.expires = now + SESSION_TTL;
                Some(session.clone())
            }
            Some(_) => {
                by_id.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub fn end(&self, id: &str) {
        self.by_id.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(id);
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

    #[test]
    fn a_session_is_found_by_its_cookie_and_ends() {
        let sessions = Sessions::default();
        let session = sessions.start(None);
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::COOKIE, format!("a=b; {COOKIE}={}", session.id).parse().unwrap());
        let id = session_id(&headers).unwrap();
        assert_eq!(sessions.get(&id).unwrap().csrf, session.csrf);
        assert!(csrf_matches(&session, &session.csrf));
        assert!(!csrf_matches(&session, "wrong"));
        sessions.end(&id);
        assert!(sessions.get(&id).is_none());
        assert_ne!(random_token(), random_token());
    }
}
