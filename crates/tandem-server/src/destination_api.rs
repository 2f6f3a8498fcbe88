//! The destination API: destinations listed with their delivered, pending,
//! retrying and dead counts, created from a definition (validated before
//! anything is stored: `422 invalid_destination` naming the setting), shown,
//! deleted, paused, sent a test item, and the failed deliveries (dead
//! letters) listed and replayed, per destination or across all of them,
//! narrowed by time (`since`) and profile. Every endpoint needs an admin
//! token; delivery itself is [`crate::activate`]'s.

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
use tandem_store::{DeadLetter, DeadLetterFilter, DestinationRecord, OutboxItemId, Store, StoreError};

/// The destination routes, for [`crate::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/destinations", get(list_destinations).post(create_destination))
        .route("/api/v1/destinations/{name}", get(show_destination).delete(delete_destination))
        .route("/api/v1/destinations/{name}/dead-letters", get(list_dead_letters))
        .route("/api/v1/destinations/{name}/replay", post(replay_dead_letters))
        .route("/api/v1/destinations/{name}/pause", post(pause_destination))
        .route("/api/v1/destinations/{name}/resume", post(resume_destination))
        .route("/api/v1/destinations/{name}/test", post(test_destination))
        .route("/api/v1/deliveries/failed", get(list_failed_deliveries))
        .route("/api/v1/deliveries/replay", post(replay_failed_deliveries))
}

/// Dead letters per page unless `limit` says otherwise, and at most.
const DEFAULT_DEAD_LETTER_PAGE: usize = 100;
const MAX_DEAD_LETTER_PAGE: usize = 1_000;

fn define_error(error: DestinationDefineError) -> ApiError {
    match error {
        DestinationDefineError::Invalid(invalid) => {
            ApiError::new(ErrorCode::InvalidDestination, invalid.to_string()).with_field(invalid.field)
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
        // Items waiting to be sent: the destination's backlog, and when
        // the next of them was enqueued.
        "lag": record.counts.pending + record.counts.retrying,
        "next_enqueued_at": record.head_enqueued_at_ms.map(format_ms),
        "paused": record.paused,
    })
}

/// A dead letter as the API and the CLI show it.
pub fn dead_letter_json(letter: &DeadLetter) -> Value {
    json!({
        "destination": letter.destination,
        "id": letter.id.0,
        "position": letter.position.0,
        "profile": letter.profile.map(|id| id.to_string()),
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
    token: AdminToken,
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
    // Its worker starts now, not at the outbox stage's next listing.
    state.stages.destinations_changed();
    let shown = destination_json(&record);
    crate::audit::record(&state, &token, "destination.create", &record.definition.name, None, Some(shown.clone()))
        .await;
    Ok((StatusCode::CREATED, Json(shown)))
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
    token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let wanted = name.clone();
    let before = blocking(&state, move |store| {
        let before = store.destination(&wanted).ok().flatten().map(|record| destination_json(&record));
        store.delete_destination(&wanted)?;
        Ok(before)
    })
    .await?;
    state.stages.destinations_changed();
    crate::audit::record(&state, &token, "destination.delete", &name, before, None).await;
    Ok(StatusCode::NO_CONTENT)
}

/// The filters of the dead-letter routes (each route documents the ones it reads).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeadLetterQuery {
    /// Dead letters per page (1 to 1000; 100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// Only those that died since: an RFC 3339 time, or a span back from now (`2h`, `7d`).
    since: Option<String>,
    /// Only those about this profile (`prof_N`).
    profile: Option<String>,
    /// The destination, by name.
    destination: Option<String>,
    /// One dead letter by its `id`.
    item: Option<u64>,
    /// The `id` of the previous page's last dead letter.
    after: Option<u64>,
}

/// The body of `POST /api/v1/destinations`: a destination definition with,
/// optionally, its stack-registry entry under `registry` ([`parse_definition`]
/// takes that out before reading the definition). Its schema is the
/// definition's, derived from `DestinationDefinition`, with that one
/// property added.
pub(crate) struct NewDestination;

impl utoipa::PartialSchema for NewDestination {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use tandem_core::activate::{DestinationDefinition, FileSettings, WarehouseSettings, WebhookSettings};
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
        use utoipa::openapi::RefOr;
        use utoipa::PartialSchema;
        // `destination` is tagged by `kind` inside each kind's settings;
        // the derived schema would add `kind` beside settings that allow no
        // other field (`deny_unknown_fields`), which no value satisfies.
        let mut kinds = OneOfBuilder::new();
        for (kind, settings) in [
            ("webhook", <WebhookSettings as PartialSchema>::schema()),
            ("file", <FileSettings as PartialSchema>::schema()),
            ("warehouse", <WarehouseSettings as PartialSchema>::schema()),
        ] {
            if let RefOr::T(Schema::Object(mut object)) = settings {
                let tag = ObjectBuilder::new().schema_type(Type::String).enum_values(Some([kind])).build();
                object.properties.insert("kind".to_owned(), tag.into());
                object.required.insert(0, "kind".to_owned());
                kinds = kinds.item(object);
            }
        }
        let mut schema = <DestinationDefinition as PartialSchema>::schema();
        if let RefOr::T(Schema::Object(object)) = &mut schema {
            object.properties.insert("destination".to_owned(), RefOr::T(Schema::OneOf(kinds.build())));
            object.properties.insert(
                "registry".to_owned(),
                utoipa::openapi::Ref::from_schema_name(<ToolInfo as utoipa::ToSchema>::name()).into(),
            );
            object.description = Some("A destination definition, with its stack-registry entry.".to_owned());
            object.examples = vec![json!({
                "name": "crm",
                "destination": {"kind": "webhook", "url": "http://127.0.0.1:9/hook"},
                "events": {"types": ["track"], "names": ["Order Completed"]},
                "consent_categories": ["marketing"],
                "registry": {"owner": "Bo Chen", "department": "sales", "purpose": "lead follow-up", "annual_cost": 1200.0}
            })];
        }
        schema
    }
}

impl utoipa::ToSchema for NewDestination {
    fn name() -> std::borrow::Cow<'static, str> {
        "NewDestination".into()
    }

    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        <tandem_core::activate::DestinationDefinition as utoipa::ToSchema>::schemas(schemas);
        // Described in place, by kind (see `schema`).
        schemas.retain(|(name, _)| name != "DestinationSettings");
        schemas
            .push((<ToolInfo as utoipa::ToSchema>::name().into_owned(), <ToolInfo as utoipa::PartialSchema>::schema()));
        <ToolInfo as utoipa::ToSchema>::schemas(schemas);
    }
}

impl DeadLetterQuery {
    /// The parameters as a store filter; `400 invalid_value` naming the
    /// parameter that is not what it should be.
    fn filter(&self, now_ms: i64) -> Result<DeadLetterFilter, ApiError> {
        let mut filter = self.replay_request().filter(now_ms)?;
        filter.after = self.after.map(OutboxItemId);
        Ok(filter)
    }

    fn replay_request(&self) -> ReplayRequest {
        ReplayRequest { since: self.since.clone(), profile: self.profile.clone(), item: self.item }
    }

    fn limit(&self) -> Result<usize, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_DEAD_LETTER_PAGE);
        if limit == 0 || limit > MAX_DEAD_LETTER_PAGE {
            return Err(ApiError::new(
                ErrorCode::InvalidValue,
                format!("limit must be between 1 and {MAX_DEAD_LETTER_PAGE}"),
            )
            .with_field("limit"));
        }
        Ok(limit)
    }
}

/// A dead-letter filter from its text form (`since`: RFC 3339 or `2h`,
/// `7d` back from `now_ms`; `profile`: `prof_N`), shared by the API and the
/// CLI; on a bad value, the parameter's name and what is wrong.
pub fn dead_letter_filter(
    since: Option<&str>,
    profile: Option<&str>,
    now_ms: i64,
) -> Result<DeadLetterFilter, (&'static str, String)> {
    let since_ms = since
        .map(|text| {
            tandem_core::activate::parse_since_ms(text, now_ms)
                .ok_or(("since", format!("{text:?} is neither an RFC 3339 time nor a duration like 2h or 7d")))
        })
        .transpose()?;
    let profile = profile
        .map(|text| {
            text.parse::<tandem_core::ProfileId>().map_err(|_| ("profile", format!("{text:?} is not a profile id")))
        })
        .transpose()?;
    Ok(DeadLetterFilter { since_ms, profile, ..DeadLetterFilter::default() })
}

/// Which of a destination's dead letters a replay takes, as a person gave
/// it (a query string or a console form): those that died `since` (RFC 3339
/// or `2h`), those about `profile`, the one numbered `item`; all when empty.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ReplayRequest {
    pub since: Option<String>,
    pub profile: Option<String>,
    pub item: Option<u64>,
}

impl ReplayRequest {
    fn filter(&self, now_ms: i64) -> Result<DeadLetterFilter, ApiError> {
        let mut filter = dead_letter_filter(self.since.as_deref(), self.profile.as_deref(), now_ms)
            .map_err(|(field, message)| ApiError::new(ErrorCode::InvalidValue, message).with_field(field))?;
        filter.item = self.item.map(OutboxItemId);
        Ok(filter)
    }
}

/// Puts the dead letters of destination `name` that `request` takes back
/// in its outbox, at their places in the order, and records the replay in
/// the audit log (`destination.replay`, with the request and the count):
/// the one replay behind both the API and the console. Answers how many.
pub async fn replay_and_audit(
    state: &AppState,
    token: &AdminToken,
    name: &str,
    request: &ReplayRequest,
) -> Result<u64, ApiError> {
    let filter = request.filter(chrono::Utc::now().timestamp_millis())?;
    let wanted = name.to_owned();
    let replayed = blocking(state, move |store| Ok(activate::replay(store, &wanted, &filter)?)).await?;
    if replayed > 0 {
        state.stages.outbox.count_commit();
    }
    let mut after = json!({"since": request.since, "profile": request.profile, "replayed": replayed});
    if let Some(item) = request.item {
        after["item"] = json!(item);
    }
    crate::audit::record(state, token, "destination.replay", name, None, Some(after)).await;
    Ok(replayed)
}

/// `GET /api/v1/destinations/{name}/dead-letters`: the oldest dead letters
/// first, each with its last error.
async fn list_dead_letters(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit()?;
    let filter = query.filter(chrono::Utc::now().timestamp_millis())?;
    let wanted = name.clone();
    let letters =
        blocking(&state, move |store| Ok(activate::dead_letters(store, Some(&wanted), &filter, limit)?)).await?;
    let letters: Vec<Value> = letters.iter().map(dead_letter_json).collect();
    read_in_clear(&state, &token, &name, letters.len()).await;
    let body = json!({"destination": name, "dead_letters": letters});
    Ok(Json(crate::pii::shown_to(&token, &state.pii.current(), body)))
}

/// Dead letters carry their events, PII and all: a role without `pii:read`
/// (a marketer) sees them masked, and a read in clear is audited.
async fn read_in_clear(state: &AppState, token: &AdminToken, target: &str, letters: usize) {
    if token.sees_pii() && letters > 0 {
        let read = Some(json!({ "dead_letters": letters }));
        crate::audit::record(state, token, "destination.read_dead_letters", target, None, read).await;
    }
}

/// `POST /api/v1/destinations/{name}/pause`: stop sending; items keep
/// being enqueued, in order.
async fn pause_destination(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    set_paused(state, token, name, true).await
}

/// `POST /api/v1/destinations/{name}/resume`: send what waited, in order.
async fn resume_destination(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    set_paused(state, token, name, false).await
}

async fn set_paused(state: AppState, token: AdminToken, name: String, paused: bool) -> Result<Json<Value>, ApiError> {
    let wanted = name.clone();
    blocking(&state, move |store| Ok(store.set_destination_paused(&wanted, paused)?)).await?;
    // The destination's worker waits for the next enqueue; it sends what
    // waited at once rather than at its next recheck.
    state.stages.outbox.nudge();
    let action = if paused { "destination.pause" } else { "destination.resume" };
    crate::audit::record(
        &state,
        &token,
        action,
        &name,
        Some(json!({"paused": !paused})),
        Some(json!({"paused": paused})),
    )
    .await;
    Ok(Json(json!({"destination": name, "paused": paused})))
}

/// `POST /api/v1/destinations/{name}/replay?since=&profile=`: puts the
/// dead letters that pass the filter back in the outbox at their places in
/// the order; answers how many.
async fn replay_dead_letters(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
    replay(state, token, name, &query).await
}

async fn replay(
    state: AppState,
    token: AdminToken,
    name: String,
    query: &DeadLetterQuery,
) -> Result<Json<Value>, ApiError> {
    let replayed = replay_and_audit(&state, &token, &name, &query.replay_request()).await?;
    Ok(Json(json!({"destination": name, "replayed": replayed})))
}

/// `GET /api/v1/deliveries/failed?destination=&since=&profile=&limit=`:
/// the failed deliveries (dead letters) of one destination or of all,
/// oldest first.
async fn list_failed_deliveries(
    State(state): State<AppState>,
    token: AdminToken,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit()?;
    let filter = query.filter(chrono::Utc::now().timestamp_millis())?;
    let destination = query.destination.clone();
    let letters =
        blocking(&state, move |store| Ok(activate::dead_letters(store, destination.as_deref(), &filter, limit)?))
            .await?;
    let letters: Vec<Value> = letters.iter().map(dead_letter_json).collect();
    read_in_clear(&state, &token, query.destination.as_deref().unwrap_or("every destination"), letters.len()).await;
    Ok(Json(crate::pii::shown_to(&token, &state.pii.current(), json!({"failed": letters}))))
}

/// `POST /api/v1/deliveries/replay?destination=&since=&profile=`: as the
/// destination's replay; `destination` is required.
async fn replay_failed_deliveries(
    State(state): State<AppState>,
    token: AdminToken,
    ApiQuery(query): ApiQuery<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
    let Some(name) = query.destination.clone() else {
        return Err(ApiError::new(ErrorCode::InvalidValue, "name the destination to replay").with_field("destination"));
    };
    replay(state, token, name, &query).await
}

/// `POST /api/v1/destinations/{name}/test`: sends one sample item now,
/// outside the outbox, and answers what the receiver did: `{"ok": true,
/// "status", "detail"}` or `{"ok": false, "error", "retryable"}`.
async fn test_destination(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let wanted = name.clone();
    let now = chrono::Utc::now().timestamp_millis();
    let outcome = blocking(&state, move |store| Ok(activate::send_test(store, &wanted, now)?)).await?;
    Ok(Json(test_json(&name, &outcome)))
}

/// A test send's outcome as the API and the CLI show it.
pub fn test_json(name: &str, outcome: &Result<activate::Receipt, tandem_core::activate::AttemptFailure>) -> Value {
    match outcome {
        Ok(receipt) => json!({"destination": name, "ok": true, "status": receipt.status, "detail": receipt.detail}),
        Err(failure) => json!({
            "destination": name,
            "ok": false,
            "error": failure.to_string(),
            "retryable": failure.class() == tandem_core::activate::FailureClass::Retryable,
        }),
    }
}
