//! Real `nats-server`s with JetStream for tests: [`NatsServer`], one server
//! on a free port with a fresh storage directory, and [`NatsCluster`],
//! several servers routed into one JetStream cluster, any of which a test
//! can kill with SIGKILL and start again on its own storage. Both are killed
//! and their directories removed when dropped.
//!
//! A missing `nats-server` fails the test with a message saying how to get
//! one (scripts/test installs Debian's package): these tests never pass
//! without having run. Public for other crates' tests (the binary's
//! end-to-end tests); not for use outside tests.

use serde_json::Value;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian and most distributions put the server.
const CANDIDATES: &[&str] = &["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"];

/// How long a server gets to accept connections, and a cluster to elect its
/// JetStream meta leader, before the set-up fails.
const START_WITHIN: Duration = Duration::from_secs(30);

/// The `nats-server` program, from the usual places or PATH.
fn binary() -> PathBuf {
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .or_else(|| {
            let found = Command::new("sh").args(["-c", "command -v nats-server"]).output().ok()?;
            let path = String::from_utf8(found.stdout).ok()?.trim().to_owned();
            (!path.is_empty()).then(|| PathBuf::from(path))
        })
        .unwrap_or_else(|| {
            panic!("no nats-server found (looked in {CANDIDATES:?} and PATH); install it: apt-get install nats-server (scripts/test does)")
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn storage_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-nats-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("creating the nats storage directory");
    dir
}

/// `count` distinct free ports, all bound at once so none is handed out twice.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|listener| listener.local_addr().unwrap().port()).collect()
}

/// Starts the server on storage directory `dir`; its output goes to `log`
/// (appended, so a restart keeps what came before) when given.
fn spawn(binary: &Path, args: &[String], dir: &Path, log: Option<&Path>) -> Child {
    let output = || match log {
        Some(log) => Stdio::from(
            std::fs::OpenOptions::new().create(true).append(true).open(log).expect("opening the nats-server log"),
        ),
        None => Stdio::null(),
    };
    Command::new(binary)
        .args(args)
        .arg("-sd")
        .arg(dir)
        .stdout(output())
        .stderr(output())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()))
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + START_WITHIN;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server did not accept connections on port {port} within {START_WITHIN:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `nats-server -js`.
pub struct NatsServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    ///
    /// # Panics
    /// When no `nats-server` is installed or it does not start: this is test
    /// set-up, and failing loudly is the point.
    pub fn start() -> NatsServer {
        let port = free_port();
        let dir = storage_dir();
        let args = ["-js", "-a", "127.0.0.1", "-p", &port.to_string()].map(str::to_owned);
        let child = spawn(&binary(), &args, &dir, None);
        let server = NatsServer { child, dir, port };
        wait_for_port(port);
        server
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One server of a [`NatsCluster`]: its ports and storage outlive its process.
struct Member {
    name: String,
    client_port: u16,
    monitor_port: u16,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// Where the server's output goes: beside its storage directory, removed with it.
    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn monitor(&self, path: &str) -> Option<Value> {
        let mut response = ureq::get(&format!("http://127.0.0.1:{}{path}", self.monitor_port)).call().ok()?;
        serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()
    }
}

/// Several `nats-server -js` routed into one cluster (`tandem-test`), each
/// with its own client port, monitoring port and storage directory.
pub struct NatsCluster {
    binary: PathBuf,
    members: Vec<Member>,
}

impl NatsCluster {
    /// Starts `size` servers routed to one another and waits until each
    /// accepts connections, has a route to every other, and knows the
    /// JetStream meta leader (so a stream can be created at once).
    ///
    /// # Panics
    /// When no `nats-server` is installed or the cluster does not form.
    pub fn start(size: usize) -> NatsCluster {
        assert!(size >= 1, "a cluster of at least one server");
        let binary = binary();
        let ports = free_ports(3 * size);
        let route_ports = &ports[..size];
        let routes: Vec<String> = route_ports.iter().map(|port| format!("nats://127.0.0.1:{port}")).collect();
        let members = route_ports
            .iter()
            .enumerate()
            .map(|(index, route_port)| {
                let (name, client_port, monitor_port) =
                    (format!("n{index}"), ports[size + index], ports[2 * size + index]);
                let args = vec![
                    "-js".to_owned(),
                    "-n".to_owned(),
                    name.clone(),
                    "-a".to_owned(),
                    "127.0.0.1".to_owned(),
                    "-p".to_owned(),
                    client_port.to_string(),
                    "-m".to_owned(),
                    monitor_port.to_string(),
                    "--cluster_name".to_owned(),
                    "tandem-test".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{route_port}"),
                    "--routes".to_owned(),
                    routes.join(","),
                ];
                Member { name, client_port, monitor_port, args, dir: storage_dir(), child: None }
            })
            .collect();
        let mut cluster = NatsCluster { binary, members };
        for index in 0..size {
            cluster.spawn(index);
        }
        for index in 0..size {
            cluster.wait_until_joined(index);
        }
        cluster
    }

    fn spawn(&mut self, index: usize) {
        let member = &mut self.members[index];
        assert!(member.child.is_none(), "server {} is running already", member.name);
        member.child = Some(spawn(&self.binary, &member.args, &member.dir, Some(&member.log())));
    }

    /// Waits until server `index` accepts connections, is routed to every
    /// other running server and names the same JetStream meta leader as they do.
    fn wait_until_joined(&mut self, index: usize) {
        wait_for_port(self.members[index].client_port);
        let others = self.members.iter().filter(|other| other.child.is_some()).count() - 1;
        let deadline = Instant::now() + START_WITHIN;
        loop {
            let routes = self.members[index].monitor("/routez").and_then(|routez| routez["num_routes"].as_u64());
            let leader = self.meta_leader_seen_by(index);
            let agreed = leader.is_some()
                && self
                    .members
                    .iter()
                    .enumerate()
                    .filter(|(_, other)| other.child.is_some())
                    .all(|(other, _)| self.meta_leader_seen_by(other) == leader);
            if routes.is_some_and(|routes| routes as usize >= others) && agreed {
                return;
            }
            let exited = self.members[index].child.as_mut().and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                let name = &self.members[index].name;
                panic!("nats server {name} exited ({status}); the servers' logs end:\n{}", self.log_tails());
            }
            if Instant::now() >= deadline {
                panic!(
                    "nats server {} did not join the cluster within {START_WITHIN:?} (routes {routes:?}, meta leader {leader:?}); the servers' logs end:\n{}",
                    self.members[index].name,
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of every server's output, for a failure's message.
    fn log_tails(&self) -> String {
        let tails: Vec<String> = self
            .members
            .iter()
            .map(|member| {
                let log = std::fs::read_to_string(member.log()).unwrap_or_default();
                let mut tail: Vec<&str> = log.lines().rev().take(15).collect();
                tail.reverse();
                format!("{}:\n{}", member.name, tail.join("\n"))
            })
            .collect();
        tails.join("\n")
    }

    fn meta_leader_seen_by(&self, index: usize) -> Option<String> {
        let jsz = self.members[index].monitor("/jsz")?;
        jsz["meta_cluster"]["leader"].as_str().filter(|leader| !leader.is_empty()).map(str::to_owned)
    }

    /// Servers in the cluster.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// `nats://127.0.0.1:PORT` of server `index`.
    pub fn url(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.members[index].client_port)
    }

    /// Every server's URL, comma-separated, as `--log` takes them.
    pub fn urls(&self) -> String {
        (0..self.members.len()).map(|index| self.url(index)).collect::<Vec<_>>().join(",")
    }

    /// The index of the server leading `stream`'s replicas, as a running
    /// server reports it; `None` when none does (no stream yet, or an
    /// election under way).
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        let leader = self.members.iter().filter(|member| member.child.is_some()).find_map(|member| {
            let jsz = member.monitor("/jsz?accounts=true&streams=true")?;
            jsz["account_details"].as_array()?.iter().find_map(|account| {
                account["stream_detail"].as_array()?.iter().find_map(|detail| {
                    (detail["name"] == stream).then(|| detail["cluster"]["leader"].as_str().map(str::to_owned))?
                })
            })
        })?;
        self.members.iter().position(|member| member.name == leader)
    }

    /// SIGKILL to server `index`: no chance to flush or leave the cluster.
    /// Its storage stays for [`NatsCluster::restart`].
    pub fn kill(&mut self, index: usize) {
        let mut child = self.members[index].child.take().expect("the server to kill is running");
        child.kill().expect("sending SIGKILL to nats-server");
        child.wait().expect("reaping nats-server");
    }

    /// Starts server `index` again on its ports and storage directory and
    /// waits until it is back in the cluster.
    pub fn restart(&mut self, index: usize) {
        self.spawn(index);
        self.wait_until_joined(index);
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_dir_all(&member.dir);
        }
    }
}
