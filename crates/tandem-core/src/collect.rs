//! The rules of the Segment-compatible tracking API, as pure functions: what a
//! request body must look like, which limits apply, how each message is
//! validated and normalized into an [`Event`], and how the device's clock skew
//! is corrected. The server's HTTP handlers do the I/O around these.
//!
//! Limits and field rules follow Segment's HTTP Tracking API: 32 KB per
//! message, 500 KB and 2,500 messages per batch, `messageId` at most 100
//! characters, `userId` or `anonymousId` on every call but `alias`.

use crate::event::{is_loggable_time, Event, EventType};
use crate::ids::{MessageId, SourceId};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;

/// The largest single message, in bytes of JSON.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// The largest request body, in bytes of JSON after decompression.
pub const MAX_REQUEST_BYTES: usize = 500 * 1024;
/// The most messages one batch may carry.
pub const MAX_BATCH_MESSAGES: usize = 2_500;
/// The longest `messageId`, in characters.
pub const MAX_MESSAGE_ID_CHARS: usize = 100;

/// Why one message was refused; the code is stable, the message is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionCode {
    InvalidJson,
    MissingField,
    InvalidType,
    InvalidValue,
    MessageTooLarge,
    /// A track call the source's tracking plan does not list (`block_unplanned`).
    UnplannedEvent,
    /// An event failing its tracking plan's schema (`block_invalid`).
    PlanViolation,
    /// An event carrying an identifier whose owner asked to be suppressed.
    Suppressed,
    /// An event carrying a red PII value whose policy is to refuse it.
    RedValueRefused,
}

impl RejectionCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectionCode::InvalidJson => "invalid_json",
            RejectionCode::MissingField => "missing_field",
            RejectionCode::InvalidType => "invalid_type",
            RejectionCode::InvalidValue => "invalid_value",
            RejectionCode::MessageTooLarge => "message_too_large",
            RejectionCode::UnplannedEvent => "unplanned_event",
            RejectionCode::PlanViolation => "plan_violation",
            RejectionCode::Suppressed => "suppressed",
            RejectionCode::RedValueRefused => "red_value_refused",
        }
    }
}

/// A refused message: what was wrong and with which field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: RejectionCode,
    pub field: Option<String>,
    pub message: String,
}

impl Rejection {
    /// A refusal of `code` naming `field`.
    pub fn new(code: RejectionCode, field: &str, message: impl Into<String>) -> Self {
        Rejection { code, field: Some(field.to_owned()), message: message.into() }
    }

    fn missing(field: &str, message: impl Into<String>) -> Self {
        Rejection::new(RejectionCode::MissingField, field, message)
    }

    fn wrong_type(field: &str, expected: &str) -> Self {
        Rejection::new(RejectionCode::InvalidType, field, format!("{field} must be {expected}"))
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A request that cannot be read at all; no message in it is accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("body is not valid json: {0}")]
    InvalidJson(String),
    #[error("body must be a json object")]
    NotAnObject,
    #[error("batch is required")]
    MissingBatch,
    #[error("batch must be an array of messages")]
    BatchNotArray,
    #[error("batch has {0} messages, the limit is {MAX_BATCH_MESSAGES}")]
    TooManyMessages(usize),
    #[error("{field} must be {expected}")]
    InvalidEnvelopeField { field: &'static str, expected: &'static str },
}

impl RequestError {
    /// The request field at fault, for the error body.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            RequestError::InvalidJson(_) | RequestError::NotAnObject => None,
            RequestError::MissingBatch | RequestError::BatchNotArray | RequestError::TooManyMessages(_) => {
                Some("batch")
            }
            RequestError::InvalidEnvelopeField { field, .. } => Some(field),
        }
    }
}

/// What the server knows about the request that carried a message.
#[derive(Clone, Debug)]
pub struct RequestContext<'a> {
    pub source_id: &'a SourceId,
    pub received_at: DateTime<Utc>,
    /// The connection's address, used as `context.ip` unless the message has one.
    pub client_ip: Option<&'a str>,
    pub ids: IdRequirement,
}

/// Which identifiers a message must carry to be accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdRequirement {
    /// Segment's rule for the tracking API: `userId` or `anonymousId`.
    UserOrAnonymousId,
    /// Rows of a silo and webhook payloads: a CRM contact may be known by its
    /// e-mail alone. The mapping has already checked that some identifier is
    /// present, wherever in the message it put it.
    Mapped,
}

/// Fields a batch sets at its top level for every message in it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchDefaults {
    pub context: Map<String, Value>,
    pub integrations: Map<String, Value>,
    pub sent_at: Option<DateTime<Utc>>,
}

/// A batch body, split into its messages without parsing them yet, so that
/// one bad message cannot spoil the others.
#[derive(Debug)]
pub struct ParsedBatch<'a> {
    pub messages: Vec<&'a RawValue>,
    pub defaults: BatchDefaults,
    pub write_key: Option<String>,
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow, default)]
    batch: Option<&'a RawValue>,
    #[serde(default)]
    context: Option<Value>,
    #[serde(default)]
    integrations: Option<Value>,
    #[serde(default, rename = "sentAt")]
    sent_at: Option<Value>,
    #[serde(default, rename = "writeKey")]
    write_key: Option<Value>,
}

/// Reads a `/v1/batch` (or `/v1/import`) body.
pub fn parse_batch(body: &[u8]) -> Result<ParsedBatch<'_>, RequestError> {
    // serde reads a struct from a JSON array too; the spec wants an object.
    if body.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'[') {
        return Err(RequestError::NotAnObject);
    }
    let body: BatchBody = serde_json::from_slice(body).map_err(|error| classify_json_error(&error))?;
    let raw_batch = body.batch.ok_or(RequestError::MissingBatch)?;
    if raw_batch.get() == "null" {
        return Err(RequestError::MissingBatch);
    }
    let messages: Vec<&RawValue> = serde_json::from_str(raw_batch.get()).map_err(|_| RequestError::BatchNotArray)?;
    if messages.len() > MAX_BATCH_MESSAGES {
        return Err(RequestError::TooManyMessages(messages.len()));
    }
    let defaults = BatchDefaults {
        context: envelope_object(body.context, "context")?,
        integrations: envelope_object(body.integrations, "integrations")?,
        sent_at: match body.sent_at {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(
                parse_timestamp(&text)
                    .ok()
                    .filter(|time| is_loggable_time(*time))
                    .ok_or(RequestError::InvalidEnvelopeField { field: "sentAt", expected: "an ISO 8601 timestamp" })?,
            ),
            Some(_) => {
                return Err(RequestError::InvalidEnvelopeField { field: "sentAt", expected: "an ISO 8601 timestamp" })
            }
        },
    };
    Ok(ParsedBatch { messages, defaults, write_key: envelope_write_key(body.write_key)? })
}

/// Reads the body of a single call (`/v1/track`, `/v1/identify`, …).
/// Returns the message and the `writeKey` it carried, if any.
pub fn parse_single(body: &[u8]) -> Result<(Map<String, Value>, Option<String>), RequestError> {
    let value: Value = serde_json::from_slice(body).map_err(|error| classify_json_error(&error))?;
    let Value::Object(mut message) = value else {
        return Err(RequestError::NotAnObject);
    };
    let write_key = envelope_write_key(message.remove("writeKey"))?;
    Ok((message, write_key))
}

fn classify_json_error(error: &serde_json::Error) -> RequestError {
    if error.classify() == serde_json::error::Category::Data {
        RequestError::NotAnObject
    } else {
        RequestError::InvalidJson(error.to_string())
    }
}

fn envelope_object(value: Option<Value>, field: &'static str) -> Result<Map<String, Value>, RequestError> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(object)) => Ok(object),
        Some(_) => Err(RequestError::InvalidEnvelopeField { field, expected: "an object" }),
    }
}

fn envelope_write_key(value: Option<Value>) -> Result<Option<String>, RequestError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(key)) => Ok(Some(key)),
        Some(_) => Err(RequestError::InvalidEnvelopeField { field: "writeKey", expected: "a string" }),
    }
}

/// One message of a batch that was refused, kept for quarantine.
#[derive(Clone, Debug, PartialEq)]
pub struct RejectedMessage {
    /// Position in the batch; `None` for a single call.
    pub index: Option<usize>,
    /// The message as the client sent it.
    pub raw: String,
    pub rejection: Rejection,
}

/// The messages of one batch, sorted into accepted events and refusals.
#[derive(Debug, Default)]
pub struct NormalizedBatch {
    pub events: Vec<Event>,
    /// Each event's position in its batch, in the order of `events`.
    pub indexes: Vec<usize>,
    pub rejected: Vec<RejectedMessage>,
}

/// Validates and normalizes every message of a batch independently.
pub fn normalize_batch(batch: &ParsedBatch<'_>, request: &RequestContext<'_>) -> NormalizedBatch {
    let mut outcome = NormalizedBatch {
        events: Vec::with_capacity(batch.messages.len()),
        indexes: Vec::with_capacity(batch.messages.len()),
        rejected: Vec::new(),
    };
    for (index, raw) in batch.messages.iter().enumerate() {
        match normalize_raw_message(raw, &batch.defaults, request) {
            Ok(event) => {
                outcome.events.push(event);
                outcome.indexes.push(index);
            }
            Err(rejection) => {
                outcome.rejected.push(RejectedMessage { index: Some(index), raw: raw.get().to_owned(), rejection })
            }
        }
    }
    outcome
}

fn normalize_raw_message(
    raw: &RawValue,
    defaults: &BatchDefaults,
    request: &RequestContext<'_>,
) -> Result<Event, Rejection> {
    let text = raw.get();
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(Rejection {
            code: RejectionCode::MessageTooLarge,
            field: None,
            message: format!("message is {} bytes, the limit is {MAX_MESSAGE_BYTES}", text.len()),
        });
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(message)) => normalize_message(message, None, defaults, request),
        Ok(_) => Err(Rejection {
            code: RejectionCode::InvalidType,
            field: None,
            message: "message must be a json object".into(),
        }),
        Err(error) => Err(Rejection {
            code: RejectionCode::InvalidJson,
            field: None,
            message: format!("message is not valid json: {error}"),
        }),
    }
}

/// Validates one message and turns it into an [`Event`].
///
/// `call` is the event type fixed by the endpoint (`/v1/track` → track); for
/// batch messages it is `None` and the message's own `type` decides.
pub fn normalize_message(
    mut message: Map<String, Value>,
    call: Option<EventType>,
    defaults: &BatchDefaults,
    request: &RequestContext<'_>,
) -> Result<Event, Rejection> {
    let declared_type = message.remove("type");
    let event_type = match call {
        Some(event_type) => event_type,
        None => parse_event_type(declared_type)?,
    };
    let message_id = match take_id(&mut message, "messageId")? {
        Some(id) if id.chars().count() > MAX_MESSAGE_ID_CHARS => {
            return Err(Rejection::new(
                RejectionCode::InvalidValue,
                "messageId",
                format!("messageId must be at most {MAX_MESSAGE_ID_CHARS} characters"),
            ))
        }
        Some(id) => id,
        None => uuid::Uuid::new_v4().to_string(),
    };
    let user_id = take_id(&mut message, "userId")?;
    let anonymous_id = take_id(&mut message, "anonymousId")?;
    let group_id = take_id(&mut message, "groupId")?;
    let previous_id = take_id(&mut message, "previousId")?;
    let event = take_string(&mut message, "event")?;
    let name = take_string(&mut message, "name")?;
    let category = take_string(&mut message, "category")?;
    let properties = take_object(&mut message, "properties")?;
    let traits = take_object(&mut message, "traits")?;
    let mut context = take_object(&mut message, "context")?.unwrap_or_default();
    let mut integrations = take_object(&mut message, "integrations")?.unwrap_or_default();
    let device_time = match take_time(&mut message, "timestamp")? {
        Some(time) => Some(time),
        None => take_time(&mut message, "originalTimestamp")?,
    };
    message.remove("originalTimestamp");
    let sent_at = take_time(&mut message, "sentAt")?.map(|(_, time)| time).or(defaults.sent_at);
    // The server, not the client, decides these.
    for field in ["writeKey", "receivedAt", "sourceId"] {
        message.remove(field);
    }

    match event_type {
        EventType::Alias => {
            if previous_id.is_none() {
                return Err(Rejection::missing("previousId", "previousId is required for alias"));
            }
            if user_id.is_none() {
                return Err(Rejection::missing("userId", "userId is required for alias"));
            }
        }
        _ if user_id.is_none() && anonymous_id.is_none() && request.ids == IdRequirement::UserOrAnonymousId => {
            return Err(Rejection::missing("userId", "userId or anonymousId is required"));
        }
        EventType::Track if event.is_none() => {
            return Err(Rejection::missing("event", "event is required for track"));
        }
        EventType::Group if group_id.is_none() => {
            return Err(Rejection::missing("groupId", "groupId is required for group"));
        }
        _ => {}
    }

    for (key, value) in &defaults.context {
        context.entry(key.clone()).or_insert_with(|| value.clone());
    }
    for (key, value) in &defaults.integrations {
        integrations.entry(key.clone()).or_insert_with(|| value.clone());
    }
    if let Some(ip) = request.client_ip {
        context.entry("ip").or_insert_with(|| Value::String(ip.to_owned()));
    }

    let (timestamp, original_timestamp) = match device_time {
        Some((text, device_time)) => (corrected_timestamp(request.received_at, sent_at, device_time), Some(text)),
        None => (request.received_at, None),
    };

    let event = Event {
        message_id: MessageId::new(message_id),
        event_type,
        user_id,
        anonymous_id,
        event,
        name,
        category,
        group_id,
        previous_id,
        properties,
        traits,
        context,
        integrations,
        timestamp,
        original_timestamp,
        sent_at,
        received_at: request.received_at,
        source_id: request.source_id.clone(),
        extra: message,
    };
    // Every event accepted here is written to the log and read back by each
    // later stage, so it must be one the log's reader accepts. The checks
    // above already guarantee it; this makes a slip a visible refusal of one
    // message (quarantined, answered 400) rather than an acknowledged event
    // that no stage can read.
    match event.unreadable_field() {
        None => Ok(event),
        Some(field) => Err(Rejection::new(
            RejectionCode::InvalidValue,
            field,
            format!("{field} cannot be stored: it is outside the years 0000 to 9999"),
        )),
    }
}

/// Segment's clock-skew correction: the device's clock may be off, but the
/// time between the event and sending it is not, so
/// `timestamp = receivedAt − (sentAt − originalTimestamp)`. Without `sentAt`
/// the device's time is taken as it is.
///
/// When the correction lands outside the years 0000 to 9999 (an absurd
/// `sentAt` far from the event's own time), the time falls back to
/// `receivedAt`, as Segment does: the server's clock is the one time known to
/// be sane, and the log's timestamp format holds no other years.
pub fn corrected_timestamp(
    received_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
    original_timestamp: DateTime<Utc>,
) -> DateTime<Utc> {
    let corrected = match sent_at {
        Some(sent_at) => received_at.checked_sub_signed(sent_at - original_timestamp),
        None => Some(original_timestamp),
    };
    corrected.filter(|time| is_loggable_time(*time)).unwrap_or(received_at)
}

/// Replaces every lone UTF-16 surrogate escape in a JSON text (`"\ud83d"`,
/// what a truncated emoji leaves) with `\ufffd`, the replacement character.
///
/// JSON parsers refuse such escapes, and one of them would otherwise make a
/// whole batch unreadable; browsers and Segment's libraries replace them the
/// same way. Both escapes are six bytes, so the text keeps its length, and the
/// body is copied only when it holds one. Linear in the input.
pub fn replace_lone_surrogates(json: &[u8]) -> Cow<'_, [u8]> {
    // A surrogate's escape is `\u` then `d` or `D`: most bodies hold none,
    // which a vectorized search tells without walking their strings.
    let may_hold = memchr::memmem::find_iter(json, b"\\u").any(|at| matches!(json.get(at + 2), Some(b'd' | b'D')));
    if may_hold {
        repair_surrogates(json)
    } else {
        Cow::Borrowed(json)
    }
}

/// [`replace_lone_surrogates`], walking the whole body.
fn repair_surrogates(json: &[u8]) -> Cow<'_, [u8]> {
    const REPLACEMENT: &[u8; 6] = b"\\ufffd";
    let mut repaired: Option<Vec<u8>> = None;
    let mut in_string = false;
    let mut index = 0;
    while index < json.len() {
        match json[index] {
            b'"' => {
                in_string = !in_string;
                index += 1;
            }
            b'\\' if in_string => {
                let Some(unit) = unicode_escape(json, index) else {
                    // `\"`, `\\` and the like: skip the escaped byte with it.
                    index += 2;
                    continue;
                };
                let is_high = (0xD800..0xDC00).contains(&unit);
                let is_low = (0xDC00..0xE000).contains(&unit);
                let pairs =
                    is_high && unicode_escape(json, index + 6).is_some_and(|next| (0xDC00..0xE000).contains(&next));
                if pairs {
                    index += 12;
                } else if is_high || is_low {
                    repaired.get_or_insert_with(|| json.to_vec())[index..index + 6].copy_from_slice(REPLACEMENT);
                    index += 6;
                } else {
                    index += 6;
                }
            }
            _ => index += 1,
        }
    }
    match repaired {
        Some(repaired) => Cow::Owned(repaired),
        None => Cow::Borrowed(json),
    }
}

/// The code unit of a `\uXXXX` escape starting at `at`, if there is one.
fn unicode_escape(json: &[u8], at: usize) -> Option<u32> {
    let escape = json.get(at..at + 6)?;
    if escape[0] != b'\\' || escape[1] != b'u' {
        return None;
    }
    let hex = std::str::from_utf8(&escape[2..]).ok()?;
    u32::from_str_radix(hex, 16).ok().filter(|_| hex.bytes().all(|byte| byte.is_ascii_hexdigit()))
}

/// Parses the timestamps clients send: RFC 3339 / ISO 8601 with an offset,
/// or without one (taken as UTC), or a bare date.
pub fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, TimestampError> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(time) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(time.and_utc());
        }
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(TimestampError(text.to_owned()))
}

/// The text is not a timestamp Tandem understands.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an ISO 8601 timestamp")]
pub struct TimestampError(pub String);

fn parse_event_type(declared: Option<Value>) -> Result<EventType, Rejection> {
    match declared {
        None | Some(Value::Null) => Err(Rejection::missing("type", "type is required")),
        Some(Value::String(name)) => name.parse().map_err(|_| {
            Rejection::new(
                RejectionCode::InvalidValue,
                "type",
                format!("type {name:?} is not one of identify, track, page, screen, group, alias"),
            )
        }),
        Some(_) => Err(Rejection::wrong_type("type", "a string")),
    }
}

/// An identifier: a non-empty string, or a number taken as its decimal text.
fn take_id(message: &mut Map<String, Value>, field: &str) -> Result<Option<String>, Rejection> {
    match message.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(_) => Err(Rejection::wrong_type(field, "a string")),
    }
}

fn take_string(message: &mut Map<String, Value>, field: &str) -> Result<Option<String>, Rejection> {
    match message.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(Rejection::wrong_type(field, "a string")),
    }
}

fn take_object(message: &mut Map<String, Value>, field: &str) -> Result<Option<Map<String, Value>>, Rejection> {
    match message.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(object)) => Ok(Some(object)),
        Some(_) => Err(Rejection::wrong_type(field, "an object")),
    }
}

/// A time the client sent. Its UTC value must lie in the years 0000 to 9999
/// (an offset can push `0000-01-01T00:00:00+01:00` into the year −1), the
/// range the log's timestamp format holds.
fn take_time(message: &mut Map<String, Value>, field: &str) -> Result<Option<(String, DateTime<Utc>)>, Rejection> {
    match message.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => match parse_timestamp(&text) {
            Ok(time) if !is_loggable_time(time) => Err(Rejection::new(
                RejectionCode::InvalidValue,
                field,
                format!("{field} must lie between the years 0000 and 9999 in UTC"),
            )),
            Ok(time) => Ok(Some((text, time))),
            Err(_) => Err(Rejection::new(
                RejectionCode::InvalidValue,
                field,
                format!("{field} must be an ISO 8601 timestamp"),
            )),
        },
        Some(_) => Err(Rejection::wrong_type(field, "an ISO 8601 timestamp string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use serde_json::json;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + seconds, 0).unwrap()
    }

    fn normalize(message: Value, call: Option<EventType>) -> Result<Event, Rejection> {
        let source = SourceId::new("src_test");
        let request = RequestContext {
            source_id: &source,
            received_at: at(100),
            client_ip: Some("10.0.0.1"),
            ids: IdRequirement::UserOrAnonymousId,
        };
        let Value::Object(message) = message else { panic!("test message must be an object") };
        normalize_message(message, call, &BatchDefaults::default(), &request)
    }

    fn rejection_of(message: Value, call: Option<EventType>) -> (RejectionCode, Option<String>) {
        let rejection = normalize(message, call).expect_err("message must be refused");
        (rejection.code, rejection.field)
    }

    #[test]
    fn track_keeps_every_segment_field() {
        let event = normalize(
            json!({
                "userId": "u1", "event": "Order Completed", "messageId": "m-1",
                "properties": {"revenue": 12.5}, "context": {"ip": "1.2.3.4", "locale": "en"},
                "integrations": {"All": true}, "channel": "server"
            }),
            Some(EventType::Track),
        )
        .unwrap();
        assert_eq!(event.event_type, EventType::Track);
        assert_eq!(event.message_id.as_str(), "m-1");
        assert_eq!(event.event.as_deref(), Some("Order Completed"));
        assert_eq!(event.properties.unwrap()["revenue"], json!(12.5));
        assert_eq!(event.context["ip"], json!("1.2.3.4"), "a client-sent ip is kept");
        assert_eq!(event.extra["channel"], json!("server"));
        assert_eq!(event.received_at, at(100));
        assert_eq!(event.timestamp, at(100), "no device time: timestamp is receivedAt");
        assert_eq!(event.source_id.as_str(), "src_test");
    }

    #[test]
    fn context_ip_comes_from_the_connection_when_absent() {
        let event = normalize(json!({"anonymousId": "a1"}), Some(EventType::Page)).unwrap();
        assert_eq!(event.context["ip"], json!("10.0.0.1"));
    }

    #[test]
    fn missing_identity_is_refused_naming_user_id() {
        assert_eq!(
            rejection_of(json!({"event": "x"}), Some(EventType::Track)),
            (RejectionCode::MissingField, Some("userId".into()))
        );
    }

    #[test]
    fn type_specific_required_fields() {
        assert_eq!(
            rejection_of(json!({"userId": "u"}), Some(EventType::Track)),
            (RejectionCode::MissingField, Some("event".into()))
        );
        assert_eq!(
            rejection_of(json!({"userId": "u"}), Some(EventType::Group)),
            (RejectionCode::MissingField, Some("groupId".into()))
        );
        assert_eq!(
            rejection_of(json!({"userId": "u"}), Some(EventType::Alias)),
            (RejectionCode::MissingField, Some("previousId".into()))
        );
        assert_eq!(
            rejection_of(json!({"previousId": "p", "anonymousId": "a"}), Some(EventType::Alias)),
            (RejectionCode::MissingField, Some("userId".into()))
        );
        assert!(normalize(json!({"previousId": "p", "userId": "u"}), Some(EventType::Alias)).is_ok());
        assert!(normalize(json!({"userId": "u", "groupId": 42}), Some(EventType::Group)).is_ok());
    }

    #[test]
    fn batch_messages_need_a_known_type() {
        assert_eq!(rejection_of(json!({"userId": "u"}), None), (RejectionCode::MissingField, Some("type".into())));
        assert_eq!(
            rejection_of(json!({"userId": "u", "type": "purchase"}), None),
            (RejectionCode::InvalidValue, Some("type".into()))
        );
        assert_eq!(
            rejection_of(json!({"userId": "u", "type": 3}), None),
            (RejectionCode::InvalidType, Some("type".into()))
        );
    }

    #[test]
    fn wrong_types_are_named() {
        assert_eq!(
            rejection_of(json!({"userId": {"id": 1}}), Some(EventType::Identify)),
            (RejectionCode::InvalidType, Some("userId".into()))
        );
        assert_eq!(
            rejection_of(json!({"userId": "u", "traits": [1]}), Some(EventType::Identify)),
            (RejectionCode::InvalidType, Some("traits".into()))
        );
        assert_eq!(
            rejection_of(json!({"userId": "u", "event": true}), Some(EventType::Track)),
            (RejectionCode::InvalidType, Some("event".into()))
        );
        assert_eq!(
            rejection_of(json!({"userId": "u", "timestamp": "yesterday"}), Some(EventType::Identify)),
            (RejectionCode::InvalidValue, Some("timestamp".into()))
        );
    }

    #[test]
    fn numeric_ids_become_strings_and_empty_ids_count_as_absent() {
        let event = normalize(json!({"userId": 123, "anonymousId": ""}), Some(EventType::Identify)).unwrap();
        assert_eq!(event.user_id.as_deref(), Some("123"));
        assert_eq!(event.anonymous_id, None);
    }

    #[test]
    fn message_id_is_limited_to_100_characters_and_generated_when_absent() {
        let hundred = "m".repeat(100);
        assert!(normalize(json!({"userId": "u", "messageId": hundred}), Some(EventType::Identify)).is_ok());
        assert_eq!(
            rejection_of(json!({"userId": "u", "messageId": "m".repeat(101)}), Some(EventType::Identify)),
            (RejectionCode::InvalidValue, Some("messageId".into()))
        );
        let first = normalize(json!({"userId": "u"}), Some(EventType::Identify)).unwrap();
        let second = normalize(json!({"userId": "u"}), Some(EventType::Identify)).unwrap();
        assert_eq!(first.message_id.as_str().len(), 36);
        assert_ne!(first.message_id, second.message_id);
    }

    #[test]
    fn clock_skew_is_corrected_with_sent_at_and_the_original_is_kept() {
        // The device clock runs 1 hour fast; the event happened 5 s before sending.
        let device_now = at(100 + 3600);
        let event = normalize(
            json!({
                "userId": "u",
                "timestamp": crate::event::format_timestamp(device_now - chrono::Duration::seconds(5)),
                "sentAt": crate::event::format_timestamp(device_now),
            }),
            Some(EventType::Identify),
        )
        .unwrap();
        assert_eq!(event.timestamp, at(95));
        assert_eq!(event.original_timestamp.as_deref(), Some("2023-11-14T23:14:55.000Z"));
        assert_eq!(event.sent_at, Some(device_now));
    }

    #[test]
    fn without_sent_at_the_device_time_stands() {
        let event =
            normalize(json!({"userId": "u", "timestamp": "2020-01-02T03:04:05+02:00"}), Some(EventType::Identify))
                .unwrap();
        assert_eq!(crate::event::format_timestamp(event.timestamp), "2020-01-02T01:04:05.000Z");
    }

    #[test]
    fn parse_timestamp_accepts_what_sdks_send() {
        for text in [
            "2024-05-06T07:08:09.123Z",
            "2024-05-06T07:08:09.123456+00:00",
            "2024-05-06T07:08:09.123",
            "2024-05-06 07:08:09",
        ] {
            let time = parse_timestamp(text).unwrap_or_else(|_| panic!("{text} must parse"));
            assert_eq!(time.timestamp(), Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).unwrap().timestamp(), "{text}");
        }
        assert_eq!(parse_timestamp("2024-05-06").unwrap(), Utc.with_ymd_and_hms(2024, 5, 6, 0, 0, 0).unwrap());
        assert!(parse_timestamp("06/05/2024").is_err());
    }

    #[test]
    fn batch_defaults_merge_into_each_message_without_overriding_it() {
        let body = json!({
            "batch": [
                {"type": "track", "userId": "u", "event": "A", "context": {"locale": "fr"}},
                {"type": "identify", "userId": "u"}
            ],
            "context": {"locale": "en", "library": {"name": "test"}},
            "integrations": {"Mixpanel": false},
            "sentAt": "2024-01-01T00:00:00Z",
        })
        .to_string();
        let batch = parse_batch(body.as_bytes()).unwrap();
        let source = SourceId::new("s");
        let request = RequestContext {
            source_id: &source,
            received_at: at(0),
            client_ip: None,
            ids: IdRequirement::UserOrAnonymousId,
        };
        let normalized = normalize_batch(&batch, &request);
        assert!(normalized.rejected.is_empty());
        let [first, second] = &normalized.events[..] else { panic!("two events expected") };
        assert_eq!(first.context["locale"], json!("fr"));
        assert_eq!(first.context["library"], json!({"name": "test"}));
        assert_eq!(second.context["locale"], json!("en"));
        assert_eq!(second.integrations["Mixpanel"], json!(false));
        assert_eq!(second.sent_at, parse_timestamp("2024-01-01T00:00:00Z").ok());
    }

    #[test]
    fn one_bad_message_does_not_spoil_the_batch() {
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        let body = json!({"batch": [
            {"type": "track", "userId": "u", "event": "ok"},
            {"type": "track", "userId": "u"},
            "not an object",
            {"type": "identify", "userId": "u", "traits": {"blob": big}},
            {"type": "page", "anonymousId": "a"}
        ]})
        .to_string();
        let batch = parse_batch(body.as_bytes()).unwrap();
        let source = SourceId::new("s");
        let request = RequestContext {
            source_id: &source,
            received_at: at(0),
            client_ip: None,
            ids: IdRequirement::UserOrAnonymousId,
        };
        let normalized = normalize_batch(&batch, &request);
        assert_eq!(normalized.events.len(), 2);
        let refused: Vec<_> = normalized.rejected.iter().map(|r| (r.index, r.rejection.code)).collect();
        assert_eq!(
            refused,
            vec![
                (Some(1), RejectionCode::MissingField),
                (Some(2), RejectionCode::InvalidType),
                (Some(3), RejectionCode::MessageTooLarge)
            ]
        );
        assert_eq!(normalized.rejected[1].raw, "\"not an object\"");
    }

    #[test]
    fn request_level_errors() {
        assert!(matches!(parse_batch(b"{\"batch\": [}"), Err(RequestError::InvalidJson(_))));
        assert_eq!(parse_batch(b"[1]").unwrap_err(), RequestError::NotAnObject);
        assert_eq!(parse_batch(b"{}").unwrap_err(), RequestError::MissingBatch);
        assert_eq!(parse_batch(b"{\"batch\": {}}").unwrap_err(), RequestError::BatchNotArray);
        assert_eq!(parse_batch(b"{\"batch\": [], \"context\": 1}").unwrap_err().field(), Some("context"));
        assert_eq!(parse_batch(b"{\"batch\": [], \"sentAt\": \"soon\"}").unwrap_err().field(), Some("sentAt"));
        let too_many = format!("{{\"batch\": [{}]}}", vec!["{}"; MAX_BATCH_MESSAGES + 1].join(","));
        assert_eq!(parse_batch(too_many.as_bytes()).unwrap_err(), RequestError::TooManyMessages(2501));
        let (message, key) = parse_single(b"{\"writeKey\": \"k\", \"userId\": \"u\"}").unwrap();
        assert_eq!(key.as_deref(), Some("k"));
        assert!(!message.contains_key("writeKey"));
        assert_eq!(parse_single(b"\"text\"").unwrap_err(), RequestError::NotAnObject);
    }

    #[test]
    fn events_round_trip_through_their_json() {
        let event = normalize(
            json!({"userId": "u", "event": "E", "timestamp": "2024-01-01T00:00:00Z", "sentAt": "2024-01-01T00:00:01Z", "version": 2}),
            Some(EventType::Track),
        )
        .unwrap();
        let record = event.to_log_record();
        let back: Event = serde_json::from_str(&record.payload).unwrap();
        assert_eq!(back, event);
        assert_eq!(record.timestamp_ms, event.timestamp.timestamp_millis());
    }

    #[test]
    fn skew_correction_outside_years_0000_to_9999_falls_back_to_received_at() {
        // The reproduction: the correction gave "-7973-11-24T…", which was
        // acknowledged, logged, and never read by the resolver.
        for (timestamp, sent_at) in
            [("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"), ("9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z")]
        {
            let event = normalize(
                json!({"userId": "ts-user", "event": "E", "timestamp": timestamp, "sentAt": sent_at}),
                Some(EventType::Track),
            )
            .unwrap();
            assert_eq!(event.timestamp, at(100), "{timestamp} sent at {sent_at}");
            assert_eq!(event.original_timestamp.as_deref(), Some(timestamp));
            let record = event.to_log_record();
            let back: Event = serde_json::from_str(&record.payload).expect("the log record reads back");
            assert_eq!(back.user_id.as_deref(), Some("ts-user"));
        }
    }

    #[test]
    fn times_whose_utc_value_leaves_years_0000_to_9999_are_refused_naming_the_field() {
        assert_eq!(
            rejection_of(json!({"userId": "u", "sentAt": "0000-01-01T00:00:00+01:00"}), Some(EventType::Identify)),
            (RejectionCode::InvalidValue, Some("sentAt".into()))
        );
        assert_eq!(
            rejection_of(json!({"userId": "u", "timestamp": "9999-12-31T23:30:00-01:00"}), Some(EventType::Identify)),
            (RejectionCode::InvalidValue, Some("timestamp".into()))
        );
        assert_eq!(
            parse_batch(br#"{"batch": [], "sentAt": "0000-01-01T00:00:00+01:00"}"#).unwrap_err().field(),
            Some("sentAt")
        );
        let event = normalize(json!({"userId": "u", "timestamp": "0000-01-01T00:00:00Z"}), Some(EventType::Identify))
            .expect("year 0000 is storable");
        assert!(serde_json::from_str::<Event>(&event.to_log_record().payload).is_ok());
    }

    #[test]
    fn an_event_whose_extra_repeats_a_field_is_unreadable() {
        let mut event = normalize(json!({"userId": "u"}), Some(EventType::Identify)).unwrap();
        assert_eq!(event.unreadable_field(), None);
        event.extra.insert("userId".into(), json!("other"));
        assert_eq!(event.unreadable_field(), Some("userId"));
    }

    #[test]
    fn a_lone_surrogate_spoiled_the_whole_batch() {
        let body = br#"{"batch": [{"type": "track", "userId": "u", "event": "Cut \ud83d"},
            {"type": "track", "userId": "u", "event": "Whole \ud83d\ude00"},
            {"type": "track", "userId": "u", "event": "Low \uDE00 and \\ud83d kept"}]}"#;
        let source = SourceId::new("s");
        let request = RequestContext {
            source_id: &source,
            received_at: at(0),
            client_ip: None,
            ids: IdRequirement::UserOrAnonymousId,
        };
        let unrepaired = normalize_batch(&parse_batch(body).unwrap(), &request);
        assert_eq!(unrepaired.rejected.len(), 2, "serde_json refuses lone surrogates");
        let repaired = replace_lone_surrogates(body);
        assert_eq!(repaired.len(), body.len());
        let normalized = normalize_batch(&parse_batch(&repaired).unwrap(), &request);
        assert!(normalized.rejected.is_empty());
        let names: Vec<_> = normalized.events.iter().map(|event| event.event.clone().unwrap()).collect();
        assert_eq!(names, ["Cut \u{FFFD}", "Whole \u{1F600}", "Low \u{FFFD} and \\ud83d kept"]);
        assert!(matches!(replace_lone_surrogates(b"{\"a\": \"\\ud83d\\ude00\"}"), Cow::Borrowed(_)));
        assert_eq!(&*replace_lone_surrogates(br#"["\ud83d"#), br#"["\ufffd"#, "a truncated body is repaired too");
    }

    proptest! {
        /// Skipping bodies without a `\u` that could start a surrogate's
        /// escape changes nothing.
        #[test]
        fn the_quick_look_for_surrogates_misses_none(
            pieces in prop::collection::vec(
                prop::sample::select(vec![r"\ud83d", r"\uDE00", r"\ude00", r"\u0041", r"\\", r"\", "\"", "u", "d", "a "]),
                0..24,
            )
        ) {
            let body = pieces.concat();
            prop_assert_eq!(replace_lone_surrogates(body.as_bytes()), repair_surrogates(body.as_bytes()));
        }

        /// The correction preserves the interval between the event and its sending.
        #[test]
        fn skew_correction_preserves_the_send_delay(skew in -86_400i64..86_400, delay in 0i64..86_400) {
            let received = at(0);
            let sent = received + chrono::Duration::seconds(skew);
            let original = sent - chrono::Duration::seconds(delay);
            let corrected = corrected_timestamp(received, Some(sent), original);
            prop_assert_eq!(received - corrected, chrono::Duration::seconds(delay));
        }

        /// Whatever times a client sends, an accepted event's log record reads back.
        #[test]
        fn every_accepted_event_reads_back_from_its_log_record(
            timestamp in -62_135_596_800_000i64..253_402_300_799_999,
            sent_at in proptest::option::of(-62_135_596_800_000i64..253_402_300_799_999),
            offset_hours in -23i32..=23,
        ) {
            let offset = chrono::FixedOffset::east_opt(offset_hours * 3600).unwrap();
            let text = |millis: i64| DateTime::from_timestamp_millis(millis).unwrap().with_timezone(&offset).to_rfc3339();
            let mut message = json!({"userId": "u", "timestamp": text(timestamp)});
            if let Some(sent_at) = sent_at { message["sentAt"] = json!(text(sent_at)); }
            if let Ok(event) = normalize(message, Some(EventType::Identify)) {
                let back: Event = serde_json::from_str(&event.to_log_record().payload).unwrap();
                prop_assert_eq!(back.user_id.as_deref(), Some("u"));
            }
        }

        /// Any JSON object either becomes an event or is refused with a code; never a panic.
        #[test]
        fn arbitrary_messages_never_panic(
            user in proptest::option::of("[a-z0-9]{0,8}"),
            event in proptest::option::of(any::<i32>()),
            kind in "[a-z]{0,9}",
        ) {
            let mut message = json!({"type": kind, "event": event});
            if let Some(user) = user { message["userId"] = json!(user); }
            let _ = normalize(message, None);
        }
    }
}
