//! Compatibility: Segment's official Python and Node SDKs, unchanged but for
//! their host, deliver every call to Tandem with its fields intact; Segment's
//! analytics.js and RudderStack's JavaScript SDK do so from headless Chromium,
//! loading their settings from Tandem. The test command (`scripts/test`)
//! installs the SDKs and Chromium.

use crate::common::{create_source, events, repo_root, tandem, Server};
use serde_json::Value;
use std::collections::HashMap;
use std::process::Command;

/// Runs a script under `tests/sdk` from its own directory (where its
/// packages are installed); panics unless it succeeds, returns its output.
fn run_script(program: &str, script: &str, args: &[&str]) -> Vec<u8> {
    let script_path = repo_root().join("tests/sdk").join(script);
    let output = Command::new(program)
        .arg(&script_path)
        .args(args)
        .current_dir(script_path.parent().unwrap())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}; run scripts/test to install the SDKs"));
    assert!(
        output.status.success(),
        "{script} failed (run scripts/test to install the SDKs, and Chromium for the browser):\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn run_sdk(program: &str, script: &str, server: &Server, write_key: &str, tag: &str) {
    run_script(program, script, &[server.url.as_str(), write_key, tag]);
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
    // RudderStack's SDK sends an identify's traits in context.traits.
    let traits = if identify["traits"].is_object() { &identify["traits"] } else { &identify["context"]["traits"] };
    assert_eq!(traits["email"], format!("{tag}@example.com"));
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

/// Runs the browser script (`tests/sdk/browser`) against the server; returns
/// what it printed about the requests Tandem accepted.
fn run_browser(server: &Server, write_key: &str, tag: &str, extra: &[&str]) -> Value {
    let args: Vec<&str> = [server.url.as_str(), write_key, tag].into_iter().chain(extra.iter().copied()).collect();
    serde_json::from_slice(&run_script("node", "browser/load_in_chromium.mjs", &args)).unwrap()
}

/// Checks the page, identify and track calls a browser sent under `tag`.
fn assert_browser_calls_arrived(all: &[Value], tag: &str, source_id: &Value, library: &str) {
    let mine: Vec<&Value> = all
        .iter()
        .filter(|event| {
            let user = event["userId"].as_str().unwrap_or_default();
            let named = event["name"].as_str().or(event["event"].as_str()).unwrap_or_default();
            user == format!("{tag}-user") || named.starts_with(&format!("{tag} "))
        })
        .collect();
    let of_type = |kind: &str| -> &Value {
        let found: Vec<&&Value> = mine.iter().filter(|event| event["type"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind} from the browser tagged {tag}: {mine:?}");
        found[0]
    };
    let page = of_type("page");
    assert_eq!(
        (page["name"].as_str(), page["category"].as_str()),
        (Some(format!("{tag} Pricing").as_str()), Some("Docs"))
    );
    assert_eq!(page["properties"]["plan"], "pro");
    assert!(page["context"]["page"]["url"].as_str().unwrap().starts_with("http://127.0.0.1:"));
    let identify = of_type("identify");
    assert_eq!(identify["userId"], format!("{tag}-user"));
    // RudderStack's SDK sends an identify's traits in context.traits.
    let traits = if identify["traits"].is_object() { &identify["traits"] } else { &identify["context"]["traits"] };
    assert_eq!(traits["email"], format!("{tag}@example.com"));
    let track = of_type("track");
    assert_eq!(track["event"], format!("{tag} Order Completed"));
    assert_eq!(track["userId"], format!("{tag}-user"));
    assert_eq!(
        (track["properties"]["revenue"].as_f64(), track["properties"]["currency"].as_str()),
        (Some(42.5), Some("EUR"))
    );
    for event in [page, identify, track] {
        assert_eq!(event["context"]["library"]["name"], library);
        assert!(event["context"]["userAgent"].as_str().unwrap().contains("Chrome"));
        assert!(event["anonymousId"].is_string() && event["messageId"].is_string());
        assert_eq!(&event["sourceId"], source_id);
    }
}

/// analytics.js loads its settings from Tandem (`cdnURL`) and sends to the
/// host they name; after a failed attempt its retry carries `X-Retry-Count`,
/// which the CORS preflight must allow or the browser drops the event.
#[test]
fn segment_analytics_js_in_chromium_loads_from_tandem_and_its_retries_get_through() {
    let dir = tempfile::tempdir().unwrap();
    let source: Value =
        serde_json::from_str(&tandem(dir.path(), &["source", "create", "web", "--kind", "website", "--json"])).unwrap();
    let write_key = source["write_key"].as_str().unwrap();
    let server = Server::start(dir.path());
    let first = run_browser(&server, write_key, "br", &[]);
    assert_eq!(first["accepted"].as_array().unwrap().len(), 3, "{first}");
    let retried = run_browser(&server, write_key, "retry", &["--fail-first"]);
    assert_eq!(retried["refused"], 1, "{retried}");
    assert_eq!(retried["retriesAccepted"], serde_json::json!(["1"]), "{retried}");
    let all = events(dir.path());
    assert_browser_calls_arrived(&all, "br", &source["id"], "analytics.js");
    assert_browser_calls_arrived(&all, "retry", &source["id"], "analytics.js");
}

/// RudderStack's JavaScript SDK fetches `{configUrl}/sourceConfig` before it
/// sends anything, with its write key as Basic auth, and sends a custom
/// `AnonymousId` header with every event.
#[test]
fn rudderstack_javascript_sdk_in_chromium_loads_its_source_config_from_tandem() {
    let dir = tempfile::tempdir().unwrap();
    let source: Value =
        serde_json::from_str(&tandem(dir.path(), &["source", "create", "web", "--kind", "website", "--json"])).unwrap();
    let server = Server::start(dir.path());
    let sent = run_browser(&server, source["write_key"].as_str().unwrap(), "rs", &["--rudderstack"]);
    assert_eq!(sent["accepted"].as_array().unwrap().len(), 3, "{sent}");
    assert_browser_calls_arrived(&events(dir.path()), "rs", &source["id"], "RudderLabs JavaScript SDK");
}
