//! Checkpoints of the write-ahead log, off the commit path. SQLite's own
//! automatic checkpoint runs inside the commit that crosses its threshold,
//! on the one writer connection every stage shares, so every 4 MiB of log
//! one commit (an acknowledgement, a resolver batch, a delivery) also waited
//! for the database file to be written and synced. Here a thread of its own,
//! on a connection of its own, runs a `PASSIVE` checkpoint once a second:
//! it copies what the log holds into the database file without taking the
//! write lock, so writers go on committing meanwhile. Durability does not
//! change: a commit is durable once its log frames are synced, before any
//! checkpoint. Copying once a second also writes a page changed by many
//! commits in that second once rather than once per 4 MiB of log.
//!
//! The writer keeps SQLite's automatic checkpoint as a safety valve at a
//! much larger threshold ([`SAFETY_CHECKPOINT_PAGES`]), for a log the thread
//! could not keep short (a reader holding an old snapshot for long).

use rusqlite::Connection;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// How often the thread copies the log into the database file.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// The writer's own automatic checkpoint threshold, in pages (256 MiB of
/// 4 KiB pages): reached only when the thread falls behind.
pub const SAFETY_CHECKPOINT_PAGES: i64 = 65_536;

/// The checkpointing thread of one store; dropping it stops the thread
/// within [`CHECKPOINT_INTERVAL`].
pub struct Checkpointer {
    _stop: mpsc::Sender<()>,
}

impl Checkpointer {
    /// Starts checkpointing the database at `path` on a connection of its
    /// own. A failed checkpoint is logged and tried again a second later;
    /// the writer's safety valve covers a thread that cannot run at all.
    pub fn start(path: &Path) -> Result<Checkpointer, crate::StoreError> {
        let connection = super::open_connection(path)?;
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("tandem-checkpoint".into())
            .spawn(move || run(&connection, &stopped))
            .map_err(|error| crate::StoreError::Backend(Box::new(error)))?;
        Ok(Checkpointer { _stop: stop })
    }
}

fn run(connection: &Connection, stopped: &mpsc::Receiver<()>) {
    let mut last_failure: Option<String> = None;
    // Returns on a message or once the store dropped the sender.
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_INTERVAL) {
        match checkpoint(connection) {
            Ok(_) => last_failure = None,
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
    use crate::prelude::*;
    use crate::SqliteStore;

    #[test]
    fn the_log_is_copied_into_the_database_file_without_a_commit_waiting_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let wal_pages = || {
            let connection = rusqlite::Connection::open(dir.path().join(super::super::DATABASE_FILE)).unwrap();
            // A checkpoint that copies nothing new reports what the log holds.
            super::checkpoint(&connection).unwrap()
        };
        for index in 0..50 {
            store.create_source(&format!("s{index}"), tandem_core::SourceKind::Website).unwrap();
        }
        let autocheckpoint: i64 = store
            .with_writer(|writer| Ok(writer.pragma_query_value(None, "wal_autocheckpoint", |row| row.get(0))?))
            .unwrap();
        assert_eq!(autocheckpoint, super::SAFETY_CHECKPOINT_PAGES, "commits do not checkpoint at SQLite's 1,000 pages");
        // Within a couple of intervals the thread has copied every frame.
        let deadline = std::time::Instant::now() + super::CHECKPOINT_INTERVAL * 5;
        loop {
            let (frames, copied) = wal_pages();
            if frames > 0 && frames == copied {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{copied} of {frames} frames copied");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}
