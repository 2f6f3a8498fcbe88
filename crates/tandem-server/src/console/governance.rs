//! The console's governance pages: the audit log (newest first, filtered
//! by actor, action and time, a page at a time) with the hash chain checked
//! on request, data subject requests, tokens and what each role may do, and
//! the PII inventory.
//!
//! Each page mirrors the API route that serves the same data and is shown
//! only to a role the permission table lets call it: the audit log
//! `GET /api/v1/audit`, requests `GET /api/v1/dsr`, the PII inventory
//! `GET /api/v1/pii/inventory`; tokens, which the API does not list, need
//! `governance:read` like the other governance reports. A role with none of
//! them (a marketer) gets neither the pages nor their entry in the nav.

use super::{clipped, page, text, when, Chrome, Console};
use crate::profile::read;
use crate::AppState;
use askama::Template;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use std::collections::HashMap;
use tandem_core::govern::{Permission, Role};
use tandem_store::{AuditFilter, StoreError};

/// Audit entries per page.
const AUDIT_PAGE: usize = 50;
/// Characters of an entry's before or after state shown.
const STATE_SHOWN: usize = 300;
/// Data subject requests shown (the newest).
const REQUESTS_SHOWN: usize = 100;

/// The governance routes, for [`super::routes`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console/governance", get(first_page))
        .route("/console/governance/audit", get(audit))
        .route("/console/governance/requests", get(requests))
        .route("/console/governance/access", get(access))
        .route("/console/governance/pii", get(pii))
}

fn may_audit(console: &Console) -> bool {
    console.may("GET", "/api/v1/audit", None)
}

fn may_requests(console: &Console) -> bool {
    console.may("GET", "/api/v1/dsr", None)
}

fn may_pii(console: &Console) -> bool {
    console.may("GET", "/api/v1/pii/inventory", None)
}

/// Tokens have no API route; they are a governance report like the others.
fn may_tokens(console: &Console) -> bool {
    console.role().grants(Permission::GovernanceRead)
}

/// Whether the role may see any governance page (its entry in the nav).
pub(super) fn visible(console: &Console) -> bool {
    may_audit(console) || may_requests(console) || may_tokens(console) || may_pii(console)
}

/// The tabs between the governance pages the role may see.
struct Tabs {
    current: &'static str,
    audit: bool,
    requests: bool,
    access: bool,
    pii: bool,
}

impl Tabs {
    fn of(console: &Console, current: &'static str) -> Tabs {
        Tabs {
            current,
            audit: may_audit(console),
            requests: may_requests(console),
            access: may_tokens(console),
            pii: may_pii(console),
        }
    }
}

/// `GET /console/governance`: the first governance page the role may see,
/// or a `403` page naming the permission it lacks.
async fn first_page(console: Console) -> Response {
    let tabs = Tabs::of(&console, "");
    let to = if tabs.audit {
        "/console/governance/audit"
    } else if tabs.requests {
        "/console/governance/requests"
    } else if tabs.access {
        "/console/governance/access"
    } else if tabs.pii {
        "/console/governance/pii"
    } else {
        return console.refused_page("GET", "/api/v1/audit");
    };
    Redirect::to(to).into_response()
}

struct AuditRow {
    seq: i64,
    at: String,
    actor: String,
    role: String,
    action: String,
    target: String,
    before: String,
    after: String,
}

/// The chain's state, when checked.
struct ChainStatus {
    intact: bool,
    message: String,
}

#[derive(Template)]
#[template(path = "console/governance_audit.html")]
struct AuditPage {
    chrome: Chrome,
    tabs: Tabs,
    actor: String,
    action: String,
    since: String,
    error: Option<String>,
    rows: Vec<AuditRow>,
    chain: Option<ChainStatus>,
    /// The query string of the next (older) page.
    older: Option<String>,
    /// The query string that checks the chain, keeping the filters.
    verify: String,
}

#[derive(Deserialize, Default)]
struct AuditQuery {
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    since: String,
    before: Option<i64>,
    #[serde(default)]
    verify: Option<String>,
}

/// `GET /console/governance/audit?actor=&action=&since=&before=&verify=1`:
/// entries newest first; `actor` is a token's id or name (or `cli`),
/// `action` an action or its area (`audience`), `since` an RFC 3339 time or
/// a span back from now (`7d`). `verify` checks the whole hash chain, which
/// reads every entry, so it runs only when asked.
async fn audit(State(state): State<AppState>, console: Console, RawQuery(raw): RawQuery) -> Response {
    if !may_audit(&console) {
        return console.refused_page("GET", "/api/v1/audit");
    }
    let query: AuditQuery = serde_urlencoded::from_str(raw.as_deref().unwrap_or("")).unwrap_or_default();
    let mut error = None;
    let since_ms = match query.since.trim() {
        "" => None,
        given => {
            let parsed = tandem_core::activate::parse_since_ms(given, chrono::Utc::now().timestamp_millis());
            if parsed.is_none() {
                error = Some(format!("{given:?} is neither an RFC 3339 time nor a span such as 2h or 7d"));
            }
            parsed
        }
    };
    let (actor, action) = (query.actor.trim().to_owned(), query.action.trim().to_owned());
    let verify = query.verify.is_some();
    let before = query.before;
    let wanted_actor = actor.clone();
    let wanted_action = action.clone();
    let loaded = read(&state, move |store| {
        let names: HashMap<String, String> =
            store.list_tokens()?.into_iter().map(|token| (token.id, token.name)).collect();
        // A token may be named instead of given by id.
        let actor = (!wanted_actor.is_empty()).then(|| {
            names
                .iter()
                .find(|(id, name)| **name == wanted_actor && **id != wanted_actor)
                .map_or(wanted_actor.clone(), |(id, _)| id.clone())
        });
        let filter = AuditFilter {
            actor,
            action: (!wanted_action.is_empty()).then_some(wanted_action),
            since_ms,
            limit: AUDIT_PAGE,
            newest_first: true,
            before_seq: before,
            ..AuditFilter::default()
        };
        let entries = store.audit_entries(&filter)?;
        let chain = if verify { Some(store.verify_audit()?) } else { None };
        Ok::<_, StoreError>((names, entries, chain))
    })
    .await;
    let (names, entries, chain) = match loaded {
        Ok(loaded) => loaded,
        Err(error) => return console.error_page(error),
    };
    let filters = [("actor", actor.as_str()), ("action", action.as_str()), ("since", query.since.trim())];
    let with = |extra: (&str, String)| {
        let mut pairs: Vec<(&str, String)> = filters
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(key, value)| (*key, value.to_string()))
            .collect();
        pairs.push(extra);
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    };
    let older = (entries.len() == AUDIT_PAGE)
        .then(|| entries.last().map(|entry| with(("before", entry.seq.to_string()))))
        .flatten();
    let shown_state = |value: &Option<serde_json::Value>| {
        value.as_ref().map(|value| clipped(&value.to_string(), STATE_SHOWN)).unwrap_or_default()
    };
    let rows = entries
        .iter()
        .map(|entry| AuditRow {
            seq: entry.seq,
            at: when(Some(entry.at_ms)),
            actor: match names.get(&entry.actor) {
                Some(name) => format!("{name} ({})", entry.actor),
                None => entry.actor.clone(),
            },
            role: entry.role.clone(),
            action: entry.action.clone(),
            target: entry.target.clone(),
            before: shown_state(&entry.before),
            after: shown_state(&entry.after),
        })
        .collect();
    let chain = chain.map(|outcome| match outcome {
        Ok(entries) => ChainStatus { intact: true, message: format!("Intact: all {entries} entries verify.") },
        Err(broken) => {
            ChainStatus { intact: false, message: format!("Broken at entry {}: {}.", broken.seq, broken.reason) }
        }
    });
    let template = AuditPage {
        chrome: console.chrome("Audit log", "governance"),
        tabs: Tabs::of(&console, "audit"),
        verify: with(("verify", "1".to_owned())),
        actor,
        action,
        since: query.since.trim().to_owned(),
        error,
        rows,
        chain,
        older,
    };
    page(StatusCode::OK, template)
}

struct RequestRow {
    id: String,
    kind: String,
    status: String,
    subject: String,
    created: String,
    finished: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "console/governance_requests.html")]
struct RequestsPage {
    chrome: Chrome,
    tabs: Tabs,
    rows: Vec<RequestRow>,
    shown: usize,
}

/// `GET /console/governance/requests`: the newest data subject requests
/// with their status; the person only by the digest of the identifier.
async fn requests(State(state): State<AppState>, console: Console) -> Response {
    if !may_requests(&console) {
        return console.refused_page("GET", "/api/v1/dsr");
    }
    let requests = match read(&state, |store| store.list_dsr(REQUESTS_SHOWN)).await {
        Ok(requests) => requests,
        Err(error) => return console.error_page(error),
    };
    let rows = requests
        .into_iter()
        .map(|request| RequestRow {
            id: request.id,
            kind: request.kind.as_str().to_owned(),
            status: request.status.as_str().to_owned(),
            subject: clipped(&request.subject_digest, 16),
            created: when(Some(request.created_at_ms)),
            finished: when(request.finished_at_ms),
            detail: clipped(&request.detail.unwrap_or_default(), 300),
        })
        .collect();
    let template = RequestsPage {
        chrome: console.chrome("Data subject requests", "governance"),
        tabs: Tabs::of(&console, "requests"),
        rows,
        shown: REQUESTS_SHOWN,
    };
    page(StatusCode::OK, template)
}

struct TokenRow {
    id: String,
    name: String,
    role: String,
    created: String,
    expires: String,
    expired: bool,
    last_used: String,
}

struct RoleRow {
    role: String,
    permissions: Vec<&'static str>,
    pii: &'static str,
}

#[derive(Template)]
#[template(path = "console/governance_access.html")]
struct AccessPage {
    chrome: Chrome,
    tabs: Tabs,
    tokens: Vec<TokenRow>,
    roles: Vec<RoleRow>,
}

/// `GET /console/governance/access`: every token (never its secret) with
/// its role, expiry and last use, and what each role may do.
async fn access(State(state): State<AppState>, console: Console) -> Response {
    if !may_tokens(&console) {
        return console.error_page(crate::access::denied(console.role(), Permission::GovernanceRead));
    }
    let tokens = match read(&state, |store| store.list_tokens()).await {
        Ok(tokens) => tokens,
        Err(error) => return console.error_page(error),
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let tokens = tokens
        .into_iter()
        .map(|token| TokenRow {
            expired: token.is_expired(now_ms),
            created: when(Some(token.created_at_ms)),
            expires: when(token.expires_at_ms),
            last_used: when(token.last_used_at_ms),
            role: token.role.as_str().to_owned(),
            id: token.id,
            name: token.name,
        })
        .collect();
    let roles = Role::ALL
        .into_iter()
        .map(|role| RoleRow {
            role: role.as_str().to_owned(),
            permissions: role.permissions().into_iter().map(Permission::as_str).collect(),
            pii: if role.grants(Permission::PiiRead) { "in clear" } else { "masked" },
        })
        .collect();
    page(
        StatusCode::OK,
        AccessPage {
            chrome: console.chrome("Tokens and roles", "governance"),
            tabs: Tabs::of(&console, "access"),
            tokens,
            roles,
        },
    )
}

struct KeyRow {
    key: String,
    class: String,
    sources: String,
    last_seen: String,
}

#[derive(Template)]
#[template(path = "console/governance_pii.html")]
struct PiiPage {
    chrome: Chrome,
    tabs: Tabs,
    keys: Vec<KeyRow>,
}

/// `GET /console/governance/pii`: every trait and property key events
/// have carried, with its PII class, the sources that sent it and when.
async fn pii(State(state): State<AppState>, console: Console) -> Response {
    if !may_pii(&console) {
        return console.refused_page("GET", "/api/v1/pii/inventory");
    }
    let policy = state.pii.current();
    let keys = match read(&state, move |store| crate::pii::inventory_json(store, &policy)).await {
        Ok(keys) => keys,
        Err(error) => return console.error_page(error),
    };
    let keys = keys
        .iter()
        .map(|key| KeyRow {
            key: text(&key["key"]),
            class: text(&key["class"]),
            sources: key["sources"]
                .as_array()
                .map(|sources| sources.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            last_seen: text(&key["last_seen"]),
        })
        .collect();
    page(
        StatusCode::OK,
        PiiPage { chrome: console.chrome("PII inventory", "governance"), tabs: Tabs::of(&console, "pii"), keys },
    )
}
