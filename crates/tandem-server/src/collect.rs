//! The tracking API over HTTP: Segment's `/v1/track`, `identify`, `page`,
//! `screen`, `group`, `alias`, `batch` and `import` (plus analytics.js's
//! one-letter paths), so existing Segment and RudderStack SDKs work unchanged.
//!
//! A handler authenticates the source, reads and decompresses the body within
//! the size limits, lets [`tandem_core::collect`] validate each message, hands
//! the valid events and the refusals to the log writer, and answers only once
//! both are durable. Refused messages are quarantined, never dropped.

use crate::error::{ApiError, ErrorCode};
use crate::govern::Screened;
use crate::resolve::RateLimitedWarning;
use crate::stack::Caller;
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::{Extension, Json};
use chrono::Utc;
use serde_json::{json, Value};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use tandem_core::collect::{
    normalize_batch, normalize_message, parse_batch, parse_single, replace_lone_surrogates, BatchDefaults,
    IdRequirement, RejectedMessage, RequestContext, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES,
};
use tandem_core::{Event, EventType, Source, WriteKey};
use tandem_store::{IngestBatch, IngestOutcome, QuarantineRecord};

/// The tracking API's routes, by path.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    let mut routes = Vec::new();
    for (path, short, event_type) in [
        ("/v1/identify", "/v1/i", EventType::Identify),
        ("/v1/track", "/v1/t", EventType::Track),
        ("/v1/page", "/v1/p", EventType::Page),
        ("/v1/screen", "/v1/s", EventType::Screen),
        ("/v1/group", "/v1/g", EventType::Group),
        ("/v1/alias", "/v1/a", EventType::Alias),
    ] {
        routes.push((path, single_route(path, event_type)));
        routes.push((short, single_route(path, event_type)));
    }
    for path in ["/v1/batch", "/v1/import", "/v1/b"] {
        routes.push((path, post(batch_endpoint)));
    }
    routes
}

fn single_route(route: &'static str, event_type: EventType) -> MethodRouter<AppState> {
    post(
        move |State(state): State<AppState>,
              connect: Option<Extension<ConnectInfo<SocketAddr>>>,
              headers: HeaderMap,
              body: Body| async move {
            let started = Instant::now();
            let client_ip = client_ip(connect);
            let result = ingest_single(&state, event_type, client_ip.as_deref(), &headers, body).await;
            finish(&state, route, started, result.map_err(ApiError::with_top_level_code))
        },
    )
}

async fn batch_endpoint(
    State(state): State<AppState>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let client_ip = client_ip(connect);
    let result = ingest_batch(&state, client_ip.as_deref(), &headers, body).await;
    finish(&state, "/v1/batch", started, result.map_err(ApiError::with_top_level_code))
}

/// The sender's address and user agent, noted when its write key matches no source.
fn caller<'a>(client_ip: Option<&'a str>, headers: &'a HeaderMap) -> Caller<'a> {
    Caller { ip: client_ip, user_agent: headers.get(header::USER_AGENT).and_then(|value| value.to_str().ok()) }
}

fn client_ip(connect: Option<Extension<ConnectInfo<SocketAddr>>>) -> Option<String> {
    connect.map(|Extension(ConnectInfo(address))| address.ip().to_string())
}

/// Answers a collecting request (tracking call or webhook) and records its metrics.
pub(crate) fn finish(
    state: &AppState,
    route: &'static str,
    started: Instant,
    result: Result<Value, ApiError>,
) -> Response {
    let response = match result {
        Ok(body) => (StatusCode::OK, Json(body)).into_response(),
        Err(error) => {
            tracing::debug!(route, code = error.code.as_str(), message = %error.message, "collecting request refused");
            error.into_response()
        }
    };
    let elapsed = started.elapsed();
    state.metrics.observe_request(route, response.status().as_u16(), elapsed);
    if response.status() == StatusCode::OK {
        state.ingest_latency.observe(chrono::Utc::now().timestamp_millis(), elapsed);
    }
    response
}

async fn ingest_single(
    state: &AppState,
    event_type: EventType,
    client_ip: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    let caller = caller(client_ip, headers);
    let (body, header_source) =
        read_authenticated(state, headers, caller, body, MAX_MESSAGE_BYTES, ErrorCode::MessageTooLarge).await?;
    let (message, body_key) = match parse_single(&replace_lone_surrogates(&body)) {
        Ok(parsed) => parsed,
        Err(error) => return Err(quarantine_unreadable(state, header_source, &body, error.into()).await),
    };
    let source = match header_source {
        Some(source) => source,
        None => state.sources.authenticate_caller(body_key.map(WriteKey::new), caller).await?,
    };
    let received_at = Utc::now();
    let request =
        RequestContext { source_id: &source.id, received_at, client_ip, ids: IdRequirement::UserOrAnonymousId };
    let body_text = String::from_utf8_lossy(&body);
    let received_at_ms = received_at.timestamp_millis();
    let (screened, refused) = match normalize_message(message, Some(event_type), &BatchDefaults::default(), &request) {
        Ok(event) => {
            let mut screened =
                crate::govern::screen(state, &source.id, vec![event], &[None], |_| &body_text, received_at_ms).await?;
            let refused = screened.refused.pop();
            (screened, refused)
        }
        Err(rejection) => {
            (Screened::default(), Some(RejectedMessage { index: None, raw: body_text.clone().into_owned(), rejection }))
        }
    };
    let Some(refused) = refused else {
        let outcome = append(
            state,
            IngestBatch {
                records: screened.events.iter().map(Event::to_log_record).collect(),
                violations: screened.violations,
                ..Default::default()
            },
        )
        .await?;
        count(state, &outcome);
        return Ok(json!({"success": true}));
    };
    let outcome = append(
        state,
        IngestBatch {
            rejected: vec![quarantine_record(&source, received_at_ms, &refused)],
            violations: screened.violations,
            ..Default::default()
        },
    )
    .await?;
    count(state, &outcome);
    let error = ApiError::new(refused.rejection.code.into(), refused.rejection.message);
    Err(match refused.rejection.field {
        Some(field) => error.with_field(field),
        None => error,
    })
}

async fn ingest_batch(
    state: &AppState,
    client_ip: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    let caller = caller(client_ip, headers);
    let (body, header_source) =
        read_authenticated(state, headers, caller, body, MAX_REQUEST_BYTES, ErrorCode::RequestTooLarge).await?;
    let repaired = replace_lone_surrogates(&body);
    let batch = match parse_batch(&repaired) {
        Ok(batch) => batch,
        Err(error) => return Err(quarantine_unreadable(state, header_source, &body, error.into()).await),
    };
    let source = match header_source {
        Some(source) => source,
        None => state.sources.authenticate_caller(batch.write_key.clone().map(WriteKey::new), caller).await?,
    };
    let received_at = Utc::now();
    let request =
        RequestContext { source_id: &source.id, received_at, client_ip, ids: IdRequirement::UserOrAnonymousId };
    let mut normalized = normalize_batch(&batch, &request);
    let received_at_ms = received_at.timestamp_millis();
    let indexes: Vec<Option<usize>> = normalized.indexes.iter().copied().map(Some).collect();
    let screened = crate::govern::screen(
        state,
        &source.id,
        std::mem::take(&mut normalized.events),
        &indexes,
        |index| index.and_then(|index| batch.messages.get(index)).map_or("", |raw| raw.get()),
        received_at_ms,
    )
    .await?;
    if !screened.refused.is_empty() {
        normalized.rejected.extend(screened.refused);
        normalized.rejected.sort_by_key(|refused| refused.index);
    }
    let ingest = IngestBatch {
        records: screened.events.iter().map(Event::to_log_record).collect(),
        rejected: normalized
            .rejected
            .iter()
            .map(|refused| quarantine_record(&source, received_at_ms, refused))
            .collect(),
        violations: screened.violations,
        ..Default::default()
    };
    let outcome = append(state, ingest).await?;
    count(state, &outcome);
    if normalized.rejected.is_empty() {
        return Ok(json!({"success": true}));
    }
    let rejected = rejected_json(&normalized.rejected);
    if screened.events.is_empty() {
        let first = &normalized.rejected[0];
        let index = first.index.unwrap_or(0);
        let field = match &first.rejection.field {
            Some(field) => format!("batch[{index}].{field}"),
            None => format!("batch[{index}]"),
        };
        let message = format!("every message was rejected; message {index}: {}", first.rejection.message);
        return Err(ApiError::new(first.rejection.code.into(), message)
            .with_field(field)
            .with_extra("rejected", Value::Array(rejected)));
    }
    Ok(json!({"success": true, "rejected": rejected}))
}

/// When the request carries Basic auth, authenticates it before reading the
/// body; then reads the body within its limit. Without Basic auth the key may
/// be in the body, so the caller authenticates after parsing.
async fn read_authenticated(
    state: &AppState,
    headers: &HeaderMap,
    caller: Caller<'_>,
    body: Body,
    limit: usize,
    too_large: ErrorCode,
) -> Result<(Bytes, Option<Source>), ApiError> {
    let header_source = match crate::auth::basic_auth_write_key(headers)? {
        Some(key) => Some(state.sources.authenticate_caller(Some(key), caller).await?),
        None => None,
    };
    let body = read_body(body, headers, limit, too_large).await?;
    Ok((body, header_source))
}

pub(crate) fn count(state: &AppState, outcome: &IngestOutcome) {
    state.metrics.count_events("stored", u64::from(outcome.stored));
    state.metrics.count_events("duplicate", u64::from(outcome.duplicates));
    state.metrics.count_events("rejected", u64::from(outcome.quarantined));
}

/// Requests whose events could not be made durable, logged at most every
/// 10 s (with how many were not): while the store or the stream is down,
/// every request fails, and the metrics count them all.
static FAILED_APPENDS: Mutex<RateLimitedWarning> = Mutex::new(RateLimitedWarning::new(Duration::from_secs(10)));

async fn append(state: &AppState, batch: IngestBatch) -> Result<IngestOutcome, ApiError> {
    state.log.append(batch).await.map_err(|error| {
        let admitted = FAILED_APPENDS.lock().unwrap_or_else(PoisonError::into_inner).admit(Instant::now());
        if let Some(held_back) = admitted {
            tracing::error!(%error, held_back, "events could not be made durable");
        }
        ApiError::unavailable()
    })
}

/// The refused messages as a response lists them.
pub(crate) fn rejected_json(rejected: &[RejectedMessage]) -> Vec<Value> {
    rejected
        .iter()
        .map(|refused| {
            json!({
                "index": refused.index,
                "code": refused.rejection.code.as_str(),
                "message": refused.rejection.message,
                "field": refused.rejection.field,
            })
        })
        .collect()
}

pub(crate) fn quarantine_record(source: &Source, received_at_ms: i64, refused: &RejectedMessage) -> QuarantineRecord {
    QuarantineRecord {
        source_id: source.id.clone(),
        received_at_ms,
        batch_index: refused.index.map(|index| index as u32),
        code: refused.rejection.code.as_str().to_owned(),
        field: refused.rejection.field.clone(),
        message: refused.rejection.message.clone(),
        payload: refused.raw.clone(),
    }
}

/// A body that could not be read as a request: keep it in quarantine when we
/// know whose it is, then return the error for the client.
async fn quarantine_unreadable(state: &AppState, source: Option<Source>, body: &[u8], error: ApiError) -> ApiError {
    let Some(source) = source else {
        return error;
    };
    if error.code.status() != StatusCode::BAD_REQUEST {
        return error;
    }
    let record = QuarantineRecord {
        source_id: source.id,
        received_at_ms: Utc::now().timestamp_millis(),
        batch_index: None,
        code: error.code.as_str().to_owned(),
        field: error.field.clone(),
        message: error.message.clone(),
        payload: String::from_utf8_lossy(body).into_owned(),
    };
    match append(state, IngestBatch { records: Vec::new(), rejected: vec![record], ..Default::default() }).await {
        Ok(outcome) => {
            count(state, &outcome);
            error
        }
        Err(unavailable) => unavailable,
    }
}

/// Reads the body within `limit` bytes, before and after gzip decompression.
pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    too_large: ErrorCode,
) -> Result<Bytes, ApiError> {
    let too_large =
        || ApiError::new(too_large, format!("body is larger than the limit of {limit} bytes")).with_field("body");
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let raw = axum::body::to_bytes(body, limit).await.map_err(|error| {
        if is_length_limit(&error) {
            too_large()
        } else if crate::connection::is_body_timeout(&error) {
            ApiError::new(ErrorCode::RequestTimeout, "the request body stalled; send it without pausing")
                .with_field("body")
        } else {
            ApiError::new(ErrorCode::InvalidRequest, "the request body could not be read").with_field("body")
        }
    })?;
    let encoding =
        headers.get(header::CONTENT_ENCODING).map(|value| value.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("") | Some("identity") => Ok(raw),
        Some("gzip") | Some("x-gzip") => {
            let mut decompressed = Vec::with_capacity(raw.len() * 4);
            flate2::read::GzDecoder::new(&raw[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut decompressed)
                .map_err(|_| ApiError::new(ErrorCode::InvalidEncoding, "body is not valid gzip").with_field("body"))?;
            if decompressed.len() > limit {
                return Err(too_large());
            }
            Ok(Bytes::from(decompressed))
        }
        Some(other) => Err(ApiError::new(
            ErrorCode::InvalidEncoding,
            format!("content-encoding {other:?} is not supported, use gzip or none"),
        )
        .with_field("content-encoding")),
    }
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = current.source();
    }
    false
}
