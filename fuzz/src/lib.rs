//! What every fuzz target checks about the events it gets accepted: the log
//! record written for an event reads back as an event, so no acknowledged
//! event can be one a later stage skips as unreadable.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tandem_core::collect::{normalize_message, BatchDefaults, IdRequirement, RequestContext};
use tandem_core::{Event, SourceId};

/// The source every fuzzed message claims to come from.
pub fn source() -> SourceId {
    SourceId::new("src_fuzz")
}

/// A fixed server clock, so a crash reproduces.
pub fn received_at() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
}

/// Panics unless the event's log record reads back as the same kind of event.
pub fn assert_readable(event: &Event) {
    let record = event.to_log_record();
    let back: Event = serde_json::from_str(&record.payload)
        .unwrap_or_else(|error| panic!("an accepted event's log record does not read back: {error}\n{}", record.payload));
    assert_eq!(back.message_id, event.message_id);
    assert_eq!(back.event_type, event.event_type);
    assert_eq!(record.timestamp_ms, back.timestamp.timestamp_millis());
}

/// Normalizes a message as webhooks and imports do and checks what is accepted.
pub fn normalize_mapped(message: Map<String, Value>) {
    let source = source();
    let request =
        RequestContext { source_id: &source, received_at: received_at(), client_ip: None, ids: IdRequirement::Mapped };
    if let Ok(event) = normalize_message(message, None, &BatchDefaults::default(), &request) {
        assert_readable(&event);
    }
}
