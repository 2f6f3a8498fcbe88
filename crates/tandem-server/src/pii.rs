//! PII at the edges of the server: red values are hashed out of every batch
//! before the log writer stores it (events and quarantined messages alike,
//! so neither table ever holds one in clear), and yellow values are masked in
//! the answers given to roles without the `pii:read` permission. Keys seen
//! on the way are noted for the PII inventory (`GET /api/v1/pii/inventory`).
//! The rules themselves are `tandem_core::govern::pii`.

use crate::extract::AdminToken;
use serde_json::Value;
use tandem_core::govern::{PiiClass, PiiPolicy};
use tandem_core::SourceId;
use tandem_store::IngestBatch;

/// Hashes the red values of every event and quarantined message in `batch`.
pub fn scrub_batch(policy: &PiiPolicy, batch: &mut IngestBatch) {
    scrub_batch_noting_keys(policy, batch, &mut Vec::new());
}

/// [`scrub_batch`], also adding to `keys` every trait and property key of
/// the batch's events: key, source, class and the event's receipt time.
pub fn scrub_batch_noting_keys(
    policy: &PiiPolicy,
    batch: &mut IngestBatch,
    keys: &mut Vec<(String, SourceId, PiiClass, i64)>,
) {
    for record in &mut batch.records {
        let (source_id, at) = (&record.source_id, record.received_at_ms);
        let scrubbed = policy.inspect_payload(&record.payload, &mut |key, class| {
            keys.push((key.to_owned(), source_id.clone(), class, at));
        });
        if let Some(scrubbed) = scrubbed {
            record.payload = scrubbed;
        }
    }
    for rejected in &mut batch.rejected {
        if let Some(scrubbed) = policy.scrub_payload(&rejected.payload) {
            rejected.payload = scrubbed;
        }
    }
}

/// `body` as `caller` may see it: unchanged with `pii:read`, masked otherwise.
pub fn shown_to(caller: &AdminToken, policy: &PiiPolicy, body: Value) -> Value {
    if caller.sees_pii() {
        body
    } else {
        policy.mask_json(&body)
    }
}

/// `GET /api/v1/pii/inventory`: every trait and property key seen, with its
/// class (the higher of the one it was seen with and the one the current
/// rules give its name), the sources that sent it and when it was last seen.
pub fn routes() -> axum::Router<crate::AppState> {
    axum::Router::new().route("/api/v1/pii/inventory", axum::routing::get(inventory))
}

async fn inventory(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
    _token: AdminToken,
) -> Result<axum::Json<Value>, crate::error::ApiError> {
    let policy = state.pii.clone();
    let keys = crate::profile::read(&state, move |store| inventory_json(store, &policy)).await?;
    Ok(axum::Json(serde_json::json!({ "keys": keys })))
}

/// The inventory as the API and the CLI show it: sources by name.
pub fn inventory_json(
    store: &dyn tandem_store::Store,
    policy: &PiiPolicy,
) -> Result<Vec<Value>, tandem_store::StoreError> {
    let names: std::collections::HashMap<String, String> =
        store.list_sources()?.into_iter().map(|source| (source.id.to_string(), source.name)).collect();
    Ok(store
        .pii_inventory()?
        .into_iter()
        .map(|record| {
            let class = record.class.max(policy.classify_key(&record.key));
            let sources: Vec<&str> =
                record.sources.iter().map(|id| names.get(id.as_str()).map_or(id.as_str(), String::as_str)).collect();
            serde_json::json!({
                "key": record.key,
                "class": class.as_str(),
                "sources": sources,
                "last_seen": crate::profile::format_ms(record.last_seen_ms),
            })
        })
        .collect())
}
