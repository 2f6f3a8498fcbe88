//! The console's stack pages: every source and destination with its
//! registry entry (owner, department, purpose, cost), volume, last event and
//! errors; spend by department; unregistered tools (traffic with write keys
//! matching no source); and delivery health per destination — success
//! rate, retries, dead letters — with one destination's dead letters listed
//! a page at a time and replayed, one or all, through the same audited
//! replay as the API ([`crate::destination_api::replay_and_audit`]).
//!
//! Each part mirrors an API route and is shown only to a role the
//! permission table lets call it: the registry parts `GET /api/v1/stack`,
//! delivery health and dead letters `GET /api/v1/destinations`, the replay
//! buttons `POST /api/v1/destinations/{name}/replay`. Nothing here decides
//! anything about delivery; it reads the stores the API reads.

use super::{clipped, form, page, path_segment, session, text, when, Chrome, Console};
use crate::destination_api::ReplayRequest;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::DeliveryLabels;
use crate::profile::read;
use crate::AppState;
use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use std::collections::HashMap;
use tandem_core::govern::stack::{StackReport, ToolKind};
use tandem_store::{DeadLetterFilter, DestinationRecord, OutboxCounts, OutboxItemId, StoreError};

/// Dead letters per page of a destination's list.
const DEAD_LETTER_PAGE: usize = 25;
/// Characters of a dead letter's event shown.
const EVENT_SHOWN: usize = 400;

/// The stack routes, for [`super::routes`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console/stack", get(stack))
        .route("/console/stack/destinations/{name}", get(destination))
        .route("/console/stack/destinations/{name}/replay", post(replay))
}

/// Whether the role may see any part of the stack (its entry in the nav).
pub(super) fn visible(console: &Console) -> bool {
    may_registry(console) || may_deliveries(console)
}

fn may_registry(console: &Console) -> bool {
    console.may("GET", "/api/v1/stack", None)
}

fn may_deliveries(console: &Console) -> bool {
    console.may("GET", "/api/v1/destinations", None)
}

/// The share of settled items that reached the receiver: delivered over
/// delivered plus dead, as a percentage with one decimal; `None` before
/// anything settled. Items still waiting or retrying are not settled.
pub fn success_rate(counts: &OutboxCounts) -> Option<f64> {
    let settled = counts.delivered + counts.dead;
    (settled > 0).then(|| (counts.delivered as f64 * 1000.0 / settled as f64).round() / 10.0)
}

/// An annual cost as page text: whole currency units with thousands
/// separated, cents only when there are any.
fn money(amount: f64) -> String {
    let cents = (amount * 100.0).round() as i64;
    let (whole, rest) = (cents / 100, (cents % 100).abs());
    let digits = whole.abs().to_string();
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    let sign = if whole < 0 { "-" } else { "" };
    if rest == 0 {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{rest:02}")
    }
}

/// One source or destination in the tools table.
struct ToolRow {
    kind: &'static str,
    name: String,
    owner: String,
    department: String,
    purpose: String,
    cost: String,
    volume: u64,
    /// What `volume` counts.
    volume_unit: &'static str,
    last_event: String,
    errors: u64,
    /// What `errors` counts.
    errors_unit: &'static str,
}

/// One destination's delivery health.
struct HealthRow {
    name: String,
    kind: String,
    paused: bool,
    delivered: u64,
    pending: u64,
    retrying: u64,
    dead: u64,
    success_rate: String,
    /// Failed attempts and retries this server has made since it started.
    failed_attempts: u64,
    retries: u64,
    waiting_since: String,
    last_delivered: String,
}

/// An unknown write key seen sending.
struct ShadowRow {
    hint: String,
    requests: u64,
    first_seen: String,
    last_seen: String,
    senders: String,
    user_agents: String,
}

#[derive(Template)]
#[template(path = "console/stack.html")]
struct StackPage {
    chrome: Chrome,
    registry: Option<Registry>,
    health: Option<Vec<HealthRow>>,
}

/// The parts of the stack page behind `GET /api/v1/stack`.
struct Registry {
    spend: Vec<(String, String)>,
    total: String,
    tools: Vec<ToolRow>,
    without_owner: Vec<String>,
    shadow: Vec<ShadowRow>,
}

/// What the stack page reads, in one blocking task.
struct Loaded {
    report: Option<StackReport>,
    stats: Option<tandem_store::IngestStats>,
    destinations: Vec<DestinationRecord>,
}

/// `GET /console/stack`.
async fn stack(State(state): State<AppState>, console: Console) -> Response {
    if !visible(&console) {
        return console.refused_page("GET", "/api/v1/stack");
    }
    let (with_registry, with_health) = (may_registry(&console), may_deliveries(&console));
    let sources = state.sources.clone();
    let loaded = read(&state, move |store| {
        let destinations = store.list_destinations()?;
        let report = if with_registry {
            // As the API's report: what was noted since the last flush counts too.
            sources.shadow().flush(store)?;
            Some(crate::stack::stack_report_over(store, destinations.clone())?)
        } else {
            None
        };
        let stats = if with_registry { Some(store.stats()?) } else { None };
        Ok::<_, StoreError>(Loaded { report, stats, destinations })
    })
    .await;
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return console.error_page(error),
    };
    let health = with_health.then(|| loaded.destinations.iter().map(|record| health_row(&state, record)).collect());
    let registry = loaded.report.map(|report| registry(&console, &state, report, loaded.stats, &loaded.destinations));
    page(StatusCode::OK, StackPage { chrome: console.chrome("Stack", "stack"), registry, health })
}

fn health_row(state: &AppState, record: &DestinationRecord) -> HealthRow {
    let name = record.definition.name.clone();
    let attempts = |outcome: &'static str| {
        state
            .metrics
            .destination_items
            .get(&DeliveryLabels { destination: name.clone(), outcome })
            .map_or(0, |counter| counter.get())
    };
    HealthRow {
        kind: record.definition.destination.kind().to_owned(),
        paused: record.paused,
        delivered: record.counts.delivered,
        pending: record.counts.pending,
        retrying: record.counts.retrying,
        dead: record.counts.dead,
        success_rate: success_rate(&record.counts).map(|rate| format!("{rate}%")).unwrap_or_else(|| "—".to_owned()),
        failed_attempts: attempts("failed"),
        retries: attempts("retrying"),
        waiting_since: when(record.head_enqueued_at_ms),
        last_delivered: when(record.last_delivered_at_ms),
        name,
    }
}

fn registry(
    console: &Console,
    state: &AppState,
    report: StackReport,
    stats: Option<tandem_store::IngestStats>,
    destinations: &[DestinationRecord],
) -> Registry {
    let by_source: HashMap<String, tandem_store::SourceStats> = stats
        .map(|stats| stats.sources.into_iter().map(|source| (source.name.clone(), source)).collect())
        .unwrap_or_default();
    let by_destination: HashMap<&str, &DestinationRecord> =
        destinations.iter().map(|record| (record.definition.name.as_str(), record)).collect();
    let tools = report
        .tools
        .iter()
        .map(|tool| {
            let info = &tool.info;
            let mut row = ToolRow {
                kind: tool.kind.as_str(),
                name: tool.name.clone(),
                owner: info.owner.clone().unwrap_or_default(),
                department: info.department.map(|department| department.as_str().to_owned()).unwrap_or_default(),
                purpose: info.purpose.clone().unwrap_or_default(),
                cost: info.annual_cost.map(money).unwrap_or_default(),
                volume: 0,
                volume_unit: "",
                last_event: String::new(),
                errors: 0,
                errors_unit: "",
            };
            match tool.kind {
                ToolKind::Source => {
                    (row.volume_unit, row.errors_unit) = ("events", "quarantined");
                    if let Some(source) = by_source.get(&tool.name) {
                        (row.volume, row.errors) = (source.events, source.rejected);
                        row.last_event = when(source.last_received_ms);
                    }
                }
                ToolKind::Destination => {
                    (row.volume_unit, row.errors_unit) = ("delivered", "dead letters");
                    if let Some(record) = by_destination.get(tool.name.as_str()) {
                        (row.volume, row.errors) = (record.counts.delivered, record.counts.dead);
                        row.last_event = when(record.last_delivered_at_ms);
                    }
                }
            }
            row
        })
        .collect();
    // Sending addresses are personal data (the `ip` class): masked as the
    // role's PII access says.
    let shown_ips = |ips: &[String]| -> String {
        let shown = console.shown(state, serde_json::json!({ "ip": ips }));
        shown["ip"].as_array().map(|ips| ips.iter().map(text).collect::<Vec<_>>().join(", ")).unwrap_or_default()
    };
    let shadow = report
        .shadow_traffic
        .iter()
        .map(|key| ShadowRow {
            hint: key.key_hint.clone(),
            requests: key.requests,
            first_seen: when(Some(key.first_seen_ms)),
            last_seen: when(Some(key.last_seen_ms)),
            senders: shown_ips(&key.ips),
            user_agents: clipped(&key.user_agents.join(" · "), 300),
        })
        .collect();
    Registry {
        spend: report.spend_by_department.iter().map(|(department, cost)| (department.clone(), money(*cost))).collect(),
        total: money(report.total_annual_cost),
        tools,
        without_owner: report.without_owner,
        shadow,
    }
}

/// One dead letter as its list shows it.
struct DeadLetterRow {
    id: u64,
    position: u64,
    profile: String,
    attempts: u32,
    last_error: String,
    dead_at: String,
    event: String,
}

#[derive(Template)]
#[template(path = "console/stack_destination.html")]
struct DestinationPage {
    chrome: Chrome,
    name: String,
    health: HealthRow,
    letters: Vec<DeadLetterRow>,
    may_replay: bool,
    may_open_customers: bool,
    /// What the last replay did, when the page follows one.
    replayed: Option<String>,
    next_page: Option<u64>,
}

#[derive(Deserialize, Default)]
struct DeadLetterQuery {
    after: Option<u64>,
    replayed: Option<u64>,
}

/// `GET /console/stack/destinations/{name}`: one destination's delivery
/// health and its dead letters, oldest first, a page at a time, each with a
/// Replay button for a role that may replay.
async fn destination(
    State(state): State<AppState>,
    console: Console,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    if let Some(refused) = console.refused("GET", "/api/v1/destinations/{name}/dead-letters", None) {
        return refused;
    }
    let query: DeadLetterQuery = match serde_urlencoded::from_str(raw.as_deref().unwrap_or("")) {
        Ok(query) => query,
        Err(error) => {
            return console.error_page(ApiError::new(ErrorCode::InvalidValue, format!("the page address: {error}")))
        }
    };
    let wanted = name.clone();
    let filter = DeadLetterFilter { after: query.after.map(OutboxItemId), ..DeadLetterFilter::default() };
    let loaded = read(&state, move |store| {
        let Some(record) = store.destination(&wanted)? else {
            return Ok(None);
        };
        let letters = store.dead_letters(Some(wanted.as_str()), &filter, DEAD_LETTER_PAGE)?;
        Ok(Some((record, letters)))
    })
    .await;
    let (record, letters) = match loaded {
        Ok(Some(loaded)) => loaded,
        Ok(None) => {
            return console.error_page(
                ApiError::new(ErrorCode::DestinationNotFound, format!("no destination named {name:?}"))
                    .with_field("name"),
            )
        }
        Err(error) => return console.error_page(error),
    };
    let next_page = (letters.len() == DEAD_LETTER_PAGE).then(|| letters.last().map(|letter| letter.id.0)).flatten();
    let letters = letters
        .iter()
        .map(|letter| DeadLetterRow {
            id: letter.id.0,
            position: letter.position.0,
            profile: letter.profile.map(|profile| profile.to_string()).unwrap_or_default(),
            attempts: letter.attempts,
            last_error: clipped(&letter.last_error, 300),
            dead_at: when(Some(letter.dead_at_ms)),
            event: console.shown_payload(&state, &letter.payload, EVENT_SHOWN),
        })
        .collect();
    let template = DestinationPage {
        chrome: console.chrome(&format!("Destination {name}"), "stack"),
        health: health_row(&state, &record),
        letters,
        may_replay: console.may("POST", "/api/v1/destinations/{name}/replay", None),
        may_open_customers: console.may("GET", "/api/v1/profiles/{id}", None),
        replayed: query.replayed.map(|count| match count {
            1 => "1 dead letter put back in the outbox, at its place in the order.".to_owned(),
            count => format!("{count} dead letters put back in the outbox, at their places in the order."),
        }),
        next_page,
        name,
    };
    page(StatusCode::OK, template)
}

#[derive(Deserialize)]
struct ReplayForm {
    #[serde(default)]
    csrf: String,
    /// One dead letter's id; empty or absent for all of them.
    #[serde(default)]
    item: String,
}

/// `POST /console/stack/destinations/{name}/replay`: puts one dead letter
/// (`item`) or all of them back in the outbox, audited as the API's replay,
/// then shows the list again with how many went back.
async fn replay(State(state): State<AppState>, console: Console, Path(name): Path<String>, body: Bytes) -> Response {
    let form: ReplayForm = match form(&body) {
        Ok(form) => form,
        Err(error) => return console.error_page(error),
    };
    if !session::csrf_matches(&console.session, &form.csrf) {
        return console.error_page(super::csrf_refused());
    }
    if let Some(refused) = console.refused("POST", "/api/v1/destinations/{name}/replay", None) {
        return refused;
    }
    let item = match form.item.trim() {
        "" => None,
        given => match given.parse::<u64>() {
            Ok(item) => Some(item),
            Err(_) => {
                return console.error_page(
                    ApiError::new(ErrorCode::InvalidValue, format!("{given:?} is not a dead letter's id"))
                        .with_field("item"),
                )
            }
        },
    };
    let request = ReplayRequest { item, ..ReplayRequest::default() };
    match crate::destination_api::replay_and_audit(&state, &console.token, &name, &request).await {
        Ok(replayed) => {
            Redirect::to(&format!("/console/stack/destinations/{}?replayed={replayed}", path_segment(&name)))
                .into_response()
        }
        Err(error) => console.error_page(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_success_rate_counts_settled_items_only() {
        let counts = |delivered, dead, retrying| OutboxCounts { pending: 7, retrying, delivered, dead };
        assert_eq!(success_rate(&counts(0, 0, 3)), None, "nothing settled yet");
        assert_eq!(success_rate(&counts(3, 0, 0)), Some(100.0));
        assert_eq!(success_rate(&counts(2, 1, 5)), Some(66.7));
        assert_eq!(success_rate(&counts(0, 4, 0)), Some(0.0));
    }

    #[test]
    fn costs_read_with_thousands_separated() {
        assert_eq!(money(0.0), "0");
        assert_eq!(money(1200.0), "1,200");
        assert_eq!(money(1234567.5), "1,234,567.50");
        assert_eq!(money(999.99), "999.99");
        assert_eq!(money(-1500.0), "-1,500");
    }
}
