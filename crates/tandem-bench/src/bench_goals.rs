//! Goals benchmark, two commands:
//!
//! - `fill` makes a store of `--profiles` customers with a 90-day history
//!   (views, orders with revenue, sign-ups; a third browse anonymously
//!   before logging in, which merges two profiles), resolves it, defines
//!   goals over every metric kind that needs no other stage, and times the
//!   insight stage counting the whole log for them;
//! - `measure` signs in to a running server's console and times the goals
//!   page and the goal API, once every stage has caught up with the log:
//!   p50, p95 and the slowest of `--requests` requests each, measured by
//!   the client over loopback.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::collect::{normalize_message, BatchDefaults, IdRequirement, RequestContext};
use tandem_core::insight::goals::GoalSettings;
use tandem_core::random::Random;
use tandem_core::SourceKind;
use tandem_server::insight::goals::create_goal;
use tandem_server::insight::{system_clock, InsightStage};
use tandem_server::resolve::{Resolver, DEFAULT_BATCH};
use tandem_store::{IngestBatch, SqliteStore, Store};

/// The allocator the shipped binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Time counting for goals and drawing the goals page")]
struct Options {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a store of synthetic customers with goals, and count for them
    Fill {
        /// Data directory to create (must not exist)
        #[arg(long)]
        data: PathBuf,
        /// Customers
        #[arg(long, default_value_t = 1_000_000)]
        profiles: u64,
    },
    /// Time the console's goals page and the goal API of a running server
    Measure {
        /// The server, such as http://127.0.0.1:8080
        #[arg(long)]
        url: String,
        /// An admin token
        #[arg(long)]
        token: String,
        /// Timed requests per page
        #[arg(long, default_value_t = 50)]
        requests: usize,
    },
}

const DAY_S: i64 = 86_400;
const HISTORY_DAYS: u64 = 90;

/// One customer's messages, at moments in the history.
fn customer(index: u64, start: i64, random: &mut Random) -> Vec<Value> {
    let user = format!("u{index}");
    let moment = |random: &mut Random| start + random.below(HISTORY_DAYS * DAY_S as u64) as i64;
    let iso = |seconds: i64| {
        chrono::DateTime::from_timestamp(seconds, 0).map(tandem_core::event::format_timestamp).unwrap_or_default()
    };
    let signed_up = moment(random);
    let mut messages =
        vec![json!({"type": "track", "userId": user, "event": "Signed Up", "timestamp": iso(signed_up)})];
    for _ in 0..1 + random.below(3) {
        messages
            .push(json!({"type": "track", "userId": user, "event": "Product Viewed", "timestamp": iso(moment(random)),
            "properties": {"sku": format!("sku-{}", random.below(500))}}));
    }
    for _ in 0..random.below(3) {
        let cents = 1_500 + random.below(30_000);
        messages.push(
            json!({"type": "track", "userId": user, "event": "Order Completed", "timestamp": iso(moment(random)),
            "properties": {"revenue": cents as f64 / 100.0}}),
        );
    }
    if random.below(3) == 0 {
        // A browser seen first anonymously, then logged in: a merge.
        let anonymous = format!("a{index}");
        let at = moment(random);
        messages.push(json!({"type": "page", "anonymousId": anonymous, "name": "Home", "timestamp": iso(at)}));
        messages.push(json!({"type": "identify", "userId": user, "anonymousId": anonymous, "timestamp": iso(at + 60)}));
    }
    messages
}

/// Goals over every metric kind the insight stage and its snapshots answer.
fn goals(history: &str) -> Vec<Value> {
    let goal = |name: &str, owner: &str, period: &str, target: f64, metric: Value| json!({"name": name, "owner": owner, "period": period, "target": target, "metric": metric});
    vec![
        goal("Revenue", "marketing", history, 1e7, json!({"kind": "revenue"})),
        goal("New customers", "marketing", history, 1e6, json!({"kind": "new_customers"})),
        goal(
            "Browse to buy",
            "marketing",
            history,
            20.0,
            json!({"kind": "conversion", "from": "Product Viewed", "to": "Order Completed", "within": "7d"}),
        ),
        goal(
            "Sign-up to order",
            "marketing",
            history,
            30.0,
            json!({"kind": "conversion", "from": "Signed Up", "to": "Order Completed", "within": "14d"}),
        ),
        goal("Active (30 days)", "both", history, 5e5, json!({"kind": "active_customers", "within_days": 30})),
        goal("Active (7 days)", "both", history, 2e5, json!({"kind": "active_customers", "within_days": 7})),
        goal("Churned", "both", history, 1e5, json!({"kind": "churned_customers", "inactive_days": 30})),
        goal("Events ingested", "it", "month", 1e7, json!({"kind": "ingest_volume"})),
        goal("Merge rate", "it", "month", 30.0, json!({"kind": "merge_rate"})),
        goal("Latency p99", "it", "month", 250.0, json!({"kind": "ingest_latency_p99"})),
        goal("Violations", "it", "month", 2.0, json!({"kind": "violation_rate"})),
        goal("Delivery success", "it", "month", 99.0, json!({"kind": "delivery_success_rate"})),
        goal("Stack spend", "both", "year", 120_000.0, json!({"kind": "stack_spend"})),
    ]
}

fn fill(data: &Path, profiles: u64) -> anyhow::Result<()> {
    anyhow::ensure!(!data.exists(), "{} exists; give a new directory", data.display());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data).context("opening the store")?);
    let source = store.create_source("bench", SourceKind::Backend)?;
    let now = chrono::Utc::now();
    let start = now.timestamp() - (HISTORY_DAYS as i64 + 3) * DAY_S;
    let request = RequestContext {
        source_id: &source.id,
        received_at: now,
        client_ip: None,
        ids: IdRequirement::UserOrAnonymousId,
    };
    let mut random = Random::new(42);
    let filling = Instant::now();
    let (mut events, mut records) = (0u64, Vec::new());
    for index in 0..profiles {
        for message in customer(index, start, &mut random) {
            let Value::Object(message) = message else { unreachable!() };
            let event = normalize_message(message, None, &BatchDefaults::default(), &request)
                .map_err(|rejection| anyhow::anyhow!("generated an invalid event: {rejection}"))?;
            records.push(event.to_log_record());
        }
        if records.len() >= 20_000 || index + 1 == profiles {
            events += records.len() as u64;
            store.append(&[IngestBatch { records: std::mem::take(&mut records), ..Default::default() }], 0)?;
        }
    }
    println!(
        "log filled:            {events} events for {profiles} customers in {:.1} s",
        filling.elapsed().as_secs_f64()
    );
    let resolving = Instant::now();
    Resolver::load(store.clone())?.catch_up(DEFAULT_BATCH)?;
    let stats = store.stats()?;
    println!("resolved:              {} profiles in {:.1} s", stats.profiles, resolving.elapsed().as_secs_f64());

    let first = (now - chrono::Duration::days(HISTORY_DAYS as i64 + 3)).date_naive();
    let history = format!("{first}..{}", first + chrono::Days::new(119));
    for goal in goals(&history) {
        let settings = GoalSettings::from_json(&goal).context("a benchmark goal")?;
        create_goal(store.as_ref(), &settings, now.timestamp_millis())?;
    }
    let counting = Instant::now();
    InsightStage::new(store.clone(), system_clock()).catch_up()?;
    let seconds = counting.elapsed().as_secs_f64();
    println!(
        "insight stage:         {} goals counted over the whole log in {seconds:.1} s ({:.0} events/s for {} trackers)",
        goals(&history).len(),
        events as f64 / seconds,
        store.trackers()?.len()
    );
    Ok(())
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// `name=value` of a response's `Set-Cookie`.
fn cookie_of(response: &ureq::http::Response<ureq::Body>) -> anyhow::Result<String> {
    let header = response.headers().get("set-cookie").context("no session cookie")?.to_str()?;
    Ok(header.split(';').next().unwrap_or_default().trim().to_owned())
}

/// Signs in to the console with `token`; the session cookie.
fn sign_in(agent: &ureq::Agent, url: &str, token: &str) -> anyhow::Result<String> {
    let mut form = agent.get(&format!("{url}/console/sign-in")).call()?;
    let anonymous = cookie_of(&form)?;
    let html = form.body_mut().read_to_string()?;
    let needle = "name=\"csrf-token\" content=\"";
    let at = html.find(needle).context("no csrf token on the sign-in page")? + needle.len();
    let csrf = html[at..].split('"').next().unwrap_or_default().to_owned();
    let signed = agent
        .post(&format!("{url}/console/sign-in"))
        .header("cookie", &anonymous)
        .header("content-type", "application/x-www-form-urlencoded")
        .send(format!("token={token}&csrf={csrf}"))?;
    if signed.status().as_u16() != 303 {
        bail!("signing in answered {}", signed.status());
    }
    cookie_of(&signed)
}

/// Waits until every stage has caught up with the log (the cluster API).
fn wait_for_stages(agent: &ureq::Agent, url: &str, token: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3_600);
    loop {
        let mut response =
            agent.get(&format!("{url}/api/v1/cluster")).header("authorization", &format!("Bearer {token}")).call()?;
        let status: Value = serde_json::from_str(&response.body_mut().read_to_string()?)?;
        let behind: u64 =
            status["stages"].as_array().into_iter().flatten().filter_map(|stage| stage["lag"].as_u64()).sum();
        if behind == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the stages did not catch up: {status}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Times `requests` GETs of `path` (after a few untimed ones): p50, p95,
/// max in milliseconds and the body's size.
fn time_page(agent: &ureq::Agent, url: &str, path: &str, header: (&str, &str), requests: usize) -> anyhow::Result<()> {
    let mut times = Vec::with_capacity(requests);
    let mut bytes = 0;
    for round in 0..requests + 3 {
        let started = Instant::now();
        let mut response = agent.get(&format!("{url}{path}")).header(header.0, header.1).call()?;
        let body = response.body_mut().read_to_string()?;
        let elapsed = started.elapsed();
        if response.status().as_u16() != 200 {
            bail!("{path} answered {}: {body}", response.status());
        }
        bytes = body.len();
        if round >= 3 {
            times.push(elapsed.as_secs_f64() * 1_000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    let at = |share: f64| times[((times.len() as f64 * share).ceil() as usize).clamp(1, times.len()) - 1];
    println!(
        "{path:<40} p50 {:>7.1} ms   p95 {:>7.1} ms   max {:>7.1} ms   {:>6} bytes",
        at(0.5),
        at(0.95),
        times.last().copied().unwrap_or_default(),
        bytes
    );
    Ok(())
}

fn measure(url: &str, token: &str, requests: usize) -> anyhow::Result<()> {
    let agent = agent();
    let waiting = Instant::now();
    wait_for_stages(&agent, url, token)?;
    println!("stages caught up after {:.1} s of waiting", waiting.elapsed().as_secs_f64());
    let cookie = sign_in(&agent, url, token)?;
    let bearer = format!("Bearer {token}");
    let mut listed = agent.get(&format!("{url}/api/v1/goals")).header("authorization", &bearer).call()?;
    let listed: Value = serde_json::from_str(&listed.body_mut().read_to_string()?)?;
    let names: Vec<String> = listed["goals"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|goal| goal["name"].as_str().map(str::to_owned))
        .collect();
    let profiles = {
        let mut response = agent.get(&format!("{url}/api/v1/cluster")).header("authorization", &bearer).call()?;
        let status: Value = serde_json::from_str(&response.body_mut().read_to_string()?)?;
        status["head"].as_u64().unwrap_or(0)
    };
    println!("{} goals; log head {profiles}; {requests} timed requests per page", names.len());
    time_page(&agent, url, "/console/goals", ("cookie", &cookie), requests)?;
    time_page(&agent, url, "/api/v1/goals", ("authorization", &bearer), requests)?;
    for name in &names {
        let path = format!("/api/v1/goals/{}", name.replace(' ', "%20").replace('(', "%28").replace(')', "%29"));
        time_page(&agent, url, &path, ("authorization", &bearer), requests.min(20))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Options::parse().command {
        Command::Fill { data, profiles } => fill(&data, profiles),
        Command::Measure { url, token, requests } => measure(&url, &token, requests),
    }
}
