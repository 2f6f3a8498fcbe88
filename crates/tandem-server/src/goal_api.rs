//! The goal API: goals listed with where each stands, created from their
//! settings, shown with a trend (one point per day of the period so far),
//! and deleted. Settings of the wrong shape are `400` (`missing_field`,
//! `invalid_type`) and settings that make no goal `422 invalid_goal`, both
//! naming the field (`metric.within`). The figures come from the insight
//! stage ([`crate::insight`]); nothing here reads the event log.

use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiPath};
use crate::insight::goals::{self, GoalDefineError};
use crate::profile::read;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tandem_core::insight::goals::{GoalError, GoalSettings};
use tandem_store::StoreError;

/// The goal routes, for [`crate::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/goals", get(list_goals).post(create_goal))
        .route("/api/v1/goals/{name}", get(show_goal).delete(delete_goal))
}

/// Settings refused, as the API answers them.
pub fn invalid(error: GoalError) -> ApiError {
    let code = match error.message.as_str() {
        "is required" => ErrorCode::MissingField,
        _ if error.malformed => ErrorCode::InvalidType,
        _ => ErrorCode::InvalidGoal,
    };
    ApiError::new(code, error.to_string()).with_field(error.field)
}

/// A definition refused or failed, as the API answers it.
pub fn define_error(error: GoalDefineError) -> ApiError {
    match error {
        GoalDefineError::Invalid(error) => invalid(error),
        GoalDefineError::UnknownAudience(_) => {
            ApiError::new(ErrorCode::InvalidGoal, error.to_string()).with_field("metric.audience")
        }
        GoalDefineError::Store(StoreError::GoalExists(name)) => {
            ApiError::new(ErrorCode::GoalExists, format!("a goal named {name:?} already exists")).with_field("name")
        }
        GoalDefineError::Store(StoreError::GoalNotFound(name)) => not_found(&name),
        GoalDefineError::Store(error) => {
            tracing::error!(%error, "goal storage failed");
            ApiError::new(ErrorCode::Unavailable, "goals cannot be read or written right now, retry later")
        }
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(ErrorCode::GoalNotFound, format!("no goal named {name:?}")).with_field("name")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `GET /api/v1/goals`: every goal with its value, progress and status, by name.
async fn list_goals(State(state): State<AppState>, _token: AdminToken) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let evaluated = read(&state, move |store| goals::evaluate_goals(store, now)).await?;
    let shown: Vec<Value> = evaluated.iter().map(|goal| goals::goal_json(goal, false)).collect();
    Ok(Json(json!({ "goals": shown })))
}

/// `POST /api/v1/goals` with the settings: `201` with the goal.
async fn create_goal(
    State(state): State<AppState>,
    token: AdminToken,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body: Value = serde_json::from_slice(&body)
        .map_err(|error| ApiError::new(ErrorCode::InvalidJson, format!("the body is not JSON: {error}")))?;
    let settings = GoalSettings::from_json(&body).map_err(invalid)?;
    let now = now_ms();
    let store = state.store.clone();
    let evaluated = tokio::task::spawn_blocking(move || {
        let record = goals::create_goal(store.as_ref(), &settings, now)?;
        goals::evaluate_goal(store.as_ref(), &record.settings.name, now)?
            .ok_or(GoalDefineError::Store(StoreError::GoalNotFound(record.settings.name)))
    })
    .await
    .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
    .map_err(define_error)?;
    let shown = goals::goal_json(&evaluated, true);
    let settings = serde_json::to_value(&evaluated.record.settings).unwrap_or_default();
    crate::audit::record(&state, &token, "goal.create", &evaluated.record.settings.name, None, Some(settings)).await;
    Ok((StatusCode::CREATED, Json(shown)))
}

/// `GET /api/v1/goals/{name}`: the goal with its trend.
async fn show_goal(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let wanted = name.clone();
    let evaluated = read(&state, move |store| goals::evaluate_goal(store, &wanted, now)).await?;
    let evaluated = evaluated.ok_or_else(|| not_found(&name))?;
    Ok(Json(goals::goal_json(&evaluated, true)))
}

/// `DELETE /api/v1/goals/{name}`: `204`.
async fn delete_goal(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let wanted = name.clone();
    let store = state.store.clone();
    let before = tokio::task::spawn_blocking(move || {
        let before = store.goal(&wanted)?.map(|record| serde_json::to_value(&record.settings).unwrap_or_default());
        store.delete_goal(&wanted)?;
        Ok::<_, StoreError>(before)
    })
    .await
    .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
    .map_err(|error| define_error(GoalDefineError::Store(error)))?;
    crate::audit::record(&state, &token, "goal.delete", &name, before, None).await;
    Ok(StatusCode::NO_CONTENT)
}
