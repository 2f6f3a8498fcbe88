//! Storage append benchmark: appends batches of synthetic events (about 400
//! bytes each, unique `messageId`s) straight to a store, without HTTP, and
//! prints events/s — then appends the same batches again, every event a
//! duplicate, to time the dedup path. `--store` takes a PostgreSQL URL or a
//! SQLite data directory, so both backends are measured the same way.

use anyhow::Context;
use clap::Parser;
use serde_json::json;
use std::time::{Duration, Instant};
use tandem_core::{EventType, LogRecord, MessageId, SourceKind};
use tandem_store::{IngestBatch, PostgresStore, SqliteStore, Store};

#[derive(Parser, Debug)]
#[command(about = "Time appends of large batches to a store (PostgreSQL URL or SQLite directory)")]
struct Options {
    /// `postgres://user@host:port/database` (an empty database is best), or
    /// a SQLite data directory to create (must not exist)
    #[arg(long)]
    store: String,
    /// Appends to time
    #[arg(long, default_value_t = 10)]
    batches: usize,
    /// Events per append
    #[arg(long, default_value_t = 20_000)]
    batch_size: usize,
}

fn open(store: &str) -> anyhow::Result<Box<dyn Store>> {
    if store.starts_with("postgres://") || store.starts_with("postgresql://") {
        return Ok(Box::new(PostgresStore::connect(store).context("connecting to PostgreSQL")?));
    }
    let dir = std::path::Path::new(store);
    anyhow::ensure!(!dir.exists(), "{} exists; give a directory to create", dir.display());
    Ok(Box::new(SqliteStore::open(dir).context("opening the SQLite store")?))
}

/// One append's worth of events, with ids unique to `run` and `batch`.
fn batch(source: &tandem_core::SourceId, run: &str, batch: usize, size: usize, now_ms: i64) -> IngestBatch {
    let records = (0..size)
        .map(|n| {
            let message_id = format!("{run}-{batch}-{n}");
            let payload = json!({
                "type": "track", "messageId": message_id, "userId": format!("user-{}", n % 5_000),
                "event": "Product Viewed", "timestamp": "2026-01-05T10:00:00.000Z",
                "receivedAt": "2026-01-05T10:00:00.100Z", "sourceId": source.as_str(),
                "properties": {
                    "sku": format!("SKU-{}", n % 997), "price": 19.99, "currency": "EUR", "category": "shoes"
                },
                "context": {"userAgent": "Mozilla/5.0 (X11; Linux x86_64)", "locale": "en-US",
                            "page": {"url": "https://shop.example/p/shoes", "referrer": "https://search.example/"}}
            })
            .to_string();
            LogRecord {
                source_id: source.clone(),
                message_id: MessageId::new(message_id),
                event_type: EventType::Track,
                received_at_ms: now_ms,
                timestamp_ms: now_ms - 100,
                payload,
            }
        })
        .collect();
    IngestBatch { records, ..IngestBatch::default() }
}

/// Appends every batch once, timing each append; returns the times.
fn append_all(store: &dyn Store, batches: &[IngestBatch], dedup_since_ms: i64) -> anyhow::Result<Vec<Duration>> {
    batches
        .iter()
        .map(|batch| {
            let started = Instant::now();
            store.append(std::slice::from_ref(batch), dedup_since_ms).context("append")?;
            Ok(started.elapsed())
        })
        .collect()
}

fn report(label: &str, events: usize, times: &[Duration]) {
    let total: Duration = times.iter().sum();
    let mut sorted = times.to_vec();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let slowest = sorted[sorted.len() - 1];
    println!(
        "{label:<22} {events} events in {:.2} s: {:.0} events/s (per append: median {} ms, slowest {} ms)",
        total.as_secs_f64(),
        events as f64 / total.as_secs_f64(),
        median.as_millis(),
        slowest.as_millis()
    );
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    anyhow::ensure!(options.batches > 0 && options.batch_size > 0, "--batches and --batch-size must be above 0");
    let store = open(&options.store)?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let run = format!("bench{now_ms}");
    let source = store.create_source(&run, SourceKind::Backend).context("creating the source")?;
    let batches: Vec<IngestBatch> =
        (0..options.batches).map(|index| batch(&source.id, &run, index, options.batch_size, now_ms)).collect();
    let events = options.batches * options.batch_size;
    println!("{} appends of {} events to {}", options.batches, options.batch_size, options.store);
    report("new events", events, &append_all(store.as_ref(), &batches, 0)?);
    report("all duplicates", events, &append_all(store.as_ref(), &batches, 0)?);
    let stats = store.stats().context("reading the counters")?;
    let ours = stats.sources.iter().find(|stats| stats.source_id == source.id);
    if let Some(ours) = ours {
        println!(
            "stored {} events, counted {} duplicates (log head {})",
            ours.events, ours.duplicates, stats.log_head.0
        );
        anyhow::ensure!(
            ours.events == events as u64 && ours.duplicates == events as u64,
            "the counters disagree with what was appended"
        );
    }
    Ok(())
}
