//! Tracking plans: per source, a JSON Schema per track event name, one for
//! identify traits and one common to every message, with a mode saying what
//! happens to an event that breaks the plan. A plan is validated and compiled
//! once ([`TrackingPlan::compile`] → [`CompiledPlan`]) and then checks every
//! event of its source ([`CompiledPlan::check`]) without further parsing.
//!
//! What each schema validates: an event schema validates the track call's
//! `properties` object, the identify schema an identify call's `traits`, and
//! the common schema the whole message as stored (with `context`, `userId`,
//! …). Only track calls can be unplanned: a track call whose name the plan
//! does not list.

use crate::event::{Event, EventType};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// At most this many violations of one event are reported; the rest are
/// counted in the first.
const MAX_VIOLATIONS_PER_EVENT: usize = 8;

/// What a plan does with an event that breaks it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PlanMode {
    /// Nothing is checked: the plan is kept but not applied.
    Allow,
    /// Everything is kept; violations are counted and listed.
    #[default]
    Report,
    /// Track calls the plan does not list go to the quarantine (`unplanned_event`);
    /// schema violations are reported.
    BlockUnplanned,
    /// Events failing a schema go to the quarantine (`plan_violation`);
    /// unplanned track calls are reported.
    BlockInvalid,
    /// Properties (and identify traits) that the event's schema does not name
    /// under `properties` are removed before the event is stored; violations
    /// are reported.
    OmitUnplannedProperties,
}

impl PlanMode {
    /// Every mode, in the order the documentation lists them.
    pub const ALL: [PlanMode; 5] = [
        PlanMode::Allow,
        PlanMode::Report,
        PlanMode::BlockUnplanned,
        PlanMode::BlockInvalid,
        PlanMode::OmitUnplannedProperties,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PlanMode::Allow => "allow",
            PlanMode::Report => "report",
            PlanMode::BlockUnplanned => "block_unplanned",
            PlanMode::BlockInvalid => "block_invalid",
            PlanMode::OmitUnplannedProperties => "omit_unplanned_properties",
        }
    }
}

impl fmt::Display for PlanMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PlanMode {
    type Err = PlanError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        PlanMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == value)
            .ok_or_else(|| PlanError::UnknownMode(value.to_owned()))
    }
}

/// A tracking plan as written by people (the JSON document `tandem plan set`
/// reads and `/api/v1/plans/{source}` takes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(example = json!({
        "mode": "block_invalid",
        "events": {"Order Completed": {"type": "object", "required": ["total"],
                                       "properties": {"total": {"type": "number"}}}},
        "identify": {"type": "object", "properties": {"email": {"type": "string"}}}
    }))
)]
pub struct TrackingPlan {
    #[serde(default)]
    pub mode: PlanMode,
    /// Track event name → JSON Schema of its `properties`.
    #[serde(default)]
    pub events: BTreeMap<String, Value>,
    /// JSON Schema of identify calls' `traits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identify: Option<Value>,
    /// JSON Schema every message must pass, applied to the whole message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub common: Option<Value>,
}

/// A plan that cannot be used; the field names where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("plan is not valid json: {0}")]
    InvalidJson(String),
    #[error("unknown plan mode {0:?}, use allow, report, block_unplanned, block_invalid or omit_unplanned_properties")]
    UnknownMode(String),
    #[error("{field} is not a valid json schema: {message}")]
    InvalidSchema { field: String, message: String },
}

impl PlanError {
    /// The plan field at fault, for an error body.
    pub fn field(&self) -> Option<&str> {
        match self {
            PlanError::InvalidJson(_) => None,
            PlanError::UnknownMode(_) => Some("mode"),
            PlanError::InvalidSchema { field, .. } => Some(field),
        }
    }
}

impl TrackingPlan {
    /// Reads a plan document.
    pub fn from_json(text: &str) -> Result<TrackingPlan, PlanError> {
        serde_json::from_str(text).map_err(|error| PlanError::InvalidJson(error.to_string()))
    }

    /// Validates every schema and compiles the plan for checking events.
    pub fn compile(&self) -> Result<CompiledPlan, PlanError> {
        let build = |field: String, schema: &Value| -> Result<CompiledSchema, PlanError> {
            let validator = jsonschema::validator_for(schema)
                .map_err(|error| PlanError::InvalidSchema { field: field.clone(), message: error.to_string() })?;
            let named = schema.get("properties").and_then(Value::as_object).map(|properties| {
                let mut names: Vec<String> = properties.keys().cloned().collect();
                names.sort();
                names
            });
            Ok(CompiledSchema { validator, named_properties: named })
        };
        let mut events = BTreeMap::new();
        for (name, schema) in &self.events {
            events.insert(name.clone(), build(format!("events.{name}"), schema)?);
        }
        let identify = self.identify.as_ref().map(|schema| build("identify".into(), schema)).transpose()?;
        let common = self.common.as_ref().map(|schema| build("common".into(), schema)).transpose()?;
        Ok(CompiledPlan { mode: self.mode, events, identify, common })
    }
}

struct CompiledSchema {
    validator: jsonschema::Validator,
    /// The names under the schema's top-level `properties`, sorted; `None`
    /// when it names none (then nothing is omitted).
    named_properties: Option<Vec<String>>,
}

/// A plan ready to check events.
pub struct CompiledPlan {
    mode: PlanMode,
    events: BTreeMap<String, CompiledSchema>,
    identify: Option<CompiledSchema>,
    common: Option<CompiledSchema>,
}

impl fmt::Debug for CompiledPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledPlan")
            .field("mode", &self.mode)
            .field("events", &self.events.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What kind of rule an event broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// A track call whose name the plan does not list.
    UnplannedEvent,
    /// A schema refused the event.
    InvalidEvent,
    /// Properties or traits removed in `omit_unplanned_properties` mode.
    OmittedProperty,
}

impl ViolationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationKind::UnplannedEvent => "unplanned_event",
            ViolationKind::InvalidEvent => "invalid_event",
            ViolationKind::OmittedProperty => "omitted_property",
        }
    }
}

/// One way an event broke its plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub kind: ViolationKind,
    /// The event's name (track), or its type for other calls.
    pub event_name: String,
    /// Where in the message: a JSON pointer into it (`/properties/total`).
    pub path: String,
    pub message: String,
}

/// What a plan decided about one event.
#[derive(Debug, PartialEq)]
pub enum PlanVerdict {
    /// The event is kept as it is (possibly with violations to report).
    Keep(Vec<Violation>),
    /// The event is kept with properties removed; the violations say which.
    Trimmed(Vec<Violation>),
    /// The event goes to the quarantine; the first violation is the reason.
    Block(Vec<Violation>),
}

impl PlanVerdict {
    /// The violations to count, whatever became of the event.
    pub fn violations(&self) -> &[Violation] {
        match self {
            PlanVerdict::Keep(violations) | PlanVerdict::Trimmed(violations) | PlanVerdict::Block(violations) => {
                violations
            }
        }
    }
}

impl CompiledPlan {
    pub fn mode(&self) -> PlanMode {
        self.mode
    }

    /// Checks one event, removing unplanned properties in that mode.
    pub fn check(&self, event: &mut Event) -> PlanVerdict {
        if self.mode == PlanMode::Allow {
            return PlanVerdict::Keep(Vec::new());
        }
        let event_name = match (event.event_type, &event.event) {
            (EventType::Track, Some(name)) => name.clone(),
            (event_type, _) => event_type.as_str().to_owned(),
        };
        let mut violations = Vec::new();
        let mut unplanned = false;
        let mut trimmed = false;
        let schema = match event.event_type {
            EventType::Track => {
                let schema = self.events.get(&event_name);
                if schema.is_none() {
                    unplanned = true;
                    violations.push(Violation {
                        kind: ViolationKind::UnplannedEvent,
                        event_name: event_name.clone(),
                        path: "/event".into(),
                        message: format!("event {event_name:?} is not in the tracking plan"),
                    });
                }
                schema.map(|schema| (schema, "properties"))
            }
            EventType::Identify => self.identify.as_ref().map(|schema| (schema, "traits")),
            _ => None,
        };
        let mut invalid = false;
        if let Some((schema, field)) = schema {
            let object = match field {
                "properties" => &mut event.properties,
                _ => &mut event.traits,
            };
            let instance = Value::Object(object.clone().unwrap_or_default());
            invalid |= collect_errors(&schema.validator, &instance, &format!("/{field}"), &event_name, &mut violations);
            if self.mode == PlanMode::OmitUnplannedProperties {
                if let (Some(named), Some(map)) = (&schema.named_properties, object.as_mut()) {
                    trimmed |= omit_unnamed(map, named, field, &event_name, &mut violations);
                }
            }
        }
        if let Some(common) = &self.common {
            let instance = serde_json::to_value(&*event).unwrap_or(Value::Null);
            invalid |= collect_errors(&common.validator, &instance, "", &event_name, &mut violations);
        }
        let blocked = match self.mode {
            PlanMode::BlockUnplanned => unplanned,
            PlanMode::BlockInvalid => invalid,
            _ => false,
        };
        if blocked {
            // The reason comes first: what the mode blocks on.
            let reason = if self.mode == PlanMode::BlockUnplanned {
                ViolationKind::UnplannedEvent
            } else {
                ViolationKind::InvalidEvent
            };
            violations.sort_by_key(|violation| violation.kind != reason);
            PlanVerdict::Block(violations)
        } else if trimmed {
            PlanVerdict::Trimmed(violations)
        } else {
            PlanVerdict::Keep(violations)
        }
    }
}

fn collect_errors(
    validator: &jsonschema::Validator,
    instance: &Value,
    prefix: &str,
    event_name: &str,
    violations: &mut Vec<Violation>,
) -> bool {
    if validator.is_valid(instance) {
        return false;
    }
    for error in validator.iter_errors(instance).take(MAX_VIOLATIONS_PER_EVENT) {
        violations.push(Violation {
            kind: ViolationKind::InvalidEvent,
            event_name: event_name.to_owned(),
            path: format!("{prefix}{}", error.instance_path()),
            message: error.to_string(),
        });
    }
    true
}

fn omit_unnamed(
    map: &mut Map<String, Value>,
    named: &[String],
    field: &str,
    event_name: &str,
    violations: &mut Vec<Violation>,
) -> bool {
    let unnamed: Vec<String> =
        map.keys().filter(|key| named.binary_search_by(|name| name.as_str().cmp(key)).is_err()).cloned().collect();
    for key in &unnamed {
        map.remove(key);
        violations.push(Violation {
            kind: ViolationKind::OmittedProperty,
            event_name: event_name.to_owned(),
            path: format!("/{field}/{}", escape_pointer(key)),
            message: format!("{key:?} is not in the plan and was removed"),
        });
    }
    !unnamed.is_empty()
}

/// Escapes one JSON pointer segment (RFC 6901).
fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SourceId;
    use serde_json::json;

    fn track(name: &str, properties: Value) -> Event {
        serde_json::from_value(json!({
            "messageId": "m1", "type": "track", "userId": "u1", "event": name,
            "properties": properties, "timestamp": "2026-01-01T00:00:00.000Z",
            "receivedAt": "2026-01-01T00:00:00.000Z", "sourceId": SourceId::new("src_1"),
        }))
        .unwrap()
    }

    fn plan(mode: PlanMode) -> CompiledPlan {
        TrackingPlan::from_json(
            &json!({
                "mode": mode,
                "events": {"Order Completed": {
                    "type": "object",
                    "properties": {"total": {"type": "number"}, "currency": {"type": "string"}},
                    "required": ["total"]
                }},
                "identify": {"type": "object", "properties": {"email": {"type": "string", "format": "email"}}},
                "common": {"type": "object", "required": ["userId"]}
            })
            .to_string(),
        )
        .unwrap()
        .compile()
        .unwrap()
    }

    #[test]
    fn a_valid_planned_event_is_kept_without_violations() {
        let mut event = track("Order Completed", json!({"total": 10, "currency": "EUR"}));
        assert_eq!(plan(PlanMode::BlockInvalid).check(&mut event), PlanVerdict::Keep(vec![]));
    }

    #[test]
    fn modes_decide_what_happens_to_unplanned_and_invalid_events() {
        let unplanned = || track("Signed Up", json!({}));
        let invalid = || track("Order Completed", json!({"total": "ten"}));
        assert!(matches!(plan(PlanMode::Report).check(&mut unplanned()), PlanVerdict::Keep(v) if v.len() == 1));
        assert!(matches!(plan(PlanMode::Report).check(&mut invalid()), PlanVerdict::Keep(v) if v.len() == 1));
        assert!(matches!(plan(PlanMode::BlockUnplanned).check(&mut unplanned()), PlanVerdict::Block(_)));
        assert!(matches!(plan(PlanMode::BlockUnplanned).check(&mut invalid()), PlanVerdict::Keep(_)));
        assert!(matches!(plan(PlanMode::BlockInvalid).check(&mut invalid()), PlanVerdict::Block(_)));
        assert!(matches!(plan(PlanMode::BlockInvalid).check(&mut unplanned()), PlanVerdict::Keep(_)));
        assert_eq!(plan(PlanMode::Allow).check(&mut invalid()), PlanVerdict::Keep(vec![]));
    }

    #[test]
    fn a_violation_names_the_path_at_fault() {
        let verdict = plan(PlanMode::BlockInvalid).check(&mut track("Order Completed", json!({"total": "ten"})));
        let PlanVerdict::Block(violations) = verdict else { panic!("blocked expected") };
        assert_eq!(violations[0].kind, ViolationKind::InvalidEvent);
        assert_eq!(violations[0].path, "/properties/total");
        assert_eq!(violations[0].event_name, "Order Completed");
        assert!(violations[0].message.contains("number"), "{}", violations[0].message);
    }

    #[test]
    fn the_common_schema_applies_to_the_whole_message() {
        let mut event = track("Order Completed", json!({"total": 1}));
        event.user_id = None;
        event.anonymous_id = Some("a1".into());
        let PlanVerdict::Block(violations) = plan(PlanMode::BlockInvalid).check(&mut event) else {
            panic!("blocked expected")
        };
        assert_eq!(violations[0].path, "");
        assert!(violations[0].message.contains("userId"));
    }

    #[test]
    fn unplanned_properties_are_omitted_in_that_mode() {
        let mut event = track("Order Completed", json!({"total": 3, "coupon": "X", "a/b": 1}));
        let verdict = plan(PlanMode::OmitUnplannedProperties).check(&mut event);
        let PlanVerdict::Trimmed(violations) = verdict else { panic!("trimmed expected") };
        let paths: Vec<&str> = violations.iter().map(|violation| violation.path.as_str()).collect();
        assert_eq!(paths, vec!["/properties/a~1b", "/properties/coupon"]);
        assert_eq!(event.properties.unwrap(), json!({"total": 3}).as_object().unwrap().clone());
    }

    #[test]
    fn identify_traits_are_checked_against_the_identify_schema() {
        let mut event = track("x", json!({}));
        event.event_type = EventType::Identify;
        event.event = None;
        event.properties = None;
        event.traits = Some(json!({"email": 5}).as_object().unwrap().clone());
        let PlanVerdict::Keep(violations) = plan(PlanMode::Report).check(&mut event) else { panic!() };
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].path, "/traits/email");
        assert_eq!(violations[0].event_name, "identify");
    }

    #[test]
    fn bad_plans_are_refused_with_the_field_at_fault() {
        let error = TrackingPlan::from_json(r#"{"mode":"block_everything"}"#).unwrap_err();
        assert!(matches!(error, PlanError::InvalidJson(_)));
        let plan = TrackingPlan::from_json(r#"{"events":{"Bad":{"type":"nonsense"}}}"#).unwrap();
        let error = plan.compile().unwrap_err();
        assert_eq!(error.field(), Some("events.Bad"));
        assert!(TrackingPlan::from_json(r#"{"events":{},"extra":1}"#).is_err());
        assert_eq!("block_invalid".parse::<PlanMode>().unwrap(), PlanMode::BlockInvalid);
        assert!("nope".parse::<PlanMode>().is_err());
    }
}
