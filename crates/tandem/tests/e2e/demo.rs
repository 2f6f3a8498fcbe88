//! `tandem demo` as a newcomer runs it: it loads a company, prints where to
//! look, and what it prints works.

use crate::common::{agent, tandem, Server};
use serde_json::Value;
use std::process::Stdio;

fn after<'a>(text: &'a str, marker: &str) -> &'a str {
    let start = text.find(marker).unwrap_or_else(|| panic!("{marker:?} not in:\n{text}")) + marker.len();
    text[start..].split_whitespace().next().unwrap()
}

#[test]
fn the_demo_serves_a_resolved_company_and_its_walkthrough_works() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let output = dir.path().join("walkthrough.txt");
    let server =
        Server::run(&data, &["demo", "--customers", "200"], Stdio::from(std::fs::File::create(&output).unwrap()));
    let text = std::fs::read_to_string(&output).unwrap();
    let token = after(&text, "Admin token for the API: ");
    let email = after(&text, "profile show email:");
    let expected: u64 = after(&text, "(the generator made ").trim_end_matches("):").parse().unwrap();

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
    let stats: Value = serde_json::from_str(&tandem(&data, &["stats", "--json"])).unwrap();
    assert_eq!(stats["profiles"].as_u64(), Some(expected));
    // The demo's audiences are defined and filled from its company.
    let audiences: Value = serde_json::from_str(&tandem(&data, &["audience", "list", "--json"])).unwrap();
    let listed = audiences.to_string();
    for name in ["recent buyers", "high value", "browsed, not bought"] {
        assert!(listed.contains(name), "{name} missing from {listed}");
    }
    let members: Value =
        serde_json::from_str(&tandem(&data, &["audience", "members", "recent buyers", "--json"])).unwrap();
    let count = members["members"].as_array().map_or(0, Vec::len);
    assert!(count > 0, "recent buyers is empty: {members}");
    let shown: Value = serde_json::from_str(&tandem(&data, &["audience", "show", "recent buyers", "--json"])).unwrap();
    let days = shown["size_over_time"].as_array().expect("size over time");
    assert_eq!(
        days.last().map(|day| &day["size"]),
        Some(&shown["size"]),
        "the last day's size is the size now: {shown}"
    );
    assert!(server.terminate(), "the demo stops cleanly");

    // Run again: the same company is served, not loaded twice.
    let again = Server::run(&data, &["demo", "--customers", "200"], Stdio::null());
    let restarted: Value = serde_json::from_str(&tandem(&data, &["stats", "--json"])).unwrap();
    assert_eq!(restarted["events"], stats["events"]);
    assert_eq!(restarted["profiles"], stats["profiles"]);
    drop(again);
}
