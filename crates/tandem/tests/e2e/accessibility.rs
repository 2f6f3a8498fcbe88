//! Every page of the web console checked in headless Chromium against a
//! real `tandem demo`: axe-core finds no serious or critical accessibility
//! violation, each page's HTML is under 100 KB, and nothing scrolls sideways
//! on a 390 px phone. The pages are found by crawling the console's own
//! links from its navigation (`tests/console/accessibility_in_chromium.mjs`),
//! so a page added later is checked without being named here; screenshots
//! of each page at both widths land in `target/accessibility-screenshots/`.

use crate::common::{console_script, repo_root, Demo};

#[test]
fn every_console_page_is_accessible_small_and_fits_a_phone() {
    let demo = Demo::start(&["--customers", "200"]);
    let (server, admin) = (&demo.server, demo.admin_token());

    let screenshots = repo_root().join("target/accessibility-screenshots");
    let _ = std::fs::remove_dir_all(&screenshots);
    let found = console_script("accessibility_in_chromium.mjs", &[&server.url, &admin], &screenshots);
    let pages = found["pages"].as_array().unwrap();
    let kinds: Vec<&str> = pages.iter().map(|page| page["kind"].as_str().unwrap()).collect();

    // The crawl reached every kind of page the console has today.
    for kind in [
        "console/sign-in",
        "console/customers",
        "console/customers?search",
        "console/customers/*",
        "console/audiences",
        "console/audiences/*",
        "error",
    ] {
        assert!(kinds.contains(&kind), "the crawl missed {kind}: {kinds:?}");
    }

    let mut failures = Vec::new();
    for page in pages {
        let url = page["url"].as_str().unwrap();
        let expected_status = if page["kind"] == "error" { 404 } else { 200 };
        if page["status"] != expected_status {
            failures.push(format!("{url}: status {}", page["status"]));
        }
        if !page["contentType"].as_str().unwrap().starts_with("text/html") {
            failures.push(format!("{url}: not HTML ({})", page["contentType"]));
        }
        let bytes = page["bytes"].as_u64().unwrap();
        if bytes >= 100_000 {
            failures.push(format!("{url}: {bytes} bytes, over 100 KB"));
        }
        let width = page["scrollWidth"].as_u64().unwrap();
        if width > 390 {
            failures.push(format!("{url}: {width} px wide on a 390 px phone"));
        }
        for violation in page["violations"].as_array().unwrap() {
            if matches!(violation["impact"].as_str(), Some("serious" | "critical")) {
                failures.push(format!(
                    "{url}: {} ({}): {} at {}",
                    violation["id"], violation["impact"], violation["help"], violation["targets"]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(found["scriptErrors"], serde_json::json!([]), "{found}");

    let shots = std::fs::read_dir(&screenshots).unwrap().count();
    assert_eq!(shots, 2 * pages.len(), "a screenshot per page at each width");
    assert!(demo.server.terminate(), "the demo stops cleanly");
}
