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

/// Ingest through NATS JetStream: a real `nats-server` per test
/// (`tandem_server::stream::testing`), a fresh PostgreSQL database, and
/// whole servers (`tandem_server::start`, with their drain and resolver
/// threads) answering through their routers.
mod stream {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};
    use tandem_core::{LogPosition, SourceKind};
    use tandem_server::stream::testing::NatsServer;
    use tandem_server::stream::{EventStream, StreamOptions};
    use tandem_server::ServerOptions;

    /// One node: its router, its state and the way to stop it.
    struct Node {
        app: Router,
        state: AppState,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        served: Option<tokio::task::JoinHandle<()>>,
        _dir: tempfile::TempDir,
    }

    fn options(log: Option<StreamOptions>, dir: &tempfile::TempDir) -> ServerOptions {
        ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            dedup_window: DEFAULT_DEDUP_WINDOW,
            import_dir: dir.path().join("imports"),
            resolver_cache: tandem_server::resolve::ResolverCache::default(),
            log,
            pii: Default::default(),
            consent_default: Default::default(),
        }
    }

    fn start_node(runtime: &tokio::runtime::Runtime, store: Arc<dyn Store>, log: StreamOptions) -> Node {
        start_server(runtime, store, Some(log))
    }

    /// A whole server over `store`: ingesting through the stream `log`, or
    /// appending to the store's own log (embedded mode) without one.
    fn start_server(runtime: &tokio::runtime::Runtime, store: Arc<dyn Store>, log: Option<StreamOptions>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let running = runtime.block_on(tandem_server::start(store, &options(log, &dir))).unwrap();
        let state = running.state();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = runtime.spawn(async move {
            running
                .serve(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Node { app: router(state.clone()), state, stop: Some(stop), served: Some(served), _dir: dir }
    }

    impl Node {
        /// Stops the node the way SIGTERM does; its leases go with it.
        fn stop(self, runtime: &tokio::runtime::Runtime) {
            let Node { app, state, stop, served, _dir } = self;
            // An embedded server's log writer stops once every handle to it
            // (the router's state) is gone.
            drop((app, state));
            let _ = stop.unwrap().send(());
            runtime.block_on(served.unwrap()).unwrap();
        }
    }

    async fn track(app: &Router, write_key: &str, message_id: &str, user: &str) -> (StatusCode, Value) {
        use base64::Engine;
        let body = json!({"userId": user, "event": "Signed Up", "messageId": message_id});
        let request = Request::post("/v1/track")
            .header(
                header::AUTHORIZATION,
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"))),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// Waits until `done` holds, checking every 50 ms for up to 30 s.
    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many times each message id is in the log.
    fn message_id_counts(store: &dyn Store) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for entry in store.read_log(LogPosition(0), 1_000_000).unwrap() {
            *counts.entry(entry.message_id.as_str().to_owned()).or_default() += 1;
        }
        counts
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    #[test]
    fn an_acknowledged_event_is_in_the_stream_then_in_the_log_and_resolves_into_a_profile() {
        let Some((_database, config)) = TestDatabase::create() else { return };
        let nats = NatsServer::start();
        let store = Arc::new(PostgresStore::connect_with(config, 8).unwrap());
        let source = store.create_source("web", SourceKind::Website).unwrap();
        let runtime = runtime();
        let log = StreamOptions::parse(&nats.url()).unwrap();
        // Only the stream for now: no drain runs, so what the API answers
        // is JetStream's acknowledgement alone.
        let stream = runtime.block_on(EventStream::connect(&log)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pii = Arc::new(tandem_server::pii::PiiDirectory::new(store.clone(), Default::default()).unwrap());
        let collector =
            router(AppState::start_streaming(store.clone(), stream.clone(), dir.path().join("imports"), pii));
        let (status, body) = runtime.block_on(track(&collector, source.write_key.as_str(), "m-1", "ada"));
        assert_eq!((status, body), (StatusCode::OK, json!({"success": true})));
        assert_eq!(runtime.block_on(stream.last_sequence()).unwrap(), 1, "answered 200 only once in the stream");
        assert_eq!(store.head().unwrap(), LogPosition(0), "nothing drains yet");

        let node = start_node(&runtime, store.clone(), log);
        wait_for("the drain to append the event", || store.head().unwrap() == LogPosition(1));
        wait_for("the resolver to make a profile", || {
            let stats = store.stats().unwrap();
            stats.profiles == 1 && stats.resolver_position == LogPosition(1)
        });
        assert_eq!(message_id_counts(store.as_ref()), BTreeMap::from([("m-1".to_owned(), 1)]));
        assert_eq!(store.drained_sequence(stream.name()).unwrap(), 1);

        let (_, token) = store.create_token("ops").unwrap();
        let (status, health) = runtime.block_on(get(&node.app, "/health", None));
        assert_eq!(status, StatusCode::OK, "{health}");
        assert_eq!(health["log"], json!({"kind": "nats", "stream": "TANDEM_EVENTS", "ok": true}));
        assert_eq!(health["leases"]["drain"], json!(true));
        let (status, cluster) = runtime.block_on(get(&node.app, "/api/v1/cluster", Some(&token)));
        assert_eq!(status, StatusCode::OK, "{cluster}");
        assert_eq!(cluster["stages"][0], json!({"stage": "drain", "position": 1, "lag": 0, "lease": "held"}));
        let metrics = node.state.metrics.render();
        assert!(metrics.lines().any(|line| line == "tandem_drain_sequence 1"), "{metrics}");
        assert!(metrics.lines().any(|line| line == "tandem_drain_lag_messages 0"), "{metrics}");

        // The stream gone: unhealthy, and the tracking API cannot take events.
        drop(nats);
        wait_for("the client to notice the server is gone", || !stream.is_connected());
        let (status, health) = runtime.block_on(get(&node.app, "/health", None));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
        assert_eq!((health["log"]["kind"].as_str(), health["log"]["ok"].as_bool()), (Some("nats"), Some(false)));
        let (status, _) = runtime.block_on(track(&collector, source.write_key.as_str(), "m-2", "bob"));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "no acknowledgement, no 200");
        node.stop(&runtime);
    }

    #[test]
    fn sdk_retries_of_one_message_id_give_one_event_within_and_after_the_stream_window() {
        let Some((_database, config)) = TestDatabase::create() else { return };
        let nats = NatsServer::start();
        let store = Arc::new(PostgresStore::connect_with(config, 8).unwrap());
        let source = store.create_source("web", SourceKind::Website).unwrap();
        let runtime = runtime();
        let mut log = StreamOptions::parse(&nats.url()).unwrap();
        log.duplicate_window = Duration::from_secs(1);
        let node = start_node(&runtime, store.clone(), log);
        let stream = node.state.stream.clone().unwrap();
        for _ in 0..2 {
            let (status, _) = runtime.block_on(track(&node.app, source.write_key.as_str(), "retry-1", "ada"));
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!(runtime.block_on(stream.last_sequence()).unwrap(), 1, "JetStream dropped the retry in its window");
        // Past JetStream's window the retry is stored in the stream again,
        // and the log's 24-hour dedup drops it at the drain.
        std::thread::sleep(Duration::from_millis(1_500));
        let (status, _) = runtime.block_on(track(&node.app, source.write_key.as_str(), "retry-1", "ada"));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(runtime.block_on(stream.last_sequence()).unwrap(), 2);
        let (status, _) = runtime.block_on(track(&node.app, source.write_key.as_str(), "other", "ada"));
        assert_eq!(status, StatusCode::OK);
        wait_for("the drain to reach the end of the stream", || store.drained_sequence(stream.name()).unwrap() == 3);
        assert_eq!(
            message_id_counts(store.as_ref()),
            BTreeMap::from([("other".to_owned(), 1), ("retry-1".to_owned(), 1)])
        );
        let stats = store.stats().unwrap();
        assert_eq!((stats.events, stats.duplicates), (2, 1), "the drain counted the late retry as a duplicate");
        let metrics = node.state.metrics.render();
        assert!(metrics.lines().any(|line| line == "tandem_drain_duplicates_total 1"), "{metrics}");
        node.stop(&runtime);
    }

    #[test]
    fn two_nodes_ingest_one_drains_and_the_other_takes_over_with_every_event_once() {
        let Some((_database, config)) = TestDatabase::create() else { return };
        let nats = NatsServer::start();
        let first_store: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(config.clone(), 8).unwrap());
        let second_store: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(config, 8).unwrap());
        let source = first_store.create_source("web", SourceKind::Website).unwrap();
        let runtime = runtime();
        let log = StreamOptions::parse(&nats.url()).unwrap();
        let first = start_node(&runtime, first_store.clone(), log.clone());
        let second = start_node(&runtime, second_store.clone(), log);
        let drain = tandem_store::Stage::DRAIN;
        wait_for("one node to take the drain lease", || {
            first.state.leases.holds(drain) || second.state.leases.holds(drain)
        });
        let mut acknowledged = Vec::new();
        for index in 0..60 {
            let node = if index % 2 == 0 { &first } else { &second };
            let message_id = format!("e-{index}");
            let (status, _) = runtime.block_on(track(
                &node.app,
                source.write_key.as_str(),
                &message_id,
                &format!("user-{}", index % 7),
            ));
            assert_eq!(status, StatusCode::OK);
            acknowledged.push(message_id);
        }
        assert!(
            first.state.leases.holds(drain) != second.state.leases.holds(drain),
            "exactly one node drains: {:?} / {:?}",
            first.state.leases.snapshot(),
            second.state.leases.snapshot()
        );
        let (drainer, other) = if first.state.leases.holds(drain) { (first, second) } else { (second, first) };
        // Stop the drainer with events still arriving at the other node: its
        // lease goes with it, and the other node takes over.
        let other_store = other.state.store.clone();
        let ingesting = {
            let app = other.app.clone();
            let key = source.write_key.as_str().to_owned();
            runtime.spawn(async move {
                let mut sent = Vec::new();
                for index in 60..120 {
                    let message_id = format!("e-{index}");
                    let (status, _) = track(&app, &key, &message_id, "late").await;
                    assert_eq!(status, StatusCode::OK);
                    sent.push(message_id);
                }
                sent
            })
        };
        drainer.stop(&runtime);
        acknowledged.extend(runtime.block_on(ingesting).unwrap());
        wait_for("the other node to take the drain lease", || other.state.leases.holds(drain));
        wait_for("every acknowledged event in the log", || other_store.head().unwrap() == LogPosition(120));
        let counts = message_id_counts(other_store.as_ref());
        assert_eq!(counts.len(), 120);
        assert!(counts.values().all(|&count| count == 1), "every event once: {counts:?}");
        assert!(acknowledged.iter().all(|id| counts.contains_key(id)));
        other.stop(&runtime);
    }

    async fn post(app: &Router, path: &str, write_key: &str, body: &Value) -> (StatusCode, Value) {
        use base64::Engine;
        let request = Request::post(path)
            .header(
                header::AUTHORIZATION,
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"))),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// Requests that break a `block_unplanned` plan in every way it counts:
    /// a blocked unplanned event in a batch and alone, a kept event failing
    /// its schema, and valid events beside them. Returns the answers.
    async fn send_plan_breaking_requests(app: &Router, write_key: &str) -> Vec<(StatusCode, Value)> {
        let mut answers = Vec::new();
        let batch = json!({"batch": [
            {"type": "track", "userId": "ada", "event": "Order Completed", "messageId": "ok-1",
             "properties": {"total": 10}},
            {"type": "track", "userId": "ada", "event": "Coupon Spun", "messageId": "unplanned-1"},
            {"type": "track", "userId": "bob", "event": "Order Completed", "messageId": "bad-total-1",
             "properties": {"total": "ten"}},
            {"type": "track", "userId": "bob", "event": "Order Completed", "messageId": "no-total-1",
             "properties": {}},
        ]});
        answers.push(post(app, "/v1/batch", write_key, &batch).await);
        let single = json!({"userId": "cy", "event": "Coupon Spun", "messageId": "unplanned-2"});
        answers.push(post(app, "/v1/track", write_key, &single).await);
        let another = json!({"userId": "cy", "event": "Order Completed", "messageId": "bad-total-2",
                             "properties": {"total": "lots"}});
        answers.push(post(app, "/v1/track", write_key, &another).await);
        answers
    }

    /// What a store counted for a source: each violation without its times,
    /// the quarantined codes, and the events stored.
    fn governance_counts(store: &dyn Store, source: &tandem_core::SourceId) -> (Vec<Value>, Vec<String>, u64) {
        let mut violations: Vec<Value> = store
            .plan_violations(source, 100)
            .unwrap()
            .into_iter()
            .map(|violation| {
                json!([
                    violation.kind,
                    violation.event_name,
                    violation.path,
                    violation.count,
                    violation.message,
                    violation.sample
                ])
            })
            .collect();
        violations.sort_by_key(Value::to_string);
        let mut codes: Vec<String> =
            store.list_quarantine(0, 100).unwrap().into_iter().map(|entry| entry.record.code).collect();
        codes.sort();
        (violations, codes, store.stats().unwrap().events)
    }

    #[test]
    fn tracking_plan_violations_reach_the_store_through_the_stream_as_they_do_embedded() {
        let plan = r#"{"mode": "block_unplanned", "events": {"Order Completed": {"type": "object",
            "required": ["total"], "properties": {"total": {"type": "number"}}}}}"#;
        let runtime = runtime();

        // Embedded: SQLite, the group-committing writer.
        let embedded_dir = tempfile::tempdir().unwrap();
        let embedded: Arc<dyn Store> = Arc::new(tandem_store::SqliteStore::open(embedded_dir.path()).unwrap());
        let embedded_source = embedded.create_source("web", SourceKind::Website).unwrap();
        tandem_server::govern::set_plan(embedded.as_ref(), "web", plan).unwrap();
        let (embedded_state, _writer) =
            AppState::start(embedded.clone(), DEFAULT_DEDUP_WINDOW, embedded_dir.path().join("imports"));
        let embedded_answers =
            runtime.block_on(send_plan_breaking_requests(&router(embedded_state), embedded_source.write_key.as_str()));
        let expected = governance_counts(embedded.as_ref(), &embedded_source.id);
        assert_eq!(expected.0.len(), 3, "unplanned, and two kinds of schema failure: {:?}", expected.0);
        assert_eq!(expected.1.len(), 2, "two unplanned events quarantined: {:?}", expected.1);
        assert_eq!(expected.2, 4, "the kept events");

        // Scale-out: PostgreSQL behind NATS JetStream, drained by the node.
        let Some((_database, config)) = TestDatabase::create() else { return };
        let nats = NatsServer::start();
        let store: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(config, 8).unwrap());
        let source = store.create_source("web", SourceKind::Website).unwrap();
        tandem_server::govern::set_plan(store.as_ref(), "web", plan).unwrap();
        let node = start_node(&runtime, store.clone(), StreamOptions::parse(&nats.url()).unwrap());
        let answers = runtime.block_on(send_plan_breaking_requests(&node.app, source.write_key.as_str()));
        assert_eq!(answers, embedded_answers, "the same answers");
        let stream = node.state.stream.clone().unwrap();
        let last = runtime.block_on(stream.last_sequence()).unwrap();
        wait_for("the drain to reach the end of the stream", || store.drained_sequence(stream.name()).unwrap() == last);
        assert_eq!(governance_counts(store.as_ref(), &source.id), expected, "the same counts, messages and samples");
        node.stop(&runtime);
    }

    /// Identifies `user` with an e-mail, then tracks an event, as one batch.
    fn person_batch(user: &str, email: &str, prefix: &str) -> Value {
        json!({"batch": [
            {"type": "identify", "userId": user, "messageId": format!("{prefix}-identify"),
             "traits": {"email": email}},
            {"type": "track", "userId": user, "event": "Signed Up", "messageId": format!("{prefix}-track")},
        ]})
    }

    /// A small company as SDKs would send it, the same every time: people
    /// browse anonymously, sign in, order; some share an e-mail with
    /// another person (a merge or a drop, as the rules decide) and some
    /// add a second e-mail. Explicit timestamps and message ids.
    fn company() -> Vec<Value> {
        let start_ms = 1_767_225_600_000_i64;
        let mut messages = Vec::new();
        for person in 0..120_i64 {
            let at = |step: i64| {
                chrono::DateTime::from_timestamp_millis(start_ms + person * 60_000 + step * 1_000).unwrap().to_rfc3339()
            };
            let (user, anonymous) = (format!("user-{person}"), format!("anon-{person}"));
            let email = format!("p{}@example.com", person % 100);
            let plan = if person % 3 == 0 { "pro" } else { "free" };
            messages.push(json!({"type": "page", "anonymousId": anonymous, "name": "Home",
                                 "timestamp": at(0), "messageId": format!("{person}-page")}));
            messages.push(json!({"type": "identify", "anonymousId": anonymous, "userId": user,
                                 "traits": {"email": email, "plan": plan},
                                 "timestamp": at(1), "messageId": format!("{person}-identify")}));
            messages.push(json!({"type": "track", "userId": user, "event": "Order Completed",
                                 "properties": {"total": person * 7 % 90},
                                 "timestamp": at(2), "messageId": format!("{person}-order")}));
            if person % 10 == 0 {
                messages.push(json!({"type": "identify", "userId": user,
                                     "traits": {"email": format!("second-{person}@example.com")},
                                     "timestamp": at(3), "messageId": format!("{person}-second")}));
            }
        }
        messages
    }

    #[test]
    fn the_same_events_give_the_same_profiles_embedded_and_through_the_stream() {
        let Some((_database, config)) = TestDatabase::create() else { return };
        let nats = NatsServer::start();
        let runtime = runtime();
        let dir = tempfile::tempdir().unwrap();
        let embedded: Arc<dyn Store> = Arc::new(tandem_store::SqliteStore::open(dir.path()).unwrap());
        let scaled: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(config, 8).unwrap());
        let messages = company();
        let total = messages.len() as u64;
        for (store, log) in [(&embedded, None), (&scaled, Some(StreamOptions::parse(&nats.url()).unwrap()))] {
            let source = store.create_source("web", SourceKind::Website).unwrap();
            let node = start_server(&runtime, store.clone(), log);
            for batch in messages.chunks(50) {
                let body = json!({ "batch": batch });
                let (status, answer) = runtime.block_on(post(&node.app, "/v1/batch", source.write_key.as_str(), &body));
                assert_eq!(status, StatusCode::OK, "{answer}");
            }
            wait_for("every event appended and resolved", || {
                let stats = store.stats().unwrap();
                store.head().unwrap() == LogPosition(total) && stats.resolver_position == LogPosition(total)
            });
            node.stop(&runtime);
        }
        let profiles = embedded.stats().unwrap().profiles;
        assert!(profiles >= 100, "{profiles} profiles");
        assert_eq!(profiles, scaled.stats().unwrap().profiles);
        let timeline = |store: &Arc<dyn Store>, profile: &tandem_core::Profile| -> Vec<(String, i64)> {
            let events = store.profile_events(profile.id, None, 1_000).unwrap();
            events.into_iter().map(|event| (event.message_id.as_str().to_owned(), event.timestamp_ms)).collect()
        };
        for person in 0..120 {
            let user: tandem_core::Identifier = format!("user_id:user-{person}").parse().unwrap();
            let (one, other) =
                (embedded.profile_by_identifier(&user).unwrap(), scaled.profile_by_identifier(&user).unwrap());
            assert_eq!(one, other, "user-{person}: identifiers, traits, counts and ids alike");
            if let (Some(one), Some(other)) = (one, other) {
                assert_eq!(timeline(&embedded, &one), timeline(&scaled, &other), "user-{person}'s timeline");
            }
        }
    }

    /// A node that only collects: it publishes to `stream`, and neither
    /// drains nor resolves.
    fn collector(store: &Arc<dyn Store>, stream: &EventStream, dir: &tempfile::TempDir) -> Router {
        let pii = tandem_server::pii::PiiDirectory::new(store.clone(), Default::default()).unwrap();
        router(AppState::start_streaming(store.clone(), stream.clone(), dir.path().join("imports"), Arc::new(pii)))
    }

    /// A drain of `stream` into `store` that the test steps itself.
    fn drain_into(
        store: &Arc<dyn Store>,
        stream: &EventStream,
        runtime: &tokio::runtime::Runtime,
    ) -> tandem_server::drain::Drain {
        let metrics = tandem_server::metrics::Metrics::new();
        tandem_server::drain::Drain::new(
            store.clone(),
            stream.clone(),
            runtime.handle().clone(),
            DEFAULT_DEDUP_WINDOW,
            metrics,
        )
    }

    #[test]
    fn deleting_a_person_deletes_their_messages_from_the_stream_so_none_can_be_drained_back() {
        let Some((_database, config)) = TestDatabase::create() else { return };
        let nats = NatsServer::start();
        let store: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(config, 8).unwrap());
        let source = store.create_source("web", SourceKind::Website).unwrap();
        let (_, token) = store.create_token("ops").unwrap();
        let key = source.write_key.as_str();
        let runtime = runtime();
        let log = StreamOptions::parse(&nats.url()).unwrap();

        // Drained and resolved: Ada and Bob each have a profile.
        let node = start_node(&runtime, store.clone(), log.clone());
        let stream = node.state.stream.clone().unwrap();
        for (user, email, prefix) in [("ada", "Ada@Example.com", "ada-1"), ("bob", "bob@example.com", "bob-1")] {
            let (status, _) = runtime.block_on(post(&node.app, "/v1/batch", key, &person_batch(user, email, prefix)));
            assert_eq!(status, StatusCode::OK);
        }
        wait_for("both profiles", || store.stats().unwrap().profiles == 2);
        node.stop(&runtime);

        // Published while no node drains: still only in the stream. Ada's
        // second event names her by e-mail only, and a refused message of
        // hers goes to the stream for quarantine.
        let dir = tempfile::tempdir().unwrap();
        let collector = collector(&store, &stream, &dir);
        let later = json!({"batch": [
            {"type": "track", "anonymousId": "device-9", "event": "Viewed", "messageId": "ada-2",
             "context": {"traits": {"email": "ada@example.com"}}},
            {"type": "track", "userId": "bob", "event": "Viewed", "messageId": "bob-2"},
            {"type": "track", "userId": "ada", "messageId": "ada-refused"},
        ]});
        let (status, body) = runtime.block_on(post(&collector, "/v1/batch", key, &later));
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["rejected"].as_array().map(Vec::len), Some(1), "the track call without an event is refused");
        let drained = store.drained_sequence(stream.name()).unwrap();
        let end = runtime.block_on(stream.last_sequence()).unwrap();
        assert_eq!(end - drained, 3, "three messages not drained yet");

        let request = Request::post("/api/v1/dsr")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({"kind": "delete", "identifier": "user_id:ada"}).to_string()))
            .unwrap();
        let response = runtime.block_on(collector.clone().oneshot(request)).unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value =
            serde_json::from_slice(&runtime.block_on(to_bytes(response.into_body(), usize::MAX)).unwrap()).unwrap();
        assert_eq!(body["status"], "done", "{body}");
        assert_eq!(body["detail"]["removed"]["event_stream"], 4, "two drained, two not: {body}");
        assert_eq!(body["detail"]["removed"]["events"], 2, "the two in the log: {body}");

        // Nothing of Ada's is left in the stream: a second look finds none,
        // and Bob's messages are all there.
        let patterns = tandem_store::govern::erasure_patterns(&["ada".to_owned(), "ada@example.com".to_owned()]);
        let again = runtime.block_on(stream.erase_matching(&patterns)).unwrap();
        assert_eq!((again.scanned, again.erased), (3, 0), "Bob's three messages remain, none of Ada's");

        // The drain appends what is left; replaying the whole stream into
        // an empty database brings nothing of Ada's back either.
        let node = start_node(&runtime, store.clone(), log);
        wait_for("the drain to finish", || {
            node.state.metrics.render().lines().any(|line| line == "tandem_drain_lag_messages 0")
                && store.drained_sequence(stream.name()).unwrap() > drained
        });
        let ids: Vec<String> = message_id_counts(store.as_ref()).into_keys().collect();
        assert_eq!(ids, ["bob-1-identify", "bob-1-track", "bob-2"]);
        // The stream's last messages were Ada's and are gone: nothing is
        // left to drain, and the cluster's status says so.
        let (status, cluster) = runtime.block_on(get(&node.app, "/api/v1/cluster", Some(&token)));
        assert_eq!(status, StatusCode::OK, "{cluster}");
        assert_eq!(
            (cluster["stages"][0]["stage"].as_str(), cluster["stages"][0]["lag"].as_u64()),
            (Some("drain"), Some(0))
        );
        assert!(store.list_quarantine(0, 100).unwrap().is_empty(), "Ada's refused message never reached quarantine");
        node.stop(&runtime);

        let Some((_replay_database, replay_config)) = TestDatabase::create() else { return };
        let replay: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(replay_config, 4).unwrap());
        let mut drain = drain_into(&replay, &stream, &runtime);
        drain.catch_up().unwrap();
        let replayed: Vec<String> = message_id_counts(replay.as_ref()).into_keys().collect();
        assert_eq!(replayed, ["bob-1-identify", "bob-1-track", "bob-2"], "the whole stream, drained again");
    }

    /// Ends the session holding the drain's advisory lock, as a network
    /// partition or a restarted database would, while its node runs on.
    fn take_the_drain_lease_away(config: &postgres::Config) -> u64 {
        let low =
            "drain".bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193));
        let mut client = config.connect(postgres::NoTls).unwrap();
        client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND classid::bigint = $1 AND objid::bigint = $2",
                &[&i64::from(0x7464_6d00_u32), &i64::from(low)],
            )
            .unwrap()
            .len() as u64
    }

    #[test]
    fn a_drainer_that_loses_its_lease_stops_and_every_event_is_appended_once() {
        let Some((_database, config)) = TestDatabase::create() else { return };
        let nats = NatsServer::start();
        let first_store: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(config.clone(), 8).unwrap());
        let second_store: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(config.clone(), 8).unwrap());
        let source = first_store.create_source("web", SourceKind::Website).unwrap();
        let runtime = runtime();
        let log = StreamOptions::parse(&nats.url()).unwrap();
        let first = start_node(&runtime, first_store.clone(), log.clone());
        let second = start_node(&runtime, second_store, log);
        let drain = tandem_store::Stage::DRAIN;
        let holds = |node: &Node| node.state.leases.holds(drain);
        wait_for("one node to take the drain lease", || holds(&first) || holds(&second));
        let ingesting = {
            let (first_app, second_app) = (first.app.clone(), second.app.clone());
            let key = source.write_key.as_str().to_owned();
            runtime.spawn(async move {
                for index in 0..150 {
                    let app = if index % 2 == 0 { &first_app } else { &second_app };
                    let (status, _) = track(app, &key, &format!("p-{index}"), "ada").await;
                    assert_eq!(status, StatusCode::OK);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(take_the_drain_lease_away(&config), 1, "one session held the drain lease");
        runtime.block_on(ingesting).unwrap();
        wait_for("every acknowledged event in the log", || first_store.head().unwrap() == LogPosition(150));
        wait_for("a node to drain again", || holds(&first) || holds(&second));
        let counts = message_id_counts(first_store.as_ref());
        assert_eq!(counts.len(), 150);
        assert!(counts.values().all(|&count| count == 1), "every event once: {counts:?}");
        assert!(!(holds(&first) && holds(&second)), "never two drains at once after the takeover");
        first.stop(&runtime);
        second.stop(&runtime);
    }

    #[test]
    fn one_drain_step_takes_a_whole_fetch_of_messages() {
        let Some((_database, config)) = TestDatabase::create() else { return };
        let nats = NatsServer::start();
        let store: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(config, 4).unwrap());
        let source = store.create_source("web", SourceKind::Website).unwrap();
        let runtime = runtime();
        let stream = runtime.block_on(EventStream::connect(&StreamOptions::parse(&nats.url()).unwrap())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let collector = collector(&store, &stream, &dir);
        // 3,000 events published while nothing drains: one message each.
        for request in 0..6 {
            let batch: Vec<Value> = (0..500)
                .map(|index| {
                    json!({"type": "track", "userId": format!("u{index}"), "event": "Viewed",
                                    "messageId": format!("m-{request}-{index}")})
                })
                .collect();
            let (status, body) =
                runtime.block_on(post(&collector, "/v1/batch", source.write_key.as_str(), &json!({"batch": batch})));
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        let mut drain = drain_into(&store, &stream, &runtime);
        // JetStream holds back messages past the consumer's unacknowledged
        // limit: a limit below one fetch would cut this step to that limit
        // and leave the fetch waiting until it expires.
        let first = drain.step().unwrap();
        assert_eq!((first.drained, first.pending), (2_000, 1_000), "{first:?}");
        let second = drain.step().unwrap();
        assert_eq!((second.drained, second.sequence, second.pending), (1_000, 3_000, 0), "{second:?}");
        assert_eq!(store.head().unwrap(), LogPosition(3_000));
    }
}
