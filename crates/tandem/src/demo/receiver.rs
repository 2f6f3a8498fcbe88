//! The demo company's CRM, as far as Tandem can tell: a small HTTP receiver
//! on loopback that takes the webhook destination's deliveries and fails
//! now and then, the way real receivers do, so the console has retries and
//! dead letters to show without any outside service.
//!
//! It answers `503` to every [`BUSY_EVERY`]th request (retried by the
//! delivery worker) and refuses with `422` a batch holding an item it finds
//! invalid (about one in [`INVALID_ONE_IN`], chosen by a hash of the item's
//! `messageId`). The worker then sends that batch's items one by one; the
//! invalid item, refused alone, becomes a dead letter. Refusing it alone
//! also marks it fixed (as if someone corrected the contact in the CRM), so
//! replaying the dead letter succeeds.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Every this many requests, one is answered `503`.
pub const BUSY_EVERY: u64 = 40;
/// About one item in this many is refused as invalid, until fixed.
pub const INVALID_ONE_IN: u64 = 60;
/// The path deliveries are posted to.
pub const PATH: &str = "/crm/contacts";

/// What the receiver has answered so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Answers {
    /// Requests answered `200`, and the items they carried.
    pub accepted: u64,
    pub items: u64,
    /// Requests answered `503`.
    pub busy: u64,
    /// Requests refused with `422`.
    pub refused: u64,
}

#[derive(Default)]
struct Receiver {
    answers: Answers,
    requests: u64,
    /// Invalid items already refused alone: accepted from then on.
    fixed: HashSet<String>,
}

/// A running receiver; it stops when dropped.
pub struct FlakyReceiver {
    pub address: SocketAddr,
    receiver: Arc<Mutex<Receiver>>,
    serving: tokio::task::JoinHandle<()>,
}

impl Drop for FlakyReceiver {
    fn drop(&mut self) {
        self.serving.abort();
    }
}

/// Whether the receiver finds this item invalid (before it is fixed).
pub fn is_invalid(message_id: &str) -> bool {
    // FNV-1a: stable across runs and builds, unlike the std hasher.
    let hash = message_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
    hash % INVALID_ONE_IN == 0
}

impl FlakyReceiver {
    /// Listens on `127.0.0.1:port` (`0` for any free port) and serves in
    /// the background.
    pub async fn start(port: u16) -> std::io::Result<FlakyReceiver> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let address = listener.local_addr()?;
        let receiver = Arc::new(Mutex::new(Receiver::default()));
        let app = Router::new().route(PATH, post(receive)).with_state(receiver.clone());
        let serving = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "the demo's CRM receiver stopped");
            }
        });
        Ok(FlakyReceiver { address, receiver, serving })
    }

    /// The URL the webhook destination posts to.
    pub fn url(&self) -> String {
        format!("http://{}{PATH}", self.address)
    }

    pub fn answers(&self) -> Answers {
        self.receiver.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).answers
    }
}

async fn receive(State(receiver): State<Arc<Mutex<Receiver>>>, body: Bytes) -> (StatusCode, &'static str) {
    let items: Vec<Value> = match serde_json::from_slice(&body) {
        Ok(Value::Array(items)) => items,
        _ => return (StatusCode::BAD_REQUEST, "expected a JSON array"),
    };
    let ids: Vec<String> = items.iter().map(|item| item["messageId"].as_str().unwrap_or_default().to_owned()).collect();
    let mut receiver = receiver.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    receiver.requests += 1;
    if receiver.requests.is_multiple_of(BUSY_EVERY) {
        receiver.answers.busy += 1;
        return (StatusCode::SERVICE_UNAVAILABLE, "busy, try again later");
    }
    let invalid: Vec<&String> = ids.iter().filter(|id| is_invalid(id) && !receiver.fixed.contains(*id)).collect();
    if !invalid.is_empty() {
        if let [alone] = invalid.as_slice() {
            if ids.len() == 1 {
                let fixed = (*alone).clone();
                receiver.fixed.insert(fixed);
            }
        }
        receiver.answers.refused += 1;
        return (StatusCode::UNPROCESSABLE_ENTITY, "a contact failed validation: email domain not accepted");
    }
    receiver.answers.accepted += 1;
    receiver.answers.items += ids.len() as u64;
    (StatusCode::OK, "ok")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(url: &str, ids: &[&str]) -> u16 {
        let body: Vec<Value> = ids.iter().map(|id| serde_json::json!({"messageId": id})).collect();
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        agent.post(url).send_json(&body).unwrap().status().as_u16()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn it_is_busy_now_and_then_and_refuses_an_invalid_item_until_it_was_refused_alone() {
        let receiver = FlakyReceiver::start(0).await.unwrap();
        let url = receiver.url();
        let invalid = (0..100_000).map(|n| format!("m-{n}")).find(|id| is_invalid(id)).unwrap();
        let valid = (0..100_000).map(|n| format!("m-{n}")).find(|id| !is_invalid(id)).unwrap();
        let statuses = tokio::task::spawn_blocking(move || {
            let mut statuses = vec![
                post(&url, &[&valid, &invalid]),
                post(&url, &[&valid]),
                post(&url, &[&invalid]),
                post(&url, &[&invalid]),
            ];
            for _ in 4..BUSY_EVERY {
                statuses.push(post(&url, &[&valid]));
            }
            statuses
        })
        .await
        .unwrap();
        assert_eq!(&statuses[..4], &[422, 200, 422, 200], "refused in a batch, refused alone, then fixed");
        assert_eq!(statuses.last(), Some(&503), "every {BUSY_EVERY}th request is busy: {statuses:?}");
        let answers = receiver.answers();
        assert_eq!(answers, Answers { accepted: BUSY_EVERY - 3, items: BUSY_EVERY - 3, busy: 1, refused: 2 });
        let share = (0..30_000).filter(|n| is_invalid(&format!("demo-website-{n}"))).count();
        assert!((300..=700).contains(&share), "about one in {INVALID_ONE_IN}: {share} of 30000");
    }
}
