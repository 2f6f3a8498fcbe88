//! The event model: one normalized Segment message, whatever channel it came
//! from, and the flat record the log stores for it.

use crate::ids::{MessageId, SourceId};
use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

/// The six calls of the Segment spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum EventType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl EventType {
    pub const ALL: [EventType; 6] =
        [EventType::Identify, EventType::Track, EventType::Page, EventType::Screen, EventType::Group, EventType::Alias];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Identify => "identify",
            EventType::Track => "track",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Alias => "alias",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The name is not one of the six Segment calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|event_type| event_type.as_str() == value)
            .ok_or_else(|| UnknownEventType(value.to_owned()))
    }
}

/// One normalized event, with every Segment field under its Segment name.
///
/// Invariants established by [`crate::collect`]: `user_id` or `anonymous_id`
/// is set (for `alias`, `previous_id` and `user_id`); `event` is set for
/// `track`; `group_id` for `group`; `message_id` is 1 to 100 characters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub message_id: MessageId,
    #[serde(rename = "type")]
    pub event_type: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traits: Option<Map<String, Value>>,
    #[serde(default)]
    pub context: Map<String, Value>,
    #[serde(default)]
    pub integrations: Map<String, Value>,
    /// When the event happened, corrected for the device's clock skew.
    #[serde(with = "rfc3339_millis")]
    pub timestamp: DateTime<Utc>,
    /// The `timestamp` the client sent, verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "option_rfc3339_millis")]
    pub sent_at: Option<DateTime<Utc>>,
    /// When Tandem received the request, by the server's clock.
    #[serde(with = "rfc3339_millis")]
    pub received_at: DateTime<Utc>,
    pub source_id: SourceId,
    /// Top-level fields outside the spec (`channel`, `version`, …), kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The names the event's own fields take in its JSON; `extra` never holds one.
const FIELD_NAMES: [&str; 18] = [
    "messageId",
    "type",
    "userId",
    "anonymousId",
    "event",
    "name",
    "category",
    "groupId",
    "previousId",
    "properties",
    "traits",
    "context",
    "integrations",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "sourceId",
];

/// Whether the log's timestamp format (RFC 3339, four-digit years) can hold
/// `time`: outside the years 0000 to 9999 it would be written as `+12025-…`
/// or `-7973-…`, which no RFC 3339 reader accepts.
pub fn is_loggable_time(time: DateTime<Utc>) -> bool {
    (0..=9999).contains(&time.year())
}

impl Event {
    /// The field that would make this event's log record unreadable, if any:
    /// a time outside [`is_loggable_time`], or an `extra` member that repeats
    /// one of the event's own fields. [`crate::collect::normalize_message`],
    /// the one way events are made, refuses such events, so the log holds only
    /// records every stage can read.
    pub fn unreadable_field(&self) -> Option<&'static str> {
        if !is_loggable_time(self.timestamp) {
            return Some("timestamp");
        }
        if !is_loggable_time(self.received_at) {
            return Some("receivedAt");
        }
        if self.sent_at.is_some_and(|time| !is_loggable_time(time)) {
            return Some("sentAt");
        }
        FIELD_NAMES.into_iter().find(|name| self.extra.contains_key(*name))
    }

    /// The flat record the log stores: indexed columns plus the JSON payload.
    /// Serializing here, on the request's own thread, keeps the single log
    /// writer free to do nothing but insert.
    ///
    /// The payload reads back as an event (checked in debug builds, by the
    /// unit tests and by the fuzz targets) as long as
    /// [`Event::unreadable_field`] finds nothing, which `normalize_message`
    /// ensures.
    pub fn to_log_record(&self) -> LogRecord {
        let payload = serde_json::to_string(self).expect("an event always serializes");
        debug_assert!(
            self.unreadable_field().is_some() || serde_json::from_str::<Event>(&payload).is_ok(),
            "a normalized event must read back from its log record: {payload}"
        );
        LogRecord {
            source_id: self.source_id.clone(),
            message_id: self.message_id.clone(),
            event_type: self.event_type,
            received_at_ms: self.received_at.timestamp_millis(),
            timestamp_ms: self.timestamp.timestamp_millis(),
            payload,
        }
    }
}

/// An event as the log stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    pub source_id: SourceId,
    pub message_id: MessageId,
    pub event_type: EventType,
    pub received_at_ms: i64,
    pub timestamp_ms: i64,
    /// The event as Segment JSON (see [`Event`]).
    pub payload: String,
}

/// Formats a time the way Segment's API does: RFC 3339, UTC, milliseconds.
pub fn format_timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

mod rfc3339_millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_timestamp(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(deserializer)?;
        crate::collect::parse_timestamp(&text).map_err(serde::de::Error::custom)
    }
}

mod option_rfc3339_millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &Option<DateTime<Utc>>, serializer: S) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => super::rfc3339_millis::serialize(time, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| crate::collect::parse_timestamp(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_round_trips_through_its_name() {
        for event_type in EventType::ALL {
            assert_eq!(event_type.as_str().parse::<EventType>(), Ok(event_type));
        }
        assert_eq!("Track".parse::<EventType>(), Err(UnknownEventType("Track".into())));
    }
}
