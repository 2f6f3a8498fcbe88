//! Compatibility: Segment's official Python and Node SDKs, unchanged but for
//! their host, deliver every call to Tandem with its fields intact. The test
//! command (`scripts/test`) installs both SDKs.

use crate::common::{create_source, events, repo_root, Server};
use serde_json::Value;
use std::collections::HashMap;
use std::process::Command;

fn run_sdk(program: &str, script: &str, server: &Server, write_key: &str, tag: &str) {
    let script_path = repo_root().join("tests/sdk").join(script);
    let output = Command::new(program)
        .arg(&script_path)
        .args([server.url.as_str(), write_key, tag])
        .current_dir(script_path.parent().unwrap())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}; run scripts/test to install the SDKs"));
    assert!(
        output.status.success(),
        "{script} failed (run scripts/test to install the SDKs):\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Checks the six calls an SDK script sends under `tag`.
fn assert_calls_arrived(all: &[Value], tag: &str, library: &str) {
    let by_id: HashMap<&str, &Value> = all
        .iter()
        .filter_map(|event| event["messageId"].as_str().filter(|id| id.starts_with(tag)).map(|id| (id, event)))
        .collect();
    assert_eq!(by_id.len(), 6, "six calls from {library}: {:?}", by_id.keys());
    let user = format!("{tag}-user");
    let anonymous = format!("{tag}-anon");
    let event = |call: &str| by_id[format!("{tag}-{call}").as_str()];

    let identify = event("identify");
    assert_eq!(identify["type"], "identify");
    assert_eq!(identify["userId"], user.as_str());
    assert_eq!(identify["traits"]["email"], format!("{tag}@example.com"));
    assert_eq!(identify["traits"]["plan"], "pro");

    let track = event("track");
    assert_eq!((track["type"].as_str(), track["event"].as_str()), (Some("track"), Some("Order Completed")));
    assert_eq!(track["properties"]["revenue"], 42.5);
    assert_eq!(track["properties"]["currency"], "EUR");
    assert_eq!(track["properties"]["items"][0]["sku"], "A-1");
    assert_eq!(track["context"]["campaign"]["source"], "newsletter");

    let page = event("page");
    assert_eq!((page["type"].as_str(), page["anonymousId"].as_str()), (Some("page"), Some(anonymous.as_str())));
    assert_eq!((page["name"].as_str(), page["category"].as_str()), (Some("Pricing"), Some("Docs")));
    assert_eq!(page["properties"]["url"], "https://shop.example/pricing");

    let screen = event("screen");
    assert_eq!((screen["type"].as_str(), screen["name"].as_str()), (Some("screen"), Some("Home")));
    assert_eq!(screen["properties"]["variant"], "b");

    let group = event("group");
    assert_eq!(group["groupId"], format!("{tag}-acme"));
    assert_eq!(group["traits"]["employees"], 50);

    let alias = event("alias");
    assert_eq!(
        (alias["previousId"].as_str(), alias["userId"].as_str()),
        (Some(anonymous.as_str()), Some(user.as_str()))
    );

    for event in by_id.values() {
        let library_name = event["context"]["library"]["name"].as_str().unwrap_or_default();
        assert!(library_name.contains(library), "context.library.name {library_name:?} names {library}");
        assert!(event["originalTimestamp"].is_string(), "the SDK's timestamp is kept");
        assert!(event["sentAt"].is_string() && event["receivedAt"].is_string() && event["timestamp"].is_string());
        assert_eq!(event["context"]["ip"], "127.0.0.1");
    }
}

#[test]
fn segment_python_and_node_sdks_deliver_every_call_intact() {
    let dir = tempfile::tempdir().unwrap();
    let source = create_source(dir.path(), "backend");
    let write_key = source["write_key"].as_str().unwrap();
    let server = Server::start(dir.path());
    run_sdk("python3", "python/send_events.py", &server, write_key, "py");
    run_sdk("node", "node/send_events.mjs", &server, write_key, "node");
    let all = events(dir.path());
    assert_calls_arrived(&all, "py", "analytics-python");
    assert_calls_arrived(&all, "node", "analytics-node");
    assert!(all.iter().all(|event| event["sourceId"] == source["id"]));
}
