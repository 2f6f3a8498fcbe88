//! The web console in headless Chromium against a real `tandem demo`: an
//! admin signs in, finds a customer by e-mail, opens the 360° view, builds
//! and saves an audience from the text syntax and sees its size; a
//! marketer sees the members' e-mails masked. The browser script is
//! `tests/console/console_in_chromium.mjs` (`scripts/test` installs its
//! packages and Chromium); its screenshots land in
//! `target/console-screenshots/`.

use crate::common::{console_script, repo_root, tandem, word_after, Demo};
use serde_json::Value;

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

    let screenshots = repo_root().join("target/console-screenshots");
    let seen = console_script("console_in_chromium.mjs", &[&server.url, &admin, marketer, &email], &screenshots);

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

    // Every page well under 100 KB; a screenshot per step.
    for (path, size) in seen["pages"].as_object().unwrap() {
        assert!(size.as_u64().unwrap() < 100_000, "{path} is {size} bytes");
    }
    let shots = std::fs::read_dir(&screenshots).unwrap().count();
    assert!(shots >= seen["steps"].as_array().unwrap().len(), "{shots} screenshots");
    assert!(demo.server.terminate(), "the demo stops cleanly");
}
