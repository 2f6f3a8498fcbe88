//! The resolver stage: reads the event log in order, resolves each event to
//! a profile with the identity graph (`tandem_core::resolve`), and commits
//! the changed profiles together with its new log position, so a crash
//! resumes exactly where the last commit ended and nothing applies twice.
//! Also the repairs (`unlink`, `block`) that rebuild the graph from the log.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::identity::{CompiledRules, RulesError};
use tandem_core::{
    Event, EventIdentifiers, Identifier, IdentityChange, IdentityGraph, IdentityRules, LogPosition, Profile, ProfileId,
    Resolution,
};
use tandem_store::{
    CommitOutcome, CommitProfiles, EventLink, HistoryRecord, IdentityCommit, IdentityRepair, LeaseLost, LogEntry,
    Stage, StageLease, Store, StoreError, UnresolvedEvent,
};

mod records;

use crate::cluster::LeaseBoard;
use crate::log_head::LogHead;
use crate::metrics::Metrics;
use crate::progress::Progress;

/// Events read and resolved per transaction when catching up a backlog, at
/// most. Larger commits write each page of the identity tables for more
/// events. A batch outgrows the graph by moving its own profiles into the
/// compact records as it goes; it ends early only when the records cannot
/// promise to keep them (or, with too little record memory for that, once
/// it has touched half the cache's profiles). At a million customers a
/// commit of a million events rewrites about as many pages of the identity
/// tables as one of 200,000, and writes half the bytes per event of it
/// (README, Performance); each batch costs a few hundred bytes of memory
/// per event while it is resolved and written.
pub const DEFAULT_BATCH: usize = 1_000_000;
/// Per transaction inside the server, smaller so a resolver commit holds the
/// store's write lock (and so ingestion) for less time.
const SERVER_BATCH: usize = 20_000;
/// How long an idle resolver waits on the log head before reading the log
/// anyway (a safety net; the head poller notices other processes' appends).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the stored identity rules are invalid: {0}")]
    Rules(#[from] RulesError),
    #[error("{0} is not on profile {1}")]
    NotOnProfile(Identifier, ProfileId),
    #[error("no profile {0}")]
    UnknownProfile(ProfileId),
    #[error("identity state changed during the repair too often; try again")]
    Contended,
    #[error("a resolver commit panicked")]
    CommitPanicked,
    #[error("identity storage is inconsistent: {0}")]
    Inconsistent(String),
}

/// Profiles the resolver keeps in its graph by default (about 3 KB each).
/// With the default records, a server resolving for ten million customers
/// stays under 1 GiB (measured: README, Performance).
pub const DEFAULT_CACHE_PROFILES: usize = 100_000;
/// Memory for profiles kept as compact records beside the graph, by
/// default: about 300 bytes each with their identifiers indexed, so about a
/// million profiles.
pub const DEFAULT_RECORD_CACHE_BYTES: usize = 320 << 20;

/// How much the resolver keeps in memory: the profiles of its graph, and
/// the bytes of compact records of profiles the graph dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolverCache {
    pub profiles: usize,
    pub record_bytes: usize,
}

impl Default for ResolverCache {
    fn default() -> Self {
        ResolverCache { profiles: DEFAULT_CACHE_PROFILES, record_bytes: DEFAULT_RECORD_CACHE_BYTES }
    }
}

impl ResolverCache {
    /// `profiles` in the graph, with the default record memory.
    pub fn profiles(profiles: usize) -> Self {
        ResolverCache { profiles, ..ResolverCache::default() }
    }
}

/// What a stored profile is expected to cost as a compact record, to decide
/// at start whether the whole store is worth loading.
const EXPECTED_RECORD_COST: usize = 400;

/// The resolver's bounded graph and where it stands in the log.
///
/// The graph in memory is a cache over storage: before each chunk of a
/// batch, the owners of every identifier the chunk looks up are loaded (from
/// the compact records beside the graph, or in one batched read of
/// storage), and whenever the graph fills (within a batch or after its
/// commit) the least recently used profiles leave it; they are kept as
/// compact records while the record memory lasts. Memory is set by the two
/// cache sizes and the batch size, not by the number of customers.
///
/// Resolving and committing overlap: while batch N is being written on a
/// committer thread, batch N+1 is resolved in memory. Profiles a batch
/// touched stay in memory until its commit is durable (they are the overlay
/// over storage that later reads need): as compact records marked unwritten
/// when the records can promise to keep them, so that a batch is not bound
/// by the graph, otherwise in the graph. The commit shares the records'
/// bytes rather than copying them. Commits are applied in
/// order, each checked against the position the previous one left, so a
/// failed or refused commit refuses the ones after it too, and the resolver
/// starts again from storage. Dropping a resolver waits for its commit.
pub struct Resolver {
    store: Arc<dyn Store>,
    graph: IdentityGraph,
    rules: CompiledRules,
    epoch: u64,
    /// Resolved in memory (ahead of `committed` while a commit is in flight).
    resolved: LogPosition,
    /// Durable in storage.
    committed: LogPosition,
    in_flight: Option<InFlight>,
    cache: CacheBook,
    records: records::ProfileRecords,
    /// Live profiles in storage once every resolved batch is committed.
    live_profiles: u64,
    metrics: Metrics,
    /// Where each durable commit's position is published, for the stages
    /// that read only what the resolver has committed.
    progress: Progress<LogPosition>,
    unusable_warning: RateLimitedWarning,
    /// Events resolved per look-up of their identifiers' owners.
    chunk: usize,
}

/// Which profiles in memory were used when, to drop the least recently used.
struct CacheBook {
    capacity: usize,
    record_bytes: usize,
    /// Batches resolved so far; the current one's number.
    batch: u64,
    /// The last batch whose commit is durable.
    durable_batch: u64,
    /// When each profile in the graph was last used: the batch in the high
    /// 32 bits, the chunk within it in the low ones.
    last_used: HashMap<ProfileId, u64, foldhash::fast::RandomState>,
    /// The current chunk's time, as `last_used` counts it.
    now: u64,
    /// The graph and the compact records together hold every stored
    /// profile: an identifier found in neither belongs to no one, without
    /// asking storage.
    complete: bool,
}

impl CacheBook {
    fn new(cache: ResolverCache) -> Self {
        CacheBook {
            capacity: cache.profiles,
            record_bytes: cache.record_bytes,
            batch: 0,
            durable_batch: 0,
            last_used: HashMap::default(),
            now: 0,
            complete: false,
        }
    }

    /// Starts the next batch, and its first chunk.
    fn next_batch(&mut self) {
        self.batch += 1;
        self.now = self.batch << 32;
    }

    /// Starts the next chunk of the current batch.
    fn next_chunk(&mut self) {
        self.now += 1;
    }

    /// The batch a `last_used` time falls in.
    fn batch_of(time: u64) -> u64 {
        time >> 32
    }

    fn size(&self) -> ResolverCache {
        ResolverCache { profiles: self.capacity, record_bytes: self.record_bytes }
    }

    /// Whether the records can take a whole graph's profiles, so that a
    /// batch's profiles leave the graph as records, before or while its
    /// commit is written. Then a batch may outgrow the graph; otherwise it
    /// stays within half of it, the other half holding the batch being
    /// written.
    fn demotes_unwritten(&self) -> bool {
        self.record_bytes >= self.capacity.saturating_mul(EXPECTED_RECORD_COST)
    }

    /// Graph profiles above which eviction runs, and how many it keeps.
    fn eviction_levels(&self) -> (usize, usize) {
        if self.demotes_unwritten() {
            (self.capacity / 4 * 3, self.capacity / 4)
        } else {
            (self.capacity, self.capacity / 4 * 3)
        }
    }
}

/// Events resolved per look-up of their identifiers' owners.
const LOOK_UP_CHUNK: usize = 512;

/// Log entries read at a time within a batch, so a large batch does not
/// hold all its raw events in memory at once.
const READ_PAGE: usize = 10_000;

/// Profiles read per page when a store small enough for the cache is loaded whole.
const PRELOAD_PAGE: usize = 10_000;

/// A compact record the resolver wrote and cannot read back.
fn unreadable_record(error: tandem_core::profile_record::ProfileRecordError) -> ResolveError {
    ResolveError::Inconsistent(format!("a profile record kept in memory is unreadable: {error}"))
}

/// A warning that repeats at most once per interval, saying how many were
/// held back, so a stream of bad events cannot flood the log.
pub(crate) struct RateLimitedWarning {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarning {
    pub(crate) const fn new(interval: Duration) -> Self {
        RateLimitedWarning { interval, last: None, suppressed: 0 }
    }

    /// Whether to log now; `Some(n)` with the number held back since the last one.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

struct InFlight {
    to: LogPosition,
    /// The batch it writes.
    batch: u64,
    commit: std::thread::JoinHandle<Result<CommitOutcome, StoreError>>,
}

impl Resolver {
    /// A resolver continuing where the last commit ended, with the default cache size.
    pub fn load(store: Arc<dyn Store>) -> Result<Resolver, ResolveError> {
        Resolver::with_cache(store, ResolverCache::default())
    }

    /// A resolver keeping at most `cache.profiles` profiles in its graph
    /// (more only while one chunk of a batch needs more at once, or while
    /// the records cannot take the profiles of a commit being written) and
    /// about `cache.record_bytes` of compact records beside it.
    pub fn with_cache(store: Arc<dyn Store>, cache: ResolverCache) -> Result<Resolver, ResolveError> {
        let state = store.identity_state()?;
        let rules = state.rules.compile()?;
        let mut graph = IdentityGraph::from_parts([], [], state.next_profile_id);
        let mut records = records::ProfileRecords::new(cache.record_bytes);
        let mut book = CacheBook::new(cache);
        let in_graph = book.eviction_levels().1;
        // A store that is expected to fit in memory is loaded whole (the
        // graph up to the level eviction keeps, the rest as records): then a
        // miss means a new identifier, and needs no read.
        let room = in_graph.saturating_add(cache.record_bytes / EXPECTED_RECORD_COST);
        if state.live_profiles as usize <= room {
            let mut after = None;
            let mut lost = false;
            'loading: loop {
                let page = store.list_profiles(after, PRELOAD_PAGE)?;
                let Some(last) = page.last() else {
                    break;
                };
                after = Some(last.id);
                for profile in page {
                    if graph.profile_count() < in_graph {
                        book.last_used.insert(profile.id, 0);
                        graph.insert_profile(profile);
                    } else if !records.keep(&profile) {
                        lost = true;
                        break 'loading;
                    }
                }
            }
            book.complete = !lost && (graph.profile_count() + records.len()) as u64 == state.live_profiles;
        }
        Ok(Resolver {
            store,
            graph,
            rules,
            epoch: state.epoch,
            resolved: state.position,
            committed: state.position,
            in_flight: None,
            cache: book,
            records,
            live_profiles: state.live_profiles,
            metrics: Metrics::new(),
            progress: Progress::default(),
            unusable_warning: RateLimitedWarning::new(Duration::from_secs(10)),
            chunk: LOOK_UP_CHUNK,
        })
    }

    /// Resolves `chunk` events per look-up of their owners, so that tests
    /// with a handful of events can fill a tiny graph in the middle of a batch.
    #[cfg(test)]
    fn with_chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk.max(1);
        self
    }

    /// Reports to these metrics (the server's) instead of private ones.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self.metrics.resolver_position.set(self.committed.0 as i64);
        self.metrics.resolver_profiles.set(self.live_profiles as i64);
        self.publish_cache_sizes();
        self
    }

    /// Publishes each commit's position to `progress` once it is durable.
    pub fn with_progress(mut self, progress: Progress<LogPosition>) -> Self {
        progress.publish(self.committed);
        self.progress = progress;
        self
    }

    /// Starts again from storage, keeping the metrics, the progress signal
    /// and the cache size.
    fn reload(&mut self) -> Result<(), ResolveError> {
        let (metrics, progress, chunk) = (self.metrics.clone(), self.progress.clone(), self.chunk);
        *self =
            Resolver::with_cache(self.store.clone(), self.cache.size())?.with_metrics(metrics).with_progress(progress);
        self.chunk = chunk;
        Ok(())
    }

    /// The last log position whose effects are durable.
    pub fn position(&self) -> LogPosition {
        self.committed
    }

    /// Profiles held in the graph now.
    pub fn cached_profiles(&self) -> usize {
        self.graph.profile_count()
    }

    /// Profiles kept as compact records now.
    pub fn record_profiles(&self) -> usize {
        self.records.len()
    }

    fn publish_cache_sizes(&self) {
        self.metrics.resolver_cached_profiles.set(self.graph.profile_count() as i64);
        self.metrics.resolver_record_profiles.set(self.records.len() as i64);
        self.metrics.resolver_record_bytes.set(self.records.used_bytes() as i64);
    }

    /// Resolves up to `limit` events after the last resolved position and
    /// starts committing them; returns how many were resolved. Returns 0 when
    /// caught up (after waiting for the last commit), or when identity state
    /// was rewritten elsewhere and the resolver had to start again.
    pub fn step(&mut self, limit: usize) -> Result<usize, ResolveError> {
        let started = std::time::Instant::now();
        self.cache.next_batch();
        self.graph.forget_merges();
        let mut batch = BatchChanges::default();
        let mut to = self.resolved;
        let mut resolved = 0;
        // When each event of the batch was received, for the age metric.
        let mut received_at_ms = Vec::new();
        // A batch's profiles stay in memory until its commit is durable,
        // beside those of the batch resolved meanwhile: as records when the
        // records can take a graph's worth, when the batch moves its own
        // profiles there each time it fills the graph; otherwise in the
        // graph, when a batch ends once it has touched half the cache's
        // profiles.
        let demoting = self.cache.demotes_unwritten();
        let touched_bound = if demoting { usize::MAX } else { (self.cache.capacity / 2).max(self.chunk) };
        'reading: while resolved < limit {
            let wanted = (limit - resolved).min(READ_PAGE);
            let entries = match self.store.read_log(to, wanted) {
                Ok(entries) => entries,
                Err(error) => {
                    // Memory holds part of a batch that will not be
                    // committed: start again from storage, or the next step
                    // would apply those events a second time.
                    return Err(if resolved > 0 { self.start_over(error.into()) } else { error.into() });
                }
            };
            let end_of_log = entries.len() < wanted;
            // Parsed events are held a chunk at a time: storage is read once
            // per chunk, and memory is reused rather than grown with the batch.
            for chunk in entries.chunks(self.chunk) {
                if let Err(error) = self.resolve_chunk(chunk, &mut batch) {
                    // Memory may hold part of a load.
                    return Err(self.start_over(error));
                }
                to = chunk.last().expect("chunks are not empty").position;
                resolved += chunk.len();
                received_at_ms.extend(chunk.iter().map(|entry| entry.received_at_ms));
                if batch.touched.len() >= touched_bound {
                    break 'reading;
                }
                if demoting && self.graph.profile_count() >= self.cache.capacity && !self.make_room(&mut batch) {
                    break 'reading;
                }
            }
            if end_of_log {
                break;
            }
        }
        if resolved == 0 {
            self.flush()?;
            return Ok(0);
        }
        self.metrics.resolver_batch_duration.observe(started.elapsed().as_secs_f64());
        self.live_profiles = (self.live_profiles + batch.created).saturating_sub(batch.merged.len() as u64);
        self.metrics.resolver_profiles.set(self.live_profiles as i64);
        let commit = match batch.into_commit(&self.graph, &self.records, self.epoch, self.resolved, to) {
            Ok(commit) => commit,
            Err(error) => return Err(self.start_over(error)),
        };
        tracing::debug!(
            events = resolved,
            profiles = commit.profiles.len(),
            resolve_ms = started.elapsed().as_millis() as u64,
            "resolved a batch"
        );
        if !self.flush()? {
            // The resolver started again: this batch was computed on stale state.
            return Ok(0);
        }
        // The previous batch is durable: what only it used may leave memory.
        self.evict(Some(&commit.profiles));
        let store = self.store.clone();
        let progress = self.progress.clone();
        let metrics = self.metrics.clone();
        let commit = std::thread::Builder::new()
            .name("tandem-resolver-commit".into())
            .spawn(move || {
                let writing = Instant::now();
                let outcome = store.commit_identity(&commit);
                metrics.resolver_commit_duration.observe(writing.elapsed().as_secs_f64());
                // Published from here, not when the resolver next looks:
                // the stages after it start on the batch while the
                // resolver is busy with the next one.
                if matches!(outcome, Ok(CommitOutcome::Committed)) {
                    progress.publish(to);
                    metrics.observe_event_ages("resolve", chrono::Utc::now().timestamp_millis(), received_at_ms);
                }
                outcome
            })
            .expect("spawning a resolver commit");
        self.in_flight = Some(InFlight { to, batch: self.cache.batch, commit });
        self.resolved = to;
        Ok(resolved)
    }

    /// Drops the batch being resolved after `error`: waits for the commit in
    /// flight and starts again from storage, so the next step does not apply
    /// the batch's events on top of their own effects. Answers the error to
    /// report (the first of these to fail, if one does).
    fn start_over(&mut self, error: ResolveError) -> ResolveError {
        match self.flush().and_then(|_| self.reload()) {
            Ok(()) => error,
            Err(failed) => failed,
        }
    }

    /// Makes room in a full graph in the middle of a batch: moves profiles
    /// out as [`Resolver::evict`] does, this batch's own included (as
    /// unwritten records, which its commit will share). First the batch's
    /// new identifiers are settled on their owners, since a moved profile's
    /// identifiers leave the graph's index. Returns `false` when too few
    /// could leave, and the batch must end.
    fn make_room(&mut self, batch: &mut BatchChanges) -> bool {
        batch.settle_owners(&self.graph);
        self.evict(None);
        self.graph.profile_count() <= self.cache.eviction_levels().0
    }

    /// Resolves consecutive log entries into `batch`, first loading the
    /// owners of every identifier they look up.
    fn resolve_chunk(&mut self, chunk: &[LogEntry], batch: &mut BatchChanges) -> Result<(), ResolveError> {
        let events: Vec<Result<(Event, EventIdentifiers), serde_json::Error>> = chunk
            .iter()
            .map(|entry| {
                let event = serde_json::from_str::<Event>(&entry.payload)?;
                let identifiers = EventIdentifiers::of(&event, &self.rules);
                Ok((event, identifiers))
            })
            .collect();
        let wanted: HashSet<&Identifier> =
            events.iter().flatten().flat_map(|(_, identifiers)| identifiers.to_look_up()).collect();
        self.cache.next_chunk();
        self.load_owners(&wanted)?;
        drop(wanted);
        for (entry, event) in chunk.iter().zip(events) {
            match event {
                Ok((event, identifiers)) => {
                    let resolution = self.graph.resolve_identified(entry.position.0, &event, &self.rules, identifiers);
                    match resolution.profile {
                        // What the batch changed stays in memory until its
                        // commit is durable, and counts as recently used.
                        Some(profile) => {
                            self.cache.last_used.insert(profile, self.cache.now);
                        }
                        None => self.unusable(batch, entry.position, unusable_reason(&resolution)),
                    }
                    batch.add(entry.position, entry.timestamp_ms, resolution);
                }
                Err(error) => self.unusable(batch, entry.position, format!("unreadable event: {error}")),
            }
        }
        Ok(())
    }

    /// Puts in the graph the owner of every identifier in `wanted` that has
    /// one, with its whole profile: from the compact records, or reading
    /// storage once for those found in neither (unless memory holds every
    /// stored profile, when those are new).
    fn load_owners(&mut self, wanted: &HashSet<&Identifier>) -> Result<(), ResolveError> {
        let mut in_memory = 0;
        let mut ask_storage = Vec::new();
        for identifier in wanted.iter().copied() {
            if self.graph.lookup(identifier).is_some() {
                in_memory += 1;
                continue;
            }
            match self.records.take_owner(identifier).map_err(unreadable_record)? {
                records::Owner::Found(profile) => {
                    in_memory += 1;
                    self.cache.last_used.insert(profile.id, self.cache.now);
                    self.graph.insert_profile(profile);
                }
                records::Owner::NotHere if !self.cache.complete => ask_storage.push(identifier.clone()),
                records::Owner::NotHere => {}
            }
        }
        self.metrics.resolver_cache_hits.inc_by(in_memory);
        self.metrics.resolver_cache_misses.inc_by(wanted.len() as u64 - in_memory);
        if ask_storage.is_empty() {
            return Ok(());
        }
        let owners = self.store.identifier_owners(&ask_storage)?;
        // A profile in memory is never older than storage's copy, and holds
        // every identifier storage gives it: only profiles in neither the
        // graph nor the records are read.
        let absent: BTreeSet<ProfileId> =
            owners.iter().map(|(_, owner)| *owner).filter(|owner| !self.graph.holds(*owner)).collect();
        let mut to_read = Vec::new();
        for id in absent {
            match self.records.take(id) {
                Some(profile) => {
                    let profile = profile.map_err(unreadable_record)?;
                    self.cache.last_used.insert(profile.id, self.cache.now);
                    self.graph.insert_profile(profile);
                }
                None => to_read.push(id),
            }
        }
        for profile in self.store.profiles(&to_read)? {
            self.cache.last_used.insert(profile.id, self.cache.now);
            self.graph.insert_profile(profile);
        }
        if let Some((identifier, owner)) = owners.iter().find(|(_, owner)| !self.graph.holds(*owner)) {
            return Err(ResolveError::Inconsistent(format!("{identifier} belongs to {owner}, which is not stored")));
        }
        Ok(())
    }

    /// Moves the least recently used profiles out of the graph into the
    /// compact records once the graph passes its eviction level, down to the
    /// level it keeps (so eviction runs once per batch, or each time a batch
    /// fills the graph, not at every profile). Profiles last used by a batch
    /// whose commit is not durable yet (the one in flight, the one being
    /// resolved) leave only when the records promise to keep them
    /// ([`records::ProfileRecords::keep_unwritten`]), the current batch's as
    /// `unwritten` (its commit, once made) holds; others stay.
    fn evict(&mut self, unwritten: Option<&CommitProfiles>) {
        let graph = &self.graph;
        let cache = &mut self.cache;
        let (above, keep) = cache.eviction_levels();
        if graph.profile_count() > above {
            cache.last_used.retain(|id, _| graph.holds(*id));
            let demoting = cache.demotes_unwritten();
            let mut candidates: Vec<(u64, ProfileId)> = cache
                .last_used
                .iter()
                .filter(|(_, used)| demoting || CacheBook::batch_of(**used) <= cache.durable_batch)
                .map(|(id, used)| (*used, *id))
                .collect();
            let excess = graph.profile_count().saturating_sub(keep).min(candidates.len());
            if excess > 0 && excess < candidates.len() {
                candidates.select_nth_unstable(excess);
            }
            candidates.truncate(excess);
            // Least recently used first. The records never drop an unwritten
            // one; written ones kept before them are the first to go.
            candidates.sort_unstable();
            let encoded: HashMap<ProfileId, &Arc<[u8]>> = match unwritten {
                Some(commit) if demoting => commit.shared_records().collect(),
                _ => HashMap::new(),
            };
            for (used, id) in candidates {
                let batch = CacheBook::batch_of(used);
                if batch > self.cache.durable_batch {
                    let Some(profile) = self.graph.profile(id) else { continue };
                    let record = if batch == self.cache.batch { encoded.get(&id).copied() } else { None };
                    match self.records.keep_unwritten(profile, record, batch) {
                        Some(whole) => {
                            self.cache.complete &= whole;
                            self.graph.remove_profile(id);
                        }
                        // It stays in the graph until its commit is durable.
                        None => continue,
                    }
                } else if let Some(profile) = self.graph.remove_profile(id) {
                    if !self.records.keep(&profile) {
                        self.cache.complete = false;
                    }
                }
                self.cache.last_used.remove(&id);
            }
        }
        self.publish_cache_sizes();
    }

    /// Keeps an event the graph could not use in the commit's unresolved
    /// list, counts it, and warns (rate-limited).
    fn unusable(&mut self, batch: &mut BatchChanges, position: LogPosition, reason: String) {
        self.metrics.resolver_unusable_events.inc();
        if let Some(held_back) = self.unusable_warning.admit(Instant::now()) {
            tracing::warn!(%position, %reason, held_back, "an event the resolver cannot use was listed as unresolved");
        }
        batch.unresolved.push(UnresolvedEvent { position, reason });
    }

    /// Waits for the commit in flight. Returns `false` when it was refused
    /// (identity state changed elsewhere) and the resolver started again.
    pub fn flush(&mut self) -> Result<bool, ResolveError> {
        let Some(in_flight) = self.in_flight.take() else {
            return Ok(true);
        };
        let outcome = in_flight.commit.join();
        match outcome {
            Ok(Ok(CommitOutcome::Committed)) => {
                self.committed = in_flight.to;
                self.cache.durable_batch = in_flight.batch;
                self.records.written_through(in_flight.batch);
                self.metrics.resolver_position.set(self.committed.0 as i64);
                Ok(true)
            }
            Ok(Ok(outcome @ (CommitOutcome::StalePosition | CommitOutcome::EpochChanged))) => {
                tracing::info!(?outcome, "identity state changed outside the resolver; reloading");
                self.reload()?;
                Ok(false)
            }
            Ok(Err(error)) => {
                // Memory holds changes that were not stored: start over from storage.
                let _ = self.reload();
                Err(error.into())
            }
            Err(_) => {
                self.reload()?;
                Err(ResolveError::CommitPanicked)
            }
        }
    }

    /// Steps until the log is exhausted and everything is committed; returns
    /// events resolved.
    pub fn catch_up(&mut self, batch: usize) -> Result<u64, ResolveError> {
        let mut total = 0;
        loop {
            let applied = self.step(batch)?;
            if applied == 0 && self.in_flight.is_none() && self.store.read_log(self.committed, 1)?.is_empty() {
                return Ok(total);
            }
            total += applied as u64;
        }
    }
}

/// Why an event that resolved to no profile is listed as unresolved.
fn unusable_reason(resolution: &Resolution) -> String {
    let dropped: Vec<String> = resolution
        .changes
        .iter()
        .filter_map(|change| match change {
            IdentityChange::Dropped { identifier, reason, .. } => Some(format!("{identifier} ({reason})")),
            _ => None,
        })
        .collect();
    if dropped.is_empty() {
        "the event carries no identifier".to_owned()
    } else {
        format!("no usable identifier: {}", dropped.join(", "))
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        if let Some(in_flight) = self.in_flight.take() {
            let _ = in_flight.commit.join();
        }
    }
}

/// What a batch of resolutions must write.
#[derive(Default)]
struct BatchChanges {
    touched: BTreeSet<ProfileId>,
    merged: Vec<(ProfileId, ProfileId)>,
    created: u64,
    /// Identifiers the batch gave a profile, not yet settled on their owner.
    added: Vec<Identifier>,
    /// Identifiers the batch gave a profile, with that profile when the
    /// batch last made room (a later merge may have moved them on).
    settled: Vec<(Identifier, ProfileId)>,
    events: Vec<EventLink>,
    history: Vec<(LogPosition, IdentityChange)>,
    unresolved: Vec<UnresolvedEvent>,
}

impl BatchChanges {
    fn add(&mut self, position: LogPosition, timestamp_ms: i64, resolution: Resolution) {
        let Resolution { profile, merged_away, changes } = resolution;
        if let Some(profile) = profile {
            self.touched.insert(profile);
            self.events.push(EventLink { position, timestamp_ms, profile });
            for merged in merged_away {
                self.merged.push((merged, profile));
            }
        }
        for change in changes {
            if let IdentityChange::Created { identifiers, .. } | IdentityChange::Attached { identifiers, .. } = &change
            {
                self.added.extend(identifiers.iter().cloned());
            }
            if let IdentityChange::Created { .. } = &change {
                self.created += 1;
            }
            self.history.push((position, change));
        }
    }

    /// Settles each identifier added so far on the profile holding it in
    /// the graph now, before profiles leave the graph's index.
    fn settle_owners(&mut self, graph: &IdentityGraph) {
        for identifier in self.added.drain(..) {
            if let Some(owner) = graph.lookup(&identifier) {
                self.settled.push((identifier, owner));
            }
        }
    }

    /// Ids as they stand at the end of the batch: a profile merged later in
    /// the same batch is written under its survivor. A profile the batch
    /// moved out of the graph is written as the records keep it.
    fn into_commit(
        mut self,
        graph: &IdentityGraph,
        records: &records::ProfileRecords,
        epoch: u64,
        from: LogPosition,
        to: LogPosition,
    ) -> Result<IdentityCommit, ResolveError> {
        self.settle_owners(graph);
        let live = |id: ProfileId| graph.survivor(id);
        let recorded_at_ms = chrono::Utc::now().timestamp_millis();
        let live_touched: BTreeSet<ProfileId> = self.touched.iter().map(|id| live(*id)).collect();
        let mut profiles = CommitProfiles::default();
        for id in live_touched {
            match (graph.profile(id), records.unwritten_record(id)) {
                (Some(profile), _) => profiles.push(profile),
                (None, Some(record)) => profiles.push_record(id, record.clone()),
                (None, None) => {
                    return Err(ResolveError::Inconsistent(format!("profile {id} changed and is no longer in memory")))
                }
            }
        }
        Ok(IdentityCommit {
            epoch,
            from,
            to,
            profiles,
            merged: self.merged,
            identifiers: self.settled.into_iter().map(|(identifier, owner)| (identifier, live(owner))).collect(),
            events: self.events.into_iter().map(|link| EventLink { profile: live(link.profile), ..link }).collect(),
            unresolved: self.unresolved,
            history: self
                .history
                .into_iter()
                .map(|(position, change)| HistoryRecord {
                    position: Some(position),
                    profile: change.profile().map(live),
                    change,
                    recorded_at_ms,
                })
                .collect(),
            next_profile_id: graph.next_id(),
            rules: None,
        })
    }
}

/// A repair an admin asks for.
#[derive(Clone, Debug)]
pub enum Repair {
    /// Take an identifier off a profile: it stops linking anything.
    Unlink { profile: ProfileId, identifier: Identifier },
    /// Never use an identifier again, wherever it is.
    Block { identifier: Identifier },
}

/// What a repair did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RepairReport {
    pub identifier: Identifier,
    /// The profile that held the identifier before the repair, if any.
    pub profile_before: Option<ProfileId>,
    /// Live profiles in the whole graph before and after.
    pub profiles_before: u64,
    pub profiles_after: u64,
    /// Events replayed to rebuild the part of the graph the identifier touched.
    pub events_replayed: u64,
    /// Profiles the replay rewrote.
    pub profiles_replayed: u64,
    /// The live profiles that now hold the events the old profile held.
    pub profiles_now: Vec<ProfileId>,
}

/// The part of the graph an identifier touched, closed under every link an
/// event could make: the profiles holding it or having dropped it, and
/// repeatedly the profiles holding or having dropped any identifier their
/// events carry. Events outside it share no identifier with events inside
/// it, so resolving the part again on its own gives exactly what resolving
/// the whole log again would.
struct AffectedPart {
    /// The old profiles, by id.
    profiles: BTreeMap<ProfileId, Profile>,
    /// Their events and the events that dropped one of their identifiers
    /// without landing on a profile, by position, with the event time.
    events: BTreeMap<u64, (i64, Event)>,
    /// Which old profile held each event.
    owners: HashMap<u64, ProfileId>,
}

/// Events read per page while collecting a profile's timeline.
const REPAIR_PAGE: usize = 1_000;

fn affected_part(
    store: &Arc<dyn Store>,
    rules: &CompiledRules,
    identifier: &Identifier,
    up_to: LogPosition,
) -> Result<AffectedPart, ResolveError> {
    let mut part = AffectedPart { profiles: BTreeMap::new(), events: BTreeMap::new(), owners: HashMap::new() };
    let mut seen: HashSet<Identifier> = HashSet::from([identifier.clone()]);
    let mut pending_identifiers = vec![identifier.clone()];
    let mut pending_profiles: Vec<ProfileId> = Vec::new();
    let carried = |event: &Event, seen: &mut HashSet<Identifier>, pending: &mut Vec<Identifier>| {
        for carried in IdentityGraph::identifiers_carried(event, rules) {
            if seen.insert(carried.clone()) {
                pending.push(carried);
            }
        }
    };
    loop {
        if !pending_identifiers.is_empty() {
            let identifiers = std::mem::take(&mut pending_identifiers);
            pending_profiles.extend(store.identifier_owners(&identifiers)?.into_iter().map(|(_, owner)| owner));
            for (position, profile) in store.dropped_at(&identifiers)? {
                match profile {
                    Some(profile) => pending_profiles.push(profile),
                    None if position <= up_to && !part.events.contains_key(&position.0) => {
                        let Some(entry) = store.read_log(LogPosition(position.0 - 1), 1)?.into_iter().next() else {
                            continue;
                        };
                        if let Ok(event) = serde_json::from_str::<Event>(&entry.payload) {
                            carried(&event, &mut seen, &mut pending_identifiers);
                            part.events.insert(position.0, (entry.timestamp_ms, event));
                        }
                    }
                    None => {}
                }
            }
            continue;
        }
        let Some(id) = pending_profiles.pop() else {
            return Ok(part);
        };
        // Ids in history may have merged since: follow them to the live profile.
        let Some(profile) = store.profile(id)? else {
            continue;
        };
        if part.profiles.contains_key(&profile.id) {
            continue;
        }
        let live = profile.id;
        for identifier in &profile.identifiers {
            if seen.insert(identifier.clone()) {
                pending_identifiers.push(identifier.clone());
            }
        }
        part.profiles.insert(live, profile);
        let mut before = None;
        loop {
            let page = store.profile_events(live, before, REPAIR_PAGE)?;
            let Some(last) = page.last() else {
                break;
            };
            before = Some(tandem_store::TimelineCursor::at(last));
            for entry in page {
                if entry.position > up_to {
                    continue;
                }
                if let Ok(event) = serde_json::from_str::<Event>(&entry.payload) {
                    carried(&event, &mut seen, &mut pending_identifiers);
                    part.owners.insert(entry.position.0, live);
                    part.events.insert(entry.position.0, (entry.timestamp_ms, event));
                }
            }
        }
    }
}

/// Blocks the identifier in the rules and replays the part of the graph it
/// touched under them, so profiles, traits and timelines come out exactly as
/// if the bad link had never existed; the rest of the graph is not read.
/// Profile ids stay stable where they can.
pub fn repair(store: &Arc<dyn Store>, repair: &Repair) -> Result<RepairReport, ResolveError> {
    for _attempt in 0..20 {
        let state = store.identity_state()?;
        let (identifier, action, profile_before) = match repair {
            Repair::Unlink { profile, identifier } => {
                let live = store.profile(*profile)?.ok_or(ResolveError::UnknownProfile(*profile))?;
                if !live.identifiers.contains(identifier) {
                    return Err(ResolveError::NotOnProfile(identifier.clone(), *profile));
                }
                (identifier.clone(), "unlink", Some(live.id))
            }
            Repair::Block { identifier } => {
                (identifier.clone(), "block", store.profile_by_identifier(identifier)?.map(|profile| profile.id))
            }
        };
        let old_rules = state.rules.clone().compile()?;
        let mut rules = state.rules.clone();
        if !rules.blocked_identifiers.contains(&identifier) {
            rules.blocked_identifiers.push(identifier.clone());
        }
        let compiled = rules.clone().compile()?;
        let part = affected_part(store, &old_rules, &identifier, state.position)?;
        let old = IdentityGraph::from_parts(part.profiles.values().cloned(), [], state.next_profile_id);
        let replay = part.events.iter().map(|(position, (_, event))| (*position, event.clone()));
        let rebuilt = old.rebuild(replay, &compiled, |position| part.owners.get(&position).copied());
        let live = |id: ProfileId| rebuilt.graph.canonical(id).unwrap_or(id);
        let new_owners: HashMap<u64, ProfileId> = rebuilt
            .resolutions
            .iter()
            .filter_map(|(position, resolution)| resolution.profile.map(|profile| (*position, live(profile))))
            .collect();
        let profiles_now: BTreeSet<ProfileId> = part
            .owners
            .iter()
            .filter(|(_, owner)| Some(**owner) == profile_before)
            .filter_map(|(position, _)| new_owners.get(position).copied())
            .collect();
        // Old ids that no longer name a profile point at the profile now
        // holding their earliest event.
        let mut earliest: BTreeMap<ProfileId, u64> = BTreeMap::new();
        for (position, owner) in &part.owners {
            let first = earliest.entry(*owner).or_insert(*position);
            *first = (*first).min(*position);
        }
        let mut merged: Vec<(ProfileId, ProfileId)> =
            rebuilt.graph.merged_into().map(|(from, _)| (from, live(from))).collect();
        for (old_id, position) in earliest {
            if !rebuilt.graph.holds(old_id) {
                if let Some(now) = new_owners.get(&position) {
                    merged.push((old_id, *now));
                }
            }
        }
        merged.retain(|(from, into)| from != into && !rebuilt.graph.holds(*from));
        merged.sort();
        merged.dedup_by_key(|(from, _)| *from);
        let recorded_at_ms = chrono::Utc::now().timestamp_millis();
        let mut history: Vec<HistoryRecord> = Vec::new();
        let mut events = Vec::new();
        let mut unresolved = Vec::new();
        for (position, resolution) in &rebuilt.resolutions {
            match resolution.profile {
                Some(profile) => events.push(EventLink {
                    position: LogPosition(*position),
                    timestamp_ms: part.events[position].0,
                    profile: live(profile),
                }),
                None => unresolved
                    .push(UnresolvedEvent { position: LogPosition(*position), reason: unusable_reason(resolution) }),
            }
            for change in &resolution.changes {
                history.push(HistoryRecord {
                    position: Some(LogPosition(*position)),
                    profile: change.profile().map(live),
                    change: change.clone(),
                    recorded_at_ms,
                });
            }
        }
        for profile in profiles_now.iter().copied().map(Some).chain(profile_before.is_none().then_some(None)) {
            history.push(HistoryRecord {
                position: None,
                profile,
                change: IdentityChange::Repaired { profile, identifier: identifier.clone(), action: action.to_owned() },
                recorded_at_ms,
            });
        }
        let profiles: Vec<&Profile> = rebuilt.graph.profiles().collect();
        let profiles_after = (state.live_profiles + profiles.len() as u64).saturating_sub(part.profiles.len() as u64);
        let commit = IdentityCommit {
            epoch: state.epoch,
            from: state.position,
            to: state.position,
            identifiers: profiles
                .iter()
                .flat_map(|profile| profile.identifiers.iter().map(move |identifier| (identifier.clone(), profile.id)))
                .collect(),
            profiles: profiles.into_iter().collect(),
            merged,
            events,
            history,
            unresolved,
            next_profile_id: rebuilt.graph.next_id(),
            rules: Some(rules),
        };
        let repair = IdentityRepair {
            commit,
            replaced_profiles: part.profiles.keys().copied().collect(),
            replayed: part.events.keys().map(|position| LogPosition(*position)).collect(),
        };
        if store.repair_identity(&repair)? == CommitOutcome::Committed {
            return Ok(RepairReport {
                identifier,
                profile_before,
                profiles_before: state.live_profiles,
                profiles_after,
                events_replayed: part.events.len() as u64,
                profiles_replayed: part.profiles.len() as u64,
                profiles_now: profiles_now.into_iter().collect(),
            });
        }
    }
    Err(ResolveError::Contended)
}

/// Replaces the identity rules (they apply to events resolved from now on).
pub fn set_rules(store: &dyn Store, rules: IdentityRules) -> Result<(), ResolveError> {
    rules.clone().compile()?;
    store.set_identity_rules(&rules)?;
    Ok(())
}

/// How often a node without the resolver lease asks for it again, and how
/// often the holder checks that it still has it.
const LEASE_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the resolver thread: it takes the resolver's stage lease (at once
/// on the embedded store; on PostgreSQL when no other node holds it, asking
/// again every [`LEASE_INTERVAL`]), resolves whatever reaches the log head
/// while it holds the lease, and goes back to waiting if it loses it. It
/// waits on the log head, and re-reads the log at least every
/// [`IDLE_RECHECK`] whatever the head says, and publishes each durable
/// commit to `resolved`. Stops once `stop` is set, after finishing what is
/// already in the log.
pub fn spawn(
    store: Arc<dyn Store>,
    head: LogHead,
    resolved: Progress<LogPosition>,
    metrics: Metrics,
    cache: ResolverCache,
    stop: Arc<AtomicBool>,
    leases: LeaseBoard,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("tandem-resolver".into())
        .spawn(move || {
            let node = ResolverNode { store, head, resolved, metrics, cache, stop, leases };
            while let Some(lease) = node.wait_for_lease() {
                node.leases.set(Stage::RESOLVE, true);
                node.metrics.resolver_lease_held.set(1);
                tracing::info!("this node holds the resolver lease and runs the resolver");
                let lost = node.resolve_while_held(lease);
                node.leases.set(Stage::RESOLVE, false);
                node.metrics.resolver_lease_held.set(0);
                match lost {
                    Some(lost) => tracing::warn!(%lost, "stopped resolving; waiting for the lease again"),
                    None => break,
                }
            }
        })
        .expect("spawning the resolver thread")
}

/// What the resolver thread works with.
struct ResolverNode {
    store: Arc<dyn Store>,
    head: LogHead,
    resolved: Progress<LogPosition>,
    metrics: Metrics,
    cache: ResolverCache,
    stop: Arc<AtomicBool>,
    leases: LeaseBoard,
}

impl ResolverNode {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Asks for the resolver lease until granted; `None` once told to stop.
    fn wait_for_lease(&self) -> Option<StageLease> {
        self.leases.set(Stage::RESOLVE, false);
        let mut said_waiting = false;
        let mut failing = RateLimitedWarning::new(Duration::from_secs(30));
        loop {
            if self.stopping() {
                return None;
            }
            match self.store.try_lease(Stage::RESOLVE) {
                Ok(Some(lease)) => return Some(lease),
                Ok(None) if !said_waiting => {
                    tracing::info!("another node runs the resolver; waiting to take over its lease");
                    said_waiting = true;
                }
                Ok(None) => {}
                Err(error) => {
                    if let Some(held_back) = failing.admit(Instant::now()) {
                        tracing::warn!(%error, held_back, "asking for the resolver lease failed; retrying");
                    }
                }
            }
            std::thread::sleep(LEASE_INTERVAL);
        }
    }

    /// Resolves while `lease` holds: `None` once told to stop (caught up),
    /// or why the lease was lost.
    fn resolve_while_held(&self, mut lease: StageLease) -> Option<LeaseLost> {
        let mut last_check = Instant::now();
        let mut check = |lease: &mut StageLease| -> Result<(), LeaseLost> {
            if last_check.elapsed() < LEASE_INTERVAL {
                return Ok(());
            }
            last_check = Instant::now();
            lease.check()
        };
        let mut resolver = loop {
            match Resolver::with_cache(self.store.clone(), self.cache) {
                Ok(resolver) => break resolver.with_metrics(self.metrics.clone()).with_progress(self.resolved.clone()),
                Err(error) => {
                    tracing::error!(%error, "the resolver cannot start; retrying");
                    if self.stopping() {
                        return None;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    if let Err(lost) = check(&mut lease) {
                        return Some(lost);
                    }
                }
            }
        };
        let mut follower = self.head.follow();
        loop {
            let stepped = resolver.step(SERVER_BATCH);
            let lag = self.head.current().0.saturating_sub(resolver.position().0);
            self.metrics.resolver_lag_events.set(lag as i64);
            match stepped {
                Ok(0) if self.stopping() => break,
                Ok(0) => {
                    follower.wait_beyond(resolver.position(), IDLE_RECHECK);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::error!(%error, "resolving failed; retrying");
                    if self.stopping() {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            if let Err(lost) = check(&mut lease) {
                // Dropping the resolver waits for its commit in flight; a
                // commit the next holder got ahead of is refused as stale.
                drop(resolver);
                return Some(lost);
            }
        }
        tracing::debug!(position = %resolver.position(), "resolver stopped");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};
    use tandem_core::collect::{normalize_message, BatchDefaults, IdRequirement, RequestContext};
    use tandem_core::{Profile, SourceKind};
    use tandem_store::prelude::*;
    use tandem_store::{IngestBatch, SqliteStore};

    /// A store holding `messages` in its log.
    fn store_with(dir: &std::path::Path, messages: &[Value]) -> Arc<dyn Store> {
        let store = SqliteStore::open(dir).unwrap();
        let source = store.create_source("web", SourceKind::Website).unwrap();
        let received_at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let request = RequestContext {
            source_id: &source.id,
            received_at,
            client_ip: None,
            ids: IdRequirement::UserOrAnonymousId,
        };
        let records = messages
            .iter()
            .map(|message| {
                let Value::Object(message) = message.clone() else { panic!("object expected") };
                normalize_message(message, None, &BatchDefaults::default(), &request).unwrap().to_log_record()
            })
            .collect();
        store.append(&[IngestBatch { records, rejected: Vec::new(), ..Default::default() }], 0).unwrap();
        Arc::new(store)
    }

    fn message(user: Option<u8>, anonymous: u8, email: Option<u8>, device: Option<u8>, plan: u8) -> Value {
        let mut message = json!({"type": "identify", "anonymousId": format!("a{anonymous}"), "traits": {"plan": plan}});
        if let Some(user) = user {
            message["userId"] = json!(format!("u{user}"));
        }
        if let Some(email) = email {
            message["traits"]["email"] = json!(format!("e{email}@example.com"));
        }
        if let Some(device) = device {
            message["context"] = json!({"device": {"id": format!("d{device}")}});
        }
        message
    }

    fn arbitrary_messages() -> impl Strategy<Value = Vec<Value>> {
        proptest::collection::vec(
            (proptest::option::of(0..5u8), 0..6u8, proptest::option::of(0..4u8), proptest::option::of(0..3u8), 0..3u8)
                .prop_map(|(user, anonymous, email, device, plan)| message(user, anonymous, email, device, plan)),
            1..40,
        )
    }

    /// Every live profile, by id.
    fn all_profiles(store: &Arc<dyn Store>) -> Vec<Profile> {
        let mut profiles: Vec<Profile> = Vec::new();
        loop {
            let page = store.list_profiles(profiles.last().map(|profile| profile.id), 100).unwrap();
            if page.is_empty() {
                return profiles;
            }
            profiles.extend(page);
        }
    }

    /// Profiles, which profile holds each event and each identifier.
    type StoredState = (Vec<Profile>, Vec<(LogPosition, ProfileId)>, Vec<(Identifier, ProfileId)>);

    fn stored_state(store: &Arc<dyn Store>) -> StoredState {
        let profiles = all_profiles(store);
        let mut events = store.event_owners(LogPosition(0), LogPosition(u64::MAX / 2)).unwrap();
        events.sort();
        let identifiers: Vec<Identifier> =
            profiles.iter().flat_map(|profile| profile.identifiers.iter().cloned()).collect();
        let mut owners = store.identifier_owners(&identifiers).unwrap();
        owners.sort();
        (profiles, events, owners)
    }

    /// Identifier sets with their event counts, ids aside.
    fn shape(store: &Arc<dyn Store>) -> Vec<(Vec<String>, u64)> {
        let mut shape: Vec<_> = all_profiles(store)
            .iter()
            .map(|profile| {
                let mut identifiers: Vec<String> = profile.identifiers.iter().map(ToString::to_string).collect();
                identifiers.sort();
                (identifiers, profile.event_counts.values().sum())
            })
            .collect();
        shape.sort();
        shape
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any batch split, with a restart (reload from storage) between any
        /// two batches, stores exactly what one uninterrupted pass stores.
        #[test]
        fn batch_splits_and_restarts_give_the_same_state(
            messages in arbitrary_messages(),
            splits in proptest::collection::vec(1..7usize, 1..20),
        ) {
            let (one_dir, split_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let one_pass = store_with(one_dir.path(), &messages);
            Resolver::load(one_pass.clone()).unwrap().catch_up(DEFAULT_BATCH).unwrap();
            let split = store_with(split_dir.path(), &messages);
            let mut applied = 0;
            for size in splits.iter().cycle() {
                // A fresh resolver each time: what a crash and restart does.
                applied += Resolver::load(split.clone()).unwrap().step(*size).unwrap();
                if applied >= messages.len() { break; }
            }
            prop_assert_eq!(stored_state(&one_pass), stored_state(&split));
        }

        /// A resolver that keeps almost nothing in memory, over any batch
        /// size (so commits overlap the next batch), stores exactly what one
        /// holding every profile stores: with no compact records (every
        /// profile the graph drops is read from storage again), with records
        /// for only a few profiles (the tier keeps losing track), and with
        /// records for all (storage is never read).
        #[test]
        fn a_tiny_cache_stores_exactly_what_an_unbounded_one_stores(
            messages in arbitrary_messages(),
            cache in 0..4usize,
            record_bytes in prop_oneof![Just(0usize), Just(700), Just(1 << 20)],
            batch in prop_oneof![1..7usize, Just(DEFAULT_BATCH)],
            chunk in 1..4usize,
        ) {
            let (unbounded_dir, bounded_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let unbounded = store_with(unbounded_dir.path(), &messages);
            let everything = ResolverCache { profiles: usize::MAX, record_bytes: 0 };
            Resolver::with_cache(unbounded.clone(), everything).unwrap().catch_up(DEFAULT_BATCH).unwrap();
            let bounded = store_with(bounded_dir.path(), &messages);
            // Chunks of a few events: a batch fills the tiny graph and moves
            // its own profiles out again and again before its commit.
            let mut resolver = Resolver::with_cache(bounded.clone(), ResolverCache { profiles: cache, record_bytes })
                .unwrap()
                .with_chunk(chunk);
            resolver.catch_up(batch).unwrap();
            // At most the cache, or what the last two batches (or chunks,
            // when a batch makes room as it goes) used: an event looks up at
            // most five identifiers here.
            let bound = cache.max(2 * 5 * batch.min(messages.len()));
            prop_assert!(resolver.cached_profiles() <= bound, "{} in memory", resolver.cached_profiles());
            prop_assert_eq!(stored_state(&unbounded), stored_state(&bounded));
        }

        /// Blocking an identifier after the fact stores what resolving with it
        /// blocked from the start stores.
        #[test]
        fn repair_matches_resolving_with_the_rule_from_the_start(
            messages in arbitrary_messages(),
            bad in prop_oneof![
                (0..3u8).prop_map(|n| format!("device_id:d{n}")),
                (0..4u8).prop_map(|n| format!("email:e{n}@example.com")),
                (0..6u8).prop_map(|n| format!("anonymous_id:a{n}")),
            ],
        ) {
            let bad: Identifier = bad.parse().unwrap();
            let (repaired_dir, scratch_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let repaired = store_with(repaired_dir.path(), &messages);
            Resolver::load(repaired.clone()).unwrap().catch_up(DEFAULT_BATCH).unwrap();
            repair(&repaired, &Repair::Block { identifier: bad.clone() }).unwrap();
            let scratch = store_with(scratch_dir.path(), &messages);
            let rules = IdentityRules { blocked_identifiers: vec![bad.clone()], ..IdentityRules::default() };
            scratch.set_identity_rules(&rules).unwrap();
            Resolver::load(scratch.clone()).unwrap().catch_up(DEFAULT_BATCH).unwrap();
            prop_assert_eq!(shape(&repaired), shape(&scratch));
            prop_assert_eq!(repaired.profile_by_identifier(&bad).unwrap(), None);
            // The resolver picks up after the repair without redoing anything.
            prop_assert_eq!(Resolver::load(repaired.clone()).unwrap().step(DEFAULT_BATCH).unwrap(), 0);
        }
    }

    #[test]
    fn unlinking_a_shared_device_splits_the_people_it_merged() {
        let dir = tempfile::tempdir().unwrap();
        // Default rules allow 5 device ids and 5 emails: a kiosk device joins two
        // anonymous visitors who later identify with different emails.
        let store = store_with(
            dir.path(),
            &[
                json!({"type": "identify", "anonymousId": "v1", "traits": {"email": "ann@example.com", "name": "Ann"}, "context": {"device": {"id": "kiosk"}}}),
                json!({"type": "identify", "anonymousId": "v2", "traits": {"email": "bob@example.com", "name": "Bob"}, "context": {"device": {"id": "kiosk"}}}),
            ],
        );
        Resolver::load(store.clone()).unwrap().catch_up(DEFAULT_BATCH).unwrap();
        let merged = store.profile_by_identifier(&"email:ann@example.com".parse().unwrap()).unwrap().unwrap();
        assert_eq!(merged.count_of("email"), 2, "the kiosk linked both");
        let report =
            repair(&store, &Repair::Unlink { profile: merged.id, identifier: "device_id:kiosk".parse().unwrap() })
                .unwrap();
        assert_eq!((report.profiles_before, report.profiles_after), (1, 2));
        let ann = store.profile_by_identifier(&"email:ann@example.com".parse().unwrap()).unwrap().unwrap();
        let bob = store.profile_by_identifier(&"email:bob@example.com".parse().unwrap()).unwrap().unwrap();
        assert_eq!(ann.id, merged.id, "the older part keeps the id");
        assert_ne!(bob.id, ann.id);
        assert_eq!((ann.traits["name"].as_str(), bob.traits["name"].as_str()), (Some("Ann"), Some("Bob")));
        assert_eq!(store.profile_events(bob.id, None, 10).unwrap().len(), 1);
        let history = store.identity_history(ann.id).unwrap();
        assert!(history
            .iter()
            .any(|record| matches!(&record.change, IdentityChange::Repaired { action, .. } if action == "unlink")));
        let wrong =
            repair(&store, &Repair::Unlink { profile: bob.id, identifier: "email:ann@example.com".parse().unwrap() });
        assert!(matches!(wrong, Err(ResolveError::NotOnProfile(..))));
    }

    #[test]
    fn unreadable_events_are_listed_and_counted_not_skipped_silently() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), &[message(Some(1), 1, None, None, 0)]);
        let source = store.list_sources().unwrap().remove(0).id;
        let raw = |id: &str, payload: &str| tandem_core::LogRecord {
            source_id: source.clone(),
            message_id: tandem_core::MessageId::new(id),
            event_type: tandem_core::EventType::Track,
            received_at_ms: 1,
            timestamp_ms: 1,
            payload: payload.into(),
        };
        // A well-formed event whose identifiers are gone.
        let mut bare: Value = serde_json::from_str(&store.read_log(LogPosition(0), 1).unwrap()[0].payload).unwrap();
        for field in ["userId", "anonymousId", "traits", "context"] {
            bare.as_object_mut().unwrap().remove(field);
        }
        bare["messageId"] = json!("bare");
        let records = vec![raw("bad", "{not json"), raw("bare", &bare.to_string())];
        store.append(&[IngestBatch { records, ..Default::default() }], 0).unwrap();
        let metrics = Metrics::new();
        let mut resolver = Resolver::load(store.clone()).unwrap().with_metrics(metrics.clone());
        resolver.catch_up(DEFAULT_BATCH).unwrap();
        let unresolved = store.unresolved_events(LogPosition(0), 10).unwrap();
        assert_eq!(unresolved.iter().map(|event| event.position.0).collect::<Vec<_>>(), vec![2, 3]);
        assert!(unresolved[0].reason.starts_with("unreadable event"), "{}", unresolved[0].reason);
        assert_eq!(unresolved[1].reason, "the event carries no identifier");
        assert_eq!(store.stats().unwrap().unresolved, 2);
        let text = metrics.render();
        assert!(text.contains("tandem_resolver_unusable_events_total 2"), "{text}");
        assert!(text.contains("tandem_resolver_position 3"), "{text}");
        assert!(text.contains("tandem_resolver_profiles 1"), "{text}");
        assert!(text.contains("tandem_resolver_batch_duration_seconds_count 1"), "{text}");
    }

    /// 3,000 identifies of 520 people: half the traffic from twenty
    /// regulars, half spread over 500 others.
    fn regulars_and_others() -> Vec<Value> {
        (0..3_000u32)
            .map(|n| if n % 2 == 0 { n % 40 } else { n * 7 % 1_000 })
            .map(|person| json!({"type": "identify", "userId": format!("u{person}"), "anonymousId": format!("a{person}")}))
            .collect()
    }

    #[test]
    fn memory_is_set_by_the_cache_size_not_by_the_customer_base() {
        let dir = tempfile::tempdir().unwrap();
        let messages = regulars_and_others();
        let store = store_with(dir.path(), &messages);
        let metrics = Metrics::new();
        let no_records = ResolverCache { profiles: 100, record_bytes: 0 };
        let mut resolver = Resolver::with_cache(store.clone(), no_records).unwrap().with_metrics(metrics.clone());
        assert_eq!(resolver.catch_up(50).unwrap(), 3_000);
        assert_eq!(store.stats().unwrap().profiles, 520);
        assert!(resolver.cached_profiles() <= 100, "{} profiles in memory", resolver.cached_profiles());
        let text = metrics.render();
        assert!(text.contains("tandem_resolver_profiles 520"), "{text}");
        let counter = |name: &str| -> u64 {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in {text}"))
        };
        // Each person's first event looks up two new identifiers; later
        // events find the regulars in memory, the rest in storage again.
        let (hits, misses) =
            (counter("tandem_resolver_cache_hits_total "), counter("tandem_resolver_cache_misses_total "));
        assert!(misses > 2 * 520 && hits >= 1_000, "hits {hits}, misses {misses}");
    }

    #[test]
    fn a_batch_outgrows_the_graph_by_moving_its_own_profiles_to_records() {
        let dir = tempfile::tempdir().unwrap();
        // 520 people, each met again later in the batch, some by an email
        // that merges a second profile into them.
        let mut messages = regulars_and_others();
        for person in 0..60u32 {
            messages.push(json!({"type": "identify", "anonymousId": format!("late{person}"), "traits": {"email": format!("p{person}@example.com")}}));
        }
        for person in 0..60u32 {
            messages.push(json!({"type": "identify", "userId": format!("u{}", person * 7), "traits": {"email": format!("p{person}@example.com")}}));
        }
        let store = store_with(dir.path(), &messages);
        let cache = ResolverCache { profiles: 100, record_bytes: 1 << 20 };
        let mut resolver = Resolver::with_cache(store.clone(), cache).unwrap().with_chunk(16);
        assert_eq!(resolver.step(DEFAULT_BATCH).unwrap(), messages.len(), "one batch for five times the graph");
        resolver.flush().unwrap();
        assert!(resolver.cached_profiles() <= 100, "{} profiles in the graph", resolver.cached_profiles());

        let unbounded_dir = tempfile::tempdir().unwrap();
        let unbounded = store_with(unbounded_dir.path(), &messages);
        let everything = ResolverCache { profiles: usize::MAX, record_bytes: 0 };
        Resolver::with_cache(unbounded.clone(), everything).unwrap().catch_up(DEFAULT_BATCH).unwrap();
        // 520 people and 60 late profiles, 33 of which merge into someone
        // known (the rest take the new user id).
        assert_eq!(store.stats().unwrap().profiles, 547);
        assert_eq!(stored_state(&unbounded), stored_state(&store));
    }

    #[test]
    fn profiles_the_graph_drops_are_kept_as_records_and_never_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut messages = regulars_and_others();
        // A returning person, resolved by a second resolver below.
        messages.push(json!({"type": "track", "event": "Back", "userId": "u7"}));
        let store = store_with(dir.path(), &messages);
        let metrics = Metrics::new();
        let cache = ResolverCache { profiles: 100, record_bytes: 1 << 20 };
        let mut resolver = Resolver::with_cache(store.clone(), cache).unwrap().with_metrics(metrics.clone());
        let mut resolved = 0;
        while resolved < 3_000 {
            resolved += resolver.step((3_000 - resolved).min(50)).unwrap();
        }
        resolver.flush().unwrap();
        assert!(resolver.cached_profiles() <= 100, "{} profiles in the graph", resolver.cached_profiles());
        assert_eq!(resolver.cached_profiles() + resolver.record_profiles(), 520, "every profile is in memory");
        let text = metrics.render();
        let counter = |name: &str| -> u64 {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in {text}"))
        };
        // Only each person's two identifiers, new on their first event, are
        // not found in memory; everyone returning is found in the graph or
        // in the records.
        // (Look-ups are counted once per chunk of events.)
        assert_eq!(counter("tandem_resolver_cache_misses_total "), 2 * 520);
        assert!(counter("tandem_resolver_cache_hits_total ") >= 1_000, "{text}");
        assert!(counter("tandem_resolver_record_profiles ") >= 420, "{text}");

        // Started again over that store, the resolver loads it whole (part
        // as records) and resolves a returning person without a miss.
        let metrics = Metrics::new();
        let mut resolver = Resolver::with_cache(store.clone(), cache).unwrap().with_metrics(metrics.clone());
        assert_eq!(resolver.cached_profiles() + resolver.record_profiles(), 520);
        assert_eq!(resolver.catch_up(50).unwrap(), 1);
        assert!(metrics.render().contains("tandem_resolver_cache_misses_total 0"), "{}", metrics.render());
    }

    #[test]
    fn repeated_warnings_are_held_back_and_counted() {
        let mut warning = RateLimitedWarning::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(warning.admit(start), Some(0));
        assert_eq!(warning.admit(start + Duration::from_secs(1)), None);
        assert_eq!(warning.admit(start + Duration::from_secs(2)), None);
        assert_eq!(warning.admit(start + Duration::from_secs(11)), Some(2), "says how many were held back");
    }
}
