//! A fresh database per test: each PostgreSQL test creates
//! `tandem_test_<random>` on the server named by `TANDEM_TEST_POSTGRES`
//! (default [`DEFAULT_SERVER`]) and drops it when its store is dropped, so
//! tests run in parallel without seeing one another's data.
//!
//! A server that does not answer fails the test with a message saying how to
//! provide one: CI must never pass without having run these suites. Only
//! `TANDEM_TEST_POSTGRES=skip`, set on purpose, skips them.
//!
//! Public for other crates' tests (the binary's end-to-end tests start
//! servers on a fresh database with [`TestDatabase::url`]); not for use
//! outside tests.

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
