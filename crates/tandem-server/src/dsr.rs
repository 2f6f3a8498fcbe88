//! Data subject requests: `access` (everything kept about a person, as
//! JSON), `delete` (the person erased from every table), `suppress` and
//! `unsuppress` (refuse, or accept again, future events carrying an
//! identifier). [`run_request`] is the one way a request is carried out, for
//! the CLI and `/api/v1/dsr` alike: it records the request as pending, does
//! it, and records it as done or failed with a summary that holds no
//! personal data. The person is named in storage only by the digest of the
//! identifier, so the record of an erasure does not undo it. With an event
//! stream between nodes, a deletion reaches the stream too: the person's
//! messages are erased there before the store, so the drain cannot bring
//! them back ([`erase_everywhere`]).

use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiQuery};
use crate::profile::format_ms;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tandem_core::govern::dsr::{identifier_digest, DsrKind, DsrStatus};
use tandem_core::identity::MalformedIdentifier;
use tandem_core::{Identifier, LogPosition};
use tandem_store::govern::new_dsr;
use tandem_store::{DsrRecord, Store, StoreError, TimelineCursor};

/// Events read per page while gathering an access export.
const ACCESS_PAGE: usize = 1_000;

/// A request that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum DsrError {
    #[error(transparent)]
    Malformed(#[from] MalformedIdentifier),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("erasing from the event stream failed: {0}")]
    Stream(#[from] crate::stream::StreamError),
}

/// The event stream a deletion must reach as well, and the runtime its
/// client runs on (requests are carried out on a blocking thread).
#[derive(Clone, Copy)]
pub struct StreamCopies<'a> {
    pub stream: &'a crate::stream::EventStream,
    pub runtime: &'a tokio::runtime::Handle,
}

/// How long a deletion waits for the drain to pass the messages it erased
/// from the stream, before erasing from the store what the drain may have
/// appended from a batch it held.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Parses `type:value` as events' identifiers are normalized, with the
/// identity rules' phone region.
pub fn parse_subject(store: &dyn Store, text: &str) -> Result<Identifier, DsrError> {
    if let Ok(identifier) = text.parse::<Identifier>() {
        return Ok(identifier);
    }
    let rules = store.identity_rules()?;
    let normalizer = rules.normalizer().unwrap_or_default();
    Ok(normalizer.parse(text)?)
}

/// Carries out a request about the person holding `subject` (`type:value`):
/// the finished request, and for `access` the export.
pub fn run_request(store: &dyn Store, kind: DsrKind, subject: &str) -> Result<(DsrRecord, Option<Value>), DsrError> {
    run_request_reaching(store, kind, subject, None)
}

/// [`run_request`], a deletion also erasing the person from `stream`.
pub fn run_request_reaching(
    store: &dyn Store,
    kind: DsrKind,
    subject: &str,
    stream: Option<StreamCopies<'_>>,
) -> Result<(DsrRecord, Option<Value>), DsrError> {
    let identifier = parse_subject(store, subject)?;
    let digest = identifier_digest(&identifier);
    let mut request = new_dsr(kind, &digest);
    store.insert_dsr(&request)?;
    let outcome: Result<(Value, Option<Value>), DsrError> = match kind {
        DsrKind::Access => access(store, &identifier, &digest).map_err(DsrError::from).map(|export| {
            let summary = json!({
                "profile": !export["profile"].is_null(),
                "events": export["events"].as_array().map_or(0, Vec::len),
            });
            (summary, Some(export))
        }),
        DsrKind::Delete => erase_everywhere(store, &identifier, stream).map(|summary| (summary, None)),
        DsrKind::Suppress => store
            .suppress(&digest, chrono::Utc::now().timestamp_millis())
            .map(|new| (json!({ "suppressed": true, "already": !new }), None))
            .map_err(DsrError::from),
        DsrKind::Unsuppress => store
            .unsuppress(&digest)
            .map(|was| (json!({ "suppressed": false, "was": was }), None))
            .map_err(DsrError::from),
    };
    let finished_at = chrono::Utc::now().timestamp_millis();
    match outcome {
        Ok((summary, export)) => {
            let detail = summary.to_string();
            store.finish_dsr(&request.id, DsrStatus::Done, &detail, finished_at)?;
            request.status = DsrStatus::Done;
            request.detail = Some(detail);
            request.finished_at_ms = Some(finished_at);
            Ok((request, export))
        }
        Err(error) => {
            tracing::error!(request = %request.id, %error, "a data subject request failed");
            // Best effort: the failure is what is being reported.
            let _ = store.finish_dsr(&request.id, DsrStatus::Failed, &error.to_string(), finished_at);
            Err(error)
        }
    }
}

/// Erases the person holding `identifier` from the store and, when given,
/// from the event stream: the stream first (every message holding one of
/// their identifier values or profile ids), then the store; then, once the
/// drain has passed the messages scanned (or [`DRAIN_WAIT`] has gone by),
/// the store again by each identifier they held, for what a drain batch in
/// flight may have appended meanwhile. The summary counts rows per table
/// and messages erased from the stream.
fn erase_everywhere(
    store: &dyn Store,
    identifier: &Identifier,
    stream: Option<StreamCopies<'_>>,
) -> Result<Value, DsrError> {
    let Some(copies) = stream else {
        return Ok(json!({ "removed": store.erase_person(identifier)? }));
    };
    let held = store.profile_by_identifier(identifier)?.map(|profile| profile.identifiers).unwrap_or_default();
    let patterns = store.erasure_patterns_of(identifier)?;
    let erased = copies.runtime.block_on(copies.stream.erase_matching(&patterns))?;
    let mut removed = store.erase_person(identifier)?;
    let deadline = std::time::Instant::now() + DRAIN_WAIT;
    while store.drained_sequence(copies.stream.name())? < erased.through && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for known in std::iter::once(identifier).chain(held.iter()) {
        for (table, rows) in store.erase_person(known)? {
            *removed.entry(table).or_insert(0) += rows;
        }
    }
    Ok(json!({ "removed": removed, "stream": { "erased": erased.erased, "scanned": erased.scanned } }))
}

/// Everything kept about the person holding `identifier`.
fn access(store: &dyn Store, identifier: &Identifier, digest: &str) -> Result<Value, StoreError> {
    let suppressed = store.suppressed()?.iter().any(|known| known == digest);
    let Some(profile) = store.profile_by_identifier(identifier)? else {
        return Ok(json!({
            "identifier": identifier, "profile": null, "events": [], "history": [], "memberships": [],
            "computed_traits": {}, "deliveries": [], "suppressed": suppressed, "consent": null,
        }));
    };
    let mut events = Vec::new();
    let mut before: Option<TimelineCursor> = None;
    loop {
        let page = store.profile_events(profile.id, before, ACCESS_PAGE)?;
        let Some(last) = page.last() else { break };
        before = Some(TimelineCursor { timestamp_ms: last.timestamp_ms, position: last.position });
        let full = page.len() < ACCESS_PAGE;
        events.extend(page);
        if full {
            break;
        }
    }
    let positions: Vec<LogPosition> = events.iter().map(|entry| entry.position).collect();
    let deliveries = store.deliveries_of(&positions)?;
    let memberships: Vec<Value> = store
        .profile_audiences(profile.id)?
        .iter()
        .map(|membership| json!({"audience": membership.audience, "entered_at": format_ms(membership.entered_at_ms)}))
        .collect();
    let computed: serde_json::Map<String, Value> = store
        .computed_trait_states(&[profile.id])?
        .into_iter()
        .map(|state| (state.name, state.value.unwrap_or(Value::Null)))
        .collect();
    let history = store.identity_history(profile.id)?;
    let consent = json!({
        "current": store.consent_of(&[profile.id])?.remove(&profile.id).unwrap_or_default(),
        "history": store.consent_history(profile.id)?,
    });
    Ok(json!({
        "identifier": identifier,
        "profile": profile,
        "events": events
            .iter()
            .map(|entry| serde_json::from_str::<Value>(&entry.payload).unwrap_or(Value::String(entry.payload.clone())))
            .collect::<Vec<_>>(),
        "history": history,
        "memberships": memberships,
        "computed_traits": computed,
        "deliveries": deliveries,
        "suppressed": suppressed,
        "consent": consent,
    }))
}

impl From<DsrError> for ApiError {
    fn from(error: DsrError) -> Self {
        match error {
            DsrError::Malformed(error) => {
                ApiError::new(ErrorCode::InvalidIdentifier, error.to_string()).with_field("identifier")
            }
            DsrError::Store(error) => {
                tracing::error!(%error, "data subject request storage failed");
                ApiError::new(ErrorCode::Unavailable, "the request could not be carried out right now, retry later")
            }
            DsrError::Stream(error) => {
                tracing::error!(%error, "erasing from the event stream failed");
                ApiError::new(ErrorCode::Unavailable, "the request could not be carried out right now, retry later")
            }
        }
    }
}

/// A request as the API and the CLI show it.
pub fn request_json(request: &DsrRecord) -> Value {
    json!({
        "id": request.id,
        "kind": request.kind,
        "subject_digest": request.subject_digest,
        "status": request.status,
        "created_at": format_ms(request.created_at_ms),
        "finished_at": request.finished_at_ms.map(format_ms),
        "detail": request.detail.as_deref().map(|detail| serde_json::from_str::<Value>(detail)
            .unwrap_or_else(|_| Value::String(detail.to_owned()))),
    })
}

/// The request routes, for [`crate::router`].
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/dsr", get(list_requests).post(create_request))
}

/// The body of `POST /api/v1/dsr`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"kind": "access", "identifier": "email:ann@example.com"}))]
pub(crate) struct NewRequest {
    /// What to do (read as text, so an unknown kind is named in the error).
    #[schema(value_type = DsrKind)]
    kind: String,
    /// The person, by any identifier they hold: `type:value`.
    identifier: String,
}

/// `POST /api/v1/dsr` with `{"kind", "identifier": "type:value"}`: carried
/// out at once; `201` with the request (and `result`, the export, for
/// `access`).
async fn create_request(
    State(state): State<AppState>,
    token: AdminToken,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let new: NewRequest = serde_json::from_slice(&body).map_err(|error| {
        if error.is_syntax() || error.is_eof() {
            ApiError::new(ErrorCode::InvalidJson, format!("the body is not JSON: {error}"))
        } else {
            ApiError::new(ErrorCode::InvalidRequest, format!("the body is not a request: {error}"))
        }
    })?;
    let kind: DsrKind = new.kind.parse().map_err(|error: tandem_core::govern::dsr::UnknownDsrKind| {
        ApiError::new(ErrorCode::InvalidValue, error.to_string()).with_field("kind")
    })?;
    let store = state.store.clone();
    let stream = state.stream.clone();
    let runtime = tokio::runtime::Handle::current();
    let (request, export) = tokio::task::spawn_blocking(move || {
        let copies = stream.as_ref().map(|stream| StreamCopies { stream, runtime: &runtime });
        run_request_reaching(store.as_ref(), kind, &new.identifier, copies)
    })
    .await
    .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))??;
    if matches!(kind, DsrKind::Suppress | DsrKind::Unsuppress) {
        state.suppressions.forget();
    }
    let mut body = request_json(&request);
    // The person is named by the request id and its digest only.
    crate::audit::record(&state, &token, &format!("dsr.{}", kind.as_str()), &request.id, None, Some(body.clone()))
        .await;
    if let Some(export) = export {
        body["result"] = export;
    }
    Ok((StatusCode::CREATED, Json(body)))
}

/// The query of `GET /api/v1/dsr`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Requests listed, newest first (1 to 1000; 100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// `GET /api/v1/dsr?limit=`: requests, newest first, with their status.
async fn list_requests(
    State(state): State<AppState>,
    _token: AdminToken,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > 1_000 {
        return Err(ApiError::new(ErrorCode::InvalidValue, "limit must be between 1 and 1000").with_field("limit"));
    }
    let store = state.store.clone();
    let requests = tokio::task::spawn_blocking(move || store.list_dsr(limit))
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
        .map_err(|error| ApiError::from(DsrError::Store(error)))?;
    Ok(Json(json!({ "requests": requests.iter().map(request_json).collect::<Vec<_>>() })))
}
