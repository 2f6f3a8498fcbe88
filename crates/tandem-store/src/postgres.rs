//! The scale-out backend (preview): every stage's storage in one PostgreSQL
//! database, so several stateless Tandem nodes can share it. It implements
//! the same interfaces as [`crate::sqlite`] and passes the same shared suite.
//!
//! The interfaces are synchronous and the server calls them from blocking
//! threads, so this backend uses the synchronous `postgres` client and a
//! small bounded pool of its own (`pool.rs`, [`DEFAULT_MAX_CONNECTIONS`] per
//! store unless told otherwise). Each module below owns one stage's queries:
//! `log.rs` the event log and its append order, `sources.rs` sources and
//! tokens, `identity.rs` the identity graph, `audience.rs` audiences and
//! memberships, `outbox.rs` destinations and their outbox, `insight.rs`
//! goals and their daily rollups, `session.rs` the console's sessions,
//! `lease.rs` the stage leases (advisory locks held on
//! connections outside the pool), `tls.rs` how connections are encrypted and
//! the server's certificate checked (`sslmode`, `sslrootcert`). The schema is created and
//! upgraded here, by numbered migrations recorded in `schema_migrations`.
//!
//! Text that may hold what PostgreSQL's `TEXT` cannot (a NUL character,
//! which JSON carries as `\u0000` and a client can put in a `messageId` or
//! an identifier) is stored as UTF-8 in `BYTEA`: message ids, event
//! payloads, quarantined messages, identifier values (also as the
//! `type:value` a history entry dropped) and the reasons events went
//! unresolved (which quote identifiers). Otherwise one such request would
//! fail every request grouped into the same append, or stop the resolver.
//! Text Tandem writes itself (profile and history JSON, which escape NUL;
//! names, codes) stays `TEXT`. To read a payload in `psql`:
//! `convert_from(payload, 'UTF8')`.

mod audience;
mod audit;
mod computed;
mod govern;
mod identity;
mod insight;
mod inventory;
mod lease;
mod log;
mod outbox;
mod pool;
mod session;
mod sources;
pub mod testing;
pub mod tls;

use crate::StoreError;
use pool::Pool;
use postgres::{Client, Config};
use std::time::Duration;

pub use pool::PoolExhausted;

/// Connections one store opens at most, unless told otherwise: enough for
/// the log writer, the resolver and a few API readers at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

/// How long opening a connection may take before it counts as a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The advisory lock that lets one node at a time migrate the schema.
const MIGRATION_LOCK: i64 = 0x7461_6e64_656d_0001;

/// Schema versions, applied in order; version N is `MIGRATIONS[N - 1]` and
/// its row in `schema_migrations` is written in the same transaction. The
/// logical schema is SQLite's (see `sqlite.rs`), in PostgreSQL's types.
const MIGRATIONS: &[&str] = &[
    // 1: sources and tokens, the event log (with its head counter, dedup,
    // quarantine and ingest counters), stage cursors, the identity graph.
    r#"CREATE TABLE sources (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        write_key TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL,
        webhook TEXT,
        listed_order BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE TABLE api_tokens (
        id TEXT COLLATE "C" PRIMARY KEY,
        name TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE log_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        position BIGINT NOT NULL
    );
    INSERT INTO log_head (id, position) VALUES (1, 0);
    CREATE TABLE events (
        position BIGINT PRIMARY KEY,
        source_id TEXT NOT NULL,
        message_id BYTEA NOT NULL,
        event_type TEXT NOT NULL,
        received_at BIGINT NOT NULL,
        timestamp_ms BIGINT NOT NULL,
        payload BYTEA NOT NULL
    );
    CREATE TABLE message_ids (
        source_id TEXT NOT NULL,
        message_id BYTEA NOT NULL,
        received_at BIGINT NOT NULL,
        PRIMARY KEY (source_id, message_id)
    );
    CREATE INDEX message_ids_by_received_at ON message_ids (received_at)
        WHERE received_at < 9223372036854775807;
    CREATE TABLE quarantine (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        source_id TEXT NOT NULL,
        received_at BIGINT NOT NULL,
        batch_index BIGINT,
        code TEXT NOT NULL,
        field BYTEA,
        message BYTEA NOT NULL,
        payload BYTEA NOT NULL
    );
    CREATE TABLE ingest_counters (
        source_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        stored BIGINT NOT NULL DEFAULT 0,
        duplicates BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (source_id, event_type)
    );
    CREATE TABLE stage_cursors (
        stage TEXT PRIMARY KEY,
        position BIGINT NOT NULL,
        epoch BIGINT NOT NULL
    );
    INSERT INTO stage_cursors (stage, position, epoch) VALUES ('resolve', 0, 0);
    CREATE TABLE profiles (
        id BIGINT PRIMARY KEY,
        merged_into BIGINT,
        state TEXT
    );
    CREATE INDEX profiles_by_merged_into ON profiles (merged_into) WHERE merged_into IS NOT NULL;
    CREATE TABLE identifiers (
        type TEXT NOT NULL,
        value BYTEA NOT NULL,
        profile_id BIGINT NOT NULL,
        PRIMARY KEY (type, value)
    );
    CREATE INDEX identifiers_by_profile ON identifiers (profile_id);
    CREATE TABLE profile_events (
        profile_id BIGINT NOT NULL,
        timestamp_ms BIGINT NOT NULL,
        position BIGINT NOT NULL,
        PRIMARY KEY (profile_id, timestamp_ms, position)
    );
    CREATE TABLE identity_history (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        position BIGINT,
        profile_id BIGINT,
        change TEXT NOT NULL,
        recorded_at BIGINT NOT NULL,
        dropped BYTEA
    );
    CREATE INDEX identity_history_by_profile ON identity_history (profile_id);
    CREATE INDEX identity_history_by_position ON identity_history (position);
    CREATE INDEX identity_history_by_dropped ON identity_history (dropped) WHERE dropped IS NOT NULL;
    CREATE TABLE identity_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        next_profile_id BIGINT NOT NULL,
        rules TEXT
    );
    INSERT INTO identity_state (id, next_profile_id, rules) VALUES (1, 1, NULL);
    CREATE TABLE unresolved_events (
        position BIGINT PRIMARY KEY,
        reason BYTEA NOT NULL
    );"#,
    // 2: audiences (see `sqlite.rs`, migration 8).
    r#"CREATE TABLE audiences (
        name TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        backfilled BOOLEAN NOT NULL,
        backfill_after BIGINT NOT NULL,
        size BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE audience_members (
        audience TEXT NOT NULL,
        profile_id BIGINT NOT NULL,
        entered_at BIGINT NOT NULL,
        PRIMARY KEY (audience, profile_id)
    );
    CREATE INDEX audience_members_by_profile ON audience_members (profile_id);
    CREATE TABLE audience_history (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        audience TEXT NOT NULL,
        profile_id BIGINT NOT NULL,
        change TEXT NOT NULL,
        at BIGINT NOT NULL
    );
    CREATE INDEX audience_history_by_member ON audience_history (audience, profile_id);
    CREATE TABLE audience_states (
        audience TEXT NOT NULL,
        profile_id BIGINT NOT NULL,
        state TEXT NOT NULL,
        next_change_at BIGINT,
        PRIMARY KEY (audience, profile_id)
    );
    CREATE INDEX audience_states_by_profile ON audience_states (profile_id);
    CREATE INDEX audience_states_by_timer ON audience_states (next_change_at) WHERE next_change_at IS NOT NULL;"#,
    // 3: the live profile count, kept by every identity commit (see `sqlite.rs`, migration 9).
    r#"ALTER TABLE identity_state ADD COLUMN live_profiles BIGINT NOT NULL DEFAULT 0;
    UPDATE identity_state SET live_profiles = (SELECT COUNT(*) FROM profiles WHERE state IS NOT NULL);"#,
    // 4: computed traits (see `sqlite.rs`, migration 10).
    r#"CREATE TABLE computed_traits (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        backfilled BOOLEAN NOT NULL,
        backfill_after BIGINT NOT NULL
    );
    CREATE TABLE computed_trait_states (
        name TEXT NOT NULL,
        profile_id BIGINT NOT NULL,
        state TEXT NOT NULL,
        value TEXT,
        next_change_at BIGINT,
        PRIMARY KEY (name, profile_id)
    );
    CREATE INDEX computed_trait_states_by_profile ON computed_trait_states (profile_id);
    CREATE INDEX computed_trait_states_by_timer ON computed_trait_states (next_change_at)
        WHERE next_change_at IS NOT NULL;"#,
    // 5: destinations, their outbox and dead letters (see `sqlite.rs`,
    // migration 11). Outbox ids come from an identity that never reuses a
    // value, and a replayed dead letter is inserted with its own id.
    r#"CREATE TABLE destinations (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        delivered BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE outbox (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        destination TEXT NOT NULL,
        position BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        first_failed_at BIGINT,
        next_attempt_at BIGINT NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE INDEX outbox_by_destination ON outbox (destination, id);
    CREATE TABLE dead_letters (
        id BIGINT PRIMARY KEY,
        destination TEXT NOT NULL,
        position BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        attempts INTEGER NOT NULL,
        last_error TEXT NOT NULL,
        dead_at BIGINT NOT NULL
    );
    CREATE INDEX dead_letters_by_destination ON dead_letters (destination, id);"#,
    // 6: a destination can be paused (see `sqlite.rs`, migration 12).
    r#"ALTER TABLE destinations ADD COLUMN paused BOOLEAN NOT NULL DEFAULT FALSE;"#,
    // 7: how far the drain stage has appended the event stream (see `sqlite.rs`, migration 13).
    r#"CREATE TABLE stream_cursors (
        stream TEXT PRIMARY KEY,
        sequence BIGINT NOT NULL
    );"#,
    // 8: the profile an outbox item is about (see `sqlite.rs`, migration 14).
    r#"ALTER TABLE outbox ADD COLUMN profile_id BIGINT;
    ALTER TABLE dead_letters ADD COLUMN profile_id BIGINT;
    ALTER TABLE outbox ADD COLUMN enqueued_at BIGINT;
    ALTER TABLE dead_letters ADD COLUMN enqueued_at BIGINT;
    CREATE INDEX dead_letters_by_time ON dead_letters (dead_at);"#,
    // 9: token roles, expiry and last use; the audit log (see `sqlite.rs`, migration 15).
    r#"ALTER TABLE api_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
    ALTER TABLE api_tokens ADD COLUMN expires_at BIGINT;
    ALTER TABLE api_tokens ADD COLUMN last_used_at BIGINT;
    CREATE TABLE audit_log (
        seq BIGINT PRIMARY KEY,
        at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        before TEXT,
        after TEXT,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_log_by_actor ON audit_log (actor, seq);
    CREATE INDEX audit_log_by_time ON audit_log (at);"#,
    // 10: the PII inventory (see `sqlite.rs`, migration 16).
    r#"CREATE TABLE pii_keys (
        key TEXT COLLATE "C" NOT NULL,
        source_id TEXT COLLATE "C" NOT NULL,
        class TEXT NOT NULL,
        last_seen BIGINT NOT NULL,
        PRIMARY KEY (key, source_id)
    );"#,
    // 11: tracking plans and their violations (see `sqlite.rs`, migration 17).
    r#"CREATE TABLE tracking_plans (
        source_id TEXT PRIMARY KEY,
        plan TEXT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE plan_violations (
        source_id TEXT NOT NULL,
        kind TEXT COLLATE "C" NOT NULL,
        event_name TEXT COLLATE "C" NOT NULL,
        path TEXT COLLATE "C" NOT NULL,
        count BIGINT NOT NULL,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        message TEXT NOT NULL,
        sample TEXT NOT NULL,
        PRIMARY KEY (source_id, kind, event_name, path)
    );"#,
    // 12: data subject requests and suppressions (see `sqlite.rs`, migration 18).
    r#"CREATE TABLE dsr_requests (
        id TEXT COLLATE "C" PRIMARY KEY,
        kind TEXT NOT NULL,
        subject_digest TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        finished_at BIGINT,
        detail TEXT
    );
    CREATE TABLE suppressions (
        digest TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL
    );"#,
    // 13: consent (see `sqlite.rs`, migration 19).
    r#"CREATE TABLE profile_consent (
        profile_id BIGINT NOT NULL,
        category TEXT COLLATE "C" NOT NULL,
        granted BOOLEAN NOT NULL,
        position BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (profile_id, category)
    );
    CREATE TABLE consent_history (
        profile_id BIGINT NOT NULL,
        category TEXT COLLATE "C" NOT NULL,
        granted BOOLEAN NOT NULL,
        position BIGINT NOT NULL,
        at BIGINT NOT NULL,
        PRIMARY KEY (profile_id, category, position)
    );
    CREATE TABLE consent_withheld (
        destination TEXT NOT NULL,
        category TEXT COLLATE "C" NOT NULL,
        count BIGINT NOT NULL,
        PRIMARY KEY (destination, category)
    );"#,
    // 14: the stack registry and unknown write keys (see `sqlite.rs`, migration 20).
    r#"CREATE TABLE tool_registry (
        kind TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        info TEXT NOT NULL,
        PRIMARY KEY (kind, key)
    );
    CREATE TABLE shadow_keys (
        key_digest TEXT COLLATE "C" PRIMARY KEY,
        key_hint TEXT NOT NULL,
        requests BIGINT NOT NULL,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        ips TEXT NOT NULL,
        user_agents TEXT NOT NULL
    );"#,
    // 15: when each source last sent an event (see `sqlite.rs`, migration 21).
    r#"ALTER TABLE ingest_counters ADD COLUMN last_received_at BIGINT;
    UPDATE ingest_counters SET last_received_at = latest.at
        FROM (SELECT source_id, event_type, MAX(received_at) AS at FROM events GROUP BY source_id, event_type)
            AS latest
        WHERE latest.source_id = ingest_counters.source_id AND latest.event_type = ingest_counters.event_type;"#,
    // 16: identity merges and drops, newest first (see `sqlite.rs`, migration 22).
    r#"CREATE INDEX identity_history_merges_and_drops ON identity_history (id)
        WHERE dropped IS NOT NULL OR substr(change, 1, 16) = '{"kind":"merged"';"#,
    // 17: when each destination last delivered (see `sqlite.rs`, migration 23).
    "ALTER TABLE destinations ADD COLUMN last_delivered_at BIGINT;",
    // 18: PII rules set by users (see `sqlite.rs`, migration 24).
    r#"CREATE TABLE pii_rules (
        kind TEXT COLLATE "C" NOT NULL,
        matcher TEXT COLLATE "C" NOT NULL,
        class TEXT NOT NULL,
        policy TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (kind, matcher)
    );"#,
    // 19: goals, their trackers, day values, per-profile states, snapshots
    // and ingest latency (see `sqlite.rs`, migration 25).
    r#"CREATE TABLE goals (
        name TEXT COLLATE "C" PRIMARY KEY,
        settings TEXT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE insight_trackers (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        spec TEXT COLLATE "C" NOT NULL UNIQUE,
        started BOOLEAN NOT NULL DEFAULT FALSE,
        done BOOLEAN NOT NULL DEFAULT FALSE,
        backfill_after BIGINT NOT NULL DEFAULT 0,
        backfill_through BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE goal_trackers (
        goal TEXT COLLATE "C" NOT NULL,
        spec TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (goal, spec)
    );
    CREATE TABLE insight_days (
        tracker_id BIGINT NOT NULL,
        series TEXT COLLATE "C" NOT NULL,
        day INTEGER NOT NULL,
        value DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tracker_id, series, day)
    );
    CREATE TABLE insight_profile_states (
        tracker_id BIGINT NOT NULL,
        profile_id BIGINT NOT NULL,
        state TEXT NOT NULL,
        PRIMARY KEY (tracker_id, profile_id)
    );
    CREATE TABLE insight_snapshots (
        key TEXT COLLATE "C" NOT NULL,
        day INTEGER NOT NULL,
        value DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (key, day)
    );
    CREATE TABLE ingest_latency (
        day INTEGER NOT NULL,
        bucket INTEGER NOT NULL,
        count BIGINT NOT NULL,
        PRIMARY KEY (day, bucket)
    );"#,
    // 20: the console's sessions (see `sqlite.rs`, migration 26).
    r#"CREATE TABLE console_sessions (
        id_sha256 TEXT COLLATE "C" PRIMARY KEY,
        csrf TEXT NOT NULL,
        token_id TEXT COLLATE "C",
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at);
    CREATE INDEX console_sessions_by_token ON console_sessions (token_id) WHERE token_id IS NOT NULL;"#,
    // 21: the owners of a range of log positions (see `sqlite.rs`, migration 27).
    r#"CREATE INDEX profile_events_by_position ON profile_events (position) INCLUDE (profile_id);"#,
    // 22: outbox counts from the index alone (see `sqlite.rs`, migration 28).
    r#"DROP INDEX outbox_by_destination;
    CREATE INDEX outbox_by_destination ON outbox (destination, id) INCLUDE (attempts);"#,
];

/// The PostgreSQL implementation of [`crate::Store`].
pub struct PostgresStore {
    pool: Pool,
    /// The throwaway database a test made for this store, dropped with it.
    #[cfg(test)]
    test_database: Option<testing::TestDatabase>,
}

impl From<postgres::Error> for StoreError {
    fn from(error: postgres::Error) -> Self {
        StoreError::Backend(Box::new(error))
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db` or
    /// `host=… user=… dbname=…`) and applies any pending migrations. TLS is
    /// as the URL's `sslmode` and `sslrootcert` say, read as libpq reads
    /// them (see [`tls`]): by default it is used when the server offers it.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let (rest, tls) = tls::split_settings(url)?;
        let mut config: Config = rest.parse()?;
        let connector = tls::Connector::new(&tls, &mut config)?;
        Self::open(config, connector, DEFAULT_MAX_CONNECTIONS)
    }

    /// Like [`PostgresStore::connect`], with the connection settings parsed
    /// and the most connections this store opens at once (at least one).
    /// TLS is as the settings' own `sslmode` says (`disable`, `prefer` or
    /// `require`), without checking the server's certificate.
    pub fn connect_with(mut config: Config, max_connections: usize) -> Result<Self, StoreError> {
        let connector = tls::connector_for(&mut config);
        Self::open(config, connector, max_connections)
    }

    fn open(mut config: Config, connector: tls::Connector, max_connections: usize) -> Result<Self, StoreError> {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("tandem");
        let store = PostgresStore {
            pool: Pool::new(config, connector, max_connections),
            #[cfg(test)]
            test_database: None,
        };
        store.with_client(migrate)?;
        Ok(store)
    }

    /// The schema version this build creates and understands.
    pub fn schema_version() -> i64 {
        MIGRATIONS.len() as i64
    }

    /// Runs `work` on a pooled connection (see `pool.rs`).
    fn with_client<T>(&self, work: impl FnOnce(&mut Client) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.pool.run(work)
    }
}

/// Brings the schema to [`MIGRATIONS`]' version under an advisory lock, so
/// nodes starting together migrate once; refuses a schema from a newer build.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let mut transaction = client.transaction()?;
    transaction.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    transaction.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )?;
    let found: i64 =
        transaction.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])?.try_get(0)?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as i64 + 1;
        transaction.batch_execute(migration)?;
        transaction.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&version])?;
        tracing::debug!(version, "applied postgresql migration");
    }
    transaction.commit()?;
    Ok(())
}

/// Text stored as `BYTEA` (see the module header), read back.
fn text_from_bytes(bytes: Vec<u8>) -> Result<String, StoreError> {
    String::from_utf8(bytes).map_err(|error| StoreError::Backend(Box::new(error)))
}

fn json_error(error: serde_json::Error) -> StoreError {
    StoreError::Backend(Box::new(error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;
    use tandem_core::SourceKind;

    crate::store_test_suite!(|_dir: &std::path::Path| testing::fresh_store());

    impl crate::suite::audit::RawSql for PostgresStore {
        fn raw_sql(&self, statement: &str) {
            self.with_client(|client| Ok(client.batch_execute(statement)?)).expect("raw sql");
        }
    }

    #[test]
    fn reconnecting_keeps_everything_and_does_not_migrate_twice() {
        let Some(store) = testing::fresh_store() else { return };
        let source = store.create_source("web", SourceKind::Website).unwrap();
        let again = PostgresStore::connect_with(store.pool.config().clone(), 4).unwrap();
        assert_eq!(again.list_sources().unwrap(), vec![source]);
        let versions: Vec<i64> = store
            .with_client(|client| {
                Ok(client
                    .query("SELECT version FROM schema_migrations ORDER BY version", &[])?
                    .iter()
                    .map(|row| row.get(0))
                    .collect())
            })
            .unwrap();
        assert_eq!(versions, (1..=PostgresStore::schema_version()).collect::<Vec<_>>());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let Some(store) = testing::fresh_store() else { return };
        store
            .with_client(|client| Ok(client.execute("INSERT INTO schema_migrations (version) VALUES (99)", &[])?))
            .unwrap();
        assert!(matches!(
            PostgresStore::connect_with(store.pool.config().clone(), 4),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }

    #[test]
    fn nodes_starting_together_migrate_once() {
        let Some(store) = testing::fresh_store() else { return };
        store
            .with_client(|client| Ok(client.batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")?))
            .unwrap();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    PostgresStore::connect_with(store.pool.config().clone(), 4).expect("connect and migrate")
                });
            }
        });
        assert_eq!(store.head().unwrap(), tandem_core::LogPosition(0));
        assert_eq!(store.stage_cursor(crate::Stage::RESOLVE).unwrap().map(|cursor| cursor.epoch), Some(0));
    }

    #[test]
    fn a_broken_connection_is_not_reused() {
        let Some(store) = testing::fresh_store() else { return };
        store.create_source("web", SourceKind::Website).unwrap();
        let failed =
            store.with_client(|client| Ok(client.batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")?));
        assert!(matches!(failed, Err(StoreError::Backend(_))));
        assert_eq!(store.pool.open(), 0, "the dead connection was closed");
        assert_eq!(store.list_sources().unwrap().len(), 1, "the next call opens a fresh connection");
    }

    #[test]
    fn callers_beyond_the_connection_bound_wait_for_a_connection() {
        let Some(fresh) = testing::fresh_store() else { return };
        let store = PostgresStore::connect_with(fresh.pool.config().clone(), 2).unwrap();
        let (busy, peak) = (std::sync::atomic::AtomicUsize::new(0), std::sync::atomic::AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for _ in 0..6 {
                scope.spawn(|| {
                    store
                        .with_client(|client| {
                            let now = busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                            peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                            client.batch_execute("SELECT pg_sleep(0.05)")?;
                            busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            Ok(())
                        })
                        .unwrap();
                });
            }
        });
        assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 2, "two at a time, the others waited");
        assert_eq!(store.pool.open(), 2);
        let backends: i64 = store
            .with_client(|client| {
                Ok(client
                    .query_one(
                        "SELECT COUNT(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND application_name = 'tandem'",
                        &[],
                    )?
                    .get(0))
            })
            .unwrap();
        assert_eq!(backends as usize, fresh.pool.open() + store.pool.open(), "no connection beyond the pools'");
    }

    #[test]
    fn an_unreachable_server_is_a_storage_error() {
        let error = PostgresStore::connect("postgres://postgres@127.0.0.1:1/none?connect_timeout=2").err().unwrap();
        assert!(matches!(error, StoreError::Backend(_)), "{error}");
        assert!(PostgresStore::connect("postgres://[not a url").is_err());
    }
}
