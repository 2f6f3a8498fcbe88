//! Goals as the API, the console and the CLI use them: defining one
//! (validated by `tandem_core::insight::goals`, its audience checked, its
//! tracker stored for the insight stage to start), deleting one, and
//! evaluating goals from what the store keeps — the tracker's days, the
//! snapshots and the latency histograms of the period, never the log.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use tandem_core::insight::goals::{Goal, GoalData, GoalError, GoalReport, GoalSettings, Metric, Shape, Unit};
use tandem_core::insight::latency::LatencyHistogram;
use tandem_core::insight::rollup::{day_of, day_start_ms, Day};
use tandem_store::{GoalRecord, Store, StoreError, TrackerBackfill, TrackerRecord};

/// A goal that cannot be defined, in the caller's terms.
#[derive(Debug, thiserror::Error)]
pub enum GoalDefineError {
    #[error(transparent)]
    Invalid(#[from] GoalError),
    #[error("metric.audience names {0:?}, which is no audience")]
    UnknownAudience(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Validates and stores a goal; the insight stage starts counting what it
/// needs, from the beginning of the log.
pub fn create_goal(store: &dyn Store, settings: &GoalSettings, now_ms: i64) -> Result<GoalRecord, GoalDefineError> {
    let goal = settings.compile()?;
    if let Metric::AudienceSize { audience } = goal.metric() {
        if store.audience(audience)?.is_none() {
            return Err(GoalDefineError::UnknownAudience(audience.clone()));
        }
    }
    let trackers: Vec<_> = goal.needs().tracker.into_iter().collect();
    store.create_goal(&goal.settings, &trackers, now_ms)?;
    Ok(GoalRecord { settings: goal.settings, created_at_ms: now_ms })
}

/// A goal with where it stands.
#[derive(Clone, Debug)]
pub struct EvaluatedGoal {
    pub record: GoalRecord,
    pub goal: Goal,
    pub report: GoalReport,
}

/// Every goal, evaluated at `now_ms`, by name.
pub fn evaluate_goals(store: &dyn Store, now_ms: i64) -> Result<Vec<EvaluatedGoal>, StoreError> {
    let records = store.list_goals()?;
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let trackers = store.trackers()?;
    records.into_iter().map(|record| evaluate(store, record, &trackers, now_ms)).collect()
}

/// One goal by name, evaluated at `now_ms`.
pub fn evaluate_goal(store: &dyn Store, name: &str, now_ms: i64) -> Result<Option<EvaluatedGoal>, StoreError> {
    let Some(record) = store.goal(name)? else { return Ok(None) };
    let trackers = store.trackers()?;
    evaluate(store, record, &trackers, now_ms).map(Some)
}

fn evaluate(
    store: &dyn Store,
    record: GoalRecord,
    trackers: &[TrackerRecord],
    now_ms: i64,
) -> Result<EvaluatedGoal, StoreError> {
    // Stored settings were valid when stored; a later, stricter build may
    // refuse them, which is a storage problem to report rather than hide.
    let goal = record.settings.compile().map_err(|error| {
        StoreError::Backend(format!("goal {:?} is stored invalid: {error}", record.settings.name).into())
    })?;
    let data = gather(store, &goal, trackers, now_ms)?;
    let report = goal.evaluate(&data, now_ms);
    Ok(EvaluatedGoal { record, goal, report })
}

/// Reads what evaluating `goal` at `now_ms` needs.
fn gather(store: &dyn Store, goal: &Goal, trackers: &[TrackerRecord], now_ms: i64) -> Result<GoalData, StoreError> {
    let needs = goal.needs();
    let (start, end) = goal.period.span(now_ms);
    let today = day_of(now_ms);
    let mut data = GoalData { complete: true, ..GoalData::default() };
    if today < start {
        return Ok(data);
    }
    let last = today.min(end - 1);
    if let Some(spec) = &needs.tracker {
        match trackers.iter().find(|tracker| &tracker.spec == spec) {
            Some(tracker) => {
                data.complete = tracker.backfill == TrackerBackfill::Done;
                let from = if needs.from_the_first_day { None } else { Some(start) };
                for value in store.tracker_days(tracker.id, from, last)? {
                    data.daily.entry(value.series).or_default().insert(value.day, value.value);
                }
            }
            None => data.complete = false,
        }
    }
    if !needs.snapshots.is_empty() {
        for (key, day, value) in store.snapshots(&needs.snapshots, start, last)? {
            data.snapshots.entry(key).or_default().insert(day, value);
        }
    }
    // An audience's size is kept current by every commit: read it now
    // rather than as of the last snapshot.
    if let Metric::AudienceSize { audience } = goal.metric() {
        if let Some(record) = store.audience(audience)?.filter(|_| today <= last) {
            let key = tandem_core::insight::goals::snapshot::audience(audience);
            data.snapshots.entry(key).or_default().insert(today, record.size as f64);
        }
    }
    if needs.latency {
        let mut days: BTreeMap<Day, LatencyHistogram> = BTreeMap::new();
        for (day, bucket, count) in store.ingest_latency(start, last)? {
            days.entry(day).or_default().add(bucket, count);
        }
        data.latency = days;
    }
    Ok(data)
}

/// A day as shown: `2026-07-01`.
pub fn date_text(day: Day) -> String {
    chrono::DateTime::from_timestamp_millis(day_start_ms(day))
        .map(|at| at.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

fn unit_name(unit: Unit) -> &'static str {
    match unit {
        Unit::Count => "count",
        Unit::Money => "money",
        Unit::Percent => "percent",
        Unit::Milliseconds => "milliseconds",
    }
}

fn shape_name(shape: Shape) -> &'static str {
    match shape {
        Shape::Total => "total",
        Shape::Level => "level",
        Shape::Rate => "rate",
    }
}

/// A number as JSON, rounded to what is worth showing.
fn rounded(value: Option<f64>) -> Value {
    match value {
        Some(value) if value.is_finite() => json!((value * 10_000.0).round() / 10_000.0),
        _ => Value::Null,
    }
}

/// A goal as the API and the CLI show it; with `trend`, one point per day
/// of the period so far.
pub fn goal_json(evaluated: &EvaluatedGoal, trend: bool) -> Value {
    let EvaluatedGoal { record, goal, report } = evaluated;
    let settings = &record.settings;
    let mut shown = json!({
        "name": settings.name,
        "owner": settings.owner.as_str(),
        "metric": settings.metric,
        "measures": settings.metric.describe(),
        "unit": unit_name(settings.metric.unit()),
        "shape": shape_name(settings.metric.shape()),
        "direction": goal.direction.as_str(),
        "target": settings.target,
        "period": settings.period,
        "period_start": date_text(report.start_day),
        "period_end": date_text(report.end_day - 1),
        "value": rounded(report.value),
        "expected": rounded(report.expected),
        "progress": rounded(Some(report.progress)),
        "status": report.standing.as_str(),
        "complete": report.complete,
        "created_at": crate::profile::format_ms(record.created_at_ms),
    });
    if trend {
        shown["trend"] = report
            .trend
            .iter()
            .map(|point| {
                json!({"date": date_text(point.day), "value": rounded(point.value), "expected": rounded(point.expected)})
            })
            .collect();
    }
    shown
}
