//! Helpers to run `tandem` processes and talk to them over loopback.

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_tandem");

/// The repository root, where `tests/sdk` lives.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Runs a `tandem` command against a data directory; panics on failure.
pub fn tandem(data: &Path, args: &[&str]) -> String {
    let output = tandem_output(data, args);
    assert!(output.status.success(), "tandem {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

pub fn tandem_output(data: &Path, args: &[&str]) -> Output {
    Command::new(BINARY)
        .arg("--data")
        .arg(data)
        .args(args)
        .env_remove("TANDEM_LISTEN")
        .env_remove("TANDEM_CONFIG")
        .output()
        .unwrap()
}

/// Creates a source with the CLI; returns its JSON (`id`, `name`, `write_key`).
pub fn create_source(data: &Path, name: &str) -> Value {
    serde_json::from_str(&tandem(data, &["source", "create", name, "--json"])).unwrap()
}

/// Every event in the log, oldest first, as the CLI prints them.
pub fn events(data: &Path) -> Vec<Value> {
    tandem(data, &["events", "list", "--json", "--limit", "100000000"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `tandem serve` process; killed when dropped.
pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    pub fn start(data: &Path) -> Server {
        Server::run(data, &["serve"], Stdio::null())
    }

    /// Runs a serving command (`serve`, `demo …`) on a free port, its standard
    /// output going to `stdout`, and waits until it answers.
    pub fn run(data: &Path, command: &[&str], stdout: Stdio) -> Server {
        let port = free_port();
        let child = Command::new(BINARY)
            .arg("--data")
            .arg(data)
            .args(command)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("TANDEM_LOG", "warn")
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let server = Server { child, url: format!("http://127.0.0.1:{port}") };
        server.wait_until_healthy();
        server
    }

    fn wait_until_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if ureq::get(&format!("{}/health", self.url)).call().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("tandem serve did not become healthy at {}", self.url);
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill_hard(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then wait for the process to exit; returns whether it exited cleanly.
    pub fn terminate(mut self) -> bool {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tandem serve did not stop within 30 s of SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first word after `marker` in `text`.
pub fn word_after<'a>(text: &'a str, marker: &str) -> &'a str {
    let start = text.find(marker).unwrap_or_else(|| panic!("{marker:?} not in:\n{text}")) + marker.len();
    text[start..].split_whitespace().next().unwrap()
}

/// A `tandem demo` serving from a temporary directory, with the
/// walkthrough it printed.
pub struct Demo {
    /// Holds `data`; dropped last.
    _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub server: Server,
    pub walkthrough: String,
}

impl Demo {
    /// Runs `tandem demo` with `options` (such as `--customers 200`) and
    /// waits until it serves.
    pub fn start(options: &[&str]) -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("demo");
        let output = dir.path().join("walkthrough.txt");
        let command: Vec<&str> = ["demo"].into_iter().chain(options.iter().copied()).collect();
        let server = Server::run(&data, &command, Stdio::from(std::fs::File::create(&output).unwrap()));
        let walkthrough = std::fs::read_to_string(&output).unwrap();
        Demo { _dir: dir, data, server, walkthrough }
    }

    /// The admin token the walkthrough printed.
    pub fn admin_token(&self) -> String {
        word_after(&self.walkthrough, "Admin token for the API: ").to_owned()
    }
}

/// Runs a browser script of `tests/console` with node (its arguments, then
/// the screenshot directory) and returns the JSON object it prints; panics
/// with its output when it fails.
pub fn console_script(script: &str, args: &[&str], screenshots: &Path) -> Value {
    let script = repo_root().join("tests/console").join(script);
    let run = Command::new("node")
        .arg(&script)
        .args(args)
        .arg(screenshots)
        .current_dir(script.parent().unwrap())
        .output()
        .unwrap_or_else(|error| panic!("cannot run node: {error}; run scripts/test to install the browser tests"));
    assert!(
        run.status.success(),
        "{} failed (run scripts/test to install its packages and Chromium):\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).unwrap()
}

/// An HTTP agent that returns 4xx/5xx responses instead of errors.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// POSTs JSON with the write key as Basic auth user; returns status and body.
pub fn post(agent: &ureq::Agent, url: &str, write_key: &str, body: &str) -> Result<(u16, String), ureq::Error> {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"));
    let mut response = agent
        .post(url)
        .header("Authorization", &format!("Basic {auth}"))
        .header("Content-Type", "application/json")
        .send(body)?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string()?;
    Ok((status, text))
}

/// Waits until `check` gives `Some`, for at most `seconds`.
pub fn eventually<T>(seconds: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what} did not happen within {seconds} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}
