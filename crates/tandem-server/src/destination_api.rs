//! The destination API: destinations listed with their delivered, pending,
//! retrying and dead counts, created from a definition (validated before
//! anything is stored: `422 invalid_destination` naming the setting), shown,
//! deleted, their dead letters listed and replayed. Every endpoint needs an
//! admin token; delivery itself is [`crate::activate`]'s.

use crate::activate::{self, DestinationDefineError};
use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiPath, ApiQuery};
use crate::profile::format_ms;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tandem_core::activate::DestinationDefinition;
use tandem_core::govern::stack::{ToolInfo, ToolKind};
use tandem_store::{DeadLetter, DestinationRecord, Store, StoreError};

/// The destination routes, for [`crate::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/destinations", get(list_destinations).post(create_destination))
        .route("/api/v1/destinations/{name}", get(show_destination).delete(delete_destination))
        .route("/api/v1/destinations/{name}/dead-letters", get(list_dead_letters))
        .route("/api/v1/destinations/{name}/replay", post(replay_dead_letters))
        .route("/api/v1/destinations/{name}/pause", post(pause_destination))
        .route("/api/v1/destinations/{name}/resume", post(resume_destination))
}

/// Dead letters per page unless `limit` says otherwise, and at most.
const DEFAULT_DEAD_LETTER_PAGE: usize = 100;
const MAX_DEAD_LETTER_PAGE: usize = 1_000;

fn define_error(error: DestinationDefineError) -> ApiError {
    match error {
        DestinationDefineError::Invalid(invalid) => {
            ApiError::new(ErrorCode::InvalidDestination, invalid.to_string()).with_field(invalid.field)
        }
        DestinationDefineError::HttpsUnsupported => {
            ApiError::new(ErrorCode::InvalidDestination, error.to_string()).with_field("destination.url")
        }
        DestinationDefineError::Store(error) => store_error(error),
    }
}

fn store_error(error: StoreError) -> ApiError {
    match error {
        StoreError::DestinationExists(name) => {
            ApiError::new(ErrorCode::DestinationExists, format!("a destination named {name:?} already exists"))
                .with_field("name")
        }
        StoreError::DestinationNotFound(name) => not_found(&name),
        error => {
            tracing::error!(%error, "destination storage failed");
            ApiError::new(ErrorCode::Unavailable, "destinations cannot be read or written right now, retry later")
        }
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(ErrorCode::DestinationNotFound, format!("no destination named {name:?}")).with_field("name")
}

async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&dyn Store) -> Result<T, DestinationDefineError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || work(store.as_ref()))
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
        .map_err(define_error)
}

/// A destination as the API and the CLI show it. A webhook's secret is
/// never shown back, only whether one is set.
pub fn destination_json(record: &DestinationRecord) -> Value {
    let mut definition = serde_json::to_value(&record.definition).unwrap_or(Value::Null);
    if let Some(settings) = definition.get_mut("destination").and_then(Value::as_object_mut) {
        if settings.remove("secret").is_some() {
            settings.insert("secret_set".to_owned(), Value::Bool(true));
        }
    }
    json!({
        "name": record.definition.name,
        "kind": record.definition.destination.kind(),
        "definition": definition,
        "created_at": format_ms(record.created_at_ms),
        "counts": record.counts,
        "paused": record.paused,
    })
}

fn dead_letter_json(letter: &DeadLetter) -> Value {
    json!({
        "position": letter.position.0,
        "attempts": letter.attempts,
        "last_error": letter.last_error,
        "dead_at": format_ms(letter.dead_at_ms),
        "event": serde_json::from_str::<Value>(&letter.payload).unwrap_or(Value::String(letter.payload.clone())),
    })
}

/// `GET /api/v1/destinations`: every destination with its counts, by name.
async fn list_destinations(State(state): State<AppState>, _token: AdminToken) -> Result<Json<Value>, ApiError> {
    let records = blocking(&state, |store| Ok(store.list_destinations()?)).await?;
    let destinations: Vec<Value> = records.iter().map(destination_json).collect();
    Ok(Json(json!({ "destinations": destinations })))
}

/// A destination definition, with its optional stack-registry entry
/// (`"registry": {"owner", "department", "purpose", "annual_cost"}`) taken
/// out, checked before anything is stored.
pub fn parse_definition(body: &[u8]) -> Result<(DestinationDefinition, Option<ToolInfo>), ApiError> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|error| ApiError::new(ErrorCode::InvalidJson, format!("the body is not JSON: {error}")))?;
    let registry = value.as_object_mut().and_then(|object| object.remove("registry"));
    let definition: DestinationDefinition = serde_json::from_value(value).map_err(|error| {
        ApiError::new(ErrorCode::InvalidDestination, format!("the body is not a destination: {error}"))
    })?;
    let registry = match registry {
        None => None,
        Some(registry) => Some(
            serde_json::from_value::<ToolInfo>(registry)
                .map_err(|error| {
                    ApiError::new(ErrorCode::InvalidDestination, format!("registry: {error}")).with_field("registry")
                })?
                .validated()
                .map_err(|invalid| {
                    ApiError::new(ErrorCode::InvalidDestination, invalid.to_string())
                        .with_field(format!("registry.{}", invalid.field))
                })?,
        ),
    };
    Ok((definition, registry))
}

/// `POST /api/v1/destinations` with a definition: `201` with the destination.
async fn create_destination(
    State(state): State<AppState>,
    _token: AdminToken,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (definition, registry) = parse_definition(&body)?;
    let now = chrono::Utc::now().timestamp_millis();
    let record = blocking(&state, move |store| {
        activate::create_destination(store, &definition, now)?;
        if let Some(registry) = registry {
            crate::stack::set_tool(store, ToolKind::Destination, &definition.name, registry).map_err(|error| {
                match error {
                    crate::stack::StackError::Store(error) => DestinationDefineError::Store(error),
                    crate::stack::StackError::Invalid(invalid) => {
                        DestinationDefineError::Invalid(tandem_core::activate::DestinationError {
                            field: "registry",
                            message: invalid.to_string(),
                        })
                    }
                }
            })?;
        }
        store
            .destination(&definition.name)?
            .ok_or(DestinationDefineError::Store(StoreError::DestinationNotFound(definition.name)))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(destination_json(&record))))
}

/// `GET /api/v1/destinations/{name}`: the definition, the counts and the
/// deliveries withheld per consent category.
async fn show_destination(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let wanted = name.clone();
    let (record, withheld) = blocking(&state, move |store| {
        let record = store.destination(&wanted)?;
        Ok((record, store.withheld_counts(&wanted)?))
    })
    .await?;
    let record = record.ok_or_else(|| not_found(&name))?;
    let mut shown = destination_json(&record);
    // Deliveries held back because a consent category was not granted.
    shown["consent_withheld"] = serde_json::to_value(withheld).unwrap_or_default();
    Ok(Json(shown))
}

/// `DELETE /api/v1/destinations/{name}`: `204`; its outbox and dead letters
/// go with it.
async fn delete_destination(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    blocking(&state, move |store| Ok(store.delete_destination(&name)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct DeadLetterQuery {
    limit: Option<usize>,
}

/// `GET /api/v1/destinations/{name}/dead-letters`: the oldest dead letters
/// first, each with its last error.
async fn list_dead_letters(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_DEAD_LETTER_PAGE);
    if limit == 0 || limit > MAX_DEAD_LETTER_PAGE {
        return Err(ApiError::new(
            ErrorCode::InvalidValue,
            format!("limit must be between 1 and {MAX_DEAD_LETTER_PAGE}"),
        )
        .with_field("limit"));
    }
    let wanted = name.clone();
    let letters = blocking(&state, move |store| Ok(activate::dead_letters(store, &wanted, limit)?)).await?;
    let letters: Vec<Value> = letters.iter().map(dead_letter_json).collect();
    Ok(Json(json!({"destination": name, "dead_letters": letters})))
}

/// `POST /api/v1/destinations/{name}/replay`: puts every dead letter back
/// in the outbox at its place in the order; answers how many.
/// `POST /api/v1/destinations/{name}/pause`: stop sending; items keep
/// being enqueued, in order.
async fn pause_destination(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    set_paused(state, name, true).await
}

/// `POST /api/v1/destinations/{name}/resume`: send what waited, in order.
async fn resume_destination(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    set_paused(state, name, false).await
}

async fn set_paused(state: AppState, name: String, paused: bool) -> Result<Json<Value>, ApiError> {
    let wanted = name.clone();
    blocking(&state, move |store| Ok(store.set_destination_paused(&wanted, paused)?)).await?;
    Ok(Json(json!({"destination": name, "paused": paused})))
}

async fn replay_dead_letters(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let wanted = name.clone();
    let replayed = blocking(&state, move |store| Ok(activate::replay(store, &wanted)?)).await?;
    Ok(Json(json!({"destination": name, "replayed": replayed})))
}
