//! The console's landing page: the goals marketing and IT share, grouped by
//! owner. Each shows its current value against its target, how far through
//! its period it is, and a trend chart drawn here as inline SVG (the value
//! per day, and the pro-rated target it is judged against); goals off track
//! or missed come first in their group and stand out. The page mirrors
//! `GET /api/v1/goals` and reads what the insight stage keeps
//! ([`crate::insight::goals`]), never the event log.

use super::{page, Console};
use crate::insight::goals::{self, date_text, EvaluatedGoal};
use crate::profile::read;
use crate::AppState;
use askama::Template;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::fmt::Write as _;
use tandem_core::insight::goals::{Owner, Shape, Standing, Unit};

/// The goals page's own stylesheet, compiled in.
const STYLESHEET: &str = include_str!("../../assets/goals.css");

/// The chart's drawing area, in SVG units (it scales to its box).
const CHART_WIDTH: f64 = 320.0;
const CHART_HEIGHT: f64 = 90.0;
const CHART_PAD: f64 = 4.0;

/// The goal routes of the console, for [`super::routes`].
pub fn routes() -> Router<AppState> {
    Router::new().route("/console/goals", get(goals_page)).route("/console/assets/goals.css", get(stylesheet))
}

async fn stylesheet() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")], STYLESHEET)
}

/// One goal as the page shows it.
struct GoalCard {
    name: String,
    owner: &'static str,
    measures: String,
    value: String,
    /// The value unrounded (empty for none), for scripts and tests.
    raw_value: String,
    target: String,
    expected: String,
    status: &'static str,
    status_text: &'static str,
    bad: bool,
    period: String,
    progress_percent: u32,
    /// A tracker is still reading the log's past.
    partial: bool,
    /// The trend chart: SVG built here from numbers and escaped text.
    chart: String,
}

/// Goals of one owner.
struct GoalGroup {
    id: &'static str,
    title: &'static str,
    goals: Vec<GoalCard>,
}

#[derive(Template)]
#[template(path = "console/goals.html")]
struct GoalsPage {
    chrome: super::Chrome,
    summary: String,
    groups: Vec<GoalGroup>,
}

/// `GET /console/goals`: every goal, grouped by owner.
async fn goals_page(State(state): State<AppState>, console: Console) -> Response {
    if let Some(refused) = console.refused("GET", "/api/v1/goals", None) {
        return refused;
    }
    let now = chrono::Utc::now().timestamp_millis();
    let evaluated = match read(&state, move |store| goals::evaluate_goals(store, now)).await {
        Ok(evaluated) => evaluated,
        Err(error) => return console.error_page(error),
    };
    let bad = evaluated.iter().filter(|goal| goal.report.standing.is_bad()).count();
    let summary = match (evaluated.len(), bad) {
        (0, _) => "No goal yet: create one with tandem goal create or POST /api/v1/goals.".to_owned(),
        (total, 0) => format!("{total} goals, none off track."),
        (total, bad) => format!("{bad} of {total} goals need attention."),
    };
    let mut groups = Vec::new();
    for (owner, id, title) in [
        (Owner::Both, "shared", "Shared by marketing and IT"),
        (Owner::Marketing, "marketing", "Marketing"),
        (Owner::It, "it", "IT"),
    ] {
        let mut mine: Vec<&EvaluatedGoal> =
            evaluated.iter().filter(|goal| goal.record.settings.owner == owner).collect();
        // Off-track and missed goals first, then by name.
        mine.sort_by_key(|goal| (!goal.report.standing.is_bad(), goal.record.settings.name.clone()));
        if !mine.is_empty() {
            groups.push(GoalGroup { id, title, goals: mine.into_iter().map(card).collect() });
        }
    }
    page(StatusCode::OK, GoalsPage { chrome: console.chrome("Goals", "goals"), summary, groups })
}

fn status_text(standing: Standing) -> &'static str {
    match standing {
        Standing::NotStarted => "Not started",
        Standing::OnTrack => "On track",
        Standing::OffTrack => "Off track",
        Standing::Met => "Met",
        Standing::Missed => "Missed",
        Standing::NoData => "No data yet",
        Standing::Counting => "Counting the past",
    }
}

/// A number with thousands separated: `12,345`.
fn grouped(whole: i64) -> String {
    let digits = whole.unsigned_abs().to_string();
    let mut text = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    if whole < 0 {
        text.insert(0, '-');
    }
    text
}

/// A value in its unit, as people read it.
pub fn format_value(value: Option<f64>, unit: Unit) -> String {
    let Some(value) = value.filter(|value| value.is_finite()) else { return "—".to_owned() };
    match unit {
        Unit::Count => grouped(value.round() as i64),
        Unit::Money if value.abs() >= 1_000.0 => grouped(value.round() as i64),
        Unit::Money => format!("{value:.2}"),
        Unit::Percent => format!("{value:.1} %"),
        Unit::Milliseconds if value < 10.0 => format!("{value:.1} ms"),
        Unit::Milliseconds => format!("{} ms", grouped(value.round() as i64)),
    }
}

fn card(evaluated: &EvaluatedGoal) -> GoalCard {
    let EvaluatedGoal { record, report, .. } = evaluated;
    let settings = &record.settings;
    let unit = settings.metric.unit();
    GoalCard {
        name: settings.name.clone(),
        owner: settings.owner.as_str(),
        measures: settings.metric.describe(),
        value: format_value(report.value, unit),
        raw_value: report.value.map(|value| value.to_string()).unwrap_or_default(),
        target: format_value(Some(settings.target), unit),
        expected: format_value(report.expected, unit),
        status: report.standing.as_str(),
        status_text: status_text(report.standing),
        bad: report.standing.is_bad(),
        period: format!("{} to {}", date_text(report.start_day), date_text(report.end_day - 1)),
        progress_percent: (report.progress * 100.0).round().clamp(0.0, 100.0) as u32,
        partial: !report.complete,
        chart: chart(evaluated),
    }
}

/// Text for an SVG text node or attribute.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The trend as inline SVG: the period runs left to right (so the empty
/// part on the right is the time still to come), the value per day as a
/// line, and what it is judged against as a dashed line that runs on to
/// the target at the period's end.
pub fn chart(evaluated: &EvaluatedGoal) -> String {
    let EvaluatedGoal { record, report, .. } = evaluated;
    let settings = &record.settings;
    let unit = settings.metric.unit();
    let days = f64::from((report.end_day - report.start_day).max(1));
    let mut expected: Vec<(f64, f64)> = report
        .trend
        .iter()
        .filter_map(|point| Some((f64::from(point.day - report.start_day) + 1.0, point.expected?)))
        .collect();
    // Every shape is judged against the target itself at the period's end
    // (a rate all along).
    if expected.is_empty() {
        let start = if settings.metric.shape() == Shape::Total { 0.0 } else { settings.target };
        expected.push((0.0, start));
    }
    expected.push((days, settings.target));
    let values: Vec<(f64, f64)> = report
        .trend
        .iter()
        .filter_map(|point| Some((f64::from(point.day - report.start_day) + 1.0, point.value?)))
        .collect();
    let highest =
        values.iter().chain(&expected).map(|(_, value)| *value).fold(0.0_f64, f64::max).max(f64::MIN_POSITIVE);
    let lowest = values.iter().chain(&expected).map(|(_, value)| *value).fold(0.0_f64, f64::min);
    let x = |day: f64| CHART_PAD + (CHART_WIDTH - 2.0 * CHART_PAD) * (day / days).clamp(0.0, 1.0);
    let y = |value: f64| {
        let share = (value - lowest) / (highest - lowest).max(f64::MIN_POSITIVE);
        CHART_HEIGHT - CHART_PAD - (CHART_HEIGHT - 2.0 * CHART_PAD) * share.clamp(0.0, 1.0)
    };
    let points = |series: &[(f64, f64)]| {
        let mut text = String::new();
        for (day, value) in series {
            let _ = write!(text, "{:.1},{:.1} ", x(*day), y(*value));
        }
        text.trim_end().to_owned()
    };
    let colour = if report.standing.is_bad() { "#a3241b" } else { "#2456c7" };
    let first = report.trend.first();
    let last = report.trend.iter().rev().find(|point| point.value.is_some());
    let description = match (first, last) {
        (Some(first), Some(last)) => format!(
            "{}: {} on {}, {} on {}; target {} by {}",
            settings.name,
            format_value(first.value, unit),
            date_text(first.day),
            format_value(last.value, unit),
            date_text(last.day),
            format_value(Some(settings.target), unit),
            date_text(report.end_day - 1),
        ),
        _ => format!("{}: no values yet; target {}", settings.name, format_value(Some(settings.target), unit)),
    };
    let mut svg = format!(
        r#"<svg class="trend" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" preserveAspectRatio="none"><title>{}</title>"#,
        escape(&description)
    );
    let _ = write!(
        svg,
        r##"<line x1="{CHART_PAD}" y1="{base:.1}" x2="{end:.1}" y2="{base:.1}" stroke="#d8dce3" stroke-width="1"/>"##,
        base = y(lowest.max(0.0).min(highest)),
        end = CHART_WIDTH - CHART_PAD,
    );
    let _ = write!(
        svg,
        r##"<polyline class="expected" points="{}" fill="none" stroke="#5b6473" stroke-width="1.5" stroke-dasharray="4 3" vector-effect="non-scaling-stroke"/>"##,
        points(&expected)
    );
    if !values.is_empty() {
        let _ = write!(
            svg,
            r#"<polyline class="value" points="{}" fill="none" stroke="{colour}" stroke-width="2.5" vector-effect="non-scaling-stroke"/>"#,
            points(&values)
        );
        if let Some((day, value)) = values.last() {
            let _ = write!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#, x(*day), y(*value));
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::insight::goals::{GoalData, GoalSettings};
    use tandem_core::insight::rollup::{day_start_ms, series};
    use tandem_store::GoalRecord;

    fn evaluated(target: f64, per_day: &[f64], now_day: i32) -> EvaluatedGoal {
        let settings = GoalSettings::from_json(&serde_json::json!({
            "name": "Q3 <revenue>", "owner": "marketing", "target": target, "period": "2026-07-01..2026-07-10",
            "metric": {"kind": "revenue"}
        }))
        .unwrap();
        let goal = settings.compile().unwrap();
        let start = goal.period.span(0).0;
        let mut data = GoalData { complete: true, ..GoalData::default() };
        data.daily.insert(
            series::SUM.into(),
            per_day.iter().enumerate().map(|(index, value)| (start + index as i32, *value)).collect(),
        );
        let report = goal.evaluate(&data, day_start_ms(start + now_day) + 1);
        EvaluatedGoal { record: GoalRecord { settings, created_at_ms: 0 }, goal, report }
    }

    #[test]
    fn values_read_in_their_unit() {
        assert_eq!(format_value(Some(1_234_567.4), Unit::Count), "1,234,567");
        assert_eq!(format_value(Some(999.5), Unit::Money), "999.50");
        assert_eq!(format_value(Some(-12_000.0), Unit::Money), "-12,000");
        assert_eq!(format_value(Some(12.345), Unit::Percent), "12.3 %");
        assert_eq!(format_value(Some(4.26), Unit::Milliseconds), "4.3 ms");
        assert_eq!(format_value(Some(1_520.0), Unit::Milliseconds), "1,520 ms");
        assert_eq!(format_value(None, Unit::Count), "—");
    }

    #[test]
    fn the_chart_draws_each_day_and_the_line_to_the_target_and_escapes_the_name() {
        let on_track = evaluated(100.0, &[30.0, 30.0, 30.0], 2);
        let svg = chart(&on_track);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("<title>Q3 &lt;revenue&gt;: 30.00 on 2026-07-01, 90.00 on 2026-07-03; target 100.00 by 2026-07-10</title>"), "{svg}");
        let value_points = svg.split(r#"class="value" points=""#).nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(value_points.split(' ').count(), 3, "one point per day so far: {value_points}");
        let expected = svg.split(r#"class="expected" points=""#).nth(1).unwrap().split('"').next().unwrap();
        assert!(expected.ends_with("316.0,4.0"), "the dashed line ends at the target at the period's end: {expected}");
        assert!(svg.contains("#2456c7") && !svg.contains("#a3241b"));
        let behind = chart(&evaluated(1_000.0, &[10.0, 10.0, 10.0, 10.0, 10.0, 10.0], 5));
        assert!(behind.contains("#a3241b"), "an off-track goal is drawn in red");
    }

    #[test]
    fn cards_carry_the_value_target_status_and_progress() {
        let card = card(&evaluated(1_000.0, &[10.0, 10.0, 10.0, 10.0, 10.0, 10.0], 5));
        assert_eq!((card.value.as_str(), card.raw_value.as_str(), card.target.as_str()), ("60.00", "60", "1,000"));
        assert_eq!((card.status, card.status_text, card.bad), ("off_track", "Off track", true));
        assert_eq!(card.progress_percent, 50);
        assert_eq!(card.period, "2026-07-01 to 2026-07-10");
    }
}
