//! Who is calling. Tracking clients: reads the write key from `Authorization: Basic` (the key as
//! user name, password empty, colon optional) and maps it to its source,
//! caching the sources it has seen so the hot path does not query storage.
//! Admin clients: a bearer token (`tandem token create`), checked against
//! its stored hash. Both are cached for a few seconds once found, so a
//! revoked token or a rotated key stops working without a restart; while
//! storage cannot be read, what was found before still counts
//! ([`crate::read_through`]).

use crate::error::{ApiError, ErrorCode};
use crate::read_through::ReadThrough;
use axum::http::{header, HeaderMap};
use base64::Engine;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::{Source, WriteKey};
use tandem_store::Store;

/// The write key from an `Authorization: Basic` header; `None` when there is
/// no such header (the key may then be in the body).
pub fn basic_auth_write_key(headers: &HeaderMap) -> Result<Option<WriteKey>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || {
        ApiError::new(ErrorCode::InvalidWriteKey, "authorization must be Basic with the write key as user name")
            .with_field("authorization")
    };
    let text = value.to_str().map_err(|_| malformed())?.trim();
    let Some((scheme, encoded)) = text.split_once(' ') else {
        return Err(malformed());
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(malformed());
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| malformed())?;
    let credentials = String::from_utf8(decoded).map_err(|_| malformed())?;
    let user = credentials.split_once(':').map_or(credentials.as_str(), |(user, _password)| user);
    if user.is_empty() {
        return Ok(None);
    }
    Ok(Some(WriteKey::new(user)))
}

/// How long a credential found in storage is trusted without asking again:
/// a revoked token or a rotated or deleted write key stops working within
/// this time, also when another process (the CLI) changed it. Only hits are
/// cached: a key matching nothing is asked again next time.
pub const CACHE_TTL: Duration = Duration::from_secs(10);

/// Write key → source, backed by storage, with a cache of known keys, and
/// the note of requests refused for an unknown key (shadow IT).
pub struct SourceDirectory {
    cache: ReadThrough<Source>,
    shadow: crate::stack::ShadowTraffic,
}

impl SourceDirectory {
    pub fn new(store: Arc<dyn Store>) -> Self {
        SourceDirectory {
            cache: ReadThrough::new(store, "a write key", CACHE_TTL),
            shadow: crate::stack::ShadowTraffic::default(),
        }
    }

    /// Requests refused for a write key matching no source, not yet stored.
    pub fn shadow(&self) -> &crate::stack::ShadowTraffic {
        &self.shadow
    }

    /// Like [`SourceDirectory::authenticate`], noting who sent a key that
    /// matches no source.
    pub async fn authenticate_caller(
        &self,
        write_key: Option<WriteKey>,
        caller: crate::stack::Caller<'_>,
    ) -> Result<Source, ApiError> {
        let noted = write_key.clone();
        let result = self.authenticate(write_key).await;
        if let (Err(error), Some(key)) = (&result, noted) {
            if error.code == ErrorCode::InvalidWriteKey {
                self.shadow.note(&key, caller);
            }
        }
        result
    }

    /// The source a write key belongs to, or 401.
    pub async fn authenticate(&self, write_key: Option<WriteKey>) -> Result<Source, ApiError> {
        let Some(write_key) = write_key else {
            return Err(ApiError::new(
                ErrorCode::MissingWriteKey,
                "a write key is required, as the Basic auth user name or writeKey in the body",
            )
            .with_field("writeKey"));
        };
        self.cache
            .get(write_key.as_str(), |store, key| store.source_by_write_key(&WriteKey::new(key)))
            .await?
            .ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidWriteKey, "the write key matches no source").with_field("writeKey")
            })
    }
}

/// Verified admin tokens, cached by secret.
pub struct TokenDirectory {
    cache: ReadThrough<tandem_store::TokenInfo>,
}

impl TokenDirectory {
    pub fn new(store: Arc<dyn Store>) -> Self {
        TokenDirectory { cache: ReadThrough::new(store, "an admin token", CACHE_TTL) }
    }

    /// The token of an `Authorization: Bearer` header, or 401.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<tandem_store::TokenInfo, ApiError> {
        let secret = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|secret| !secret.is_empty())
            .ok_or_else(|| {
                ApiError::new(ErrorCode::MissingToken, "an admin token is required: Authorization: Bearer TOKEN")
                    .with_field("authorization")
            })?;
        let token = self.cache.get(secret, verify_and_touch).await?.ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidToken, "the token is not valid").with_field("authorization")
        })?;
        if token.is_expired(chrono::Utc::now().timestamp_millis()) {
            return Err(ApiError::new(ErrorCode::TokenExpired, "the token has expired").with_field("authorization"));
        }
        Ok(token)
    }
}

/// Verifies a secret and records the token's use: at most once per cache
/// period per token, so it costs one small write every few seconds at most.
fn verify_and_touch(
    store: &dyn Store,
    secret: &str,
) -> Result<Option<tandem_store::TokenInfo>, tandem_store::StoreError> {
    let token = store.verify_token(secret)?;
    if let Some(token) = &token {
        if let Err(error) = store.touch_token(&token.id, chrono::Utc::now().timestamp_millis()) {
            tracing::warn!(%error, "recording a token's last use failed");
        }
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers_with(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(authorization).unwrap());
        headers
    }

    fn encode(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn the_user_name_is_the_write_key_with_or_without_a_colon() {
        for credentials in ["key123:", "key123", "key123:ignored"] {
            let headers = headers_with(&format!("Basic {}", encode(credentials)));
            assert_eq!(basic_auth_write_key(&headers).unwrap(), Some(WriteKey::new("key123")), "{credentials}");
        }
        assert_eq!(basic_auth_write_key(&HeaderMap::new()).unwrap(), None);
    }

    #[tokio::test]
    async fn a_revoked_token_is_refused_once_its_cache_entry_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(tandem_store::SqliteStore::open(dir.path()).unwrap());
        let (info, secret) = store.create_token("ops").unwrap();
        let lookup: fn(&dyn Store, &str) -> Result<Option<tandem_store::TokenInfo>, tandem_store::StoreError> =
            |store, secret| store.verify_token(secret);
        let cached = ReadThrough::new(store.clone(), "a token", CACHE_TTL);
        let expiring = ReadThrough::new(store.clone(), "a token", Duration::ZERO);
        assert_eq!(cached.get(&secret, lookup).await.unwrap(), Some(info.clone()));
        assert_eq!(expiring.get(&secret, lookup).await.unwrap(), Some(info.clone()));
        store.revoke_token(&info.id).unwrap();
        assert_eq!(
            cached.get(&secret, lookup).await.unwrap(),
            Some(info),
            "trusted until the entry is older than the ttl"
        );
        assert_eq!(expiring.get(&secret, lookup).await.unwrap(), None);
    }

    #[test]
    fn malformed_authorization_is_refused() {
        for value in ["Bearer abc", "Basic !!!", "Basic"] {
            let error = basic_auth_write_key(&headers_with(value)).unwrap_err();
            assert_eq!(error.status(), axum::http::StatusCode::UNAUTHORIZED, "{value}");
        }
    }
}
