//! The demo company's goals: a handful for marketing, for IT and for both,
//! some on track and some not, so the console's landing page shows a
//! company as it is. Goals about the company's history run over the days it
//! covers (and a month beyond); IT's run over the current month or year.
//!
//! A goal's target is set against what the data reaches: each is first
//! defined under a probe name, the insight stage counts the history once,
//! and the goal is then defined with a target placed before or beyond its
//! value (the probe goes; the tracker both share stays, already counted).

use anyhow::Context;
use serde_json::{json, Value};
use std::sync::Arc;
use tandem_core::insight::goals::{GoalSettings, Shape};
use tandem_server::insight::goals::{create_goal, evaluate_goal};
use tandem_server::insight::{system_clock, InsightStage};
use tandem_store::Store;

/// Where a demo goal's target is.
#[derive(Clone, Copy)]
enum Target {
    /// This target.
    Fixed(f64),
    /// The value the data reaches (for a total or a level, where it would
    /// be at the period's end at its pace so far) times this factor.
    Reached(f64),
}

struct DemoGoal {
    name: &'static str,
    owner: &'static str,
    metric: Value,
    /// `history` for the company's days, else a period as settings take it.
    period: &'static str,
    target: Target,
}

/// The demo's goals; a factor below 1 puts the goal on track when higher is
/// better, above 1 off track (and the other way round when lower is better).
fn demo_goals(customers: usize) -> Vec<DemoGoal> {
    vec![
        DemoGoal {
            name: "Revenue",
            owner: "marketing",
            metric: json!({"kind": "revenue", "event": "Order Completed", "property": "revenue"}),
            period: "history",
            target: Target::Reached(0.9),
        },
        DemoGoal {
            name: "New customers",
            owner: "marketing",
            metric: json!({"kind": "new_customers"}),
            period: "history",
            target: Target::Reached(1.25),
        },
        DemoGoal {
            name: "Browse to buy within 7 days",
            owner: "marketing",
            metric: json!({"kind": "conversion", "from": "Product Viewed", "to": "Order Completed", "within": "7d"}),
            period: "history",
            target: Target::Reached(1.5),
        },
        DemoGoal {
            name: "Recent buyers",
            owner: "marketing",
            metric: json!({"kind": "audience_size", "audience": "recent buyers"}),
            period: "history",
            target: Target::Fixed((customers / 4).max(1) as f64),
        },
        DemoGoal {
            name: "Active customers (30 days)",
            owner: "both",
            metric: json!({"kind": "active_customers", "within_days": 30}),
            period: "history",
            target: Target::Reached(0.9),
        },
        DemoGoal {
            name: "Churned customers (30 days quiet)",
            owner: "both",
            metric: json!({"kind": "churned_customers", "inactive_days": 30}),
            period: "history",
            target: Target::Reached(0.7),
        },
        DemoGoal {
            name: "Events ingested",
            owner: "it",
            metric: json!({"kind": "ingest_volume"}),
            period: "month",
            target: Target::Reached(0.8),
        },
        DemoGoal {
            name: "Ingest latency p99",
            owner: "it",
            metric: json!({"kind": "ingest_latency_p99"}),
            period: "month",
            target: Target::Fixed(250.0),
        },
        DemoGoal {
            name: "Identity merge rate",
            owner: "it",
            metric: json!({"kind": "merge_rate"}),
            period: "month",
            target: Target::Reached(1.2),
        },
        DemoGoal {
            name: "Tracking-plan violations",
            owner: "it",
            metric: json!({"kind": "violation_rate"}),
            period: "month",
            target: Target::Fixed(2.0),
        },
        DemoGoal {
            name: "Delivery success",
            owner: "it",
            metric: json!({"kind": "delivery_success_rate"}),
            period: "month",
            target: Target::Fixed(99.0),
        },
        DemoGoal {
            name: "Stack spend",
            owner: "both",
            metric: json!({"kind": "stack_spend"}),
            period: "year",
            target: Target::Fixed(120_000.0),
        },
    ]
}

/// Three significant digits: targets people would write.
fn round_target(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 0.0;
    }
    let digits = 2 - value.log10().floor() as i32;
    if digits >= 0 {
        let scale = 10f64.powi(digits);
        (value * scale).round() / scale
    } else {
        let scale = 10f64.powi(-digits);
        (value / scale).round() * scale
    }
}

fn settings(goal: &DemoGoal, name: &str, target: f64, history: &str) -> anyhow::Result<GoalSettings> {
    let period = if goal.period == "history" { history } else { goal.period };
    GoalSettings::from_json(&json!({
        "name": name, "owner": goal.owner, "metric": goal.metric, "target": target, "period": period
    }))
    .with_context(|| format!("the demo goal {:?}", goal.name))
}

/// Defines the demo's goals unless the store has goals already; whether it did.
pub fn define_goals(store: &Arc<dyn Store>, customers: usize) -> anyhow::Result<bool> {
    if !store.list_goals()?.is_empty() {
        return Ok(false);
    }
    let now = chrono::Utc::now();
    let first = (now - chrono::Duration::days((super::HISTORY_DAYS + super::FOLLOW_UP_DAYS) as i64)).date_naive();
    let history = format!("{first}..{}", first + chrono::Days::new(119));
    let goals = demo_goals(customers);
    let probe = |goal: &DemoGoal| format!("probe: {}", goal.name);
    for goal in goals.iter().filter(|goal| matches!(goal.target, Target::Reached(_))) {
        create_goal(store.as_ref(), &settings(goal, &probe(goal), 1.0, &history)?, now.timestamp_millis())?;
    }
    InsightStage::new(store.clone(), system_clock()).catch_up()?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    for goal in &goals {
        let target = match goal.target {
            Target::Fixed(target) => target,
            Target::Reached(factor) => {
                let probed =
                    evaluate_goal(store.as_ref(), &probe(goal), now_ms)?.context("a demo probe goal went missing")?;
                store.delete_goal(&probe(goal))?;
                let reached = probed.report.value.unwrap_or(0.0);
                let reached = match probed.goal.metric().shape() {
                    Shape::Total | Shape::Level if probed.report.progress > 0.0 => reached / probed.report.progress,
                    _ => reached,
                };
                let target = round_target(reached * factor);
                if probed.goal.metric().unit() == tandem_core::insight::goals::Unit::Percent {
                    target.min(100.0)
                } else {
                    target
                }
            }
        };
        create_goal(store.as_ref(), &settings(goal, goal.name, target, &history)?, now_ms)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_keep_three_significant_digits() {
        assert_eq!(round_target(123_456.0), 123_000.0);
        assert_eq!(round_target(12.345), 12.3);
        assert_eq!(round_target(0.0), 0.0);
    }

    #[test]
    fn every_demo_goal_is_valid_settings() {
        for goal in demo_goals(10_000) {
            settings(&goal, goal.name, 10.0, "2026-01-01..2026-04-30").unwrap();
        }
    }
}
