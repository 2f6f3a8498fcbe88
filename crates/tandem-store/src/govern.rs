//! Governance storage: each source's tracking plan and the violations its
//! events were found with. Violations arrive with the events that broke the
//! plan ([`crate::IngestBatch::violations`]) and are counted in the same
//! transaction as the log append, grouped by source, kind, event and path,
//! keeping the latest message and a sample payload.

use serde::Serialize;
use tandem_core::govern::plan::TrackingPlan;
use tandem_core::SourceId;

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

/// Tracking plans and their violations.
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
}

pub(crate) fn plan_to_text(plan: &TrackingPlan) -> String {
    serde_json::to_string(plan).expect("a plan always serializes")
}

pub(crate) fn plan_from_text(text: &str) -> Result<TrackingPlan, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Backend(Box::new(error)))
}
