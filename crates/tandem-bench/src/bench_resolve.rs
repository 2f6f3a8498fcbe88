//! Resolver benchmark: fills a fresh store's log with a synthetic stream
//! (people who browse anonymously before identifying, some with several
//! e-mails), then times the resolver from the log to profiles and prints
//! events/s, profiles and peak memory. The store is left in `--data` for
//! the lookup benchmark. With `--postgres URL` the store is that PostgreSQL
//! database instead (an empty one), for the resolver figures only.

use anyhow::Context;
use clap::Parser;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tandem_core::collect::{normalize_message, BatchDefaults, IdRequirement, RequestContext};
use tandem_core::random::Random;
use tandem_core::SourceKind;
use tandem_server::metrics::Metrics;
use tandem_server::resolve::{
    Resolver, ResolverCache, DEFAULT_BATCH, DEFAULT_CACHE_PROFILES, DEFAULT_RECORD_CACHE_BYTES,
};
use tandem_store::{IngestBatch, PostgresStore, SqliteStore, Store};

/// The allocator the shipped binary uses, so the resolver is measured as it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Time the resolver from the log to profiles on a synthetic stream")]
struct Options {
    /// Data directory to create (must not exist)
    #[arg(long, required_unless_present = "postgres")]
    data: Option<PathBuf>,
    /// Resolve in this PostgreSQL database (empty) instead of a SQLite store
    #[arg(long, conflicts_with = "data")]
    postgres: Option<String>,
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 100_000)]
    people: u64,
    /// Share of people who browse anonymously before identifying
    #[arg(long, default_value_t = 0.3)]
    anonymous_share: f64,
    /// Share of people who use a second e-mail address
    #[arg(long, default_value_t = 0.1)]
    second_email_share: f64,
    /// Profiles the resolver keeps in its graph
    #[arg(long, default_value_t = DEFAULT_CACHE_PROFILES)]
    cache_profiles: usize,
    /// MiB of compact records the resolver keeps beside its graph
    #[arg(long, default_value_t = DEFAULT_RECORD_CACHE_BYTES >> 20)]
    record_cache_mib: usize,
    /// Events the resolver reads and commits per transaction, at most
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    batch: usize,
    /// Fill the log and stop, leaving the store to copy for several
    /// resolver runs over the same events
    #[arg(long, conflicts_with = "filled")]
    fill_only: bool,
    /// The store in --data is a copy of one `--fill-only` left: resolve
    /// its log without filling it again
    #[arg(long, requires = "data")]
    filled: bool,
}

/// The `n`-th event of the stream.
fn message(options: &Options, random: &mut Random, seen: &mut [u8]) -> Value {
    let person = random.below(options.people);
    let hashed = person.wrapping_mul(2_654_435_761) % 1_000;
    let browses_anonymously = (hashed as f64) < options.anonymous_share * 1_000.0;
    let second_email = ((hashed * 7) % 1_000) as f64 / 1_000.0 < options.second_email_share;
    let step = &mut seen[person as usize];
    *step = step.saturating_add(1);
    let anonymous_id = format!("anon-{person}");
    let user_id = format!("user-{person}");
    let timestamp =
        format!("2026-01-{:02}T{:02}:{:02}:00Z", 1 + (*step as u64 % 28), random.below(24), random.below(60));
    let sku = random.below(5_000);
    match (*step, browses_anonymously) {
        (1..=2, true) => json!({
            "type": "page", "anonymousId": anonymous_id, "name": "Product", "timestamp": timestamp,
            "properties": {"url": format!("https://shop.example/p/{sku}"), "referrer": "https://search.example/"},
            "context": {"userAgent": "Mozilla/5.0 (X11; Linux x86_64)", "locale": "en-US"}
        }),
        (3, true) | (1, false) => {
            let email = if second_email && (*step).is_multiple_of(2) {
                format!("p{person}@work.example")
            } else {
                format!("p{person}@mail.example")
            };
            let plan = ["free", "pro", "team"][(person % 3) as usize];
            json!({
                "type": "identify", "userId": user_id, "anonymousId": anonymous_id, "timestamp": timestamp,
                "traits": {"email": email, "name": format!("Person {person}"), "plan": plan},
                "context": {"userAgent": "Mozilla/5.0 (X11; Linux x86_64)", "locale": "en-US"}
            })
        }
        (step, _) if second_email && step.is_multiple_of(5) => json!({
            "type": "identify", "userId": user_id, "timestamp": timestamp,
            "traits": {"email": format!("p{person}@work.example"), "company": "Work Inc"}
        }),
        _ => json!({
            "type": "track", "userId": user_id, "event": "Product Viewed", "timestamp": timestamp,
            "properties": {"sku": format!("SKU-{sku}"), "price": 19.99, "currency": "EUR", "category": "shoes"},
            "context": {"userAgent": "Mozilla/5.0 (X11; Linux x86_64)", "locale": "en-US"}
        }),
    }
}

fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Bytes this process has caused to be written to storage (`write_bytes` in
/// `/proc/self/io`, Linux only): the WAL and checkpoints included.
fn bytes_written() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|line| line.strip_prefix("write_bytes: ")).and_then(|value| value.trim().parse().ok())
}

/// Appends `options.events` synthetic events to the store's log.
fn fill(options: &Options, store: &dyn Store) -> anyhow::Result<()> {
    let source = store.create_source("bench", SourceKind::Backend)?;
    let received_at = chrono::Utc::now();
    let request = RequestContext {
        source_id: &source.id,
        received_at,
        client_ip: Some("127.0.0.1"),
        ids: IdRequirement::UserOrAnonymousId,
    };
    let mut random = Random::new(42);
    let mut seen = vec![0u8; options.people as usize];
    let filling = Instant::now();
    let mut written = 0;
    while written < options.events {
        let count = (options.events - written).min(20_000);
        let records = (0..count)
            .map(|_| {
                let Value::Object(message) = message(options, &mut random, &mut seen) else { unreachable!() };
                normalize_message(message, None, &BatchDefaults::default(), &request).map(|event| event.to_log_record())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|rejection| anyhow::anyhow!("generated an invalid event: {rejection}"))?;
        store.append(&[IngestBatch { records, rejected: Vec::new(), ..Default::default() }], 0)?;
        written += count;
    }
    println!("log filled: {} events in {:.1} s", written, filling.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let store: Arc<dyn Store> = match (&options.postgres, &options.data) {
        (Some(url), _) => Arc::new(PostgresStore::connect(url).context("connecting to PostgreSQL")?),
        (None, Some(data)) => {
            anyhow::ensure!(
                options.filled == data.exists(),
                "{} {}",
                data.display(),
                if options.filled { "does not exist" } else { "exists; give a new directory" }
            );
            Arc::new(SqliteStore::open(data).context("opening the store")?)
        }
        (None, None) => anyhow::bail!("give --data DIR or --postgres URL"),
    };
    if !options.filled {
        fill(&options, store.as_ref())?;
        if options.fill_only {
            return Ok(());
        }
    }

    let written_before = bytes_written();
    let started = Instant::now();
    let metrics = Metrics::new();
    let cache = ResolverCache { profiles: options.cache_profiles, record_bytes: options.record_cache_mib << 20 };
    let mut resolver = Resolver::with_cache(store.clone(), cache)?.with_metrics(metrics.clone());
    let resolved = resolver.catch_up(options.batch)?;
    let (cached, kept_as_records) = (resolver.cached_profiles(), resolver.record_profiles());
    drop(resolver);
    let seconds = started.elapsed().as_secs_f64();
    let resolver_writes = bytes_written().zip(written_before).map(|(after, before)| after.saturating_sub(before));
    let stats = store.stats()?;
    println!(
        "bench-resolve: {} events over {} people ({:.0}% anonymous first, {:.0}% with a second e-mail)",
        options.events,
        options.people,
        options.anonymous_share * 100.0,
        options.second_email_share * 100.0
    );
    println!("resolved:              {resolved} events in {seconds:.2} s");
    println!("events/s:              {:.0}", resolved as f64 / seconds);
    println!("profiles:              {} (resolver lag {})", stats.profiles, stats.resolver_lag);
    // A PostgreSQL server's writes are its own process's, not counted here.
    if let (Some(bytes), None) = (resolver_writes, &options.postgres) {
        println!(
            "written to disk:       {:.0} MiB by the resolver, {:.0} bytes per event",
            bytes as f64 / 1_048_576.0,
            bytes as f64 / resolved.max(1) as f64
        );
    }
    let counter = |name: &str| -> f64 {
        metrics.render().lines().find_map(|line| line.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
    };
    let (hits, misses) = (counter("tandem_resolver_cache_hits_total "), counter("tandem_resolver_cache_misses_total "));
    println!(
        "resolver cache:        {} profiles at most, {cached} held at the end; {kept_as_records} kept as records in {:.0} MiB (at most {} MiB); {:.0}% of identifier look-ups found in memory",
        options.cache_profiles,
        counter("tandem_resolver_record_bytes ") / 1_048_576.0,
        options.record_cache_mib,
        100.0 * hits / (hits + misses).max(1.0)
    );
    let (resolving, committing) = (
        counter("tandem_resolver_batch_duration_seconds_sum "),
        counter("tandem_resolver_commit_duration_seconds_sum "),
    );
    println!(
        "batches:               {:.0}, {resolving:.1} s resolving (reads included), {committing:.1} s committing (overlapped)",
        counter("tandem_resolver_batch_duration_seconds_count ")
    );
    if let Some(peak) = peak_memory_mib() {
        println!(
            "peak memory:           {peak:.0} MiB (generator and resolver in one process), {:.0} bytes per profile",
            peak * 1_048_576.0 / stats.profiles.max(1) as f64
        );
    }
    Ok(())
}
