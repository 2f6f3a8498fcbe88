//! Destinations and the delivery policy, free of I/O: what a destination is
//! (a closed enum of kinds, each with serde settings validated once before
//! anything is built), which events of the log it receives, how a delivery
//! failure is judged (retryable or permanent), when the next attempt is due
//! (randomized exponential backoff up to a time limit, after which the item
//! becomes a dead letter), and the signature a webhook carries.
//!
//! The server's outbox stage and delivery workers call into this module; it
//! decides, they do the I/O. Ordering is the workers' invariant, stated here
//! so both sides agree: a destination's items are delivered in the order they
//! were enqueued, and an item is never attempted while an earlier item of the
//! same destination is still waiting for a retry.

use crate::event::EventType;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;

/// The longest destination name.
pub const MAX_DESTINATION_NAME_LEN: usize = 64;

/// How long a destination keeps retrying an item before it becomes a dead
/// letter, unless its settings say otherwise: Segment's four hours.
pub const DEFAULT_GIVE_UP_AFTER_MS: u64 = 4 * 60 * 60 * 1000;

/// Items per delivery unless a destination's `batch_size` says otherwise.
pub const DEFAULT_BATCH_SIZE: u32 = 100;

/// The largest `batch_size` a destination may ask for.
pub const MAX_BATCH_SIZE: u32 = 5_000;

/// The header a webhook's signature travels in unless its settings name another.
pub const DEFAULT_SIGNATURE_HEADER: &str = "x-tandem-signature";

/// A destination as a person defines it: a unique name, where deliveries
/// go, which events it receives and how long it retries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DestinationDefinition {
    pub name: String,
    pub destination: DestinationSettings,
    /// The events of the log this destination receives; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventFilter>,
    /// The audiences whose entries and exits this destination receives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<AudienceSubscription>,
    #[serde(default)]
    pub retry: RetrySettings,
    /// At most this many events per second go to the receiver (batches are
    /// spaced out to keep the rate); unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_events_per_second: Option<u32>,
    /// At most this many items per request (webhook) or write (file,
    /// warehouse); [`DEFAULT_BATCH_SIZE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// The consent categories a person must have granted, every one, for
    /// this destination to receive their events and audience changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consent_categories: Vec<String>,
}

/// Where deliveries go: one variant per kind of destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum DestinationSettings {
    Webhook(WebhookSettings),
    File(FileSettings),
    Warehouse(WarehouseSettings),
}

impl DestinationSettings {
    /// The kind as stored and shown: `webhook`, `file` or `warehouse`.
    pub fn kind(&self) -> &'static str {
        match self {
            DestinationSettings::Webhook(_) => "webhook",
            DestinationSettings::File(_) => "file",
            DestinationSettings::Warehouse(_) => "warehouse",
        }
    }
}

/// A PostgreSQL warehouse: Tandem keeps the tables `profiles`,
/// `identifiers`, `audience_memberships` and `events` in `schema` of the
/// database at `url`, creating and migrating them itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WarehouseSettings {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    /// The schema the tables live in; `public` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
}

impl WarehouseSettings {
    /// The schema the tables live in.
    pub fn schema(&self) -> &str {
        self.schema.as_deref().unwrap_or("public")
    }

    fn validate(&self) -> Result<(), DestinationError> {
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return Err(invalid("destination.url", "must start with postgres:// or postgresql://"));
        }
        if let Some(schema) = &self.schema {
            let mut bytes = schema.bytes();
            let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
            if !first_ok
                || schema.len() > 63
                || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(invalid(
                    "destination.schema",
                    "must be 1 to 63 lowercase letters, digits and '_', not starting with a digit",
                ));
            }
        }
        Ok(())
    }
}

/// A webhook: each batch is POSTed as a JSON array to `url`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookSettings {
    pub url: String,
    /// When set, each request carries `sha256=<hex HMAC-SHA256 of the body>`
    /// in `signature_header`, so the receiver can check who sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    /// Extra headers sent with every request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// How long one request may take before it counts as a timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// For `https://` receivers: a PEM file of the certificate authorities
    /// trusted instead of the built-in public roots (a private CA, or a
    /// receiver's self-signed certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

fn default_signature_header() -> String {
    DEFAULT_SIGNATURE_HEADER.to_owned()
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// Files on local disk, in one of two modes:
///
/// - `directory` (with `format` and `snapshot_every`): each delivered batch
///   becomes change files, one per stream (`events`, or an audience's
///   name), and each followed audience also gets full snapshot files; every
///   file is written whole under a temporary name and renamed into place.
/// - `path` (the original mode): each item is appended as one line of JSON
///   to that one file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileSettings {
    /// Append JSON lines to this one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Write timestamped snapshot and change files into this directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// The format of the files in `directory`; `jsonl` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FileFormat>,
    /// How often a followed audience gets a full snapshot (`"30m"`, `"1h"`,
    /// `"1d"`); when absent, with every batch that changes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_every: Option<String>,
}

/// The format of a file destination's files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FileFormat {
    /// RFC 4180 CSV with a header row; values that are not strings are JSON.
    Csv,
    /// One JSON object per line.
    #[default]
    Jsonl,
    /// Apache Parquet, every column an optional UTF-8 string.
    Parquet,
}

impl FileFormat {
    /// The file name extension: `csv`, `jsonl` or `parquet`.
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Csv => "csv",
            FileFormat::Jsonl => "jsonl",
            FileFormat::Parquet => "parquet",
        }
    }
}

impl FileSettings {
    /// The `snapshot_every` interval in milliseconds, once validated.
    pub fn snapshot_every_ms(&self) -> Option<u64> {
        self.snapshot_every.as_deref().and_then(parse_duration_ms)
    }

    fn validate(&self) -> Result<(), DestinationError> {
        match (&self.path, &self.directory) {
            (Some(_), Some(_)) => {
                return Err(invalid("destination.directory", "give either path (one JSON-lines file) or directory"))
            }
            (None, None) => return Err(invalid("destination.directory", "give a directory (or a path)")),
            (Some(path), None) => {
                if path.trim().is_empty() {
                    return Err(invalid("destination.path", "must not be empty"));
                }
                if self.format.is_some_and(|format| format != FileFormat::Jsonl) {
                    return Err(invalid("destination.format", "a path is always JSON lines; use a directory"));
                }
                if self.snapshot_every.is_some() {
                    return Err(invalid("destination.snapshot_every", "needs a directory"));
                }
            }
            (None, Some(directory)) => {
                if directory.trim().is_empty() {
                    return Err(invalid("destination.directory", "must not be empty"));
                }
            }
        }
        if let Some(every) = &self.snapshot_every {
            if parse_duration_ms(every).is_none_or(|ms| ms == 0) {
                return Err(invalid("destination.snapshot_every", "must be a duration like 30m, 1h or 1d"));
            }
        }
        Ok(())
    }
}

/// The instant `--since` names, in milliseconds: an RFC 3339 time
/// (`2026-12-06T08:00:00Z`) or a duration back from `now_ms` (`2h`, `7d`);
/// `None` when it is neither.
pub fn parse_since_ms(text: &str, now_ms: i64) -> Option<i64> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(text.trim()) {
        return Some(at.timestamp_millis());
    }
    let back = i64::try_from(parse_duration_ms(text)?).ok()?;
    Some(now_ms.saturating_sub(back))
}

/// A duration written as a whole number and a unit: `500ms`, `30s`, `15m`,
/// `2h`, `7d`; `None` when it is not one.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number.checked_mul(unit_ms)
}

/// Which events a destination receives: an event matches when its type is
/// one of `types` (any type when empty) and its name (a track's `event`, a
/// page's or screen's `name`) is one of `names` (any name when empty).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventFilter {
    #[serde(default)]
    pub types: Vec<EventType>,
    #[serde(default)]
    pub names: Vec<String>,
}

impl EventFilter {
    /// Whether an event of this type and name is delivered.
    pub fn matches(&self, event_type: EventType, name: Option<&str>) -> bool {
        let type_matches = self.types.is_empty() || self.types.contains(&event_type);
        let name_matches = self.names.is_empty() || name.is_some_and(|name| self.names.iter().any(|n| n == name));
        type_matches && name_matches
    }
}

/// One audience a destination follows: each profile's entry and exit is
/// delivered with the profile's `traits` named here (their values when the
/// change is enqueued).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AudienceSubscription {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traits: Vec<String>,
}

/// How a destination retries: the first delay, the longest delay, and how
/// long after an item's first attempt it gives up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RetrySettings {
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    #[serde(default = "default_give_up_after_ms")]
    pub give_up_after_ms: u64,
}

fn default_initial_backoff_ms() -> u64 {
    1_000
}

fn default_max_backoff_ms() -> u64 {
    10 * 60 * 1000
}

fn default_give_up_after_ms() -> u64 {
    DEFAULT_GIVE_UP_AFTER_MS
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            give_up_after_ms: default_give_up_after_ms(),
        }
    }
}

/// What is wrong with a destination definition; `field` names the setting.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DestinationError {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> DestinationError {
    DestinationError { field, message: message.into() }
}

impl DestinationDefinition {
    /// Checks every setting without any I/O: the name, the URL's scheme and
    /// host, header names, the file path, the retry limits.
    pub fn validate(&self) -> Result<(), DestinationError> {
        validate_name(&self.name)?;
        match &self.destination {
            DestinationSettings::Webhook(webhook) => webhook.validate()?,
            DestinationSettings::File(file) => file.validate()?,
            DestinationSettings::Warehouse(warehouse) => warehouse.validate()?,
        }
        if self.max_events_per_second == Some(0) {
            return Err(invalid("max_events_per_second", "must be above 0 (leave it out for no limit)"));
        }
        if self.batch_size.is_some_and(|size| size == 0 || size > MAX_BATCH_SIZE) {
            return Err(invalid("batch_size", format!("must be between 1 and {MAX_BATCH_SIZE}")));
        }
        if self.events.as_ref().is_some_and(|events| events.names.iter().any(|name| name.is_empty())) {
            return Err(invalid("events.names", "an event name must not be empty"));
        }
        if self.consent_categories.iter().any(|category| category.trim().is_empty()) {
            return Err(invalid("consent_categories", "a consent category must not be empty"));
        }
        if self.events.is_none() && self.audiences.is_empty() {
            return Err(invalid("events", "a destination receives events, audiences or both; name one"));
        }
        for audience in &self.audiences {
            if audience.name.trim().is_empty() {
                return Err(invalid("audiences.name", "must not be empty"));
            }
            if audience.traits.iter().any(|name| name.is_empty()) {
                return Err(invalid("audiences.traits", "a trait name must not be empty"));
            }
        }
        let retry = &self.retry;
        if retry.initial_backoff_ms == 0 {
            return Err(invalid("retry.initial_backoff_ms", "must be above 0"));
        }
        if retry.max_backoff_ms < retry.initial_backoff_ms {
            return Err(invalid("retry.max_backoff_ms", "must be at least initial_backoff_ms"));
        }
        if retry.give_up_after_ms == 0 {
            return Err(invalid("retry.give_up_after_ms", "must be above 0"));
        }
        Ok(())
    }
}

/// A destination name: 1 to 64 of lowercase letters, digits, `-` and `_`,
/// so it fits in a URL path and a metric label unchanged.
pub fn validate_name(name: &str) -> Result<(), DestinationError> {
    if name.is_empty() || name.len() > MAX_DESTINATION_NAME_LEN {
        return Err(invalid("name", format!("must be 1 to {MAX_DESTINATION_NAME_LEN} characters")));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
        return Err(invalid("name", "may hold only lowercase letters, digits, '-' and '_'"));
    }
    Ok(())
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl WebhookSettings {
    fn validate(&self) -> Result<(), DestinationError> {
        let rest = self
            .url
            .strip_prefix("http://")
            .or_else(|| self.url.strip_prefix("https://"))
            .ok_or_else(|| invalid("destination.url", "must start with http:// or https://"))?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(invalid("destination.url", "must name a host"));
        }
        if self.secret.as_deref() == Some("") {
            return Err(invalid("destination.secret", "must not be empty when set"));
        }
        if !is_header_name(&self.signature_header) {
            return Err(invalid("destination.signature_header", "is not a valid header name"));
        }
        for (name, value) in &self.headers {
            if !is_header_name(name) {
                return Err(invalid("destination.headers", format!("{name:?} is not a valid header name")));
            }
            if value.bytes().any(|b| b == b'\r' || b == b'\n') {
                return Err(invalid("destination.headers", format!("the value of {name:?} holds a line break")));
            }
        }
        if self.timeout_ms == 0 {
            return Err(invalid("destination.timeout_ms", "must be above 0"));
        }
        if let Some(ca_file) = &self.ca_file {
            if ca_file.trim().is_empty() {
                return Err(invalid("destination.ca_file", "must not be empty when set"));
            }
            if self.url.starts_with("http://") {
                return Err(invalid("destination.ca_file", "applies to https:// receivers only"));
            }
        }
        Ok(())
    }
}

/// The value of a webhook's signature header for `body`:
/// `sha256=` and the lowercase hex HMAC-SHA256 of the body under `secret`.
pub fn webhook_signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac accepts any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut signature = String::with_capacity(7 + digest.len() * 2);
    signature.push_str("sha256=");
    for byte in digest {
        signature.push_str(&format!("{byte:02x}"));
    }
    signature
}

/// Why one delivery attempt failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The receiver answered with a status that is not 2xx.
    Status(u16),
    /// No answer within the time allowed.
    Timeout,
    /// The receiver could not be reached (refused, reset, name unknown).
    Connection(String),
    /// A local write failed (a file destination).
    Io(String),
    /// The receiver answered a retryable status (429, 503, …) with a
    /// `Retry-After` header: it asked to be left alone this long.
    RetryAfter { status: u16, after_ms: u64 },
}

/// The delay a `Retry-After` header asks for, in milliseconds, at `now_ms`:
/// either whole seconds (`120`) or an HTTP date (`Wed, 21 Oct 2026 07:28:00
/// GMT`, zero when past); `None` when it is neither.
pub fn retry_after_ms(value: &str, now_ms: i64) -> Option<u64> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds.saturating_mul(1_000));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?.timestamp_millis();
    Some(at.saturating_sub(now_ms).max(0) as u64)
}

impl std::fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptFailure::Status(status) => write!(f, "the receiver answered {status}"),
            AttemptFailure::Timeout => f.write_str("the receiver did not answer in time"),
            AttemptFailure::Connection(reason) => write!(f, "could not reach the receiver: {reason}"),
            AttemptFailure::Io(reason) => write!(f, "could not write: {reason}"),
            AttemptFailure::RetryAfter { status, after_ms } => {
                write!(f, "the receiver answered {status} and asked to wait {} s", after_ms.div_ceil(1_000))
            }
        }
    }
}

/// Whether trying again may succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// 5xx, 429, 408, timeouts, unreachable receivers, local write errors.
    Retryable,
    /// Any other 4xx (and odd statuses): the receiver refused this item,
    /// and sending it again will not change its mind.
    Permanent,
}

impl AttemptFailure {
    /// How this failure is judged.
    pub fn class(&self) -> FailureClass {
        match self {
            AttemptFailure::Status(status) => match status {
                408 | 429 => FailureClass::Retryable,
                500..=599 => FailureClass::Retryable,
                _ => FailureClass::Permanent,
            },
            AttemptFailure::Timeout
            | AttemptFailure::Connection(_)
            | AttemptFailure::Io(_)
            | AttemptFailure::RetryAfter { .. } => FailureClass::Retryable,
        }
    }
}

/// What a worker does with an item after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextStep {
    /// Attempt again at this instant (milliseconds).
    RetryAt(i64),
    /// Give up: the item becomes a dead letter.
    DeadLetter,
}

impl RetrySettings {
    /// The delay before attempt `failed_attempts + 1`: the initial backoff
    /// doubled per failed attempt, capped at the maximum, then randomized
    /// into its upper half by `jitter` (in `0.0..1.0`) so destinations that
    /// failed together do not retry together.
    pub fn backoff_ms(&self, failed_attempts: u32, jitter: f64) -> u64 {
        debug_assert!((0.0..1.0).contains(&jitter));
        let exponent = failed_attempts.saturating_sub(1).min(40);
        let full = self.initial_backoff_ms.saturating_mul(1u64 << exponent).min(self.max_backoff_ms);
        let half = full / 2;
        half + ((full - half) as f64 * jitter.clamp(0.0, 1.0)) as u64
    }

    /// What follows a failed attempt of an item first attempted at
    /// `first_attempt_ms`, after `failed_attempts` failures (this one
    /// included): a permanent failure or a retry that would fall past the
    /// time limit makes it a dead letter.
    pub fn after_failure(
        &self,
        failure: &AttemptFailure,
        first_attempt_ms: i64,
        failed_attempts: u32,
        now_ms: i64,
        jitter: f64,
    ) -> NextStep {
        if failure.class() == FailureClass::Permanent {
            return NextStep::DeadLetter;
        }
        // A receiver's own `Retry-After` wins when it asks for longer than
        // the backoff: it knows when it will be ready.
        let asked = match failure {
            AttemptFailure::RetryAfter { after_ms, .. } => *after_ms,
            _ => 0,
        };
        let delay = self.backoff_ms(failed_attempts, jitter).max(asked);
        let retry_at = now_ms.saturating_add(delay.min(i64::MAX as u64) as i64);
        let give_up_at = first_attempt_ms.saturating_add(self.give_up_after_ms as i64);
        if retry_at > give_up_at {
            NextStep::DeadLetter
        } else {
            NextStep::RetryAt(retry_at)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn webhook(url: &str) -> DestinationDefinition {
        DestinationDefinition {
            name: "crm".to_owned(),
            destination: DestinationSettings::Webhook(WebhookSettings {
                url: url.to_owned(),
                secret: None,
                signature_header: default_signature_header(),
                headers: BTreeMap::new(),
                timeout_ms: 1000,
                ca_file: None,
            }),
            events: Some(EventFilter::default()),
            audiences: Vec::new(),
            retry: RetrySettings::default(),
            max_events_per_second: None,
            batch_size: None,
            consent_categories: Vec::new(),
        }
    }

    #[test]
    fn parses_a_webhook_with_defaults_and_refuses_unknown_settings() {
        let definition: DestinationDefinition = serde_json::from_value(serde_json::json!({
            "name": "crm",
            "destination": {"kind": "webhook", "url": "https://example.com/hook", "secret": "s"},
            "events": {"types": ["track"], "names": ["Signed Up"]}
        }))
        .unwrap();
        definition.validate().unwrap();
        assert_eq!(definition.retry.give_up_after_ms, DEFAULT_GIVE_UP_AFTER_MS);
        let DestinationSettings::Webhook(settings) = &definition.destination else { panic!("not a webhook") };
        assert_eq!(settings.signature_header, DEFAULT_SIGNATURE_HEADER);

        let unknown = serde_json::from_value::<DestinationDefinition>(serde_json::json!({
            "name": "crm",
            "destination": {"kind": "webhook", "url": "https://example.com", "retries": 3}
        }));
        assert!(unknown.unwrap_err().to_string().contains("retries"));
        let unknown_kind = serde_json::from_value::<DestinationDefinition>(serde_json::json!({
            "name": "crm", "destination": {"kind": "kafka"}
        }));
        assert!(unknown_kind.is_err());
    }

    #[test]
    fn validation_names_the_bad_setting() {
        assert_eq!(webhook("ftp://x").validate().unwrap_err().field, "destination.url");
        assert_eq!(webhook("http:///path").validate().unwrap_err().field, "destination.url");
        let mut bad_name = webhook("http://x");
        bad_name.name = "Bad Name".to_owned();
        assert_eq!(bad_name.validate().unwrap_err().field, "name");
        let mut bad_header = webhook("http://x");
        if let DestinationSettings::Webhook(settings) = &mut bad_header.destination {
            settings.headers.insert("x bad".to_owned(), "v".to_owned());
        }
        assert_eq!(bad_header.validate().unwrap_err().field, "destination.headers");
        let mut bad_retry = webhook("http://x");
        bad_retry.retry.max_backoff_ms = 1;
        assert_eq!(bad_retry.validate().unwrap_err().field, "retry.max_backoff_ms");
        let file = DestinationDefinition {
            destination: DestinationSettings::File(FileSettings { path: Some(" ".to_owned()), ..Default::default() }),
            ..webhook("http://x")
        };
        assert_eq!(file.validate().unwrap_err().field, "destination.path");
        let nothing = DestinationDefinition { events: None, ..webhook("http://x") };
        assert_eq!(nothing.validate().unwrap_err().field, "events");
        let audiences_only: DestinationDefinition = serde_json::from_value(serde_json::json!({
            "name": "ads",
            "destination": {"kind": "file", "path": "ads.jsonl"},
            "audiences": [{"name": "Active Pro", "traits": ["email"]}]
        }))
        .unwrap();
        audiences_only.validate().unwrap();
        assert_eq!(audiences_only.events, None);
        assert_eq!(audiences_only.audiences[0].traits, vec!["email"]);
    }

    #[test]
    fn durations_and_since_parse() {
        assert_eq!(parse_duration_ms("90s"), Some(90_000));
        assert_eq!(parse_duration_ms("2h"), Some(7_200_000));
        assert_eq!(parse_duration_ms("7d"), Some(604_800_000));
        assert_eq!(parse_duration_ms("1.5h"), None);
        assert_eq!(parse_duration_ms("h"), None);
        assert_eq!(parse_duration_ms("10 parsecs"), None);
        assert_eq!(parse_since_ms("2h", 10_000_000), Some(10_000_000 - 7_200_000));
        assert_eq!(parse_since_ms("2026-12-06T08:00:00Z", 0), Some(1_796_544_000_000));
        assert_eq!(parse_since_ms("yesterday", 0), None);
    }

    #[test]
    fn file_settings_take_a_directory_or_the_original_path() {
        let parse = |settings: serde_json::Value| {
            serde_json::from_value::<DestinationDefinition>(serde_json::json!({
                "name": "files", "destination": settings, "events": {}
            }))
        };
        let directory = parse(serde_json::json!({
            "kind": "file", "directory": "/var/out", "format": "parquet", "snapshot_every": "1h"
        }))
        .unwrap();
        directory.validate().unwrap();
        let DestinationSettings::File(settings) = &directory.destination else { panic!("not a file") };
        assert_eq!((settings.format, settings.snapshot_every_ms()), (Some(FileFormat::Parquet), Some(3_600_000)));
        parse(serde_json::json!({"kind": "file", "path": "events.jsonl"})).unwrap().validate().unwrap();
        let field = |settings| parse(settings).unwrap().validate().unwrap_err().field;
        assert_eq!(field(serde_json::json!({"kind": "file"})), "destination.directory");
        assert_eq!(field(serde_json::json!({"kind": "file", "path": "a", "directory": "b"})), "destination.directory");
        assert_eq!(field(serde_json::json!({"kind": "file", "path": "a", "format": "csv"})), "destination.format");
        let bad_every = serde_json::json!({"kind": "file", "directory": "b", "snapshot_every": "hourly"});
        assert_eq!(field(bad_every), "destination.snapshot_every");
        assert!(parse(serde_json::json!({"kind": "file", "directory": "b", "format": "xlsx"})).is_err());
    }

    #[test]
    fn warehouse_settings_need_a_postgres_url_and_a_plain_schema() {
        let warehouse = |url: &str, schema: Option<&str>| DestinationDefinition {
            destination: DestinationSettings::Warehouse(WarehouseSettings {
                url: url.to_owned(),
                schema: schema.map(str::to_owned),
            }),
            ..webhook("http://x")
        };
        warehouse("postgres://u@db/x", Some("tandem_out")).validate().unwrap();
        assert_eq!(warehouse("mysql://db/x", None).validate().unwrap_err().field, "destination.url");
        for schema in ["Bad", "1abc", "a;drop", ""] {
            assert_eq!(warehouse("postgres://db/x", Some(schema)).validate().unwrap_err().field, "destination.schema");
        }
        let webhook_with_ca = |url: &str| {
            let mut definition = webhook(url);
            if let DestinationSettings::Webhook(settings) = &mut definition.destination {
                settings.ca_file = Some("ca.pem".to_owned());
            }
            definition.validate()
        };
        webhook_with_ca("https://x/hook").unwrap();
        assert_eq!(webhook_with_ca("http://x/hook").unwrap_err().field, "destination.ca_file");
    }

    #[test]
    fn event_filter_matches_type_and_name() {
        let all = EventFilter::default();
        assert!(all.matches(EventType::Identify, None));
        let signups = EventFilter { types: vec![EventType::Track], names: vec!["Signed Up".to_owned()] };
        assert!(signups.matches(EventType::Track, Some("Signed Up")));
        assert!(!signups.matches(EventType::Track, Some("Logged In")));
        assert!(!signups.matches(EventType::Page, Some("Signed Up")));
        assert!(!signups.matches(EventType::Track, None));
    }

    #[test]
    fn failures_are_classified() {
        assert_eq!(AttemptFailure::Status(500).class(), FailureClass::Retryable);
        assert_eq!(AttemptFailure::Status(503).class(), FailureClass::Retryable);
        assert_eq!(AttemptFailure::Status(429).class(), FailureClass::Retryable);
        assert_eq!(AttemptFailure::Timeout.class(), FailureClass::Retryable);
        assert_eq!(AttemptFailure::Connection("refused".into()).class(), FailureClass::Retryable);
        assert_eq!(AttemptFailure::Status(400).class(), FailureClass::Permanent);
        assert_eq!(AttemptFailure::Status(404).class(), FailureClass::Permanent);
    }

    #[test]
    fn a_receivers_retry_after_is_honoured_when_longer_than_the_backoff() {
        let retry = RetrySettings { initial_backoff_ms: 1_000, max_backoff_ms: 8_000, give_up_after_ms: 60_000 };
        let asked = AttemptFailure::RetryAfter { status: 429, after_ms: 30_000 };
        assert_eq!(asked.class(), FailureClass::Retryable);
        assert_eq!(retry.after_failure(&asked, 0, 1, 0, 0.5), NextStep::RetryAt(30_000));
        let short = AttemptFailure::RetryAfter { status: 503, after_ms: 10 };
        assert_eq!(retry.after_failure(&short, 0, 1, 0, 0.0), NextStep::RetryAt(500), "the backoff when longer");
        let past_the_limit = AttemptFailure::RetryAfter { status: 429, after_ms: 120_000 };
        assert_eq!(retry.after_failure(&past_the_limit, 0, 1, 0, 0.0), NextStep::DeadLetter);
        assert_eq!(retry_after_ms("120", 0), Some(120_000));
        let now = chrono::DateTime::parse_from_rfc2822("Wed, 21 Oct 2026 07:28:00 GMT").unwrap().timestamp_millis();
        assert_eq!(retry_after_ms("Wed, 21 Oct 2026 07:28:30 GMT", now), Some(30_000));
        assert_eq!(retry_after_ms("Wed, 21 Oct 2026 07:27:00 GMT", now), Some(0), "a date already past");
        assert_eq!(retry_after_ms("soon", now), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let retry = RetrySettings { initial_backoff_ms: 1000, max_backoff_ms: 8000, give_up_after_ms: 60_000 };
        assert_eq!(retry.backoff_ms(1, 0.0), 500);
        assert_eq!(retry.backoff_ms(1, 0.999_999), 999);
        assert_eq!(retry.backoff_ms(2, 0.0), 1000);
        assert_eq!(retry.backoff_ms(3, 0.0), 2000);
        assert_eq!(retry.backoff_ms(10, 0.0), 4000);
        assert_eq!(retry.backoff_ms(200, 0.0), 4000);
    }

    #[test]
    fn gives_up_after_the_limit_or_on_a_permanent_failure() {
        let retry = RetrySettings { initial_backoff_ms: 1000, max_backoff_ms: 1000, give_up_after_ms: 10_000 };
        let busy = AttemptFailure::Status(503);
        assert_eq!(retry.after_failure(&busy, 0, 1, 0, 0.0), NextStep::RetryAt(500));
        assert_eq!(retry.after_failure(&busy, 0, 5, 9_000, 0.0), NextStep::RetryAt(9_500));
        assert_eq!(retry.after_failure(&busy, 0, 6, 9_600, 0.0), NextStep::DeadLetter);
        assert_eq!(retry.after_failure(&AttemptFailure::Status(400), 0, 1, 0, 0.0), NextStep::DeadLetter);
    }

    #[test]
    fn signature_is_the_hex_hmac_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            webhook_signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    proptest! {
        #[test]
        fn backoff_stays_within_half_and_full(attempts in 1u32..100, jitter in 0.0f64..1.0) {
            let retry = RetrySettings::default();
            let full = retry.initial_backoff_ms.saturating_mul(1u64 << (attempts - 1).min(40)).min(retry.max_backoff_ms);
            let delay = retry.backoff_ms(attempts, jitter);
            prop_assert!(delay >= full / 2 && delay <= full);
        }
    }
}
