//! Identifiers and the rules that decide which of them may link events into
//! one customer, as Segment Unify documents them: a limit per identifier type,
//! a priority order that decides which identifier to drop when a link would
//! break a limit, and blocked values that never match.

use crate::event::Event;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

pub const USER_ID: &str = "user_id";
pub const ANONYMOUS_ID: &str = "anonymous_id";
pub const EMAIL: &str = "email";
pub const PHONE: &str = "phone";
pub const DEVICE_ID: &str = "device_id";
pub const ADVERTISING_ID: &str = "advertising_id";

/// One identifier: a type (`email`) and a normalized value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

impl Identifier {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Identifier { kind: kind.into(), value: value.into() }
    }

    /// The identifier with its value normalized for its type (e-mail trimmed
    /// and lower-cased, phone in E.164 where it can be read as such).
    pub fn normalized(kind: &str, value: &str) -> Option<Identifier> {
        let value = match kind {
            EMAIL => normalize_email(value)?,
            PHONE => normalize_phone(value)?,
            _ => value.trim().to_owned(),
        };
        (!value.is_empty()).then(|| Identifier::new(kind, value))
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// The text is not `type:value`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("identifier must be type:value, such as email:ann@example.com, got {0:?}")]
pub struct MalformedIdentifier(pub String);

impl FromStr for Identifier {
    type Err = MalformedIdentifier;

    /// Parses `type:value`, normalizing the value for its type.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = || MalformedIdentifier(text.to_owned());
        let (kind, value) = text.split_once(':').ok_or_else(malformed)?;
        let kind = kind.trim().to_ascii_lowercase();
        if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
            return Err(malformed());
        }
        Identifier::normalized(&kind, value).ok_or_else(malformed)
    }
}

pub fn normalize_email(value: &str) -> Option<String> {
    let email = value.trim().to_lowercase();
    let (local, domain) = email.split_once('@')?;
    (!local.is_empty() && !domain.is_empty()).then_some(email)
}

/// E.164 where the number says its country (`+` or `00` prefix); otherwise
/// the digits alone, so that formatting differences still match.
pub fn normalize_phone(value: &str) -> Option<String> {
    let trimmed = value.trim();
    let digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 5 || digits.len() > 17 {
        return None;
    }
    if trimmed.starts_with('+') {
        Some(format!("+{digits}"))
    } else if let Some(rest) = digits.strip_prefix("00") {
        Some(format!("+{rest}"))
    } else {
        Some(digits)
    }
}

/// The identity rules an admin sets; stored, shown and edited as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityRules {
    /// Most distinct values of a type one profile may hold.
    pub limits: BTreeMap<String, u32>,
    /// The limit of every type not in `limits`.
    pub default_limit: u32,
    /// Types in order of importance; unlisted types come after, by name.
    pub priority: Vec<String>,
    /// Values that never identify anyone (compared case-insensitively).
    pub blocked_values: Vec<String>,
    /// Regular expressions for values that never identify anyone.
    pub blocked_patterns: Vec<String>,
    /// Identifiers blocked one by one (`tandem identity block`, `unlink`).
    pub blocked_identifiers: Vec<Identifier>,
    /// Extra identifier fields, such as `traits.crm_id` or `properties.order_email`;
    /// the type is the last path segment.
    pub custom_identifiers: Vec<String>,
}

impl Default for IdentityRules {
    fn default() -> Self {
        IdentityRules {
            limits: BTreeMap::from([(USER_ID.to_owned(), 1)]),
            default_limit: 5,
            priority: vec![USER_ID.into(), EMAIL.into(), PHONE.into()],
            blocked_values: ["-1", "null", "anonymous", "undefined", "none", "nil"].map(str::to_owned).to_vec(),
            blocked_patterns: vec!["^[0-]*$".into()],
            blocked_identifiers: Vec::new(),
            custom_identifiers: Vec::new(),
        }
    }
}

/// A rule set that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("blocked pattern {pattern:?} is not a valid regular expression: {message}")]
    BadPattern { pattern: String, message: String },
    #[error("limit of {0} must be at least 1")]
    ZeroLimit(String),
    #[error("custom identifier {0:?} must be traits.KEY, properties.KEY or context.traits.KEY")]
    BadCustomIdentifier(String),
}

/// Rules checked and ready to apply.
#[derive(Clone, Debug)]
pub struct CompiledRules {
    pub rules: IdentityRules,
    blocked_values: HashSet<String>,
    blocked_patterns: Vec<Regex>,
    blocked_identifiers: HashSet<Identifier>,
}

impl IdentityRules {
    pub fn compile(self) -> Result<CompiledRules, RulesError> {
        if self.default_limit == 0 {
            return Err(RulesError::ZeroLimit("every other type".into()));
        }
        if let Some((kind, _)) = self.limits.iter().find(|(_, limit)| **limit == 0) {
            return Err(RulesError::ZeroLimit(kind.clone()));
        }
        for path in &self.custom_identifiers {
            if custom_identifier_path(path).is_none() {
                return Err(RulesError::BadCustomIdentifier(path.clone()));
            }
        }
        let blocked_patterns = self
            .blocked_patterns
            .iter()
            .map(|pattern| {
                Regex::new(pattern)
                    .map_err(|error| RulesError::BadPattern { pattern: pattern.clone(), message: error.to_string() })
            })
            .collect::<Result<_, _>>()?;
        Ok(CompiledRules {
            blocked_values: self.blocked_values.iter().map(|value| value.trim().to_lowercase()).collect(),
            blocked_identifiers: self.blocked_identifiers.iter().cloned().collect(),
            blocked_patterns,
            rules: self,
        })
    }
}

/// Splits `traits.crm_id` into where to look and the identifier type.
fn custom_identifier_path(path: &str) -> Option<(Vec<&str>, &str)> {
    let segments: Vec<&str> = path.split('.').collect();
    let valid_root = matches!(segments.as_slice(), ["traits", _] | ["properties", _] | ["context", "traits", _]);
    let kind = *segments.last()?;
    (valid_root && !kind.is_empty()).then(|| (segments[..segments.len() - 1].to_vec(), kind))
}

impl CompiledRules {
    pub fn limit(&self, kind: &str) -> u32 {
        self.rules.limits.get(kind).copied().unwrap_or(self.rules.default_limit)
    }

    /// Lower is more important. Unlisted types rank after the listed ones, by name.
    pub fn rank(&self, kind: &str) -> (usize, String) {
        match self.rules.priority.iter().position(|listed| listed == kind) {
            Some(position) => (position, String::new()),
            None => (self.rules.priority.len(), kind.to_owned()),
        }
    }

    /// Why this identifier may not be used, if it may not.
    pub fn blocked(&self, identifier: &Identifier) -> Option<&'static str> {
        if self.blocked_identifiers.contains(identifier) {
            return Some("blocked identifier");
        }
        if self.blocked_values.contains(&identifier.value.to_lowercase()) {
            return Some("blocked value");
        }
        if self.blocked_patterns.iter().any(|pattern| pattern.is_match(&identifier.value)) {
            return Some("blocked pattern");
        }
        None
    }

    /// Every identifier an event carries, normalized, most important first,
    /// each once; blocked ones are returned apart with the reason.
    pub fn identifiers_of(&self, event: &Event) -> (Vec<Identifier>, Vec<(Identifier, &'static str)>) {
        let mut found: Vec<Identifier> = Vec::new();
        let mut add = |kind: &str, value: Option<&Value>| {
            let text = match value {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Number(number)) => number.to_string(),
                _ => return,
            };
            if let Some(identifier) = Identifier::normalized(kind, &text) {
                found.push(identifier);
            }
        };
        let string = |text: &Option<String>| text.as_ref().map(|text| Value::String(text.clone()));
        add(USER_ID, string(&event.user_id).as_ref());
        add(ANONYMOUS_ID, string(&event.anonymous_id).as_ref());
        if event.event_type == crate::EventType::Alias {
            // The previous id is whatever the user was known by before:
            // usually an anonymous id.
            add(ANONYMOUS_ID, string(&event.previous_id).as_ref());
        }
        let context_traits = event.context.get("traits").and_then(Value::as_object);
        let traits = if event.event_type == crate::EventType::Group { None } else { event.traits.as_ref() };
        for source in [traits, context_traits, event.properties.as_ref()].into_iter().flatten() {
            add(EMAIL, source.get("email"));
            add(PHONE, source.get("phone"));
        }
        if let Some(device) = event.context.get("device").and_then(Value::as_object) {
            add(DEVICE_ID, device.get("id"));
            add(ADVERTISING_ID, device.get("advertisingId"));
        }
        if let Some(Value::Array(external_ids)) = event.context.get("externalIds") {
            for external in external_ids.iter().filter_map(Value::as_object) {
                if let Some(Value::String(kind)) = external.get("type") {
                    add(&kind.trim().to_ascii_lowercase(), external.get("id"));
                }
            }
        }
        for path in &self.rules.custom_identifiers {
            if let Some((parents, kind)) = custom_identifier_path(path) {
                let object: Option<&Map<String, Value>> = match parents.as_slice() {
                    ["traits"] => event.traits.as_ref(),
                    ["properties"] => event.properties.as_ref(),
                    _ => context_traits,
                };
                add(kind, object.and_then(|object| object.get(kind)));
            }
        }
        let mut usable = Vec::with_capacity(found.len());
        let mut blocked = Vec::new();
        for identifier in found {
            if usable.contains(&identifier) || blocked.iter().any(|(seen, _)| seen == &identifier) {
                continue;
            }
            match self.blocked(&identifier) {
                Some(reason) => blocked.push((identifier, reason)),
                None => usable.push(identifier),
            }
        }
        // Stable: within a type, the order the event gave them.
        usable.sort_by_key(|identifier| self.rank(&identifier.kind));
        (usable, blocked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_and_phones_normalize() {
        assert_eq!(normalize_email("  Ann@Example.COM "), Some("ann@example.com".into()));
        assert_eq!(normalize_email("no-at-sign"), None);
        assert_eq!(normalize_phone("+49 (30) 1234-567"), Some("+49301234567".into()));
        assert_eq!(normalize_phone("0049 30 1234567"), Some("+49301234567".into()));
        assert_eq!(normalize_phone("030 1234567"), Some("0301234567".into()));
        assert_eq!(normalize_phone("12"), None);
    }

    #[test]
    fn identifiers_parse_from_type_and_value() {
        assert_eq!("email:Ann@Example.com".parse(), Ok(Identifier::new("email", "ann@example.com")));
        assert_eq!("user_id:42".parse(), Ok(Identifier::new("user_id", "42")));
        assert!("no-colon".parse::<Identifier>().is_err());
        assert!(":value".parse::<Identifier>().is_err());
        assert!("email:".parse::<Identifier>().is_err());
        assert!("bad type:x".parse::<Identifier>().is_err());
    }

    #[test]
    fn default_blocked_values_never_identify() {
        let rules = IdentityRules::default().compile().unwrap();
        for value in ["0", "000-000", "-1", "NULL", "anonymous", "undefined"] {
            assert!(rules.blocked(&Identifier::new(USER_ID, value)).is_some(), "{value}");
        }
        assert!(rules.blocked(&Identifier::new(USER_ID, "u-1001")).is_none());
    }

    #[test]
    fn bad_rules_are_refused() {
        let bad_pattern = IdentityRules { blocked_patterns: vec!["(".into()], ..IdentityRules::default() };
        assert!(matches!(bad_pattern.compile(), Err(RulesError::BadPattern { .. })));
        let zero = IdentityRules { limits: BTreeMap::from([("email".into(), 0)]), ..IdentityRules::default() };
        assert!(matches!(zero.compile(), Err(RulesError::ZeroLimit(_))));
        let custom = IdentityRules { custom_identifiers: vec!["crm_id".into()], ..IdentityRules::default() };
        assert!(matches!(custom.compile(), Err(RulesError::BadCustomIdentifier(_))));
    }

    #[test]
    fn priority_ranks_listed_types_first() {
        let rules = IdentityRules::default().compile().unwrap();
        let mut kinds = vec!["device_id", "email", "anonymous_id", "user_id", "phone"];
        kinds.sort_by_key(|kind| rules.rank(kind));
        assert_eq!(kinds, vec!["user_id", "email", "phone", "anonymous_id", "device_id"]);
    }
}
