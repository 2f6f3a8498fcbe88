//! The log head: the position of the newest committed event, published by the
//! log writer (or the drain stage) after every commit and followed by the
//! resolver. It is the log's [`Progress`], so any number of stages wait on
//! it without polling and without the writer knowing who they are; a poller
//! publishes what other processes (the CLI importer) append, within its
//! interval. The stages after the resolver follow the resolver's own
//! progress instead ([`crate::progress::StageProgress`]): the head moves
//! before they have anything to read.

use crate::progress::Progress;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::LogPosition;
use tandem_store::Store;

/// The committed head of the log; cheap to clone (every clone is the same head).
pub type LogHead = Progress<LogPosition>;

impl Progress<LogPosition> {
    /// Follows appends made by other processes: every `interval`, reads the
    /// store's head and publishes it. Runs until the task is dropped.
    pub async fn poll_store(self, store: Arc<dyn Store>, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.head()).await {
                Ok(Ok(position)) => self.publish(position),
                Ok(Err(error)) => tracing::warn!(%error, "reading the log head failed"),
                Err(_) => {}
            }
        }
    }
}
