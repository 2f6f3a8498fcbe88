//! Delivery survives `kill -9`: a webhook receiver on a real socket gets
//! every acknowledged event at least once, and in the log's order once
//! repeats are set aside, although the server was killed mid-delivery and
//! restarted.

use crate::common::{agent, create_source, post, tandem, Server};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A slow HTTP/1.1 receiver (one request per connection) that answers 200
/// and keeps the `messageId`s of every batch it accepted, in arrival order.
fn start_receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let kept = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            // Slow enough that the kill lands while batches are in flight.
            std::thread::sleep(Duration::from_millis(30));
            let events: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
            let answered = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if answered.is_ok() {
                let ids = events.iter().map(|event| event["messageId"].as_str().unwrap().to_owned());
                kept.lock().unwrap().extend(ids);
            }
        }
    });
    (url, received)
}

#[test]
fn every_acknowledged_event_is_delivered_in_order_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let source = create_source(dir.path(), "backend");
    let write_key = source["write_key"].as_str().unwrap().to_owned();
    let (url, received) = start_receiver();
    let definition = serde_json::json!({
        "name": "hook",
        "destination": {"kind": "webhook", "url": url},
        "events": {"types": ["track"]},
    });
    tandem(dir.path(), &["destination", "create", &definition.to_string()]);

    let server = Server::start(dir.path());
    let agent = agent();
    let mut sent = Vec::new();
    for batch in 0..40 {
        let ids: Vec<String> = (0..50).map(|n| format!("e-{batch:03}-{n:02}")).collect();
        let events: Vec<_> = ids
            .iter()
            .map(|id| serde_json::json!({"type": "track", "userId": "ann", "event": "Load", "messageId": id}))
            .collect();
        let body = serde_json::json!({ "batch": events }).to_string();
        let (status, text) = post(&agent, &format!("{}/v1/batch", server.url), &write_key, &body).unwrap();
        assert_eq!(status, 200, "{text}");
        sent.extend(ids);
    }
    let started = Instant::now();
    while received.lock().unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(30), "nothing was delivered");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.kill_hard();
    let before_restart = received.lock().unwrap().len();
    assert!(before_restart < sent.len(), "the kill landed before delivery finished ({before_restart} delivered)");

    let server = Server::start(dir.path());
    let started = Instant::now();
    loop {
        let mut first_seen = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for id in received.lock().unwrap().iter() {
            if seen.insert(id.clone()) {
                first_seen.push(id.clone());
            }
        }
        if first_seen.len() == sent.len() {
            assert_eq!(first_seen, sent, "delivered in the log's order, repeats aside");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of {} events delivered after the restart",
            first_seen.len(),
            sent.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let listed = tandem(dir.path(), &["destination", "list"]);
    assert!(listed.contains("hook"), "{listed}");

    // The backlog gauge comes down to zero once everything is sent.
    let started = Instant::now();
    loop {
        let metrics = agent.get(format!("{}/metrics", server.url)).call().unwrap().body_mut().read_to_string().unwrap();
        if metrics.contains(r#"tandem_destination_lag_items{destination="hook"} 0"#) {
            assert!(metrics.contains(r#"tandem_destination_items_total{destination="hook",outcome="delivered"}"#));
            assert!(metrics.contains(r#"tandem_destination_lag_seconds{destination="hook"} 0"#), "{metrics}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tandem(dir.path(), &["deliveries", "failed"]).trim(), "no failed deliveries");
    let tested = tandem(dir.path(), &["destination", "test", "hook"]);
    assert_eq!(tested.trim(), r#"test sent to "hook": the receiver answered 200"#);
    assert!(received.lock().unwrap().last().is_some_and(|id| id.starts_with("test-")), "the sample arrived");
}
