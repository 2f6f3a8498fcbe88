//! The tracking API end to end through the router (no socket): every call,
//! authentication, limits, partial batches, quarantine, dedup, operations.

use axum::body::{to_bytes, Body};
use axum::extract::ConnectInfo;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use tandem_core::{LogPosition, Source, SourceKind};
use tandem_server::{router, AppState, DEFAULT_DEDUP_WINDOW};
use tandem_store::prelude::*;
use tandem_store::SqliteStore;
use tower::ServiceExt;

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    app: Router,
    source: Source,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let source = store.create_source("website", SourceKind::Website).unwrap();
        let (state, _writer) = AppState::start(store.clone(), DEFAULT_DEDUP_WINDOW, dir.path().join("imports"));
        Harness { _dir: dir, store, app: router(state), source }
    }

    fn basic(&self) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:", self.source.write_key)))
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        let mut request = request;
        request.extensions_mut().insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 7], 5555))));
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, body)
    }

    async fn post(&self, path: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        let request = Request::post(path).header(header::AUTHORIZATION, self.basic()).body(body.into()).unwrap();
        self.send(request).await
    }

    async fn post_json(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.post(path, body.to_string()).await
    }

    fn events(&self) -> Vec<Value> {
        self.store
            .read_log(LogPosition(0), 100_000)
            .unwrap()
            .iter()
            .map(|entry| serde_json::from_str(&entry.payload).unwrap())
            .collect()
    }
}

fn error_of(body: &Value) -> (&str, Option<&str>) {
    (body["error"]["code"].as_str().unwrap(), body["error"]["field"].as_str())
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn every_call_is_accepted_and_stored_with_its_fields() {
    let harness = Harness::new();
    let calls = [
        ("/v1/identify", json!({"userId": "u1", "traits": {"email": "ann@example.com"}, "messageId": "m-identify"})),
        (
            "/v1/track",
            json!({"userId": "u1", "event": "Order Completed", "properties": {"revenue": 30}, "messageId": "m-track"}),
        ),
        (
            "/v1/page",
            json!({"anonymousId": "a1", "name": "Pricing", "category": "Docs", "properties": {"url": "https://x.test/pricing"}, "messageId": "m-page"}),
        ),
        ("/v1/screen", json!({"userId": "u1", "name": "Home", "messageId": "m-screen"})),
        (
            "/v1/group",
            json!({"userId": "u1", "groupId": "acme", "traits": {"plan": "enterprise"}, "messageId": "m-group"}),
        ),
        ("/v1/alias", json!({"previousId": "a1", "userId": "u1", "messageId": "m-alias"})),
    ];
    for (path, body) in &calls {
        let (status, response) = harness.post_json(path, body.clone()).await;
        assert_eq!((status, &response), (StatusCode::OK, &json!({"success": true})), "{path}");
    }
    let events = harness.events();
    let types: Vec<_> = events.iter().map(|event| event["type"].as_str().unwrap()).collect();
    assert_eq!(types, vec!["identify", "track", "page", "screen", "group", "alias"]);
    assert_eq!(events[0]["traits"]["email"], "ann@example.com");
    assert_eq!(events[1]["event"], "Order Completed");
    assert_eq!(events[1]["properties"]["revenue"], 30);
    assert_eq!(events[2]["category"], "Docs");
    assert_eq!(events[4]["groupId"], "acme");
    assert_eq!(events[5]["previousId"], "a1");
    for event in &events {
        assert_eq!(event["sourceId"], harness.source.id.as_str());
        assert_eq!(event["context"]["ip"], "192.0.2.7", "ip from the connection");
        assert!(event["receivedAt"].is_string() && event["timestamp"].is_string());
    }
}

#[tokio::test]
async fn analytics_js_short_paths_and_import_reach_the_same_log() {
    let harness = Harness::new();
    let key = harness.source.write_key.as_str();
    for (path, body) in [
        ("/v1/t", json!({"writeKey": key, "anonymousId": "a", "event": "Clicked"})),
        ("/v1/p", json!({"writeKey": key, "anonymousId": "a"})),
        ("/v1/import", json!({"writeKey": key, "batch": [{"type": "identify", "userId": "u"}]})),
    ] {
        let request =
            Request::post(path).header(header::CONTENT_TYPE, "text/plain").body(Body::from(body.to_string())).unwrap();
        assert_eq!(harness.send(request).await.0, StatusCode::OK, "{path}");
    }
    assert_eq!(harness.events().len(), 3);
}

#[tokio::test]
async fn write_keys_authenticate_by_basic_auth_or_body() {
    let harness = Harness::new();
    let key = harness.source.write_key.as_str();
    let encoded = base64::engine::general_purpose::STANDARD.encode(key);
    let no_colon = Request::post("/v1/track")
        .header(header::AUTHORIZATION, format!("Basic {encoded}"))
        .body(Body::from(r#"{"userId":"u","event":"E"}"#))
        .unwrap();
    assert_eq!(harness.send(no_colon).await.0, StatusCode::OK);
    let in_body = Request::post("/v1/track")
        .body(Body::from(json!({"writeKey": key, "userId": "u", "event": "E"}).to_string()))
        .unwrap();
    assert_eq!(harness.send(in_body).await.0, StatusCode::OK);

    let missing = Request::post("/v1/track").body(Body::from(r#"{"userId":"u","event":"E"}"#)).unwrap();
    let (status, body) = harness.send(missing).await;
    assert_eq!((status, error_of(&body)), (StatusCode::UNAUTHORIZED, ("missing_write_key", Some("writeKey"))));
    let unknown = Request::post("/v1/batch").body(Body::from(r#"{"writeKey":"nope","batch":[]}"#)).unwrap();
    let (status, body) = harness.send(unknown).await;
    assert_eq!((status, error_of(&body)), (StatusCode::UNAUTHORIZED, ("invalid_write_key", Some("writeKey"))));
    let wrong_header = Request::post("/v1/track")
        .header(header::AUTHORIZATION, "Basic bm9wZTo=")
        .body(Body::from(r#"{"userId":"u","event":"E"}"#))
        .unwrap();
    assert_eq!(harness.send(wrong_header).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(harness.events().len(), 2);
}

#[tokio::test]
async fn malformed_bodies_get_400_naming_the_problem_and_are_quarantined() {
    let harness = Harness::new();
    let (status, body) = harness.post("/v1/track", "{\"userId\": ").await;
    assert_eq!((status, error_of(&body).0), (StatusCode::BAD_REQUEST, "invalid_json"));
    let (status, body) = harness.post("/v1/batch", "[1, 2]").await;
    assert_eq!((status, error_of(&body).0), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (status, body) = harness.post_json("/v1/batch", json!({"batch": "nope"})).await;
    assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_request", Some("batch"))));
    let (status, body) = harness.post_json("/v1/batch", json!({"batch": [], "context": [1]})).await;
    assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_request", Some("context"))));
    let quarantine = harness.store.list_quarantine(0, 10).unwrap();
    assert_eq!(quarantine.len(), 4);
    assert_eq!(quarantine[0].record.code, "invalid_json");
    assert_eq!(quarantine[0].record.payload, "{\"userId\": ");
}

#[tokio::test]
async fn wrong_types_and_missing_ids_name_the_field() {
    let harness = Harness::new();
    let cases = [
        ("/v1/track", json!({"event": "E"}), "missing_field", "userId"),
        ("/v1/track", json!({"userId": "u"}), "missing_field", "event"),
        ("/v1/track", json!({"userId": ["u"], "event": "E"}), "invalid_type", "userId"),
        ("/v1/identify", json!({"userId": "u", "traits": "vip"}), "invalid_type", "traits"),
        ("/v1/identify", json!({"userId": "u", "timestamp": "last tuesday"}), "invalid_value", "timestamp"),
        ("/v1/identify", json!({"userId": "u", "messageId": "x".repeat(101)}), "invalid_value", "messageId"),
        ("/v1/group", json!({"userId": "u"}), "missing_field", "groupId"),
        ("/v1/alias", json!({"userId": "u"}), "missing_field", "previousId"),
    ];
    for (path, body, code, field) in cases {
        let (status, response) = harness.post_json(path, body.clone()).await;
        assert_eq!((status, error_of(&response)), (StatusCode::BAD_REQUEST, (code, Some(field))), "{path} {body}");
    }
    assert!(harness.events().is_empty());
    assert_eq!(harness.store.list_quarantine(0, 100).unwrap().len(), 8, "every refusal is kept");
    // The server keeps serving.
    assert_eq!(harness.post_json("/v1/track", json!({"userId": "u", "event": "E"})).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_batch_stores_its_valid_messages_and_lists_the_rejected_ones() {
    let harness = Harness::new();
    let (status, body) = harness
        .post_json(
            "/v1/batch",
            json!({"batch": [
                {"type": "track", "userId": "u", "event": "A", "messageId": "ok-1"},
                {"type": "track", "userId": "u"},
                {"type": "identify", "userId": "u", "messageId": "ok-2"},
                {"userId": "u"},
                {"type": "page", "anonymousId": "a", "properties": {"blob": "x".repeat(33 * 1024)}}
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["success"], true);
    let rejected: Vec<_> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["index"].as_u64().unwrap(),
                item["code"].as_str().unwrap().to_owned(),
                item["field"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        vec![
            (1, "missing_field".to_owned(), Some("event".to_owned())),
            (3, "missing_field".to_owned(), Some("type".to_owned())),
            (4, "message_too_large".to_owned(), None)
        ]
    );
    let stored: Vec<_> = harness.events().iter().map(|event| event["messageId"].as_str().unwrap().to_owned()).collect();
    assert_eq!(stored, vec!["ok-1", "ok-2"]);
    let quarantine = harness.store.list_quarantine(0, 10).unwrap();
    assert_eq!(
        quarantine.iter().map(|entry| entry.record.batch_index).collect::<Vec<_>>(),
        vec![Some(1), Some(3), Some(4)]
    );
    assert_eq!(serde_json::from_str::<Value>(&quarantine[1].record.payload).unwrap(), json!({"userId": "u"}));
}

#[tokio::test]
async fn a_batch_with_no_valid_message_is_a_400_listing_each() {
    let harness = Harness::new();
    let (status, body) =
        harness.post_json("/v1/batch", json!({"batch": [{"type": "track"}, {"type": "alias", "userId": "u"}]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body), ("missing_field", Some("batch[0].userId")));
    assert_eq!(body["rejected"].as_array().unwrap().len(), 2);
    assert_eq!(harness.store.list_quarantine(0, 10).unwrap().len(), 2);
}

#[tokio::test]
async fn size_limits_answer_413() {
    let harness = Harness::new();
    let big_message = json!({"userId": "u", "event": "E", "properties": {"blob": "x".repeat(33 * 1024)}});
    let (status, body) = harness.post_json("/v1/track", big_message).await;
    assert_eq!((status, error_of(&body).0), (StatusCode::PAYLOAD_TOO_LARGE, "message_too_large"));

    let message = json!({"type": "track", "userId": "u", "event": "E", "properties": {"blob": "x".repeat(20 * 1024)}});
    let big_batch = json!({"batch": vec![message; 30]});
    let (status, body) = harness.post_json("/v1/batch", big_batch).await;
    assert_eq!((status, error_of(&body).0), (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"));

    let many = json!({"batch": vec![json!({"type": "track", "userId": "u", "event": "E"}); 2_501]});
    let (status, body) = harness.post_json("/v1/batch", many).await;
    assert_eq!((status, error_of(&body)), (StatusCode::PAYLOAD_TOO_LARGE, ("too_many_messages", Some("batch"))));

    // A small gzip body that inflates past the limit.
    let bomb = gzip(format!("{{\"batch\": [], \"pad\": \"{}\"}}", " ".repeat(2 * 1024 * 1024)).as_bytes());
    assert!(bomb.len() < 100 * 1024);
    let request = Request::post("/v1/batch")
        .header(header::AUTHORIZATION, harness.basic())
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(bomb))
        .unwrap();
    let (status, body) = harness.send(request).await;
    assert_eq!((status, error_of(&body).0), (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"));
    assert!(harness.events().is_empty());
    assert_eq!(harness.post_json("/v1/track", json!({"userId": "u", "event": "E"})).await.0, StatusCode::OK);
}

#[tokio::test]
async fn gzip_bodies_are_accepted_and_bad_gzip_is_a_400() {
    let harness = Harness::new();
    let body = json!({"batch": [{"type": "track", "userId": "u", "event": "Zipped"}]}).to_string();
    let request = Request::post("/v1/batch")
        .header(header::AUTHORIZATION, harness.basic())
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(gzip(body.as_bytes())))
        .unwrap();
    assert_eq!(harness.send(request).await.0, StatusCode::OK);
    assert_eq!(harness.events()[0]["event"], "Zipped");

    let request = Request::post("/v1/batch")
        .header(header::AUTHORIZATION, harness.basic())
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(body.clone()))
        .unwrap();
    let (status, response) = harness.send(request).await;
    assert_eq!((status, error_of(&response)), (StatusCode::BAD_REQUEST, ("invalid_encoding", Some("body"))));
    let request = Request::post("/v1/batch")
        .header(header::AUTHORIZATION, harness.basic())
        .header(header::CONTENT_ENCODING, "br")
        .body(Body::from(body))
        .unwrap();
    let (status, response) = harness.send(request).await;
    assert_eq!(
        (status, error_of(&response)),
        (StatusCode::BAD_REQUEST, ("invalid_encoding", Some("content-encoding")))
    );
}

#[tokio::test]
async fn a_repeated_message_id_is_acknowledged_but_stored_once() {
    let harness = Harness::new();
    let message = json!({"userId": "u", "event": "Paid", "messageId": "pay-1"});
    assert_eq!(harness.post_json("/v1/track", message.clone()).await, (StatusCode::OK, json!({"success": true})));
    assert_eq!(harness.post_json("/v1/track", message.clone()).await, (StatusCode::OK, json!({"success": true})));
    let batch = json!({"batch": [{"type": "track", "userId": "u", "event": "Paid", "messageId": "pay-1"}, {"type": "track", "userId": "u", "event": "Paid", "messageId": "pay-2"}]});
    assert_eq!(harness.post_json("/v1/batch", batch).await.0, StatusCode::OK);
    assert_eq!(harness.events().len(), 2);
    let stats = harness.store.stats().unwrap();
    assert_eq!((stats.events, stats.duplicates), (2, 2));
}

#[tokio::test]
async fn batch_context_merges_and_clock_skew_is_corrected() {
    let harness = Harness::new();
    let (status, _) = harness
        .post_json(
            "/v1/batch",
            json!({
                "batch": [{"type": "track", "userId": "u", "event": "E", "timestamp": "2030-01-01T00:00:00Z", "context": {"ip": "203.0.113.9"}}],
                "context": {"library": {"name": "analytics-python", "version": "2.4.0"}, "ip": "198.51.100.1"},
                "integrations": {"All": false},
                "sentAt": "2030-01-01T00:00:30Z"
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let event = &harness.events()[0];
    assert_eq!(event["context"]["library"]["name"], "analytics-python");
    assert_eq!(event["context"]["ip"], "203.0.113.9", "the message's own context wins");
    assert_eq!(event["integrations"]["All"], false);
    assert_eq!(event["originalTimestamp"], "2030-01-01T00:00:00Z");
    let received = tandem_core::collect::parse_timestamp(event["receivedAt"].as_str().unwrap()).unwrap();
    let timestamp = tandem_core::collect::parse_timestamp(event["timestamp"].as_str().unwrap()).unwrap();
    assert_eq!(received - timestamp, chrono::Duration::seconds(30));
}

#[tokio::test]
async fn operations_endpoints_and_unknown_routes() {
    let harness = Harness::new();
    harness.post_json("/v1/track", json!({"userId": "u", "event": "E"})).await;
    harness.post_json("/v1/track", json!({"userId": "u"})).await;
    let (status, body) = harness.send(Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("ok")));
    assert_eq!(body["store"], json!({"kind": "sqlite", "ok": true}));
    let response = harness.app.clone().oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    assert!(text.contains("tandem_ingest_events_total{outcome=\"stored\"} 1"), "{text}");
    assert!(text.contains("tandem_ingest_events_total{outcome=\"rejected\"} 1"), "{text}");
    assert!(text.contains("tandem_http_requests_total{route=\"/v1/track\",status=\"400\"} 1"), "{text}");
    assert!(text.contains("tandem_http_request_duration_seconds_bucket"), "{text}");
    assert!(text.contains("tandem_log_commits_total"), "{text}");
    let (status, body) = harness.send(Request::get("/v2/nothing").body(Body::empty()).unwrap()).await;
    assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = harness.send(Request::get("/v1/track").body(Body::empty()).unwrap()).await;
    assert_eq!((status, error_of(&body).0), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
}

#[tokio::test]
async fn browsers_get_cors_preflight_answers() {
    let harness = Harness::new();
    let request = Request::builder()
        .method(Method::OPTIONS)
        .uri("/v1/t")
        .header(header::ORIGIN, "https://shop.example")
        .body(Body::empty())
        .unwrap();
    let response = harness.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://shop.example");
    assert!(response.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap().contains("Content-Type"));
}

#[tokio::test]
async fn browser_retries_with_x_retry_count_pass_the_cors_preflight() {
    let harness = Harness::new();
    let request = Request::builder()
        .method(Method::OPTIONS)
        .uri("/v1/t")
        .header(header::ORIGIN, "https://shop.example")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "content-type,x-retry-count")
        .body(Body::empty())
        .unwrap();
    let response = harness.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS], "content-type,x-retry-count");
    assert!(response.headers()[header::VARY].to_str().unwrap().contains("Access-Control-Request-Headers"));
    // The admin API keeps its fixed list.
    let request = Request::builder()
        .method(Method::OPTIONS)
        .uri("/api/v1/profiles")
        .header(header::ORIGIN, "https://shop.example")
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "x-anything")
        .body(Body::empty())
        .unwrap();
    let response = harness.app.clone().oneshot(request).await.unwrap();
    assert_eq!(
        response.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS],
        "Authorization, Content-Type, Content-Encoding"
    );
}

#[tokio::test]
async fn browser_sdks_load_their_settings_for_website_sources() {
    let harness = Harness::new();
    let key = harness.source.write_key.to_string();
    let request = Request::get(format!("/v1/projects/{key}/settings"))
        .header(header::HOST, "cdp.internal:8080")
        .header(header::ORIGIN, "https://shop.example")
        .body(Body::empty())
        .unwrap();
    let (status, body) = harness.send(request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let segment = &body["integrations"]["Segment.io"];
    assert_eq!(segment["apiKey"], key.as_str());
    assert_eq!(segment["apiHost"], "cdp.internal:8080/v1");
    assert_eq!(segment["protocol"], "http");
    assert_eq!(body["metrics"]["sampleRate"], 0);

    let request = Request::get("/sourceConfig/?p=npm&v=3.0.0")
        .header(header::AUTHORIZATION, harness.basic())
        .body(Body::empty())
        .unwrap();
    let (status, body) = harness.send(request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["source"]["id"], harness.source.id.to_string());
    assert_eq!(body["source"]["writeKey"], key.as_str());
    assert_eq!(body["source"]["enabled"], true);
    assert_eq!(body["source"]["destinations"], json!([]));
    let (status, body) =
        harness.send(Request::get(format!("/sourceConfig?writeKey={key}")).body(Body::empty()).unwrap()).await;
    assert_eq!((status, body["source"]["name"].as_str()), (StatusCode::OK, Some("website")));

    let (status, body) =
        harness.send(Request::get("/v1/projects/no-such-key/settings").body(Body::empty()).unwrap()).await;
    assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "invalid_write_key"));
    let backend = harness.store.create_source("backend", SourceKind::Backend).unwrap();
    let (status, body) = harness
        .send(Request::get(format!("/v1/projects/{}/settings", backend.write_key)).body(Body::empty()).unwrap())
        .await;
    assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "source_not_found"));
    let (status, body) = harness.send(Request::get("/sourceConfig").body(Body::empty()).unwrap()).await;
    assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "missing_write_key"));
}

mod profiles {
    use super::*;
    use tandem_server::resolve::{Resolver, DEFAULT_BATCH};

    pub(super) async fn get(harness: &Harness, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut request = Request::get(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        harness.send(request.body(Body::empty()).unwrap()).await
    }

    /// Ann browses anonymously, logs in, then is seen by e-mail on another
    /// device whose anonymous profile merges into hers.
    async fn with_ann(harness: &Harness) -> String {
        let (status, _) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "page", "anonymousId": "anon-1", "name": "Pricing", "messageId": "e1"},
                    {"type": "track", "anonymousId": "phone-7", "event": "App Opened", "context": {"traits": {"email": "ANN@example.com"}}, "messageId": "e2"},
                    {"type": "identify", "anonymousId": "anon-1", "userId": "ann", "traits": {"email": "ann@example.com", "plan": "pro"}, "messageId": "e3"},
                    {"type": "track", "userId": "bob", "event": "Other Person", "messageId": "e4"}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let store: Arc<dyn Store> = harness.store.clone();
        Resolver::load(store).unwrap().catch_up(DEFAULT_BATCH).unwrap();
        harness.store.create_token("test").unwrap().1
    }

    #[tokio::test]
    async fn profiles_are_found_by_id_and_by_any_identifier() {
        let harness = Harness::new();
        let token = with_ann(&harness).await;
        let (status, by_email) = get(&harness, "/api/v1/profiles?identifier=email:Ann@Example.com", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(by_email["id"], "prof_1", "the older profile survives the merge");
        assert_eq!(by_email["traits"]["plan"], "pro");
        assert_eq!(by_email["event_counts"], json!({"page": 1, "track": 1, "identify": 1}));
        let identifiers: Vec<String> = by_email["identifiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|identifier| {
                format!("{}:{}", identifier["type"].as_str().unwrap(), identifier["value"].as_str().unwrap())
            })
            .collect();
        assert_eq!(identifiers.len(), 4, "{identifiers:?}");
        assert!(identifiers.contains(&"anonymous_id:phone-7".to_owned()));
        let (status, by_id) = get(&harness, "/api/v1/profiles/prof_1", Some(&token)).await;
        assert_eq!((status, &by_id), (StatusCode::OK, &by_email));
        let (status, merged_away) = get(&harness, "/api/v1/profiles/prof_2", Some(&token)).await;
        assert_eq!(
            (status, merged_away["id"].as_str()),
            (StatusCode::OK, Some("prof_1")),
            "merged-away ids still resolve"
        );
        let (_, bob) = get(&harness, "/api/v1/profiles?identifier=user_id:bob", Some(&token)).await;
        assert_eq!(bob["id"], "prof_3");
    }

    /// Regression: a stored identifier could not always be looked up. A
    /// phone written without its country code, under a region, is found by
    /// the same writing and by its E.164 form, which is what the profile shows.
    #[tokio::test]
    async fn phones_are_looked_up_as_events_normalize_them() {
        let harness = Harness::new();
        let rules = tandem_core::IdentityRules { phone_region: Some("DE".into()), ..Default::default() };
        tandem_server::resolve::set_rules(harness.store.as_ref(), rules).unwrap();
        let message =
            json!({"type": "identify", "userId": "jan", "traits": {"phone": "030 1234567"}, "messageId": "p1"});
        assert_eq!(harness.post_json("/v1/identify", message).await.0, StatusCode::OK);
        let store: Arc<dyn Store> = harness.store.clone();
        Resolver::load(store).unwrap().catch_up(DEFAULT_BATCH).unwrap();
        let token = harness.store.create_token("test").unwrap().1;
        let (status, shown) = get(&harness, "/api/v1/profiles?identifier=user_id:jan", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        let phone = shown["identifiers"].as_array().unwrap().iter().find(|identifier| identifier["type"] == "phone");
        assert_eq!(phone.unwrap()["value"], "+49301234567");
        for written in ["phone:%2B49301234567", "phone:030%201234567", "phone:(0049)%2030%201234567"] {
            let (status, found) = get(&harness, &format!("/api/v1/profiles?identifier={written}"), Some(&token)).await;
            assert_eq!((status, &found["id"]), (StatusCode::OK, &shown["id"]), "{written}");
        }
        let (status, body) = get(&harness, "/api/v1/profiles?identifier=phone:00000", Some(&token)).await;
        assert_eq!((status, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("identifier")));
    }

    #[tokio::test]
    async fn the_timeline_is_newest_first_and_paginated() {
        let harness = Harness::new();
        let token = with_ann(&harness).await;
        let (status, page) = get(&harness, "/api/v1/profiles/prof_1/events?limit=2", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        let ids: Vec<&str> =
            page["events"].as_array().unwrap().iter().map(|event| event["messageId"].as_str().unwrap()).collect();
        assert_eq!(ids, vec!["e3", "e2"]);
        let before = page["next_before"].as_str().unwrap().to_owned();
        let (_, rest) =
            get(&harness, &format!("/api/v1/profiles/prof_1/events?limit=2&before={before}"), Some(&token)).await;
        let ids: Vec<&str> =
            rest["events"].as_array().unwrap().iter().map(|event| event["messageId"].as_str().unwrap()).collect();
        assert_eq!(ids, vec!["e1"]);
        assert_eq!(rest["next_before"], Value::Null);
        let (status, body) = get(&harness, "/api/v1/profiles/prof_1/events?before=12", Some(&token)).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_value", Some("before"))));
        let (status, body) = get(&harness, "/api/v1/profiles/prof_1/events?limit=0", Some(&token)).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_value", Some("limit"))));
    }

    #[tokio::test]
    async fn profiles_are_listed_and_searched_by_identifier_and_trait_a_page_at_a_time() {
        let harness = Harness::new();
        let token = with_ann(&harness).await;
        let ids = |body: &Value| -> Vec<String> {
            body["profiles"]
                .as_array()
                .unwrap()
                .iter()
                .map(|profile| profile["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let (status, all) = get(&harness, "/api/v1/profiles", Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{all}");
        assert_eq!(ids(&all).len(), 2, "ann (with the merged phone profile) and bob: {all}");
        assert_eq!(all["next_after"], Value::Null);
        let (_, first) = get(&harness, "/api/v1/profiles?limit=1", Some(&token)).await;
        let after = first["next_after"].as_str().unwrap_or_else(|| panic!("{first}")).to_owned();
        let (_, second) = get(&harness, &format!("/api/v1/profiles?limit=1&after={after}"), Some(&token)).await;
        assert_eq!([ids(&first), ids(&second)].concat(), ids(&all));
        let (_, anns) = get(&harness, "/api/v1/profiles?search=email:ANN", Some(&token)).await;
        assert_eq!(anns["profiles"].as_array().unwrap().len(), 1, "{anns}");
        assert_eq!(anns["profiles"][0]["traits"]["plan"], "pro");
        let (_, pro) = get(&harness, "/api/v1/profiles?trait=plan:PRO", Some(&token)).await;
        assert_eq!(ids(&pro), ids(&anns));
        let (_, bob) = get(&harness, "/api/v1/profiles?search=user_id:b&trait=plan:pro", Some(&token)).await;
        assert!(ids(&bob).is_empty(), "{bob}");
    }

    #[tokio::test]
    async fn identities_explain_every_link_with_its_event() {
        let harness = Harness::new();
        let token = with_ann(&harness).await;
        let (status, body) = get(&harness, "/api/v1/profiles/prof_1/identities", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        let history = body["history"].as_array().unwrap();
        let merge = history.iter().find(|entry| entry["kind"] == "merged").expect("the merge is recorded");
        assert_eq!(merge["merged"], json!(["prof_2"]));
        assert_eq!(merge["message_id"], "e3", "the triggering event");
        assert!(merge["identifiers"]
            .as_array()
            .unwrap()
            .contains(&json!({"type": "email", "value": "ann@example.com"})));
        let created = history.iter().filter(|entry| entry["kind"] == "created").count();
        assert_eq!(created, 2, "both original profiles' creation is part of the story");
    }

    #[tokio::test]
    async fn errors_need_a_token_and_name_the_problem() {
        let harness = Harness::new();
        let token = with_ann(&harness).await;
        let (status, body) = get(&harness, "/api/v1/profiles/prof_1", None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "missing_token"));
        let (status, body) = get(&harness, "/api/v1/profiles/prof_1", Some("tdm_nope")).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "invalid_token"));
        let (status, body) = get(&harness, "/api/v1/profiles/prof_99", Some(&token)).await;
        assert_eq!((status, error_of(&body)), (StatusCode::NOT_FOUND, ("profile_not_found", Some("id"))));
        let (status, body) = get(&harness, "/api/v1/profiles/ann", Some(&token)).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "profile_not_found"));
        let (status, body) = get(&harness, "/api/v1/profiles?identifier=no-colon", Some(&token)).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_identifier", Some("identifier"))));
        let (status, body) = get(&harness, "/api/v1/profiles?identifier=email:nobody@example.com", Some(&token)).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "profile_not_found"));
        for (query, field) in
            [("limit=abc", "limit"), ("limit=0", "limit"), ("trait=plan", "trait"), ("after=x", "after")]
        {
            let (status, body) = get(&harness, &format!("/api/v1/profiles?{query}"), Some(&token)).await;
            assert_eq!((status, error_of(&body).1), (StatusCode::BAD_REQUEST, Some(field)), "{query}: {body}");
        }
        let (status, body) =
            get(&harness, "/api/v1/profiles?identifier=user_id:a&identifier=user_id:b", Some(&token)).await;
        assert_eq!((status, error_of(&body).1), (StatusCode::BAD_REQUEST, Some("identifier")));
        let (status, body) = get(&harness, "/api/v1/profiles?limit=5", None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "missing_token"));
        let (status, _) = get(&harness, "/api/v1/profiles/prof_99/events", Some(&token)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}

mod imports {
    use super::profiles::get;
    use super::*;
    use tandem_server::resolve::{Resolver, DEFAULT_BATCH};

    const BOUNDARY: &str = "tandem-test-boundary";

    fn example(path: &str) -> String {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        std::fs::read_to_string(root.join(path)).unwrap()
    }

    /// A multipart/form-data body; a part with a file name is a file.
    pub(super) fn multipart(parts: &[(&str, Option<&str>, &str)]) -> String {
        let mut body = String::new();
        for (name, file_name, content) in parts {
            body.push_str(&format!("--{BOUNDARY}\r\n"));
            match file_name {
                Some(file_name) => body.push_str(&format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file_name}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )),
                None => body.push_str(&format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n")),
            }
            body.push_str(content);
            body.push_str("\r\n");
        }
        body.push_str(&format!("--{BOUNDARY}--\r\n"));
        body
    }

    pub(super) async fn upload(
        harness: &Harness,
        token: &str,
        parts: &[(&str, Option<&str>, &str)],
    ) -> (StatusCode, Value) {
        let request = Request::post("/api/v1/imports")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
            .body(Body::from(multipart(parts)))
            .unwrap();
        harness.send(request).await
    }

    /// Uploads a file and waits for its job to finish.
    async fn import(harness: &Harness, token: &str, source: &str, file: &str, mapping: &str) -> Value {
        let file_name = file.rsplit('/').next().unwrap();
        let (status, job) = upload(
            harness,
            token,
            &[
                ("source", None, source),
                ("mapping", None, &example(mapping)),
                ("file", Some(file_name), &example(file)),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        for _ in 0..200 {
            let (status, job) = get(harness, &format!("/api/v1/imports/{id}"), Some(token)).await;
            assert_eq!(status, StatusCode::OK);
            if job["status"] != "running" {
                return job;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("import job {id} did not finish");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_silo_and_the_website_join_into_one_customer() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        for (source, file, mapping) in [
            ("orders", "data/orders.csv", "mappings/orders.toml"),
            ("product", "data/product_usage.jsonl", "mappings/product_usage.toml"),
            ("helpdesk", "data/support_tickets.csv", "mappings/support_tickets.toml"),
            ("crm", "data/crm_contacts.csv", "mappings/crm_contacts.toml"),
            ("leads", "data/leads.csv", "mappings/leads.toml"),
        ] {
            harness.store.create_source(source, SourceKind::Import).unwrap();
            let job = import(&harness, &token, source, file, mapping).await;
            assert_eq!(job["status"], "succeeded", "{job}");
            assert_eq!(job["counts"]["rejected"], 0, "{source}: {job}");
            assert!(job["counts"]["imported"].as_u64().unwrap() >= 2, "{source}: {job}");
        }
        let (status, listed) = get(&harness, "/api/v1/imports", Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{listed}");
        let sources: Vec<&str> =
            listed["imports"].as_array().unwrap().iter().map(|job| job["source"].as_str().unwrap()).collect();
        assert_eq!(sources, ["leads", "crm", "helpdesk", "product", "orders"], "newest first");
        assert!(listed["imports"][0].get("first_rejects").is_none() && listed["imports"][0]["counts"].is_object());
        let (status, body) = get(&harness, "/api/v1/imports", None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "missing_token"));
        // Ann browsed the website anonymously, then logged in.
        let (status, _) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "page", "anonymousId": "web-anon-9", "name": "Pricing"},
                    {"type": "identify", "anonymousId": "web-anon-9", "userId": "u-ann"}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let store: Arc<dyn Store> = harness.store.clone();
        Resolver::load(store).unwrap().catch_up(DEFAULT_BATCH).unwrap();

        let (status, ann) = get(&harness, "/api/v1/profiles?identifier=anonymous_id:web-anon-9", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        let identifiers: Vec<String> = ann["identifiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|identifier| {
                format!("{}:{}", identifier["type"].as_str().unwrap(), identifier["value"].as_str().unwrap())
            })
            .collect();
        for expected in
            ["user_id:u-ann", "email:ann.lee@example.com", "crm_id:c-9001", "zendesk_id:zd-77", "phone:+49301234567"]
        {
            assert!(identifiers.contains(&expected.to_owned()), "{expected} missing from {identifiers:?}");
        }
        assert_eq!(ann["traits"]["company"], "Lee Consulting");
        // Web page + identify, 2 orders, 2 feature uses, 2 ticket events, CRM identify.
        assert_eq!(ann["event_counts"], json!({"page": 1, "identify": 2, "track": 6}), "{ann}");
        // Dan is known to the CRM and the lead form by e-mail only.
        let (_, dan) = get(&harness, "/api/v1/profiles?identifier=email:dan@example.com", Some(&token)).await;
        assert_eq!(dan["event_counts"], json!({"identify": 1, "track": 1}), "{dan}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reimports_add_nothing_and_rejects_can_be_fetched() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        harness.store.create_source("orders", SourceKind::Import).unwrap();
        let first = import(&harness, &token, "orders", "data/orders.csv", "mappings/orders.toml").await;
        assert_eq!((first["counts"]["imported"].as_u64(), first["counts"]["duplicates"].as_u64()), (Some(3), Some(0)));
        let again = import(&harness, &token, "orders", "data/orders.csv", "mappings/orders.toml").await;
        assert_eq!((again["counts"]["imported"].as_u64(), again["counts"]["duplicates"].as_u64()), (Some(0), Some(3)));

        let bad = "order_id,customer_id,email,ordered_at,total,currency,items,coupon\n\
                   o-9,u-9,x@example.com,not a date,1,EUR,1,\n";
        let (status, job) = upload(
            &harness,
            &token,
            &[
                ("file", Some("bad.csv"), bad),
                ("mapping", None, &example("mappings/orders.toml")),
                ("source", None, "orders"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let id = job["id"].as_str().unwrap();
        let mut job = job.clone();
        while job["status"] == "running" {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            job = get(&harness, &format!("/api/v1/imports/{id}"), Some(&token)).await.1;
        }
        assert_eq!(job["counts"]["rejected"], 1);
        assert_eq!(job["first_rejects"][0]["line"], 2);
        assert_eq!(job["first_rejects"][0]["column"], "ordered_at");
        let request = Request::get(format!("/api/v1/imports/{id}/rejects"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let (status, rejects) = harness.send(request).await;
        assert_eq!(status, StatusCode::OK);
        let rejects = rejects.as_str().unwrap();
        assert!(rejects.starts_with("line,column,reason,record\n2,ordered_at,"), "{rejects}");
        let filter = tandem_store::AuditFilter { action: Some("import.read_rejects".into()), ..Default::default() };
        let audited = harness.store.audit_entries(&filter).unwrap();
        assert_eq!(audited.len(), 1, "rows echoed as they were in the file are a read of PII in clear");
        assert_eq!(audited[0].target, id);
    }

    #[tokio::test]
    async fn bad_uploads_are_refused_naming_the_part() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        harness.store.create_source("orders", SourceKind::Import).unwrap();
        let mapping = example("mappings/orders.toml");
        let file = example("data/orders.csv");

        let (status, body) =
            upload(&harness, &token, &[("source", None, "orders"), ("file", Some("o.csv"), &file)]).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("missing_field", Some("mapping"))));
        let (status, body) = upload(
            &harness,
            &token,
            &[("source", None, "orders"), ("mapping", None, "type = \"track\"\n"), ("file", Some("o.csv"), &file)],
        )
        .await;
        assert_eq!(
            (status, error_of(&body)),
            (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_mapping", Some("mapping.event")))
        );
        let (status, body) = upload(
            &harness,
            &token,
            &[("source", None, "nope"), ("mapping", None, &mapping), ("file", Some("o.csv"), &file)],
        )
        .await;
        assert_eq!((status, error_of(&body)), (StatusCode::NOT_FOUND, ("source_not_found", Some("source"))));
        let (status, body) = upload(
            &harness,
            &token,
            &[("source", None, "orders"), ("mapping", None, &mapping), ("file", Some("orders.xlsx"), &file)],
        )
        .await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("missing_field", Some("format"))));
        let (status, body) = upload(&harness, "tdm_wrong", &[("source", None, "orders")]).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "invalid_token"));
        let (status, body) = get(&harness, "/api/v1/imports/imp_missing", Some(&token)).await;
        assert_eq!((status, error_of(&body)), (StatusCode::NOT_FOUND, ("import_not_found", Some("id"))));

        let missing_column = "order_id,customer_id,ordered_at\no-1,u-1,2026-01-01\n";
        let (status, body) = upload(
            &harness,
            &token,
            &[("source", None, "orders"), ("mapping", None, &mapping), ("file", Some("o.csv"), missing_column)],
        )
        .await;
        assert_eq!((status, error_of(&body)), (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_mapping", Some("mapping"))));
        assert!(body["error"]["message"].as_str().unwrap().contains("email"), "{body}");
        let (status, body) = upload(
            &harness,
            &token,
            &[("source", None, "orders"), ("mapping", None, &mapping), ("file", Some("o.jsonl"), "order_id,email\n")],
        )
        .await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("malformed_file", Some("file"))));
        assert!(body["error"]["message"].as_str().unwrap().starts_with("line 1:"), "{body}");
    }
}

mod webhooks {
    use super::*;
    use tandem_core::mapping::Mapping;
    use tandem_core::webhook::{sign, WebhookFormat, WebhookSettings};

    const SECRET: &str = "app-secret-42";

    fn hook(harness: &Harness, name: &str, format: WebhookFormat, secret: Option<&str>) -> Source {
        harness.store.create_source(name, SourceKind::Webhook).unwrap();
        let mapping = (format == WebhookFormat::Generic).then(|| {
            Mapping::from_toml(
                "event = \"Form Submitted\"\nrow_key = \"id\"\n[identifiers]\nemail = \"contact.email\"\n[properties]\nform = \"form\"",
            )
            .unwrap()
        });
        let settings = WebhookSettings {
            format,
            secret: secret.map(str::to_owned),
            verify_token: Some("verify-me".into()),
            mapping,
        };
        harness.store.set_webhook(name, &settings).unwrap()
    }

    async fn deliver(harness: &Harness, source: &Source, body: &str, signature: Option<String>) -> (StatusCode, Value) {
        let mut request = Request::post(format!("/v1/webhooks/{}", source.id));
        if let Some(signature) = signature {
            request = request.header("X-Hub-Signature-256", signature);
        }
        harness.send(request.body(Body::from(body.to_owned())).unwrap()).await
    }

    fn events_named(harness: &Harness, name: &str) -> Vec<Value> {
        harness
            .store
            .read_log(LogPosition(0), 100)
            .unwrap()
            .into_iter()
            .map(|entry| serde_json::from_str::<Value>(&entry.payload).unwrap())
            .filter(|event| event["event"] == name)
            .collect()
    }

    const LEAD: &str = r#"{"object":"page","entry":[{"id":"p1","time":1789000000,"changes":[{"field":"leadgen","value":{"leadgen_id":"9001","form_id":"f1","page_id":"p1","created_time":1789000000,"field_data":[{"name":"email","values":["erin@example.com"]}]}}]}]}"#;

    #[tokio::test]
    async fn signed_lead_notifications_become_lead_submitted_once() {
        let harness = Harness::new();
        let leads = hook(&harness, "fb-leads", WebhookFormat::FacebookLeads, Some(SECRET));
        let (status, body) = deliver(&harness, &leads, LEAD, Some(sign(SECRET, LEAD.as_bytes()))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!((body["accepted"].as_u64(), body["stored"].as_u64()), (Some(1), Some(1)));
        let (_, again) = deliver(&harness, &leads, LEAD, Some(sign(SECRET, LEAD.as_bytes()))).await;
        assert_eq!(again["duplicates"], 1, "a redelivery is stored once");
        let events = events_named(&harness, "Lead Submitted");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["properties"]["leadgen_id"], "9001");
        assert_eq!(events[0]["context"]["traits"]["email"], "erin@example.com");
        assert_eq!(events[0]["sourceId"], leads.id.as_str());
    }

    #[tokio::test]
    async fn bad_or_missing_signatures_are_refused_and_nothing_is_stored() {
        let harness = Harness::new();
        let leads = hook(&harness, "fb-leads", WebhookFormat::FacebookLeads, Some(SECRET));
        let (status, body) = deliver(&harness, &leads, LEAD, Some(sign("not-the-secret", LEAD.as_bytes()))).await;
        assert_eq!(
            (status, error_of(&body)),
            (StatusCode::UNAUTHORIZED, ("invalid_signature", Some("x-hub-signature-256")))
        );
        let (status, body) = deliver(&harness, &leads, LEAD, None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "invalid_signature"));
        let tampered = LEAD.replace("9001", "9002");
        let (status, _) = deliver(&harness, &leads, &tampered, Some(sign(SECRET, LEAD.as_bytes()))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(harness.store.read_log(LogPosition(0), 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn malformed_deliveries_are_400_naming_the_field() {
        let harness = Harness::new();
        let leads = hook(&harness, "fb-leads", WebhookFormat::FacebookLeads, None);
        let (status, body) = deliver(&harness, &leads, "{not json", None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::BAD_REQUEST, "invalid_json"));
        let (status, body) = deliver(&harness, &leads, r#"{"object":"page","entry":"x"}"#, None).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_request", Some("entry"))));
        let no_id = r#"{"object":"page","entry":[{"changes":[{"field":"leadgen","value":{"form_id":"f"}}]}]}"#;
        let (status, body) = deliver(&harness, &leads, no_id, None).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_value", Some("leadgen_id"))));
        let (status, body) =
            harness.send(Request::post("/v1/webhooks/src_unknown").body(Body::from(LEAD)).unwrap()).await;
        assert_eq!((status, error_of(&body)), (StatusCode::NOT_FOUND, ("source_not_found", Some("source_id"))));
        assert_eq!(harness.store.list_quarantine(0, 10).unwrap().len(), 1, "the refused lead is kept in quarantine");
    }

    #[tokio::test]
    async fn the_subscription_handshake_echoes_the_challenge_for_the_right_token() {
        let harness = Harness::new();
        let leads = hook(&harness, "fb-leads", WebhookFormat::FacebookLeads, Some(SECRET));
        let path = |token: &str| {
            format!("/v1/webhooks/{}?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={token}", leads.id)
        };
        let (status, body) = harness.send(Request::get(path("verify-me")).body(Body::empty()).unwrap()).await;
        assert_eq!((status, body), (StatusCode::OK, json!(1158201444)));
        let (status, body) = harness.send(Request::get(path("guess")).body(Body::empty()).unwrap()).await;
        assert_eq!(
            (status, error_of(&body)),
            (StatusCode::FORBIDDEN, ("invalid_verify_token", Some("hub.verify_token")))
        );
    }

    #[tokio::test]
    async fn social_mentions_and_generic_payloads_are_stored_with_partial_rejections() {
        let harness = Harness::new();
        let social = hook(&harness, "social", WebhookFormat::SocialMentions, None);
        let mentions = json!({"mentions": [
            {"platform": "twitter", "author": {"handle": "@ann_lee"}, "text": "Support fixed my invoice in an hour, great!",
             "url": "https://x.example/ann_lee/1", "time": "2026-10-03T12:00:00Z"},
            {"platform": "twitter", "text": "who am I"}
        ]})
        .to_string();
        let (status, body) = deliver(&harness, &social, &mentions, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["accepted"], 1);
        assert_eq!(body["rejected"][0]["index"], 1);
        assert_eq!(body["rejected"][0]["field"], "author.handle");
        let stored = events_named(&harness, "Social Mention");
        assert_eq!(stored[0]["properties"]["text"], "Support fixed my invoice in an hour, great!");
        assert_eq!(stored[0]["context"]["externalIds"][0]["type"], "twitter_handle");

        let forms = hook(&harness, "forms", WebhookFormat::Generic, None);
        let form = json!({"id": "sub-1", "form": "contact", "contact": {"email": "Dan@Example.com"}}).to_string();
        let (status, body) = deliver(&harness, &forms, &form, None).await;
        assert_eq!((status, body["stored"].as_u64()), (StatusCode::OK, Some(1)));
        assert_eq!(events_named(&harness, "Form Submitted")[0]["properties"]["form"], "contact");
        let (status, body) = deliver(&harness, &forms, &json!({"id": "sub-2", "form": "x"}).to_string(), None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::BAD_REQUEST, "invalid_value"));
    }
}

/// One test per defect found by trying the edge with hostile and unlucky input.
mod hardening {
    use super::profiles::get;
    use super::*;
    use tandem_server::resolve::{Resolver, DEFAULT_BATCH};

    fn resolve(harness: &Harness) {
        let store: Arc<dyn Store> = harness.store.clone();
        Resolver::load(store).unwrap().catch_up(DEFAULT_BATCH).unwrap();
    }

    #[tokio::test]
    async fn an_acknowledged_event_with_absurd_skew_never_reached_a_profile() {
        let harness = Harness::new();
        let (status, body) = harness
            .post_json(
                "/v1/track",
                json!({"userId": "ts-user", "event": "E", "timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T23:59:59Z"}),
            )
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!({"success": true})));
        let event = &harness.events()[0];
        assert_eq!(event["timestamp"], event["receivedAt"], "an absurd sentAt falls back to receivedAt");
        resolve(&harness);
        let token = harness.store.create_token("test").unwrap().1;
        let (status, profile) = get(&harness, "/api/v1/profiles?identifier=user_id:ts-user", Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{profile}");
        assert_eq!(profile["event_counts"], json!({"track": 1}));
    }

    #[tokio::test]
    async fn framework_rejections_were_text_and_came_before_the_token_check() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        for (path, field) in [
            ("/api/v1/profiles/prof_1/events?limit=abc", "limit"),
            ("/api/v1/profiles/prof_1/events?limit=", "limit"),
            ("/api/v1/profiles/prof_1/events?before=99999999999999999999999", "before"),
            ("/api/v1/profiles?identifier=a:b&identifier=c:d", "identifier"),
            ("/api/v1/profiles/%ff", "id"),
            ("/api/v1/imports/%ff", "id"),
        ] {
            let (status, body) = get(&harness, path, None).await;
            assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "missing_token"), "{path}");
            let (status, body) = get(&harness, path, Some(&token)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
            assert_eq!(error_of(&body), ("invalid_value", Some(field)), "{path}: {body}");
        }
        let (status, body) = harness.send(Request::post("/v1/webhooks/%ff").body(Body::from("{}")).unwrap()).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_value", Some("source_id"))));
        for (content_type, field) in [
            ("application/json", "content-type"),
            ("multipart/form-data", "content-type"),
            ("multipart/form-data; boundary=", "body"),
        ] {
            let request = |token: Option<&str>| {
                let mut request = Request::post("/api/v1/imports").header(header::CONTENT_TYPE, content_type);
                if let Some(token) = token {
                    request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
                }
                request.body(Body::from("not multipart")).unwrap()
            };
            let (status, body) = harness.send(request(None)).await;
            assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "missing_token"), "{content_type}");
            let (status, body) = harness.send(request(Some(&token))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{content_type}: {body}");
            assert_eq!(error_of(&body).1, Some(field), "{content_type}: {body}");
        }
    }

    #[tokio::test]
    async fn analytics_python_read_a_top_level_code_and_message() {
        let harness = Harness::new();
        let (status, body) = harness.post_json("/v1/track", json!({"userId": "u"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["code"], "missing_field");
        assert_eq!(body["message"], body["error"]["message"]);
        assert_eq!(error_of(&body), ("missing_field", Some("event")), "the error object keeps its shape");
        let request = Request::post("/v1/batch").body(Body::from(r#"{"batch": []}"#)).unwrap();
        let (status, body) = harness.send(request).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("missing_write_key")));
        assert!(body["message"].is_string());
    }

    #[tokio::test]
    async fn a_lone_surrogate_spoiled_the_whole_batch() {
        let harness = Harness::new();
        let body = r#"{"batch": [
            {"type": "track", "userId": "u", "event": "Liked \ud83d", "messageId": "s1"},
            {"type": "track", "userId": "u", "event": "Fine", "messageId": "s2"}
        ]}"#;
        let (status, response) = harness.post("/v1/batch", body).await;
        assert_eq!((status, response), (StatusCode::OK, json!({"success": true})));
        let names: Vec<Value> = harness.events().iter().map(|event| event["event"].clone()).collect();
        assert_eq!(names, [json!("Liked \u{FFFD}"), json!("Fine")]);
        let (status, _) = harness.post("/v1/track", r#"{"userId": "u", "event": "\udc00 alone"}"#).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn integers_beyond_64_bits_became_floats() {
        // Documented: JSON numbers are kept as 64-bit integers when they fit,
        // and otherwise as the nearest double; this pins that documented rule.
        let harness = Harness::new();
        let (status, _) = harness
            .post("/v1/track", r#"{"userId": "u", "event": "E", "properties": {"big": 18446744073709551617, "fits": 18446744073709551615}}"#)
            .await;
        assert_eq!(status, StatusCode::OK);
        let properties = &harness.events()[0]["properties"];
        assert_eq!(properties["fits"].as_u64(), Some(u64::MAX));
        assert_eq!(properties["big"].as_f64(), Some(18446744073709551617.0));
    }
}

/// Slow clients against a real socket: the bounds only exist on a connection.
mod slow_clients {
    use super::*;
    use std::time::{Duration, Instant};
    use tandem_server::connection::ConnectionLimits;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn server(limits: ConnectionLimits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let options = tandem_server::ServerOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            dedup_window: DEFAULT_DEDUP_WINDOW,
            import_dir: dir.path().join("imports"),
            resolver_cache: tandem_server::resolve::ResolverCache::default(),
            log: None,
            pii: Default::default(),
            consent_default: Default::default(),
        };
        let running = tandem_server::start(store, &options).await.unwrap().with_limits(limits);
        let address = running.local_addr;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(running.serve(async move {
            let _ = stopped.await;
        }));
        (address, stop, dir)
    }

    /// Reads until the server closes the connection; what it sent, and when.
    async fn until_closed(stream: &mut TcpStream) -> (String, Duration) {
        let started = Instant::now();
        let mut received = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received)).await;
        (String::from_utf8_lossy(&received).into_owned(), started.elapsed())
    }

    const LIMITS: ConnectionLimits = ConnectionLimits {
        header_read_timeout: Duration::from_millis(300),
        body_idle_timeout: Duration::from_millis(300),
        max_connections: 2,
    };

    #[tokio::test]
    async fn slow_clients_held_connections_open_indefinitely() {
        let (address, _stop, _dir) = server(LIMITS).await;

        let mut half_headers = TcpStream::connect(address).await.unwrap();
        half_headers.write_all(b"POST /v1/track HTTP/1.1\r\nHost: tandem\r\n").await.unwrap();
        let (_, waited) = until_closed(&mut half_headers).await;
        assert!(waited < Duration::from_secs(5), "half-sent headers closed after {waited:?}");

        let mut half_body = TcpStream::connect(address).await.unwrap();
        half_body
            .write_all(b"POST /v1/track HTTP/1.1\r\nHost: tandem\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"userId\"")
            .await
            .unwrap();
        let (answer, waited) = until_closed(&mut half_body).await;
        assert!(waited < Duration::from_secs(5), "a stalled body closed after {waited:?}");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"request_timeout\""), "{answer}");
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        let (address, _stop, _dir) = server(ConnectionLimits { max_connections: 1, ..LIMITS }).await;
        let mut idle = TcpStream::connect(address).await.unwrap();
        idle.write_all(b"GET /health HTTP/1.1\r\nHost: tandem\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let mut waiting = TcpStream::connect(address).await.unwrap();
        waiting.write_all(b"GET /health HTTP/1.1\r\nHost: tandem\r\nConnection: close\r\n\r\n").await.unwrap();
        let (answer, _) = until_closed(&mut waiting).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "served only once the idle connection timed out: {:?}",
            started.elapsed()
        );
    }
}

/// Random requests over the whole router: never a 5xx, never an error that is
/// not JSON, and every event a `200` acknowledges becomes part of a profile.
mod random_requests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use tandem_server::resolve::{Resolver, DEFAULT_BATCH};

    #[derive(Clone, Debug)]
    struct RandomRequest {
        method: Method,
        path: String,
        auth: u8,
        gzip: bool,
        body: Vec<u8>,
    }

    fn id() -> impl Strategy<Value = Value> {
        prop_oneof![
            8 => "u-[a-z0-9]{1,6}".prop_map(Value::from),
            1 => (1u32..1_000_000).prop_map(|n| json!(n)),
            1 => Just(json!({"nested": true})),
            1 => Just(Value::Null),
        ]
    }

    fn time() -> impl Strategy<Value = Value> {
        prop_oneof![
            1 => Just(json!("0001-01-01T00:00:00Z")),
            1 => Just(json!("9999-12-31T23:59:59Z")),
            1 => Just(json!("0000-01-01T00:00:00+01:00")),
            1 => Just(json!("9999-12-31T23:30:00-01:00")),
            1 => Just(json!("2024-02-30T00:00:00Z")),
            1 => Just(json!("yesterday")),
            1 => Just(json!(12)),
            8 => (0i64..4_000_000_000).prop_map(|seconds| json!(chrono::DateTime::from_timestamp(seconds, 0)
                .unwrap()
                .to_rfc3339())),
        ]
    }

    fn text() -> impl Strategy<Value = Value> {
        prop_oneof![
            6 => "[ -~]{0,12}".prop_map(Value::from),
            1 => Just(json!(18446744073709551617u128 as f64)),
            1 => (any::<i64>()).prop_map(|n| json!(n)),
            1 => Just(json!("\u{1F600}")),
        ]
    }

    fn message() -> impl Strategy<Value = Value> {
        (
            prop_oneof![
                Just("track"),
                Just("identify"),
                Just("page"),
                Just("screen"),
                Just("group"),
                Just("alias"),
                Just("other")
            ],
            proptest::option::weighted(0.85, id()),
            proptest::option::of(id()),
            proptest::option::weighted(0.3, id()),
            proptest::option::weighted(0.9, text()),
            proptest::option::of(time()),
            proptest::option::of(time()),
            proptest::collection::btree_map("[a-z]{1,4}", text(), 0..3),
        )
            .prop_map(|(kind, user, anonymous, previous, event, timestamp, sent_at, properties)| {
                let mut message = json!({"type": kind, "properties": properties, "groupId": "g-1"});
                for (key, value) in [
                    ("userId", user),
                    ("anonymousId", anonymous),
                    ("previousId", previous),
                    ("event", event),
                    ("timestamp", timestamp),
                    ("sentAt", sent_at),
                ] {
                    if let Some(value) = value {
                        message[key] = value;
                    }
                }
                message
            })
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => message().prop_map(|message| message.to_string().into_bytes()),
            3 => proptest::collection::vec(message(), 0..4)
                .prop_map(|batch| json!({"batch": batch}).to_string().into_bytes()),
            1 => Just(br#"{"userId": "u-s", "event": "\ud83d cut", "type": "track"}"#.to_vec()),
            1 => proptest::collection::vec(any::<u8>(), 0..64),
        ]
    }

    fn request() -> impl Strategy<Value = RandomRequest> {
        let path = prop_oneof![
            6 => prop_oneof![
                Just("/v1/track"), Just("/v1/identify"), Just("/v1/page"), Just("/v1/screen"), Just("/v1/group"),
                Just("/v1/alias"), Just("/v1/batch"), Just("/v1/import"), Just("/v1/t"), Just("/v1/b")
            ]
            .prop_map(str::to_owned),
            1 => prop_oneof![
                Just("/api/v1/profiles?identifier=user_id:u-1"), Just("/api/v1/profiles?limit=abc&identifier=x"),
                Just("/api/v1/profiles/%ff"), Just("/api/v1/profiles/prof_1/events?limit="),
                Just("/api/v1/imports"), Just("/api/v1/imports/%ff"), Just("/v1/webhooks/%ff"),
                Just("/v1/webhooks/src_none"), Just("/health"), Just("/metrics"), Just("/nowhere")
            ]
            .prop_map(str::to_owned),
            1 => "/[a-z0-9%/]{0,16}",
        ];
        let method = prop_oneof![
            12 => Just(Method::POST),
            1 => Just(Method::GET),
            1 => Just(Method::PUT),
            1 => Just(Method::DELETE),
            1 => Just(Method::OPTIONS)
        ];
        let auth = prop_oneof![1 => Just(0u8), 6 => Just(1u8), 1 => Just(3u8), 1 => Just(4u8)];
        (method, path, auth, proptest::bool::weighted(0.2), body()).prop_map(|(method, path, auth, gzip, body)| {
            // Mostly give each tracking endpoint the shape it reads, so that
            // many requests get past the envelope to the message rules.
            let batch_path = ["/v1/batch", "/v1/import", "/v1/b"].contains(&path.as_str());
            let body = match serde_json::from_slice::<Value>(&body) {
                Ok(message) if batch_path && message.get("batch").is_none() => {
                    json!({"batch": [message]}).to_string().into_bytes()
                }
                Ok(batch) if !batch_path && batch["batch"][0].is_object() => batch["batch"][0].to_string().into_bytes(),
                _ => body,
            };
            RandomRequest { method, path, auth, gzip, body }
        })
    }

    fn identifier_of(event: &Value) -> Option<String> {
        [("userId", "user_id"), ("anonymousId", "anonymous_id")]
            .into_iter()
            .find_map(|(field, kind)| event[field].as_str().map(|value| format!("{kind}:{value}")))
    }

    #[test]
    fn random_requests_never_answer_5xx_or_non_json_errors_and_every_200_reaches_a_profile() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let harness = Harness::new();
        let token = harness.store.create_token("random").unwrap().1;
        let mut runner = TestRunner::new(Config { cases: 256, failure_persistence: None, ..Config::default() });
        runner
            .run(&request(), |random| {
                let before = harness.store.read_log(LogPosition(0), 1_000_000).unwrap().len();
                let mut builder = Request::builder().method(random.method.clone()).uri(random.path.as_str());
                builder = match random.auth {
                    0 => builder,
                    1 | 2 => builder.header(header::AUTHORIZATION, harness.basic()),
                    3 => builder.header(header::AUTHORIZATION, format!("Bearer {token}")),
                    _ => builder.header(header::AUTHORIZATION, "Basic !!!"),
                };
                let body = if random.gzip {
                    builder = builder.header(header::CONTENT_ENCODING, "gzip");
                    gzip(&random.body)
                } else {
                    random.body.clone()
                };
                let request = builder.body(Body::from(body)).unwrap();
                let (status, answer) = runtime.block_on(harness.send(request));
                prop_assert!(status.as_u16() < 500, "{random:?} answered {status}: {answer}");
                if status.is_client_error() {
                    prop_assert!(
                        answer["error"]["code"].is_string() && answer["error"]["message"].is_string(),
                        "{random:?} answered {status} with a body that is not a JSON error: {answer}"
                    );
                }
                let events = harness.store.read_log(LogPosition(0), 1_000_000).unwrap();
                if status == StatusCode::OK && events.len() > before {
                    let store: Arc<dyn Store> = harness.store.clone();
                    Resolver::load(store).unwrap().catch_up(DEFAULT_BATCH).unwrap();
                    for entry in &events[before..] {
                        let event: Value = serde_json::from_str(&entry.payload).unwrap();
                        let identifier = identifier_of(&event).expect("an accepted event names someone");
                        let found = harness.store.profile_by_identifier(&identifier.parse().unwrap()).unwrap();
                        prop_assert!(found.is_some(), "{random:?}: no profile holds {identifier} of {event}");
                    }
                }
                Ok(())
            })
            .unwrap();
        let stored = harness.store.read_log(LogPosition(0), 1_000_000).unwrap().len();
        assert!(stored >= 15, "the random requests must get events accepted, not only refused: {stored}");
    }
}

mod audiences {
    use super::profiles::get;
    use super::*;
    use tandem_server::audience::{system_clock, AudienceStage};
    use tandem_server::resolve::{Resolver, DEFAULT_BATCH};

    async fn send_json(harness: &Harness, method: Method, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        harness.send(request).await
    }

    #[tokio::test]
    async fn audiences_are_created_in_either_form_previewed_listed_paged_and_deleted() {
        let harness = Harness::new();
        let (status, _) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "identify", "userId": "ann", "traits": {"plan": "pro"}, "messageId": "a1"},
                    {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"total": 80}, "messageId": "a2"},
                    {"type": "identify", "userId": "bob", "traits": {"plan": "pro"}, "messageId": "b1"},
                    {"type": "identify", "userId": "cy", "traits": {"plan": "free"}, "messageId": "c1"}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let store: Arc<dyn Store> = harness.store.clone();
        Resolver::load(store.clone()).unwrap().catch_up(DEFAULT_BATCH).unwrap();
        let token = harness.store.create_token("test").unwrap().1;
        let (status, body) = get(&harness, "/api/v1/audiences", None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "missing_token"));

        // A text rule that does not parse: 422 with where and what was expected.
        let (status, body) = send_json(
            &harness,
            Method::POST,
            "/api/v1/audiences",
            &token,
            json!({"name": "pro", "rule": {"text": "trait plan == \"pro\""}}),
        )
        .await;
        assert_eq!((status, error_of(&body)), (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_rule", Some("rule.text"))));
        assert_eq!(
            (body["details"]["line"].as_u64(), body["details"]["column"].as_u64()),
            (Some(1), Some(12)),
            "{body}"
        );
        assert_eq!(body["details"]["found"], "\"==\"");
        assert!(body["details"]["expected"].as_str().unwrap().starts_with("an operator"), "{body}");
        let (status, body) = send_json(
            &harness,
            Method::POST,
            "/api/v1/audiences",
            &token,
            json!({"name": "pro", "rule": {"kind": "trait", "name": "plan", "operator": "~"}}),
        )
        .await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_rule"));

        let (status, preview) = send_json(
            &harness,
            Method::POST,
            "/api/v1/audiences/preview",
            &token,
            json!({"rule": {"text": "trait plan = \"pro\""}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{preview}");
        assert_eq!((preview["size"].as_u64(), preview["sample"].clone()), (Some(2), json!(["prof_1", "prof_2"])));
        assert!(harness.store.list_audiences().unwrap().is_empty(), "a preview saves nothing");

        let (status, created) = send_json(
            &harness,
            Method::POST,
            "/api/v1/audiences",
            &token,
            json!({"name": "pro", "rule": {"text": "trait plan = \"pro\""}}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert_eq!(created["rule"], json!({"kind": "trait", "name": "plan", "operator": "=", "value": "pro"}));
        let tree = json!({"kind": "performed", "event": "Order Completed", "where": [
            {"property": "total", "operator": ">", "value": 50}]});
        let (status, _) =
            send_json(&harness, Method::POST, "/api/v1/audiences", &token, json!({"name": "big buyers", "rule": tree}))
                .await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) = send_json(
            &harness,
            Method::POST,
            "/api/v1/audiences",
            &token,
            json!({"name": "pro", "rule": {"text": "trait plan = \"free\""}}),
        )
        .await;
        assert_eq!((status, error_of(&body)), (StatusCode::CONFLICT, ("audience_exists", Some("name"))));

        AudienceStage::new(store.clone(), system_clock()).catch_up().unwrap();
        let (status, listed) = get(&harness, "/api/v1/audiences", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            listed["audiences"],
            json!([{"name": "big buyers", "size": 1}, {"name": "pro", "size": 2}]),
            "by name, with sizes"
        );
        let (status, shown) = get(&harness, "/api/v1/audiences/big%20buyers", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(shown["rule"], tree);
        assert_eq!(shown["rule_text"], r#"performed "Order Completed" where total > 50"#);
        let days = shown["size_over_time"].as_array().expect("size over time");
        assert_eq!(days.last().map(|day| day["size"].clone()), Some(json!(1)), "{shown}");
        assert_eq!(days.last().unwrap()["date"].as_str().map(str::len), Some(10), "a YYYY-MM-DD date");
        let (status, page) = get(&harness, "/api/v1/audiences/pro/members?limit=1", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (page["members"][0]["profile"].as_str(), page["next_after"].as_str()),
            (Some("prof_1"), Some("prof_1"))
        );
        let (_, page) = get(&harness, "/api/v1/audiences/pro/members?limit=1&after=prof_1", Some(&token)).await;
        assert_eq!(page["members"][0]["profile"], "prof_2");
        let (status, body) = get(&harness, "/api/v1/audiences/nobody/members", Some(&token)).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "audience_not_found"));

        let (status, ann) = get(&harness, "/api/v1/profiles/prof_1", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        let names: Vec<&str> =
            ann["audiences"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
        assert_eq!(names, vec!["big buyers", "pro"]);
        assert!(ann["audiences"][0]["entered_at"].is_string());
        assert_eq!(ann["traits"]["plan"], "pro", "the rest of the profile is unchanged");

        let (status, _) = send_json(&harness, Method::DELETE, "/api/v1/audiences/pro", &token, json!({})).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) = get(&harness, "/api/v1/audiences/pro", Some(&token)).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "audience_not_found"));
        let (_, ann) = get(&harness, "/api/v1/profiles/prof_1", Some(&token)).await;
        assert_eq!(ann["audiences"].as_array().unwrap().len(), 1);
    }
}

mod computed_traits {
    use super::profiles::get;
    use super::*;
    use tandem_server::audience::{system_clock, AudienceStage};
    use tandem_server::resolve::{Resolver, DEFAULT_BATCH};

    async fn send_json(harness: &Harness, method: Method, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        harness.send(request).await
    }

    #[tokio::test]
    async fn computed_traits_are_created_in_either_form_shown_on_profiles_and_deleted() {
        let harness = Harness::new();
        let (status, _) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"total": 80}, "messageId": "a1"},
                    {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"total": 20.5}, "messageId": "a2"},
                    {"type": "identify", "userId": "bob", "traits": {"plan": "pro"}, "messageId": "b1"}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let store: Arc<dyn Store> = harness.store.clone();
        Resolver::load(store.clone()).unwrap().catch_up(DEFAULT_BATCH).unwrap();
        let token = harness.store.create_token("test").unwrap().1;
        let (status, body) = get(&harness, "/api/v1/computed-traits", None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "missing_token"));

        // A text definition that does not parse: 422 with the position.
        let (status, body) = send_json(
            &harness,
            Method::POST,
            "/api/v1/computed-traits",
            &token,
            json!({"name": "spent", "definition": {"text": "sum(total) off \"Order Completed\""}}),
        )
        .await;
        assert_eq!(
            (status, error_of(&body)),
            (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_computed_trait", Some("definition.text"))),
            "{body}"
        );
        assert_eq!((body["details"]["line"].as_u64(), body["details"]["column"].as_u64()), (Some(1), Some(12)));
        let (status, body) = send_json(
            &harness,
            Method::POST,
            "/api/v1/computed-traits",
            &token,
            json!({"name": "spent", "definition": {"function": "sum", "event": "Order Completed"}}),
        )
        .await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_computed_trait"), "{body}");

        let (status, created) = send_json(
            &harness,
            Method::POST,
            "/api/v1/computed-traits",
            &token,
            json!({"name": "spent", "definition": {"text": "sum(total) of \"Order Completed\""}}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert_eq!(created["definition"], json!({"function": "sum", "property": "total", "event": "Order Completed"}));
        assert_eq!(
            (created["backfilled"].as_bool(), created["backfilled_through"].clone()),
            (Some(false), Value::Null)
        );
        let (status, _) = send_json(
            &harness,
            Method::POST,
            "/api/v1/computed-traits",
            &token,
            json!({"name": "orders", "definition": {"function": "count", "event": "Order Completed"}}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) = send_json(
            &harness,
            Method::POST,
            "/api/v1/computed-traits",
            &token,
            json!({"name": "orders", "definition": {"text": "count of \"Signed Up\""}}),
        )
        .await;
        assert_eq!((status, error_of(&body)), (StatusCode::CONFLICT, ("computed_trait_exists", Some("name"))));

        AudienceStage::new(store.clone(), system_clock()).catch_up().unwrap();
        let (status, listed) = get(&harness, "/api/v1/computed-traits", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        let names: Vec<(&str, bool)> = listed["computed_traits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].as_str().unwrap(), t["backfilled"].as_bool().unwrap()))
            .collect();
        assert_eq!(names, vec![("orders", true), ("spent", true)], "by name, backfilled");
        let (status, shown) = get(&harness, "/api/v1/computed-traits/spent", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(shown["definition_text"], r#"sum(total) of "Order Completed""#);

        let (status, ann) = get(&harness, "/api/v1/profiles/prof_1", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ann["computed_traits"], json!({"orders": 2, "spent": 100.5}));
        let (_, bob) = get(&harness, "/api/v1/profiles/prof_2", Some(&token)).await;
        assert_eq!(bob["computed_traits"], json!({"orders": 0, "spent": 0}), "no orders count as 0");

        // An audience over a computed trait: an unknown name is refused, and
        // the trait cannot be deleted while the audience tests it.
        let (status, body) = send_json(
            &harness,
            Method::POST,
            "/api/v1/audiences",
            &token,
            json!({"name": "big", "rule": {"text": "computed spnt > 50"}}),
        )
        .await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_rule"), "{body}");
        let (status, _) = send_json(
            &harness,
            Method::POST,
            "/api/v1/audiences",
            &token,
            json!({"name": "big", "rule": {"text": "computed spent > 50"}}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        AudienceStage::new(store.clone(), system_clock()).catch_up().unwrap();
        let (_, big) = get(&harness, "/api/v1/audiences/big", Some(&token)).await;
        assert_eq!(big["size"], 1, "ann spent 100.5");
        let (status, body) =
            send_json(&harness, Method::DELETE, "/api/v1/computed-traits/spent", &token, json!({})).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::CONFLICT, "computed_trait_in_use"));
        let (status, _) = send_json(&harness, Method::DELETE, "/api/v1/audiences/big", &token, json!({})).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = send_json(&harness, Method::DELETE, "/api/v1/computed-traits/spent", &token, json!({})).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) = get(&harness, "/api/v1/computed-traits/spent", Some(&token)).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "computed_trait_not_found"));
        let (status, body) =
            send_json(&harness, Method::DELETE, "/api/v1/computed-traits/spent", &token, json!({})).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "computed_trait_not_found"));
        let (_, ann) = get(&harness, "/api/v1/profiles/prof_1", Some(&token)).await;
        assert_eq!(ann["computed_traits"], json!({"orders": 2}));
    }
}

mod destinations {
    use super::profiles::get;
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use tandem_server::activate::{DeliveryReport, DeliveryWorker, OutboxStage};
    use tandem_server::metrics::Metrics;
    use tandem_server::resolve::{Resolver, DEFAULT_BATCH};

    async fn send_json(harness: &Harness, method: Method, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        harness.send(request).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn destinations_are_created_listed_dead_lettered_replayed_and_deleted() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        let (status, body) = get(&harness, "/api/v1/destinations", None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "missing_token"));

        let bad = json!({"name": "crm", "destination": {"kind": "webhook", "url": "ftp://crm"}});
        let (status, body) = send_json(&harness, Method::POST, "/api/v1/destinations", &token, bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error_of(&body), ("invalid_destination", Some("destination.url")));
        let unknown = json!({"name": "crm", "destination": {"kind": "webhook", "url": "http://x", "colour": 1}});
        let (status, body) = send_json(&harness, Method::POST, "/api/v1/destinations", &token, unknown).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_destination"));
        // A warehouse's TLS settings are read when it is defined, as they
        // will be to connect.
        let unchecked = json!({"name": "dwh", "destination": {"kind": "warehouse",
            "url": "postgres://dwh.example.com/analytics?sslmode=verify-full"}, "events": {"types": ["track"]}});
        let (status, body) = send_json(&harness, Method::POST, "/api/v1/destinations", &token, unchecked).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error_of(&body), ("invalid_destination", Some("destination.url")));
        assert!(body["error"]["message"].as_str().unwrap().contains("needs sslrootcert"), "{body}");

        // Nothing listens on port 9 of this host: every attempt fails.
        let crm = json!({
            "name": "crm",
            "destination": {"kind": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "shh", "timeout_ms": 2000},
            "events": {"types": ["track"]},
            "retry": {"initial_backoff_ms": 1000, "max_backoff_ms": 1000, "give_up_after_ms": 5000}
        });
        let (status, created) = send_json(&harness, Method::POST, "/api/v1/destinations", &token, crm.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert_eq!(created["kind"], "webhook");
        assert_eq!(created["definition"]["destination"]["secret_set"], true);
        assert!(created["definition"]["destination"].get("secret").is_none(), "the secret is never shown");
        let (status, body) = send_json(&harness, Method::POST, "/api/v1/destinations", &token, crm).await;
        assert_eq!(error_of(&body), ("destination_exists", Some("name")));
        assert_eq!(status, StatusCode::CONFLICT);

        let (status, _) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "track", "userId": "ann", "event": "Order Completed", "messageId": "t1",
                     "context": {"traits": {"email": "ann.zq@example.com"}}},
                    {"type": "identify", "userId": "ann", "traits": {"plan": "pro"}, "messageId": "i1"}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let store: Arc<dyn Store> = harness.store.clone();
        let dead = tokio::task::spawn_blocking(move || {
            Resolver::load(store.clone()).unwrap().catch_up(DEFAULT_BATCH).unwrap();
            OutboxStage::new(store.clone()).catch_up().unwrap();
            // A clock that jumps 2 s at every reading, so the 5 s limit
            // passes within a few attempts.
            let now = Arc::new(AtomicI64::new(1_000_000));
            let clock = Arc::new(move || now.fetch_add(2_000, Ordering::SeqCst));
            let mut worker = DeliveryWorker::new(store.clone(), "crm", clock, Metrics::new());
            let mut reports = Vec::new();
            while !reports.contains(&DeliveryReport::DeadLettered) && reports.len() < 20 {
                reports.push(worker.deliver_once().unwrap());
            }
            reports
        })
        .await
        .unwrap();
        assert!(dead.contains(&DeliveryReport::DeadLettered), "{dead:?}");

        let (status, listed) = get(&harness, "/api/v1/destinations", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(listed["destinations"][0]["name"], "crm");
        assert_eq!(
            listed["destinations"][0]["counts"],
            json!({"pending": 0, "retrying": 0, "delivered": 0, "dead": 1})
        );

        let (status, letters) = get(&harness, "/api/v1/destinations/crm/dead-letters", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        let letter = &letters["dead_letters"][0];
        assert_eq!(letter["event"]["messageId"], "t1", "only the track matched");
        assert!(letter["last_error"].as_str().unwrap().starts_with("could not reach the receiver"), "{letter}");
        assert!(letter["attempts"].as_u64().unwrap() >= 2);
        assert_eq!(letter["event"]["context"]["traits"]["email"], "ann.zq@example.com", "an admin reads it in clear");
        // A marketer follows deliveries but never sees PII in clear.
        let (_, marketer) = harness.store.create_token_with("m", tandem_core::govern::Role::Marketer, None).unwrap();
        for path in ["/api/v1/destinations/crm/dead-letters", "/api/v1/deliveries/failed"] {
            let (status, masked) = get(&harness, path, Some(&marketer)).await;
            assert_eq!(status, StatusCode::OK, "{masked}");
            assert!(!masked.to_string().contains("ann.zq@"), "{path}: {masked}");
            assert!(masked.to_string().contains("a***@example.com"), "{path}: {masked}");
        }
        let audited = harness.store.audit_entries(&tandem_store::AuditFilter {
            action: Some("destination.read_dead_letters".into()),
            limit: 10,
            ..Default::default()
        });
        assert_eq!(
            audited.unwrap().len(),
            1,
            "the admin's read in clear is audited, the marketer's masked reads are not"
        );

        // Failed deliveries across destinations, narrowed by time and profile.
        let (status, failed) = get(&harness, "/api/v1/deliveries/failed", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(failed["failed"][0]["destination"], "crm");
        let profile = failed["failed"][0]["profile"].as_str().expect("the event's profile is kept").to_owned();
        assert!(profile.starts_with("prof_"), "{profile}");
        let count = |body: &Value| body["failed"].as_array().map(Vec::len);
        // The worker's clock was in January 1970: nothing failed in the last 2 hours.
        let (_, recent) = get(&harness, "/api/v1/deliveries/failed?since=2h", Some(&token)).await;
        assert_eq!(count(&recent), Some(0));
        let (_, since_epoch) =
            get(&harness, "/api/v1/deliveries/failed?since=1970-01-01T00:00:00Z&destination=crm", Some(&token)).await;
        assert_eq!(count(&since_epoch), Some(1));
        let (_, of_profile) =
            get(&harness, &format!("/api/v1/deliveries/failed?profile={profile}"), Some(&token)).await;
        assert_eq!(count(&of_profile), Some(1));
        let (_, of_other) = get(&harness, "/api/v1/deliveries/failed?profile=prof_999999", Some(&token)).await;
        assert_eq!(count(&of_other), Some(0));
        let (status, body) = get(&harness, "/api/v1/deliveries/failed?profile=ann", Some(&token)).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_value", Some("profile"))));
        let (status, body) = get(&harness, "/api/v1/deliveries/failed?since=soon", Some(&token)).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_value", Some("since"))));
        let (status, body) = get(&harness, "/api/v1/deliveries/failed?destination=nobody", Some(&token)).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "destination_not_found"));
        let (status, body) = send_json(&harness, Method::POST, "/api/v1/deliveries/replay", &token, json!({})).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_value", Some("destination"))));
        let (status, replayed) =
            send_json(&harness, Method::POST, "/api/v1/deliveries/replay?destination=crm&since=2h", &token, json!({}))
                .await;
        assert_eq!((status, replayed["replayed"].clone()), (StatusCode::OK, json!(0)), "nothing that recent");

        // A test send goes out now, outside the outbox, and reports the failure.
        let (status, tested) =
            send_json(&harness, Method::POST, "/api/v1/destinations/crm/test", &token, json!({})).await;
        assert_eq!(
            (status, tested["ok"].clone(), tested["retryable"].clone()),
            (StatusCode::OK, json!(false), json!(true))
        );
        assert!(tested["error"].as_str().unwrap().starts_with("could not reach the receiver"), "{tested}");
        let (status, body) =
            send_json(&harness, Method::POST, "/api/v1/destinations/nobody/test", &token, json!({})).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "destination_not_found"));

        let (status, replayed) =
            send_json(&harness, Method::POST, "/api/v1/destinations/crm/replay", &token, json!({})).await;
        assert_eq!((status, replayed["replayed"].clone()), (StatusCode::OK, json!(1)));
        let (_, shown) = get(&harness, "/api/v1/destinations/crm", Some(&token)).await;
        assert_eq!(shown["counts"], json!({"pending": 1, "retrying": 0, "delivered": 0, "dead": 0}));
        assert_eq!(shown["lag"], json!(1), "the replayed item waits again");
        assert_eq!(shown["paused"], json!(false));
        let (status, paused) =
            send_json(&harness, Method::POST, "/api/v1/destinations/crm/pause", &token, json!({})).await;
        assert_eq!((status, paused["paused"].clone()), (StatusCode::OK, json!(true)));
        let (_, shown) = get(&harness, "/api/v1/destinations/crm", Some(&token)).await;
        assert_eq!(shown["paused"], json!(true));
        let (status, _) = send_json(&harness, Method::POST, "/api/v1/destinations/crm/resume", &token, json!({})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) =
            send_json(&harness, Method::POST, "/api/v1/destinations/nobody/pause", &token, json!({})).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "destination_not_found"));

        let (status, _) = send_json(&harness, Method::DELETE, "/api/v1/destinations/crm", &token, json!({})).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) = get(&harness, "/api/v1/destinations/crm", Some(&token)).await;
        assert_eq!((status, error_of(&body)), (StatusCode::NOT_FOUND, ("destination_not_found", Some("name"))));
        let (status, body) = get(&harness, "/api/v1/destinations/crm/dead-letters", Some(&token)).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "destination_not_found"));
    }
}

/// Roles and the permission table, tested from the table itself: every line,
/// every role; and every `/api/v1` route the code declares has a line.
mod access {
    use super::*;
    use tandem_core::govern::Role;
    use tandem_server::access::PERMISSION_TABLE;

    async fn call(harness: &Harness, method: &str, uri: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = if method == "GET" || method == "DELETE" { Body::empty() } else { Body::from("{}") };
        harness.send(request.body(body).unwrap()).await
    }

    /// A route pattern with each `{parameter}` filled in.
    fn concrete(pattern: &str) -> String {
        pattern
            .split('/')
            .map(|segment| if segment.starts_with('{') { "nothing-here" } else { segment })
            .collect::<Vec<_>>()
            .join("/")
    }

    #[tokio::test]
    async fn every_table_line_admits_exactly_the_roles_holding_its_permission() {
        let harness = Harness::new();
        let tokens: Vec<(Role, String)> = Role::ALL
            .into_iter()
            .map(|role| (role, harness.store.create_token_with(role.as_str(), role, None).unwrap().1))
            .collect();
        let mut checked = 0;
        for rule in PERMISSION_TABLE {
            let mut uri = concrete(rule.path);
            if let Some(parameter) = rule.with_query {
                uri.push_str(&format!("?{parameter}=email:nobody@example.com"));
            }
            let (status, body) = call(&harness, rule.method, &uri, None).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{} {uri} without a token: {body}", rule.method);
            for (role, secret) in &tokens {
                let (status, body) = call(&harness, rule.method, &uri, Some(secret)).await;
                let line = format!("{} {uri} as {role} (needs {}): {status} {body}", rule.method, rule.permission);
                if role.grants(rule.permission) {
                    assert!(status != StatusCode::FORBIDDEN && status != StatusCode::UNAUTHORIZED, "{line}");
                } else {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{line}");
                    assert_eq!(error_of(&body), ("permission_denied", Some("permission")), "{line}");
                    let message = body["error"]["message"].as_str().unwrap();
                    assert!(message.contains(rule.permission.as_str()), "{line}");
                }
                checked += 1;
            }
        }
        assert_eq!(checked, PERMISSION_TABLE.len() * Role::ALL.len());
    }

    /// Every `.route("/api/v1…", …)` in the server's source, found by reading it.
    fn declared_admin_routes() -> Vec<String> {
        fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|extension| extension == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (index, _) in text.match_indices(".route(") {
                        let rest = text[index + ".route(".len()..].trim_start();
                        if let Some(literal) = rest.strip_prefix('"') {
                            let route = &literal[..literal.find('"').unwrap()];
                            if route.starts_with("/api/v1") {
                                found.push(route.to_owned());
                            }
                        }
                    }
                }
            }
        }
        let mut found = Vec::new();
        walk(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut found);
        found.sort();
        found.dedup();
        found
    }

    #[tokio::test]
    async fn every_declared_admin_route_has_a_table_line_and_needs_a_token() {
        let harness = Harness::new();
        let admin = harness.store.create_token("root").unwrap().1;
        let routes = declared_admin_routes();
        assert!(routes.len() >= 20, "the scan found too few routes: {routes:?}");
        for route in &routes {
            let uri = concrete(route);
            for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
                let (status, body) = call(&harness, method, &uri, Some(&admin)).await;
                assert!(
                    body["error"]["code"] != "route_not_permitted",
                    "{method} {route} is served but has no line in access::PERMISSION_TABLE"
                );
                let (status_without, body_without) = call(&harness, method, &uri, None).await;
                assert!(
                    status_without == StatusCode::UNAUTHORIZED || status_without == StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {route} answers {status_without} without a token: {body_without} (admin: {status})"
                );
            }
        }
    }

    #[tokio::test]
    async fn expired_tokens_are_refused_and_use_is_recorded() {
        let harness = Harness::new();
        let past = chrono::Utc::now().timestamp_millis() - 1_000;
        let (_, expired) = harness.store.create_token_with("old", Role::Admin, Some(past)).unwrap();
        let (status, body) = call(&harness, "GET", "/api/v1/audiences", Some(&expired)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(error_of(&body), ("token_expired", Some("authorization")));

        let (info, fresh) = harness.store.create_token_with("new", Role::Marketer, Some(past + 3_600_000)).unwrap();
        let (status, _) = call(&harness, "GET", "/api/v1/audiences", Some(&fresh)).await;
        assert_eq!(status, StatusCode::OK);
        let listed = harness.store.list_tokens().unwrap();
        let used = listed.iter().find(|token| token.id == info.id).unwrap();
        assert!(used.last_used_at_ms.is_some_and(|at| at >= past), "{used:?}");
    }

    #[tokio::test]
    async fn support_looks_one_customer_up_but_cannot_list() {
        let harness = Harness::new();
        let (_, support) = harness.store.create_token_with("desk", Role::Support, None).unwrap();
        let (status, body) = call(&harness, "GET", "/api/v1/profiles?identifier=email:a@b.c", Some(&support)).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "profile_not_found"));
        let (status, body) = call(&harness, "GET", "/api/v1/profiles?search=email:a", Some(&support)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body["error"]["message"].as_str().unwrap().contains("profiles:list"), "{body}");
    }
}

/// The audit log through the API: changes and PII reads are recorded with
/// their actor, without PII or secrets, and the chain verifies.
mod audit_log {
    use super::*;
    use tandem_core::govern::Role;

    async fn call(harness: &Harness, method: &str, uri: &str, token: &str, body: Option<Value>) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        let body = body.map_or_else(Body::empty, |body| Body::from(body.to_string()));
        harness.send(request.body(body).unwrap()).await
    }

    #[tokio::test]
    async fn changes_and_pii_reads_are_recorded_and_the_chain_verifies() {
        let harness = Harness::new();
        let (marketer, marketer_secret) = harness.store.create_token_with("m", Role::Marketer, None).unwrap();
        let (support, support_secret) = harness.store.create_token_with("s", Role::Support, None).unwrap();
        let (_, auditor_secret) = harness.store.create_token_with("a", Role::Auditor, None).unwrap();
        let (_, analyst_secret) = harness.store.create_token_with("n", Role::Analyst, None).unwrap();
        let rule = json!({"name": "pros", "rule": {"text": "trait plan = \"pro\""}});
        let (status, body) = call(&harness, "POST", "/api/v1/audiences", &marketer_secret, Some(rule)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, _) = call(&harness, "DELETE", "/api/v1/audiences/pros", &marketer_secret, None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        // Looked up with PII in clear (support) and masked (analyst): only the first is a PII read.
        harness.post_json("/v1/identify", json!({"userId": "ann", "traits": {"email": "ann@example.com"}})).await;
        let store: Arc<dyn Store> = harness.store.clone();
        tandem_server::resolve::Resolver::load(store).unwrap().catch_up(100).unwrap();
        let (status, _) = call(&harness, "GET", "/api/v1/profiles/prof_1", &support_secret, None).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = call(&harness, "GET", "/api/v1/profiles/prof_1", &analyst_secret, None).await;
        assert_eq!(status, StatusCode::OK);

        let (status, listed) = call(&harness, "GET", "/api/v1/audit", &auditor_secret, None).await;
        assert_eq!(status, StatusCode::OK, "{listed}");
        let entries = listed["entries"].as_array().unwrap();
        let summary: Vec<(&str, &str, &str)> = entries
            .iter()
            .map(|entry| {
                (entry["actor"].as_str().unwrap(), entry["action"].as_str().unwrap(), entry["target"].as_str().unwrap())
            })
            .collect();
        assert_eq!(
            summary,
            [
                (marketer.id.as_str(), "audience.create", "pros"),
                (marketer.id.as_str(), "audience.delete", "pros"),
                (support.id.as_str(), "profile.read", "prof_1"),
            ]
        );
        assert_eq!(entries[0]["role"], "marketer");
        assert_eq!(entries[0]["after"]["rule"]["value"], "pro");
        assert_eq!(entries[1]["before"]["name"], "pros");

        let (_, filtered) = call(
            &harness,
            "GET",
            &format!("/api/v1/audit?actor={}&action=audience", marketer.id),
            &auditor_secret,
            None,
        )
        .await;
        assert_eq!(filtered["entries"].as_array().unwrap().len(), 2);
        let (status, body) = call(&harness, "GET", "/api/v1/audit?since=yesterday", &auditor_secret, None).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_value", Some("since"))));

        let (status, verified) = call(&harness, "GET", "/api/v1/audit/verify", &auditor_secret, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(verified, json!({"intact": true, "entries": 3}));
    }
}

/// PII: red values are hashed before anything is stored; yellow values are
/// masked for roles without `pii:read`.
mod pii {
    use super::*;
    use tandem_core::govern::Role;

    async fn get_as(harness: &Harness, path: &str, token: &str) -> Value {
        let request = Request::get(path).header(header::AUTHORIZATION, format!("Bearer {token}"));
        let (status, body) = harness.send(request.body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        body
    }

    fn file_bytes(dir: &std::path::Path) -> Vec<u8> {
        let mut bytes = Vec::new();
        for name in ["tandem.db", "tandem.db-wal"] {
            if let Ok(mut content) = std::fs::read(dir.join(name)) {
                bytes.append(&mut content);
            }
        }
        bytes
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack.windows(needle.len()).any(|window| window == needle.as_bytes())
    }

    #[tokio::test]
    async fn red_values_never_reach_the_database_file_in_clear() {
        let harness = Harness::new();
        let (status, body) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "identify", "userId": "ann", "traits": {"email": "ann@example.com", "ssn": "123-45-6789", "Password": "hunter2-secret"}},
                    {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"note": "paid by 4111 1111 1111 1111", "card_number": "5500000000000004"}},
                    {"type": "track", "userId": "ann", "properties": {"passport": "P-998877665"}}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["rejected"].as_array().map(Vec::len), Some(1), "the track without an event is quarantined");
        let store: Arc<dyn Store> = harness.store.clone();
        tandem_server::resolve::Resolver::load(store).unwrap().catch_up(100).unwrap();
        let events = harness.events();
        assert!(events[0]["traits"]["ssn"].as_str().unwrap().starts_with("sha256:"), "{}", events[0]);
        assert_eq!(events[0]["traits"]["email"], "ann@example.com", "yellow values are stored");

        let dir = harness.store.path().parent().unwrap().to_owned();
        let secrets = ["123-45-6789", "hunter2-secret", "4111 1111 1111 1111", "5500000000000004", "P-998877665"];
        let before = file_bytes(&dir);
        assert!(contains(&before, "ann@example.com"), "the file is the one written to");
        let checkpoint = rusqlite::Connection::open(harness.store.path()).unwrap();
        checkpoint.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        drop(checkpoint);
        let after = file_bytes(&dir);
        for secret in secrets {
            assert!(!contains(&before, secret), "{secret} is in the database file or its WAL");
            assert!(!contains(&after, secret), "{secret} is in the database file after a checkpoint");
        }
    }

    #[tokio::test]
    async fn the_inventory_lists_every_key_seen_with_its_class_and_source() {
        let harness = Harness::new();
        let (_, auditor) = harness.store.create_token_with("a", Role::Auditor, None).unwrap();
        let (status, _) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "identify", "userId": "ann", "traits": {"email": "ann@example.com", "ssn": "1", "plan": "pro"}},
                    {"type": "track", "userId": "ann", "event": "Paid", "properties": {"memo": "4111111111111111"}}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        // The writer records keys after its commit, so look until they are there.
        let mut keys = Vec::new();
        for _ in 0..50 {
            let body = get_as(&harness, "/api/v1/pii/inventory", &auditor).await;
            keys = body["keys"].as_array().unwrap().clone();
            if keys.len() >= 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let classes: Vec<(&str, &str)> =
            keys.iter().map(|key| (key["key"].as_str().unwrap(), key["class"].as_str().unwrap())).collect();
        assert_eq!(classes, [("email", "yellow"), ("memo", "red"), ("plan", "green"), ("ssn", "red")]);
        assert_eq!(keys[0]["sources"], json!(["website"]));
        assert!(keys[0]["last_seen"].as_str().is_some());
    }

    #[tokio::test]
    async fn yellow_values_are_masked_for_roles_without_pii_access() {
        let harness = Harness::new();
        harness
            .post_json(
                "/v1/identify",
                json!({"userId": "ann", "traits": {"email": "jane@example.com", "phone": "+15551234567", "plan": "pro"}}),
            )
            .await;
        let store: Arc<dyn Store> = harness.store.clone();
        tandem_server::resolve::Resolver::load(store).unwrap().catch_up(100).unwrap();
        let (_, analyst) = harness.store.create_token_with("n", Role::Analyst, None).unwrap();
        let (_, support) = harness.store.create_token_with("s", Role::Support, None).unwrap();

        let masked = get_as(&harness, "/api/v1/profiles/prof_1", &analyst).await;
        assert_eq!(masked["traits"]["email"], "j***@example.com");
        assert_eq!(masked["traits"]["phone"], "+1********67");
        assert_eq!(masked["traits"]["plan"], "pro");
        assert!(!masked.to_string().contains("jane@example.com"), "{masked}");
        let listed = get_as(&harness, "/api/v1/profiles", &analyst).await;
        assert!(!listed.to_string().contains("jane@example.com"), "{listed}");
        let timeline = get_as(&harness, "/api/v1/profiles/prof_1/events", &analyst).await;
        assert!(!timeline.to_string().contains("jane@example.com"), "{timeline}");
        let identities = get_as(&harness, "/api/v1/profiles/prof_1/identities", &analyst).await;
        assert!(!identities.to_string().contains("jane@example.com"), "{identities}");

        let clear = get_as(&harness, "/api/v1/profiles?identifier=email:jane@example.com", &support).await;
        assert_eq!(clear["traits"]["email"], "jane@example.com");
    }

    async fn send_as(harness: &Harness, method: Method, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(if body.is_null() { Body::empty() } else { Body::from(body.to_string()) })
            .unwrap();
        harness.send(request).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pii_rules_are_set_listed_and_removed_over_the_api_and_apply_at_once() {
        let harness = Harness::new();
        let admin = harness.store.create_token("it").unwrap().1;
        let (_, auditor) = harness.store.create_token_with("a", Role::Auditor, None).unwrap();
        let (_, analyst) = harness.store.create_token_with("n", Role::Analyst, None).unwrap();
        let listed = get_as(&harness, "/api/v1/pii/rules", &auditor).await;
        assert_eq!(listed["rules"], json!([]));
        assert_eq!(listed["red_policy"], "hash");
        assert!(listed["defaults"].as_array().unwrap().contains(&json!({"name": "ssn", "class": "red"})));

        harness.post_json("/v1/identify", json!({"userId": "ann", "traits": {"plan": "gold-zq", "tier": "2"}})).await;
        let store: Arc<dyn Store> = harness.store.clone();
        tokio::task::spawn_blocking(move || {
            tandem_server::resolve::Resolver::load(store).unwrap().catch_up(100).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(get_as(&harness, "/api/v1/profiles/prof_1", &analyst).await["traits"]["plan"], "gold-zq");

        let rule = json!({"name": "Plan", "class": "yellow"});
        let (status, body) = send_as(&harness, Method::POST, "/api/v1/pii/rules", &admin, rule).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body, json!({"name": "plan", "class": "yellow", "origin": "stored"}));
        let masked = get_as(&harness, "/api/v1/profiles/prof_1", &analyst).await;
        assert_eq!(masked["traits"]["plan"], "***", "a rule set over the API masks at once: {masked}");
        assert_eq!(masked["traits"]["tier"], "2");
        let (status, body) =
            send_as(&harness, Method::POST, "/api/v1/pii/rules", &admin, json!({"pattern": "^ti", "class": "yellow"}))
                .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, _) =
            send_as(&harness, Method::POST, "/api/v1/pii/rules", &admin, json!({"name": "plan", "class": "green"}))
                .await;
        assert_eq!(status, StatusCode::OK, "setting the same name again replaces the rule");
        let masked = get_as(&harness, "/api/v1/profiles/prof_1", &analyst).await;
        assert_eq!((&masked["traits"]["plan"], &masked["traits"]["tier"]), (&json!("gold-zq"), &json!("***")));
        let listed = get_as(&harness, "/api/v1/pii/rules", &auditor).await;
        let rules: Vec<(Option<&str>, Option<&str>, &str)> = listed["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rule| (rule["name"].as_str(), rule["pattern"].as_str(), rule["class"].as_str().unwrap()))
            .collect();
        assert_eq!(rules, [(Some("plan"), None, "green"), (None, Some("^ti"), "yellow")]);

        for (bad, field) in [
            (json!({"name": "x", "class": "yellow", "policy": "refuse"}), "policy"),
            (json!({"pattern": "(", "class": "red"}), "pattern"),
            (json!({"name": "a", "pattern": "b", "class": "red"}), "name"),
            (json!({"name": " ", "class": "red"}), "name"),
        ] {
            let (status, body) = send_as(&harness, Method::POST, "/api/v1/pii/rules", &admin, bad.clone()).await;
            assert_eq!(
                (status, error_of(&body)),
                (StatusCode::UNPROCESSABLE_ENTITY, ("invalid_pii_rule", Some(field))),
                "{bad}"
            );
        }
        let (status, body) =
            send_as(&harness, Method::POST, "/api/v1/pii/rules", &admin, json!({"name": "x", "class": "blue"})).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_pii_rule"), "{body}");

        let (status, _) = send_as(&harness, Method::DELETE, "/api/v1/pii/rules?name=PLAN", &admin, Value::Null).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) =
            send_as(&harness, Method::DELETE, "/api/v1/pii/rules?name=plan", &admin, Value::Null).await;
        assert_eq!((status, error_of(&body)), (StatusCode::NOT_FOUND, ("pii_rule_not_found", Some("name"))));
        let (status, body) = send_as(&harness, Method::DELETE, "/api/v1/pii/rules", &admin, Value::Null).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_pii_rule"), "{body}");
        let (status, _) =
            send_as(&harness, Method::DELETE, "/api/v1/pii/rules?pattern=%5Eti", &admin, Value::Null).await;
        assert_eq!(status, StatusCode::NO_CONTENT);

        let audit = get_as(&harness, "/api/v1/audit?action=pii", &auditor).await;
        let actions: Vec<(&str, &str)> = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| (entry["action"].as_str().unwrap(), entry["target"].as_str().unwrap()))
            .collect();
        assert_eq!(
            actions,
            [
                ("pii.rule_set", "name:plan"),
                ("pii.rule_set", "pattern:^ti"),
                ("pii.rule_set", "name:plan"),
                ("pii.rule_remove", "name:plan"),
                ("pii.rule_remove", "pattern:^ti"),
            ]
        );
        assert_eq!(audit["entries"][2]["before"]["class"], "yellow", "a replaced rule is audited with what it was");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusing_rule_quarantines_tracking_calls_with_the_red_value_hashed() {
        let harness = Harness::new();
        let admin = harness.store.create_token("it").unwrap().1;
        let rule = json!({"name": "tax_id", "class": "red", "policy": "refuse"});
        let (status, _) = send_as(&harness, Method::POST, "/api/v1/pii/rules", &admin, rule).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) = harness
            .post_json("/v1/identify", json!({"userId": "ann", "traits": {"billing": {"tax_id": "DE-998877zq"}}}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error_of(&body), ("red_value_refused", Some("traits.billing.tax_id")));
        let (status, body) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "identify", "userId": "bob", "traits": {"ssn": "111-22-3333zq"}},
                    {"type": "track", "userId": "bob", "event": "Paid", "properties": {"tax_id": "DE-112233zq"}}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body["rejected"],
            json!([{"index": 1, "code": "red_value_refused", "field": "properties.tax_id",
            "message": "properties.tax_id holds a red pii value, and the pii rules refuse events carrying it"}])
        );
        let events = harness.events();
        assert_eq!(events.len(), 1);
        assert!(events[0]["traits"]["ssn"].as_str().unwrap().starts_with("sha256:"), "other red values are hashed");
        let quarantine = harness.store.list_quarantine(0, 10).unwrap();
        assert_eq!(quarantine.len(), 2);
        for entry in &quarantine {
            assert_eq!(entry.record.code, "red_value_refused");
            assert!(!entry.record.payload.contains("zq\""), "{}", entry.record.payload);
        }
        let dir = harness.store.path().parent().unwrap().to_owned();
        let bytes = file_bytes(&dir);
        for secret in ["DE-998877zq", "DE-112233zq", "111-22-3333zq"] {
            assert!(!contains(&bytes, secret), "{secret} is in the database file");
        }
    }
}

mod plans {
    use super::profiles::get;
    use super::*;

    async fn send_with_token(
        harness: &Harness,
        method: Method,
        path: &str,
        token: &str,
        body: String,
    ) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(body))
            .unwrap();
        harness.send(request).await
    }

    fn plan(mode: &str) -> String {
        json!({
            "mode": mode,
            "events": {"Order Completed": {
                "type": "object",
                "properties": {"total": {"type": "number"}, "currency": {"type": "string"}},
                "required": ["total"]
            }},
            "identify": {"type": "object", "properties": {"email": {"type": "string"}}}
        })
        .to_string()
    }

    fn batch() -> Value {
        json!({"batch": [
            {"type": "track", "userId": "u", "event": "Order Completed", "properties": {"total": 5}, "messageId": "ok"},
            {"type": "track", "userId": "u", "event": "Order Completed", "properties": {"total": "five"}, "messageId": "bad"},
            {"type": "track", "userId": "u", "event": "Signed Up", "messageId": "unplanned"},
            {"type": "track", "userId": "u", "event": "Order Completed",
             "properties": {"total": 1, "coupon": "X"}, "messageId": "extra"}
        ]})
    }

    fn stored_ids(harness: &Harness) -> Vec<String> {
        harness.events().iter().map(|event| event["messageId"].as_str().unwrap().to_owned()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plans_are_set_shown_validated_and_deleted_over_the_api() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        let (status, body) = get(&harness, "/api/v1/plans/website", None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "missing_token"));
        let (status, body) = get(&harness, "/api/v1/plans/website", Some(&token)).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "plan_not_found"));
        let (status, body) = get(&harness, "/api/v1/plans/nope", Some(&token)).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "source_not_found"));

        let bad = json!({"events": {"Order Completed": {"type": "nonsense"}}}).to_string();
        let (status, body) = send_with_token(&harness, Method::PUT, "/api/v1/plans/website", &token, bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error_of(&body), ("invalid_plan", Some("events.Order Completed")));
        let (status, body) = send_with_token(&harness, Method::PUT, "/api/v1/plans/website", &token, "{".into()).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::BAD_REQUEST, "invalid_json"));
        let (status, body) = send_with_token(
            &harness,
            Method::PUT,
            "/api/v1/plans/website",
            &token,
            json!({"mode": "strict"}).to_string(),
        )
        .await;
        assert_eq!((status, error_of(&body).0), (StatusCode::BAD_REQUEST, "invalid_json"), "{body}");

        let (status, body) =
            send_with_token(&harness, Method::PUT, "/api/v1/plans/website", &token, plan("report")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["plan"]["mode"], "report");
        let (status, body) = get(&harness, "/api/v1/plans", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["plans"][0]["source"], "website");
        let (status, _) =
            send_with_token(&harness, Method::DELETE, "/api/v1/plans/website", &token, String::new()).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) =
            send_with_token(&harness, Method::DELETE, "/api/v1/plans/website", &token, String::new()).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "plan_not_found"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn report_mode_keeps_everything_and_lists_violations_with_path_and_sample() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        send_with_token(&harness, Method::PUT, "/api/v1/plans/website", &token, plan("report")).await;
        let (status, body) = harness.post_json("/v1/batch", batch()).await;
        assert_eq!((status, &body), (StatusCode::OK, &json!({"success": true})));
        assert_eq!(stored_ids(&harness), vec!["ok", "bad", "unplanned", "extra"]);
        let (status, body) = get(&harness, "/api/v1/plans/website/violations", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        let violations = body["violations"].as_array().unwrap();
        let mut found: Vec<(&str, &str, &str)> = violations
            .iter()
            .map(|v| (v["kind"].as_str().unwrap(), v["event"].as_str().unwrap(), v["path"].as_str().unwrap()))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![("invalid_event", "Order Completed", "/properties/total"), ("unplanned_event", "Signed Up", "/event")]
        );
        let invalid = violations.iter().find(|v| v["kind"] == "invalid_event").unwrap();
        assert_eq!(invalid["sample"]["messageId"], "bad");
        assert_eq!(invalid["count"], 1);
        let (_, metrics) = get(&harness, "/metrics", None).await;
        assert!(metrics.as_str().unwrap().contains("tandem_plan_violations_total{kind=\"invalid_event\"} 1"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_modes_quarantine_with_a_clear_code_and_keep_the_rest_of_the_batch() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        send_with_token(&harness, Method::PUT, "/api/v1/plans/website", &token, plan("block_invalid")).await;
        let (status, body) = harness.post_json("/v1/batch", batch()).await;
        assert_eq!(status, StatusCode::OK);
        let rejected = body["rejected"].as_array().unwrap();
        assert_eq!(rejected.len(), 1, "{body}");
        assert_eq!(
            (&rejected[0]["index"], &rejected[0]["code"], &rejected[0]["field"]),
            (&json!(1), &json!("plan_violation"), &json!("/properties/total"))
        );
        assert_eq!(stored_ids(&harness), vec!["ok", "unplanned", "extra"]);
        let quarantine = harness.store.list_quarantine(0, 10).unwrap();
        assert_eq!(quarantine.len(), 1);
        assert_eq!(quarantine[0].record.code, "plan_violation");
        assert!(quarantine[0].record.payload.contains("\"five\""), "the message is kept as sent");

        send_with_token(&harness, Method::PUT, "/api/v1/plans/website", &token, plan("block_unplanned")).await;
        let (status, body) =
            harness.post_json("/v1/track", json!({"userId": "u", "event": "Signed Up", "messageId": "single"})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error_of(&body), ("unplanned_event", Some("/event")));
        let quarantine = harness.store.list_quarantine(0, 10).unwrap();
        assert_eq!(quarantine.last().unwrap().record.code, "unplanned_event");
        assert!(!stored_ids(&harness).contains(&"single".to_owned()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn violation_samples_are_masked_for_an_auditor_and_clear_reads_are_audited() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        let (_, auditor) = harness.store.create_token_with("a", tandem_core::govern::Role::Auditor, None).unwrap();
        let plan =
            json!({"mode": "report", "identify": {"type": "object", "properties": {"email": {"type": "integer"}}}});
        send_with_token(&harness, Method::PUT, "/api/v1/plans/website", &token, plan.to_string()).await;
        let (status, _) = harness
            .post_json(
                "/v1/identify",
                json!({"userId": "u", "traits": {"email": "jane.zq@example.com", "plan": "pro"}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        for path in ["/api/v1/plans/website/violations", "/api/v1/plans/website"] {
            let (status, body) = get(&harness, path, Some(&auditor)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let violation = &body["violations"][0];
            assert_eq!(violation["path"], "/traits/email");
            assert_eq!(violation["sample"]["traits"]["email"], "j***@example.com", "{path}: {violation}");
            assert_eq!(violation["sample"]["traits"]["plan"], "pro");
            assert_eq!(violation["message"], "***", "the schema error quotes the e-mail");
            assert!(!body.to_string().contains("jane.zq"), "{body}");
        }
        let (_, body) = get(&harness, "/api/v1/plans/website/violations", Some(&token)).await;
        assert_eq!(body["violations"][0]["sample"]["traits"]["email"], "jane.zq@example.com", "admin reads in clear");
        let audited = harness.store.audit_entries(&tandem_store::AuditFilter {
            action: Some("plan.read_violations".into()),
            limit: 10,
            ..Default::default()
        });
        assert_eq!(audited.unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn omit_mode_removes_unplanned_properties_before_the_log() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        send_with_token(&harness, Method::PUT, "/api/v1/plans/website", &token, plan("omit_unplanned_properties"))
            .await;
        let (status, _) = harness.post_json("/v1/batch", batch()).await;
        assert_eq!(status, StatusCode::OK);
        let events = harness.events();
        let extra = events.iter().find(|event| event["messageId"] == "extra").unwrap();
        assert_eq!(extra["properties"], json!({"total": 1}));
        let (_, body) = get(&harness, "/api/v1/plans/website", Some(&token)).await;
        let omitted: Vec<&Value> =
            body["violations"].as_array().unwrap().iter().filter(|v| v["kind"] == "omitted_property").collect();
        assert_eq!(omitted.len(), 1);
        assert_eq!(omitted[0]["path"], "/properties/coupon");
    }
}

mod data_subject_requests {
    use super::profiles::get;
    use super::*;
    use tandem_server::resolve::{Resolver, DEFAULT_BATCH};

    async fn request(harness: &Harness, token: &str, kind: &str, identifier: &str) -> (StatusCode, Value) {
        let request = Request::post("/api/v1/dsr")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(json!({"kind": kind, "identifier": identifier}).to_string()))
            .unwrap();
        harness.send(request).await
    }

    async fn resolve(harness: &Harness) {
        let store: Arc<dyn Store> = harness.store.clone();
        tokio::task::spawn_blocking(move || Resolver::load(store).unwrap().catch_up(DEFAULT_BATCH).unwrap())
            .await
            .unwrap();
    }

    /// Ann (with secrets worth finding) and Bob, resolved into profiles; one
    /// of Ann's messages is also in the quarantine and a plan-violation sample.
    async fn with_ann_and_bob(harness: &Harness, token: &str) {
        let plan = json!({"mode": "report", "events": {"Order Completed": {"type": "object", "required": ["total"]}}});
        let put = Request::put("/api/v1/plans/website")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(plan.to_string()))
            .unwrap();
        assert_eq!(harness.send(put).await.0, StatusCode::OK);
        let (status, body) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "identify", "anonymousId": "anon-zq81x", "userId": "user-zq81x",
                     "traits": {"email": "Ann.Zq81x@Example.com", "favourite": "crimson-zq81x"}, "messageId": "a1"},
                    {"type": "track", "userId": "user-zq81x", "event": "Order Completed",
                     "properties": {"coupon": "coupon-zq81x"}, "messageId": "a2"},
                    {"type": "track", "userId": "user-zq81x", "event": 5, "messageId": "a3"},
                    {"type": "identify", "userId": "bob-1", "traits": {"email": "bob@example.com"}, "messageId": "b1"}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["rejected"].as_array().unwrap().len(), 1, "{body}");
        resolve(harness).await;
    }

    fn file_bytes(harness: &Harness) -> Vec<u8> {
        let path = harness.store.path().to_path_buf();
        let mut bytes = std::fs::read(&path).unwrap();
        for suffix in ["-wal", "-journal"] {
            let side = path.with_file_name(format!("{}{suffix}", path.file_name().unwrap().to_string_lossy()));
            if let Ok(more) = std::fs::read(side) {
                bytes.extend(more);
            }
        }
        bytes
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        let needle = needle.as_bytes();
        haystack.windows(needle.len()).any(|window| window.eq_ignore_ascii_case(needle))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn access_exports_the_profile_events_history_and_deliveries() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        with_ann_and_bob(&harness, &token).await;
        let (status, body) = request(&harness, &token, "access", "email:ann.zq81x@example.com").await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!((body["kind"].as_str(), body["status"].as_str()), (Some("access"), Some("done")));
        let result = &body["result"];
        let identifiers: Vec<String> = result["profile"]["identifiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|identifier| {
                format!("{}:{}", identifier["type"].as_str().unwrap(), identifier["value"].as_str().unwrap())
            })
            .collect();
        for expected in ["anonymous_id:anon-zq81x", "user_id:user-zq81x", "email:ann.zq81x@example.com"] {
            assert!(identifiers.contains(&expected.to_owned()), "{identifiers:?}");
        }
        assert_eq!(result["profile"]["traits"]["favourite"], "crimson-zq81x");
        let mut ids: Vec<&str> =
            result["events"].as_array().unwrap().iter().map(|event| event["messageId"].as_str().unwrap()).collect();
        ids.sort();
        assert_eq!(ids, vec!["a1", "a2"], "Bob's event is not Ann's");
        assert!(!result["history"].as_array().unwrap().is_empty());
        assert!(result["memberships"].is_array() && result["deliveries"].is_array());
        assert_eq!(result["suppressed"], false);
        let digest = body["subject_digest"].as_str().unwrap();
        assert!(!digest.contains("zq81x"), "requests name the person by digest only");

        let (status, body) = request(&harness, &token, "access", "email:nobody@example.com").await;
        assert_eq!(status, StatusCode::CREATED);
        assert!(body["result"]["profile"].is_null());
        let (status, body) = request(&harness, &token, "access", "nonsense").await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_identifier", Some("identifier"))));
        let (status, body) = request(&harness, &token, "forget", "email:a@b.c").await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_value", Some("kind"))));
        let (status, body) = get(&harness, "/api/v1/dsr", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        let requests = body["requests"].as_array().unwrap();
        assert_eq!(requests.len(), 2, "{body}");
        assert!(requests.iter().all(|request| request["status"] == "done" && request["finished_at"].is_string()));
        let (status, _) = get(&harness, "/api/v1/dsr", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_leaves_no_trace_of_the_person_in_the_database_file() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        with_ann_and_bob(&harness, &token).await;
        let secrets = ["anon-zq81x", "user-zq81x", "ann.zq81x@example.com", "crimson-zq81x", "coupon-zq81x"];
        let before = file_bytes(&harness);
        for secret in secrets {
            assert!(contains(&before, secret), "{secret} is stored before the erasure");
        }
        // An import through the API refuses a row of Ann's and one of Bob's
        // (no date): the reject file on the server echoes both.
        harness.store.create_source("orders", SourceKind::Import).unwrap();
        let mapping = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mappings/orders.toml"),
        )
        .unwrap();
        let bad = "order_id,customer_id,email,ordered_at,total,currency,items,coupon\n\
                   o-1,user-zq81x,ANN.ZQ81X@example.com,soon,1,EUR,1,\n\
                   o-2,bob-1,bob@example.com,later,2,EUR,1,\n";
        let parts = [("source", None, "orders"), ("mapping", None, mapping.as_str()), ("file", Some("bad.csv"), bad)];
        let (status, job) = super::imports::upload(&harness, &token, &parts).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let rejects_path = format!("/api/v1/imports/{}/rejects", job["id"].as_str().unwrap());
        let job_path = format!("/api/v1/imports/{}", job["id"].as_str().unwrap());
        while get(&harness, &job_path, Some(&token)).await.1["status"] == "running" {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let rejects = || async {
            let request = Request::get(&rejects_path)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap();
            harness.send(request).await.1.as_str().unwrap_or_default().to_owned()
        };
        let before = rejects().await;
        assert!(before.contains("ANN.ZQ81X@example.com") && before.contains("bob@example.com"), "{before}");

        let (status, body) = request(&harness, &token, "delete", "user_id:user-zq81x").await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["status"], "done");
        assert_eq!(body["detail"]["removed"]["events"], 2, "{body}");
        assert_eq!(body["detail"]["removed"]["quarantine"], 1, "{body}");
        assert_eq!(body["detail"]["removed"]["import_rejects"], 1, "{body}");
        let after = rejects().await;
        assert!(!after.to_lowercase().contains("zq81x") && after.contains("bob@example.com"), "{after}");
        let after = file_bytes(&harness);
        for secret in secrets {
            assert!(!contains(&after, secret), "{secret} is still in the database file");
        }
        assert!(contains(&after, "bob@example.com"), "others are kept");
        let (_, body) = get(&harness, "/api/v1/profiles?identifier=user_id:user-zq81x", Some(&token)).await;
        assert_eq!(error_of(&body).0, "profile_not_found");
        // The resolver goes on after the erasure, with Bob intact.
        harness
            .post_json("/v1/track", json!({"userId": "bob-1", "event": "Order Completed", "properties": {"total": 1}}))
            .await;
        resolve(&harness).await;
        let (status, _) = get(&harness, "/api/v1/profiles?identifier=user_id:bob-1", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn suppressed_identifiers_are_refused_at_ingestion_keeping_only_a_digest() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        let (status, body) = request(&harness, &token, "suppress", "email:Carol.Zq81x@example.com").await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::CREATED, Some("done")));
        let (status, body) = harness
            .post_json(
                "/v1/identify",
                json!({"userId": "carol-1", "traits": {"email": "carol.zq81x@EXAMPLE.com"}, "messageId": "c1"}),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(error_of(&body), ("suppressed", Some("email")));
        let (status, body) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "track", "userId": "dave", "event": "A", "messageId": "d1"},
                    {"type": "track", "userId": "carol-1", "event": "A", "messageId": "c2",
                     "context": {"traits": {"email": "carol.zq81x@example.com"}}}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["rejected"][0]["index"], 1);
        assert_eq!(body["rejected"][0]["code"], "suppressed");
        let stored: Vec<Value> = harness.events();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0]["messageId"], "d1");
        let quarantine = harness.store.list_quarantine(0, 10).unwrap();
        assert_eq!(quarantine.len(), 2);
        for entry in &quarantine {
            assert_eq!(entry.record.code, "suppressed");
            assert!(entry.record.payload.starts_with("sha256:"), "{}", entry.record.payload);
            assert!(!entry.record.payload.contains("zq81x"));
        }
        let (status, _) = request(&harness, &token, "unsuppress", "email:carol.zq81x@example.com").await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, _) = harness
            .post_json(
                "/v1/identify",
                json!({"userId": "carol-1", "traits": {"email": "carol.zq81x@example.com"}, "messageId": "c3"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
}

mod stack_registry {
    use super::profiles::get;
    use super::*;

    async fn send(harness: &Harness, method: Method, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        harness.send(request).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_report_shows_spend_owners_and_traffic_with_unknown_write_keys() {
        let harness = Harness::new();
        let token = harness.store.create_token("test").unwrap().1;
        let entry = json!({"owner": "Ann", "department": "marketing", "purpose": "web analytics", "annual_cost": 1200});
        let (status, body) = send(&harness, Method::PUT, "/api/v1/stack/sources/website", &token, entry).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!((body["owner"].as_str(), body["kind"].as_str()), (Some("Ann"), Some("source")));
        let (status, body) =
            send(&harness, Method::PUT, "/api/v1/stack/sources/website", &token, json!({"annual_cost": 1500})).await;
        assert_eq!((status, body["owner"].as_str()), (StatusCode::OK, Some("Ann")), "what is not given stays");
        let (status, body) =
            send(&harness, Method::PUT, "/api/v1/stack/sources/website", &token, json!({"department": "finance"}))
                .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error_of(&body).0, "invalid_value");
        let (status, body) =
            send(&harness, Method::PUT, "/api/v1/stack/sources/website", &token, json!({"annual_cost": -5})).await;
        assert_eq!((status, error_of(&body)), (StatusCode::BAD_REQUEST, ("invalid_value", Some("annual_cost"))));
        let (status, body) = send(&harness, Method::PUT, "/api/v1/stack/sources/nope", &token, json!({})).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "source_not_found"));

        let crm = json!({
            "name": "crm", "destination": {"kind": "webhook", "url": "http://127.0.0.1:9/hook"},
            "events": {"types": ["track"]},
            "registry": {"department": "it", "annual_cost": 300.5, "purpose": "sales pipeline"}
        });
        let (status, body) = send(&harness, Method::POST, "/api/v1/destinations", &token, crm).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");

        let unknown = base64::engine::general_purpose::STANDARD.encode("zzzzUNKNOWNKEY123:");
        for _ in 0..2 {
            let request = Request::post("/v1/track")
                .header(header::AUTHORIZATION, format!("Basic {unknown}"))
                .header(header::USER_AGENT, "shadow-tool/1.0")
                .body(Body::from(json!({"userId": "u", "event": "E"}).to_string()))
                .unwrap();
            let (status, body) = harness.send(request).await;
            assert_eq!((status, error_of(&body).0), (StatusCode::UNAUTHORIZED, "invalid_write_key"));
        }
        let in_body = json!({"writeKey": "yyyyOTHER", "batch": [{"type": "track", "userId": "u", "event": "E"}]});
        let (status, _) = harness.send(Request::post("/v1/batch").body(Body::from(in_body.to_string())).unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        let (status, report) = get(&harness, "/api/v1/stack", Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(report["spend_by_department"], json!({"marketing": 1500.0, "it": 300.5}));
        assert_eq!(report["total_annual_cost"], 1800.5);
        assert_eq!(report["without_owner"], json!(["destination crm"]));
        assert_eq!(report["tools_touching_pii"], json!([]), "nothing personal has been sent yet");
        let website = harness.store.source_by_name("website").unwrap().id;
        let seen = |key: &str, class| tandem_store::PiiKeySeen {
            key: key.into(),
            source_id: website.clone(),
            class,
            last_seen_ms: 1,
        };
        use tandem_core::govern::PiiClass;
        harness.store.record_pii_keys(&[seen("plan", PiiClass::Green)]).unwrap();
        let (_, report) = get(&harness, "/api/v1/stack", Some(&token)).await;
        assert_eq!(report["tools_touching_pii"], json!([]), "green keys are not personal");
        harness.store.record_pii_keys(&[seen("email", PiiClass::Yellow)]).unwrap();
        let (_, report) = get(&harness, "/api/v1/stack", Some(&token)).await;
        assert_eq!(
            report["tools_touching_pii"],
            json!(["destination crm", "source website"]),
            "the source that sent an e-mail, and the destination that receives its events"
        );
        let shadow = report["shadow_traffic"].as_array().unwrap();
        assert_eq!(shadow.len(), 2, "{report}");
        let first = shadow.iter().find(|key| key["key_hint"] == "zzzz…").unwrap();
        assert_eq!(first["requests"], 2);
        assert_eq!(first["ips"], json!(["192.0.2.7"]));
        assert_eq!(first["user_agents"], json!(["shadow-tool/1.0"]));
        assert!(first["first_seen"].is_string() && first["last_seen"].is_string());
        assert!(!report.to_string().contains("UNKNOWNKEY"), "the key itself is never kept");
        // Sending addresses are personal data: an auditor sees them masked.
        let (_, auditor) = harness.store.create_token_with("a", tandem_core::govern::Role::Auditor, None).unwrap();
        let (status, audited) = get(&harness, "/api/v1/stack", Some(&auditor)).await;
        assert_eq!(status, StatusCode::OK);
        let first =
            audited["shadow_traffic"].as_array().unwrap().iter().find(|key| key["key_hint"] == "zzzz…").unwrap();
        let shown = first["ips"][0].as_str().unwrap();
        assert!(!audited.to_string().contains("192.0.2.7") && !shown.is_empty(), "{shown}");
        assert_eq!(first["user_agents"], json!(["shadow-tool/1.0"]));
        let (status, _) = get(&harness, "/api/v1/stack", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}

/// Governance applies the same way however events arrive — a tracking call,
/// a webhook delivery, an import over HTTP: a suppressed person, a red value
/// the PII rules refuse and an event the tracking plan blocks are each
/// quarantined with the same code, and the violation is counted alike.
mod governance_on_every_path {
    use super::profiles::get;
    use super::*;
    use tandem_core::mapping::Mapping;
    use tandem_core::webhook::{WebhookFormat, WebhookSettings};

    async fn admin(harness: &Harness, method: Method, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        harness.send(request).await
    }

    /// `Order Completed` by user id and e-mail, with a total and a tax id.
    const MAPPING: &str =
        "event = \"Order Completed\"\nrow_key = \"id\"\n[identifiers]\nuser_id = \"user\"\nemail = \"email\"\n\
                           [properties]\ntotal = { column = \"total\", type = \"number\" }\ntax_id = \"tax_id\"\n";

    /// The same four orders as rows: kept, a suppressed person's, one with
    /// a tax id (refused), one over the plan's maximum total (blocked).
    fn rows() -> Vec<Value> {
        vec![
            json!({"id": "o1", "user": "u1", "email": "kept@example.com", "total": 10}),
            json!({"id": "o2", "user": "u2", "email": "gone.zq@example.com", "total": 20}),
            json!({"id": "o3", "user": "u3", "email": "c@example.com", "total": 30, "tax_id": "DE-tax-991zq"}),
            json!({"id": "o4", "user": "u4", "email": "d@example.com", "total": 5000}),
        ]
    }

    fn quarantined(harness: &Harness, source: &Source) -> Vec<tandem_store::QuarantineRecord> {
        harness
            .store
            .list_quarantine(0, 100)
            .unwrap()
            .into_iter()
            .map(|entry| entry.record)
            .filter(|record| record.source_id == source.id)
            .collect()
    }

    fn stored_users(harness: &Harness, source: &Source) -> Vec<String> {
        harness
            .events()
            .iter()
            .filter(|event| event["sourceId"] == source.id.as_str())
            .map(|event| event["userId"].as_str().unwrap().to_owned())
            .collect()
    }

    /// What each way in must have done with the four orders.
    async fn assert_governed(harness: &Harness, token: &str, source: &Source) {
        assert_eq!(stored_users(harness, source), ["u1"], "{}", source.name);
        let quarantine = quarantined(harness, source);
        let codes: Vec<&str> = quarantine.iter().map(|record| record.code.as_str()).collect();
        assert_eq!(codes, ["suppressed", "red_value_refused", "plan_violation"], "{}", source.name);
        assert!(quarantine[0].payload.starts_with("sha256:"), "{}: {}", source.name, quarantine[0].payload);
        assert!(!quarantine[1].payload.contains("DE-tax-991zq"), "{}: {}", source.name, quarantine[1].payload);
        assert_eq!(quarantine[1].field.as_deref(), Some("properties.tax_id"));
        let path = format!("/api/v1/plans/{}/violations", source.name);
        let (status, body) = get(harness, &path, Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let violations: Vec<(&str, &str, u64)> = body["violations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["kind"].as_str().unwrap(), v["path"].as_str().unwrap(), v["count"].as_u64().unwrap()))
            .collect();
        assert_eq!(violations, [("invalid_event", "/properties/total", 1)], "{}", source.name);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tracking_calls_webhooks_and_imports_are_governed_alike() {
        let harness = Harness::new();
        let token = harness.store.create_token("it").unwrap().1;
        let hook = harness.store.create_source("hook", SourceKind::Webhook).unwrap();
        let settings = WebhookSettings {
            format: WebhookFormat::Generic,
            secret: None,
            verify_token: None,
            mapping: Some(Mapping::from_toml(MAPPING).unwrap()),
        };
        harness.store.set_webhook("hook", &settings).unwrap();
        let orders = harness.store.create_source("orders", SourceKind::Import).unwrap();

        let (status, body) = admin(
            &harness,
            Method::POST,
            "/api/v1/pii/rules",
            &token,
            json!({"name": "tax_id", "class": "red", "policy": "refuse"}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body) = admin(
            &harness,
            Method::POST,
            "/api/v1/dsr",
            &token,
            json!({"kind": "suppress", "identifier": "email:gone.zq@example.com"}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let plan = json!({"mode": "block_invalid", "events": {"Order Completed": {
            "type": "object", "properties": {"total": {"type": "number", "maximum": 1000}}}}});
        for source in ["website", "hook", "orders"] {
            let (status, body) =
                admin(&harness, Method::PUT, &format!("/api/v1/plans/{source}"), &token, plan.clone()).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }

        // The tracking API.
        let batch: Vec<Value> = rows()
            .into_iter()
            .map(|row| {
                let mut properties = json!({"total": row["total"]});
                if let Some(tax_id) = row.get("tax_id") {
                    properties["tax_id"] = tax_id.clone();
                }
                json!({"type": "track", "event": "Order Completed", "userId": row["user"], "messageId": row["id"],
                       "context": {"traits": {"email": row["email"]}}, "properties": properties})
            })
            .collect();
        let (status, body) = harness.post_json("/v1/batch", json!({ "batch": batch })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let codes: Vec<&str> =
            body["rejected"].as_array().unwrap().iter().map(|r| r["code"].as_str().unwrap()).collect();
        assert_eq!(codes, ["suppressed", "red_value_refused", "plan_violation"]);
        assert_governed(&harness, &token, &harness.source).await;

        // A webhook delivery of the same four.
        let request =
            Request::post(format!("/v1/webhooks/{}", hook.id)).body(Body::from(Value::Array(rows()).to_string()));
        let (status, body) = harness.send(request.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!((body["accepted"].as_u64(), body["stored"].as_u64()), (Some(1), Some(1)), "{body}");
        let refused: Vec<(u64, &str)> = body["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["index"].as_u64().unwrap(), r["code"].as_str().unwrap()))
            .collect();
        assert_eq!(refused, [(1, "suppressed"), (2, "red_value_refused"), (3, "plan_violation")]);
        assert_governed(&harness, &token, &hook).await;

        // An import of the same four over HTTP.
        let mut csv = String::from("id,user,email,total,tax_id\n");
        for row in rows() {
            let tax_id = row.get("tax_id").and_then(Value::as_str).unwrap_or("");
            csv.push_str(&format!(
                "{},{},{},{},{tax_id}\n",
                row["id"].as_str().unwrap(),
                row["user"].as_str().unwrap(),
                row["email"].as_str().unwrap(),
                row["total"]
            ));
        }
        let parts =
            [("source", None, "orders"), ("mapping", None, MAPPING), ("file", Some("orders.csv"), csv.as_str())];
        let (status, job) = super::imports::upload(&harness, &token, &parts).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        let mut job = job;
        for _ in 0..200 {
            job = get(&harness, &format!("/api/v1/imports/{id}"), Some(&token)).await.1;
            if job["status"] != "running" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(job["status"], "succeeded", "{job}");
        let counts = &job["counts"];
        assert_eq!(
            (&counts["rows_read"], &counts["imported"], &counts["rejected"], &counts["quarantined"]),
            (&json!(4), &json!(1), &json!(3), &json!(3)),
            "{job}"
        );
        assert_governed(&harness, &token, &orders).await;

        // Same counts everywhere: three refusals per way in.
        let stats = harness.store.stats().unwrap();
        assert_eq!((stats.events, stats.rejected), (3, 9), "{stats:?}");
        let bytes = std::fs::read(harness.store.path()).unwrap();
        let wal = std::fs::read(harness.store.path().with_extension("db-wal")).unwrap_or_default();
        for secret in ["DE-tax-991zq", "gone.zq@example.com"] {
            for haystack in [&bytes, &wal] {
                assert!(
                    !haystack.windows(secret.len()).any(|window| window == secret.as_bytes()),
                    "{secret} is stored"
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quarantined_delivery_keeps_no_red_value_and_no_suppressed_person() {
        let harness = Harness::new();
        let token = harness.store.create_token("it").unwrap().1;
        let hook = harness.store.create_source("hook", SourceKind::Webhook).unwrap();
        let settings = WebhookSettings {
            format: WebhookFormat::Generic,
            secret: None,
            verify_token: None,
            mapping: Some(Mapping::from_toml(MAPPING).unwrap()),
        };
        harness.store.set_webhook("hook", &settings).unwrap();
        // A row with no identifier is refused; the delivery it came in is
        // quarantined as sent, except its red values, wherever they sit.
        let delivery =
            json!([{"id": "x1", "total": 1, "applicant": {"ssn": "123-45-6789"}, "note": "4111 1111 1111 1111"}]);
        let request = Request::post(format!("/v1/webhooks/{}", hook.id)).body(Body::from(delivery.to_string()));
        let (status, body) = harness.send(request.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let record = &quarantined(&harness, &hook)[0];
        assert!(!record.payload.contains("123-45-6789") && !record.payload.contains("4111"), "{}", record.payload);
        assert!(record.payload.contains("\"x1\""), "the rest is kept: {}", record.payload);

        // A delivery that also carries a suppressed person is kept as a digest only.
        let (status, _) = admin(
            &harness,
            Method::POST,
            "/api/v1/dsr",
            &token,
            json!({"kind": "suppress", "identifier": "user_id:u-gone"}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
        let delivery = json!([{"id": "x2", "user": "u-gone", "total": 2}, {"id": "x3", "total": 3}]);
        let request = Request::post(format!("/v1/webhooks/{}", hook.id)).body(Body::from(delivery.to_string()));
        let (status, body) = harness.send(request.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        for record in &quarantined(&harness, &hook)[1..] {
            assert!(record.payload.starts_with("sha256:") && !record.payload.contains("u-gone"), "{}", record.payload);
        }
    }
}

mod goals {
    use super::*;
    use tandem_core::govern::Role;
    use tandem_server::insight::{system_clock, InsightStage};

    async fn call(harness: &Harness, method: &str, uri: &str, token: &str, body: Option<&str>) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        let body = body.map_or_else(Body::empty, |body| Body::from(body.to_owned()));
        harness.send(request.body(body).unwrap()).await
    }

    /// Days from today on (UTC), so the goal's period has just begun.
    fn this_period() -> String {
        let today = chrono::Utc::now().date_naive();
        format!("{today}..{}", today + chrono::Days::new(99))
    }

    fn revenue_goal(name: &str, target: f64) -> Value {
        json!({"name": name, "owner": "marketing", "target": target, "period": this_period(),
               "metric": {"kind": "revenue", "event": "Order Completed", "property": "revenue"}})
    }

    #[tokio::test]
    async fn goals_are_created_listed_shown_with_their_trend_and_deleted() {
        let harness = Harness::new();
        let (status, _) = harness
            .post_json(
                "/v1/batch",
                json!({"batch": [
                    {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"revenue": 30}},
                    {"type": "track", "userId": "bob", "event": "Order Completed", "properties": {"revenue": 12.5}},
                    {"type": "track", "userId": "bob", "event": "Product Viewed"}
                ]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let store: Arc<dyn Store> = harness.store.clone();
        tandem_server::resolve::Resolver::load(store.clone()).unwrap().catch_up(100).unwrap();
        let admin = harness.store.create_token_with("ops", Role::Admin, None).unwrap().1;
        let marketer = harness.store.create_token_with("cmo", Role::Marketer, None).unwrap().1;
        let analyst = harness.store.create_token_with("bi", Role::Analyst, None).unwrap().1;

        let body = revenue_goal("Revenue", 1_000.0).to_string();
        let (status, created) = call(&harness, "POST", "/api/v1/goals", &marketer, Some(&body)).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert_eq!(
            (created["name"].as_str(), created["owner"].as_str(), created["unit"].as_str(), created["status"].as_str()),
            (Some("Revenue"), Some("marketing"), Some("money"), Some("counting")),
            "not judged before the stage has counted the past: {created}"
        );
        assert!(!created["complete"].as_bool().unwrap(), "not counted yet: {created}");
        let (status, body) =
            call(&harness, "POST", "/api/v1/goals", &marketer, Some(&revenue_goal("Revenue", 5.0).to_string())).await;
        assert_eq!((status, error_of(&body)), (StatusCode::CONFLICT, ("goal_exists", Some("name"))));
        let it_goal = json!({"name": "Merges", "owner": "it", "target": 50, "period": this_period(), "metric": {"kind": "merge_rate"}});
        let (status, body) = call(&harness, "POST", "/api/v1/goals", &analyst, Some(&it_goal.to_string())).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::FORBIDDEN, "permission_denied"));
        let (status, _) = call(&harness, "POST", "/api/v1/goals", &admin, Some(&it_goal.to_string())).await;
        assert_eq!(status, StatusCode::CREATED);

        InsightStage::new(store.clone(), system_clock()).catch_up().unwrap();
        // Every role reads goals.
        let (status, listed) = call(&harness, "GET", "/api/v1/goals", &analyst, None).await;
        assert_eq!(status, StatusCode::OK, "{listed}");
        let goals = listed["goals"].as_array().unwrap();
        assert_eq!(goals.len(), 2);
        let revenue = goals.iter().find(|goal| goal["name"] == "Revenue").unwrap();
        assert_eq!((revenue["value"].as_f64(), revenue["complete"].as_bool()), (Some(42.5), Some(true)), "{revenue}");
        assert!(revenue.get("trend").is_none(), "the list leaves trends out");
        let merges = goals.iter().find(|goal| goal["name"] == "Merges").unwrap();
        assert_eq!((merges["value"].as_f64(), merges["status"].as_str()), (Some(0.0), Some("off_track")), "{merges}");

        let (status, shown) = call(&harness, "GET", "/api/v1/goals/Revenue", &analyst, None).await;
        assert_eq!(status, StatusCode::OK);
        let trend = shown["trend"].as_array().unwrap();
        assert!(!trend.is_empty() && trend.len() <= 2, "one point per day so far: {shown}");
        assert_eq!(trend.last().unwrap()["value"], shown["value"]);
        assert_eq!(shown["period_start"].as_str(), Some(this_period().split("..").next().unwrap()));
        let (status, body) = call(&harness, "GET", "/api/v1/goals/Nope", &analyst, None).await;
        assert_eq!((status, error_of(&body)), (StatusCode::NOT_FOUND, ("goal_not_found", Some("name"))));

        let (status, _) = call(&harness, "DELETE", "/api/v1/goals/Revenue", &marketer, None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, body) = call(&harness, "DELETE", "/api/v1/goals/Revenue", &marketer, None).await;
        assert_eq!((status, error_of(&body).0), (StatusCode::NOT_FOUND, "goal_not_found"));
        let actions: Vec<String> = harness
            .store
            .audit_entries(&tandem_store::AuditFilter { action: Some("goal".into()), limit: 10, ..Default::default() })
            .unwrap()
            .into_iter()
            .map(|entry| format!("{} {}", entry.action, entry.target))
            .collect();
        assert_eq!(actions, vec!["goal.create Revenue", "goal.create Merges", "goal.delete Revenue"]);
    }

    #[tokio::test]
    async fn bad_settings_are_refused_naming_the_field() {
        let harness = Harness::new();
        let admin = harness.store.create_token_with("ops", Role::Admin, None).unwrap().1;
        let with = |change: &dyn Fn(&mut Value)| {
            let mut goal = revenue_goal("g", 10.0);
            change(&mut goal);
            goal.to_string()
        };
        let cases: Vec<(String, StatusCode, &str, Option<&str>)> = vec![
            ("{not json".to_owned(), StatusCode::BAD_REQUEST, "invalid_json", None),
            (
                with(&|goal| _ = goal.as_object_mut().unwrap().remove("name")),
                StatusCode::BAD_REQUEST,
                "missing_field",
                Some("name"),
            ),
            (with(&|goal| goal["target"] = json!("lots")), StatusCode::BAD_REQUEST, "invalid_type", Some("target")),
            (
                with(&|goal| goal["metric"]["kind"] = json!("profit")),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_goal",
                Some("metric.kind"),
            ),
            (
                with(&|goal| goal["period"] = json!("soon")),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_goal",
                Some("period"),
            ),
            (
                with(&|goal| goal["owner"] = json!("sales")),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_goal",
                Some("owner"),
            ),
            (
                with(&|goal| goal["colour"] = json!("red")),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_goal",
                Some("colour"),
            ),
            (
                with(&|goal| goal["metric"] = json!({"kind": "conversion", "from": "a", "to": "b", "within": "7w"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_goal",
                Some("metric.within"),
            ),
            (
                with(&|goal| goal["metric"] = json!({"kind": "audience_size", "audience": "nobody"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_goal",
                Some("metric.audience"),
            ),
            (
                with(&|goal| goal["metric"] = json!({"kind": "merge_rate"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_goal",
                Some("target"),
            ),
        ];
        // The last case: a merge rate of 10 is fine, 1,000 % is not.
        let mut cases = cases;
        cases.last_mut().unwrap().0 = {
            let mut goal: Value = serde_json::from_str(&cases.last().unwrap().0).unwrap();
            goal["target"] = json!(1_000);
            goal.to_string()
        };
        for (body, status, code, field) in &cases {
            let (got, answer) = call(&harness, "POST", "/api/v1/goals", &admin, Some(body)).await;
            assert_eq!((got, error_of(&answer)), (*status, (*code, *field)), "{body}: {answer}");
        }
        assert!(harness.store.list_goals().unwrap().is_empty());
    }
}

/// The OpenAPI document's request bodies say what the server takes: every
/// documented JSON body's example is accepted by a live router.
mod openapi_examples {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_documented_example_body_is_accepted() {
        let harness = Harness::new();
        let token = harness.store.create_token("it").unwrap().1;
        let request = Request::get("/api/v1/openapi.json").header(header::AUTHORIZATION, format!("Bearer {token}"));
        let (status, document) = harness.send(request.body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        let schemas = &document["components"]["schemas"];
        let mut examples = std::collections::BTreeMap::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let Some(content) = operation["requestBody"]["content"]["application/json"].as_object() else {
                    continue;
                };
                let name = content["schema"]["$ref"].as_str().unwrap().rsplit('/').next().unwrap();
                let schema = &schemas[name];
                let example = schema["examples"].get(0).or(schema.get("example")).cloned();
                let example = example.unwrap_or_else(|| panic!("{method} {path}: the {name} schema has no example"));
                examples.insert(format!("{} {path}", method.to_ascii_uppercase()), example);
            }
        }
        // In an order that gives each the things it names (a source, a destination).
        let order = [
            ("POST /api/v1/pii/rules", "/api/v1/pii/rules"),
            ("PUT /api/v1/plans/{source}", "/api/v1/plans/website"),
            ("PUT /api/v1/stack/sources/{name}", "/api/v1/stack/sources/website"),
            ("POST /api/v1/destinations", "/api/v1/destinations"),
            ("PUT /api/v1/stack/destinations/{name}", "/api/v1/stack/destinations/crm"),
            ("POST /api/v1/audiences", "/api/v1/audiences"),
            ("POST /api/v1/audiences/preview", "/api/v1/audiences/preview"),
            ("POST /api/v1/computed-traits", "/api/v1/computed-traits"),
            ("POST /api/v1/dsr", "/api/v1/dsr"),
        ];
        let documented: Vec<&String> = examples.keys().collect();
        let mut sent: Vec<&str> = order.iter().map(|(operation, _)| *operation).collect();
        sent.sort();
        assert_eq!(documented, sent, "every JSON body is sent below");
        for (operation, uri) in order {
            let method = operation.split(' ').next().unwrap();
            let request = Request::builder()
                .method(method)
                .uri(uri)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::from(examples[operation].to_string()))
                .unwrap();
            let (status, body) = harness.send(request).await;
            assert!(status.is_success(), "{operation} with its example {}: {status} {body}", examples[operation]);
        }
    }
}
