//! The tracking-plan API: `/api/v1/plans` lists every source's plan;
//! `/api/v1/plans/{source}` shows (with its violations), sets (`PUT` with the
//! plan document, validated and compiled before it is stored: `422
//! invalid_plan` naming the schema at fault) and deletes one;
//! `/api/v1/plans/{source}/violations` lists violations alone. Every
//! endpoint needs an admin token; applying plans is [`crate::govern`]'s.

use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiPath, ApiQuery};
use crate::govern::{self, PlanSetError};
use crate::profile::format_ms;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tandem_store::{PlanViolationSummary, Store, StoreError, StoredPlan};

/// The plan routes, for [`crate::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/plans", get(list_plans))
        .route("/api/v1/plans/{source}", get(show_plan).put(put_plan).delete(delete_plan))
        .route("/api/v1/plans/{source}/violations", get(list_violations))
}

/// Violations listed unless `limit` says otherwise, and at most.
const DEFAULT_VIOLATIONS: usize = 100;
const MAX_VIOLATIONS: usize = 1_000;

fn store_error(error: StoreError) -> ApiError {
    match error {
        StoreError::SourceNotFound(name) => {
            ApiError::new(ErrorCode::SourceNotFound, format!("no source named {name:?}")).with_field("source")
        }
        error => {
            tracing::error!(%error, "tracking-plan storage failed");
            ApiError::new(ErrorCode::Unavailable, "tracking plans cannot be read or written right now, retry later")
        }
    }
}

fn set_error(error: PlanSetError) -> ApiError {
    match error {
        PlanSetError::Invalid(invalid) => {
            let code = match invalid {
                tandem_core::govern::plan::PlanError::InvalidJson(_) => ErrorCode::InvalidJson,
                _ => ErrorCode::InvalidPlan,
            };
            let field = invalid.field().map(str::to_owned);
            let error = ApiError::new(code, invalid.to_string());
            match field {
                Some(field) => error.with_field(field),
                None => error,
            }
        }
        PlanSetError::Store(error) => store_error(error),
    }
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

/// A plan as the API and the CLI show it.
pub fn plan_json(source_name: &str, stored: &StoredPlan) -> Value {
    json!({
        "source": source_name,
        "source_id": stored.source_id,
        "plan": stored.plan,
        "updated_at": format_ms(stored.updated_at_ms),
    })
}

/// Violations as the API and the CLI show them; the sample is parsed back
/// to JSON when it is JSON.
pub fn violations_json(violations: &[PlanViolationSummary]) -> Vec<Value> {
    violations
        .iter()
        .map(|violation| {
            json!({
                "kind": violation.kind,
                "event": violation.event_name,
                "path": violation.path,
                "count": violation.count,
                "first_seen": format_ms(violation.first_seen_ms),
                "last_seen": format_ms(violation.last_seen_ms),
                "message": violation.message,
                "sample": serde_json::from_str::<Value>(&violation.sample)
                    .unwrap_or_else(|_| Value::String(violation.sample.clone())),
            })
        })
        .collect()
}

/// Violations as `token` may see them: their samples and messages are
/// events as sent, so a role without `pii:read` (an auditor) sees them
/// masked, and a read in clear is audited.
async fn shown_violations(
    state: &AppState,
    token: &AdminToken,
    source: &str,
    violations: &[PlanViolationSummary],
) -> Vec<Value> {
    let listed = violations_json(violations);
    if token.sees_pii() && !listed.is_empty() {
        let read = Some(json!({ "violations": listed.len() }));
        crate::audit::record(state, token, "plan.read_violations", source, None, read).await;
    }
    if token.sees_pii() {
        return listed;
    }
    let policy = state.pii.current();
    listed
        .into_iter()
        .map(|violation| {
            let mut shown = policy.mask_json(&violation);
            // A schema error quotes the value at fault: masked with it.
            let key = violation["path"].as_str().and_then(|path| path.rsplit('/').next()).unwrap_or("");
            if policy.classify_key(key) != tandem_core::govern::PiiClass::Green {
                shown["message"] = json!("***");
            }
            shown
        })
        .collect()
}

/// `GET /api/v1/plans`: every source's plan.
async fn list_plans(State(state): State<AppState>, _token: AdminToken) -> Result<Json<Value>, ApiError> {
    let plans = blocking(&state, |store| {
        let sources = store.list_sources().map_err(store_error)?;
        let plans = store.plans().map_err(store_error)?;
        Ok(plans
            .iter()
            .map(|stored| {
                let name = sources.iter().find(|source| source.id == stored.source_id).map_or("", |s| &s.name);
                plan_json(name, stored)
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(json!({ "plans": plans })))
}

/// The query of the routes that list a plan's violations.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ViolationQuery {
    /// Violations listed (1 to 1000; 100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

fn violation_limit(query: &ViolationQuery) -> Result<usize, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_VIOLATIONS);
    if limit == 0 || limit > MAX_VIOLATIONS {
        return Err(ApiError::new(ErrorCode::InvalidValue, format!("limit must be between 1 and {MAX_VIOLATIONS}"))
            .with_field("limit"));
    }
    Ok(limit)
}

/// `GET /api/v1/plans/{source}`: the plan and its most recent violations.
async fn show_plan(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(source): ApiPath<String>,
    ApiQuery(query): ApiQuery<ViolationQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = violation_limit(&query)?;
    let (source, plan, violations) =
        blocking(&state, move |store| govern::plan_report(store, &source, limit).map_err(store_error)).await?;
    let Some(plan) = plan else {
        return Err(ApiError::new(ErrorCode::PlanNotFound, format!("source {:?} has no tracking plan", source.name))
            .with_field("source"));
    };
    let mut body = plan_json(&source.name, &plan);
    body["violations"] = Value::Array(shown_violations(&state, &token, &source.name, &violations).await);
    Ok(Json(body))
}

/// `PUT /api/v1/plans/{source}` with a plan document: the stored plan.
async fn put_plan(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(source): ApiPath<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let document = std::str::from_utf8(&body)
        .map_err(|_| ApiError::new(ErrorCode::InvalidJson, "the body is not UTF-8 text"))?
        .to_owned();
    let name = source.clone();
    let stored = blocking(&state, move |store| govern::set_plan(store, &name, &document).map_err(set_error)).await?;
    state.plans.forget(&stored.source_id);
    let shown = plan_json(&source, &stored);
    crate::audit::record(&state, &token, "plan.set", &source, None, Some(shown.clone())).await;
    Ok(Json(shown))
}

/// `DELETE /api/v1/plans/{source}`: `204`; `404` when it had none.
async fn delete_plan(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(source): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let name = source.clone();
    let (deleted, source_id) = blocking(&state, move |store| {
        let id = store.source_by_name(&name).map_err(store_error)?.id;
        Ok((govern::delete_plan(store, &name).map_err(store_error)?, id))
    })
    .await?;
    state.plans.forget(&source_id);
    if !deleted {
        return Err(ApiError::new(ErrorCode::PlanNotFound, format!("source {source:?} has no tracking plan"))
            .with_field("source"));
    }
    crate::audit::record(&state, &token, "plan.delete", &source, None, None).await;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/plans/{source}/violations`: most recently seen first.
async fn list_violations(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(source): ApiPath<String>,
    ApiQuery(query): ApiQuery<ViolationQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = violation_limit(&query)?;
    let (source, _, violations) =
        blocking(&state, move |store| govern::plan_report(store, &source, limit).map_err(store_error)).await?;
    let shown = shown_violations(&state, &token, &source.name, &violations).await;
    Ok(Json(json!({"source": source.name, "violations": shown})))
}
