//! Sources, their write keys and webhook settings, and admin API tokens: the
//! storage interface, and the policy for new ids and secrets, which is kept
//! here so that every backend stores the same kind of key.

use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tandem_core::govern::Role;
use tandem_core::source::validate_source_name;
use tandem_core::webhook::WebhookSettings;
use tandem_core::{Source, SourceId, SourceKind, WriteKey};

use crate::StoreError;

/// An admin API token as listed (the secret itself is shown once, at creation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub created_at_ms: i64,
    /// What the token may do.
    pub role: Role,
    /// When the token stops working; `None` for never.
    pub expires_at_ms: Option<i64>,
    /// When the token was last seen by a server (recorded at most once per
    /// credential-cache period, so it is approximate).
    pub last_used_at_ms: Option<i64>,
}

impl TokenInfo {
    /// Whether the token has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|expires| expires <= now_ms)
    }
}

/// A new source named `name` (trimmed and validated) with a fresh id and a
/// write key long enough to be secret.
pub fn new_source(name: &str, kind: SourceKind) -> Result<Source, StoreError> {
    let name = validate_source_name(name)?;
    Ok(Source {
        id: SourceId::new(format!("src_{}", random_token(20))),
        name: name.to_owned(),
        kind,
        write_key: new_write_key(),
        created_at_ms: now_ms(),
    })
}

/// A new admin API token: its listing and its secret, shown once.
pub fn new_token(name: &str, role: Role, expires_at_ms: Option<i64>) -> (TokenInfo, String) {
    let secret = format!("tdm_{}", random_token(40));
    let info = TokenInfo {
        id: format!("tok_{}", random_token(12)),
        name: name.trim().to_owned(),
        created_at_ms: now_ms(),
        role,
        expires_at_ms,
        last_used_at_ms: None,
    };
    (info, secret)
}

/// How a token secret is stored: only its SHA-256, so a copy of the store
/// does not hand out working tokens.
pub fn secret_digest(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A new write key, long enough to be secret.
pub fn new_write_key() -> WriteKey {
    WriteKey::new(random_token(32))
}

pub(crate) fn random_token(length: usize) -> String {
    Alphanumeric.sample_string(&mut rand::rng(), length)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Sources and tokens: what the collect stage authenticates against.
pub trait Sources: Send + Sync + 'static {
    /// Stores a source made by [`new_source`]; [`StoreError::SourceExists`]
    /// when its name is taken.
    fn insert_source(&self, source: &Source) -> Result<(), StoreError>;

    /// Registers a source with a fresh id and write key.
    fn create_source(&self, name: &str, kind: SourceKind) -> Result<Source, StoreError> {
        let source = new_source(name, kind)?;
        self.insert_source(&source)?;
        Ok(source)
    }

    fn list_sources(&self) -> Result<Vec<Source>, StoreError>;

    /// Makes the named source take webhooks with these settings.
    fn set_webhook(&self, name: &str, settings: &WebhookSettings) -> Result<Source, StoreError>;

    /// A source that takes webhooks, with its settings; `None` for any other id.
    fn webhook(&self, id: &SourceId) -> Result<Option<(Source, WebhookSettings)>, StoreError>;

    fn source_by_write_key(&self, write_key: &WriteKey) -> Result<Option<Source>, StoreError>;

    /// The source with this name; [`StoreError::SourceNotFound`] when there is none.
    fn source_by_name(&self, name: &str) -> Result<Source, StoreError>;

    /// Stores a token made by [`new_token`], keeping only the secret's digest.
    fn insert_token(&self, info: &TokenInfo, secret_digest: &str) -> Result<(), StoreError>;

    /// Creates an `admin` token that never expires; returns its listing and the secret.
    fn create_token(&self, name: &str) -> Result<(TokenInfo, String), StoreError> {
        self.create_token_with(name, Role::Admin, None)
    }

    /// Creates a token with a role and an optional expiry; returns its
    /// listing and the secret.
    fn create_token_with(
        &self,
        name: &str,
        role: Role,
        expires_at_ms: Option<i64>,
    ) -> Result<(TokenInfo, String), StoreError> {
        let (info, secret) = new_token(name, role, expires_at_ms);
        self.insert_token(&info, &secret_digest(&secret))?;
        Ok((info, secret))
    }

    /// Records that a token was used at `at_ms`; unknown ids are ignored.
    fn touch_token(&self, id: &str, at_ms: i64) -> Result<(), StoreError>;

    /// The token whose secret has this digest.
    fn token_by_digest(&self, secret_digest: &str) -> Result<Option<TokenInfo>, StoreError>;

    /// The token a secret belongs to.
    fn verify_token(&self, secret: &str) -> Result<Option<TokenInfo>, StoreError> {
        self.token_by_digest(&secret_digest(secret))
    }

    /// Every admin token, oldest first (never their secrets).
    fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError>;

    /// Deletes a token by id, so its secret no longer verifies;
    /// [`StoreError::TokenNotFound`] for an unknown id.
    fn revoke_token(&self, id: &str) -> Result<TokenInfo, StoreError>;

    /// Gives a source a new name (validated); its id, key and events stay.
    fn rename_source(&self, name: &str, new_name: &str) -> Result<Source, StoreError>;

    /// Replaces a source's write key with `write_key`.
    fn set_write_key(&self, name: &str, write_key: &WriteKey) -> Result<Source, StoreError>;

    /// Gives a source a fresh write key; the old one stops working.
    fn rotate_write_key(&self, name: &str) -> Result<Source, StoreError> {
        self.set_write_key(name, &new_write_key())
    }

    /// Deletes a source that has no events in the log (the log is append-only
    /// and its events name their source); [`StoreError::SourceInUse`] otherwise.
    fn delete_source(&self, name: &str) -> Result<Source, StoreError>;
}
