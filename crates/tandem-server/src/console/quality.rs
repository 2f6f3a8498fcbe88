//! The console's data-quality pages: tracking-plan violations by source
//! and event with an example of each, the quarantine (refused messages,
//! newest first, a page at a time), the rows this server's imports
//! rejected, and identity merges and drops across every profile (newest
//! first, a page at a time).
//!
//! Each part mirrors the API route that serves the same data and is shown
//! only to a role the permission table lets call it: violations and the
//! quarantine `GET /api/v1/plans/{source}/violations` (`governance:read`),
//! import rejects `GET /api/v1/imports`, merges and drops both listing
//! profiles and reading identities. Payloads pass through the PII masking.

use super::{clipped, page, text, when, Chrome, Console};
use crate::error::{ApiError, ErrorCode};
use crate::profile::read;
use crate::AppState;
use askama::Template;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use tandem_core::IdentityChange;
use tandem_store::{HistoryRecord, StoreError};

/// Violations shown per source, and in all.
const VIOLATIONS_PER_SOURCE: usize = 20;
const VIOLATIONS_SHOWN: usize = 60;
/// Characters of an example payload shown.
const SAMPLE_SHOWN: usize = 500;
/// Import jobs shown.
const IMPORTS_SHOWN: usize = 10;
/// Rows per page of the quarantine and of merges and drops.
const QUARANTINE_PAGE: usize = 25;
const IDENTITY_PAGE: usize = 25;

/// The data-quality routes, for [`super::routes`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console/quality", get(overview))
        .route("/console/quality/quarantine", get(quarantine))
        .route("/console/quality/identity", get(identity))
}

fn may_plans(console: &Console) -> bool {
    console.may("GET", "/api/v1/plans/{source}/violations", None)
}

fn may_imports(console: &Console) -> bool {
    console.may("GET", "/api/v1/imports", None)
}

/// Merges and drops across every profile are a listing of profiles' identities.
fn may_identity(console: &Console) -> bool {
    console.may("GET", "/api/v1/profiles", None) && console.may("GET", "/api/v1/profiles/{id}/identities", None)
}

/// Whether the role may see any part of data quality (its entry in the nav).
pub(super) fn visible(console: &Console) -> bool {
    may_plans(console) || may_imports(console) || may_identity(console)
}

/// The tabs between the data-quality pages the role may see.
struct Tabs {
    current: &'static str,
    overview: bool,
    quarantine: bool,
    identity: bool,
}

impl Tabs {
    fn of(console: &Console, current: &'static str) -> Tabs {
        Tabs {
            current,
            overview: may_plans(console) || may_imports(console),
            quarantine: may_plans(console),
            identity: may_identity(console),
        }
    }
}

/// One violation, grouped by source, event, kind and path.
struct ViolationRow {
    source: String,
    event: String,
    kind: String,
    path: String,
    count: u64,
    first_seen: String,
    last_seen: String,
    message: String,
    example: String,
}

/// One import job with the rows it rejected first.
struct ImportRow {
    id: String,
    source: String,
    file_name: String,
    status: String,
    rows_read: u64,
    imported: u64,
    rejected: u64,
    rejects: Vec<(u64, String, String)>,
    error: String,
}

#[derive(Template)]
#[template(path = "console/quality.html")]
struct OverviewPage {
    chrome: Chrome,
    tabs: Tabs,
    violations: Option<Vec<ViolationRow>>,
    /// Quarantined messages per source, and unresolved events.
    quarantined: Option<Vec<(String, u64)>>,
    unresolved: Option<u64>,
    imports: Option<Vec<ImportRow>>,
}

/// `GET /console/quality`: violations by source and event with examples,
/// quarantine counts per source, and the rows recent imports rejected.
async fn overview(State(state): State<AppState>, console: Console) -> Response {
    let (with_plans, with_imports) = (may_plans(&console), may_imports(&console));
    if !with_plans && !with_imports {
        return if may_identity(&console) {
            axum::response::IntoResponse::into_response(axum::response::Redirect::to("/console/quality/identity"))
        } else {
            console.refused_page("GET", "/api/v1/plans/{source}/violations")
        };
    }
    let loaded = read(&state, move |store| {
        if !with_plans {
            return Ok(None);
        }
        let stats = store.stats()?;
        let mut violations = Vec::new();
        for source in &stats.sources {
            for violation in store.plan_violations(&source.source_id, VIOLATIONS_PER_SOURCE)? {
                violations.push((source.name.clone(), violation));
            }
        }
        Ok::<_, StoreError>(Some((stats, violations)))
    })
    .await;
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return console.error_page(error),
    };
    let (mut violations, mut quarantined, mut unresolved) = (None, None, None);
    if let Some((stats, mut found)) = loaded {
        // The most frequent first, across sources.
        found.sort_by(|(_, a), (_, b)| b.count.cmp(&a.count).then(b.last_seen_ms.cmp(&a.last_seen_ms)));
        found.truncate(VIOLATIONS_SHOWN);
        violations = Some(
            found
                .into_iter()
                .map(|(source, violation)| ViolationRow {
                    source,
                    event: violation.event_name,
                    kind: violation.kind,
                    path: violation.path,
                    count: violation.count,
                    first_seen: when(Some(violation.first_seen_ms)),
                    last_seen: when(Some(violation.last_seen_ms)),
                    message: clipped(&violation.message, 300),
                    example: console.shown_payload(&state, &violation.sample, SAMPLE_SHOWN),
                })
                .collect(),
        );
        quarantined = Some(
            stats.sources.iter().filter(|source| source.rejected > 0).map(|s| (s.name.clone(), s.rejected)).collect(),
        );
        unresolved = Some(stats.unresolved);
    }
    let imports = with_imports.then(|| {
        state
            .imports
            .recent(IMPORTS_SHOWN)
            .into_iter()
            .map(|job| {
                let status = serde_json::to_value(job.status).map(|status| text(&status)).unwrap_or_default();
                ImportRow {
                    id: job.id,
                    source: job.source,
                    file_name: job.file_name,
                    status,
                    rows_read: job.counts.rows_read,
                    imported: job.counts.imported,
                    rejected: job.counts.rejected,
                    rejects: job
                        .first_rejects
                        .iter()
                        .map(|row| (row.line, row.column.clone().unwrap_or_default(), clipped(&row.reason, 200)))
                        .collect(),
                    error: job.error.unwrap_or_default(),
                }
            })
            .collect()
    });
    let template = OverviewPage {
        chrome: console.chrome("Data quality", "quality"),
        tabs: Tabs::of(&console, "overview"),
        violations,
        quarantined,
        unresolved,
        imports,
    };
    page(StatusCode::OK, template)
}

#[derive(Deserialize, Default)]
struct PageQuery {
    before: Option<u64>,
}

fn page_query(raw: Option<&str>) -> Result<PageQuery, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|_| {
        ApiError::new(ErrorCode::InvalidValue, "before must be the number a previous page gave").with_field("before")
    })
}

struct QuarantineRow {
    id: u64,
    received: String,
    source: String,
    code: String,
    field: String,
    message: String,
    payload: String,
}

#[derive(Template)]
#[template(path = "console/quality_quarantine.html")]
struct QuarantinePage {
    chrome: Chrome,
    tabs: Tabs,
    rows: Vec<QuarantineRow>,
    older: Option<u64>,
}

/// `GET /console/quality/quarantine?before=ID`: refused messages, newest
/// first, with why and the message as sent (masked as the role sees PII).
async fn quarantine(State(state): State<AppState>, console: Console, RawQuery(raw): RawQuery) -> Response {
    if !may_plans(&console) {
        return console.refused_page("GET", "/api/v1/plans/{source}/violations");
    }
    let query = match page_query(raw.as_deref()) {
        Ok(query) => query,
        Err(error) => return console.error_page(error),
    };
    let loaded = read(&state, move |store| {
        let names: HashMap<String, String> =
            store.list_sources()?.into_iter().map(|source| (source.id.to_string(), source.name)).collect();
        Ok((names, store.recent_quarantine(query.before, QUARANTINE_PAGE)?))
    })
    .await;
    let (names, entries) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return console.error_page(error),
    };
    let older = (entries.len() == QUARANTINE_PAGE).then(|| entries.last().map(|entry| entry.id)).flatten();
    let rows = entries
        .into_iter()
        .map(|entry| {
            let record = entry.record;
            QuarantineRow {
                id: entry.id,
                received: when(Some(record.received_at_ms)),
                source: names.get(record.source_id.as_str()).cloned().unwrap_or_else(|| record.source_id.to_string()),
                code: record.code,
                field: record.field.unwrap_or_default(),
                message: clipped(&record.message, 300),
                payload: console.shown_payload(&state, &record.payload, SAMPLE_SHOWN),
            }
        })
        .collect();
    let template = QuarantinePage {
        chrome: console.chrome("Quarantine", "quality"),
        tabs: Tabs::of(&console, "quarantine"),
        rows,
        older,
    };
    page(StatusCode::OK, template)
}

struct ChangeRow {
    id: u64,
    at: String,
    kind: &'static str,
    profile: String,
    /// The identifiers involved, as the role may see them.
    identifiers: Vec<String>,
    /// For a merge, the profiles merged away; for a drop, why.
    detail: String,
    position: String,
}

#[derive(Template)]
#[template(path = "console/quality_identity.html")]
struct IdentityPage {
    chrome: Chrome,
    tabs: Tabs,
    rows: Vec<ChangeRow>,
    older: Option<u64>,
}

/// `GET /console/quality/identity?before=ID`: identity merges and drops
/// across every profile, newest first, with the identifiers that caused
/// them (masked as the role sees PII; reads in clear are audited).
async fn identity(State(state): State<AppState>, console: Console, RawQuery(raw): RawQuery) -> Response {
    if let Some(refused) = console
        .refused("GET", "/api/v1/profiles", None)
        .or_else(|| console.refused("GET", "/api/v1/profiles/{id}/identities", None))
    {
        return refused;
    }
    let query = match page_query(raw.as_deref()) {
        Ok(query) => query,
        Err(error) => return console.error_page(error),
    };
    let changes = match read(&state, move |store| store.merges_and_drops(query.before, IDENTITY_PAGE)).await {
        Ok(changes) => changes,
        Err(error) => return console.error_page(error),
    };
    let older = (changes.len() == IDENTITY_PAGE).then(|| changes.last().map(|(id, _)| *id)).flatten();
    if console.token.sees_pii() && !changes.is_empty() {
        let mut profiles: Vec<String> =
            changes.iter().filter_map(|(_, record)| record.profile).map(|id| id.to_string()).collect();
        profiles.sort();
        profiles.dedup();
        let target = format!("{} profiles", profiles.len());
        let after = json!({"profiles": profiles});
        crate::audit::record(&state, &console.token, "profile.read_identities", &target, None, Some(after)).await;
    }
    let rows = changes.iter().map(|(id, record)| change_row(&console, &state, *id, record)).collect();
    let template = IdentityPage {
        chrome: console.chrome("Identity merges and drops", "quality"),
        tabs: Tabs::of(&console, "identity"),
        rows,
        older,
    };
    page(StatusCode::OK, template)
}

fn change_row(console: &Console, state: &AppState, id: u64, record: &HistoryRecord) -> ChangeRow {
    let shown = console.shown(state, serde_json::to_value(&record.change).unwrap_or(Value::Null));
    let pairs = |value: &Value| -> Vec<String> {
        let list = match value {
            Value::Array(items) => items.clone(),
            Value::Object(_) => vec![value.clone()],
            _ => Vec::new(),
        };
        list.iter().map(|identifier| format!("{}:{}", text(&identifier["type"]), text(&identifier["value"]))).collect()
    };
    let (kind, identifiers, detail) = match &record.change {
        IdentityChange::Merged { merged, .. } => (
            "merged",
            pairs(&shown["identifiers"]),
            format!("absorbed {}", merged.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
        ),
        IdentityChange::Dropped { reason, .. } => ("dropped", pairs(&shown["identifier"]), reason.clone()),
        // Only merges and drops are listed; anything else shows as what it is.
        _ => ("other", Vec::new(), text(&shown["kind"])),
    };
    ChangeRow {
        id,
        at: when(Some(record.recorded_at_ms)),
        kind,
        profile: record.profile.map(|profile| profile.to_string()).unwrap_or_default(),
        identifiers,
        detail,
        position: record.position.map(|position| position.0.to_string()).unwrap_or_default(),
    }
}
