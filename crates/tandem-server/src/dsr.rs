//! Data subject requests: `access` (everything kept about a person, as
//! JSON), `delete` (the person erased from every table), `suppress` and
//! `unsuppress` (refuse, or accept again, future events carrying an
//! identifier). [`run_request`] is the one way a request is carried out, for
//! the CLI and `/api/v1/dsr` alike: it records the request as pending, does
//! it, and records it as done or failed with a summary that holds no
//! personal data. The person is named in storage only by the digest of the
//! identifier, so the record of an erasure does not undo it.
//!
//! With an event stream between nodes, a deletion first deletes the
//! person's messages from the stream ([`StreamEraser`]), then waits for the
//! drain to commit what it may have fetched before, then erases the store:
//! so no event of theirs that was already published, drained or not, can
//! reach the log afterwards.

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
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tandem_core::govern::dsr::{identifier_digest, DsrKind, DsrStatus};
use tandem_core::identity::MalformedIdentifier;
use tandem_core::{Identifier, LogPosition};
use tandem_store::govern::new_dsr;
use tandem_store::{DsrRecord, ErasureReport, LeaseHolder, Stage, Store, StoreError, TimelineCursor};

/// Events read per page while gathering an access export.
const ACCESS_PAGE: usize = 1_000;

/// How long a deletion waits for the drain to commit messages it may have
/// fetched before they were deleted from the stream.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// A drain whose recorded sequence has not moved for this long has nothing
/// in flight: one fetch waits at most half a second before it commits.
const DRAIN_SETTLED: Duration = Duration::from_secs(2);

/// A request that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum DsrError {
    #[error(transparent)]
    Malformed(#[from] MalformedIdentifier),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
    #[error("cannot erase from the reject files in {directory}: {source}")]
    Rejects { directory: PathBuf, source: std::io::Error },
}

/// Where a deletion looks beyond the store: the event stream, and the
/// import directory whose reject files echo refused rows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Beyond<'a> {
    pub stream: Option<&'a StreamEraser>,
    pub import_dir: Option<&'a Path>,
}

/// The event stream a deletion erases the person's messages from too, and
/// the runtime that drives its client (the requests run on blocking threads).
#[derive(Clone, Debug)]
pub struct StreamEraser {
    pub stream: crate::stream::EventStream,
    pub runtime: tokio::runtime::Handle,
}

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
/// the finished request, and for `access` the export. `stream` is the event
/// stream events pass through, when they do.
pub fn run_request(
    store: &dyn Store,
    kind: DsrKind,
    subject: &str,
    beyond: &Beyond<'_>,
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
        DsrKind::Delete => erase(store, &identifier, beyond).map(|report| (json!({ "removed": report }), None)),
        DsrKind::Suppress => store
            .suppress(&digest, chrono::Utc::now().timestamp_millis())
            .map_err(DsrError::from)
            .map(|new| (json!({ "suppressed": true, "already": !new }), None)),
        DsrKind::Unsuppress => store
            .unsuppress(&digest)
            .map_err(DsrError::from)
            .map(|was| (json!({ "suppressed": false, "was": was }), None)),
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

/// Erases the person holding `identifier`: from the event stream first
/// (their messages deleted, the drain given time to commit any it had
/// fetched), then from the store, which also removes whatever the drain
/// appended, then from the import directory's reject files. The report
/// counts the stream's deleted messages as `event_stream` and the reject
/// rows as `import_rejects`.
fn erase(store: &dyn Store, identifier: &Identifier, beyond: &Beyond<'_>) -> Result<ErasureReport, DsrError> {
    // The texts looked for outside the store: every identifier value of
    // the person's profile, or the one asked about.
    let mut values = vec![identifier.value.clone()];
    if let Some(profile) = store.profile_by_identifier(identifier)? {
        values.extend(profile.identifiers.into_iter().map(|known| known.value));
    }
    let mut erased_from_stream = None;
    if let Some(eraser) = beyond.stream {
        let patterns = tandem_store::govern::erasure_patterns(&values);
        let erased = eraser.runtime.block_on(eraser.stream.erase_matching(&patterns))?;
        wait_for_the_drain(store, eraser.stream.name(), erased.last_erased_sequence)?;
        erased_from_stream = Some(erased.erased);
    }
    let mut report = store.erase_person(identifier)?;
    if let Some(erased) = erased_from_stream {
        report.insert("event_stream", erased);
    }
    if let Some(directory) = beyond.import_dir {
        let removed = crate::import::erase_from_reject_files(directory, &values)
            .map_err(|source| DsrError::Rejects { directory: directory.to_owned(), source })?;
        report.insert("import_rejects", removed);
    }
    Ok(report)
}

/// Returns once no drain can still append a message at or below `sequence`
/// that it fetched before the message was deleted: the recorded sequence
/// passed it, no node drains, or the drain committed nothing for
/// [`DRAIN_SETTLED`] (a fetched batch is committed well within that). Gives
/// up after [`DRAIN_WAIT`] with a warning.
fn wait_for_the_drain(store: &dyn Store, stream: &str, sequence: u64) -> Result<(), StoreError> {
    if sequence == 0 {
        return Ok(());
    }
    let started = Instant::now();
    let (mut seen, mut since) = (store.drained_sequence(stream)?, Instant::now());
    while seen < sequence {
        if store.lease_holder(Stage::DRAIN)? == LeaseHolder::Vacant || since.elapsed() >= DRAIN_SETTLED {
            return Ok(());
        }
        if started.elapsed() >= DRAIN_WAIT {
            tracing::warn!(
                sequence,
                drained = seen,
                "the drain did not settle while erasing a person; erasing the store now"
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
        let now = store.drained_sequence(stream)?;
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
    }
    Ok(())
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
                tracing::error!(%error, "data subject request on the event stream failed");
                ApiError::new(ErrorCode::Unavailable, "the event stream cannot be reached right now, retry later")
            }
            error @ DsrError::Rejects { .. } => {
                tracing::error!(%error, "data subject request on the import directory failed");
                ApiError::new(ErrorCode::Internal, "the import directory's reject files could not be rewritten")
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
    let eraser = state.stream.clone().map(|stream| StreamEraser { stream, runtime: tokio::runtime::Handle::current() });
    let import_dir = state.imports.directory().to_owned();
    let (request, export) = tokio::task::spawn_blocking(move || {
        let beyond = Beyond { stream: eraser.as_ref(), import_dir: Some(&import_dir) };
        run_request(store.as_ref(), kind, &new.identifier, &beyond)
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
