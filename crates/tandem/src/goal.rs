//! `tandem goal`: create, list, show and delete the goals marketing and IT
//! share. Settings come from flags (`--metric revenue --target 250000
//! --period 2026-Q3 --owner marketing`), checked by the same rules as the
//! API; reading commands first bring the resolver and the insight stage up
//! to date with the log, so a new goal's past is counted before it is shown.

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::sync::Arc;
use tandem_core::insight::goals::{GoalError, GoalSettings};
use tandem_server::insight::goals::{self, EvaluatedGoal, GoalDefineError};
use tandem_server::insight::{system_clock, InsightStage};
use tandem_store::{Stage, Store};

/// What `tandem goal create` is given.
#[derive(clap::Args, Debug)]
pub struct GoalFlags {
    /// A unique name
    pub name: String,
    /// What is measured: revenue, conversion, active_customers, new_customers, churned_customers,
    /// audience_size, ingest_volume, violation_rate, delivery_success_rate, merge_rate,
    /// ingest_latency_p99 or stack_spend
    #[arg(long)]
    pub metric: String,
    /// The value to reach (percentages as 0 to 100, latency in milliseconds)
    #[arg(long)]
    pub target: f64,
    /// month, quarter, year or week (the current one), a year (2026), a quarter (2026-Q3), a month
    /// (2026-07) or days (2026-07-01..2026-09-30); UTC
    #[arg(long)]
    pub period: String,
    /// Who owns it: marketing, it or both
    #[arg(long)]
    pub owner: String,
    /// Whether higher or lower is better (each metric has a default)
    #[arg(long)]
    pub direction: Option<String>,
    /// revenue: the event whose property is summed (default "Order Completed")
    #[arg(long)]
    pub event: Option<String>,
    /// revenue: the numeric property summed (default revenue)
    #[arg(long)]
    pub property: Option<String>,
    /// conversion: the event that starts it
    #[arg(long = "from-event")]
    pub from_event: Option<String>,
    /// conversion: the event that completes it
    #[arg(long = "to-event")]
    pub to_event: Option<String>,
    /// conversion: how soon after the first event the second must follow (7d, 12h, 30m; default 7d)
    #[arg(long)]
    pub within: Option<String>,
    /// active_customers: active within this many days; churned_customers: inactive for this many (default 30)
    #[arg(long)]
    pub days: Option<u32>,
    /// audience_size: the audience
    #[arg(long)]
    pub audience: Option<String>,
}

impl GoalFlags {
    /// The settings as the API takes them.
    fn settings_json(&self) -> Value {
        let mut metric = Map::new();
        metric.insert("kind".into(), json!(self.metric.trim()));
        let mut put = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                metric.insert(key.to_owned(), value);
            }
        };
        put("event", self.event.clone().map(Value::from));
        put("property", self.property.clone().map(Value::from));
        put("from", self.from_event.clone().map(Value::from));
        put("to", self.to_event.clone().map(Value::from));
        put("within", self.within.clone().map(Value::from));
        put("audience", self.audience.clone().map(Value::from));
        let days_key = if self.metric.trim() == "churned_customers" { "inactive_days" } else { "within_days" };
        put(days_key, self.days.map(Value::from));
        let mut settings = json!({
            "name": self.name, "metric": metric, "target": self.target, "period": self.period, "owner": self.owner,
        });
        if let Some(direction) = &self.direction {
            settings["direction"] = json!(direction);
        }
        settings
    }
}

/// The flag a settings field comes from, for errors.
fn flag_of(field: &str) -> String {
    let flag = match field {
        "metric.kind" | "metric" => "metric",
        "metric.from" => "from-event",
        "metric.to" => "to-event",
        "metric.within_days" | "metric.inactive_days" => "days",
        other => other.strip_prefix("metric.").unwrap_or(other),
    };
    format!("--{flag}")
}

fn explain(error: GoalError) -> anyhow::Error {
    let flag = flag_of(&error.field);
    anyhow::anyhow!("{flag}: {}", error.message)
}

/// Brings profiles and the goals' figures up to date with the log. On a
/// shared store where a server holds the insight lease, that server is
/// counting already; the answer is what it has committed.
fn catch_up(store: &Arc<dyn Store>) -> anyhow::Result<()> {
    crate::commands::catch_up(store)?;
    let Some(_lease) = store.try_lease(Stage::INSIGHT)? else {
        eprintln!("a server is counting for goals: the figures are as of its last commit");
        return Ok(());
    };
    InsightStage::new(store.clone(), system_clock()).catch_up()?;
    Ok(())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn create(store: Arc<dyn Store>, flags: &GoalFlags, out: &mut impl Write) -> anyhow::Result<()> {
    let settings = GoalSettings::from_json(&flags.settings_json()).map_err(explain)?;
    match goals::create_goal(store.as_ref(), &settings, now_ms()) {
        Ok(_) => {}
        Err(GoalDefineError::Invalid(error)) => return Err(explain(error)),
        Err(error) => return Err(error.into()),
    }
    catch_up(&store)?;
    let evaluated =
        goals::evaluate_goal(store.as_ref(), &settings.name, now_ms())?.context("the goal was deleted meanwhile")?;
    writeln!(out, "created goal {:?}", settings.name)?;
    write_summary(out, &evaluated)?;
    Ok(())
}

fn value_text(evaluated: &EvaluatedGoal, value: Option<f64>) -> String {
    tandem_server::console::goals::format_value(value, evaluated.record.settings.metric.unit())
}

fn write_summary(out: &mut impl Write, evaluated: &EvaluatedGoal) -> anyhow::Result<()> {
    let report = &evaluated.report;
    let settings = &evaluated.record.settings;
    writeln!(
        out,
        "  {} of {} ({}), expected by now {}; {:.0} % through {}",
        value_text(evaluated, report.value),
        value_text(evaluated, Some(settings.target)),
        report.standing.as_str().replace('_', " "),
        value_text(evaluated, report.expected),
        report.progress * 100.0,
        settings.period,
    )?;
    Ok(())
}

pub fn list(store: Arc<dyn Store>, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let evaluated = goals::evaluate_goals(store.as_ref(), now_ms())?;
    if as_json {
        let list: Vec<Value> = evaluated.iter().map(|goal| goals::goal_json(goal, false)).collect();
        writeln!(out, "{}", Value::Array(list))?;
        return Ok(());
    }
    if evaluated.is_empty() {
        writeln!(out, "no goals; create one with tandem goal create NAME --metric … --target … --period … --owner …")?;
    }
    for goal in &evaluated {
        let settings = &goal.record.settings;
        writeln!(
            out,
            "{:<28} {:<9} {:>14} of {:<14} {:<11} {:>3.0} % of {}",
            settings.name,
            settings.owner,
            value_text(goal, goal.report.value),
            value_text(goal, Some(settings.target)),
            goal.report.standing.as_str(),
            goal.report.progress * 100.0,
            settings.period,
        )?;
    }
    Ok(())
}

pub fn show(store: Arc<dyn Store>, name: &str, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let Some(evaluated) = goals::evaluate_goal(store.as_ref(), name, now_ms())? else {
        bail!("no goal named {name:?}")
    };
    if as_json {
        writeln!(out, "{}", goals::goal_json(&evaluated, true))?;
        return Ok(());
    }
    let settings = &evaluated.record.settings;
    let report = &evaluated.report;
    writeln!(out, "goal {} ({})", settings.name, settings.owner)?;
    writeln!(out, "  measures    {}", settings.metric.describe())?;
    writeln!(out, "  settings    {}", serde_json::to_string(settings)?)?;
    write_summary(out, &evaluated)?;
    writeln!(out, "  trend")?;
    for point in &report.trend {
        writeln!(
            out,
            "    {}  {:>14}  expected {}",
            goals::date_text(point.day),
            value_text(&evaluated, point.value),
            value_text(&evaluated, point.expected)
        )?;
    }
    Ok(())
}

pub fn delete(store: Arc<dyn Store>, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    store.delete_goal(name)?;
    writeln!(out, "deleted goal {name:?}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_settings_and_errors_name_the_flag() {
        let flags = GoalFlags {
            name: "checkout".into(),
            metric: "conversion".into(),
            target: 12.5,
            period: "2026-Q3".into(),
            owner: "marketing".into(),
            direction: None,
            event: None,
            property: None,
            from_event: Some("Product Viewed".into()),
            to_event: Some("Order Completed".into()),
            within: Some("3d".into()),
            days: None,
            audience: None,
        };
        let settings = GoalSettings::from_json(&flags.settings_json()).unwrap();
        assert_eq!(
            serde_json::to_value(&settings.metric).unwrap(),
            json!({"kind": "conversion", "from": "Product Viewed", "to": "Order Completed", "within": "3d"})
        );
        let bad = GoalFlags { within: Some("3 weeks".into()), ..flags };
        let error = GoalSettings::from_json(&bad.settings_json()).map_err(explain).unwrap_err();
        assert!(error.to_string().starts_with("--within: "), "{error}");
        let churn = GoalFlags {
            metric: "churned_customers".into(),
            days: Some(45),
            from_event: None,
            to_event: None,
            within: None,
            ..bad
        };
        assert_eq!(churn.settings_json()["metric"], json!({"kind": "churned_customers", "inactive_days": 45}));
        assert_eq!(flag_of("metric.within_days"), "--days");
        assert_eq!(flag_of("period"), "--period");
    }
}
