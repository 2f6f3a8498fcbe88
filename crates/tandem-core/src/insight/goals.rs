//! Shared goals: a metric, a target, a period and an owner (marketing, IT
//! or both), with a name and an optional direction (higher or lower is
//! better; each metric has a default).
//!
//! Settings arrive as JSON ([`GoalSettings::from_json`] names the field at
//! fault), are validated and compiled once into a [`Goal`], and the goal is
//! evaluated as often as it is shown ([`Goal::evaluate`]) from the daily
//! figures the store keeps ([`GoalData`], gathered as [`Goal::needs`] says),
//! never from the event log.
//!
//! **How a value is judged.** Every metric is one of three shapes:
//!
//! - a *total* over the period (revenue, new customers, ingest volume),
//!   judged against the target pro-rated by the time elapsed — half-way
//!   through the quarter, half the quarter's target;
//! - a *level* at a moment (active and churned customers, an audience's
//!   size, stack spend), judged against the straight line from its level
//!   when the period began to the target at its end;
//! - a *rate* over the period (a conversion, tracking-plan violations,
//!   delivery success, identity merges as percentages; the 99th percentile
//!   of ingest latency in milliseconds), judged against the target itself.
//!
//! A goal is on track when its value is at least (or, lower being better,
//! at most) what it is judged against; once the period has ended it was met
//! or missed. The trend has one point per day of the period so far: the
//! value as it stood at that day's end (the latency's is that day's own 99th
//! percentile), with the pro-rated target beside it.

use super::latency::LatencyHistogram;
use super::rollup::{day_of, day_start_ms, series, Day, EventClock, TrackerSpec, DAY_MS};
use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The longest goal name, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// The longest event or property name a metric takes, in characters.
const MAX_EVENT_CHARS: usize = 200;
/// The window in which a customer counts as active when a metric does not
/// say (new customers share the tracker of this window).
pub const DEFAULT_ACTIVITY_DAYS: u32 = 30;
/// The longest activity window, conversion window and period, in days.
const MAX_WINDOW_DAYS: u32 = 366;
const MAX_PERIOD_DAYS: i64 = 3_660;

/// Snapshot keys: cumulative counters and levels the insight stage records
/// once a minute, the last value of each day kept.
pub mod snapshot {
    /// Events stored in the log since it began.
    pub const EVENTS: &str = "events";
    /// Tracking-plan violations counted since plans began.
    pub const VIOLATIONS: &str = "violations";
    /// Items destinations accepted since they were created.
    pub const DELIVERED: &str = "delivered";
    /// Items in the dead-letter lists now.
    pub const DEAD_LETTERS: &str = "dead_letters";
    /// The annual cost of every registered tool.
    pub const STACK_SPEND: &str = "stack_spend";

    /// An audience's size.
    pub fn audience(name: &str) -> String {
        format!("audience:{name}")
    }
}

/// Who owns a goal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    Marketing,
    It,
    Both,
}

impl Owner {
    /// Every owner, in the order settings list them.
    pub const ALL: [Owner; 3] = [Owner::Marketing, Owner::It, Owner::Both];

    /// The owner as settings name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Marketing => "marketing",
            Owner::It => "it",
            Owner::Both => "both",
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.pad(self.as_str())
    }
}

impl FromStr for Owner {
    type Err = GoalError;

    fn from_str(text: &str) -> Result<Self, GoalError> {
        Owner::ALL
            .into_iter()
            .find(|owner| owner.as_str() == text.trim())
            .ok_or_else(|| GoalError::new("owner", "must be marketing, it or both"))
    }
}

/// Which way is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Higher,
    Lower,
}

impl Direction {
    /// The direction as settings name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Higher => "higher",
            Direction::Lower => "lower",
        }
    }

    /// Whether `value` is as good as `bar` or better.
    fn meets(self, value: f64, bar: f64) -> bool {
        // A hair of slack, so a rate computed as 9.999… meets 10.
        let slack = 1e-9 * bar.abs().max(1.0);
        match self {
            Direction::Higher => value >= bar - slack,
            Direction::Lower => value <= bar + slack,
        }
    }
}

impl FromStr for Direction {
    type Err = GoalError;

    fn from_str(text: &str) -> Result<Self, GoalError> {
        match text.trim() {
            "higher" => Ok(Direction::Higher),
            "lower" => Ok(Direction::Lower),
            _ => Err(GoalError::new("direction", "must be higher or lower")),
        }
    }
}

/// What a value is measured in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Count,
    /// The company's currency (as events and the registry state it).
    Money,
    /// 0 to 100.
    Percent,
    Milliseconds,
}

/// How a value accumulates over its period (see the module's header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Total,
    Level,
    Rate,
}

/// What a goal measures, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Metric {
    /// The sum of a numeric property over `track` events of one name.
    Revenue { event: String, property: String },
    /// The share of profiles whose first `from` event fell in the period
    /// that did `to` at or after it, within `within` (`7d`, `12h`, `30m`).
    Conversion { from: String, to: String, within: String },
    /// Profiles with an event in the last `within_days` days.
    ActiveCustomers { within_days: u32 },
    /// Profiles whose first event fell in the period.
    NewCustomers,
    /// Profiles seen before but with no event in the last `inactive_days` days.
    ChurnedCustomers { inactive_days: u32 },
    /// An audience's size.
    AudienceSize { audience: String },
    /// Events received.
    IngestVolume,
    /// Tracking-plan violations per 100 events received.
    ViolationRate,
    /// Items delivered per 100 delivered or dead-lettered.
    DeliverySuccessRate,
    /// Profiles merged into another per 100 profiles created.
    MergeRate,
    /// The 99th percentile of the time tracking calls and webhooks take to
    /// be answered (durable), in milliseconds.
    IngestLatencyP99,
    /// The annual cost of every tool in the stack registry.
    StackSpend,
}

/// The metric kinds, as named in settings and on the command line.
pub const METRIC_KINDS: [&str; 12] = [
    "revenue",
    "conversion",
    "active_customers",
    "new_customers",
    "churned_customers",
    "audience_size",
    "ingest_volume",
    "violation_rate",
    "delivery_success_rate",
    "merge_rate",
    "ingest_latency_p99",
    "stack_spend",
];

impl Metric {
    /// The kind's name, as in settings.
    pub fn kind(&self) -> &'static str {
        match self {
            Metric::Revenue { .. } => "revenue",
            Metric::Conversion { .. } => "conversion",
            Metric::ActiveCustomers { .. } => "active_customers",
            Metric::NewCustomers => "new_customers",
            Metric::ChurnedCustomers { .. } => "churned_customers",
            Metric::AudienceSize { .. } => "audience_size",
            Metric::IngestVolume => "ingest_volume",
            Metric::ViolationRate => "violation_rate",
            Metric::DeliverySuccessRate => "delivery_success_rate",
            Metric::MergeRate => "merge_rate",
            Metric::IngestLatencyP99 => "ingest_latency_p99",
            Metric::StackSpend => "stack_spend",
        }
    }

    /// What its values are measured in.
    pub fn unit(&self) -> Unit {
        match self {
            Metric::Revenue { .. } | Metric::StackSpend => Unit::Money,
            Metric::Conversion { .. } | Metric::ViolationRate | Metric::DeliverySuccessRate | Metric::MergeRate => {
                Unit::Percent
            }
            Metric::IngestLatencyP99 => Unit::Milliseconds,
            Metric::ActiveCustomers { .. }
            | Metric::NewCustomers
            | Metric::ChurnedCustomers { .. }
            | Metric::AudienceSize { .. }
            | Metric::IngestVolume => Unit::Count,
        }
    }

    /// How its value accumulates over a period.
    pub fn shape(&self) -> Shape {
        match self {
            Metric::Revenue { .. } | Metric::NewCustomers | Metric::IngestVolume => Shape::Total,
            Metric::ActiveCustomers { .. }
            | Metric::ChurnedCustomers { .. }
            | Metric::AudienceSize { .. }
            | Metric::StackSpend => Shape::Level,
            Metric::Conversion { .. }
            | Metric::ViolationRate
            | Metric::DeliverySuccessRate
            | Metric::MergeRate
            | Metric::IngestLatencyP99 => Shape::Rate,
        }
    }

    /// Which way is better unless the goal says.
    pub fn default_direction(&self) -> Direction {
        match self {
            Metric::ChurnedCustomers { .. } | Metric::ViolationRate | Metric::IngestLatencyP99 | Metric::StackSpend => {
                Direction::Lower
            }
            _ => Direction::Higher,
        }
    }

    /// A line saying what is measured.
    pub fn describe(&self) -> String {
        match self {
            Metric::Revenue { event, property } => format!("sum of {property} over {event:?} events"),
            Metric::Conversion { from, to, within } => {
                format!("share of customers doing {to:?} within {within} after their first {from:?}")
            }
            Metric::ActiveCustomers { within_days } => format!("customers active within {within_days} days"),
            Metric::NewCustomers => "customers first seen in the period".to_owned(),
            Metric::ChurnedCustomers { inactive_days } => {
                format!("customers with no activity within {inactive_days} days")
            }
            Metric::AudienceSize { audience } => format!("size of the audience {audience:?}"),
            Metric::IngestVolume => "events received".to_owned(),
            Metric::ViolationRate => "tracking-plan violations per 100 events received".to_owned(),
            Metric::DeliverySuccessRate => "deliveries accepted per 100 delivered or dead-lettered".to_owned(),
            Metric::MergeRate => "profiles merged per 100 created".to_owned(),
            Metric::IngestLatencyP99 => "99th percentile of ingest latency".to_owned(),
            Metric::StackSpend => "annual cost of the registered stack".to_owned(),
        }
    }
}

/// A goal as a person defines it and as it is stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GoalSettings {
    pub name: String,
    pub metric: Metric,
    pub target: f64,
    /// `month`, `quarter`, `year` or `week` (the current one, so the goal
    /// starts again each time), a year `2026`, a quarter `2026-Q3`, a month
    /// `2026-07`, or days `2026-07-01..2026-09-30` (both included); UTC.
    pub period: String,
    pub owner: Owner,
    /// Better higher or lower; the metric's default when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
}

/// Settings that cannot make a goal; `field` is the path at fault
/// (`metric.within`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {message}")]
pub struct GoalError {
    pub field: String,
    pub message: String,
    /// The JSON was shaped wrong (a missing field, a wrong type) rather
    /// than holding a value that makes no goal.
    pub malformed: bool,
}

impl GoalError {
    /// A value that makes no goal.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        GoalError { field: field.into(), message: message.into(), malformed: false }
    }

    /// A missing field or one of the wrong type.
    fn malformed(field: impl Into<String>, message: impl Into<String>) -> Self {
        GoalError { malformed: true, ..GoalError::new(field, message) }
    }
}

/// Reads the fields of one JSON object, naming them in errors.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn only(&self, allowed: &[&str]) -> Result<(), GoalError> {
        match self.object.keys().find(|key| !allowed.contains(&key.as_str())) {
            Some(key) => Err(GoalError::new(self.path(key), "is not a setting here")),
            None => Ok(()),
        }
    }

    fn text(&self, name: &str) -> Result<Option<&'a str>, GoalError> {
        match self.object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(GoalError::malformed(self.path(name), "must be a string")),
        }
    }

    fn required_text(&self, name: &str) -> Result<&'a str, GoalError> {
        self.text(name)?.ok_or_else(|| GoalError::malformed(self.path(name), "is required"))
    }

    fn number(&self, name: &str) -> Result<Option<f64>, GoalError> {
        match self.object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => {
                value.as_f64().map(Some).ok_or_else(|| GoalError::malformed(self.path(name), "must be a number"))
            }
        }
    }

    fn days(&self, name: &str) -> Result<u32, GoalError> {
        let Some(days) = self.number(name)? else { return Ok(DEFAULT_ACTIVITY_DAYS) };
        if days.fract() != 0.0 || !(1.0..=f64::from(MAX_WINDOW_DAYS)).contains(&days) {
            return Err(GoalError::new(
                self.path(name),
                format!("must be a whole number of days from 1 to {MAX_WINDOW_DAYS}"),
            ));
        }
        Ok(days as u32)
    }
}

/// A name of an event or property: trimmed, not empty, not too long.
fn event_text(field: String, text: &str) -> Result<String, GoalError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(GoalError::new(field, "must not be empty"));
    }
    if text.chars().any(char::is_control) {
        return Err(GoalError::new(field, "must not hold control characters"));
    }
    if text.chars().count() > MAX_EVENT_CHARS {
        return Err(GoalError::new(field, format!("must be at most {MAX_EVENT_CHARS} characters")));
    }
    Ok(text.to_owned())
}

/// `7d`, `12h` or `30m`, in milliseconds.
pub fn parse_within(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let unit = text.chars().last().unwrap_or(' ');
    let unit_ms = match unit {
        'd' => DAY_MS,
        'h' => 3_600_000,
        'm' => 60_000,
        _ => return Err("must be a duration such as 7d, 12h or 30m".to_owned()),
    };
    let amount: i64 = text[..text.len() - 1]
        .parse()
        .ok()
        .filter(|amount| *amount > 0)
        .ok_or_else(|| "must be a duration such as 7d, 12h or 30m".to_owned())?;
    let ms = amount.saturating_mul(unit_ms);
    if ms > i64::from(MAX_WINDOW_DAYS) * DAY_MS {
        return Err(format!("must be at most {MAX_WINDOW_DAYS} days"));
    }
    Ok(ms)
}

impl Metric {
    fn from_json(value: &Value) -> Result<Metric, GoalError> {
        let Value::Object(object) = value else {
            return Err(GoalError::malformed("metric", "must be an object such as {\"kind\": \"revenue\"}"));
        };
        let fields = Fields { object, prefix: "metric." };
        let kind = fields.required_text("kind")?;
        let metric = match kind {
            "revenue" => {
                fields.only(&["kind", "event", "property"])?;
                Metric::Revenue {
                    event: event_text(fields.path("event"), fields.text("event")?.unwrap_or("Order Completed"))?,
                    property: event_text(fields.path("property"), fields.text("property")?.unwrap_or("revenue"))?,
                }
            }
            "conversion" => {
                fields.only(&["kind", "from", "to", "within"])?;
                let from = event_text(fields.path("from"), fields.required_text("from")?)?;
                let to = event_text(fields.path("to"), fields.required_text("to")?)?;
                if from == to {
                    return Err(GoalError::new("metric.to", "must differ from metric.from"));
                }
                let within = fields.text("within")?.unwrap_or("7d").trim().to_owned();
                parse_within(&within).map_err(|message| GoalError::new("metric.within", message))?;
                Metric::Conversion { from, to, within }
            }
            "active_customers" => {
                fields.only(&["kind", "within_days"])?;
                Metric::ActiveCustomers { within_days: fields.days("within_days")? }
            }
            "churned_customers" => {
                fields.only(&["kind", "inactive_days"])?;
                Metric::ChurnedCustomers { inactive_days: fields.days("inactive_days")? }
            }
            "audience_size" => {
                fields.only(&["kind", "audience"])?;
                Metric::AudienceSize {
                    audience: event_text(fields.path("audience"), fields.required_text("audience")?)?,
                }
            }
            simple => {
                let metric = match simple {
                    "new_customers" => Metric::NewCustomers,
                    "ingest_volume" => Metric::IngestVolume,
                    "violation_rate" => Metric::ViolationRate,
                    "delivery_success_rate" => Metric::DeliverySuccessRate,
                    "merge_rate" => Metric::MergeRate,
                    "ingest_latency_p99" => Metric::IngestLatencyP99,
                    "stack_spend" => Metric::StackSpend,
                    other => {
                        return Err(GoalError::new(
                            "metric.kind",
                            format!("{other:?} is not a metric; use one of {}", METRIC_KINDS.join(", ")),
                        ))
                    }
                };
                fields.only(&["kind"])?;
                metric
            }
        };
        Ok(metric)
    }
}

impl GoalSettings {
    /// Reads settings from a JSON object, naming the field at fault, and
    /// checks that they make a goal.
    pub fn from_json(value: &Value) -> Result<GoalSettings, GoalError> {
        let Value::Object(object) = value else {
            return Err(GoalError::malformed("goal", "must be a JSON object"));
        };
        let fields = Fields { object, prefix: "" };
        fields.only(&["name", "metric", "target", "period", "owner", "direction"])?;
        let metric =
            Metric::from_json(object.get("metric").ok_or_else(|| GoalError::malformed("metric", "is required"))?)?;
        let settings = GoalSettings {
            name: fields.required_text("name")?.to_owned(),
            metric,
            target: fields.number("target")?.ok_or_else(|| GoalError::malformed("target", "is required"))?,
            period: fields.required_text("period")?.to_owned(),
            owner: fields.required_text("owner")?.parse()?,
            direction: fields.text("direction")?.map(str::parse).transpose()?,
        };
        Ok(settings.compile()?.settings)
    }

    /// Validates the settings and compiles them into a goal. The name and
    /// the period are trimmed.
    pub fn compile(&self) -> Result<Goal, GoalError> {
        let name = self.name.trim();
        if name.is_empty() {
            return Err(GoalError::new("name", "must not be empty"));
        }
        if name.chars().count() > MAX_NAME_CHARS {
            return Err(GoalError::new("name", format!("must be at most {MAX_NAME_CHARS} characters")));
        }
        if name.chars().any(char::is_control) {
            return Err(GoalError::new("name", "must not hold control characters"));
        }
        if !self.target.is_finite() || self.target < 0.0 {
            return Err(GoalError::new("target", "must be a number of at least 0"));
        }
        if self.metric.unit() == Unit::Percent && self.target > 100.0 {
            return Err(GoalError::new("target", "is a percentage: at most 100"));
        }
        let period: Period = self.period.parse().map_err(|message| GoalError::new("period", message))?;
        let within_ms = match &self.metric {
            Metric::Conversion { within, .. } => {
                parse_within(within).map_err(|message| GoalError::new("metric.within", message))?
            }
            _ => 0,
        };
        let mut settings = self.clone();
        settings.name = name.to_owned();
        settings.period = self.period.trim().to_owned();
        Ok(Goal {
            direction: self.direction.unwrap_or_else(|| self.metric.default_direction()),
            settings,
            period,
            within_ms,
        })
    }
}

/// A goal's period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    /// The current ISO week (Monday to Sunday).
    Week,
    Month,
    Quarter,
    Year,
    /// Fixed days, both included.
    Days {
        first: NaiveDate,
        last: NaiveDate,
    },
}

const PERIOD_HELP: &str = "must be week, month, quarter, year, a year (2026), a quarter (2026-Q3), \
     a month (2026-07) or days (2026-07-01..2026-09-30)";

impl FromStr for Period {
    type Err = String;

    fn from_str(text: &str) -> Result<Period, String> {
        let text = text.trim();
        let month_days = |year: i32, month: u32| -> Option<(NaiveDate, NaiveDate)> {
            let first = NaiveDate::from_ymd_opt(year, month, 1)?;
            let next = if month == 12 {
                NaiveDate::from_ymd_opt(year + 1, 1, 1)?
            } else {
                NaiveDate::from_ymd_opt(year, month + 1, 1)?
            };
            Some((first, next.pred_opt()?))
        };
        if !text.is_ascii() {
            return Err(PERIOD_HELP.to_owned());
        }
        let period = match text {
            "week" => Period::Week,
            "month" => Period::Month,
            "quarter" => Period::Quarter,
            "year" => Period::Year,
            _ if text.contains("..") => {
                let (first, last) = text.split_once("..").unwrap_or_default();
                let date = |text: &str| NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").ok();
                let (Some(first), Some(last)) = (date(first), date(last)) else {
                    return Err(PERIOD_HELP.to_owned());
                };
                if last < first {
                    return Err("must end on or after the day it starts".to_owned());
                }
                if (last - first).num_days() >= MAX_PERIOD_DAYS {
                    return Err(format!("must be at most {MAX_PERIOD_DAYS} days long"));
                }
                Period::Days { first, last }
            }
            _ if text.len() == 4 => {
                let year: i32 = text.parse().map_err(|_| PERIOD_HELP.to_owned())?;
                let first = NaiveDate::from_ymd_opt(year, 1, 1).ok_or(PERIOD_HELP)?;
                let last = NaiveDate::from_ymd_opt(year, 12, 31).ok_or(PERIOD_HELP)?;
                Period::Days { first, last }
            }
            _ if text.len() == 7 && &text[4..5] == "-" && text.as_bytes()[5].eq_ignore_ascii_case(&b'q') => {
                let year: i32 = text[..4].parse().map_err(|_| PERIOD_HELP.to_owned())?;
                let quarter: u32 = text[6..].parse().ok().filter(|q| (1..=4).contains(q)).ok_or(PERIOD_HELP)?;
                let (first, _) = month_days(year, quarter * 3 - 2).ok_or(PERIOD_HELP)?;
                let (_, last) = month_days(year, quarter * 3).ok_or(PERIOD_HELP)?;
                Period::Days { first, last }
            }
            _ if text.len() == 7 => {
                let year: i32 = text[..4].parse().map_err(|_| PERIOD_HELP.to_owned())?;
                let month: u32 = text[5..].parse().map_err(|_| PERIOD_HELP.to_owned())?;
                if &text[4..5] != "-" {
                    return Err(PERIOD_HELP.to_owned());
                }
                let (first, last) = month_days(year, month).ok_or(PERIOD_HELP)?;
                Period::Days { first, last }
            }
            _ => return Err(PERIOD_HELP.to_owned()),
        };
        Ok(period)
    }
}

impl Period {
    /// The days the period covers at `now_ms`: the first, and the one after
    /// the last.
    pub fn span(&self, now_ms: i64) -> (Day, Day) {
        let today = day_of(now_ms);
        let date = |day: Day| NaiveDate::from_num_days_from_ce_opt(day + EPOCH_CE_DAYS).unwrap_or_default();
        let number = |date: NaiveDate| date.num_days_from_ce() - EPOCH_CE_DAYS;
        let now = date(today);
        let first_of = |year: i32, month: u32| NaiveDate::from_ymd_opt(year, month, 1).map_or(today, number);
        match self {
            Period::Week => {
                let start = today - now.weekday().num_days_from_monday() as Day;
                (start, start + 7)
            }
            Period::Month => {
                let next = if now.month() == 12 { (now.year() + 1, 1) } else { (now.year(), now.month() + 1) };
                (first_of(now.year(), now.month()), first_of(next.0, next.1))
            }
            Period::Quarter => {
                let first_month = (now.month() - 1) / 3 * 3 + 1;
                let next = if first_month == 10 { (now.year() + 1, 1) } else { (now.year(), first_month + 3) };
                (first_of(now.year(), first_month), first_of(next.0, next.1))
            }
            Period::Year => (first_of(now.year(), 1), first_of(now.year() + 1, 1)),
            Period::Days { first, last } => (number(*first), number(*last) + 1),
        }
    }
}

/// Days from 0001-01-01 (chrono's day 1) to 1970-01-01.
const EPOCH_CE_DAYS: i32 = 719_163;

/// A validated goal, ready to evaluate.
#[derive(Clone, Debug, PartialEq)]
pub struct Goal {
    pub settings: GoalSettings,
    pub period: Period,
    pub direction: Direction,
    /// A conversion's window, in milliseconds (0 for other metrics).
    within_ms: i64,
}

/// What a goal's evaluation reads, for the caller to gather.
#[derive(Clone, Debug, PartialEq)]
pub struct Needs {
    /// The tracker whose days it reads, if any.
    pub tracker: Option<TrackerSpec>,
    /// Whether the tracker's days are read from the first one kept (levels
    /// built from daily changes) rather than from the period's start.
    pub from_the_first_day: bool,
    /// Snapshot keys it reads; the last value before the period is needed too.
    pub snapshots: Vec<String>,
    /// Whether it reads ingest latency histograms.
    pub latency: bool,
}

/// The figures a goal is evaluated from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GoalData {
    /// The tracker's values by series, then day.
    pub daily: BTreeMap<String, BTreeMap<Day, f64>>,
    /// Snapshot values by key, then day (the day's last).
    pub snapshots: BTreeMap<String, BTreeMap<Day, f64>>,
    /// Ingest latency per day.
    pub latency: BTreeMap<Day, LatencyHistogram>,
    /// False while the tracker is still reading the log's past: the value
    /// is then partial.
    pub complete: bool,
}

/// Where a goal stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// The period has not begun.
    NotStarted,
    OnTrack,
    OffTrack,
    /// The period is over and the target was reached.
    Met,
    /// The period is over and the target was not reached.
    Missed,
    /// Nothing to judge yet (a rate with nothing to divide by).
    NoData,
    /// A tracker is still reading the log's past: the value is partial
    /// and not judged yet.
    Counting,
}

impl Standing {
    /// The standing as the API names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::NotStarted => "not_started",
            Standing::OnTrack => "on_track",
            Standing::OffTrack => "off_track",
            Standing::Met => "met",
            Standing::Missed => "missed",
            Standing::NoData => "no_data",
            Standing::Counting => "counting",
        }
    }

    /// Whether the goal needs attention: off track or missed.
    pub fn is_bad(self) -> bool {
        matches!(self, Standing::OffTrack | Standing::Missed)
    }
}

/// One day of a goal's trend.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TrendPoint {
    pub day: Day,
    /// The value as it stood at the day's end.
    pub value: Option<f64>,
    /// What it was judged against at the day's end.
    pub expected: Option<f64>,
}

/// A goal evaluated at one instant.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GoalReport {
    /// The first day of the period, and the day after its last.
    pub start_day: Day,
    pub end_day: Day,
    pub value: Option<f64>,
    /// What the value is judged against now (see the module's header).
    pub expected: Option<f64>,
    /// The share of the period elapsed, 0 to 1.
    pub progress: f64,
    pub standing: Standing,
    pub trend: Vec<TrendPoint>,
    /// False while a tracker is still reading the log's past.
    pub complete: bool,
}

impl Goal {
    /// The goal's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// What the goal measures.
    pub fn metric(&self) -> &Metric {
        &self.settings.metric
    }

    /// What evaluating this goal reads.
    pub fn needs(&self) -> Needs {
        let tracker = match &self.settings.metric {
            Metric::Revenue { event, property } => Some(TrackerSpec::Events {
                event: Some(event.clone()),
                property: Some(property.clone()),
                clock: EventClock::Happened,
            }),
            Metric::Conversion { from, to, .. } => {
                Some(TrackerSpec::Conversion { from: from.clone(), to: to.clone(), within_ms: self.within_ms })
            }
            Metric::ActiveCustomers { within_days } => Some(TrackerSpec::Activity { window_days: *within_days }),
            Metric::ChurnedCustomers { inactive_days } => Some(TrackerSpec::Activity { window_days: *inactive_days }),
            Metric::NewCustomers => Some(TrackerSpec::Activity { window_days: DEFAULT_ACTIVITY_DAYS }),
            Metric::IngestVolume => {
                Some(TrackerSpec::Events { event: None, property: None, clock: EventClock::Received })
            }
            Metric::MergeRate => Some(TrackerSpec::Identity),
            _ => None,
        };
        let snapshots = match &self.settings.metric {
            Metric::AudienceSize { audience } => vec![snapshot::audience(audience)],
            Metric::StackSpend => vec![snapshot::STACK_SPEND.to_owned()],
            Metric::ViolationRate => vec![snapshot::VIOLATIONS.to_owned(), snapshot::EVENTS.to_owned()],
            Metric::DeliverySuccessRate => {
                vec![snapshot::DELIVERED.to_owned(), snapshot::DEAD_LETTERS.to_owned()]
            }
            _ => Vec::new(),
        };
        Needs {
            from_the_first_day: matches!(
                self.settings.metric,
                Metric::ActiveCustomers { .. } | Metric::ChurnedCustomers { .. }
            ),
            tracker,
            snapshots,
            latency: matches!(self.settings.metric, Metric::IngestLatencyP99),
        }
    }

    /// The value as it stood at the end of `day`, counting from the
    /// period's first day `start`.
    fn value_through(&self, data: &GoalData, start: Day, day: Day) -> Option<f64> {
        let sum = |name: &str| -> f64 {
            data.daily.get(name).map_or(0.0, |days| days.range(start..=day).map(|(_, value)| value).sum())
        };
        let prefix = |name: &str| -> f64 {
            data.daily.get(name).map_or(0.0, |days| days.range(..=day).map(|(_, value)| value).sum())
        };
        let percent = |part: f64, whole: f64| (whole > 0.0).then(|| 100.0 * part / whole);
        match &self.settings.metric {
            Metric::Revenue { .. } => Some(sum(series::SUM)),
            Metric::IngestVolume => Some(sum(series::COUNT)),
            Metric::NewCustomers => Some(sum(series::NEW)),
            Metric::Conversion { .. } => percent(sum(series::CONVERTED), sum(series::STARTED)),
            Metric::MergeRate => percent(sum(series::MERGED), sum(series::CREATED)),
            Metric::ActiveCustomers { .. } => Some(prefix(series::ACTIVE_CHANGE)),
            Metric::ChurnedCustomers { .. } => Some(prefix(series::NEW) - prefix(series::ACTIVE_CHANGE)),
            Metric::AudienceSize { audience } => level(data, &snapshot::audience(audience), day),
            Metric::StackSpend => level(data, snapshot::STACK_SPEND, day),
            Metric::ViolationRate => {
                let violations = change(data, snapshot::VIOLATIONS, start, day)?;
                percent(violations, change(data, snapshot::EVENTS, start, day)?)
            }
            Metric::DeliverySuccessRate => {
                let delivered = change(data, snapshot::DELIVERED, start, day)?;
                let dead = increases(data, snapshot::DEAD_LETTERS, start, day);
                percent(delivered, delivered + dead)
            }
            Metric::IngestLatencyP99 => {
                let mut merged = LatencyHistogram::default();
                for histogram in data.latency.range(start..=day).map(|(_, histogram)| histogram) {
                    merged.merge(histogram);
                }
                merged.quantile_ms(0.99)
            }
        }
    }

    /// What the value is judged against when `fraction` of the period has
    /// elapsed; `baseline` is a level's value when the period began.
    fn expected(&self, fraction: f64, baseline: Option<f64>) -> f64 {
        let target = self.settings.target;
        match self.settings.metric.shape() {
            Shape::Total => target * fraction,
            Shape::Level => match baseline {
                Some(baseline) => baseline + (target - baseline) * fraction,
                None => target,
            },
            Shape::Rate => target,
        }
    }

    /// Evaluates the goal at `now_ms` from `data`.
    pub fn evaluate(&self, data: &GoalData, now_ms: i64) -> GoalReport {
        let (start, end) = self.period.span(now_ms);
        let (start_ms, end_ms) = (day_start_ms(start), day_start_ms(end));
        let span_ms = (end_ms - start_ms).max(1) as f64;
        let fraction_at = |at_ms: i64| ((at_ms - start_ms) as f64 / span_ms).clamp(0.0, 1.0);
        let progress = fraction_at(now_ms);
        let mut report = GoalReport {
            start_day: start,
            end_day: end,
            value: None,
            expected: None,
            progress,
            standing: Standing::NotStarted,
            trend: Vec::new(),
            complete: data.complete,
        };
        let today = day_of(now_ms);
        if today < start {
            return report;
        }
        let baseline = match self.settings.metric.shape() {
            Shape::Level => {
                self.value_through(data, start, start - 1).or_else(|| self.value_through(data, start, start))
            }
            _ => None,
        };
        let last = today.min(end - 1);
        for day in start..=last {
            let value = match self.settings.metric {
                Metric::IngestLatencyP99 => self.value_through(data, day, day),
                _ => self.value_through(data, start, day),
            };
            let fraction = fraction_at(day_start_ms(day + 1).min(now_ms.max(day_start_ms(day))));
            report.trend.push(TrendPoint { day, value, expected: Some(self.expected(fraction, baseline)) });
        }
        report.value = self.value_through(data, start, last);
        let over = today >= end;
        let expected = self.expected(if over { 1.0 } else { progress }, baseline);
        report.expected = Some(expected);
        report.standing = match report.value {
            _ if !data.complete => Standing::Counting,
            None => Standing::NoData,
            Some(value) if over => {
                if self.direction.meets(value, self.settings.target) {
                    Standing::Met
                } else {
                    Standing::Missed
                }
            }
            Some(value) if self.direction.meets(value, expected) => Standing::OnTrack,
            Some(_) => Standing::OffTrack,
        };
        report
    }
}

/// A snapshot's last value on or before `day`.
fn level(data: &GoalData, key: &str, day: Day) -> Option<f64> {
    data.snapshots.get(key)?.range(..=day).next_back().map(|(_, value)| *value)
}

/// How much a cumulative snapshot grew from before `start` to the end of
/// `day`. Before the first snapshot the counter counts as 0, so what was
/// counted before snapshots began lands on their first day.
fn change(data: &GoalData, key: &str, start: Day, day: Day) -> Option<f64> {
    let days = data.snapshots.get(key);
    let now = days?.range(..=day).next_back().map(|(_, value)| *value)?;
    let before = days?.range(..start).next_back().map_or(0.0, |(_, value)| *value);
    Some((now - before).max(0.0))
}

/// The sum of the rises of a snapshot (one that also falls, such as dead
/// letters that are replayed) from before `start` to the end of `day`.
fn increases(data: &GoalData, key: &str, start: Day, day: Day) -> f64 {
    let Some(days) = data.snapshots.get(key) else { return 0.0 };
    let mut previous = days.range(..start).next_back().map_or(0.0, |(_, value)| *value);
    let mut risen = 0.0;
    for (_, value) in days.range(start..=day) {
        risen += (value - previous).max(0.0);
        previous = *value;
    }
    risen
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn date_ms(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp_millis()
    }

    fn day(text: &str) -> Day {
        day_of(date_ms(&format!("{text}T00:00:00Z")))
    }

    fn goal(settings: Value) -> Goal {
        GoalSettings::from_json(&settings).unwrap().compile().unwrap()
    }

    fn error(settings: Value) -> GoalError {
        GoalSettings::from_json(&settings).unwrap_err()
    }

    fn series_of(pairs: &[(Day, f64)]) -> BTreeMap<Day, f64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn settings_read_from_json_with_defaults_and_round_trip() {
        let settings = GoalSettings::from_json(&json!({
            "name": "  Q3 revenue ", "owner": "marketing", "target": 250000, "period": "2026-Q3",
            "metric": {"kind": "revenue"}
        }))
        .unwrap();
        assert_eq!(settings.metric, Metric::Revenue { event: "Order Completed".into(), property: "revenue".into() });
        let goal = settings.compile().unwrap();
        assert_eq!(goal.name(), "Q3 revenue");
        assert_eq!(goal.direction, Direction::Higher);
        let stored = serde_json::to_value(&goal.settings).unwrap();
        assert_eq!(GoalSettings::from_json(&stored).unwrap(), goal.settings);
        let churn = goal_settings_for("churned_customers");
        assert_eq!(churn.compile().unwrap().direction, Direction::Lower);
    }

    fn goal_settings_for(kind: &str) -> GoalSettings {
        GoalSettings::from_json(&json!({
            "name": kind, "owner": "it", "target": 10, "period": "month", "metric": {"kind": kind}
        }))
        .unwrap()
    }

    #[test]
    fn every_metric_kind_reads_with_its_defaults() {
        for kind in METRIC_KINDS {
            let settings = match kind {
                "conversion" => GoalSettings::from_json(&json!({
                    "name": "c", "owner": "both", "target": 5, "period": "week",
                    "metric": {"kind": "conversion", "from": "Signed Up", "to": "Order Completed"}
                }))
                .unwrap(),
                "audience_size" => GoalSettings::from_json(&json!({
                    "name": "a", "owner": "both", "target": 5, "period": "year",
                    "metric": {"kind": "audience_size", "audience": "vip"}
                }))
                .unwrap(),
                kind => goal_settings_for(kind),
            };
            assert_eq!(settings.metric.kind(), kind);
            let goal = settings.compile().unwrap();
            let needs = goal.needs();
            assert!(needs.tracker.is_some() || !needs.snapshots.is_empty() || needs.latency, "{kind} reads nothing");
        }
    }

    #[test]
    fn bad_settings_name_the_field_at_fault() {
        let base =
            json!({"name": "g", "owner": "it", "target": 1, "period": "month", "metric": {"kind": "ingest_volume"}});
        let with = |path: &str, value: Value| {
            let mut settings = base.clone();
            match path.split_once('.') {
                Some((outer, inner)) => settings[outer][inner] = value,
                None => settings[path] = value,
            }
            error(settings)
        };
        assert_eq!(with("name", json!("")).field, "name");
        assert_eq!(with("name", json!(7)).field, "name");
        assert!(with("name", json!(7)).malformed);
        assert!(!with("name", json!("")).malformed);
        assert_eq!(with("target", json!(-1)).field, "target");
        assert_eq!(with("target", json!("lots")).field, "target");
        assert_eq!(with("period", json!("fortnight")).field, "period");
        assert_eq!(with("period", json!("2026-02-10..2026-02-01")).field, "period");
        assert_eq!(with("owner", json!("sales")).field, "owner");
        assert_eq!(with("direction", json!("up")).field, "direction");
        assert_eq!(with("colour", json!("red")).field, "colour");
        assert_eq!(with("metric.kind", json!("profit")).field, "metric.kind");
        assert_eq!(with("metric.event", json!("x")).field, "metric.event");
        let conversion = |metric: Value| {
            error(json!({"name": "g", "owner": "it", "target": 1, "period": "month", "metric": metric}))
        };
        assert_eq!(conversion(json!({"kind": "conversion", "to": "b"})).field, "metric.from");
        assert_eq!(conversion(json!({"kind": "conversion", "from": "a", "to": "a"})).field, "metric.to");
        assert_eq!(
            conversion(json!({"kind": "conversion", "from": "a", "to": "b", "within": "7w"})).field,
            "metric.within"
        );
        assert_eq!(conversion(json!({"kind": "active_customers", "within_days": 0})).field, "metric.within_days");
        assert_eq!(conversion(json!({"kind": "audience_size"})).field, "metric.audience");
        let rate = error(
            json!({"name": "g", "owner": "it", "target": 120, "period": "month", "metric": {"kind": "merge_rate"}}),
        );
        assert_eq!((rate.field.as_str(), rate.malformed), ("target", false));
        assert_eq!(error(json!([1])).field, "goal");
        assert_eq!(error(json!({"name": "g"})).field, "metric");
    }

    #[test]
    fn periods_name_calendar_spans_in_utc() {
        let now = date_ms("2026-08-19T15:00:00Z"); // a Wednesday
        let span = |text: &str| text.parse::<Period>().unwrap().span(now);
        assert_eq!(span("week"), (day("2026-08-17"), day("2026-08-24")));
        assert_eq!(span("month"), (day("2026-08-01"), day("2026-09-01")));
        assert_eq!(span("quarter"), (day("2026-07-01"), day("2026-10-01")));
        assert_eq!(span("year"), (day("2026-01-01"), day("2027-01-01")));
        assert_eq!(span("2025"), (day("2025-01-01"), day("2026-01-01")));
        assert_eq!(span("2026-q4"), (day("2026-10-01"), day("2027-01-01")));
        assert_eq!(span("2026-02"), (day("2026-02-01"), day("2026-03-01")));
        assert_eq!(span("2026-02-03..2026-02-03"), (day("2026-02-03"), day("2026-02-04")));
        let december = date_ms("2026-12-31T23:59:59Z");
        assert_eq!("month".parse::<Period>().unwrap().span(december), (day("2026-12-01"), day("2027-01-01")));
        assert_eq!("quarter".parse::<Period>().unwrap().span(december), (day("2026-10-01"), day("2027-01-01")));
        for bad in ["2026-13", "2026-Q5", "26", "2026-02-30..2026-03-01", "soon"] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_total_is_judged_against_the_target_pro_rated_by_time() {
        let goal = goal(json!({
            "name": "revenue", "owner": "marketing", "target": 1000, "period": "2026-04-01..2026-04-10",
            "metric": {"kind": "revenue"}
        }));
        let start = day("2026-04-01");
        let mut data = GoalData { complete: true, ..GoalData::default() };
        data.daily.insert(series::SUM.into(), series_of(&[(start - 1, 999.0), (start, 300.0), (start + 1, 100.0)]));
        // Half-way through the second day: 15 % of the period, 400 earned.
        let now = day_start_ms(start + 1) + DAY_MS / 2;
        let report = goal.evaluate(&data, now);
        assert_eq!(report.value, Some(400.0), "the day before the period does not count");
        assert!((report.progress - 0.15).abs() < 1e-9);
        assert!((report.expected.unwrap() - 150.0).abs() < 1e-9);
        assert_eq!(report.standing, Standing::OnTrack);
        assert_eq!(report.trend.len(), 2);
        assert_eq!(report.trend[0].value, Some(300.0));
        assert!((report.trend[0].expected.unwrap() - 100.0).abs() < 1e-9);
        // Late in the period, the same 400 is behind.
        let late = goal.evaluate(&data, day_start_ms(start + 8));
        assert_eq!(late.standing, Standing::OffTrack);
        assert_eq!(late.trend.len(), 9);
        // After the period, it was missed.
        let after = goal.evaluate(&data, day_start_ms(start + 20));
        assert_eq!((after.standing, after.progress, after.trend.len()), (Standing::Missed, 1.0, 10));
        let partial = GoalData { complete: false, ..data.clone() };
        let counting = goal.evaluate(&partial, now);
        assert_eq!(
            (counting.standing, counting.value),
            (Standing::Counting, Some(400.0)),
            "a partial value is not judged"
        );
        let before = goal.evaluate(&data, day_start_ms(start - 3));
        assert_eq!((before.standing, before.value, before.trend.len()), (Standing::NotStarted, None, 0));
    }

    #[test]
    fn a_level_is_judged_from_where_it_began_and_lower_can_be_better() {
        let goal = goal(json!({
            "name": "churn", "owner": "marketing", "target": 50, "period": "2026-04-01..2026-04-10",
            "metric": {"kind": "churned_customers", "inactive_days": 7}
        }));
        let start = day("2026-04-01");
        let mut data = GoalData { complete: true, ..GoalData::default() };
        // 150 customers known before the period, 50 of them active: 100 churned.
        data.daily.insert(series::NEW.into(), series_of(&[(start - 30, 150.0)]));
        data.daily.insert(
            series::ACTIVE_CHANGE.into(),
            series_of(&[(start - 30, 150.0), (start - 20, -100.0), (start + 2, 40.0)]),
        );
        let report = goal.evaluate(&data, day_start_ms(start + 5));
        // Churned fell from 100 to 60; the line from 100 to 50 is at 75 after 50 %.
        assert_eq!(report.value, Some(60.0));
        assert!((report.expected.unwrap() - 75.0).abs() < 1e-9);
        assert_eq!(report.standing, Standing::OnTrack);
        assert_eq!(report.trend[0].value, Some(100.0));
        assert_eq!(report.trend[2].value, Some(60.0));
    }

    #[test]
    fn rates_divide_what_the_period_added_and_have_no_value_with_nothing_to_divide() {
        let settings = |metric: Value, target: f64| {
            goal(
                json!({"name": "r", "owner": "it", "target": target, "period": "2026-04-01..2026-04-30", "metric": metric}),
            )
        };
        let start = day("2026-04-01");
        let now = day_start_ms(start + 3);
        let mut data = GoalData { complete: true, ..GoalData::default() };
        // Counters: 1000 events and 10 violations before the period; 2000 and 40 now.
        data.snapshots.insert(snapshot::EVENTS.into(), series_of(&[(start - 5, 1000.0), (start + 2, 2000.0)]));
        data.snapshots.insert(snapshot::VIOLATIONS.into(), series_of(&[(start - 5, 10.0), (start + 1, 40.0)]));
        let violations = settings(json!({"kind": "violation_rate"}), 2.0).evaluate(&data, now);
        assert_eq!(violations.value, Some(3.0));
        assert_eq!((violations.expected, violations.standing), (Some(2.0), Standing::OffTrack));
        // Dead letters rise, are replayed (fall), rise again: 7 died in all.
        data.snapshots.insert(snapshot::DELIVERED.into(), series_of(&[(start, 93.0)]));
        data.snapshots
            .insert(snapshot::DEAD_LETTERS.into(), series_of(&[(start, 5.0), (start + 1, 0.0), (start + 2, 2.0)]));
        let delivery = settings(json!({"kind": "delivery_success_rate"}), 90.0).evaluate(&data, now);
        assert_eq!(delivery.value, Some(93.0));
        assert_eq!(delivery.standing, Standing::OnTrack);
        let merges = settings(json!({"kind": "merge_rate"}), 10.0).evaluate(&data, now);
        assert_eq!((merges.value, merges.standing), (None, Standing::NoData));
        data.daily.insert(series::CREATED.into(), series_of(&[(start, 40.0)]));
        data.daily.insert(series::MERGED.into(), series_of(&[(start + 1, 10.0)]));
        let merges = settings(json!({"kind": "merge_rate"}), 10.0).evaluate(&data, now);
        assert_eq!((merges.value, merges.standing), (Some(25.0), Standing::OnTrack));
        assert_eq!(merges.trend[0].value, Some(0.0));
    }

    #[test]
    fn latency_is_the_periods_99th_percentile_and_its_trend_each_days() {
        let goal = goal(json!({
            "name": "p99", "owner": "it", "target": 50, "period": "2026-04-01..2026-04-30",
            "metric": {"kind": "ingest_latency_p99"}
        }));
        let start = day("2026-04-01");
        let mut data = GoalData { complete: true, ..GoalData::default() };
        let mut fast = LatencyHistogram::default();
        let mut slow = LatencyHistogram::default();
        for _ in 0..99 {
            fast.record_micros(2_000);
        }
        for _ in 0..10 {
            slow.record_micros(400_000);
        }
        data.latency.insert(start, fast);
        data.latency.insert(start + 1, slow);
        let report = goal.evaluate(&data, day_start_ms(start + 1) + 5);
        let value = report.value.unwrap();
        assert!((400.0..=440.0).contains(&value), "{value}");
        assert_eq!(report.standing, Standing::OffTrack);
        assert!(report.trend[0].value.unwrap() < 2.3);
    }

    proptest! {
        /// A total's value is the sum of the period's days, the trend ends
        /// at the value, and the expected value grows from 0 to the target.
        #[test]
        fn a_totals_trend_accumulates_to_its_value(
            values in prop::collection::vec(0.0f64..1_000.0, 1..40),
            elapsed in 0i64..45,
            target in 1.0f64..100_000.0,
        ) {
            let goal = goal(json!({
                "name": "n", "owner": "it", "target": target, "period": "2026-01-01..2026-01-31",
                "metric": {"kind": "new_customers"}
            }));
            let start = day("2026-01-01");
            let mut data = GoalData { complete: true, ..GoalData::default() };
            data.daily.insert(
                series::NEW.into(),
                values.iter().enumerate().map(|(index, value)| (start - 3 + index as Day, *value)).collect(),
            );
            let now = day_start_ms(start + elapsed as Day) + 1;
            let report = goal.evaluate(&data, now);
            let last = (start + elapsed as Day).min(start + 30);
            let expected_value: f64 =
                data.daily[series::NEW].range(start..=last).map(|(_, value)| value).sum();
            prop_assert!((report.value.unwrap() - expected_value).abs() < 1e-6);
            prop_assert_eq!(report.trend.last().unwrap().value, report.value);
            prop_assert_eq!(report.trend.len() as Day, last - start + 1);
            let mut previous = 0.0;
            for point in &report.trend {
                let expected = point.expected.unwrap();
                prop_assert!(expected >= previous - 1e-9 && expected <= target + 1e-9);
                previous = expected;
            }
        }
    }
}
