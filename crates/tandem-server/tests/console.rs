//! The web console through the router (no socket): signing in with a token
//! starts a session cookie with the right flags, every POST without the
//! session's CSRF token is refused, pages follow the role's permissions,
//! and a role without `pii:read` sees e-mail addresses masked. Sessions
//! live in the store: they survive a restart and work on a second node.

use axum::body::{to_bytes, Body};
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use std::sync::Arc;
use tandem_core::govern::Role;
use tandem_core::SourceKind;
use tandem_server::resolve::{Resolver, DEFAULT_BATCH};
use tandem_server::{router, AppState, DEFAULT_DEDUP_WINDOW};
use tandem_store::prelude::*;
use tandem_store::SqliteStore;
use tower::ServiceExt;

#[path = "console/sessions.rs"]
mod console_sessions;
#[path = "console/pages.rs"]
mod pages;

struct Harness {
    dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    app: Router,
}

struct Reply {
    status: StatusCode,
    location: Option<String>,
    set_cookie: Option<String>,
    body: String,
}

impl Harness {
    /// A store holding Ann (`ann@example.com`, plan pro) and Bob.
    async fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let source = store.create_source("website", SourceKind::Website).unwrap();
        let (state, _writer) = AppState::start(store.clone(), DEFAULT_DEDUP_WINDOW, dir.path().join("imports"));
        let harness = Harness { dir, store, app: router(state) };
        let batch = json!({"writeKey": source.write_key.as_str(), "batch": [
            {"type": "identify", "userId": "ann", "traits": {"email": "ann@example.com", "plan": "pro", "name": "Ann Lee"}, "messageId": "m1"},
            {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"revenue": 42}, "messageId": "m2"},
            {"type": "identify", "userId": "bob", "traits": {"email": "bob@example.com", "plan": "free"}, "messageId": "m3"}
        ]});
        let request = Request::post("/v1/batch").body(Body::from(batch.to_string())).unwrap();
        let reply = harness.send(request).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let store: Arc<dyn Store> = harness.store.clone();
        Resolver::load(store).unwrap().catch_up(DEFAULT_BATCH).unwrap();
        harness
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        send(&self.app, request).await
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> Reply {
        get(&self.app, path, cookie).await
    }

    async fn post_form(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Reply {
        post_form(&self.app, path, cookie, form).await
    }

    /// Signs in with a new token of `role`; the session cookie and the
    /// session's CSRF token.
    async fn sign_in(&self, role: Role) -> (String, String) {
        let secret = self.store.create_token_with(role.as_str(), role, None).unwrap().1;
        let form = self.get("/console/sign-in", None).await;
        let anonymous = cookie_pair(form.set_cookie.as_deref().unwrap());
        let csrf = csrf_of(&form.body);
        let reply = self.post_form("/console/sign-in", Some(&anonymous), &[("token", &secret), ("csrf", &csrf)]).await;
        assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
        let cookie = cookie_pair(reply.set_cookie.as_deref().expect("a signed-in session cookie"));
        assert_ne!(cookie, anonymous, "signing in starts a session under a new id");
        let page = self.get("/console/audiences", Some(&cookie)).await;
        (cookie, csrf_of(&page.body))
    }
}

async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let header_of = |name| response.headers().get(name).map(|value| value.to_str().unwrap().to_owned());
    let (location, set_cookie) = (header_of(header::LOCATION), header_of(header::SET_COOKIE));
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    Reply { status, location, set_cookie, body: String::from_utf8_lossy(&bytes).into_owned() }
}

async fn get(app: &Router, path: &str, cookie: Option<&str>) -> Reply {
    let mut request = Request::get(path);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    send(app, request.body(Body::empty()).unwrap()).await
}

async fn post_form(app: &Router, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Reply {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    send(app, request.body(Body::from(serde_urlencoded::to_string(form).unwrap())).unwrap()).await
}

/// `name=value` of a `Set-Cookie` header.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_owned()
}

/// The CSRF token a page carries.
fn csrf_of(html: &str) -> String {
    let needle = "name=\"csrf-token\" content=\"";
    let at = html.find(needle).expect("a page with a csrf token") + needle.len();
    html[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn signing_in_starts_a_strict_http_only_session_and_signing_out_ends_it() {
    let harness = Harness::new().await;
    let root = harness.get("/", None).await;
    assert_eq!((root.status, root.location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/sign-in")));
    let form = harness.get("/console/sign-in", None).await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(form.body.contains("<label for=\"token\">API token</label>"), "{}", form.body);
    let set_cookie = form.set_cookie.unwrap();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.split("; ").any(|part| part == flag), "{flag} in {set_cookie}");
    }
    let anonymous = cookie_pair(&set_cookie);
    let csrf = csrf_of(&form.body);

    let wrong = harness.post_form("/console/sign-in", Some(&anonymous), &[("token", "nope"), ("csrf", &csrf)]).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains("the token is not valid"), "{}", wrong.body);
    assert!(wrong.set_cookie.is_none());

    let secret = harness.store.create_token_with("ops", Role::Admin, None).unwrap().1;
    let signed = harness.post_form("/console/sign-in", Some(&anonymous), &[("token", &secret), ("csrf", &csrf)]).await;
    assert_eq!((signed.status, signed.location.as_deref()), (StatusCode::SEE_OTHER, Some("/")));
    let set_cookie = signed.set_cookie.unwrap();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.split("; ").any(|part| part == flag), "{flag} in {set_cookie}");
    }
    let cookie = cookie_pair(&set_cookie);
    let home = harness.get("/", Some(&cookie)).await;
    assert_eq!(home.location.as_deref(), Some("/console/goals"), "the goals are the landing page");
    let customers = harness.get("/console/customers", Some(&cookie)).await;
    assert_eq!(customers.status, StatusCode::OK);
    assert!(customers.body.contains("admin"), "the role is shown");
    // The anonymous session is gone once signed in.
    assert_eq!(harness.get("/console/customers", Some(&anonymous)).await.status, StatusCode::SEE_OTHER);

    let csrf = csrf_of(&customers.body);
    let out = harness.post_form("/console/sign-out", Some(&cookie), &[("csrf", &csrf)]).await;
    assert_eq!((out.status, out.location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/sign-in")));
    assert!(out.set_cookie.unwrap().contains("Max-Age=0"));
    let after = harness.get("/console/customers", Some(&cookie)).await;
    assert_eq!((after.status, after.location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/sign-in")));
}

#[tokio::test]
async fn an_expired_token_cannot_sign_in() {
    let harness = Harness::new().await;
    let (_, secret) = harness.store.create_token_with("ops", Role::Admin, Some(1)).unwrap();
    let form = harness.get("/console/sign-in", None).await;
    let anonymous = cookie_pair(form.set_cookie.as_deref().unwrap());
    let reply = harness
        .post_form("/console/sign-in", Some(&anonymous), &[("token", &secret), ("csrf", &csrf_of(&form.body))])
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "an expired token cannot sign in");
    assert!(reply.body.contains("expired"), "{}", reply.body);
}

#[tokio::test]
async fn posts_without_the_session_csrf_token_are_refused() {
    let harness = Harness::new().await;
    let (cookie, csrf) = harness.sign_in(Role::Admin).await;
    let rule = "trait plan = \"pro\"";
    for given in [None, Some("0123456789abcdef"), Some("")] {
        let mut form = vec![("name", "pro"), ("rule", rule)];
        if let Some(given) = given {
            form.push(("csrf", given));
        }
        let reply = harness.post_form("/console/audiences", Some(&cookie), &form).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "csrf {given:?}");
        assert!(reply.body.contains("reload it"), "{}", reply.body);
    }
    assert!(harness.store.audience("pro").unwrap().is_none(), "nothing was saved");
    // Another session's token is not this session's.
    let (_, other_csrf) = harness.sign_in(Role::Admin).await;
    let reply = harness.post_form("/console/sign-out", Some(&cookie), &[("csrf", &other_csrf)]).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    // The sign-in form needs its own session's token too.
    let form = harness.get("/console/sign-in", None).await;
    let anonymous = cookie_pair(form.set_cookie.as_deref().unwrap());
    let reply = harness.post_form("/console/sign-in", Some(&anonymous), &[("token", "x"), ("csrf", "forged")]).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = harness.post_form("/console/sign-in", None, &[("token", "x"), ("csrf", &csrf)]).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    // The preview endpoint takes the token in a header.
    let preview = |token: Option<&str>| {
        let mut request = Request::post("/console/audiences/preview")
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header("x-csrf-token", token);
        }
        request.body(Body::from(json!({"rule": rule}).to_string())).unwrap()
    };
    assert_eq!(harness.send(preview(None)).await.status, StatusCode::FORBIDDEN);
    assert_eq!(harness.send(preview(Some("forged"))).await.status, StatusCode::FORBIDDEN);
    let reply = harness.send(preview(Some(&csrf))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let counted: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!((&counted["size"], &counted["exact"], &counted["margin"]), (&json!(1), &json!(true), &json!(0)));

    // With the token, the audience is saved.
    let saved = harness
        .post_form("/console/audiences", Some(&cookie), &[("name", "pro"), ("rule", rule), ("csrf", &csrf)])
        .await;
    assert_eq!((saved.status, saved.location.as_deref()), (StatusCode::SEE_OTHER, Some("/console/audiences/pro")));
    assert_eq!(harness.store.audience("pro").unwrap().unwrap().definition.rule.to_string(), rule);
}

#[tokio::test]
async fn the_preview_shows_where_a_rule_does_not_parse() {
    let harness = Harness::new().await;
    let (cookie, csrf) = harness.sign_in(Role::Marketer).await;
    let request = Request::post("/console/audiences/preview")
        .header(header::COOKIE, &cookie)
        .header("x-csrf-token", &csrf)
        .body(Body::from(json!({"rule": "trait plan == \"pro\""}).to_string()))
        .unwrap();
    let reply = harness.send(request).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_rule");
    assert_eq!((body["details"]["line"].as_u64(), body["details"]["column"].as_u64()), (Some(1), Some(12)));
    // Saving the same rule shows the builder again with the message.
    let saved = harness
        .post_form(
            "/console/audiences",
            Some(&cookie),
            &[("name", "pro"), ("rule", "trait plan == \"pro\""), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(saved.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(saved.body.contains("id=\"save-error\""), "{}", saved.body);
    assert!(saved.body.contains("trait plan == &#34;pro&#34;") || saved.body.contains("trait plan == &quot;pro&quot;"));
}

#[tokio::test]
async fn pages_a_role_may_not_see_answer_403_and_the_rest_follow_the_role() {
    let harness = Harness::new().await;
    let (marketer, _) = harness.sign_in(Role::Marketer).await;
    let customers = harness.get("/console/customers", Some(&marketer)).await;
    assert_eq!(customers.status, StatusCode::FORBIDDEN);
    assert!(customers.body.contains("the marketer role lacks the profiles:lookup permission"), "{}", customers.body);
    assert!(customers.body.contains("<h1>403"), "a readable page");
    assert!(!customers.body.contains("href=\"/console/customers\""), "no link to what the role may not see");
    assert_eq!(harness.get("/", Some(&marketer)).await.location.as_deref(), Some("/console/goals"));

    let (auditor, _) = harness.sign_in(Role::Auditor).await;
    assert_eq!(harness.get("/console/audiences", Some(&auditor)).await.status, StatusCode::FORBIDDEN);

    // Support looks one customer up but may not list or search by trait.
    let (support, _) = harness.sign_in(Role::Support).await;
    let found = harness.get("/console/customers?identifier=user_id:ann", Some(&support)).await;
    assert_eq!(found.status, StatusCode::SEE_OTHER);
    let profile_page = found.location.unwrap();
    assert!(profile_page.starts_with("/console/customers/"));
    let listed = harness.get("/console/customers?trait=plan:pro", Some(&support)).await;
    assert_eq!(listed.status, StatusCode::FORBIDDEN);
    let shown = harness.get(&profile_page, Some(&support)).await;
    assert_eq!(shown.status, StatusCode::OK);
    assert!(shown.body.contains("Order Completed"), "the timeline");
    assert!(!shown.body.contains("id=\"audiences\""), "support may not read audiences");
}

#[tokio::test]
async fn the_360_view_and_search_show_traits_identities_timeline_and_audiences() {
    let harness = Harness::new().await;
    let (admin, csrf) = harness.sign_in(Role::Admin).await;
    let saved = harness
        .post_form(
            "/console/audiences",
            Some(&admin),
            &[("name", "pro"), ("rule", "trait plan = \"pro\""), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER);
    let store: Arc<dyn Store> = harness.store.clone();
    tandem_server::audience::AudienceStage::new(store, tandem_server::audience::system_clock()).catch_up().unwrap();

    let listed = harness.get("/console/customers?trait=plan:pro", Some(&admin)).await;
    assert_eq!(listed.status, StatusCode::OK);
    assert!(listed.body.contains("Ann Lee") && !listed.body.contains("bob@example.com"), "{}", listed.body);
    let prefix = harness.get("/console/customers?identifier=email:b", Some(&admin)).await;
    assert!(prefix.body.contains("email:bob@example.com") && !prefix.body.contains("Ann Lee"), "{}", prefix.body);

    let found = harness.get("/console/customers?identifier=email:ann@example.com", Some(&admin)).await;
    let view = harness.get(found.location.as_deref().unwrap(), Some(&admin)).await;
    assert_eq!(view.status, StatusCode::OK);
    for expected in
        ["email:ann@example.com", "user_id:ann", "Ann Lee", "Order Completed", "website", "/console/audiences/pro"]
    {
        assert!(view.body.contains(expected), "{expected} in the 360° view:\n{}", view.body);
    }
    assert!(view.body.len() < 100_000);

    let audiences = harness.get("/console/audiences", Some(&admin)).await;
    assert!(
        audiences.body.contains("<a href=\"/console/audiences/pro\">pro</a></td><td class=\"num\">1</td>"),
        "{}",
        audiences.body
    );
    let missing = harness.get("/console/customers/prof_nope", Some(&admin)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_marketer_sees_member_e_mails_masked_where_admin_sees_them_in_clear() {
    let harness = Harness::new().await;
    let (admin, csrf) = harness.sign_in(Role::Admin).await;
    let saved = harness
        .post_form(
            "/console/audiences",
            Some(&admin),
            &[("name", "pro"), ("rule", "trait plan = \"pro\""), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER);
    let store: Arc<dyn Store> = harness.store.clone();
    tandem_server::audience::AudienceStage::new(store, tandem_server::audience::system_clock()).catch_up().unwrap();

    let in_clear = harness.get("/console/audiences/pro", Some(&admin)).await;
    assert_eq!(in_clear.status, StatusCode::OK);
    assert!(in_clear.body.contains("email:ann@example.com"), "{}", in_clear.body);

    let (marketer, _) = harness.sign_in(Role::Marketer).await;
    let masked = harness.get("/console/audiences/pro", Some(&marketer)).await;
    assert_eq!(masked.status, StatusCode::OK);
    assert!(masked.body.contains("email:a***@example.com"), "{}", masked.body);
    assert!(!masked.body.contains("ann@example.com"), "{}", masked.body);
}

#[tokio::test]
async fn the_timeline_pages_back_through_older_events() {
    let harness = Harness::new().await;
    let source = harness.store.create_source("app", SourceKind::Website).unwrap();
    let batch: Vec<Value> = (0..25)
        .map(|n| {
            json!({"type": "track", "userId": "ann", "event": format!("Step {n:02}"), "messageId": format!("s{n}"),
                   "timestamp": format!("2026-11-01T00:00:{n:02}Z")})
        })
        .collect();
    let body = json!({"writeKey": source.write_key.as_str(), "batch": batch});
    let reply = harness.send(Request::post("/v1/batch").body(Body::from(body.to_string())).unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let store: Arc<dyn Store> = harness.store.clone();
    Resolver::load(store).unwrap().catch_up(DEFAULT_BATCH).unwrap();

    let (admin, _) = harness.sign_in(Role::Admin).await;
    let found = harness.get("/console/customers?identifier=user_id:ann", Some(&admin)).await;
    let first = harness.get(found.location.as_deref().unwrap(), Some(&admin)).await;
    let rows = |html: &str| html.matches("<td>track</td>").count() + html.matches("<td>identify</td>").count();
    assert_eq!(rows(&first.body), 20, "a page of the timeline");
    let at = first.body.find("Older events").expect("a link to older events");
    let href = first.body[..at].rsplit("href=\"").next().unwrap().split('"').next().unwrap().replace("&amp;", "&");
    let older = harness.get(&href, Some(&admin)).await;
    assert_eq!(older.status, StatusCode::OK, "{href}");
    // 25 steps, Ann's identify and her order: 27 events, 7 on the second page.
    assert_eq!(rows(&older.body), 7, "{}", older.body);
    assert!(older.body.contains("Step 00") && !older.body.contains("Step 24"));
    assert!(!older.body.contains("Older events"));
}

#[tokio::test]
async fn the_goals_page_is_home_and_shows_each_goal_against_its_target() {
    let harness = Harness::new().await;
    let (auditor, _) = harness.sign_in(Role::Auditor).await;
    let empty = harness.get("/console/goals", Some(&auditor)).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert!(empty.body.contains("No goal yet"), "{}", empty.body);
    let today = chrono::Utc::now().date_naive();
    let period = format!("{today}..{}", today + chrono::Days::new(99));
    let store: Arc<dyn Store> = harness.store.clone();
    for settings in [
        json!({"name": "Revenue", "owner": "marketing", "target": 1000, "period": period, "metric": {"kind": "revenue"}}),
        json!({"name": "Merge rate", "owner": "it", "target": 50, "period": period, "metric": {"kind": "merge_rate"}}),
    ] {
        let settings = tandem_core::insight::goals::GoalSettings::from_json(&settings).unwrap();
        tandem_server::insight::goals::create_goal(store.as_ref(), &settings, 0).unwrap();
    }
    tandem_server::insight::InsightStage::new(store, tandem_server::insight::system_clock()).catch_up().unwrap();

    let page = harness.get("/console/goals", Some(&auditor)).await;
    assert_eq!(page.status, StatusCode::OK);
    let html = &page.body;
    assert!(html.contains("href=\"/console/goals\" aria-current=\"page\">Goals</a>"), "the nav names the page");
    assert!(html.contains("1 of 2 goals need attention."), "{html}");
    let card = |name: &str| {
        let start = html.find(&format!("data-goal=\"{name}\"")).unwrap_or_else(|| panic!("{name} in {html}"));
        let end = html[start..].find("</li>").unwrap() + start;
        html[start..end].to_owned()
    };
    let revenue = card("Revenue");
    assert!(revenue.contains("data-status=\"on_track\"") && revenue.contains("data-value=\"42\""), "{revenue}");
    assert!(revenue.contains("<span class=\"value\">42.00</span>") && revenue.contains("target 1,000"), "{revenue}");
    assert!(revenue.contains("<svg class=\"trend\"") && revenue.contains("<progress"), "{revenue}");
    let merges = card("Merge rate");
    assert!(merges.contains("data-status=\"off_track\"") && merges.contains("Off track"), "{merges}");
    assert!(html.contains("<li class=\"goal bad\" data-goal=\"Merge rate\""), "off track stands out: {html}");
    assert!(html.contains("<li class=\"goal\" data-goal=\"Revenue\""), "{html}");
    assert!(html.len() < 100_000, "the page is {} bytes", html.len());
    let css = harness.get("/console/assets/goals.css", None).await;
    assert_eq!(css.status, StatusCode::OK);
}
