//! A real `nats-server` with JetStream for tests: started on a free port
//! with a fresh storage directory, killed and removed when dropped.
//!
//! A missing `nats-server` fails the test with a message saying how to get
//! one (scripts/test installs Debian's package): these tests never pass
//! without having run. Public for other crates' tests (the binary's
//! end-to-end tests); not for use outside tests.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian and most distributions put the server.
const CANDIDATES: &[&str] = &["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"];

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
        let binary = CANDIDATES
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
            });
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("tandem-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("creating the nats storage directory");
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
        let server = NatsServer { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not accept connections on port {port} within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
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
