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

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_core::activate::{
    AttemptFailure, AudienceSubscription, DestinationDefinition, DestinationError, DestinationSettings, FileSettings,
    NextStep, WebhookSettings,
};
use tandem_core::govern::consent::{stated_consent_in_payload, withheld_categories, Consent, ConsentDefault};
use tandem_core::random::Random;
use tandem_core::{EventType, LogPosition, ProfileId};
use tandem_store::{
    ConsentChange, DeadLetter, DestinationRecord, FailedAttempt, NewOutboxItem, OutboxCommit, OutboxCommitOutcome,
    OutboxCursor, OutboxItem, Stage, Store, StoreError,
};

use crate::cluster::{LeaseKeeper, LeaseTurn};
use crate::log_head::LogHead;
use crate::metrics::Metrics;

/// Events the outbox stage reads per commit.
const EVENT_BATCH: usize = 1_000;
/// Items a worker delivers per request (or per file write).
pub const DELIVERY_BATCH: usize = 100;
/// How often idle workers and the stage look for new work and due retries.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

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
    #[error("destination.url: https webhooks are not supported by this build (no TLS); use http")]
    HttpsUnsupported,
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
    if let DestinationSettings::Webhook(webhook) = &definition.destination {
        if webhook.url.starts_with("https://") {
            return Err(DestinationDefineError::HttpsUnsupported);
        }
    }
    store.create_destination(definition, now_ms)?;
    Ok(())
}

/// Puts a destination's dead letters back in its outbox at their places;
/// returns how many.
pub fn replay(store: &dyn Store, name: &str) -> Result<u64, StoreError> {
    store.replay_dead_letters(name)
}

/// A destination's dead letters, oldest first.
pub fn dead_letters(store: &dyn Store, name: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
    if store.destination(name)?.is_none() {
        return Err(StoreError::DestinationNotFound(name.to_owned()));
    }
    store.dead_letters(name, limit)
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
}

/// The name an event filter matches: a track's `event`, a page's or a
/// screen's `name`.
fn event_name(event_type: EventType, payload: &str) -> Option<String> {
    let field = match event_type {
        EventType::Track => "event",
        EventType::Page | EventType::Screen => "name",
        _ => return None,
    };
    let value: serde_json::Value = serde_json::from_str(payload).ok()?;
    value.get(field)?.as_str().map(str::to_owned)
}

impl OutboxStage {
    pub fn new(store: Arc<dyn Store>) -> Self {
        OutboxStage { store, consent_default: ConsentDefault::default(), metrics: None }
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
                    payload,
                });
            }
        }
        let commit = OutboxCommit {
            cursor: OutboxCursor::AudienceHistory,
            from: LogPosition(from),
            to: LogPosition(to),
            items,
            withheld,
            ..OutboxCommit::default()
        };
        match self.store.commit_outbox(&commit)? {
            OutboxCommitOutcome::Committed => {
                self.count_withheld(&commit.withheld);
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
        let owners: HashMap<LogPosition, ProfileId> = self.store.event_owners(from, to)?.into_iter().collect();
        let stated: Vec<Option<Consent>> =
            entries.iter().map(|entry| stated_consent_in_payload(&entry.payload)).collect();
        // Consent as it stands before this batch, for the profiles whose
        // consent can matter here; each event's own statement applies from
        // that event on.
        let mut consent: BTreeMap<ProfileId, Consent> =
            if needs_consent(&destinations) || stated.iter().any(Option::is_some) {
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
        for (entry, stated) in entries.iter().zip(stated) {
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
            let name = event_name(entry.event_type, &entry.payload);
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
                    });
                }
            }
        }
        let commit = OutboxCommit { cursor: OutboxCursor::Log, from, to, items, consent: changes, withheld };
        match self.store.commit_outbox(&commit)? {
            OutboxCommitOutcome::Committed => {
                self.count_withheld(&commit.withheld);
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
                    items.push(NewOutboxItem { destination: record.definition.name.clone(), position, payload });
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
}

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
        }
    }

    /// Attempts the head of the outbox once, if it is due.
    pub fn deliver_once(&mut self) -> Result<DeliveryReport, StoreError> {
        let Some(record) = self.store.destination(&self.name)? else { return Ok(DeliveryReport::Gone) };
        if record.paused {
            return Ok(DeliveryReport::Paused);
        }
        // A rate limit also caps a batch at one second's worth of events.
        let rate = record.definition.max_events_per_second;
        let batch_size = rate.map_or(DELIVERY_BATCH, |rate| (rate as usize).clamp(1, DELIVERY_BATCH));
        let mut batch = self.store.outbox_head(&self.name, batch_size)?;
        let Some(head) = batch.first() else { return Ok(DeliveryReport::Idle) };
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
        let attempt = deliver(&record, &batch);
        let now = (self.clock)();
        if let Some(rate) = rate {
            // The next attempt waits the time these events take at the rate.
            let spacing = (batch.len() as u64 * 1_000).div_ceil(u64::from(rate.max(1))) as i64;
            self.next_allowed_at_ms = now.saturating_add(spacing);
        }
        match attempt {
            Ok(()) => {
                let ids: Vec<_> = batch.iter().map(|item| item.id).collect();
                self.store.mark_delivered(&self.name, &ids)?;
                self.metrics.count_destination_items(&self.name, "delivered", ids.len() as u64);
                Ok(DeliveryReport::Delivered(ids.len()))
            }
            Err(failure) => self.record(&record, &batch, failure, now),
        }
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

/// Sends one batch to the destination.
fn deliver(record: &DestinationRecord, batch: &[OutboxItem]) -> Result<(), AttemptFailure> {
    match &record.definition.destination {
        DestinationSettings::Webhook(webhook) => post_batch(webhook, batch),
        DestinationSettings::File(file) => append_lines(file, batch),
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

fn post_batch(webhook: &WebhookSettings, batch: &[OutboxItem]) -> Result<(), AttemptFailure> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(webhook.timeout_ms)))
        .http_status_as_error(false)
        .build()
        .into();
    let body = batch_body(batch);
    let mut request = agent.post(&webhook.url).header("content-type", "application/json");
    if let Some(secret) = &webhook.secret {
        request = request
            .header(&webhook.signature_header, tandem_core::activate::webhook_signature(secret, body.as_bytes()));
    }
    for (name, value) in &webhook.headers {
        request = request.header(name, value);
    }
    match request.send(body.as_bytes()) {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => {
            let status = response.status().as_u16();
            let failure = AttemptFailure::Status(status);
            let asked =
                response.headers().get("retry-after").and_then(|value| value.to_str().ok()).and_then(|value| {
                    tandem_core::activate::retry_after_ms(value, chrono::Utc::now().timestamp_millis())
                });
            match asked {
                Some(after_ms) if failure.class() == tandem_core::activate::FailureClass::Retryable => {
                    Err(AttemptFailure::RetryAfter { status, after_ms })
                }
                _ => Err(failure),
            }
        }
        Err(ureq::Error::Timeout(_)) => Err(AttemptFailure::Timeout),
        Err(error) => Err(AttemptFailure::Connection(error.to_string())),
    }
}

fn append_lines(file: &FileSettings, batch: &[OutboxItem]) -> Result<(), AttemptFailure> {
    let io = |error: std::io::Error| AttemptFailure::Io(error.to_string());
    let mut lines = String::new();
    for item in batch {
        // The stored payload is one JSON object; a line break inside it is
        // impossible (JSON escapes it), so each item is exactly one line.
        lines.push_str(&item.payload);
        lines.push('\n');
    }
    let mut handle = std::fs::OpenOptions::new().create(true).append(true).open(&file.path).map_err(io)?;
    handle.write_all(lines.as_bytes()).map_err(io)?;
    handle.sync_data().map_err(io)
}

/// Runs the outbox stage and one worker thread per destination until `stop`
/// is set, under the `outbox` stage lease.
pub fn spawn(
    store: Arc<dyn Store>,
    head: LogHead,
    clock: Clock,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
    consent_default: ConsentDefault,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("tandem-outbox".into())
        .spawn(move || {
            let mut stage =
                OutboxStage::new(store.clone()).with_consent_default(consent_default).with_metrics(metrics.clone());
            let mut follower = head.follow();
            let mut lease = LeaseKeeper::new(store.clone(), Stage::OUTBOX);
            let mut workers: HashMap<String, (Arc<AtomicBool>, std::thread::JoinHandle<()>)> = HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                match lease.poll() {
                    LeaseTurn::Held => {}
                    LeaseTurn::Waiting => continue,
                    LeaseTurn::Lost(lost) => {
                        tracing::warn!(%lost, "stopped delivering; waiting for the outbox lease again");
                        stop_workers(&mut workers, |_| true);
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
                match store.list_destinations() {
                    Ok(destinations) => {
                        let names: Vec<String> =
                            destinations.into_iter().map(|record| record.definition.name).collect();
                        stop_workers(&mut workers, |name| !names.contains(&name.to_owned()));
                        for name in names {
                            workers
                                .entry(name.clone())
                                .or_insert_with(|| spawn_worker(store.clone(), &name, clock.clone(), metrics.clone()));
                        }
                    }
                    Err(error) => tracing::warn!(%error, "listing destinations failed"),
                }
                if read == 0 {
                    follower.wait_beyond(head.current(), POLL_INTERVAL);
                }
            }
            stop_workers(&mut workers, |_| true);
            tracing::debug!("outbox stage stopped");
        })
        .expect("spawning the outbox thread")
}

fn stop_workers(
    workers: &mut HashMap<String, (Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    should_stop: impl Fn(&str) -> bool,
) {
    let stopping: Vec<String> = workers.keys().filter(|name| should_stop(name)).cloned().collect();
    for name in stopping {
        if let Some((flag, handle)) = workers.remove(&name) {
            flag.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

fn spawn_worker(
    store: Arc<dyn Store>,
    name: &str,
    clock: Clock,
    metrics: Metrics,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let name = name.to_owned();
    let handle = std::thread::Builder::new()
        .name(format!("tandem-deliver-{name}"))
        .spawn(move || {
            let mut worker = DeliveryWorker::new(store, &name, clock.clone(), metrics);
            while !flag.load(Ordering::Relaxed) {
                match worker.deliver_once() {
                    Ok(DeliveryReport::Delivered(_)) => {}
                    Ok(DeliveryReport::Gone) => break,
                    Ok(DeliveryReport::WaitingUntil(due)) => {
                        let wait = (due - clock()).clamp(1, POLL_INTERVAL.as_millis() as i64);
                        std::thread::sleep(Duration::from_millis(wait as u64));
                    }
                    Ok(_) => std::thread::sleep(POLL_INTERVAL),
                    Err(error) => {
                        tracing::error!(destination = %name, %error, "delivery failed in storage; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
        })
        .expect("spawning a delivery thread");
    (stop, handle)
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
    use tandem_core::activate::{EventFilter, RetrySettings};
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
            }),
            events: Some(EventFilter { types: vec![EventType::Track], names: vec!["Order Completed".to_owned()] }),
            audiences: Vec::new(),
            retry,
            max_events_per_second: None,
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
        assert!(metrics.render().contains(r#"destination_items_total{destination="crm",outcome="delivered"} 5"#));
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
        assert!(store.dead_letters("crm", 10).unwrap().is_empty());
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
        while store.dead_letters("crm", 10).unwrap().is_empty() {
            match worker.deliver_once().unwrap() {
                DeliveryReport::WaitingUntil(due) => *now.lock().unwrap() = due,
                report => reports.push(report),
            }
            assert!(reports.len() < 50, "the item never ran out of retries");
        }
        assert!(*now.lock().unwrap() - 1_000_000 <= 10_000, "gave up within the limit");
        let dead = store.dead_letters("crm", 10).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].last_error, "the receiver answered 500");
        assert!(dead[0].attempts >= 3);
        assert!(receiver.lock().unwrap().accepted.is_empty(), "the second item never overtook the first");

        // The receiver recovers; the second item goes, then the replay
        // puts the first back and it is delivered too.
        receiver.lock().unwrap().fail_first = 0;
        drain(&mut worker, &now);
        assert_eq!(replay(&*store, "crm").unwrap(), 1);
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
        let dead = store.dead_letters("crm", 10).unwrap();
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
            destination: DestinationSettings::File(FileSettings { path: path.to_string_lossy().into_owned() }),
            events: Some(EventFilter::default()),
            audiences: Vec::new(),
            retry: RetrySettings::default(),
            max_events_per_second: None,
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
        let https = webhook("crm", "https://example.com/hook", RetrySettings::default());
        assert!(matches!(create_destination(&*store, &https, 0), Err(DestinationDefineError::HttpsUnsupported)));
        assert!(store.list_destinations().unwrap().is_empty());
    }
}
