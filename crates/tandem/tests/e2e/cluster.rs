//! Scale-out on PostgreSQL: two `tandem serve` processes on one fresh
//! database share sources, the log and profiles; exactly one runs the
//! resolver, and when it is killed the other takes over its lease and
//! resolves what arrives next. Needs the PostgreSQL test server
//! (`TANDEM_TEST_POSTGRES`, see `tandem_store::postgres::testing`).

use crate::common::{agent, eventually, post, tandem, tandem_output, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tandem_store::postgres::testing::TestDatabase;

fn get_json(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = agent().get(url);
    if let Some(token) = token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request.call().unwrap();
    let status = response.status().as_u16();
    (status, serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap_or(Value::Null))
}

/// Whether the node at `url` says it holds the resolver lease.
fn holds_resolver_lease(url: &str) -> bool {
    let (status, health) = get_json(&format!("{url}/health"), None);
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["store"], json!({"kind": "postgres", "ok": true}), "{health}");
    health["leases"]["resolve"] == true
}

fn profile_of(server: &Server, token: &str, user: &str) -> Option<Value> {
    let (status, profile) = get_json(&format!("{}/api/v1/profiles?identifier=user_id:{user}", server.url), Some(token));
    (status == 200).then_some(profile)
}

fn identify(server: &Server, write_key: &str, user: &str, plan: &str) {
    let body = json!({"batch": [
        {"type": "page", "anonymousId": format!("visit-{user}"), "name": "Pricing"},
        {"type": "identify", "anonymousId": format!("visit-{user}"), "userId": user, "traits": {"plan": plan}}
    ]})
    .to_string();
    let (status, text) = post(&agent(), &format!("{}/v1/batch", server.url), write_key, &body).unwrap();
    assert_eq!(status, 200, "{text}");
}

fn serve_on(data: &Path, url: &str) -> Server {
    Server::run(data, &["serve", "--store", url], Stdio::null())
}

#[test]
fn two_nodes_share_one_database_and_the_survivor_takes_over_the_resolver() {
    let Some((database, _)) = TestDatabase::create() else { return };
    let url = database.url().expect("TANDEM_TEST_POSTGRES is a postgres:// URL");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source: Value =
        serde_json::from_str(&tandem(dir_a.path(), &["--store", &url, "source", "create", "web", "--json"])).unwrap();
    let write_key = source["write_key"].as_str().unwrap();
    let token: Value =
        serde_json::from_str(&tandem(dir_b.path(), &["--store", &url, "token", "create", "--json"])).unwrap();
    let token = token["token"].as_str().unwrap();

    let node_a = serve_on(dir_a.path(), &url);
    let node_b = serve_on(dir_b.path(), &url);
    // Exactly one node runs the resolver.
    let a_holds = eventually(10, "a node taking the resolver lease", || {
        match (holds_resolver_lease(&node_a.url), holds_resolver_lease(&node_b.url)) {
            (true, true) => panic!("both nodes hold the resolver lease"),
            (false, false) => None,
            (a_holds, _) => Some(a_holds),
        }
    });

    // Tracked through A, resolved by whichever holds the lease, seen through B.
    identify(&node_a, write_key, "ann", "pro");
    let ann = eventually(15, "ann's profile on node B", || profile_of(&node_b, token, "ann"));
    assert_eq!(ann["traits"]["plan"], "pro");
    assert!(ann["identifiers"].to_string().contains("visit-ann"), "{ann}");

    let status: Value =
        serde_json::from_str(&tandem(dir_a.path(), &["--store", &url, "cluster", "status", "--json"])).unwrap();
    assert_eq!(status["store"], "postgres");
    assert_eq!(status["stages"][0]["stage"], "resolve");
    assert_eq!(status["stages"][0]["lease"], "held", "{status}");
    assert_eq!(status["stages"][0]["lag"], 0, "{status}");
    assert_eq!(status["head"], 2, "{status}");

    // kill -9 the holder: its session ends, and the survivor takes the lease.
    let (holder, survivor) = if a_holds { (node_a, node_b) } else { (node_b, node_a) };
    holder.kill_hard();
    identify(&survivor, write_key, "bob", "free");
    eventually(15, "the survivor taking over the resolver lease", || holds_resolver_lease(&survivor.url).then_some(()));
    let metrics =
        agent().get(&format!("{}/metrics", survivor.url)).call().unwrap().body_mut().read_to_string().unwrap();
    assert!(metrics.contains("tandem_resolver_lease_held 1"), "{metrics}");
    let bob = eventually(15, "bob's profile on the survivor", || profile_of(&survivor, token, "bob"));
    assert_eq!(bob["traits"]["plan"], "free");
    assert_ne!(bob["id"], ann["id"]);
    let status: Value =
        serde_json::from_str(&tandem(dir_a.path(), &["--store", &url, "cluster", "status", "--json"])).unwrap();
    assert_eq!((status["head"].as_u64(), status["stages"][0]["lag"].as_u64()), (Some(4), Some(0)), "{status}");
    drop(survivor);
    drop(database);
}

#[test]
fn a_bad_or_unreachable_store_is_a_clear_error_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let unreachable = tandem_output(dir.path(), &["--store", "postgres://tandem:hunter2@127.0.0.1:1/tandem", "stats"]);
    assert!(!unreachable.status.success());
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        stderr.contains("cannot open the PostgreSQL store at postgres://tandem:***@127.0.0.1:1/tandem"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2") && !stderr.contains("panicked"), "{stderr}");
    let wrong = tandem_output(dir.path(), &["--store", "mysql://root:hunter2@db/x", "source", "list"]);
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success() && stderr.contains("must be a postgres:// or postgresql:// URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(!tandem_store::SqliteStore::exists(dir.path()), "nothing fell back to the embedded store");
}

#[test]
fn a_node_waits_for_the_lease_and_the_cli_does_not_race_its_holder() {
    let Some((database, _)) = TestDatabase::create() else { return };
    let url = database.url().expect("TANDEM_TEST_POSTGRES is a postgres:// URL");
    let dir = tempfile::tempdir().unwrap();
    let source: Value =
        serde_json::from_str(&tandem(dir.path(), &["--store", &url, "source", "create", "web", "--json"])).unwrap();
    let token: Value =
        serde_json::from_str(&tandem(dir.path(), &["--store", &url, "token", "create", "--json"])).unwrap();
    let token = token["token"].as_str().unwrap();
    // This test holds the resolver's lease, as another node would.
    let other_node = tandem_store::PostgresStore::connect(&url).unwrap();
    let lease = tandem_store::Coordination::try_lease(&other_node, tandem_store::Stage::RESOLVE).unwrap().unwrap();

    let node = serve_on(dir.path(), &url);
    identify(&node, source["write_key"].as_str().unwrap(), "cid", "team");
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(!holds_resolver_lease(&node.url), "the lease is held elsewhere, so the node waits");
    assert!(profile_of(&node, token, "cid").is_none(), "nothing resolved while it waits");
    let shown = tandem_output(dir.path(), &["--store", &url, "profile", "show", "user_id:cid"]);
    let stderr = String::from_utf8_lossy(&shown.stderr);
    assert!(stderr.contains("a server is resolving the log: 2 newer events are not in profiles yet"), "{stderr}");
    let status: Value =
        serde_json::from_str(&tandem(dir.path(), &["--store", &url, "cluster", "status", "--json"])).unwrap();
    assert_eq!((status["stages"][0]["lag"].as_u64(), status["stages"][0]["lease"].as_str()), (Some(2), Some("held")));

    drop(lease);
    eventually(10, "the node taking the released lease", || holds_resolver_lease(&node.url).then_some(()));
    let cid = eventually(10, "cid's profile", || profile_of(&node, token, "cid"));
    assert_eq!(cid["traits"]["plan"], "team");
    let shown: Value =
        serde_json::from_str(&tandem(dir.path(), &["--store", &url, "profile", "show", "user_id:cid", "--json"]))
            .unwrap();
    assert_eq!(shown["id"], cid["id"]);
    drop(node);
    drop(other_node);
    drop(database);
}
