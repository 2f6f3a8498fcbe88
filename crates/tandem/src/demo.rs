//! `tandem demo`: a synthetic company to explore. [`generate`] builds, from a
//! seed alone, the data a real shop's silos would hold about its customers:
//! web and app behaviour, orders, product usage, support tickets with free
//! text, CRM contacts, leads and social mentions, with the overlaps real data
//! has (the same person with differently-cased e-mails, anonymous browsing
//! before login, CRM contacts without a user id, shared family devices, typos
//! in names). [`load`] sends it all in the way production data arrives: the
//! behaviour through the tracking API, the silos through the importers with
//! the shipped example mappings, leads and mentions through webhooks.
//!
//! The generator also says how many profiles the resolver must end with
//! ([`Expected`]): each person is one profile, whatever number of sources
//! they appear in; visitors who never identify stay anonymous profiles.

use anyhow::{bail, Context};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use base64::Engine;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use tandem_core::mapping::Mapping;
use tandem_core::random::Random;
use tandem_core::webhook::{WebhookFormat, WebhookSettings};
use tandem_core::{Source, SourceKind};
use tandem_server::import::{run_import, FileFormat, ImportRequest};
use tandem_server::AppState;
use tandem_store::Store;
use tower::ServiceExt;

mod goals;
pub use goals::define_goals;
pub mod living;
pub mod receiver;

/// Where `tandem demo` keeps its data unless told otherwise, apart from a real store.
pub const DEFAULT_DATA_DIR: &str = "./tandem-demo";
/// Customers a demo company has unless told otherwise.
pub const DEFAULT_CUSTOMERS: usize = 10_000;
pub const DEFAULT_SEED: u64 = 42;
/// Messages per tracking-API batch the demo sends.
const BATCH_MESSAGES: usize = 400;
/// Days of history a demo company has, ending shortly before the day it is made.
const HISTORY_DAYS: u64 = 90;
/// Follow-ups (a ticket resolved after it was opened, clicks after a page
/// view) come at most about two days after the moment they follow, so the
/// moments end this many days before "now" and every event is in the past.
const FOLLOW_UP_DAYS: u64 = 3;

const FIRST_NAMES: [&str; 40] = [
    "Ann", "Bob", "Carla", "Dan", "Erin", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luis", "Maya", "Nils",
    "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wim", "Xenia", "Yusuf", "Zoe", "Aiko", "Bruno",
    "Chloe", "Dmitri", "Elif", "Femi", "Gita", "Hannes", "Ida", "Jakob", "Lena", "Mateo", "Noor", "Oskar",
];
const LAST_NAMES: [&str; 40] = [
    "Lee", "Okafor", "Mendes", "Walsh", "Schmidt", "Novak", "Rossi", "Kowalski", "Silva", "Jensen", "Haddad", "Ito",
    "Garcia", "Nguyen", "Brown", "Dubois", "Fischer", "Larsen", "Moreau", "Petrov", "Costa", "Yilmaz", "Berg",
    "Murphy", "Tanaka", "Weber", "Adeyemi", "Khan", "Lopez", "Meyer", "Popescu", "Quist", "Ramos", "Sato", "Torres",
    "Varga", "Wagner", "Zhang", "Horvat", "Ek",
];
const DOMAINS: [&str; 4] = ["example.com", "example.org", "example.net", "mail.example"];
const COMPANIES: [&str; 8] =
    ["Lee Consulting", "Okafor GmbH", "Northwind", "Blue Harbor", "Kestrel Labs", "Fjord Foods", "", ""];
const PAGES: [(&str, &str); 6] = [
    ("Home", "/"),
    ("Pricing", "/pricing"),
    ("Trail Runner GTX", "/products/trail-runner-gtx"),
    ("City Backpack", "/products/city-backpack"),
    ("Blog: Packing light", "/blog/packing-light"),
    ("Help center", "/help"),
];
const FEATURES: [&str; 5] = ["reports", "dashboards", "export", "sharing", "mobile-sync"];
const TICKETS: [(&str, &str, &str); 6] = [
    (
        "Invoice missing",
        "I can't find the invoice for my last order, could you send it again?",
        "Sent the invoice again, thanks for your patience.",
    ),
    (
        "Order arrived damaged",
        "The backpack arrived with a torn strap. Really disappointed.",
        "We shipped a replacement, sorry about that.",
    ),
    (
        "Login fails",
        "The app says wrong password although I just reset it",
        "Cleared the stale session, login works now.",
    ),
    (
        "Love the new dashboards",
        "Just wanted to say the new dashboards are great, well done!",
        "Thank you, we passed it on to the team.",
    ),
    (
        "Refund request",
        "I returned the shoes two weeks ago and still have no refund. This is frustrating.",
        "Refund issued today.",
    ),
    ("How do I export?", "Where can I export my reports as CSV?", "Export is under Reports > Share > CSV."),
];
const MENTIONS: [&str; 6] = [
    "Support fixed my invoice problem within an hour, great service!",
    "Still waiting for my refund, not impressed",
    "The new dashboards are a game changer for our team",
    "Anyone else's app logging them out all the time?",
    "Best trail shoes I have owned",
    "Delivery took forever this time",
];
const CAMPAIGNS: [&str; 4] = ["autumn-webinar", "search-brand", "retargeting-q3", "newsletter-signup"];

/// How many profiles the resolver must end with, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    /// Customers: each a single profile joining every source they appear in.
    pub customers: u64,
    /// People who only ever came through a lead form.
    pub prospects: u64,
    /// Social accounts that mention the brand but are nobody's known handle.
    pub strangers: u64,
    /// Browsers that never identified.
    pub anonymous_visitors: u64,
}

impl Expected {
    pub fn profiles(&self) -> u64 {
        self.customers + self.prospects + self.strangers + self.anonymous_visitors
    }
}

/// A silo's export, as the importer will read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiloFile {
    pub source: &'static str,
    pub file_name: &'static str,
    pub mapping: &'static str,
    pub contents: String,
}

/// Everything a demo company sends, in the order it is sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Company {
    /// `(source name, /v1/batch body)`.
    pub tracking: Vec<(&'static str, Value)>,
    pub files: Vec<SiloFile>,
    /// `(source name, webhook body)`.
    pub webhooks: Vec<(&'static str, Value)>,
    pub expected: Expected,
    /// Identifiers of the customer the walkthrough shows.
    pub showcase: Showcase,
    /// Two customers who share a family tablet and must stay apart.
    pub family: Option<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Showcase {
    pub user_id: String,
    pub email: String,
}

pub const ORDERS_MAPPING: &str = include_str!("../../../examples/mappings/orders.toml");
pub const USAGE_MAPPING: &str = include_str!("../../../examples/mappings/product_usage.toml");
pub const TICKETS_MAPPING: &str = include_str!("../../../examples/mappings/support_tickets.toml");
pub const CRM_MAPPING: &str = include_str!("../../../examples/mappings/crm_contacts.toml");
pub const LEADS_MAPPING: &str = include_str!("../../../examples/mappings/leads.toml");

/// When a demo company's history happens: relative to the moment it is made,
/// so "in the last 30 days" finds its customers on any day. The same seed
/// with another "now" gives the same company shifted in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct History {
    /// Seconds since the Unix epoch of the earliest moment.
    start: i64,
}

impl History {
    /// The history of a company made at `now` (seconds since the Unix
    /// epoch), which counts as its hour, so a company made twice in the same
    /// hour is the same to the second.
    pub fn ending_before(now: i64) -> History {
        let hour = now - now.rem_euclid(3_600);
        History { start: hour - ((HISTORY_DAYS + FOLLOW_UP_DAYS) * 86_400) as i64 }
    }

    /// A history ending before the current time.
    pub fn until_now() -> History {
        History::ending_before(chrono::Utc::now().timestamp())
    }

    /// A moment in the history, in seconds.
    fn moment(self, random: &mut Random) -> i64 {
        self.start + random.below(HISTORY_DAYS * 86_400) as i64
    }
}

fn iso(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0).map(tandem_core::event::format_timestamp).unwrap_or_default()
}

/// The e-mail as one silo or another writes it: often lower-case, sometimes
/// capitalized or shouting.
fn email_variant(random: &mut Random, email: &str) -> String {
    match random.below(10) {
        0 => email.to_uppercase(),
        1 | 2 => {
            let mut chars = email.chars();
            chars.next().map(|first| first.to_uppercase().chain(chars).collect()).unwrap_or_default()
        }
        _ => email.to_owned(),
    }
}

/// A name with two letters swapped, as a hurried sales rep types it.
fn typo(name: &str) -> String {
    let mut chars: Vec<char> = name.chars().collect();
    if chars.len() > 2 {
        chars.swap(1, 2);
    }
    chars.into_iter().collect()
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Every so many customers, two neighbours in the list are a family sharing a tablet.
const FAMILY_EVERY: usize = 97;

/// The tablet customer `index` shares with a family member, if they do:
/// customers 5 and 6, 102 and 103, … when both have an account.
fn family_tablet(people: &[Person], index: usize) -> Option<String> {
    let first = match index % FAMILY_EVERY {
        5 => index,
        6 => index.checked_sub(1)?,
        _ => return None,
    };
    let both_have_accounts = people.get(first)?.user_id.is_some() && people.get(first + 1)?.user_id.is_some();
    both_have_accounts.then(|| format!("family-tablet-{first}"))
}

struct Person {
    first: &'static str,
    last: &'static str,
    email: String,
    user_id: Option<String>,
    twitter: Option<String>,
}

/// Collects tracking messages into batches per source.
#[derive(Default)]
struct Tracking {
    batches: Vec<(&'static str, Value)>,
    web: Vec<Value>,
    app: Vec<Value>,
    sent: u64,
}

impl Tracking {
    fn push(&mut self, source: &'static str, mut message: Value) {
        self.sent += 1;
        message["messageId"] = json!(format!("demo-{source}-{}", self.sent));
        let queue = if source == "website" { &mut self.web } else { &mut self.app };
        queue.push(message);
        if queue.len() == BATCH_MESSAGES {
            let full = std::mem::take(queue);
            self.batches.push((source, json!({"batch": full})));
        }
    }

    fn finish(mut self) -> Vec<(&'static str, Value)> {
        for (source, queue) in [("website", std::mem::take(&mut self.web)), ("app", std::mem::take(&mut self.app))] {
            if !queue.is_empty() {
                self.batches.push((source, json!({"batch": queue})));
            }
        }
        self.batches
    }
}

/// Builds a demo company of `customers` customers whose records fall in
/// `history`; the same seed gives the same company.
pub fn generate(seed: u64, customers: usize, history: History) -> Company {
    let mut random = Random::new(seed);
    let mut expected = Expected { customers: customers as u64, ..Expected::default() };
    let mut tracking = Tracking::default();
    let mut orders = String::from("order_id,customer_id,email,ordered_at,total,currency,items,coupon\n");
    let mut usage = String::new();
    let mut tickets =
        String::from("ticket_id,requester_id,requester_email,status,updated_at,subject,body,priority,channel,csat\n");
    let mut crm =
        String::from("contact_id,email,phone,first_name,last_name,company,stage,opted_in,updated_at,twitter\n");
    let mut leads = String::from("lead_id,email,phone,full_name,campaign,form,submitted_at\n");
    let mut webhooks: Vec<(&'static str, Value)> = Vec::new();
    let mut mentions: Vec<Value> = Vec::new();
    let mut family = None;
    let (mut order_number, mut usage_number, mut ticket_number, mut lead_number) = (0u64, 0u64, 0u64, 0u64);

    let people: Vec<Person> = (0..customers)
        .map(|index| {
            let first = random.pick(&FIRST_NAMES);
            let last = random.pick(&LAST_NAMES);
            let domain = random.pick(&DOMAINS);
            // The showcase customer (index 0) has every kind of record.
            let has_account = index == 0 || random.chance(85);
            let has_twitter = index == 0 || random.chance(25);
            Person {
                first,
                last,
                email: format!("{}.{}{index}@{domain}", first.to_lowercase(), last.to_lowercase()),
                user_id: has_account.then(|| format!("u{index:06}")),
                twitter: has_twitter.then(|| format!("{}{}{index}", first.to_lowercase(), last.to_lowercase())),
            }
        })
        .collect();

    for (index, person) in people.iter().enumerate() {
        let showcase = index == 0;
        // Web: anonymous browsing on one or two browsers, then login.
        let browsers = 1 + random.below(2);
        for browser in 0..browsers {
            let anonymous_id = format!("anon-{index}-{browser}");
            let mut time = history.moment(&mut random);
            for _ in 0..(2 + random.below(4)) {
                let (name, path) = random.pick(&PAGES);
                tracking.push(
                    "website",
                    json!({"type": "page", "anonymousId": anonymous_id, "name": name, "timestamp": iso(time),
                           "properties": {"path": path, "url": format!("https://shop.example{path}")}}),
                );
                time += 30 + random.below(300) as i64;
            }
            let identifies = match &person.user_id {
                Some(_) => showcase || browser == 0 || random.chance(70),
                None => random.chance(50),
            };
            if !identifies {
                expected.anonymous_visitors += 1;
                continue;
            }
            let mut identify = json!({"type": "identify", "anonymousId": anonymous_id, "timestamp": iso(time),
                "traits": {"email": email_variant(&mut random, &person.email), "first_name": person.first, "last_name": person.last}});
            if let Some(user_id) = &person.user_id {
                identify["userId"] = json!(user_id);
                time += 60;
                tracking.push("website", identify);
                tracking.push(
                    "website",
                    json!({"type": "track", "userId": user_id, "event": "Product Viewed", "timestamp": iso(time),
                           "properties": {"product_id": format!("sku-{:05}", random.below(500)), "price": 49 + random.below(150)}}),
                );
            } else {
                // A newsletter sign-up: known by e-mail only.
                tracking.push("website", identify);
            }
        }

        // App: logged-in users on their phone; a few families share a tablet.
        let mut device = None;
        if let Some(user_id) = &person.user_id {
            let family_tablet = family_tablet(&people, index);
            if showcase || family_tablet.is_some() || random.chance(50) {
                let device_id = family_tablet.unwrap_or_else(|| format!("phone-{index}"));
                if device_id.starts_with("family-") && family.is_none() && index % FAMILY_EVERY == 5 {
                    family = Some((user_id.clone(), people[index + 1].user_id.clone().unwrap_or_default()));
                }
                let mut time = history.moment(&mut random);
                for _ in 0..(1 + random.below(4)) {
                    tracking.push(
                        "app",
                        json!({"type": "screen", "userId": user_id, "name": random.pick(&["Home", "Orders", "Reports", "Settings"]),
                               "timestamp": iso(time), "context": {"device": {"id": device_id, "type": "ios"}}}),
                    );
                    time += 45 + random.below(600) as i64;
                }
                device = Some(device_id);
            }
        }

        // Orders, for customers with an account.
        if let Some(user_id) = &person.user_id {
            let count = if showcase { 3 } else { random.below(5) };
            for _ in 0..count {
                order_number += 1;
                let cents = 1_500 + random.below(30_000);
                let coupon = if random.chance(20) { "AUTUMN15" } else { "" };
                let _ = writeln!(
                    orders,
                    "o{order_number:07},{user_id},{},{},{}.{:02},EUR,{},{coupon}",
                    email_variant(&mut random, &person.email),
                    iso(history.moment(&mut random)),
                    cents / 100,
                    cents % 100,
                    1 + random.below(4),
                );
            }
        }

        // Product usage, for app users.
        if let (Some(user_id), Some(device_id)) = (&person.user_id, &device) {
            for _ in 0..random.below(6) {
                usage_number += 1;
                usage.push_str(
                    &json!({"usage_id": format!("pu-{usage_number}"),
                            "account": {"user_id": user_id, "plan": random.pick(&["free", "pro", "team"])},
                            "device": device_id, "feature": random.pick(&FEATURES),
                            "used_at": history.moment(&mut random), "duration_s": 5 + random.below(1_800)})
                    .to_string(),
                );
                usage.push('\n');
            }
        }

        // Support tickets, with free text; opened, most of them resolved.
        if showcase || random.chance(25) {
            ticket_number += 1;
            let (subject, body, answer) = random.pick(&TICKETS);
            let opened = history.moment(&mut random);
            let email = email_variant(&mut random, &person.email);
            let priority = random.pick(&["low", "normal", "high"]);
            let channel = random.pick(&["email", "chat", "phone"]);
            let row = |status: &str, at: i64, text: &str, csat: &str| {
                let time = chrono::DateTime::from_timestamp(at, 0).unwrap_or_default().format("%d/%m/%Y %H:%M");
                format!(
                    "t{ticket_number:06},zd{index},{email},{status},{time},{},{},{priority},{channel},{csat}\n",
                    csv_field(subject),
                    csv_field(text)
                )
            };
            tickets.push_str(&row("open", opened, body, ""));
            if showcase || random.chance(80) {
                let csat = (1 + random.below(5)).to_string();
                tickets.push_str(&row("resolved", opened + 3_600 + random.below(172_800) as i64, answer, &csat));
            }
        }

        // The CRM knows every customer: by CRM id, e-mail and phone, no user id.
        let first_name = if random.chance(3) { typo(person.first) } else { person.first.to_owned() };
        let stage = if person.user_id.is_some() { "customer" } else { random.pick(&["lead", "opportunity"]) };
        let phone = if showcase || random.chance(60) {
            // Unique per person: 7919 is prime, so i * 7919 mod 9,000,000 never repeats below it.
            format!("+49 30 {}", 1_000_000 + (index as u64 * 7_919) % 9_000_000)
        } else {
            String::new()
        };
        let _ = writeln!(
            crm,
            "c{index:06},{},{phone},{first_name},{},{},{stage},{},{},{}",
            email_variant(&mut random, &person.email),
            person.last,
            csv_field(random.pick(&COMPANIES)),
            if random.chance(60) { "yes" } else { "no" },
            &iso(history.moment(&mut random))[..10],
            person.twitter.as_deref().unwrap_or(""),
        );

        // Some customers came in through a lead form before they bought.
        if random.chance(10) {
            lead_number += 1;
            let _ = writeln!(
                leads,
                "l{lead_number:06},{},,{} {},{},landing-page,{}",
                email_variant(&mut random, &person.email),
                person.first,
                person.last,
                random.pick(&CAMPAIGNS),
                iso(history.moment(&mut random))
            );
        }

        // Mentions by customers whose handle the CRM knows.
        if let Some(handle) = &person.twitter {
            if showcase || random.chance(40) {
                mentions.push(json!({"platform": "twitter", "author": {"handle": format!("@{handle}"), "name": format!("{} {}", person.first, person.last)},
                    "text": random.pick(&MENTIONS), "url": format!("https://social.example/{handle}/{}", random.below(1_000_000)),
                    "time": iso(history.moment(&mut random))}));
            }
        }
    }

    // Prospects: people only lead forms know, half through the Facebook
    // webhook, half through the landing-page export; some are in the CRM too.
    for prospect in 0..customers / 10 {
        expected.prospects += 1;
        let first = random.pick(&FIRST_NAMES);
        let last = random.pick(&LAST_NAMES);
        let email =
            format!("{}.{}.prospect{prospect}@{}", first.to_lowercase(), last.to_lowercase(), random.pick(&DOMAINS));
        if random.chance(50) {
            webhooks.push((
                "facebook-leads",
                json!({"object": "page", "entry": [{"id": "page-1", "time": history.start, "changes": [{"field": "leadgen",
                    "value": {"leadgen_id": format!("fb-{prospect}"), "form_id": "autumn-form", "page_id": "page-1", "ad_id": format!("ad-{}", random.below(20)),
                              "created_time": history.moment(&mut random),
                              "field_data": [{"name": "email", "values": [email_variant(&mut random, &email)]},
                                             {"name": "full_name", "values": [format!("{first} {last}")]}]}}]}]}),
            ));
        } else {
            lead_number += 1;
            let _ = writeln!(
                leads,
                "l{lead_number:06},{},,{first} {last},{},demo-request,{}",
                email_variant(&mut random, &email),
                random.pick(&CAMPAIGNS),
                iso(history.moment(&mut random))
            );
        }
        if random.chance(40) {
            let _ = writeln!(
                crm,
                "p{prospect:06},{},,{first},{last},,lead,no,{},",
                email_variant(&mut random, &email),
                &iso(history.moment(&mut random))[..10]
            );
        }
    }

    // Strangers: handles nobody knows, some mentioning the brand twice.
    for stranger in 0..customers / 50 {
        expected.strangers += 1;
        for _ in 0..(1 + random.below(2)) {
            mentions.push(json!({"platform": "twitter", "author": {"handle": format!("@fan_{stranger}")},
                "text": random.pick(&MENTIONS), "url": format!("https://social.example/fan_{stranger}/{}", random.below(1_000_000)),
                "time": iso(history.moment(&mut random))}));
        }
    }
    for chunk in mentions.chunks(100) {
        webhooks.push(("social", json!({"mentions": chunk})));
    }

    let files = vec![
        SiloFile { source: "crm", file_name: "crm_contacts.csv", mapping: CRM_MAPPING, contents: crm },
        SiloFile { source: "orders", file_name: "orders.csv", mapping: ORDERS_MAPPING, contents: orders },
        SiloFile { source: "product", file_name: "product_usage.jsonl", mapping: USAGE_MAPPING, contents: usage },
        SiloFile { source: "helpdesk", file_name: "support_tickets.csv", mapping: TICKETS_MAPPING, contents: tickets },
        SiloFile { source: "leads", file_name: "leads.csv", mapping: LEADS_MAPPING, contents: leads },
    ];
    let first = &people[0];
    Company {
        tracking: tracking.finish(),
        files,
        webhooks,
        expected,
        showcase: Showcase { user_id: first.user_id.clone().unwrap_or_default(), email: first.email.clone() },
        family,
    }
}

/// The sources a demo company sends through, by name.
const SOURCES: [(&str, SourceKind); 8] = [
    ("website", SourceKind::Website),
    ("app", SourceKind::App),
    ("crm", SourceKind::Import),
    ("orders", SourceKind::Import),
    ("product", SourceKind::Import),
    ("helpdesk", SourceKind::Import),
    ("leads", SourceKind::Import),
    ("facebook-leads", SourceKind::Webhook),
];

/// What loading a company stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub tracked: u64,
    pub imported: u64,
    pub delivered: u64,
    pub rejected: u64,
}

/// Sends a company to a fresh store through the tracking API, the importers
/// and the webhooks. `files_dir` receives the silo exports.
pub async fn load(state: &AppState, company: &Company, files_dir: &Path) -> anyhow::Result<Loaded> {
    let store = state.store.clone();
    // The store's interfaces block; off the async worker (PostgreSQL's
    // client must not block one), which needs the multi-threaded runtime.
    let sources = tokio::task::block_in_place(|| -> anyhow::Result<_> {
        let mut sources = std::collections::HashMap::new();
        for (name, kind) in SOURCES.into_iter().chain([("social", SourceKind::Webhook)]) {
            sources.insert(name, store.create_source(name, kind)?);
        }
        let hook =
            |format| WebhookSettings { format, secret: None, verify_token: Some("tandem-demo".into()), mapping: None };
        store.set_webhook("facebook-leads", &hook(WebhookFormat::FacebookLeads))?;
        store.set_webhook("social", &hook(WebhookFormat::SocialMentions))?;
        Ok(sources)
    })?;
    let app = tandem_server::router(state.clone());
    let mut loaded = Loaded::default();

    for (source, body) in &company.tracking {
        let key = format!("{}:", sources[source].write_key);
        let request = Request::post("/v1/batch")
            .header(header::AUTHORIZATION, format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(key)))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))?;
        let response = app.clone().oneshot(request).await?;
        if response.status() != StatusCode::OK {
            bail!("the tracking API refused a demo batch: {}", response.status());
        }
        loaded.tracked += body["batch"].as_array().map_or(0, |batch| batch.len() as u64);
    }

    std::fs::create_dir_all(files_dir).with_context(|| format!("creating {}", files_dir.display()))?;
    for file in &company.files {
        let path = files_dir.join(file.file_name);
        std::fs::write(&path, &file.contents).with_context(|| format!("writing {}", path.display()))?;
        let source: Source = sources[file.source].clone();
        let mapping = Mapping::from_toml(file.mapping)?;
        let format = FileFormat::from_path(&path).context("demo files are csv or jsonl")?;
        let mut log = state.log.clone();
        let gate = tandem_server::govern::Gate::for_source(state, &source.id)
            .await
            .map_err(|error| anyhow::anyhow!("reading the governance settings failed: {}", error.message))?;
        let summary = tokio::task::spawn_blocking(move || {
            let request = ImportRequest {
                source: &source,
                mapping: &mapping,
                format,
                input: Box::new(std::fs::File::open(&path)?),
                reject_path: tandem_server::import::reject_path_beside(&path, format),
                gate: &gate,
            };
            anyhow::Ok(run_import(request, &mut log, &mut |_| {})?)
        })
        .await??;
        loaded.imported += summary.counts.imported;
        loaded.rejected += summary.counts.rejected;
    }

    for (source, body) in &company.webhooks {
        let request = Request::post(format!("/v1/webhooks/{}", sources[source].id))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))?;
        let response = app.clone().oneshot(request).await?;
        if response.status() != StatusCode::OK {
            bail!("a demo webhook was refused: {}", response.status());
        }
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await?;
        let answer: Value = serde_json::from_slice(&bytes)?;
        loaded.delivered += answer["stored"].as_u64().unwrap_or(0);
        loaded.rejected += answer["rejected"].as_array().map_or(0, |rejected| rejected.len() as u64);
    }
    Ok(loaded)
}

/// Whether a store already holds a demo company.
pub fn already_loaded(store: &Arc<dyn Store>) -> anyhow::Result<bool> {
    Ok(store.list_sources()?.iter().any(|source| source.name == "facebook-leads"))
}

/// Tells a newcomer what is in the demo and where to look.
/// The demo's computed trait and audiences, as a marketer would set them
/// up, in the rule language's text form. The audience stage of the running
/// server backfills them; defining them again (a second `tandem demo`) keeps
/// what is there.
pub const DEMO_COMPUTED_TRAITS: &[(&str, &str)] = &[("revenue 90d", r#"sum(revenue) of "Order Completed" within 90d"#)];

/// See [`DEMO_COMPUTED_TRAITS`].
pub const DEMO_AUDIENCES: &[(&str, &str)] = &[
    ("recent buyers", r#"performed "Order Completed" within 30d"#),
    ("high value", r#"computed "revenue 90d" >= 500"#),
    ("browsed, not bought", r#"performed "Product Viewed" within 7d and not performed "Order Completed" within 7d"#),
];

/// Defines [`DEMO_COMPUTED_TRAITS`] and [`DEMO_AUDIENCES`] unless they exist.
pub fn define_audiences(store: &dyn tandem_store::Store) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let existing: Vec<String> = store.list_computed_traits()?.into_iter().map(|record| record.name).collect();
    for (name, text) in DEMO_COMPUTED_TRAITS {
        if !existing.iter().any(|known| known == name) {
            let definition = tandem_core::audience::ComputedTraitDefinition::parse(text)?;
            tandem_server::audience::create_computed_trait(store, name, &definition, now)?;
        }
    }
    let existing: Vec<String> = store.list_audiences()?.into_iter().map(|record| record.definition.name).collect();
    for (name, text) in DEMO_AUDIENCES {
        if !existing.iter().any(|known| known == name) {
            let rule = tandem_core::audience::Condition::parse(text)?;
            tandem_server::audience::create_audience(store, name, rule, now)?;
        }
    }
    Ok(())
}

pub fn walkthrough(
    out: &mut impl std::io::Write,
    store: &dyn Store,
    company: &Company,
    address: std::net::SocketAddr,
    data_dir: &Path,
    tokens: &[living::RoleToken],
) -> anyhow::Result<()> {
    let token =
        tokens.iter().find(|token| token.role == tandem_core::govern::Role::Admin).map_or("", |token| &token.secret);
    let stats = store.stats()?;
    let base = format!("http://{address}");
    // Absolute, so the setting works from any directory in the user's other shell.
    let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    let expected = &company.expected;
    let showcase = &company.showcase;
    let profile = store
        .profile_by_identifier(&tandem_core::Identifier::new("user_id", showcase.user_id.clone()))?
        .map(|profile| profile.id.to_string())
        .unwrap_or_else(|| "prof_1".into());
    let website = store.source_by_name("website")?;
    writeln!(out)?;
    writeln!(out, "Tandem demo is running at {base}")?;
    writeln!(out)?;
    writeln!(out, "Every command below works on the demo's store once your shell says where it is:")?;
    writeln!(out, "  export TANDEM_DATA={}", data_dir.display())?;
    writeln!(out)?;
    writeln!(out, "What is in it")?;
    writeln!(
        out,
        "  {} events from {} sources became {} profiles (the generator made {}): {} customers, {} prospects,",
        stats.events,
        stats.sources.len(),
        stats.profiles,
        expected.profiles(),
        expected.customers,
        expected.prospects
    )?;
    writeln!(
        out,
        "  {} strangers mentioning the brand and {} browsers that never identified.",
        expected.strangers, expected.anonymous_visitors
    )?;
    for source in &stats.sources {
        writeln!(out, "    {:<16} {:>8} events", source.name, source.events)?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "One customer, seen by the website, the app, orders, product usage, the helpdesk, the CRM and Twitter"
    )?;
    writeln!(out, "  tandem profile show email:{}", showcase.email)?;
    writeln!(out, "  tandem profile explain user_id:{}      # why each identifier belongs", showcase.user_id)?;
    writeln!(out, "  curl -H 'Authorization: Bearer {token}' \\")?;
    writeln!(out, "       '{base}/api/v1/profiles/{profile}/events?limit=5'")?;
    if let Some((first, second)) = &company.family {
        writeln!(out)?;
        writeln!(out, "Two people sharing a family tablet stay two customers (user ids allow one per profile)")?;
        writeln!(out, "  tandem profile explain user_id:{first}")?;
        writeln!(out, "  tandem profile explain user_id:{second}")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "The silos' exports are in {}; importing one again stores nothing new:",
        data_dir.join("demo-files").display()
    )?;
    writeln!(
        out,
        "  tandem import {} --source orders --mapping examples/mappings/orders.toml",
        data_dir.join("demo-files/orders.csv").display()
    )?;
    writeln!(out)?;
    writeln!(out, "Audiences, kept current as events arrive (members leave on time when a window passes)")?;
    for (name, rule) in DEMO_AUDIENCES {
        writeln!(out, "  {name:<22} {rule}")?;
    }
    writeln!(out, "  tandem audience list")?;
    writeln!(out, "  tandem audience members \"recent buyers\"")?;
    writeln!(out, "  tandem audience preview --rule 'count(event \"Order Completed\", within 90d) >= 3'")?;
    writeln!(out)?;
    writeln!(out, "Goals marketing and IT share, on the console's first page")?;
    writeln!(out, "  tandem goal list")?;
    writeln!(out, "  tandem goal show Revenue")?;
    writeln!(
        out,
        "Destinations: the CRM (a receiver on this machine that fails now and then) and CSV files for the data lake"
    )?;
    writeln!(out, "  tandem destination list")?;
    writeln!(
        out,
        "  tandem deliveries failed --destination {}   # dead letters, replayable",
        living::WEBHOOK_DESTINATION
    )?;
    writeln!(out)?;
    writeln!(out, "Data quality and the stack")?;
    writeln!(
        out,
        "  tandem plan violations {}      # events that break the website's tracking plan",
        living::PLANNED_SOURCE
    )?;
    writeln!(out, "  tandem stack report                  # owners and costs; a quiz widget nobody registered")?;
    writeln!(out)?;
    writeln!(out, "Send an event of your own, as any Segment SDK would")?;
    writeln!(out, "  curl -u {}: {base}/v1/track -H 'Content-Type: application/json' \\", website.write_key)?;
    writeln!(out, "       -d '{{\"userId\":\"{}\",\"event\":\"Demo Explored\"}}'", showcase.user_id)?;
    writeln!(out, "  tandem stats")?;
    writeln!(out)?;
    writeln!(out, "The console: {base}/ (sign in with a token; each role sees what it may)")?;
    for token in tokens {
        writeln!(out, "  {:<9} {}  {}", token.role.as_str(), token.secret, living::what_it_sees(token.role))?;
    }
    writeln!(out, "Admin token for the API: {token}")?;
    writeln!(out, "Stop with Ctrl-C; run `tandem demo` again to serve the same company.")?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::Identifier;
    use tandem_server::resolve::{Resolver, DEFAULT_BATCH};

    /// 2026-11-23T21:30:00Z.
    const NOW: i64 = 1_795_469_400;

    fn tracked_messages(company: &Company) -> Vec<Value> {
        company.tracking.iter().flat_map(|(_, body)| body["batch"].as_array().unwrap().clone()).collect()
    }

    fn seconds(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp()
    }

    #[test]
    fn the_demo_audiences_parse_and_are_defined_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: std::sync::Arc<dyn tandem_store::Store> =
            std::sync::Arc::new(tandem_store::SqliteStore::open(dir.path()).unwrap());
        define_audiences(store.as_ref()).unwrap();
        define_audiences(store.as_ref()).unwrap();
        let names: Vec<String> =
            store.list_audiences().unwrap().into_iter().map(|record| record.definition.name).collect();
        assert_eq!(names.len(), DEMO_AUDIENCES.len(), "defined once: {names:?}");
        assert_eq!(store.list_computed_traits().unwrap().len(), DEMO_COMPUTED_TRAITS.len());
    }

    #[test]
    fn the_history_ends_before_now_and_reaches_into_the_last_days() {
        let company = generate(7, 200, History::ending_before(NOW));
        let times: Vec<i64> =
            tracked_messages(&company).iter().map(|message| seconds(message["timestamp"].as_str().unwrap())).collect();
        let (earliest, latest) = (*times.iter().min().unwrap(), *times.iter().max().unwrap());
        assert!(latest < NOW, "every event is in the past");
        assert!(latest > NOW - 5 * 86_400, "the history reaches the last days: {latest}");
        assert!(earliest >= NOW - 94 * 86_400, "90 days of history: {earliest}");
        let last_30_days = times.iter().filter(|time| **time > NOW - 30 * 86_400).count();
        assert!(last_30_days * 5 > times.len(), "about a third of events fall in the last 30 days");
    }

    #[test]
    fn the_same_seed_later_gives_the_same_company_shifted_in_time() {
        let shift = 10 * 86_400 + 3_600;
        let before = tracked_messages(&generate(7, 100, History::ending_before(NOW)));
        let after = tracked_messages(&generate(7, 100, History::ending_before(NOW + shift)));
        assert_eq!(before.len(), after.len());
        for (mut earlier, mut later) in before.into_iter().zip(after) {
            let earlier_time = seconds(earlier["timestamp"].as_str().unwrap());
            assert_eq!(seconds(later["timestamp"].as_str().unwrap()) - earlier_time, shift);
            earlier["timestamp"] = Value::Null;
            later["timestamp"] = Value::Null;
            assert_eq!(earlier, later);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_company() {
        let history = History::ending_before(NOW);
        let first = generate(7, 200, history);
        assert_eq!(first, generate(7, 200, history));
        assert_ne!(first.files, generate(8, 200, history).files);
        assert_eq!(first.expected.customers, 200);
        assert_eq!(first.expected.prospects, 20);
        assert!(first.expected.anonymous_visitors > 0);
        let crm = &first.files.iter().find(|file| file.source == "crm").unwrap().contents;
        assert_eq!(
            crm.lines().count() as u64,
            1 + 200 + crm.lines().filter(|line| line.starts_with('p')).count() as u64
        );
    }

    /// Every live profile as comparable text: keyed by its sorted
    /// identifiers (profile ids and source ids are each store's own), with
    /// its traits, groups, event counts and timeline (message ids and types,
    /// newest first; an imported row's id without its source's hash). Event times are left out: the tracking API stamps
    /// `receivedAt` at arrival, which differs between two loads.
    fn normalized_profiles(store: &dyn Store) -> std::collections::BTreeMap<Vec<String>, Value> {
        let mut dump = std::collections::BTreeMap::new();
        let mut after = None;
        loop {
            let page = store.list_profiles(after, 500).unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for profile in page {
                let mut identifiers: Vec<String> = profile
                    .identifiers
                    .iter()
                    .map(|identifier| format!("{}:{}", identifier.kind, identifier.value))
                    .collect();
                identifiers.sort();
                let timeline: Vec<String> = store
                    .profile_events(profile.id, None, 100_000)
                    .unwrap()
                    .iter()
                    .map(|entry| {
                        // An imported row's id names its source's id, which each store draws itself.
                        let id = entry.message_id.as_str();
                        let id = match id.strip_prefix("imp-").and_then(|rest| rest.get(17..)) {
                            Some(row) => format!("imp-{row}"),
                            None => id.to_owned(),
                        };
                        format!("{} {id}", entry.event_type.as_str())
                    })
                    .collect();
                let normalized = json!({
                    "traits": profile.traits,
                    "groups": profile.groups,
                    "event_counts": profile.event_counts,
                    "timeline": timeline,
                });
                assert!(dump.insert(identifiers, normalized).is_none(), "two profiles share their identifiers");
            }
        }
        dump
    }

    /// The same company through the embedded store and through PostgreSQL
    /// with the NATS JetStream event stream: identical profiles,
    /// identifiers and timelines. Needs the PostgreSQL test server and
    /// nats-server (see `tandem_server::stream::testing`).
    #[test]
    fn the_demo_company_resolves_the_same_embedded_and_through_postgres_and_nats() {
        let Some((_database, config)) = tandem_store::postgres::testing::TestDatabase::create() else { return };
        let nats = tandem_server::stream::testing::NatsServer::start();
        let company = generate(DEFAULT_SEED, 150, History::ending_before(NOW));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();

        let embedded: Arc<dyn Store> = Arc::new(tandem_store::SqliteStore::open(&dir.path().join("data")).unwrap());
        let (state, writer) =
            AppState::start(embedded.clone(), tandem_server::DEFAULT_DEDUP_WINDOW, dir.path().join("imports-a"));
        let loaded_embedded = runtime.block_on(load(&state, &company, &dir.path().join("files-a"))).unwrap();
        drop(state);
        writer.join().unwrap();
        Resolver::load(embedded.clone()).unwrap().catch_up(DEFAULT_BATCH).unwrap();

        let shared: Arc<dyn Store> = Arc::new(tandem_store::PostgresStore::connect_with(config, 8).unwrap());
        let options = tandem_server::stream::StreamOptions::parse(&nats.url()).unwrap();
        let stream = runtime.block_on(tandem_server::stream::EventStream::connect(&options)).unwrap();
        let pii = Arc::new(tandem_server::pii::PiiDirectory::new(shared.clone(), Default::default()).unwrap());
        let state = AppState::start_streaming(shared.clone(), stream.clone(), dir.path().join("imports-b"), pii);
        let loaded_shared = runtime.block_on(load(&state, &company, &dir.path().join("files-b"))).unwrap();
        assert_eq!(loaded_shared, loaded_embedded);
        let mut drain = tandem_server::drain::Drain::new(
            shared.clone(),
            stream,
            runtime.handle().clone(),
            tandem_server::DEFAULT_DEDUP_WINDOW,
            state.metrics.clone(),
        );
        drain.catch_up().unwrap();
        Resolver::load(shared.clone()).unwrap().catch_up(DEFAULT_BATCH).unwrap();

        assert_eq!(shared.stats().unwrap().events, embedded.stats().unwrap().events);
        let (embedded, shared) = (normalized_profiles(embedded.as_ref()), normalized_profiles(shared.as_ref()));
        assert_eq!(embedded.len() as u64, company.expected.profiles());
        assert_eq!(shared.len(), embedded.len());
        for (identifiers, profile) in &embedded {
            assert_eq!(shared.get(identifiers), Some(profile), "the profile of {identifiers:?} differs");
        }
    }

    /// Runs the whole pipeline on a small company and checks that the
    /// resolver rebuilds exactly the people the generator made.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn its_profiles_merge_as_intended() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(tandem_store::SqliteStore::open(&dir.path().join("data")).unwrap());
        let (state, writer) =
            AppState::start(store.clone(), tandem_server::DEFAULT_DEDUP_WINDOW, dir.path().join("imports"));
        let company = generate(DEFAULT_SEED, 300, History::until_now());
        let receiver = living::start_destinations(&store, dir.path()).await.unwrap();
        let loaded = load(&state, &company, &dir.path().join("files")).await.unwrap();
        living::furnish(&state, &company).await.unwrap();
        let violations_once = violation_count(store.as_ref());
        let shadow_once = store.shadow_traffic(10).unwrap();
        living::furnish(&state, &company).await.unwrap();
        assert_eq!(violation_count(store.as_ref()), violations_once, "a second run sends no more off-plan events");
        assert_eq!(store.shadow_traffic(10).unwrap(), shadow_once, "nor more requests of the unregistered tool");
        drop(state);
        tokio::task::spawn_blocking(move || writer.join().unwrap()).await.unwrap();
        assert_eq!(loaded.rejected, 0, "every generated record is valid");
        assert!(loaded.tracked > 1_000 && loaded.imported > 500 && loaded.delivered > 20, "{loaded:?}");
        assert!(already_loaded(&store).unwrap());

        Resolver::load(store.clone()).unwrap().catch_up(DEFAULT_BATCH).unwrap();
        let stats = store.stats().unwrap();
        assert_eq!(stats.profiles, company.expected.profiles(), "expected {:?}", company.expected);

        let showcase = &company.showcase;
        let profile =
            store.profile_by_identifier(&Identifier::new("user_id", showcase.user_id.clone())).unwrap().unwrap();
        let kinds: std::collections::BTreeSet<&str> =
            profile.identifiers.iter().map(|identifier| identifier.kind.as_str()).collect();
        for kind in ["user_id", "email", "anonymous_id", "device_id", "crm_id", "zendesk_id", "phone", "twitter_handle"]
        {
            assert!(kinds.contains(kind), "the showcase customer lacks {kind}: {kinds:?}");
        }
        let by_email = store.profile_by_identifier(&Identifier::new("email", showcase.email.clone())).unwrap().unwrap();
        assert_eq!(by_email.id, profile.id);

        let (first, second) = company.family.clone().expect("300 customers include a family sharing a tablet");
        let first = store.profile_by_identifier(&Identifier::new("user_id", first)).unwrap().unwrap();
        let second = store.profile_by_identifier(&Identifier::new("user_id", second)).unwrap().unwrap();
        assert_ne!(first.id, second.id, "a shared tablet does not merge two account holders");

        // What the console shows beyond the data: destinations with their receiver,
        assert_webhook_points_at(store.as_ref(), &receiver.url());
        let file = store.destination(living::FILE_DESTINATION).unwrap().expect("the file destination");
        assert_eq!(file.definition.destination.kind(), "file");
        assert_eq!(file.definition.audiences.len(), 2);
        // a tracking plan with events that break it,
        let (_, plan, violations) = tandem_server::govern::plan_report(store.as_ref(), "website", 50).unwrap();
        assert_eq!(plan.expect("the website's plan").plan.mode.to_string(), "report");
        let kinds: std::collections::BTreeSet<&str> = violations.iter().map(|found| found.kind.as_str()).collect();
        assert_eq!(kinds, ["invalid_event", "unplanned_event"].into(), "{violations:?}");
        assert!(violations_once >= 8, "{violations:?}");
        // an unregistered tool sending traffic,
        let [quiz] = shadow_once.as_slice() else { panic!("one unknown key: {shadow_once:?}") };
        assert!(quiz.requests >= 5 && living::SHADOW_WRITE_KEY.starts_with(quiz.key_hint.trim_end_matches('…')));
        assert_eq!(quiz.user_agents, [living::SHADOW_USER_AGENT]);
        assert_eq!(quiz.ips, ["127.0.0.1"]);
        // an owner, department, purpose and cost on every tool,
        let report = tandem_server::stack::stack_report(store.as_ref()).unwrap();
        assert_eq!(report.tools.len(), SOURCES.len() + 1 + 2, "every source and both destinations");
        for tool in &report.tools {
            let info = &tool.info;
            assert!(
                info.owner.is_some()
                    && info.department.is_some()
                    && info.purpose.is_some()
                    && info.annual_cost > Some(0.0),
                "{} has no complete entry: {info:?}",
                tool.name
            );
        }
        assert!(report.without_owner.is_empty() && report.total_annual_cost > 0.0);
        // and a token for every role, each printed with what it sees.
        let tokens = living::create_role_tokens(store.as_ref()).unwrap();
        let roles: Vec<_> = store.list_tokens().unwrap().into_iter().map(|token| token.role).collect();
        assert_eq!(roles.len(), tandem_core::govern::Role::ALL.len());
        for role in tandem_core::govern::Role::ALL {
            assert!(roles.contains(&role), "no {role} token: {roles:?}");
        }

        let mut text = Vec::new();
        walkthrough(&mut text, store.as_ref(), &company, "127.0.0.1:8080".parse().unwrap(), dir.path(), &tokens)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains(&format!("{} profiles", company.expected.profiles())), "{text}");
        assert!(text.contains(&format!("profile show email:{}", showcase.email)), "{text}");
        for token in &tokens {
            let line = format!("  {:<9} {}  {}", token.role.as_str(), token.secret, living::what_it_sees(token.role));
            assert!(text.contains(&line), "{line:?} missing from {text}");
        }
        assert!(text.contains(&format!("Admin token for the API: {}", tokens[0].secret)), "{text}");
        assert!(text.contains("deliveries failed --destination crm-sync"), "{text}");
    }

    fn violation_count(store: &dyn Store) -> u64 {
        let (_, _, violations) = tandem_server::govern::plan_report(store, "website", 50).unwrap();
        violations.iter().map(|found| found.count).sum()
    }

    fn assert_webhook_points_at(store: &dyn Store, url: &str) {
        let webhook = store.destination(living::WEBHOOK_DESTINATION).unwrap().expect("the webhook destination");
        match &webhook.definition.destination {
            tandem_core::activate::DestinationSettings::Webhook(settings) => assert_eq!(settings.url, url),
            other => panic!("not a webhook: {other:?}"),
        }
    }

    /// A second `tandem demo` finds its receiver's port again, or takes
    /// another and points the destination there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_crm_receiver_comes_back_on_its_port_or_the_destination_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(tandem_store::SqliteStore::open(&dir.path().join("data")).unwrap());
        let first = living::start_destinations(&store, dir.path()).await.unwrap();
        assert_webhook_points_at(store.as_ref(), &first.url());
        // The first receiver still holds its port: the destination moves.
        let second = living::start_destinations(&store, dir.path()).await.unwrap();
        assert_ne!(second.address, first.address);
        assert_webhook_points_at(store.as_ref(), &second.url());
        assert_eq!(store.list_destinations().unwrap().len(), 2, "the file destination is kept, not doubled");
        // Stopped, its port is free again: the next run listens there.
        let address = second.address;
        drop((first, second));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let third = living::start_destinations(&store, dir.path()).await.unwrap();
        assert_eq!(third.address, address);
        assert_webhook_points_at(store.as_ref(), &third.url());
    }
}
