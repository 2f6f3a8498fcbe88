//! PII classes. Every trait and property key is red (must never be stored in
//! clear: national ids, card numbers, passwords), yellow (personal and
//! masked for roles without PII access: e-mail, phone, IP, name, address) or
//! green (anything else), by matchers on the key — the defaults below, then
//! the ones configured, by exact name or regular expression, the configured
//! ones winning. A string value that passes the Luhn check as a card number
//! is red wherever it appears. A red value is handled at ingestion by its
//! [`RedPolicy`]: replaced by a salted SHA-256 ([`PiiPolicy::scrub_payload`])
//! or, where a rule (or the default) says `refuse`, the whole event is
//! refused ([`PiiPolicy::refused_red_field`]) — either way it is never
//! stored in clear. Yellow values are masked in what roles without PII
//! access see ([`PiiPolicy::mask_json`]). Settings are validated and
//! compiled once ([`PiiSettings::compile`]) before any event is seen; rules
//! kept in storage (set by users at run time) are layered in front of the
//! configured ones ([`PiiSettings::layered`]).

use crate::event::Event;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The sections of a stored message where PII is looked for: `traits`,
/// `properties` and `context.traits`, each kept when it is an object.
struct PiiSections {
    traits: Option<Value>,
    properties: Option<Value>,
    context_traits: Option<Value>,
}

impl PiiSections {
    /// The sections of `payload`, read without building the rest of it, or
    /// `None` when it does not read so (not an object, a section given
    /// twice, a `context` that is not an object): then it is read whole.
    fn read(payload: &str) -> Option<PiiSections> {
        // A derived struct also reads an array of three as its fields.
        if !payload.trim_start().starts_with('{') {
            return None;
        }
        #[derive(Deserialize)]
        struct Message<'a> {
            traits: Option<Value>,
            properties: Option<Value>,
            #[serde(borrow)]
            context: Option<&'a serde_json::value::RawValue>,
        }
        #[derive(Deserialize)]
        struct Context {
            traits: Option<Value>,
        }
        let message: Message = serde_json::from_str(payload).ok()?;
        let context_traits = match message.context.map(|raw| raw.get()) {
            Some(raw) if raw.starts_with('{') => serde_json::from_str::<Context>(raw).ok()?.traits,
            Some("null") | None => None,
            Some(_) => return None,
        };
        Some(PiiSections { traits: message.traits, properties: message.properties, context_traits })
    }

    /// Each section that is an object, with its path.
    fn maps(&mut self) -> impl Iterator<Item = (&'static str, &mut Map<String, Value>)> {
        [
            ("traits", &mut self.traits),
            ("properties", &mut self.properties),
            ("context.traits", &mut self.context_traits),
        ]
        .into_iter()
        .filter_map(|(path, section)| match section {
            Some(Value::Object(map)) => Some((path, map)),
            _ => None,
        })
    }
}

/// A key's class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PiiClass {
    Green,
    Yellow,
    Red,
}

impl PiiClass {
    pub fn as_str(self) -> &'static str {
        match self {
            PiiClass::Green => "green",
            PiiClass::Yellow => "yellow",
            PiiClass::Red => "red",
        }
    }
}

impl std::str::FromStr for PiiClass {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "green" => Ok(PiiClass::Green),
            "yellow" => Ok(PiiClass::Yellow),
            "red" => Ok(PiiClass::Red),
            other => Err(format!("{other:?} is not a pii class (red, yellow, green)")),
        }
    }
}

/// What ingestion does with a red value: replace it by its salted hash
/// (the event is kept, and equal values still match), or refuse the whole
/// event, which goes to the quarantine with the red values hashed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RedPolicy {
    #[default]
    Hash,
    Refuse,
}

impl RedPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RedPolicy::Hash => "hash",
            RedPolicy::Refuse => "refuse",
        }
    }
}

impl std::str::FromStr for RedPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "hash" => Ok(RedPolicy::Hash),
            "refuse" => Ok(RedPolicy::Refuse),
            other => Err(format!("{other:?} is not a red-value policy (hash, refuse)")),
        }
    }
}

/// One matcher: an exact key (any case) or a regular expression, the class
/// it gives, and for a red class what ingestion does with the value (the
/// settings' `red_policy` when absent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(example = json!({"name": "tax_id", "class": "red", "policy": "refuse"}))
)]
pub struct PiiRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    pub class: PiiClass,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<RedPolicy>,
}

/// What a rule matches: the key that identifies it among the stored rules
/// (setting a rule with the same matcher replaces it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PiiMatcher {
    /// An exact key, kept trimmed and in lower case (keys compare without case).
    Name(String),
    /// A regular expression, kept as written.
    Pattern(String),
}

impl PiiMatcher {
    /// `name` or `pattern`.
    pub fn kind(&self) -> &'static str {
        match self {
            PiiMatcher::Name(_) => "name",
            PiiMatcher::Pattern(_) => "pattern",
        }
    }

    /// The key or the expression.
    pub fn text(&self) -> &str {
        match self {
            PiiMatcher::Name(text) | PiiMatcher::Pattern(text) => text,
        }
    }

    /// The matcher from one of a name and a pattern, normalized and checked.
    pub fn from_parts(name: Option<&str>, pattern: Option<&str>) -> Result<PiiMatcher, PiiSettingsError> {
        match (name, pattern) {
            (Some(name), None) => {
                let name = name.trim().to_ascii_lowercase();
                if name.is_empty() {
                    return Err(PiiSettingsError::EmptyMatcher);
                }
                Ok(PiiMatcher::Name(name))
            }
            (None, Some(pattern)) => {
                if pattern.is_empty() {
                    return Err(PiiSettingsError::EmptyMatcher);
                }
                Regex::new(pattern).map_err(|error| PiiSettingsError::BadPattern {
                    pattern: pattern.to_owned(),
                    reason: error.to_string(),
                })?;
                Ok(PiiMatcher::Pattern(pattern.to_owned()))
            }
            _ => Err(PiiSettingsError::NameOrPattern),
        }
    }
}

impl PiiRule {
    /// The rule checked and normalized as it is stored: exactly one of name
    /// (trimmed, lower case) and pattern (a valid regular expression), and a
    /// policy only on a red rule.
    pub fn validated(&self) -> Result<PiiRule, PiiSettingsError> {
        let matcher = self.matcher()?;
        if self.policy.is_some() && self.class != PiiClass::Red {
            return Err(PiiSettingsError::PolicyNeedsRed);
        }
        let (name, pattern) = match matcher {
            PiiMatcher::Name(name) => (Some(name), None),
            PiiMatcher::Pattern(pattern) => (None, Some(pattern)),
        };
        Ok(PiiRule { name, pattern, class: self.class, policy: self.policy })
    }

    /// What the rule matches.
    pub fn matcher(&self) -> Result<PiiMatcher, PiiSettingsError> {
        PiiMatcher::from_parts(self.name.as_deref(), self.pattern.as_deref())
    }
}

/// PII settings as configured (`[pii]` in `tandem.toml`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PiiSettings {
    #[serde(default)]
    pub rules: Vec<PiiRule>,
    /// Mixed into every hash of a red value; keep it secret and stable.
    #[serde(default)]
    pub salt: String,
    /// What happens to a red value no rule gives a policy to: the default
    /// classes' (`ssn`, …), card numbers found by value, and red rules
    /// without `policy`.
    #[serde(default)]
    pub red_policy: RedPolicy,
}

/// Settings that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PiiSettingsError {
    #[error("a pii rule needs exactly one of name and pattern")]
    NameOrPattern,
    #[error("a pii rule's name or pattern must not be empty")]
    EmptyMatcher,
    #[error("pii rule pattern {pattern:?} is not a regular expression: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("a pii rule's policy (hash or refuse) applies only to class red")]
    PolicyNeedsRed,
}

/// Keys yellow by default (compared in lower case).
const DEFAULT_YELLOW: &[&str] = &[
    "email",
    "phone",
    "ip",
    "name",
    "first_name",
    "last_name",
    "firstname",
    "lastname",
    "address",
    "street",
    "city",
    "postal_code",
    "postalcode",
    "zip",
];

/// Keys red by default.
const DEFAULT_RED: &[&str] = &["ssn", "national_id", "passport", "card_number", "credit_card", "password"];

/// The built-in classes, for listing: (key, class), red ones first.
pub fn default_classes() -> impl Iterator<Item = (&'static str, PiiClass)> {
    DEFAULT_RED.iter().map(|key| (*key, PiiClass::Red)).chain(DEFAULT_YELLOW.iter().map(|key| (*key, PiiClass::Yellow)))
}

enum KeyMatch {
    Exact(String),
    Pattern(Regex),
}

/// One compiled rule: what it matches, the class it gives, and for a red
/// class the policy it sets (`None`: the settings' default).
struct CompiledRule {
    matcher: KeyMatch,
    class: PiiClass,
    policy: Option<RedPolicy>,
}

/// Compiled settings: classifies keys and values, hashes and masks. The
/// default has only the built-in classes, no salt, and hashes red values.
#[derive(Default)]
pub struct PiiPolicy {
    rules: Vec<CompiledRule>,
    salt: String,
    red_policy: RedPolicy,
    /// Whether any red value is refused rather than hashed; when not, the
    /// refusal check costs nothing per event.
    refuses_any: bool,
}

impl PiiSettings {
    /// Validates the settings and compiles their patterns.
    pub fn compile(&self) -> Result<PiiPolicy, PiiSettingsError> {
        let mut rules = Vec::with_capacity(self.rules.len());
        for rule in &self.rules {
            let rule = rule.validated()?;
            let matcher = match rule.matcher()? {
                PiiMatcher::Name(name) => KeyMatch::Exact(name),
                PiiMatcher::Pattern(pattern) => KeyMatch::Pattern(Regex::new(&pattern).map_err(|error| {
                    PiiSettingsError::BadPattern { pattern: pattern.clone(), reason: error.to_string() }
                })?),
            };
            rules.push(CompiledRule { matcher, class: rule.class, policy: rule.policy });
        }
        let refuses_any = self.red_policy == RedPolicy::Refuse
            || rules.iter().any(|rule| rule.class == PiiClass::Red && rule.policy == Some(RedPolicy::Refuse));
        Ok(PiiPolicy { rules, salt: self.salt.clone(), red_policy: self.red_policy, refuses_any })
    }

    /// These settings with `stored` rules (set by users at run time) in
    /// front of the configured ones: the first rule matching a key decides.
    pub fn layered(&self, stored: &[PiiRule]) -> PiiSettings {
        let mut rules = stored.to_vec();
        rules.extend(self.rules.iter().cloned());
        PiiSettings { rules, salt: self.salt.clone(), red_policy: self.red_policy }
    }
}

/// Where a red value was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} holds a red (never stored) value")]
pub struct RedValue {
    /// The dotted path, such as `traits.ssn`.
    pub path: String,
}

impl PiiPolicy {
    /// The first rule matching `key`, if any.
    fn rule_for(&self, key: &str) -> Option<&CompiledRule> {
        let lower = key.trim().to_ascii_lowercase();
        self.rules.iter().find(|rule| match &rule.matcher {
            KeyMatch::Exact(name) => *name == lower,
            KeyMatch::Pattern(regex) => regex.is_match(key),
        })
    }

    /// A key's class: the rules first, then the defaults.
    pub fn classify_key(&self, key: &str) -> PiiClass {
        if let Some(rule) = self.rule_for(key) {
            return rule.class;
        }
        let lower = key.trim().to_ascii_lowercase();
        if DEFAULT_RED.contains(&lower.as_str()) {
            PiiClass::Red
        } else if DEFAULT_YELLOW.contains(&lower.as_str()) {
            PiiClass::Yellow
        } else {
            PiiClass::Green
        }
    }

    /// What ingestion does with `value` under `key`: `None` when it is not
    /// red; the policy of the rule that made the key red, else the default.
    pub fn red_policy_for(&self, key: &str, value: &Value) -> Option<RedPolicy> {
        if self.classify(key, value) != PiiClass::Red {
            return None;
        }
        match self.rule_for(key) {
            Some(rule) if rule.class == PiiClass::Red => Some(rule.policy.unwrap_or(self.red_policy)),
            _ => Some(self.red_policy),
        }
    }

    /// Whether any red value is refused rather than hashed.
    pub fn refuses_any(&self) -> bool {
        self.refuses_any
    }

    /// The path (`traits.ssn`) of the first red value in an event's
    /// `traits`, `properties` or `context.traits` (at any depth, as hashing
    /// looks) whose policy is to refuse the event; `None` when it may be
    /// stored (its red values hashed).
    pub fn refused_red_field(&self, event: &Event) -> Option<String> {
        if !self.refuses_any {
            return None;
        }
        let context_traits = match event.context.get("traits") {
            Some(Value::Object(traits)) => Some(traits),
            _ => None,
        };
        [
            ("traits", event.traits.as_ref()),
            ("properties", event.properties.as_ref()),
            ("context.traits", context_traits),
        ]
        .into_iter()
        .find_map(|(path, map)| self.refused_in(map?, path))
    }

    fn refused_in(&self, map: &Map<String, Value>, path: &str) -> Option<String> {
        for (key, value) in map {
            let here = format!("{path}.{key}");
            let refused = match value {
                Value::Object(inner) => {
                    if let Some(found) = self.refused_in(inner, &here) {
                        return Some(found);
                    }
                    false
                }
                Value::Null => false,
                Value::Array(items) => items
                    .iter()
                    .any(|item| !item.is_object() && self.red_policy_for(key, item) == Some(RedPolicy::Refuse)),
                other => self.red_policy_for(key, other) == Some(RedPolicy::Refuse),
            };
            if refused {
                return Some(here);
            }
        }
        None
    }

    /// A value under `key`: red when the key is, or when it is a string that
    /// holds a card number; otherwise the key's class.
    pub fn classify(&self, key: &str, value: &Value) -> PiiClass {
        let class = self.classify_key(key);
        match value {
            Value::String(text) if class != PiiClass::Red && holds_card_number(text) => PiiClass::Red,
            _ => class,
        }
    }

    /// A red value's replacement: `sha256:` and the hex of SHA-256(salt || value).
    pub fn hash(&self, value: &Value) -> Value {
        let text = match value {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let mut hasher = Sha256::new();
        hasher.update(self.salt.as_bytes());
        hasher.update(text.as_bytes());
        let digest: String = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
        Value::String(format!("sha256:{digest}"))
    }

    /// Replaces every red value in a message's `traits`, `properties` and
    /// `context.traits` (at any depth) by its hash; the paths replaced.
    pub fn hash_red_values(&self, message: &mut Map<String, Value>) -> Vec<String> {
        let mut replaced = Vec::new();
        for (section, inner) in message.iter_mut() {
            match (section.as_str(), inner) {
                ("traits" | "properties", Value::Object(map)) => self.hash_in(map, section, &mut replaced),
                ("context", Value::Object(context)) => {
                    if let Some(Value::Object(traits)) = context.get_mut("traits") {
                        self.hash_in(traits, "context.traits", &mut replaced);
                    }
                }
                _ => {}
            }
        }
        replaced
    }

    fn visit_keys(&self, map: &Map<String, Value>, seen: &mut dyn FnMut(&str, PiiClass)) {
        for (key, value) in map {
            match value {
                Value::Object(inner) => self.visit_keys(inner, seen),
                Value::Array(items) => {
                    let class =
                        items.iter().map(|item| self.classify(key, item)).max().unwrap_or(self.classify_key(key));
                    seen(key, class);
                }
                other => seen(key, self.classify(key, other)),
            }
        }
    }

    fn hash_in(&self, map: &mut Map<String, Value>, path: &str, replaced: &mut Vec<String>) {
        for (key, value) in map.iter_mut() {
            match value {
                Value::Object(inner) => self.hash_in(inner, &format!("{path}.{key}"), replaced),
                Value::Null => {}
                Value::Array(items) => {
                    for item in items.iter_mut() {
                        if self.classify(key, item) == PiiClass::Red && !item.is_object() {
                            *item = self.hash(item);
                            replaced.push(format!("{path}.{key}"));
                        }
                    }
                }
                other => {
                    if self.classify(key, other) == PiiClass::Red {
                        *other = self.hash(other);
                        replaced.push(format!("{path}.{key}"));
                    }
                }
            }
        }
    }

    /// A stored message's JSON with its red values hashed, or `None` when it
    /// holds none. Text that is not a JSON object (an unreadable message kept
    /// in quarantine) is withheld whole when it holds a card number.
    pub fn scrub_payload(&self, payload: &str) -> Option<String> {
        self.inspect_payload(payload, &mut |_, _| {})
    }

    /// [`PiiPolicy::scrub_payload`], also telling `seen` every key of the
    /// message's `traits`, `properties` and `context.traits` (at any depth)
    /// with its class, before red values are hashed: what the PII inventory
    /// is built from, at the cost of the one parse scrubbing needs anyway.
    pub fn inspect_payload(&self, payload: &str, seen: &mut dyn FnMut(&str, PiiClass)) -> Option<String> {
        // Most messages hold no red value: reading only the three sections
        // that can hold one (skipping the rest of the message unbuilt) tells,
        // and the message is parsed whole only to be rewritten. Skipping is
        // lenient with what it skips, so text holding a card number is also
        // parsed whole, to be withheld when it is not JSON after all.
        let visited = match PiiSections::read(payload) {
            Some(mut sections) => {
                let mut replaced = Vec::new();
                for (path, map) in sections.maps() {
                    self.visit_keys(map, seen);
                    self.hash_in(map, path, &mut replaced);
                }
                if replaced.is_empty() && !holds_card_number(payload) {
                    return None;
                }
                true
            }
            None => false,
        };
        match serde_json::from_str::<Value>(payload) {
            Ok(Value::Object(mut message)) => {
                if !visited {
                    for (section, inner) in &message {
                        match (section.as_str(), inner) {
                            ("traits" | "properties", Value::Object(map)) => self.visit_keys(map, seen),
                            ("context", Value::Object(context)) => {
                                if let Some(Value::Object(traits)) = context.get("traits") {
                                    self.visit_keys(traits, seen);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                if self.hash_red_values(&mut message).is_empty() {
                    None
                } else {
                    Some(Value::Object(message).to_string())
                }
            }
            _ if holds_card_number(payload) => Some(
                serde_json::json!({"withheld": "the message held a card number", "digest": self.hash(&Value::String(payload.to_owned()))})
                    .to_string(),
            ),
            _ => None,
        }
    }

    /// Text kept beside the log — a quarantined message or delivery, a
    /// plan-violation sample — with every red value hashed wherever it sits
    /// (under any key at any depth, not only in the sections events are
    /// scrubbed in: a webhook delivery or an unmapped row has no such
    /// shape), or `None` when it holds none. Text that is not JSON is
    /// withheld whole when it holds a card number.
    pub fn scrub_anywhere(&self, payload: &str) -> Option<String> {
        match serde_json::from_str::<Value>(payload) {
            Ok(mut value @ (Value::Object(_) | Value::Array(_))) => {
                let mut replaced = false;
                self.hash_everywhere(&mut value, None, &mut replaced);
                replaced.then(|| value.to_string())
            }
            Ok(Value::String(text)) if holds_card_number(&text) => Some(self.hash(&Value::String(text)).to_string()),
            Ok(_) => None,
            Err(_) if holds_card_number(payload) => Some(
                serde_json::json!({"withheld": "the message held a card number", "digest": self.hash(&Value::String(payload.to_owned()))})
                    .to_string(),
            ),
            Err(_) => None,
        }
    }

    fn hash_everywhere(&self, value: &mut Value, key: Option<&str>, replaced: &mut bool) {
        match value {
            Value::Object(map) => {
                for (inner_key, inner) in map.iter_mut() {
                    self.hash_everywhere(inner, Some(inner_key), replaced);
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.hash_everywhere(item, key, replaced);
                }
            }
            Value::Null => {}
            scalar => {
                let red = match key {
                    Some(key) => self.classify(key, scalar) == PiiClass::Red,
                    None => matches!(scalar, Value::String(text) if holds_card_number(text)),
                };
                if red {
                    *scalar = self.hash(scalar);
                    *replaced = true;
                }
            }
        }
    }

    /// `value` with every yellow or red value under a classified key masked
    /// ([`mask`]), at any depth: what a role without PII access sees.
    /// An identifier (`{"type", "value"}`) is masked by its type's class.
    pub fn mask_json(&self, value: &Value) -> Value {
        match value {
            Value::Object(map) if map.len() == 2 && map.contains_key("value") => {
                let kind = map.get("type").and_then(Value::as_str).unwrap_or("");
                let mut shown = map.clone();
                if let Some(inner) = shown.get_mut("value") {
                    if self.classify(kind, inner) != PiiClass::Green && !inner.is_null() {
                        *inner = Value::String(mask(kind, inner));
                    }
                }
                Value::Object(shown)
            }
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, inner)| {
                        let shown = match inner {
                            Value::Object(_) | Value::Array(_) => self.mask_under(key, inner),
                            Value::Null => Value::Null,
                            _ if self.classify(key, inner) != PiiClass::Green => Value::String(mask(key, inner)),
                            _ => inner.clone(),
                        };
                        (key.clone(), shown)
                    })
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(|item| self.mask_json(item)).collect()),
            other => other.clone(),
        }
    }

    fn mask_under(&self, key: &str, value: &Value) -> Value {
        match value {
            Value::Array(items) if self.classify_key(key) != PiiClass::Green => Value::Array(
                items
                    .iter()
                    .map(|item| if item.is_object() { self.mask_json(item) } else { Value::String(mask(key, item)) })
                    .collect(),
            ),
            other => self.mask_json(other),
        }
    }
}

/// A masked value: an e-mail keeps its first letter and domain
/// (`j***@example.com`), a phone number its first two and last two
/// characters (`+1******67`), anything else is `***`.
pub fn mask(key: &str, value: &Value) -> String {
    let Value::String(text) = value else { return "***".to_owned() };
    let key = key.to_ascii_lowercase();
    if let Some((local, domain)) = text.split_once('@') {
        if key.contains("email") || !local.is_empty() {
            let first: String = local.chars().take(1).collect();
            return format!("{first}***@{domain}");
        }
    }
    if key.contains("phone") {
        let chars: Vec<char> = text.chars().collect();
        if chars.len() > 4 {
            let head: String = chars[..2].iter().collect();
            let tail: String = chars[chars.len() - 2..].iter().collect();
            return format!("{head}{}{tail}", "*".repeat(chars.len() - 4));
        }
    }
    "***".to_owned()
}

/// Whether `text` holds a payment card number: 13 to 19 digits (spaces and
/// dashes between them allowed) with a card network's leading digits (2 to 6:
/// Mastercard, American Express, Diners, JCB, Visa, Discover, UnionPay)
/// passing the Luhn check. The leading digits keep numeric ids that happen
/// to pass the check (one in ten does) from being taken for cards half the
/// time.
pub fn holds_card_number(text: &str) -> bool {
    let mut digits: Vec<u32> = Vec::with_capacity(19);
    let flush = |digits: &mut Vec<u32>| -> bool {
        let found = (13..=19).contains(&digits.len()) && (2..=6).contains(&digits[0]) && luhn(digits);
        digits.clear();
        found
    };
    for c in text.chars() {
        match c {
            '0'..='9' => digits.push(c as u32 - '0' as u32),
            ' ' | '-' if !digits.is_empty() => {}
            _ => {
                if flush(&mut digits) {
                    return true;
                }
            }
        }
        if digits.len() > 19 {
            digits.clear();
        }
    }
    flush(&mut digits)
}

fn luhn(digits: &[u32]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(index, digit)| {
            if index % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                *digit
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_classified_by_defaults_and_configured_rules() {
        let policy = PiiPolicy::default();
        assert_eq!(policy.classify_key("Email"), PiiClass::Yellow);
        assert_eq!(policy.classify_key("ssn"), PiiClass::Red);
        assert_eq!(policy.classify_key("plan"), PiiClass::Green);
        let settings = PiiSettings {
            rules: vec![
                PiiRule { name: Some("plan".into()), pattern: None, class: PiiClass::Yellow, policy: None },
                PiiRule { name: None, pattern: Some("^tax_".into()), class: PiiClass::Red, policy: None },
                PiiRule { name: Some("city".into()), pattern: None, class: PiiClass::Green, policy: None },
            ],
            ..Default::default()
        };
        let policy = settings.compile().unwrap();
        assert_eq!(policy.classify_key("plan"), PiiClass::Yellow);
        assert_eq!(policy.classify_key("tax_id"), PiiClass::Red);
        assert_eq!(policy.classify_key("city"), PiiClass::Green, "configured rules win over the defaults");
        let bad = PiiSettings {
            rules: vec![PiiRule { name: None, pattern: Some("(".into()), class: PiiClass::Red, policy: None }],
            ..Default::default()
        };
        assert!(matches!(bad.compile(), Err(PiiSettingsError::BadPattern { .. })));
        let neither = PiiSettings {
            rules: vec![PiiRule { name: None, pattern: None, class: PiiClass::Red, policy: None }],
            ..Default::default()
        };
        assert_eq!(neither.compile().err(), Some(PiiSettingsError::NameOrPattern));
    }

    fn rule(name: &str, class: PiiClass, policy: Option<RedPolicy>) -> PiiRule {
        PiiRule { name: Some(name.into()), pattern: None, class, policy }
    }

    fn event(message: Value) -> Event {
        let mut event: Event = serde_json::from_value(json!({
            "messageId": "m", "type": "identify", "userId": "u", "timestamp": "2026-01-01T00:00:00.000Z",
            "receivedAt": "2026-01-01T00:00:00.000Z", "sourceId": "src_1"
        }))
        .unwrap();
        event.traits = message.get("traits").and_then(Value::as_object).cloned();
        event.properties = message.get("properties").and_then(Value::as_object).cloned();
        if let Some(context) = message.get("context").and_then(Value::as_object) {
            event.context = context.clone();
        }
        event
    }

    #[test]
    fn a_refusing_rule_refuses_events_carrying_its_red_key_and_others_are_hashed() {
        let settings = PiiSettings {
            rules: vec![rule("tax_id", PiiClass::Red, Some(RedPolicy::Refuse)), rule("badge", PiiClass::Red, None)],
            ..Default::default()
        };
        let policy = settings.compile().unwrap();
        let refused = event(json!({"traits": {"profile": {"Tax_ID": "DE123"}, "email": "a@b.c"}}));
        assert_eq!(policy.refused_red_field(&refused).as_deref(), Some("traits.profile.Tax_ID"));
        let listed = event(json!({"context": {"traits": {"tax_id": ["DE1", "DE2"]}}}));
        assert_eq!(policy.refused_red_field(&listed).as_deref(), Some("context.traits.tax_id"));
        let hashed =
            event(json!({"traits": {"ssn": "123", "badge": "B-1"}, "properties": {"memo": "4111111111111111"}}));
        assert_eq!(policy.refused_red_field(&hashed), None, "the default policy hashes");
        assert_eq!(policy.refused_red_field(&event(json!({"traits": {"tax_id": null}}))), None, "null is no value");

        let strict = PiiSettings { red_policy: RedPolicy::Refuse, ..Default::default() }.compile().unwrap();
        let card = event(json!({"properties": {"memo": "paid with 4111 1111 1111 1111"}}));
        assert_eq!(strict.refused_red_field(&card).as_deref(), Some("properties.memo"));
        let lenient = PiiSettings {
            rules: vec![rule("ssn", PiiClass::Red, Some(RedPolicy::Hash))],
            red_policy: RedPolicy::Refuse,
            ..Default::default()
        };
        let lenient = lenient.compile().unwrap();
        assert_eq!(lenient.refused_red_field(&event(json!({"traits": {"ssn": "1"}}))), None, "the rule wins");
        assert_eq!(
            PiiPolicy::default().refused_red_field(&event(json!({"traits": {"ssn": "1"}}))),
            None,
            "the built-in policy never refuses"
        );
    }

    #[test]
    fn rules_are_validated_and_stored_rules_come_before_configured_ones() {
        let yellow_refusing = rule("x", PiiClass::Yellow, Some(RedPolicy::Refuse));
        assert_eq!(yellow_refusing.validated(), Err(PiiSettingsError::PolicyNeedsRed));
        assert_eq!(rule("  ", PiiClass::Red, None).validated(), Err(PiiSettingsError::EmptyMatcher));
        let normalized = rule(" Tax_ID ", PiiClass::Red, None).validated().unwrap();
        assert_eq!(normalized.name.as_deref(), Some("tax_id"));
        assert_eq!(normalized.matcher().unwrap(), PiiMatcher::Name("tax_id".into()));
        let pattern = PiiRule { name: None, pattern: Some("^b_".into()), class: PiiClass::Yellow, policy: None };
        assert_eq!(pattern.matcher().unwrap(), PiiMatcher::Pattern("^b_".into()));

        let configured = PiiSettings { rules: vec![rule("plan", PiiClass::Yellow, None)], ..Default::default() };
        let layered = configured.layered(&[rule("plan", PiiClass::Green, None), rule("ssn", PiiClass::Green, None)]);
        let policy = layered.compile().unwrap();
        assert_eq!(policy.classify_key("plan"), PiiClass::Green, "the stored rule decides first");
        assert_eq!(policy.classify_key("SSN"), PiiClass::Green, "over the defaults too");
        assert_eq!(layered.rules.len(), 3);
        assert!(default_classes().any(|(key, class)| key == "ssn" && class == PiiClass::Red));
        assert_eq!("Refuse".parse::<RedPolicy>(), Ok(RedPolicy::Refuse));
        assert_eq!("YELLOW".parse::<PiiClass>(), Ok(PiiClass::Yellow));
        assert!("blue".parse::<PiiClass>().is_err());
    }

    #[test]
    fn text_kept_beside_the_log_has_red_values_hashed_at_any_depth() {
        let policy =
            PiiSettings { rules: vec![rule("tax_id", PiiClass::Red, None)], ..Default::default() }.compile().unwrap();
        let delivery = json!({
            "entry": [{"changes": [{"value": {"field_data": [{"name": "ssn", "ssn": "123-45-6789"}]}}]}],
            "tax_id": "DE-77",
            "notes": ["call back", "4111 1111 1111 1111"],
            "email": "a@b.c"
        })
        .to_string();
        let scrubbed = policy.scrub_anywhere(&delivery).unwrap();
        for secret in ["123-45-6789", "DE-77", "4111"] {
            assert!(!scrubbed.contains(secret), "{secret} in {scrubbed}");
        }
        assert!(scrubbed.contains("a@b.c") && scrubbed.contains("call back"), "{scrubbed}");
        assert_eq!(policy.scrub_anywhere(r#"{"email":"a@b.c"}"#), None);
        assert_eq!(policy.scrub_anywhere("not json"), None);
        assert!(!policy.scrub_anywhere("cut {\"ssn\": 4111111111111111").unwrap().contains("4111"));
    }

    #[test]
    fn card_numbers_are_found_by_the_luhn_check() {
        assert!(holds_card_number("4111111111111111"));
        assert!(holds_card_number("card 4111-1111-1111-1111 on file"));
        assert!(holds_card_number("5500 0000 0000 0004"));
        assert!(!holds_card_number("4111111111111112"), "fails the check");
        assert!(holds_card_number("378282246310005"), "american express");
        assert!(!holds_card_number("8111111111111112"), "passes the check but no network starts with 8");
        assert!(!holds_card_number("order 12345"));
        assert!(!holds_card_number("2026-12-06T20:00:00Z"));
    }

    #[test]
    fn red_values_are_hashed_with_the_salt_wherever_they_are() {
        let salted = PiiSettings { salt: "pepper".into(), ..Default::default() }.compile().unwrap();
        let mut message = json!({
            "traits": {"ssn": "123-45-6789", "email": "a@b.c", "nested": {"passport": "X1"}},
            "properties": {"note": "paid with 4111 1111 1111 1111", "cards": ["4111111111111111", "no"]},
            "context": {"traits": {"password": "hunter2"}}
        });
        let replaced = salted.hash_red_values(message.as_object_mut().unwrap());
        let text = message.to_string();
        for secret in ["123-45-6789", "X1", "4111", "hunter2"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(message["traits"]["email"], "a@b.c", "yellow values are kept");
        assert_eq!(message["properties"]["cards"][1], "no");
        assert_eq!(replaced.len(), 5, "{replaced:?}");
        let unsalted = PiiPolicy::default();
        assert_ne!(salted.hash(&json!("123-45-6789")), unsalted.hash(&json!("123-45-6789")));
        assert_eq!(salted.hash(&json!("x")), salted.hash(&json!("x")), "equal values still match");
    }

    #[test]
    fn payloads_are_rewritten_only_when_they_hold_red_values() {
        let policy = PiiPolicy::default();
        assert_eq!(policy.scrub_payload(r#"{"traits":{"email":"a@b.c"}}"#), None);
        let scrubbed = policy.scrub_payload(r#"{"properties":{"card_number":"4111111111111111"}}"#).unwrap();
        assert!(scrubbed.contains("sha256:") && !scrubbed.contains("4111"), "{scrubbed}");
        let raw = policy.scrub_payload("not json 4111 1111 1111 1111").unwrap();
        assert!(!raw.contains("4111"), "{raw}");
        assert_eq!(policy.scrub_payload("not json"), None);
    }

    #[test]
    fn inspecting_a_payload_names_every_key_with_its_class() {
        let policy = PiiPolicy::default();
        let mut seen = Vec::new();
        let payload = r#"{"traits":{"email":"a@b.c","address":{"city":"Oslo"}},"properties":{"note":"4111111111111111","plan":"pro"},"context":{"traits":{"ssn":"1"}}}"#;
        let scrubbed = policy.inspect_payload(payload, &mut |key, class| seen.push((key.to_owned(), class)));
        assert!(scrubbed.is_some());
        seen.sort();
        assert_eq!(
            seen,
            [
                ("city".to_owned(), PiiClass::Yellow),
                ("email".to_owned(), PiiClass::Yellow),
                ("note".to_owned(), PiiClass::Red),
                ("plan".to_owned(), PiiClass::Green),
                ("ssn".to_owned(), PiiClass::Red),
            ]
        );
    }

    #[test]
    fn a_message_is_read_whole_only_to_be_rewritten_or_when_its_sections_do_not_read_alone() {
        let policy = PiiPolicy::default();
        let inspect = |payload: &str| {
            let mut seen = Vec::new();
            let scrubbed = policy.inspect_payload(payload, &mut |key, _| seen.push(key.to_owned()));
            (scrubbed, seen)
        };
        // Red only in context.traits: the rest of the message is kept as it was.
        let (scrubbed, seen) =
            inspect(r#"{"event":"x","context":{"ip":"1.2.3.4","traits":{"ssn":"123"}},"properties":{"plan":"pro"}}"#);
        let scrubbed: Value = serde_json::from_str(&scrubbed.unwrap()).unwrap();
        assert!(scrubbed["context"]["traits"]["ssn"].as_str().unwrap().starts_with("sha256:"));
        assert_eq!((&scrubbed["event"], &scrubbed["context"]["ip"]), (&json!("x"), &json!("1.2.3.4")));
        assert_eq!(seen, ["plan", "ssn"], "each key is named once");
        // A context that is not an object, and a section given twice (the
        // last one counts, as when the message is read whole).
        let (scrubbed, _) = inspect(r#"{"context":"web","properties":{"ssn":"123"}}"#);
        assert!(scrubbed.unwrap().contains("sha256:"));
        let (scrubbed, _) = inspect(r#"{"traits":{"plan":"pro"},"traits":{"ssn":"456"}}"#);
        let scrubbed = scrubbed.unwrap();
        assert!(scrubbed.contains("sha256:") && !scrubbed.contains("456"), "{scrubbed}");
        // An array is no message, even one of three values.
        let (scrubbed, seen) = inspect(r#"["4111111111111111",null,null]"#);
        assert!(!scrubbed.unwrap().contains("4111"));
        assert!(seen.is_empty());
        // Text whose skipped part is not valid JSON is withheld when it holds a card number.
        let (scrubbed, _) = inspect(r#"{"page":{"n":1e400},"note":"4111111111111111"}"#);
        assert!(!scrubbed.unwrap().contains("4111"));
        // Nothing red, however deep the rest of the message: no rewrite.
        let (scrubbed, seen) =
            inspect(r#"{"context":{"page":{"ssn":"789"},"traits":{"email":"a@b.c"}},"traits":{"plan":"pro"}}"#);
        assert_eq!((scrubbed, seen), (None, vec!["plan".to_owned(), "email".to_owned()]));
    }

    #[test]
    fn masking_keeps_a_hint_and_hides_the_rest() {
        assert_eq!(mask("email", &json!("jane@example.com")), "j***@example.com");
        assert_eq!(mask("phone", &json!("+15551234567")), "+1********67");
        assert_eq!(mask("last_name", &json!("Doe")), "***");
        let policy = PiiPolicy::default();
        let shown = policy.mask_json(&json!({
            "traits": {"email": "jane@example.com", "plan": "pro", "ip": "10.0.0.1"},
            "identifiers": [{"type": "email", "value": "jane@example.com"}],
            "emails": null
        }));
        assert_eq!(shown["traits"]["email"], "j***@example.com");
        assert_eq!(shown["traits"]["plan"], "pro");
        assert_eq!(shown["traits"]["ip"], "***");
        assert_eq!(shown["identifiers"][0], json!({"type": "email", "value": "j***@example.com"}));
        assert_eq!(shown["emails"], Value::Null);
    }
}
