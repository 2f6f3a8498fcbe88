//! The drain stage: with an event stream ([`crate::stream`]), the one place
//! where published events enter the PostgreSQL log. It runs on exactly one
//! node at a time (the `drain` stage lease), reads the stream in order
//! through a durable pull consumer, and appends each fetched batch with
//! [`EventLog::append_drained`], which applies the log's `messageId` dedup
//! and records the batch's last stream sequence in the same transaction.
//!
//! So a crash mid-batch neither loses nor repeats an event: the transaction
//! committed (the sequence moved with the events) or it did not (neither
//! did), and on restart, or on another node taking the lease, the consumer
//! is made anew to start after the recorded sequence. A message JetStream
//! delivers again at or below it is skipped. Acknowledging to JetStream
//! comes after the commit and only saves redeliveries.

use crate::cluster::{LeaseBoard, LeaseKeeper, LeaseTurn};
use crate::log_head::LogHead;
use crate::metrics::Metrics;
use crate::stream::{EventStream, StreamMessage};
use async_nats::jetstream::consumer::PullConsumer;
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_store::{DrainCommit, IngestBatch, Stage, Store, StoreError, StreamRange};

/// Messages per fetch, and so at most per drain transaction.
const MAX_MESSAGES_PER_COMMIT: usize = 2_000;
/// How long one fetch waits for messages: the longest a stop or a lost
/// lease goes unnoticed while the stream is idle.
const FETCH_WAIT: Duration = Duration::from_millis(500);

/// Fetches in a row that bring nothing before [`Drain::catch_up`] gives up.
const CATCH_UP_IDLE_STEPS: u32 = 60;

/// The drain could not move on this turn.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("the stream stopped delivering at sequence {at} before its end at {last}")]
    Stalled { at: u64, last: u64 },
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one [`Drain::step`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainStep {
    /// Messages committed past: events and refusals appended, and any
    /// message that is not Tandem's (skipped with a warning).
    pub drained: u64,
    /// Messages at or below the recorded sequence, delivered again and skipped.
    pub skipped: u64,
    /// The recorded sequence after the step.
    pub sequence: u64,
    /// Messages the stream holds after the last one fetched (deleted ones
    /// are not counted, unlike the gap between sequences).
    pub pending: u64,
}

/// The drain's state on the node that holds its lease.
pub struct Drain {
    store: Arc<dyn Store>,
    stream: EventStream,
    runtime: tokio::runtime::Handle,
    dedup_window_ms: i64,
    metrics: Metrics,
    /// The consumer and the sequence recorded when it was made; `None`
    /// until the first step and after anything failed.
    consumer: Option<(PullConsumer, u64)>,
}

impl Drain {
    /// A drain over `stream` into `store`; `runtime` drives the NATS client
    /// from the drain's own thread.
    pub fn new(
        store: Arc<dyn Store>,
        stream: EventStream,
        runtime: tokio::runtime::Handle,
        dedup_window: Duration,
        metrics: Metrics,
    ) -> Drain {
        let dedup_window_ms = i64::try_from(dedup_window.as_millis()).unwrap_or(i64::MAX);
        Drain { store, stream, runtime, dedup_window_ms, metrics, consumer: None }
    }

    /// Forgets the consumer, so the next step starts again after the
    /// recorded sequence (after a lost lease or a failure).
    pub fn reset(&mut self) {
        self.consumer = None;
    }

    /// Steps until everything the stream held when called is in the log;
    /// returns the recorded sequence. For one process that loads data and
    /// then reads the log (the demo, tests); a serving node drains in
    /// [`spawn`]'s thread instead.
    pub fn catch_up(&mut self) -> Result<u64, DrainError> {
        let last = self.runtime.block_on(self.stream.last_sequence())?;
        let mut idle_steps = 0;
        loop {
            let step = self.step()?;
            // Nothing pending also ends it when the last messages were
            // deleted (by an erasure), which the sequence never reaches.
            if step.sequence >= last || step.pending == 0 {
                return Ok(step.sequence);
            }
            idle_steps = if step.drained == 0 { idle_steps + 1 } else { 0 };
            if idle_steps >= CATCH_UP_IDLE_STEPS {
                return Err(DrainError::Stalled { at: step.sequence, last });
            }
        }
    }

    /// Fetches what the stream holds after the recorded sequence (waiting up
    /// to [`FETCH_WAIT`]) and appends it in one transaction.
    pub fn step(&mut self) -> Result<DrainStep, DrainError> {
        let result = self.try_step();
        if result.is_err() {
            self.consumer = None;
        }
        result
    }

    fn try_step(&mut self) -> Result<DrainStep, DrainError> {
        let stream_name = self.stream.name().to_owned();
        if self.consumer.is_none() {
            let recorded = self.store.drained_sequence(&stream_name)?;
            let consumer = self.runtime.block_on(self.stream.drain_consumer(recorded))?;
            self.metrics.drain_sequence.set(recorded as i64);
            self.consumer = Some((consumer, recorded));
        }
        let (consumer, recorded) = self.consumer.as_mut().expect("made above");
        let after = *recorded;
        let messages = self.runtime.block_on(async {
            let mut batch = consumer
                .fetch()
                .max_messages(MAX_MESSAGES_PER_COMMIT)
                .expires(FETCH_WAIT)
                .messages()
                .await
                .map_err(|error| crate::stream::StreamError::Read(error.to_string()))?;
            let mut messages = Vec::new();
            while let Some(message) = batch.next().await {
                messages.push(message.map_err(|error| crate::stream::StreamError::Read(error.to_string()))?);
            }
            Ok::<_, crate::stream::StreamError>(messages)
        })?;
        let mut step = DrainStep { sequence: after, ..DrainStep::default() };
        let mut batches: Vec<IngestBatch> = Vec::with_capacity(messages.len());
        let mut through = after;
        for message in &messages {
            let sequence =
                message.info().map_err(|error| crate::stream::StreamError::Read(error.to_string()))?.stream_sequence;
            if sequence <= through {
                step.skipped += 1;
                continue;
            }
            through = sequence;
            step.drained += 1;
            match StreamMessage::decode(&message.payload) {
                Some(decoded) => batches.push(decoded.into_batch()),
                // Not Tandem's (someone published on its subjects): nothing
                // to append, but the sequence moves past it.
                None => tracing::warn!(sequence, "skipped a stream message that is not a tandem event"),
            }
        }
        if through > after {
            let dedup_since_ms = chrono::Utc::now().timestamp_millis().saturating_sub(self.dedup_window_ms);
            let range = StreamRange { after, through };
            match self.store.append_drained(&stream_name, range, &batches, dedup_since_ms)? {
                DrainCommit::Appended(outcomes) => {
                    let duplicates: u32 = outcomes.iter().map(|outcome| outcome.duplicates).sum();
                    self.metrics.drain_commits.inc();
                    self.metrics.drain_messages.inc_by(step.drained);
                    self.metrics.drain_duplicates.inc_by(u64::from(duplicates));
                    self.metrics.drain_sequence.set(through as i64);
                    *recorded = through;
                    step.sequence = through;
                }
                DrainCommit::Stale { recorded: elsewhere } => {
                    // Another node drained meanwhile: start again after it.
                    self.metrics.drain_commit_failures.inc();
                    tracing::warn!(
                        after,
                        recorded = elsewhere,
                        "the stream was drained further elsewhere; resuming there"
                    );
                    self.consumer = None;
                    return Ok(DrainStep { sequence: elsewhere, ..DrainStep::default() });
                }
            }
        }
        // Acknowledge everything up to the last message (the consumer acks
        // all below it): saves JetStream redelivering what is committed.
        if let Some(last) = messages.last() {
            if let Err(error) = self.runtime.block_on(last.ack()) {
                tracing::debug!(%error, "acknowledging drained messages failed; they will be skipped when redelivered");
            }
        }
        step.pending = match messages.last() {
            Some(last) => last.info().map_err(|error| crate::stream::StreamError::Read(error.to_string()))?.pending,
            // A fetch that waited and found nothing: ask the consumer.
            None => {
                self.runtime
                    .block_on(consumer.info())
                    .map_err(|error| crate::stream::StreamError::Read(error.to_string()))?
                    .num_pending
            }
        };
        self.metrics.drain_lag_messages.set(step.pending as i64);
        Ok(step)
    }
}

/// Starts the drain thread: it takes the drain lease when free, drains
/// while it holds it, and publishes the log head after every commit.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    store: Arc<dyn Store>,
    stream: EventStream,
    runtime: tokio::runtime::Handle,
    dedup_window: Duration,
    head: LogHead,
    metrics: Metrics,
    leases: LeaseBoard,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("tandem-drain".into())
        .spawn(move || {
            let mut drain = Drain::new(store.clone(), stream, runtime, dedup_window, metrics.clone());
            let mut lease = LeaseKeeper::new(store.clone(), Stage::DRAIN);
            while !stop.load(Ordering::Relaxed) {
                match lease.poll() {
                    LeaseTurn::Held => {
                        leases.set(Stage::DRAIN, true);
                        metrics.drain_lease_held.set(1);
                    }
                    LeaseTurn::Waiting => {
                        leases.set(Stage::DRAIN, false);
                        continue;
                    }
                    LeaseTurn::Lost(lost) => {
                        tracing::warn!(%lost, "stopped draining the stream; waiting for the lease again");
                        leases.set(Stage::DRAIN, false);
                        metrics.drain_lease_held.set(0);
                        drain.reset();
                        continue;
                    }
                }
                match drain.step() {
                    Ok(step) if step.drained > 0 => match store.head() {
                        Ok(position) => {
                            head.publish(position);
                            metrics.log_head.set(position.0 as i64);
                        }
                        Err(error) => tracing::warn!(%error, "reading the log head failed"),
                    },
                    Ok(_) => {}
                    Err(error) => {
                        tracing::error!(%error, "draining the stream failed; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            leases.set(Stage::DRAIN, false);
            metrics.drain_lease_held.set(0);
            tracing::debug!("drain stage stopped");
        })
        .expect("spawning the drain thread")
}
