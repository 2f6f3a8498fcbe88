//! Webhooks over HTTP: `POST /v1/webhooks/{source_id}` checks the delivery's
//! signature when the source has a secret, lets [`tandem_core::webhook`] turn
//! the payload into messages, validates them like tracking calls and appends
//! them through the log writer; `GET` answers Facebook's subscription
//! handshake (`hub.mode`, `hub.verify_token`, `hub.challenge`). Messages get
//! ids derived from the delivery, so a redelivered webhook is stored once.
//! Each event passes the same governance as a tracking call
//! ([`crate::govern::Gate`]): suppression, refused red values, the source's
//! tracking plan.

use crate::error::{ApiError, ErrorCode};
use crate::extract::{ApiPath, ApiQuery};
use crate::AppState;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use chrono::Utc;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;
use tandem_core::collect::{
    normalize_message, replace_lone_surrogates, BatchDefaults, IdRequirement, RejectedMessage, Rejection,
    RejectionCode, RequestContext, MAX_REQUEST_BYTES,
};
use tandem_core::govern::dsr::payload_digest;
use tandem_core::webhook::{messages_for, verify_signature, WebhookSettings, SIGNATURE_HEADER};
use tandem_core::{Source, SourceId};
use tandem_store::{Dedup, IngestBatch};

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/webhooks/{source_id}", get(verify_subscription).post(deliver))
}

async fn webhook_source(state: &AppState, source_id: String) -> Result<(Source, WebhookSettings), ApiError> {
    let store = state.store.clone();
    let id = SourceId::new(source_id.clone());
    tokio::task::spawn_blocking(move || store.webhook(&id))
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
        .map_err(|error| {
            tracing::error!(%error, "webhook source lookup failed");
            ApiError::unavailable()
        })?
        .ok_or_else(|| {
            ApiError::new(ErrorCode::SourceNotFound, format!("no webhook source {source_id}")).with_field("source_id")
        })
}

/// Facebook's handshake: echo `hub.challenge` when the verify token matches.
async fn verify_subscription(
    State(state): State<AppState>,
    ApiPath(source_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (_, settings) = webhook_source(&state, source_id).await?;
    if query.get("hub.mode").map(String::as_str) != Some("subscribe") {
        return Err(ApiError::new(ErrorCode::InvalidValue, "hub.mode must be subscribe").with_field("hub.mode"));
    }
    let challenge = query.get("hub.challenge").ok_or_else(|| {
        ApiError::new(ErrorCode::MissingField, "hub.challenge is required").with_field("hub.challenge")
    })?;
    match (&settings.verify_token, query.get("hub.verify_token")) {
        (Some(expected), Some(given)) if expected == given => {
            Ok(([(header::CONTENT_TYPE, "text/plain")], challenge.clone()).into_response())
        }
        _ => Err(ApiError::new(ErrorCode::InvalidVerifyToken, "hub.verify_token does not match this source")
            .with_field("hub.verify_token")),
    }
}

async fn deliver(
    State(state): State<AppState>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    ApiPath(source_id): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = receive(&state, connect, source_id, &headers, body).await;
    crate::collect::finish(&state, "/v1/webhooks", started, result)
}

async fn receive(
    state: &AppState,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    source_id: String,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    let (source, settings) = webhook_source(state, source_id).await?;
    let body = crate::collect::read_body(body, headers, MAX_REQUEST_BYTES, ErrorCode::RequestTooLarge).await?;
    if let Some(secret) = &settings.secret {
        let signature = headers.get(SIGNATURE_HEADER).and_then(|value| value.to_str().ok());
        verify_signature(secret, &body, signature).map_err(|error| {
            ApiError::new(ErrorCode::InvalidSignature, error.to_string()).with_field(SIGNATURE_HEADER)
        })?;
    }
    let payload: Value = serde_json::from_slice(&replace_lone_surrogates(&body))
        .map_err(|error| ApiError::new(ErrorCode::InvalidJson, format!("body is not valid json: {error}")))?;
    let messages = messages_for(&settings, &source.id, &payload)
        .map_err(|error| ApiError::new(ErrorCode::InvalidRequest, error.message).with_field(error.field))?;

    let received_at = Utc::now();
    let client_ip = connect.map(|Extension(ConnectInfo(address))| address.ip().to_string());
    let request = RequestContext {
        source_id: &source.id,
        received_at,
        client_ip: client_ip.as_deref(),
        ids: IdRequirement::Mapped,
    };
    let received_at_ms = received_at.timestamp_millis();
    let gate = crate::govern::Gate::for_source(state, &source.id).await?;
    let mut batch = IngestBatch { dedup: Dedup::Forever, ..Default::default() };
    let mut refused = Vec::new();
    let mut unreadable = Vec::new();
    for (index, message) in messages.into_iter().enumerate() {
        let rejection = match message {
            Ok(message) => match normalize_message(message, None, &BatchDefaults::default(), &request) {
                Ok(event) => {
                    // Governance judges each event on its own: what it
                    // keeps of a refused one is that event, not the delivery.
                    let raw =
                        if gate.inspects() { serde_json::to_string(&event).unwrap_or_default() } else { String::new() };
                    match gate.check(event, Some(index), &|| raw.clone(), received_at_ms, &mut batch.violations) {
                        Ok(event) => batch.records.push(event.to_log_record()),
                        Err(governed) => refused.push(governed),
                    }
                    continue;
                }
                Err(rejection) => rejection,
            },
            Err(error) => Rejection { code: RejectionCode::InvalidValue, field: error.column, message: error.reason },
        };
        unreadable.push((index, rejection));
    }
    if !unreadable.is_empty() {
        // Quarantine keeps what the sender sent: the delivery (its red values
        // hashed by the log writer), or only its digest when it also
        // carried a suppressed person.
        let suppressed = refused.iter().any(|governed| governed.rejection.code == RejectionCode::Suppressed);
        let delivery = if suppressed { payload_digest(&body) } else { String::from_utf8_lossy(&body).into_owned() };
        refused.extend(unreadable.into_iter().map(|(index, rejection)| RejectedMessage {
            index: Some(index),
            raw: delivery.clone(),
            rejection,
        }));
        refused.sort_by_key(|message| message.index);
    }
    batch.rejected =
        refused.iter().map(|message| crate::collect::quarantine_record(&source, received_at_ms, message)).collect();
    let rejected = crate::collect::rejected_json(&refused);
    let accepted = batch.records.len();
    let outcome = state.log.append(batch).await.map_err(|error| {
        tracing::error!(%error, "webhook events could not be made durable");
        ApiError::unavailable()
    })?;
    crate::collect::count(state, &outcome);
    if let (0, Some(first)) = (accepted, refused.first()) {
        let message = format!("no event in the delivery was accepted: {}", first.rejection.message);
        let error = ApiError::new(ErrorCode::InvalidValue, message).with_extra("rejected", Value::Array(rejected));
        return Err(match &first.rejection.field {
            Some(field) => error.with_field(field.clone()),
            None => error,
        });
    }
    Ok(json!({
        "success": true,
        "accepted": accepted,
        "stored": outcome.stored,
        "duplicates": outcome.duplicates,
        "rejected": rejected,
    }))
}
