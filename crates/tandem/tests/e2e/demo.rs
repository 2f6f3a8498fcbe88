//! `tandem demo` as a newcomer runs it: it loads a company, prints where to
//! look, and what it prints works.

use crate::common::{agent, tandem, word_after, Demo, Server};
use serde_json::Value;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn the_demo_serves_a_resolved_company_and_its_walkthrough_works() {
    let demo = Demo::start(&["--customers", "200"]);
    let (data, server, text) = (&demo.data, &demo.server, &demo.walkthrough);
    let token = demo.admin_token();
    let email = word_after(text, "profile show email:");
    let expected: u64 = word_after(text, "(the generator made ").trim_end_matches("):").parse().unwrap();

    let mut response = agent()
        .get(&format!("{}/api/v1/profiles?identifier=email:{email}", server.url))
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let profile: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    let identifiers = profile["identifiers"].to_string();
    for kind in ["user_id", "crm_id", "zendesk_id", "twitter_handle", "device_id"] {
        assert!(identifiers.contains(kind), "{kind} missing from {identifiers}");
    }
    let stats: Value = serde_json::from_str(&tandem(data, &["stats", "--json"])).unwrap();
    assert_eq!(stats["profiles"].as_u64(), Some(expected));
    // The demo's audiences are defined and filled from its company.
    let audiences: Value = serde_json::from_str(&tandem(data, &["audience", "list", "--json"])).unwrap();
    let listed = audiences.to_string();
    for name in ["recent buyers", "high value", "browsed, not bought"] {
        assert!(listed.contains(name), "{name} missing from {listed}");
    }
    let members: Value =
        serde_json::from_str(&tandem(data, &["audience", "members", "recent buyers", "--json"])).unwrap();
    let count = members["members"].as_array().map_or(0, Vec::len);
    assert!(count > 0, "recent buyers is empty: {members}");
    let shown: Value = serde_json::from_str(&tandem(data, &["audience", "show", "recent buyers", "--json"])).unwrap();
    let days = shown["size_over_time"].as_array().expect("size over time");
    assert_eq!(
        days.last().map(|day| &day["size"]),
        Some(&shown["size"]),
        "the last day's size is the size now: {shown}"
    );
    the_company_around_the_data_is_there(data, text);
    assert!(demo.server.terminate(), "the demo stops cleanly");

    // Run again: the same company is served, not loaded twice.
    let stats: Value = serde_json::from_str(&tandem(data, &["stats", "--json"])).unwrap();
    let again = Server::run(data, &["demo", "--customers", "200", "--no-live-traffic"], Stdio::null());
    let restarted: Value = serde_json::from_str(&tandem(data, &["stats", "--json"])).unwrap();
    assert_eq!(restarted["events"], stats["events"]);
    assert_eq!(restarted["profiles"], stats["profiles"]);
    let destinations: Value = serde_json::from_str(&tandem(data, &["destination", "list", "--json"])).unwrap();
    assert_eq!(destinations.as_array().unwrap().len(), 2, "the destinations are kept, not doubled: {destinations}");
    drop(again);
}

fn json_of(data: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&tandem(data, args)).unwrap_or_else(|error| panic!("tandem {args:?}: {error}"))
}

/// Waits up to a minute for `check` to hold, polling every 200 ms.
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what} did not happen within a minute");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the console shows beyond the customers: tokens per role, the two
/// destinations with dead letters from the flaky CRM (replayable), audience
/// files, a tracking plan with violations arriving, every tool registered,
/// and an unregistered tool's traffic.
fn the_company_around_the_data_is_there(data: &Path, walkthrough: &str) {
    let tokens = json_of(data, &["token", "list", "--json"]);
    for role in ["admin", "marketer", "analyst", "support", "auditor"] {
        let line = walkthrough.lines().find(|line| line.trim_start().starts_with(&format!("{role} "))).unwrap();
        assert!(line.contains("tdm_") && line.contains("personal data"), "{line}");
        assert!(tokens.to_string().contains(&format!("\"role\":\"{role}\"")), "no {role} token: {tokens}");
    }

    let destinations = json_of(data, &["destination", "list", "--json"]);
    let kinds: Vec<(&str, &str)> = destinations
        .as_array()
        .unwrap()
        .iter()
        .map(|destination| (destination["name"].as_str().unwrap(), destination["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [("crm-sync", "webhook"), ("data-lake", "file")]);
    let dead = eventually("a dead letter at the CRM", || {
        let failed = json_of(data, &["deliveries", "failed", "--destination", "crm-sync", "--json"]);
        let failed = failed.as_array().unwrap().clone();
        (!failed.is_empty()).then_some(failed)
    });
    assert!(dead[0]["last_error"].as_str().unwrap().contains("422"), "{dead:?}");
    let delivered = eventually("deliveries to the CRM", || {
        let shown = json_of(data, &["destination", "list", "--json"]);
        let delivered = shown[0]["counts"]["delivered"].as_u64().unwrap();
        (delivered > 0).then_some(delivered)
    });
    assert!(delivered > dead.len() as u64, "most deliveries succeed: {delivered} delivered, {} dead", dead.len());
    // The CRM takes a contact it refused once: a replayed dead letter is delivered.
    let replayed = tandem(data, &["deliveries", "replay", "--destination", "crm-sync"]);
    let count: usize = replayed.split_whitespace().nth(1).and_then(|count| count.parse().ok()).unwrap();
    assert!(count >= dead.len(), "{replayed}");
    let replayed_positions: Vec<Value> = dead.iter().map(|letter| letter["position"].clone()).collect();
    eventually("the replayed dead letters delivered", || {
        let failed = json_of(data, &["deliveries", "failed", "--destination", "crm-sync", "--json"]);
        let still: Vec<&Value> = failed
            .as_array()
            .unwrap()
            .iter()
            .filter(|letter| replayed_positions.contains(&letter["position"]))
            .collect();
        still.is_empty().then_some(())
    });
    let exports = data.join("demo-exports");
    eventually("audience files in the data lake", || {
        let files = std::fs::read_dir(&exports).ok()?.filter_map(Result::ok).count();
        (files > 0).then_some(())
    });

    let violations = json_of(data, &["plan", "violations", "website", "--json"]);
    let kinds = violations.to_string();
    assert!(kinds.contains("unplanned_event") && kinds.contains("invalid_event"), "{violations}");

    let report = json_of(data, &["stack", "report", "--json"]);
    assert_eq!(report["without_owner"], serde_json::json!([]), "{report}");
    for tool in report["tools"].as_array().unwrap() {
        for field in ["owner", "department", "purpose", "annual_cost"] {
            assert!(!tool[field].is_null(), "{} has no {field}: {tool}", tool["name"]);
        }
    }
    let shadow = report["shadow_traffic"].as_array().unwrap();
    assert_eq!(shadow.len(), 1, "{report}");
    assert!(shadow[0]["requests"].as_u64().unwrap() >= 5, "{report}");
    assert!(shadow[0]["user_agents"].to_string().contains("QuizPop"), "{report}");
}
