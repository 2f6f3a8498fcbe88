//! Durability: every event acknowledged with a 200 survives `kill -9` and is
//! still there after SIGTERM, with load running at the moment of the signal.

use crate::common::{agent, create_source, events, post, Server};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Sends batches from several threads until told to stop or the server is
/// gone; returns every messageId the server acknowledged.
pub(crate) fn load_until_stopped(
    url: &str,
    write_key: &str,
    stop: Arc<AtomicBool>,
    run: &str,
) -> std::thread::JoinHandle<HashSet<String>> {
    let url = format!("{url}/v1/batch");
    let write_key = write_key.to_owned();
    let run = run.to_owned();
    std::thread::spawn(move || {
        let acknowledged = Arc::new(Mutex::new(HashSet::new()));
        std::thread::scope(|scope| {
            for worker in 0..4 {
                let (url, write_key, stop, run, acknowledged) = (&url, &write_key, &stop, &run, &acknowledged);
                scope.spawn(move || {
                    let agent = agent();
                    for round in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let ids: Vec<String> = (0..50).map(|n| format!("{run}-w{worker}-r{round}-{n}")).collect();
                        let batch: Vec<_> = ids
                            .iter()
                            .map(|id| serde_json::json!({"type": "track", "userId": format!("user-{worker}"), "event": "Load", "messageId": id}))
                            .collect();
                        let body = serde_json::json!({ "batch": batch }).to_string();
                        match post(&agent, url, write_key, &body) {
                            Ok((200, _)) => acknowledged.lock().unwrap().extend(ids),
                            Ok((status, text)) => panic!("unexpected {status}: {text}"),
                            Err(_) => break, // the server is gone
                        }
                    }
                });
            }
        });
        Arc::try_unwrap(acknowledged).unwrap().into_inner().unwrap()
    })
}

#[test]
fn every_acknowledged_event_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let source = create_source(dir.path(), "backend");
    let write_key = source["write_key"].as_str().unwrap();
    let mut acknowledged = HashSet::new();
    for run in ["first", "second"] {
        let server = Server::start(dir.path());
        let stop = Arc::new(AtomicBool::new(false));
        let load = load_until_stopped(&server.url, write_key, stop.clone(), run);
        std::thread::sleep(Duration::from_millis(1_500));
        server.kill_hard();
        stop.store(true, Ordering::Relaxed);
        let acknowledged_in_run = load.join().unwrap();
        assert!(acknowledged_in_run.len() >= 200, "the load ran ({} acknowledged)", acknowledged_in_run.len());
        acknowledged.extend(acknowledged_in_run);
    }
    // Reopening runs SQLite's WAL recovery, as a restarted server would.
    let stored: HashSet<String> =
        events(dir.path()).iter().map(|event| event["messageId"].as_str().unwrap().to_owned()).collect();
    let lost: Vec<_> = acknowledged.difference(&stored).take(5).collect();
    assert!(lost.is_empty(), "{} acknowledged events lost, e.g. {lost:?}", acknowledged.difference(&stored).count());
    // A restarted server serves and stores again.
    let server = Server::start(dir.path());
    let (status, _) =
        post(&agent(), &format!("{}/v1/track", server.url), write_key, r#"{"userId":"u","event":"after"}"#).unwrap();
    assert_eq!(status, 200);
}

#[test]
fn sigterm_drains_requests_in_flight_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let source = create_source(dir.path(), "backend");
    let server = Server::start(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_until_stopped(&server.url, source["write_key"].as_str().unwrap(), stop.clone(), "term");
    std::thread::sleep(Duration::from_millis(800));
    assert!(server.terminate(), "tandem serve exits with success after SIGTERM");
    stop.store(true, Ordering::Relaxed);
    let acknowledged = load.join().unwrap();
    let stored: HashSet<String> =
        events(dir.path()).iter().map(|event| event["messageId"].as_str().unwrap().to_owned()).collect();
    assert!(!acknowledged.is_empty());
    assert!(acknowledged.is_subset(&stored), "every acknowledged event is stored");
}
