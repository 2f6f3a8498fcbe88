//! The embedded backend: one SQLite file in WAL mode. One connection writes
//! (the log writer's group commits and the rare admin change), a small pool
//! reads, so readers never block the writer. Each commit is fsynced
//! (`synchronous = FULL`), which is what makes an acknowledgement durable.

mod audience;
mod audit;
mod checkpoint;
mod computed;
mod govern;
mod identity;
mod insight;
mod inventory;
mod manage;
mod outbox;
mod profile_state;
mod session;

use crate::{
    AudienceCommit, AudienceCommitOutcome, AudienceDefinition, AudienceRecord, AudienceStore, CommitOutcome, Dedup,
    DrainCommit, EventLog, HistoryRecord, IdentityCommit, IdentityRepair, IdentityState, IdentityStore, IngestBatch,
    IngestOutcome, IngestStats, LogEntry, LogFilter, Membership, MembershipChange, QuarantineEntry, QuarantineRecord,
    SourceStats, Sources, Stage, StageCursor, StoreError, StoredAudienceState, StreamRange, TimelineCursor, TokenInfo,
    UnresolvedEvent,
};
use crate::{ComputedTraitRecord, StoredComputedTrait};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use tandem_core::audience::ComputedTraitDefinition;
use tandem_core::webhook::WebhookSettings;
use tandem_core::{
    EventType, Identifier, IdentityRules, LogPosition, MessageId, Profile, ProfileId, Source, SourceId, SourceKind,
    WriteKey,
};

/// The file inside the data directory.
pub const DATABASE_FILE: &str = "tandem.db";

/// The size the write-ahead log file is cut back to when it restarts.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 << 20;

/// Schema versions, applied in order; the index + 1 is `PRAGMA user_version`.
const MIGRATIONS: &[&str] = &[
    // 1: sources, the event log, dedup, quarantine, ingest counters.
    "CREATE TABLE sources (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        write_key TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE events (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        source_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        type TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        timestamp INTEGER NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE TABLE message_ids (
        source_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        PRIMARY KEY (source_id, message_id)
    ) WITHOUT ROWID;
    CREATE INDEX message_ids_by_received_at ON message_ids (received_at);
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        source_id TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        batch_index INTEGER,
        code TEXT NOT NULL,
        field TEXT,
        message TEXT NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE TABLE ingest_counters (
        source_id TEXT NOT NULL,
        type TEXT NOT NULL,
        stored INTEGER NOT NULL DEFAULT 0,
        duplicates INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (source_id, type)
    ) WITHOUT ROWID;",
    // 2: identity resolution and profiles; admin API tokens.
    "CREATE TABLE profiles (
        id INTEGER PRIMARY KEY,
        merged_into INTEGER,
        state TEXT
    );
    CREATE INDEX profiles_by_merged_into ON profiles (merged_into) WHERE merged_into IS NOT NULL;
    CREATE TABLE identifiers (
        type TEXT NOT NULL,
        value TEXT NOT NULL,
        profile_id INTEGER NOT NULL,
        PRIMARY KEY (type, value)
    ) WITHOUT ROWID;
    CREATE INDEX identifiers_by_profile ON identifiers (profile_id);
    CREATE TABLE profile_events (
        profile_id INTEGER NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (profile_id, position)
    ) WITHOUT ROWID;
    CREATE TABLE identity_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        position INTEGER,
        profile_id INTEGER,
        change TEXT NOT NULL,
        recorded_at INTEGER NOT NULL
    );
    CREATE INDEX identity_history_by_profile ON identity_history (profile_id);
    CREATE TABLE identity_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        position INTEGER NOT NULL,
        next_profile_id INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        rules TEXT
    );
    INSERT INTO identity_state (id, position, next_profile_id, epoch, rules) VALUES (1, 0, 1, 0, NULL);
    CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );",
    // 3: message ids kept for good (imports, webhooks) stay out of the
    // pruner's index: they all share one stamp, and indexing them would make
    // every imported row a second random B-tree insert. Webhook settings.
    "DROP INDEX message_ids_by_received_at;
    CREATE INDEX message_ids_by_received_at ON message_ids (received_at)
        WHERE received_at < 9223372036854775807;
    ALTER TABLE sources ADD COLUMN webhook TEXT;",
    // 4: every stage's log position and epoch in one table, written in the
    // same transaction as that stage's effects.
    "CREATE TABLE stage_cursors (
        stage TEXT PRIMARY KEY,
        position INTEGER NOT NULL,
        epoch INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO stage_cursors (stage, position, epoch)
        SELECT 'resolve', position, epoch FROM identity_state WHERE id = 1;
    ALTER TABLE identity_state DROP COLUMN position;
    ALTER TABLE identity_state DROP COLUMN epoch;",
    // 5: events the resolver could not use, listed rather than skipped.
    "CREATE TABLE unresolved_events (
        position INTEGER PRIMARY KEY,
        reason TEXT NOT NULL
    );",
    // 6: timelines ordered by event time: each profile's event links carry
    // the event's timestamp, and the key is (profile, timestamp, position).
    "CREATE TABLE profile_events_by_time (
        profile_id INTEGER NOT NULL,
        timestamp INTEGER NOT NULL,
        position INTEGER NOT NULL,
        PRIMARY KEY (profile_id, timestamp, position)
    ) WITHOUT ROWID;
    INSERT INTO profile_events_by_time (profile_id, timestamp, position)
        SELECT p.profile_id, e.timestamp, p.position FROM profile_events p JOIN events e ON e.position = p.position;
    DROP TABLE profile_events;
    ALTER TABLE profile_events_by_time RENAME TO profile_events;",
    // 7: repairs replay only the part of the graph an identifier touched:
    // they find the events that dropped an identifier, and replace the
    // history of the events they replay.
    "ALTER TABLE identity_history ADD COLUMN dropped TEXT;
    UPDATE identity_history
        SET dropped = json_extract(change, '$.identifier.type') || ':' || json_extract(change, '$.identifier.value')
        WHERE json_extract(change, '$.kind') = 'dropped';
    CREATE INDEX identity_history_by_dropped ON identity_history (dropped) WHERE dropped IS NOT NULL;
    CREATE INDEX identity_history_by_position ON identity_history (position);",
    // 8: audiences: definitions (with how far a new one is backfilled, and
    // their number of members, kept by each commit so listing is cheap),
    // memberships and their history, per-profile evaluation states with the
    // instant time alone changes their answer (the due-timer).
    "CREATE TABLE audiences (
        name TEXT PRIMARY KEY,
        rule TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        backfilled INTEGER NOT NULL,
        backfill_after INTEGER NOT NULL,
        size INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE audience_members (
        audience TEXT NOT NULL,
        profile_id INTEGER NOT NULL,
        entered_at INTEGER NOT NULL,
        PRIMARY KEY (audience, profile_id)
    ) WITHOUT ROWID;
    CREATE INDEX audience_members_by_profile ON audience_members (profile_id);
    CREATE TABLE audience_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        audience TEXT NOT NULL,
        profile_id INTEGER NOT NULL,
        change TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX audience_history_by_member ON audience_history (audience, profile_id);
    CREATE TABLE audience_states (
        audience TEXT NOT NULL,
        profile_id INTEGER NOT NULL,
        state TEXT NOT NULL,
        next_change_at INTEGER,
        PRIMARY KEY (audience, profile_id)
    ) WITHOUT ROWID;
    CREATE INDEX audience_states_by_profile ON audience_states (profile_id);
    CREATE INDEX audience_states_by_timer ON audience_states (next_change_at) WHERE next_change_at IS NOT NULL;",
    // 9: the live profile count, kept by every identity commit, so the
    // resolver's start and `stats` do not count a table of millions of rows.
    "ALTER TABLE identity_state ADD COLUMN live_profiles INTEGER NOT NULL DEFAULT 0;
    UPDATE identity_state SET live_profiles = (SELECT COUNT(*) FROM profiles WHERE state IS NOT NULL);",
    // 10: computed traits: definitions (with how far a new one is
    // backfilled), and per profile the incremental state, the current value
    // (JSON text, NULL for none) and the due-timer, kept by the audience
    // stage's commit.
    "CREATE TABLE computed_traits (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        backfilled INTEGER NOT NULL,
        backfill_after INTEGER NOT NULL
    );
    CREATE TABLE computed_trait_states (
        name TEXT NOT NULL,
        profile_id INTEGER NOT NULL,
        state TEXT NOT NULL,
        value TEXT,
        next_change_at INTEGER,
        PRIMARY KEY (name, profile_id)
    ) WITHOUT ROWID;
    CREATE INDEX computed_trait_states_by_profile ON computed_trait_states (profile_id);
    CREATE INDEX computed_trait_states_by_timer ON computed_trait_states (next_change_at)
        WHERE next_change_at IS NOT NULL;",
    // 11: destinations (with the number of items delivered), each
    // destination's outbox in enqueue order (the id: never reused, so a
    // replayed dead letter takes back its place), dead letters.
    "CREATE TABLE destinations (
        name TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        delivered INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        destination TEXT NOT NULL,
        position INTEGER NOT NULL,
        payload TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        first_failed_at INTEGER,
        next_attempt_at INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE INDEX outbox_by_destination ON outbox (destination, id);
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY,
        destination TEXT NOT NULL,
        position INTEGER NOT NULL,
        payload TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        last_error TEXT NOT NULL,
        dead_at INTEGER NOT NULL
    );
    CREATE INDEX dead_letters_by_destination ON dead_letters (destination, id);",
    // 12: a destination can be paused (its items are kept, in order, unsent).
    "ALTER TABLE destinations ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;",
    // 13: how far the drain stage has appended an external event stream
    // (NATS JetStream) into the log, written in the same transaction as the
    // events it appended.
    "CREATE TABLE stream_cursors (
        stream TEXT PRIMARY KEY,
        sequence INTEGER NOT NULL
    );",
    // 14: the profile an outbox item is about, kept into the dead letters
    // so they can be listed and replayed per profile and by time.
    // The time each item was first enqueued measures a destination's lag.
    "ALTER TABLE outbox ADD COLUMN profile_id INTEGER;
    ALTER TABLE dead_letters ADD COLUMN profile_id INTEGER;
    ALTER TABLE outbox ADD COLUMN enqueued_at INTEGER;
    ALTER TABLE dead_letters ADD COLUMN enqueued_at INTEGER;
    CREATE INDEX dead_letters_by_time ON dead_letters (dead_at);",
    // 15: tokens have a role (the tokens made before roles keep all their
    // power as `admin`), an optional expiry and when they were last used;
    // the audit log, each entry chained to the one before by its hash.
    "ALTER TABLE api_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
    ALTER TABLE api_tokens ADD COLUMN expires_at INTEGER;
    ALTER TABLE api_tokens ADD COLUMN last_used_at INTEGER;
    CREATE TABLE audit_log (
        seq INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
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
    CREATE INDEX audit_log_by_time ON audit_log (at);",
    // 16: the PII inventory: every trait and property key seen, per source.
    "CREATE TABLE pii_keys (
        key TEXT NOT NULL,
        source_id TEXT NOT NULL,
        class TEXT NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (key, source_id)
    ) WITHOUT ROWID;",
    // 17: tracking plans (one per source, the JSON document) and their
    // violations, counted per source, kind, event and path with the latest
    // message and sample.
    "CREATE TABLE tracking_plans (
        source_id TEXT PRIMARY KEY,
        plan TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE plan_violations (
        source_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        event_name TEXT NOT NULL,
        path TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        message TEXT NOT NULL,
        sample TEXT NOT NULL,
        PRIMARY KEY (source_id, kind, event_name, path)
    ) WITHOUT ROWID;",
    // 18: data subject requests (the person named only by a digest of the
    // identifier) and suppressed identifiers (digests only).
    "CREATE TABLE dsr_requests (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        subject_digest TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        finished_at INTEGER,
        detail TEXT
    );
    CREATE TABLE suppressions (
        digest TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // 19: consent: each profile's current value per category (from the
    // event at `position`), its history, and deliveries withheld per
    // destination and category.
    "CREATE TABLE profile_consent (
        profile_id INTEGER NOT NULL,
        category TEXT NOT NULL,
        granted INTEGER NOT NULL,
        position INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (profile_id, category)
    ) WITHOUT ROWID;
    CREATE TABLE consent_history (
        profile_id INTEGER NOT NULL,
        category TEXT NOT NULL,
        granted INTEGER NOT NULL,
        position INTEGER NOT NULL,
        at INTEGER NOT NULL,
        PRIMARY KEY (profile_id, category, position)
    ) WITHOUT ROWID;
    CREATE TABLE consent_withheld (
        destination TEXT NOT NULL,
        category TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (destination, category)
    ) WITHOUT ROWID;",
    // 20: the stack registry (a source by id, a destination by name; the
    // entry as JSON) and traffic with write keys matching no source, by the
    // key's digest, with samples of addresses and user agents.
    "CREATE TABLE tool_registry (
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        info TEXT NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;
    CREATE TABLE shadow_keys (
        key_digest TEXT PRIMARY KEY,
        key_hint TEXT NOT NULL,
        requests INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        ips TEXT NOT NULL,
        user_agents TEXT NOT NULL
    ) WITHOUT ROWID;",
    // 21: when each source last sent an event, kept with its counters by
    // every append so the console's stack page reads it without scanning
    // the log; filled once here from the log itself.
    "ALTER TABLE ingest_counters ADD COLUMN last_received_at INTEGER;
    UPDATE ingest_counters SET last_received_at = latest.at
        FROM (SELECT source_id, type, MAX(received_at) AS at FROM events GROUP BY source_id, type) AS latest
        WHERE latest.source_id = ingest_counters.source_id AND latest.type = ingest_counters.type;",
    // 22: identity merges and drops, newest first, without reading the
    // creations and attachments around them (most of the history): a
    // partial index over just those entries. A merge's change is stored
    // as JSON starting with its tag.
    "CREATE INDEX identity_history_merges_and_drops ON identity_history (id)
        WHERE dropped IS NOT NULL OR substr(change, 1, 16) = '{\"kind\":\"merged\"';",
    // 23: when each destination last had an item delivered, kept by every
    // delivery, for the stack's "last event" of a destination.
    "ALTER TABLE destinations ADD COLUMN last_delivered_at INTEGER;",
    // 24: PII rules set by users at run time (`tandem pii set`, the API),
    // keyed by what they match (an exact name, kept in lower case, or a
    // pattern); `created_at` keeps a pattern's place when it is set again.
    "CREATE TABLE pii_rules (
        kind TEXT NOT NULL,
        matcher TEXT NOT NULL,
        class TEXT NOT NULL,
        policy TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (kind, matcher)
    ) WITHOUT ROWID;",
    // 25: goals and the trackers they share (a tracker's spec is its
    // canonical JSON; its id is never reused), each tracker's values per
    // UTC day and per-profile states, snapshots of counters per day, and
    // ingest latency histograms per day.
    "CREATE TABLE goals (
        name TEXT PRIMARY KEY,
        settings TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE insight_trackers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        spec TEXT NOT NULL UNIQUE,
        started INTEGER NOT NULL DEFAULT 0,
        done INTEGER NOT NULL DEFAULT 0,
        backfill_after INTEGER NOT NULL DEFAULT 0,
        backfill_through INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE goal_trackers (
        goal TEXT NOT NULL,
        spec TEXT NOT NULL,
        PRIMARY KEY (goal, spec)
    ) WITHOUT ROWID;
    CREATE TABLE insight_days (
        tracker_id INTEGER NOT NULL,
        series TEXT NOT NULL,
        day INTEGER NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (tracker_id, series, day)
    ) WITHOUT ROWID;
    CREATE TABLE insight_profile_states (
        tracker_id INTEGER NOT NULL,
        profile_id INTEGER NOT NULL,
        state TEXT NOT NULL,
        PRIMARY KEY (tracker_id, profile_id)
    ) WITHOUT ROWID;
    CREATE TABLE insight_snapshots (
        key TEXT NOT NULL,
        day INTEGER NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (key, day)
    ) WITHOUT ROWID;
    CREATE TABLE ingest_latency (
        day INTEGER NOT NULL,
        bucket INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (day, bucket)
    ) WITHOUT ROWID;",
    // 26: the console's sessions, by the SHA-256 of their id (never the id
    // itself), naming the signed-in token by id; expired ones are found by
    // expiry, a revoked token's by token.
    "CREATE TABLE console_sessions (
        id_sha256 TEXT PRIMARY KEY,
        csrf TEXT NOT NULL,
        token_id TEXT,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at);
    CREATE INDEX console_sessions_by_token ON console_sessions (token_id) WHERE token_id IS NOT NULL;",
    // 27: the owners of a range of log positions (what the stages after the
    // resolver ask for every batch) are found by position, not by scanning
    // every timeline; positions only grow, so each commit appends at the
    // index's right edge.
    "CREATE INDEX profile_events_by_position ON profile_events (position, profile_id);",
    // 28: a destination's pending and retrying items are counted from the
    // index alone: with the attempts in it, counting a backlog reads no
    // item (each read a payload's pages before).
    "DROP INDEX outbox_by_destination;
    CREATE INDEX outbox_by_destination ON outbox (destination, id, attempts);",
];

/// The `received_at` of a message id kept for good ([`Dedup::Forever`]).
const KEPT_FOREVER: i64 = i64::MAX;

const READER_POOL_SIZE: usize = 4;

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    /// The order in which threads get the writer (see [`WriterQueue`]).
    writer_queue: WriterQueue,
    readers: Mutex<Vec<Connection>>,
    /// Copies the write-ahead log into the database file off the commit path.
    _checkpointer: checkpoint::Checkpointer,
    /// Audit entries waiting to be appended together.
    audit_queue: audit::AuditQueue,
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Backend(Box::new(error))
    }
}

impl SqliteStore {
    /// Whether `data_dir` holds a store, without creating anything.
    pub fn exists(data_dir: &Path) -> bool {
        data_dir.join(DATABASE_FILE).is_file()
    }

    /// Opens (creating if needed) the store in `data_dir` and applies any
    /// pending migrations.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        SqliteStore::open_with(data_dir, checkpoint::CheckpointPolicy::DEFAULT)
    }

    /// As [`SqliteStore::open`], copying the write-ahead log into the
    /// database file as `checkpoints` says.
    pub(crate) fn open_with(data_dir: &Path, checkpoints: checkpoint::CheckpointPolicy) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|error| StoreError::Backend(Box::new(error)))?;
        let path = data_dir.join(DATABASE_FILE);
        let mut writer = open_connection(&path)?;
        // 64 MiB of page cache for the writer: the log's and the identity
        // tables' indexes stay in memory while they are updated. Readers keep
        // SQLite's default.
        writer.pragma_update(None, "cache_size", -65_536)?;
        writer.pragma_update(None, "wal_autocheckpoint", checkpoint::SAFETY_CHECKPOINT_PAGES)?;
        // A log that grew large (a bulk import, a resolver catching up at a
        // million customers) is cut back to this size once it restarts after
        // a checkpoint, rather than keeping its largest size on disk.
        writer.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
        migrate(&mut writer)?;
        // Statement journals (a multi-row insert's undo copy of each page it
        // touches, dropped when the statement ends) stay in memory instead of
        // a temporary file: a resolver commit's timeline inserts copied a
        // page per row to that file, a third of the commit's time at a
        // million customers. Set after the migrations, whose index builds
        // sort in temporary files rather than in memory.
        writer.pragma_update(None, "temp_store", "MEMORY")?;
        let checkpointer = checkpoint::Checkpointer::start(&path, checkpoints)?;
        Ok(SqliteStore {
            path,
            writer: Mutex::new(writer),
            writer_queue: WriterQueue::default(),
            readers: Mutex::new(Vec::new()),
            _checkpointer: checkpointer,
            audit_queue: audit::AuditQueue::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with_writer<T>(&self, work: impl FnOnce(&mut Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let _turn = self.writer_queue.wait_for_turn();
        let mut connection = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&mut connection)
    }

    /// As [`SqliteStore::with_writer`], for the commits of the stages that
    /// follow the log (resolver, audiences, outbox, delivery, insight):
    /// they are not synced to disk one by one. Every stage and the log
    /// writer share the one write lock, and with an fsync in each stage's
    /// commit the lock was held for a sync most of the time at 1,000
    /// events/s; a stage waiting behind a queue of syncs is what held an
    /// audience entry back by hundreds of milliseconds now and then.
    ///
    /// Nothing acknowledged is put at risk: the log's own commits stay
    /// fully synced, and a stage's commit is in the write-ahead log before
    /// the next log commit's sync (or the checkpoint thread's, within a
    /// second), which makes it durable too. A power loss before that rolls
    /// a stage back to an earlier commit, its cursor with its effects, and
    /// it replays from the log; deliveries are at least once already. A
    /// process crash loses nothing: the commit is in the operating system's
    /// cache.
    fn with_stage_writer<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_writer(|connection| {
            connection.execute_batch("PRAGMA synchronous = NORMAL")?;
            let result = work(connection);
            // Back to full syncs for every other writer, whatever happened.
            let restored = connection.execute_batch("PRAGMA synchronous = FULL");
            let value = result?;
            restored?;
            Ok(value)
        })
    }

    fn with_reader<T>(&self, work: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let pooled = self.readers.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        let connection = match pooled {
            Some(connection) => connection,
            None => open_connection(&self.path)?,
        };
        let result = work(&connection);
        let mut readers = self.readers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if readers.len() < READER_POOL_SIZE {
            readers.push(connection);
        }
        result
    }

    /// Runs `work` on a pooled reader inside one read transaction. Outside
    /// one, every statement takes and releases the database's shared lock
    /// (system calls, and the WAL index read again); for the hundreds of
    /// index seeks of one batched read that cost more than the seeks. The
    /// statements also see one snapshot.
    fn with_read_transaction<T>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_reader(|connection| {
            connection.execute_batch("BEGIN")?;
            let result = work(connection);
            let ended = connection.execute_batch("COMMIT");
            if ended.is_err() {
                // Never hand a connection back to the pool inside a transaction.
                let _ = connection.execute_batch("ROLLBACK");
            }
            let value = result?;
            ended?;
            Ok(value)
        })
    }
}

/// Hands the one writer to the threads that ask for it in the order they
/// asked. A plain mutex lets a thread that releases the writer take it
/// again before a woken waiter runs; with the log writer and every stage
/// committing back to back, one stage could lose that race again and again
/// and wait far longer than the commits ahead of it took.
#[derive(Default)]
struct WriterQueue {
    /// (the next ticket to hand out, the ticket whose turn it is).
    tickets: Mutex<(u64, u64)>,
    turn: Condvar,
}

/// One thread's turn with the writer; the next ticket's turn comes when it
/// is dropped (also when the work panicked).
struct WriterTurn<'a> {
    queue: &'a WriterQueue,
}

impl WriterQueue {
    fn wait_for_turn(&self) -> WriterTurn<'_> {
        let mut tickets = self.tickets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mine = tickets.0;
        tickets.0 += 1;
        while tickets.1 != mine {
            tickets = self.turn.wait(tickets).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        WriterTurn { queue: self }
    }
}

impl Drop for WriterTurn<'_> {
    fn drop(&mut self) {
        let mut tickets = self.queue.tickets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        tickets.1 += 1;
        self.queue.turn.notify_all();
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let connection = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Another process (the CLI beside a running server) may hold the write
    // lock for a moment; wait rather than fail.
    connection.busy_timeout(std::time::Duration::from_secs(10))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.set_prepared_statement_cache_capacity(64);
    Ok(connection)
}

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = transaction.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > known {
        return Err(StoreError::SchemaTooNew { found, known });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        transaction.execute_batch(migration)?;
        transaction.pragma_update(None, "user_version", index as i64 + 1)?;
        tracing::debug!(version = index + 1, "applied storage migration");
    }
    transaction.commit()?;
    Ok(())
}

fn source_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Source> {
    let kind: String = row.get(2)?;
    Ok(Source {
        id: SourceId::new(row.get::<_, String>(0)?),
        name: row.get(1)?,
        kind: kind.parse().unwrap_or(SourceKind::Backend),
        write_key: WriteKey::new(row.get::<_, String>(3)?),
        created_at_ms: row.get(4)?,
    })
}

const SOURCE_COLUMNS: &str = "id, name, kind, write_key, created_at";

impl Sources for SqliteStore {
    fn insert_source(&self, source: &Source) -> Result<(), StoreError> {
        self.with_writer(|connection| {
            let inserted = connection.execute(
                "INSERT INTO sources (id, name, kind, write_key, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO NOTHING",
                params![
                    source.id.as_str(),
                    source.name,
                    source.kind.as_str(),
                    source.write_key.as_str(),
                    source.created_at_ms
                ],
            )?;
            if inserted == 0 {
                return Err(StoreError::SourceExists(source.name.clone()));
            }
            Ok(())
        })
    }

    fn set_webhook(&self, name: &str, settings: &WebhookSettings) -> Result<Source, StoreError> {
        let source = self.source_by_name(name)?;
        let text = serde_json::to_string(settings).map_err(|error| StoreError::Backend(Box::new(error)))?;
        self.with_writer(|connection| {
            connection.execute("UPDATE sources SET webhook = ?1 WHERE id = ?2", params![text, source.id.as_str()])?;
            Ok(())
        })?;
        Ok(source)
    }

    fn webhook(&self, id: &SourceId) -> Result<Option<(Source, WebhookSettings)>, StoreError> {
        self.with_reader(|connection| {
            let mut statement =
                connection.prepare_cached(&format!("SELECT {SOURCE_COLUMNS}, webhook FROM sources WHERE id = ?1"))?;
            let found = statement
                .query_row([id.as_str()], |row| Ok((source_from_row(row)?, row.get::<_, Option<String>>(5)?)))
                .optional()?;
            let Some((source, Some(text))) = found else {
                return Ok(None);
            };
            let settings = serde_json::from_str(&text).map_err(|error| StoreError::Backend(Box::new(error)))?;
            Ok(Some((source, settings)))
        })
    }

    fn list_sources(&self) -> Result<Vec<Source>, StoreError> {
        self.with_reader(|connection| {
            let mut statement =
                connection.prepare_cached(&format!("SELECT {SOURCE_COLUMNS} FROM sources ORDER BY rowid"))?;
            let sources = statement.query_map([], source_from_row)?.collect::<Result<_, _>>()?;
            Ok(sources)
        })
    }

    fn source_by_write_key(&self, write_key: &WriteKey) -> Result<Option<Source>, StoreError> {
        self.with_reader(|connection| {
            let mut statement =
                connection.prepare_cached(&format!("SELECT {SOURCE_COLUMNS} FROM sources WHERE write_key = ?1"))?;
            Ok(statement.query_row([write_key.as_str()], source_from_row).optional()?)
        })
    }

    fn source_by_name(&self, name: &str) -> Result<Source, StoreError> {
        self.with_reader(|connection| {
            let mut statement =
                connection.prepare_cached(&format!("SELECT {SOURCE_COLUMNS} FROM sources WHERE name = ?1"))?;
            statement
                .query_row([name.trim()], source_from_row)
                .optional()?
                .ok_or_else(|| StoreError::SourceNotFound(name.to_owned()))
        })
    }

    fn insert_token(&self, info: &TokenInfo, secret_digest: &str) -> Result<(), StoreError> {
        self.with_writer(|connection| {
            connection.execute(
                "INSERT INTO api_tokens (id, name, secret_sha256, created_at, role, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![info.id, info.name, secret_digest, info.created_at_ms, info.role.as_str(), info.expires_at_ms],
            )?;
            Ok(())
        })
    }

    fn token_by_digest(&self, secret_digest: &str) -> Result<Option<TokenInfo>, StoreError> {
        self.with_reader(|connection| {
            Ok(connection
                .prepare_cached(&format!("SELECT {} FROM api_tokens WHERE secret_sha256 = ?1", manage::TOKEN_COLUMNS))?
                .query_row([secret_digest], manage::token_from_row)
                .optional()?)
        })
    }

    fn touch_token(&self, id: &str, at_ms: i64) -> Result<(), StoreError> {
        self.with_writer(|connection| {
            connection
                .prepare_cached("UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1")?
                .execute(params![id, at_ms])?;
            Ok(())
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        self.with_reader(manage::list_tokens)
    }

    fn revoke_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
        self.with_writer(|connection| manage::revoke_token(connection, id))
    }

    fn rename_source(&self, name: &str, new_name: &str) -> Result<Source, StoreError> {
        self.with_writer(|connection| manage::rename_source(connection, name, new_name))
    }

    fn set_write_key(&self, name: &str, write_key: &WriteKey) -> Result<Source, StoreError> {
        self.with_writer(|connection| manage::set_write_key(connection, name, write_key))
    }

    fn delete_source(&self, name: &str) -> Result<Source, StoreError> {
        self.with_writer(|connection| manage::delete_source(connection, name))
    }
}

/// One process owns the file's stages, as before scale-out: every lease is
/// granted at once and nothing can take it away.
impl crate::Coordination for SqliteStore {
    fn kind(&self) -> crate::StoreKind {
        crate::StoreKind::Sqlite
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_reader(|connection| Ok(connection.query_row("SELECT 1", [], |_| Ok(()))?))
    }

    fn try_lease(&self, stage: crate::Stage) -> Result<Option<crate::StageLease>, StoreError> {
        Ok(Some(crate::StageLease::granted(stage)))
    }

    fn lease_holder(&self, _stage: crate::Stage) -> Result<crate::LeaseHolder, StoreError> {
        Ok(crate::LeaseHolder::Embedded)
    }
}

/// Appends `batches` inside `transaction` (the body of [`EventLog::append`],
/// shared with [`EventLog::append_drained`]).
fn append_in(
    transaction: &rusqlite::Transaction<'_>,
    batches: &[IngestBatch],
    dedup_since_ms: i64,
) -> Result<Vec<IngestOutcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(batches.len());
    // Stored, duplicates, and the latest receipt per source and type.
    let mut counters: HashMap<(&str, EventType), (u64, u64, i64)> = HashMap::new();
    {
        // A message id is claimed when it is new, or when its last
        // sighting fell out of the dedup window.
        let mut claim = transaction.prepare_cached(
            "INSERT INTO message_ids (source_id, message_id, received_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (source_id, message_id) DO UPDATE SET received_at = excluded.received_at
             WHERE message_ids.received_at < ?4",
        )?;
        let mut insert_event = transaction.prepare_cached(
            "INSERT INTO events (source_id, message_id, type, received_at, timestamp, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut insert_quarantine = transaction.prepare_cached(
            "INSERT INTO quarantine (source_id, received_at, batch_index, code, field, message, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for batch in batches {
            let mut outcome = IngestOutcome::default();
            for record in &batch.records {
                // An id kept for good is stamped with the end of time:
                // never outside the window, never forgotten.
                let claimed_at = match batch.dedup {
                    Dedup::Window => record.received_at_ms,
                    Dedup::Forever => KEPT_FOREVER,
                };
                let claimed = claim.execute(params![
                    record.source_id.as_str(),
                    record.message_id.as_str(),
                    claimed_at,
                    dedup_since_ms
                ])? == 1;
                let counter = counters.entry((record.source_id.as_str(), record.event_type)).or_default();
                counter.2 = counter.2.max(record.received_at_ms);
                if claimed {
                    insert_event.execute(params![
                        record.source_id.as_str(),
                        record.message_id.as_str(),
                        record.event_type.as_str(),
                        record.received_at_ms,
                        record.timestamp_ms,
                        record.payload
                    ])?;
                    outcome.stored += 1;
                    counter.0 += 1;
                } else {
                    outcome.duplicates += 1;
                    counter.1 += 1;
                }
            }
            for rejected in &batch.rejected {
                insert_quarantine.execute(params![
                    rejected.source_id.as_str(),
                    rejected.received_at_ms,
                    rejected.batch_index,
                    rejected.code,
                    rejected.field,
                    rejected.message,
                    rejected.payload
                ])?;
                outcome.quarantined += 1;
            }
            outcomes.push(outcome);
        }
        let mut count = transaction.prepare_cached(
            "INSERT INTO ingest_counters (source_id, type, stored, duplicates, last_received_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (source_id, type) DO UPDATE
             SET stored = stored + excluded.stored, duplicates = duplicates + excluded.duplicates,
                 last_received_at = MAX(COALESCE(last_received_at, 0), excluded.last_received_at)",
        )?;
        for ((source_id, event_type), (stored, duplicates, last_received_ms)) in &counters {
            count.execute(params![source_id, event_type.as_str(), stored, duplicates, last_received_ms])?;
        }
        for batch in batches {
            govern::record_violations(transaction, &batch.violations)?;
        }
    }
    Ok(outcomes)
}

impl EventLog for SqliteStore {
    fn append(&self, batches: &[IngestBatch], dedup_since_ms: i64) -> Result<Vec<IngestOutcome>, StoreError> {
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let outcomes = append_in(&transaction, batches, dedup_since_ms)?;
            transaction.commit()?;
            Ok(outcomes)
        })
    }

    fn append_drained(
        &self,
        stream: &str,
        drained: StreamRange,
        batches: &[IngestBatch],
        dedup_since_ms: i64,
    ) -> Result<DrainCommit, StoreError> {
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let recorded: i64 = transaction
                .prepare_cached("SELECT sequence FROM stream_cursors WHERE stream = ?1")?
                .query_row([stream], |row| row.get(0))
                .optional()?
                .unwrap_or(0);
            if recorded as u64 != drained.after {
                return Ok(DrainCommit::Stale { recorded: recorded as u64 });
            }
            let outcomes = append_in(&transaction, batches, dedup_since_ms)?;
            transaction.execute(
                "INSERT INTO stream_cursors (stream, sequence) VALUES (?1, ?2)
                 ON CONFLICT (stream) DO UPDATE SET sequence = excluded.sequence",
                params![stream, drained.through as i64],
            )?;
            transaction.commit()?;
            Ok(DrainCommit::Appended(outcomes))
        })
    }

    fn drained_sequence(&self, stream: &str) -> Result<u64, StoreError> {
        self.with_reader(|connection| {
            let recorded: Option<i64> = connection
                .prepare_cached("SELECT sequence FROM stream_cursors WHERE stream = ?1")?
                .query_row([stream], |row| row.get(0))
                .optional()?;
            Ok(recorded.unwrap_or(0) as u64)
        })
    }

    fn head(&self) -> Result<LogPosition, StoreError> {
        self.with_reader(|connection| {
            let head: i64 = connection
                .prepare_cached("SELECT COALESCE(MAX(position), 0) FROM events")?
                .query_row([], |row| row.get(0))?;
            Ok(LogPosition(head as u64))
        })
    }

    fn stage_cursor(&self, stage: Stage) -> Result<Option<StageCursor>, StoreError> {
        self.with_reader(|connection| {
            Ok(connection
                .prepare_cached("SELECT position, epoch FROM stage_cursors WHERE stage = ?1")?
                .query_row([stage.0], |row| {
                    Ok(StageCursor {
                        position: LogPosition(row.get::<_, i64>(0)? as u64),
                        epoch: row.get::<_, i64>(1)? as u64,
                    })
                })
                .optional()?)
        })
    }

    fn read_log(&self, after: LogPosition, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT position, source_id, message_id, type, received_at, payload, timestamp FROM events
                 WHERE position > ?1 ORDER BY position LIMIT ?2",
            )?;
            let rows = statement.query_map(params![after.0 as i64, limit as i64], log_entry_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn list_quarantine(&self, after_id: u64, limit: usize) -> Result<Vec<QuarantineEntry>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))?;
            let rows = statement.query_map(params![after_id as i64, limit as i64], quarantine_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn recent_quarantine(&self, before: Option<u64>, limit: usize) -> Result<Vec<QuarantineEntry>, StoreError> {
        let before = before.map_or(i64::MAX, |id| id.min(i64::MAX as u64) as i64);
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id < ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = statement.query_map(params![before, limit as i64], quarantine_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn stats(&self) -> Result<IngestStats, StoreError> {
        self.with_reader(|connection| {
            // One read transaction, so the figures agree with one another.
            connection.execute_batch("BEGIN")?;
            let result = read_stats(connection);
            connection.execute_batch("COMMIT")?;
            result
        })
    }

    fn forget_message_ids(&self, received_before_ms: i64) -> Result<u64, StoreError> {
        self.with_writer(|connection| {
            // The literal bound lets SQLite use the partial index.
            Ok(connection.execute(
                "DELETE FROM message_ids WHERE received_at < ?1 AND received_at < 9223372036854775807",
                [received_before_ms],
            )? as u64)
        })
    }

    fn filter_log(&self, filter: &LogFilter, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.with_reader(|connection| manage::filter_log(connection, filter, limit))
    }
}

/// The profile of each event in a range of log positions; read by every
/// stage after the resolver once per batch, so it must seek, not scan.
const EVENT_OWNERS: &str = "SELECT position, profile_id FROM profile_events WHERE position > ?1 AND position <= ?2";

impl IdentityStore for SqliteStore {
    fn identity_state(&self) -> Result<IdentityState, StoreError> {
        self.with_reader(identity::state)
    }

    fn commit_identity(&self, commit: &IdentityCommit) -> Result<CommitOutcome, StoreError> {
        self.with_stage_writer(|connection| identity::commit(connection, commit, None))
    }

    fn repair_identity(&self, repair: &IdentityRepair) -> Result<CommitOutcome, StoreError> {
        let cleared = identity::Cleared { profiles: &repair.replaced_profiles, replayed: &repair.replayed };
        self.with_writer(|connection| identity::commit(connection, &repair.commit, Some(cleared)))
    }

    fn dropped_at(&self, identifiers: &[Identifier]) -> Result<Vec<(LogPosition, Option<ProfileId>)>, StoreError> {
        self.with_reader(|connection| identity::dropped_at(connection, identifiers))
    }

    fn identity_rules(&self) -> Result<IdentityRules, StoreError> {
        self.with_reader(|connection| {
            let text: Option<String> =
                connection.query_row("SELECT rules FROM identity_state WHERE id = 1", [], |row| row.get(0))?;
            match text {
                Some(text) => serde_json::from_str(&text).map_err(|error| StoreError::Backend(Box::new(error))),
                None => Ok(IdentityRules::default()),
            }
        })
    }

    fn set_identity_rules(&self, rules: &IdentityRules) -> Result<(), StoreError> {
        let text = serde_json::to_string(rules).map_err(|error| StoreError::Backend(Box::new(error)))?;
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            transaction.execute("UPDATE identity_state SET rules = ?1 WHERE id = 1", [text])?;
            transaction.execute("UPDATE stage_cursors SET epoch = epoch + 1 WHERE stage = ?1", [Stage::RESOLVE.0])?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn unresolved_events(&self, after: LogPosition, limit: usize) -> Result<Vec<UnresolvedEvent>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT position, reason FROM unresolved_events WHERE position > ?1 ORDER BY position LIMIT ?2",
            )?;
            let rows = statement.query_map(params![after.0 as i64, limit as i64], |row| {
                Ok(UnresolvedEvent { position: LogPosition(row.get::<_, i64>(0)? as u64), reason: row.get(1)? })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn profile(&self, id: ProfileId) -> Result<Option<Profile>, StoreError> {
        self.with_reader(|connection| identity::profile(connection, id))
    }

    fn profile_by_identifier(&self, identifier: &Identifier) -> Result<Option<Profile>, StoreError> {
        self.with_reader(|connection| {
            let owner: Option<i64> = connection
                .prepare_cached("SELECT profile_id FROM identifiers WHERE type = ?1 AND value = ?2")?
                .query_row([&identifier.kind, &identifier.value], |row| row.get(0))
                .optional()?;
            match owner {
                Some(id) => identity::profile(connection, ProfileId(id as u64)),
                None => Ok(None),
            }
        })
    }

    fn profile_events(
        &self,
        id: ProfileId,
        before: Option<TimelineCursor>,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT e.position, e.source_id, e.message_id, e.type, e.received_at, e.payload, e.timestamp
                 FROM profile_events p JOIN events e ON e.position = p.position
                 WHERE p.profile_id = ?1 AND (p.timestamp, p.position) < (?2, ?3)
                 ORDER BY p.timestamp DESC, p.position DESC LIMIT ?4",
            )?;
            let (timestamp, position) =
                before.map_or((i64::MAX, i64::MAX), |cursor| (cursor.timestamp_ms, cursor.position.0 as i64));
            let rows =
                statement.query_map(params![id.0 as i64, timestamp, position, limit as i64], log_entry_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn events_of_profiles(&self, ids: &[ProfileId], since_ms: i64) -> Result<Vec<(ProfileId, LogEntry)>, StoreError> {
        // One range seek per profile on one connection: in process, a seek
        // costs what a row of a larger query would, with no round trip to save.
        self.with_read_transaction(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT e.position, e.source_id, e.message_id, e.type, e.received_at, e.payload, e.timestamp
                 FROM profile_events p JOIN events e ON e.position = p.position
                 WHERE p.profile_id = ?1 AND p.timestamp >= ?2",
            )?;
            let mut found = Vec::new();
            for id in ids {
                for entry in statement.query_map(params![id.0 as i64, since_ms], log_entry_from_row)? {
                    found.push((*id, entry?));
                }
            }
            Ok(found)
        })
    }

    fn identity_history(&self, id: ProfileId) -> Result<Vec<HistoryRecord>, StoreError> {
        self.with_reader(|connection| identity::history(connection, id))
    }

    fn merges_and_drops(&self, before: Option<u64>, limit: usize) -> Result<Vec<(u64, HistoryRecord)>, StoreError> {
        self.with_reader(|connection| identity::merges_and_drops(connection, before, limit))
    }

    fn event_owners(
        &self,
        after: LogPosition,
        up_to: LogPosition,
    ) -> Result<Vec<(LogPosition, ProfileId)>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(EVENT_OWNERS)?;
            let rows = statement.query_map(params![after.0 as i64, up_to.0 as i64], |row| {
                Ok((LogPosition(row.get::<_, i64>(0)? as u64), ProfileId(row.get::<_, i64>(1)? as u64)))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn identifier_owners(&self, identifiers: &[Identifier]) -> Result<Vec<(Identifier, ProfileId)>, StoreError> {
        self.with_reader(|connection| identity::identifier_owners(connection, identifiers))
    }

    fn profiles(&self, ids: &[ProfileId]) -> Result<Vec<Profile>, StoreError> {
        self.with_read_transaction(|connection| identity::profiles(connection, ids))
    }

    fn list_profiles(&self, after: Option<ProfileId>, limit: usize) -> Result<Vec<Profile>, StoreError> {
        self.with_reader(|connection| manage::list_profiles(connection, after, limit))
    }

    fn list_profile_ids(&self, after: Option<ProfileId>, limit: usize) -> Result<Vec<ProfileId>, StoreError> {
        self.with_reader(|connection| manage::list_profile_ids(connection, after, limit))
    }

    fn identifiers_with_prefix(
        &self,
        kind: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Identifier, ProfileId)>, StoreError> {
        self.with_reader(|connection| manage::identifiers_with_prefix(connection, kind, prefix, after, limit))
    }
}

impl AudienceStore for SqliteStore {
    fn create_audience(&self, definition: &AudienceDefinition) -> Result<(), StoreError> {
        self.with_writer(|connection| audience::create(connection, definition))
    }

    fn list_audiences(&self) -> Result<Vec<AudienceRecord>, StoreError> {
        self.with_reader(audience::list)
    }

    fn audience(&self, name: &str) -> Result<Option<AudienceRecord>, StoreError> {
        self.with_reader(|connection| audience::get(connection, name))
    }

    fn delete_audience(&self, name: &str) -> Result<(), StoreError> {
        self.with_writer(|connection| audience::delete(connection, name))
    }

    fn audience_members(
        &self,
        name: &str,
        after: Option<ProfileId>,
        limit: usize,
    ) -> Result<Vec<Membership>, StoreError> {
        self.with_reader(|connection| audience::members(connection, name, after, limit))
    }

    fn profile_audiences(&self, profile: ProfileId) -> Result<Vec<Membership>, StoreError> {
        self.with_reader(|connection| audience::profile_audiences(connection, profile))
    }

    fn memberships_of(&self, profiles: &[ProfileId]) -> Result<Vec<Membership>, StoreError> {
        self.with_read_transaction(|connection| {
            let mut found = Vec::new();
            for profile in profiles {
                found.extend(audience::profile_audiences(connection, *profile)?);
            }
            Ok(found)
        })
    }

    fn membership_history(&self, name: &str, profile: ProfileId) -> Result<Vec<MembershipChange>, StoreError> {
        self.with_reader(|connection| audience::history(connection, name, profile))
    }

    fn audience_states(&self, profiles: &[ProfileId]) -> Result<Vec<StoredAudienceState>, StoreError> {
        self.with_read_transaction(|connection| audience::states(connection, profiles))
    }

    fn audience_changes_by_day(&self, name: &str) -> Result<Vec<crate::DailyChanges>, StoreError> {
        self.with_reader(|connection| audience::changes_by_day(connection, name))
    }

    fn due_audience_states(&self, now_ms: i64, limit: usize) -> Result<Vec<StoredAudienceState>, StoreError> {
        self.with_reader(|connection| audience::due(connection, now_ms, limit))
    }

    fn retired_audience_profiles(&self, limit: usize) -> Result<Vec<ProfileId>, StoreError> {
        self.with_reader(|connection| audience::retired(connection, limit))
    }

    fn commit_audience(&self, commit: &AudienceCommit) -> Result<AudienceCommitOutcome, StoreError> {
        self.with_stage_writer(|connection| audience::commit(connection, commit))
    }

    fn create_computed_trait(
        &self,
        name: &str,
        definition: &ComputedTraitDefinition,
        created_at_ms: i64,
    ) -> Result<(), StoreError> {
        self.with_writer(|connection| computed::create(connection, name, definition, created_at_ms))
    }

    fn list_computed_traits(&self) -> Result<Vec<ComputedTraitRecord>, StoreError> {
        self.with_reader(computed::list)
    }

    fn computed_trait(&self, name: &str) -> Result<Option<ComputedTraitRecord>, StoreError> {
        self.with_reader(|connection| computed::get(connection, name))
    }

    fn delete_computed_trait(&self, name: &str) -> Result<(), StoreError> {
        self.with_writer(|connection| computed::delete(connection, name))
    }

    fn computed_trait_states(&self, profiles: &[ProfileId]) -> Result<Vec<StoredComputedTrait>, StoreError> {
        self.with_read_transaction(|connection| computed::states(connection, profiles))
    }

    fn due_computed_trait_states(&self, now_ms: i64, limit: usize) -> Result<Vec<StoredComputedTrait>, StoreError> {
        self.with_reader(|connection| computed::due(connection, now_ms, limit))
    }
}

fn log_entry_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<LogEntry> {
    let event_type: String = row.get(3)?;
    Ok(LogEntry {
        position: LogPosition(row.get::<_, i64>(0)? as u64),
        source_id: SourceId::new(row.get::<_, String>(1)?),
        message_id: MessageId::new(row.get::<_, String>(2)?),
        event_type: event_type.parse().map_err(|error| {
            rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(error))
        })?,
        received_at_ms: row.get(4)?,
        payload: row.get(5)?,
        timestamp_ms: row.get(6)?,
    })
}

const QUARANTINE_COLUMNS: &str = "id, source_id, received_at, batch_index, code, field, message, payload";

fn quarantine_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<QuarantineEntry> {
    Ok(QuarantineEntry {
        id: row.get::<_, i64>(0)? as u64,
        record: QuarantineRecord {
            source_id: SourceId::new(row.get::<_, String>(1)?),
            received_at_ms: row.get(2)?,
            batch_index: row.get(3)?,
            code: row.get(4)?,
            field: row.get(5)?,
            message: row.get(6)?,
            payload: row.get(7)?,
        },
    })
}

fn read_stats(connection: &Connection) -> Result<IngestStats, StoreError> {
    let mut stats = IngestStats::default();
    let mut per_source: Vec<SourceStats> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    let mut statement = connection.prepare_cached("SELECT id, name FROM sources ORDER BY rowid")?;
    for row in statement.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))? {
        let (id, name) = row?;
        index_of.insert(id.clone(), per_source.len());
        per_source.push(SourceStats { source_id: SourceId::new(id), name, ..SourceStats::default() });
    }
    let mut statement = connection
        .prepare_cached("SELECT source_id, type, stored, duplicates, last_received_at FROM ingest_counters")?;
    let counters = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, i64>(2)? as u64,
            row.get::<_, i64>(3)? as u64,
            row.get::<_, Option<i64>>(4)?,
        ))
    })?;
    for counter in counters {
        let (source_id, event_type, stored, duplicates, last_received_ms) = counter?;
        stats.events += stored;
        stats.duplicates += duplicates;
        *stats.events_by_type.entry(event_type.clone()).or_default() += stored;
        if let Some(&index) = index_of.get(&source_id) {
            let source = &mut per_source[index];
            source.events += stored;
            source.duplicates += duplicates;
            *source.events_by_type.entry(event_type).or_default() += stored;
            source.last_received_ms = source.last_received_ms.max(last_received_ms);
        }
    }
    let mut statement = connection.prepare_cached("SELECT source_id, COUNT(*) FROM quarantine GROUP BY source_id")?;
    for row in statement.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64)))? {
        let (source_id, rejected) = row?;
        stats.rejected += rejected;
        if let Some(&index) = index_of.get(&source_id) {
            per_source[index].rejected += rejected;
        }
    }
    stats.log_head = LogPosition(
        connection.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |row| row.get::<_, i64>(0))? as u64,
    );
    stats.sources = per_source;
    stats.resolver_position = LogPosition(connection.query_row(
        "SELECT position FROM stage_cursors WHERE stage = ?1",
        [Stage::RESOLVE.0],
        |row| row.get::<_, i64>(0),
    )? as u64);
    stats.resolver_lag = stats.log_head.0.saturating_sub(stats.resolver_position.0);
    stats.profiles = connection
        .query_row("SELECT live_profiles FROM identity_state WHERE id = 1", [], |row| row.get::<_, i64>(0))?
        as u64;
    stats.unresolved =
        connection.query_row("SELECT COUNT(*) FROM unresolved_events", [], |row| row.get::<_, i64>(0))? as u64;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store_test_suite!(|dir: &std::path::Path| SqliteStore::open(dir).expect("open sqlite store"));

    impl crate::suite::audit::RawSql for SqliteStore {
        fn raw_sql(&self, statement: &str) {
            self.with_writer(|connection| Ok(connection.execute_batch(statement)?)).expect("raw sql");
        }
    }

    #[test]
    fn reopening_keeps_everything_and_does_not_migrate_twice() {
        let dir = tempfile::tempdir().unwrap();
        let source = {
            let store = SqliteStore::open(dir.path()).unwrap();
            store.create_source("web", SourceKind::Website).unwrap()
        };
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.list_sources().unwrap(), vec![source]);
        let version: i64 = store
            .with_reader(|connection| Ok(connection.pragma_query_value(None, "user_version", |row| row.get(0))?))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn tokens_made_before_roles_become_admin_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "tdm_made_before_roles";
        {
            let connection = open_connection(&dir.path().join(DATABASE_FILE)).unwrap();
            for (index, migration) in MIGRATIONS.iter().take(12).enumerate() {
                connection.execute_batch(migration).unwrap();
                connection.pragma_update(None, "user_version", index as i64 + 1).unwrap();
            }
            connection
                .execute(
                    "INSERT INTO api_tokens (id, name, secret_sha256, created_at) VALUES ('tok_old', 'ops', ?1, 5)",
                    [crate::sources::secret_digest(secret)],
                )
                .unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let token = store.verify_token(secret).unwrap().unwrap();
        assert_eq!(
            (token.id.as_str(), token.role, token.expires_at_ms),
            ("tok_old", tandem_core::govern::Role::Admin, None)
        );
    }

    #[test]
    fn the_resolver_position_and_epoch_move_into_stage_cursors() {
        let dir = tempfile::tempdir().unwrap();
        {
            let connection = open_connection(&dir.path().join(DATABASE_FILE)).unwrap();
            for (index, migration) in MIGRATIONS.iter().take(3).enumerate() {
                connection.execute_batch(migration).unwrap();
                connection.pragma_update(None, "user_version", index as i64 + 1).unwrap();
            }
            connection.execute("UPDATE identity_state SET position = 7, epoch = 2, next_profile_id = 5", []).unwrap();
            connection
                .execute_batch(
                    "INSERT INTO events (source_id, message_id, type, received_at, timestamp, payload)
                         VALUES ('s', 'a', 'track', 1, 900, '{}'), ('s', 'b', 'track', 1, 100, '{}');
                     INSERT INTO profile_events (profile_id, position) VALUES (1, 1), (1, 2);
                     INSERT INTO identity_history (position, profile_id, change, recorded_at) VALUES
                         (2, 1, '{\"kind\":\"dropped\",\"profile\":\"prof_1\",\"identifier\":{\"type\":\"email\",\"value\":\"x@y.z\"},\"reason\":\"blocked value\"}', 5),
                         (1, 1, '{\"kind\":\"created\",\"profile\":\"prof_1\",\"identifiers\":[]}', 5);",
                )
                .unwrap();
            let profile = serde_json::to_string(&Profile::new(ProfileId(1))).unwrap();
            connection
                .execute("INSERT INTO profiles (id, merged_into, state) VALUES (1, NULL, ?1)", [profile])
                .unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let state = store.identity_state().unwrap();
        assert_eq!(
            (state.position, state.epoch, state.next_profile_id, state.live_profiles),
            (LogPosition(7), 2, 5, 1)
        );
        assert_eq!(
            store.dropped_at(&["email:x@y.z".parse().unwrap()]).unwrap(),
            vec![(LogPosition(2), Some(ProfileId(1)))],
            "old history rows name the identifier they dropped"
        );
        assert_eq!(store.stats().unwrap().resolver_position, LogPosition(7));
        let timeline: Vec<_> = store
            .profile_events(ProfileId(1), None, 10)
            .unwrap()
            .iter()
            .map(|entry| (entry.position.0, entry.timestamp_ms))
            .collect();
        assert_eq!(timeline, vec![(1, 900), (2, 100)], "old links gain their event's time");
    }

    /// The steps of SQLite's plan for `sql` (with `parameters`) over a fresh store's schema.
    fn query_plan(sql: &str, parameters: impl rusqlite::Params) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let connection = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        let mut statement = connection.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let steps = statement.query_map(parameters, |row| row.get::<_, String>(3)).unwrap();
        steps.collect::<Result<_, _>>().unwrap()
    }

    /// Regression: the owners of a range of positions were found by scanning
    /// every profile's timeline, so each batch of the stages after the
    /// resolver cost time in proportion to the whole log.
    #[test]
    fn regression_event_owners_seek_by_position_rather_than_scan_every_timeline() {
        let plan = query_plan(EVENT_OWNERS, params![0, 10]);
        assert!(plan.iter().any(|step| step.contains("USING COVERING INDEX profile_events_by_position")), "{plan:?}");
    }

    /// Regression: a destination's pending and retrying items were counted
    /// by reading every item (payload pages included) of its outbox, so a
    /// backlog of 9,000 items cost the stack page and every `destination
    /// show` about 10 ms.
    #[test]
    fn regression_outbox_counts_read_the_index_alone() {
        let plan = query_plan(outbox::RECORD_QUERY, []);
        let counts_from_index =
            plan.iter().filter(|step| step.contains("USING COVERING INDEX outbox_by_destination")).count();
        assert!(counts_from_index >= 2, "{plan:?}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let connection = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        connection.pragma_update(None, "user_version", 99).unwrap();
        drop(connection);
        assert!(matches!(SqliteStore::open(dir.path()), Err(StoreError::SchemaTooNew { found: 99, .. })));
    }

    #[test]
    fn the_database_runs_in_wal_mode_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store
            .with_writer(|connection| {
                let mode: String = connection.pragma_query_value(None, "journal_mode", |row| row.get(0))?;
                let sync: i64 = connection.pragma_query_value(None, "synchronous", |row| row.get(0))?;
                assert_eq!(mode, "wal");
                assert_eq!(sync, 2, "synchronous = FULL");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_large_write_ahead_log_is_cut_back_once_it_restarts() {
        let dir = tempfile::tempdir().unwrap();
        // The thread copies the log once it passes 64 MiB.
        let policy = checkpoint::CheckpointPolicy { log_bytes: 64 << 20, delay: std::time::Duration::from_secs(3600) };
        let store = SqliteStore::open_with(dir.path(), policy).unwrap();
        let wal = checkpoint::log_path(&dir.path().join(DATABASE_FILE));
        let write = |rows: i64| {
            store
                .with_writer(|connection| {
                    connection.execute_batch("CREATE TABLE IF NOT EXISTS scratch (b BLOB)")?;
                    connection.execute(
                        "WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
                         INSERT INTO scratch SELECT zeroblob(1048576) FROM n",
                        [rows],
                    )?;
                    Ok(())
                })
                .unwrap()
        };
        write(96);
        let grown = std::fs::metadata(&wal).unwrap().len();
        assert!(grown > 96 << 20, "the log holds the write: {grown} bytes");
        // The checkpoint thread copies it once it passed 64 MiB, and again
        // what was written meanwhile; then a write restarts the log and cuts
        // the file back.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            write(1);
            let size = std::fs::metadata(&wal).unwrap().len();
            if size <= WAL_SIZE_LIMIT_BYTES as u64 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the log is still {size} bytes");
        }
    }

    /// Regression: every stage's commit used to sync on its own, under the
    /// write lock the log writer needs for each acknowledgement, and the
    /// queue of syncs held audience entries back by hundreds of
    /// milliseconds. Stage commits skip the sync; everything else written
    /// through the writer stays fully synced, even after a stage's commit
    /// failed.
    #[test]
    fn stage_commits_skip_their_own_sync_and_leave_every_other_write_fully_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let synchronous = |connection: &mut Connection| -> Result<i64, StoreError> {
            Ok(connection.pragma_query_value(None, "synchronous", |row| row.get(0))?)
        };
        // SQLite's levels: 1 NORMAL, 2 FULL.
        assert_eq!(store.with_writer(synchronous).unwrap(), 2, "the log's commits");
        assert_eq!(store.with_stage_writer(synchronous).unwrap(), 1, "a stage's commit");
        assert_eq!(store.with_writer(synchronous).unwrap(), 2, "restored after a stage's commit");
        let failed = store.with_stage_writer(|connection| -> Result<(), StoreError> {
            connection.execute_batch("INSERT INTO no_such_table VALUES (1)")?;
            Ok(())
        });
        assert!(failed.is_err());
        assert_eq!(store.with_writer(synchronous).unwrap(), 2, "restored after a failed stage commit");
        // The stages' store calls go through it: an outbox commit leaves the writer fully synced.
        let outcome = crate::OutboxStore::commit_outbox(&store, &crate::OutboxCommit::default()).unwrap();
        assert_eq!(outcome, crate::OutboxCommitOutcome::Committed);
        assert_eq!(store.with_writer(synchronous).unwrap(), 2);
    }

    /// The writer goes to the threads waiting for it in the order they
    /// asked, however often a thread that just had it asks again.
    #[test]
    fn the_writer_goes_to_waiting_threads_in_the_order_they_asked() {
        let queue = std::sync::Arc::new(WriterQueue::default());
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let held = queue.wait_for_turn();
        let mut waiting = Vec::new();
        for thread in 0..4u64 {
            let (asking, order) = (queue.clone(), order.clone());
            waiting.push(std::thread::spawn(move || {
                let _turn = asking.wait_for_turn();
                order.lock().unwrap().push(thread);
            }));
            // The next thread asks only once this one holds its ticket.
            while queue.tickets.lock().unwrap().0 < thread + 2 {
                std::thread::yield_now();
            }
        }
        drop(held);
        for thread in waiting {
            thread.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
        let tickets = *queue.tickets.lock().unwrap();
        assert_eq!(tickets, (5, 5), "every turn was handed on");
    }
}
