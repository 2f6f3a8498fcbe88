//! Scale-out ingest through NATS JetStream with the real binary: `tandem
//! serve --store postgres://… --log nats://…` killed with `kill -9` while
//! load runs, restarted, and every event it answered 200 for is in the log
//! once. Needs the PostgreSQL test server and nats-server (started here).

use crate::common::{repo_root, tandem, tandem_output, Server};
use crate::crash::load_until_stopped;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_server::stream::testing::NatsServer;
use tandem_store::postgres::testing::TestDatabase;

fn serve(data: &Path, store: &str, log: &str) -> Server {
    Server::run(data, &["serve", "--store", store, "--log", log], Stdio::null())
}

#[test]
fn every_event_acknowledged_through_the_stream_survives_kill_9_once() {
    let Some((database, _)) = TestDatabase::create() else { return };
    let store = database.url().expect("TANDEM_TEST_POSTGRES is a postgres:// URL");
    let nats = NatsServer::start();
    let log = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let source: Value =
        serde_json::from_str(&tandem(dir.path(), &["--store", &store, "source", "create", "backend", "--json"]))
            .unwrap();
    let write_key = source["write_key"].as_str().unwrap();

    let mut acknowledged = HashSet::new();
    for run in ["first", "second"] {
        let server = serve(dir.path(), &store, &log);
        let stop = Arc::new(AtomicBool::new(false));
        let load = load_until_stopped(&server.url, write_key, stop.clone(), run);
        std::thread::sleep(Duration::from_millis(1_500));
        server.kill_hard();
        stop.store(true, Ordering::Relaxed);
        let acknowledged_in_run = load.join().unwrap();
        assert!(acknowledged_in_run.len() >= 200, "the load ran ({} acknowledged)", acknowledged_in_run.len());
        acknowledged.extend(acknowledged_in_run);
    }

    // Restarted, the node takes the drain lease again and drains what the
    // stream acknowledged and the killed drain had not appended.
    let server = serve(dir.path(), &store, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status: Value = serde_json::from_str(&tandem(
            dir.path(),
            &["--store", &store, "--log", &log, "cluster", "status", "--json"],
        ))
        .unwrap();
        if status["stages"][0]["lag"] == 0 && status["stages"][0]["position"].as_u64() > Some(0) {
            break status;
        }
        assert!(Instant::now() < deadline, "the drain did not catch up: {status}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["stages"][0]["stage"], "drain", "{status}");
    assert_eq!(status["stages"][0]["lease"], "held", "{status}");

    let listed = tandem(dir.path(), &["--store", &store, "events", "list", "--json", "--limit", "100000000"]);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in listed.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        *counts.entry(event["messageId"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let lost: Vec<_> = acknowledged.iter().filter(|id| !counts.contains_key(*id)).take(5).collect();
    assert!(lost.is_empty(), "acknowledged events lost, e.g. {lost:?}");
    let twice: Vec<_> = counts.iter().filter(|(_, count)| **count > 1).take(5).collect();
    assert!(twice.is_empty(), "events in the log more than once, e.g. {twice:?}");

    // `tandem import` with --log publishes to the stream as well; the drain
    // appends the rows, and a second import of the file adds nothing.
    tandem(dir.path(), &["--store", &store, "source", "create", "orders", "--kind", "import"]);
    let before = events_in_log(dir.path(), &store);
    let file = repo_root().join("examples/data/orders.csv");
    let mapping = repo_root().join("examples/mappings/orders.toml");
    let import = |when: &str| -> Value {
        let output = tandem(
            dir.path(),
            &[
                "--store",
                &store,
                "--log",
                &log,
                "import",
                file.to_str().unwrap(),
                "--source",
                "orders",
                "--mapping",
                mapping.to_str().unwrap(),
                "--json",
            ],
        );
        serde_json::from_str(&output).unwrap_or_else(|error| panic!("{when} import: {error}: {output}"))
    };
    let first = import("first");
    let rows = first["counts"]["rows_read"].as_u64().unwrap();
    assert!(rows > 0 && first["counts"]["imported"].as_u64() == Some(rows), "{first}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while events_in_log(dir.path(), &store) < before + rows {
        assert!(Instant::now() < deadline, "the imported rows did not reach the log");
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = import("second");
    assert_eq!(again["counts"]["duplicates"].as_u64(), Some(rows), "JetStream's window drops the repeat: {again}");
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(events_in_log(dir.path(), &store), before + rows);
    drop(server);
    drop(database);
}

fn events_in_log(data: &Path, store: &str) -> u64 {
    let stats: Value = serde_json::from_str(&tandem(data, &["--store", store, "stats", "--json"])).unwrap();
    stats["events"].as_u64().unwrap()
}

#[test]
fn the_event_stream_needs_a_postgres_store_and_nats_urls() {
    let dir = tempfile::tempdir().unwrap();
    let alone = tandem_output(dir.path(), &["--log", "nats://127.0.0.1:4222", "source", "list"]);
    let stderr = String::from_utf8_lossy(&alone.stderr);
    assert!(!alone.status.success() && stderr.contains("needs a postgresql store"), "{stderr}");
    let wrong = tandem_output(
        dir.path(),
        &["--store", "postgres://u@127.0.0.1:1/x", "--log", "kafka://b:9092", "source", "list"],
    );
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success() && stderr.contains("nats://host:port"), "{stderr}");
    assert!(!tandem_store::SqliteStore::exists(dir.path()), "nothing fell back to the embedded store");
}

#[test]
fn a_node_that_cannot_reach_nats_does_not_start() {
    let Some((database, _)) = TestDatabase::create() else { return };
    let store = database.url().expect("TANDEM_TEST_POSTGRES is a postgres:// URL");
    let dir = tempfile::tempdir().unwrap();
    let output = tandem_output(
        dir.path(),
        &["--store", &store, "--log", "nats://127.0.0.1:1", "serve", "--listen", "127.0.0.1:0"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("cannot connect to nats at nats://127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    drop(database);
}
