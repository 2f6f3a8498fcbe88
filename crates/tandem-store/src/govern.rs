//! Governance storage: each source's tracking plan and the violations its
//! events were found with; data subject requests, suppressed identifiers
//! (by digest only) and erasing a person from every table. Violations arrive with the events that broke the
//! plan ([`crate::IngestBatch::violations`]) and are counted in the same
//! transaction as the log append, grouped by source, kind, event and path,
//! keeping the latest message and a sample payload.

use serde::Serialize;
use std::collections::BTreeMap;
use tandem_core::govern::consent::Consent;
use tandem_core::govern::dsr::{DsrKind, DsrStatus};
use tandem_core::govern::plan::TrackingPlan;
use tandem_core::govern::stack::{ShadowKey, ToolInfo, ToolKind};
use tandem_core::{Identifier, LogPosition, ProfileId, SourceId};

use crate::StoreError;

/// The longest sample payload kept with a violation, in bytes.
pub const MAX_VIOLATION_SAMPLE_BYTES: usize = 4 * 1024;

/// One violation as the collect stage found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanViolationRecord {
    pub source_id: SourceId,
    /// `unplanned_event`, `invalid_event` or `omitted_property`.
    pub kind: String,
    pub event_name: String,
    /// A JSON pointer into the message.
    pub path: String,
    pub message: String,
    /// The message as received (cut to [`MAX_VIOLATION_SAMPLE_BYTES`]).
    pub sample: String,
    pub seen_at_ms: i64,
}

impl PlanViolationRecord {
    /// A violation to count. Text is kept as sent except NUL characters,
    /// which become U+FFFD (PostgreSQL text cannot hold them), and the sample
    /// is cut to [`MAX_VIOLATION_SAMPLE_BYTES`] on a character boundary.
    pub fn new(
        source_id: SourceId,
        kind: &str,
        event_name: &str,
        path: &str,
        message: &str,
        sample: &str,
        seen_at_ms: i64,
    ) -> Self {
        let clean = |text: &str| text.replace('\0', "\u{fffd}");
        let mut end = sample.len().min(MAX_VIOLATION_SAMPLE_BYTES);
        while !sample.is_char_boundary(end) {
            end -= 1;
        }
        PlanViolationRecord {
            source_id,
            kind: kind.to_owned(),
            event_name: clean(event_name),
            path: clean(path),
            message: clean(message),
            sample: clean(&sample[..end]),
            seen_at_ms,
        }
    }
}

/// Violations of one kind at one path of one event, counted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanViolationSummary {
    pub kind: String,
    pub event_name: String,
    pub path: String,
    pub count: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// The latest message.
    pub message: String,
    /// The latest sample payload.
    pub sample: String,
}

/// A source's stored tracking plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredPlan {
    pub source_id: SourceId,
    pub plan: TrackingPlan,
    pub updated_at_ms: i64,
}

/// A data subject request. The person is named only by the digest of the
/// identifier (see `tandem_core::govern::dsr::identifier_digest`), so the
/// request outlives an erasure without undoing it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DsrRecord {
    pub id: String,
    pub kind: DsrKind,
    pub subject_digest: String,
    pub status: DsrStatus,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    /// What was done (counts per table for a delete) or why it failed.
    pub detail: Option<String>,
}

/// A new pending request with a fresh id.
pub fn new_dsr(kind: DsrKind, subject_digest: &str) -> DsrRecord {
    DsrRecord {
        id: format!("dsr_{}", crate::sources::random_token(16)),
        kind,
        subject_digest: subject_digest.to_owned(),
        status: DsrStatus::Pending,
        created_at_ms: chrono::Utc::now().timestamp_millis(),
        finished_at_ms: None,
        detail: None,
    }
}

/// One of a person's events waiting in a destination's outbox or dead letters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PersonDelivery {
    pub destination: String,
    pub position: LogPosition,
    /// `pending`, `retrying` or `dead`.
    pub state: &'static str,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// What an event said about one consent category of its profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConsentChange {
    pub profile: ProfileId,
    pub category: String,
    pub granted: bool,
    /// The event that said it.
    pub position: LogPosition,
    pub at_ms: i64,
}

/// Unknown write keys kept at most; sightings of further keys are dropped.
pub const MAX_SHADOW_KEYS: i64 = 1_000;

pub(crate) fn tool_info_from_text(text: &str) -> Result<ToolInfo, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn samples_to_text(samples: &[String]) -> String {
    serde_json::to_string(samples).expect("strings always serialize")
}

pub(crate) fn samples_from_text(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// Rows an erasure removed, per table.
pub type ErasureReport = BTreeMap<&'static str, u64>;

/// Tracking plans and their violations; data subject requests.
pub trait GovernStore: Send + Sync + 'static {
    /// Sets (or replaces) the plan of a source.
    fn set_plan(&self, source_id: &SourceId, plan: &TrackingPlan) -> Result<StoredPlan, StoreError>;

    /// The plan of a source, if it has one.
    fn plan(&self, source_id: &SourceId) -> Result<Option<StoredPlan>, StoreError>;

    /// Removes the plan of a source (its violations stay); whether it had one.
    fn delete_plan(&self, source_id: &SourceId) -> Result<bool, StoreError>;

    /// Every plan, for the collect stage's cache.
    fn plans(&self) -> Result<Vec<StoredPlan>, StoreError>;

    /// A source's violations, most recently seen first.
    fn plan_violations(&self, source_id: &SourceId, limit: usize) -> Result<Vec<PlanViolationSummary>, StoreError>;

    /// Stores a request made by [`new_dsr`].
    fn insert_dsr(&self, request: &DsrRecord) -> Result<(), StoreError>;

    /// Records how a request ended.
    fn finish_dsr(&self, id: &str, status: DsrStatus, detail: &str, at_ms: i64) -> Result<(), StoreError>;

    /// Requests, newest first.
    fn list_dsr(&self, limit: usize) -> Result<Vec<DsrRecord>, StoreError>;

    /// Adds an identifier digest to the suppressed; whether it was new.
    fn suppress(&self, digest: &str, at_ms: i64) -> Result<bool, StoreError>;

    /// Removes an identifier digest from the suppressed; whether it was there.
    fn unsuppress(&self, digest: &str) -> Result<bool, StoreError>;

    /// Every suppressed identifier digest.
    fn suppressed(&self) -> Result<Vec<String>, StoreError>;

    /// The outbox items and dead letters of these log positions.
    fn deliveries_of(&self, positions: &[LogPosition]) -> Result<Vec<PersonDelivery>, StoreError>;

    /// Records what events said about their profiles' consent: each
    /// category's current value (the one from the highest position wins) and
    /// its history (recording the same change twice keeps one entry).
    fn record_consent(&self, changes: &[ConsentChange]) -> Result<(), StoreError>;

    /// The current consent of each of these profiles that has any.
    fn consent_of(&self, profiles: &[ProfileId]) -> Result<BTreeMap<ProfileId, Consent>, StoreError>;

    /// A profile's consent history, oldest first.
    fn consent_history(&self, profile: ProfileId) -> Result<Vec<ConsentChange>, StoreError>;

    /// Adds to a destination's counts of deliveries withheld per category.
    fn count_withheld(&self, destination: &str, counts: &BTreeMap<String, u64>) -> Result<(), StoreError>;

    /// A destination's deliveries withheld for want of consent, per category.
    fn withheld_counts(&self, destination: &str) -> Result<BTreeMap<String, u64>, StoreError>;

    /// Sets a tool's registry entry (a source by id, a destination by name).
    fn set_tool_info(&self, kind: ToolKind, key: &str, info: &ToolInfo) -> Result<(), StoreError>;

    /// Every registry entry.
    fn tool_infos(&self) -> Result<Vec<(ToolKind, String, ToolInfo)>, StoreError>;

    /// Adds sightings of unknown write keys, merged per key digest; keys
    /// beyond [`MAX_SHADOW_KEYS`] are not added.
    fn record_shadow_traffic(&self, seen: &[ShadowKey]) -> Result<(), StoreError>;

    /// Unknown write keys seen, most recently seen first.
    fn shadow_traffic(&self, limit: usize) -> Result<Vec<ShadowKey>, StoreError>;

    /// Removes the person holding `identifier` from every table, in one
    /// transaction: their profile (and those merged into it), identifiers,
    /// timeline, history, memberships, computed traits and audience states;
    /// their events with their dedup claims; and every event, quarantined
    /// message, outbox item, dead letter and plan-violation sample whose text
    /// holds one of their identifier values. The resolver's epoch moves, so a
    /// running resolver drops what it had cached. A person not found still
    /// has the requested identifier's value scrubbed from the text.
    fn erase_person(&self, identifier: &Identifier) -> Result<ErasureReport, StoreError>;

    /// What [`GovernStore::erase_person`] would look for in text, now: each
    /// of the person's identifier values and profile ids (the requested
    /// identifier's value alone when no profile holds it), as
    /// [`erasure_patterns`] quotes them. For erasing the same person from
    /// copies outside the store (the event stream).
    fn erasure_patterns_of(&self, identifier: &Identifier) -> Result<Vec<String>, StoreError>;
}

/// The texts an erasure looks for in payloads: each identifier value and
/// profile id as a JSON string (quoted), so `"42"` does not match `420`.
/// Payloads match when they hold one, case ignored.
pub fn erasure_patterns(values: &[String]) -> Vec<String> {
    let mut patterns: Vec<String> = values
        .iter()
        .filter(|value| !value.is_empty())
        .map(|value| serde_json::to_string(value).expect("a string always serializes"))
        .collect();
    patterns.sort();
    patterns.dedup();
    patterns
}

/// `text` with LIKE's wildcards escaped by `\`.
pub(crate) fn like_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

pub(crate) fn plan_to_text(plan: &TrackingPlan) -> String {
    serde_json::to_string(plan).expect("a plan always serializes")
}

pub(crate) fn plan_from_text(text: &str) -> Result<TrackingPlan, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Backend(Box::new(error)))
}
