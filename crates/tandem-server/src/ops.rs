//! Operations endpoints (`/health`, `/metrics`), the JSON answers for unknown
//! routes, and the CORS headers that let browser SDKs post from any site.

use crate::error::{ApiError, ErrorCode};
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// How long `/health` waits for the store to answer before calling it down.
const STORE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `GET /health`: 200 when the store answers, 503 with the store's error when
/// it does not; either way the store's kind and this node's stage leases
/// (`{"resolve": true}` on the node running the resolver).
pub async fn health(State(state): State<AppState>) -> Response {
    let store = state.store.clone();
    let kind = store.kind().name();
    let check = tokio::task::spawn_blocking(move || store.ping());
    let problem = match tokio::time::timeout(STORE_CHECK_TIMEOUT, check).await {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(error))) => Some(error.to_string()),
        Ok(Err(_)) => Some("the store check panicked".to_owned()),
        Err(_) => Some(format!("the store did not answer within {} s", STORE_CHECK_TIMEOUT.as_secs())),
    };
    let leases = state.leases.snapshot();
    // With an event stream, an acknowledged event lives there until drained:
    // a node that cannot reach it cannot take events, so it is unhealthy too.
    let log = state.stream.as_ref().map(|stream| (stream.name().to_owned(), stream.is_connected()));
    let log_json = log.as_ref().map(|(stream, ok)| json!({"kind": "nats", "stream": stream, "ok": ok}));
    let log_ok = log.as_ref().is_none_or(|(_, ok)| *ok);
    let mut body = match &problem {
        None => json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "store": {"kind": kind, "ok": true},
            "leases": leases,
        }),
        Some(error) => {
            tracing::warn!(%error, "health check: the store does not answer");
            json!({
                "status": "unavailable",
                "version": env!("CARGO_PKG_VERSION"),
                "store": {"kind": kind, "ok": false, "error": error},
                "leases": leases,
            })
        }
    };
    if let Some(log_json) = log_json {
        body["log"] = log_json;
    }
    if problem.is_none() && log_ok {
        Json(body).into_response()
    } else {
        if !log_ok {
            tracing::warn!("health check: the event stream is not connected");
        }
        body["status"] = json!("unavailable");
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint").with_field("path")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "this endpoint does not accept that method").with_field("method")
}

/// What a preflight allows when it does not echo the requested headers.
const ALLOWED_HEADERS: &str = "Authorization, Content-Type, Content-Encoding";

/// Paths browser SDKs call across origins: the tracking API and the SDK
/// settings (`/v1/...`, `/sourceConfig`).
fn is_browser_sdk_path(path: &str) -> bool {
    path.starts_with("/v1/") || path.starts_with("/sourceConfig")
}

/// Browser SDKs (analytics.js, RudderStack's) post across origins: answer
/// preflights and allow any origin, as Segment's endpoint does. On the paths
/// browser SDKs use, a preflight allows exactly the headers it asks for: the
/// SDKs add headers over time (analytics.js retries carry `X-Retry-Count`),
/// and a fixed list silently blocks every request that carries a new one.
pub async fn cors(request: Request, next: Next) -> Response {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut response = if request.method() == Method::OPTIONS {
        let requested = request.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
        let mut preflight = StatusCode::NO_CONTENT.into_response();
        let headers = preflight.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
        let allowed = match requested {
            Some(requested) if is_browser_sdk_path(request.uri().path()) => requested,
            _ => HeaderValue::from_static(ALLOWED_HEADERS),
        };
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed);
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
        preflight
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    match origin {
        Some(origin) => {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
            headers.insert(header::VARY, HeaderValue::from_static("Origin, Access-Control-Request-Headers"));
        }
        None => {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        }
    }
    response
}
