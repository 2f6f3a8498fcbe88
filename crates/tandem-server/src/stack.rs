//! The stack registry over HTTP and for the CLI: every source and
//! destination with its owner, department, purpose and annual cost
//! ([`set_tool`], the one way an entry changes), the report
//! ([`stack_report`]: spend by department, tools without an owner, shadow
//! traffic), and the record of requests the tracking API refused for a
//! write key matching no source ([`ShadowTraffic`]).
//!
//! Shadow traffic is noted in memory on the refusal path — a map bounded to
//! [`MAX_PENDING_KEYS`] keys with at most ten addresses and user agents each —
//! and written to storage every [`SHADOW_FLUSH_INTERVAL`] (and before a
//! report), so a flood of bad keys costs no write per request.

use crate::auth::SourceDirectory;
use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiPath};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_core::govern::stack::{RegistryError, ShadowKey, StackReport, Tool, ToolInfo, ToolKind, MAX_SHADOW_SAMPLES};
use tandem_core::WriteKey;
use tandem_store::{Store, StoreError};

/// Unknown keys noted in memory between two flushes, at most.
pub const MAX_PENDING_KEYS: usize = 1_000;
/// How often noted shadow traffic is written to storage.
pub const SHADOW_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Unknown keys a report lists, at most.
const REPORT_SHADOW_KEYS: usize = 100;

/// Who sent a request, as far as the server can tell.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller<'a> {
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

/// Requests refused for an unknown or revoked write key, noted until the
/// next flush.
#[derive(Default)]
pub struct ShadowTraffic {
    pending: Mutex<HashMap<String, ShadowKey>>,
}

impl ShadowTraffic {
    /// Notes one refused request.
    pub fn note(&self, key: &WriteKey, caller: Caller<'_>) {
        let digest = tandem_store::sources::secret_digest(key.as_str());
        let now = chrono::Utc::now().timestamp_millis();
        let sample = |value: Option<&str>| value.map(|value| value.chars().take(200).collect::<String>());
        let sighting = ShadowKey {
            key_digest: digest.clone(),
            key_hint: format!("{}…", key.as_str().chars().take(4).collect::<String>()),
            requests: 1,
            first_seen_ms: now,
            last_seen_ms: now,
            ips: sample(caller.ip).into_iter().collect(),
            user_agents: sample(caller.user_agent).into_iter().collect(),
        };
        debug_assert!(sighting.ips.len() <= MAX_SHADOW_SAMPLES);
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let room = pending.len() < MAX_PENDING_KEYS;
        match pending.get_mut(&digest) {
            Some(known) => known.absorb(&sighting),
            None if room => {
                pending.insert(digest, sighting);
            }
            None => {}
        }
    }

    /// Takes what was noted since the last call.
    pub fn take(&self) -> Vec<ShadowKey> {
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pending.drain().map(|(_, sighting)| sighting).collect()
    }

    /// Writes what was noted to storage.
    pub fn flush(&self, store: &dyn Store) -> Result<(), StoreError> {
        let noted = self.take();
        store.record_shadow_traffic(&noted)
    }
}

/// Flushes shadow traffic every [`SHADOW_FLUSH_INTERVAL`] until aborted.
/// Holds the store and the directory only, not the server state, so it
/// keeps no handle to the log writer alive at shutdown.
pub async fn flush_shadow_traffic(store: Arc<dyn Store>, sources: Arc<SourceDirectory>) {
    let mut ticker = tokio::time::interval(SHADOW_FLUSH_INTERVAL);
    loop {
        ticker.tick().await;
        let (store, sources) = (store.clone(), sources.clone());
        let flushed = tokio::task::spawn_blocking(move || sources.shadow().flush(store.as_ref())).await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "recording shadow traffic failed");
        }
    }
}

/// Changing an entry went wrong.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Invalid(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sets the fields `change` gives of the named tool's entry (the others stay).
pub fn set_tool(store: &dyn Store, kind: ToolKind, name: &str, change: ToolInfo) -> Result<Tool, StackError> {
    let change = change.validated()?;
    let key = match kind {
        ToolKind::Source => store.source_by_name(name)?.id.as_str().to_owned(),
        ToolKind::Destination => {
            store.destination(name)?.ok_or_else(|| StoreError::DestinationNotFound(name.to_owned()))?;
            name.to_owned()
        }
    };
    let current = store
        .tool_infos()?
        .into_iter()
        .find(|(known_kind, known_key, _)| *known_kind == kind && *known_key == key)
        .map(|(_, _, info)| info)
        .unwrap_or_default();
    let info = current.updated_by(&change);
    store.set_tool_info(kind, &key, &info)?;
    Ok(Tool { kind, name: name.to_owned(), info })
}

/// The report over every source and destination (with an empty entry for a
/// tool nobody described) and the unknown keys seen.
pub fn stack_report(store: &dyn Store) -> Result<StackReport, StoreError> {
    stack_report_over(store, store.list_destinations()?)
}

/// [`stack_report`] over destinations already read (each read counts its
/// outbox, so a page that shows them too reads them once).
pub fn stack_report_over(
    store: &dyn Store,
    destinations: Vec<tandem_store::DestinationRecord>,
) -> Result<StackReport, StoreError> {
    let entries: HashMap<(ToolKind, String), ToolInfo> =
        store.tool_infos()?.into_iter().map(|(kind, key, info)| ((kind, key), info)).collect();
    let mut tools = Vec::new();
    for source in store.list_sources()? {
        let info = entries.get(&(ToolKind::Source, source.id.as_str().to_owned())).cloned().unwrap_or_default();
        tools.push(Tool { kind: ToolKind::Source, name: source.name, info });
    }
    for record in destinations {
        let name = record.definition.name;
        let info = entries.get(&(ToolKind::Destination, name.clone())).cloned().unwrap_or_default();
        tools.push(Tool { kind: ToolKind::Destination, name, info });
    }
    Ok(StackReport::build(tools, store.shadow_traffic(REPORT_SHADOW_KEYS)?))
}

/// The tools that handle personal data, from the PII inventory: a source
/// that has sent a yellow or red key, and a destination that receives events
/// while any source sends such keys, or audience changes carrying a trait
/// the inventory holds as yellow or red. `None` (shown as `null`) when the
/// inventory cannot be read, rather than a guess.
pub fn tools_touching_pii(store: &dyn Store) -> Option<Vec<String>> {
    use tandem_core::govern::PiiClass;
    let inventory = store.pii_inventory().ok()?;
    let personal: Vec<_> = inventory.iter().filter(|record| record.class != PiiClass::Green).collect();
    let source_ids: std::collections::BTreeSet<_> =
        personal.iter().flat_map(|record| record.sources.iter().cloned()).collect();
    let keys: std::collections::BTreeSet<&str> = personal.iter().map(|record| record.key.as_str()).collect();
    let mut tools: Vec<String> = store
        .list_sources()
        .ok()?
        .into_iter()
        .filter(|source| source_ids.contains(&source.id))
        .map(|source| format!("source {}", source.name))
        .collect();
    for record in store.list_destinations().ok()? {
        let definition = &record.definition;
        let events = definition.events.is_some() && !source_ids.is_empty();
        let traits = definition
            .audiences
            .iter()
            .any(|subscription| subscription.traits.iter().any(|name| keys.contains(name.as_str())));
        if events || traits {
            tools.push(format!("destination {}", definition.name));
        }
    }
    tools.sort();
    Some(tools)
}

/// The report as the API and `tandem stack report --json` show it.
pub fn report_json(store: &dyn Store, report: &StackReport) -> Value {
    let mut shown = serde_json::to_value(report).unwrap_or_default();
    shown["tools_touching_pii"] = json!(tools_touching_pii(store));
    if let Some(keys) = shown["shadow_traffic"].as_array_mut() {
        for (shown_key, key) in keys.iter_mut().zip(&report.shadow_traffic) {
            shown_key["first_seen"] = json!(crate::profile::format_ms(key.first_seen_ms));
            shown_key["last_seen"] = json!(crate::profile::format_ms(key.last_seen_ms));
        }
    }
    shown
}

/// The stack routes, for [`crate::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/stack", get(show_report))
        .route("/api/v1/stack/sources/{name}", put(set_source))
        .route("/api/v1/stack/destinations/{name}", put(set_destination))
}

fn stack_error(error: StackError) -> ApiError {
    match error {
        StackError::Invalid(invalid) => {
            ApiError::new(ErrorCode::InvalidValue, invalid.to_string()).with_field(invalid.field)
        }
        StackError::Store(StoreError::SourceNotFound(name)) => {
            ApiError::new(ErrorCode::SourceNotFound, format!("no source named {name:?}")).with_field("name")
        }
        StackError::Store(StoreError::DestinationNotFound(name)) => {
            ApiError::new(ErrorCode::DestinationNotFound, format!("no destination named {name:?}")).with_field("name")
        }
        StackError::Store(error) => {
            tracing::error!(%error, "stack registry storage failed");
            ApiError::new(ErrorCode::Unavailable, "the stack registry cannot be read or written right now, retry later")
        }
    }
}

async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&dyn Store) -> Result<T, StackError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || work(store.as_ref()))
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
        .map_err(stack_error)
}

/// Reads a registry entry from a request body.
pub fn parse_tool_info(body: &[u8]) -> Result<ToolInfo, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        if error.is_syntax() || error.is_eof() {
            ApiError::new(ErrorCode::InvalidJson, format!("the body is not JSON: {error}"))
        } else {
            ApiError::new(ErrorCode::InvalidValue, format!("the body is not a registry entry: {error}"))
        }
    })
}

/// `GET /api/v1/stack`: the report.
async fn show_report(State(state): State<AppState>, token: AdminToken) -> Result<Json<Value>, ApiError> {
    let sources = state.sources.clone();
    let mut shown = blocking(&state, move |store| {
        sources.shadow().flush(store)?;
        let report = stack_report(store)?;
        Ok(report_json(store, &report))
    })
    .await?;
    // Sending addresses are of the `ip` class: shown as the caller may see them.
    let policy = state.pii.current();
    if let Some(keys) = shown["shadow_traffic"].as_array_mut() {
        for key in keys {
            let mut ips = crate::pii::shown_to(&token, &policy, json!({ "ip": key["ips"].take() }));
            key["ips"] = ips["ip"].take();
        }
    }
    Ok(Json(shown))
}

/// `PUT /api/v1/stack/sources/{name}` with `{"owner", "department", "purpose", "annual_cost"}`
/// (any of them): the source's entry.
async fn set_source(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(name): ApiPath<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    set_entry(state, token, ToolKind::Source, name, &body).await
}

/// `PUT /api/v1/stack/destinations/{name}`: the destination's entry.
async fn set_destination(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(name): ApiPath<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    set_entry(state, token, ToolKind::Destination, name, &body).await
}

/// Changes one tool's registry entry and audits the change.
async fn set_entry(
    state: AppState,
    token: AdminToken,
    kind: ToolKind,
    name: String,
    body: &[u8],
) -> Result<Json<Value>, ApiError> {
    let change = parse_tool_info(body)?;
    let target = name.clone();
    let tool = blocking(&state, move |store| set_tool(store, kind, &target, change)).await?;
    let shown = serde_json::to_value(tool).unwrap_or_default();
    let action = match kind {
        ToolKind::Source => "stack.set_source",
        ToolKind::Destination => "stack.set_destination",
    };
    crate::audit::record(&state, &token, action, &name, None, Some(shown.clone())).await;
    Ok(Json(shown))
}
