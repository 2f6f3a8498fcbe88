//! Console sessions kept in the store: a session survives a restart (a new
//! server state over the same store) and works on a second node over the
//! same PostgreSQL database, the store holds only the digest of a session's
//! id, CSRF tokens are still enforced on every node, signing out or
//! revoking the token ends a session on every node at once, and a request
//! that moves a session's expiry sends its cookie again.

use super::*;
use std::sync::atomic::{AtomicI64, Ordering};
use tandem_server::console::session::{Sessions, COOKIE, SESSION_TTL};
use tandem_store::postgres::testing::TestDatabase;
use tandem_store::PostgresStore;

/// A router over `store`, as a freshly started server (or another node)
/// would serve it.
fn node(store: Arc<dyn Store>, imports: &std::path::Path) -> Router {
    let (state, _writer) = AppState::start(store, DEFAULT_DEDUP_WINDOW, imports.to_owned());
    router(state)
}

/// The session id of a `name=value` cookie pair.
fn session_id_of(cookie: &str) -> &str {
    cookie.strip_prefix(&format!("{COOKIE}=")).expect("a session cookie")
}

#[tokio::test]
async fn a_console_session_survives_a_restart_and_its_id_is_stored_only_as_a_digest() {
    let harness = Harness::new().await;
    let (cookie, csrf) = harness.sign_in(Role::Admin).await;
    // A sign-in form served before the restart still signs in after it.
    let form = harness.get("/console/sign-in", None).await;
    let anonymous = cookie_pair(form.set_cookie.as_deref().unwrap());
    let secret = harness.store.create_token_with("late", Role::Marketer, None).unwrap().1;

    // The restart: a new store over the same file, a new server state.
    let reopened: Arc<dyn Store> = Arc::new(SqliteStore::open(harness.dir.path()).unwrap());
    let restarted = node(reopened, &harness.dir.path().join("imports"));
    let page = get(&restarted, "/console/customers", Some(&cookie)).await;
    assert_eq!(page.status, StatusCode::OK, "still signed in after the restart: {}", page.body);
    assert_eq!(csrf_of(&page.body), csrf, "with the same CSRF token");
    let refused = post_form(
        &restarted,
        "/console/audiences",
        Some(&cookie),
        &[("name", "pro"), ("rule", "trait plan = \"pro\"")],
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "a POST without the CSRF token is still refused");
    let forged = post_form(
        &restarted,
        "/console/audiences",
        Some(&cookie),
        &[("name", "pro"), ("rule", "trait plan = \"pro\""), ("csrf", "forged")],
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert!(harness.store.audience("pro").unwrap().is_none());
    let saved = post_form(
        &restarted,
        "/console/audiences",
        Some(&cookie),
        &[("name", "pro"), ("rule", "trait plan = \"pro\""), ("csrf", &csrf)],
    )
    .await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let signed = post_form(
        &restarted,
        "/console/sign-in",
        Some(&anonymous),
        &[("token", &secret), ("csrf", &csrf_of(&form.body))],
    )
    .await;
    assert_eq!(signed.status, StatusCode::SEE_OTHER, "{}", signed.body);
    let marketer = cookie_pair(signed.set_cookie.as_deref().unwrap());

    // The file holds each session's digest, never its id, nor a token secret.
    let db = rusqlite::Connection::open(harness.dir.path().join("tandem.db")).unwrap();
    let stored: Vec<(String, Option<String>)> = db
        .prepare("SELECT id_sha256, token_id FROM console_sessions")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for pair in [&cookie, &marketer] {
        let id = session_id_of(pair);
        assert!(stored.iter().all(|(digest, _)| digest != id), "the id itself is not stored");
        let digest = tandem_store::session_id_digest(id);
        let token_id = stored.iter().find(|(stored, _)| *stored == digest).map(|(_, token)| token.clone());
        assert!(token_id.flatten().is_some_and(|token| token.starts_with("tok_")), "named by its token's id");
    }
    assert_eq!(stored.len(), 2, "the anonymous session was replaced by the signed-in one");
    let dump = format!("{stored:?}");
    assert!(!dump.contains(&secret) && !dump.contains("tdm_"), "no token secret is stored with a session");
}

#[tokio::test]
async fn revoking_a_token_signs_its_console_sessions_out_at_once() {
    let harness = Harness::new().await;
    let (cookie, _) = harness.sign_in(Role::Admin).await;
    assert_eq!(harness.get("/console/customers", Some(&cookie)).await.status, StatusCode::OK);
    let token = harness.store.list_tokens().unwrap().pop().unwrap();
    harness.store.revoke_token(&token.id).unwrap();
    let after = harness.get("/console/customers", Some(&cookie)).await;
    assert_eq!((after.status, after.location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/sign-in")));
    assert_eq!(harness.store.count_console_sessions().unwrap(), 0);
}

#[tokio::test]
async fn a_request_that_moves_a_console_sessions_expiry_sends_its_cookie_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let secret = store.create_token_with("ops", Role::Admin, None).unwrap().1;
    let now = Arc::new(AtomicI64::new(chrono::Utc::now().timestamp_millis()));
    let (mut state, _writer) = AppState::start(store.clone(), DEFAULT_DEDUP_WINDOW, dir.path().join("imports"));
    let clock = now.clone();
    state.sessions = Arc::new(Sessions::with_clock(store.clone(), Arc::new(move || clock.load(Ordering::SeqCst))));
    let app = router(state);

    let form = get(&app, "/console/sign-in", None).await;
    let anonymous = cookie_pair(form.set_cookie.as_deref().unwrap());
    let signed =
        post_form(&app, "/console/sign-in", Some(&anonymous), &[("token", &secret), ("csrf", &csrf_of(&form.body))])
            .await;
    let cookie = cookie_pair(signed.set_cookie.as_deref().unwrap());
    let quiet = get(&app, "/console/audiences", Some(&cookie)).await;
    assert_eq!(quiet.status, StatusCode::OK);
    assert_eq!(quiet.set_cookie, None, "a request soon after signing in writes nothing");

    now.fetch_add(6 * 60 * 1000, Ordering::SeqCst);
    let moved = get(&app, "/console/audiences", Some(&cookie)).await;
    assert_eq!(moved.status, StatusCode::OK);
    let again = moved.set_cookie.expect("the cookie is sent again");
    assert_eq!(cookie_pair(&again), cookie, "under the same id");
    assert!(again.contains(&format!("Max-Age={}", SESSION_TTL.as_secs())) && again.contains("HttpOnly"), "{again}");
    assert_eq!(get(&app, "/console/audiences", Some(&cookie)).await.set_cookie, None);

    // Idle for longer than the session lives: signed out.
    now.fetch_add(SESSION_TTL.as_millis() as i64, Ordering::SeqCst);
    let idle = get(&app, "/console/audiences", Some(&cookie)).await;
    assert_eq!((idle.status, idle.location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/sign-in")));
}

/// Two nodes over one PostgreSQL database, each with its own store (its own
/// connections) and server state, as behind a load balancer. Set-up and
/// tear-down are synchronous (PostgreSQL's client must not block an async
/// worker); the requests run on a runtime of their own.
#[test]
fn a_console_session_started_on_one_node_works_on_another() {
    let Some((database, config)) = TestDatabase::create() else { return };
    let first: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(config.clone(), 4).unwrap());
    let second: Arc<dyn Store> = Arc::new(PostgresStore::connect_with(config, 4).unwrap());
    let (ops, secret) = first.create_token_with("ops", Role::Admin, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (node(first.clone(), &dir.path().join("a")), node(second.clone(), &dir.path().join("b")));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (laptop, phone) = runtime.block_on(async {
        // The form from one node, the sign-in on the other.
        let form = get(&a, "/console/sign-in", None).await;
        let anonymous = cookie_pair(form.set_cookie.as_deref().unwrap());
        let reply =
            post_form(&b, "/console/sign-in", Some(&anonymous), &[("token", &secret), ("csrf", &csrf_of(&form.body))])
                .await;
        assert_eq!((reply.status, reply.location.as_deref()), (StatusCode::SEE_OTHER, Some("/")), "{}", reply.body);
        let laptop = cookie_pair(reply.set_cookie.as_deref().unwrap());
        let page = get(&a, "/console/audiences", Some(&laptop)).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let csrf = csrf_of(&page.body);
        assert_eq!(csrf_of(&get(&b, "/console/audiences", Some(&laptop)).await.body), csrf, "one session on both");

        // CSRF is enforced on either node, with the token either served.
        let rule = "trait plan = \"pro\"";
        let refused = post_form(&b, "/console/audiences", Some(&laptop), &[("name", "pro"), ("rule", rule)]).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        let saved =
            post_form(&b, "/console/audiences", Some(&laptop), &[("name", "pro"), ("rule", rule), ("csrf", &csrf)])
                .await;
        assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);

        // A second session; signing the first out on one node ends it on both.
        let form = get(&b, "/console/sign-in", None).await;
        let anonymous = cookie_pair(form.set_cookie.as_deref().unwrap());
        let reply =
            post_form(&a, "/console/sign-in", Some(&anonymous), &[("token", &secret), ("csrf", &csrf_of(&form.body))])
                .await;
        let phone = cookie_pair(reply.set_cookie.as_deref().unwrap());
        let out = post_form(&a, "/console/sign-out", Some(&laptop), &[("csrf", &csrf)]).await;
        assert_eq!(out.location.as_deref(), Some("/console/sign-in"));
        for app in [&a, &b] {
            assert_eq!(
                get(app, "/console/audiences", Some(&laptop)).await.location.as_deref(),
                Some("/console/sign-in")
            );
            assert_eq!(get(app, "/console/audiences", Some(&phone)).await.status, StatusCode::OK);
        }
        (laptop, phone)
    });
    assert!(first.audience("pro").unwrap().is_some(), "saved through the second node, seen by the first");
    assert!(first.console_session(&tandem_store::session_id_digest(session_id_of(&laptop)), 0).unwrap().is_none());

    // Revoking the token (as `tandem token revoke` does) ends its sessions everywhere.
    second.revoke_token(&ops.id).unwrap();
    runtime.block_on(async {
        for app in [&a, &b] {
            let after = get(app, "/console/audiences", Some(&phone)).await;
            assert_eq!((after.status, after.location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/sign-in")));
        }
    });
    assert_eq!(first.count_console_sessions().unwrap(), 0);
    drop((a, b, runtime));
    drop((first, second));
    drop(database);
}
