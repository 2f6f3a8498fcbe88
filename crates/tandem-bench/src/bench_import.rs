//! Import benchmark: writes a CSV export of order rows (about 150 bytes each),
//! imports it with the real `tandem import` command into a fresh data
//! directory, and prints rows/s; then times the resolver catching up with the
//! imported rows (inside the `tandem` binary) and prints events/s.

use anyhow::{bail, Context};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Time `tandem import` of a large CSV of orders, then the resolver catching up")]
struct Options {
    /// The tandem binary to run
    #[arg(long, default_value = "target/release/tandem")]
    tandem: PathBuf,
    /// Working directory to create (must not exist): the CSV and the data directory go there
    #[arg(long)]
    work: PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Distinct customers the orders belong to
    #[arg(long, default_value_t = 100_000)]
    customers: u64,
}

const MAPPING: &str = r#"
type = "track"
event = "Order Completed"
row_key = "order_id"
timestamp = "ordered_at"

[identifiers]
user_id = "customer_id"
email = "email"

[properties]
order_id = "order_id"
revenue = { column = "total", type = "number" }
currency = "currency"
products = { column = "items", type = "integer" }
coupon = "coupon"
skus = "skus"
status = "status"
shipping_city = "shipping_city"
"#;

const CITIES: [&str; 6] = [
    "Berlin-Kreuzberg",
    "Hamburg-Altona",
    "Munich-Schwabing",
    "Cologne-Ehrenfeld",
    "Leipzig-Plagwitz",
    "Dresden-Neustadt",
];

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    if options.work.exists() {
        bail!("{} exists; give a new directory", options.work.display());
    }
    std::fs::create_dir_all(&options.work)?;
    let csv_path = options.work.join("orders.csv");
    let mapping_path = options.work.join("orders.toml");
    let data = options.work.join("data");
    std::fs::write(&mapping_path, MAPPING)?;
    let bytes = write_orders(&csv_path, &options)?;
    println!(
        "wrote {} rows, {:.1} MB ({:.0} bytes/row)",
        options.rows,
        bytes as f64 / 1e6,
        bytes as f64 / options.rows as f64
    );

    let tandem = |args: &[&str]| -> anyhow::Result<String> {
        let output = Command::new(&options.tandem)
            .args(args)
            .env("TANDEM_DATA", &data)
            .env("TANDEM_LOG", "warn")
            .output()
            .with_context(|| format!("running {}", options.tandem.display()))?;
        if !output.status.success() {
            bail!("tandem {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8(output.stdout)?)
    };
    tandem(&["source", "create", "orders", "--kind", "import"])?;
    let csv = csv_path.to_str().context("utf-8 path")?;
    let mapping = mapping_path.to_str().context("utf-8 path")?;
    let started = Instant::now();
    let summary: serde_json::Value =
        serde_json::from_str(&tandem(&["import", csv, "--source", "orders", "--mapping", mapping, "--json"])?)?;
    let seconds = started.elapsed().as_secs_f64();
    let imported = summary["counts"]["imported"].as_u64().unwrap_or(0);
    println!(
        "import: {imported} rows imported in {seconds:.2} s = {:.0} rows/s (process start to exit, durable)",
        options.rows as f64 / seconds
    );
    if imported != options.rows {
        bail!("expected {} rows imported, the summary says {summary}", options.rows);
    }

    let started = Instant::now();
    let again: serde_json::Value =
        serde_json::from_str(&tandem(&["import", csv, "--source", "orders", "--mapping", mapping, "--json"])?)?;
    println!(
        "reimport: {} duplicates, {} imported in {:.2} s",
        again["counts"]["duplicates"],
        again["counts"]["imported"],
        started.elapsed().as_secs_f64()
    );

    // The profile commands bring profiles up to date with the log first, so
    // this times the shipped binary's resolver over every imported row.
    let started = Instant::now();
    tandem(&["profile", "show", "user_id:cust-0000001", "--json"])?;
    let seconds = started.elapsed().as_secs_f64();
    let stats: serde_json::Value = serde_json::from_str(&tandem(&["stats", "--json"])?)?;
    let resolved = stats["resolver_position"].as_u64().unwrap_or(0);
    println!(
        "resolver: {resolved} events to {} profiles in {seconds:.2} s = {:.0} events/s (tandem profile show, catching up)",
        stats["profiles"],
        resolved as f64 / seconds
    );
    Ok(())
}

/// Writes the CSV; returns its size in bytes.
fn write_orders(path: &std::path::Path, options: &Options) -> anyhow::Result<u64> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "order_id,customer_id,email,ordered_at,total,currency,items,coupon,skus,status,shipping_city")?;
    // Deterministic, so every run imports the same file.
    let mut random = tandem_core::random::Random::new(0x5eed);
    let mut next = || random.next_u64();
    let start = chrono::DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z").expect("a valid time").timestamp();
    for row in 0..options.rows {
        let customer = next() % options.customers;
        let ordered_at = chrono::DateTime::from_timestamp(start + (row as i64 * 31), 0).expect("in range");
        let cents = 500 + next() % 50_000;
        let coupon = if next() % 5 == 0 { "SPRING25" } else { "" };
        let items = 1 + next() % 3;
        let skus: Vec<String> = (0..items).map(|_| format!("sku-{:05}", next() % 20_000)).collect();
        let city = CITIES[(next() % CITIES.len() as u64) as usize];
        writeln!(
            out,
            "ord-{row:08},cust-{customer:07},firstname.lastname.{customer:07}@customers.example-shop.com,{},{}.{:02},EUR,{items},{coupon},{},paid,{city}",
            ordered_at.format("%Y-%m-%dT%H:%M:%SZ"),
            cents / 100,
            cents % 100,
            skus.join(";"),
        )?;
    }
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}
