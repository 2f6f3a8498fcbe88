//! Delivery to destinations: the outbox stage and one delivery worker per
//! destination.
//!
//! The outbox stage follows the log up to the resolver's cursor (so every
//! event it enqueues is already part of a profile) and, for each event,
//! enqueues one item per destination whose filter matches, in the same
//! transaction as its cursor (`stage_cursors`, stage `outbox`): a crash
//! replays from the last commit and neither loses nor doubles an enqueue.
//!
//! Each destination's worker takes the head of its outbox in enqueue order
//! and delivers a batch; only after the receiver accepted it are the items
//! removed, so a crash in between delivers them again (at least once). A
//! failed batch keeps its place: the head item records the failure and its
//! next due time (randomized exponential backoff, `tandem_core::activate`),
//! and nothing behind it is attempted before it succeeds or, past the
//! destination's time limit (or on a permanent refusal), becomes a dead
//! letter. An item that failed once is retried alone, so one refused item
//! does not take its neighbours to the dead letters.
//!
//! The stage and the workers run on one node of a shared store at a time,
//! under the `outbox` stage lease.
//!
//! Nothing here polls on the hot path: the stage wakes when the resolver or
//! the audience stage publishes a commit, and the workers when the stage
//! (or a resume or replay through the API) puts items in an outbox
//! ([`crate::progress`]). Each also looks again every [`RECHECK_INTERVAL`],
//! for what no signal reaches: a resolver or audience stage on another
//! node, and changes made by the CLI.

mod file;
mod warehouse;
mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_core::activate::{
    AttemptFailure, AudienceSubscription, DestinationDefinition, DestinationError, DestinationSettings, NextStep,
};
use tandem_core::govern::consent::{stated_consent_in_payload, withheld_categories, Consent, ConsentDefault};
use tandem_core::random::Random;
use tandem_core::{EventType, LogPosition, ProfileId};
use tandem_store::{
    ConsentChange, DeadLetter, DeadLetterFilter, DestinationRecord, FailedAttempt, NewOutboxItem, OutboxCommit,
    OutboxCommitOutcome, OutboxCursor, OutboxItem, Stage, Store, StoreError,
};

use crate::cluster::{LeaseKeeper, LeaseTurn};
use crate::metrics::{DestinationLabels, Metrics};
use crate::progress::{CommitCount, Progress, StageProgress};

/// Events the outbox stage reads per commit.
const EVENT_BATCH: usize = 1_000;
/// How often an idle stage and idle workers look for work no signal
/// announced (its predecessor on another node, the CLI), and the longest a
/// worker sleeps before looking at a retry that is due later.
pub const RECHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How often the stage lists destinations to start and stop their workers
/// and to set their lag gauges.
const DESTINATIONS_REFRESH: Duration = Duration::from_millis(500);

/// The time in milliseconds; injectable so tests can move it.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock, in milliseconds since the epoch.
pub fn system_clock() -> Clock {
    Arc::new(|| chrono::Utc::now().timestamp_millis())
}

/// What the delivery side could not do, in the caller's terms.
#[derive(Debug, thiserror::Error)]
pub enum DestinationDefineError {
    #[error(transparent)]
    Invalid(#[from] DestinationError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Validates and stores a new destination; it receives the events the
/// outbox stage enqueues from now on.
pub fn create_destination(
    store: &dyn Store,
    definition: &DestinationDefinition,
    now_ms: i64,
) -> Result<(), DestinationDefineError> {
    definition.validate()?;
    if let tandem_core::activate::DestinationSettings::Warehouse(warehouse) = &definition.destination {
        // The connection settings as they will be read to connect: a bad
        // `sslmode` or an unreadable `sslrootcert` is refused now.
        tandem_store::postgres::tls::check(&warehouse.url)
            .map_err(|error| DestinationError { field: "destination.url", message: error.to_string() })?;
    }
    store.create_destination(definition, now_ms)?;
    Ok(())
}

/// Puts a destination's dead letters that pass `filter` back in its outbox
/// at their places; returns how many.
pub fn replay(store: &dyn Store, name: &str, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
    store.replay_dead_letters(name, filter)
}

/// The dead letters of one destination (or of all) that pass `filter`,
/// oldest first.
pub fn dead_letters(
    store: &dyn Store,
    name: Option<&str>,
    filter: &DeadLetterFilter,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    if let Some(name) = name {
        if store.destination(name)?.is_none() {
            return Err(StoreError::DestinationNotFound(name.to_owned()));
        }
    }
    store.dead_letters(name, filter, limit)
}

/// The outbox stage: enqueues the log's events for each destination.
///
/// It also keeps consent: what each event says in
/// `context.consent.categoryPreferences` is recorded for its profile with the
/// same commit, and a destination naming `consent_categories` gets an event
/// or audience change only when the profile granted every one of them
/// (`tandem_core::govern::consent`); the others are counted as withheld. When
/// a profile's consent comes to cover such a destination, it gets an
/// `entered` for each audience it follows that the profile is in now —
/// never the events it missed.
pub struct OutboxStage {
    store: Arc<dyn Store>,
    consent_default: ConsentDefault,
    metrics: Option<Metrics>,
    /// Counts each commit that put items in an outbox, for the workers.
    progress: Progress<CommitCount>,
}

/// The name an event filter matches: a track's `event`, a page's or a
/// screen's `name`.
fn event_name(event_type: EventType, payload: &str) -> Option<String> {
    /// The two fields a destination's event filter reads; the rest of the
    /// payload is skipped without being built.
    #[derive(serde::Deserialize)]
    struct Names {
        event: Option<serde_json::Value>,
        name: Option<serde_json::Value>,
    }
    if !matches!(event_type, EventType::Track | EventType::Page | EventType::Screen) {
        return None;
    }
    let names: Names = serde_json::from_str(payload).ok()?;
    let field = if event_type == EventType::Track { names.event } else { names.name };
    match field? {
        serde_json::Value::String(name) => Some(name),
        _ => None,
    }
}

impl OutboxStage {
    pub fn new(store: Arc<dyn Store>) -> Self {
        OutboxStage { store, consent_default: ConsentDefault::default(), metrics: None, progress: Progress::default() }
    }

    /// Counts each commit that put items in an outbox on `progress`.
    pub fn with_progress(mut self, progress: Progress<CommitCount>) -> Self {
        self.progress = progress;
        self
    }

    /// What counts for a consent category a profile never spoke about.
    pub fn with_consent_default(mut self, consent_default: ConsentDefault) -> Self {
        self.consent_default = consent_default;
        self
    }

    /// Where withheld deliveries are counted.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts what a commit withheld, and wakes the workers when it
    /// enqueued anything.
    fn committed(&self, commit: &OutboxCommit) {
        self.count_withheld(&commit.withheld);
        if !commit.items.is_empty() {
            self.progress.count_commit();
        }
    }

    fn count_withheld(&self, withheld: &BTreeMap<String, BTreeMap<String, u64>>) {
        if let Some(metrics) = &self.metrics {
            for (destination, counts) in withheld {
                for (category, count) in counts {
                    metrics.count_consent_withheld(destination, category, *count);
                }
            }
        }
    }

    /// Enqueues the next batch of events the resolver has committed and of
    /// audience entries and exits; returns how many it read (0 when caught up).
    pub fn step(&mut self) -> Result<usize, StoreError> {
        Ok(self.step_events()? + self.step_audiences()?)
    }

    /// Enqueues the next entries and exits of the audiences destinations
    /// follow, each with the profile's chosen traits, after the stage's own
    /// cursor in the audience history.
    fn step_audiences(&mut self) -> Result<usize, StoreError> {
        let from = self.store.stage_cursor(Stage::OUTBOX_AUDIENCES)?.map_or(0, |cursor| cursor.position.0);
        let changes = self.store.membership_changes_after(from, EVENT_BATCH)?;
        let Some(&(to, _)) = changes.last() else { return Ok(0) };
        let destinations = self.store.list_destinations()?;
        let mut profiles: Vec<_> = changes
            .iter()
            .filter(|(_, change)| !followers(&destinations, &change.audience).is_empty())
            .map(|(_, c)| c.profile)
            .collect();
        profiles.sort_unstable();
        profiles.dedup();
        let traits: HashMap<_, _> =
            self.store.profiles(&profiles)?.into_iter().map(|profile| (profile.id, profile.traits)).collect();
        let consent = if needs_consent(&destinations) { self.store.consent_of(&profiles)? } else { BTreeMap::new() };
        let mut items = Vec::new();
        let mut withheld: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (id, change) in &changes {
            for (destination, subscription, required) in followers(&destinations, &change.audience) {
                let missing = withheld_categories(consent.get(&change.profile), required, self.consent_default);
                if !missing.is_empty() {
                    count_missing(&mut withheld, destination, &missing);
                    continue;
                }
                let payload = audience_payload(
                    &format!("audience-{id}"),
                    &change.audience,
                    change.kind.as_str(),
                    change.profile,
                    change.at_ms,
                    &subscription.traits,
                    traits.get(&change.profile),
                );
                items.push(NewOutboxItem {
                    destination: destination.to_owned(),
                    // The history id: audience items have no log position.
                    position: LogPosition(*id),
                    payload: payload.to_string(),
                    profile: Some(change.profile),
                });
            }
        }
        let commit = OutboxCommit {
            cursor: OutboxCursor::AudienceHistory,
            from: LogPosition(from),
            to: LogPosition(to),
            items,
            at_ms: chrono::Utc::now().timestamp_millis(),
            withheld,
            ..OutboxCommit::default()
        };
        match self.store.commit_outbox(&commit)? {
            OutboxCommitOutcome::Committed => {
                self.committed(&commit);
                Ok(changes.len())
            }
            OutboxCommitOutcome::StalePosition => Ok(0),
        }
    }

    fn step_events(&mut self) -> Result<usize, StoreError> {
        let from = self.store.stage_cursor(Stage::OUTBOX)?.map_or(LogPosition(0), |cursor| cursor.position);
        let resolved = self.store.stage_cursor(Stage::RESOLVE)?.map_or(LogPosition(0), |cursor| cursor.position);
        if resolved <= from {
            return Ok(0);
        }
        let entries: Vec<_> =
            self.store.read_log(from, EVENT_BATCH)?.into_iter().filter(|entry| entry.position <= resolved).collect();
        let Some(last) = entries.last() else { return Ok(0) };
        let to = last.position;
        let destinations = self.store.list_destinations()?;
        let stated: Vec<Option<Consent>> =
            entries.iter().map(|entry| stated_consent_in_payload(&entry.payload)).collect();
        // Names are read only when some destination filters events by them.
        let names: Vec<Option<String>> = if destinations.iter().any(|record| record.definition.events.is_some()) {
            entries.iter().map(|entry| event_name(entry.event_type, &entry.payload)).collect()
        } else {
            vec![None; entries.len()]
        };
        let wanted = entries.iter().zip(&names).any(|(entry, name)| {
            destinations.iter().any(|record| {
                record
                    .definition
                    .events
                    .as_ref()
                    .is_some_and(|events| events.matches(entry.event_type, name.as_deref()))
            })
        });
        let consent_matters = needs_consent(&destinations) || stated.iter().any(Option::is_some);
        // Each item carries its event's profile, so dead letters can be
        // found per profile, and consent is kept per profile; one read for
        // the whole batch, and none when neither is needed.
        let owners: HashMap<LogPosition, ProfileId> = if wanted || consent_matters {
            self.store.event_owners(from, to)?.into_iter().collect()
        } else {
            HashMap::new()
        };
        // Consent as it stands before this batch, for the profiles whose
        // consent can matter here; each event's own statement applies from
        // that event on.
        let mut consent: BTreeMap<ProfileId, Consent> = if consent_matters {
            let mut profiles: Vec<ProfileId> = owners.values().copied().collect();
            profiles.sort_unstable();
            profiles.dedup();
            self.store.consent_of(&profiles)?
        } else {
            BTreeMap::new()
        };
        let mut items = Vec::new();
        let mut changes = Vec::new();
        let mut withheld: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for ((entry, stated), name) in entries.iter().zip(stated).zip(names) {
            let profile = owners.get(&entry.position).copied();
            if let (Some(profile), Some(stated)) = (profile, stated) {
                let before = consent.get(&profile).cloned();
                let current = consent.entry(profile).or_default();
                for (category, granted) in stated {
                    changes.push(ConsentChange {
                        profile,
                        category: category.clone(),
                        granted,
                        position: entry.position,
                        at_ms: entry.timestamp_ms,
                    });
                    current.insert(category, granted);
                }
                let current = current.clone();
                items.extend(self.released(&destinations, profile, before.as_ref(), &current, entry.position)?);
            }
            for record in &destinations {
                let events = record.definition.events.as_ref();
                if events.is_some_and(|events| events.matches(entry.event_type, name.as_deref())) {
                    let required = &record.definition.consent_categories;
                    let missing = withheld_categories(
                        profile.and_then(|profile| consent.get(&profile)),
                        required,
                        self.consent_default,
                    );
                    if !missing.is_empty() {
                        count_missing(&mut withheld, &record.definition.name, &missing);
                        continue;
                    }
                    items.push(NewOutboxItem {
                        destination: record.definition.name.clone(),
                        position: entry.position,
                        payload: entry.payload.clone(),
                        profile: owners.get(&entry.position).copied(),
                    });
                }
            }
        }
        let commit = OutboxCommit {
            cursor: OutboxCursor::Log,
            from,
            to,
            items,
            at_ms: chrono::Utc::now().timestamp_millis(),
            consent: changes,
            withheld,
        };
        match self.store.commit_outbox(&commit)? {
            OutboxCommitOutcome::Committed => {
                self.committed(&commit);
                if let Some(metrics) = &self.metrics {
                    let received = entries.iter().map(|entry| entry.received_at_ms);
                    metrics.observe_event_ages("outbox", chrono::Utc::now().timestamp_millis(), received);
                }
                Ok(entries.len())
            }
            // Another node's stage enqueued these; read on from its cursor.
            OutboxCommitOutcome::StalePosition => Ok(0),
        }
    }

    /// The `entered` items a profile's consent change releases: for each
    /// destination that follows audiences and needs consent, when the change
    /// turned "withheld" into "allowed", one per audience it follows that
    /// the profile is in now.
    fn released(
        &self,
        destinations: &[DestinationRecord],
        profile: ProfileId,
        before: Option<&Consent>,
        after: &Consent,
        position: LogPosition,
    ) -> Result<Vec<NewOutboxItem>, StoreError> {
        let mut items = Vec::new();
        let mut memberships = None;
        let mut traits = None;
        for record in destinations {
            let required = &record.definition.consent_categories;
            if required.is_empty() || record.definition.audiences.is_empty() {
                continue;
            }
            let was_allowed = withheld_categories(before, required, self.consent_default).is_empty();
            let is_allowed = withheld_categories(Some(after), required, self.consent_default).is_empty();
            if was_allowed || !is_allowed {
                continue;
            }
            if memberships.is_none() {
                memberships = Some(self.store.profile_audiences(profile)?);
                traits = self.store.profile(profile)?.map(|profile| profile.traits);
            }
            for membership in memberships.iter().flatten() {
                for subscription in record.definition.audiences.iter().filter(|s| s.name == membership.audience) {
                    let payload = audience_payload(
                        &format!("consent-{}-{}", position.0, membership.audience),
                        &membership.audience,
                        "entered",
                        profile,
                        membership.entered_at_ms,
                        &subscription.traits,
                        traits.as_ref(),
                    );
                    items.push(NewOutboxItem {
                        destination: record.definition.name.clone(),
                        position,
                        payload,
                        profile: Some(profile),
                    });
                }
            }
        }
        Ok(items)
    }

    /// Runs [`OutboxStage::step`] until it is caught up with the resolver.
    pub fn catch_up(&mut self) -> Result<(), StoreError> {
        while self.step()? > 0 {}
        Ok(())
    }
}

/// The destinations that follow `audience`, with how each follows it and
/// the consent categories it needs.
fn followers<'a>(
    destinations: &'a [DestinationRecord],
    audience: &str,
) -> Vec<(&'a str, &'a AudienceSubscription, &'a [String])> {
    destinations
        .iter()
        .flat_map(|record| {
            record.definition.audiences.iter().filter(|subscription| subscription.name == audience).map(
                |subscription| {
                    (record.definition.name.as_str(), subscription, record.definition.consent_categories.as_slice())
                },
            )
        })
        .collect()
}

/// Whether any destination needs consent.
fn needs_consent(destinations: &[DestinationRecord]) -> bool {
    destinations.iter().any(|record| !record.definition.consent_categories.is_empty())
}

fn count_missing(withheld: &mut BTreeMap<String, BTreeMap<String, u64>>, destination: &str, missing: &[&str]) {
    let counts = withheld.entry(destination.to_owned()).or_default();
    for category in missing {
        *counts.entry((*category).to_owned()).or_insert(0) += 1;
    }
}

/// An audience entry or exit as a destination receives it, with the traits
/// its subscription chose.
fn audience_payload(
    message_id: &str,
    audience: &str,
    change: &str,
    profile: ProfileId,
    at_ms: i64,
    chosen_traits: &[String],
    profile_traits: Option<&serde_json::Map<String, serde_json::Value>>,
) -> String {
    let chosen: serde_json::Map<String, serde_json::Value> =
        chosen_traits.iter().filter_map(|name| Some((name.clone(), profile_traits?.get(name)?.clone()))).collect();
    let at =
        chrono::DateTime::from_timestamp_millis(at_ms).map(tandem_core::event::format_timestamp).unwrap_or_default();
    serde_json::json!({
        "type": "audience",
        "messageId": message_id,
        "audience": audience,
        "change": change,
        "profile": profile.to_string(),
        "timestamp": at,
        "traits": chosen,
    })
    .to_string()
}

/// What one [`DeliveryWorker::deliver_once`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryReport {
    /// The outbox is empty.
    Idle,
    /// The head item waits for its retry until this instant.
    WaitingUntil(i64),
    /// This many items were delivered.
    Delivered(usize),
    /// The attempt failed; the head item will be retried.
    Retrying,
    /// The attempt failed for good; the head item is a dead letter.
    DeadLettered,
    /// The destination no longer exists.
    Gone,
    /// The destination is paused: its items wait, in order.
    Paused,
    /// The outbox is empty, and this many audience snapshots were written
    /// that no batch brought (file destinations).
    Snapshotted(usize),
}

/// Delivers one destination's outbox, in order.
pub struct DeliveryWorker {
    store: Arc<dyn Store>,
    name: String,
    clock: Clock,
    metrics: Metrics,
    random: Random,
    /// After a batch was refused for good, its items are sent one at a time
    /// up to this id, to find the one the receiver refuses.
    isolate_through: Option<tandem_store::OutboxItemId>,
    /// With a rate limit, no attempt starts before this instant (ms).
    next_allowed_at_ms: i64,
    /// A warehouse destination's open connection.
    warehouse: Option<warehouse::Warehouse>,
    /// A file destination owes no snapshot before this instant (ms); the
    /// directory is read again then.
    snapshots_checked_until_ms: i64,
    /// The destination as read before the last batch that went out, and
    /// when: reused for the next batch while it is younger than
    /// [`RECORD_REUSE`], since reading it counts the whole outbox.
    after_delivery: Option<(DestinationRecord, Instant)>,
}

/// How long a file destination waits before trying again to write a
/// snapshot that failed.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(30);

/// How long a worker sending batch after batch trusts the destination it
/// read (a pause or a changed definition takes effect within this time).
const RECORD_REUSE: Duration = Duration::from_millis(100);

impl DeliveryWorker {
    pub fn new(store: Arc<dyn Store>, name: &str, clock: Clock, metrics: Metrics) -> Self {
        let seed = clock() as u64 ^ name.bytes().fold(0u64, |hash, byte| hash.rotate_left(5) ^ u64::from(byte));
        DeliveryWorker {
            store,
            name: name.to_owned(),
            clock,
            metrics,
            random: Random::new(seed),
            isolate_through: None,
            next_allowed_at_ms: i64::MIN,
            warehouse: None,
            snapshots_checked_until_ms: i64::MIN,
            after_delivery: None,
        }
    }

    /// Attempts the head of the outbox once, if it is due.
    pub fn deliver_once(&mut self) -> Result<DeliveryReport, StoreError> {
        let (record, read_at) = match self.after_delivery.take() {
            Some((record, read_at)) if read_at.elapsed() < RECORD_REUSE => (record, read_at),
            _ => match self.store.destination(&self.name)? {
                Some(record) => (record, Instant::now()),
                None => return Ok(DeliveryReport::Gone),
            },
        };
        if record.paused {
            return Ok(DeliveryReport::Paused);
        }
        // A rate limit also caps a batch at one second's worth of events.
        let rate = record.definition.max_events_per_second;
        let size = record.definition.batch_size.unwrap_or(tandem_core::activate::DEFAULT_BATCH_SIZE) as usize;
        let batch_size = rate.map_or(size, |rate| (rate as usize).clamp(1, size));
        let mut batch = self.store.outbox_head(&self.name, batch_size)?;
        let Some(head) = batch.first() else { return Ok(self.write_owed_snapshots(&record)) };
        let now = (self.clock)();
        let due = head.next_attempt_at_ms.max(self.next_allowed_at_ms);
        if due > now {
            return Ok(DeliveryReport::WaitingUntil(due));
        }
        let isolated = self.isolate_through.is_some_and(|through| head.id <= through);
        if head.attempts > 0 || isolated {
            batch.truncate(1);
        } else {
            self.isolate_through = None;
        }
        let attempt = deliver(self.store.as_ref(), &record, &batch, now, &mut self.warehouse);
        let now = (self.clock)();
        if let Some(rate) = rate {
            // The next attempt waits the time these events take at the rate.
            let spacing = (batch.len() as u64 * 1_000).div_ceil(u64::from(rate.max(1))) as i64;
            self.next_allowed_at_ms = now.saturating_add(spacing);
        }
        match attempt {
            Ok(_) => {
                let ids: Vec<_> = batch.iter().map(|item| item.id).collect();
                self.store.mark_delivered(&self.name, &ids)?;
                self.metrics.count_destination_items(&self.name, "delivered", ids.len() as u64);
                let enqueued = batch.iter().filter_map(|item| item.enqueued_at_ms);
                self.metrics.observe_delivery_waits(&self.name, (self.clock)(), enqueued);
                self.after_delivery = Some((record, read_at));
                Ok(DeliveryReport::Delivered(ids.len()))
            }
            Err(failure) => self.record(&record, &batch, failure, now),
        }
    }

    /// With an empty outbox, writes the snapshots a file destination owes
    /// (see [`file::write_owed_snapshots`]); a failure is retried later,
    /// since no item waits on it.
    fn write_owed_snapshots(&mut self, record: &DestinationRecord) -> DeliveryReport {
        let definition = &record.definition;
        let DestinationSettings::File(settings) = &definition.destination else { return DeliveryReport::Idle };
        let Some(directory) = &settings.directory else { return DeliveryReport::Idle };
        let now = (self.clock)();
        if definition.audiences.is_empty() || now < self.snapshots_checked_until_ms {
            return DeliveryReport::Idle;
        }
        match file::write_owed_snapshots(self.store.as_ref(), definition, settings, directory, now) {
            Ok(owed) => {
                self.snapshots_checked_until_ms = owed.next_due_ms.unwrap_or(i64::MAX);
                if owed.written > 0 {
                    return DeliveryReport::Snapshotted(owed.written);
                }
            }
            Err(failure) => {
                tracing::warn!(destination = %self.name, error = %failure, "writing an audience snapshot failed; will retry");
                self.snapshots_checked_until_ms = now.saturating_add(SNAPSHOT_RETRY.as_millis() as i64);
            }
        }
        DeliveryReport::Idle
    }

    fn record(
        &mut self,
        record: &DestinationRecord,
        batch: &[OutboxItem],
        failure: AttemptFailure,
        now: i64,
    ) -> Result<DeliveryReport, StoreError> {
        let head = &batch[0];
        let retry = record.definition.retry;
        let first_failed_at_ms = head.first_failed_at_ms.unwrap_or(now);
        let jitter = self.random.below(1_000_000) as f64 / 1_000_000.0;
        let error = failure.to_string();
        self.metrics.count_destination_items(&self.name, "failed", batch.len() as u64);
        if batch.len() > 1 && failure.class() == tandem_core::activate::FailureClass::Permanent {
            // The receiver refused the batch: try its items one by one, so
            // only the item it refuses becomes a dead letter.
            self.isolate_through = batch.last().map(|item| item.id);
            tracing::warn!(destination = %self.name, %error, "a batch was refused; sending its items one by one");
            return Ok(DeliveryReport::Retrying);
        }
        match retry.after_failure(&failure, first_failed_at_ms, head.attempts + 1, now, jitter) {
            NextStep::RetryAt(next_attempt_at_ms) => {
                tracing::warn!(destination = %self.name, %error, attempts = head.attempts + 1, "delivery failed; will retry");
                self.store
                    .record_failure(head.id, &FailedAttempt::Retry { first_failed_at_ms, next_attempt_at_ms, error })?;
                self.metrics.count_destination_items(&self.name, "retrying", 1);
                Ok(DeliveryReport::Retrying)
            }
            NextStep::DeadLetter => {
                tracing::warn!(destination = %self.name, %error, position = head.position.0, "gave up on an item; it is a dead letter");
                self.store.record_failure(head.id, &FailedAttempt::DeadLetter { at_ms: now, error })?;
                self.metrics.count_destination_items(&self.name, "dead", 1);
                Ok(DeliveryReport::DeadLettered)
            }
        }
    }
}

/// What a receiver did with a delivery it accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The webhook's 2xx status; `None` for files and warehouses.
    pub status: Option<u16>,
    /// What was done, in a sentence.
    pub detail: String,
}

/// Sends one batch to the destination; `warehouse` keeps a warehouse
/// connection between batches.
fn deliver(
    store: &dyn Store,
    record: &DestinationRecord,
    batch: &[OutboxItem],
    now_ms: i64,
    warehouse: &mut Option<warehouse::Warehouse>,
) -> Result<Receipt, AttemptFailure> {
    let definition = &record.definition;
    match &definition.destination {
        DestinationSettings::Webhook(settings) => {
            let accepted = webhook::post(settings, &batch_body(batch))?;
            Ok(Receipt { status: Some(accepted.status), detail: format!("the receiver answered {}", accepted.status) })
        }
        DestinationSettings::File(settings) => match (&settings.directory, &settings.path) {
            (Some(directory), _) => {
                file::deliver_batch(store, definition, settings, directory, batch, now_ms)?;
                Ok(Receipt { status: None, detail: format!("wrote {} items to files in {directory}", batch.len()) })
            }
            (None, Some(path)) => {
                file::append_lines(path, batch)?;
                Ok(Receipt { status: None, detail: format!("appended {} lines to {path}", batch.len()) })
            }
            (None, None) => Err(AttemptFailure::Io("the file destination names no directory".to_owned())),
        },
        DestinationSettings::Warehouse(settings) => {
            let connection = match warehouse {
                Some(connection) if connection.settings() == settings => connection,
                _ => warehouse.insert(warehouse::Warehouse::connect(settings)?),
            };
            let written = connection.write_batch(store, definition, batch);
            if written.is_err() {
                // A broken connection is opened afresh on the next attempt.
                *warehouse = None;
            }
            let counts = written?;
            Ok(Receipt { status: None, detail: format!("upserted {counts} into {}", settings.schema()) })
        }
    }
}

/// The batch as a JSON array of the events, as they were stored.
fn batch_body(batch: &[OutboxItem]) -> String {
    let mut body = String::with_capacity(batch.iter().map(|item| item.payload.len() + 1).sum::<usize>() + 2);
    body.push('[');
    for (index, item) in batch.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        body.push_str(&item.payload);
    }
    body.push(']');
    body
}

/// Sends one sample item to a destination right now, outside its outbox
/// (nothing is enqueued, counted or retried), and says what the receiver
/// did: for checking a new destination's address, credentials and TLS. A
/// warehouse is only connected to and migrated.
pub fn send_test(store: &dyn Store, name: &str, now_ms: i64) -> Result<Result<Receipt, AttemptFailure>, StoreError> {
    let Some(record) = store.destination(name)? else { return Err(StoreError::DestinationNotFound(name.to_owned())) };
    if let DestinationSettings::Warehouse(settings) = &record.definition.destination {
        // A sample row would stay in the warehouse's tables for good: the
        // test connects and migrates, which checks the address, the
        // credentials and the rights on the schema, and writes nothing else.
        return Ok(warehouse::Warehouse::connect(settings).map(|_| Receipt {
            status: None,
            detail: format!("connected; the tables in schema {} are up to date", settings.schema()),
        }));
    }
    let at = chrono::DateTime::from_timestamp_millis(now_ms).map(tandem_core::event::format_timestamp);
    let payload = match record.definition.audiences.first() {
        Some(subscription) if record.definition.events.is_none() => serde_json::json!({
            "type": "audience",
            "messageId": format!("test-{now_ms}"),
            "audience": subscription.name,
            "change": "entered",
            "profile": "prof_test",
            "timestamp": at,
            "traits": {},
            "test": true,
        }),
        _ => serde_json::json!({
            "type": "track",
            "event": "Tandem Test",
            "messageId": format!("test-{now_ms}"),
            "userId": "tandem-test",
            "timestamp": at,
            "properties": {"test": true},
        }),
    };
    let item = OutboxItem {
        id: tandem_store::OutboxItemId(0),
        destination: name.to_owned(),
        position: LogPosition(0),
        payload: payload.to_string(),
        attempts: 0,
        first_failed_at_ms: None,
        next_attempt_at_ms: 0,
        last_error: None,
        enqueued_at_ms: None,
    };
    // A test never writes snapshots: the sample is no real change.
    let mut definition = record.definition.clone();
    definition.audiences.retain(|_| false);
    let record = DestinationRecord { definition, ..record };
    Ok(deliver(store, &record, &[item], now_ms, &mut None))
}

/// Runs the outbox stage and one worker thread per destination until `stop`
/// is set, under the `outbox` stage lease. The stage wakes on the commits
/// `stages` publishes for the resolver and the audience stage and counts
/// its own on `stages.outbox`, which wakes the workers; each looks again at
/// least every `recheck` (the server's is [`RECHECK_INTERVAL`]).
pub fn spawn(
    store: Arc<dyn Store>,
    stages: StageProgress,
    clock: Clock,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
    consent_default: ConsentDefault,
    recheck: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("tandem-outbox".into())
        .spawn(move || {
            let mut stage = OutboxStage::new(store.clone())
                .with_consent_default(consent_default)
                .with_metrics(metrics.clone())
                .with_progress(stages.outbox.clone());
            let (mut on_resolved, mut on_audiences) = (stages.resolved.follow(), stages.audiences.follow());
            let mut on_destinations = stages.destinations.follow();
            let mut destinations_seen = stages.destinations.current();
            let mut lease = LeaseKeeper::new(store.clone(), Stage::OUTBOX);
            let mut workers = Workers { running: HashMap::new(), outbox: stages.outbox.clone(), recheck };
            // Listing destinations counts every outbox: done at most every
            // DESTINATIONS_REFRESH, not on every wake-up.
            let mut listed_at: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                match lease.poll() {
                    LeaseTurn::Held => {}
                    LeaseTurn::Waiting => continue,
                    LeaseTurn::Lost(lost) => {
                        tracing::warn!(%lost, "stopped delivering; waiting for the outbox lease again");
                        workers.stop(|_| true);
                        continue;
                    }
                }
                let read = match stage.step() {
                    Ok(read) => read,
                    Err(error) => {
                        tracing::error!(%error, "enqueuing events for destinations failed; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                if let (Ok(Some(cursor)), Ok(resolved)) =
                    (store.stage_cursor(Stage::OUTBOX), store.stage_cursor(Stage::RESOLVE))
                {
                    let resolved = resolved.map_or(0, |cursor| cursor.position.0);
                    metrics.outbox_lag_events.set(resolved.saturating_sub(cursor.position.0) as i64);
                }
                let destinations_now = stages.destinations.current();
                if destinations_now != destinations_seen
                    || listed_at.is_none_or(|at| at.elapsed() >= DESTINATIONS_REFRESH)
                {
                    destinations_seen = destinations_now;
                    listed_at = Some(Instant::now());
                    refresh_workers(&store, &clock, &metrics, &mut workers);
                }
                if read == 0 {
                    on_resolved.wait_any(&mut on_audiences, &mut on_destinations, recheck);
                }
            }
            workers.stop(|_| true);
            tracing::debug!("outbox stage stopped");
        })
        .expect("spawning the outbox thread")
}

/// Lists destinations: sets their lag gauges, starts a worker for each new
/// one and stops those of destinations that are gone.
fn refresh_workers(store: &Arc<dyn Store>, clock: &Clock, metrics: &Metrics, workers: &mut Workers) {
    let destinations = match store.list_destinations() {
        Ok(destinations) => destinations,
        Err(error) => {
            tracing::warn!(%error, "listing destinations failed");
            return;
        }
    };
    let now = clock();
    for record in &destinations {
        let waiting = record.counts.pending + record.counts.retrying;
        let labels = DestinationLabels { destination: record.definition.name.clone() };
        metrics.destination_lag_items.get_or_create(&labels).set(waiting as i64);
        let behind_ms = record.head_enqueued_at_ms.map_or(0, |at| now.saturating_sub(at).max(0));
        metrics.destination_lag_seconds.get_or_create(&labels).set(behind_ms / 1_000);
    }
    let names: Vec<String> = destinations.into_iter().map(|record| record.definition.name).collect();
    for name in workers.running.keys().filter(|name| !names.contains(name)) {
        let labels = DestinationLabels { destination: name.clone() };
        metrics.destination_lag_items.remove(&labels);
        metrics.destination_lag_seconds.remove(&labels);
    }
    workers.stop(|name| !names.contains(&name.to_owned()));
    for name in names {
        workers.start(store, &name, clock, metrics);
    }
}

/// The delivery worker threads, one per destination, each with its stop flag.
struct Workers {
    running: HashMap<String, (Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    /// The outbox stage's signal, which wakes idle workers.
    outbox: Progress<CommitCount>,
    recheck: Duration,
}

impl Workers {
    fn start(&mut self, store: &Arc<dyn Store>, name: &str, clock: &Clock, metrics: &Metrics) {
        if self.running.contains_key(name) {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let mut worker = DeliveryWorker::new(store.clone(), name, clock.clone(), metrics.clone());
        let mut outbox = self.outbox.follow();
        let (recheck, clock, destination) = (self.recheck, clock.clone(), name.to_owned());
        let handle = std::thread::Builder::new()
            .name(format!("tandem-deliver-{name}"))
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match worker.deliver_once() {
                        // The next item may be due at once.
                        Ok(
                            DeliveryReport::Delivered(_)
                            | DeliveryReport::Retrying
                            | DeliveryReport::DeadLettered
                            | DeliveryReport::Snapshotted(_),
                        ) => {}
                        Ok(DeliveryReport::Gone) => break,
                        Ok(DeliveryReport::WaitingUntil(due)) => {
                            let wait = (due - clock()).clamp(1, recheck.as_millis() as i64);
                            std::thread::sleep(Duration::from_millis(wait as u64));
                        }
                        Ok(DeliveryReport::Idle | DeliveryReport::Paused) => {
                            outbox.wait(recheck);
                        }
                        Err(error) => {
                            tracing::error!(%destination, %error, "delivery failed in storage; retrying");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            })
            .expect("spawning a delivery thread");
        self.running.insert(name.to_owned(), (stop, handle));
    }

    /// Stops the workers of the destinations `should_stop` names, waking
    /// them so they see their flag, and waits for each to finish.
    fn stop(&mut self, should_stop: impl Fn(&str) -> bool) {
        let stopping: Vec<String> = self.running.keys().filter(|name| should_stop(name)).cloned().collect();
        if stopping.is_empty() {
            return;
        }
        for name in &stopping {
            self.running[name].0.store(true, Ordering::Relaxed);
        }
        self.outbox.nudge();
        for name in stopping {
            if let Some((_, handle)) = self.running.remove(&name) {
                let _ = handle.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::Resolver;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::Router;
    use serde_json::{json, Value};
    use std::sync::Mutex;
    use tandem_core::activate::{EventFilter, FileFormat, FileSettings, RetrySettings, WebhookSettings};
    use tandem_core::collect::{normalize_message, BatchDefaults, IdRequirement, RequestContext};
    use tandem_core::SourceKind;
    use tandem_store::{IngestBatch, OutboxCounts, SqliteStore};

    /// A webhook receiver on a real socket that answers `failure` to its
    /// first `fail_first` requests, then 200, and keeps what it accepted.
    #[derive(Default)]
    struct Receiver {
        /// Answers the first this many requests only after this long.
        slow_first: (usize, Duration),
        /// Requests that arrived, answered or not.
        arrived: usize,
        fail_first: usize,
        failure: u16,
        /// A `Retry-After` header sent with each failure.
        retry_after: Option<&'static str>,
        requests: usize,
        accepted: Vec<Value>,
        signatures: Vec<Option<String>>,
    }

    type SharedReceiver = Arc<Mutex<Receiver>>;

    async fn receive(
        State(receiver): State<SharedReceiver>,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, HeaderMap) {
        let delay = {
            let mut receiver = receiver.lock().unwrap();
            receiver.arrived += 1;
            let (slow, delay) = receiver.slow_first;
            (receiver.arrived <= slow).then_some(delay)
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut receiver = receiver.lock().unwrap();
        receiver.requests += 1;
        if receiver.requests <= receiver.fail_first {
            let mut answer = HeaderMap::new();
            if let Some(after) = receiver.retry_after {
                answer.insert("retry-after", after.parse().unwrap());
            }
            return (StatusCode::from_u16(receiver.failure).unwrap(), answer);
        }
        let signature = headers.get("x-tandem-signature").map(|value| value.to_str().unwrap().to_owned());
        receiver.signatures.push(signature);
        let Value::Array(events) = serde_json::from_str(&body).unwrap() else { panic!("a JSON array expected") };
        receiver.accepted.extend(events);
        (StatusCode::OK, HeaderMap::new())
    }

    /// Starts a receiver; returns its URL. The runtime must outlive the test.
    fn start_receiver(runtime: &tokio::runtime::Runtime, receiver: SharedReceiver) -> String {
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let address = listener.local_addr().unwrap();
        let app = Router::new().route("/hook", post(receive)).with_state(receiver);
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{address}/hook")
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    fn append_and_resolve(store: &Arc<dyn Store>, messages: &[Value]) {
        let source = match store.list_sources().unwrap().into_iter().next() {
            Some(source) => source,
            None => store.create_source("web", SourceKind::Website).unwrap(),
        };
        let request = RequestContext {
            source_id: &source.id,
            received_at: chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
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

    fn track(user: &str, name: &str, n: u64) -> Value {
        json!({"type": "track", "event": name, "userId": user, "properties": {"n": n}})
    }

    fn webhook(name: &str, url: &str, retry: RetrySettings) -> DestinationDefinition {
        DestinationDefinition {
            name: name.to_owned(),
            destination: DestinationSettings::Webhook(WebhookSettings {
                url: url.to_owned(),
                secret: Some("shh".to_owned()),
                signature_header: tandem_core::activate::DEFAULT_SIGNATURE_HEADER.to_owned(),
                headers: Default::default(),
                timeout_ms: 5_000,
                ca_file: None,
            }),
            events: Some(EventFilter { types: vec![EventType::Track], names: vec!["Order Completed".to_owned()] }),
            audiences: Vec::new(),
            retry,
            max_events_per_second: None,
            batch_size: None,
            consent_categories: Vec::new(),
        }
    }

    /// A clock the test moves by hand.
    fn manual_clock(start: i64) -> (Clock, Arc<Mutex<i64>>) {
        let now = Arc::new(Mutex::new(start));
        let read = now.clone();
        (Arc::new(move || *read.lock().unwrap()), now)
    }

    fn numbers(events: &[Value]) -> Vec<u64> {
        events.iter().map(|event| event["properties"]["n"].as_u64().unwrap()).collect()
    }

    /// Runs the worker until its outbox is empty, moving the clock to each
    /// retry's due time; returns the reports.
    fn drain(worker: &mut DeliveryWorker, now: &Arc<Mutex<i64>>) -> Vec<DeliveryReport> {
        let mut reports = Vec::new();
        for _ in 0..1_000 {
            let report = worker.deliver_once().unwrap();
            match report {
                DeliveryReport::Idle | DeliveryReport::Gone => return reports,
                DeliveryReport::WaitingUntil(due) => *now.lock().unwrap() = due,
                _ => reports.push(report),
            }
        }
        panic!("the outbox never drained");
    }

    #[test]
    fn matching_events_are_delivered_in_order_across_failures_at_least_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let runtime = runtime();
        let receiver = Arc::new(Mutex::new(Receiver { fail_first: 3, failure: 503, ..Default::default() }));
        let url = start_receiver(&runtime, receiver.clone());
        let (clock, now) = manual_clock(1_000_000);
        create_destination(&*store, &webhook("crm", &url, RetrySettings::default()), 0).unwrap();

        let mut messages: Vec<Value> = (1..=5).map(|n| track("ann", "Order Completed", n)).collect();
        messages.insert(2, track("ann", "Page Viewed", 99));
        messages.push(json!({"type": "identify", "userId": "ann", "traits": {"n": 98}}));
        append_and_resolve(&store, &messages);
        OutboxStage::new(store.clone()).catch_up().unwrap();
        assert_eq!(store.destination("crm").unwrap().unwrap().counts.pending, 5, "only matching events are enqueued");

        let metrics = Metrics::new();
        let mut worker = DeliveryWorker::new(store.clone(), "crm", clock, metrics.clone());
        let reports = drain(&mut worker, &now);
        assert_eq!(reports.iter().filter(|report| **report == DeliveryReport::Retrying).count(), 3);
        let receiver = receiver.lock().unwrap();
        assert_eq!(receiver.requests, 3 + 2, "after the failures the head item goes alone, then the rest in one batch");
        assert_eq!(numbers(&receiver.accepted), vec![1, 2, 3, 4, 5], "order kept across failures");
        assert!(receiver
            .signatures
            .iter()
            .all(|signature| signature.as_deref().is_some_and(|s| s.starts_with("sha256="))));
        assert_eq!(
            store.destination("crm").unwrap().unwrap().counts,
            OutboxCounts { pending: 0, retrying: 0, delivered: 5, dead: 0 }
        );
        let text = metrics.render();
        assert!(text.contains(r#"destination_items_total{destination="crm",outcome="delivered"} 5"#));
        assert!(text.contains(r#"destination_items_total{destination="crm",outcome="retrying"} 3"#), "{text}");
        // The batch of five, then the head item alone, twice.
        assert!(text.contains(r#"destination_items_total{destination="crm",outcome="failed"} 7"#), "{text}");
    }

    #[test]
    fn a_paused_destination_keeps_its_items_in_order_and_sends_them_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let runtime = runtime();
        let receiver = Arc::new(Mutex::new(Receiver::default()));
        let url = start_receiver(&runtime, receiver.clone());
        let (clock, now) = manual_clock(1_000_000);
        create_destination(&*store, &webhook("crm", &url, RetrySettings::default()), 0).unwrap();
        store.set_destination_paused("crm", true).unwrap();
        append_and_resolve(&store, &[track("ann", "Order Completed", 1), track("bob", "Order Completed", 2)]);
        OutboxStage::new(store.clone()).catch_up().unwrap();
        let mut worker = DeliveryWorker::new(store.clone(), "crm", clock, Metrics::new());
        assert_eq!(worker.deliver_once().unwrap(), DeliveryReport::Paused);
        let record = store.destination("crm").unwrap().unwrap();
        assert!(record.paused);
        assert_eq!(record.counts.pending, 2, "items are enqueued while paused");
        assert_eq!(receiver.lock().unwrap().requests, 0, "nothing is sent while paused");
        store.set_destination_paused("crm", false).unwrap();
        drain(&mut worker, &now);
        assert_eq!(numbers(&receiver.lock().unwrap().accepted), vec![1, 2]);
        assert!(matches!(store.set_destination_paused("nobody", true), Err(StoreError::DestinationNotFound(_))));
    }

    #[test]
    fn a_batch_size_caps_the_items_of_each_request() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let runtime = runtime();
        let receiver = Arc::new(Mutex::new(Receiver::default()));
        let url = start_receiver(&runtime, receiver.clone());
        let (clock, _now) = manual_clock(1_000_000);
        let definition =
            DestinationDefinition { batch_size: Some(3), ..webhook("crm", &url, RetrySettings::default()) };
        create_destination(&*store, &definition, 0).unwrap();
        append_and_resolve(&store, &(1..=7).map(|n| track("ann", "Order Completed", n)).collect::<Vec<_>>());
        OutboxStage::new(store.clone()).catch_up().unwrap();
        let mut worker = DeliveryWorker::new(store.clone(), "crm", clock, Metrics::new());
        let mut sizes = Vec::new();
        while let DeliveryReport::Delivered(count) = worker.deliver_once().unwrap() {
            sizes.push(count);
        }
        assert_eq!(sizes, vec![3, 3, 1]);
        assert_eq!(numbers(&receiver.lock().unwrap().accepted), (1..=7).collect::<Vec<_>>());
        for refused in [0, 5_001] {
            let definition = DestinationDefinition { batch_size: Some(refused), ..definition.clone() };
            assert_eq!(definition.validate().unwrap_err().field, "batch_size");
        }
    }

    #[test]
    fn a_rate_limit_spaces_batches_to_the_configured_events_per_second() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let runtime = runtime();
        let receiver = Arc::new(Mutex::new(Receiver::default()));
        let url = start_receiver(&runtime, receiver.clone());
        let (clock, now) = manual_clock(1_000_000);
        let definition =
            DestinationDefinition { max_events_per_second: Some(2), ..webhook("crm", &url, RetrySettings::default()) };
        create_destination(&*store, &definition, 0).unwrap();
        append_and_resolve(&store, &(1..=5).map(|n| track("ann", "Order Completed", n)).collect::<Vec<_>>());
        OutboxStage::new(store.clone()).catch_up().unwrap();
        let mut worker = DeliveryWorker::new(store.clone(), "crm", clock, Metrics::new());
        let mut sent_at = Vec::new();
        for _ in 0..20 {
            match worker.deliver_once().unwrap() {
                DeliveryReport::Delivered(count) => sent_at.push((*now.lock().unwrap(), count)),
                DeliveryReport::WaitingUntil(due) => *now.lock().unwrap() = due,
                DeliveryReport::Idle => break,
                report => panic!("unexpected {report:?}"),
            }
        }
        // Two events per batch, a second apart: 5 events over 2 seconds.
        assert_eq!(sent_at, vec![(1_000_000, 2), (1_001_000, 2), (1_002_000, 1)]);
        assert_eq!(numbers(&receiver.lock().unwrap().accepted), vec![1, 2, 3, 4, 5]);
        let zero = DestinationDefinition { max_events_per_second: Some(0), ..definition };
        assert!(zero.validate().is_err(), "a rate of 0 is refused");
    }

    #[test]
    fn a_receiver_that_asks_to_wait_with_retry_after_is_left_alone_that_long() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let runtime = runtime();
        let receiver = Arc::new(Mutex::new(Receiver {
            fail_first: 1,
            failure: 429,
            retry_after: Some("30"),
            ..Default::default()
        }));
        let url = start_receiver(&runtime, receiver.clone());
        let (clock, now) = manual_clock(1_000_000);
        create_destination(&*store, &webhook("crm", &url, RetrySettings::default()), 0).unwrap();
        append_and_resolve(&store, &[track("ann", "Order Completed", 1)]);
        OutboxStage::new(store.clone()).catch_up().unwrap();
        let mut worker = DeliveryWorker::new(store.clone(), "crm", clock, Metrics::new());
        assert_eq!(worker.deliver_once().unwrap(), DeliveryReport::Retrying);
        // The default backoff starts at 10 s; the receiver asked for 30 s.
        match worker.deliver_once().unwrap() {
            DeliveryReport::WaitingUntil(due) => assert!(due >= 1_030_000, "retried too early: at {due}"),
            report => panic!("expected to wait, got {report:?}"),
        }
        assert!(store.dead_letters(Some("crm"), &Default::default(), 10).unwrap().is_empty());
        *now.lock().unwrap() = 1_030_000;
        drain(&mut worker, &now);
        let receiver = receiver.lock().unwrap();
        assert_eq!((receiver.requests, numbers(&receiver.accepted)), (2, vec![1]));
    }

    #[test]
    fn an_item_past_the_time_limit_becomes_a_dead_letter_and_replay_delivers_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let runtime = runtime();
        // Fails long enough to exhaust a 10-second limit.
        let receiver = Arc::new(Mutex::new(Receiver { fail_first: 1_000, failure: 500, ..Default::default() }));
        let url = start_receiver(&runtime, receiver.clone());
        let (clock, now) = manual_clock(1_000_000);
        let retry = RetrySettings { initial_backoff_ms: 1_000, max_backoff_ms: 4_000, give_up_after_ms: 10_000 };
        create_destination(&*store, &webhook("crm", &url, retry), 0).unwrap();
        append_and_resolve(&store, &[track("ann", "Order Completed", 1), track("bob", "Order Completed", 2)]);
        OutboxStage::new(store.clone()).catch_up().unwrap();

        let mut worker = DeliveryWorker::new(store.clone(), "crm", clock.clone(), Metrics::new());
        let mut reports = Vec::new();
        while store.dead_letters(Some("crm"), &Default::default(), 10).unwrap().is_empty() {
            match worker.deliver_once().unwrap() {
                DeliveryReport::WaitingUntil(due) => *now.lock().unwrap() = due,
                report => reports.push(report),
            }
            assert!(reports.len() < 50, "the item never ran out of retries");
        }
        assert!(*now.lock().unwrap() - 1_000_000 <= 10_000, "gave up within the limit");
        let dead = store.dead_letters(Some("crm"), &Default::default(), 10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].last_error, "the receiver answered 500");
        assert!(dead[0].attempts >= 3);
        assert!(receiver.lock().unwrap().accepted.is_empty(), "the second item never overtook the first");

        // The receiver recovers; the second item goes, then the replay
        // puts the first back and it is delivered too.
        receiver.lock().unwrap().fail_first = 0;
        drain(&mut worker, &now);
        assert_eq!(replay(&*store, "crm", &Default::default()).unwrap(), 1);
        append_and_resolve(&store, &[track("cy", "Order Completed", 3)]);
        OutboxStage::new(store.clone()).catch_up().unwrap();
        drain(&mut worker, &now);
        assert_eq!(
            numbers(&receiver.lock().unwrap().accepted),
            vec![2, 1, 3],
            "the replayed item goes before later ones"
        );
        assert_eq!(
            store.destination("crm").unwrap().unwrap().counts,
            OutboxCounts { pending: 0, retrying: 0, delivered: 3, dead: 0 }
        );
    }

    #[test]
    fn a_request_that_times_out_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let runtime = runtime();
        let receiver =
            Arc::new(Mutex::new(Receiver { slow_first: (1, Duration::from_millis(600)), ..Default::default() }));
        let url = start_receiver(&runtime, receiver.clone());
        let mut definition = webhook("crm", &url, RetrySettings::default());
        if let DestinationSettings::Webhook(settings) = &mut definition.destination {
            settings.timeout_ms = 150;
        }
        create_destination(&*store, &definition, 0).unwrap();
        append_and_resolve(&store, &[track("ann", "Order Completed", 1)]);
        OutboxStage::new(store.clone()).catch_up().unwrap();
        let (clock, now) = manual_clock(1_000_000);
        let mut worker = DeliveryWorker::new(store.clone(), "crm", clock, Metrics::new());
        assert_eq!(worker.deliver_once().unwrap(), DeliveryReport::Retrying);
        let head = &store.outbox_head("crm", 1).unwrap()[0];
        assert_eq!(head.last_error.as_deref(), Some("the receiver did not answer in time"));
        drain(&mut worker, &now);
        let receiver = receiver.lock().unwrap();
        assert_eq!(receiver.arrived, 2, "the timed-out request, then the retry");
        assert_eq!(numbers(&receiver.accepted), vec![1]);
        assert_eq!(store.destination("crm").unwrap().unwrap().counts.delivered, 1);
    }

    #[test]
    fn a_refused_batch_is_split_so_only_the_refused_item_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let runtime = runtime();
        // The batch and then the first item alone are refused with 400.
        let receiver = Arc::new(Mutex::new(Receiver { fail_first: 2, failure: 400, ..Default::default() }));
        let url = start_receiver(&runtime, receiver.clone());
        let (clock, now) = manual_clock(1_000_000);
        create_destination(&*store, &webhook("crm", &url, RetrySettings::default()), 0).unwrap();
        append_and_resolve(&store, &(1..=3).map(|n| track("ann", "Order Completed", n)).collect::<Vec<_>>());
        OutboxStage::new(store.clone()).catch_up().unwrap();
        let mut worker = DeliveryWorker::new(store.clone(), "crm", clock, Metrics::new());
        drain(&mut worker, &now);
        let dead = store.dead_letters(Some("crm"), &Default::default(), 10).unwrap();
        assert_eq!(dead.iter().map(|letter| letter.position.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(dead[0].last_error, "the receiver answered 400");
        assert_eq!(numbers(&receiver.lock().unwrap().accepted), vec![2, 3]);
    }

    #[test]
    fn a_file_destination_appends_one_json_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("data").as_path()).unwrap());
        let path = dir.path().join("events.jsonl");
        let definition = DestinationDefinition {
            name: "archive".to_owned(),
            destination: DestinationSettings::File(FileSettings {
                path: Some(path.to_string_lossy().into_owned()),
                ..Default::default()
            }),
            events: Some(EventFilter::default()),
            audiences: Vec::new(),
            retry: RetrySettings::default(),
            max_events_per_second: None,
            batch_size: None,
            consent_categories: Vec::new(),
        };
        create_destination(&*store, &definition, 0).unwrap();
        append_and_resolve(&store, &[track("ann", "A", 1), track("ann", "B", 2)]);
        OutboxStage::new(store.clone()).catch_up().unwrap();
        append_and_resolve(&store, &[track("ann", "C", 3)]);
        OutboxStage::new(store.clone()).catch_up().unwrap();
        let (clock, now) = manual_clock(0);
        let mut worker = DeliveryWorker::new(store.clone(), "archive", clock, Metrics::new());
        drain(&mut worker, &now);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(numbers(&lines), vec![1, 2, 3]);
        assert_eq!(lines[0]["event"], "A");
    }

    /// The regression this pins: the audience and outbox stages woke on the
    /// log head, which moves before the resolver has committed anything they
    /// may read, and delivery workers polled every 100 ms, so an entry
    /// waited for the next tick at each hop. With every recheck set to an
    /// hour, an event and an audience entry reach the receiver only if each
    /// stage wakes on its predecessor's commit. Also: a destination created
    /// while the stages sleep gets its worker when the API says so, not at
    /// the outbox stage's next listing of destinations (then an hour away).
    #[test]
    fn every_stage_wakes_on_its_predecessors_commit_without_polling() {
        const AN_HOUR: Duration = Duration::from_secs(3_600);
        let runtime = runtime();
        let receiver = SharedReceiver::default();
        let url = start_receiver(&runtime, receiver.clone());
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("data").as_path()).unwrap());
        let mut definition = webhook("hooks", &url, RetrySettings::default());
        definition.audiences = vec![AudienceSubscription { name: "buyers".to_owned(), traits: Vec::new() }];
        create_destination(&*store, &definition, 0).unwrap();
        let rule = tandem_core::audience::Condition::parse(r#"performed "Order Completed""#).unwrap();
        crate::audience::create_audience(&*store, "buyers", rule, chrono::Utc::now()).unwrap();

        let head = crate::log_head::LogHead::new(store.head().unwrap());
        let stages = StageProgress::default();
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = Metrics::new();
        let resolver = crate::resolve::spawn(
            store.clone(),
            head.clone(),
            stages.resolved.clone(),
            metrics.clone(),
            crate::resolve::ResolverCache::profiles(1_000),
            stop.clone(),
            crate::cluster::LeaseBoard::default(),
        );
        let audiences = crate::audience::spawn(
            store.clone(),
            stages.resolved.clone(),
            stages.audiences.clone(),
            crate::audience::system_clock(),
            metrics.clone(),
            stop.clone(),
            AN_HOUR,
        );
        let outbox = spawn(
            store.clone(),
            stages.clone(),
            system_clock(),
            metrics.clone(),
            stop.clone(),
            ConsentDefault::default(),
            AN_HOUR,
        );
        // Let every stage find nothing to do and go to sleep first.
        std::thread::sleep(Duration::from_millis(300));
        // What the API does when it creates a destination.
        create_destination(&*store, &webhook("late", &url, RetrySettings::default()), 0).unwrap();
        stages.destinations_changed();

        // What the log writer does: append, then publish the head.
        let source = store.create_source("web", SourceKind::Website).unwrap();
        let request = RequestContext {
            source_id: &source.id,
            received_at: chrono::Utc::now(),
            client_ip: None,
            ids: IdRequirement::UserOrAnonymousId,
        };
        let Value::Object(message) = track("ann", "Order Completed", 1) else { unreachable!() };
        let record = normalize_message(message, None, &BatchDefaults::default(), &request).unwrap().to_log_record();
        store.append(&[IngestBatch { records: vec![record], ..Default::default() }], 0).unwrap();
        head.publish(store.head().unwrap());

        let deadline = Instant::now() + Duration::from_secs(30);
        let delivered = loop {
            let accepted = receiver.lock().unwrap().accepted.clone();
            if accepted.len() >= 3 || Instant::now() > deadline {
                break accepted;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stop.store(true, Ordering::Relaxed);
        head.nudge();
        stages.nudge_all();
        for stage in [resolver, audiences, outbox] {
            stage.join().unwrap();
        }
        let kinds: Vec<_> = delivered.iter().map(|item| item["type"].as_str().unwrap_or_default()).collect();
        assert_eq!(kinds.len(), 3, "the event (twice) and the audience entry arrived without a recheck: {delivered:?}");
        assert_eq!(kinds.iter().filter(|kind| **kind == "track").count(), 2, "{delivered:?}");
        assert!(kinds.contains(&"audience"), "{delivered:?}");
        let entry = delivered.iter().find(|item| item["type"] == "audience").unwrap();
        assert_eq!((entry["audience"].as_str(), entry["change"].as_str()), (Some("buyers"), Some("entered")));
        // Each hop is measured: the event's age at each stage's commit, and
        // both items' wait in the outbox.
        let text = metrics.render();
        for series in [
            r#"tandem_stage_event_age_seconds_count{stage="resolve"} 1"#,
            r#"tandem_stage_event_age_seconds_count{stage="audience"} 1"#,
            r#"tandem_stage_event_age_seconds_count{stage="outbox"} 1"#,
            r#"tandem_destination_delivery_wait_seconds_count{destination="hooks"} 2"#,
            r#"tandem_destination_delivery_wait_seconds_count{destination="late"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn audience_entries_and_exits_are_delivered_with_the_chosen_traits() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("data").as_path()).unwrap());
        let path = dir.path().join("audiences.jsonl");
        let definition: DestinationDefinition = serde_json::from_value(json!({
            "name": "ads",
            "destination": {"kind": "file", "path": path},
            "audiences": [{"name": "pro", "traits": ["email", "plan"]}]
        }))
        .unwrap();
        create_destination(&*store, &definition, 0).unwrap();
        let now = chrono::Utc::now();
        let rule = tandem_core::audience::Condition::parse(r#"trait plan = "pro""#).unwrap();
        crate::audience::create_audience(&*store, "pro", rule, now).unwrap();
        let rule = tandem_core::audience::Condition::parse(r#"trait plan = "free""#).unwrap();
        crate::audience::create_audience(&*store, "free", rule, now).unwrap();
        let settle = |store: &Arc<dyn Store>| {
            crate::audience::AudienceStage::new(store.clone(), crate::audience::system_clock()).catch_up().unwrap();
            OutboxStage::new(store.clone()).catch_up().unwrap();
        };
        append_and_resolve(
            &store,
            &[
                json!({"type": "identify", "userId": "ann", "traits": {"plan": "pro", "email": "ann@example.com", "age": 40}}),
                json!({"type": "identify", "userId": "bob", "traits": {"plan": "free"}}),
            ],
        );
        settle(&store);
        append_and_resolve(&store, &[json!({"type": "identify", "userId": "ann", "traits": {"plan": "free"}})]);
        settle(&store);
        let (clock, now) = manual_clock(0);
        let mut worker = DeliveryWorker::new(store.clone(), "ads", clock, Metrics::new());
        drain(&mut worker, &now);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(lines.len(), 2, "ann entered and left pro; nothing of free, nor the events: {text}");
        assert_eq!((lines[0]["type"].as_str(), lines[0]["audience"].as_str()), (Some("audience"), Some("pro")));
        assert_eq!(lines[0]["change"], "entered");
        assert_eq!(lines[1]["change"], "exited");
        assert_eq!(lines[0]["profile"], lines[1]["profile"]);
        assert_eq!(lines[1]["traits"], json!({"email": "ann@example.com", "plan": "free"}), "the chosen traits only");
        assert_ne!(lines[0]["messageId"], lines[1]["messageId"]);
    }

    #[test]
    fn deliveries_are_withheld_without_consent_and_the_current_audiences_released_when_it_comes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("data").as_path()).unwrap());
        let runtime = runtime();
        let receiver = Arc::new(Mutex::new(Receiver::default()));
        let url = start_receiver(&runtime, receiver.clone());
        let definition = DestinationDefinition {
            audiences: vec![serde_json::from_value(json!({"name": "pro", "traits": ["plan"]})).unwrap()],
            consent_categories: vec!["marketing".to_owned()],
            ..webhook("crm", &url, RetrySettings::default())
        };
        create_destination(&*store, &definition, 0).unwrap();
        let rule = tandem_core::audience::Condition::parse(r#"trait plan = "pro""#).unwrap();
        crate::audience::create_audience(&*store, "pro", rule, chrono::Utc::now()).unwrap();
        let metrics = Metrics::new();
        let settle = |store: &Arc<dyn Store>| {
            crate::audience::AudienceStage::new(store.clone(), crate::audience::system_clock()).catch_up().unwrap();
            OutboxStage::new(store.clone())
                .with_consent_default(ConsentDefault::Deny)
                .with_metrics(metrics.clone())
                .catch_up()
                .unwrap();
        };
        let consenting = |n: u64, granted: bool| {
            let mut message = track("ann", "Order Completed", n);
            message["context"] = json!({"consent": {"categoryPreferences": {"marketing": granted, "ads": false}}});
            message
        };
        // No consent yet, and the default denies: nothing leaves.
        append_and_resolve(
            &store,
            &[
                json!({"type": "identify", "userId": "ann", "traits": {"plan": "pro"}}),
                track("ann", "Order Completed", 1),
            ],
        );
        settle(&store);
        assert_eq!(store.destination("crm").unwrap().unwrap().counts.pending, 0);
        // Consent arrives: the current membership is released, then the event.
        append_and_resolve(&store, &[consenting(2, true)]);
        settle(&store);
        // Later events without a consent object follow what Ann said last.
        append_and_resolve(&store, &[track("ann", "Order Completed", 3), consenting(4, false)]);
        settle(&store);
        append_and_resolve(&store, &[track("ann", "Order Completed", 5)]);
        settle(&store);

        let (clock, now) = manual_clock(1_000_000);
        let mut worker = DeliveryWorker::new(store.clone(), "crm", clock, Metrics::new());
        drain(&mut worker, &now);
        let accepted = receiver.lock().unwrap().accepted.clone();
        assert_eq!(accepted.len(), 3, "{accepted:?}");
        assert_eq!((accepted[0]["type"].as_str(), accepted[0]["change"].as_str()), (Some("audience"), Some("entered")));
        assert_eq!(accepted[0]["audience"], "pro");
        assert_eq!(accepted[0]["traits"], json!({"plan": "pro"}));
        assert_eq!(numbers(&accepted[1..]), vec![2, 3], "never the events before consent, nor after it was withdrawn");

        let withheld = store.withheld_counts("crm").unwrap();
        assert_eq!(withheld.get("marketing"), Some(&4), "events 1, 4 and 5 and the first entry: {withheld:?}");
        assert_eq!(withheld.len(), 1, "only the categories the destination needs");
        let profile = store.profile_by_identifier(&tandem_core::Identifier::new("user_id", "ann")).unwrap().unwrap();
        let history = store.consent_history(profile.id).unwrap();
        let marketing: Vec<bool> =
            history.iter().filter(|change| change.category == "marketing").map(|change| change.granted).collect();
        assert_eq!(marketing, vec![true, false]);
        assert!(!store.consent_of(&[profile.id]).unwrap()[&profile.id]["marketing"]);
        let text = metrics.render();
        assert!(text.contains("tandem_consent_withheld_total{destination=\"crm\",category=\"marketing\"} 4"), "{text}");
    }

    #[test]
    fn events_are_enqueued_only_once_the_resolver_committed_them() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        create_destination(&*store, &webhook("crm", "http://127.0.0.1:9/hook", RetrySettings::default()), 0).unwrap();
        let source = store.create_source("web", SourceKind::Website).unwrap();
        let request = RequestContext {
            source_id: &source.id,
            received_at: chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
            client_ip: None,
            ids: IdRequirement::UserOrAnonymousId,
        };
        let Value::Object(message) = track("ann", "Order Completed", 1) else { unreachable!() };
        let record = normalize_message(message, None, &BatchDefaults::default(), &request).unwrap().to_log_record();
        store.append(&[IngestBatch { records: vec![record], ..Default::default() }], 0).unwrap();
        let mut stage = OutboxStage::new(store.clone());
        assert_eq!(stage.step().unwrap(), 0, "the resolver has not committed the event");
        Resolver::load(store.clone()).unwrap().catch_up(1_000).unwrap();
        assert_eq!(stage.step().unwrap(), 1);
        assert_eq!(stage.step().unwrap(), 0);
        assert_eq!(store.destination("crm").unwrap().unwrap().counts.pending, 1);
    }

    #[test]
    fn definitions_are_validated_before_they_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let bad = webhook("crm", "ftp://x", RetrySettings::default());
        assert!(
            matches!(create_destination(&*store, &bad, 0), Err(DestinationDefineError::Invalid(e)) if e.field == "destination.url")
        );
        assert!(store.list_destinations().unwrap().is_empty());
        let https = webhook("crm", "https://example.com/hook", RetrySettings::default());
        create_destination(&*store, &https, 0).unwrap();
    }

    /// A certificate authority and a server certificate for `localhost` it
    /// signed; returns the CA's PEM and the server's chain and key.
    fn tls_certificates(
    ) -> (String, rustls::pki_types::CertificateDer<'static>, rustls::pki_types::PrivateKeyDer<'static>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
        (ca.pem(), server.der().clone(), key)
    }

    /// An HTTPS receiver on a real socket (rustls over a std listener) that
    /// answers 200 and keeps each request body; returns its port.
    fn start_tls_receiver(
        certificate: rustls::pki_types::CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        bodies: Arc<Mutex<Vec<String>>>,
    ) -> u16 {
        use std::io::{Read, Write as _};
        // The same provider the webhook client uses (ureq's `rustls`
        // feature is built on ring).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![certificate], key)
            .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(20) {
                let Ok(stream) = stream else { continue };
                let Ok(connection) = rustls::ServerConnection::new(config.clone()) else { continue };
                let mut tls = rustls::StreamOwned::new(connection, stream);
                let mut received = Vec::new();
                let mut buffer = [0u8; 4096];
                // Read the head, then as much body as content-length says.
                let body = loop {
                    match tls.read(&mut buffer) {
                        Ok(0) | Err(_) => break None,
                        Ok(read) => received.extend_from_slice(&buffer[..read]),
                    }
                    let text = String::from_utf8_lossy(&received).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|line| {
                                let (name, value) = line.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
                            })
                            .unwrap_or(0usize);
                        if body.len() >= length {
                            break Some(body.to_owned());
                        }
                    }
                };
                if let Some(body) = body {
                    bodies.lock().unwrap().push(body);
                    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
            }
        });
        port
    }

    #[test]
    fn an_https_webhook_is_delivered_over_tls_trusting_its_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("data").as_path()).unwrap());
        let (ca_pem, certificate, key) = tls_certificates();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let port = start_tls_receiver(certificate, key, bodies.clone());
        let url = format!("https://localhost:{port}/hook");

        // Without the CA, the receiver's certificate is not trusted.
        create_destination(&*store, &webhook("public-roots", &url, RetrySettings::default()), 0).unwrap();
        let mut trusted = webhook("crm", &url, RetrySettings::default());
        if let DestinationSettings::Webhook(settings) = &mut trusted.destination {
            settings.ca_file = Some(ca_file.to_string_lossy().into_owned());
        }
        create_destination(&*store, &trusted, 0).unwrap();
        append_and_resolve(&store, &[track("ann", "Order Completed", 1), track("bob", "Order Completed", 2)]);
        OutboxStage::new(store.clone()).catch_up().unwrap();

        let (clock, now) = manual_clock(1_000_000);
        let mut untrusting = DeliveryWorker::new(store.clone(), "public-roots", clock.clone(), Metrics::new());
        assert_eq!(untrusting.deliver_once().unwrap(), DeliveryReport::Retrying);
        let error = store.outbox_head("public-roots", 1).unwrap()[0].last_error.clone().unwrap();
        assert!(error.contains("could not reach the receiver"), "{error}");

        let mut worker = DeliveryWorker::new(store.clone(), "crm", clock, Metrics::new());
        assert_eq!(drain(&mut worker, &now), vec![DeliveryReport::Delivered(2)]);
        let bodies = bodies.lock().unwrap();
        let delivered: Vec<Value> =
            bodies.iter().flat_map(|body| serde_json::from_str::<Vec<Value>>(body).unwrap()).collect();
        assert_eq!(numbers(&delivered), vec![1, 2]);
    }

    fn file_destination(
        name: &str,
        directory: &std::path::Path,
        format: FileFormat,
        every: Option<&str>,
    ) -> DestinationDefinition {
        serde_json::from_value(json!({
            "name": name,
            "destination": {"kind": "file", "directory": directory, "format": format, "snapshot_every": every},
            "events": {"types": ["track"]},
            "audiences": [{"name": "Pro Users", "traits": ["email", "plan"]}]
        }))
        .unwrap()
    }

    /// The files of a directory whose names start with `prefix`, by name.
    fn files_named(directory: &std::path::Path, prefix: &str) -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(directory)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .collect();
        files.sort();
        files
    }

    fn read_csv(path: &std::path::Path) -> (Vec<String>, Vec<Vec<String>>) {
        let mut reader = csv::Reader::from_path(path).unwrap();
        let headers = reader.headers().unwrap().iter().map(str::to_owned).collect();
        let rows = reader.records().map(|row| row.unwrap().iter().map(str::to_owned).collect()).collect();
        (headers, rows)
    }

    /// Creates the `Pro Users` audience and makes ann and bob members, then
    /// has bob leave; every stage caught up.
    fn pro_users_enter_and_bob_leaves(store: &Arc<dyn Store>) {
        let rule = tandem_core::audience::Condition::parse(r#"trait plan = "pro""#).unwrap();
        crate::audience::create_audience(&**store, "Pro Users", rule, chrono::Utc::now()).unwrap();
        let settle = |store: &Arc<dyn Store>| {
            crate::audience::AudienceStage::new(store.clone(), crate::audience::system_clock()).catch_up().unwrap();
            OutboxStage::new(store.clone()).catch_up().unwrap();
        };
        append_and_resolve(
            store,
            &[
                json!({"type": "identify", "userId": "ann", "traits": {"plan": "pro", "email": "ann@example.com"}}),
                json!({"type": "identify", "userId": "bob", "traits": {"plan": "pro", "email": "bob@example.com"}}),
                track("ann", "Order Completed", 1),
            ],
        );
        settle(store);
        append_and_resolve(store, &[json!({"type": "identify", "userId": "bob", "traits": {"plan": "free"}})]);
        settle(store);
    }

    #[test]
    fn a_csv_directory_gets_change_files_and_a_snapshot_of_the_audience() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("data").as_path()).unwrap());
        let out = dir.path().join("out");
        create_destination(&*store, &file_destination("exports", &out, FileFormat::Csv, None), 0).unwrap();
        pro_users_enter_and_bob_leaves(&store);
        let (clock, now) = manual_clock(1_700_000_000_000);
        let mut worker = DeliveryWorker::new(store.clone(), "exports", clock, Metrics::new());
        assert_eq!(drain(&mut worker, &now), vec![DeliveryReport::Delivered(4)]);

        let events = files_named(&out, "events-changes-20231114T221320.000Z");
        assert_eq!(events.len(), 1, "{:?}", files_named(&out, ""));
        let (headers, rows) = read_csv(&events[0]);
        assert_eq!(
            headers,
            ["position", "message_id", "type", "name", "user_id", "anonymous_id", "timestamp", "event"]
        );
        assert_eq!(rows.len(), 1, "only the track event matches the filter");
        assert_eq!(
            (rows[0][2].as_str(), rows[0][3].as_str(), rows[0][4].as_str()),
            ("track", "Order Completed", "ann")
        );
        let event: Value = serde_json::from_str(&rows[0][7]).unwrap();
        assert_eq!(event["properties"]["n"], 1);

        let changes = files_named(&out, "pro-users-changes-");
        assert_eq!(changes.len(), 1);
        let (headers, rows) = read_csv(&changes[0]);
        assert_eq!(headers, ["audience", "change", "profile", "timestamp", "email", "plan"]);
        let summary: Vec<(&str, &str, &str)> =
            rows.iter().map(|row| (row[1].as_str(), row[4].as_str(), row[5].as_str())).collect();
        assert_eq!(
            summary,
            vec![
                ("entered", "ann@example.com", "pro"),
                ("entered", "bob@example.com", "pro"),
                ("exited", "bob@example.com", "free")
            ],
            "the traits as they were when enqueued"
        );

        let snapshots = files_named(&out, "pro-users-snapshot-");
        assert_eq!(snapshots.len(), 1);
        let (headers, rows) = read_csv(&snapshots[0]);
        assert_eq!(headers, ["audience", "profile", "entered_at", "email", "plan"]);
        assert_eq!(rows.len(), 1, "bob left: {rows:?}");
        assert_eq!(
            (rows[0][0].as_str(), rows[0][3].as_str(), rows[0][4].as_str()),
            ("Pro Users", "ann@example.com", "pro")
        );
        assert!(files_named(&out, ".").is_empty(), "no temporary file is left behind");
    }

    #[test]
    fn a_parquet_directory_snapshots_on_its_cadence_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("data").as_path()).unwrap());
        let out = dir.path().join("out");
        create_destination(&*store, &file_destination("lake", &out, FileFormat::Parquet, Some("1h")), 0).unwrap();
        pro_users_enter_and_bob_leaves(&store);
        let (clock, now) = manual_clock(1_700_000_000_000);
        let mut worker = DeliveryWorker::new(store.clone(), "lake", clock, Metrics::new());
        drain(&mut worker, &now);
        let snapshots = files_named(&out, "pro-users-snapshot-");
        assert_eq!(snapshots.len(), 1);
        let rows = file::tests::read_parquet(&snapshots[0]);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0][3].as_deref(), Some("ann@example.com"));
        let changes = file::tests::read_parquet(&files_named(&out, "pro-users-changes-")[0]);
        let kinds: Vec<_> = changes.iter().map(|row| row[1].clone().unwrap()).collect();
        assert_eq!(kinds, ["entered", "entered", "exited"]);

        // Within the hour, a new change brings a change file but no snapshot…
        append_and_resolve(&store, &[track("ann", "Order Completed", 2)]);
        OutboxStage::new(store.clone()).catch_up().unwrap();
        *now.lock().unwrap() += 30 * 60 * 1000;
        drain(&mut worker, &now);
        assert_eq!(files_named(&out, "events-changes-").len(), 2);
        assert_eq!(files_named(&out, "pro-users-snapshot-").len(), 1);
        // …and an hour after the last one, the next batch brings a snapshot.
        append_and_resolve(&store, &[track("ann", "Order Completed", 3)]);
        OutboxStage::new(store.clone()).catch_up().unwrap();
        *now.lock().unwrap() += 30 * 60 * 1000;
        drain(&mut worker, &now);
        assert_eq!(files_named(&out, "pro-users-snapshot-").len(), 2);
        let events = file::tests::read_parquet(&files_named(&out, "events-changes-")[2]);
        let event: Value = serde_json::from_str(events[0][7].as_deref().unwrap()).unwrap();
        assert_eq!(event["properties"]["n"], 3);
    }

    /// Snapshots came only with delivered batches: a destination created
    /// after its audience's members had entered, or one with
    /// `snapshot_every` whose audience stopped changing, had no current
    /// snapshot in its directory.
    #[test]
    fn a_followed_audience_gets_a_current_snapshot_even_when_nothing_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("data").as_path()).unwrap());
        pro_users_enter_and_bob_leaves(&store);
        let (hourly, once) = (dir.path().join("hourly"), dir.path().join("once"));
        create_destination(&*store, &file_destination("hourly", &hourly, FileFormat::Csv, Some("1h")), 0).unwrap();
        create_destination(&*store, &file_destination("once", &once, FileFormat::Csv, None), 0).unwrap();
        OutboxStage::new(store.clone()).catch_up().unwrap();
        let (clock, now) = manual_clock(1_700_000_000_000);
        let mut hourly_worker = DeliveryWorker::new(store.clone(), "hourly", clock.clone(), Metrics::new());
        let mut once_worker = DeliveryWorker::new(store.clone(), "once", clock, Metrics::new());
        let member_emails = |path: &std::path::Path| -> Vec<String> {
            read_csv(path).1.into_iter().map(|row| row[3].clone()).collect()
        };

        // Nothing to deliver (the members entered before the destinations
        // existed), yet each directory gets a snapshot of who is in now.
        for (worker, directory) in [(&mut hourly_worker, &hourly), (&mut once_worker, &once)] {
            assert_eq!(worker.deliver_once().unwrap(), DeliveryReport::Snapshotted(1));
            assert_eq!(worker.deliver_once().unwrap(), DeliveryReport::Idle, "one snapshot, not one per look");
            let snapshots = files_named(directory, "pro-users-snapshot-");
            assert_eq!(snapshots.len(), 1);
            assert_eq!(member_emails(&snapshots[0]), ["ann@example.com"]);
        }

        // Ann's e-mail changes, no one enters or leaves: nothing is
        // enqueued. Within the hour no new snapshot; after it, one that
        // shows the change.
        append_and_resolve(
            &store,
            &[json!({"type": "identify", "userId": "ann", "traits": {"email": "ann@example.org"}})],
        );
        crate::audience::AudienceStage::new(store.clone(), crate::audience::system_clock()).catch_up().unwrap();
        OutboxStage::new(store.clone()).catch_up().unwrap();
        *now.lock().unwrap() += 59 * 60 * 1000;
        assert_eq!(hourly_worker.deliver_once().unwrap(), DeliveryReport::Idle);
        *now.lock().unwrap() += 60 * 1000;
        assert_eq!(hourly_worker.deliver_once().unwrap(), DeliveryReport::Snapshotted(1));
        let snapshots = files_named(&hourly, "pro-users-snapshot-");
        assert_eq!(snapshots.len(), 2);
        assert!(snapshots[1].to_string_lossy().contains("20231114T231320.000Z"), "{snapshots:?}");
        assert_eq!(member_emails(&snapshots[1]), ["ann@example.org"], "the snapshot is current");
        assert!(files_named(&hourly, "pro-users-changes-").is_empty(), "no change was made up");

        // Without a cadence a snapshot goes with each change, so the one
        // that exists stays the only one while nothing changes.
        *now.lock().unwrap() += 24 * 60 * 60 * 1000;
        assert_eq!(once_worker.deliver_once().unwrap(), DeliveryReport::Idle);
        assert_eq!(files_named(&once, "pro-users-snapshot-").len(), 1);
    }

    #[test]
    fn a_test_send_reaches_the_receiver_outside_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let runtime = runtime();
        let receiver = Arc::new(Mutex::new(Receiver::default()));
        let url = start_receiver(&runtime, receiver.clone());
        create_destination(&*store, &webhook("crm", &url, RetrySettings::default()), 0).unwrap();
        create_destination(&*store, &webhook("down", "http://127.0.0.1:9/hook", RetrySettings::default()), 0).unwrap();
        let receipt = send_test(&*store, "crm", 1_700_000_000_000).unwrap().unwrap();
        assert_eq!(receipt.status, Some(200));
        let accepted = receiver.lock().unwrap().accepted.clone();
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[0]["event"], "Tandem Test");
        assert!(receiver.lock().unwrap().signatures[0].as_deref().is_some_and(|s| s.starts_with("sha256=")));
        assert_eq!(store.destination("crm").unwrap().unwrap().counts, OutboxCounts::default(), "nothing counted");
        let failure = send_test(&*store, "down", 0).unwrap().unwrap_err();
        assert!(matches!(failure, AttemptFailure::Connection(_)), "{failure:?}");
        assert!(matches!(send_test(&*store, "nobody", 0), Err(StoreError::DestinationNotFound(_))));
    }

    #[test]
    fn a_warehouse_gets_tables_and_idempotent_batch_upserts() {
        let Some((database, _config)) = tandem_store::postgres::testing::TestDatabase::create() else { return };
        let url = database.url().expect("the test server is named by a URL");
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let definition: DestinationDefinition = serde_json::from_value(json!({
            "name": "dwh",
            "destination": {"kind": "warehouse", "url": url, "schema": "tandem"},
            "events": {"types": ["track"]},
            "audiences": [{"name": "Pro Users"}]
        }))
        .unwrap();
        create_destination(&*store, &definition, 0).unwrap();
        pro_users_enter_and_bob_leaves(&store);

        // The same batch twice, as after a crash before the outbox recorded it.
        let DestinationSettings::Warehouse(settings) = &definition.destination else { unreachable!() };
        let batch = store.outbox_head("dwh", 100).unwrap();
        assert_eq!(batch.len(), 4);
        let mut warehouse = warehouse::Warehouse::connect(settings).unwrap();
        let first = warehouse.write_batch(&*store, &definition, &batch).unwrap();
        assert_eq!((first.events, first.profiles), (1, 2));
        warehouse.write_batch(&*store, &definition, &batch).unwrap();
        // A second connection finds the tables migrated already.
        drop(warehouse);
        let (clock, now) = manual_clock(0);
        let mut worker = DeliveryWorker::new(store.clone(), "dwh", clock, Metrics::new());
        assert_eq!(drain(&mut worker, &now), vec![DeliveryReport::Delivered(4)]);

        let tested = send_test(&*store, "dwh", 0).unwrap().unwrap();
        assert!(tested.detail.contains("schema tandem"), "{tested:?}");
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let count = |client: &mut postgres::Client, sql: &str| -> i64 { client.query_one(sql, &[]).unwrap().get(0) };
        assert_eq!(count(&mut client, "SELECT count(*) FROM tandem.events"), 1);
        assert_eq!(count(&mut client, "SELECT count(*) FROM tandem.profiles"), 2);
        assert_eq!(count(&mut client, "SELECT count(*) FROM tandem.tandem_migrations"), 1);
        assert_eq!(
            count(&mut client, "SELECT count(*) FROM tandem.identifiers"),
            4,
            "user ids and emails of ann and bob"
        );
        let row = client
            .query_one(
                "SELECT p.traits->>'email', p.traits->>'plan', i.value, e.name, e.payload->'properties'->>'n'
                 FROM tandem.events e JOIN tandem.profiles p ON p.id = e.profile_id
                 JOIN tandem.identifiers i ON i.profile_id = p.id AND i.kind = 'user_id'",
                &[],
            )
            .unwrap();
        let got: (String, String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(got, ("ann@example.com".into(), "pro".into(), "ann".into(), "Order Completed".into(), "1".into()));
        let stays: Vec<(String, bool)> = client
            .query(
                "SELECT p.traits->>'email', m.exited_at IS NOT NULL FROM tandem.audience_memberships m
                 JOIN tandem.profiles p ON p.id = m.profile_id ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        assert_eq!(stays, vec![("ann@example.com".into(), false), ("bob@example.com".into(), true)]);
    }
}
