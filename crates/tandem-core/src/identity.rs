//! Identifiers and the rules that decide which of them may link events into
//! one customer, as Segment Unify documents them: a limit per identifier type,
//! a priority order that decides which identifier to drop when a link would
//! break a limit, and blocked values that never match.

use crate::event::Event;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
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

    /// The identifier with its value normalized for its type, with no default
    /// phone region (see [`Normalizer`]); `None` when the value cannot
    /// identify anyone.
    pub fn normalized(kind: &str, value: &str) -> Option<Identifier> {
        Normalizer::default().identifier(kind, value)
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

    /// Parses `type:value`, normalizing the value for its type exactly as an
    /// event's identifier is normalized (phones without a country code need
    /// [`Normalizer::parse`] with the rules' region).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Normalizer::default().parse(text)
    }
}

/// The one normalization every identifier passes through, whether it comes
/// from an event or from someone looking a profile up: e-mails trimmed and
/// lower-cased, phones in E.164 by libphonenumber's metadata, every other
/// type trimmed. Normalizing a normalized value gives it back unchanged, so
/// anything a profile shows can be searched for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Normalizer {
    /// Where a phone number written without a country code is assumed to be.
    pub phone_region: Option<phonenumber::country::Id>,
}

impl Normalizer {
    /// The identifier with its value normalized for its type; `None` when the
    /// value cannot identify anyone (an invalid e-mail or phone number, an
    /// empty value).
    pub fn identifier(&self, kind: &str, value: &str) -> Option<Identifier> {
        let value = match kind {
            EMAIL => normalize_email(value)?,
            PHONE => normalize_phone(value, self.phone_region)?,
            _ => value.trim().to_owned(),
        };
        (!value.is_empty()).then(|| Identifier::new(kind, value))
    }

    /// Parses `type:value` and normalizes the value.
    pub fn parse(&self, text: &str) -> Result<Identifier, MalformedIdentifier> {
        let malformed = || MalformedIdentifier(text.to_owned());
        let (kind, value) = text.split_once(':').ok_or_else(malformed)?;
        let kind = kind.trim().to_ascii_lowercase();
        if !is_identifier_type(&kind) {
            return Err(malformed());
        }
        self.identifier(&kind, value).ok_or_else(malformed)
    }
}

/// Whether `type:value` failed to parse only for want of a phone region: a
/// phone number written without its country code. Every other identifier
/// normalizes the same under any rules, so a look-up reads the rules only
/// for this case.
pub fn needs_phone_region(text: &str) -> bool {
    Normalizer::default().parse(text).is_err()
        && text.split_once(':').is_some_and(|(kind, _)| kind.trim().eq_ignore_ascii_case(PHONE))
}

/// Identifier types are lower-case names of letters, digits, `_` and `.`.
pub fn is_identifier_type(kind: &str) -> bool {
    !kind.is_empty() && kind.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

/// Trimmed and lower-cased; one `@` with something on both sides and no
/// white space inside, else not an e-mail address.
pub fn normalize_email(value: &str) -> Option<String> {
    let email = value.trim().to_lowercase();
    let (local, domain) = email.split_once('@')?;
    let valid = !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    valid.then_some(email)
}

/// A valid phone number in E.164 (`+493012345678`), or `None`.
///
/// A number that says its country (`+49 …`, `(+49) …`, or `0049 …`: `00` is
/// the international prefix nearly everywhere) is read on its own; one
/// without is read in `region` when there is one, and is no identifier when
/// there is none. Only numbers libphonenumber's metadata calls valid count,
/// which keeps placeholders such as `000-000-0000` from linking strangers.
pub fn normalize_phone(value: &str, region: Option<phonenumber::country::Id>) -> Option<String> {
    let trimmed = value.trim();
    if trimmed.len() > 64 {
        return None;
    }
    let first_digit = trimmed.find(|c: char| c.is_ascii_digit())?;
    let (text, region) = if trimmed[..first_digit].contains('+') {
        (trimmed.to_owned(), None)
    } else if trimmed[first_digit..].starts_with("00") {
        (format!("{}+{}", &trimmed[..first_digit], &trimmed[first_digit + 2..]), None)
    } else {
        (trimmed.to_owned(), Some(region?))
    };
    let number = phonenumber::parse(region, text).ok()?;
    number.is_valid().then(|| number.format().mode(phonenumber::Mode::E164).to_string())
}

/// The national part of an E.164 number is one digit repeated or a counting
/// run (`+1 111 111 1111`, `+49 1234567890`): a placeholder someone typed to
/// get past a form, not a person's number.
fn is_placeholder_phone(e164: &str) -> bool {
    let Ok(number) = phonenumber::parse(None, e164) else {
        return false;
    };
    let national = number.national().to_string();
    let mut digits = national.bytes();
    let Some(first) = digits.next() else {
        return true;
    };
    let repeated = national.bytes().all(|digit| digit == first);
    let counting = national.len() >= 6 && "12345678901234567890".starts_with(&national);
    repeated || counting
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
    /// Regular expressions for values, of any type, that never identify
    /// anyone; matched against the value as sent and as normalized.
    pub blocked_patterns: Vec<String>,
    /// Regular expressions for values of one type that never identify anyone
    /// (placeholder e-mails such as `noreply@…`), by type.
    pub blocked_patterns_by_type: BTreeMap<String, Vec<String>>,
    /// Phone numbers whose national part is one digit repeated or a counting
    /// run (`111 111 1111`, `1234567890`) never identify anyone.
    pub block_placeholder_phones: bool,
    /// The region (ISO 3166 code such as `US` or `DE`) of phone numbers
    /// written without a country code; without one, such numbers are kept as
    /// traits but identify no one.
    pub phone_region: Option<String>,
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
            blocked_patterns_by_type: BTreeMap::from([(EMAIL.to_owned(), default_email_placeholders())]),
            block_placeholder_phones: true,
            phone_region: None,
            blocked_identifiers: Vec::new(),
            custom_identifiers: Vec::new(),
        }
    }
}

/// E-mail addresses people type to get past a form: no-reply senders,
/// `test@…`-like local parts, and domains reserved for tests.
fn default_email_placeholders() -> Vec<String> {
    [
        r"^(no-?reply|do-?not-?reply|mailer-daemon|postmaster)@",
        r"^(test|none|null|nobody|noemail|no-email|noname|n/?a|asdf|qwerty|x+)@",
        r"@(test|testing|invalid|localhost|nomail|noemail|none|domain)(\.(com|net|org))?$",
        r"\.(invalid|test|localhost)$",
    ]
    .map(str::to_owned)
    .to_vec()
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
    #[error("{0:?} is not an identifier type (lower-case letters, digits, _ and .)")]
    BadIdentifierType(String),
    #[error("phone region {0:?} is not a region code such as US or DE")]
    BadPhoneRegion(String),
}

/// Rules checked and ready to apply.
#[derive(Clone, Debug)]
pub struct CompiledRules {
    pub rules: IdentityRules,
    blocked_values: HashSet<String>,
    blocked_patterns: Vec<Regex>,
    blocked_patterns_by_type: HashMap<String, Vec<Regex>>,
    blocked_identifiers: HashSet<Identifier>,
    normalizer: Normalizer,
}

impl IdentityRules {
    /// How identifier values are normalized under these rules (the phone
    /// region), without compiling the rest: what a look-up needs.
    pub fn normalizer(&self) -> Result<Normalizer, RulesError> {
        let phone_region = match &self.phone_region {
            None => None,
            Some(region) => Some(
                region
                    .trim()
                    .to_ascii_uppercase()
                    .parse::<phonenumber::country::Id>()
                    .map_err(|_| RulesError::BadPhoneRegion(region.clone()))?,
            ),
        };
        Ok(Normalizer { phone_region })
    }

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
        let compile_all = |patterns: &[String]| -> Result<Vec<Regex>, RulesError> {
            patterns
                .iter()
                .map(|pattern| {
                    Regex::new(pattern).map_err(|error| RulesError::BadPattern {
                        pattern: pattern.clone(),
                        message: error.to_string(),
                    })
                })
                .collect()
        };
        let mut blocked_patterns_by_type = HashMap::new();
        for (kind, patterns) in &self.blocked_patterns_by_type {
            if !is_identifier_type(kind) {
                return Err(RulesError::BadIdentifierType(kind.clone()));
            }
            blocked_patterns_by_type.insert(kind.clone(), compile_all(patterns)?);
        }
        let normalizer = self.normalizer()?;
        Ok(CompiledRules {
            blocked_values: self.blocked_values.iter().map(|value| value.trim().to_lowercase()).collect(),
            blocked_identifiers: self.blocked_identifiers.iter().cloned().collect(),
            blocked_patterns: compile_all(&self.blocked_patterns)?,
            blocked_patterns_by_type,
            normalizer,
            rules: self,
        })
    }
}

/// The identifier type of an `externalIds` entry: its `type` lower-cased,
/// with anything but letters, digits, `_` and `.` turned into `_`
/// (`Hubspot-ID` → `hubspot_id`), so every stored type can be looked up.
/// Built-in names (`email`, `phone`, `user_id`, …) get their type's rules.
pub fn external_id_type(kind: &str) -> String {
    kind.trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' { c } else { '_' })
        .collect()
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

    /// How these rules normalize identifier values (phone region included).
    pub fn normalizer(&self) -> Normalizer {
        self.normalizer
    }

    /// Why this identifier may not be used, if it may not. Values and
    /// patterns are checked against the normalized value and against `sent`,
    /// the value as the event carried it (trimmed), so that `000-000-0000`
    /// is caught whatever it normalizes to.
    pub fn blocked(&self, identifier: &Identifier, sent: &str) -> Option<&'static str> {
        if self.blocked_identifiers.contains(identifier) {
            return Some("blocked identifier");
        }
        let sent = sent.trim();
        let forms = [identifier.value.as_str(), sent];
        if forms.iter().any(|form| self.blocked_values.contains(&form.to_lowercase())) {
            return Some("blocked value");
        }
        let typed = self.blocked_patterns_by_type.get(&identifier.kind).map(Vec::as_slice).unwrap_or_default();
        if self.blocked_patterns.iter().chain(typed).any(|pattern| forms.iter().any(|form| pattern.is_match(form))) {
            return Some("blocked pattern");
        }
        if identifier.kind == PHONE && self.rules.block_placeholder_phones && is_placeholder_phone(&identifier.value) {
            return Some("placeholder phone number");
        }
        None
    }

    /// Every identifier an event carries, normalized, most important first,
    /// each once; blocked ones are returned apart with the reason.
    pub fn identifiers_of(&self, event: &Event) -> (Vec<Identifier>, Vec<(Identifier, &'static str)>) {
        let mut found: Vec<(Identifier, String)> = Vec::new();
        let normalizer = self.normalizer;
        let mut add = |kind: &str, value: Option<&Value>| {
            let text = match value {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Number(number)) => number.to_string(),
                _ => return,
            };
            if let Some(identifier) = normalizer.identifier(kind, &text) {
                found.push((identifier, text));
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
                    add(&external_id_type(kind), external.get("id"));
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
        for (identifier, sent) in found {
            if usable.contains(&identifier) || blocked.iter().any(|(seen, _)| seen == &identifier) {
                continue;
            }
            match self.blocked(&identifier, &sent) {
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
    fn emails_normalize_and_invalid_ones_are_no_identifiers() {
        assert_eq!(normalize_email("  Ann@Example.COM "), Some("ann@example.com".into()));
        assert_eq!(normalize_email("no-at-sign"), None);
        assert_eq!(normalize_email("two@at@signs"), None);
        assert_eq!(normalize_email("ann lee@example.com"), None);
        assert_eq!(normalize_email("@example.com"), None);
    }

    #[test]
    fn phones_become_e164_by_the_phone_number_metadata() {
        let berlin = Some("+49301234567".to_owned());
        for written in ["+49 (30) 1234-567", "0049 30 1234567", "(0049) 30 1234567", "(+49) 30 1234567", "+49301234567"]
        {
            assert_eq!(normalize_phone(written, None), berlin, "{written}");
        }
        assert_eq!(normalize_phone("030 1234567", None), None, "no country and no region");
        assert_eq!(normalize_phone("030 1234567", Some(phonenumber::country::Id::DE)), berlin);
        assert_eq!(normalize_phone("(415) 555-2671", Some(phonenumber::country::Id::US)), Some("+14155552671".into()));
        assert_eq!(
            normalize_phone("+49 30 1234567", Some(phonenumber::country::Id::US)),
            berlin,
            "a country code beats the region"
        );
        for junk in ["12", "abc", "000-000-0000", "0000000000", "00000", "+000", "+1 555 0100"] {
            assert_eq!(normalize_phone(junk, Some(phonenumber::country::Id::US)), None, "{junk}");
        }
    }

    /// Regression: `(0049) 30 1234567` became `+49301234567` but
    /// `(+49) 30 1234567` became `49301234567`, which matched nothing.
    #[test]
    fn regression_phone_country_code_in_parentheses_matches_the_plain_form() {
        let rules = IdentityRules::default().compile().unwrap();
        let normalizer = rules.normalizer();
        let forms: Vec<_> = ["(+49) 30 1234567", "(0049) 30 1234567", "+49 30 1234567"]
            .iter()
            .map(|form| normalizer.identifier(PHONE, form))
            .collect();
        assert!(forms.iter().all(|form| form == &Some(Identifier::new(PHONE, "+49301234567"))), "{forms:?}");
    }

    /// Regression: `"phone": "00000"` gave a profile holding `phone:+000`
    /// that no look-up could find (`400 invalid_identifier`).
    #[test]
    fn regression_every_stored_identifier_can_be_looked_up() {
        assert_eq!(Identifier::normalized(PHONE, "00000"), None, "not a phone number at all");
        let normalizer = Normalizer { phone_region: Some(phonenumber::country::Id::DE) };
        for (kind, sent) in [
            (PHONE, "030 1234567"),
            (PHONE, "+1 (415) 555-2671"),
            (EMAIL, " Ann@Example.com"),
            (USER_ID, " u-1 "),
            ("hubspot_id", "H9"),
        ] {
            let stored = normalizer.identifier(kind, sent).unwrap();
            assert_eq!(normalizer.parse(&stored.to_string()), Ok(stored.clone()), "{stored}");
            assert_eq!(stored.to_string().parse::<Identifier>(), Ok(stored.clone()), "without a region too");
        }
    }

    #[test]
    fn identifiers_parse_from_type_and_value() {
        assert_eq!("email:Ann@Example.com".parse(), Ok(Identifier::new("email", "ann@example.com")));
        assert_eq!("user_id:42".parse(), Ok(Identifier::new("user_id", "42")));
        assert_eq!("Phone:+49 30 1234567".parse(), Ok(Identifier::new("phone", "+49301234567")));
        assert!("no-colon".parse::<Identifier>().is_err());
        assert!(":value".parse::<Identifier>().is_err());
        assert!("email:".parse::<Identifier>().is_err());
        assert!("bad type:x".parse::<Identifier>().is_err());
        assert!("phone:12".parse::<Identifier>().is_err());
    }

    #[test]
    fn external_id_types_become_identifier_types() {
        assert_eq!(external_id_type(" Hubspot-ID "), "hubspot_id");
        assert_eq!(external_id_type("ios.idfa"), "ios.idfa");
        assert!(is_identifier_type(&external_id_type("Zendesk User #")));
    }

    #[test]
    fn default_blocked_values_never_identify() {
        let rules = IdentityRules::default().compile().unwrap();
        for value in ["0", "000-000", "-1", "NULL", "anonymous", "undefined"] {
            assert!(rules.blocked(&Identifier::new(USER_ID, value), value).is_some(), "{value}");
        }
        assert!(rules.blocked(&Identifier::new(USER_ID, "u-1001"), "u-1001").is_none());
    }

    /// Regression: blocked values were checked after normalization only, so
    /// two strangers who typed `000-000-0000` and `0000000000` were merged
    /// under `+00000000`, which `^[0-]*$` does not match.
    #[test]
    fn regression_placeholder_phones_never_identify() {
        let rules = IdentityRules { phone_region: Some("US".into()), ..IdentityRules::default() }.compile().unwrap();
        let normalizer = rules.normalizer();
        for sent in
            ["000-000-0000", "0000000000", "+1 111 111 1111", "+49 1234567890", "+44 7777 777777", "+33 1 23 45 67 89"]
        {
            let blocked = match normalizer.identifier(PHONE, sent) {
                None => true,
                Some(identifier) => rules.blocked(&identifier, sent).is_some(),
            };
            assert!(blocked, "{sent} must not identify anyone");
        }
        // Valid numbers by the metadata, caught as placeholders.
        for sent in ["+44 7777 777777", "+33 1 23 45 67 89"] {
            let identifier = normalizer.identifier(PHONE, sent).expect("a valid number");
            assert_eq!(rules.blocked(&identifier, sent), Some("placeholder phone number"), "{sent}");
        }
        // The value as sent is checked too: a pattern on the written form
        // catches it whatever it normalizes to.
        let written =
            IdentityRules { blocked_patterns: vec!["^555".into()], ..IdentityRules::default() }.compile().unwrap();
        let phone = Identifier::new(PHONE, "+14155552671");
        assert_eq!(written.blocked(&phone, "555-415-2671 (old)"), Some("blocked pattern"));
        assert_eq!(written.blocked(&phone, "(415) 555-2671"), None);
        assert_eq!(rules.blocked(&phone, "(415) 555-2671"), None, "a real number identifies");
    }

    #[test]
    fn placeholder_emails_never_identify_by_default() {
        let rules = IdentityRules::default().compile().unwrap();
        for email in
            ["noreply@shop.com", "no-reply@shop.com", "test@test.com", "TEST@Company.com", "a@b.invalid", "x@localhost"]
        {
            let identifier = Identifier::normalized(EMAIL, email).unwrap();
            assert!(rules.blocked(&identifier, email).is_some(), "{email}");
        }
        for email in ["ann@example.com", "testa@shop.com", "nils.ito0@example.net", "tester@mail.com"] {
            let identifier = Identifier::normalized(EMAIL, email).unwrap();
            assert_eq!(rules.blocked(&identifier, email), None, "{email}");
        }
        // The same pattern on another type does not apply.
        assert_eq!(rules.blocked(&Identifier::new(USER_ID, "noreply@shop.com"), "noreply@shop.com"), None);
    }

    #[test]
    fn bad_rules_are_refused() {
        let bad_pattern = IdentityRules { blocked_patterns: vec!["(".into()], ..IdentityRules::default() };
        assert!(matches!(bad_pattern.compile(), Err(RulesError::BadPattern { .. })));
        let zero = IdentityRules { limits: BTreeMap::from([("email".into(), 0)]), ..IdentityRules::default() };
        assert!(matches!(zero.compile(), Err(RulesError::ZeroLimit(_))));
        let custom = IdentityRules { custom_identifiers: vec!["crm_id".into()], ..IdentityRules::default() };
        assert!(matches!(custom.compile(), Err(RulesError::BadCustomIdentifier(_))));
        let region = IdentityRules { phone_region: Some("Germany".into()), ..IdentityRules::default() };
        assert!(matches!(region.compile(), Err(RulesError::BadPhoneRegion(_))));
        let typed = IdentityRules {
            blocked_patterns_by_type: BTreeMap::from([("E Mail".into(), vec![".".into()])]),
            ..IdentityRules::default()
        };
        assert!(matches!(typed.compile(), Err(RulesError::BadIdentifierType(_))));
    }

    #[test]
    fn priority_ranks_listed_types_first() {
        let rules = IdentityRules::default().compile().unwrap();
        let mut kinds = vec!["device_id", "email", "anonymous_id", "user_id", "phone"];
        kinds.sort_by_key(|kind| rules.rank(kind));
        assert_eq!(kinds, vec!["user_id", "email", "phone", "anonymous_id", "device_id"]);
    }

    proptest::proptest! {
        /// Whatever an event sends, the identifier stored for it normalizes
        /// to itself and parses back from its `type:value` text, so every
        /// identifier a profile shows can be searched for.
        #[test]
        fn normalization_is_idempotent_and_round_trips(
            kind in proptest::sample::select(vec![PHONE, EMAIL, USER_ID, "crm_id"]),
            prefix in proptest::sample::select(vec!["", "+", "00", "(+", "(00", " 0", "+1 ", "+49 "]),
            body in "[0-9 ()./-]{0,16}|[A-Za-z0-9@. _-]{0,16}",
            region in proptest::option::of(proptest::sample::select(vec!["US", "DE", "GB", "FR"])),
        ) {
            let phone_region = region.map(|region| region.parse::<phonenumber::country::Id>().unwrap());
            let normalizer = Normalizer { phone_region };
            let sent = format!("{prefix}{body}");
            if let Some(stored) = normalizer.identifier(kind, &sent) {
                proptest::prop_assert_eq!(normalizer.identifier(kind, &stored.value), Some(stored.clone()));
                proptest::prop_assert_eq!(normalizer.parse(&stored.to_string()), Ok(stored.clone()));
                if kind == PHONE {
                    proptest::prop_assert!(stored.value.starts_with('+'), "{}", stored);
                    proptest::prop_assert_eq!(stored.to_string().parse::<Identifier>(), Ok(stored.clone()));
                }
            }
        }
    }
}
