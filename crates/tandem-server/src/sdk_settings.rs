//! The settings browser SDKs fetch before they send anything: Segment's
//! analytics.js asks `GET {cdnURL}/v1/projects/{writeKey}/settings`, and
//! RudderStack's JavaScript SDK asks `GET {configUrl}/sourceConfig`. Tandem
//! answers both for website and app sources (mobile SDKs fetch the same
//! settings), pointing the SDK's event delivery back at the host the request
//! reached, so `writeKey` and the CDN or config URL are the only settings a
//! page needs. No destinations are listed: Tandem itself is the one place
//! events go, and delivery onwards happens server-side.

use crate::auth::basic_auth_write_key;
use crate::error::{ApiError, ErrorCode};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tandem_core::{Source, SourceKind, WriteKey};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/projects/{write_key}/settings", get(segment_settings))
        .route("/sourceConfig", get(rudderstack_source_config))
        .route("/sourceConfig/", get(rudderstack_source_config))
}

/// The source behind a write key, if browser SDKs may load its settings.
async fn browser_source(state: &AppState, write_key: Option<WriteKey>) -> Result<Source, ApiError> {
    let source = state.sources.authenticate(write_key).await?;
    match source.kind {
        SourceKind::Website | SourceKind::App => Ok(source),
        other => Err(ApiError::new(
            ErrorCode::SourceNotFound,
            format!(
                "source {:?} is a {other} source; SDK settings are served for website and app sources",
                source.name
            ),
        )
        .with_field("writeKey")),
    }
}

/// Where the SDK should send events: the scheme and host the settings request
/// came through (a proxy in front of Tandem says so with `X-Forwarded-Proto`
/// and `X-Forwarded-Host`). Tandem itself serves plain HTTP.
fn public_origin(headers: &HeaderMap) -> (String, String) {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(',').next())
            .map(str::trim)
            .filter(|value| !value.is_empty())
            .map(str::to_owned)
    };
    let protocol = text("x-forwarded-proto").filter(|proto| proto == "https" || proto == "http");
    let host = text("x-forwarded-host").or_else(|| text(header::HOST.as_str()));
    (protocol.unwrap_or_else(|| "http".to_owned()), host.unwrap_or_else(|| "127.0.0.1:8080".to_owned()))
}

/// The CDN settings analytics.js (analytics-next) reads: only the Segment.io
/// integration, aimed at this server, with SDK metrics switched off (they
/// would otherwise go to Segment's own API).
pub fn segment_settings_json(source: &Source, protocol: &str, host: &str) -> Value {
    json!({
        "integrations": {
            "Segment.io": {
                "apiKey": source.write_key,
                "apiHost": format!("{host}/v1"),
                "protocol": protocol,
                "unbundledIntegrations": [],
                "addBundledMetadata": true,
                "maybeBundledConfigIds": {},
            }
        },
        "plan": {
            "track": {"__default": {"enabled": true, "integrations": {}}},
            "identify": {"__default": {"enabled": true}},
            "group": {"__default": {"enabled": true}},
        },
        "edgeFunction": {},
        "analyticsNextEnabled": true,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0},
        "legacyVideoPluginsEnabled": false,
        "remotePlugins": [],
    })
}

async fn segment_settings(
    State(state): State<AppState>,
    Path(write_key): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let source = browser_source(&state, Some(WriteKey::new(write_key))).await?;
    let (protocol, host) = public_origin(&headers);
    Ok(Json(segment_settings_json(&source, &protocol, &host)))
}

/// The source configuration RudderStack's JavaScript SDK reads: the source,
/// enabled, with no device-mode destinations and the SDK's own error and
/// metrics reporting off.
pub fn rudderstack_source_config_json(source: &Source) -> Value {
    json!({
        "isHosted": false,
        "source": {
            "id": source.id,
            "name": source.name,
            "writeKey": source.write_key,
            "enabled": true,
            "workspaceId": "tandem",
            "config": {
                "statsCollection": {
                    "errorReports": {"enabled": false},
                    "metrics": {"enabled": false},
                }
            },
            "destinations": [],
        }
    })
}

#[derive(Deserialize)]
struct SourceConfigQuery {
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
}

/// The SDK sends its write key as the Basic auth user name; the `writeKey`
/// query parameter serves clients that cannot set headers.
async fn rudderstack_source_config(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<SourceConfigQuery>,
) -> Result<Json<Value>, ApiError> {
    let write_key = match basic_auth_write_key(&headers)? {
        Some(key) => Some(key),
        None => query.write_key.filter(|key| !key.is_empty()).map(WriteKey::new),
    };
    let source = browser_source(&state, write_key).await?;
    Ok(Json(rudderstack_source_config_json(&source)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_public_origin_prefers_what_a_proxy_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("10.0.0.5:8080"));
        assert_eq!(public_origin(&headers), ("http".to_owned(), "10.0.0.5:8080".to_owned()));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https, http"));
        headers.insert("x-forwarded-host", HeaderValue::from_static("cdp.example.com"));
        assert_eq!(public_origin(&headers), ("https".to_owned(), "cdp.example.com".to_owned()));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("gopher"));
        assert_eq!(public_origin(&headers).0, "http");
    }
}
