//! PII at the edges of the server: red values are hashed out of every batch
//! before the log writer stores it (events and quarantined messages alike,
//! so neither table ever holds one in clear), and yellow values are masked in
//! the answers given to roles without the `pii:read` permission. The rules
//! themselves are `tandem_core::govern::pii`.

use crate::extract::AdminToken;
use serde_json::Value;
use tandem_core::govern::PiiPolicy;
use tandem_store::IngestBatch;

/// Hashes the red values of every event and quarantined message in `batch`.
pub fn scrub_batch(policy: &PiiPolicy, batch: &mut IngestBatch) {
    for record in &mut batch.records {
        if let Some(scrubbed) = policy.scrub_payload(&record.payload) {
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
