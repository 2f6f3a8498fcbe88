//! Ingest load generator: drives `/v1/batch` of a running Tandem from this
//! separate process over loopback, with unique `messageId`s, and prints
//! acknowledged events per second and request latency percentiles.
//! Every 200 counts only after Tandem has made the batch durable. Given
//! several `--url`s (nodes of one cluster), the connections are spread over
//! them in turn, as a load balancer would.

use anyhow::{bail, Context};
use clap::Parser;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Load /v1/batch of a running Tandem and report events/s and latency")]
struct Options {
    /// Base URL of the server; repeat for several nodes
    #[arg(long = "url", default_value = "http://127.0.0.1:8080")]
    urls: Vec<String>,
    /// Write key of the source to send as
    #[arg(long)]
    write_key: String,
    /// Concurrent connections
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Events per request
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Approximate JSON size of one event, in bytes
    #[arg(long, default_value_t = 400)]
    event_bytes: usize,
    /// Seconds to run after the warm-up
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds of warm-up, not counted
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
}

/// One batch body of `batch_size` events of about `event_bytes` each.
fn batch_body(options: &Options, run: u128, connection: usize, request: u64) -> String {
    let mut body = String::with_capacity(options.batch_size * (options.event_bytes + 16) + 64);
    body.push_str("{\"batch\":[");
    for index in 0..options.batch_size {
        if index > 0 {
            body.push(',');
        }
        let user = (request as usize * 31 + index * 7 + connection) % 100_000;
        let start = body.len();
        body.push_str(&format!(
            "{{\"type\":\"track\",\"messageId\":\"bench-{run}-{connection}-{request}-{index}\",\"userId\":\"user-{user}\",\
             \"event\":\"Product Viewed\",\"timestamp\":\"2026-01-01T12:00:00.000Z\",\
             \"properties\":{{\"sku\":\"SKU-{index:05}\",\"price\":19.99,\"currency\":\"EUR\",\"category\":\"shoes\"}},\
             \"context\":{{\"library\":{{\"name\":\"bench-ingest\",\"version\":\"1\"}},\"page\":{{\"url\":\"https://shop.example/p/{index}\"}},\"pad\":\""
        ));
        let used = body.len() - start + 4;
        body.extend(std::iter::repeat_n('x', options.event_bytes.saturating_sub(used)));
        body.push_str("\"}}");
    }
    body.push_str("],\"sentAt\":\"2026-01-01T12:00:01.000Z\"}");
    body
}

struct ConnectionResult {
    latencies: Vec<Duration>,
    events: u64,
}

fn run_connection(
    options: &Options,
    run: u128,
    connection: usize,
    warmup_end: Instant,
    end: Instant,
) -> anyhow::Result<ConnectionResult> {
    use base64::Engine as _;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let url = format!("{}/v1/batch", options.urls[connection % options.urls.len()]);
    let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:", options.write_key)));
    let mut result = ConnectionResult { latencies: Vec::new(), events: 0 };
    for request in 0.. {
        let body = batch_body(options, run, connection, request);
        let started = Instant::now();
        if started >= end {
            break;
        }
        let mut response = agent
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(&body)
            .context("sending a batch")?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        let elapsed = started.elapsed();
        if status != 200 {
            bail!("the server answered {status}: {text}");
        }
        if started >= warmup_end && Instant::now() <= end {
            result.latencies.push(elapsed);
            result.events += options.batch_size as u64;
        }
    }
    Ok(result)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    let sample = batch_body(&options, run, 0, 0);
    let warmup_end = Instant::now() + Duration::from_secs(options.warmup_seconds);
    let end = warmup_end + Duration::from_secs(options.seconds);
    let results: Vec<anyhow::Result<ConnectionResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..options.connections)
            .map(|connection| {
                let options = &options;
                scope.spawn(move || run_connection(options, run, connection, warmup_end, end))
            })
            .collect();
        handles.into_iter().map(|handle| handle.join().expect("a load thread panicked")).collect()
    });
    let mut latencies = Vec::new();
    let mut events = 0;
    for result in results {
        let result = result?;
        latencies.extend(result.latencies);
        events += result.events;
    }
    latencies.sort();
    let seconds = options.seconds as f64;
    println!(
        "bench-ingest: {} connections to {} node(s), {} events of ~{} B per request ({} B bodies), {} s measured after {} s warm-up",
        options.connections,
        options.urls.len(),
        options.batch_size,
        options.event_bytes,
        sample.len(),
        options.seconds,
        options.warmup_seconds
    );
    println!("requests acknowledged: {}", latencies.len());
    println!("events acknowledged:   {events}");
    println!("events/s:              {:.0}", events as f64 / seconds);
    println!("requests/s:            {:.0}", latencies.len() as f64 / seconds);
    println!("latency p50:           {:.2} ms", percentile(&latencies, 0.50).as_secs_f64() * 1e3);
    println!("latency p99:           {:.2} ms", percentile(&latencies, 0.99).as_secs_f64() * 1e3);
    println!("latency max:           {:.2} ms", latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3);
    Ok(())
}
