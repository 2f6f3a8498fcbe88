//! Tandem's server: the HTTP API (tracking API, health, metrics), the log
//! writer that makes events durable, and the lifecycle that ties them to a
//! store — start, serve, drain on SIGTERM or Ctrl-C.

pub mod access;
pub mod activate;
pub mod audience;
pub mod audience_api;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod collect;
pub mod computed_api;
pub mod connection;
pub mod console;
pub mod destination_api;
pub mod drain;
pub mod dsr;
pub mod error;
pub mod extract;
pub mod goal_api;
pub mod govern;
pub mod import;
pub mod insight;
pub mod log_head;
pub mod log_writer;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod pii;
pub mod plan_api;
pub mod profile;
pub mod progress;
pub(crate) mod read_through;
pub mod resolve;
pub mod sdk_settings;
pub mod stack;
pub mod stream;
pub mod webhook;

use auth::SourceDirectory;
use axum::routing::get;
use axum::Router;
use log_writer::LogWriter;
use metrics::Metrics;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tandem_store::Store;

/// How long a `messageId` is remembered for deduplication, as Segment does.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
/// How often the log head is read from the store, so that appends by
/// another process (the CLI importer) reach the stages within this interval.
const HEAD_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How often message ids older than the dedup window are forgotten, and
/// expired console sessions deleted.
const DEDUP_PRUNE_INTERVAL: Duration = Duration::from_secs(10 * 60);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub sources: Arc<SourceDirectory>,
    pub tokens: Arc<auth::TokenDirectory>,
    /// Tracking plans per source, cached for ingestion.
    pub plans: Arc<govern::PlanDirectory>,
    /// Suppressed identifiers, cached for ingestion.
    pub suppressions: Arc<govern::SuppressionDirectory>,
    pub log: LogWriter,
    pub metrics: Metrics,
    /// The committed head of the log, which the resolver follows.
    pub head: log_head::LogHead,
    /// What the stages after the log have committed, each followed by the
    /// stage after it.
    pub stages: progress::StageProgress,
    pub imports: Arc<import::jobs::ImportJobs>,
    /// The stage leases this node holds (the resolver's), for `/health`.
    pub leases: cluster::LeaseBoard,
    /// The event stream between nodes, when the server runs with one: the
    /// log writer publishes there and the drain stage appends it to the log.
    pub stream: Option<stream::EventStream>,
    /// How PII is classified (the stored rules in front of the configured
    /// ones): red values hashed or refused at ingestion, yellow ones masked
    /// for roles without `pii:read`.
    pub pii: Arc<pii::PiiDirectory>,
    /// The web console's sessions (kept in the store).
    pub sessions: Arc<console::session::Sessions>,
    /// Latencies of collecting requests, until added to the store's
    /// histogram for the ingest latency goal.
    pub ingest_latency: Arc<insight::IngestLatency>,
}

impl AppState {
    /// Builds the shared state and starts the log writer thread, which stops
    /// once the state (every clone of it) is dropped. Uploaded imports are
    /// spooled to `import_dir`, with their reject files.
    pub fn start(
        store: Arc<dyn Store>,
        dedup_window: Duration,
        import_dir: PathBuf,
    ) -> (AppState, std::thread::JoinHandle<()>) {
        let pii = pii::PiiDirectory::new(store.clone(), Default::default()).expect("the default pii settings compile");
        Self::start_with_pii(store, dedup_window, import_dir, Arc::new(pii))
    }

    /// [`AppState::start`] with PII settings other than the defaults.
    pub fn start_with_pii(
        store: Arc<dyn Store>,
        dedup_window: Duration,
        import_dir: PathBuf,
        pii: Arc<pii::PiiDirectory>,
    ) -> (AppState, std::thread::JoinHandle<()>) {
        let metrics = Metrics::new();
        let head = committed_head(&store);
        let (log, writer_thread) = LogWriter::spawn(store.clone(), dedup_window, metrics.clone(), head.clone());
        let state = Self::assemble(store, log.with_pii(pii.clone()), metrics, head, import_dir, None, pii);
        (state, writer_thread)
    }

    /// Builds the shared state of a node that ingests through an event
    /// stream: its log writer publishes to `stream` (no writer thread), and
    /// the log head follows what the drain stage appends.
    pub fn start_streaming(
        store: Arc<dyn Store>,
        stream: stream::EventStream,
        import_dir: PathBuf,
        pii: Arc<pii::PiiDirectory>,
    ) -> AppState {
        let metrics = Metrics::new();
        let head = committed_head(&store);
        let log = LogWriter::to_stream(stream.clone(), metrics.clone(), store.clone()).with_pii(pii.clone());
        Self::assemble(store, log, metrics, head, import_dir, Some(stream), pii)
    }

    /// The state around a log writer, whichever way it makes events durable.
    fn assemble(
        store: Arc<dyn Store>,
        log: LogWriter,
        metrics: Metrics,
        head: log_head::LogHead,
        import_dir: PathBuf,
        stream: Option<stream::EventStream>,
        pii: Arc<pii::PiiDirectory>,
    ) -> AppState {
        AppState {
            sources: Arc::new(SourceDirectory::new(store.clone())),
            tokens: Arc::new(auth::TokenDirectory::new(store.clone())),
            plans: Arc::new(govern::PlanDirectory::new(store.clone())),
            suppressions: Arc::new(govern::SuppressionDirectory::new(store.clone())),
            sessions: Arc::new(console::session::Sessions::new(store.clone())),
            store,
            log,
            metrics,
            head,
            stages: progress::StageProgress::default(),
            imports: Arc::new(import::jobs::ImportJobs::new(import_dir)),
            leases: cluster::LeaseBoard::default(),
            stream,
            pii,
            ingest_latency: Arc::default(),
        }
    }
}

/// The store's committed log head, read on a thread of its own: the state
/// is built on the async runtime, where a backend's synchronous client
/// (PostgreSQL's drives its own small runtime) must not block.
fn committed_head(store: &Arc<dyn Store>) -> log_head::LogHead {
    let committed = std::thread::scope(|scope| scope.spawn(|| store.head()).join());
    log_head::LogHead::new(committed.ok().and_then(Result::ok).unwrap_or_default())
}

/// The full HTTP API.
pub fn router(state: AppState) -> Router {
    let mut tracking = Router::new();
    for (path, route) in collect::routes() {
        tracking = tracking.route(path, route);
    }
    Router::new()
        .merge(tracking)
        .merge(profile::routes())
        .merge(audience_api::routes())
        .merge(computed_api::routes())
        .merge(destination_api::routes())
        .merge(goal_api::routes())
        .merge(plan_api::routes())
        .merge(dsr::routes())
        .merge(stack::routes())
        .merge(import::jobs::routes())
        .merge(webhook::routes())
        .merge(sdk_settings::routes())
        .merge(cluster::routes())
        .merge(audit::routes())
        .merge(pii::routes())
        .merge(openapi::routes())
        .merge(console::routes())
        .route("/health", get(ops::health))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .with_state(state)
        // Outermost, so preflights are answered before routing.
        .layer(axum::middleware::from_fn(ops::cors))
}

/// Settings of a running server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    pub dedup_window: Duration,
    /// Where uploaded imports and their reject files are kept.
    pub import_dir: PathBuf,
    /// What the resolver keeps in memory.
    pub resolver_cache: resolve::ResolverCache,
    /// The event stream to ingest through; `None` appends to the store's log.
    pub log: Option<stream::StreamOptions>,
    /// PII classes beyond the defaults, and the salt of red values' hashes.
    pub pii: tandem_core::govern::PiiSettings,
    /// Consent for a category a person never spoke about.
    pub consent_default: tandem_core::govern::consent::ConsentDefault,
}

/// The server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {address}: {source}")]
    Bind { address: SocketAddr, source: std::io::Error },
    #[error("the server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    #[error(transparent)]
    Pii(#[from] tandem_core::govern::pii::PiiSettingsError),
}

/// A started server: the address it listens on and the state it serves.
pub struct Running {
    pub local_addr: SocketAddr,
    listener: tokio::net::TcpListener,
    state: AppState,
    /// The log writer's thread; `None` when ingesting through a stream.
    writer_thread: Option<std::thread::JoinHandle<()>>,
    dedup_window: Duration,
    resolver_cache: resolve::ResolverCache,
    consent_default: tandem_core::govern::consent::ConsentDefault,
    limits: connection::ConnectionLimits,
}

/// Binds the listener and starts the log writer; call [`Running::serve`] next.
pub async fn start(store: Arc<dyn Store>, options: &ServerOptions) -> Result<Running, ServeError> {
    let listener = match tokio::net::TcpListener::bind(options.listen).await {
        Ok(listener) => listener,
        Err(source) => {
            release(store).await;
            return Err(ServeError::Bind { address: options.listen, source });
        }
    };
    let local_addr = listener.local_addr()?;
    let pii = match pii::PiiDirectory::new(store.clone(), options.pii.clone()) {
        Ok(pii) => Arc::new(pii),
        Err(error) => {
            release(store).await;
            return Err(error.into());
        }
    };
    let (state, writer_thread) = match &options.log {
        None => {
            let (state, thread) =
                AppState::start_with_pii(store, options.dedup_window, options.import_dir.clone(), pii);
            (state, Some(thread))
        }
        Some(log) => {
            let stream = match stream::EventStream::connect(log).await {
                Ok(stream) => stream,
                Err(error) => {
                    // The PII rules hold the store too.
                    drop(pii);
                    release(store).await;
                    return Err(error.into());
                }
            };
            tracing::info!(stream = stream.name(), servers = %log.servers.join(","), "ingesting through nats jetstream");
            (AppState::start_streaming(store, stream, options.import_dir.clone(), pii), None)
        }
    };
    Ok(Running {
        local_addr,
        listener,
        state,
        writer_thread,
        dedup_window: options.dedup_window,
        resolver_cache: options.resolver_cache,
        consent_default: options.consent_default,
        limits: connection::ConnectionLimits::default(),
    })
}

/// Drops a store on a blocking thread: PostgreSQL's synchronous client
/// drives a runtime of its own and panics when dropped on an async worker
/// (which a failed start would otherwise do).
async fn release(store: Arc<dyn Store>) {
    let _ = tokio::task::spawn_blocking(move || drop(store)).await;
}

impl Running {
    /// Serves with other connection limits than the defaults.
    pub fn with_limits(mut self, limits: connection::ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The state the server will serve, for loading data before it does.
    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, finishes the
    /// requests in flight, and waits for the log writer to commit them.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
        let Running {
            local_addr,
            listener,
            state,
            writer_thread,
            dedup_window,
            resolver_cache,
            consent_default,
            limits,
        } = self;
        let pruner = tokio::spawn(prune_message_ids(state.store.clone(), dedup_window));
        let stop_drain = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drain_thread = state.stream.clone().map(|stream| {
            drain::spawn(
                state.store.clone(),
                stream,
                tokio::runtime::Handle::current(),
                dedup_window,
                state.head.clone(),
                state.metrics.clone(),
                state.leases.clone(),
                stop_drain.clone(),
            )
        });
        let shadow_flusher = tokio::spawn(stack::flush_shadow_traffic(state.store.clone(), state.sources.clone()));
        let latency_flusher = tokio::spawn(insight::flush_latency(state.store.clone(), state.ingest_latency.clone()));
        let stop_resolver = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let head = state.head.clone();
        let head_poller = tokio::spawn(head.clone().poll_store(state.store.clone(), HEAD_POLL_INTERVAL));
        let stages = state.stages.clone();
        let resolver_thread = resolve::spawn(
            state.store.clone(),
            head.clone(),
            stages.resolved.clone(),
            state.metrics.clone(),
            resolver_cache,
            stop_resolver.clone(),
            state.leases.clone(),
        );
        let stop_audiences = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let audience_thread = audience::spawn(
            state.store.clone(),
            stages.resolved.clone(),
            stages.audiences.clone(),
            audience::system_clock(),
            state.metrics.clone(),
            stop_audiences.clone(),
            audience::TIMER_INTERVAL,
        );
        let stop_delivery = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let delivery_thread = activate::spawn(
            state.store.clone(),
            stages.clone(),
            activate::system_clock(),
            state.metrics.clone(),
            stop_delivery.clone(),
            consent_default,
            activate::RECHECK_INTERVAL,
        );
        let stop_insight = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let insight_thread =
            insight::spawn(state.store.clone(), head.clone(), insight::system_clock(), stop_insight.clone());
        tracing::info!(address = %local_addr, "tandem is listening");
        let imports = state.imports.clone();
        let (latency_store, latency) = (state.store.clone(), state.ingest_latency.clone());
        connection::serve(listener, router(state), limits, shutdown).await;
        // Running imports hold the log writer open; stop them within a row
        // rather than wait for their files to end.
        imports.stop_all();
        pruner.abort();
        shadow_flusher.abort();
        latency_flusher.abort();
        head_poller.abort();
        // Every handle to the log writer lived in the router, now dropped: the
        // writer commits what is queued and stops.
        if let Some(writer_thread) = writer_thread {
            tokio::task::spawn_blocking(move || writer_thread.join())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_else(|| tracing::error!("the log writer stopped abnormally"));
        }
        // What the stream acknowledged and the drain has not appended yet
        // stays in the stream; the drain on whichever node holds its lease
        // next appends it.
        stop_drain.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(drain_thread) = drain_thread {
            tokio::task::spawn_blocking(move || drain_thread.join())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_else(|| tracing::error!("the drain stage stopped abnormally"));
        }
        stop_resolver.store(true, std::sync::atomic::Ordering::Relaxed);
        head.nudge();
        tokio::task::spawn_blocking(move || resolver_thread.join())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| tracing::error!("the resolver stopped abnormally"));
        stop_audiences.store(true, std::sync::atomic::Ordering::Relaxed);
        stages.nudge_all();
        tokio::task::spawn_blocking(move || audience_thread.join())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| tracing::error!("the audience stage stopped abnormally"));
        // Deliveries in flight finish their request; what is not marked
        // delivered is delivered again at the next start (at least once).
        stop_delivery.store(true, std::sync::atomic::Ordering::Relaxed);
        stages.nudge_all();
        tokio::task::spawn_blocking(move || delivery_thread.join())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| tracing::error!("the delivery stage stopped abnormally"));
        stop_insight.store(true, std::sync::atomic::Ordering::Relaxed);
        head.nudge();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = latency.flush(latency_store.as_ref()) {
                tracing::warn!(%error, "recording the last ingest latencies failed");
            }
            insight_thread.join()
        })
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(|| tracing::error!("the insight stage stopped abnormally"));
        tracing::info!("tandem stopped; every acknowledged event is durable");
        Ok(())
    }
}

async fn prune_message_ids(store: Arc<dyn Store>, dedup_window: Duration) {
    let mut interval = tokio::time::interval(DEDUP_PRUNE_INTERVAL);
    loop {
        interval.tick().await;
        let cutoff =
            chrono::Utc::now().timestamp_millis() - i64::try_from(dedup_window.as_millis()).unwrap_or(i64::MAX);
        let forgetting = store.clone();
        match tokio::task::spawn_blocking(move || forgetting.forget_message_ids(cutoff)).await {
            Ok(Ok(forgotten)) if forgotten > 0 => {
                tracing::debug!(forgotten, "forgot message ids past the dedup window")
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "forgetting old message ids failed"),
            Err(error) => tracing::warn!(%error, "the dedup pruner panicked"),
        }
        // Expired console sessions go too (starting a session also deletes
        // them), so a console nobody signs in to keeps no stale rows.
        let (pruning, now_ms) = (store.clone(), chrono::Utc::now().timestamp_millis());
        match tokio::task::spawn_blocking(move || pruning.prune_console_sessions(now_ms)).await {
            Ok(Ok(ended)) if ended > 0 => tracing::debug!(ended, "deleted expired console sessions"),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "deleting expired console sessions failed"),
            Err(error) => tracing::warn!(%error, "the session pruner panicked"),
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: draining requests in flight");
}
