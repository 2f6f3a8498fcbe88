//! The admin API against its own OpenAPI document: schemathesis (from
//! `tests/sdk/python/requirements.txt`, on `PATH` as `scripts/test` sets it
//! up) generates requests for every documented operation and checks that a
//! live server answers none with a 5xx and every answer matches the schema.

use crate::common::{agent, tandem, Server};
use serde_json::Value;
use std::process::Command;

#[test]
fn schemathesis_finds_no_server_error_or_schema_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let token: Value = serde_json::from_str(&tandem(dir.path(), &["token", "create", "--json"])).unwrap();
    let bearer = format!("Bearer {}", token["token"].as_str().unwrap());
    let server = Server::start(dir.path());
    let mut response =
        agent().get(&format!("{}/api/v1/openapi.json", server.url)).header("Authorization", &bearer).call().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let document: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["paths"]["/api/v1/audiences"]["post"]["x-permission"] == "audiences:write");
    let schema = dir.path().join("openapi.json");
    std::fs::write(&schema, document.to_string()).unwrap();

    // Run in the temporary directory: schemathesis keeps a cache where it runs.
    let output = Command::new("schemathesis")
        .current_dir(dir.path())
        .arg("run")
        .arg(&schema)
        .args(["--url", &server.url])
        .args(["--header", &format!("Authorization: {bearer}")])
        .args(["--checks", "not_a_server_error,response_schema_conformance,content_type_conformance"])
        .args(["--max-examples", "5", "--workers", "1", "--generation-deterministic"])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .unwrap_or_else(|error| {
            panic!("schemathesis is not on PATH ({error}); scripts/test installs it into target/sdk-venv")
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
