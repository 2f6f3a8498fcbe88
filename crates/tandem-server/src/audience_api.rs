//! The audience API: audiences listed with their size, created from a rule
//! in either form (the JSON tree, or `{"text": "…"}` in the text syntax),
//! previewed without saving, shown, paged through by member, and deleted.
//! A rule that does not parse or validate is `422 invalid_rule` with where
//! and what was expected in `details`. Every endpoint needs an admin token;
//! the work itself is the audience stage's ([`crate::audience`]).

use crate::audience::{self, DefineError};
use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiPath, ApiQuery};
use crate::profile::{format_ms, read};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tandem_core::audience::text::ParseErrorKind;
use tandem_core::audience::{Condition, ParseError, RuleJsonError};
use tandem_core::ProfileId;
use tandem_store::{AudienceRecord, Backfill, StoreError};

/// The audience routes, for [`crate::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/audiences", get(list_audiences).post(create_audience))
        .route("/api/v1/audiences/preview", post(preview_audience))
        .route("/api/v1/audiences/{name}", get(show_audience).delete(delete_audience))
        .route("/api/v1/audiences/{name}/members", get(audience_members))
}

/// Members per page unless `limit` says otherwise, and at most.
const DEFAULT_MEMBER_PAGE: usize = 100;
const MAX_MEMBER_PAGE: usize = 1_000;
/// Members a preview shows.
const PREVIEW_SAMPLE: usize = 20;

/// A rule as a request gives it: the JSON tree, or `{"text": "…"}`.
pub fn parse_rule(rule: &Value) -> Result<Condition, ApiError> {
    if let Some(text) = rule.as_object().filter(|object| object.len() == 1).and_then(|object| object.get("text")) {
        let text = text.as_str().ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidRule, "rule.text must be a string").with_field("rule.text")
        })?;
        return Condition::parse(text).map_err(parse_error);
    }
    Condition::from_json(&rule.to_string()).map_err(|error| match error {
        RuleJsonError::Malformed { message, .. } => {
            ApiError::new(ErrorCode::InvalidRule, format!("rule is not a rule tree: {message}")).with_field("rule")
        }
        RuleJsonError::Invalid(invalid) => {
            let field = if invalid.at.is_empty() { "rule".to_owned() } else { format!("rule.{}", invalid.at) };
            ApiError::new(ErrorCode::InvalidRule, invalid.problem.to_string())
                .with_field(field)
                .with_extra("details", json!({"at": invalid.at}))
        }
    })
}

fn parse_error(error: ParseError) -> ApiError {
    let (expected, found) = match &error.kind {
        ParseErrorKind::Expected { expected, found } => (Some(*expected), Some(found.clone())),
        ParseErrorKind::Invalid(_) => (None, None),
    };
    ApiError::new(ErrorCode::InvalidRule, error.to_string()).with_field("rule.text").with_extra(
        "details",
        json!({
            "line": error.line,
            "column": error.column,
            "offset": error.offset,
            "expected": expected,
            "found": found,
        }),
    )
}

/// A definition refused or failed, as the API answers it.
pub fn define_error(error: DefineError) -> ApiError {
    match error {
        DefineError::InvalidName | DefineError::InvalidComputedTraitName => {
            ApiError::new(ErrorCode::InvalidValue, error.to_string()).with_field("name")
        }
        DefineError::InvalidRule(invalid) => {
            ApiError::new(ErrorCode::InvalidRule, invalid.to_string()).with_field("rule")
        }
        DefineError::UnknownAudience(_) | DefineError::UnknownComputedTrait(_) => {
            ApiError::new(ErrorCode::InvalidRule, error.to_string()).with_field("rule")
        }
        DefineError::InUse { .. } => ApiError::new(ErrorCode::AudienceInUse, error.to_string()).with_field("name"),
        DefineError::ComputedTraitInUse { .. } => {
            ApiError::new(ErrorCode::ComputedTraitInUse, error.to_string()).with_field("name")
        }
        DefineError::Store(StoreError::AudienceExists(name)) => {
            ApiError::new(ErrorCode::AudienceExists, format!("an audience named {name:?} already exists"))
                .with_field("name")
        }
        DefineError::Store(StoreError::AudienceNotFound(name)) => not_found(&name),
        DefineError::Store(error) => {
            tracing::error!(%error, "audience storage failed");
            ApiError::new(ErrorCode::Unavailable, "audiences cannot be read or written right now, retry later")
        }
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(ErrorCode::AudienceNotFound, format!("no audience named {name:?}")).with_field("name")
}

fn body_json(body: &Bytes) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::new(ErrorCode::InvalidRequest, "the body must be a JSON object")),
        Err(error) => Err(ApiError::new(ErrorCode::InvalidJson, format!("the body is not JSON: {error}"))),
    }
}

fn rule_of(body: &serde_json::Map<String, Value>) -> Result<Condition, ApiError> {
    let rule = body
        .get("rule")
        .ok_or_else(|| ApiError::new(ErrorCode::MissingField, "rule is required").with_field("rule"))?;
    parse_rule(rule)
}

/// An audience as the API and the CLI show it: the rule in both forms.
pub fn audience_json(record: &AudienceRecord) -> Value {
    let definition = &record.definition;
    json!({
        "name": definition.name,
        "rule": definition.rule,
        "rule_text": definition.rule.to_string(),
        "size": record.size,
        "created_at": format_ms(definition.created_at_ms),
        "backfilled": record.backfill == Backfill::Done,
    })
}

/// An audience's size at the end of each UTC day that changed it, as the
/// API and the CLI show it: `[{"date": "2026-11-20", "size": 42}, …]`.
pub fn size_over_time_json(changes: &[tandem_store::DailyChanges]) -> Value {
    let days: Vec<Value> = tandem_store::size_over_time(changes)
        .iter()
        .map(|day| {
            let date = chrono::DateTime::from_timestamp_millis(day.day_start_ms)
                .map(|at| at.format("%Y-%m-%d").to_string())
                .unwrap_or_default();
            json!({"date": date, "size": day.size})
        })
        .collect();
    Value::Array(days)
}

async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&dyn tandem_store::Store) -> Result<T, DefineError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || work(store.as_ref()))
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
        .map_err(define_error)
}

/// `GET /api/v1/audiences`: every audience with its size, by name.
async fn list_audiences(State(state): State<AppState>, _token: AdminToken) -> Result<Json<Value>, ApiError> {
    let records = read(&state, |store| store.list_audiences()).await?;
    let audiences: Vec<Value> =
        records.iter().map(|record| json!({"name": record.definition.name, "size": record.size})).collect();
    Ok(Json(json!({ "audiences": audiences })))
}

/// `POST /api/v1/audiences` with `{"name", "rule"}`: `201` with the audience,
/// which the stage then backfills.
async fn create_audience(
    State(state): State<AppState>,
    token: AdminToken,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body_json(&body)?;
    let name = body
        .get("name")
        .ok_or_else(|| ApiError::new(ErrorCode::MissingField, "name is required").with_field("name"))?
        .as_str()
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidType, "name must be a string").with_field("name"))?
        .to_owned();
    let rule = rule_of(&body)?;
    let now = chrono::Utc::now();
    let record = blocking(&state, move |store| {
        audience::create_audience(store, &name, rule, now)?;
        store.audience(&name)?.ok_or(DefineError::Store(StoreError::AudienceNotFound(name)))
    })
    .await?;
    let shown = audience_json(&record);
    crate::audit::record(&state, &token, "audience.create", &record.definition.name, None, Some(shown.clone())).await;
    Ok((StatusCode::CREATED, Json(shown)))
}

/// `POST /api/v1/audiences/preview` with `{"rule"}`: how many profiles the
/// rule selects now and a sample of them; nothing is saved.
async fn preview_audience(
    State(state): State<AppState>,
    _token: AdminToken,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let rule = rule_of(&body_json(&body)?)?;
    let now = chrono::Utc::now();
    let text = rule.to_string();
    let preview = blocking(&state, move |store| audience::preview(store, &rule, now, PREVIEW_SAMPLE)).await?;
    Ok(Json(json!({
        "rule_text": text,
        "size": preview.size,
        "profiles_evaluated": preview.profiles_evaluated,
        "sample": preview.sample,
    })))
}

/// `GET /api/v1/audiences/{name}`: the definition in both forms, the size,
/// and the size at the end of each day that changed it.
async fn show_audience(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let wanted = name.clone();
    let (record, days) =
        read(&state, move |store| Ok((store.audience(&wanted)?, store.audience_changes_by_day(&wanted)?))).await?;
    let record = record.ok_or_else(|| not_found(&name))?;
    let mut body = audience_json(&record);
    body["size_over_time"] = size_over_time_json(&days);
    Ok(Json(body))
}

/// The query of `GET /api/v1/audiences/{name}/members`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct MembersQuery {
    /// Members per page (1 to 1000; 100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// A `next_after` from the previous page.
    after: Option<String>,
}

/// The body of `POST /api/v1/audiences`. The handler reads the fields
/// itself, to name a missing or mistyped one in its error; a test sends the
/// example below.
#[derive(utoipa::ToSchema)]
#[schema(example = json!({"name": "recent buyers", "rule": {"text": "performed \"Order Completed\" within 30d"}}))]
#[allow(dead_code)] // describes the body; the handler reads it field by field
pub(crate) struct NewAudience {
    /// Unique; letters, digits, spaces, `-`, `_` and `.`.
    pub name: String,
    /// The rule: its JSON form, or `{"text": "…"}` in the text syntax.
    pub rule: Value,
}

/// The body of `POST /api/v1/audiences/preview`: a rule as in [`NewAudience`].
#[derive(utoipa::ToSchema)]
#[schema(example = json!({"rule": {"text": "trait plan = \"pro\""}}))]
#[allow(dead_code)] // describes the body; the handler reads it field by field
pub(crate) struct AudiencePreview {
    /// The rule: its JSON form, or `{"text": "…"}` in the text syntax.
    pub rule: Value,
}

/// `GET /api/v1/audiences/{name}/members`: members by profile id, a page at
/// a time (`after` continues from `next_after`).
async fn audience_members(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<MembersQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_MEMBER_PAGE);
    if limit == 0 || limit > MAX_MEMBER_PAGE {
        return Err(ApiError::new(ErrorCode::InvalidValue, format!("limit must be between 1 and {MAX_MEMBER_PAGE}"))
            .with_field("limit"));
    }
    let after = match query.after.as_deref().map(str::parse::<ProfileId>).transpose() {
        Ok(after) => after,
        Err(error) => return Err(ApiError::new(ErrorCode::InvalidValue, error.to_string()).with_field("after")),
    };
    let wanted = name.clone();
    let members = read(&state, move |store| {
        if store.audience(&wanted)?.is_none() {
            return Ok(None);
        }
        store.audience_members(&wanted, after, limit).map(Some)
    })
    .await?
    .ok_or_else(|| not_found(&name))?;
    let next_after = (members.len() == limit).then(|| members.last().map(|member| member.profile)).flatten();
    let members: Vec<Value> = members
        .iter()
        .map(|member| json!({"profile": member.profile, "entered_at": format_ms(member.entered_at_ms)}))
        .collect();
    Ok(Json(json!({"audience": name, "members": members, "next_after": next_after})))
}

/// `DELETE /api/v1/audiences/{name}`: `204`; refused while another audience
/// refers to it.
async fn delete_audience(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let wanted = name.clone();
    let before = blocking(&state, move |store| {
        let before = store.audience(&wanted).ok().flatten().map(|record| audience_json(&record));
        audience::delete_audience(store, &wanted)?;
        Ok(before)
    })
    .await?;
    crate::audit::record(&state, &token, "audience.delete", &name, before, None).await;
    Ok(StatusCode::NO_CONTENT)
}
