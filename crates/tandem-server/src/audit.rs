//! The audit log as the API writes and serves it. Every administrative
//! change a handler makes, and every read of PII in clear, is recorded with
//! one call, [`record`]: who (the token's id and role), what (an action and
//! its target), and the state before and after, with PII and secret values
//! replaced by digests. `GET /api/v1/audit` lists entries with filters;
//! `GET /api/v1/audit/verify` checks the hash chain.

use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiQuery};
use crate::profile::format_ms;
use crate::AppState;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tandem_core::govern::audit::{is_secret_key, redact, AuditDraft, AuditEntry};
use tandem_store::{AuditFilter, Store};

pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/audit", get(list_entries)).route("/api/v1/audit/verify", get(verify_chain))
}

/// Keys whose values never enter the audit log in clear: secrets, and the
/// trait and property names PII lives under. A bare `name` is left out: it
/// names audiences and destinations, whose names the log must show.
pub fn is_sensitive_key(key: &str) -> bool {
    const PII_KEYS: &[&str] = &[
        "email",
        "phone",
        "ip",
        "full_name",
        "first_name",
        "last_name",
        "firstname",
        "lastname",
        "address",
        "street",
        "city",
        "postal_code",
        "ssn",
        "national_id",
        "passport",
        "card_number",
        "credit_card",
    ];
    let lower = key.to_ascii_lowercase();
    is_secret_key(&lower) || PII_KEYS.contains(&lower.as_str())
}

/// The draft of an entry, its `before` and `after` redacted.
pub fn draft(
    actor: &str,
    role: &str,
    action: &str,
    target: &str,
    before: Option<Value>,
    after: Option<Value>,
) -> AuditDraft {
    AuditDraft {
        actor: actor.to_owned(),
        role: role.to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        before: before.map(|value| redact(&value, &is_sensitive_key)),
        after: after.map(|value| redact(&value, &is_sensitive_key)),
        at_ms: chrono::Utc::now().timestamp_millis(),
    }
}

/// Records that `caller` did `action` to `target`. A failure to record is
/// logged, not returned: the change it describes has already been made.
pub async fn record(
    state: &AppState,
    caller: &AdminToken,
    action: &str,
    target: &str,
    before: Option<Value>,
    after: Option<Value>,
) {
    let draft = draft(&caller.0.id, caller.role().as_str(), action, target, before, after);
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.append_audit(draft)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::error!(%error, action, target, "recording an audit entry failed"),
        Err(error) => tracing::error!(%error, action, target, "recording an audit entry panicked"),
    }
}

/// An entry as the API and the CLI show it.
pub fn entry_json(entry: &AuditEntry) -> Value {
    json!({
        "seq": entry.seq,
        "at": format_ms(entry.at_ms),
        "actor": entry.actor,
        "role": entry.role,
        "action": entry.action,
        "target": entry.target,
        "before": entry.before,
        "after": entry.after,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    })
}

/// Entries per page unless `limit` says otherwise, and at most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1_000;

/// The filters of `GET /api/v1/audit`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only entries by this actor: a token id, or `cli`.
    actor: Option<String>,
    /// Only this action (`audience.create`) or area (`audience`).
    action: Option<String>,
    /// Only entries since this RFC 3339 time.
    since: Option<String>,
    /// A `next_after` from the previous page.
    after: Option<i64>,
    /// Entries per page (1 to 1000; 100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

async fn list_entries(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::new(ErrorCode::InvalidValue, format!("limit must be between 1 and {MAX_PAGE}"))
            .with_field("limit"));
    }
    let since_ms = match query.since.as_deref() {
        Some(text) => Some(
            chrono::DateTime::parse_from_rfc3339(text.trim())
                .map_err(|_| {
                    ApiError::new(ErrorCode::InvalidValue, "since must be an RFC 3339 time").with_field("since")
                })?
                .timestamp_millis(),
        ),
        None => None,
    };
    let filter = AuditFilter {
        actor: query.actor.filter(|actor| !actor.trim().is_empty()),
        action: query.action.filter(|action| !action.trim().is_empty()),
        since_ms,
        after_seq: query.after.unwrap_or(0).max(0),
        limit,
        ..AuditFilter::default()
    };
    let entries = crate::profile::read(&state, move |store| store.audit_entries(&filter)).await?;
    let next_after = (entries.len() == limit).then(|| entries.last().map(|entry| entry.seq)).flatten();
    Ok(Json(json!({"entries": entries.iter().map(entry_json).collect::<Vec<_>>(), "next_after": next_after})))
}

async fn verify_chain(State(state): State<AppState>, _token: AdminToken) -> Result<Json<Value>, ApiError> {
    let outcome = crate::profile::read(&state, |store: &dyn Store| store.verify_audit()).await?;
    Ok(Json(match outcome {
        Ok(entries) => json!({"intact": true, "entries": entries}),
        Err(broken) => json!({"intact": false, "broken_at": broken.seq, "reason": broken.reason}),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_carry_no_pii_or_secrets_in_clear() {
        let made = draft(
            "tok_1",
            "admin",
            "destination.create",
            "hook",
            None,
            Some(
                json!({"name": "hook", "settings": {"url": "https://x", "api_key": "k-secret"}, "traits": {"Email": "a@b.c", "plan": "pro"}}),
            ),
        );
        let text = made.after.as_ref().unwrap().to_string();
        assert!(!text.contains("k-secret") && !text.contains("a@b.c"), "{text}");
        assert!(text.contains("https://x") && text.contains("pro"), "{text}");
    }
}
