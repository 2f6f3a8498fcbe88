//! The insight stage: keeps the daily figures goals are evaluated from, so
//! that showing a goal reads a few hundred rows rather than the event log.
//!
//! It follows the log behind the resolver (every event it reads already has
//! its profile) and, for each tracker the goals need
//! (`tandem_core::insight::rollup`), adds each event's contribution to its
//! day: totals directly, per-profile trackers as the change of the
//! profile's contribution. Merges the resolver recorded for the batch's
//! events fold the merged-away profile's state into the survivor's. Every
//! effect is written with the stage's cursor (`stage_cursors` row
//! `insight`) in one [`InsightCommit`], refused if another stage moved the
//! cursor first, so a crash replays exactly what was not committed.
//!
//! A new tracker starts at the stage's position: events after it are
//! applied as they come, and the log up to it is read a page per round
//! (backfill); states merge in any order, so the two meet exactly. When the
//! resolver's epoch moves (a repair or an erasure rewrote profiles), every
//! tracker starts again from the beginning of the log.
//!
//! Once a minute the stage also snapshots counters other stages keep
//! (events stored, plan violations, deliveries, dead letters, stack spend,
//! audience sizes); and [`IngestLatency`] collects the latency of collecting
//! requests in memory and adds it to the day's histogram in the store every
//! few seconds.
//!
//! Goals themselves — defining, deleting and evaluating them for the API,
//! the console and the CLI — are in [`goals`].

pub mod goals;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use tandem_core::insight::goals::snapshot;
use tandem_core::insight::latency::bucket_of;
use tandem_core::insight::rollup::{
    day_of, Day, IdentityEvent, IdentityEventKind, ObservedEvent, ProfileState, Rollup, TrackerSpec,
};
use tandem_core::{EventType, LogPosition, ProfileId};
use tandem_store::{
    BackfillMove, DayAdd, InsightCommit, InsightCommitOutcome, LogEntry, ProfileStateWrite, Stage, StageCursor, Store,
    StoreError, TrackerBackfill, TrackerId, TrackerRecord,
};

use crate::cluster::{LeaseKeeper, LeaseTurn};
use crate::log_head::LogHead;

/// Events the stage reads per commit, live or backfilling.
const EVENT_BATCH: usize = 2_000;
/// How often an idle stage looks for new trackers and snapshots.
const IDLE_INTERVAL: Duration = Duration::from_millis(500);
/// How often counters are snapshotted.
pub const SNAPSHOT_INTERVAL_MS: i64 = 60_000;
/// How often collected ingest latencies are added to the store.
pub const LATENCY_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// The time in milliseconds; injectable so tests can move it.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock, in milliseconds since the epoch.
pub fn system_clock() -> Clock {
    Arc::new(|| chrono::Utc::now().timestamp_millis())
}

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Events applied live.
    pub events: usize,
    /// Events (or positions, for identity-only trackers) read for backfills.
    pub backfilled: usize,
    /// Whether every tracker started again (the resolver's epoch moved).
    pub restarted: bool,
    /// Whether counters were snapshotted.
    pub snapshotted: bool,
}

impl StepReport {
    /// Nothing was read: the stage is caught up.
    pub fn is_idle(&self) -> bool {
        self.events == 0 && self.backfilled == 0 && !self.restarted
    }
}

/// The fields of an event the trackers read.
#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    event: Option<String>,
}

#[derive(Deserialize)]
struct NamedWithProperties {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    properties: Option<Map<String, Value>>,
}

/// An event read from the log, with what the trackers look at.
struct ReadEvent {
    position: LogPosition,
    timestamp_ms: i64,
    received_at_ms: i64,
    track: Option<String>,
    properties: Option<Map<String, Value>>,
}

impl ReadEvent {
    fn read(entry: &LogEntry, with_properties: bool) -> ReadEvent {
        let (track, properties) = if entry.event_type != EventType::Track {
            (None, None)
        } else if with_properties {
            serde_json::from_str::<NamedWithProperties>(&entry.payload)
                .map(|named| (named.event, named.properties))
                .unwrap_or_default()
        } else {
            (serde_json::from_str::<Named>(&entry.payload).ok().and_then(|named| named.event), None)
        };
        ReadEvent {
            position: entry.position,
            timestamp_ms: entry.timestamp_ms,
            received_at_ms: entry.received_at_ms,
            track,
            properties,
        }
    }
}

/// The insight stage (see the module's header).
pub struct InsightStage {
    store: Arc<dyn Store>,
    clock: Clock,
    snapshotted_at: Option<i64>,
    batch: usize,
}

impl InsightStage {
    /// A stage over `store`, reading the time from `clock`.
    pub fn new(store: Arc<dyn Store>, clock: Clock) -> Self {
        InsightStage { store, clock, snapshotted_at: None, batch: EVENT_BATCH }
    }

    /// Reads at most `events` events per commit (at least one).
    pub fn with_batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// One round: snapshots when due, follows a repair, reads a page of
    /// each backfill, then applies the next batch of resolved events.
    pub fn step(&mut self) -> Result<StepReport, StoreError> {
        let now = (self.clock)();
        let mut report = StepReport::default();
        let due = self.snapshotted_at.is_none_or(|at| now - at >= SNAPSHOT_INTERVAL_MS || day_of(at) != day_of(now));
        if due {
            self.snapshot(now)?;
            self.snapshotted_at = Some(now);
            report.snapshotted = true;
        }
        let cursor = self.store.stage_cursor(Stage::INSIGHT)?.unwrap_or_default();
        let resolver = self.store.stage_cursor(Stage::RESOLVE)?.unwrap_or_default();
        if cursor.epoch != resolver.epoch {
            tracing::info!(epoch = resolver.epoch, "the identity graph was rewritten; counting every goal again");
            let commit = InsightCommit {
                from: cursor.position,
                to: cursor.position,
                epoch: resolver.epoch,
                restart_all: true,
                ..InsightCommit::default()
            };
            report.restarted = self.store.commit_insight(&commit)? == InsightCommitOutcome::Committed;
            return Ok(report);
        }
        let trackers = self.store.trackers()?;
        report.backfilled = self.backfill(&trackers, cursor)?;
        report.events = self.apply_live(&trackers, resolver)?;
        Ok(report)
    }

    /// Steps until a round reads nothing.
    pub fn catch_up(&mut self) -> Result<(), StoreError> {
        while !self.step()?.is_idle() {}
        Ok(())
    }

    /// Records today's counters, stack spend and audience sizes.
    fn snapshot(&self, now: i64) -> Result<(), StoreError> {
        let counters = self.store.insight_counters()?;
        let mut values = vec![
            (snapshot::EVENTS.to_owned(), counters.events as f64),
            (snapshot::VIOLATIONS.to_owned(), counters.violations as f64),
            (snapshot::DELIVERED.to_owned(), counters.delivered as f64),
            (snapshot::DEAD_LETTERS.to_owned(), counters.dead_letters as f64),
            (snapshot::STACK_SPEND.to_owned(), crate::stack::stack_report(self.store.as_ref())?.total_annual_cost),
        ];
        for audience in self.store.list_audiences()? {
            values.push((snapshot::audience(&audience.definition.name), audience.size as f64));
        }
        self.store.record_snapshots(day_of(now), &values)
    }

    /// Reads one page of the log's past for every tracker that is
    /// backfilling, those at the same place together, each group in one
    /// commit that leaves the cursor where it is.
    fn backfill(&self, trackers: &[TrackerRecord], cursor: StageCursor) -> Result<usize, StoreError> {
        let mut groups: BTreeMap<(LogPosition, LogPosition), Vec<&TrackerRecord>> = BTreeMap::new();
        for tracker in trackers {
            if let TrackerBackfill::Running { after, through } = tracker.backfill {
                groups.entry((after, through)).or_default().push(tracker);
            }
        }
        let mut read = 0;
        for ((after, through), group) in groups {
            let reads_events = group.iter().any(|tracker| tracker.spec.reads_events());
            let entries: Vec<LogEntry> = if reads_events {
                self.store.read_log(after, self.batch)?.into_iter().filter(|entry| entry.position <= through).collect()
            } else {
                Vec::new()
            };
            let page_end = match entries.last() {
                Some(last) if entries.len() == self.batch => last.position,
                // The page reached `through` (or the tracker reads no events:
                // its identity changes are read in ranges of positions).
                _ if reads_events => through,
                _ => LogPosition(through.0.min(after.0.saturating_add(self.batch as u64))),
            };
            // Backfill reads events with their owners now, after every merge
            // the resolver has recorded, so no merge is folded here.
            let (days, states) = self.apply(&group, &entries, after, page_end, false)?;
            let progress = if page_end >= through {
                TrackerBackfill::Done
            } else {
                TrackerBackfill::Running { after: page_end, through }
            };
            let commit = InsightCommit {
                from: cursor.position,
                to: cursor.position,
                epoch: cursor.epoch,
                backfill: group
                    .iter()
                    .map(|tracker| BackfillMove { tracker: tracker.id, from: tracker.backfill, to: progress })
                    .collect(),
                days,
                states,
                ..InsightCommit::default()
            };
            if self.store.commit_insight(&commit)? == InsightCommitOutcome::StalePosition {
                return Ok(read);
            }
            read += entries.len().max(1);
        }
        Ok(read)
    }

    /// Applies the next batch of resolved events to every tracker, starting
    /// new ones at the stage's position.
    fn apply_live(&self, trackers: &[TrackerRecord], resolver: StageCursor) -> Result<usize, StoreError> {
        let cursor = self.store.stage_cursor(Stage::INSIGHT)?.unwrap_or_default();
        let from = cursor.position;
        // A tracker starts here: it reads the log up to `from` as a
        // backfill, and this batch's events live.
        let starting: Vec<BackfillMove> = trackers
            .iter()
            .filter(|tracker| tracker.backfill == TrackerBackfill::NotStarted)
            .map(|tracker| {
                let to = if from == LogPosition(0) {
                    TrackerBackfill::Done
                } else {
                    TrackerBackfill::Running { after: LogPosition(0), through: from }
                };
                BackfillMove { tracker: tracker.id, from: TrackerBackfill::NotStarted, to }
            })
            .collect();
        if resolver.position <= from {
            // Starting trackers is work: their backfill begins next round.
            let started = starting.len();
            if started > 0 && !self.commit_live(from, from, cursor.epoch, starting, Vec::new(), Vec::new())? {
                return Ok(0);
            }
            return Ok(started);
        }
        if trackers.is_empty() {
            // Nothing counts events: move on without reading them.
            self.commit_live(from, resolver.position, cursor.epoch, Vec::new(), Vec::new(), Vec::new())?;
            return Ok(0);
        }
        let entries: Vec<LogEntry> = self
            .store
            .read_log(from, self.batch)?
            .into_iter()
            .filter(|entry| entry.position <= resolver.position)
            .collect();
        let to = entries.last().map_or(resolver.position, |last| last.position);
        let live: Vec<&TrackerRecord> = trackers.iter().collect();
        let (days, states) = self.apply(&live, &entries, from, to, true)?;
        if self.commit_live(from, to, cursor.epoch, starting, days, states)? {
            Ok(entries.len().max(1))
        } else {
            Ok(0)
        }
    }

    fn commit_live(
        &self,
        from: LogPosition,
        to: LogPosition,
        epoch: u64,
        backfill: Vec<BackfillMove>,
        days: Vec<DayAdd>,
        states: Vec<ProfileStateWrite>,
    ) -> Result<bool, StoreError> {
        let commit = InsightCommit { from, to, epoch, restart_all: false, backfill, days, states };
        Ok(self.store.commit_insight(&commit)? == InsightCommitOutcome::Committed)
    }

    /// What `entries` (the log's events after `from` up to `to`) and the
    /// identity changes of that range add to `trackers`: day values to add
    /// and profile states to write. `fold_merges` merges each merged-away
    /// profile's state into the survivor's.
    fn apply(
        &self,
        trackers: &[&TrackerRecord],
        entries: &[LogEntry],
        from: LogPosition,
        to: LogPosition,
        fold_merges: bool,
    ) -> Result<(Vec<DayAdd>, Vec<ProfileStateWrite>), StoreError> {
        let with_properties = trackers.iter().any(|tracker| tracker.spec.reads_properties());
        let events: Vec<ReadEvent> = entries.iter().map(|entry| ReadEvent::read(entry, with_properties)).collect();
        let keeps_profiles = trackers.iter().any(|tracker| tracker.spec.keeps_profiles());
        let owners: HashMap<LogPosition, ProfileId> = if keeps_profiles && !entries.is_empty() {
            self.store.event_owners(from, to)?.into_iter().collect()
        } else {
            HashMap::new()
        };
        let counts_identity = trackers.iter().any(|tracker| tracker.spec == TrackerSpec::Identity);
        let identity: Vec<IdentityEvent> = if counts_identity || (fold_merges && keeps_profiles) {
            self.store.identity_events(from, to)?
        } else {
            Vec::new()
        };
        let observed: Vec<ObservedEvent<'_>> = events
            .iter()
            .map(|event| ObservedEvent {
                owner: owners.get(&event.position).copied(),
                timestamp_ms: event.timestamp_ms,
                received_at_ms: event.received_at_ms,
                track: event.track.as_deref(),
                properties: event.properties.as_ref(),
            })
            .collect();
        let mut days = Vec::new();
        let mut states = Vec::new();
        let per_profile: Vec<&TrackerRecord> =
            trackers.iter().copied().filter(|tracker| tracker.spec.keeps_profiles()).collect();
        let merges: Vec<(ProfileId, ProfileId)> = if fold_merges {
            identity
                .iter()
                .filter_map(|change| match &change.kind {
                    IdentityEventKind::Merged { into, merged } => Some(merged.iter().map(|from| (*from, *into))),
                    IdentityEventKind::Created(_) => None,
                })
                .flatten()
                .collect()
        } else {
            Vec::new()
        };
        let loaded = if per_profile.is_empty() {
            Vec::new()
        } else {
            let mut profiles: Vec<ProfileId> = owners.values().copied().collect();
            profiles.extend(merges.iter().flat_map(|(from, into)| [*from, *into]));
            profiles.sort_unstable();
            profiles.dedup();
            let ids: Vec<TrackerId> = per_profile.iter().map(|tracker| tracker.id).collect();
            self.store.profile_states(&ids, &profiles)?
        };
        for tracker in trackers {
            let mut rollup = Rollup::default();
            if tracker.spec.keeps_profiles() {
                let before: HashMap<ProfileId, ProfileState> = loaded
                    .iter()
                    .filter(|(id, _, _)| *id == tracker.id)
                    .map(|(_, profile, state)| (*profile, state.clone()))
                    .collect();
                let mut current = before.clone();
                let mut touched: HashSet<ProfileId> = HashSet::new();
                for event in &observed {
                    let Some(owner) = event.owner else { continue };
                    if tracker.spec.observe_profile(current.entry(owner).or_default(), event) {
                        touched.insert(owner);
                    }
                }
                for (gone, survivor) in &merges {
                    if let Some(state) = current.remove(gone) {
                        current.entry(*survivor).or_default().merge(&state);
                        touched.insert(*gone);
                        touched.insert(*survivor);
                    }
                }
                // In id order: the store's states are keyed by (tracker,
                // profile), so sorted writes land on neighbouring pages.
                let mut touched: Vec<ProfileId> = touched.into_iter().collect();
                touched.sort_unstable();
                for profile in touched {
                    let old = before.get(&profile);
                    let new = current.get(&profile).filter(|state| !state.is_empty());
                    if old == new {
                        continue;
                    }
                    if let Some(old) = old {
                        rollup.add_all(&tracker.spec.contribution(old), -1.0);
                    }
                    if let Some(new) = new {
                        rollup.add_all(&tracker.spec.contribution(new), 1.0);
                    }
                    states.push(ProfileStateWrite { tracker: tracker.id, profile, state: new.cloned() });
                }
            } else {
                for event in &observed {
                    tracker.spec.observe_totals(event, &mut rollup);
                }
                for change in &identity {
                    tracker.spec.observe_identity(change, &mut rollup);
                }
            }
            days.extend(rollup.nonzero().map(|(day, series, value)| DayAdd {
                tracker: tracker.id,
                series,
                day,
                value,
            }));
        }
        Ok((days, states))
    }
}

/// Runs the insight stage on its own thread until `stop` is set, under the
/// `insight` stage lease.
pub fn spawn(store: Arc<dyn Store>, head: LogHead, clock: Clock, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("tandem-insight".into())
        .spawn(move || {
            let mut stage = InsightStage::new(store.clone(), clock);
            let mut follower = head.follow();
            let mut lease = LeaseKeeper::new(store.clone(), Stage::INSIGHT);
            while !stop.load(Ordering::Relaxed) {
                match lease.poll() {
                    LeaseTurn::Held => {}
                    LeaseTurn::Waiting => continue,
                    LeaseTurn::Lost(lost) => {
                        tracing::warn!(%lost, "stopped counting for goals; waiting for the lease again");
                        continue;
                    }
                }
                match stage.step() {
                    Ok(report) if report.is_idle() => {
                        follower.wait_beyond(head.current(), IDLE_INTERVAL);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::error!(%error, "counting for goals failed; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            tracing::debug!("insight stage stopped");
        })
        .expect("spawning the insight thread")
}

/// Latencies of collecting requests (tracking calls and webhooks answered
/// 200) counted in memory per day and bucket, until [`IngestLatency::flush`]
/// adds them to the store. A crash loses at most one flush interval of
/// counts, which a percentile over days does not notice; every node adds
/// its own, so the store's histogram is the cluster's.
#[derive(Debug, Default)]
pub struct IngestLatency {
    pending: Mutex<BTreeMap<(Day, u16), u64>>,
}

impl IngestLatency {
    /// Counts one request answered at `at_ms` after `elapsed`.
    pub fn observe(&self, at_ms: i64, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *pending.entry((day_of(at_ms), bucket_of(micros))).or_default() += 1;
    }

    /// Adds what was counted to the store; kept for the next flush when the
    /// store refuses.
    pub fn flush(&self, store: &dyn Store) -> Result<(), StoreError> {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        if taken.is_empty() {
            return Ok(());
        }
        let counts: Vec<(Day, u16, u64)> = taken.iter().map(|(&(day, bucket), &count)| (day, bucket, count)).collect();
        if let Err(error) = store.add_ingest_latency(&counts) {
            let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for ((day, bucket), count) in taken {
                *pending.entry((day, bucket)).or_default() += count;
            }
            return Err(error);
        }
        Ok(())
    }
}

/// Flushes `latency` every [`LATENCY_FLUSH_INTERVAL`] until aborted.
pub async fn flush_latency(store: Arc<dyn Store>, latency: Arc<IngestLatency>) {
    let mut interval = tokio::time::interval(LATENCY_FLUSH_INTERVAL);
    loop {
        interval.tick().await;
        let (store, latency) = (store.clone(), latency.clone());
        match tokio::task::spawn_blocking(move || latency.flush(store.as_ref())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "recording ingest latency failed; kept for the next flush"),
            Err(error) => tracing::warn!(%error, "recording ingest latency panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insight::goals::{create_goal, evaluate_goal};
    use crate::resolve::Resolver;
    use chrono::{DateTime, Utc};
    use proptest::prelude::*;
    use serde_json::json;
    use std::collections::BTreeSet;
    use tandem_core::collect::{normalize_message, BatchDefaults, IdRequirement, RequestContext};
    use tandem_core::insight::goals::{GoalSettings, Standing};
    use tandem_core::insight::rollup::{series, DAY_MS};
    use tandem_core::SourceKind;
    use tandem_store::{IngestBatch, SqliteStore};

    /// 2023-11-14, a Tuesday; the tests' events happen in the days before.
    const NOW: i64 = 1_700_000_000_000;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    fn fixed_clock(now: i64) -> Clock {
        Arc::new(move || now)
    }

    fn fresh() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        (dir, store)
    }

    /// Appends `messages` (each with its own `timestamp`) and resolves them.
    fn append_and_resolve(store: &Arc<dyn Store>, messages: &[Value]) {
        let source = match store.list_sources().unwrap().into_iter().next() {
            Some(source) => source,
            None => store.create_source("web", SourceKind::Website).unwrap(),
        };
        let request = RequestContext {
            source_id: &source.id,
            received_at: at(NOW),
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
        store.append(&[IngestBatch { records, ..Default::default() }], 0).unwrap();
        Resolver::load(store.clone()).unwrap().catch_up(1_000).unwrap();
    }

    /// A `track` by a user (or, with `anonymous`, a device) `days` days
    /// before [`NOW`].
    fn track(who: &str, event: &str, days_ago: i64, revenue: Option<f64>) -> Value {
        let (key, id) = match who.strip_prefix("device:") {
            Some(device) => ("anonymousId", device),
            None => ("userId", who),
        };
        let mut message = json!({"type": "track", "event": event, key: id,
            "timestamp": tandem_core::event::format_timestamp(at(NOW - days_ago * DAY_MS))});
        if let Some(revenue) = revenue {
            message["properties"] = json!({"revenue": revenue});
        }
        message
    }

    fn login(user: &str, device: &str, days_ago: i64) -> Value {
        json!({"type": "identify", "userId": user, "anonymousId": device,
            "timestamp": tandem_core::event::format_timestamp(at(NOW - days_ago * DAY_MS))})
    }

    fn goal(store: &Arc<dyn Store>, name: &str, target: f64, metric: Value) {
        let settings = GoalSettings::from_json(&json!({
            "name": name, "owner": "both", "target": target, "period": "2023-11-01..2023-11-30", "metric": metric
        }))
        .unwrap();
        create_goal(store.as_ref(), &settings, NOW).unwrap();
    }

    fn value(store: &Arc<dyn Store>, name: &str) -> Option<f64> {
        evaluate_goal(store.as_ref(), name, NOW).unwrap().unwrap().report.value
    }

    fn define_marketing_goals(store: &Arc<dyn Store>) {
        goal(store, "revenue", 1_000.0, json!({"kind": "revenue"}));
        goal(store, "new", 10.0, json!({"kind": "new_customers"}));
        goal(store, "active", 10.0, json!({"kind": "active_customers", "within_days": 7}));
        goal(store, "churned", 0.0, json!({"kind": "churned_customers", "inactive_days": 7}));
        goal(
            store,
            "checkout",
            50.0,
            json!({"kind": "conversion", "from": "Product Viewed", "to": "Order Completed", "within": "2d"}),
        );
        goal(store, "merges", 10.0, json!({"kind": "merge_rate"}));
        goal(store, "volume", 100.0, json!({"kind": "ingest_volume"}));
    }

    /// Ann viewed and bought; Bob viewed, bought too late; Cy was active
    /// in October only; a device browsed and later logged in as Ann.
    fn company() -> Vec<Value> {
        vec![
            track("cy", "Product Viewed", 30, None),
            track("ann", "Product Viewed", 10, None),
            track("ann", "Order Completed", 9, Some(120.0)),
            track("bob", "Product Viewed", 8, None),
            track("bob", "Order Completed", 3, Some(80.5)),
            track("device:d1", "Product Viewed", 12, None),
            login("ann", "d1", 2),
        ]
    }

    #[test]
    fn goals_count_revenue_customers_conversions_and_merges_from_the_log() {
        let (_dir, store) = fresh();
        define_marketing_goals(&store);
        let mut stage = InsightStage::new(store.clone(), fixed_clock(NOW));
        stage.catch_up().unwrap();
        append_and_resolve(&store, &company());
        stage.catch_up().unwrap();
        assert_eq!(value(&store, "revenue"), Some(200.5), "both orders fall in November");
        assert_eq!(value(&store, "volume"), Some(7.0), "every event was received in November");
        // Ann's first activity is the device's, 12 days ago (Nov 2); Bob's Nov 6;
        // Cy's was in October.
        assert_eq!(value(&store, "new"), Some(2.0));
        // Within 7 days of Nov 14: Ann (login 2 days ago) and Bob (3 days ago).
        assert_eq!(value(&store, "active"), Some(2.0));
        assert_eq!(value(&store, "churned"), Some(1.0), "Cy");
        // First views in November: Ann (the device's, Nov 2; bought Nov 5,
        // too late) and Bob (bought 5 days later): neither within 2 days.
        assert_eq!(value(&store, "checkout"), Some(0.0));
        // Four profiles created (cy, ann, bob, the device), one merged:
        // counted on the day the resolver recorded them.
        let identity =
            store.trackers().unwrap().into_iter().find(|tracker| tracker.spec == TrackerSpec::Identity).unwrap();
        let mut totals: BTreeMap<String, f64> = BTreeMap::new();
        for value in store.tracker_days(identity.id, None, Day::MAX).unwrap() {
            *totals.entry(value.series).or_default() += value.value;
        }
        assert_eq!(totals, BTreeMap::from([(series::CREATED.to_owned(), 4.0), (series::MERGED.to_owned(), 1.0)]));
        let churned = evaluate_goal(store.as_ref(), "churned", NOW).unwrap().unwrap();
        assert_eq!(churned.report.standing, Standing::OffTrack);
        let trackers = store.trackers().unwrap();
        assert!(trackers.iter().all(|tracker| tracker.backfill == TrackerBackfill::Done), "{trackers:?}");
    }

    #[test]
    fn a_goal_created_later_reads_the_past_and_counts_what_comes_next_once() {
        let (_dir, store) = fresh();
        let mut stage = InsightStage::new(store.clone(), fixed_clock(NOW));
        let events = company();
        append_and_resolve(&store, &events[..4]);
        stage.catch_up().unwrap();
        assert_eq!(store.stage_cursor(Stage::INSIGHT).unwrap().unwrap().position, LogPosition(4), "no goal: moved on");
        define_marketing_goals(&store);
        // New events arrive before the stage starts the trackers: they are
        // counted live, the first four by the backfill.
        append_and_resolve(&store, &events[4..]);
        stage.catch_up().unwrap();
        let (_other_dir, reference) = fresh();
        define_marketing_goals(&reference);
        append_and_resolve(&reference, &events);
        InsightStage::new(reference.clone(), fixed_clock(NOW)).catch_up().unwrap();
        for name in ["revenue", "volume", "new", "active", "churned", "checkout", "merges"] {
            let later = evaluate_goal(store.as_ref(), name, NOW).unwrap().unwrap();
            let from_start = evaluate_goal(reference.as_ref(), name, NOW).unwrap().unwrap();
            assert_eq!(later.report, from_start.report, "{name}");
            assert!(later.report.complete, "{name}");
        }
        assert_eq!(value(&store, "revenue"), Some(200.5));
    }

    #[test]
    fn a_repair_counts_every_goal_again_from_the_log() {
        let (_dir, store) = fresh();
        define_marketing_goals(&store);
        let mut stage = InsightStage::new(store.clone(), fixed_clock(NOW));
        append_and_resolve(&store, &company());
        stage.catch_up().unwrap();
        assert_eq!(value(&store, "checkout"), Some(0.0), "Ann's first view was the device's, 3 days before she bought");
        let ann = store.profile_by_identifier(&"user_id:ann".parse().unwrap()).unwrap().unwrap().id;
        let repair = crate::resolve::Repair::Unlink { profile: ann, identifier: "anonymous_id:d1".parse().unwrap() };
        crate::resolve::repair(&store, &repair).unwrap();
        let report = stage.step().unwrap();
        assert!(report.restarted);
        stage.catch_up().unwrap();
        // The device's events are no longer Ann's: her first view is her
        // own (Nov 4), and she bought the next day.
        assert_eq!(value(&store, "checkout"), Some(50.0));
        assert_eq!(value(&store, "new"), Some(2.0), "Ann and Bob");
        assert_eq!(value(&store, "revenue"), Some(200.5), "totals are counted again, once");
        let resolver_epoch = store.stage_cursor(Stage::RESOLVE).unwrap().unwrap().epoch;
        assert_eq!(store.stage_cursor(Stage::INSIGHT).unwrap().unwrap().epoch, resolver_epoch);
    }

    #[test]
    fn deleting_the_last_goal_of_a_tracker_removes_its_figures() {
        let (_dir, store) = fresh();
        goal(&store, "a", 1.0, json!({"kind": "new_customers"}));
        goal(&store, "b", 1.0, json!({"kind": "active_customers"}));
        InsightStage::new(store.clone(), fixed_clock(NOW)).catch_up().unwrap();
        append_and_resolve(&store, &company());
        InsightStage::new(store.clone(), fixed_clock(NOW)).catch_up().unwrap();
        let tracker = store.trackers().unwrap()[0].id;
        store.delete_goal("a").unwrap();
        assert!(!store.tracker_days(tracker, None, Day::MAX).unwrap().is_empty(), "b still needs it");
        store.delete_goal("b").unwrap();
        assert!(store.trackers().unwrap().is_empty());
        assert!(store.tracker_days(tracker, None, Day::MAX).unwrap().is_empty());
    }

    #[test]
    fn counters_are_snapshotted_once_a_minute_and_on_each_new_day() {
        let (_dir, store) = fresh();
        let now = Arc::new(Mutex::new(NOW));
        let read = now.clone();
        let mut stage = InsightStage::new(store.clone(), Arc::new(move || *read.lock().unwrap()));
        append_and_resolve(&store, &company());
        assert!(stage.step().unwrap().snapshotted);
        assert!(!stage.step().unwrap().snapshotted);
        *now.lock().unwrap() += SNAPSHOT_INTERVAL_MS;
        assert!(stage.step().unwrap().snapshotted);
        let today = day_of(NOW);
        let keys = vec![snapshot::EVENTS.to_owned(), snapshot::STACK_SPEND.to_owned()];
        assert_eq!(
            store.snapshots(&keys, today, today).unwrap(),
            vec![(snapshot::EVENTS.to_owned(), today, 7.0), (snapshot::STACK_SPEND.to_owned(), today, 0.0)]
        );
    }

    #[test]
    fn ingest_latency_is_kept_until_flushed_into_the_days_histogram() {
        let (_dir, store) = fresh();
        let latency = IngestLatency::default();
        latency.observe(NOW, Duration::from_millis(3));
        latency.observe(NOW, Duration::from_millis(3));
        latency.observe(NOW + DAY_MS, Duration::from_millis(250));
        latency.flush(store.as_ref()).unwrap();
        latency.flush(store.as_ref()).unwrap();
        let today = day_of(NOW);
        let three = bucket_of(3_000);
        assert_eq!(
            store.ingest_latency(today, today + 1).unwrap(),
            vec![(today, three, 2), (today + 1, bucket_of(250_000), 1)]
        );
    }

    /// One step of a random company's history.
    #[derive(Clone, Debug)]
    enum Step {
        /// A person or device did `event` `days_ago` days before now.
        Act { who: usize, event: usize, days_ago: i64 },
        /// A device logs in as a person (merging their profiles).
        Login { person: usize, device: usize, days_ago: i64 },
        /// The goals are defined now.
        DefineGoals,
        /// The stage runs a round or two.
        Run,
    }

    const EVENTS: [&str; 3] = ["Product Viewed", "Order Completed", "Ticket Opened"];

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        let step = prop_oneof![
            6 => (0usize..6, 0usize..3, 0i64..40).prop_map(|(who, event, days_ago)| Step::Act { who, event, days_ago }),
            2 => (0usize..3, 3usize..6, 0i64..40).prop_map(|(person, device, days_ago)| Step::Login { person, device, days_ago }),
            1 => Just(Step::DefineGoals),
            2 => Just(Step::Run),
        ];
        prop::collection::vec(step, 1..40)
    }

    fn message(step: &Step) -> Option<Value> {
        match step {
            // 0..3 are people, 3..6 devices.
            Step::Act { who, event, days_ago } if *who < 3 => {
                Some(track(&format!("u{who}"), EVENTS[*event], *days_ago, None))
            }
            Step::Act { who, event, days_ago } => {
                Some(track(&format!("device:d{who}"), EVENTS[*event], *days_ago, None))
            }
            Step::Login { person, device, days_ago } => {
                Some(login(&format!("u{person}"), &format!("d{device}"), *days_ago))
            }
            Step::DefineGoals | Step::Run => None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever the order of events, logins that merge profiles, when
        /// the goals were defined and how the stage's rounds fell, the
        /// rollups equal a direct count over the final profiles' timelines.
        #[test]
        fn rollups_equal_a_count_over_the_final_timelines(steps in steps(), batch in 1usize..5) {
            let (_dir, store) = fresh();
            let mut stage = InsightStage::new(store.clone(), fixed_clock(NOW)).with_batch(batch);
            let mut defined = false;
            let define = |store: &Arc<dyn Store>| {
                goal(store, "new", 1.0, json!({"kind": "new_customers"}));
                goal(store, "active", 1.0, json!({"kind": "active_customers", "within_days": 5}));
                goal(store, "checkout", 1.0, json!({"kind": "conversion", "from": "Product Viewed", "to": "Order Completed", "within": "3d"}));
            };
            for step in &steps {
                if let Some(message) = message(step) {
                    append_and_resolve(&store, &[message]);
                }
                match step {
                    Step::DefineGoals if !defined => {
                        define(&store);
                        defined = true;
                    }
                    Step::Run => {
                        stage.step().unwrap();
                    }
                    _ => {}
                }
            }
            if !defined {
                define(&store);
            }
            stage.catch_up().unwrap();

            // The reference: every live profile's timeline, read directly.
            let mut timelines: Vec<Vec<(i64, Option<String>)>> = Vec::new();
            for profile in store.list_profiles(None, 1_000).unwrap() {
                let events = store.profile_events(profile.id, None, 1_000).unwrap();
                timelines.push(
                    events
                        .iter()
                        .map(|entry| {
                            let name = serde_json::from_str::<Value>(&entry.payload).unwrap()["event"].as_str().map(str::to_owned);
                            (entry.timestamp_ms, name)
                        })
                        .collect(),
                );
            }
            let trackers = store.trackers().unwrap();
            prop_assert!(trackers.iter().all(|tracker| tracker.backfill == TrackerBackfill::Done));
            let days_of = |spec: &TrackerSpec| -> BTreeMap<(String, Day), f64> {
                let id = trackers.iter().find(|tracker| &tracker.spec == spec).unwrap().id;
                store.tracker_days(id, None, Day::MAX).unwrap().into_iter().map(|v| ((v.series, v.day), v.value)).collect()
            };
            let activity = days_of(&TrackerSpec::Activity { window_days: 5 });
            let first_days: Vec<Day> = timelines.iter().filter_map(|events| events.iter().map(|(at, _)| day_of(*at)).min()).collect();
            let today = day_of(NOW);
            let mut active_so_far = 0.0;
            for day in today - 45..=today {
                let new = first_days.iter().filter(|first| **first == day).count() as f64;
                prop_assert_eq!(activity.get(&(series::NEW.to_owned(), day)).copied().unwrap_or(0.0), new, "new on {}", day);
                active_so_far += activity.get(&(series::ACTIVE_CHANGE.to_owned(), day)).copied().unwrap_or(0.0);
                let active = timelines
                    .iter()
                    .filter(|events| {
                        let days: BTreeSet<Day> = events.iter().map(|(at, _)| day_of(*at)).collect();
                        days.iter().any(|d| *d <= day && day < d + 5)
                    })
                    .count() as f64;
                prop_assert_eq!(active_so_far, active, "active on {}", day);
            }
            let conversion = days_of(&TrackerSpec::Conversion {
                from: "Product Viewed".into(),
                to: "Order Completed".into(),
                within_ms: 3 * DAY_MS,
            });
            let mut started: BTreeMap<Day, f64> = BTreeMap::new();
            let mut converted: BTreeMap<Day, f64> = BTreeMap::new();
            for events in &timelines {
                let named = |name: &str| -> Vec<i64> {
                    events.iter().filter(|(_, event)| event.as_deref() == Some(name)).map(|(at, _)| *at).collect()
                };
                let Some(first) = named("Product Viewed").into_iter().min() else { continue };
                *started.entry(day_of(first)).or_default() += 1.0;
                if named("Order Completed").into_iter().any(|at| first <= at && at <= first + 3 * DAY_MS) {
                    *converted.entry(day_of(first)).or_default() += 1.0;
                }
            }
            for day in today - 45..=today {
                let stored = |name: &str| conversion.get(&(name.to_owned(), day)).copied().unwrap_or(0.0);
                prop_assert_eq!(stored(series::STARTED), started.get(&day).copied().unwrap_or(0.0));
                prop_assert_eq!(stored(series::CONVERTED), converted.get(&day).copied().unwrap_or(0.0));
            }
        }
    }
}
