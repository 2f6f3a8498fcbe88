//! PII at the edges of the server: red values are hashed out of every batch
//! before the log writer stores it (events, quarantined messages and
//! plan-violation samples alike, so no table ever holds one in clear), and
//! yellow values are masked in the answers given to roles without the
//! `pii:read` permission. Keys seen on the way are noted for the PII
//! inventory (`GET /api/v1/pii/inventory`).
//!
//! The rules in force are the ones users set at run time (`tandem pii set`,
//! `/api/v1/pii/rules`, kept in the store) in front of the configured ones
//! (`[pii]` in `tandem.toml`). [`PiiDirectory`] keeps them compiled and reads
//! the stored ones again every [`PII_RULES_TTL`], without ever making a
//! request wait for storage: a rule set through this server's API applies
//! at once, one set by another process (the CLI) within the TTL. The rules
//! themselves are `tandem_core::govern::pii`.

use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiQuery};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tandem_core::govern::pii::{default_classes, PiiMatcher, PiiRule, PiiSettingsError};
use tandem_core::govern::{PiiClass, PiiPolicy, PiiSettings};
use tandem_core::SourceId;
use tandem_store::{IngestBatch, Store, StoreError, StoredPiiRule};

/// How long the compiled rules are used before the stored ones are read again.
pub const PII_RULES_TTL: Duration = Duration::from_secs(10);

/// The PII rules in force, compiled: the stored rules in front of the
/// configured settings, read again in the background once older than
/// [`PII_RULES_TTL`].
pub struct PiiDirectory {
    store: Arc<dyn Store>,
    settings: PiiSettings,
    current: RwLock<(Arc<PiiPolicy>, Option<Instant>)>,
    refreshing: AtomicBool,
}

impl PiiDirectory {
    /// Validates the configured settings, then reads the stored rules once
    /// (on a thread of its own: a backend's synchronous client must not run
    /// on the async runtime), so the first event already meets them. A
    /// store that cannot be read now is read again on first use.
    pub fn new(store: Arc<dyn Store>, settings: PiiSettings) -> Result<PiiDirectory, PiiSettingsError> {
        let configured = Arc::new(settings.compile()?);
        let directory = PiiDirectory {
            store,
            settings,
            current: RwLock::new((configured, None)),
            refreshing: AtomicBool::new(false),
        };
        let loaded = std::thread::scope(|scope| scope.spawn(|| directory.reload()).join());
        if let Ok(Err(error)) = loaded {
            tracing::warn!(%error, "reading the stored pii rules failed; the configured ones apply until it works");
        }
        Ok(directory)
    }

    /// The configured settings (the salt, the configured rules, the default policy).
    pub fn settings(&self) -> &PiiSettings {
        &self.settings
    }

    /// The rules in force. Never waits for storage: once they are older
    /// than [`PII_RULES_TTL`] they are read again in the background (or
    /// here, outside an async runtime) and this call answers with what it had.
    pub fn current(self: &Arc<Self>) -> Arc<PiiPolicy> {
        let (policy, read_at) = self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let stale = read_at.is_none_or(|at| at.elapsed() >= PII_RULES_TTL);
        if stale && !self.refreshing.swap(true, Ordering::AcqRel) {
            let directory = self.clone();
            let refresh = move || {
                if let Err(error) = directory.reload() {
                    tracing::warn!(%error, "reading the stored pii rules failed; the rules read before stay in force");
                }
                directory.refreshing.store(false, Ordering::Release);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(refresh)),
                Err(_) => refresh(),
            }
        }
        policy
    }

    /// Reads the stored rules and puts them in force now (blocking).
    pub fn reload(&self) -> Result<Arc<PiiPolicy>, StoreError> {
        let policy = Arc::new(policy_in_force(self.store.as_ref(), &self.settings)?);
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = (policy.clone(), Some(Instant::now()));
        Ok(policy)
    }
}

/// The rules in force for `store`: its stored rules in front of `settings`.
/// Stored rules are validated before they are stored; one that no longer
/// compiles (a newer build stored it) is left out rather than stopping
/// ingestion.
pub fn policy_in_force(store: &dyn Store, settings: &PiiSettings) -> Result<PiiPolicy, StoreError> {
    let stored: Vec<PiiRule> = store
        .pii_rules()?
        .into_iter()
        .filter_map(|stored| match stored.rule.validated() {
            Ok(rule) => Some(rule),
            Err(error) => {
                tracing::error!(%error, "a stored pii rule is not usable and is left out");
                None
            }
        })
        .collect();
    Ok(settings.layered(&stored).compile().unwrap_or_else(|error| {
        // The configured settings were validated at start, and every
        // stored rule just now; keep the configured ones if that ever fails.
        tracing::error!(%error, "the pii rules do not compile; the configured ones apply");
        settings.compile().unwrap_or_default()
    }))
}

/// Hashes the red values of every event, quarantined message and
/// plan-violation sample in `batch`.
pub fn scrub_batch(policy: &PiiPolicy, batch: &mut IngestBatch) {
    scrub_batch_noting_keys(policy, batch, &mut Vec::new());
}

/// [`scrub_batch`], also adding to `keys` every trait and property key of
/// the batch's events: key, source, class and the event's receipt time.
pub fn scrub_batch_noting_keys(
    policy: &PiiPolicy,
    batch: &mut IngestBatch,
    keys: &mut Vec<(String, SourceId, PiiClass, i64)>,
) {
    // Keys are gathered per run of records from one source (a request's
    // records share theirs), so a key repeated by every event of a batch
    // is noted once.
    /// Each key of a run: its highest class, and its last receipt time.
    type Run = (SourceId, HashMap<String, (PiiClass, i64)>);
    let mut run: Option<Run> = None;
    let mut note_run = |run: Option<Run>| {
        if let Some((source_id, seen)) = run {
            keys.extend(seen.into_iter().map(|(key, (class, at))| (key, source_id.clone(), class, at)));
        }
    };
    for record in &mut batch.records {
        if run.as_ref().is_none_or(|(source_id, _)| *source_id != record.source_id) {
            note_run(run.replace((record.source_id.clone(), HashMap::new())));
        }
        let seen = &mut run.as_mut().expect("a run was just started").1;
        let at = record.received_at_ms;
        let scrubbed = policy.inspect_payload(&record.payload, &mut |key, class| match seen.get_mut(key) {
            Some(noted) => *noted = (noted.0.max(class), noted.1.max(at)),
            None => {
                seen.insert(key.to_owned(), (class, at));
            }
        });
        if let Some(scrubbed) = scrubbed {
            record.payload = scrubbed;
        }
    }
    note_run(run);
    // Quarantined text need not be a Segment message (a webhook delivery,
    // an unreadable body): red values are hashed wherever they sit.
    for rejected in &mut batch.rejected {
        if let Some(scrubbed) = policy.scrub_anywhere(&rejected.payload) {
            rejected.payload = scrubbed;
        }
    }
    for violation in &mut batch.violations {
        if let Some(scrubbed) = policy.scrub_anywhere(&violation.sample) {
            violation.sample = scrubbed;
        }
    }
}

/// `body` as `caller` may see it: unchanged with `pii:read`, masked otherwise.
pub fn shown_to(caller: &AdminToken, policy: &PiiPolicy, body: Value) -> Value {
    if caller.sees_pii() {
        body
    } else {
        policy.mask_json(&body)
    }
}

/// `GET /api/v1/pii/inventory`; `/api/v1/pii/rules` (`GET` lists the rules
/// in force, `POST` sets one, `DELETE ?name=|?pattern=` removes one).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/pii/inventory", get(inventory))
        .route("/api/v1/pii/rules", get(list_rules).post(set_rule).delete(remove_rule))
}

/// `GET /api/v1/pii/inventory`: every trait and property key seen, with its
/// class (the higher of the one it was seen with and the one the current
/// rules give its name), the sources that sent it and when it was last seen.
async fn inventory(State(state): State<AppState>, _token: AdminToken) -> Result<Json<Value>, ApiError> {
    let policy = state.pii.current();
    let keys = crate::profile::read(&state, move |store| inventory_json(store, &policy)).await?;
    Ok(Json(json!({ "keys": keys })))
}

/// The inventory as the API and the CLI show it: sources by name.
pub fn inventory_json(store: &dyn Store, policy: &PiiPolicy) -> Result<Vec<Value>, StoreError> {
    let names: std::collections::HashMap<String, String> =
        store.list_sources()?.into_iter().map(|source| (source.id.to_string(), source.name)).collect();
    Ok(store
        .pii_inventory()?
        .into_iter()
        .map(|record| {
            let class = record.class.max(policy.classify_key(&record.key));
            let sources: Vec<&str> =
                record.sources.iter().map(|id| names.get(id.as_str()).map_or(id.as_str(), String::as_str)).collect();
            json!({
                "key": record.key,
                "class": class.as_str(),
                "sources": sources,
                "last_seen": crate::profile::format_ms(record.last_seen_ms),
            })
        })
        .collect())
}

/// How the audit log and messages name a rule: `name:tax_id`, `pattern:^b_`.
pub fn rule_target(matcher: &PiiMatcher) -> String {
    format!("{}:{}", matcher.kind(), matcher.text())
}

/// A rule as the API and the CLI show it; `origin` is `stored` (set by a
/// user) or `config` (`tandem.toml`).
pub fn rule_json(rule: &PiiRule, origin: &str, stored: Option<&StoredPiiRule>) -> Value {
    let mut shown = serde_json::to_value(rule).unwrap_or_default();
    shown["origin"] = json!(origin);
    if let Some(stored) = stored {
        shown["created_at"] = json!(crate::profile::format_ms(stored.created_at_ms));
        shown["updated_at"] = json!(crate::profile::format_ms(stored.updated_at_ms));
    }
    shown
}

/// Every rule in force, in the order they decide, with the default policy
/// and the built-in classes: what `GET /api/v1/pii/rules` and `tandem pii
/// list --json` show.
pub fn rules_json(store: &dyn Store, settings: &PiiSettings) -> Result<Value, StoreError> {
    let mut rules: Vec<Value> =
        store.pii_rules()?.iter().map(|stored| rule_json(&stored.rule, "stored", Some(stored))).collect();
    rules.extend(settings.rules.iter().map(|rule| rule_json(rule, "config", None)));
    let defaults: Vec<Value> =
        default_classes().map(|(key, class)| json!({"name": key, "class": class.as_str()})).collect();
    Ok(json!({
        "rules": rules,
        "red_policy": settings.red_policy.as_str(),
        "defaults": defaults,
    }))
}

/// Setting or removing a stored rule went wrong.
#[derive(Debug, thiserror::Error)]
pub enum PiiRuleError {
    #[error(transparent)]
    Invalid(#[from] PiiSettingsError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Validates `rule` and stores it (replacing the one with the same
/// matcher); the stored rule and the one it replaced. The one way a rule
/// is set, for the CLI and the API.
pub fn set_rule_in(store: &dyn Store, rule: &PiiRule) -> Result<(PiiRule, Option<StoredPiiRule>), PiiRuleError> {
    let rule = rule.validated()?;
    let replaced = store.set_pii_rule(&rule, chrono::Utc::now().timestamp_millis())?;
    Ok((rule, replaced))
}

fn rule_error(error: PiiRuleError) -> ApiError {
    match error {
        PiiRuleError::Invalid(invalid) => {
            let field = match invalid {
                PiiSettingsError::PolicyNeedsRed => "policy",
                PiiSettingsError::BadPattern { .. } => "pattern",
                PiiSettingsError::NameOrPattern | PiiSettingsError::EmptyMatcher => "name",
            };
            ApiError::new(ErrorCode::InvalidPiiRule, invalid.to_string()).with_field(field)
        }
        PiiRuleError::Store(error) => storage_error(error),
    }
}

fn storage_error(error: StoreError) -> ApiError {
    tracing::error!(%error, "pii rule storage failed");
    ApiError::new(ErrorCode::Unavailable, "pii rules cannot be read or written right now, retry later")
}

async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&dyn Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || work(store.as_ref()))
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
}

/// `GET /api/v1/pii/rules`.
async fn list_rules(State(state): State<AppState>, _token: AdminToken) -> Result<Json<Value>, ApiError> {
    let directory = state.pii.clone();
    let shown = blocking(&state, move |store| rules_json(store, directory.settings()).map_err(storage_error)).await?;
    Ok(Json(shown))
}

/// `POST /api/v1/pii/rules` with `{"name"|"pattern", "class", "policy"?}`:
/// `201` with the rule when it is new, `200` when it replaced one; in force
/// on this server at once.
async fn set_rule(
    State(state): State<AppState>,
    token: AdminToken,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let rule: PiiRule = serde_json::from_slice(&body).map_err(|error| {
        if error.is_syntax() || error.is_eof() {
            ApiError::new(ErrorCode::InvalidJson, format!("the body is not JSON: {error}"))
        } else {
            ApiError::new(ErrorCode::InvalidPiiRule, format!("the body is not a pii rule: {error}"))
        }
    })?;
    let directory = state.pii.clone();
    let (rule, replaced) = blocking(&state, move |store| {
        let set = set_rule_in(store, &rule).map_err(rule_error)?;
        directory.reload().map_err(storage_error)?;
        Ok(set)
    })
    .await?;
    let target = rule.matcher().map(|matcher| rule_target(&matcher)).unwrap_or_default();
    let shown = rule_json(&rule, "stored", None);
    let before = replaced.as_ref().map(|stored| rule_json(&stored.rule, "stored", Some(stored)));
    let status = if replaced.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    crate::audit::record(&state, &token, "pii.rule_set", &target, before, Some(shown.clone())).await;
    Ok((status, Json(shown)))
}

/// Which rule `DELETE /api/v1/pii/rules` removes: one of the two.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RuleSelector {
    /// The exact key of a rule set by name.
    pub name: Option<String>,
    /// The regular expression of a rule set by pattern, as written.
    pub pattern: Option<String>,
}

/// `DELETE /api/v1/pii/rules?name=…` or `?pattern=…`: `204`; `404` when no
/// stored rule has that matcher (configured rules live in `tandem.toml`).
async fn remove_rule(
    State(state): State<AppState>,
    token: AdminToken,
    ApiQuery(selector): ApiQuery<RuleSelector>,
) -> Result<StatusCode, ApiError> {
    let matcher = PiiMatcher::from_parts(selector.name.as_deref(), selector.pattern.as_deref())
        .map_err(|error| rule_error(error.into()))?;
    let directory = state.pii.clone();
    let wanted = matcher.clone();
    let removed = blocking(&state, move |store| {
        let removed = store.remove_pii_rule(&wanted).map_err(storage_error)?;
        directory.reload().map_err(storage_error)?;
        Ok(removed)
    })
    .await?;
    let target = rule_target(&matcher);
    let Some(removed) = removed else {
        return Err(ApiError::new(ErrorCode::PiiRuleNotFound, format!("no stored pii rule matches {target}"))
            .with_field(matcher.kind()));
    };
    let before = rule_json(&removed.rule, "stored", Some(&removed));
    crate::audit::record(&state, &token, "pii.rule_remove", &target, Some(before), None).await;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::event::{EventType, LogRecord};
    use tandem_core::MessageId;

    fn record(source: &str, at: i64, payload: &str) -> LogRecord {
        LogRecord {
            source_id: SourceId::new(source),
            message_id: MessageId::new(format!("m-{at}")),
            event_type: EventType::Identify,
            received_at_ms: at,
            timestamp_ms: at,
            payload: payload.to_owned(),
        }
    }

    #[test]
    fn a_batch_notes_each_key_once_per_source_with_its_highest_class_and_last_time() {
        let mut batch = IngestBatch {
            records: vec![
                record("web", 1, r#"{"traits":{"plan":"pro","memo":"hello"}}"#),
                record("web", 3, r#"{"traits":{"plan":"free","memo":"4111111111111111"}}"#),
                record("web", 2, r#"{"traits":{"plan":"pro"}}"#),
                record("app", 5, r#"{"traits":{"plan":"pro"}}"#),
                record("web", 4, r#"{"traits":{"plan":"pro"}}"#),
            ],
            ..Default::default()
        };
        let mut keys = Vec::new();
        scrub_batch_noting_keys(&PiiPolicy::default(), &mut batch, &mut keys);
        keys.sort();
        let web = SourceId::new("web");
        let app = SourceId::new("app");
        assert_eq!(
            keys,
            [
                ("memo".to_owned(), web.clone(), PiiClass::Red, 3),
                ("plan".to_owned(), app, PiiClass::Green, 5),
                ("plan".to_owned(), web.clone(), PiiClass::Green, 3),
                ("plan".to_owned(), web, PiiClass::Green, 4),
            ]
        );
        assert!(!batch.records[1].payload.contains("4111"), "the card number is hashed");
    }
}
