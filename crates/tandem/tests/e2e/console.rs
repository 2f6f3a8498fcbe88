//! The web console in headless Chromium against a real `tandem demo`: an
//! admin signs in to the goals page and reads every goal (the values the
//! API gives), finds a customer by e-mail, opens the 360° view, builds
//! and saves an audience from the text syntax and sees its size; a
//! marketer sees the members' and dead letters' e-mails masked and cannot
//! reach the governance pages; an admin opens a failing destination's dead
//! letters on the stack page and replays one, which leaves the list and
//! reaches the receiver once it listens. The browser script is
//! `tests/console/console_in_chromium.mjs` (`scripts/test` installs its
//! packages and Chromium); its screenshots land in
//! `target/console-screenshots/`.

use crate::common::{agent, create_source, post, repo_root, tandem, word_after, Demo, Server};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// The destination the browser replays from, and how many dead letters it has.
const FAILING_DESTINATION: &str = "console-hook";
const DEAD_LETTERS: usize = 3;

/// A webhook destination pointed at a loopback port nothing listens on yet
/// (the browser script listens there before it replays), with retries that
/// give up at once, fed events with e-mails until they are dead letters:
/// the port.
fn failing_destination(data: &std::path::Path, server: &Server) -> u16 {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let definition = json!({
        "name": FAILING_DESTINATION,
        "destination": {"kind": "webhook", "url": format!("http://127.0.0.1:{port}/hook")},
        "events": {"names": ["Console Replay"]},
        "retry": {"initial_backoff_ms": 1, "max_backoff_ms": 1, "give_up_after_ms": 1},
    });
    tandem(data, &["destination", "create", &definition.to_string()]);
    let source = create_source(data, "console-replay");
    let write_key = source["write_key"].as_str().unwrap();
    let agent = agent();
    for n in 0..DEAD_LETTERS {
        let event = json!({"userId": format!("replay-{n}"), "event": "Console Replay", "messageId": format!("console-replay-{n}"),
                           "context": {"traits": {"email": format!("replay.{n}@example.com")}}});
        let (status, body) = post(&agent, &format!("{}/v1/track", server.url), write_key, &event.to_string()).unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let failed = tandem(data, &["deliveries", "failed", "--destination", FAILING_DESTINATION, "--json"]);
        let dead = serde_json::from_str::<Value>(&failed).unwrap().as_array().map_or(0, Vec::len);
        if dead == DEAD_LETTERS {
            return port;
        }
        assert!(Instant::now() < deadline, "no dead letters after 30 s:\n{failed}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_console_signs_in_finds_a_customer_builds_an_audience_and_masks_for_a_marketer() {
    // Without live traffic, so the saved audience's size is the previewed one.
    let demo = Demo::start(&["--customers", "200", "--no-live-traffic"]);
    let (data, server, text) = (&demo.data, &demo.server, &demo.walkthrough);
    let admin = demo.admin_token();
    let email = word_after(text, "profile show email:").to_owned();
    assert!(text.contains(&format!("The console: {}/", server.url)), "{text}");
    let marketer: Value = serde_json::from_str(&tandem(
        data,
        &["token", "create", "--name", "campaigns", "--role", "marketer", "--json"],
    ))
    .unwrap();
    let marketer = marketer["token"].as_str().unwrap();
    let receiver_port = failing_destination(data, server);

    // The goals as the API gives them before the browser reads the page
    // and after: ingest latency is flushed into its histogram every 5 s, so
    // the demo's last calls may count between the two readings.
    let goals_from_api = || -> Vec<Value> {
        let mut answer = crate::common::agent()
            .get(&format!("{}/api/v1/goals", server.url))
            .header("Authorization", &format!("Bearer {admin}"))
            .call()
            .unwrap();
        let api: Value = serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
        api["goals"].as_array().unwrap().clone()
    };
    let goals_before = goals_from_api();

    let screenshots = repo_root().join("target/console-screenshots");
    let script = repo_root().join("tests/console/console_in_chromium.mjs");
    let run = Command::new("node")
        .arg(&script)
        .args([server.url.as_str(), &admin, marketer, &email])
        .arg(&screenshots)
        .env("DEAD_LETTER_DESTINATION", FAILING_DESTINATION)
        .env("RECEIVER_PORT", receiver_port.to_string())
        .current_dir(script.parent().unwrap())
        .output()
        .unwrap_or_else(|error| panic!("cannot run node: {error}; run scripts/test to install the browser test"));
    assert!(
        run.status.success(),
        "the console's browser test failed (run scripts/test to install its packages and Chromium):\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let seen: Value = serde_json::from_slice(&run.stdout).unwrap();

    // The landing page: the demo's goals, each with the value the API
    // gives, its status, a trend chart and its progress; off-track ones
    // stand out.
    let goals_after = goals_from_api();
    let shown = seen["goals"].as_array().unwrap();
    assert!(shown.len() >= 10 && shown.len() == goals_after.len(), "{seen}");
    let same = |page: &Value, api: &Value| {
        page["status"] == api["status"]
            && match (page["value"].as_f64(), api["value"].as_f64()) {
                (Some(page), Some(api)) => (page - api).abs() < 1e-3,
                (None, None) => true,
                _ => false,
            }
    };
    for goal in shown {
        let name = goal["name"].as_str().unwrap();
        let api = |goals: &[Value]| goals.iter().find(|known| known["name"] == name).cloned().unwrap_or_default();
        let (before, after) = (api(&goals_before), api(&goals_after));
        assert!(
            same(goal, &before) || same(goal, &after),
            "{name}: {goal} on the page; from the API {before} before and {after} after"
        );
        let bad = matches!(goal["status"].as_str(), Some("off_track" | "missed"));
        assert_eq!(goal["standsOut"].as_bool(), Some(bad), "{name}: {goal}");
        assert!(goal["chartTitle"].as_str().unwrap().starts_with(name), "{goal}");
        assert!(goal["progress"].as_u64().unwrap() <= 100, "{goal}");
    }
    let status_of = |name: &str| shown.iter().find(|goal| goal["name"] == name).unwrap()["status"].clone();
    assert_eq!(status_of("Revenue"), "on_track", "{seen}");
    assert_eq!(status_of("New customers"), "off_track", "{seen}");
    let revenue = shown.iter().find(|goal| goal["name"] == "Revenue").unwrap();
    assert!(revenue["value"].as_f64().unwrap() > 0.0 && revenue["chartPoints"].as_u64().unwrap() > 80, "{revenue}");
    assert!(seen["goalsSummary"].as_str().unwrap().contains("need attention"), "{seen}");
    assert_eq!(seen["goalsPhoneOverflow"], 0, "no sideways scrolling at 390 px: {seen}");

    // The 360° view of the customer found by e-mail.
    let customer = &seen["customer"];
    assert!(customer["url"].as_str().unwrap().starts_with("/console/customers/prof_"), "{seen}");
    let identities = customer["identities"].to_string();
    for kind in ["email:", "user_id:", "crm_id:"] {
        assert!(identities.contains(kind), "{kind} missing from {identities}");
    }
    assert!(customer["timelineRows"].as_u64().unwrap() > 0, "{seen}");
    assert!(customer["audiences"].as_u64().unwrap() > 0, "the demo's showcase customer is in an audience: {seen}");
    assert_eq!(seen["phoneOverflow"], 0, "no sideways scrolling at 390 px: {seen}");

    // The builder: the parse error in place, then the size, saved.
    assert!(seen["parseError"].as_str().unwrap().starts_with("line 1, column "), "{seen}");
    let previewed = seen["previewSize"].as_u64().unwrap();
    assert!(previewed > 0, "{seen}");
    assert_eq!(seen["savedSize"].as_u64(), Some(previewed), "the saved audience has the previewed size: {seen}");
    let members = seen["adminMembers"].to_string();
    assert!(members.contains("email:") && !members.contains("***"), "admin sees e-mails in clear: {members}");

    // The marketer: members masked, no customers page.
    let masked = seen["marketerMembers"].to_string();
    assert!(masked.contains("***@"), "masked e-mails for a marketer: {masked}");
    assert!(!seen["marketerMembers"].as_array().unwrap().is_empty());
    for row in seen["adminMembers"].as_array().unwrap() {
        let clear = row.as_str().unwrap().split_whitespace().find(|word| word.starts_with("email:")).unwrap();
        assert!(!masked.contains(clear), "{clear} shown in clear to a marketer");
    }
    assert!(!seen["marketerNav"].as_str().unwrap().contains("Customers"), "{seen}");
    assert_eq!(seen["marketerCustomersStatus"], 403, "{seen}");
    assert!(seen["marketerCustomersText"].as_str().unwrap().contains("profiles:lookup"), "{seen}");
    assert_eq!(seen["scriptErrors"], serde_json::json!([]), "{seen}");

    // The marketer cannot reach governance and sees dead letters' e-mails masked.
    let governance = &seen["marketerGovernance"];
    assert_eq!(governance["status"], 403, "{seen}");
    assert!(governance["text"].as_str().unwrap().contains("audit:read"), "{seen}");
    assert_eq!(governance["auditStatus"], 403, "{seen}");
    assert!(!seen["marketerNav"].as_str().unwrap().contains("Governance"), "{seen}");
    let masked_letters = seen["marketerDeadLetters"].to_string();
    assert!(masked_letters.contains("r***@example.com") && !masked_letters.contains("replay.0@"), "{seen}");

    // The admin replays one dead letter: it leaves the list and reaches the receiver.
    let stack = &seen["stack"];
    assert!(stack["adminLetters"].to_string().contains("replay.0@example.com"), "admin sees e-mails in clear: {seen}");
    let before: Vec<u64> = serde_json::from_value(stack["before"].clone()).unwrap();
    let after: Vec<u64> = serde_json::from_value(stack["after"].clone()).unwrap();
    let replayed = stack["replayed"].as_u64().unwrap();
    assert_eq!(before.len(), DEAD_LETTERS, "{seen}");
    assert!(before.contains(&replayed) && !after.contains(&replayed), "{seen}");
    assert_eq!(after.len(), DEAD_LETTERS - 1, "only the one replayed left the list: {seen}");
    assert!(stack["notice"].as_str().unwrap().contains("1 dead letter put back"), "{seen}");
    let received = stack["received"].to_string();
    assert!(received.contains("console-replay-"), "the receiver got the replayed event: {seen}");
    assert!(stack["auditText"].as_str().unwrap().contains("destination.replay"), "{seen}");
    for (page, overflow) in stack["phoneOverflow"].as_object().unwrap() {
        assert_eq!(overflow, 0, "no sideways scrolling of the {page} page at 390 px: {seen}");
    }

    // Every page well under 100 KB; a screenshot per step.
    for (path, size) in seen["pages"].as_object().unwrap() {
        assert!(size.as_u64().unwrap() < 100_000, "{path} is {size} bytes");
    }
    let shots = std::fs::read_dir(&screenshots).unwrap().count();
    assert!(shots >= seen["steps"].as_array().unwrap().len(), "{shots} screenshots");
    assert!(demo.server.terminate(), "the demo stops cleanly");
}
