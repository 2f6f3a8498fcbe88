//! Tandem's configuration: one struct read from command-line flags, `TANDEM_*`
//! environment variables and `tandem.toml`, in that order of precedence, with
//! built-in defaults for anything left unset, then checked by `validate()`.

use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tandem_core::govern::consent::ConsentDefault;

pub const DEFAULT_DATA_DIR: &str = "./tandem-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_CONFIG_FILE: &str = "tandem.toml";

/// Settings shared by every command. Flags are global: they may stand before
/// or after the subcommand. The server's own settings (`listen`,
/// `dedup_window_hours`) come from the file here, and from flags and the
/// environment only on the commands that serve ([`ServerArgs`]), so other
/// commands' help does not offer options they ignore.
#[derive(Args, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the embedded store [default: ./tandem-data; for demo ./tandem-demo]
    #[arg(long, global = true, env = "TANDEM_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,

    /// The store: a postgres://user@host:port/database URL to share one
    /// PostgreSQL database between nodes [default: SQLite in the data directory]
    #[arg(long, global = true, env = "TANDEM_STORE", value_name = "URL")]
    pub store: Option<String>,

    /// The event stream between nodes: nats://host:4222[,nats://host2:4222…]
    /// of a NATS JetStream cluster; every node publishes events there and one
    /// drains them into the store. Needs a PostgreSQL --store [default: none,
    /// nodes append to the store directly]
    #[arg(long, global = true, env = "TANDEM_LOG_URL", value_name = "URLS")]
    pub log: Option<String>,

    /// Replicas of the event stream when Tandem creates it [default: the
    /// NATS cluster's size, at most 3]
    #[arg(long, global = true, env = "TANDEM_LOG_REPLICAS", value_name = "N")]
    pub log_replicas: Option<usize>,

    /// The server's address; set by [`ServerArgs`] on the serving commands.
    #[arg(skip)]
    pub listen: Option<SocketAddr>,

    /// Hours a messageId is remembered; set by [`ServerArgs`] on the serving commands.
    #[arg(skip)]
    pub dedup_window_hours: Option<u64>,

    /// Profiles the resolver keeps in memory; set by [`ServerArgs`] on the serving commands.
    #[arg(skip)]
    pub resolver_cache_profiles: Option<usize>,

    /// MiB of compact profile records beside the resolver's graph; set by [`ServerArgs`] on the serving commands.
    #[arg(skip)]
    pub resolver_record_cache_mib: Option<usize>,

    /// PII classes beyond the defaults and the salt of red values' hashes
    /// (`[pii]` in the file only).
    #[arg(skip)]
    pub pii: Option<tandem_core::govern::PiiSettings>,
    /// Consent for categories a person never spoke about; set by [`ServerArgs`] on the serving commands.
    #[arg(skip)]
    pub consent_default: Option<ConsentDefault>,

    /// Log format: text or json [default: text]
    #[arg(long, global = true, env = "TANDEM_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Configuration file [default: ./tandem.toml when it exists]
    #[arg(long, global = true, env = "TANDEM_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

/// Flags of the commands that run a server (`serve`, `demo`).
#[derive(Args, Debug, Default, Clone, PartialEq)]
pub struct ServerArgs {
    /// Address the server listens on [default: 127.0.0.1:8080]
    #[arg(long, env = "TANDEM_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Hours a messageId is remembered to drop repeats [default: 24]
    #[arg(long, env = "TANDEM_DEDUP_WINDOW_HOURS", value_name = "HOURS")]
    pub dedup_window_hours: Option<u64>,

    /// Profiles the resolver keeps in its graph, about 3 KB each; with the
    /// record cache, sets the server's memory, whatever the number of
    /// customers [default: 100000]
    #[arg(long, env = "TANDEM_RESOLVER_CACHE_PROFILES", value_name = "PROFILES")]
    pub resolver_cache_profiles: Option<usize>,

    /// MiB for profiles the resolver's graph dropped, kept as compact
    /// records (about 300 bytes each) so they are not read from the store
    /// again [default: 320]
    #[arg(long, env = "TANDEM_RESOLVER_RECORD_CACHE_MIB", value_name = "MIB")]
    pub resolver_record_cache_mib: Option<usize>,

    /// Consent for a category a person never spoke about, when a destination
    /// needs it: grant or deny [default: grant]
    #[arg(long, env = "TANDEM_CONSENT_DEFAULT", value_name = "GRANT|DENY")]
    pub consent_default: Option<ConsentDefault>,
}

impl Config {
    /// The configuration with a serving command's flags over it.
    pub fn with_server(self, server: ServerArgs) -> Config {
        Config {
            listen: server.listen.or(self.listen),
            dedup_window_hours: server.dedup_window_hours.or(self.dedup_window_hours),
            resolver_cache_profiles: server.resolver_cache_profiles.or(self.resolver_cache_profiles),
            resolver_record_cache_mib: server.resolver_record_cache_mib.or(self.resolver_record_cache_mib),
            consent_default: server.consent_default.or(self.consent_default),
            ..self
        }
    }
}

#[derive(clap::ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The configuration after layering and validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// A PostgreSQL URL; `None` for the embedded store in `data_dir`.
    pub store: Option<StoreUrl>,
    pub listen: SocketAddr,
    pub dedup_window: Duration,
    pub resolver_cache: tandem_server::resolve::ResolverCache,
    pub consent_default: ConsentDefault,
    pub log_format: LogFormat,
    /// The event stream to ingest through; `None` appends to the store directly.
    pub log: Option<tandem_server::stream::StreamOptions>,
    /// PII classes and the salt of red values' hashes.
    pub pii: tandem_core::govern::PiiSettings,
}

/// The configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("dedup_window_hours must be between 1 and 720, got {0}")]
    DedupWindow(u64),
    #[error("resolver_cache_profiles must be between 1000 and 100000000, got {0}")]
    ResolverCache(usize),
    #[error("resolver_record_cache_mib must be between 0 and 1048576, got {0}")]
    ResolverRecordCache(usize),
    #[error("store must be a postgres:// or postgresql:// URL, got {0:?}")]
    StoreUrl(String),
    #[error(transparent)]
    LogUrl(#[from] tandem_server::stream::StreamError),
    #[error("log (the nats event stream) needs a postgresql store shared by the nodes: set store = \"postgres://…\" as well")]
    LogWithoutStore,
    #[error("log_replicas must be between 1 and 5, got {0}")]
    LogReplicas(usize),
    #[error("pii: {0}")]
    Pii(#[from] tandem_core::govern::pii::PiiSettingsError),
}

/// A PostgreSQL connection URL, shown only without its password.
#[derive(Clone, PartialEq)]
pub struct StoreUrl(String);

impl StoreUrl {
    /// Accepts `postgres://…` and `postgresql://…`.
    pub fn parse(url: &str) -> Result<StoreUrl, ConfigError> {
        let url = url.trim();
        let scheme_ends = ["postgres://", "postgresql://"].iter().any(|scheme| url.starts_with(scheme));
        if !scheme_ends || url.len() <= "postgres://".len() {
            return Err(ConfigError::StoreUrl(redact(url)));
        }
        Ok(StoreUrl(url.to_owned()))
    }

    /// The URL with its password, to connect with.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

/// Shows the URL without its password, never the secret itself.
impl std::fmt::Display for StoreUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&redact(&self.0))
    }
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "StoreUrl({:?})", redact(&self.0))
    }
}

/// `url` with any password (`user:PASSWORD@` or `password=PASSWORD`) replaced by `***`.
pub fn redact(url: &str) -> String {
    let mut text = url.to_owned();
    if let Some(scheme) = text.find("://") {
        let authority_start = scheme + 3;
        let authority_end = text[authority_start..].find('/').map_or(text.len(), |end| authority_start + end);
        if let Some(at) = text[authority_start..authority_end].rfind('@') {
            let userinfo = &text[authority_start..authority_start + at];
            if let Some(colon) = userinfo.find(':') {
                text.replace_range(authority_start + colon + 1..authority_start + at, "***");
            }
        }
    }
    let mut redacted = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(found) = rest.find("password=") {
        let value_start = found + "password=".len();
        redacted.push_str(&rest[..value_start]);
        redacted.push_str("***");
        let value_end = rest[value_start..].find(['&', ' ']).map_or(rest.len(), |end| value_start + end);
        rest = &rest[value_end..];
    }
    redacted.push_str(rest);
    redacted
}

impl Config {
    /// Fills every setting left unset by flags and environment from the
    /// config file, then from the defaults, and validates the result.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => Some(Config::read_file(path)?),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => Some(Config::read_file(Path::new(DEFAULT_CONFIG_FILE))?),
            None => None,
        };
        self.layered_over(file.unwrap_or_default()).validate()
    }

    pub fn read_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse { path: path.to_owned(), message: error.to_string() })
    }

    fn layered_over(self, lower: Config) -> Config {
        Config {
            data: self.data.or(lower.data),
            store: self.store.or(lower.store),
            log: self.log.or(lower.log),
            log_replicas: self.log_replicas.or(lower.log_replicas),
            listen: self.listen.or(lower.listen),
            dedup_window_hours: self.dedup_window_hours.or(lower.dedup_window_hours),
            resolver_cache_profiles: self.resolver_cache_profiles.or(lower.resolver_cache_profiles),
            resolver_record_cache_mib: self.resolver_record_cache_mib.or(lower.resolver_record_cache_mib),
            consent_default: self.consent_default.or(lower.consent_default),
            log_format: self.log_format.or(lower.log_format),
            pii: self.pii.or(lower.pii),
            config: self.config,
        }
    }

    fn validate(self) -> Result<Settings, ConfigError> {
        let dedup_window_hours = self.dedup_window_hours.unwrap_or(24);
        if !(1..=720).contains(&dedup_window_hours) {
            return Err(ConfigError::DedupWindow(dedup_window_hours));
        }
        let resolver_cache_profiles =
            self.resolver_cache_profiles.unwrap_or(tandem_server::resolve::DEFAULT_CACHE_PROFILES);
        if !(1_000..=100_000_000).contains(&resolver_cache_profiles) {
            return Err(ConfigError::ResolverCache(resolver_cache_profiles));
        }
        let resolver_record_cache_mib =
            self.resolver_record_cache_mib.unwrap_or(tandem_server::resolve::DEFAULT_RECORD_CACHE_BYTES >> 20);
        if resolver_record_cache_mib > 1 << 20 {
            return Err(ConfigError::ResolverRecordCache(resolver_record_cache_mib));
        }
        let store = self.store.as_deref().map(StoreUrl::parse).transpose()?;
        let log = match self.log.as_deref() {
            None => None,
            Some(urls) => {
                let mut options = tandem_server::stream::StreamOptions::parse(urls)?;
                if store.is_none() {
                    return Err(ConfigError::LogWithoutStore);
                }
                if let Some(replicas) = self.log_replicas {
                    if !(1..=5).contains(&replicas) {
                        return Err(ConfigError::LogReplicas(replicas));
                    }
                    options.replicas = Some(replicas);
                }
                Some(options)
            }
        };
        let pii = self.pii.unwrap_or_default();
        pii.compile()?;
        Ok(Settings {
            log,
            data_dir: self.data.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            store,
            listen: self.listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("the default address parses")),
            dedup_window: Duration::from_secs(dedup_window_hours * 3600),
            resolver_cache: tandem_server::resolve::ResolverCache {
                profiles: resolver_cache_profiles,
                record_bytes: resolver_record_cache_mib << 20,
            },
            consent_default: self.consent_default.unwrap_or_default(),
            log_format: self.log_format.unwrap_or_default(),
            pii,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tandem.example.toml");
        let config = Config::read_file(&path).unwrap();
        let settings = config.layered_over(Config::default()).validate().unwrap();
        assert_eq!(settings.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(settings.dedup_window, Duration::from_secs(24 * 3600));
        assert_eq!(settings.resolver_cache, tandem_server::resolve::ResolverCache::default());
        assert_eq!(settings.consent_default, ConsentDefault::Grant);
        assert_eq!(settings.pii.red_policy, tandem_core::govern::pii::RedPolicy::Hash);
        assert_eq!(settings.pii.rules[0].policy, Some(tandem_core::govern::pii::RedPolicy::Refuse));
    }

    #[test]
    fn flags_and_environment_win_over_the_file_which_wins_over_defaults() {
        let file: Config = toml::from_str("data = \"/srv/tandem\"\nlisten = \"0.0.0.0:9000\"\n").unwrap();
        let flags = Config { listen: Some("127.0.0.1:7000".parse().unwrap()), ..Config::default() };
        let settings = flags.layered_over(file).validate().unwrap();
        assert_eq!(settings.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(settings.data_dir, PathBuf::from("/srv/tandem"));
        assert_eq!(settings.log_format, LogFormat::Text);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("dta = \"x\"").is_err());
        let bad = Config { dedup_window_hours: Some(0), ..Config::default() };
        assert!(matches!(bad.validate(), Err(ConfigError::DedupWindow(0))));
        let tiny = Config { resolver_cache_profiles: Some(10), ..Config::default() };
        assert!(matches!(tiny.validate(), Err(ConfigError::ResolverCache(10))));
        let huge = Config { resolver_record_cache_mib: Some(2 << 20), ..Config::default() };
        assert!(matches!(huge.validate(), Err(ConfigError::ResolverRecordCache(_))));
    }

    #[test]
    fn the_store_url_comes_from_flags_or_the_file_and_must_be_postgres() {
        let file: Config = toml::from_str("store = \"postgres://tandem@db:5432/tandem\"\n").unwrap();
        let settings = Config::default().layered_over(file.clone()).validate().unwrap();
        assert_eq!(settings.store.as_ref().map(StoreUrl::secret), Some("postgres://tandem@db:5432/tandem"));
        let flag = Config { store: Some("postgresql://other@db2/x".into()), ..Config::default() };
        let settings = flag.layered_over(file).validate().unwrap();
        assert_eq!(settings.store.map(|url| url.secret().to_owned()).as_deref(), Some("postgresql://other@db2/x"));
        assert_eq!(Config::default().validate().unwrap().store, None, "without it, the embedded store");
        let wrong = Config { store: Some("mysql://root:hunter2@db/x".into()), ..Config::default() };
        let error = wrong.validate().unwrap_err().to_string();
        assert!(error.contains("postgres://") && error.contains("mysql://root:***@db/x"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn the_event_log_needs_nats_urls_and_a_postgres_store() {
        let file: Config =
            toml::from_str("store = \"postgres://tandem@db/tandem\"\nlog = \"nats://a:4222,nats://b:4222\"\n").unwrap();
        let settings = Config::default().layered_over(file.clone()).validate().unwrap();
        let log = settings.log.unwrap();
        assert_eq!(log.servers, vec!["nats://a:4222", "nats://b:4222"]);
        assert_eq!(log.replicas, None, "by default the cluster's size decides");
        let flags = Config { log_replicas: Some(1), ..Config::default() };
        assert_eq!(flags.layered_over(file.clone()).validate().unwrap().log.unwrap().replicas, Some(1));
        let alone = Config { log: Some("nats://a:4222".into()), ..Config::default() };
        assert!(matches!(alone.validate(), Err(ConfigError::LogWithoutStore)));
        let wrong = Config { log: Some("kafka://a".into()), ..Config::default() }.layered_over(file.clone());
        assert!(wrong.validate().unwrap_err().to_string().contains("nats://"));
        let too_many = Config { log_replicas: Some(9), ..Config::default() }.layered_over(file);
        assert!(matches!(too_many.validate(), Err(ConfigError::LogReplicas(9))));
        assert_eq!(Config::default().validate().unwrap().log, None, "without it, nothing changes");
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(redact("postgres://tandem:s3cret@db:5432/tandem"), "postgres://tandem:***@db:5432/tandem");
        assert_eq!(redact("postgres://tandem@db/tandem"), "postgres://tandem@db/tandem");
        assert_eq!(
            redact("postgres://db/t?password=s3cret&sslmode=disable"),
            "postgres://db/t?password=***&sslmode=disable"
        );
        assert_eq!(redact("postgres://a:b@c@db/t"), "postgres://a:***@db/t");
        let url = StoreUrl::parse("postgres://u:pw@h/d").unwrap();
        assert_eq!(
            (url.to_string(), format!("{url:?}")),
            ("postgres://u:***@h/d".into(), "StoreUrl(\"postgres://u:***@h/d\")".into())
        );
    }
}
