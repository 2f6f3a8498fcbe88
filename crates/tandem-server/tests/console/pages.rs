//! The stack, data-quality and governance pages through the router: each
//! part shows for the roles the permission table lets call the API route it
//! mirrors (and answers `403` otherwise, with no nav entry), payloads are
//! masked for roles without `pii:read`, a dead letter replayed from the
//! console leaves the list and is audited as the API's replay is, and a
//! replay without the session's CSRF token changes nothing.

use super::*;
use tandem_core::activate::DestinationDefinition;
use tandem_store::{DeadLetterFilter, FailedAttempt, NewOutboxItem, OutboxCommit, OutboxItemId};

/// An admin API token's secret, for the API calls that set things up.
fn api_token(harness: &Harness) -> String {
    harness.store.create_token_with("setup", Role::Admin, None).unwrap().1
}

impl Harness {
    async fn api(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Reply {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json");
        let body = body.map_or_else(Body::empty, |body| Body::from(body.to_string()));
        self.send(request.body(body).unwrap()).await
    }

    /// Sends messages with the website's write key through `/v1/batch`.
    async fn track(&self, messages: Vec<Value>) -> Reply {
        let key = self.store.source_by_name("website").unwrap().write_key;
        let body = json!({"writeKey": key.as_str(), "batch": messages});
        self.send(Request::post("/v1/batch").body(Body::from(body.to_string())).unwrap()).await
    }

    fn resolve(&self) {
        let store: Arc<dyn Store> = self.store.clone();
        Resolver::load(store).unwrap().catch_up(DEFAULT_BATCH).unwrap();
    }

    /// A webhook destination `name` (pointed at a port nothing listens on)
    /// whose outbox held one item per payload, each of which ran out of
    /// retries: its dead letters, oldest first.
    fn dead_letters(&self, name: &str, payloads: &[Value]) -> Vec<OutboxItemId> {
        let definition: DestinationDefinition = serde_json::from_value(json!({
            "name": name,
            "destination": {"kind": "webhook", "url": "http://127.0.0.1:9/hook"},
            "events": {}
        }))
        .unwrap();
        self.store.create_destination(&definition, 1).unwrap();
        let from = self.store.stage_cursor(tandem_store::Stage::OUTBOX).unwrap().map_or(0, |cursor| cursor.position.0);
        let items = payloads
            .iter()
            .enumerate()
            .map(|(index, payload)| NewOutboxItem {
                destination: name.to_owned(),
                position: tandem_core::LogPosition(index as u64 + 1),
                payload: payload.to_string(),
                profile: Some(tandem_core::ProfileId(1)),
            })
            .collect();
        let to = tandem_core::LogPosition(from + payloads.len() as u64);
        let commit =
            OutboxCommit { from: tandem_core::LogPosition(from), to, items, at_ms: 1_000, ..Default::default() };
        self.store.commit_outbox(&commit).unwrap();
        let head = self.store.outbox_head(name, 100).unwrap();
        for item in &head {
            let failure = FailedAttempt::DeadLetter { at_ms: 2_000, error: "connection refused".to_owned() };
            self.store.record_failure(item.id, &failure).unwrap();
        }
        head.iter().map(|item| item.id).collect()
    }

    fn dead_ids(&self, name: &str) -> Vec<OutboxItemId> {
        let letters = self.store.dead_letters(Some(name), &DeadLetterFilter::default(), 100).unwrap();
        letters.iter().map(|letter| letter.id).collect()
    }

    fn audit_entries(&self, action: &str) -> Vec<tandem_core::govern::audit::AuditEntry> {
        let filter = tandem_store::AuditFilter { action: Some(action.to_owned()), ..Default::default() };
        self.store.audit_entries(&filter).unwrap()
    }
}

/// The nav links of a page.
fn nav(html: &str) -> String {
    let start = html.find("<nav aria-label=\"Sections\">").expect("the nav");
    html[start..].split("</nav>").next().unwrap().to_owned()
}

fn identify_ann() -> Value {
    json!({"type": "identify", "userId": "ann", "traits": {"email": "ann@example.com", "plan": "pro"}})
}

#[tokio::test]
async fn the_stack_shows_registry_spend_shadow_tools_and_delivery_health_as_each_role_may() {
    let harness = Harness::new().await;
    let token = api_token(&harness);
    let entry = json!({"owner": "Ann Lee", "department": "marketing", "purpose": "web analytics", "annual_cost": 1200});
    let reply = harness.api(Method::PUT, "/api/v1/stack/sources/website", &token, Some(entry)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    harness.dead_letters("crm", &[identify_ann(), identify_ann()]);
    let reply = harness
        .api(
            Method::PUT,
            "/api/v1/stack/destinations/crm",
            &token,
            Some(json!({"department": "sales", "annual_cost": 30000.5})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    // A tool nobody registered sends with a key that matches no source.
    let shadow = Request::post("/v1/track")
        .header(header::AUTHORIZATION, "Basic c2hhZG93LWtleS0xMjM6")
        .header(header::USER_AGENT, "rogue-sdk/1.0")
        .body(Body::from(json!({"userId": "x", "event": "Sneaky"}).to_string()))
        .unwrap();
    assert_eq!(harness.send(shadow).await.status, StatusCode::UNAUTHORIZED);

    let (admin, _) = harness.sign_in(Role::Admin).await;
    let page = harness.get("/console/stack", Some(&admin)).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.len() < 100_000);
    assert!(nav(&page.body).contains("href=\"/console/stack\" aria-current=\"page\""), "{}", nav(&page.body));
    for expected in [
        "<th scope=\"row\">marketing</th><td class=\"num\">1,200</td>",
        "<th scope=\"row\">sales</th><td class=\"num\">30,000.50</td>",
        "id=\"spend-total\">31,200.50<",
        "Ann Lee",
        "web analytics",
        // The website's events (Ann's and Bob's) and its last one.
        "<td class=\"num\">3 <span class=\"hint\">events</span></td>",
        // The destination nobody owns.
        "id=\"without-owner\"",
        "shad…",
        "rogue-sdk/1.0",
        "id=\"delivery-health\"",
        "href=\"/console/stack/destinations/crm\"",
        "<span class=\"bad\">2</span> <span class=\"hint\">dead letters</span>",
    ] {
        assert!(page.body.contains(expected), "{expected} in the stack page:\n{}", page.body);
    }

    // An auditor reads the registry (governance:read) but not delivery.
    let (auditor, _) = harness.sign_in(Role::Auditor).await;
    let audited = harness.get("/console/stack", Some(&auditor)).await;
    assert_eq!(audited.status, StatusCode::OK);
    assert!(audited.body.contains("id=\"spend-table\"") && !audited.body.contains("id=\"delivery-health\""));
    assert_eq!(harness.get("/console/stack/destinations/crm", Some(&auditor)).await.status, StatusCode::FORBIDDEN);

    // A marketer reads delivery (destinations:read) but not the registry.
    let (marketer, _) = harness.sign_in(Role::Marketer).await;
    let marketed = harness.get("/console/stack", Some(&marketer)).await;
    assert_eq!(marketed.status, StatusCode::OK);
    assert!(marketed.body.contains("id=\"delivery-health\"") && !marketed.body.contains("id=\"spend-table\""));
    assert!(!marketed.body.contains("rogue-sdk"), "no unregistered tools without governance:read");

    // Support may see neither: no nav entry, and a 403 page naming what it lacks.
    let (support, _) = harness.sign_in(Role::Support).await;
    let refused = harness.get("/console/stack", Some(&support)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(refused.body.contains("lacks the governance:read permission"), "{}", refused.body);
    assert!(!nav(&refused.body).contains("/console/stack"));
}

#[tokio::test]
async fn a_dead_letter_replayed_from_the_console_leaves_the_list_and_is_audited_like_the_api() {
    let harness = Harness::new().await;
    let ids = harness.dead_letters("crm", &[identify_ann(), identify_ann(), identify_ann()]);
    let (admin, csrf) = harness.sign_in(Role::Admin).await;
    let page = harness.get("/console/stack/destinations/crm", Some(&admin)).await;
    assert_eq!(page.status, StatusCode::OK);
    for id in &ids {
        assert!(page.body.contains(&format!("id=\"dead-letter-{}\"", id.0)), "{}", page.body);
    }
    assert!(page.body.contains("connection refused") && page.body.contains("ann@example.com"), "{}", page.body);
    assert!(page.body.contains(&format!("aria-label=\"Replay item {}\"", ids[1].0)));

    // Without the session's CSRF token nothing is replayed.
    let path = "/console/stack/destinations/crm/replay";
    let item = ids[1].0.to_string();
    for form in [vec![("item", item.as_str())], vec![("item", item.as_str()), ("csrf", "forged")]] {
        let refused = harness.post_form(path, Some(&admin), &form).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
    }
    assert_eq!(harness.dead_ids("crm"), ids, "nothing was replayed");
    assert!(harness.audit_entries("destination.replay").is_empty());

    // With it, the one item goes back to the outbox and leaves the list.
    let replayed = harness.post_form(path, Some(&admin), &[("item", &item), ("csrf", &csrf)]).await;
    assert_eq!(replayed.status, StatusCode::SEE_OTHER, "{}", replayed.body);
    let after = replayed.location.unwrap();
    assert_eq!(after, "/console/stack/destinations/crm?replayed=1");
    assert_eq!(harness.dead_ids("crm"), vec![ids[0], ids[2]]);
    assert_eq!(harness.store.outbox_head("crm", 10).unwrap().iter().map(|i| i.id).collect::<Vec<_>>(), [ids[1]]);
    let shown = harness.get(&after, Some(&admin)).await;
    assert!(shown.body.contains("1 dead letter put back in the outbox"), "{}", shown.body);
    assert!(!shown.body.contains(&format!("id=\"dead-letter-{}\"", ids[1].0)));
    assert!(shown.body.contains(&format!("id=\"dead-letter-{}\"", ids[2].0)));

    // The API's replay of another item records the same kind of entry.
    let token = api_token(&harness);
    let api =
        harness.api(Method::POST, &format!("/api/v1/destinations/crm/replay?item={}", ids[2].0), &token, None).await;
    assert_eq!(api.status, StatusCode::OK, "{}", api.body);
    assert_eq!(serde_json::from_str::<Value>(&api.body).unwrap()["replayed"], 1);
    let entries = harness.audit_entries("destination.replay");
    assert_eq!(entries.len(), 2);
    let (console_entry, api_entry) = (&entries[0], &entries[1]);
    assert_eq!((console_entry.target.as_str(), console_entry.role.as_str()), ("crm", "admin"));
    assert_eq!(
        console_entry.after,
        Some(json!({"since": null, "profile": null, "item": ids[1].0, "replayed": 1})),
        "the console's replay is recorded with what it took"
    );
    assert_eq!(api_entry.after, Some(json!({"since": null, "profile": null, "item": ids[2].0, "replayed": 1})));

    // Replay all: the rest goes back.
    let all = harness.post_form(path, Some(&admin), &[("csrf", &csrf)]).await;
    assert_eq!(all.location.as_deref(), Some("/console/stack/destinations/crm?replayed=1"));
    assert!(harness.dead_ids("crm").is_empty());
    let bad = harness.post_form(path, Some(&admin), &[("csrf", &csrf), ("item", "seven")]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let missing = harness.post_form("/console/stack/destinations/nope/replay", Some(&admin), &[("csrf", &csrf)]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn dead_letters_show_e_mails_masked_to_a_marketer_and_page_through() {
    let harness = Harness::new().await;
    let payloads: Vec<Value> = (0..30).map(|_| identify_ann()).collect();
    let ids = harness.dead_letters("crm", &payloads);
    let (marketer, csrf) = harness.sign_in(Role::Marketer).await;
    let page = harness.get("/console/stack/destinations/crm", Some(&marketer)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("a***@example.com") && !page.body.contains("ann@example.com"), "{}", page.body);
    assert_eq!(page.body.matches("<tr id=\"dead-letter-").count(), 25, "a page");
    let next = format!("/console/stack/destinations/crm?after={}#dead-letters", ids[24].0);
    assert!(page.body.contains(&next), "{}", page.body);
    let second = harness.get(&format!("/console/stack/destinations/crm?after={}", ids[24].0), Some(&marketer)).await;
    assert_eq!(second.body.matches("<tr id=\"dead-letter-").count(), 5);
    // A marketer may replay (destinations:write).
    let replayed = harness
        .post_form(
            "/console/stack/destinations/crm/replay",
            Some(&marketer),
            &[("csrf", &csrf), ("item", &ids[0].0.to_string())],
        )
        .await;
    assert_eq!(replayed.status, StatusCode::SEE_OTHER);
    assert_eq!(harness.dead_ids("crm").len(), 29);
    let entry = harness.audit_entries("destination.replay").pop().unwrap();
    assert_eq!(entry.role, "marketer");

    // An analyst may not see destinations: no page, no replay.
    let (analyst, analyst_csrf) = harness.sign_in(Role::Analyst).await;
    assert_eq!(harness.get("/console/stack/destinations/crm", Some(&analyst)).await.status, StatusCode::FORBIDDEN);
    let refused =
        harness.post_form("/console/stack/destinations/crm/replay", Some(&analyst), &[("csrf", &analyst_csrf)]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(refused.body.contains("destinations:write"), "{}", refused.body);
    assert_eq!(harness.dead_ids("crm").len(), 29);
}

#[tokio::test]
async fn data_quality_lists_violations_quarantine_and_merges_and_drops_as_each_role_may() {
    let harness = Harness::new().await;
    let token = api_token(&harness);
    let plan = json!({"mode": "report", "events": {"Order Completed": {
        "type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}}}});
    let reply = harness.api(Method::PUT, "/api/v1/plans/website", &token, Some(plan)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let reply = harness
        .track(vec![
            json!({"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"revenue": 5},
                   "context": {"traits": {"email": "ann@example.com"}}}),
            // No event name: refused into the quarantine.
            json!({"type": "track", "userId": "ann", "properties": {"email": "ann@example.com"}}),
            json!({"type": "identify", "anonymousId": "tablet-1", "traits": {"plan": "free"}}),
            // Joins the anonymous profile to Ann's: a merge.
            json!({"type": "track", "userId": "ann", "anonymousId": "tablet-1", "event": "Signed In"}),
            // Bob on the same tablet: joining would give one profile two user ids, so the tablet is dropped.
            json!({"type": "track", "userId": "bob", "anonymousId": "tablet-1", "event": "Signed In"}),
        ])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    harness.resolve();

    let (admin, _) = harness.sign_in(Role::Admin).await;
    let overview = harness.get("/console/quality", Some(&admin)).await;
    assert_eq!(overview.status, StatusCode::OK, "{}", overview.body);
    for expected in [
        "<th scope=\"row\">Order Completed</th>\n      <td>invalid_event</td>",
        "<code>/properties</code><br><span class=\"hint\">&#34;total&#34; is a required property",
        "<th scope=\"row\">Signed In</th>\n      <td>unplanned_event</td>",
        "ann@example.com",
        "<tr><th scope=\"row\">website</th><td class=\"num\">1</td></tr>",
    ] {
        assert!(overview.body.contains(expected), "{expected} in:\n{}", overview.body);
    }
    let quarantine = harness.get("/console/quality/quarantine", Some(&admin)).await;
    assert_eq!(quarantine.status, StatusCode::OK);
    assert!(
        quarantine.body.contains("missing_field") && quarantine.body.contains("ann@example.com"),
        "{}",
        quarantine.body
    );
    let identity = harness.get("/console/quality/identity", Some(&admin)).await;
    assert_eq!(identity.status, StatusCode::OK);
    assert!(identity.body.contains("<th scope=\"row\">merged</th>"), "{}", identity.body);
    assert!(identity.body.contains("<th scope=\"row\">dropped</th>"), "{}", identity.body);
    assert!(identity.body.contains("anonymous_id:tablet-1"), "{}", identity.body);
    // The drop is newer than the merge.
    assert!(identity.body.find(">dropped<").unwrap() < identity.body.find(">merged<").unwrap());
    let read = harness.audit_entries("profile.read_identities");
    assert_eq!(read.len(), 1, "identities read in clear are audited");
    for page in [&overview, &quarantine, &identity] {
        assert!(page.body.len() < 100_000);
    }

    // An auditor sees violations and the quarantine masked, and no merges (no profiles:list).
    let (auditor, _) = harness.sign_in(Role::Auditor).await;
    let overview = harness.get("/console/quality", Some(&auditor)).await;
    assert!(
        overview.body.contains("a***@example.com") && !overview.body.contains("ann@example.com"),
        "{}",
        overview.body
    );
    let quarantine = harness.get("/console/quality/quarantine", Some(&auditor)).await;
    assert!(quarantine.body.contains("a***@example.com") && !quarantine.body.contains("ann@example.com"));
    assert!(!overview.body.contains("/console/quality/identity"));
    assert_eq!(harness.get("/console/quality/identity", Some(&auditor)).await.status, StatusCode::FORBIDDEN);

    // An analyst sees only merges and drops; the overview leads there.
    let (analyst, _) = harness.sign_in(Role::Analyst).await;
    let led = harness.get("/console/quality", Some(&analyst)).await;
    assert_eq!(led.location.as_deref(), Some("/console/quality/identity"));
    assert_eq!(harness.get("/console/quality/identity", Some(&analyst)).await.status, StatusCode::OK);
    assert_eq!(harness.get("/console/quality/quarantine", Some(&analyst)).await.status, StatusCode::FORBIDDEN);
    assert_eq!(harness.audit_entries("profile.read_identities").len(), 1, "a masked read is not audited");

    // A marketer sees none of it.
    let (marketer, _) = harness.sign_in(Role::Marketer).await;
    for path in ["/console/quality", "/console/quality/quarantine", "/console/quality/identity"] {
        assert_eq!(harness.get(path, Some(&marketer)).await.status, StatusCode::FORBIDDEN, "{path}");
    }
    let audiences = harness.get("/console/audiences", Some(&marketer)).await;
    assert!(!nav(&audiences.body).contains("/console/quality"));
}

#[tokio::test]
async fn governance_pages_follow_the_permission_table_and_a_marketer_reaches_none() {
    let harness = Harness::new().await;
    let token = api_token(&harness);
    let request = json!({"kind": "suppress", "identifier": "email:zed@example.com"});
    let reply = harness.api(Method::POST, "/api/v1/dsr", &token, Some(request)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let dsr_id = serde_json::from_str::<Value>(&reply.body).unwrap()["id"].as_str().unwrap().to_owned();

    let (admin, _) = harness.sign_in(Role::Admin).await;
    let first = harness.get("/console/governance", Some(&admin)).await;
    assert_eq!(first.location.as_deref(), Some("/console/governance/audit"));
    let audit = harness.get("/console/governance/audit", Some(&admin)).await;
    assert_eq!(audit.status, StatusCode::OK);
    assert!(audit.body.contains("<code>dsr.suppress</code>") && audit.body.contains(&dsr_id), "{}", audit.body);
    assert!(audit.body.contains("setup (tok_"), "the actor by its token's name: {}", audit.body);
    assert!(!audit.body.contains("zed@example.com"), "no PII in the audit log");
    assert!(!audit.body.contains("id=\"chain-status\""), "the chain is checked only when asked");
    let filtered = harness.get("/console/governance/audit?action=audience&actor=setup", Some(&admin)).await;
    assert!(filtered.body.contains("No entry matches."), "{}", filtered.body);
    let by_name = harness.get("/console/governance/audit?actor=setup&since=1h", Some(&admin)).await;
    assert!(by_name.body.contains("dsr.suppress"), "{}", by_name.body);
    let bad_since = harness.get("/console/governance/audit?since=yesterday", Some(&admin)).await;
    assert!(bad_since.body.contains("is neither an RFC 3339 time"), "{}", bad_since.body);
    let verified = harness.get("/console/governance/audit?verify=1", Some(&admin)).await;
    assert!(verified.body.contains("Intact: all 1 entries verify."), "{}", verified.body);

    // An edited entry breaks the chain, and the page says where.
    let db = rusqlite::Connection::open(harness.dir.path().join("tandem.db")).unwrap();
    db.execute("UPDATE audit_log SET target = 'someone else' WHERE seq = 1", []).unwrap();
    let broken = harness.get("/console/governance/audit?verify=1", Some(&admin)).await;
    assert!(broken.body.contains("Broken at entry 1"), "{}", broken.body);

    let requests = harness.get("/console/governance/requests", Some(&admin)).await;
    assert!(requests.body.contains(&dsr_id) && requests.body.contains("<td>suppress</td>"), "{}", requests.body);
    assert!(!requests.body.contains("zed@example.com"));
    let access = harness.get("/console/governance/access", Some(&admin)).await;
    assert!(access.body.contains("<th scope=\"row\">setup</th>") && access.body.contains("governance:read"));
    assert!(!access.body.contains(&token), "a token's secret is never shown");
    // The inventory is written shortly after the events that carried the keys.
    let mut pii = harness.get("/console/governance/pii", Some(&admin)).await;
    for _ in 0..50 {
        if pii.body.contains("<code>email</code>") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        pii = harness.get("/console/governance/pii", Some(&admin)).await;
    }
    assert!(
        pii.body.contains("<th scope=\"row\"><code>email</code></th><td class=\"pii-yellow\">yellow</td>"),
        "{}",
        pii.body
    );
    for page in [&audit, &requests, &access, &pii] {
        assert_eq!(page.status, StatusCode::OK);
        assert!(page.body.len() < 100_000);
        assert!(nav(&page.body).contains("href=\"/console/governance\" aria-current=\"page\""));
    }

    // An auditor reads every governance page.
    let (auditor, _) = harness.sign_in(Role::Auditor).await;
    assert_eq!(
        harness.get("/", Some(&auditor)).await.location.as_deref(),
        Some("/console/goals"),
        "goals are every role's landing page"
    );
    for path in [
        "/console/governance/audit",
        "/console/governance/requests",
        "/console/governance/access",
        "/console/governance/pii",
    ] {
        assert_eq!(harness.get(path, Some(&auditor)).await.status, StatusCode::OK, "{path}");
    }

    // A marketer reaches none, and is not offered them.
    let (marketer, _) = harness.sign_in(Role::Marketer).await;
    for (path, lacking) in [
        ("/console/governance", "audit:read"),
        ("/console/governance/audit", "audit:read"),
        ("/console/governance/requests", "governance:read"),
        ("/console/governance/access", "governance:read"),
        ("/console/governance/pii", "governance:read"),
    ] {
        let refused = harness.get(path, Some(&marketer)).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{path}");
        assert!(
            refused.body.contains(&format!("the marketer role lacks the {lacking} permission")),
            "{}",
            refused.body
        );
        assert!(!refused.body.contains(&dsr_id));
        assert!(!nav(&refused.body).contains("/console/governance"));
    }
}
