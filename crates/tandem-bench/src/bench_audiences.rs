//! Batch audience evaluation: ten audiences of mixed rules (traits, counts
//! with filters and windows, absence, two- and three-step funnels) over a
//! synthetic company of `--profiles` customers with `--events` events in
//! all, evaluated by Tandem's batch evaluator
//! (`CompiledAudience::is_member`) on every core.
//!
//! Only evaluation is timed: the customers are generated a page at a time
//! (the same customers for the same `--seed`) and each page is evaluated on
//! every core while the clock runs. With `--export DIR` the same customers
//! and events are also written as `profiles.csv` and `events.csv`, and the
//! audience sizes as `sizes.json`, so `scripts/bench-audiences` can compute
//! the same ten audiences with SQL in DuckDB and check that the sizes agree.

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Parser;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tandem_bench::synthetic::{customer, Customer};
use tandem_core::audience::{CompiledAudience, Condition, ProfileFacts};
use tandem_core::SourceId;

#[derive(Parser, Debug)]
#[command(about = "Time Tandem's batch evaluation of ten audiences over a synthetic customer base")]
struct Options {
    /// Customers
    #[arg(long, default_value_t = 1_000_000)]
    profiles: u64,
    /// Events in all (each customer gets between none and twice the mean)
    #[arg(long, default_value_t = 20_000_000)]
    events: u64,
    /// Write profiles.csv, events.csv and sizes.json here
    #[arg(long)]
    export: Option<PathBuf>,
    /// Evaluating threads (default: every core)
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the generator
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// The ten audiences, in the order `scripts/bench_audiences.sql` computes
/// them.
pub const AUDIENCES: [(&str, &str); 10] = [
    ("pro plan", r#"trait plan = "pro""#),
    ("frequent big orders", r#"count(event "Order Completed" where total > 50, within 30d) >= 3"#),
    ("browsing, no tickets", r#"performed "Product Viewed" within 30d and not performed "Ticket Opened" within 7d"#),
    ("shoes then order", r#"performed "Product Viewed" where category = "shoes" then "Order Completed" within 7d"#),
    ("active in Germany", r#"trait country = "DE" and count(event "Page Viewed", within 14d) >= 5"#),
    ("30 to 44, ordered", r#"trait age >= 30 and trait age < 45 and performed "Order Completed" within 90d"#),
    ("loyal or troubled", r#"count(event "Order Completed") >= 5 or count(event "Ticket Opened", within 30d) >= 2"#),
    ("abandoned checkout", r#"performed "Checkout Started" within 3d and not performed "Order Completed" within 3d"#),
    ("fast funnel", r#"performed "Page Viewed" then "Product Viewed" then "Checkout Started" within 3d"#),
    ("free and gone quiet", r#"trait plan = "free" and not performed "Page Viewed" within 60d"#),
];

/// Every evaluation happens at this instant, so runs are comparable and the
/// SQL side uses the same `now`.
pub const NOW_MS: i64 = 1_780_272_000_000; // 2026-06-01T00:00:00Z

const PAGE: u64 = 20_000;

/// CSV writers for `--export`.
struct Export {
    profiles: BufWriter<std::fs::File>,
    events: BufWriter<std::fs::File>,
}

impl Export {
    fn create(dir: &std::path::Path) -> anyhow::Result<Export> {
        std::fs::create_dir_all(dir)?;
        let mut profiles = BufWriter::new(std::fs::File::create(dir.join("profiles.csv"))?);
        let mut events = BufWriter::new(std::fs::File::create(dir.join("events.csv"))?);
        writeln!(profiles, "profile_id,plan,country,age")?;
        writeln!(events, "profile_id,event,ts,total,category")?;
        Ok(Export { profiles, events })
    }

    fn write(&mut self, customer: &Customer) -> anyhow::Result<()> {
        writeln!(
            self.profiles,
            "{},{},{},{}",
            customer.id,
            customer.plan.unwrap_or(""),
            customer.country,
            customer.age
        )?;
        for event in &customer.events {
            let properties = event.properties.as_ref();
            let total = properties.and_then(|p| p.get("total")).map(ToString::to_string).unwrap_or_default();
            let category = properties.and_then(|p| p.get("category")).and_then(Value::as_str).unwrap_or("");
            writeln!(
                self.events,
                "{},{},{},{},{}",
                customer.id,
                event.event.as_deref().unwrap_or(""),
                event.timestamp.timestamp_millis(),
                total,
                category
            )?;
        }
        Ok(())
    }
}

/// Member counts per audience for a slice of customers.
fn evaluate(audiences: &[CompiledAudience], customers: &[Customer], now: DateTime<Utc>) -> Vec<u64> {
    let none = Map::new();
    let memberships = BTreeSet::new();
    let mut sizes = vec![0; audiences.len()];
    for customer in customers {
        let facts = ProfileFacts {
            traits: &customer.traits,
            computed_traits: &none,
            events: &customer.events,
            audiences: &memberships,
        };
        for (size, audience) in sizes.iter_mut().zip(audiences) {
            *size += u64::from(audience.is_member(&facts, now));
        }
    }
    sizes
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let threads = options.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let audiences: Vec<CompiledAudience> = AUDIENCES
        .iter()
        .map(|(name, text)| {
            Condition::parse(text)
                .with_context(|| format!("audience {name}"))?
                .compile()
                .with_context(|| format!("audience {name}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let now = DateTime::<Utc>::from_timestamp_millis(NOW_MS).expect("now in range");
    let source = SourceId::new("bench");
    let mean_events = (options.events / options.profiles.max(1)).max(1);
    let mut export = options.export.as_deref().map(Export::create).transpose()?;
    let mut sizes = vec![0u64; audiences.len()];
    let mut evaluating = Duration::ZERO;
    let mut events = 0u64;
    let mut start = 0;
    while start < options.profiles {
        let end = (start + PAGE).min(options.profiles);
        let page: Vec<Customer> =
            (start..end).map(|id| customer(id + 1, options.seed, mean_events, &source, NOW_MS)).collect();
        events += page.iter().map(|customer| customer.events.len() as u64).sum::<u64>();
        if let Some(export) = export.as_mut() {
            for customer in &page {
                export.write(customer)?;
            }
        }
        let clock = Instant::now();
        let share = page.len().div_ceil(threads);
        let page_sizes: Vec<Vec<u64>> = std::thread::scope(|scope| {
            let workers: Vec<_> =
                page.chunks(share.max(1)).map(|chunk| scope.spawn(|| evaluate(&audiences, chunk, now))).collect();
            workers.into_iter().map(|worker| worker.join().expect("evaluating thread")).collect()
        });
        evaluating += clock.elapsed();
        for part in page_sizes {
            for (size, add) in sizes.iter_mut().zip(part) {
                *size += add;
            }
        }
        start = end;
    }
    println!("customers:             {}", options.profiles);
    println!("events:                {events}");
    println!("threads:               {threads}");
    for ((name, _), size) in AUDIENCES.iter().zip(&sizes) {
        println!("  {name:<22} {size:>9}");
    }
    println!(
        "tandem evaluation:     {:.2} s for {} audiences = {:.0} customers/s",
        evaluating.as_secs_f64(),
        audiences.len(),
        options.profiles as f64 / evaluating.as_secs_f64()
    );
    if let (Some(dir), Some(mut export)) = (options.export.as_deref(), export) {
        export.profiles.flush()?;
        export.events.flush()?;
        let named: Map<String, Value> =
            AUDIENCES.iter().zip(&sizes).map(|((name, _), size)| ((*name).to_owned(), json!(size))).collect();
        std::fs::write(
            dir.join("sizes.json"),
            serde_json::to_string_pretty(&json!({"sizes": named, "seconds": evaluating.as_secs_f64()}))?,
        )?;
    }
    Ok(())
}
