//! Checkpoints of the write-ahead log, off the commit path. SQLite's own
//! automatic checkpoint runs inside the commit that crosses its threshold,
//! on the one writer connection every stage shares, so every 4 MiB of log
//! one commit (an acknowledgement, a resolver batch, a delivery) also waited
//! for the database file to be written and synced. Here a thread of its own,
//! on a connection of its own, runs `PASSIVE` checkpoints: each copies what
//! the log holds into the database file without taking the write lock, so
//! writers go on committing meanwhile. Durability does not change: a commit
//! is durable once its log frames are synced, before any checkpoint.
//!
//! A checkpoint writes each page the log holds once, however many commits
//! changed it. The resolver's commits at a million customers each change
//! most pages of the profile, identifier and timeline tables, so copying
//! after every commit wrote those pages twice per commit (log, then file);
//! copying once the log has gathered several commits writes them to the
//! file once for all of them. So the thread copies once the log holds
//! [`CheckpointPolicy::pages`] not yet copied, or once what it holds has
//! waited [`CheckpointPolicy::delay`]. It learns how much the log holds from
//! the shared-memory index SQLite keeps beside it (`-shm`, whose header
//! SQLite documents in its WAL file format); when that cannot be read it
//! copies at every look. Between copies it syncs the log once a look when
//! it grew: the stages' commits are not synced one by one (see
//! `with_stage_writer`), and stay durable within a second.
//!
//! The writer keeps SQLite's automatic checkpoint as a safety valve at a
//! larger threshold ([`SAFETY_CHECKPOINT_PAGES`]), for a log the thread
//! could not keep short (a reader holding an old snapshot for long).

use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often the thread looks at the log.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// When the thread copies the log into the database file.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointPolicy {
    /// Pages waiting in the log that start a copy at once.
    pub pages: u32,
    /// How long pages may wait in the log before a copy.
    pub delay: Duration,
}

impl Default for CheckpointPolicy {
    /// A copy per GiB of log (4 KiB pages), or every half minute.
    fn default() -> Self {
        CheckpointPolicy { pages: 262_144, delay: Duration::from_secs(30) }
    }
}

/// The writer's own automatic checkpoint threshold, in pages (2 GiB of
/// 4 KiB pages): reached only when the thread falls behind.
pub const SAFETY_CHECKPOINT_PAGES: i64 = 524_288;

/// The checkpointing thread of one store; dropping it stops the thread
/// within [`CHECKPOINT_INTERVAL`].
pub struct Checkpointer {
    _stop: mpsc::Sender<()>,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path` on a connection of its
    /// own. A failed checkpoint is logged and tried again at the next look;
    /// the writer's safety valve covers a thread that cannot run at all.
    pub fn start(path: &Path, policy: CheckpointPolicy) -> Result<Checkpointer, crate::StoreError> {
        let connection = super::open_connection(path)?;
        let index = shared_index_path(path);
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("tandem-checkpoint".into())
            .spawn(move || run(&connection, &index, policy, &stopped))
            .map_err(|error| crate::StoreError::Backend(Box::new(error)))?;
        Ok(Checkpointer { _stop: stop })
    }
}

fn shared_index_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-shm");
    PathBuf::from(name)
}

fn run(connection: &Connection, index: &Path, policy: CheckpointPolicy, stopped: &mpsc::Receiver<()>) {
    let mut last_failure: Option<String> = None;
    // Since when the log has held pages not yet copied.
    let mut waiting_since: Option<Instant> = None;
    let mut pages_seen = 0;
    let log = index.with_extension("db-wal");
    // Returns on a message or once the store dropped the sender.
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_INTERVAL) {
        let now = Instant::now();
        let (due, pages) = match uncopied_pages(index) {
            Some(0) => {
                waiting_since = None;
                (false, 0)
            }
            Some(pages) => {
                let since = *waiting_since.get_or_insert(now);
                (pages >= policy.pages || now.duration_since(since) >= policy.delay, pages)
            }
            None => (true, 0),
        };
        if !due {
            // The stages commit without syncing; what they added to the log
            // since the last look is synced here, so it is durable within
            // a look even when no synced commit follows it.
            if pages != pages_seen {
                if let Err(error) = std::fs::File::open(&log).and_then(|file| file.sync_data()) {
                    tracing::debug!(%error, "syncing the write-ahead log failed; the next synced commit covers it");
                }
                pages_seen = pages;
            }
            continue;
        }
        pages_seen = 0;
        match checkpoint(connection) {
            Ok(_) => {
                last_failure = None;
                waiting_since = None;
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

/// Pages in the log not yet copied into the database file, from the
/// header of SQLite's shared-memory index: the last valid frame
/// (`mxFrame`, bytes 16–19 of the index header) less the frames already
/// copied (`nBackfill`, bytes 96–99), both in the machine's byte order.
/// `None` when the index cannot be read. A read racing a commit may be a
/// little off, which only moves a copy by one look.
fn uncopied_pages(index: &Path) -> Option<u32> {
    use std::io::Read;
    let mut header = [0u8; 100];
    std::fs::File::open(index).ok()?.read_exact(&mut header).ok()?;
    let field = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().expect("four bytes"));
    Some(field(16).saturating_sub(field(96)))
}

/// One `PASSIVE` checkpoint: (frames in the log, frames now copied into the
/// database file). Never waits for the write lock or for readers.
pub fn checkpoint(connection: &Connection) -> rusqlite::Result<(i64, i64)> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get(1)?, row.get(2)?)))
}

#[cfg(test)]
mod tests {
    use super::{CheckpointPolicy, SAFETY_CHECKPOINT_PAGES};
    use crate::prelude::*;
    use crate::SqliteStore;
    use std::time::{Duration, Instant};

    fn write_some(store: &SqliteStore, count: usize) {
        for index in 0..count {
            store.create_source(&format!("s{index}"), tandem_core::SourceKind::Website).unwrap();
        }
    }

    /// (frames in the log, frames copied), asked of SQLite itself: a
    /// checkpoint that copies nothing new reports what the log holds.
    fn log_frames(dir: &std::path::Path) -> (i64, i64) {
        let connection = rusqlite::Connection::open(dir.join(super::super::DATABASE_FILE)).unwrap();
        super::checkpoint(&connection).unwrap()
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + super::CHECKPOINT_INTERVAL * 6;
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn the_log_is_copied_into_the_database_file_without_a_commit_waiting_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let policy = CheckpointPolicy { pages: 1, delay: Duration::from_secs(3600) };
        let store = SqliteStore::open_with_checkpoints(dir.path(), policy).unwrap();
        write_some(&store, 50);
        let autocheckpoint: i64 = store
            .with_writer(|writer| Ok(writer.pragma_query_value(None, "wal_autocheckpoint", |row| row.get(0))?))
            .unwrap();
        assert_eq!(autocheckpoint, SAFETY_CHECKPOINT_PAGES, "commits do not checkpoint at SQLite's 1,000 pages");
        wait_until("the thread copies every frame", || {
            let (frames, copied) = log_frames(dir.path());
            frames > 0 && frames == copied
        });
    }

    #[test]
    fn the_log_gathers_commits_until_its_size_or_delay_is_reached() {
        let dir = tempfile::tempdir().unwrap();
        let patient = CheckpointPolicy { pages: 100_000, delay: Duration::from_secs(3600) };
        let store = SqliteStore::open_with_checkpoints(dir.path(), patient).unwrap();
        write_some(&store, 20);
        let index = super::shared_index_path(&dir.path().join(super::super::DATABASE_FILE));
        let waiting = super::uncopied_pages(&index).unwrap();
        assert!(waiting > 0, "the writes wait in the log");
        std::thread::sleep(super::CHECKPOINT_INTERVAL * 3);
        assert_eq!(super::uncopied_pages(&index), Some(waiting), "nothing was copied below the size and the delay");
        // The index header reads what SQLite itself reports.
        let connection = super::super::open_connection(&dir.path().join(super::super::DATABASE_FILE)).unwrap();
        let (frames, copied) = super::checkpoint(&connection).unwrap();
        assert_eq!((frames as u32, copied as u32), (waiting, waiting));
        assert_eq!(super::uncopied_pages(&index), Some(0));
        drop(store);

        let dir = tempfile::tempdir().unwrap();
        let prompt = CheckpointPolicy { pages: 100_000, delay: Duration::from_secs(2) };
        let store = SqliteStore::open_with_checkpoints(dir.path(), prompt).unwrap();
        write_some(&store, 20);
        let index = super::shared_index_path(&dir.path().join(super::super::DATABASE_FILE));
        wait_until("the delay starts a copy", || super::uncopied_pages(&index) == Some(0));
    }
}
