//! The resolver stage: reads the event log in order, resolves each event to
//! a profile with the identity graph (`tandem_core::resolve`), and commits
//! the changed profiles together with its new log position, so a crash
//! resumes exactly where the last commit ended and nothing applies twice.
//! Also the repairs (`unlink`, `block`) that rebuild the graph from the log.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::identity::{CompiledRules, RulesError};
use tandem_core::{
    Event, Identifier, IdentityChange, IdentityGraph, IdentityRules, LogPosition, ProfileId, Resolution,
};
use tandem_store::{CommitOutcome, EventLink, HistoryRecord, IdentityCommit, Store, StoreError, UnresolvedEvent};

use crate::log_head::LogHead;
use crate::metrics::Metrics;

/// Events read and resolved per transaction when catching up a backlog.
pub const DEFAULT_BATCH: usize = 50_000;
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
}

/// The resolver's in-memory graph and where it stands in the log.
///
/// Resolving and committing overlap: while batch N is being written on a
/// committer thread, batch N+1 is resolved in memory. Commits are applied in
/// order, each checked against the position the previous one left, so a
/// failed or refused commit refuses the ones after it too, and the resolver
/// reloads from storage. Dropping a resolver waits for its commit.
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
    metrics: Metrics,
    unusable_warning: RateLimitedWarning,
}

/// A warning that repeats at most once per interval, saying how many were
/// held back, so a stream of bad events cannot flood the log.
struct RateLimitedWarning {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarning {
    fn new(interval: Duration) -> Self {
        RateLimitedWarning { interval, last: None, suppressed: 0 }
    }

    /// Whether to log now; `Some(n)` with the number held back since the last one.
    fn admit(&mut self, now: Instant) -> Option<u64> {
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
    commit: std::thread::JoinHandle<Result<CommitOutcome, StoreError>>,
}

impl Resolver {
    pub fn load(store: Arc<dyn Store>) -> Result<Resolver, ResolveError> {
        let snapshot = store.load_identity()?;
        let graph = IdentityGraph::from_parts(snapshot.profiles, snapshot.merged_into, snapshot.next_profile_id);
        let rules = snapshot.rules.compile()?;
        Ok(Resolver {
            store,
            graph,
            rules,
            epoch: snapshot.epoch,
            resolved: snapshot.position,
            committed: snapshot.position,
            in_flight: None,
            metrics: Metrics::new(),
            unusable_warning: RateLimitedWarning::new(Duration::from_secs(10)),
        })
    }

    /// Reports to these metrics (the server's) instead of private ones.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self.metrics.resolver_position.set(self.committed.0 as i64);
        self.metrics.resolver_profiles.set(self.graph.profile_count() as i64);
        self
    }

    /// Starts again from storage, keeping the metrics.
    fn reload(&mut self) -> Result<(), ResolveError> {
        let metrics = self.metrics.clone();
        *self = Resolver::load(self.store.clone())?.with_metrics(metrics);
        Ok(())
    }

    /// The last log position whose effects are durable.
    pub fn position(&self) -> LogPosition {
        self.committed
    }

    /// Resolves up to `limit` events after the last resolved position and
    /// starts committing them; returns how many were resolved. Returns 0 when
    /// caught up (after waiting for the last commit), or when identity state
    /// was rewritten elsewhere and the graph had to be reloaded.
    pub fn step(&mut self, limit: usize) -> Result<usize, ResolveError> {
        let entries = self.store.read_log(self.resolved, limit)?;
        let Some(last) = entries.last() else {
            self.flush()?;
            return Ok(0);
        };
        let to = last.position;
        let started = std::time::Instant::now();
        let mut batch = BatchChanges::default();
        for entry in &entries {
            match serde_json::from_str::<Event>(&entry.payload) {
                Ok(event) => {
                    let resolution = self.graph.resolve(entry.position.0, &event, &self.rules);
                    if resolution.profile.is_none() {
                        let dropped: Vec<String> = resolution
                            .changes
                            .iter()
                            .filter_map(|change| match change {
                                IdentityChange::Dropped { identifier, reason, .. } => {
                                    Some(format!("{identifier} ({reason})"))
                                }
                                _ => None,
                            })
                            .collect();
                        let reason = if dropped.is_empty() {
                            "the event carries no identifier".to_owned()
                        } else {
                            format!("no usable identifier: {}", dropped.join(", "))
                        };
                        self.unusable(&mut batch, entry.position, reason);
                    }
                    batch.add(entry.position, entry.timestamp_ms, resolution);
                }
                Err(error) => self.unusable(&mut batch, entry.position, format!("unreadable event: {error}")),
            }
        }
        self.metrics.resolver_batch_duration.observe(started.elapsed().as_secs_f64());
        self.metrics.resolver_profiles.set(self.graph.profile_count() as i64);
        let commit = batch.into_commit(&self.graph, self.epoch, self.resolved, to);
        tracing::debug!(
            events = entries.len(),
            profiles = commit.profiles.len(),
            resolve_ms = started.elapsed().as_millis() as u64,
            "resolved a batch"
        );
        if !self.flush()? {
            // The graph was reloaded: this batch was computed on stale state.
            return Ok(0);
        }
        let store = self.store.clone();
        let commit = std::thread::Builder::new()
            .name("tandem-resolver-commit".into())
            .spawn(move || store.commit_identity(&commit))
            .expect("spawning a resolver commit");
        self.in_flight = Some(InFlight { to, commit });
        self.resolved = to;
        Ok(entries.len())
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
    /// (identity state changed elsewhere) and the graph was reloaded.
    pub fn flush(&mut self) -> Result<bool, ResolveError> {
        let Some(in_flight) = self.in_flight.take() else {
            return Ok(true);
        };
        let outcome = in_flight.commit.join();
        match outcome {
            Ok(Ok(CommitOutcome::Committed)) => {
                self.committed = in_flight.to;
                self.metrics.resolver_position.set(self.committed.0 as i64);
                Ok(true)
            }
            Ok(Ok(outcome @ (CommitOutcome::StalePosition | CommitOutcome::EpochChanged))) => {
                tracing::info!(?outcome, "identity state changed outside the resolver; reloading");
                self.reload()?;
                Ok(false)
            }
            Ok(Err(error)) => {
                // The graph holds changes that were not stored: start over from storage.
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
    added: Vec<Identifier>,
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
            self.history.push((position, change));
        }
    }

    /// Ids as they stand at the end of the batch: a profile merged later in
    /// the same batch is written under its survivor.
    fn into_commit(self, graph: &IdentityGraph, epoch: u64, from: LogPosition, to: LogPosition) -> IdentityCommit {
        let live = |id: ProfileId| graph.canonical(id).unwrap_or(id);
        let recorded_at_ms = chrono::Utc::now().timestamp_millis();
        let live_touched: BTreeSet<ProfileId> = self.touched.iter().map(|id| live(*id)).collect();
        IdentityCommit {
            epoch,
            from,
            to,
            profiles: live_touched.iter().filter_map(|id| graph.profile(*id).cloned()).collect(),
            merged: self.merged,
            identifiers: self
                .added
                .into_iter()
                .filter_map(|identifier| graph.lookup(&identifier).map(|owner| (identifier, owner)))
                .collect(),
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
        }
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
    /// Profiles before and after, counted over the whole graph.
    pub profiles_before: usize,
    pub profiles_after: usize,
    /// Events replayed to rebuild.
    pub events_replayed: u64,
    /// The live profiles that now hold the events the old profile held.
    pub profiles_now: Vec<ProfileId>,
}

/// Blocks the identifier in the rules and rebuilds every profile by replaying
/// the log under them, so profiles, traits and timelines come out exactly as
/// if the bad link had never existed. Profile ids stay stable where they can.
pub fn repair(store: &Arc<dyn Store>, repair: &Repair) -> Result<RepairReport, ResolveError> {
    for _attempt in 0..5 {
        let snapshot = store.load_identity()?;
        let graph = IdentityGraph::from_parts(
            snapshot.profiles.clone(),
            snapshot.merged_into.clone(),
            snapshot.next_profile_id,
        );
        let (identifier, action, profile_before) = match repair {
            Repair::Unlink { profile, identifier } => {
                let live = graph.canonical(*profile).ok_or(ResolveError::UnknownProfile(*profile))?;
                if graph.lookup(identifier) != Some(live) {
                    return Err(ResolveError::NotOnProfile(identifier.clone(), *profile));
                }
                (identifier.clone(), "unlink", Some(live))
            }
            Repair::Block { identifier } => (identifier.clone(), "block", graph.lookup(identifier)),
        };
        let mut rules = snapshot.rules.clone();
        if !rules.blocked_identifiers.contains(&identifier) {
            rules.blocked_identifiers.push(identifier.clone());
        }
        let compiled = rules.clone().compile()?;
        let owners: HashMap<u64, ProfileId> = store
            .event_owners(LogPosition(0), snapshot.position)?
            .into_iter()
            .map(|(position, profile)| (position.0, profile))
            .collect();
        // Stream the log page by page rather than holding every event.
        let mut events_replayed = 0u64;
        let mut read_error = None;
        let mut position = LogPosition(0);
        let mut page = Vec::<tandem_store::LogEntry>::new().into_iter();
        // Each replayed event's time, by position (ascending), for its timeline link.
        let mut times: Vec<(u64, i64)> = Vec::new();
        let events = std::iter::from_fn(|| loop {
            if let Some(entry) = page.next() {
                if let Ok(event) = serde_json::from_str::<Event>(&entry.payload) {
                    events_replayed += 1;
                    times.push((entry.position.0, entry.timestamp_ms));
                    return Some((entry.position.0, event));
                }
                continue;
            }
            if position >= snapshot.position {
                return None;
            }
            match store.read_log(position, DEFAULT_BATCH) {
                Ok(entries) if !entries.is_empty() => {
                    position = entries.last().map(|entry| entry.position).unwrap_or(position);
                    let entries: Vec<_> =
                        entries.into_iter().filter(|entry| entry.position <= snapshot.position).collect();
                    page = entries.into_iter();
                }
                Ok(_) => return None,
                Err(error) => {
                    read_error = Some(error);
                    return None;
                }
            }
        });
        let rebuilt = graph.rebuild(events, &compiled, |position| owners.get(&position).copied());
        if let Some(error) = read_error {
            return Err(error.into());
        }
        let new_owners: HashMap<u64, ProfileId> = rebuilt
            .resolutions
            .iter()
            .filter_map(|(position, resolution)| resolution.profile.map(|profile| (*position, profile)))
            .collect();
        let profiles_now: BTreeSet<ProfileId> = owners
            .iter()
            .filter(|(_, owner)| Some(graph.canonical(**owner).unwrap_or(**owner)) == profile_before)
            .filter_map(|(position, _)| new_owners.get(position))
            .map(|profile| rebuilt.graph.canonical(*profile).unwrap_or(*profile))
            .collect();
        let recorded_at_ms = chrono::Utc::now().timestamp_millis();
        let mut history: Vec<HistoryRecord> = Vec::new();
        let mut events_owned = Vec::new();
        for (position, resolution) in &rebuilt.resolutions {
            if let Some(profile) = resolution.profile {
                let timestamp_ms = times
                    .binary_search_by_key(position, |(at, _)| *at)
                    .map(|index| times[index].1)
                    .expect("every resolved event was replayed");
                events_owned.push(EventLink {
                    position: LogPosition(*position),
                    timestamp_ms,
                    profile: rebuilt.graph.canonical(profile).unwrap_or(profile),
                });
            }
            for change in &resolution.changes {
                history.push(HistoryRecord {
                    position: Some(LogPosition(*position)),
                    profile: change.profile().map(|id| rebuilt.graph.canonical(id).unwrap_or(id)),
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
        let commit = IdentityCommit {
            epoch: snapshot.epoch,
            from: snapshot.position,
            to: snapshot.position,
            profiles: rebuilt.graph.profiles().cloned().collect(),
            merged: rebuilt.graph.merged_into().collect(),
            identifiers: rebuilt
                .graph
                .profiles()
                .flat_map(|profile| profile.identifiers.iter().map(move |identifier| (identifier.clone(), profile.id)))
                .collect(),
            events: events_owned,
            history,
            // The list is kept across a replace; the replay meets the same events.
            unresolved: Vec::new(),
            next_profile_id: rebuilt.graph.next_id(),
            rules: Some(rules),
        };
        if store.replace_identity(&commit)? == CommitOutcome::Committed {
            return Ok(RepairReport {
                identifier,
                profile_before,
                profiles_before: graph.profile_count(),
                profiles_after: rebuilt.graph.profile_count(),
                events_replayed,
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

/// Runs the resolver on its own thread until `stop` is set, then finishes
/// what is already in the log.
/// It waits on the log head, and re-reads the log at least every
/// [`IDLE_RECHECK`] whatever the head says.
pub fn spawn(
    store: Arc<dyn Store>,
    head: LogHead,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("tandem-resolver".into())
        .spawn(move || {
            let mut resolver = loop {
                match Resolver::load(store.clone()) {
                    Ok(resolver) => break resolver.with_metrics(metrics.clone()),
                    Err(error) => {
                        tracing::error!(%error, "the resolver cannot start; retrying");
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            };
            let mut follower = head.follow();
            loop {
                let stepped = resolver.step(SERVER_BATCH);
                let lag = head.current().0.saturating_sub(resolver.position().0);
                metrics.resolver_lag_events.set(lag as i64);
                match stepped {
                    Ok(0) if stop.load(Ordering::Relaxed) => break,
                    Ok(0) => {
                        follower.wait_beyond(resolver.position(), IDLE_RECHECK);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::error!(%error, "resolving failed; retrying");
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            tracing::debug!(position = %resolver.position(), "resolver stopped");
        })
        .expect("spawning the resolver thread")
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

    fn stored_state(store: &Arc<dyn Store>) -> (Vec<Profile>, Vec<(LogPosition, ProfileId)>) {
        let mut snapshot = store.load_identity().unwrap();
        snapshot.profiles.sort_by_key(|profile| profile.id);
        (snapshot.profiles, store.event_owners(LogPosition(0), LogPosition(u64::MAX / 2)).unwrap())
    }

    /// Identifier sets with their event counts, ids aside.
    fn shape(store: &Arc<dyn Store>) -> Vec<(Vec<String>, u64)> {
        let mut shape: Vec<_> = store
            .load_identity()
            .unwrap()
            .profiles
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

        /// Blocking an identifier after the fact stores what resolving with it
        /// blocked from the start stores.
        #[test]
        fn repair_matches_resolving_with_the_rule_from_the_start(messages in arbitrary_messages(), bad in 0..3u8) {
            let bad: Identifier = format!("device_id:d{bad}").parse().unwrap();
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
