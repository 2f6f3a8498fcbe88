//! The rule language of audiences and computed traits, free of I/O.
//!
//! An audience is a [`Condition`] tree over a profile's traits, its computed
//! traits, its event history and its memberships of other audiences. The tree
//! has two equal forms: JSON (serde, what the admin API stores and serves) and
//! a short text syntax (what the CLI and the console show), which round-trip
//! (`text -> tree -> text -> tree` gives the same tree). Like the identity
//! rules, a rule is validated and compiled once ([`Condition::compile`] →
//! [`CompiledAudience`]) and then evaluated many times: in batch over a full
//! history, and with [`CompiledAudience::next_change_at`] telling the audience
//! stage when a membership changes by time alone (a qualifying event leaving
//! a window), so members leave on time without a new event or a daily job.
//!
//! Computed traits ([`computed`]) share the filters, windows and text syntax
//! and add an incremental per-profile state with bounded memory.
//!
//! The submodules: [`text`] (lexer, parser, printer, [`ParseError`]),
//! [`evaluate`] (the compiled form and the batch evaluator), [`incremental`]
//! (the per-profile state updated one event at a time), [`computed`]
//! (computed-trait definitions, incremental state), `compare` (how a value
//! test, a property filter and a window match, shared by both).

mod compare;
pub mod computed;
pub mod evaluate;
pub mod incremental;
pub mod text;

pub use computed::{CompiledComputedTrait, ComputedTraitDefinition, ComputedTraitState};
pub use evaluate::{CompiledAudience, ProfileFacts, ProfileValues};
pub use incremental::AudienceState;
pub use text::ParseError;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Deepest nesting of `and` / `or` / `not` a rule may have; deeper trees are
/// refused rather than risking the stack of whoever evaluates them.
pub const MAX_DEPTH: usize = 32;

/// Longest window a rule may name: about ten years, far inside what a
/// millisecond count can hold.
pub const MAX_WINDOW_MS: i64 = 3660 * 86_400_000;

/// One audience rule, or one part of it.
///
/// Serialized with a `kind` tag: `{"kind": "trait", "name": "plan",
/// "operator": "=", "value": "pro"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// Every condition holds (at least two of them).
    And { conditions: Vec<Condition> },
    /// At least one condition holds (at least two of them).
    Or { conditions: Vec<Condition> },
    /// The condition does not hold.
    Not { condition: Box<Condition> },
    /// A trait of the profile (`trait plan = "pro"`).
    Trait(ValueCondition),
    /// A computed trait of the profile (`computed lifetime_value > 100`).
    ComputedTrait(ValueCondition),
    /// At least one matching event (`performed "Ticket Opened" within 7d`).
    Performed(EventCondition),
    /// The number of matching events compared with a threshold
    /// (`count(event "Order Completed" where total > 50, within 30d) >= 3`).
    Count(CountCondition),
    /// Events matching each step in order, each strictly later than the one
    /// before (`performed "Product Viewed" then "Order Completed" within 7d`).
    Funnel(FunnelCondition),
    /// The profile is a member of another audience (`in audience "vip"`).
    InAudience { audience: String },
}

/// A test of one named value: a trait, a computed trait.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueCondition {
    pub name: String,
    pub operator: Operator,
    /// The value compared with; absent for `exists`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// A test of one event property (`total > 50`, `product.sku = "A-1"`); the
/// property is a dotted path into the event's `properties`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyFilter {
    pub property: String,
    pub operator: Operator,
    /// The value compared with; absent for `exists`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// Which events count: a `track` event of this name whose properties pass
/// every filter, within the window if there is one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventCondition {
    pub event: String,
    #[serde(rename = "where", default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<PropertyFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

/// The number of matching events compared with `value`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountCondition {
    pub event: String,
    #[serde(rename = "where", default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<PropertyFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    pub operator: Comparison,
    pub value: u64,
}

/// One step of a funnel: an event name and its property filters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelStep {
    pub event: String,
    #[serde(rename = "where", default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<PropertyFilter>,
}

/// Two or more steps in order; every step's event lies in the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelCondition {
    pub steps: Vec<FunnelStep>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

/// How a value is tested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operator {
    #[serde(rename = "=")]
    Equal,
    #[serde(rename = "!=")]
    NotEqual,
    #[serde(rename = "<")]
    Less,
    #[serde(rename = "<=")]
    LessOrEqual,
    #[serde(rename = ">")]
    Greater,
    #[serde(rename = ">=")]
    GreaterOrEqual,
    /// Text containing the value, or a list holding it.
    #[serde(rename = "contains")]
    Contains,
    /// Present and not `null`; takes no value.
    #[serde(rename = "exists")]
    Exists,
}

impl Operator {
    pub const ALL: [Operator; 8] = [
        Operator::Equal,
        Operator::NotEqual,
        Operator::Less,
        Operator::LessOrEqual,
        Operator::Greater,
        Operator::GreaterOrEqual,
        Operator::Contains,
        Operator::Exists,
    ];

    /// The operator as written in both forms.
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Equal => "=",
            Operator::NotEqual => "!=",
            Operator::Less => "<",
            Operator::LessOrEqual => "<=",
            Operator::Greater => ">",
            Operator::GreaterOrEqual => ">=",
            Operator::Contains => "contains",
            Operator::Exists => "exists",
        }
    }

    fn is_ordering(self) -> bool {
        matches!(self, Operator::Less | Operator::LessOrEqual | Operator::Greater | Operator::GreaterOrEqual)
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a count is compared with its threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Comparison {
    #[serde(rename = "=")]
    Equal,
    #[serde(rename = "!=")]
    NotEqual,
    #[serde(rename = "<")]
    Less,
    #[serde(rename = "<=")]
    LessOrEqual,
    #[serde(rename = ">")]
    Greater,
    #[serde(rename = ">=")]
    GreaterOrEqual,
}

impl Comparison {
    pub const ALL: [Comparison; 6] = [
        Comparison::Equal,
        Comparison::NotEqual,
        Comparison::Less,
        Comparison::LessOrEqual,
        Comparison::Greater,
        Comparison::GreaterOrEqual,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Comparison::Equal => "=",
            Comparison::NotEqual => "!=",
            Comparison::Less => "<",
            Comparison::LessOrEqual => "<=",
            Comparison::Greater => ">",
            Comparison::GreaterOrEqual => ">=",
        }
    }

    /// Whether `left OPERATOR right` holds.
    pub fn holds<T: PartialOrd>(self, left: T, right: T) -> bool {
        match self {
            Comparison::Equal => left == right,
            Comparison::NotEqual => left != right,
            Comparison::Less => left < right,
            Comparison::LessOrEqual => left <= right,
            Comparison::Greater => left > right,
            Comparison::GreaterOrEqual => left >= right,
        }
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which events a condition looks at, by their timestamps.
///
/// JSON: `{"within": {"amount": 30, "unit": "days"}}` or
/// `{"between": {"start": "2026-01-01T00:00:00Z", "end": "2026-02-01T00:00:00Z"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Window {
    /// The last `amount` units before now (`within 30d`).
    Within(WindowLength),
    /// From `start` (included) to `end` (excluded)
    /// (`between 2026-01-01 and 2026-02-01`).
    Between { start: DateTime<Utc>, end: DateTime<Utc> },
}

/// A length of time: `30d`, `12h`, `90m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowLength {
    pub amount: i64,
    pub unit: TimeUnit,
}

/// The unit of a window's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    Minutes,
    Hours,
    Days,
}

impl TimeUnit {
    /// The unit's milliseconds.
    pub fn millis(self) -> i64 {
        match self {
            TimeUnit::Minutes => 60_000,
            TimeUnit::Hours => 3_600_000,
            TimeUnit::Days => 86_400_000,
        }
    }

    /// The letter the text syntax writes after the amount.
    pub fn suffix(self) -> char {
        match self {
            TimeUnit::Minutes => 'm',
            TimeUnit::Hours => 'h',
            TimeUnit::Days => 'd',
        }
    }

    pub fn from_suffix(suffix: char) -> Option<TimeUnit> {
        match suffix {
            'm' => Some(TimeUnit::Minutes),
            'h' => Some(TimeUnit::Hours),
            'd' => Some(TimeUnit::Days),
            _ => None,
        }
    }
}

impl WindowLength {
    /// The length in milliseconds; `None` when it is not positive or longer
    /// than [`MAX_WINDOW_MS`].
    pub fn millis(self) -> Option<i64> {
        let millis = self.amount.checked_mul(self.unit.millis())?;
        (self.amount > 0 && millis <= MAX_WINDOW_MS).then_some(millis)
    }
}

impl fmt::Display for WindowLength {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.amount, self.unit.suffix())
    }
}

/// What is wrong with a rule, whichever form it came in.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("empty {0} name")]
    EmptyName(&'static str),
    #[error("{0} needs at least two conditions")]
    TooFewConditions(&'static str),
    #[error("a funnel needs at least two steps")]
    TooFewSteps,
    #[error("rule nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("window must be positive, got {0}")]
    WindowNotPositive(WindowLength),
    #[error("window {0} is longer than ten years")]
    WindowTooLong(WindowLength),
    #[error("window starts at {start} but does not end after it ({end})")]
    WindowEndsBeforeItStarts { start: DateTime<Utc>, end: DateTime<Utc> },
    #[error("{0} takes no value")]
    UnexpectedValue(Operator),
    #[error("{0} needs a value")]
    MissingValue(Operator),
    #[error("{operator} needs {expected}, got {found}")]
    UnsupportedValue { operator: Operator, expected: &'static str, found: String },
    #[error("count takes no property")]
    CountTakesNoProperty,
    #[error("{} needs a property", .0.as_str())]
    PropertyNeeded(computed::AggregateFunction),
}

/// A rule that breaks a [`Problem`], with where in the JSON tree
/// (`conditions[1].where[0]`, empty for the root).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}{problem}", if at.is_empty() { String::new() } else { format!("{at}: ") })]
pub struct InvalidRule {
    pub at: String,
    pub problem: Problem,
}

/// A rule's JSON form that cannot be used: not JSON of the rule's shape
/// (an unknown operator, kind or field), or a well-formed rule that breaks a
/// [`Problem`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RuleJsonError {
    /// `position` is serde's line and column, when it knows them (it does
    /// not inside a condition, which is read whole to find its `kind`).
    #[error("{message}")]
    Malformed { position: Option<(usize, usize)>, message: String },
    #[error(transparent)]
    Invalid(#[from] InvalidRule),
}

impl From<serde_json::Error> for RuleJsonError {
    fn from(error: serde_json::Error) -> Self {
        let position = (error.line() > 0).then(|| (error.line(), error.column()));
        RuleJsonError::Malformed { position, message: error.to_string() }
    }
}

impl Condition {
    /// Reads and validates the JSON form, as the admin API receives it.
    pub fn from_json(json: &str) -> Result<Condition, RuleJsonError> {
        let condition: Condition = serde_json::from_str(json)?;
        condition.validate()?;
        Ok(condition)
    }

    /// Parses the text syntax (see [`text`]), validating as it goes.
    pub fn parse(text: &str) -> Result<Condition, ParseError> {
        text::parse_condition(text)
    }

    /// Checks the whole tree; the JSON form needs this, the parser already
    /// did it.
    pub fn validate(&self) -> Result<(), InvalidRule> {
        self.validate_at("", 0)
    }

    /// Validates and compiles the rule into its evaluable form.
    pub fn compile(&self) -> Result<CompiledAudience, InvalidRule> {
        self.validate()?;
        Ok(CompiledAudience::new(self))
    }

    /// Every audience this rule refers to (`in audience "…"`), so the stage
    /// can evaluate audiences after those they depend on and refuse cycles.
    pub fn referenced_audiences(&self) -> Vec<&str> {
        let mut names = Vec::new();
        self.visit(&mut |condition| {
            if let Condition::InAudience { audience } = condition {
                names.push(audience.as_str());
            }
        });
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Every computed trait this rule tests (`computed NAME …`), so an
    /// audience cannot name one that does not exist, nor outlive one it uses.
    pub fn referenced_computed_traits(&self) -> Vec<&str> {
        let mut names = Vec::new();
        self.visit(&mut |condition| {
            if let Condition::ComputedTrait(test) = condition {
                names.push(test.name.as_str());
            }
        });
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Whether the rule tests any of the profile's own traits (`trait …`,
    /// at any depth); one that does not is evaluated without reading them.
    pub fn tests_traits(&self) -> bool {
        let mut found = false;
        self.visit(&mut |condition| found |= matches!(condition, Condition::Trait(_)));
        found
    }

    fn visit<'a>(&'a self, visitor: &mut impl FnMut(&'a Condition)) {
        visitor(self);
        match self {
            Condition::And { conditions } | Condition::Or { conditions } => {
                conditions.iter().for_each(|condition| condition.visit(visitor))
            }
            Condition::Not { condition } => condition.visit(visitor),
            _ => {}
        }
    }

    fn validate_at(&self, at: &str, depth: usize) -> Result<(), InvalidRule> {
        let fail = |at: &str, problem| Err(InvalidRule { at: at.to_owned(), problem });
        if depth > MAX_DEPTH {
            return fail(at, Problem::TooDeep);
        }
        let window = |window: Option<&Window>| check_window(window).or_else(|p| fail(&path(at, "window"), p));
        match self {
            Condition::And { conditions } | Condition::Or { conditions } => {
                if conditions.len() < 2 {
                    let operator = if matches!(self, Condition::And { .. }) { "and" } else { "or" };
                    return fail(at, Problem::TooFewConditions(operator));
                }
                for (index, condition) in conditions.iter().enumerate() {
                    condition.validate_at(&path(at, &format!("conditions[{index}]")), depth + 1)?;
                }
                Ok(())
            }
            Condition::Not { condition } => condition.validate_at(&path(at, "condition"), depth + 1),
            Condition::Trait(test) | Condition::ComputedTrait(test) => {
                check_value_test("trait", &test.name, test.operator, test.value.as_ref()).or_else(|p| fail(at, p))
            }
            Condition::Performed(condition) => {
                check_event(&condition.event, &condition.filters, at)?;
                window(condition.window.as_ref())
            }
            Condition::Count(condition) => {
                check_event(&condition.event, &condition.filters, at)?;
                window(condition.window.as_ref())
            }
            Condition::Funnel(funnel) => {
                if funnel.steps.len() < 2 {
                    return fail(at, Problem::TooFewSteps);
                }
                for (index, step) in funnel.steps.iter().enumerate() {
                    check_event(&step.event, &step.filters, &path(at, &format!("steps[{index}]")))?;
                }
                window(funnel.window.as_ref())
            }
            Condition::InAudience { audience } => {
                if audience.trim().is_empty() {
                    return fail(at, Problem::EmptyName("audience"));
                }
                Ok(())
            }
        }
    }
}

/// `at.field`, or `field` at the root.
fn path(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_owned()
    } else {
        format!("{at}.{field}")
    }
}

/// An event name and its filters, with problems located at `at`.
fn check_event(event: &str, filters: &[PropertyFilter], at: &str) -> Result<(), InvalidRule> {
    if event.trim().is_empty() {
        return Err(InvalidRule { at: path(at, "event"), problem: Problem::EmptyName("event") });
    }
    for (index, filter) in filters.iter().enumerate() {
        check_filter(filter).map_err(|problem| InvalidRule { at: path(at, &format!("where[{index}]")), problem })?;
    }
    Ok(())
}

pub(crate) fn check_filter(filter: &PropertyFilter) -> Result<(), Problem> {
    check_value_test("property", &filter.property, filter.operator, filter.value.as_ref())?;
    if filter.property.split('.').any(str::is_empty) {
        return Err(Problem::EmptyName("property"));
    }
    Ok(())
}

/// A name and `OPERATOR value`: the name is not empty, `exists` has no value,
/// every other operator has a scalar one (orderings a number or a text).
pub(crate) fn check_value_test(
    what: &'static str,
    name: &str,
    operator: Operator,
    value: Option<&Value>,
) -> Result<(), Problem> {
    if name.trim().is_empty() {
        return Err(Problem::EmptyName(what));
    }
    let Some(value) = value else {
        return match operator {
            Operator::Exists => Ok(()),
            _ => Err(Problem::MissingValue(operator)),
        };
    };
    if operator == Operator::Exists {
        return Err(Problem::UnexpectedValue(operator));
    }
    let unsupported = |expected| Problem::UnsupportedValue { operator, expected, found: value.to_string() };
    match value {
        Value::String(_) | Value::Number(_) => Ok(()),
        Value::Bool(_) if !operator.is_ordering() => Ok(()),
        _ if operator.is_ordering() => Err(unsupported("a number or a text")),
        _ => Err(unsupported("a text, a number or true or false")),
    }
}

pub(crate) fn check_window(window: Option<&Window>) -> Result<(), Problem> {
    match window {
        None => Ok(()),
        Some(Window::Within(length)) if length.amount <= 0 => Err(Problem::WindowNotPositive(*length)),
        Some(Window::Within(length)) if length.millis().is_none() => Err(Problem::WindowTooLong(*length)),
        Some(Window::Within(_)) => Ok(()),
        Some(Window::Between { start, end }) if start >= end => {
            Err(Problem::WindowEndsBeforeItStarts { start: *start, end: *end })
        }
        Some(Window::Between { .. }) => Ok(()),
    }
}

impl fmt::Display for Condition {
    /// The text syntax; parsing it gives this tree back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        text::write_condition(f, self)
    }
}

impl std::str::FromStr for Condition {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Condition::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_form_reads_and_writes_every_kind() {
        let rule = json!({"kind": "and", "conditions": [
            {"kind": "trait", "name": "plan", "operator": "=", "value": "pro"},
            {"kind": "computed_trait", "name": "ltv", "operator": ">", "value": 100},
            {"kind": "not", "condition": {"kind": "performed", "event": "Ticket Opened",
                "window": {"within": {"amount": 7, "unit": "days"}}}},
            {"kind": "count", "event": "Order Completed", "where": [{"property": "total", "operator": ">", "value": 50}],
                "window": {"between": {"start": "2026-01-01T00:00:00Z", "end": "2026-02-01T00:00:00Z"}},
                "operator": ">=", "value": 3},
            {"kind": "funnel", "steps": [{"event": "Product Viewed"}, {"event": "Order Completed"}]},
            {"kind": "in_audience", "audience": "vip"},
            {"kind": "trait", "name": "email", "operator": "exists"}
        ]});
        let condition: Condition = serde_json::from_value(rule.clone()).unwrap();
        condition.validate().unwrap();
        assert_eq!(serde_json::to_value(&condition).unwrap(), rule);
        assert_eq!(condition.referenced_audiences(), vec!["vip"]);
        assert!(condition.tests_traits());
    }

    #[test]
    fn only_a_trait_test_at_any_depth_reads_traits() {
        let tests = |text: &str| Condition::parse(text).unwrap().tests_traits();
        assert!(tests(r#"trait plan = "pro""#));
        assert!(tests(r#"performed "Order Completed" within 30d or not trait plan = "pro""#));
        assert!(!tests(r#"performed "Order Completed" within 30d"#));
        assert!(!tests(r#"computed ltv > 100 and in audience "vip""#));
        assert!(!tests(r#"count(event "Order Completed" where plan = "pro", within 30d) >= 2"#));
    }

    #[test]
    fn from_json_reads_and_validates_in_one_step() {
        let error = Condition::from_json(r#"{"kind": "trait", "name": "plan", "operator": "=>", "value": "pro"}"#);
        let Err(RuleJsonError::Malformed { message, .. }) = error else { panic!("{error:?}") };
        assert!(message.starts_with("unknown variant `=>`, expected one of `=`"), "{message}");
        let error = Condition::from_json(r#"{"kind": "in_audience", "audience": "vip""#).unwrap_err();
        assert!(matches!(error, RuleJsonError::Malformed { position: Some((1, _)), .. }), "{error:?}");
        let error = Condition::from_json(r#"{"kind": "in_audience", "audience": ""}"#).unwrap_err();
        assert_eq!(error.to_string(), "empty audience name");
        let rule = Condition::from_json(r#"{"kind": "in_audience", "audience": "vip"}"#).unwrap();
        assert_eq!(rule.to_string(), r#"in audience "vip""#);
    }

    #[test]
    fn json_form_refuses_unknown_operators_and_fields() {
        let unknown_operator = json!({"kind": "trait", "name": "plan", "operator": "=>", "value": "pro"});
        let error = serde_json::from_value::<Condition>(unknown_operator).unwrap_err().to_string();
        assert!(error.contains("unknown variant `=>`"), "{error}");
        let unknown_field = json!({"kind": "in_audience", "audience": "vip", "extra": 1});
        assert!(serde_json::from_value::<Condition>(unknown_field).is_err());
    }

    #[test]
    fn validation_names_the_problem_and_where() {
        let invalid = |rule: Value| serde_json::from_value::<Condition>(rule).unwrap().validate().unwrap_err();
        let error = invalid(json!({"kind": "or", "conditions": [
            {"kind": "in_audience", "audience": "vip"},
            {"kind": "performed", "event": "Order Completed", "window": {"within": {"amount": -3, "unit": "days"}}}
        ]}));
        assert_eq!(error.at, "conditions[1].window");
        assert_eq!(error.problem, Problem::WindowNotPositive(WindowLength { amount: -3, unit: TimeUnit::Days }));
        assert_eq!(error.to_string(), "conditions[1].window: window must be positive, got -3d");
        let error = invalid(json!({"kind": "not", "condition": {"kind": "funnel",
            "steps": [{"event": "A"}, {"event": "B", "where": [{"property": "x", "operator": "contains"}]}]}}));
        assert_eq!(error.to_string(), "condition.steps[1].where[0]: contains needs a value");

        let error = invalid(json!({"kind": "count", "event": "A", "operator": ">", "value": 1,
            "where": [{"property": "x", "operator": "=", "value": 1}, {"property": "", "operator": "exists"}]}));
        assert_eq!((error.at.as_str(), error.problem), ("where[1]", Problem::EmptyName("property")));

        let error = invalid(json!({"kind": "trait", "name": "plan", "operator": "<", "value": true}));
        assert_eq!(error.to_string(), "< needs a number or a text, got true");
        let error = invalid(json!({"kind": "trait", "name": "plan", "operator": "exists", "value": 1}));
        assert_eq!(error.problem, Problem::UnexpectedValue(Operator::Exists));
        let error = invalid(json!({"kind": "trait", "name": " ", "operator": "=", "value": 1}));
        assert_eq!(error.problem, Problem::EmptyName("trait"));
        let error = invalid(json!({"kind": "and", "conditions": [{"kind": "in_audience", "audience": "a"}]}));
        assert_eq!(error.problem, Problem::TooFewConditions("and"));
        let error = invalid(json!({"kind": "funnel", "steps": [{"event": "A"}]}));
        assert_eq!(error.problem, Problem::TooFewSteps);
        let error = invalid(json!({"kind": "performed", "event": "A",
            "window": {"between": {"start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}}}));
        assert!(matches!(error.problem, Problem::WindowEndsBeforeItStarts { .. }));
        let error = invalid(json!({"kind": "performed", "event": "A",
            "window": {"within": {"amount": i64::MAX, "unit": "days"}}}));
        assert!(matches!(error.problem, Problem::WindowTooLong(_)));
    }

    #[test]
    fn validation_refuses_trees_nested_too_deep() {
        let mut condition = Condition::InAudience { audience: "a".into() };
        for _ in 0..=MAX_DEPTH {
            condition = Condition::Not { condition: Box::new(condition) };
        }
        assert_eq!(condition.validate().unwrap_err().problem, Problem::TooDeep);
    }
}
