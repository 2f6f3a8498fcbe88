//! Profile lookup load generator: asks a running Tandem for profiles by
//! identifier (`GET /api/v1/profiles?identifier=user_id:user-N`) at a fixed
//! request rate from this separate process and prints latency percentiles.

use clap::Parser;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Look profiles up by identifier at a fixed rate and report latency")]
struct Options {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Admin token (tandem token create)
    #[arg(long)]
    token: String,
    /// Requests per second across all connections
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    #[arg(long, default_value_t = 16)]
    connections: u64,
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Look up user-0 … user-(people-1)
    #[arg(long, default_value_t = 100_000)]
    people: u64,
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let interval = Duration::from_secs_f64(options.connections as f64 / options.rate as f64);
    let start = Instant::now();
    let end = start + Duration::from_secs(options.seconds);
    let results: Vec<anyhow::Result<(Vec<Duration>, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..options.connections)
            .map(|connection| {
                let options = &options;
                scope.spawn(move || -> anyhow::Result<(Vec<Duration>, u64)> {
                    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                    let mut latencies = Vec::new();
                    let mut misses = 0;
                    // Stagger the connections across one interval.
                    let mut next = start + interval.mul_f64(connection as f64 / options.connections as f64);
                    let mut n = connection;
                    while next < end {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        let person = n.wrapping_mul(2_654_435_761) % options.people;
                        let sent = Instant::now();
                        let mut response = agent
                            .get(&format!("{}/api/v1/profiles?identifier=user_id:user-{person}", options.url))
                            .header("Authorization", &format!("Bearer {}", options.token))
                            .call()?;
                        let _ = response.body_mut().read_to_string()?;
                        latencies.push(sent.elapsed());
                        if response.status().as_u16() != 200 {
                            misses += 1;
                        }
                        next += interval;
                        n += options.connections;
                    }
                    Ok((latencies, misses))
                })
            })
            .collect();
        handles.into_iter().map(|handle| handle.join().expect("a load thread panicked")).collect()
    });
    let mut latencies = Vec::new();
    let mut misses = 0;
    for result in results {
        let (mut part, missed) = result?;
        latencies.append(&mut part);
        misses += missed;
    }
    latencies.sort();
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "bench-lookup: target {} requests/s over {} connections for {} s",
        options.rate, options.connections, options.seconds
    );
    println!("requests:              {} ({} not 200)", latencies.len(), misses);
    println!("achieved requests/s:   {:.0}", latencies.len() as f64 / elapsed);
    println!("latency p50:           {:.3} ms", percentile(&latencies, 0.50).as_secs_f64() * 1e3);
    println!("latency p99:           {:.3} ms", percentile(&latencies, 0.99).as_secs_f64() * 1e3);
    println!("latency max:           {:.3} ms", latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3);
    Ok(())
}
