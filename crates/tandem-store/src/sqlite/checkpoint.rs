//! Checkpoints of the write-ahead log, off the commit path. SQLite's own
//! automatic checkpoint runs inside the commit that crosses its threshold,
//! on the one writer connection every stage shares, so every 4 MiB of log
//! one commit (an acknowledgement, a resolver batch, a delivery) also waited
//! for the database file to be written and synced. Here a thread of its own,
//! on a connection of its own, runs a `PASSIVE` checkpoint: it copies what
//! the log holds into the database file without taking the write lock, so
//! writers go on committing meanwhile. Durability does not change: a commit
//! is durable once its log frames are synced, before any checkpoint.
//!
//! The thread copies once the log file has grown by
//! [`CheckpointPolicy::log_bytes`] (1 GiB by default) since the last copy or
//! has held changes for [`CheckpointPolicy::delay`] (30 s), rather than
//! every second: a page that several commits change is written to the
//! database file once for all of them. At a million customers a resolver commit changes most pages
//! of the profile, identifier and timeline tables, so copying every second
//! wrote each of those pages to the file once per commit. It looks at the
//! log file's size and modification time only (`stat`): the file is never
//! opened for that, and SQLite's index beside it (`-shm`) is never touched,
//! since opening and closing a file SQLite locks would drop the process's
//! locks on it. What was written since the last copy is the file's size
//! past the end of the frames that copy reached (the checkpoint reports how
//! many it copied), so frames a commit added during the copy count as new.
//! When a write starts the log again from its beginning, the file is cut
//! back to the journal size limit and the count starts from nothing; it is
//! right within that limit.
//!
//! The stages' commits are not synced one by one (see `with_stage_writer`):
//! between copies the thread syncs the log file at each look when it
//! changed, so they stay durable within [`CHECKPOINT_INTERVAL`] even when no
//! synced commit follows them. Syncing opens the log file itself, which
//! SQLite does not lock.
//!
//! The writer keeps SQLite's automatic checkpoint as a safety valve at a
//! larger threshold ([`SAFETY_CHECKPOINT_PAGES`]), for a thread that could
//! not run at all.

use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

/// How often the thread looks at the log.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// The writer's own automatic checkpoint threshold, in pages (4 GiB of
/// 4 KiB pages): reached only when the thread falls behind. A resolver
/// commit at a million customers writes some 700 MB of log on its own, and
/// a lower threshold made that commit copy the log itself, inside the
/// commit.
pub const SAFETY_CHECKPOINT_PAGES: i64 = 1 << 20;

/// Looks after a copy of a large log at which the thread copies again what
/// was written meanwhile, when that is less than [`FOLLOW_UP_MAX_BYTES`].
/// The log starts again from its beginning only at a write that begins once
/// every frame is copied, and a large copy takes long enough for commits to
/// add frames while it runs; short copies that follow give it that chance,
/// where otherwise the file would grow by another
/// [`CheckpointPolicy::log_bytes`] first. Larger writes meanwhile (resolver
/// commits catching up a backlog) wait for the next large copy instead:
/// copying each of them would write their pages once per commit again.
const FOLLOW_UP_LOOKS: u32 = 5;
const FOLLOW_UP_MAX_BYTES: u64 = 64 << 20;

/// The WAL file's header, and each frame's header before its page (SQLite's
/// WAL file format).
const WAL_HEADER_BYTES: u64 = 32;
const WAL_FRAME_HEADER_BYTES: u64 = 24;

/// When the thread copies the log into the database file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Copy once the log file has grown this much since the last copy.
    pub log_bytes: u64,
    /// Copy once the log has held changes this long.
    pub delay: Duration,
}

impl CheckpointPolicy {
    /// The store's policy: 1 GiB of log or 30 s.
    pub const DEFAULT: CheckpointPolicy = CheckpointPolicy { log_bytes: 1 << 30, delay: Duration::from_secs(30) };
}

/// The checkpointing thread of one store; dropping it stops the thread
/// within [`CHECKPOINT_INTERVAL`].
pub struct Checkpointer {
    _stop: mpsc::Sender<()>,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path` on a connection of its
    /// own, as `policy` says. A failed checkpoint is logged and tried again
    /// at the next look; the writer's safety valve covers a thread that
    /// cannot run at all.
    pub fn start(path: &Path, policy: CheckpointPolicy) -> Result<Checkpointer, crate::StoreError> {
        let connection = super::open_connection(path)?;
        let log = log_path(path);
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("tandem-checkpoint".into())
            .spawn(move || run(&connection, &log, policy, &stopped))
            .map_err(|error| crate::StoreError::Backend(Box::new(error)))?;
        Ok(Checkpointer { _stop: stop })
    }
}

/// The write-ahead log file of the database at `path`.
pub(super) fn log_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// What a look at the log file saw: its size and last modification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LogFile {
    bytes: u64,
    modified: Option<SystemTime>,
}

fn look(log: &Path) -> Option<LogFile> {
    let metadata = std::fs::metadata(log).ok()?;
    Some(LogFile { bytes: metadata.len(), modified: metadata.modified().ok() })
}

fn run(connection: &Connection, log: &Path, policy: CheckpointPolicy, stopped: &mpsc::Receiver<()>) {
    let mut last_failure: Option<String> = None;
    // The log file as last seen, and since when it has changed without a copy.
    let mut seen = look(log);
    let mut changed_since: Option<Instant> = None;
    // Where the frames the last copy reached end in the file: what the file
    // grows past that was written since (whatever the log held before the
    // thread started is counted too).
    let mut copied_up_to = 0;
    // Looks left at which to copy whatever is new after a copy the log did
    // not restart after (see [`FOLLOW_UP_LOOKS`]).
    let mut follow_ups: u32 = 0;
    let frame_bytes = connection
        .pragma_query_value(None, "page_size", |row| row.get::<_, u64>(0))
        .unwrap_or(4096)
        .saturating_add(WAL_FRAME_HEADER_BYTES);
    // Returns on a message or once the store dropped the sender.
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_INTERVAL) {
        let now = Instant::now();
        let current = look(log);
        let changed = current.is_some() && current != seen;
        seen = current;
        if changed {
            changed_since.get_or_insert(now);
        }
        let Some(since) = changed_since else { continue };
        let bytes = current.map_or(0, |file| file.bytes);
        if bytes < copied_up_to {
            // The log started again from its beginning and was cut back.
            copied_up_to = 0;
            follow_ups = 0;
        }
        let large = bytes - copied_up_to >= policy.log_bytes;
        let follow_up = follow_ups > 0 && changed && bytes - copied_up_to < FOLLOW_UP_MAX_BYTES;
        follow_ups = follow_ups.saturating_sub(1);
        if !large && !follow_up && now.duration_since(since) < policy.delay {
            if changed {
                // What the stages added since the last look, made durable.
                if let Err(error) = std::fs::File::open(log).and_then(|file| file.sync_data()) {
                    tracing::debug!(%error, "syncing the write-ahead log failed; the next synced commit covers it");
                }
            }
            continue;
        }
        match checkpoint(connection) {
            Ok((_, copied)) => {
                last_failure = None;
                changed_since = None;
                seen = look(log);
                // Frames a commit was still writing are not copied: they
                // count as written since.
                copied_up_to = WAL_HEADER_BYTES + u64::try_from(copied).unwrap_or(0) * frame_bytes;
                if large {
                    follow_ups = FOLLOW_UP_LOOKS;
                }
            }
            Err(error) => {
                let error = error.to_string();
                if last_failure.as_deref() != Some(error.as_str()) {
                    tracing::warn!(%error, "a checkpoint of the write-ahead log failed; trying again");
                }
                last_failure = Some(error);
            }
        }
    }
}

/// One `PASSIVE` checkpoint: (frames in the log, frames now copied into the
/// database file). Never waits for the write lock or for readers.
pub fn checkpoint(connection: &Connection) -> rusqlite::Result<(i64, i64)> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get(1)?, row.get(2)?)))
}

#[cfg(test)]
mod tests {
    use super::CheckpointPolicy;
    use crate::prelude::*;
    use crate::SqliteStore;
    use std::path::Path;
    use std::time::{Duration, Instant, SystemTime};

    /// The database file's size and last modification: in WAL mode only a
    /// checkpoint writes to it.
    fn database_file(dir: &Path) -> (u64, SystemTime) {
        let metadata = std::fs::metadata(dir.join(super::super::DATABASE_FILE)).unwrap();
        (metadata.len(), metadata.modified().unwrap())
    }

    /// Waits until a checkpoint has written to the database file, then
    /// checks that it copied every frame of the log.
    fn wait_for_a_copy(dir: &Path, before: (u64, SystemTime), within: Duration) {
        let deadline = Instant::now() + within;
        while database_file(dir) == before {
            assert!(Instant::now() < deadline, "nothing was copied into the database file");
            std::thread::sleep(Duration::from_millis(50));
        }
        let connection = rusqlite::Connection::open(dir.join(super::super::DATABASE_FILE)).unwrap();
        let (frames, copied) = super::checkpoint(&connection).unwrap();
        assert_eq!(frames, copied, "every frame of the log is in the database file");
    }

    #[test]
    fn the_log_is_copied_into_the_database_file_without_a_commit_waiting_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let policy = CheckpointPolicy { log_bytes: 1 << 30, delay: Duration::from_secs(1) };
        let store = SqliteStore::open_with(dir.path(), policy).unwrap();
        for index in 0..50 {
            store.create_source(&format!("s{index}"), tandem_core::SourceKind::Website).unwrap();
        }
        let before = database_file(dir.path());
        let autocheckpoint: i64 = store
            .with_writer(|writer| Ok(writer.pragma_query_value(None, "wal_autocheckpoint", |row| row.get(0))?))
            .unwrap();
        assert_eq!(autocheckpoint, super::SAFETY_CHECKPOINT_PAGES, "commits do not checkpoint at SQLite's 1,000 pages");
        // Within a few looks after the delay the thread has copied every frame.
        wait_for_a_copy(dir.path(), before, super::CHECKPOINT_INTERVAL * 6);
    }

    /// Copying waits for the log to grow or for the delay: a page that
    /// several commits change reaches the database file once.
    #[test]
    fn the_log_is_copied_once_it_is_large_not_at_every_look() {
        let dir = tempfile::tempdir().unwrap();
        let policy = CheckpointPolicy { log_bytes: 8 << 20, delay: Duration::from_secs(3600) };
        let store = SqliteStore::open_with(dir.path(), policy).unwrap();
        store.create_source("small", tandem_core::SourceKind::Website).unwrap();
        let before = database_file(dir.path());
        std::thread::sleep(super::CHECKPOINT_INTERVAL * 3);
        assert_eq!(database_file(dir.path()), before, "a small log waits for the delay");
        store
            .with_writer(|connection| {
                connection.execute_batch(
                    "CREATE TABLE scratch (b BLOB);
                     WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 12)
                     INSERT INTO scratch SELECT zeroblob(1048576) FROM n;",
                )?;
                Ok(())
            })
            .unwrap();
        wait_for_a_copy(dir.path(), before, super::CHECKPOINT_INTERVAL * 6);
    }
}
