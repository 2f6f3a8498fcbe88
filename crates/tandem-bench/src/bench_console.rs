//! Console page-time benchmark. `measure` signs in to a running Tandem's
//! web console as a person does (the sign-in form, its CSRF token, the
//! session cookie) and requests each kind of console page again and again
//! from this separate process, one request at a time, printing the time
//! to the whole response (p50, p99, max) and its size per page: every page
//! the navigation links to and every tab of those pages (so pages added
//! later are measured too; a section that redirects to its first tab is
//! measured there), a
//! customer search, one customer's 360° view, every audience's page, the
//! audience builder's live preview, and the sign-in page.
//!
//! `fill` builds a store to measure at scale: the customers of
//! [`tandem_bench::synthetic`] (the audience benchmark's), each with an
//! identify call carrying an e-mail and traits, their events written to the
//! log and resolved into profiles, and three audiences backfilled.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Map};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_bench::synthetic::customer;
use tandem_core::{Event, EventType, MessageId, SourceKind};
use tandem_store::{IngestBatch, SqliteStore, Store};

/// The allocator the shipped binary uses, so `fill` runs the resolver as it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Measure the server time of every console page, or fill a store to measure it at scale")]
struct Options {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Request every console page repeatedly and print the time per page
    Measure(Measure),
    /// Create a store of synthetic customers, resolved, with audiences backfilled
    Fill(Fill),
}

#[derive(Parser, Debug)]
struct Measure {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An admin token (tandem token create)
    #[arg(long)]
    token: String,
    /// Timed requests per page
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Untimed requests per page first
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// The customer whose 360° view is measured, as type:value
    #[arg(long)]
    customer: String,
    /// The identifier prefix the customer search is measured with
    #[arg(long, default_value = "email:a")]
    search: String,
    /// The rule the builder's preview is measured with
    #[arg(long, default_value = r#"performed "Order Completed" within 30d"#)]
    rule: String,
}

#[derive(Parser, Debug)]
struct Fill {
    /// Data directory to create (must not exist)
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    profiles: u64,
    /// Track events in all, besides one identify call per customer
    #[arg(long, default_value_t = 5_000_000)]
    events: u64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// The audiences `fill` defines.
const FILL_AUDIENCES: [(&str, &str); 3] = [
    ("recent buyers", r#"performed "Order Completed" within 30d"#),
    ("pro plan", r#"trait plan = "pro""#),
    ("abandoned checkout", r#"performed "Checkout Started" within 3d and not performed "Order Completed" within 3d"#),
];

fn main() -> anyhow::Result<()> {
    match Options::parse().command {
        Mode::Measure(options) => measure(&options),
        Mode::Fill(options) => fill(&options),
    }
}

// ---------------------------------------------------------------------------
// measure

/// A signed-in console session.
struct Session {
    agent: ureq::Agent,
    base: String,
    cookie: String,
    csrf: String,
}

/// The value of `name="…" value="…"`-style attribute `attribute` after `marker`.
fn attribute_after(html: &str, marker: &str, attribute: &str) -> Option<String> {
    let rest = &html[html.find(marker)? + marker.len()..];
    let start = rest.find(&format!("{attribute}=\""))? + attribute.len() + 2;
    Some(rest[start..start + rest[start..].find('"')?].to_owned())
}

/// `name=value` of a response's `Set-Cookie`.
fn cookie_of(response: &ureq::http::Response<ureq::Body>) -> Option<String> {
    let set = response.headers().get("set-cookie")?.to_str().ok()?;
    Some(set.split(';').next()?.to_owned())
}

/// Every `href` inside the first element opening with `opening` (a `<nav`)
/// up to its `</nav>`.
fn links_in(html: &str, opening: &str) -> Vec<String> {
    let Some(start) = html.find(opening) else { return Vec::new() };
    let nav = &html[start..start + html[start..].find("</nav>").unwrap_or(0)];
    nav.split("href=\"").skip(1).filter_map(|rest| rest.split('"').next()).map(str::to_owned).collect()
}

/// Every link of the console's navigation (the first `<nav`).
fn nav_links(html: &str) -> Vec<String> {
    links_in(html, "<nav")
}

/// Every link of a section's tabs (`<nav class="tabs"`).
fn tab_links(html: &str) -> Vec<String> {
    links_in(html, "<nav class=\"tabs\"")
}

/// Every `href` of an audience's page on the audiences page.
fn audience_links(html: &str) -> Vec<String> {
    html.split("href=\"/console/audiences/")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|name| format!("/console/audiences/{name}"))
        .collect()
}

/// `name=value` pairs as a form body or query string.
fn form(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

impl Session {
    fn sign_in(base: &str, token: &str) -> anyhow::Result<Session> {
        // Redirects are read, not followed: the session cookie comes with one.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        let mut sign_in_page = agent.get(&format!("{base}/console/sign-in")).call()?;
        let anonymous = cookie_of(&sign_in_page).context("the sign-in page set no cookie")?;
        let html = sign_in_page.body_mut().read_to_string()?;
        let csrf = attribute_after(&html, "name=\"csrf\"", "value").context("the sign-in form has no csrf")?;
        let signed_in = agent
            .post(&format!("{base}/console/sign-in"))
            .header("Cookie", &anonymous)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .send(form(&[("token", token), ("csrf", &csrf)]))?;
        if !signed_in.status().is_redirection() {
            bail!("signing in answered {}", signed_in.status());
        }
        let cookie = cookie_of(&signed_in).context("signing in set no cookie")?;
        let mut session = Session { agent, base: base.to_owned(), cookie, csrf: String::new() };
        let (_, html) = session.get("/console/audiences")?;
        session.csrf = attribute_after(&html, "name=\"csrf-token\"", "content").context("no csrf meta tag")?;
        Ok(session)
    }

    fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut response = self.agent.get(&format!("{}{path}", self.base)).header("Cookie", &self.cookie).call()?;
        let status = response.status().as_u16();
        let location = response.headers().get("location").and_then(|value| value.to_str().ok()).map(str::to_owned);
        let body = response.body_mut().read_to_string()?;
        Ok((status, location.unwrap_or(body)))
    }

    fn preview(&self, rule: &str) -> anyhow::Result<(u16, String)> {
        let mut response = self
            .agent
            .post(&format!("{}/console/audiences/preview", self.base))
            .header("Cookie", &self.cookie)
            .header("X-CSRF-Token", &self.csrf)
            .header("Content-Type", "application/json")
            .send(json!({ "rule": rule }).to_string())?;
        Ok((response.status().as_u16(), response.body_mut().read_to_string()?))
    }
}

/// One kind of request to time.
enum Page {
    Get(String),
    SignIn,
    Preview(String),
}

impl Page {
    fn label(&self) -> String {
        match self {
            Page::Get(path) => path.clone(),
            Page::SignIn => "/console/sign-in (signed out)".to_owned(),
            Page::Preview(_) => "POST /console/audiences/preview".to_owned(),
        }
    }

    fn request(&self, session: &Session) -> anyhow::Result<(u16, usize)> {
        let (status, body) = match self {
            Page::Get(path) => session.get(path)?,
            Page::SignIn => {
                let mut response = session.agent.get(&format!("{}/console/sign-in", session.base)).call()?;
                (response.status().as_u16(), response.body_mut().read_to_string()?)
            }
            Page::Preview(rule) => session.preview(rule)?,
        };
        Ok((status, body.len()))
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

fn measure(options: &Measure) -> anyhow::Result<()> {
    let base = options.url.trim_end_matches('/');
    let session = Session::sign_in(base, &options.token)?;
    let (_, landing) = session.get("/console/audiences")?;
    let mut pages: Vec<Page> = vec![Page::SignIn];
    // Each section the navigation links to, where a section that redirects
    // to its first tab is measured at that tab, then each of its other tabs.
    let mut paths: Vec<String> = Vec::new();
    for link in nav_links(&landing) {
        let (status, body) = session.get(&link)?;
        let (path, html) = match status {
            200 => (link, body),
            303 if body.starts_with("/console/") => {
                let (status, html) = session.get(&body)?;
                if status != 200 {
                    bail!("{link} leads to {body}, which answered {status}");
                }
                (body, html)
            }
            _ => bail!("{link} answered {status}"),
        };
        for path in std::iter::once(path).chain(tab_links(&html)) {
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
    }
    pages.extend(paths.into_iter().map(Page::Get));
    pages.push(Page::Get(format!("/console/customers?{}", form(&[("identifier", &options.search)]))));
    let (status, found) = session.get(&format!("/console/customers?{}", form(&[("identifier", &options.customer)])))?;
    if status != 303 || !found.starts_with("/console/customers/prof_") {
        bail!("no customer holds {} ({status})", options.customer);
    }
    pages.push(Page::Get(found));
    let (_, audiences) = session.get("/console/audiences")?;
    pages.extend(audience_links(&audiences).into_iter().map(Page::Get));
    pages.push(Page::Preview(options.rule.clone()));

    println!("{:<58} {:>8} {:>8} {:>8} {:>9}", "page", "p50 ms", "p99 ms", "max ms", "bytes");
    let mut slowest = (Duration::ZERO, String::new());
    for page in &pages {
        let label = page.label();
        for _ in 0..options.warmup {
            page.request(&session)?;
        }
        let mut times = Vec::with_capacity(options.requests);
        let mut bytes = 0;
        for _ in 0..options.requests {
            let started = Instant::now();
            let (status, size) = page.request(&session)?;
            times.push(started.elapsed());
            if status != 200 {
                bail!("{label} answered {status}");
            }
            bytes = size;
        }
        times.sort_unstable();
        let p99 = percentile(&times, 0.99);
        if p99 > slowest.0 {
            slowest = (p99, label.clone());
        }
        println!(
            "{label:<58} {:>8.2} {:>8.2} {:>8.2} {bytes:>9}",
            ms(percentile(&times, 0.5)),
            ms(p99),
            ms(*times.last().unwrap_or(&Duration::ZERO))
        );
    }
    println!("slowest p99: {:.2} ms ({}), {} requests per page", ms(slowest.0), slowest.1, options.requests);
    Ok(())
}

// ---------------------------------------------------------------------------
// fill

/// Customers generated and appended per step.
const FILL_PAGE: u64 = 20_000;

/// A customer's identify call, before their events: e-mail, name and traits.
fn identify(id: u64, traits: &Map<String, serde_json::Value>, source: &tandem_core::SourceId, at_ms: i64) -> Event {
    let mut event = tandem_bench::synthetic::track(id, 0, "", Map::new(), at_ms, source);
    let mut traits = traits.clone();
    traits.insert("email".into(), json!(format!("c{id}@example.com")));
    traits.insert("first_name".into(), json!(format!("Customer {id}")));
    event.event_type = EventType::Identify;
    event.message_id = MessageId::new(format!("c{id}-identify"));
    event.event = None;
    event.properties = None;
    event.traits = Some(traits);
    event
}

fn fill(options: &Fill) -> anyhow::Result<()> {
    if options.data.exists() {
        bail!("{} exists; fill creates a new store", options.data.display());
    }
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&options.data)?);
    let source = store.create_source("shop", SourceKind::Website)?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let first_seen_ms = now_ms - (tandem_bench::synthetic::HISTORY_DAYS as i64 + 1) * 86_400_000;
    let mean_events = (options.events / options.profiles.max(1)).max(1);
    let started = Instant::now();
    let mut events = 0u64;
    let mut next = 1;
    while next <= options.profiles {
        let end = (next + FILL_PAGE).min(options.profiles + 1);
        let mut records = Vec::new();
        for id in next..end {
            let generated = customer(id, options.seed, mean_events, &source.id, now_ms);
            records.push(identify(id, &generated.traits, &source.id, first_seen_ms).to_log_record());
            records.extend(generated.events.iter().map(Event::to_log_record));
        }
        events += records.len() as u64;
        store.append(&[IngestBatch { records, ..IngestBatch::default() }], 0)?;
        next = end;
    }
    println!("appended {events} events in {:.1} s", started.elapsed().as_secs_f64());

    let started = Instant::now();
    let mut resolver = tandem_server::resolve::Resolver::load(store.clone())?;
    resolver.catch_up(tandem_server::resolve::DEFAULT_BATCH)?;
    drop(resolver);
    println!("resolved {} profiles in {:.1} s", store.stats()?.profiles, started.elapsed().as_secs_f64());

    let started = Instant::now();
    let now = chrono::Utc::now();
    for (name, rule) in FILL_AUDIENCES {
        let rule = tandem_core::audience::Condition::parse(rule).with_context(|| format!("audience {name}"))?;
        tandem_server::audience::create_audience(store.as_ref(), name, rule, now)?;
    }
    let mut stage = tandem_server::audience::AudienceStage::new(store.clone(), tandem_server::audience::system_clock());
    stage.catch_up()?;
    for record in store.list_audiences()? {
        println!("  {:<22} {:>9} members", record.definition.name, record.size);
    }
    println!("audiences backfilled and events applied in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
