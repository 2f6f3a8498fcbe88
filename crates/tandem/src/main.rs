//! The `tandem` command: runs the server and administers its store
//! (sources, the event log, quarantine, statistics) from the command line.
//! Every command works against the same store as a running server: the
//! embedded one in the data directory, or the PostgreSQL database `--store`
//! names, which several servers can share.

mod audience;
mod audit;
mod commands;
mod computed;
mod config;
mod demo;
mod destination;
mod dsr;
mod goal;
mod import;
mod pii;
mod plan;
mod stack;

use anyhow::Context;
use clap::{Parser, Subcommand};
use config::{Config, LogFormat, Settings};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use tandem_core::govern::stack::ToolKind;
use tandem_core::webhook::{WebhookFormat, WebhookSettings};
use tandem_core::SourceKind;
use tandem_store::{PostgresStore, SqliteStore, Store};

/// mimalloc instead of the system allocator: request handling, importing and
/// resolving allocate many small, short-lived values across threads, where
/// glibc's allocator spent a quarter of the import's mapping time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "tandem", version, about = "Tandem, the customer data platform marketing and IT run together")]
struct Cli {
    #[command(flatten)]
    config: Config,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server: tracking API, admin API, health and metrics
    Serve {
        #[command(flatten)]
        server: config::ServerArgs,
    },
    /// Manage sources, the channels events arrive through
    #[command(subcommand)]
    Source(SourceCommand),
    /// Read the event log
    #[command(subcommand)]
    Events(EventsCommand),
    /// Messages refused by validation, kept with their reason
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Admin API tokens: each has a role (admin, marketer, analyst, support, auditor)
    #[command(subcommand)]
    Token(TokenCommand),
    /// The tamper-evident audit log of administrative changes and PII reads
    #[command(subcommand)]
    Audit(AuditCommand),
    /// PII: the keys seen in events and their classes; the rules that classify them
    #[command(subcommand)]
    Pii(PiiCommand),
    /// Unified customer profiles
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Identity rules and repairs
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Audiences: profiles selected by a rule, kept current as events arrive and time passes
    #[command(subcommand)]
    Audience(AudienceCommand),
    /// Computed traits: a value per profile aggregated from its events, kept current like audiences
    #[command(subcommand)]
    Computed(ComputedCommand),
    /// Destinations: webhooks, files and PostgreSQL warehouses that receive events and audience
    /// changes, in order, at least once
    #[command(subcommand)]
    Destination(DestinationCommand),
    /// Failed deliveries (dead letters): list them, and replay them into their outbox
    #[command(subcommand)]
    Deliveries(DeliveriesCommand),
    /// Data subject requests: access, delete, suppress or unsuppress a person by an identifier
    #[command(subcommand)]
    Dsr(DsrCommand),
    /// The stack registry: every connected tool's owner, department, purpose and cost
    #[command(subcommand)]
    Stack(StackCommand),
    /// Tracking plans: the events a source may send and the JSON Schemas they must pass
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Goals marketing and IT share: a metric, a target, a period and an owner
    #[command(subcommand)]
    Goal(GoalCommand),
    /// Create a realistic synthetic company and serve it: web and app behaviour, orders, product
    /// usage, tickets, CRM contacts, leads and social mentions
    ///
    /// Its store is ./tandem-demo, not ./tandem-data, unless --data or TANDEM_DATA says otherwise.
    Demo {
        #[command(flatten)]
        server: config::ServerArgs,
        /// Customers the company has
        #[arg(long, default_value_t = demo::DEFAULT_CUSTOMERS)]
        customers: usize,
        /// The same seed gives the same company
        #[arg(long, default_value_t = demo::DEFAULT_SEED)]
        seed: u64,
        /// Serve the company without the trickle of live events (browsing, orders, events that
        /// break the tracking plan, an unregistered tool) it otherwise keeps sending
        #[arg(long)]
        no_live_traffic: bool,
    },
    /// Import a silo's export (CSV or JSON Lines, optionally gzipped) into the log
    Import {
        /// The file to import
        file: std::path::PathBuf,
        /// The source the rows belong to
        #[arg(long)]
        source: String,
        /// The mapping (TOML) that turns a row into an event
        #[arg(long)]
        mapping: std::path::PathBuf,
        /// csv or jsonl; by default the file name's extension decides
        #[arg(long)]
        format: Option<String>,
        /// Print the summary as one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Counts per source and per type, duplicates dropped, rejected, resolver position
    Stats {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Nodes sharing the store
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// The store's stages: each one's position and lag behind the log head, and whether a node runs it
    Status {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SourceCommand {
    /// Create a source and print its write key
    Create {
        /// The source's name, unique
        name: String,
        /// website, app, backend, import or webhook
        #[arg(long, default_value = "backend")]
        kind: SourceKind,
        /// The webhook payload it takes: generic, facebook_leads or social_mentions (makes it a webhook source)
        #[arg(long, visible_alias = "webhook", value_name = "FORMAT")]
        format: Option<WebhookFormat>,
        #[command(flatten)]
        webhook_settings: WebhookArgs,
        #[command(flatten)]
        registry: stack::RegistryArgs,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Set a source's stack-registry entry (owner, department, purpose, annual cost); what is not given stays
    Set {
        /// The source's name
        name: String,
        #[command(flatten)]
        registry: stack::RegistryArgs,
    },
    /// Change how a source takes webhooks; settings not given stay as they are
    Webhook {
        /// The source's name
        name: String,
        /// generic, facebook_leads or social_mentions (required the first time)
        #[arg(long, value_name = "FORMAT")]
        format: Option<WebhookFormat>,
        #[command(flatten)]
        settings: WebhookArgs,
        /// Accept unsigned deliveries again (removes the secret)
        #[arg(long, conflicts_with = "secret")]
        no_secret: bool,
        /// Remove the verify token
        #[arg(long, conflicts_with = "verify_token")]
        no_verify_token: bool,
    },
    /// List every source
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Give a source a new name; its id, write key and events stay
    Rename {
        /// The source's name now
        name: String,
        /// Its new name
        new_name: String,
    },
    /// Give a source a new write key; the old one stops working (on a running server within seconds)
    RotateKey {
        /// The source's name
        name: String,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Delete a source that has no events in the log; one with events is refused (rotate its key instead)
    Delete {
        /// The source's name
        name: String,
    },
}

/// A webhook source's secret, verify token and mapping.
#[derive(clap::Args, Debug, Default)]
struct WebhookArgs {
    /// Shared secret: deliveries must carry X-Hub-Signature-256 (HMAC-SHA256 of the body)
    #[arg(long)]
    secret: Option<String>,
    /// The verify token Facebook sends when subscribing the webhook
    #[arg(long)]
    verify_token: Option<String>,
    /// The mapping (TOML) of a generic webhook's payload
    #[arg(long, value_name = "FILE")]
    mapping: Option<std::path::PathBuf>,
}

/// Settings a user asked to remove from a webhook source.
#[derive(Debug, Default, Clone, Copy)]
struct WebhookRemovals {
    secret: bool,
    verify_token: bool,
}

impl WebhookArgs {
    fn is_empty(&self) -> bool {
        self.secret.is_none() && self.verify_token.is_none() && self.mapping.is_none()
    }

    fn read_mapping(&self) -> anyhow::Result<Option<tandem_core::mapping::Mapping>> {
        let Some(path) = &self.mapping else { return Ok(None) };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read the mapping {}", path.display()))?;
        let mapping = tandem_core::mapping::Mapping::from_toml(&text)
            .with_context(|| format!("mapping {} is not usable", path.display()))?;
        Ok(Some(mapping))
    }

    /// The settings after this change: what is given replaces, what is not
    /// given stays, so changing one setting never drops another (a secret
    /// above all: losing it would silently accept unsigned deliveries). A
    /// mapping only belongs to a generic webhook, so it goes when the format
    /// changes to another.
    fn apply(
        self,
        current: Option<WebhookSettings>,
        format: Option<WebhookFormat>,
        removals: WebhookRemovals,
    ) -> anyhow::Result<WebhookSettings> {
        let mapping = self.read_mapping()?;
        let mut settings = match (current, format) {
            (Some(current), format) => {
                let format = format.unwrap_or(current.format);
                current.with_format(format)
            }
            (None, Some(format)) => WebhookSettings { format, secret: None, verify_token: None, mapping: None },
            (None, None) => anyhow::bail!(
                "the source takes no webhooks yet: give --format (generic, facebook_leads or social_mentions)"
            ),
        };
        if let Some(secret) = self.secret {
            settings.secret = Some(secret);
        }
        if let Some(verify_token) = self.verify_token {
            settings.verify_token = Some(verify_token);
        }
        if mapping.is_some() {
            settings.mapping = mapping;
        }
        if removals.secret {
            settings.secret = None;
        }
        if removals.verify_token {
            settings.verify_token = None;
        }
        settings.validate().context("webhook settings are not usable")?;
        Ok(settings)
    }
}

trait WithFormat {
    fn with_format(self, format: WebhookFormat) -> Self;
}

impl WithFormat for WebhookSettings {
    fn with_format(mut self, format: WebhookFormat) -> Self {
        if format != self.format && format != WebhookFormat::Generic {
            self.mapping = None;
        }
        self.format = format;
        self
    }
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// Print events in log order (oldest first), or the newest first with --tail
    List {
        /// At most this many events
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// The newest events first
        #[arg(long, visible_alias = "newest-first")]
        tail: bool,
        /// Only events after this log position
        #[arg(long, value_name = "POS")]
        after: Option<u64>,
        /// Only events before this log position (to page back with --tail)
        #[arg(long, value_name = "POS")]
        before: Option<u64>,
        /// Only events of this source (its name)
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// Only events of this type: track, identify, page, screen, group or alias
        #[arg(long = "type", value_name = "TYPE")]
        event_type: Option<tandem_core::EventType>,
        /// Only events with this name (a track's event, a page's or screen's name)
        #[arg(long, value_name = "NAME")]
        event: Option<String>,
        /// Only events of this user (userId or anonymousId)
        #[arg(long, value_name = "ID")]
        user: Option<String>,
        /// Only events that happened at or after: RFC 3339, a date (2026-11-01) or a span ago (30d, 12h)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only events that happened before: RFC 3339, a date or a span ago
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// One JSON object per line, with every Segment field
        #[arg(long)]
        json: bool,
    },
    /// Print the events that belong to no profile (no usable identifier, or unreadable), with the reason
    Unresolved {
        /// At most this many events
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only events after this log position
        #[arg(long, value_name = "POS", default_value_t = 0)]
        after: u64,
        /// One JSON object per line: position, reason and the event
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token for the admin API (shown once)
    Create {
        /// A name to tell tokens apart
        #[arg(long, default_value = "admin")]
        name: String,
        /// What the token may do: admin, marketer, analyst, support or auditor
        #[arg(long, default_value = "admin")]
        role: tandem_core::govern::Role,
        /// When it stops working: a span from now (30d, 12h, 45m) or an RFC 3339 time; never by default
        #[arg(long)]
        expires: Option<String>,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// List tokens (ids, names, roles, expiry, last use; secrets are never shown again)
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id: its secret stops working (on a running server within seconds)
    Revoke {
        /// The token's id (tok_…), as `token list` shows it
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum PiiCommand {
    /// Every trait and property key seen, with its class (red, yellow, green), sources and last sighting
    Inventory {
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Set a rule (replacing the one with the same name or pattern): it decides before the rules
    /// of tandem.toml and the built-in classes; a running server applies it within 10 seconds
    Set {
        #[command(flatten)]
        matcher: PiiMatcherArgs,
        /// The class it gives: red (never stored in clear), yellow (masked for roles without PII
        /// access) or green
        #[arg(long)]
        class: tandem_core::govern::PiiClass,
        /// For a red rule: hash the value (the event is kept) or refuse the event (quarantined);
        /// without it, the `red_policy` of tandem.toml (hash by default)
        #[arg(long)]
        policy: Option<tandem_core::govern::pii::RedPolicy>,
    },
    /// Every rule in force, in the order they decide, and the built-in classes
    List {
        /// One JSON object
        #[arg(long)]
        json: bool,
    },
    /// Remove a rule set with `pii set`
    Remove {
        #[command(flatten)]
        matcher: PiiMatcherArgs,
    },
}

/// What a PII rule matches: one of an exact key and a regular expression.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct PiiMatcherArgs {
    /// An exact trait or property key (compared without case)
    #[arg(long)]
    name: Option<String>,
    /// A regular expression keys are matched against
    #[arg(long)]
    pattern: Option<String>,
}

impl PiiMatcherArgs {
    fn matcher(&self) -> anyhow::Result<tandem_core::govern::pii::PiiMatcher> {
        Ok(tandem_core::govern::pii::PiiMatcher::from_parts(self.name.as_deref(), self.pattern.as_deref())?)
    }

    /// How the audit log names the rule (its matcher, as stored).
    fn target(&self) -> String {
        match self.matcher() {
            Ok(matcher) => tandem_server::pii::rule_target(&matcher),
            Err(_) => format!("{:?}{:?}", self.name, self.pattern),
        }
    }
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// List entries, oldest first
    List {
        /// Only entries by this actor (a token id, or cli)
        #[arg(long)]
        actor: Option<String>,
        /// Only this action (audience.create) or area (audience)
        #[arg(long)]
        action: Option<String>,
        /// Only entries since: RFC 3339, a date, or a span ago (30d, 12h)
        #[arg(long)]
        since: Option<String>,
        /// At most this many entries
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Check the hash chain: says it is intact, or names the first broken entry (and exits 1)
    Verify,
}

#[derive(Subcommand, Debug)]
enum DsrCommand {
    /// Print everything kept about the person holding TYPE:VALUE, as JSON
    Access {
        /// The identifier, as TYPE:VALUE (email:ann@example.com)
        identifier: String,
    },
    /// Erase the person holding TYPE:VALUE from every table (and, with --log, their messages from the event stream)
    Delete {
        /// The identifier, as TYPE:VALUE
        identifier: String,
    },
    /// Refuse future events carrying TYPE:VALUE (quarantined as suppressed, keeping only a digest)
    Suppress {
        /// The identifier, as TYPE:VALUE
        identifier: String,
    },
    /// Accept events carrying TYPE:VALUE again
    Unsuppress {
        /// The identifier, as TYPE:VALUE
        identifier: String,
    },
    /// List requests, newest first, with their status
    List {
        /// Requests to print
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PlanCommand {
    /// Set a source's tracking plan from a JSON file: {"mode", "events", "identify", "common"}
    Set {
        /// The source's name
        source: String,
        /// The plan document
        file: std::path::PathBuf,
    },
    /// Show a source's tracking plan
    Show {
        /// The source's name
        source: String,
    },
    /// List a source's plan violations, most recently seen first, with the path at fault
    Violations {
        /// The source's name
        source: String,
        /// Violations to print
        #[arg(long, default_value_t = plan::DEFAULT_VIOLATIONS)]
        limit: usize,
        /// Print a JSON array with sample payloads
        #[arg(long)]
        json: bool,
    },
    /// Delete a source's tracking plan; its events are no longer checked
    Delete {
        /// The source's name
        source: String,
    },
}

#[derive(Subcommand, Debug)]
enum DestinationCommand {
    /// Create a destination from its JSON definition (inline, or @FILE)
    Create {
        /// The definition: {"name", "destination": {"kind": "webhook"|"file"|"warehouse", …}, "events", "retry"}
        definition: String,
    },
    /// List destinations with their delivered, pending, retrying and dead counts
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Show a destination's definition and counts (a webhook's secret is not shown)
    Show {
        /// The destination's name
        name: String,
    },
    /// Send one sample item to a destination now (not through its outbox) and show what the
    /// receiver answered
    Test {
        /// The destination's name
        name: String,
        /// Print the outcome as JSON
        #[arg(long)]
        json: bool,
    },
    /// List a destination's dead letters (same as `deliveries failed --destination NAME`)
    DeadLetters {
        /// The destination's name
        name: String,
        /// Dead letters to print
        #[arg(long, default_value_t = destination::DEFAULT_DEAD_LETTER_PAGE)]
        limit: usize,
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Stop sending to a destination; its items keep being enqueued, in order
    Pause {
        /// The destination's name
        name: String,
    },
    /// Send what a paused destination kept, in order, and go on
    Resume {
        /// The destination's name
        name: String,
    },
    /// Put a destination's dead letters back in its outbox (same as `deliveries replay
    /// --destination NAME`)
    Replay {
        /// The destination's name
        name: String,
    },
    /// Delete a destination with its outbox and dead letters
    Delete {
        /// The destination's name
        name: String,
    },
    /// Set a destination's stack-registry entry (owner, department, purpose, annual cost); what is not given stays
    Set {
        /// The destination's name
        name: String,
        #[command(flatten)]
        registry: stack::RegistryArgs,
    },
}

#[derive(Subcommand, Debug)]
enum GoalCommand {
    /// Create a goal; its past is counted at once
    Create(Box<goal::GoalFlags>),
    /// List goals with their value, target, status and progress through their period
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Show a goal with its trend: one line per day of its period so far
    Show {
        /// The goal's name
        name: String,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Delete a goal
    Delete {
        /// The goal's name
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum StackCommand {
    /// Spend by department, tools without an owner, and traffic with unknown or revoked write keys
    Report {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DeliveriesCommand {
    /// List failed deliveries (dead letters), oldest first, with their last error
    Failed {
        /// Only this destination's
        #[arg(long)]
        destination: Option<String>,
        /// Only those that failed at or after this time: RFC 3339, or back from now (2h, 7d)
        #[arg(long)]
        since: Option<String>,
        /// Only those about this profile (prof_…)
        #[arg(long)]
        profile: Option<String>,
        /// At most this many
        #[arg(long, default_value_t = destination::DEFAULT_DEAD_LETTER_PAGE)]
        limit: usize,
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Put failed deliveries back in their destination's outbox, at their places in the order
    Replay {
        /// The destination whose failed deliveries are replayed
        #[arg(long)]
        destination: String,
        /// Only those that failed at or after this time: RFC 3339, or back from now (2h, 7d)
        #[arg(long)]
        since: Option<String>,
        /// Only those about this profile (prof_…)
        #[arg(long)]
        profile: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum AudienceCommand {
    /// Create an audience from a rule; profiles already there are evaluated at once
    Create {
        /// A unique name
        name: String,
        /// The rule, in the text syntax (or the JSON tree)
        #[arg(long)]
        rule: String,
    },
    /// How many profiles a rule selects now, and some of them; nothing is saved
    Preview {
        /// The rule, in the text syntax (or the JSON tree)
        #[arg(long)]
        rule: String,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// List audiences with their sizes
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Show an audience's rule (text and JSON) and size
    Show {
        /// The audience's name
        name: String,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// List an audience's members by profile id, with when each entered
    Members {
        /// The audience's name
        name: String,
        /// Members per page
        #[arg(long, default_value_t = audience::DEFAULT_MEMBER_PAGE)]
        limit: usize,
        /// Continue after this profile (the `more: --after …` a previous page printed)
        #[arg(long, value_name = "PROFILE")]
        after: Option<String>,
        /// Print one JSON object: the members and next_after
        #[arg(long)]
        json: bool,
    },
    /// Delete an audience with its memberships
    Delete {
        /// The audience's name
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum ComputedCommand {
    /// Create a computed trait; profiles already there are computed at once
    Create {
        /// A unique name (audience rules test it as `computed NAME …`)
        name: String,
        /// The definition, in the text syntax (or the JSON object)
        #[arg(long)]
        definition: String,
    },
    /// List computed traits with their definitions and backfill progress
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Show a computed trait's definition (text and JSON) and backfill progress
    Show {
        /// The computed trait's name
        name: String,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Delete a computed trait with its values
    Delete {
        /// The computed trait's name
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum ProfileCommand {
    /// List profiles by id, or search them by identifier prefix and by trait
    List {
        /// Profiles per page
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue after this cursor (the `more: --after …` a previous page printed)
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
        /// Only profiles holding an identifier of this type starting so, as TYPE:PREFIX (email:ann)
        #[arg(long, value_name = "TYPE:PREFIX")]
        search: Option<String>,
        /// Only profiles whose trait has this value, as NAME=VALUE (repeatable; text ignores case)
        #[arg(long = "trait", value_name = "NAME=VALUE")]
        traits: Vec<String>,
        /// Print one JSON object: the profiles and next_after
        #[arg(long)]
        json: bool,
        /// Show what this role sees: PII masked unless it is admin or support
        #[arg(long)]
        role: Option<tandem_core::govern::Role>,
    },
    /// Show a profile by id (prof_N) or by any identifier (type:value)
    Show {
        /// A profile id (prof_N) or an identifier as TYPE:VALUE (email:ann@example.com)
        target: String,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
        /// Show what this role sees: PII masked unless it is admin or support
        #[arg(long)]
        role: Option<tandem_core::govern::Role>,
    },
    /// Explain why each identifier is on a profile and why profiles were merged
    Explain {
        /// A profile id (prof_N) or an identifier as TYPE:VALUE; an identifier also gets the reason it is there
        target: String,
        /// Print one JSON object: the profile, the asked identifier's reason and the whole history
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum IdentityCommand {
    /// Show the identity rules, or change them (changes apply to events resolved from now on)
    Rules {
        #[command(flatten)]
        change: commands::RulesChange,
        /// Print the rules as one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Remove an identifier from a profile and rebuild the profiles as if it had never linked anything
    Unlink {
        /// The profile id (prof_N)
        profile: String,
        /// The identifier to take off it, as TYPE:VALUE
        identifier: String,
    },
    /// Never use an identifier again, and rebuild the profiles it linked
    Block {
        /// The identifier, as TYPE:VALUE
        identifier: String,
    },
    /// Let a blocked identifier match again, for events resolved from now on
    Unblock {
        /// The identifier, as TYPE:VALUE
        identifier: String,
    },
}

#[derive(Subcommand, Debug)]
enum QuarantineCommand {
    /// Print quarantined messages oldest first
    List {
        /// At most this many messages
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", describe_error(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: library errors often include
/// their source in their own message, and repeating it after a colon
/// doubles it ("address in use: address in use").
fn describe_error(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Whether a command may create the store when its directory has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Reads or changes what is there: a directory without a store is a
    /// mistake (a mistyped `--data`, another directory than the server's),
    /// refused rather than answered from a new empty store.
    Existing,
    /// Adds the first things to a store (a source, a token, rules) and
    /// creates it when missing, saying so.
    CreateIfMissing,
}

/// Opens the store the settings name, as `access` allows: the PostgreSQL
/// database of `--store`, or else the embedded store in the data directory.
fn open_store(settings: &Settings, access: Access) -> anyhow::Result<Arc<dyn Store>> {
    match &settings.store {
        Some(url) => Ok(Arc::new(connect_postgres(url)?)),
        None => Ok(Arc::new(open_sqlite(&settings.data_dir, access)?)),
    }
}

/// Connects to the PostgreSQL store (creating or upgrading its schema); the
/// error names the URL without its password.
fn connect_postgres(url: &config::StoreUrl) -> anyhow::Result<PostgresStore> {
    PostgresStore::connect(url.secret()).map_err(|error| {
        let cause = config::redact(&error_chain(&error));
        anyhow::anyhow!("cannot open the PostgreSQL store at {url}: {cause}")
    })
}

/// An error with its sources, as one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// Opens the embedded store in `data_dir` as `access` allows.
fn open_sqlite(data_dir: &Path, access: Access) -> anyhow::Result<SqliteStore> {
    let exists = SqliteStore::exists(data_dir);
    if !exists && access == Access::Existing {
        anyhow::bail!("{}", missing_store(data_dir));
    }
    let store = SqliteStore::open(data_dir).with_context(|| format!("opening the store in {}", data_dir.display()))?;
    if !exists {
        eprintln!("created a new store in {}{}", data_dir.display(), demo_hint(data_dir));
    }
    Ok(store)
}

fn missing_store(data_dir: &Path) -> String {
    format!(
        "no Tandem store in {} (create one with `tandem source create NAME`, or pass --data DIR / set TANDEM_DATA to the server's){}",
        data_dir.display(),
        demo_hint(data_dir)
    )
}

/// Points at the demo's store when it exists and is not the directory in use:
/// the commands the README teaches first run against the default directory
/// while a demo serves its own.
fn demo_hint(data_dir: &Path) -> String {
    let demo_dir = Path::new(demo::DEFAULT_DATA_DIR);
    if data_dir != demo_dir && SqliteStore::exists(demo_dir) {
        format!(
            "; the demo's store is {0}: add --data {0} or `export TANDEM_DATA={0}` to work on it",
            demo_dir.display()
        )
    } else {
        String::new()
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = match &cli.command {
        Command::Serve { server } | Command::Demo { server, .. } => cli.config.with_server(server.clone()),
        _ => cli.config,
    };
    let settings = config.resolve()?;
    init_logging(settings.log_format);
    let open = |access: Access| open_store(&settings, access);
    let mut out = std::io::stdout().lock();
    let change = audited_change(&cli.command);
    let result = dispatch(cli.command, &settings, &open, &mut out);
    if let (Ok(()), Some((action, target, after))) = (&result, change) {
        audit::record(&*open(Access::Existing)?, action, &target, after)
            .context("the change was made but recording it in the audit log failed")?;
    }
    result
}

/// The audit entry a changing command leaves once it succeeds: action,
/// target and what was asked for. Read-only commands leave none.
fn audited_change(command: &Command) -> Option<(&'static str, String, Option<serde_json::Value>)> {
    use serde_json::json;
    Some(match command {
        Command::Source(SourceCommand::Create { name, kind, format, .. }) => (
            "source.create",
            name.trim().to_owned(),
            Some(json!({"kind": kind.to_string(), "webhook": format.is_some()})),
        ),
        Command::Source(SourceCommand::Webhook { name, format, .. }) => {
            ("source.webhook", name.trim().to_owned(), Some(json!({"format": format.map(|format| format.to_string())})))
        }
        Command::Source(SourceCommand::Rename { name, new_name }) => {
            ("source.rename", name.trim().to_owned(), Some(json!({"name": new_name.trim()})))
        }
        Command::Source(SourceCommand::RotateKey { name, .. }) => ("source.rotate_key", name.trim().to_owned(), None),
        Command::Source(SourceCommand::Delete { name }) => ("source.delete", name.trim().to_owned(), None),
        Command::Token(TokenCommand::Create { name, role, expires, .. }) => {
            ("token.create", name.trim().to_owned(), Some(json!({"role": role.as_str(), "expires": expires})))
        }
        Command::Token(TokenCommand::Revoke { id }) => ("token.revoke", id.trim().to_owned(), None),
        Command::Identity(IdentityCommand::Rules { change, .. }) if !change.is_empty() => {
            ("identity.rules", "identity rules".to_owned(), Some(json!({"change": format!("{change:?}")})))
        }
        Command::Identity(IdentityCommand::Unlink { profile, identifier }) => (
            "identity.unlink",
            profile.trim().to_owned(),
            Some(json!({"identifier": audit::identifier_target(identifier)})),
        ),
        Command::Identity(IdentityCommand::Block { identifier }) => {
            ("identity.block", audit::identifier_target(identifier), None)
        }
        Command::Identity(IdentityCommand::Unblock { identifier }) => {
            ("identity.unblock", audit::identifier_target(identifier), None)
        }
        Command::Audience(AudienceCommand::Create { name, rule }) => {
            ("audience.create", name.trim().to_owned(), Some(json!({"rule": rule})))
        }
        Command::Audience(AudienceCommand::Delete { name }) => ("audience.delete", name.trim().to_owned(), None),
        Command::Computed(ComputedCommand::Create { name, definition }) => {
            ("computed_trait.create", name.trim().to_owned(), Some(json!({"definition": definition})))
        }
        Command::Computed(ComputedCommand::Delete { name }) => ("computed_trait.delete", name.trim().to_owned(), None),
        Command::Destination(DestinationCommand::Create { definition }) => {
            let parsed: Option<serde_json::Value> = serde_json::from_str(definition).ok();
            let name = parsed.as_ref().and_then(|value| value["name"].as_str()).unwrap_or("").to_owned();
            ("destination.create", name, parsed.or_else(|| Some(json!({"definition_file": definition}))))
        }
        Command::Destination(DestinationCommand::Delete { name }) => {
            ("destination.delete", name.trim().to_owned(), None)
        }
        Command::Destination(DestinationCommand::Pause { name }) => ("destination.pause", name.trim().to_owned(), None),
        Command::Destination(DestinationCommand::Resume { name }) => {
            ("destination.resume", name.trim().to_owned(), None)
        }
        Command::Destination(DestinationCommand::Replay { name }) => {
            ("destination.replay", name.trim().to_owned(), None)
        }
        Command::Deliveries(DeliveriesCommand::Replay { destination, since, profile }) => {
            ("destination.replay", destination.trim().to_owned(), Some(json!({"since": since, "profile": profile})))
        }
        Command::Source(SourceCommand::Set { name, registry }) => {
            ("stack.set_source", name.trim().to_owned(), Some(json!({"registry": format!("{registry:?}")})))
        }
        Command::Destination(DestinationCommand::Set { name, registry }) => {
            ("stack.set_destination", name.trim().to_owned(), Some(json!({"registry": format!("{registry:?}")})))
        }
        Command::Plan(PlanCommand::Set { source, file }) => {
            ("plan.set", source.trim().to_owned(), Some(json!({"file": file.display().to_string()})))
        }
        Command::Plan(PlanCommand::Delete { source }) => ("plan.delete", source.trim().to_owned(), None),
        Command::Pii(PiiCommand::Set { matcher, class, policy }) => (
            "pii.rule_set",
            matcher.target(),
            Some(json!({"class": class.as_str(), "policy": policy.map(|policy| policy.as_str())})),
        ),
        Command::Pii(PiiCommand::Remove { matcher }) => ("pii.rule_remove", matcher.target(), None),
        Command::Goal(GoalCommand::Create(flags)) => {
            ("goal.create", flags.name.trim().to_owned(), Some(json!({"target": flags.target, "metric": flags.metric})))
        }
        Command::Goal(GoalCommand::Delete { name }) => ("goal.delete", name.trim().to_owned(), None),
        // The person is named only by the identifier's digest.
        Command::Dsr(DsrCommand::Access { identifier }) => ("dsr.access", audit::identifier_target(identifier), None),
        Command::Dsr(DsrCommand::Delete { identifier }) => ("dsr.delete", audit::identifier_target(identifier), None),
        Command::Dsr(DsrCommand::Suppress { identifier }) => {
            ("dsr.suppress", audit::identifier_target(identifier), None)
        }
        Command::Dsr(DsrCommand::Unsuppress { identifier }) => {
            ("dsr.unsuppress", audit::identifier_target(identifier), None)
        }
        _ => return None,
    })
}

fn dispatch(
    command: Command,
    settings: &Settings,
    open: &dyn Fn(Access) -> anyhow::Result<Arc<dyn Store>>,
    out: &mut std::io::StdoutLock<'static>,
) -> anyhow::Result<()> {
    let mut out = out;
    match command {
        Command::Audit(AuditCommand::List { actor, action, since, limit, json }) => {
            let since_ms = since.map(|text| commands::parse_time(&text, chrono::Utc::now())).transpose()?;
            let filter =
                tandem_store::AuditFilter { actor, action, since_ms, after_seq: 0, limit, ..Default::default() };
            audit::list(&*open(Access::Existing)?, filter, json, &mut out)
        }
        Command::Audit(AuditCommand::Verify) => audit::verify(&*open(Access::Existing)?, &mut out),
        Command::Pii(PiiCommand::Inventory { json }) => {
            pii::inventory(&*open(Access::Existing)?, &settings.pii, json, &mut out)
        }
        Command::Pii(PiiCommand::Set { matcher, class, policy }) => {
            let rule = pii::rule_from_args(matcher.name, matcher.pattern, class, policy);
            pii::set(&*open(Access::Existing)?, &rule, &mut out)
        }
        Command::Pii(PiiCommand::List { json }) => pii::list(&*open(Access::Existing)?, &settings.pii, json, &mut out),
        Command::Pii(PiiCommand::Remove { matcher }) => {
            pii::remove(&*open(Access::Existing)?, &matcher.matcher()?, &mut out)
        }
        Command::Serve { .. } => serve(settings, open(Access::CreateIfMissing)?),
        Command::Demo { customers, seed, no_live_traffic, .. } => {
            let mut settings = Settings::clone(settings);
            if settings.data_dir == Path::new(config::DEFAULT_DATA_DIR) {
                settings.data_dir = std::path::PathBuf::from(demo::DEFAULT_DATA_DIR);
            }
            let store: Arc<dyn Store> = match &settings.store {
                Some(url) => Arc::new(connect_postgres(url)?),
                None => Arc::new(
                    SqliteStore::open(&settings.data_dir)
                        .with_context(|| format!("opening the store in {}", settings.data_dir.display()))?,
                ),
            };
            run_demo(&settings, store, customers, seed, !no_live_traffic)
        }
        Command::Source(SourceCommand::Set { name, registry }) => {
            stack::set(&*open(Access::Existing)?, ToolKind::Source, &name, &registry, &mut out)
        }
        Command::Destination(DestinationCommand::Set { name, registry }) => {
            stack::set(&*open(Access::Existing)?, ToolKind::Destination, &name, &registry, &mut out)
        }
        Command::Stack(StackCommand::Report { json }) => stack::report(open(Access::Existing)?, json, &mut out),
        Command::Source(SourceCommand::Create { name, kind, format, webhook_settings, registry, json }) => {
            let webhook = match format {
                Some(format) => Some(webhook_settings.apply(None, Some(format), WebhookRemovals::default())?),
                None if kind == SourceKind::Webhook => {
                    anyhow::bail!("a webhook source needs --format FORMAT (generic, facebook_leads or social_mentions)")
                }
                None if !webhook_settings.is_empty() => {
                    anyhow::bail!(
                        "--secret, --verify-token and --mapping belong to a webhook source: add --format FORMAT"
                    )
                }
                None => None,
            };
            let kind = if webhook.is_some() { SourceKind::Webhook } else { kind };
            let store = open(Access::CreateIfMissing)?;
            commands::create_source(&*store, &name, kind, webhook.as_ref(), json, &mut out)?;
            if !registry.is_empty() {
                let mut quiet = Vec::new();
                stack::set(&*store, ToolKind::Source, name.trim(), &registry, &mut quiet)?;
                if !json {
                    out.write_all(&quiet)?;
                }
            }
            Ok(())
        }
        Command::Source(SourceCommand::Webhook { name, format, settings, no_secret, no_verify_token }) => {
            let store = open(Access::Existing)?;
            let source = store.source_by_name(&name)?;
            let current = store.webhook(&source.id)?.map(|(_, settings)| settings);
            let removals = WebhookRemovals { secret: no_secret, verify_token: no_verify_token };
            commands::set_webhook(&*store, &name, &settings.apply(current, format, removals)?, &mut out)
        }
        Command::Source(SourceCommand::List { json }) => {
            commands::list_sources(&*open(Access::Existing)?, json, &mut out)
        }
        Command::Events(EventsCommand::List {
            limit,
            tail,
            after,
            before,
            source,
            event_type,
            event,
            user,
            since,
            until,
            json,
        }) => {
            let now = chrono::Utc::now();
            let time = |text: Option<String>| text.map(|text| commands::parse_time(&text, now)).transpose();
            let filter = tandem_store::LogFilter {
                source_id: None,
                event_type,
                since_ms: time(since)?,
                until_ms: time(until)?,
                after: after.map(tandem_core::LogPosition),
                before: before.map(tandem_core::LogPosition),
                newest_first: tail,
            };
            let query = tandem_store::browse::EventQuery { filter, event_name: event, user };
            let listing = commands::EventListing { query, source, limit, as_json: json };
            commands::list_events(&*open(Access::Existing)?, listing, &mut out)
        }
        Command::Events(EventsCommand::Unresolved { limit, after, json }) => {
            commands::list_unresolved(open(Access::Existing)?, tandem_core::LogPosition(after), limit, json, &mut out)
        }
        Command::Profile(ProfileCommand::List { limit, after, search, traits, json, role }) => {
            let mut listing = commands::profile_listing(limit, after, search, &traits, json)?;
            let store = open(Access::Existing)?;
            listing.mask = commands::masking_for(role, &*store, &settings.pii)?;
            commands::list_profiles(store, listing, &mut out)
        }
        Command::Token(TokenCommand::List { json }) => commands::list_tokens(&*open(Access::Existing)?, json, &mut out),
        Command::Token(TokenCommand::Revoke { id }) => commands::revoke_token(&*open(Access::Existing)?, &id, &mut out),
        Command::Source(SourceCommand::Rename { name, new_name }) => {
            let source = open(Access::Existing)?.rename_source(&name, &new_name)?;
            writeln!(
                out,
                "source {:?} is now {:?} (id {}, same write key and events)",
                name.trim(),
                source.name,
                source.id
            )?;
            Ok(())
        }
        Command::Source(SourceCommand::RotateKey { name, json }) => {
            commands::rotate_key(&*open(Access::Existing)?, &name, json, &mut out)
        }
        Command::Source(SourceCommand::Delete { name }) => {
            let source = open(Access::Existing)?.delete_source(&name)?;
            writeln!(out, "deleted source {:?} ({}); it had no events", source.name, source.id)?;
            Ok(())
        }
        Command::Identity(IdentityCommand::Unblock { identifier }) => {
            commands::unblock(&*open(Access::Existing)?, &identifier, &mut out)
        }
        Command::Quarantine(QuarantineCommand::List { limit, json }) => {
            commands::list_quarantine(&*open(Access::Existing)?, limit, json, &mut out)
        }
        Command::Import { file, source, mapping, format, json } => {
            let args = import::ImportArgs {
                pii: &settings.pii,
                file: &file,
                source: &source,
                mapping: &mapping,
                format: format.as_deref(),
                as_json: json,
                log: settings.log.as_ref(),
            };
            import::import(&*open(Access::Existing)?, args, &mut out)
        }
        Command::Stats { json } => commands::stats(&*open(Access::Existing)?, json, &mut out),
        Command::Cluster(ClusterCommand::Status { json }) => {
            let stream = match &settings.log {
                Some(log) => Some(stream_position(log)?),
                None => None,
            };
            commands::cluster_status(&*open(Access::Existing)?, stream, json, &mut out)
        }
        Command::Token(TokenCommand::Create { name, role, expires, json }) => {
            let expires_at_ms = expires.map(|text| commands::parse_expiry(&text, chrono::Utc::now())).transpose()?;
            commands::create_token(&*open(Access::CreateIfMissing)?, &name, role, expires_at_ms, json, &mut out)
        }
        Command::Profile(ProfileCommand::Show { target, json, role }) => {
            let store = open(Access::Existing)?;
            let mask = commands::masking_for(role, &*store, &settings.pii)?;
            commands::show_profile(store, &target, json, mask.as_ref(), &mut out)
        }
        Command::Profile(ProfileCommand::Explain { target, json }) => {
            commands::explain_profile(open(Access::Existing)?, &target, json, &mut out)
        }
        Command::Identity(IdentityCommand::Rules { change, json }) => {
            let access = if change.is_empty() { Access::Existing } else { Access::CreateIfMissing };
            commands::identity_rules(&*open(access)?, change, json, &mut out)
        }
        Command::Identity(IdentityCommand::Unlink { profile, identifier }) => {
            commands::unlink(open(Access::Existing)?, &profile, &identifier, &mut out)
        }
        Command::Audience(AudienceCommand::Create { name, rule }) => {
            audience::create(open(Access::Existing)?, &name, &rule, &mut out)
        }
        Command::Audience(AudienceCommand::Preview { rule, json }) => {
            audience::preview(open(Access::Existing)?, &rule, json, &mut out)
        }
        Command::Audience(AudienceCommand::List { json }) => audience::list(open(Access::Existing)?, json, &mut out),
        Command::Audience(AudienceCommand::Show { name, json }) => {
            audience::show(open(Access::Existing)?, &name, json, &mut out)
        }
        Command::Audience(AudienceCommand::Members { name, limit, after, json }) => {
            audience::members(open(Access::Existing)?, &name, after.as_deref(), limit, json, &mut out)
        }
        Command::Dsr(DsrCommand::Access { identifier }) => dsr::run(
            open(Access::Existing)?,
            tandem_core::govern::dsr::DsrKind::Access,
            &identifier,
            settings.log.as_ref(),
            &settings.data_dir.join("imports"),
            &mut out,
        ),
        Command::Dsr(DsrCommand::Delete { identifier }) => dsr::run(
            open(Access::Existing)?,
            tandem_core::govern::dsr::DsrKind::Delete,
            &identifier,
            settings.log.as_ref(),
            &settings.data_dir.join("imports"),
            &mut out,
        ),
        Command::Dsr(DsrCommand::Suppress { identifier }) => dsr::run(
            open(Access::Existing)?,
            tandem_core::govern::dsr::DsrKind::Suppress,
            &identifier,
            settings.log.as_ref(),
            &settings.data_dir.join("imports"),
            &mut out,
        ),
        Command::Dsr(DsrCommand::Unsuppress { identifier }) => dsr::run(
            open(Access::Existing)?,
            tandem_core::govern::dsr::DsrKind::Unsuppress,
            &identifier,
            settings.log.as_ref(),
            &settings.data_dir.join("imports"),
            &mut out,
        ),
        Command::Dsr(DsrCommand::List { limit, json }) => dsr::list(open(Access::Existing)?, limit, json, &mut out),
        Command::Plan(PlanCommand::Set { source, file }) => {
            plan::set(open(Access::Existing)?, &source, &file, &mut out)
        }
        Command::Plan(PlanCommand::Show { source }) => plan::show(open(Access::Existing)?, &source, &mut out),
        Command::Plan(PlanCommand::Violations { source, limit, json }) => {
            plan::violations(open(Access::Existing)?, &source, limit, json, &mut out)
        }
        Command::Plan(PlanCommand::Delete { source }) => plan::delete(open(Access::Existing)?, &source, &mut out),
        Command::Destination(DestinationCommand::Create { definition }) => {
            destination::create(open(Access::Existing)?, &definition, &mut out)
        }
        Command::Destination(DestinationCommand::List { json }) => {
            destination::list(open(Access::Existing)?, json, &mut out)
        }
        Command::Destination(DestinationCommand::Show { name }) => {
            destination::show(open(Access::Existing)?, &name, &mut out)
        }
        Command::Destination(DestinationCommand::DeadLetters { name, limit, json }) => {
            destination::failed(open(Access::Existing)?, Some(&name), None, None, limit, json, &mut out)
        }
        Command::Destination(DestinationCommand::Test { name, json }) => {
            destination::test(open(Access::Existing)?, &name, json, &mut out)
        }
        Command::Deliveries(DeliveriesCommand::Failed { destination: name, since, profile, limit, json }) => {
            let (since, profile) = (since.as_deref(), profile.as_deref());
            destination::failed(open(Access::Existing)?, name.as_deref(), since, profile, limit, json, &mut out)
        }
        Command::Deliveries(DeliveriesCommand::Replay { destination: name, since, profile }) => {
            destination::replay(open(Access::Existing)?, &name, since.as_deref(), profile.as_deref(), &mut out)
        }
        Command::Destination(DestinationCommand::Pause { name }) => {
            destination::set_paused(open(Access::Existing)?, &name, true, &mut out)
        }
        Command::Destination(DestinationCommand::Resume { name }) => {
            destination::set_paused(open(Access::Existing)?, &name, false, &mut out)
        }
        Command::Destination(DestinationCommand::Replay { name }) => {
            destination::replay(open(Access::Existing)?, &name, None, None, &mut out)
        }
        Command::Destination(DestinationCommand::Delete { name }) => {
            destination::delete(open(Access::Existing)?, &name, &mut out)
        }
        Command::Audience(AudienceCommand::Delete { name }) => {
            audience::delete(open(Access::Existing)?, &name, &mut out)
        }
        Command::Computed(ComputedCommand::Create { name, definition }) => {
            computed::create(open(Access::Existing)?, &name, &definition, &mut out)
        }
        Command::Computed(ComputedCommand::List { json }) => computed::list(open(Access::Existing)?, json, &mut out),
        Command::Computed(ComputedCommand::Show { name, json }) => {
            computed::show(open(Access::Existing)?, &name, json, &mut out)
        }
        Command::Computed(ComputedCommand::Delete { name }) => {
            computed::delete(open(Access::Existing)?, &name, &mut out)
        }
        Command::Identity(IdentityCommand::Block { identifier }) => {
            commands::block(open(Access::Existing)?, &identifier, &mut out)
        }
        Command::Goal(GoalCommand::Create(flags)) => goal::create(open(Access::Existing)?, &flags, &mut out),
        Command::Goal(GoalCommand::List { json }) => goal::list(open(Access::Existing)?, json, &mut out),
        Command::Goal(GoalCommand::Show { name, json }) => goal::show(open(Access::Existing)?, &name, json, &mut out),
        Command::Goal(GoalCommand::Delete { name }) => goal::delete(open(Access::Existing)?, &name, &mut out),
    }
}

fn server_options(settings: &Settings) -> tandem_server::ServerOptions {
    tandem_server::ServerOptions {
        listen: settings.listen,
        dedup_window: settings.dedup_window,
        import_dir: settings.data_dir.join("imports"),
        resolver_cache: settings.resolver_cache,
        log: settings.log.clone(),
        pii: settings.pii.clone(),
        consent_default: settings.consent_default,
    }
}

/// What the event stream holds, for the drain stage's lag.
fn stream_position(
    log: &tandem_server::stream::StreamOptions,
) -> anyhow::Result<tandem_server::cluster::StreamPosition> {
    runtime()?.block_on(async {
        let stream = tandem_server::stream::EventStream::connect(log).await?;
        anyhow::Ok(stream.position().await?)
    })
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Loads the demo company (once per data directory), brings profiles up to
/// date, prints where to look, then serves like `tandem serve`.
fn run_demo(settings: &Settings, store: Arc<dyn Store>, customers: usize, seed: u64, live: bool) -> anyhow::Result<()> {
    let options = server_options(settings);
    runtime()?.block_on(async {
        let running = tandem_server::start(store.clone(), &options).await?;
        let mut out = std::io::stdout();
        let company = demo::generate(seed, customers, demo::History::until_now());
        // Before the company's events, so the outbox stage hands them to the destinations.
        let receiver = demo::living::start_destinations(&store, &settings.data_dir).await?;
        // The store's calls block, so they run off the async workers here.
        if tokio::task::block_in_place(|| demo::already_loaded(&store))? {
            eprintln!("the demo company is already in {}; serving it", settings.data_dir.display());
        } else {
            eprintln!(
                "generating a company of {customers} customers (seed {seed}) into {}",
                settings.data_dir.display()
            );
            let started = std::time::Instant::now();
            let loaded = demo::load(&running.state(), &company, &settings.data_dir.join("demo-files")).await?;
            eprintln!(
                "sent {} events through the tracking API, imported {} rows, delivered {} webhook events in {:.1} s",
                loaded.tracked,
                loaded.imported,
                loaded.delivered,
                started.elapsed().as_secs_f64()
            );
        }
        if let Some(stream) = running.state().stream {
            // Published, not yet in the log: drain it before resolving.
            let mut drain = tandem_server::drain::Drain::new(
                store.clone(),
                stream,
                tokio::runtime::Handle::current(),
                settings.dedup_window,
                running.state().metrics,
            );
            tokio::task::spawn_blocking(move || drain.catch_up()).await??;
        }
        let resolving = store.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || {
            let mut resolver = tandem_server::resolve::Resolver::load(resolving)?;
            resolver.catch_up(tandem_server::resolve::DEFAULT_BATCH)
        })
        .await??;
        eprintln!("profiles up to date in {:.1} s", started.elapsed().as_secs_f64());
        let defining = store.clone();
        tokio::task::spawn_blocking(move || demo::define_audiences(defining.as_ref())).await??;
        let defining = store.clone();
        let started = std::time::Instant::now();
        if tokio::task::spawn_blocking(move || demo::define_goals(&defining, customers)).await?? {
            eprintln!("goals defined and their history counted in {:.1} s", started.elapsed().as_secs_f64());
        }
        demo::living::furnish(&running.state(), &company).await?;
        tokio::task::block_in_place(|| {
            let tokens = demo::living::create_role_tokens(store.as_ref())?;
            demo::walkthrough(&mut out, store.as_ref(), &company, running.local_addr, &settings.data_dir, &tokens)
        })?;
        let live = live.then(|| tokio::spawn(demo::living::live_traffic(running.state(), Arc::new(company))));
        running
            .serve(async move {
                tandem_server::shutdown_signal().await;
                // It holds the log writer open; the server waits for the writer to stop.
                if let Some(live) = live {
                    live.abort();
                }
            })
            .await?;
        let answers = receiver.answers();
        eprintln!(
            "the demo's CRM took {} deliveries ({} items), was busy for {} and refused {}",
            answers.accepted, answers.items, answers.busy, answers.refused
        );
        anyhow::Ok(())
    })
}

fn serve(settings: &Settings, store: Arc<dyn Store>) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let options = server_options(settings);
    match &settings.store {
        Some(url) => {
            tracing::info!(store = %url, imports = %settings.data_dir.display(), "opened the PostgreSQL store")
        }
        None => tracing::info!(data = %settings.data_dir.display(), "opened the store"),
    }
    if store.list_sources()?.is_empty() {
        tracing::info!("no sources yet: create one with `tandem source create NAME` to get a write key");
    }
    runtime.block_on(async {
        let running = tandem_server::start(store, &options).await?;
        running.serve(tandem_server::shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn long_help(path: &[&str]) -> String {
        let mut command = Cli::command();
        command.build();
        let mut current = &mut command;
        for name in path {
            current = current.find_subcommand_mut(name).unwrap_or_else(|| panic!("no subcommand {name}"));
        }
        current.render_long_help().to_string()
    }

    #[test]
    fn server_flags_are_offered_only_by_the_commands_that_serve() {
        Cli::command().debug_assert();
        for path in [&["serve"][..], &["demo"]] {
            let help = long_help(path);
            assert!(help.contains("--listen") && help.contains("--dedup-window-hours"), "{path:?}: {help}");
        }
        for path in [&["events", "list"][..], &["stats"], &["source", "create"], &["profile", "show"], &["import"]] {
            let help = long_help(path);
            assert!(!help.contains("--listen") && !help.contains("--dedup-window-hours"), "{path:?}: {help}");
            assert!(help.contains("--data"), "{path:?}: {help}");
        }
        let demo = long_help(&["demo"]);
        assert!(demo.contains("for demo ./tandem-demo") && demo.contains("Its store is ./tandem-demo"), "{demo}");
    }

    /// Every argument of every command says what it is for, `--json` included.
    #[test]
    fn every_argument_has_a_description() {
        fn check(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for argument in command.get_arguments() {
                if argument.get_help().is_none() && argument.get_long_help().is_none() {
                    missing.push(format!("{path} {}", argument.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut command = Cli::command();
        command.build();
        let mut missing = Vec::new();
        check(&command, "tandem", &mut missing);
        assert!(missing.is_empty(), "arguments without a description: {missing:?}");
    }

    #[test]
    fn read_commands_refuse_a_directory_without_a_store_and_create_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mistyped = dir.path().join("tandem-dta");
        let error = open_sqlite(&mistyped, Access::Existing).err().unwrap();
        assert!(error.to_string().contains("no Tandem store in"), "{error}");
        assert!(!mistyped.exists(), "a refused read leaves no directory behind");
        open_sqlite(&mistyped, Access::CreateIfMissing).unwrap();
        assert!(SqliteStore::exists(&mistyped));
        open_sqlite(&mistyped, Access::Existing).unwrap();
    }

    fn signed_leads() -> WebhookSettings {
        WebhookSettings {
            format: WebhookFormat::FacebookLeads,
            secret: Some("app-secret-9".into()),
            verify_token: Some("verify".into()),
            mapping: None,
        }
    }

    #[test]
    fn changing_the_webhook_format_keeps_the_secret_and_verify_token() {
        let changed = WebhookArgs::default()
            .apply(Some(signed_leads()), Some(WebhookFormat::SocialMentions), WebhookRemovals::default())
            .unwrap();
        assert_eq!(changed.format, WebhookFormat::SocialMentions);
        assert_eq!(changed.secret.as_deref(), Some("app-secret-9"));
        assert_eq!(changed.verify_token.as_deref(), Some("verify"));
    }

    #[test]
    fn changing_the_secret_keeps_the_format_and_removing_it_must_be_explicit() {
        let args = WebhookArgs { secret: Some("new-secret-10".into()), ..WebhookArgs::default() };
        let changed = args.apply(Some(signed_leads()), None, WebhookRemovals::default()).unwrap();
        assert_eq!((changed.format, changed.secret.as_deref()), (WebhookFormat::FacebookLeads, Some("new-secret-10")));
        let removals = WebhookRemovals { secret: true, verify_token: false };
        let unsigned = WebhookArgs::default().apply(Some(signed_leads()), None, removals).unwrap();
        assert_eq!((unsigned.secret, unsigned.verify_token.as_deref()), (None, Some("verify")));
    }

    #[test]
    fn a_first_webhook_setting_needs_a_format() {
        let error = WebhookArgs::default().apply(None, None, WebhookRemovals::default()).unwrap_err();
        assert!(error.to_string().contains("--format"), "{error}");
    }

    #[test]
    fn leaving_the_generic_format_drops_its_mapping() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mappings/leads.toml");
        let mapping = tandem_core::mapping::Mapping::from_toml(&std::fs::read_to_string(path).unwrap()).unwrap();
        let generic = WebhookSettings {
            format: WebhookFormat::Generic,
            secret: None,
            verify_token: None,
            mapping: Some(mapping),
        };
        let changed = WebhookArgs::default()
            .apply(Some(generic.clone()), Some(WebhookFormat::SocialMentions), WebhookRemovals::default())
            .unwrap();
        assert_eq!(changed.mapping, None);
        let kept = WebhookArgs::default().apply(Some(generic.clone()), None, WebhookRemovals::default()).unwrap();
        assert_eq!(kept, generic);
    }

    #[test]
    fn an_error_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use (os error 98)");
        let error = anyhow::Error::new(tandem_server::ServeError::Bind {
            address: "127.0.0.1:8080".parse().unwrap(),
            source: io,
        });
        assert_eq!(describe_error(&error), "cannot listen on 127.0.0.1:8080: Address already in use (os error 98)");
        let chained = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe_error(&chained), "outer: inner");
    }
}
