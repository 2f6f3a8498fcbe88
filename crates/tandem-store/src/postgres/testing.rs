//! A fresh database per test: each PostgreSQL test creates
//! `tandem_test_<random>` on the server named by `TANDEM_TEST_POSTGRES`
//! (default [`DEFAULT_SERVER`]) and drops it when its store is dropped, so
//! tests run in parallel without seeing one another's data.
//!
//! A server that does not answer fails the test with a message saying how to
//! provide one: CI must never pass without having run these suites. Only
//! `TANDEM_TEST_POSTGRES=skip`, set on purpose, skips them.
//!
//! [`PrivateCluster`] is a server of one test's own, for what a shared one
//! cannot show: TLS with the test's certificate, or the server stopped and
//! started again under a running node.
//!
//! Public for other crates' tests (the binary's end-to-end tests start
//! servers on a fresh database with [`TestDatabase::url`], or on a
//! [`PrivateCluster`]); not for use outside tests.

#[cfg(test)]
use super::PostgresStore;
use postgres::{Config, NoTls};
use rand::distr::{Alphanumeric, SampleString};

/// The environment variable naming the server the tests use.
pub const SERVER_VARIABLE: &str = "TANDEM_TEST_POSTGRES";

/// The server used when [`SERVER_VARIABLE`] is unset.
pub const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database made for one test, dropped (with any connection still open to
/// it) when this is dropped.
pub struct TestDatabase {
    server: Config,
    server_url: String,
    name: String,
}

impl TestDatabase {
    /// Creates a database on the test server and returns it with the settings
    /// that connect to it; `None` when the developer asked to skip.
    ///
    /// # Panics
    /// When the server cannot be reached or refuses to create a database:
    /// this is test set-up, and failing loudly is the point.
    pub fn create() -> Option<(TestDatabase, Config)> {
        let url = std::env::var(SERVER_VARIABLE).unwrap_or_else(|_| DEFAULT_SERVER.to_owned());
        if url.trim() == "skip" {
            eprintln!("{SERVER_VARIABLE}=skip: not running this PostgreSQL test");
            return None;
        }
        let server: Config =
            url.parse().unwrap_or_else(|error| panic!("{SERVER_VARIABLE}={url:?} is not a connection string: {error}"));
        let mut client = server.connect(NoTls).unwrap_or_else(|error| {
            panic!(
                "no PostgreSQL answers at {SERVER_VARIABLE}={url:?} ({error}); start one (scripts/test does), \
                 point {SERVER_VARIABLE} at one, or set {SERVER_VARIABLE}=skip to skip these tests"
            )
        });
        let name = format!("tandem_test_{}", Alphanumeric.sample_string(&mut rand::rng(), 16).to_lowercase());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|error| panic!("cannot create the test database {name}: {error}"));
        let mut config = server.clone();
        config.dbname(&name);
        Some((TestDatabase { server, server_url: url, name }, config))
    }

    /// The database's own `postgres://` URL, for a process to connect to:
    /// the test server's URL with this database's name as its path. `None`
    /// when the server was named in `key=value` form, which has no URL.
    pub fn url(&self) -> Option<String> {
        let url = self.server_url.trim();
        let after_scheme = ["postgres://", "postgresql://"].iter().find_map(|scheme| url.strip_prefix(scheme))?;
        let scheme = &url[..url.len() - after_scheme.len()];
        let (before_query, query) = after_scheme.split_once('?').map_or((after_scheme, None), |(a, q)| (a, Some(q)));
        let authority = before_query.split_once('/').map_or(before_query, |(authority, _)| authority);
        let query = query.map(|query| format!("?{query}")).unwrap_or_default();
        Some(format!("{scheme}{authority}/{}{query}", self.name))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let dropped = self.server.connect(NoTls).and_then(|mut client| {
            client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
        });
        if let Err(error) = dropped {
            eprintln!("could not drop the test database {}: {error}", self.name);
        }
    }
}

/// A store on a fresh, empty database of its own; `None` when skipped.
#[cfg(test)]
pub fn fresh_store() -> Option<PostgresStore> {
    let (database, config) = TestDatabase::create()?;
    let mut store = PostgresStore::connect_with(config, super::DEFAULT_MAX_CONNECTIONS)
        .expect("connect to the test database and migrate it");
    store.test_database = Some(database);
    Some(store)
}

/// A PostgreSQL cluster of a test's own, for what the shared test server
/// cannot show: TLS with a certificate the test made, or the server going
/// away under a running node and coming back. `initdb` in a temporary
/// directory, started on a free port, stopped and removed when dropped.
/// PostgreSQL refuses to run as root, so as root it runs as the `postgres`
/// user (or `nobody`) via `runuser`.
pub struct PrivateCluster {
    /// Holds the data directory, the log and the socket; removed when dropped.
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    run_as: Option<String>,
    /// `pg_ctl start`'s server options (port, TLS files).
    options: String,
    /// The port it listens on, at 127.0.0.1.
    pub port: u16,
}

impl PrivateCluster {
    /// Starts a cluster that takes plain connections over TCP from
    /// 127.0.0.1 without a password; `None` when PostgreSQL tests are skipped.
    ///
    /// # Panics
    /// When PostgreSQL's programs are missing or the cluster does not start.
    pub fn start() -> Option<PrivateCluster> {
        PrivateCluster::start_configured("local all all trust\nhost all all 127.0.0.1/32 trust\n", "", &[])
    }

    /// Starts a cluster that takes only TLS connections over TCP (plain ones
    /// are refused by `pg_hba.conf`), with `certificate` and `key` (PEM) as
    /// its server certificate; `None` when PostgreSQL tests are skipped.
    ///
    /// # Panics
    /// When PostgreSQL's programs are missing or the cluster does not start.
    pub fn start_with_tls(certificate: &str, key: &str) -> Option<PrivateCluster> {
        PrivateCluster::start_configured(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
            " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key",
            &[("server.crt", certificate, 0o644), ("server.key", key, 0o600)],
        )
    }

    /// `initdb`, then `files` (name, text, mode) written into the data
    /// directory, `hba` as its `pg_hba.conf`, and a start with `options`
    /// added to the port's.
    fn start_configured(hba: &str, options: &str, files: &[(&str, &str, u32)]) -> Option<PrivateCluster> {
        use std::os::unix::fs::PermissionsExt;
        if std::env::var(SERVER_VARIABLE).is_ok_and(|value| value.trim() == "skip") {
            eprintln!("{SERVER_VARIABLE}=skip: not running this PostgreSQL test");
            return None;
        }
        let bin = server_programs().unwrap_or_else(|| {
            panic!("no initdb found (looked in /usr/lib/postgresql/*/bin and PATH); install it: apt-get install postgresql (scripts/test does)")
        });
        let dir = std::env::temp_dir()
            .join(format!("tandem-pg-{}", Alphanumeric.sample_string(&mut rand::rng(), 12).to_lowercase()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let run_as = running_as_root().then(|| {
            let user = if user_ids("postgres").is_some() { "postgres" } else { "nobody" };
            let (uid, gid) = user_ids(user).expect("the user to run postgresql as");
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("handing the directory over");
            user.to_owned()
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{options}", dir.display());
        let cluster = PrivateCluster { dir, bin, run_as, options, port };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &["-D", data.to_str().unwrap(), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
        );
        for (name, text, mode) in files {
            let path = data.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
            cluster.hand_over(&path);
        }
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        cluster.start_again();
        Some(cluster)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.join("data")
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: every session
    /// is cut without a goodbye, as when the server crashes), keeping its
    /// data directory and port for [`PrivateCluster::start_again`].
    ///
    /// # Panics
    /// When the server does not stop.
    pub fn stop(&self) {
        let data = self.data();
        self.run("pg_ctl", &["stop", "-D", data.to_str().unwrap(), "-m", "immediate", "-w"]);
    }

    /// Starts the stopped server again on its data directory and port, and
    /// waits until it takes connections (after recovering from its log).
    ///
    /// # Panics
    /// When the server does not start.
    pub fn start_again(&self) {
        let data = self.data();
        let log = self.dir.join("server.log");
        let started = self.try_run(
            "pg_ctl",
            &["start", "-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-o", &self.options],
        );
        if !started {
            panic!(
                "the private postgresql did not start; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }

    fn hand_over(&self, path: &std::path::Path) {
        if let Some(user) = &self.run_as {
            let (uid, gid) = user_ids(user).expect("the user to run postgresql as");
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("handing the file over");
        }
    }

    fn command(&self, program: &str) -> std::process::Command {
        let path = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut command = std::process::Command::new("runuser");
                command.args(["-u", user, "--"]).arg(path);
                command
            }
            None => std::process::Command::new(path),
        }
    }

    fn try_run(&self, program: &str, args: &[&str]) -> bool {
        let status = self
            .command(program)
            .args(args)
            .current_dir(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
        status.success()
    }

    fn run(&self, program: &str, args: &[&str]) {
        assert!(self.try_run(program, args), "{program} {args:?} failed");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.try_run("pg_ctl", &["stop", "-D", data.to_str().unwrap_or_default(), "-m", "immediate"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Debian keeps the server programs out of PATH, under a versioned directory.
fn server_programs() -> Option<std::path::PathBuf> {
    let mut versioned: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versioned.sort_by_key(|bin| {
        bin.parent().and_then(|version| version.file_name()?.to_str()?.parse::<u32>().ok()).unwrap_or(0)
    });
    versioned.pop().or_else(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).find(|dir| dir.join("initdb").is_file())
    })
}

fn running_as_root() -> bool {
    // The real user id, from the kernel's own account of this process.
    std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        let line = status.lines().find(|line| line.starts_with("Uid:"))?;
        line.split_whitespace().nth(1)?.parse::<u32>().ok()
    }) == Some(0)
}

/// A user's ids from `/etc/passwd`.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&user) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))?
    })
}
