//! `/health` and `/api/v1/cluster` on a PostgreSQL store: the store's kind
//! and connection, 503 once the database is gone, and the cluster status
//! behind an admin token. Needs the PostgreSQL test server
//! (`TANDEM_TEST_POSTGRES`, see `tandem_store::postgres::testing`).

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use std::sync::Arc;
use tandem_server::{router, AppState, DEFAULT_DEDUP_WINDOW};
use tandem_store::postgres::testing::TestDatabase;
use tandem_store::prelude::*;
use tandem_store::PostgresStore;
use tower::ServiceExt;

async fn get(app: &Router, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = Request::get(path);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Synchronous set-up and tear-down (PostgreSQL's client must not block an
/// async worker), with the requests on a runtime of their own.
#[test]
fn health_reports_the_postgres_store_and_503_once_it_is_gone() {
    let Some((database, config)) = TestDatabase::create() else { return };
    let store = Arc::new(PostgresStore::connect_with(config, 4).unwrap());
    let (_, token) = store.create_token("ops").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (state, _writer) = AppState::start(store.clone(), DEFAULT_DEDUP_WINDOW, dir.path().join("imports"));
    state.leases.set(tandem_store::Stage::RESOLVE, true);
    let app = router(state);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {

    let (status, health) = get(&app, "/health", None).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["store"], json!({"kind": "postgres", "ok": true}));
    assert_eq!(health["leases"], json!({"resolve": true}));

    let (status, _) = get(&app, "/api/v1/cluster", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, cluster) = get(&app, "/api/v1/cluster", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{cluster}");
    assert_eq!(
        cluster,
        json!({"store": "postgres", "head": 0, "stages": [{"stage": "resolve", "position": 0, "lag": 0, "lease": "vacant"}]}),
        "no resolver thread runs in this test, so no session holds the lease"
    );
    });

    drop(database);
    runtime.block_on(async {
        let (status, health) = get(&app, "/health", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
        assert_eq!(health["status"], "unavailable");
        assert_eq!(
            (health["store"]["kind"].as_str(), health["store"]["ok"].as_bool()),
            (Some("postgres"), Some(false))
        );
        assert!(health["store"]["error"].as_str().is_some_and(|error| !error.is_empty()), "{health}");
    });
}
