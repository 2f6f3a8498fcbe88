//! Failures under load in scale-out: three `tandem serve` nodes on one
//! PostgreSQL database and a three-server NATS JetStream cluster lose, in
//! turn, a node, the node running the resolver and a NATS server (each with
//! `kill -9`, each started again), and afterwards every event answered 200
//! is in the log once and counted once in its profile; and a node whose
//! PostgreSQL stops and starts again refuses events with 503 while it is
//! gone and takes them again by itself once it is back. Needs the
//! PostgreSQL test server, PostgreSQL's programs (a private cluster) and
//! nats-server.

use crate::common::{agent, eventually, post, tandem, Server};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tandem_server::stream::testing::{NatsCluster, NatsServer};
use tandem_server::stream::DEFAULT_STREAM_NAME;
use tandem_store::postgres::testing::{PrivateCluster, TestDatabase};

/// Users the load's events belong to, so each profile has many events.
const USERS: usize = 6;
/// Events per batch the load sends.
const BATCH: usize = 20;
/// How long the load retries one batch before the test fails: longer than
/// any failover below should take.
const RETRY_FOR: Duration = Duration::from_secs(45);

/// What one request of the load got back.
struct Answer {
    sent: Instant,
    answered: Instant,
    /// 0 when no HTTP answer came (the connection failed).
    status: u16,
    body: String,
}

/// What the load saw: the messageIds answered 200 by user, and every answer.
#[derive(Default)]
struct LoadReport {
    acknowledged: HashMap<String, HashSet<String>>,
    answers: Vec<Answer>,
}

impl LoadReport {
    fn acknowledged_ids(&self) -> HashSet<&str> {
        self.acknowledged.values().flatten().map(String::as_str).collect()
    }
}

/// Load sent through a set of nodes that may change while it runs.
struct Load {
    nodes: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadReport>>,
}

impl Load {
    /// Starts `workers` threads, each sending batches of [`BATCH`] track
    /// events spread over [`USERS`] users, in turn to each node of `nodes`,
    /// pausing `pace` after each batch answered 200.
    /// A batch not answered 200 (the node is gone, or answered 503) is sent
    /// again, with the same messageIds, to the next node until one answers
    /// 200, as an SDK retries; any other answer fails the test.
    fn start(write_key: &str, nodes: Vec<String>, workers: usize, pace: Duration, run: &str) -> Load {
        let nodes = Arc::new(Mutex::new(nodes));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..workers)
            .map(|worker| {
                let (nodes, stop, write_key) = (nodes.clone(), stop.clone(), write_key.to_owned());
                let run = run.to_owned();
                std::thread::spawn(move || {
                    send_until_stopped(&nodes, &stop, &write_key, pace, &format!("{run}-w{worker}"))
                })
            })
            .collect();
        Load { nodes, stop, threads }
    }

    /// Sends to `url` instead of node `index`'s old address (a restarted node).
    fn replace_node(&self, index: usize, url: &str) {
        self.nodes.lock().unwrap()[index] = url.to_owned();
    }

    /// Stops the load once every batch in flight is answered 200.
    fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = LoadReport::default();
        for thread in self.threads {
            let part = thread.join().expect("a load thread failed");
            for (user, ids) in part.acknowledged {
                report.acknowledged.entry(user).or_default().extend(ids);
            }
            report.answers.extend(part.answers);
        }
        report
    }
}

fn send_until_stopped(
    nodes: &Mutex<Vec<String>>,
    stop: &AtomicBool,
    write_key: &str,
    pace: Duration,
    prefix: &str,
) -> LoadReport {
    let agent = agent();
    let mut report = LoadReport::default();
    let mut turn = 0;
    for round in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let events: Vec<(String, String)> = (0..BATCH)
            .map(|n| (format!("{prefix}-r{round}-{n}"), format!("user-{}", (round * BATCH + n) % USERS)))
            .collect();
        let batch: Vec<Value> = events
            .iter()
            .map(|(id, user)| json!({"type": "track", "userId": user, "event": "Load", "messageId": id}))
            .collect();
        let body = json!({ "batch": batch }).to_string();
        let first_sent = Instant::now();
        loop {
            let url = {
                let nodes = nodes.lock().unwrap();
                turn += 1;
                format!("{}/v1/batch", nodes[turn % nodes.len()])
            };
            let sent = Instant::now();
            let answer = post(&agent, &url, write_key, &body);
            let answered = Instant::now();
            match answer {
                Ok((200, _)) => {
                    report.answers.push(Answer { sent, answered, status: 200, body: String::new() });
                    for (id, user) in &events {
                        report.acknowledged.entry(user.clone()).or_default().insert(id.clone());
                    }
                    std::thread::sleep(pace);
                    break;
                }
                Ok((status, text)) => {
                    assert_eq!(status, 503, "only 503 may ask for a retry: {text}");
                    report.answers.push(Answer { sent, answered, status, body: text });
                }
                // The node is gone (killed, or restarting on a new port).
                Err(error) => report.answers.push(Answer { sent, answered, status: 0, body: error.to_string() }),
            }
            assert!(first_sent.elapsed() < RETRY_FOR, "no node answered 200 for a batch within {RETRY_FOR:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    report
}

fn health(url: &str) -> Option<Value> {
    let mut response = agent().get(&format!("{url}/health")).call().ok()?;
    serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()
}

/// Which of `nodes` (indexes into `urls`) say they hold `stage`'s lease.
fn holders(urls: &[String], stage: &str) -> Vec<usize> {
    (0..urls.len())
        .filter(|&index| health(&urls[index]).is_some_and(|health| health["leases"][stage] == true))
        .collect()
}

/// Every messageId in the log with how often it is there.
fn logged_message_ids(data: &Path, store: &str) -> HashMap<String, usize> {
    let listed = tandem(data, &["--store", store, "events", "list", "--json", "--limit", "100000000"]);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in listed.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        *counts.entry(event["messageId"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    counts
}

/// Every acknowledged messageId is in the log exactly once, and nothing else is.
fn assert_logged_once(report: &LoadReport, logged: &HashMap<String, usize>) {
    let acknowledged = report.acknowledged_ids();
    let lost: Vec<_> = acknowledged.iter().filter(|id| !logged.contains_key(**id)).take(5).collect();
    assert!(lost.is_empty(), "acknowledged events missing from the log, e.g. {lost:?}");
    let twice: Vec<_> = logged.iter().filter(|(_, count)| **count > 1).take(5).collect();
    assert!(twice.is_empty(), "events in the log more than once, e.g. {twice:?}");
    let unknown: Vec<_> = logged.keys().filter(|id| !acknowledged.contains(id.as_str())).take(5).collect();
    assert!(unknown.is_empty(), "events in the log that the load never had answered 200, e.g. {unknown:?}");
}

fn serve(data: &Path, store: &str, log: Option<&str>) -> Server {
    let mut command = vec!["serve", "--store", store];
    command.extend(log.map(|log| ["--log", log]).into_iter().flatten());
    Server::run(data, &command, Stdio::null())
}

fn cluster_status(data: &Path, store: &str, log: &str) -> Value {
    serde_json::from_str(&tandem(data, &["--store", store, "--log", log, "cluster", "status", "--json"])).unwrap()
}

/// The lag of `stage` in a `cluster status`, `None` when it is not listed.
fn lag(status: &Value, stage: &str) -> Option<u64> {
    status["stages"].as_array()?.iter().find(|listed| listed["stage"] == stage)?["lag"].as_u64()
}

#[test]
fn three_nodes_and_three_nats_servers_lose_a_node_the_resolver_and_a_nats_server_under_load() {
    let Some((database, _)) = TestDatabase::create() else { return };
    let store = database.url().expect("TANDEM_TEST_POSTGRES is a postgres:// URL");
    let mut nats = NatsCluster::start(3);
    let log = nats.urls();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let data = dirs[0].path();
    let source: Value =
        serde_json::from_str(&tandem(data, &["--store", &store, "source", "create", "web", "--json"])).unwrap();
    let write_key = source["write_key"].as_str().unwrap();
    let token: Value = serde_json::from_str(&tandem(data, &["--store", &store, "token", "create", "--json"])).unwrap();
    let token = token["token"].as_str().unwrap();

    let mut nodes: Vec<Server> = dirs.iter().map(|dir| serve(dir.path(), &store, Some(&log))).collect();
    let urls = |nodes: &[Server]| nodes.iter().map(|node| node.url.clone()).collect::<Vec<_>>();
    let resolver = eventually(10, "one node taking the resolver lease", || {
        let holding = holders(&urls(&nodes), "resolve");
        assert!(holding.len() <= 1, "nodes {holding:?} all hold the resolver lease");
        holding.first().copied()
    });
    let load = Load::start(write_key, urls(&nodes), 3, Duration::ZERO, "cluster");
    std::thread::sleep(Duration::from_secs(2));

    // A node not running the resolver (the drain's, when that is another).
    let drain = holders(&urls(&nodes), "drain");
    let victim = drain.into_iter().find(|&index| index != resolver).unwrap_or((resolver + 1) % 3);
    eprintln!("killing node {victim}, holding {}", health(&nodes[victim].url).unwrap()["leases"]);
    let restarted = kill_and_restart(&mut nodes, victim, &dirs[victim], &store, &log);
    load.replace_node(victim, &restarted);
    std::thread::sleep(Duration::from_secs(2));

    // The node running the resolver: another takes its lease.
    let resolver =
        eventually(10, "a node holding the resolver lease", || holders(&urls(&nodes), "resolve").first().copied());
    let others: Vec<String> = (0..3).filter(|&index| index != resolver).map(|index| nodes[index].url.clone()).collect();
    eprintln!("killing node {resolver}, holding {}", health(&nodes[resolver].url).unwrap()["leases"]);
    let killed_at = Instant::now();
    nodes.remove(resolver).kill_hard();
    eventually(10, "a surviving node taking over the resolver lease", || {
        (!holders(&others, "resolve").is_empty()).then_some(())
    });
    let took_over = killed_at.elapsed();
    assert!(took_over <= Duration::from_secs(10), "the resolver lease moved after {took_over:?}");
    eprintln!("the resolver lease moved to another node {} ms after kill -9", took_over.as_millis());
    nodes.insert(resolver, serve(dirs[resolver].path(), &store, Some(&log)));
    load.replace_node(resolver, &nodes[resolver].url);
    std::thread::sleep(Duration::from_secs(2));

    // A NATS server: the stream's leader when one is known.
    let leader = nats.stream_leader(DEFAULT_STREAM_NAME);
    let server = leader.unwrap_or(0);
    eprintln!("killing nats server {server} (the stream's leader: {leader:?})");
    nats.kill(server);
    std::thread::sleep(Duration::from_secs(2));
    nats.restart(server);
    std::thread::sleep(Duration::from_secs(2));
    let report = load.finish();
    let acknowledged = report.acknowledged_ids().len();
    assert!(acknowledged >= 1_000, "the load ran ({acknowledged} events acknowledged)");
    let retried = report.answers.iter().filter(|answer| answer.status != 200).count();
    eprintln!("{acknowledged} events acknowledged; {retried} requests answered 503 or not at all, and sent again");
    let catching_up = Instant::now();

    // Everything drained and resolved.
    let status = eventually(60, "the drain and the resolver catching up", || {
        let status = cluster_status(data, &store, &log);
        (lag(&status, "drain") == Some(0)
            && lag(&status, "resolve") == Some(0)
            && status["head"].as_u64() == Some(acknowledged as u64))
        .then_some(status)
    });
    eprintln!("drained and resolved {} ms after the load stopped", catching_up.elapsed().as_millis());
    let logged = logged_message_ids(data, &store);
    assert_logged_once(&report, &logged);

    // Each user's profile counts each of the user's events once.
    for (user, ids) in &report.acknowledged {
        let url = format!("{}/api/v1/profiles?identifier=user_id:{user}", nodes[0].url);
        let mut response = agent().get(&url).header("Authorization", &format!("Bearer {token}")).call().unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        assert_eq!(response.status().as_u16(), 200, "{user}: {text}");
        let profile: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(profile["event_counts"], json!({"track": ids.len()}), "{user}'s profile after {status}");
    }
    drop(nodes);
    drop(database);
}

/// `kill -9` node `index`, then starts it again on its data directory;
/// returns its new address.
fn kill_and_restart(nodes: &mut Vec<Server>, index: usize, dir: &tempfile::TempDir, store: &str, log: &str) -> String {
    nodes.remove(index).kill_hard();
    nodes.insert(index, serve(dir.path(), store, Some(log)));
    nodes[index].url.clone()
}

/// What the load saw through a PostgreSQL restart, and when PostgreSQL was gone.
struct Outage {
    report: LoadReport,
    stopped: Instant,
    restarted: Instant,
    /// `/health`'s status half a second into the outage.
    health_while_down: u16,
}

/// A node on a private PostgreSQL (with an event stream when `log` is
/// given) under load while PostgreSQL stops for `down_for` and starts
/// again; returns the node, still serving, and what the load saw.
fn run_through_a_postgres_restart(
    postgres: &PrivateCluster,
    data: &Path,
    log: Option<&str>,
    down_for: Duration,
    pace: Duration,
) -> (Server, Outage) {
    let store = postgres.url();
    let source: Value =
        serde_json::from_str(&tandem(data, &["--store", &store, "source", "create", "web", "--json"])).unwrap();
    let node = serve(data, &store, log);
    let load = Load::start(source["write_key"].as_str().unwrap(), vec![node.url.clone()], 2, pace, "outage");
    std::thread::sleep(Duration::from_millis(1_500));
    postgres.stop();
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let health_while_down = agent().get(&format!("{}/health", node.url)).call().unwrap().status().as_u16();
    std::thread::sleep(down_for.saturating_sub(stopped.elapsed()));
    let restarted = Instant::now();
    postgres.start_again();
    let started_in = restarted.elapsed();
    // The load retries what was refused until it is answered 200; give the
    // node a moment of normal work after PostgreSQL is back.
    std::thread::sleep(Duration::from_millis(1_500));
    let report = load.finish();
    let first_after = report
        .answers
        .iter()
        .filter(|answer| answer.sent >= restarted && answer.status == 200)
        .map(|answer| answer.answered)
        .min();
    eprintln!(
        "postgresql down for {down_for:?}: {} answers while it was down, {} of them 503; the first 200 came {:?} after it was started again (pg_ctl start -w took {:?})",
        report.answers.iter().filter(|answer| answer.sent >= stopped && answer.answered <= restarted).count(),
        report.answers.iter().filter(|answer| answer.sent >= stopped && answer.answered <= restarted && answer.status == 503).count(),
        first_after.map(|at| at - restarted),
        started_in,
    );
    (node, Outage { report, stopped, restarted, health_while_down })
}

#[test]
fn a_node_refuses_events_while_postgres_is_down_and_takes_them_again_when_it_is_back() {
    let Some(postgres) = PrivateCluster::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (node, outage) =
        run_through_a_postgres_restart(&postgres, dir.path(), None, Duration::from_secs(3), Duration::ZERO);
    let answers = &outage.report.answers;
    let while_down: Vec<&Answer> =
        answers.iter().filter(|answer| answer.sent >= outage.stopped && answer.answered <= outage.restarted).collect();
    assert!(!while_down.is_empty(), "the load sent requests while postgresql was stopped");
    assert_eq!(outage.health_while_down, 503, "/health while postgresql was stopped");
    for answer in &while_down {
        assert_eq!(answer.status, 503, "answered while postgresql was stopped: {}", answer.body);
        let body: Value = serde_json::from_str(&answer.body).unwrap_or_else(|_| panic!("not JSON: {}", answer.body));
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
    let after = answers.iter().filter(|answer| answer.sent >= outage.restarted && answer.status == 200).count();
    assert!(after > 0, "the node took events again after postgresql started, without a restart");
    let logged = logged_message_ids(dir.path(), &postgres.url());
    assert_logged_once(&outage.report, &logged);
    drop(node);
}

#[test]
fn a_node_with_an_event_stream_keeps_taking_events_while_postgres_is_down() {
    let Some(postgres) = PrivateCluster::start() else { return };
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Longer than a node trusts a write key or a tracking plan it read; the
    // load paced, as what JetStream holds meanwhile is drained afterwards.
    let down_for = tandem_server::auth::CACHE_TTL.max(tandem_server::govern::PLAN_CACHE_TTL) + Duration::from_secs(2);
    let (node, outage) =
        run_through_a_postgres_restart(&postgres, dir.path(), Some(&nats.url()), down_for, Duration::from_millis(50));
    let refused: Vec<&Answer> = outage.report.answers.iter().filter(|answer| answer.status != 200).collect();
    assert!(refused.is_empty(), "JetStream holds the events, yet {} were refused: {}", refused.len(), refused[0].body);
    let while_down = outage
        .report
        .answers
        .iter()
        .filter(|answer| answer.sent >= outage.stopped && answer.answered <= outage.restarted)
        .count();
    assert!(while_down > 0, "the load sent requests while postgresql was stopped");
    // The drain appends what the stream held once PostgreSQL is back.
    let store = postgres.url();
    let acknowledged = outage.report.acknowledged_ids().len() as u64;
    eventually(60, "the drain catching up", || {
        let status = cluster_status(dir.path(), &store, &nats.url());
        (lag(&status, "drain") == Some(0) && status["head"].as_u64() == Some(acknowledged)).then_some(())
    });
    assert_logged_once(&outage.report, &logged_message_ids(dir.path(), &store));
    drop(node);
}
