//! What makes the demo company a living one beyond its history, so every
//! console page has something to show: one token per role; a file
//! destination and a webhook destination whose receiver (the company's CRM,
//! [`super::receiver`]) fails now and then, so retries and dead letters
//! exist; a tracking plan on the website with events arriving that break
//! it; an owner, department, purpose and cost on every source and
//! destination; and a tool nobody registered (a quiz widget marketing
//! embedded) sending traffic with a write key that matches no source.
//!
//! While the demo serves, [`live_traffic`] keeps the company going: page
//! views, product views and orders from its customers every few seconds,
//! now and then an event that breaks the plan and a request from the
//! unregistered tool. Everything is sent through the same router the
//! server uses, as the tracking API receives it from the network.
//!
//! Each step checks what exists first, so running `tandem demo` again on
//! the same store keeps what is there.

use super::receiver::FlakyReceiver;
use super::Company;
use anyhow::Context;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::activate::{DestinationDefinition, DestinationSettings};
use tandem_core::govern::stack::{Department, ToolInfo, ToolKind};
use tandem_core::govern::{Permission, Role};
use tandem_core::random::Random;
use tandem_server::AppState;
use tandem_store::Store;
use tower::ServiceExt;

/// The webhook destination, delivering orders and "high value" entries to the CRM.
pub const WEBHOOK_DESTINATION: &str = "crm-sync";
/// The file destination, writing audience changes and snapshots as CSV.
pub const FILE_DESTINATION: &str = "data-lake";
/// Where the file destination writes, inside the demo's data directory.
pub const EXPORTS_DIR: &str = "demo-exports";
/// The source whose tracking plan the demo sets.
pub const PLANNED_SOURCE: &str = "website";
/// The unregistered tool's write key: it matches no source.
pub const SHADOW_WRITE_KEY: &str = "qzp_live_7f3a9c21d4e8";
/// The unregistered tool's user agent, as the stack report shows it.
pub const SHADOW_USER_AGENT: &str = "QuizPop/3.1 (embedded quiz widget)";
/// How often the live company sends something.
pub const LIVE_TICK: Duration = Duration::from_secs(2);

/// The website's tracking plan: product views need a product id (text) and
/// a price (a number); identify calls' names and e-mail are text. `report`
/// keeps events that break it and counts them.
pub const WEBSITE_PLAN: &str = r#"{
  "mode": "report",
  "events": {
    "Product Viewed": {
      "type": "object",
      "required": ["product_id", "price"],
      "properties": {"product_id": {"type": "string"}, "price": {"type": "number"}}
    }
  },
  "identify": {
    "type": "object",
    "properties": {"email": {"type": "string"}, "first_name": {"type": "string"}, "last_name": {"type": "string"}}
  }
}"#;

/// Who owns each tool, for which department, why, and what it costs a year.
pub const REGISTRY: &[(ToolKind, &str, &str, Department, &str, f64)] = &[
    (ToolKind::Source, "website", "Ann Lee", Department::Marketing, "web analytics on the shop", 4_800.0),
    (ToolKind::Source, "app", "Dan Walsh", Department::It, "behaviour in the mobile app", 6_000.0),
    (ToolKind::Source, "crm", "Bo Chen", Department::Sales, "contacts and deal stages", 24_000.0),
    (ToolKind::Source, "orders", "Erin Novak", Department::It, "order history from the shop system", 3_600.0),
    (ToolKind::Source, "product", "Dan Walsh", Department::It, "feature usage from the product database", 1_200.0),
    (ToolKind::Source, "helpdesk", "Ines Silva", Department::Support, "support tickets and satisfaction", 9_600.0),
    (ToolKind::Source, "leads", "Maya Rossi", Department::Marketing, "landing-page lead exports", 2_400.0),
    (ToolKind::Source, "facebook-leads", "Maya Rossi", Department::Marketing, "lead ads", 18_000.0),
    (ToolKind::Source, "social", "Tara Okafor", Department::Marketing, "brand mentions", 7_200.0),
    (ToolKind::Destination, WEBHOOK_DESTINATION, "Bo Chen", Department::Sales, "orders and VIPs into the CRM", 3_000.0),
    (
        ToolKind::Destination,
        FILE_DESTINATION,
        "Erin Novak",
        Department::It,
        "audience files for the data lake",
        1_800.0,
    ),
];

/// One of the demo's tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleToken {
    pub role: Role,
    pub secret: String,
}

/// Creates a token for every role (named `demo ROLE`); secrets are shown
/// once, so each run makes new ones.
pub fn create_role_tokens(store: &dyn Store) -> anyhow::Result<Vec<RoleToken>> {
    Role::ALL
        .into_iter()
        .map(|role| {
            let (_, secret) = store.create_token_with(&format!("demo {role}"), role, None)?;
            Ok(RoleToken { role, secret })
        })
        .collect()
}

/// What a role sees, in a few words, read from the permission table.
pub fn what_it_sees(role: Role) -> String {
    if Permission::ALL.into_iter().all(|permission| role.grants(permission)) {
        return "everything, personal data in clear".to_owned();
    }
    let mut areas: Vec<&str> = Vec::new();
    for permission in role.permissions() {
        let area = match permission {
            Permission::GoalsRead | Permission::GoalsWrite => "goals",
            Permission::ProfilesList => "customer search",
            Permission::ProfilesLookup => "one customer at a time",
            Permission::EventsRead => "timelines",
            Permission::IdentitiesRead => "identity history",
            Permission::AudiencesRead | Permission::AudiencesWrite => "audiences",
            Permission::AudiencesExport => "audience members",
            Permission::ComputedTraitsRead | Permission::ComputedTraitsWrite => "computed traits",
            Permission::DestinationsRead | Permission::DestinationsWrite => "destinations",
            Permission::ImportsRead | Permission::ImportsWrite => "imports",
            Permission::ClusterRead => "the cluster",
            Permission::AuditRead => "the audit log",
            Permission::GovernanceRead | Permission::GovernanceWrite => "governance",
            Permission::PiiRead | Permission::DocsRead => continue,
        };
        if !areas.contains(&area) {
            areas.push(area);
        }
    }
    let personal_data = if role.grants(Permission::PiiRead) { "in clear" } else { "masked" };
    format!("{}; personal data {personal_data}", areas.join(", "))
}

/// The destinations, their receiver running: the webhook's CRM receiver is
/// started on the port its destination names, or on a free port with the
/// destination pointed there (a port taken since the last run leaves the
/// old destination and its dead letters behind).
pub async fn start_destinations(store: &Arc<dyn Store>, data_dir: &Path) -> anyhow::Result<FlakyReceiver> {
    let existing = blocking(store, |store| Ok(store.destination(WEBHOOK_DESTINATION)?)).await?;
    let known_port = existing.as_ref().and_then(|record| match &record.definition.destination {
        DestinationSettings::Webhook(settings) => settings
            .url
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next().and_then(|port| port.parse::<u16>().ok())),
        _ => None,
    });
    let receiver = match known_port {
        Some(port) => match FlakyReceiver::start(port).await {
            Ok(receiver) => receiver,
            Err(error) => {
                tracing::warn!(%error, port, "the CRM receiver's port is taken; {WEBHOOK_DESTINATION} is created anew");
                let receiver = FlakyReceiver::start(0).await?;
                let url = receiver.url();
                blocking(store, move |store| {
                    store.delete_destination(WEBHOOK_DESTINATION)?;
                    create(store, webhook_definition(&url))
                })
                .await?;
                receiver
            }
        },
        None => {
            let receiver = FlakyReceiver::start(0).await?;
            let url = receiver.url();
            blocking(store, move |store| create(store, webhook_definition(&url))).await?;
            receiver
        }
    };
    let directory = std::path::absolute(data_dir.join(EXPORTS_DIR))?;
    blocking(store, move |store| {
        if store.destination(FILE_DESTINATION)?.is_none() {
            create(store, file_definition(&directory))?;
        }
        Ok(())
    })
    .await?;
    Ok(receiver)
}

/// Orders and entries into "high value", to the CRM: small batches, and
/// retries that give up within minutes, so a demo shows dead letters soon.
fn webhook_definition(url: &str) -> Value {
    json!({
        "name": WEBHOOK_DESTINATION,
        "destination": {"kind": "webhook", "url": url, "timeout_ms": 5_000},
        "events": {"types": ["track"], "names": ["Order Completed"]},
        "audiences": [{"name": "high value", "traits": ["email", "first_name", "last_name"]}],
        "retry": {"initial_backoff_ms": 500, "max_backoff_ms": 5_000, "give_up_after_ms": 600_000},
        "batch_size": 25
    })
}

/// Every change of two audiences, with hourly snapshots, as CSV files.
fn file_definition(directory: &Path) -> Value {
    json!({
        "name": FILE_DESTINATION,
        "destination": {"kind": "file", "directory": directory, "format": "csv", "snapshot_every": "1h"},
        "audiences": [{"name": "recent buyers", "traits": ["email"]}, {"name": "high value", "traits": ["email"]}]
    })
}

fn create(store: &dyn Store, definition: Value) -> anyhow::Result<()> {
    let definition: DestinationDefinition = serde_json::from_value(definition)?;
    tandem_server::activate::create_destination(store, &definition, chrono::Utc::now().timestamp_millis())?;
    Ok(())
}

async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    work: impl FnOnce(&dyn Store) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || work(store.as_ref())).await?
}

/// Sets the website's tracking plan and sends events that break it, lets
/// the unregistered tool send its first requests (once per store), and
/// fills the registry entries nobody has written yet.
pub async fn furnish(state: &AppState, company: &Company) -> anyhow::Result<()> {
    let website = blocking(&state.store, |store| Ok(store.source_by_name(PLANNED_SOURCE)?)).await?;
    let planned = {
        let id = website.id.clone();
        blocking(&state.store, move |store| Ok(store.plan(&id)?.is_some())).await?
    };
    if !planned {
        blocking(&state.store, |store| Ok(tandem_server::govern::set_plan(store, PLANNED_SOURCE, WEBSITE_PLAN)?))
            .await?;
        state.plans.forget(&website.id);
        let app = tandem_server::router(state.clone());
        let users = known_user_ids(company);
        let mut random = Random::new(company.expected.customers ^ 0x5eed);
        let breaking = (company.expected.customers / 250).max(8);
        let messages: Vec<Value> =
            (0..breaking).map(|n| plan_breaking_event(&mut random, &users, &format!("demo-plan-{n}"), None)).collect();
        send(&app, website.write_key.as_str(), json!({"batch": messages}), None).await?;
        let shadow_requests = (company.expected.customers / 500).max(5);
        for n in 0..shadow_requests {
            let status =
                send(&app, SHADOW_WRITE_KEY, shadow_event(&format!("demo-quiz-{n}")), Some(SHADOW_USER_AGENT)).await?;
            debug_assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
        let sources = state.sources.clone();
        blocking(&state.store, move |store| Ok(sources.shadow().flush(store)?)).await?;
    }
    blocking(&state.store, register_tools).await
}

/// Writes [`REGISTRY`]'s entry of every tool that has none yet (a changed
/// entry stays as changed).
pub fn register_tools(store: &dyn Store) -> anyhow::Result<()> {
    let described: Vec<(ToolKind, String)> = store
        .tool_infos()?
        .into_iter()
        .filter(|(_, _, info)| *info != ToolInfo::default())
        .map(|(kind, key, _)| (kind, key))
        .collect();
    for (kind, name, owner, department, purpose, cost) in REGISTRY {
        let key = match kind {
            ToolKind::Source => match store.source_by_name(name) {
                Ok(source) => source.id.as_str().to_owned(),
                Err(tandem_store::StoreError::SourceNotFound(_)) => continue,
                Err(error) => return Err(error.into()),
            },
            ToolKind::Destination => (*name).to_owned(),
        };
        if described.contains(&(*kind, key)) {
            continue;
        }
        let info = ToolInfo {
            owner: Some((*owner).to_owned()),
            department: Some(*department),
            purpose: Some((*purpose).to_owned()),
            annual_cost: Some(*cost),
        };
        tandem_server::stack::set_tool(store, *kind, name, info)
            .with_context(|| format!("registering {} {name}", kind.as_str()))?;
    }
    Ok(())
}

/// The user ids the company's customers log in with.
pub fn known_user_ids(company: &Company) -> Vec<String> {
    let mut users: Vec<String> = company
        .tracking
        .iter()
        .filter_map(|(_, body)| body["batch"].as_array())
        .flatten()
        .filter(|message| message["type"] == "identify")
        .filter_map(|message| message["userId"].as_str().map(str::to_owned))
        .collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// An event the website's plan does not allow: a price sent as text, a
/// product view without a product, or a track call the plan does not list.
fn plan_breaking_event(random: &mut Random, users: &[String], message_id: &str, timestamp: Option<&str>) -> Value {
    let user = users.get(random.below(users.len() as u64) as usize).cloned().unwrap_or_else(|| "u000000".into());
    let mut message = match random.below(4) {
        0 => json!({"type": "track", "event": "Product Viewed",
                    "properties": {"product_id": format!("sku-{:05}", random.below(500)), "price": "59.90 EUR"}}),
        1 => json!({"type": "track", "event": "Product Viewed", "properties": {"price": 79}}),
        2 => json!({"type": "track", "event": "Wishlist Added",
                    "properties": {"product_id": format!("sku-{:05}", random.below(500))}}),
        _ => json!({"type": "track", "event": "Promo Banner Clicked", "properties": {"banner": "autumn-sale"}}),
    };
    message["userId"] = json!(user);
    message["messageId"] = json!(message_id);
    if let Some(timestamp) = timestamp {
        message["timestamp"] = json!(timestamp);
    }
    message
}

/// A request of the unregistered quiz widget.
fn shadow_event(message_id: &str) -> Value {
    json!({"type": "track", "anonymousId": format!("quiz-{message_id}"), "event": "Quiz Completed",
           "messageId": message_id, "properties": {"quiz": "find-your-trail-shoe", "score": 7}})
}

/// Posts a tracking call as it arrives from the network: the write key as
/// the Basic user name, from this machine's loopback address. A batch body
/// goes to `/v1/batch`, anything else to `/v1/track`.
async fn send(app: &Router, write_key: &str, body: Value, user_agent: Option<&str>) -> anyhow::Result<StatusCode> {
    let path = if body.get("batch").is_some() { "/v1/batch" } else { "/v1/track" };
    let key = base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"));
    let mut request = Request::post(path)
        .header(header::AUTHORIZATION, format!("Basic {key}"))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(user_agent) = user_agent {
        request = request.header(header::USER_AGENT, user_agent);
    }
    let mut request = request.body(Body::from(body.to_string()))?;
    request.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 0))));
    Ok(app.clone().oneshot(request).await?.status())
}

/// Keeps the company going until the task is aborted: every [`LIVE_TICK`]
/// a customer browses the shop; every 4th tick one orders in the app (the
/// CRM receives it), every 5th an event breaks the website's plan, every
/// 7th the quiz widget sends a request.
pub async fn live_traffic(state: AppState, company: Arc<Company>) {
    let app = tandem_server::router(state.clone());
    let users = known_user_ids(&company);
    let keys = blocking(&state.store, |store| {
        Ok((store.source_by_name(PLANNED_SOURCE)?.write_key, store.source_by_name("app")?.write_key))
    })
    .await;
    let (website, mobile) = match keys {
        Ok(keys) => keys,
        Err(error) => {
            tracing::warn!(%error, "the live demo traffic cannot start");
            return;
        }
    };
    // Message ids stay unique across runs of the same store.
    let run = chrono::Utc::now().timestamp_millis();
    let mut random = Random::new(run as u64);
    let mut ticker = tokio::time::interval(LIVE_TICK);
    ticker.tick().await;
    for tick in 1u64.. {
        ticker.tick().await;
        let user = users.get(random.below(users.len().max(1) as u64) as usize).cloned().unwrap_or_default();
        let id = |kind: &str| format!("live-{run}-{tick}-{kind}");
        let (name, path) = random.pick(&super::PAGES);
        let mut browsing = vec![
            json!({"type": "page", "userId": user, "name": name, "messageId": id("page"),
                   "properties": {"path": path, "url": format!("https://shop.example{path}")}}),
            json!({"type": "track", "userId": user, "event": "Product Viewed", "messageId": id("view"),
                   "properties": {"product_id": format!("sku-{:05}", random.below(500)), "price": 49 + random.below(150)}}),
        ];
        if tick.is_multiple_of(5) {
            browsing.push(plan_breaking_event(&mut random, &users, &id("off-plan"), None));
        }
        let mut outcomes = vec![send(&app, website.as_str(), json!({"batch": browsing}), None).await];
        if tick.is_multiple_of(4) {
            let cents = 1_500 + random.below(30_000);
            let order = json!({"type": "track", "userId": user, "event": "Order Completed", "messageId": id("order"),
                "properties": {"order_id": id("order"), "revenue": cents as f64 / 100.0, "currency": "EUR", "products": 1 + random.below(3)}});
            outcomes.push(send(&app, mobile.as_str(), order, None).await);
        }
        if tick.is_multiple_of(7) {
            outcomes.push(send(&app, SHADOW_WRITE_KEY, shadow_event(&id("quiz")), Some(SHADOW_USER_AGENT)).await);
        }
        for outcome in outcomes {
            match outcome {
                Ok(status) if status.is_success() || status == StatusCode::UNAUTHORIZED => {}
                Ok(status) => tracing::warn!(%status, "the tracking API refused live demo traffic"),
                Err(error) => tracing::warn!(%error, "sending live demo traffic failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_is_described_from_the_permission_table() {
        assert_eq!(what_it_sees(Role::Admin), "everything, personal data in clear");
        let marketer = what_it_sees(Role::Marketer);
        assert!(marketer.contains("audiences") && marketer.ends_with("personal data masked"), "{marketer}");
        assert!(!marketer.contains("customer"), "{marketer}");
        assert!(what_it_sees(Role::Support).ends_with("personal data in clear"));
        assert!(what_it_sees(Role::Auditor).starts_with("the audit log, governance"));
    }

    #[test]
    fn the_registry_names_every_demo_source_and_both_destinations() {
        let mut sources: Vec<&str> = super::super::SOURCES.iter().map(|(name, _)| *name).collect();
        sources.push("social");
        for source in sources {
            assert!(REGISTRY.iter().any(|(kind, name, ..)| *kind == ToolKind::Source && *name == source), "{source}");
        }
        for destination in [WEBHOOK_DESTINATION, FILE_DESTINATION] {
            assert!(REGISTRY.iter().any(|(kind, name, ..)| *kind == ToolKind::Destination && *name == destination));
        }
        tandem_core::govern::plan::TrackingPlan::from_json(WEBSITE_PLAN).unwrap().compile().unwrap();
    }
}
