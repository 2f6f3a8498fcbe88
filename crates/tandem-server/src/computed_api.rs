//! The computed-trait API: computed traits listed with their backfill
//! progress, created from a definition in either form (the JSON object, or
//! `{"text": "…"}` in the text syntax), shown and deleted. A definition that
//! does not parse or validate is `422 invalid_computed_trait` with where and
//! what was expected in `details`. Every endpoint needs an admin token; the
//! values themselves are kept by the audience stage ([`crate::audience`])
//! and shown on profiles.

use crate::audience::{self, DefineError};
use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiPath};
use crate::profile::{format_ms, read};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tandem_core::audience::text::ParseErrorKind;
use tandem_core::audience::{ComputedTraitDefinition, ParseError, RuleJsonError};
use tandem_store::{Backfill, ComputedTraitRecord, StoreError};

/// The computed-trait routes, for [`crate::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/computed-traits", get(list_computed_traits).post(create_computed_trait))
        .route("/api/v1/computed-traits/{name}", get(show_computed_trait).delete(delete_computed_trait))
}

/// A definition as a request gives it: the JSON object, or `{"text": "…"}`.
pub fn parse_definition(definition: &Value) -> Result<ComputedTraitDefinition, ApiError> {
    if let Some(text) = definition.as_object().filter(|object| object.len() == 1).and_then(|object| object.get("text"))
    {
        let text = text.as_str().ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidComputedTrait, "definition.text must be a string")
                .with_field("definition.text")
        })?;
        return ComputedTraitDefinition::parse(text).map_err(parse_error);
    }
    ComputedTraitDefinition::from_json(&definition.to_string()).map_err(|error| match error {
        RuleJsonError::Malformed { message, .. } => {
            ApiError::new(ErrorCode::InvalidComputedTrait, format!("definition is not a computed trait: {message}"))
                .with_field("definition")
        }
        RuleJsonError::Invalid(invalid) => {
            ApiError::new(ErrorCode::InvalidComputedTrait, invalid.problem.to_string()).with_field("definition")
        }
    })
}

fn parse_error(error: ParseError) -> ApiError {
    let (expected, found) = match &error.kind {
        ParseErrorKind::Expected { expected, found } => (Some(*expected), Some(found.clone())),
        ParseErrorKind::Invalid(_) => (None, None),
    };
    ApiError::new(ErrorCode::InvalidComputedTrait, error.to_string()).with_field("definition.text").with_extra(
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

fn define_error(error: DefineError) -> ApiError {
    match error {
        DefineError::InvalidComputedTraitName | DefineError::InvalidName => {
            ApiError::new(ErrorCode::InvalidValue, error.to_string()).with_field("name")
        }
        DefineError::InvalidRule(invalid) => {
            ApiError::new(ErrorCode::InvalidComputedTrait, invalid.to_string()).with_field("definition")
        }
        DefineError::Store(StoreError::ComputedTraitExists(name)) => {
            ApiError::new(ErrorCode::ComputedTraitExists, format!("a computed trait named {name:?} already exists"))
                .with_field("name")
        }
        DefineError::Store(StoreError::ComputedTraitNotFound(name)) => not_found(&name),
        DefineError::ComputedTraitInUse { .. } => {
            ApiError::new(ErrorCode::ComputedTraitInUse, error.to_string()).with_field("name")
        }
        error => {
            tracing::error!(%error, "computed-trait storage failed");
            ApiError::new(ErrorCode::Unavailable, "computed traits cannot be read or written right now, retry later")
        }
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(ErrorCode::ComputedTraitNotFound, format!("no computed trait named {name:?}")).with_field("name")
}

/// A computed trait as the API and the CLI show it: the definition in both
/// forms and the backfill progress (`backfilled`, and while it is not,
/// `backfilled_through`: the last profile id computed so far, or `null`).
pub fn computed_trait_json(record: &ComputedTraitRecord) -> Value {
    let (backfilled, through) = match record.backfill {
        Backfill::Done => (true, None),
        Backfill::Pending { after } => (false, after),
    };
    json!({
        "name": record.name,
        "definition": record.definition,
        "definition_text": record.definition.to_string(),
        "created_at": format_ms(record.created_at_ms),
        "backfilled": backfilled,
        "backfilled_through": through,
    })
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

/// `GET /api/v1/computed-traits`: every computed trait, by name.
async fn list_computed_traits(State(state): State<AppState>, _token: AdminToken) -> Result<Json<Value>, ApiError> {
    let records = read(&state, |store| store.list_computed_traits()).await?;
    let traits: Vec<Value> = records.iter().map(computed_trait_json).collect();
    Ok(Json(json!({ "computed_traits": traits })))
}

/// The body of `POST /api/v1/computed-traits`. The handler reads the fields
/// itself, to name a missing or mistyped one in its error; a test sends the
/// example below.
#[derive(utoipa::ToSchema)]
#[schema(example = json!({"name": "orders 30d", "definition": {"text": "count of \"Order Completed\" within 30d"}}))]
#[allow(dead_code)] // describes the body; the handler reads it field by field
pub(crate) struct NewComputedTrait {
    /// Unique; letters, digits, spaces, `-`, `_` and `.`.
    pub name: String,
    /// The definition: its JSON form, or `{"text": "…"}` in the text syntax.
    pub definition: Value,
}

/// `POST /api/v1/computed-traits` with `{"name", "definition"}` (the
/// definition as JSON or `{"text": "…"}`): `201` with the computed trait,
/// which the stage then backfills.
async fn create_computed_trait(
    State(state): State<AppState>,
    token: AdminToken,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err(ApiError::new(ErrorCode::InvalidRequest, "the body must be a JSON object")),
        Err(error) => return Err(ApiError::new(ErrorCode::InvalidJson, format!("the body is not JSON: {error}"))),
    };
    let name = body
        .get("name")
        .ok_or_else(|| ApiError::new(ErrorCode::MissingField, "name is required").with_field("name"))?
        .as_str()
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidType, "name must be a string").with_field("name"))?
        .to_owned();
    let definition = body
        .get("definition")
        .ok_or_else(|| ApiError::new(ErrorCode::MissingField, "definition is required").with_field("definition"))?;
    let definition = parse_definition(definition)?;
    let now = chrono::Utc::now();
    let record = blocking(&state, move |store| audience::create_computed_trait(store, &name, &definition, now)).await?;
    let shown = computed_trait_json(&record);
    crate::audit::record(&state, &token, "computed_trait.create", &record.name, None, Some(shown.clone())).await;
    Ok((StatusCode::CREATED, Json(shown)))
}

/// `GET /api/v1/computed-traits/{name}`: the definition and its backfill.
async fn show_computed_trait(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let wanted = name.clone();
    let record = read(&state, move |store| store.computed_trait(&wanted)).await?.ok_or_else(|| not_found(&name))?;
    Ok(Json(computed_trait_json(&record)))
}

/// `DELETE /api/v1/computed-traits/{name}`: `204`, its values go with it;
/// refused while an audience tests it.
async fn delete_computed_trait(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let wanted = name.clone();
    let before = blocking(&state, move |store| {
        let before = store.computed_trait(&wanted).ok().flatten().map(|record| computed_trait_json(&record));
        audience::delete_computed_trait(store, &wanted)?;
        Ok(before)
    })
    .await?;
    crate::audit::record(&state, &token, "computed_trait.delete", &name, before, None).await;
    Ok(StatusCode::NO_CONTENT)
}
