//! The event stream between nodes (NATS JetStream), used when the server
//! runs with `--log nats://…` beside a PostgreSQL store. Every node's
//! collect stage publishes each accepted batch here and answers only after
//! JetStream acknowledged every message (stored, on a quorum of replicas for
//! a replicated stream); the drain stage ([`crate::drain`]) on one node then
//! appends the stream, in order, into the PostgreSQL log that every later
//! stage follows.
//!
//! One message per event or refusal, on the subject `tandem.events.<source>`,
//! and the tracking-plan violations a request was found with in messages of
//! their own (a few per request at most, see [`MAX_VIOLATION_MESSAGE_BYTES`]),
//! so the drain counts them in the append that stores the request's events,
//! as a direct append does. An event carries `Nats-Msg-Id` = source id and
//! `messageId`, so JetStream drops an SDK's retry within its duplicate
//! window; the drain applies the 24-hour (or permanent) `messageId` dedup of
//! the log on top.

pub mod testing;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use base64::Engine;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tandem_core::{EventType, LogRecord, MessageId, SourceId};
use tandem_store::{Dedup, IngestBatch, IngestOutcome, PlanViolationRecord, QuarantineRecord};

/// The stream's name unless configured otherwise.
pub const DEFAULT_STREAM_NAME: &str = "TANDEM_EVENTS";
/// Every subject of the stream starts with this; the source id follows.
pub const SUBJECT_PREFIX: &str = "tandem.events";
/// The drain stage's durable pull consumer.
pub const DRAIN_CONSUMER: &str = "tandem-drain";
/// How long JetStream drops a repeated `Nats-Msg-Id` (its own default).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long a message stays in the stream after it was published. The drain
/// normally keeps up within seconds; this bounds the stream's disk while
/// leaving a week to bring a stopped drain back.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a drained batch may stay unacknowledged before JetStream
/// offers it again (the drain skips what it already committed).
const DRAIN_ACK_WAIT: Duration = Duration::from_secs(60);
/// Messages the drain consumer may hold unacknowledged: twice a fetch, so a
/// fetch is never cut short. JetStream's default of 1,000 is below one
/// fetch of 2,000: the server then delivers 1,000 and holds the request open
/// until it expires, which capped draining at under 2,000 messages a second.
const DRAIN_MAX_ACK_PENDING: i64 = 4_000;
/// Messages read per fetch while looking for a person's messages to erase.
const ERASURE_SCAN_BATCH: usize = 1_000;
/// A request's violations are split into messages of about this size at
/// most: one violation keeps a sample of up to 4 KiB, a batch may hold 2,500
/// violating messages, and NATS refuses messages over 1 MiB by default.
pub const MAX_VIOLATION_MESSAGE_BYTES: usize = 256 * 1024;

/// Where the stream lives and how it is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// `nats://host:port` of one or more servers of the NATS cluster.
    pub servers: Vec<String>,
    /// The stream's name.
    pub stream: String,
    /// Replicas of a stream created here; `None` for min(3, cluster size).
    pub replicas: Option<usize>,
    /// How long JetStream drops a repeated `Nats-Msg-Id` in a stream created
    /// here (JetStream's default, two minutes, unless set).
    pub duplicate_window: Duration,
}

impl StreamOptions {
    /// Options for the servers of a `nats://a:4222,b:4222` URL list.
    pub fn parse(urls: &str) -> Result<StreamOptions, StreamError> {
        let servers: Vec<String> =
            urls.split(',').map(str::trim).filter(|url| !url.is_empty()).map(str::to_owned).collect();
        if servers.is_empty() || servers.iter().any(|url| !url.starts_with("nats://") || url.len() <= "nats://".len()) {
            return Err(StreamError::Url(urls.to_owned()));
        }
        Ok(StreamOptions {
            servers,
            stream: DEFAULT_STREAM_NAME.to_owned(),
            replicas: None,
            duplicate_window: DUPLICATE_WINDOW,
        })
    }
}

/// The stream could not be reached, set up, written or read.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("log must be a list of nats://host:port URLs separated by commas, got {0:?}")]
    Url(String),
    #[error("cannot connect to nats at {servers}: {reason}")]
    Connect { servers: String, reason: String },
    #[error("cannot create or open the {stream} stream: {reason}")]
    Setup { stream: String, reason: String },
    #[error("publishing to the event stream failed: {0}")]
    Publish(String),
    #[error("reading the event stream failed: {0}")]
    Read(String),
    #[error("erasing from the event stream failed: {0}")]
    Erase(String),
}

/// What [`EventStream::erase_matching`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamErasure {
    /// Messages read.
    pub scanned: u64,
    /// Messages deleted.
    pub erased: u64,
    /// The stream sequence of the last message deleted; 0 when none was.
    pub last_erased_sequence: u64,
}

/// A connection to the event stream; cheap to clone.
#[derive(Clone)]
pub struct EventStream {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    stream: String,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EventStream").field("stream", &self.stream).finish()
    }
}

impl EventStream {
    /// Connects (the client reconnects on its own afterwards) and creates
    /// the stream when it is missing.
    pub async fn connect(options: &StreamOptions) -> Result<EventStream, StreamError> {
        let client = async_nats::ConnectOptions::new()
            .name("tandem")
            .connection_timeout(Duration::from_secs(5))
            .connect(options.servers.clone())
            .await
            .map_err(|error| StreamError::Connect { servers: options.servers.join(","), reason: error.to_string() })?;
        let jetstream = jetstream::new(client.clone());
        let info = client.server_info();
        // Every server of a cluster is listed in `connect_urls` (this one too).
        let cluster_size = if info.cluster.is_some() { info.connect_urls.len().max(options.servers.len()) } else { 1 };
        let replicas = options.replicas.unwrap_or(cluster_size.clamp(1, 3));
        let config = jetstream::stream::Config {
            name: options.stream.clone(),
            subjects: vec![format!("{SUBJECT_PREFIX}.>")],
            num_replicas: replicas,
            duplicate_window: options.duplicate_window,
            max_age: MAX_AGE,
            storage: jetstream::stream::StorageType::File,
            retention: jetstream::stream::RetentionPolicy::Limits,
            ..Default::default()
        };
        jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|error| StreamError::Setup { stream: options.stream.clone(), reason: error.to_string() })?;
        Ok(EventStream { client, jetstream, stream: options.stream.clone() })
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.stream
    }

    /// Whether the client is connected to a NATS server now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes a batch's events and refusals and waits for JetStream's
    /// acknowledgement of every one. `stored` counts the events JetStream
    /// stored, `duplicates` those it dropped as repeats within its window;
    /// the drain's dedup may still find an event stored in the log before.
    pub async fn publish(&self, batch: &IngestBatch) -> Result<IngestOutcome, StreamError> {
        let mut acks = Vec::with_capacity(batch.records.len() + batch.rejected.len());
        for record in &batch.records {
            let body = serde_json::to_vec(&StreamMessage::event(record, batch.dedup))
                .map_err(|error| StreamError::Publish(error.to_string()))?;
            let publish =
                jetstream::message::PublishMessage::build().payload(body.into()).message_id(message_id(record));
            acks.push(
                self.jetstream
                    .send_publish(subject(&record.source_id), publish)
                    .await
                    .map_err(|error| StreamError::Publish(error.to_string()))?,
            );
        }
        let others = batch.rejected.iter().map(|rejected| (&rejected.source_id, StreamMessage::rejected(rejected)));
        let violations = violation_messages(&batch.violations);
        for (source_id, message) in others.chain(violations) {
            let body = serde_json::to_vec(&message).map_err(|error| StreamError::Publish(error.to_string()))?;
            acks.push(
                self.jetstream
                    .send_publish(subject(source_id), jetstream::message::PublishMessage::build().payload(body.into()))
                    .await
                    .map_err(|error| StreamError::Publish(error.to_string()))?,
            );
        }
        let mut outcome = IngestOutcome { quarantined: batch.rejected.len() as u32, ..IngestOutcome::default() };
        for (index, ack) in acks.into_iter().enumerate() {
            let ack = ack.await.map_err(|error| StreamError::Publish(error.to_string()))?;
            if index < batch.records.len() {
                if ack.duplicate {
                    outcome.duplicates += 1;
                } else {
                    outcome.stored += 1;
                }
            }
        }
        Ok(outcome)
    }

    /// The sequence of the newest message in the stream; 0 when empty.
    pub async fn last_sequence(&self) -> Result<u64, StreamError> {
        let mut stream =
            self.jetstream.get_stream(&self.stream).await.map_err(|error| StreamError::Read(error.to_string()))?;
        let info = stream.info().await.map_err(|error| StreamError::Read(error.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// What the stream holds: its first and last sequences and the
    /// sequences deleted between them, for the drain stage's lag.
    pub async fn position(&self) -> Result<crate::cluster::StreamPosition, StreamError> {
        let stream =
            self.jetstream.get_stream(&self.stream).await.map_err(|error| StreamError::Read(error.to_string()))?;
        let info = stream
            .info_builder()
            .with_deleted(true)
            .fetch()
            .await
            .map_err(|error| StreamError::Read(error.to_string()))?
            .info;
        let mut deleted = info.state.deleted.unwrap_or_default();
        deleted.sort_unstable();
        Ok(crate::cluster::StreamPosition {
            stream: self.stream.clone(),
            first_sequence: info.state.first_sequence,
            last_sequence: info.state.last_sequence,
            deleted,
        })
    }

    /// Deletes from the stream every message that holds one of `patterns`
    /// (the JSON-quoted identifier values of a person being erased, see
    /// [`tandem_store::govern::erasure_patterns`]) in an event, a refusal or
    /// a violation's sample, compared without regard to case as the store's
    /// erasure compares them. Reads every message up to the stream's end
    /// when called (drained ones too: the stream keeps them for days); a
    /// deleted message is overwritten on the server's disk and never
    /// delivered again, so the drain cannot bring it back into the log. A
    /// violations message holding one is deleted whole: it carries the
    /// violations of one request.
    pub async fn erase_matching(&self, patterns: &[String]) -> Result<StreamErasure, StreamError> {
        let read = |error: &dyn std::fmt::Display| StreamError::Read(error.to_string());
        let mut erasure = StreamErasure::default();
        let patterns: Vec<String> = patterns.iter().map(|pattern| pattern.to_lowercase()).collect();
        let mut stream = self.jetstream.get_stream(&self.stream).await.map_err(|error| read(&error))?;
        let end = stream.info().await.map_err(|error| read(&error))?.state.last_sequence;
        if patterns.is_empty() || end == 0 {
            return Ok(erasure);
        }
        // Ephemeral, unacknowledged: the server drops it soon after the scan.
        let consumer: PullConsumer = stream
            .create_consumer(PullConfig {
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|error| read(&error))?;
        'scan: loop {
            let mut batch = consumer
                .fetch()
                .max_messages(ERASURE_SCAN_BATCH)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .map_err(|error| read(&error))?;
            let mut fetched = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|error| read(&error))?;
                fetched += 1;
                let info = message.info().map_err(|error| read(&error))?;
                let (sequence, pending) = (info.stream_sequence, info.pending);
                if sequence > end {
                    break 'scan;
                }
                erasure.scanned += 1;
                if StreamMessage::decode(&message.payload).is_some_and(|decoded| decoded.holds_any(&patterns)) {
                    stream
                        .delete_message(sequence)
                        .await
                        .map_err(|error| StreamError::Erase(format!("deleting message {sequence} failed: {error}")))?;
                    erasure.erased += 1;
                    erasure.last_erased_sequence = sequence;
                }
                if sequence == end || pending == 0 {
                    break 'scan;
                }
            }
            if fetched == 0 {
                break;
            }
        }
        let name = consumer.cached_info().name.clone();
        // Best effort: an ephemeral consumer left behind expires by itself.
        let _ = stream.delete_consumer(&name).await;
        Ok(erasure)
    }

    /// The drain's durable pull consumer, made anew to start right after
    /// `drained` (the sequence the log has recorded), so the stream, not the
    /// consumer's own state, never decides where draining resumes.
    pub async fn drain_consumer(&self, drained: u64) -> Result<PullConsumer, StreamError> {
        let stream =
            self.jetstream.get_stream(&self.stream).await.map_err(|error| StreamError::Read(error.to_string()))?;
        // Absent the first time; any other failure shows in the create below.
        let _ = stream.delete_consumer(DRAIN_CONSUMER).await;
        let config = PullConfig {
            durable_name: Some(DRAIN_CONSUMER.to_owned()),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: drained + 1 },
            ack_policy: AckPolicy::All,
            ack_wait: DRAIN_ACK_WAIT,
            max_ack_pending: DRAIN_MAX_ACK_PENDING,
            ..Default::default()
        };
        stream.create_consumer(config).await.map_err(|error| StreamError::Read(error.to_string()))
    }
}

/// `tandem.events.<source id>`, with characters a subject token cannot hold replaced.
fn subject(source: &SourceId) -> String {
    let token: String =
        source
            .as_str()
            .chars()
            .map(|character| {
                if character.is_ascii_alphanumeric() || character == '-' || character == '_' {
                    character
                } else {
                    '_'
                }
            })
            .collect();
    format!("{SUBJECT_PREFIX}.{token}")
}

/// `Nats-Msg-Id`: the source id and the `messageId`; a `messageId` a header
/// cannot carry (control characters) is sent base64-encoded.
fn message_id(record: &LogRecord) -> String {
    let id = record.message_id.as_str();
    if id.chars().any(char::is_control) {
        format!("{}:b64:{}", record.source_id.as_str(), base64::engine::general_purpose::STANDARD.encode(id))
    } else {
        format!("{}:{}", record.source_id.as_str(), id)
    }
}

/// A request's violations as stream messages, in order, each under about
/// [`MAX_VIOLATION_MESSAGE_BYTES`] (a single larger violation goes alone),
/// each with the source the request came from.
fn violation_messages(violations: &[PlanViolationRecord]) -> Vec<(&SourceId, StreamMessage)> {
    let mut messages = Vec::new();
    let mut chunk: Vec<StreamViolation> = Vec::new();
    let mut chunk_bytes = 0;
    let mut chunk_source: Option<&SourceId> = None;
    for violation in violations {
        // JSON escaping can grow the text; the bound is a budget, not a limit.
        let bytes = violation.sample.len()
            + violation.message.len()
            + violation.path.len()
            + violation.event_name.len()
            + violation.kind.len()
            + 96;
        let other_source = chunk_source.is_some_and(|source| *source != violation.source_id);
        if !chunk.is_empty() && (other_source || chunk_bytes + bytes > MAX_VIOLATION_MESSAGE_BYTES) {
            let source = chunk_source.expect("set with the chunk's first violation");
            messages.push((source, StreamMessage::violations(source, std::mem::take(&mut chunk))));
            chunk_bytes = 0;
        }
        chunk_source = Some(&violation.source_id);
        chunk_bytes += bytes;
        chunk.push(StreamViolation {
            kind: violation.kind.clone(),
            event_name: violation.event_name.clone(),
            path: violation.path.clone(),
            message: violation.message.clone(),
            sample: violation.sample.clone(),
            seen_at_ms: violation.seen_at_ms,
        });
    }
    if let Some(source) = chunk_source.filter(|_| !chunk.is_empty()) {
        messages.push((source, StreamMessage::violations(source, chunk)));
    }
    messages
}

/// One tracking-plan violation in a [`StreamMessage::Violations`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamViolation {
    pub kind: String,
    pub event_name: String,
    pub path: String,
    pub message: String,
    pub sample: String,
    pub seen_at_ms: i64,
}

/// One message of the stream as the collect stage writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StreamMessage {
    /// An accepted event, with how long its `messageId` keeps repeats out.
    Event {
        source_id: String,
        message_id: String,
        event_type: String,
        received_at_ms: i64,
        timestamp_ms: i64,
        /// Kept for good (imports, webhooks) instead of for the dedup window.
        #[serde(default)]
        dedup_forever: bool,
        payload: String,
    },
    /// A refused message, bound for quarantine.
    Rejected {
        source_id: String,
        received_at_ms: i64,
        batch_index: Option<u32>,
        code: String,
        field: Option<String>,
        message: String,
        payload: String,
    },
    /// Tracking-plan violations found in one request's messages, counted
    /// when drained (the request's events and refusals travel apart).
    Violations { source_id: String, violations: Vec<StreamViolation> },
}

impl StreamMessage {
    fn event(record: &LogRecord, dedup: Dedup) -> StreamMessage {
        StreamMessage::Event {
            source_id: record.source_id.as_str().to_owned(),
            message_id: record.message_id.as_str().to_owned(),
            event_type: record.event_type.as_str().to_owned(),
            received_at_ms: record.received_at_ms,
            timestamp_ms: record.timestamp_ms,
            dedup_forever: dedup == Dedup::Forever,
            payload: record.payload.clone(),
        }
    }

    fn rejected(rejected: &QuarantineRecord) -> StreamMessage {
        StreamMessage::Rejected {
            source_id: rejected.source_id.as_str().to_owned(),
            received_at_ms: rejected.received_at_ms,
            batch_index: rejected.batch_index,
            code: rejected.code.clone(),
            field: rejected.field.clone(),
            message: rejected.message.clone(),
            payload: rejected.payload.clone(),
        }
    }

    fn violations(source: &SourceId, violations: Vec<StreamViolation>) -> StreamMessage {
        StreamMessage::Violations { source_id: source.as_str().to_owned(), violations }
    }

    /// Whether any of `patterns` (lowercase) is in this message's text about
    /// a person: an event's or refusal's payload, a refusal's reason, a
    /// violation's message or sample.
    fn holds_any(&self, patterns: &[String]) -> bool {
        let texts: Vec<&str> = match self {
            StreamMessage::Event { payload, .. } => vec![payload],
            StreamMessage::Rejected { payload, message, .. } => vec![payload, message],
            StreamMessage::Violations { violations, .. } => violations
                .iter()
                .flat_map(|violation| [violation.sample.as_str(), violation.message.as_str()])
                .collect(),
        };
        texts.into_iter().any(|text| {
            let text = text.to_lowercase();
            patterns.iter().any(|pattern| text.contains(pattern.as_str()))
        })
    }

    /// Reads a message body; `None` for one that is not a Tandem stream message.
    pub fn decode(body: &[u8]) -> Option<StreamMessage> {
        let message: StreamMessage = serde_json::from_slice(body).ok()?;
        if let StreamMessage::Event { event_type, .. } = &message {
            event_type.parse::<EventType>().ok()?;
        }
        Some(message)
    }

    /// The message as a one-message batch for [`tandem_store::EventLog::append_drained`].
    pub fn into_batch(self) -> IngestBatch {
        match self {
            StreamMessage::Event {
                source_id,
                message_id,
                event_type,
                received_at_ms,
                timestamp_ms,
                dedup_forever,
                payload,
            } => IngestBatch {
                records: vec![LogRecord {
                    source_id: SourceId::new(source_id),
                    message_id: MessageId::new(message_id),
                    // `decode` checked it.
                    event_type: event_type.parse().unwrap_or(EventType::Track),
                    received_at_ms,
                    timestamp_ms,
                    payload,
                }],
                rejected: Vec::new(),
                dedup: if dedup_forever { Dedup::Forever } else { Dedup::Window },
                ..IngestBatch::default()
            },
            StreamMessage::Rejected { source_id, received_at_ms, batch_index, code, field, message, payload } => {
                IngestBatch {
                    records: Vec::new(),
                    rejected: vec![QuarantineRecord {
                        source_id: SourceId::new(source_id),
                        received_at_ms,
                        batch_index,
                        code,
                        field,
                        message,
                        payload,
                    }],
                    dedup: Dedup::Window,
                    ..IngestBatch::default()
                }
            }
            StreamMessage::Violations { source_id, violations } => {
                let source_id = SourceId::new(source_id);
                IngestBatch {
                    violations: violations
                        .into_iter()
                        .map(|violation| PlanViolationRecord {
                            source_id: source_id.clone(),
                            kind: violation.kind,
                            event_name: violation.event_name,
                            path: violation.path,
                            message: violation.message,
                            sample: violation.sample,
                            seen_at_ms: violation.seen_at_ms,
                        })
                        .collect(),
                    ..IngestBatch::default()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(message_id: &str) -> LogRecord {
        LogRecord {
            source_id: SourceId::new("src.1"),
            message_id: MessageId::new(message_id),
            event_type: EventType::Identify,
            received_at_ms: 5,
            timestamp_ms: 4,
            payload: r#"{"type":"identify"}"#.into(),
        }
    }

    #[test]
    fn messages_round_trip_into_the_batches_the_log_stores() {
        let event = StreamMessage::event(&record("m1"), Dedup::Forever);
        let body = serde_json::to_vec(&event).unwrap();
        let batch = StreamMessage::decode(&body).unwrap().into_batch();
        assert_eq!(batch.records, vec![record("m1")]);
        assert_eq!(batch.dedup, Dedup::Forever);
        let refusal = QuarantineRecord {
            source_id: SourceId::new("s"),
            received_at_ms: 9,
            batch_index: Some(3),
            code: "invalid_value".into(),
            field: Some("userId".into()),
            message: "bad".into(),
            payload: "{}".into(),
        };
        let body = serde_json::to_vec(&StreamMessage::rejected(&refusal)).unwrap();
        assert_eq!(StreamMessage::decode(&body).unwrap().into_batch().rejected, vec![refusal]);
        assert_eq!(StreamMessage::decode(b"{\"kind\":\"event\"}"), None);
        assert_eq!(StreamMessage::decode(b"not json"), None);
    }

    fn violation(source: &str, sample_bytes: usize) -> PlanViolationRecord {
        PlanViolationRecord::new(
            SourceId::new(source),
            "unplanned_event",
            "Order Placed",
            "/event",
            "\"Order Placed\" is not in the tracking plan",
            &"x".repeat(sample_bytes),
            7,
        )
    }

    #[test]
    fn a_requests_violations_travel_in_bounded_messages_and_come_back_whole() {
        // 200 violations with 4 KiB samples: over 800 KiB, more than one message.
        let violations: Vec<PlanViolationRecord> = (0..200).map(|_| violation("src", 4096)).collect();
        let messages = violation_messages(&violations);
        assert!(messages.len() >= 4, "split into {} messages", messages.len());
        let mut back = Vec::new();
        for (source, message) in messages {
            assert_eq!(source.as_str(), "src");
            let body = serde_json::to_vec(&message).unwrap();
            assert!(body.len() <= MAX_VIOLATION_MESSAGE_BYTES + 8 * 1024, "a message of {} bytes", body.len());
            let batch = StreamMessage::decode(&body).unwrap().into_batch();
            assert!(batch.records.is_empty() && batch.rejected.is_empty());
            back.extend(batch.violations);
        }
        assert_eq!(back, violations, "every violation, in order, as found");
        assert!(violation_messages(&[]).is_empty(), "no violations, no message");
        let mixed = [violation("a", 10), violation("b", 10)];
        let sources: Vec<&str> = violation_messages(&mixed).iter().map(|(source, _)| source.as_str()).collect();
        assert_eq!(sources, ["a", "b"], "each message names one source");
    }

    #[test]
    fn a_person_is_found_in_events_refusals_and_violation_samples_whatever_the_case() {
        let patterns = tandem_store::govern::erasure_patterns(&["Ada@Example.com".to_owned()]);
        let patterns: Vec<String> = patterns.iter().map(|pattern| pattern.to_lowercase()).collect();
        let mut event = record("m1");
        event.payload = r#"{"type":"identify","traits":{"email":"ada@example.COM"}}"#.into();
        assert!(StreamMessage::event(&event, Dedup::Window).holds_any(&patterns));
        event.payload = r#"{"type":"identify","traits":{"email":"ada@example.com.au"}}"#.into();
        assert!(!StreamMessage::event(&event, Dedup::Window).holds_any(&patterns), "a longer value is someone else");
        let refusal = QuarantineRecord {
            source_id: SourceId::new("s"),
            received_at_ms: 1,
            batch_index: None,
            code: "unplanned_event".into(),
            field: None,
            message: "bad".into(),
            payload: r#"{"userId":"ADA@example.com"}"#.into(),
        };
        assert!(StreamMessage::rejected(&refusal).holds_any(&patterns));
        let mut sampled = violation("s", 0);
        sampled.sample = r#"{"traits":{"email":"ada@example.com"}}"#.into();
        let violations = [violation("s", 10), sampled];
        assert!(violation_messages(&violations)[0].1.holds_any(&patterns));
        let others = [violation("s", 10)];
        assert!(!violation_messages(&others)[0].1.holds_any(&patterns));
    }

    #[test]
    fn subjects_and_message_ids_are_safe_for_nats() {
        assert_eq!(subject(&SourceId::new("src.1 x>")), "tandem.events.src_1_x_");
        assert_eq!(message_id(&record("abc")), "src.1:abc");
        let odd = message_id(&record("a\r\nb"));
        assert!(odd.starts_with("src.1:b64:") && !odd.contains('\n'), "{odd}");
    }

    #[test]
    fn log_urls_must_all_be_nats() {
        let options = StreamOptions::parse("nats://a:4222, nats://b:4222").unwrap();
        assert_eq!(options.servers, vec!["nats://a:4222", "nats://b:4222"]);
        assert_eq!(options.stream, DEFAULT_STREAM_NAME);
        assert!(matches!(StreamOptions::parse("kafka://a"), Err(StreamError::Url(_))));
        assert!(matches!(StreamOptions::parse(""), Err(StreamError::Url(_))));
        assert!(matches!(StreamOptions::parse("nats://a:1,http://b"), Err(StreamError::Url(_))));
    }
}
