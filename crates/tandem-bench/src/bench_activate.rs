//! Activation benchmarks against a running Tandem, from this separate
//! process, with a webhook receiver of its own on loopback:
//!
//! - `latency`: people enter an audience at a steady event rate (each an
//!   `identify` then an `Order Completed` in one `/v1/batch` call); for each
//!   one, the time from the tracking API's `200` to the receiver getting the
//!   `entered` change, as percentiles.
//! - `throughput`: a paused webhook destination with every event queued in
//!   its outbox, then resumed; events per second the receiver gets until the
//!   outbox is empty.
//!
//! The receiver answers `200` at once and only counts; the figures are
//! Tandem's (outbox stage, delivery worker, store), not the receiver's.

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Latency,
    Throughput,
}

#[derive(Parser, Debug)]
#[command(about = "Measure audience-entry latency and webhook delivery throughput of a running Tandem")]
struct Options {
    #[arg(value_enum)]
    mode: Mode,
    /// Base URL of the server
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Write key of the source to send as
    #[arg(long)]
    write_key: String,
    /// Admin token, to define the audience and the destination
    #[arg(long)]
    token: String,
    /// latency: events per second sent (two per person)
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// latency: seconds of sending
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// throughput: events queued before the destination is resumed
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// throughput: items per webhook request (the destination's batch_size)
    #[arg(long, default_value_t = 500)]
    batch_size: u32,
    /// A name to make this run's audience and destination unique
    #[arg(long, default_value = "bench")]
    name: String,
}

/// What the receiver has seen: when each person's `entered` change arrived
/// (by their `bench_id` trait), and how many events in all.
#[derive(Default)]
struct Received {
    entered: Mutex<HashMap<u64, Instant>>,
    events: AtomicU64,
}

/// A minimal HTTP/1.1 receiver: reads each request's body (by its
/// `content-length`), records it, answers `200` and keeps the connection.
fn start_receiver(received: Arc<Received>) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let received = received.clone();
            std::thread::spawn(move || {
                let _ = serve_connection(stream, &received);
            });
        }
    });
    Ok(port)
}

fn serve_connection(stream: TcpStream, received: &Received) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let arrived = Instant::now();
        record(received, &body, arrived);
        writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
    }
}

fn record(received: &Received, body: &[u8], arrived: Instant) {
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(body) else { return };
    received.events.fetch_add(items.len() as u64, Ordering::Relaxed);
    let mut entered = received.entered.lock().expect("receiver lock");
    for item in &items {
        if item["type"] == "audience" && item["change"] == "entered" {
            if let Some(id) = item["traits"]["bench_id"].as_u64() {
                entered.entry(id).or_insert(arrived);
            }
        }
    }
}

/// Calls the admin API; fails on any answer but the expected status.
fn admin(options: &Options, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let url = format!("{}{path}", options.url);
    let authorization = format!("Bearer {}", options.token);
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut response = match (method, body) {
        ("GET", _) => agent.get(&url).header("authorization", &authorization).call()?,
        (_, Some(body)) => agent.post(&url).header("authorization", &authorization).send_json(body)?,
        (_, None) => agent.post(&url).header("authorization", &authorization).send_empty()?,
    };
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    if !(200..300).contains(&status) {
        bail!("{method} {path} answered {status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn send_batch(agent: &ureq::Agent, base_url: &str, write_key: &str, body: &Value) -> anyhow::Result<()> {
    let url = format!("{base_url}/v1/batch");
    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{write_key}:"));
    let response = agent.post(&url).header("authorization", &format!("Basic {key}")).send_json(body)?;
    if response.status().as_u16() != 200 {
        bail!("/v1/batch answered {}", response.status());
    }
    Ok(())
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

/// One histogram's cumulative bucket counts as `/metrics` shows them, by
/// upper bound (seconds), in increasing order.
type Buckets = Vec<(f64, f64)>;

/// Reads the buckets of histogram `name` whose labels include `label`
/// (`key="value"`) from the server's `/metrics`.
fn scrape_histogram(options: &Options, name: &str, label: &str) -> anyhow::Result<Buckets> {
    let text = ureq::get(&format!("{}/metrics", options.url)).call()?.body_mut().read_to_string()?;
    Ok(histogram_buckets(&text, name, label))
}

fn histogram_buckets(text: &str, name: &str, label: &str) -> Buckets {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Buckets = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (labels, count) = rest.split_once("} ")?;
            if !labels.split(',').any(|pair| pair == label) {
                return None;
            }
            let bound = labels.split(',').find_map(|pair| pair.strip_prefix("le=\""))?.trim_end_matches('"');
            let bound = if bound == "+Inf" { f64::INFINITY } else { bound.parse().ok()? };
            Some((bound, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `fraction` percentile of what a histogram counted between two
/// scrapes, interpolated linearly inside its bucket; `None` when nothing
/// was counted.
fn histogram_percentile(before: &Buckets, after: &Buckets, fraction: f64) -> Option<Duration> {
    let counted = |bound: f64| before.iter().find(|(b, _)| *b == bound).map_or(0.0, |(_, count)| *count);
    let delta: Vec<(f64, f64)> = after.iter().map(|(bound, count)| (*bound, count - counted(*bound))).collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = total * fraction;
    let (mut lower, mut below) = (0.0, 0.0);
    for (bound, count) in delta {
        if count >= rank {
            let upper = if bound.is_finite() { bound } else { lower * 2.0 };
            let share = if count > below { (rank - below) / (count - below) } else { 1.0 };
            return Some(Duration::from_secs_f64(lower + (upper - lower) * share));
        }
        (lower, below) = (bound, count);
    }
    None
}

/// The server's own histograms, read before and after a run, for where the
/// time of an audience entry goes.
struct StageHistograms {
    rows: Vec<(&'static str, &'static str, String)>,
    before: Vec<Buckets>,
}

impl StageHistograms {
    fn scrape(options: &Options, destination: &str) -> anyhow::Result<StageHistograms> {
        let rows = vec![
            ("received -> resolver committed", "tandem_stage_event_age_seconds", "stage=\"resolve\"".to_owned()),
            ("received -> audience committed", "tandem_stage_event_age_seconds", "stage=\"audience\"".to_owned()),
            (
                "enqueued -> webhook accepted",
                "tandem_destination_delivery_wait_seconds",
                format!("destination=\"{destination}\""),
            ),
        ];
        let before = rows
            .iter()
            .map(|(_, name, label)| scrape_histogram(options, name, label))
            .collect::<anyhow::Result<_>>()?;
        Ok(StageHistograms { rows, before })
    }

    fn print(&self, options: &Options) -> anyhow::Result<()> {
        println!("per stage (the server's histograms; bucket-interpolated):");
        for ((title, name, label), before) in self.rows.iter().zip(&self.before) {
            let after = scrape_histogram(options, name, label)?;
            let shown = |fraction| histogram_percentile(before, &after, fraction).map_or("-".to_owned(), millis);
            println!("  {title:<32} p50 {}  p99 {}", shown(0.50), shown(0.99));
        }
        Ok(())
    }
}

fn latency(options: &Options, received: &Arc<Received>, receiver: u16) -> anyhow::Result<()> {
    let audience = format!("{}-buyers", options.name);
    admin(
        options,
        "POST",
        "/api/v1/audiences",
        Some(json!({"name": audience, "rule": {"text": "performed \"Order Completed\""}})),
    )?;
    let destination = format!("{}-entries", options.name);
    admin(
        options,
        "POST",
        "/api/v1/destinations",
        Some(json!({
            "name": destination,
            "destination": {"kind": "webhook", "url": format!("http://127.0.0.1:{receiver}/")},
            "audiences": [{"name": audience, "traits": ["bench_id"]}],
        })),
    )?;
    // Two events per person; several connections so one slow fsync does not
    // hold the schedule back.
    let people_per_second = (options.rate / 2).max(1);
    let total = people_per_second * options.seconds;
    let connections = 8u64;
    let stages = StageHistograms::scrape(options, &destination)?;
    let acknowledged: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let start = Instant::now();
    let run = chrono::Utc::now().timestamp_millis();
    let senders: Vec<_> = (0..connections)
        .map(|connection| {
            let (url, write_key) = (options.url.clone(), options.write_key.clone());
            let acknowledged = acknowledged.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                let mut person = connection;
                while person < total {
                    let due = start + Duration::from_secs_f64(person as f64 / people_per_second as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let user = format!("bench-{run}-{person}");
                    let body = json!({"batch": [
                        {"type": "identify", "userId": user, "traits": {"bench_id": person}},
                        {"type": "track", "userId": user, "event": "Order Completed", "properties": {"total": 42}},
                    ]});
                    send_batch(&agent, &url, &write_key, &body)?;
                    acknowledged.lock().expect("ack lock").insert(person, Instant::now());
                    person += connections;
                }
                Ok(())
            })
        })
        .collect();
    for sender in senders {
        sender.join().expect("sender thread")?;
    }
    let sent_in = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.entered.lock().expect("receiver lock").len() < total as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let entered = received.entered.lock().expect("receiver lock");
    let acknowledged = acknowledged.lock().expect("ack lock");
    let mut latencies: Vec<Duration> = acknowledged
        .iter()
        .filter_map(|(person, acked)| entered.get(person).map(|arrived| arrived.saturating_duration_since(*acked)))
        .collect();
    latencies.sort();
    println!(
        "sent:                  {} events ({} people) in {:.1} s = {:.0} events/s",
        total * 2,
        total,
        sent_in.as_secs_f64(),
        (total * 2) as f64 / sent_in.as_secs_f64()
    );
    println!("entries received:      {} of {}", latencies.len(), total);
    println!(
        "200 -> webhook:        p50 {}  p90 {}  p99 {}  max {}",
        millis(percentile(&latencies, 0.50)),
        millis(percentile(&latencies, 0.90)),
        millis(percentile(&latencies, 0.99)),
        millis(latencies.last().copied().unwrap_or_default()),
    );
    stages.print(options)?;
    if latencies.len() < total as usize {
        bail!("{} entries never arrived", total as usize - latencies.len());
    }
    Ok(())
}

fn throughput(options: &Options, received: &Arc<Received>, receiver: u16) -> anyhow::Result<()> {
    let name = format!("{}-stream", options.name);
    admin(
        options,
        "POST",
        "/api/v1/destinations",
        Some(json!({
            "name": name,
            "destination": {"kind": "webhook", "url": format!("http://127.0.0.1:{receiver}/")},
            "events": {"types": ["track"], "names": ["Bench Delivered"]},
            "batch_size": options.batch_size,
        })),
    )?;
    admin(options, "POST", &format!("/api/v1/destinations/{name}/pause"), None)?;
    let run = chrono::Utc::now().timestamp_millis();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let batch = 500u64;
    let mut sent = 0u64;
    while sent < options.events {
        let events: Vec<Value> = (sent..(sent + batch).min(options.events))
            .map(|index| {
                json!({"type": "track", "userId": format!("bench-{run}-{}", index % 10_000), "event": "Bench Delivered",
                       "messageId": format!("bench-{run}-{index}"),
                       "properties": {"sku": format!("SKU-{index}"), "price": 19.99, "currency": "EUR"}})
            })
            .collect();
        sent += events.len() as u64;
        send_batch(&agent, &options.url, &options.write_key, &json!({"batch": events}))?;
    }
    // Wait until the outbox stage has queued every event for the destination.
    let queued_by = Instant::now() + Duration::from_secs(600);
    loop {
        let destination = admin(options, "GET", &format!("/api/v1/destinations/{name}"), None)?;
        let pending = destination["counts"]["pending"].as_u64().unwrap_or(0);
        if pending >= options.events {
            break;
        }
        if Instant::now() > queued_by {
            bail!("only {pending} of {} events were queued", options.events);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let start = Instant::now();
    admin(options, "POST", &format!("/api/v1/destinations/{name}/resume"), None)?;
    let deadline = start + Duration::from_secs(600);
    while received.events.load(Ordering::Relaxed) < options.events && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = start.elapsed();
    let delivered = received.events.load(Ordering::Relaxed);
    println!("queued:                {} events, delivered {} per request", options.events, options.batch_size);
    println!(
        "delivered:             {delivered} events in {:.2} s = {:.0} events/s",
        elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64()
    );
    if delivered < options.events {
        bail!("{} events were not delivered within 10 minutes", options.events - delivered);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let received = Arc::new(Received::default());
    let receiver = start_receiver(received.clone()).context("starting the receiver")?;
    match options.mode {
        Mode::Latency => latency(&options, &received, receiver),
        Mode::Throughput => throughput(&options, &received, receiver),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percentile_is_read_from_what_a_histogram_counted_between_two_scrapes() {
        let scrape = |counts: [u32; 4]| {
            format!(
                "tandem_x_bucket{{le=\"0.01\",stage=\"a\"}} {}\ntandem_x_bucket{{le=\"0.02\",stage=\"a\"}} {}\n\
                 tandem_x_bucket{{le=\"0.04\",stage=\"a\"}} {}\ntandem_x_bucket{{le=\"+Inf\",stage=\"a\"}} {}\n\
                 tandem_x_bucket{{le=\"0.01\",stage=\"b\"}} 7\n",
                counts[0], counts[1], counts[2], counts[3]
            )
        };
        let before = histogram_buckets(&scrape([5, 5, 5, 5]), "tandem_x", "stage=\"a\"");
        assert_eq!(before.len(), 4, "only the series asked for: {before:?}");
        // Between the scrapes: 50 at most 10 ms, 48 between 10 and 20 ms, 2 between 20 and 40 ms.
        let after = histogram_buckets(&scrape([55, 103, 105, 105]), "tandem_x", "stage=\"a\"");
        let at = |fraction| histogram_percentile(&before, &after, fraction).unwrap().as_secs_f64();
        assert!((at(0.50) - 0.010).abs() < 1e-9, "{}", at(0.50));
        assert!((at(0.99) - 0.030).abs() < 1e-9, "{}", at(0.99));
        assert_eq!(histogram_percentile(&before, &before, 0.5), None, "nothing counted");
    }
}
