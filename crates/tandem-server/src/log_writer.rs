//! The log writer: the single place where events become durable. Request
//! handlers hand it their batches; it groups everything that is waiting into
//! one transaction (group commit), so throughput does not depend on one fsync
//! per request, and it answers each request only after the commit.
//!
//! With an event stream between nodes ([`crate::stream`]) the same handle
//! publishes each batch to the stream instead and answers after JetStream's
//! acknowledgement; the drain stage ([`crate::drain`]) makes it part of the
//! log on one node.

use crate::log_head::LogHead;
use crate::metrics::Metrics;
use crate::stream::{EventStream, StreamError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tandem_store::{IngestBatch, IngestOutcome, Store, StoreError};
use tokio::sync::{mpsc, oneshot};

/// Stop adding requests to a commit once it holds this many events; bounds
/// the latency of the requests at the front of the group.
const MAX_EVENTS_PER_COMMIT: usize = 20_000;
/// Requests that may wait for the writer before handlers feel backpressure.
const QUEUE_CAPACITY: usize = 4_096;

struct AppendRequest {
    batch: IngestBatch,
    reply: oneshot::Sender<Result<IngestOutcome, Arc<StoreError>>>,
}

/// The log writer could not make a batch durable.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("the log writer has stopped")]
    Stopped,
    #[error("the commit failed: {0}")]
    Commit(Arc<StoreError>),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// A handle to the log writer; clone it freely. The writer stops once every
/// handle is dropped and the queue is drained.
#[derive(Clone)]
pub struct LogWriter {
    target: Target,
    metrics: Metrics,
    /// The PII rules red values are hashed by; the built-in classes when `None`.
    pii: Option<Arc<crate::pii::PiiDirectory>>,
    inventory: Arc<KeysSeen>,
}

/// Trait and property keys seen since the last flush, per key and source:
/// their class and latest time. They are recorded in the store's PII
/// inventory at most once per [`INVENTORY_FLUSH_INTERVAL`]: by the writer
/// thread after a commit, or, when batches go to the event stream, by the
/// request that finds the last flush old enough.
type KeysSeen = Mutex<HashMap<(String, tandem_core::SourceId), (tandem_core::govern::PiiClass, i64)>>;

/// How often keys seen are written to the PII inventory.
const INVENTORY_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// A failing commit is logged at most this often, with how many were not.
const FAILURE_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Where a [`LogWriter`] makes batches durable.
#[derive(Clone)]
enum Target {
    /// The store's log, through the group-committing writer thread.
    Store(mpsc::Sender<AppendRequest>),
    /// The event stream between nodes (boxed: the client is large, and
    /// every request handler clones the writer), with the store that keeps
    /// the PII inventory and when it was last written.
    Stream(Box<EventStream>, Arc<dyn Store>, Arc<Mutex<Instant>>),
}

impl LogWriter {
    /// Starts the writer thread. `dedup_window` is how long a `messageId`
    /// stays a duplicate after it was last stored.
    /// `head` is published after every commit, so later stages see new events at once.
    pub fn spawn(
        store: Arc<dyn Store>,
        dedup_window: Duration,
        metrics: Metrics,
        head: LogHead,
    ) -> (LogWriter, JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let thread_metrics = metrics.clone();
        let inventory = Arc::new(KeysSeen::default());
        let thread_inventory = inventory.clone();
        let handle = std::thread::Builder::new()
            .name("tandem-log-writer".into())
            .spawn(move || run(store, receiver, dedup_window, thread_metrics, head, thread_inventory))
            .expect("spawning the log writer thread");
        (LogWriter { target: Target::Store(sender), metrics, pii: None, inventory }, handle)
    }

    /// A writer that publishes to the event stream; no thread of its own.
    /// `store` keeps the PII inventory of what it publishes.
    pub fn to_stream(stream: EventStream, metrics: Metrics, store: Arc<dyn Store>) -> LogWriter {
        LogWriter {
            target: Target::Stream(Box::new(stream), store, Arc::new(Mutex::new(Instant::now()))),
            metrics,
            pii: None,
            inventory: Arc::default(),
        }
    }

    /// Hashes red values by the rules `pii` has in force before anything
    /// is stored or published.
    pub fn with_pii(mut self, pii: Arc<crate::pii::PiiDirectory>) -> Self {
        self.pii = Some(pii);
        self
    }

    /// Appends a batch and waits until it is durable: committed to the
    /// store's log, or acknowledged by the event stream. Red PII values are
    /// hashed first (in events, quarantined messages and violation samples),
    /// so neither ever holds them in clear.
    pub async fn append(&self, mut batch: IngestBatch) -> Result<IngestOutcome, AppendError> {
        let mut keys = Vec::new();
        let policy = self.pii.as_ref().map(|pii| pii.current()).unwrap_or_default();
        crate::pii::scrub_batch_noting_keys(&policy, &mut batch, &mut keys);
        if !keys.is_empty() {
            let mut seen = self.inventory.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for (key, source_id, class, at) in keys {
                let entry = seen.entry((key, source_id)).or_insert((class, at));
                *entry = (entry.0.max(class), entry.1.max(at));
            }
        }
        let sender = match &self.target {
            Target::Store(sender) => sender,
            Target::Stream(stream, store, last_flush) => {
                let due = {
                    let mut last = last_flush.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    let due = last.elapsed() >= INVENTORY_FLUSH_INTERVAL;
                    if due {
                        *last = Instant::now();
                    }
                    due
                };
                if due {
                    let (store, inventory) = (store.clone(), self.inventory.clone());
                    // The store's client may block: not on the async runtime.
                    tokio::task::spawn_blocking(move || flush_inventory(store.as_ref(), &inventory));
                }
                let messages = (batch.records.len() + batch.rejected.len()) as u64;
                return match stream.publish(&batch).await {
                    Ok(outcome) => {
                        self.metrics.stream_published.inc_by(messages);
                        Ok(outcome)
                    }
                    Err(error) => {
                        self.metrics.stream_publish_failures.inc_by(messages);
                        Err(error.into())
                    }
                };
            }
        };
        let (reply, answer) = oneshot::channel();
        self.metrics.log_queue_depth.inc();
        let sent = sender.send(AppendRequest { batch, reply }).await;
        if sent.is_err() {
            self.metrics.log_queue_depth.dec();
            return Err(AppendError::Stopped);
        }
        match answer.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(error)) => Err(AppendError::Commit(error)),
            Err(_) => Err(AppendError::Stopped),
        }
    }
}

fn run(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<AppendRequest>,
    dedup_window: Duration,
    metrics: Metrics,
    head: LogHead,
    inventory: Arc<KeysSeen>,
) {
    let dedup_window_ms = i64::try_from(dedup_window.as_millis()).unwrap_or(i64::MAX);
    let mut last_flush: Option<Instant> = None;
    // While the store is down every group fails; `log_commit_failures` counts them all.
    let mut failing = crate::resolve::RateLimitedWarning::new(FAILURE_WARNING_INTERVAL);
    while let Some(first) = receiver.blocking_recv() {
        let mut events = first.batch.records.len();
        let mut group = vec![first];
        while events < MAX_EVENTS_PER_COMMIT {
            match receiver.try_recv() {
                Ok(request) => {
                    events += request.batch.records.len();
                    group.push(request);
                }
                Err(_) => break,
            }
        }
        metrics.log_queue_depth.dec_by(group.len() as i64);
        let (batches, replies): (Vec<_>, Vec<_>) =
            group.into_iter().map(|request| (request.batch, request.reply)).unzip();
        let started = Instant::now();
        let dedup_since_ms = chrono::Utc::now().timestamp_millis().saturating_sub(dedup_window_ms);
        match store.append(&batches, dedup_since_ms) {
            Ok(outcomes) => {
                // Read back rather than computed: the head is the store's, so
                // an append from another process in between is included.
                match store.head() {
                    Ok(position) => {
                        head.publish(position);
                        metrics.log_head.set(position.0 as i64);
                    }
                    Err(error) => tracing::warn!(%error, "reading the log head failed"),
                }
                metrics.log_commits.inc();
                metrics.log_commit_events.observe(events as f64);
                metrics.log_commit_duration.observe(started.elapsed().as_secs_f64());
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // A requester that went away still had its events stored.
                    let _ = reply.send(Ok(outcome));
                }
                if last_flush.is_none_or(|at| at.elapsed() >= INVENTORY_FLUSH_INTERVAL) {
                    flush_inventory(store.as_ref(), &inventory);
                    last_flush = Some(Instant::now());
                }
            }
            Err(error) => {
                metrics.log_commit_failures.inc();
                if let Some(held_back) = failing.admit(Instant::now()) {
                    tracing::error!(%error, requests = replies.len(), events, held_back, "group commit failed");
                }
                let error = Arc::new(error);
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
    flush_inventory(store.as_ref(), &inventory);
    tracing::debug!("log writer drained and stopped");
}

/// Records the keys seen since the last flush in the PII inventory.
fn flush_inventory(store: &dyn Store, inventory: &KeysSeen) {
    let seen: Vec<tandem_store::PiiKeySeen> = inventory
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .drain()
        .map(|((key, source_id), (class, last_seen_ms))| tandem_store::PiiKeySeen {
            key,
            source_id,
            class,
            last_seen_ms,
        })
        .collect();
    if seen.is_empty() {
        return;
    }
    if let Err(error) = store.record_pii_keys(&seen) {
        tracing::warn!(%error, keys = seen.len(), "recording the pii inventory failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::{EventType, LogPosition, LogRecord, MessageId, SourceKind};
    use tandem_store::prelude::*;
    use tandem_store::SqliteStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_grouped_and_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let source = store.create_source("web", SourceKind::Website).unwrap().id;
        let metrics = Metrics::new();
        let head = LogHead::new(LogPosition(0));
        let (writer, thread) =
            LogWriter::spawn(store.clone(), Duration::from_secs(86_400), metrics.clone(), head.clone());
        let mut tasks = Vec::new();
        for request in 0..200 {
            let writer = writer.clone();
            let source = source.clone();
            tasks.push(tokio::spawn(async move {
                let records = (0..5)
                    .map(|n| LogRecord {
                        source_id: source.clone(),
                        message_id: MessageId::new(format!("{request}-{n}")),
                        event_type: EventType::Track,
                        received_at_ms: 1,
                        timestamp_ms: 1,
                        payload: "{}".into(),
                    })
                    .collect();
                writer.append(IngestBatch { records, rejected: Vec::new(), ..Default::default() }).await.unwrap()
            }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap().stored, 5);
        }
        drop(writer);
        thread.join().unwrap();
        let log = store.read_log(LogPosition(0), 10_000).unwrap();
        assert_eq!(log.len(), 1_000);
        assert_eq!(head.current(), log.last().unwrap().position, "the head is published after each commit");
        let text = metrics.render();
        let commits: f64 =
            text.lines().find_map(|line| line.strip_prefix("tandem_log_commits_total ")).unwrap().parse().unwrap();
        assert!((1.0..=200.0).contains(&commits), "{commits} commits");
    }
}
