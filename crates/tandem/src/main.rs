//! The `tandem` command: runs the server and administers the embedded store
//! (sources, the event log, quarantine, statistics) from the command line.
//! Every command works against the same data directory as a running server.

mod commands;
mod config;
mod demo;
mod import;

use anyhow::Context;
use clap::{Parser, Subcommand};
use config::{Config, LogFormat, Settings};
use std::sync::Arc;
use tandem_core::webhook::{WebhookFormat, WebhookSettings};
use tandem_core::SourceKind;
use tandem_store::{Sources, SqliteStore, Store};

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
    /// Run the server: tracking API, health and metrics
    Serve,
    /// Manage sources, the channels events arrive through
    #[command(subcommand)]
    Source(SourceCommand),
    /// Read the event log
    #[command(subcommand)]
    Events(EventsCommand),
    /// Messages refused by validation, kept with their reason
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Admin API tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// Unified customer profiles
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Identity rules and repairs
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Create a realistic synthetic company and serve it: web and app behaviour, orders, product
    /// usage, tickets, CRM contacts, leads and social mentions (data in ./tandem-demo unless --data)
    Demo {
        /// Customers the company has
        #[arg(long, default_value_t = demo::DEFAULT_CUSTOMERS)]
        customers: usize,
        /// The same seed gives the same company
        #[arg(long, default_value_t = demo::DEFAULT_SEED)]
        seed: u64,
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
}

#[derive(Subcommand, Debug)]
enum SourceCommand {
    /// Create a source and print its write key
    Create {
        name: String,
        /// website, app, backend, import or webhook
        #[arg(long, default_value = "backend")]
        kind: SourceKind,
        /// Make it a webhook source taking this payload: generic, facebook-leads or social-mentions
        #[arg(long, value_name = "FORMAT")]
        webhook: Option<WebhookFormat>,
        #[command(flatten)]
        webhook_settings: WebhookArgs,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Change how a source takes webhooks
    Webhook {
        name: String,
        /// generic, facebook-leads or social-mentions
        #[arg(long, value_name = "FORMAT")]
        format: WebhookFormat,
        #[command(flatten)]
        settings: WebhookArgs,
    },
    /// List every source
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
}

/// A webhook source's secret, verify token and mapping.
#[derive(clap::Args, Debug)]
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

impl WebhookArgs {
    fn settings(self, format: WebhookFormat) -> anyhow::Result<WebhookSettings> {
        let mapping = match &self.mapping {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the mapping {}", path.display()))?;
                Some(
                    tandem_core::mapping::Mapping::from_toml(&text)
                        .with_context(|| format!("mapping {} is not usable", path.display()))?,
                )
            }
            None => None,
        };
        let settings = WebhookSettings { format, secret: self.secret, verify_token: self.verify_token, mapping };
        settings.validate().context("webhook settings are not usable")?;
        Ok(settings)
    }
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// Print events oldest first
    List {
        /// At most this many events
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this log position
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// One JSON object per line, with every Segment field
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
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ProfileCommand {
    /// Show a profile by id (prof_N) or by any identifier (type:value)
    Show {
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Explain why each identifier is on a profile and why profiles were merged
    Explain {
        target: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum IdentityCommand {
    /// Show the identity rules, or change them (changes apply to events resolved from now on)
    Rules {
        /// Limit per identifier type, as TYPE=N (repeatable)
        #[arg(long = "limit", value_name = "TYPE=N")]
        limits: Vec<String>,
        /// Limit of every type without its own
        #[arg(long)]
        default_limit: Option<u32>,
        /// Priority order, most important first, as TYPE,TYPE,…
        #[arg(long, value_delimiter = ',')]
        priority: Option<Vec<String>>,
        /// A value that never identifies anyone (repeatable)
        #[arg(long = "block-value", value_name = "VALUE")]
        block_values: Vec<String>,
        /// A regular expression for values that never identify anyone (repeatable)
        #[arg(long = "block-pattern", value_name = "REGEX")]
        block_patterns: Vec<String>,
        /// Declare a field as an identifier, e.g. traits.crm_id (repeatable)
        #[arg(long = "identifier", value_name = "PATH")]
        identifiers: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove an identifier from a profile and rebuild the profiles as if it had never linked anything
    Unlink { profile: String, identifier: String },
    /// Never use an identifier again, and rebuild the profiles it linked
    Block { identifier: String },
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
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.config.resolve()?;
    init_logging(settings.log_format);
    let open = || -> anyhow::Result<SqliteStore> {
        SqliteStore::open(&settings.data_dir)
            .with_context(|| format!("opening the store in {}", settings.data_dir.display()))
    };
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Serve => serve(&settings, open()?),
        Command::Demo { customers, seed } => {
            let mut settings = settings.clone();
            if settings.data_dir == std::path::Path::new(config::DEFAULT_DATA_DIR) {
                settings.data_dir = std::path::PathBuf::from(demo::DEFAULT_DATA_DIR);
            }
            let store = SqliteStore::open(&settings.data_dir)
                .with_context(|| format!("opening the store in {}", settings.data_dir.display()))?;
            run_demo(&settings, store, customers, seed)
        }
        Command::Source(SourceCommand::Create { name, kind, webhook, webhook_settings, json }) => {
            let webhook = webhook.map(|format| webhook_settings.settings(format)).transpose()?;
            let kind = if webhook.is_some() { SourceKind::Webhook } else { kind };
            commands::create_source(&open()?, &name, kind, webhook.as_ref(), json, &mut out)
        }
        Command::Source(SourceCommand::Webhook { name, format, settings }) => {
            commands::set_webhook(&open()?, &name, &settings.settings(format)?, &mut out)
        }
        Command::Source(SourceCommand::List { json }) => commands::list_sources(&open()?, json, &mut out),
        Command::Events(EventsCommand::List { limit, after, json }) => {
            commands::list_events(&open()?, after, limit, json, &mut out)
        }
        Command::Quarantine(QuarantineCommand::List { limit, json }) => {
            commands::list_quarantine(&open()?, limit, json, &mut out)
        }
        Command::Import { file, source, mapping, format, json } => {
            let args = import::ImportArgs {
                file: &file,
                source: &source,
                mapping: &mapping,
                format: format.as_deref(),
                as_json: json,
            };
            import::import(&open()?, args, &mut out)
        }
        Command::Stats { json } => commands::stats(&open()?, json, &mut out),
        Command::Token(TokenCommand::Create { name, json }) => commands::create_token(&open()?, &name, json, &mut out),
        Command::Profile(ProfileCommand::Show { target, json }) => {
            commands::show_profile(Arc::new(open()?), &target, json, &mut out)
        }
        Command::Profile(ProfileCommand::Explain { target, json }) => {
            commands::explain_profile(Arc::new(open()?), &target, json, &mut out)
        }
        Command::Identity(IdentityCommand::Rules {
            limits,
            default_limit,
            priority,
            block_values,
            block_patterns,
            identifiers,
            json,
        }) => {
            let change =
                commands::RulesChange { limits, default_limit, priority, block_values, block_patterns, identifiers };
            commands::identity_rules(&open()?, change, json, &mut out)
        }
        Command::Identity(IdentityCommand::Unlink { profile, identifier }) => {
            commands::unlink(Arc::new(open()?), &profile, &identifier, &mut out)
        }
        Command::Identity(IdentityCommand::Block { identifier }) => {
            commands::block(Arc::new(open()?), &identifier, &mut out)
        }
    }
}

fn server_options(settings: &Settings) -> tandem_server::ServerOptions {
    tandem_server::ServerOptions {
        listen: settings.listen,
        dedup_window: settings.dedup_window,
        import_dir: settings.data_dir.join("imports"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Loads the demo company (once per data directory), brings profiles up to
/// date, prints where to look, then serves like `tandem serve`.
fn run_demo(settings: &Settings, store: SqliteStore, customers: usize, seed: u64) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = Arc::new(store);
    let options = server_options(settings);
    runtime()?.block_on(async {
        let running = tandem_server::start(store.clone(), &options).await?;
        let mut out = std::io::stdout();
        let company = demo::generate(seed, customers);
        if demo::already_loaded(&store)? {
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
        let resolving = store.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || {
            let mut resolver = tandem_server::resolve::Resolver::load(resolving)?;
            resolver.catch_up(tandem_server::resolve::DEFAULT_BATCH)
        })
        .await??;
        eprintln!("profiles up to date in {:.1} s", started.elapsed().as_secs_f64());
        let (_, token) = store.create_token("demo")?;
        demo::walkthrough(&mut out, store.as_ref(), &company, running.local_addr, &settings.data_dir, &token)?;
        running.serve(tandem_server::shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

fn serve(settings: &Settings, store: SqliteStore) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let options = server_options(settings);
    tracing::info!(data = %settings.data_dir.display(), "opened the store");
    if store.list_sources()?.is_empty() {
        tracing::info!("no sources yet: create one with `tandem source create NAME` to get a write key");
    }
    runtime.block_on(async {
        let running = tandem_server::start(Arc::new(store), &options).await?;
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
