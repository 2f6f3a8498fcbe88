//! What a node reads from storage on its hot paths (write keys, admin
//! tokens, tracking plans, suppressions), cached: a value read is trusted
//! for a time-to-live and then read again, so a change another process made
//! (the CLI, another node) applies within that time without any message
//! between processes.
//!
//! While storage cannot be read, a value read before keeps being served,
//! and storage is asked again every [`RETRY_UNREADABLE`]. Nobody can change
//! a store nobody can reach, and a node with an event stream needs nothing
//! else from the database to take events: so it keeps taking them through a
//! database outage of any length, JetStream holding them until the drain
//! can append them. A key never read before is an error then (`503`).

use crate::error::{ApiError, ErrorCode};
use crate::resolve::RateLimitedWarning;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tandem_store::{Store, StoreError};

/// How long a value read before is served, after storage could not be read,
/// until storage is asked again.
pub const RETRY_UNREADABLE: Duration = Duration::from_secs(1);

/// How often a failing read is logged at most (the count held back follows).
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Reads a key's value from storage; `Ok(None)` when it has none (not
/// cached: asked again next time).
pub(crate) type Lookup<V> = fn(&dyn Store, &str) -> Result<Option<V>, StoreError>;

/// A value and until when it is trusted without reading it again.
struct Known<V> {
    value: V,
    trusted_until: Instant,
}

/// A read-through cache of values by key (see the module's documentation).
pub(crate) struct ReadThrough<V> {
    store: Arc<dyn Store>,
    /// What is read, for the log ("a credential", "a tracking plan").
    what: &'static str,
    ttl: Duration,
    known: RwLock<HashMap<String, Known<V>>>,
    failing: Mutex<RateLimitedWarning>,
}

impl<V: Clone + Send + 'static> ReadThrough<V> {
    /// A cache over `store` that trusts what it read for `ttl`.
    pub(crate) fn new(store: Arc<dyn Store>, what: &'static str, ttl: Duration) -> Self {
        ReadThrough {
            store,
            what,
            ttl,
            known: RwLock::new(HashMap::new()),
            failing: Mutex::new(RateLimitedWarning::new(WARN_EVERY)),
        }
    }

    /// `key`'s value: the cached one while trusted, else read with `lookup`
    /// (on a blocking thread), or the cached one when that read fails.
    pub(crate) async fn get(&self, key: &str, lookup: Lookup<V>) -> Result<Option<V>, ApiError> {
        if let Some(known) = self.known.read().unwrap_or_else(PoisonError::into_inner).get(key) {
            if Instant::now() < known.trusted_until {
                return Ok(Some(known.value.clone()));
            }
        }
        let store = self.store.clone();
        let owned_key = key.to_owned();
        let read = tokio::task::spawn_blocking(move || lookup(store.as_ref(), &owned_key))
            .await
            .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?;
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        match read {
            Ok(Some(value)) => {
                known.insert(key.to_owned(), Known { value: value.clone(), trusted_until: Instant::now() + self.ttl });
                Ok(Some(value))
            }
            Ok(None) => {
                known.remove(key);
                Ok(None)
            }
            Err(error) => {
                let held_back = self.failing.lock().unwrap_or_else(PoisonError::into_inner).admit(Instant::now());
                match known.get_mut(key) {
                    Some(stale) => {
                        if let Some(held_back) = held_back {
                            tracing::warn!(%error, held_back, "reading {} failed; using the one read before", self.what);
                        }
                        stale.trusted_until = Instant::now() + RETRY_UNREADABLE;
                        Ok(Some(stale.value.clone()))
                    }
                    None => {
                        if let Some(held_back) = held_back {
                            tracing::error!(%error, held_back, "reading {} failed", self.what);
                        }
                        Err(ApiError::unavailable())
                    }
                }
            }
        }
    }

    /// Reads `key` again on next use (after it was changed here).
    pub(crate) fn forget(&self, key: &str) {
        self.known.write().unwrap_or_else(PoisonError::into_inner).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Whether [`name_of`] fails, as a store that cannot be reached does.
    static UNREADABLE: AtomicBool = AtomicBool::new(false);

    /// The name of the source whose write key is `key`.
    fn name_of(store: &dyn Store, key: &str) -> Result<Option<String>, StoreError> {
        if UNREADABLE.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("the server is gone".into()));
        }
        Ok(store.source_by_write_key(&tandem_core::WriteKey::new(key))?.map(|source| source.name))
    }

    #[tokio::test]
    async fn a_value_read_before_is_served_while_storage_cannot_be_read_and_read_again_after() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(tandem_store::SqliteStore::open(dir.path()).unwrap());
        let web = store.create_source("web", tandem_core::SourceKind::Website).unwrap();
        let app = store.create_source("app", tandem_core::SourceKind::Website).unwrap();
        // Expired at once: every get reads storage unless it cannot.
        let cache = ReadThrough::new(store.clone(), "a source", Duration::ZERO);
        assert_eq!(cache.get(web.write_key.as_str(), name_of).await.unwrap().as_deref(), Some("web"));
        assert_eq!(cache.get("unknown", name_of).await.unwrap(), None, "a miss");

        UNREADABLE.store(true, Ordering::SeqCst);
        assert_eq!(
            cache.get(web.write_key.as_str(), name_of).await.unwrap().as_deref(),
            Some("web"),
            "served as read before"
        );
        let never_read = cache.get(app.write_key.as_str(), name_of).await.unwrap_err();
        assert_eq!(never_read.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);

        UNREADABLE.store(false, Ordering::SeqCst);
        store.delete_source("web").unwrap();
        // Served without asking for RETRY_UNREADABLE, then read again.
        assert_eq!(cache.get(web.write_key.as_str(), name_of).await.unwrap().as_deref(), Some("web"));
        tokio::time::sleep(RETRY_UNREADABLE).await;
        assert_eq!(cache.get(web.write_key.as_str(), name_of).await.unwrap(), None, "deleted, once storage answers");
        assert_eq!(cache.get(app.write_key.as_str(), name_of).await.unwrap().as_deref(), Some("app"));
    }
}
