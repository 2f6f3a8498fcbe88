//! The command line beside a running server, and the server's configuration.

use crate::common::{agent, create_source, events, post, tandem, tandem_output, Server};
use serde_json::{json, Value};

#[test]
fn sources_created_while_the_server_runs_can_write_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let first = create_source(dir.path(), "website");
    let server = Server::start(dir.path());
    let second = create_source(dir.path(), "backend");
    for source in [&first, &second] {
        assert!(source["id"].as_str().unwrap().starts_with("src_"));
        let body = json!({"userId": "u", "event": format!("from {}", source["name"])}).to_string();
        let (status, _) =
            post(&agent(), &format!("{}/v1/track", server.url), source["write_key"].as_str().unwrap(), &body).unwrap();
        assert_eq!(status, 200);
    }
    let listed: Value = serde_json::from_str(&tandem(dir.path(), &["source", "list", "--json"])).unwrap();
    let names: Vec<_> = listed.as_array().unwrap().iter().map(|source| source["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["website", "backend"]);
    assert_eq!(listed[1]["write_key"], second["write_key"]);
    let text = tandem(dir.path(), &["source", "list"]);
    assert!(text.contains("website") && text.contains(second["write_key"].as_str().unwrap()), "{text}");

    let duplicate = tandem_output(dir.path(), &["source", "create", "website"]);
    assert!(!duplicate.status.success());
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("already exists"));

    let logged = events(dir.path());
    assert_eq!(logged.len(), 2);
    assert_eq!(logged[0]["event"], "from \"website\"");
    assert_eq!(logged[1]["sourceId"], second["id"]);
    let stats: Value = serde_json::from_str(&tandem(dir.path(), &["stats", "--json"])).unwrap();
    assert_eq!(stats["events"], 2);
    assert_eq!(stats["sources"][0]["events_by_type"]["track"], 1);
    let text = tandem(dir.path(), &["events", "list"]);
    assert!(text.lines().count() == 3 && text.contains("from \"backend\""), "{text}");
}

#[test]
fn rejected_messages_are_listed_by_the_quarantine_command() {
    let dir = tempfile::tempdir().unwrap();
    let source = create_source(dir.path(), "app");
    let server = Server::start(dir.path());
    let body =
        json!({"batch": [{"type": "track", "userId": "u", "event": "ok"}, {"type": "track", "anonymousId": "a"}]})
            .to_string();
    let (status, response) =
        post(&agent(), &format!("{}/v1/batch", server.url), source["write_key"].as_str().unwrap(), &body).unwrap();
    assert_eq!(status, 200, "{response}");
    let lines: Vec<Value> = tandem(dir.path(), &["quarantine", "list", "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0]["index"].as_u64(), lines[0]["field"].as_str()), (Some(1), Some("event")));
    assert_eq!(lines[0]["payload"], json!({"type": "track", "anonymousId": "a"}));
    let stats: Value = serde_json::from_str(&tandem(dir.path(), &["stats", "--json"])).unwrap();
    assert_eq!((stats["events"].as_u64(), stats["rejected"].as_u64()), (Some(1), Some(1)));
}

#[test]
fn configuration_comes_from_the_environment_and_a_toml_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("from-file");
    let config = dir.path().join("tandem.toml");
    std::fs::write(&config, format!("data = {:?}\n", data.display().to_string())).unwrap();
    let output = std::process::Command::new(crate::common::BINARY)
        .args(["source", "create", "crm", "--json"])
        .env("TANDEM_CONFIG", &config)
        .env_remove("TANDEM_DATA")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(data.join("tandem.db").exists(), "the data directory came from the file");
    let output = std::process::Command::new(crate::common::BINARY)
        .args(["source", "list", "--json"])
        .env("TANDEM_DATA", &data)
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed[0]["name"], "crm");
    std::fs::write(&config, "dedup_window_hours = 0\n").unwrap();
    let output = std::process::Command::new(crate::common::BINARY)
        .args(["stats"])
        .env("TANDEM_CONFIG", &config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("dedup_window_hours"));
}

#[test]
fn the_running_server_resolves_events_into_profiles_the_cli_and_api_show() {
    let dir = tempfile::tempdir().unwrap();
    let source = create_source(dir.path(), "website");
    let token: Value = serde_json::from_str(&tandem(dir.path(), &["token", "create", "--json"])).unwrap();
    let secret = token["token"].as_str().unwrap();
    let server = Server::start(dir.path());
    let body = json!({"batch": [
        {"type": "page", "anonymousId": "visit-1", "name": "Pricing"},
        {"type": "identify", "anonymousId": "visit-1", "userId": "ann", "traits": {"email": "ann@example.com", "plan": "pro"}}
    ]})
    .to_string();
    let (status, _) =
        post(&agent(), &format!("{}/v1/batch", server.url), source["write_key"].as_str().unwrap(), &body).unwrap();
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stats: Value = serde_json::from_str(&tandem(dir.path(), &["stats", "--json"])).unwrap();
        if stats["resolver_position"] == stats["log_head"] && stats["profiles"] == 1 {
            assert_eq!(stats["resolver_lag"], 0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the resolver did not catch up: {stats}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let shown: Value =
        serde_json::from_str(&tandem(dir.path(), &["profile", "show", "anonymous_id:visit-1", "--json"])).unwrap();
    assert_eq!((shown["id"].as_str(), shown["traits"]["plan"].as_str()), (Some("prof_1"), Some("pro")));
    let mut response = agent()
        .get(&format!("{}/api/v1/profiles?identifier=user_id:ann", server.url))
        .header("Authorization", &format!("Bearer {secret}"))
        .call()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let profile: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(profile["id"], "prof_1");
    let explained = tandem(dir.path(), &["profile", "explain", "email:ann@example.com"]);
    assert!(explained.contains("attached user_id:ann, email:ann@example.com to prof_1"), "{explained}");
}

#[test]
fn a_webhook_source_made_on_the_command_line_takes_signed_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let created: Value = serde_json::from_str(&tandem(
        dir.path(),
        &["source", "create", "fb-leads", "--webhook", "facebook-leads", "--secret", "app-secret-9", "--json"],
    ))
    .unwrap();
    let path = created["webhook"]["path"].as_str().unwrap().to_owned();
    assert_eq!(path, format!("/v1/webhooks/{}", created["id"].as_str().unwrap()));
    let listed: Value = serde_json::from_str(&tandem(dir.path(), &["source", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["webhook"], json!({"format": "facebook_leads", "path": path, "signed": true}));

    let server = Server::start(dir.path());
    let body = json!({"object": "page", "entry": [{"changes": [{"field": "leadgen", "value": {"leadgen_id": "77", "form_id": "f"}}]}]})
        .to_string();
    let deliver = |signature: &str| {
        let mut response = agent()
            .post(&format!("{}{path}", server.url))
            .header("X-Hub-Signature-256", signature)
            .header("Content-Type", "application/json")
            .send(&body)
            .unwrap();
        (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
    };
    let (status, answer) = deliver(&tandem_core::webhook::sign("wrong-secret", body.as_bytes()));
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = deliver(&tandem_core::webhook::sign("app-secret-9", body.as_bytes()));
    assert_eq!(status, 200, "{answer}");
    let logged = events(dir.path());
    assert_eq!(logged.len(), 1);
    assert_eq!(
        (logged[0]["event"].as_str(), logged[0]["properties"]["leadgen_id"].as_str()),
        (Some("Lead Submitted"), Some("77"))
    );
}

/// A mistyped `--data` used to print zeros from a new empty store.
#[test]
fn read_commands_on_a_mistyped_data_directory_fail_instead_of_creating_a_store() {
    let dir = tempfile::tempdir().unwrap();
    create_source(&dir.path().join("tandem-data"), "website");
    let mistyped = dir.path().join("tandem-dta");
    for command in [&["stats"][..], &["events", "list"], &["source", "list"], &["profile", "show", "user_id:ann"]] {
        let output = tandem_output(&mistyped, command);
        assert!(!output.status.success(), "{command:?} succeeded on a directory with no store");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("no Tandem store in"), "{command:?}: {stderr}");
        assert!(!mistyped.exists(), "{command:?} created {}", mistyped.display());
    }
}

#[test]
fn a_webhook_source_keeps_its_secret_when_its_format_changes() {
    let dir = tempfile::tempdir().unwrap();
    let output = tandem_output(dir.path(), &["source", "create", "hooks", "--kind", "webhook"]);
    assert!(!output.status.success(), "a webhook source without a format is refused");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--format"));
    tandem(dir.path(), &["source", "create", "hooks", "--format", "facebook_leads", "--secret", "app-secret-9"]);
    tandem(dir.path(), &["source", "webhook", "hooks", "--format", "social_mentions"]);
    let listed: Value = serde_json::from_str(&tandem(dir.path(), &["source", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["webhook"]["format"], "social_mentions");
    assert_eq!(listed[0]["webhook"]["signed"], true, "{listed}");
    tandem(dir.path(), &["source", "webhook", "hooks", "--no-secret"]);
    let listed: Value = serde_json::from_str(&tandem(dir.path(), &["source", "list", "--json"])).unwrap();
    assert_eq!(
        (listed[0]["webhook"]["format"].as_str(), listed[0]["webhook"]["signed"].as_bool()),
        (Some("social_mentions"), Some(false))
    );
}

/// Sends a batch through a running server and stops it, so the CLI reads a quiet store.
fn with_events(data: &std::path::Path, batch: Value) -> Value {
    let source = create_source(data, "web");
    let server = Server::start(data);
    let (status, _) = post(
        &agent(),
        &format!("{}/v1/batch", server.url),
        source["write_key"].as_str().unwrap(),
        &json!({ "batch": batch }).to_string(),
    )
    .unwrap();
    assert_eq!(status, 200);
    drop(server);
    source
}

fn message_ids(output: &str) -> Vec<String> {
    output
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["messageId"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn events_list_shows_the_newest_first_and_filters_by_source_type_name_user_and_time() {
    let dir = tempfile::tempdir().unwrap();
    with_events(
        dir.path(),
        json!([
            {"type": "track", "userId": "ann", "event": "Order Completed", "messageId": "e1", "timestamp": "2026-08-01T10:00:00Z"},
            {"type": "page", "anonymousId": "a-9", "name": "Pricing", "messageId": "e2", "timestamp": "2026-10-01T10:00:00Z"},
            {"type": "track", "userId": "bob", "event": "Order Completed", "messageId": "e3", "timestamp": "2026-10-02T10:00:00Z"},
            {"type": "identify", "userId": "ann", "messageId": "e4", "timestamp": "2026-10-03T10:00:00Z"}
        ]),
    );
    let other = create_source(dir.path(), "app");
    assert_eq!(other["name"], "app");
    let list = |args: &[&str]| message_ids(&tandem(dir.path(), &[&["events", "list", "--json"], args].concat()));
    assert_eq!(list(&[]), ["e1", "e2", "e3", "e4"]);
    assert_eq!(list(&["--tail", "--limit", "2"]), ["e4", "e3"]);
    assert_eq!(list(&["--tail", "--before", "3"]), ["e2", "e1"]);
    assert_eq!(list(&["--event", "Order Completed"]), ["e1", "e3"]);
    assert_eq!(list(&["--user", "ann"]), ["e1", "e4"]);
    assert_eq!(list(&["--user", "a-9", "--type", "page"]), ["e2"]);
    assert_eq!(list(&["--since", "2026-10-01", "--until", "2026-10-03"]), ["e2", "e3"]);
    assert_eq!(list(&["--source", "web", "--type", "identify"]), ["e4"]);
    assert!(list(&["--source", "app"]).is_empty());
    let table = tandem(dir.path(), &["events", "list", "--tail", "--limit", "1"]);
    assert!(table.contains("2026-10-03T10:00:00") && table.contains("web"), "{table}");
    let output = tandem_output(dir.path(), &["events", "list", "--since", "last tuesday"]);
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("is not a time"));
}

#[test]
fn profiles_are_listed_and_searched_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    with_events(
        dir.path(),
        json!([
            {"type": "identify", "userId": "ann", "traits": {"email": "ann@example.com", "plan": "pro"}, "messageId": "i1"},
            {"type": "identify", "userId": "anna", "traits": {"email": "anna@example.com", "plan": "free"}, "messageId": "i2"},
            {"type": "identify", "userId": "bob", "traits": {"email": "bob@example.com", "plan": "pro"}, "messageId": "i3"}
        ]),
    );
    let list = |args: &[&str]| -> Value {
        serde_json::from_str(&tandem(dir.path(), &[&["profile", "list", "--json"], args].concat())).unwrap()
    };
    let emails = |page: &Value| -> Vec<String> {
        page["profiles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|profile| profile["traits"]["email"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(emails(&list(&[])), ["ann@example.com", "anna@example.com", "bob@example.com"]);
    assert_eq!(emails(&list(&["--search", "email:ANN"])), ["ann@example.com", "anna@example.com"]);
    assert_eq!(emails(&list(&["--search", "email:ann", "--trait", "plan=pro"])), ["ann@example.com"]);
    let first = list(&["--limit", "2"]);
    let rest = list(&["--limit", "2", "--after", first["next_after"].as_str().unwrap()]);
    assert_eq!(emails(&rest), ["bob@example.com"]);
    assert_eq!(rest["next_after"], Value::Null);
    let table = tandem(dir.path(), &["profile", "list", "--limit", "1"]);
    assert!(table.contains("user_id:ann") && table.contains("more: --after prof_1"), "{table}");
}

#[test]
fn tokens_have_roles_and_expiry_and_changes_enter_a_verifiable_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let created: Value = serde_json::from_str(&tandem(
        dir.path(),
        &["token", "create", "--name", "desk", "--role", "support", "--expires", "30d", "--json"],
    ))
    .unwrap();
    assert_eq!(created["role"], "support");
    assert!(created["expires_at"].as_str().is_some(), "{created}");
    let listed: Value = serde_json::from_str(&tandem(dir.path(), &["token", "list", "--json"])).unwrap();
    assert_eq!((listed[0]["role"].clone(), listed[0]["last_used_at"].clone()), (json!("support"), Value::Null));
    let refused = tandem_output(dir.path(), &["token", "create", "--role", "root"]);
    assert!(!refused.status.success());
    let refused = tandem_output(dir.path(), &["token", "create", "--expires", "soon"]);
    assert!(!refused.status.success());
    create_source(dir.path(), "app");
    tandem(dir.path(), &["identity", "block", "email:ann@example.com"]);

    let entries: Vec<Value> = tandem(dir.path(), &["audit", "list", "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let actions: Vec<(&str, &str)> =
        entries.iter().map(|entry| (entry["actor"].as_str().unwrap(), entry["action"].as_str().unwrap())).collect();
    assert_eq!(actions, [("cli", "token.create"), ("cli", "source.create"), ("cli", "identity.block")]);
    assert_eq!(entries[0]["after"]["role"], "support");
    let log = tandem(dir.path(), &["audit", "list", "--json"]);
    assert!(!log.contains("ann@example.com"), "identifiers are digested: {log}");
    let only_tokens = tandem(dir.path(), &["audit", "list", "--action", "token", "--json"]);
    assert_eq!(only_tokens.lines().count(), 1);
    assert!(tandem(dir.path(), &["audit", "verify"]).contains("intact: 3 entries"));

    // Profiles read as a role without PII access come out masked.
    with_events(
        dir.path(),
        json!([{"type": "identify", "userId": "ann", "traits": {"email": "jane@example.com", "plan": "pro"}}]),
    );
    let clear: Value =
        serde_json::from_str(&tandem(dir.path(), &["profile", "show", "user_id:ann", "--json"])).unwrap();
    assert_eq!(clear["traits"]["email"], "jane@example.com");
    let masked: Value =
        serde_json::from_str(&tandem(dir.path(), &["profile", "show", "user_id:ann", "--json", "--role", "analyst"]))
            .unwrap();
    assert_eq!(
        (masked["traits"]["email"].clone(), masked["traits"]["plan"].clone()),
        (json!("j***@example.com"), json!("pro"))
    );
    let listed = tandem(dir.path(), &["profile", "list", "--role", "marketer"]);
    assert!(listed.contains("email:j***@example.com") && !listed.contains("jane@"), "{listed}");

    let database = rusqlite::Connection::open(dir.path().join("tandem.db")).unwrap();
    database.execute("UPDATE audit_log SET target = 'someone-else' WHERE seq = 2", []).unwrap();
    drop(database);
    let verified = tandem_output(dir.path(), &["audit", "verify"]);
    assert!(!verified.status.success());
    let stderr = String::from_utf8_lossy(&verified.stderr);
    assert!(stderr.contains("entry 2 is broken"), "{stderr}");
}

#[test]
fn tokens_sources_and_blocked_identifiers_can_be_managed() {
    let dir = tempfile::tempdir().unwrap();
    let created: Value =
        serde_json::from_str(&tandem(dir.path(), &["token", "create", "--name", "demo", "--json"])).unwrap();
    let listed: Value = serde_json::from_str(&tandem(dir.path(), &["token", "list", "--json"])).unwrap();
    assert_eq!((listed[0]["id"].clone(), listed[0]["name"].clone()), (created["id"].clone(), json!("demo")));
    assert!(listed[0].get("token").is_none(), "secrets are shown once");
    tandem(dir.path(), &["token", "revoke", created["id"].as_str().unwrap()]);
    assert_eq!(tandem(dir.path(), &["token", "list", "--json"]).trim(), "[]");

    let source = with_events(dir.path(), json!([{"type": "track", "userId": "ann", "event": "E", "messageId": "m1"}]));
    tandem(dir.path(), &["source", "rename", "web", "website"]);
    let rotated: Value =
        serde_json::from_str(&tandem(dir.path(), &["source", "rotate-key", "website", "--json"])).unwrap();
    assert_eq!(rotated["id"], source["id"]);
    assert_ne!(rotated["write_key"], source["write_key"]);
    let server = Server::start(dir.path());
    let send = |key: &Value| {
        post(&agent(), &format!("{}/v1/track", server.url), key.as_str().unwrap(), r#"{"userId":"u","event":"E"}"#)
    };
    assert_eq!(send(&source["write_key"]).unwrap().0, 401, "the old key is refused");
    assert_eq!(send(&rotated["write_key"]).unwrap().0, 200);
    drop(server);
    let output = tandem_output(dir.path(), &["source", "delete", "website"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("events in the log"), "{output:?}");
    create_source(dir.path(), "unused");
    tandem(dir.path(), &["source", "delete", "unused"]);
    let names: Value = serde_json::from_str(&tandem(dir.path(), &["source", "list", "--json"])).unwrap();
    assert_eq!(names.as_array().unwrap().len(), 1);

    tandem(dir.path(), &["identity", "block", "user_id:ann"]);
    let rules: Value = serde_json::from_str(&tandem(dir.path(), &["identity", "rules", "--json"])).unwrap();
    assert_eq!(rules["blocked_identifiers"], json!([{"type": "user_id", "value": "ann"}]));
    tandem(dir.path(), &["identity", "unblock", "user_id:ann"]);
    let rules: Value = serde_json::from_str(&tandem(dir.path(), &["identity", "rules", "--json"])).unwrap();
    assert_eq!(rules["blocked_identifiers"], json!([]));
    assert!(!tandem_output(dir.path(), &["identity", "unblock", "user_id:ann"]).status.success());
    let table = tandem(dir.path(), &["identity", "rules"]);
    assert!(table.contains("limits") && table.contains("user_id=1"), "{table}");
}

/// An event whose only identifier is blocked belongs to no profile: it is
/// counted and listed with its reason, never dropped in silence.
#[test]
fn events_that_belong_to_no_profile_are_counted_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    with_events(
        dir.path(),
        json!([
            {"type": "track", "userId": "ann", "event": "Order Completed", "messageId": "e1"},
            {"type": "track", "userId": "null", "event": "Order Completed", "messageId": "e2"}
        ]),
    );
    let listed: Vec<Value> = tandem(dir.path(), &["events", "unresolved", "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["event"]["messageId"], "e2");
    assert_eq!(listed[0]["reason"], "no usable identifier: user_id:null (blocked value)");
    let stats: Value = serde_json::from_str(&tandem(dir.path(), &["stats", "--json"])).unwrap();
    assert_eq!(stats["unresolved"], 1);
    assert!(tandem(dir.path(), &["stats"]).contains("unresolved   1"));
}

#[test]
fn audiences_are_created_previewed_listed_shown_paged_and_deleted_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    with_events(
        dir.path(),
        json!([
            {"type": "identify", "userId": "ann", "traits": {"plan": "pro"}, "messageId": "i1"},
            {"type": "identify", "userId": "bob", "traits": {"plan": "pro"}, "messageId": "i2"},
            {"type": "identify", "userId": "cy", "traits": {"plan": "free"}, "messageId": "i3"},
            {"type": "track", "userId": "cy", "event": "Ticket Opened", "messageId": "t1"}
        ]),
    );
    let preview = tandem(dir.path(), &["audience", "preview", "--rule", r#"trait plan = "pro""#]);
    assert!(preview.starts_with("2 of 3 profiles match"), "{preview}");
    let bad = tandem_output(dir.path(), &["audience", "create", "pro", "--rule", r#"trait plan = "#]);
    assert!(!bad.status.success());
    let error = String::from_utf8_lossy(&bad.stderr);
    assert!(error.contains("column") && error.contains("expected"), "{error}");

    let created = tandem(dir.path(), &["audience", "create", "pro", "--rule", r#"trait plan = "pro""#]);
    assert!(created.contains("created audience \"pro\" with 2 members"), "{created}");
    tandem(dir.path(), &["audience", "create", "support", "--rule", r#"performed "Ticket Opened" within 30d"#]);
    let listed = tandem(dir.path(), &["audience", "list"]);
    assert!(listed.contains("pro") && listed.contains("support"), "{listed}");
    let shown: Value = serde_json::from_str(&tandem(dir.path(), &["audience", "show", "pro", "--json"])).unwrap();
    assert_eq!((shown["size"].as_u64(), shown["rule_text"].as_str()), (Some(2), Some(r#"trait plan = "pro""#)));
    let members: Value =
        serde_json::from_str(&tandem(dir.path(), &["audience", "members", "pro", "--json", "--limit", "1"])).unwrap();
    assert_eq!(
        (members["members"][0]["profile"].as_str(), members["next_after"].as_str()),
        (Some("prof_1"), Some("prof_1"))
    );
    let rest = tandem(dir.path(), &["audience", "members", "pro", "--after", "prof_1"]);
    assert!(rest.starts_with("prof_2"), "{rest}");
    let support = tandem(dir.path(), &["audience", "members", "support"]);
    assert!(support.starts_with("prof_3"), "{support}");

    tandem(dir.path(), &["audience", "delete", "pro"]);
    let gone = tandem_output(dir.path(), &["audience", "show", "pro"]);
    assert!(!gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("no audience named"));
}

#[test]
fn computed_traits_are_created_listed_shown_printed_on_profiles_and_deleted_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    with_events(
        dir.path(),
        json!([
            {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"total": 30}, "messageId": "o1"},
            {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"total": 12.5}, "messageId": "o2"},
            {"type": "identify", "userId": "bob", "traits": {"plan": "pro"}, "messageId": "i1"}
        ]),
    );
    let bad = tandem_output(dir.path(), &["computed", "create", "spent", "--definition", r#"sum(total) off "A""#]);
    assert!(!bad.status.success());
    let error = String::from_utf8_lossy(&bad.stderr);
    assert!(error.contains("column") && error.contains("expected"), "{error}");

    let created =
        tandem(dir.path(), &["computed", "create", "spent", "--definition", r#"sum(total) of "Order Completed""#]);
    assert!(created.contains(r#"created computed trait "spent" (backfilled)"#), "{created}");
    tandem(
        dir.path(),
        &["computed", "create", "orders", "--definition", r#"{"function": "count", "event": "Order Completed"}"#],
    );
    let listed = tandem(dir.path(), &["computed", "list"]);
    assert!(listed.contains("orders") && listed.contains("spent") && listed.contains("(backfilled)"), "{listed}");
    let shown: Value = serde_json::from_str(&tandem(dir.path(), &["computed", "show", "spent", "--json"])).unwrap();
    assert_eq!(shown["definition_text"], r#"sum(total) of "Order Completed""#);
    assert_eq!(shown["backfilled"], true);

    let profile = tandem(dir.path(), &["profile", "show", "user_id:ann"]);
    assert!(profile.contains("computed traits"), "{profile}");
    assert!(profile.lines().any(|line| line.split_whitespace().collect::<Vec<_>>() == ["spent", "42.5"]), "{profile}");
    let profile: Value =
        serde_json::from_str(&tandem(dir.path(), &["profile", "show", "user_id:ann", "--json"])).unwrap();
    assert_eq!(profile["computed_traits"], json!({"orders": 2, "spent": 42.5}));

    // An audience over a computed trait.
    let created = tandem(dir.path(), &["audience", "create", "big spenders", "--rule", "computed spent > 40"]);
    assert!(created.contains("with 1 members"), "{created}");

    let in_use = tandem_output(dir.path(), &["computed", "delete", "spent"]);
    assert!(!in_use.status.success() && String::from_utf8_lossy(&in_use.stderr).contains("used by audience"));
    tandem(dir.path(), &["computed", "delete", "orders"]);
    let gone = tandem_output(dir.path(), &["computed", "show", "orders"]);
    assert!(!gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("no computed trait named"));
}

/// The server's audience stage keeps computed traits current too: a trait
/// created over HTTP shows the value of an event that arrives afterwards on
/// the profile, with no command line reading in between.
#[test]
fn the_running_server_keeps_computed_traits_current_as_events_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let source = create_source(dir.path(), "website");
    let token: Value = serde_json::from_str(&tandem(dir.path(), &["token", "create", "--json"])).unwrap();
    let bearer = format!("Bearer {}", token["token"].as_str().unwrap());
    let server = Server::start(dir.path());
    let mut created = agent()
        .post(&format!("{}/api/v1/computed-traits", server.url))
        .header("Authorization", &bearer)
        .send(
            json!({"name": "spent", "definition": {"text": r#"sum(total) of "Order Completed" within 30d"#}})
                .to_string(),
        )
        .unwrap();
    assert_eq!(created.status().as_u16(), 201, "{}", created.body_mut().read_to_string().unwrap());
    let body = json!({"userId": "ann", "event": "Order Completed", "properties": {"total": 19.5}}).to_string();
    let (status, _) =
        post(&agent(), &format!("{}/v1/track", server.url), source["write_key"].as_str().unwrap(), &body).unwrap();
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut response = agent()
            .get(&format!("{}/api/v1/profiles/prof_1", server.url))
            .header("Authorization", &bearer)
            .call()
            .unwrap();
        let profile: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
        if profile["computed_traits"]["spent"] == json!(19.5) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the stage did not compute the value: {profile}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The server's own audience stage keeps memberships current: an audience
/// created over HTTP gains the customer whose event arrives afterwards,
/// with no command line reading in between.
#[test]
fn the_running_server_keeps_audiences_current_as_events_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let source = create_source(dir.path(), "website");
    let token: Value = serde_json::from_str(&tandem(dir.path(), &["token", "create", "--json"])).unwrap();
    let bearer = format!("Bearer {}", token["token"].as_str().unwrap());
    let server = Server::start(dir.path());
    let mut created = agent()
        .post(&format!("{}/api/v1/audiences", server.url))
        .header("Authorization", &bearer)
        .send(json!({"name": "buyers", "rule": {"text": r#"performed "Order Completed" within 7d"#}}).to_string())
        .unwrap();
    assert_eq!(created.status().as_u16(), 201, "{}", created.body_mut().read_to_string().unwrap());
    let body = json!({"userId": "ann", "event": "Order Completed"}).to_string();
    let (status, _) =
        post(&agent(), &format!("{}/v1/track", server.url), source["write_key"].as_str().unwrap(), &body).unwrap();
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut response = agent()
            .get(&format!("{}/api/v1/audiences/buyers/members", server.url))
            .header("Authorization", &bearer)
            .call()
            .unwrap();
        let members: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
        if members["members"].as_array().is_some_and(|members| !members.is_empty()) {
            assert_eq!(members["members"][0]["profile"], "prof_1");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the audience stage did not catch up: {members}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn pii_rules_set_from_the_command_line_are_audited_and_reach_a_running_server_and_imports() {
    let dir = tempfile::tempdir().unwrap();
    let source = create_source(dir.path(), "web");
    let server = Server::start(dir.path());
    let said = tandem(dir.path(), &["pii", "set", "--name", "Tax_ID", "--class", "red", "--policy", "refuse"]);
    assert!(said.contains("set pii rule name:tax_id: red, refuse red values"), "{said}");
    let refused = tandem_output(dir.path(), &["pii", "set", "--name", "x", "--class", "yellow", "--policy", "refuse"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("applies only to class red"));
    let refused = tandem_output(dir.path(), &["pii", "set", "--name", "x", "--pattern", "y", "--class", "red"]);
    assert!(!refused.status.success(), "a rule matches by a name or a pattern, not both");
    let listed: Value = serde_json::from_str(&tandem(dir.path(), &["pii", "list", "--json"])).unwrap();
    assert_eq!(listed["rules"][0]["name"], "tax_id");
    assert_eq!(
        (listed["rules"][0]["policy"].clone(), listed["rules"][0]["origin"].clone()),
        (json!("refuse"), json!("stored"))
    );
    assert!(tandem(dir.path(), &["pii", "list"]).contains("name     tax_id"), "a table by default");

    // The running server reads stored rules again within ten seconds.
    let key = source["write_key"].as_str().unwrap();
    let track = json!({"userId": "ann", "event": "Paid", "properties": {"tax_id": "DE-5544zq"}}).to_string();
    let started = std::time::Instant::now();
    let status = loop {
        let (status, body) = post(&agent(), &format!("{}/v1/track", server.url), key, &track).unwrap();
        if status != 200 || started.elapsed() > std::time::Duration::from_secs(15) {
            assert!(body.contains("red_value_refused"), "{status} {body}");
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    assert_eq!(status, 422);

    // `tandem import` applies the same rules.
    tandem(dir.path(), &["source", "create", "orders", "--kind", "import"]);
    let mapping = dir.path().join("orders.toml");
    std::fs::write(
        &mapping,
        "event = \"Paid\"\nrow_key = \"id\"\n[identifiers]\nuser_id = \"user\"\n[properties]\ntax_id = \"tax_id\"\n",
    )
    .unwrap();
    let file = dir.path().join("orders.csv");
    std::fs::write(&file, "id,user,tax_id\no1,u1,\no2,u2,DE-6655zq\n").unwrap();
    let imported = tandem(
        dir.path(),
        &["import", file.to_str().unwrap(), "--source", "orders", "--mapping", mapping.to_str().unwrap()],
    );
    assert!(imported.contains("1 imported, 0 duplicates, 1 rejected"), "{imported}");
    assert!(imported.contains("1 of the rejected rows were refused by governance"), "{imported}");
    drop(server);
    let quarantine = tandem(dir.path(), &["quarantine", "list", "--json"]);
    assert_eq!(quarantine.matches("red_value_refused").count(), 2, "{quarantine}");
    assert!(!quarantine.contains("DE-5544zq") && !quarantine.contains("DE-6655zq"), "{quarantine}");

    assert!(tandem(dir.path(), &["pii", "remove", "--name", "tax_id"]).contains("removed pii rule name:tax_id"));
    assert!(!tandem_output(dir.path(), &["pii", "remove", "--name", "tax_id"]).status.success());
    let entries: Vec<Value> = tandem(dir.path(), &["audit", "list", "--action", "pii", "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let actions: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|entry| {
            (entry["actor"].as_str().unwrap(), entry["action"].as_str().unwrap(), entry["target"].as_str().unwrap())
        })
        .collect();
    assert_eq!(actions, [("cli", "pii.rule_set", "name:tax_id"), ("cli", "pii.rule_remove", "name:tax_id")]);
}

#[test]
fn goals_are_created_listed_shown_and_deleted_from_the_command_line_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    with_events(
        dir.path(),
        json!([
            {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"revenue": 30}, "messageId": "o1"},
            {"type": "track", "userId": "bob", "event": "Order Completed", "properties": {"revenue": 12.5}, "messageId": "o2"},
            {"type": "track", "userId": "bob", "event": "Product Viewed", "messageId": "v1"}
        ]),
    );
    let goal = |name: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> =
            ["goal", "create", name, "--period", "year"].iter().map(|arg| arg.to_string()).collect();
        args.extend(extra.iter().map(|arg| arg.to_string()));
        if !extra.contains(&"--owner") {
            args.extend(["--owner".to_owned(), "marketing".to_owned()]);
        }
        args
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tandem_output(dir.path(), &args)
    };
    let bad = run(goal(
        "checkout",
        &[
            "--metric",
            "conversion",
            "--target",
            "10",
            "--from-event",
            "Product Viewed",
            "--to-event",
            "Order Completed",
            "--within",
            "3 weeks",
        ],
    ));
    assert!(!bad.status.success());
    let error = String::from_utf8_lossy(&bad.stderr);
    assert!(error.contains("--within: must be a duration such as 7d"), "{error}");
    let bad = run(goal("revenue", &["--metric", "profit", "--target", "10"]));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--metric: \"profit\" is not a metric"));

    let created = run(goal("Revenue", &["--metric", "revenue", "--target", "1000"]));
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let created = String::from_utf8_lossy(&created.stdout);
    assert!(created.contains("created goal \"Revenue\"") && created.contains("42.50 of 1,000"), "{created}");
    let created =
        run(goal("Shoppers", &["--metric", "active_customers", "--days", "7", "--target", "2", "--owner", "both"]));
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let duplicate = run(goal("Revenue", &["--metric", "new_customers", "--target", "1"]));
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("already exists"));

    let listed = tandem(dir.path(), &["goal", "list"]);
    assert!(listed.contains("Revenue") && listed.contains("Shoppers"), "{listed}");
    let listed: Value = serde_json::from_str(&tandem(dir.path(), &["goal", "list", "--json"])).unwrap();
    let values: Vec<_> =
        listed.as_array().unwrap().iter().map(|goal| (goal["name"].clone(), goal["value"].clone())).collect();
    assert_eq!(values, vec![(json!("Revenue"), json!(42.5)), (json!("Shoppers"), json!(2.0))]);
    assert_eq!(listed[1]["owner"], "both");
    let shown: Value = serde_json::from_str(&tandem(dir.path(), &["goal", "show", "Revenue", "--json"])).unwrap();
    assert_eq!(shown["trend"].as_array().unwrap().last().unwrap()["value"], json!(42.5));
    let text = tandem(dir.path(), &["goal", "show", "Revenue"]);
    assert!(text.contains("sum of revenue over \"Order Completed\" events") && text.contains("trend"), "{text}");

    tandem(dir.path(), &["goal", "delete", "Revenue"]);
    let gone = tandem_output(dir.path(), &["goal", "show", "Revenue"]);
    assert!(!gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("no goal named"));
    let audit = tandem(dir.path(), &["audit", "list", "--action", "goal", "--json"]);
    let actions: Vec<String> = audit
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .map(|entry| format!("{} {}", entry["action"].as_str().unwrap(), entry["target"].as_str().unwrap()))
        .collect();
    assert_eq!(actions.len(), 3, "{audit}");
    for expected in ["goal.create Revenue", "goal.create Shoppers", "goal.delete Revenue"] {
        assert!(actions.contains(&expected.to_owned()), "{expected} in {actions:?}");
    }
}

/// The server's insight stage counts for goals as events arrive, and the
/// latency of the tracking calls lands in the ingest latency goal.
#[test]
fn the_running_server_counts_for_goals_as_events_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let source = create_source(dir.path(), "website");
    let token: Value = serde_json::from_str(&tandem(dir.path(), &["token", "create", "--json"])).unwrap();
    let bearer = format!("Bearer {}", token["token"].as_str().unwrap());
    let server = Server::start(dir.path());
    for goal in [
        json!({"name": "Revenue", "owner": "marketing", "target": 100, "period": "year", "metric": {"kind": "revenue"}}),
        json!({"name": "Latency", "owner": "it", "target": 500, "period": "month", "metric": {"kind": "ingest_latency_p99"}}),
    ] {
        let mut created = agent()
            .post(&format!("{}/api/v1/goals", server.url))
            .header("Authorization", &bearer)
            .send(goal.to_string())
            .unwrap();
        assert_eq!(created.status().as_u16(), 201, "{}", created.body_mut().read_to_string().unwrap());
    }
    for total in [19.5, 20.0] {
        let body = json!({"userId": "ann", "event": "Order Completed", "properties": {"revenue": total}}).to_string();
        let (status, _) =
            post(&agent(), &format!("{}/v1/track", server.url), source["write_key"].as_str().unwrap(), &body).unwrap();
        assert_eq!(status, 200);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut response =
            agent().get(&format!("{}/api/v1/goals", server.url)).header("Authorization", &bearer).call().unwrap();
        let listed: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
        let goal =
            |name: &str| listed["goals"].as_array().unwrap().iter().find(|goal| goal["name"] == name).unwrap().clone();
        let (revenue, latency) = (goal("Revenue"), goal("Latency"));
        if revenue["value"] == json!(39.5) && latency["value"].as_f64().is_some() {
            assert_eq!(revenue["complete"], true);
            assert!(latency["value"].as_f64().unwrap() > 0.0, "{latency}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the stage did not count the events: {listed}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
