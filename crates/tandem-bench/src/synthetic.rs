//! A synthetic customer base, a customer at a time from a seed: traits
//! (`plan`, `country`, `age`) and a history of track events (page and
//! product views, checkouts, orders, tickets) over the 120 days before a
//! given instant. The same seed gives the same customers.

use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};
use tandem_core::{Event, EventType, MessageId, SourceId};

const DAY_MS: i64 = 86_400_000;
/// Days of history before the instant given to [`customer`].
pub const HISTORY_DAYS: u64 = 120;

/// SplitMix64: a small, fast, seedable generator; plenty for test data.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

/// One generated customer (`user_id` `c{id}`): traits as columns and as a
/// map, and events, none later than the instant asked for.
pub struct Customer {
    pub id: u64,
    pub plan: Option<&'static str>,
    pub country: &'static str,
    pub age: u64,
    pub traits: Map<String, Value>,
    pub events: Vec<Event>,
}

/// Customer `id` of the base seeded `seed`: between none and twice
/// `mean_events` events, in the 120 days before `now_ms`.
pub fn customer(id: u64, seed: u64, mean_events: u64, source: &SourceId, now_ms: i64) -> Customer {
    let mut mix = Mix(seed ^ id.wrapping_mul(0xA076_1D64_78BD_642F));
    let plan = [Some("pro"), Some("free"), Some("free"), None][mix.below(4) as usize];
    let country = ["DE", "FR", "US", "GB", "ES"][mix.below(5) as usize];
    let age = 18 + mix.below(62);
    let mut traits = Map::new();
    if let Some(plan) = plan {
        traits.insert("plan".into(), json!(plan));
    }
    traits.insert("country".into(), json!(country));
    traits.insert("age".into(), json!(age));
    let count = mix.below(2 * mean_events + 1);
    let events = (0..count)
        .map(|index| {
            let roll = mix.below(100);
            let name = match roll {
                0..40 => "Page Viewed",
                40..70 => "Product Viewed",
                70..80 => "Checkout Started",
                80..92 => "Order Completed",
                _ => "Ticket Opened",
            };
            let mut properties = Map::new();
            match name {
                "Order Completed" => {
                    properties.insert("total".into(), json!(mix.below(20_000) as f64 / 100.0));
                }
                "Product Viewed" => {
                    properties
                        .insert("category".into(), json!(["shoes", "shirts", "bags", "hats"][mix.below(4) as usize]));
                }
                _ => {}
            }
            let timestamp_ms = now_ms - 1 - mix.below(HISTORY_DAYS * DAY_MS as u64) as i64;
            track(id, index, name, properties, timestamp_ms, source)
        })
        .collect();
    Customer { id, plan, country, age, traits, events }
}

/// Customer `customer`'s track event number `index`.
pub fn track(
    customer: u64,
    index: u64,
    name: &str,
    properties: Map<String, Value>,
    timestamp_ms: i64,
    source: &SourceId,
) -> Event {
    let timestamp = DateTime::<Utc>::from_timestamp_millis(timestamp_ms).expect("timestamp in range");
    Event {
        message_id: MessageId::new(format!("c{customer}-{index}")),
        event_type: EventType::Track,
        user_id: Some(format!("c{customer}")),
        anonymous_id: None,
        event: Some(name.to_owned()),
        name: None,
        category: None,
        group_id: None,
        previous_id: None,
        properties: Some(properties),
        traits: None,
        context: Map::new(),
        integrations: Map::new(),
        timestamp,
        original_timestamp: None,
        sent_at: None,
        received_at: timestamp,
        source_id: source.clone(),
        extra: Map::new(),
    }
}
