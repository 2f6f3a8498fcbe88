//! `tandem import` as people run it: beside a running server, on the shipped
//! example exports, with a reject file beside a bad input and a clear failure
//! for a malformed one.

use crate::common::{repo_root, tandem, tandem_output, Server};
use serde_json::Value;

fn import_json(data: &std::path::Path, file: &std::path::Path, source: &str, mapping: &str) -> Value {
    let mapping = repo_root().join("examples/mappings").join(mapping);
    let output = tandem(
        data,
        &["import", file.to_str().unwrap(), "--source", source, "--mapping", mapping.to_str().unwrap(), "--json"],
    );
    serde_json::from_str(&output).unwrap()
}

#[test]
fn example_exports_import_beside_a_running_server_and_join_one_customer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for source in ["orders", "product", "helpdesk", "crm", "leads"] {
        tandem(&data, &["source", "create", source, "--kind", "import"]);
    }
    let _server = Server::start(&data);
    let examples = repo_root().join("examples/data");
    for (source, file, mapping) in [
        ("orders", "orders.csv", "orders.toml"),
        ("product", "product_usage.jsonl", "product_usage.toml"),
        ("helpdesk", "support_tickets.csv", "support_tickets.toml"),
        ("crm", "crm_contacts.csv", "crm_contacts.toml"),
        ("leads", "leads.csv", "leads.toml"),
    ] {
        let summary = import_json(&data, &examples.join(file), source, mapping);
        let counts = &summary["counts"];
        assert_eq!(counts["rejected"], 0, "{source}: {summary}");
        assert_eq!(counts["imported"], counts["rows_read"], "{source}: {summary}");
        let again = import_json(&data, &examples.join(file), source, mapping);
        assert_eq!(
            (again["counts"]["imported"].as_u64(), &again["counts"]["duplicates"]),
            (Some(0), &counts["rows_read"])
        );
    }
    let ann: Value =
        serde_json::from_str(&tandem(&data, &["profile", "show", "email:ann.lee@example.com", "--json"])).unwrap();
    let identifiers = ann["identifiers"].to_string();
    for expected in ["u-ann", "c-9001", "zd-77", "mac-ann-01", "ann_lee"] {
        assert!(identifiers.contains(expected), "{expected} missing: {identifiers}");
    }
    assert_eq!(ann["event_counts"]["track"], 6, "{ann}");
}

#[test]
fn bad_rows_go_to_a_reject_file_and_malformed_files_fail_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    tandem(&data, &["source", "create", "orders", "--kind", "import"]);
    let input = dir.path().join("orders.csv");
    std::fs::write(
        &input,
        "order_id,customer_id,email,ordered_at,total,currency,items,coupon\n\
         o-1,u-1,a@example.com,2026-09-01T10:00:00Z,10.50,EUR,1,\n\
         o-2,u-2,b@example.com,31.09.2026,12,EUR,1,\n\
         o-3,u-3,c@example.com,2026-09-03T10:00:00Z,lots,EUR,1,\n",
    )
    .unwrap();
    let mapping = repo_root().join("examples/mappings/orders.toml");
    let text = tandem(
        &data,
        &["import", input.to_str().unwrap(), "--source", "orders", "--mapping", mapping.to_str().unwrap()],
    );
    assert!(text.contains("read 3 rows") && text.contains("1 imported") && text.contains("2 rejected"), "{text}");
    assert!(text.contains("line 3 [ordered_at]") && text.contains("line 4 [total]"), "{text}");
    let rejects = std::fs::read_to_string(dir.path().join("orders.csv.rejects.csv")).unwrap();
    assert_eq!(rejects.lines().count(), 3, "{rejects}");
    assert!(rejects.lines().nth(2).unwrap().starts_with("4,total,"), "{rejects}");

    std::fs::write(&input, "order_id,customer_id,email,ordered_at,total,currency,items,coupon\no-9,\"u-9,x@example.com,2026-09-01,1,EUR,1,\n").unwrap();
    let failed = tandem_output(
        &data,
        &["import", input.to_str().unwrap(), "--source", "orders", "--mapping", mapping.to_str().unwrap()],
    );
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");

    let missing_source = tandem_output(
        &data,
        &["import", input.to_str().unwrap(), "--source", "nope", "--mapping", mapping.to_str().unwrap()],
    );
    assert!(String::from_utf8_lossy(&missing_source.stderr).contains("tandem source create nope --kind import"));
}
