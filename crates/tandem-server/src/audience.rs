//! The audience stage: keeps every audience's membership current as events
//! arrive and as time passes. It follows the log but never passes the
//! resolver's committed position (an event must have its profile first);
//! for each event it finds the profile in the store, observes the event in
//! the incremental state ([`AudienceState`]) of every audience whose rule
//! reads it, re-evaluates the profile's audiences (traits may have changed)
//! and records who entered and who left, stamped with the event's time.
//! Every evaluation also sets a due-timer: the instant time alone changes
//! the answer (a qualifying event leaving its window), so a member leaves
//! on time without a new event. States, memberships, timers and the stage's
//! cursor are committed together ([`tandem_store::AudienceStore::commit_audience`]).
//!
//! A new audience is backfilled over the profiles that existed before it, a
//! page of profiles at a time, with the batch evaluator over each profile's
//! timeline (up to the stage's cursor, so no event counts twice). A profile
//! merged away leaves its audiences, and its survivor's states are rebuilt
//! from the survivor's timeline: the simplest way to be right about events
//! that were counted on two profiles.
//!
//! Computed traits are kept by the same stage, from the same events, in
//! the same commits: each event is observed in the incremental state
//! ([`ComputedTraitState`]) of every computed trait whose event and filters
//! match it; every evaluation ages those states to now, stores each value
//! with a due-timer (when the oldest counted bucket leaves the window) and
//! hands the values to the profile's audiences, so `computed …` conditions
//! read values computed from exactly the events applied. A new computed
//! trait is backfilled like an audience, from profile timelines, and merges
//! rebuild the survivor's states the same way.
//!
//! The definitions themselves (validation of names, rules and references,
//! preview, deletion) are here too, so the HTTP API and the CLI share them.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_core::audience::{
    AudienceState, CompiledAudience, CompiledComputedTrait, ComputedTraitDefinition, ComputedTraitState, Condition,
    InvalidRule, ProfileFacts, ProfileValues,
};
use tandem_core::{Event, LogPosition, Profile, ProfileId};
use tandem_store::{
    AudienceCommit, AudienceCommitOutcome, AudienceDefinition, AudienceStateWrite, Backfill, ComputedTraitRecord,
    ComputedTraitWrite, MembershipChange, MembershipChangeKind, Stage, Store, StoreError, TimelineCursor,
};

use crate::cluster::{LeaseKeeper, LeaseTurn};
use crate::metrics::Metrics;
use crate::progress::{CommitCount, Progress};

/// Events read per step.
const EVENT_BATCH: usize = 2_000;
/// Profiles backfilled per commit for a new audience.
const BACKFILL_PAGE: usize = 500;
/// Due timers processed per commit.
const TIMER_BATCH: usize = 2_000;
/// Retired (merged-away) profiles handled per commit.
const RETIRED_BATCH: usize = 500;
/// Events read per page of a profile's timeline.
const TIMELINE_PAGE: usize = 1_000;
/// How often an idle stage looks at its due timers (the delay with which a
/// member leaves after its time), and at the resolver's position when the
/// resolver runs in another process; in this one, each resolver commit
/// wakes the stage at once.
pub const TIMER_INTERVAL: Duration = Duration::from_millis(250);
/// Longest audience name.
pub const MAX_NAME_LENGTH: usize = 100;

/// The stage's notion of now; injectable so tests move time by hand.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// What the stage could not do.
#[derive(Debug, thiserror::Error)]
pub enum AudienceError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one [`AudienceStage::step`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    pub events: usize,
    pub timers: usize,
    pub backfilled: usize,
    pub retired: usize,
    /// Profiles computed for new computed traits.
    pub computed_backfilled: usize,
}

impl StepReport {
    /// Whether the step found nothing to do.
    pub fn is_idle(&self) -> bool {
        *self == StepReport::default()
    }
}

/// One stored audience, compiled, with how far it is backfilled.
struct LiveAudience {
    name: String,
    compiled: CompiledAudience,
    backfill: Backfill,
}

impl LiveAudience {
    /// Whether the profile's state for this audience is kept incrementally
    /// (it was backfilled, or was created after the backfill began).
    fn covers(&self, profile: ProfileId) -> bool {
        match self.backfill {
            Backfill::Done => true,
            Backfill::Pending { after } => after.is_some_and(|after| profile <= after),
        }
    }
}

/// One stored computed trait, compiled, with how far it is backfilled.
struct LiveComputed {
    name: String,
    compiled: CompiledComputedTrait,
    backfill: Backfill,
}

impl LiveComputed {
    /// Whether the profile's state for this trait is kept incrementally.
    fn covers(&self, profile: ProfileId) -> bool {
        match self.backfill {
            Backfill::Done => true,
            Backfill::Pending { after } => after.is_some_and(|after| profile <= after),
        }
    }
}

/// Everything the stage evaluates: audiences (those another refers to
/// first) and computed traits.
struct Definitions {
    audiences: Vec<LiveAudience>,
    computed: Vec<LiveComputed>,
}

/// A computed trait's state, value and due-timer, as stored.
type LoadedComputed = (ComputedTraitState, Option<Value>, Option<i64>);

/// What the stage knows of one profile while it evaluates it.
struct ProfileWork {
    profile: Profile,
    /// State, value and due-timer per computed trait, as loaded.
    computed_loaded: HashMap<String, LoadedComputed>,
    /// State per computed trait, as updated.
    computed_states: HashMap<String, ComputedTraitState>,
    /// A computed trait being backfilled for this profile, evaluated though
    /// it does not cover the profile yet.
    backfilling: Option<String>,
    /// State and due-timer per audience, as loaded.
    loaded: HashMap<String, (AudienceState, Option<i64>)>,
    /// State per audience, as updated.
    states: HashMap<String, AudienceState>,
    /// Audiences the profile is a member of now.
    members: BTreeSet<String>,
}

/// The audience stage, driven by [`AudienceStage::step`] (see [`spawn`]).
pub struct AudienceStage {
    store: Arc<dyn Store>,
    clock: Clock,
    metrics: Option<Metrics>,
    /// Counts each commit that recorded membership changes, for the outbox
    /// stage.
    progress: Progress<CommitCount>,
    /// The identity state's [`RetirementMark`] when retired profiles were
    /// last looked for: the look-up scans every audience and computed-trait
    /// state, so it runs only once a profile may have stopped being live,
    /// not after every resolver commit.
    retired_checked_at: Option<RetirementMark>,
}

/// What moves whenever a profile stops being live: the resolver's epoch
/// (repairs, rule changes and erasure move it) and the number of profile
/// ids handed out that are not live (each merge adds one; a new profile
/// adds to both the ids and the live count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RetirementMark {
    epoch: u64,
    not_live: u64,
}

impl RetirementMark {
    fn of(state: &tandem_store::IdentityState) -> Self {
        RetirementMark { epoch: state.epoch, not_live: state.next_profile_id.saturating_sub(state.live_profiles) }
    }
}

impl AudienceStage {
    /// A stage reading `store`, with `clock` for now.
    pub fn new(store: Arc<dyn Store>, clock: Clock) -> Self {
        AudienceStage { store, clock, metrics: None, progress: Progress::default(), retired_checked_at: None }
    }

    /// Counts each commit that recorded membership changes on `progress`.
    pub fn with_progress(mut self, progress: Progress<CommitCount>) -> Self {
        self.progress = progress;
        self
    }

    /// Reports the stage's lag and membership changes to `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Does one round of work: backfills a page of each new audience,
    /// retires merged-away profiles, applies a batch of resolved events,
    /// and processes due timers, each in its own commit.
    pub fn step(&mut self) -> Result<StepReport, AudienceError> {
        let now = (self.clock)();
        let mut audiences = self.load_audiences()?;
        let mut report = StepReport::default();
        if self.follow_repairs(&audiences)? {
            audiences = self.load_audiences()?;
        }
        for index in 0..audiences.computed.len() {
            if matches!(audiences.computed[index].backfill, Backfill::Pending { .. }) {
                report.computed_backfilled += self.backfill_computed_page(&audiences, index, now)?;
            }
        }
        if report.computed_backfilled > 0 {
            audiences = self.load_audiences()?;
        }
        for index in 0..audiences.audiences.len() {
            if matches!(audiences.audiences[index].backfill, Backfill::Pending { .. }) {
                report.backfilled += self.backfill_page(&audiences, index, now)?;
            }
        }
        if report.backfilled > 0 {
            // Which profiles each audience covers moved with the backfill:
            // events for them are applied from now on.
            audiences = self.load_audiences()?;
        }
        // Read before the look-up: a merge committed during it moves the
        // mark again, so the next step looks again.
        let mark = Some(RetirementMark::of(&self.store.identity_state()?));
        if mark != self.retired_checked_at {
            report.retired = self.retire_profiles(&audiences, now)?;
            if report.retired < RETIRED_BATCH {
                self.retired_checked_at = mark;
            }
        }
        report.events = self.apply_events(&audiences, now)?;
        report.timers = self.process_timers(&audiences, now)?;
        Ok(report)
    }

    /// Steps until a step finds nothing to do.
    pub fn catch_up(&mut self) -> Result<(), AudienceError> {
        while !self.step()?.is_idle() {}
        Ok(())
    }

    /// Stored audiences, compiled, those another refers to first, and
    /// stored computed traits.
    fn load_audiences(&self) -> Result<Definitions, AudienceError> {
        let mut computed = Vec::new();
        for record in self.store.list_computed_traits()? {
            match record.definition.compile() {
                Ok(compiled) => computed.push(LiveComputed { name: record.name, compiled, backfill: record.backfill }),
                Err(error) => tracing::warn!(computed_trait = %record.name, %error, "stored definition is invalid"),
            }
        }
        Ok(Definitions { audiences: self.load_audience_definitions()?, computed })
    }

    fn load_audience_definitions(&self) -> Result<Vec<LiveAudience>, AudienceError> {
        let mut compiled = Vec::new();
        for record in self.store.list_audiences()? {
            match record.definition.rule.compile() {
                Ok(rule) => compiled.push((
                    record.definition.rule.referenced_audiences().iter().map(|name| name.to_string()).collect(),
                    LiveAudience { name: record.definition.name, compiled: rule, backfill: record.backfill },
                )),
                Err(error) => tracing::warn!(audience = %record.definition.name, %error, "stored rule is invalid"),
            }
        }
        Ok(dependency_order(compiled))
    }

    /// A commit of work that starts at the stage's stored cursor (and
    /// stays there unless `to` is moved).
    fn commit_at_cursor(&self) -> Result<AudienceCommit, AudienceError> {
        let cursor = self.store.stage_cursor(Stage::AUDIENCE)?.unwrap_or_default();
        Ok(AudienceCommit {
            from: cursor.position,
            to: cursor.position,
            epoch: cursor.epoch,
            ..AudienceCommit::default()
        })
    }

    /// After a repair rewrote part of the identity graph (a new resolver
    /// epoch), profiles may hold other events than their states counted:
    /// every audience is evaluated again from the profiles' timelines.
    fn follow_repairs(&self, definitions: &Definitions) -> Result<bool, AudienceError> {
        let resolver = self.store.stage_cursor(Stage::RESOLVE)?.unwrap_or_default().epoch;
        let mut commit = self.commit_at_cursor()?;
        if commit.epoch == resolver {
            return Ok(false);
        }
        tracing::info!(epoch = resolver, "the identity graph was repaired; evaluating every audience again");
        commit.epoch = resolver;
        commit.backfill = definitions
            .audiences
            .iter()
            .map(|audience| (audience.name.clone(), Backfill::Pending { after: None }))
            .collect();
        commit.computed_backfill = definitions
            .computed
            .iter()
            .map(|computed| (computed.name.clone(), Backfill::Pending { after: None }))
            .collect();
        self.commit(&commit)
    }

    fn commit(&self, commit: &AudienceCommit) -> Result<bool, AudienceError> {
        match self.store.commit_audience(commit)? {
            AudienceCommitOutcome::Committed => {
                if let Some(metrics) = &self.metrics {
                    metrics.audience_membership_changes.inc_by(commit.changes.len() as u64);
                    metrics.computed_trait_writes.inc_by(commit.computed.len() as u64);
                }
                if !commit.changes.is_empty() {
                    self.progress.count_commit();
                }
                Ok(true)
            }
            AudienceCommitOutcome::StalePosition => {
                tracing::warn!("another audience stage moved the cursor; starting again from storage");
                Ok(false)
            }
        }
    }

    /// Evaluates one page of profiles for a new audience over their
    /// timelines up to the stage's cursor.
    fn backfill_page(
        &self,
        definitions: &Definitions,
        index: usize,
        now: DateTime<Utc>,
    ) -> Result<usize, AudienceError> {
        let audience = &definitions.audiences[index];
        let Backfill::Pending { after } = audience.backfill else { return Ok(0) };
        let mut commit = self.commit_at_cursor()?;
        let cursor = commit.from;
        let page = self.store.list_profiles(after, BACKFILL_PAGE)?;
        let now_ms = now.timestamp_millis();
        for profile in &page {
            let events = timeline(self.store.as_ref(), profile.id, cursor)?;
            let members: BTreeSet<String> =
                self.store.profile_audiences(profile.id)?.into_iter().map(|membership| membership.audience).collect();
            let computed = stored_computed_values(self.store.as_ref(), profile.id)?;
            let facts = ProfileFacts {
                traits: &profile.traits,
                computed_traits: &computed,
                events: &events,
                audiences: &members,
            };
            let mut state = audience.compiled.new_state();
            for event in &events {
                audience.compiled.observe(&mut state, event);
            }
            audience.compiled.age_to(&mut state, now);
            let next = audience.compiled.next_change_at(&facts, now).map(|at| at.timestamp_millis());
            // A new audience has no members yet; one evaluated again after a
            // repair may have.
            let member = audience.compiled.is_member(&facts, now);
            if member != members.contains(&audience.name) {
                let kind = if member { MembershipChangeKind::Entered } else { MembershipChangeKind::Exited };
                commit.changes.push(change(&audience.name, profile.id, kind, now_ms));
            }
            commit.states.push(AudienceStateWrite {
                audience: audience.name.clone(),
                profile: profile.id,
                state: Some(state),
                next_change_at_ms: next,
            });
        }
        let progress = match page.last() {
            Some(last) if page.len() == BACKFILL_PAGE => Backfill::Pending { after: Some(last.id) },
            _ => Backfill::Done,
        };
        commit.backfill.push((audience.name.clone(), progress));
        self.commit(&commit)?;
        if progress == Backfill::Done {
            tracing::info!(audience = %audience.name, "audience backfilled");
        }
        Ok(page.len().max(1))
    }

    /// Computes one page of profiles for a new computed trait over their
    /// timelines up to the stage's cursor, and evaluates their audiences
    /// with the new value.
    fn backfill_computed_page(
        &self,
        definitions: &Definitions,
        index: usize,
        now: DateTime<Utc>,
    ) -> Result<usize, AudienceError> {
        let computed = &definitions.computed[index];
        let Backfill::Pending { after } = computed.backfill else { return Ok(0) };
        let mut commit = self.commit_at_cursor()?;
        let cursor = commit.from;
        let page = self.store.list_profiles(after, BACKFILL_PAGE)?;
        for profile in &page {
            let events = timeline(self.store.as_ref(), profile.id, cursor)?;
            let mut work = self.load_work(profile.clone())?;
            let mut state = computed.compiled.new_state();
            for event in events.iter().filter(|event| computed.compiled.reads_event(event)) {
                computed.compiled.observe(&mut state, event);
            }
            work.computed_states.insert(computed.name.clone(), state);
            work.backfilling = Some(computed.name.clone());
            evaluate(definitions, &mut work, now, now.timestamp_millis(), &mut commit);
        }
        let progress = match page.last() {
            Some(last) if page.len() == BACKFILL_PAGE => Backfill::Pending { after: Some(last.id) },
            _ => Backfill::Done,
        };
        commit.computed_backfill.push((computed.name.clone(), progress));
        self.commit(&commit)?;
        if progress == Backfill::Done {
            tracing::info!(computed_trait = %computed.name, "computed trait backfilled");
        }
        Ok(page.len().max(1))
    }

    /// Profiles merged away (or replaced by a repair) leave their audiences;
    /// their survivors are rebuilt from their timelines.
    fn retire_profiles(&self, audiences: &Definitions, now: DateTime<Utc>) -> Result<usize, AudienceError> {
        let retired = self.store.retired_audience_profiles(RETIRED_BATCH)?;
        if retired.is_empty() {
            return Ok(0);
        }
        let mut commit = self.commit_at_cursor()?;
        let cursor = commit.from;
        let now_ms = now.timestamp_millis();
        let mut survivors = BTreeSet::new();
        for state in self.store.audience_states(&retired)? {
            commit.states.push(AudienceStateWrite {
                audience: state.audience,
                profile: state.profile,
                state: None,
                next_change_at_ms: None,
            });
        }
        for stored in self.store.computed_trait_states(&retired)? {
            commit.computed.push(ComputedTraitWrite {
                name: stored.name,
                profile: stored.profile,
                state: None,
                value: None,
                next_change_at_ms: None,
            });
        }
        for id in &retired {
            for membership in self.store.profile_audiences(*id)? {
                commit.changes.push(change(&membership.audience, *id, MembershipChangeKind::Exited, now_ms));
            }
            if let Some(survivor) = self.store.profile(*id)? {
                survivors.insert(survivor.id);
            }
        }
        for survivor in survivors {
            if let Some(profile) = self.store.profile(survivor)? {
                let events = timeline(self.store.as_ref(), survivor, cursor)?;
                let mut work = self.load_work(profile)?;
                work.states.clear();
                work.computed_states.clear();
                for event in &events {
                    observe(audiences, &mut work, event);
                }
                evaluate(audiences, &mut work, now, now_ms, &mut commit);
            }
        }
        self.commit(&commit)?;
        Ok(retired.len())
    }

    fn load_work(&self, profile: Profile) -> Result<ProfileWork, AudienceError> {
        let loaded: HashMap<String, (AudienceState, Option<i64>)> = self
            .store
            .audience_states(&[profile.id])?
            .into_iter()
            .map(|stored| (stored.audience, (stored.state, stored.next_change_at_ms)))
            .collect();
        let members =
            self.store.profile_audiences(profile.id)?.into_iter().map(|membership| membership.audience).collect();
        let states = loaded.iter().map(|(name, (state, _))| (name.clone(), state.clone())).collect();
        let computed_loaded: HashMap<String, LoadedComputed> = self
            .store
            .computed_trait_states(&[profile.id])?
            .into_iter()
            .map(|stored| (stored.name, (stored.state, stored.value, stored.next_change_at_ms)))
            .collect();
        let computed_states = computed_loaded.iter().map(|(name, (state, ..))| (name.clone(), state.clone())).collect();
        Ok(ProfileWork { profile, computed_loaded, computed_states, backfilling: None, loaded, states, members })
    }

    /// Applies the next batch of events the resolver has committed.
    fn apply_events(&self, audiences: &Definitions, now: DateTime<Utc>) -> Result<usize, AudienceError> {
        let mut commit = self.commit_at_cursor()?;
        let cursor = commit.from;
        let resolved = self.store.stage_cursor(Stage::RESOLVE)?.map(|cursor| cursor.position).unwrap_or_default();
        if let Some(metrics) = &self.metrics {
            metrics.audience_lag_events.set(resolved.0.saturating_sub(cursor.0) as i64);
        }
        if resolved <= cursor {
            return Ok(0);
        }
        if audiences.audiences.is_empty() && audiences.computed.is_empty() {
            // Nothing to evaluate: the stage moves to the resolver's
            // position without reading the events. An audience defined
            // later is backfilled from timelines up to where the stage stands.
            commit.to = resolved;
            self.commit(&commit)?;
            return Ok((resolved.0 - cursor.0) as usize);
        }
        let entries: Vec<_> = self
            .store
            .read_log(cursor, EVENT_BATCH)?
            .into_iter()
            .take_while(|entry| entry.position <= resolved)
            .collect();
        let Some(to) = entries.last().map(|entry| entry.position) else { return Ok(0) };
        let owners: HashMap<LogPosition, ProfileId> = self.store.event_owners(cursor, to)?.into_iter().collect();
        let mut by_owner: BTreeMap<ProfileId, Vec<Event>> = BTreeMap::new();
        for entry in &entries {
            let Some(owner) = owners.get(&entry.position) else { continue };
            match serde_json::from_str::<Event>(&entry.payload) {
                Ok(event) => by_owner.entry(*owner).or_default().push(event),
                Err(error) => tracing::warn!(position = %entry.position, %error, "unreadable event skipped"),
            }
        }
        commit.to = to;
        let live: HashMap<ProfileId, Profile> = self
            .store
            .profiles(&by_owner.keys().copied().collect::<Vec<_>>())?
            .into_iter()
            .map(|profile| (profile.id, profile))
            .collect();
        let mut rebuilt = HashSet::new();
        for (owner, events) in by_owner {
            let at_ms = events.iter().map(|event| event.timestamp.timestamp_millis()).max().unwrap_or_default();
            let (profile, rebuild) = match live.get(&owner) {
                Some(profile) => (profile.clone(), false),
                // Merged away since the resolver linked the event: the
                // survivor is rebuilt from its whole timeline.
                None => match self.store.profile(owner)? {
                    Some(profile) => (profile, true),
                    None => continue,
                },
            };
            if rebuild {
                if !rebuilt.insert(profile.id) {
                    continue;
                }
                let events = timeline(self.store.as_ref(), profile.id, to)?;
                let mut work = self.load_work(profile)?;
                work.states.clear();
                work.computed_states.clear();
                for event in &events {
                    observe(audiences, &mut work, event);
                }
                evaluate(audiences, &mut work, now, at_ms, &mut commit);
                continue;
            }
            let mut work = self.load_work(profile)?;
            for event in &events {
                observe(audiences, &mut work, event);
            }
            evaluate(audiences, &mut work, now, at_ms, &mut commit);
        }
        if self.commit(&commit)? {
            if let Some(metrics) = &self.metrics {
                let received = entries.iter().map(|entry| entry.received_at_ms);
                metrics.observe_event_ages("audience", Utc::now().timestamp_millis(), received);
            }
        }
        Ok(entries.len())
    }

    /// Re-evaluates the profiles whose answer changes by time alone now.
    fn process_timers(&self, definitions: &Definitions, now: DateTime<Utc>) -> Result<usize, AudienceError> {
        let audiences = &definitions.audiences;
        let due = self.store.due_audience_states(now.timestamp_millis(), TIMER_BATCH)?;
        let due_computed = self.store.due_computed_trait_states(now.timestamp_millis(), TIMER_BATCH)?;
        if due.is_empty() && due_computed.is_empty() {
            return Ok(0);
        }
        let mut commit = self.commit_at_cursor()?;
        let mut earliest: BTreeMap<ProfileId, i64> = BTreeMap::new();
        let timers = due
            .iter()
            .map(|state| (state.profile, state.next_change_at_ms))
            .chain(due_computed.iter().map(|stored| (stored.profile, stored.next_change_at_ms)));
        for (profile, next_change_at_ms) in timers {
            let at = next_change_at_ms.unwrap_or_else(|| now.timestamp_millis());
            earliest.entry(profile).and_modify(|known| *known = (*known).min(at)).or_insert(at);
        }
        for (id, at_ms) in earliest {
            match self.store.profile(id)? {
                Some(profile) if profile.id == id => {
                    let mut work = self.load_work(profile)?;
                    evaluate(definitions, &mut work, now, at_ms, &mut commit);
                    // A timer of an audience not evaluated here (waiting for
                    // its backfill, which sets a new timer, or whose stored
                    // rule no longer compiles) must not fire again and again.
                    let stale = due.iter().filter(|state| {
                        state.profile == id
                            && !audiences.iter().any(|audience| audience.name == state.audience && audience.covers(id))
                    });
                    for state in stale {
                        commit.states.push(AudienceStateWrite {
                            audience: state.audience.clone(),
                            profile: id,
                            state: Some(state.state.clone()),
                            next_change_at_ms: None,
                        });
                    }
                    let stale_computed = due_computed.iter().filter(|stored| {
                        stored.profile == id
                            && !definitions
                                .computed
                                .iter()
                                .any(|computed| computed.name == stored.name && computed.covers(id))
                    });
                    for stored in stale_computed {
                        commit.computed.push(clear_timer(stored));
                    }
                }
                // Retired: its states go with the next retirement round;
                // meanwhile its timers must not fire again.
                _ => {
                    for state in due.iter().filter(|state| state.profile == id) {
                        commit.states.push(AudienceStateWrite {
                            audience: state.audience.clone(),
                            profile: id,
                            state: Some(state.state.clone()),
                            next_change_at_ms: None,
                        });
                    }
                    for stored in due_computed.iter().filter(|stored| stored.profile == id) {
                        commit.computed.push(clear_timer(stored));
                    }
                }
            }
        }
        self.commit(&commit)?;
        Ok(due.len() + due_computed.len())
    }
}

/// The same computed-trait state and value without its timer.
fn clear_timer(stored: &tandem_store::StoredComputedTrait) -> ComputedTraitWrite {
    ComputedTraitWrite {
        name: stored.name.clone(),
        profile: stored.profile,
        state: Some(stored.state.clone()),
        value: stored.value.clone(),
        next_change_at_ms: None,
    }
}

/// A profile's stored computed-trait values by name.
fn stored_computed_values(store: &dyn Store, profile: ProfileId) -> Result<Map<String, Value>, StoreError> {
    Ok(store
        .computed_trait_states(&[profile])?
        .into_iter()
        .filter_map(|stored| Some((stored.name, stored.value?)))
        .collect())
}

fn change(audience: &str, profile: ProfileId, kind: MembershipChangeKind, at_ms: i64) -> MembershipChange {
    MembershipChange { audience: audience.to_owned(), profile, kind, at_ms }
}

/// Adds one event to the state of every audience covering the profile whose
/// rule reads it.
fn observe(definitions: &Definitions, work: &mut ProfileWork, event: &Event) {
    for computed in &definitions.computed {
        if computed.covers(work.profile.id) && computed.compiled.reads_event(event) {
            let state =
                work.computed_states.entry(computed.name.clone()).or_insert_with(|| computed.compiled.new_state());
            computed.compiled.observe(state, event);
        }
    }
    for audience in &definitions.audiences {
        if audience.covers(work.profile.id) && audience.compiled.reads_event(event) {
            let state = work.states.entry(audience.name.clone()).or_insert_with(|| audience.compiled.new_state());
            audience.compiled.observe(state, event);
        }
    }
}

/// Evaluates every audience covering the profile at `now`, in dependency
/// order, recording entries and exits stamped `at_ms` and the states and
/// timers that changed.
fn evaluate(
    definitions: &Definitions,
    work: &mut ProfileWork,
    now: DateTime<Utc>,
    at_ms: i64,
    commit: &mut AudienceCommit,
) {
    let computed_values = evaluate_computed(definitions, work, now, commit);
    for audience in definitions.audiences.iter().filter(|audience| audience.covers(work.profile.id)) {
        let state = work.states.entry(audience.name.clone()).or_insert_with(|| audience.compiled.new_state());
        audience.compiled.age_to(state, now);
        let values =
            ProfileValues { traits: &work.profile.traits, computed_traits: &computed_values, audiences: &work.members };
        let member = audience.compiled.is_member_by_state(state, &values, now);
        let next = audience.compiled.next_change_at_by_state(state, &values, now).map(|at| at.timestamp_millis());
        let state = state.clone();
        if member != work.members.contains(&audience.name) {
            let kind = if member { MembershipChangeKind::Entered } else { MembershipChangeKind::Exited };
            commit.changes.push(change(&audience.name, work.profile.id, kind, at_ms));
            if member {
                work.members.insert(audience.name.clone());
            } else {
                work.members.remove(&audience.name);
            }
        }
        if work.loaded.get(&audience.name) != Some(&(state.clone(), next)) {
            commit.states.push(AudienceStateWrite {
                audience: audience.name.clone(),
                profile: work.profile.id,
                state: Some(state.clone()),
                next_change_at_ms: next,
            });
            work.loaded.insert(audience.name.clone(), (state, next));
        }
    }
}

/// Ages the profile's computed traits to `now`, records the states, values
/// and timers that changed, and returns every value by name (those of
/// traits not computed here as stored).
fn evaluate_computed(
    definitions: &Definitions,
    work: &mut ProfileWork,
    now: DateTime<Utc>,
    commit: &mut AudienceCommit,
) -> Map<String, Value> {
    let mut values: Map<String, Value> =
        work.computed_loaded.iter().filter_map(|(name, (_, value, _))| Some((name.clone(), value.clone()?))).collect();
    let profile = work.profile.id;
    let backfilling = work.backfilling.clone();
    let evaluated = definitions
        .computed
        .iter()
        .filter(|computed| computed.covers(profile) || backfilling.as_deref() == Some(computed.name.as_str()));
    for computed in evaluated {
        let state = work.computed_states.entry(computed.name.clone()).or_insert_with(|| computed.compiled.new_state());
        computed.compiled.age_to(state, now);
        let value = computed.compiled.value(state, now);
        let next = computed.compiled.next_change_at(state, now).map(|at| at.timestamp_millis());
        match &value {
            Some(value) => values.insert(computed.name.clone(), value.clone()),
            None => values.remove(&computed.name),
        };
        let current = (state.clone(), value, next);
        if work.computed_loaded.get(&computed.name) != Some(&current) {
            commit.computed.push(ComputedTraitWrite {
                name: computed.name.clone(),
                profile,
                state: Some(current.0.clone()),
                value: current.1.clone(),
                next_change_at_ms: current.2,
            });
            work.computed_loaded.insert(computed.name.clone(), current);
        }
    }
    values
}

/// Audiences ordered so that each comes after those its rule refers to;
/// a cycle (which creation refuses) keeps its stored order at the end.
fn dependency_order(mut pending: Vec<(Vec<String>, LiveAudience)>) -> Vec<LiveAudience> {
    let mut ordered: Vec<LiveAudience> = Vec::with_capacity(pending.len());
    let names: HashSet<String> = pending.iter().map(|(_, audience)| audience.name.clone()).collect();
    while !pending.is_empty() {
        let placed: HashSet<&str> = ordered.iter().map(|audience| audience.name.as_str()).collect();
        let ready = pending.iter().position(|(references, _)| {
            references.iter().all(|name| placed.contains(name.as_str()) || !names.contains(name))
        });
        let index = ready.unwrap_or(0);
        ordered.push(pending.remove(index).1);
    }
    ordered
}

/// A profile's events (with those of profiles merged into it) up to the
/// log position `up_to`, oldest first.
pub fn timeline(store: &dyn Store, profile: ProfileId, up_to: LogPosition) -> Result<Vec<Event>, StoreError> {
    let mut events = Vec::new();
    let mut before: Option<TimelineCursor> = None;
    loop {
        let page = store.profile_events(profile, before, TIMELINE_PAGE)?;
        let Some(last) = page.last() else { break };
        before = Some(TimelineCursor::at(last));
        let full = page.len() == TIMELINE_PAGE;
        for entry in page.into_iter().filter(|entry| entry.position <= up_to) {
            match serde_json::from_str::<Event>(&entry.payload) {
                Ok(event) => events.push(event),
                Err(error) => tracing::warn!(position = %entry.position, %error, "unreadable event skipped"),
            }
        }
        if !full {
            break;
        }
    }
    events.reverse();
    Ok(events)
}

/// Runs the stage on its own thread until `stop` is set. It wakes when the
/// resolver publishes a commit to `resolved` and at least every `recheck`
/// (the server's is [`TIMER_INTERVAL`]), for due timers and a resolver in
/// another process; it counts its commits that changed memberships on
/// `audiences`.
pub fn spawn(
    store: Arc<dyn Store>,
    resolved: Progress<LogPosition>,
    audiences: Progress<CommitCount>,
    clock: Clock,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
    recheck: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("tandem-audiences".into())
        .spawn(move || {
            let mut stage = AudienceStage::new(store.clone(), clock).with_metrics(metrics).with_progress(audiences);
            let mut follower = resolved.follow();
            // Like the resolver, the stage runs on one node of a shared store
            // at a time (a lease saves duplicate work; stale commits are
            // refused anyway); the embedded store grants it at once.
            let mut lease = LeaseKeeper::new(store.clone(), Stage::AUDIENCE);
            while !stop.load(Ordering::Relaxed) {
                match lease.poll() {
                    LeaseTurn::Held => {}
                    LeaseTurn::Waiting => continue,
                    LeaseTurn::Lost(lost) => {
                        tracing::warn!(%lost, "stopped evaluating audiences; waiting for the lease again");
                        continue;
                    }
                }
                match stage.step() {
                    Ok(report) if report.is_idle() => {
                        follower.wait(recheck);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::error!(%error, "evaluating audiences failed; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
            }
            tracing::debug!("audience stage stopped");
        })
        .expect("spawning the audience thread")
}

/// A definition that cannot be stored, in the caller's terms.
#[derive(Debug, thiserror::Error)]
pub enum DefineError {
    #[error("an audience name is 1 to {MAX_NAME_LENGTH} characters without control characters")]
    InvalidName,
    #[error(transparent)]
    InvalidRule(#[from] InvalidRule),
    #[error("the rule refers to {0:?}, which is no audience")]
    UnknownAudience(String),
    #[error("a computed trait name is 1 to {MAX_NAME_LENGTH} characters without control characters")]
    InvalidComputedTraitName,
    #[error("the rule tests computed trait {0:?}, which does not exist")]
    UnknownComputedTrait(String),
    #[error("computed trait {name:?} is used by audience {used_by:?}; delete that first")]
    ComputedTraitInUse { name: String, used_by: String },
    #[error("audience {name:?} is used by {used_by:?}; delete that first")]
    InUse { name: String, used_by: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn check_name(name: &str) -> Result<(), DefineError> {
    let length = name.chars().count();
    if length == 0 || length > MAX_NAME_LENGTH || name.trim() != name || name.chars().any(char::is_control) {
        return Err(DefineError::InvalidName);
    }
    Ok(())
}

/// Refuses a rule naming an audience or a computed trait that does not exist.
fn check_references(store: &dyn Store, rule: &Condition) -> Result<(), DefineError> {
    let known: HashSet<String> = store.list_audiences()?.into_iter().map(|record| record.definition.name).collect();
    if let Some(unknown) = rule.referenced_audiences().into_iter().find(|reference| !known.contains(*reference)) {
        return Err(DefineError::UnknownAudience(unknown.to_owned()));
    }
    let computed: HashSet<String> = store.list_computed_traits()?.into_iter().map(|record| record.name).collect();
    if let Some(unknown) =
        rule.referenced_computed_traits().into_iter().find(|reference| !computed.contains(*reference))
    {
        return Err(DefineError::UnknownComputedTrait(unknown.to_owned()));
    }
    Ok(())
}

/// Validates and stores a new audience; the stage backfills it.
pub fn create_audience(
    store: &dyn Store,
    name: &str,
    rule: Condition,
    now: DateTime<Utc>,
) -> Result<AudienceDefinition, DefineError> {
    check_name(name)?;
    rule.validate()?;
    check_references(store, &rule)?;
    let definition = AudienceDefinition { name: name.to_owned(), rule, created_at_ms: now.timestamp_millis() };
    store.create_audience(&definition)?;
    Ok(definition)
}

/// Deletes an audience no other audience refers to.
pub fn delete_audience(store: &dyn Store, name: &str) -> Result<(), DefineError> {
    for record in store.list_audiences()? {
        if record.definition.rule.referenced_audiences().contains(&name) {
            return Err(DefineError::InUse { name: name.to_owned(), used_by: record.definition.name });
        }
    }
    store.delete_audience(name)?;
    Ok(())
}

/// Validates and stores a new computed trait; the stage backfills it.
pub fn create_computed_trait(
    store: &dyn Store,
    name: &str,
    definition: &ComputedTraitDefinition,
    now: DateTime<Utc>,
) -> Result<ComputedTraitRecord, DefineError> {
    check_name(name).map_err(|_| DefineError::InvalidComputedTraitName)?;
    definition.validate().map_err(|problem| InvalidRule { at: String::new(), problem })?;
    store.create_computed_trait(name, definition, now.timestamp_millis())?;
    Ok(ComputedTraitRecord {
        name: name.to_owned(),
        definition: definition.clone(),
        created_at_ms: now.timestamp_millis(),
        backfill: Backfill::Pending { after: None },
    })
}

/// Deletes a computed trait (with its values) no audience tests.
pub fn delete_computed_trait(store: &dyn Store, name: &str) -> Result<(), DefineError> {
    for record in store.list_audiences()? {
        if record.definition.rule.referenced_computed_traits().contains(&name) {
            return Err(DefineError::ComputedTraitInUse { name: name.to_owned(), used_by: record.definition.name });
        }
    }
    store.delete_computed_trait(name)?;
    Ok(())
}

/// What a rule would select now, without storing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preview {
    pub size: u64,
    pub profiles_evaluated: u64,
    /// The first members by profile id.
    pub sample: Vec<ProfileId>,
}

/// A rule ready to be evaluated now over many profiles at once (the
/// builder's preview and estimate), from a few store reads per batch of
/// profiles rather than a few per profile. It reads only what the rule can
/// look at: the profiles themselves only when it tests a trait (else just
/// their ids, see [`SamplePage`]); the `track` events of the names it
/// counts, stamped from the earliest time it counts at `now` (see
/// [`CompiledAudience::earliest_counted_ms`]), decoding in full only those
/// whose name it counts; memberships when it tests audiences; computed
/// traits when it tests them. Its answers are the batch evaluator's over
/// each profile's whole timeline.
struct SampleEvaluation<'a> {
    store: &'a dyn Store,
    compiled: CompiledAudience,
    event_names: HashSet<String>,
    earliest_counted_ms: Option<i64>,
    reads_traits: bool,
    reads_audiences: bool,
    reads_computed_traits: bool,
    now: DateTime<Utc>,
}

/// Live profiles listed by id for a [`SampleEvaluation`]: with their
/// traits when the rule tests any, else the ids alone, which the store
/// lists without reading or decoding a profile.
struct SamplePage {
    /// Ascending.
    ids: Vec<ProfileId>,
    /// Each profile's traits, in the order of `ids`; empty when the rule
    /// tests no trait.
    traits: Vec<Map<String, Value>>,
}

impl SamplePage {
    /// Drops the profiles whose id is `end` or above.
    fn keep_below(&mut self, end: u64) {
        let kept = self.ids.partition_point(|id| id.0 < end);
        self.ids.truncate(kept);
        self.traits.truncate(kept);
    }
}

/// Just the name of an event, read without decoding the rest of it.
#[derive(serde::Deserialize)]
struct EventName<'a> {
    #[serde(default, borrow)]
    event: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> SampleEvaluation<'a> {
    /// Compiles `rule` and checks the audiences and computed traits it names exist.
    fn new(store: &'a dyn Store, rule: &Condition, now: DateTime<Utc>) -> Result<Self, DefineError> {
        let compiled = rule.compile()?;
        check_references(store, rule)?;
        Ok(SampleEvaluation {
            store,
            event_names: compiled.event_names().into_iter().map(str::to_owned).collect(),
            earliest_counted_ms: compiled.earliest_counted_ms(now),
            reads_traits: rule.tests_traits(),
            reads_audiences: !rule.referenced_audiences().is_empty(),
            reads_computed_traits: !rule.referenced_computed_traits().is_empty(),
            compiled,
            now,
        })
    }

    /// Live profiles with an id above `after`, by id, at most `limit`.
    fn page(&self, after: Option<ProfileId>, limit: usize) -> Result<SamplePage, StoreError> {
        if !self.reads_traits {
            return Ok(SamplePage { ids: self.store.list_profile_ids(after, limit)?, traits: Vec::new() });
        }
        let (ids, traits) =
            self.store.list_profiles(after, limit)?.into_iter().map(|profile| (profile.id, profile.traits)).unzip();
        Ok(SamplePage { ids, traits })
    }

    /// Whether the rule selects each of the page's profiles now, in its order.
    fn select(&self, page: &SamplePage) -> Result<Vec<bool>, StoreError> {
        debug_assert!(!self.reads_traits || page.traits.len() == page.ids.len());
        let ids = &page.ids;
        let mut events: HashMap<ProfileId, Vec<Event>> = HashMap::new();
        if let Some(since_ms) = self.earliest_counted_ms {
            for (profile, entry) in self.store.events_of_profiles(ids, since_ms)? {
                if entry.event_type != tandem_core::EventType::Track || !self.may_count(&entry.payload) {
                    continue;
                }
                match serde_json::from_str::<Event>(&entry.payload) {
                    Ok(event) => events.entry(profile).or_default().push(event),
                    Err(error) => tracing::warn!(position = %entry.position, %error, "unreadable event skipped"),
                }
            }
        }
        let mut audiences: HashMap<ProfileId, BTreeSet<String>> = HashMap::new();
        if self.reads_audiences {
            for membership in self.store.memberships_of(ids)? {
                audiences.entry(membership.profile).or_default().insert(membership.audience);
            }
        }
        let mut computed: HashMap<ProfileId, Map<String, Value>> = HashMap::new();
        if self.reads_computed_traits {
            for stored in self.store.computed_trait_states(ids)? {
                if let Some(value) = stored.value {
                    computed.entry(stored.profile).or_default().insert(stored.name, value);
                }
            }
        }
        let (no_events, no_audiences, no_values) = (Vec::new(), BTreeSet::new(), Map::new());
        Ok(ids
            .iter()
            .enumerate()
            .map(|(index, id)| {
                let facts = ProfileFacts {
                    traits: page.traits.get(index).unwrap_or(&no_values),
                    computed_traits: computed.get(id).unwrap_or(&no_values),
                    events: events.get(id).unwrap_or(&no_events),
                    audiences: audiences.get(id).unwrap_or(&no_audiences),
                };
                self.compiled.is_member(&facts, self.now)
            })
            .collect())
    }

    /// Whether an event's payload may be one the rule counts: its name is
    /// one the rule counts, or the name cannot be read alone (the full
    /// decoding then says why).
    fn may_count(&self, payload: &str) -> bool {
        match serde_json::from_str::<EventName<'_>>(payload) {
            Ok(EventName { event: Some(name) }) => self.event_names.contains(name.as_ref()),
            Ok(EventName { event: None }) => false,
            Err(_) => true,
        }
    }
}

/// Evaluates a rule over every live profile's timeline (the batch
/// evaluator), with their current memberships of other audiences.
pub fn preview(store: &dyn Store, rule: &Condition, now: DateTime<Utc>, sample: usize) -> Result<Preview, DefineError> {
    let evaluation = SampleEvaluation::new(store, rule, now)?;
    let mut result = Preview { size: 0, profiles_evaluated: 0, sample: Vec::new() };
    let mut after = None;
    loop {
        let page = evaluation.page(after, BACKFILL_PAGE)?;
        for (id, selected) in page.ids.iter().zip(evaluation.select(&page)?) {
            result.profiles_evaluated += 1;
            if selected {
                result.size += 1;
                if result.sample.len() < sample {
                    result.sample.push(*id);
                }
            }
        }
        match page.ids.last() {
            Some(last) if page.ids.len() == BACKFILL_PAGE => after = Some(*last),
            _ => break,
        }
    }
    Ok(result)
}

/// Profiles [`estimate`] evaluates unless told otherwise: about 30 ms of
/// work on two cores, whatever the number of profiles.
pub const ESTIMATE_PROFILES: usize = 1_000;
/// Runs of consecutive profiles an estimate's sample is drawn in, spread
/// evenly over the profile ids.
const ESTIMATE_RUNS: u64 = 10;

/// How many profiles a rule selects now, exactly or estimated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Profiles selected (estimated unless `exact`).
    pub size: u64,
    /// Live profiles (estimated unless `exact`).
    pub profiles: u64,
    pub profiles_evaluated: u64,
    /// Whether every profile was evaluated.
    pub exact: bool,
    /// Half the width of the 95% confidence interval of `size` (0 when exact).
    pub margin: u64,
}

/// What a rule selects now, for a size shown as the rule is typed: exact
/// (as [`preview`]) when the store holds at most `limit` profiles, else
/// estimated from `limit` of them, taken in [`ESTIMATE_RUNS`] runs of
/// consecutive ids spread evenly from the first id to the last, so the
/// work is the same for ten thousand profiles as for a million. Profile
/// ids grow with time (a merge keeps the older id), so the runs cover old
/// and new customers alike; how densely each run's ids are taken gives the
/// number of live profiles.
pub fn estimate(
    store: &dyn Store,
    rule: &Condition,
    now: DateTime<Utc>,
    limit: usize,
) -> Result<Estimate, DefineError> {
    let evaluation = SampleEvaluation::new(store, rule, now)?;
    let limit = limit.max(ESTIMATE_RUNS as usize);
    // The kept count of live profiles says which way to go without reading
    // them all; the exact way still reads one more than the limit to be sure.
    let (lowest, known) = if store.identity_state()?.live_profiles > limit as u64 {
        match store.list_profile_ids(None, 1)?.first() {
            Some(lowest) => (*lowest, *lowest),
            None => return Ok(Estimate { size: 0, profiles: 0, profiles_evaluated: 0, exact: true, margin: 0 }),
        }
    } else {
        let first = evaluation.page(None, limit + 1)?;
        if first.ids.len() <= limit {
            let size = evaluation.select(&first)?.into_iter().filter(|selected| *selected).count() as u64;
            let profiles = first.ids.len() as u64;
            return Ok(Estimate { size, profiles, profiles_evaluated: profiles, exact: true, margin: 0 });
        }
        (first.ids[0], first.ids[limit])
    };
    let lowest = lowest.0;
    let highest = last_profile_id(store, known)?;
    let span = highest - lowest + 1;
    let per_run = limit / ESTIMATE_RUNS as usize;
    let (mut evaluated, mut selected, mut covered) = (0u64, 0u64, 0u64);
    for run in 0..ESTIMATE_RUNS {
        let start = lowest + span * run / ESTIMATE_RUNS;
        let next_start = lowest + span * (run + 1) / ESTIMATE_RUNS;
        let mut within = evaluation.page(start.checked_sub(1).map(ProfileId), per_run)?;
        within.keep_below(next_start);
        selected += evaluation.select(&within)?.into_iter().filter(|selected| *selected).count() as u64;
        evaluated += within.ids.len() as u64;
        // A full page that ends inside the run covers the ids up to its
        // last; otherwise the whole run was read.
        covered += match within.ids.last() {
            Some(last) if within.ids.len() == per_run => last.0 - start + 1,
            _ => next_start - start,
        };
    }
    let profiles = ((evaluated as f64 / covered.max(1) as f64) * span as f64).round() as u64;
    let share = selected as f64 / evaluated.max(1) as f64;
    let margin = 1.96 * (share * (1.0 - share) / evaluated.max(1) as f64).sqrt() * profiles as f64;
    Ok(Estimate {
        size: (share * profiles as f64).round() as u64,
        profiles,
        profiles_evaluated: evaluated,
        exact: false,
        margin: margin.ceil() as u64,
    })
}

/// The highest live profile id, given one that exists: doubling past it,
/// then halving back, a one-row index seek per step.
fn last_profile_id(store: &dyn Store, known: ProfileId) -> Result<u64, StoreError> {
    let next_after = |id: u64| -> Result<Option<u64>, StoreError> {
        Ok(store.list_profile_ids(Some(ProfileId(id)), 1)?.first().map(|found| found.0))
    };
    // Invariant: `low` exists, and nothing lives after `high`.
    let mut low = known.0;
    let mut high = low.saturating_mul(2).max(low + 1);
    while let Some(found) = next_after(high)? {
        low = found;
        high = found.saturating_mul(2);
    }
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        match next_after(middle)? {
            Some(found) => low = found,
            None => high = middle,
        }
    }
    // `low` lives and nothing lives after `high`; `low` may still have a successor up to `high`.
    Ok(next_after(low)?.unwrap_or(low))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::Resolver;
    use serde_json::{json, Value};
    use std::sync::Mutex;
    use tandem_core::collect::{normalize_message, BatchDefaults, IdRequirement, RequestContext};
    use tandem_core::SourceKind;
    use tandem_store::{IngestBatch, Membership, SqliteStore};

    const DAY_MS: i64 = 86_400_000;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    /// A clock the test moves by hand.
    fn manual_clock(start: DateTime<Utc>) -> (Clock, Arc<Mutex<DateTime<Utc>>>) {
        let now = Arc::new(Mutex::new(start));
        let read = now.clone();
        (Arc::new(move || *read.lock().unwrap()), now)
    }

    /// Appends `messages` (each with its own `timestamp`) and resolves them.
    fn append_and_resolve(store: &Arc<dyn Store>, messages: &[Value]) {
        let source = match store.list_sources().unwrap().into_iter().next() {
            Some(source) => source,
            None => store.create_source("web", SourceKind::Website).unwrap(),
        };
        let request = RequestContext {
            source_id: &source.id,
            received_at: at(1_700_000_000_000),
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

    fn order(user: &str, timestamp_ms: i64) -> Value {
        let timestamp = tandem_core::event::format_timestamp(at(timestamp_ms));
        json!({"type": "track", "event": "Order Completed", "userId": user, "timestamp": timestamp})
    }

    fn member_ids(store: &Arc<dyn Store>, audience: &str) -> Vec<ProfileId> {
        store.audience_members(audience, None, 100).unwrap().iter().map(|member| member.profile).collect()
    }

    fn rule(text: &str) -> Condition {
        Condition::parse(text).unwrap()
    }

    #[test]
    fn the_builders_estimate_is_exact_in_a_small_store_and_sampled_evenly_in_a_large_one() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let now_ms = 1_700_000_000_000;
        // 4,000 people, every fourth ordered yesterday.
        let messages: Vec<Value> = (0..4_000)
            .map(|n| {
                let user = format!("u{n:05}");
                if n % 4 == 0 {
                    order(&user, now_ms - DAY_MS)
                } else {
                    json!({"type": "identify", "userId": user})
                }
            })
            .collect();
        append_and_resolve(&store, &messages);
        let recent = rule(r#"performed "Order Completed" within 30d"#);
        assert_eq!(preview(store.as_ref(), &recent, at(now_ms), 0).unwrap().size, 1_000);

        let whole = estimate(store.as_ref(), &recent, at(now_ms), 4_000).unwrap();
        assert_eq!(whole, Estimate { size: 1_000, profiles: 4_000, profiles_evaluated: 4_000, exact: true, margin: 0 });

        let sampled = estimate(store.as_ref(), &recent, at(now_ms), 400).unwrap();
        assert!(!sampled.exact, "{sampled:?}");
        assert_eq!(sampled.profiles_evaluated, 400, "ten runs of forty");
        assert_eq!(sampled.profiles, 4_000, "the ids are dense: {sampled:?}");
        assert_eq!(sampled.size, 1_000, "each run of forty holds ten buyers: {sampled:?}");
        assert_eq!(sampled.margin, 170, "1.96 * sqrt(0.25 * 0.75 / 400) * 4000, rounded up");

        let highest = store.list_profiles(None, 4_000).unwrap().last().unwrap().id;
        for known in [1, 2, 999, highest.0 - 1, highest.0] {
            assert_eq!(last_profile_id(store.as_ref(), ProfileId(known)).unwrap(), highest.0, "from {known}");
        }
        assert!(estimate(store.as_ref(), &rule(r#"in audience "nobody""#), at(now_ms), 400).is_err());
    }

    #[test]
    fn a_preview_reads_event_names_that_need_escaping_and_skips_other_names() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let now_ms = 1_700_000_000_000;
        let named = |user: &str, name: &str| {
            let mut message = order(user, now_ms - DAY_MS);
            message["event"] = json!(name);
            message
        };
        append_and_resolve(
            &store,
            &[
                named("ann", "Said \"hi\" \\ to Zoë"),
                named("bob", "Said hi"),
                named("cy", "Said \"hi\" \\ to Zoë"),
                named("cy", "Said \"hi\" \\ to Zoë"),
                json!({"type": "identify", "userId": "dee"}),
            ],
        );
        let count = |text: &str| preview(store.as_ref(), &rule(text), at(now_ms), 0).unwrap().size;
        assert_eq!(count(r#"performed "Said \"hi\" \\ to Zoë" within 30d"#), 2);
        assert_eq!(count(r#"count(event "Said \"hi\" \\ to Zoë") >= 2"#), 1);
        assert_eq!(count(r#"performed "Said hi""#), 1);
        assert_eq!(count(r#"not performed "Said hi""#), 3);
        assert_eq!(count(r#"performed "Said hi" within 1h"#), 0, "the order is a day old");
    }

    #[test]
    fn a_member_leaves_when_its_order_ages_out_of_the_window_without_a_new_event() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let start = 1_700_000_000_000;
        let (clock, now) = manual_clock(at(start));
        create_audience(store.as_ref(), "recent buyers", rule(r#"performed "Order Completed" within 7d"#), at(start))
            .unwrap();
        let metrics = Metrics::new();
        let mut stage = AudienceStage::new(store.clone(), clock).with_metrics(metrics.clone());
        stage.catch_up().unwrap();
        append_and_resolve(&store, &[order("ann", start - DAY_MS), order("bob", start - 3 * DAY_MS)]);
        stage.catch_up().unwrap();
        let ann = store.profile_by_identifier(&"user_id:ann".parse().unwrap()).unwrap().unwrap().id;
        let bob = store.profile_by_identifier(&"user_id:bob".parse().unwrap()).unwrap().unwrap().id;
        assert_eq!(member_ids(&store, "recent buyers"), vec![ann, bob]);
        assert_eq!(
            store.profile_audiences(ann).unwrap(),
            vec![Membership { audience: "recent buyers".into(), profile: ann, entered_at_ms: start - DAY_MS }],
            "entered at the event's time"
        );

        // Bob's order leaves the window 4 days from the start; no event arrives.
        *now.lock().unwrap() = at(start + 4 * DAY_MS - 1);
        stage.catch_up().unwrap();
        assert_eq!(member_ids(&store, "recent buyers"), vec![ann, bob], "not a millisecond early");
        *now.lock().unwrap() = at(start + 4 * DAY_MS + 300);
        let report = stage.step().unwrap();
        assert_eq!(report.timers, 1, "one timer was due");
        assert_eq!(member_ids(&store, "recent buyers"), vec![ann]);
        assert_eq!(metrics.audience_membership_changes.get(), 3, "two entries and one exit");
        assert_eq!(metrics.audience_lag_events.get(), 0);
        let history = store.membership_history("recent buyers", bob).unwrap();
        assert_eq!(
            history.iter().map(|change| (change.kind, change.at_ms)).collect::<Vec<_>>(),
            vec![
                (MembershipChangeKind::Entered, start - 3 * DAY_MS),
                (MembershipChangeKind::Exited, start + 4 * DAY_MS)
            ],
            "the exit is stamped with the instant the order left the window"
        );
        *now.lock().unwrap() = at(start + 6 * DAY_MS);
        stage.catch_up().unwrap();
        assert!(member_ids(&store, "recent buyers").is_empty(), "ann's order left too");
        assert!(stage.step().unwrap().is_idle(), "no timer is left to fire");
    }

    #[test]
    fn a_new_audience_is_backfilled_from_history_and_then_follows_events_and_traits() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let start = 1_700_000_000_000;
        let (clock, _now) = manual_clock(at(start));
        append_and_resolve(
            &store,
            &[
                order("ann", start - DAY_MS),
                order("ann", start - 2 * DAY_MS),
                order("bob", start - DAY_MS),
                json!({"type": "identify", "userId": "cy", "traits": {"plan": "pro"},
                       "timestamp": tandem_core::event::format_timestamp(at(start - 2 * DAY_MS))}),
            ],
        );
        let mut stage = AudienceStage::new(store.clone(), clock);
        stage.catch_up().unwrap();
        create_audience(
            store.as_ref(),
            "repeat buyers",
            rule(r#"count(event "Order Completed", within 30d) >= 2"#),
            at(start),
        )
        .unwrap();
        create_audience(store.as_ref(), "pro", rule(r#"trait plan = "pro""#), at(start)).unwrap();
        create_audience(
            store.as_ref(),
            "pro or repeat",
            rule(r#"in audience "pro" or in audience "repeat buyers""#),
            at(start),
        )
        .unwrap();
        let preview =
            preview(store.as_ref(), &rule(r#"count(event "Order Completed", within 30d) >= 2"#), at(start), 5).unwrap();
        assert_eq!((preview.size, preview.profiles_evaluated), (1, 3));
        stage.catch_up().unwrap();
        let id =
            |user: &str| store.profile_by_identifier(&format!("user_id:{user}").parse().unwrap()).unwrap().unwrap().id;
        assert_eq!(member_ids(&store, "repeat buyers"), vec![id("ann")]);
        assert_eq!(member_ids(&store, "pro"), vec![id("cy")]);
        assert_eq!(member_ids(&store, "pro or repeat"), vec![id("ann"), id("cy")]);
        assert_eq!(store.audience("pro").unwrap().unwrap().backfill, Backfill::Done);

        // New events: bob orders again, cy leaves the plan; each event's
        // time is its entry's or exit's.
        append_and_resolve(
            &store,
            &[
                order("bob", start - 100),
                json!({"type": "identify", "userId": "cy", "traits": {"plan": "free"},
                       "timestamp": tandem_core::event::format_timestamp(at(start - 50))}),
            ],
        );
        stage.catch_up().unwrap();
        assert_eq!(member_ids(&store, "repeat buyers"), vec![id("ann"), id("bob")]);
        assert!(member_ids(&store, "pro").is_empty());
        assert_eq!(member_ids(&store, "pro or repeat"), vec![id("ann"), id("bob")]);
        let cy = store.membership_history("pro", id("cy")).unwrap();
        assert_eq!(
            cy.last().map(|change| (change.kind, change.at_ms)),
            Some((MembershipChangeKind::Exited, start - 50))
        );
        assert!(matches!(
            delete_audience(store.as_ref(), "pro"),
            Err(DefineError::InUse { used_by, .. }) if used_by == "pro or repeat"
        ));
        assert!(matches!(
            create_audience(store.as_ref(), "typo", rule(r#"in audience "nope""#), at(start)),
            Err(DefineError::UnknownAudience(name)) if name == "nope"
        ));
    }

    #[test]
    fn with_nothing_to_evaluate_the_stage_skips_to_the_resolver_and_a_later_audience_counts_what_it_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let start = 1_700_000_000_000;
        let (clock, _now) = manual_clock(at(start));
        // More events than one step reads when there is something to evaluate.
        let orders: Vec<Value> =
            (0..EVENT_BATCH + 500).map(|n| order(&format!("user-{}", n % 1_000), start - DAY_MS)).collect();
        append_and_resolve(&store, &orders);
        let resolved = store.stage_cursor(Stage::RESOLVE).unwrap().unwrap().position;
        let mut stage = AudienceStage::new(store.clone(), clock);
        let report = stage.step().unwrap();
        assert_eq!(report.events, EVENT_BATCH + 500, "one step covers every resolved event");
        assert_eq!(store.stage_cursor(Stage::AUDIENCE).unwrap().unwrap().position, resolved);
        assert!(stage.step().unwrap().is_idle());

        create_audience(
            store.as_ref(),
            "repeat buyers",
            rule(r#"count(event "Order Completed", within 30d) >= 3"#),
            at(start),
        )
        .unwrap();
        stage.catch_up().unwrap();
        // 2,500 orders over 1,000 users: users 0 to 499 ordered three times.
        let all_members = || -> Vec<ProfileId> {
            let members = store.audience_members("repeat buyers", None, 1_000).unwrap();
            members.iter().map(|member| member.profile).collect()
        };
        let members = all_members();
        assert_eq!(members.len(), 500);
        let id =
            |user: &str| store.profile_by_identifier(&format!("user_id:{user}").parse().unwrap()).unwrap().unwrap();
        assert!(members.contains(&id("user-499").id) && !members.contains(&id("user-500").id));

        // With an audience defined, events are read and evaluated again.
        append_and_resolve(&store, &[order("user-500", start - 10)]);
        stage.catch_up().unwrap();
        assert!(all_members().contains(&id("user-500").id));
    }

    #[test]
    fn a_merge_moves_memberships_to_the_survivor_rebuilt_from_its_timeline() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let start = 1_700_000_000_000;
        let (clock, _now) = manual_clock(at(start));
        create_audience(
            store.as_ref(),
            "repeat buyers",
            rule(r#"count(event "Order Completed", within 30d) >= 2"#),
            at(start),
        )
        .unwrap();
        let mut stage = AudienceStage::new(store.clone(), clock);
        let anonymous = |id: &str, timestamp_ms: i64| {
            let mut message = order("x", timestamp_ms);
            message.as_object_mut().unwrap().remove("userId");
            message["anonymousId"] = json!(id);
            message
        };
        append_and_resolve(&store, &[anonymous("device-1", start - DAY_MS), order("dana", start - DAY_MS)]);
        stage.catch_up().unwrap();
        assert!(member_ids(&store, "repeat buyers").is_empty(), "one order each");
        // The device logs in as dana: the two profiles merge, with two orders.
        append_and_resolve(
            &store,
            &[json!({"type": "identify", "userId": "dana", "anonymousId": "device-1",
                     "timestamp": tandem_core::event::format_timestamp(at(start - 10))})],
        );
        stage.catch_up().unwrap();
        let dana = store.profile_by_identifier(&"user_id:dana".parse().unwrap()).unwrap().unwrap().id;
        assert_eq!(member_ids(&store, "repeat buyers"), vec![dana], "the survivor counts both orders");
        assert!(store.retired_audience_profiles(10).unwrap().is_empty(), "the merged-away profile left");

        // A repair takes the device off dana again: her profile holds one
        // order, and the stage, seeing the new epoch, evaluates again.
        let repair =
            crate::resolve::Repair::Unlink { profile: dana, identifier: "anonymous_id:device-1".parse().unwrap() };
        crate::resolve::repair(&store, &repair).unwrap();
        stage.catch_up().unwrap();
        assert!(member_ids(&store, "repeat buyers").is_empty(), "one order each again");
        let history = store.membership_history("repeat buyers", dana).unwrap();
        assert_eq!(history.last().map(|change| change.kind), Some(MembershipChangeKind::Exited));
    }

    /// Regression: a due timer of an audience the stage does not evaluate
    /// (here, a stored rule that no longer compiles) fired on every round,
    /// so the stage never went idle.
    #[test]
    fn a_timer_of_an_audience_that_is_not_evaluated_is_cleared_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let start = 1_700_000_000_000;
        let (clock, _now) = manual_clock(at(start));
        append_and_resolve(&store, &[order("ann", start - DAY_MS)]);
        let ann = store.profile_by_identifier(&"user_id:ann".parse().unwrap()).unwrap().unwrap().id;
        let lonely = Condition::And { conditions: vec![rule(r#"trait plan = "pro""#)] };
        assert!(lonely.validate().is_err(), "an and of one condition is refused by validation");
        let broken = AudienceDefinition { name: "broken".into(), rule: lonely, created_at_ms: start };
        store.create_audience(&broken).unwrap();
        let state = rule(r#"performed "Order Completed" within 7d"#).compile().unwrap().new_state();
        let timer = AudienceCommit {
            states: vec![AudienceStateWrite {
                audience: "broken".into(),
                profile: ann,
                state: Some(state),
                next_change_at_ms: Some(start - 1),
            }],
            ..AudienceCommit::default()
        };
        assert_eq!(store.commit_audience(&timer).unwrap(), AudienceCommitOutcome::Committed);
        let mut stage = AudienceStage::new(store.clone(), clock);
        assert_eq!(stage.step().unwrap().timers, 1);
        stage.catch_up().unwrap();
        assert!(store.due_audience_states(start, 10).unwrap().is_empty());
        assert!(stage.step().unwrap().is_idle());
    }

    fn purchase(user: &str, total: f64, timestamp_ms: i64) -> Value {
        let mut message = order(user, timestamp_ms);
        message["properties"] = json!({"total": total});
        message
    }

    fn computed_values(store: &Arc<dyn Store>, profile: ProfileId) -> Map<String, Value> {
        stored_computed_values(store.as_ref(), profile).unwrap()
    }

    fn definition(text: &str) -> ComputedTraitDefinition {
        ComputedTraitDefinition::parse(text).unwrap()
    }

    #[test]
    fn a_computed_trait_is_backfilled_ages_out_on_time_and_decides_an_audience() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let start: i64 = 1_700_000_000_000; // 22:13 UTC
        let day_start = start - start.rem_euclid(DAY_MS);
        let (clock, now) = manual_clock(at(start));
        append_and_resolve(
            &store,
            &[
                purchase("ann", 30.0, start - DAY_MS),
                purchase("ann", 12.5, start - 60_000),
                purchase("bob", 5.0, start),
            ],
        );
        let metrics = Metrics::new();
        let mut stage = AudienceStage::new(store.clone(), clock).with_metrics(metrics.clone());
        stage.catch_up().unwrap();
        let ann = store.profile_by_identifier(&"user_id:ann".parse().unwrap()).unwrap().unwrap().id;
        let bob = store.profile_by_identifier(&"user_id:bob".parse().unwrap()).unwrap().unwrap().id;

        // Created after the events: the backfill computes them from timelines.
        create_computed_trait(
            store.as_ref(),
            "recent orders",
            &definition(r#"count of "Order Completed" within 2d"#),
            at(start),
        )
        .unwrap();
        create_computed_trait(store.as_ref(), "spent", &definition(r#"sum(total) of "Order Completed""#), at(start))
            .unwrap();
        assert!(matches!(
            create_computed_trait(store.as_ref(), "spent", &definition(r#"count of "A""#), at(start)),
            Err(DefineError::Store(StoreError::ComputedTraitExists(_)))
        ));
        assert!(matches!(
            create_computed_trait(store.as_ref(), " spent", &definition(r#"count of "A""#), at(start)),
            Err(DefineError::InvalidComputedTraitName)
        ));
        assert!(matches!(
            create_audience(store.as_ref(), "typo", rule(r#"computed "recent order" >= 2"#), at(start)),
            Err(DefineError::UnknownComputedTrait(name)) if name == "recent order"
        ));
        create_audience(store.as_ref(), "repeat buyers", rule(r#"computed "recent orders" >= 2"#), at(start)).unwrap();
        assert!(matches!(
            delete_computed_trait(store.as_ref(), "recent orders"),
            Err(DefineError::ComputedTraitInUse { used_by, .. }) if used_by == "repeat buyers"
        ));
        let report = stage.step().unwrap();
        assert_eq!(report.computed_backfilled, 4, "both profiles, for each of the two computed traits");
        stage.catch_up().unwrap();
        assert_eq!(store.computed_trait("spent").unwrap().unwrap().backfill, Backfill::Done);
        assert_eq!(
            computed_values(&store, ann),
            json!({"recent orders": 2, "spent": 42.5}).as_object().cloned().unwrap()
        );
        assert_eq!(computed_values(&store, bob), json!({"recent orders": 1, "spent": 5}).as_object().cloned().unwrap());
        assert_eq!(member_ids(&store, "repeat buyers"), vec![ann]);

        // Yesterday's order leaves the 2-day window at the next midnight
        // (UTC), without any new event.
        *now.lock().unwrap() = at(day_start + DAY_MS - 1);
        stage.catch_up().unwrap();
        assert_eq!(computed_values(&store, ann)["recent orders"], json!(2), "not a millisecond early");
        *now.lock().unwrap() = at(day_start + DAY_MS + 100);
        let writes = metrics.computed_trait_writes.get();
        assert!(writes >= 4, "the backfill wrote each profile's values");
        let report = stage.step().unwrap();
        assert_eq!(report.timers, 1, "ann's computed-trait timer was due");
        assert_eq!(metrics.computed_trait_writes.get(), writes + 1, "one value changed, one row written");
        assert_eq!(computed_values(&store, ann)["recent orders"], json!(1));
        assert_eq!(computed_values(&store, ann)["spent"], json!(42.5), "a trait without a window keeps its value");
        assert!(member_ids(&store, "repeat buyers").is_empty(), "the audience reads the aged value");
        let history = store.membership_history("repeat buyers", ann).unwrap();
        assert_eq!(
            history.last().map(|change| (change.kind, change.at_ms)),
            Some((MembershipChangeKind::Exited, day_start + DAY_MS)),
            "the exit is stamped with the instant the order left the window"
        );

        // A new order: the event updates the value and the audience at once.
        append_and_resolve(&store, &[purchase("ann", 7.5, day_start + DAY_MS + 50)]);
        stage.catch_up().unwrap();
        assert_eq!(
            computed_values(&store, ann),
            json!({"recent orders": 2, "spent": 50}).as_object().cloned().unwrap()
        );
        assert_eq!(member_ids(&store, "repeat buyers"), vec![ann]);

        // Days later every order has left the window; nothing is left to fire.
        *now.lock().unwrap() = at(day_start + 5 * DAY_MS);
        stage.catch_up().unwrap();
        assert_eq!(computed_values(&store, ann)["recent orders"], json!(0));
        assert_eq!(computed_values(&store, bob)["recent orders"], json!(0));
        assert!(member_ids(&store, "repeat buyers").is_empty());
        assert!(store.due_computed_trait_states(i64::MAX, 10).unwrap().is_empty());
        assert!(stage.step().unwrap().is_idle());

        delete_computed_trait(store.as_ref(), "spent").unwrap();
        assert_eq!(computed_values(&store, ann).len(), 1, "a deleted trait's values go");
    }

    #[test]
    fn a_merge_and_a_repair_rebuild_computed_traits_from_timelines() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let start = 1_700_000_000_000;
        let (clock, _now) = manual_clock(at(start));
        create_computed_trait(store.as_ref(), "spent", &definition(r#"sum(total) of "Order Completed""#), at(start))
            .unwrap();
        let mut stage = AudienceStage::new(store.clone(), clock);
        stage.catch_up().unwrap();
        let mut anonymous = purchase("x", 10.0, start - DAY_MS);
        anonymous.as_object_mut().unwrap().remove("userId");
        anonymous["anonymousId"] = json!("device-1");
        append_and_resolve(&store, &[anonymous, purchase("dana", 4.0, start - DAY_MS)]);
        stage.catch_up().unwrap();
        let dana = store.profile_by_identifier(&"user_id:dana".parse().unwrap()).unwrap().unwrap().id;
        assert_eq!(computed_values(&store, dana)["spent"], json!(4));
        append_and_resolve(
            &store,
            &[json!({"type": "identify", "userId": "dana", "anonymousId": "device-1",
                     "timestamp": tandem_core::event::format_timestamp(at(start - 10))})],
        );
        stage.catch_up().unwrap();
        let dana = store.profile_by_identifier(&"user_id:dana".parse().unwrap()).unwrap().unwrap().id;
        assert_eq!(computed_values(&store, dana)["spent"], json!(14), "the survivor counts both orders once");
        assert!(store.retired_audience_profiles(10).unwrap().is_empty(), "the merged-away profile's values went");

        // A repair takes the device off dana again: the new resolver epoch
        // has every computed trait computed again from repaired timelines.
        let repair =
            crate::resolve::Repair::Unlink { profile: dana, identifier: "anonymous_id:device-1".parse().unwrap() };
        crate::resolve::repair(&store, &repair).unwrap();
        stage.catch_up().unwrap();
        let dana = store.profile_by_identifier(&"user_id:dana".parse().unwrap()).unwrap().unwrap().id;
        assert_eq!(computed_values(&store, dana)["spent"], json!(4), "only her own order again");
        assert!(store.retired_audience_profiles(10).unwrap().is_empty());
        assert_eq!(store.computed_trait("spent").unwrap().unwrap().backfill, Backfill::Done);
    }

    /// One thing that happens in the property test below.
    #[derive(Clone, Debug)]
    enum Happening {
        /// An order by a user (`u0`…) or a device (`a0`…), this long before now.
        Order { who: String, age_ms: i64 },
        /// A device logs in as a user: their profiles merge.
        LogIn { user: u8, device: u8 },
        /// Time passes.
        Wait { ms: i64 },
    }

    fn happening() -> impl proptest::strategy::Strategy<Value = Happening> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (prop_oneof![Just("u"), Just("a")], 0..3u8, 0..4 * DAY_MS)
                .prop_map(|(kind, n, age_ms)| Happening::Order { who: format!("{kind}{n}"), age_ms }),
            1 => (0..3u8, 0..3u8).prop_map(|(user, device)| Happening::LogIn { user, device }),
            2 => (0..2 * DAY_MS).prop_map(|ms| Happening::Wait { ms }),
        ]
    }

    /// Rules a preview is checked with: windows, no window, a time range,
    /// a funnel, a name never sent, audiences, computed traits and traits
    /// (which it reads whole profiles for; the others, ids alone).
    const PREVIEW_RULES: [&str; 9] = [
        r#"count(event "Order Completed", within 3d) >= 2"#,
        r#"not performed "Order Completed" within 2d"#,
        r#"count(event "Order Completed") >= 3"#,
        r#"performed "Order Completed" between 2023-11-13T00:00:00Z and 2023-11-15T00:00:00Z"#,
        r#"performed "Order Completed" then "Order Completed" within 1d and not performed "Signed Up""#,
        r#"in audience "twice" or computed recent >= 1"#,
        r#"not in audience "lately" and (computed recent < 3 or performed "Order Completed" within 5d)"#,
        r#"trait plan = "pro" or count(event "Order Completed", within 3d) >= 2"#,
        r#"not trait plan = "pro" and performed "Order Completed" within 2d"#,
    ];

    /// What a preview's answers are checked against: the batch evaluator
    /// over one profile's whole timeline, with its memberships and stored
    /// computed traits, each read for that profile alone.
    fn selects_now_one_at_a_time(store: &dyn Store, rule: &Condition, profile: &Profile, now: DateTime<Utc>) -> bool {
        let events = timeline(store, profile.id, LogPosition(u64::MAX >> 1)).unwrap();
        let members: BTreeSet<String> =
            store.profile_audiences(profile.id).unwrap().into_iter().map(|membership| membership.audience).collect();
        let computed = stored_computed_values(store, profile.id).unwrap();
        let facts =
            ProfileFacts { traits: &profile.traits, computed_traits: &computed, events: &events, audiences: &members };
        rule.compile().unwrap().is_member(&facts, now)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Whatever events, merges and waits happen, every membership and
        /// computed-trait value the stage keeps equals the batch evaluator
        /// over the profile's whole timeline at that moment, and each
        /// history alternates entries and exits.
        #[test]
        fn memberships_equal_the_batch_evaluator_over_each_timeline(
            happenings in proptest::collection::vec(happening(), 1..16)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
            let start = 1_700_000_000_000;
            let (clock, now) = manual_clock(at(start));
            let rules = [
                ("twice", r#"count(event "Order Completed", within 3d) >= 2"#),
                ("lately", r#"performed "Order Completed" within 1d"#),
                ("quiet", r#"not performed "Order Completed" within 2d"#),
                ("frequent", r#"computed recent >= 2"#),
            ];
            let recent = definition(r#"count of "Order Completed" within 2d"#);
            create_computed_trait(store.as_ref(), "recent", &recent, at(start)).unwrap();
            let recent = recent.compile().unwrap();
            for (name, text) in rules {
                create_audience(store.as_ref(), name, rule(text), at(start)).unwrap();
            }
            let mut stage = AudienceStage::new(store.clone(), clock);
            let mut messages = 0;
            for happening in happenings {
                let now_ms = now.lock().unwrap().timestamp_millis();
                messages += 1;
                match happening {
                    Happening::Order { who, age_ms } => {
                        let mut message = order("x", now_ms - age_ms);
                        message.as_object_mut().unwrap().remove("userId");
                        let key = if who.starts_with('u') { "userId" } else { "anonymousId" };
                        message[key] = json!(who);
                        message["messageId"] = json!(format!("m{messages}"));
                        append_and_resolve(&store, &[message]);
                    }
                    Happening::LogIn { user, device } => append_and_resolve(
                        &store,
                        &[json!({"type": "identify", "userId": format!("u{user}"), "anonymousId": format!("a{device}"),
                                 "messageId": format!("m{messages}"),
                                 "traits": {"plan": if user == 0 { "pro" } else { "free" }},
                                 "timestamp": tandem_core::event::format_timestamp(at(now_ms))})],
                    ),
                    Happening::Wait { ms } => *now.lock().unwrap() = at(now_ms + ms),
                }
                stage.catch_up().unwrap();
                let now_time = *now.lock().unwrap();
                for profile in store.list_profiles(None, 100).unwrap() {
                    let events = timeline(store.as_ref(), profile.id, LogPosition(u64::MAX >> 1)).unwrap();
                    let members: BTreeSet<String> =
                        store.profile_audiences(profile.id).unwrap().into_iter().map(|m| m.audience).collect();
                    let none = BTreeSet::new();
                    let mut computed = Map::new();
                    if let Some(value) = recent.compute(&events, now_time) {
                        computed.insert("recent".to_owned(), value);
                    }
                    proptest::prop_assert_eq!(
                        &computed_values(&store, profile.id), &computed,
                        "the kept value of {} equals the batch computation", profile.id
                    );
                    let facts = ProfileFacts { traits: &profile.traits, computed_traits: &computed, events: &events, audiences: &none };
                    for (name, text) in rules {
                        let expected = rule(text).compile().unwrap().is_member(&facts, now_time);
                        proptest::prop_assert_eq!(
                            members.contains(name), expected,
                            "{} in {} at {}: {:?}", profile.id, name, now_time, events.iter().map(|e| e.timestamp).collect::<Vec<_>>()
                        );
                        let history = store.membership_history(name, profile.id).unwrap();
                        for (index, change) in history.iter().enumerate() {
                            let entered = index % 2 == 0;
                            proptest::prop_assert_eq!(change.kind == MembershipChangeKind::Entered, entered, "{:?}", history);
                        }
                    }
                }
                let profiles = store.list_profiles(None, 100).unwrap();
                for text in PREVIEW_RULES {
                    let evaluation = SampleEvaluation::new(store.as_ref(), &rule(text), now_time).unwrap();
                    let sample = evaluation.page(None, 100).unwrap();
                    proptest::prop_assert_eq!(&sample.ids, &profiles.iter().map(|profile| profile.id).collect::<Vec<_>>());
                    let traits_read = if text.contains("trait plan") { sample.ids.len() } else { 0 };
                    proptest::prop_assert_eq!(
                        sample.traits.len(), traits_read, "only a rule testing a trait reads whole profiles"
                    );
                    let one_at_a_time: Vec<bool> = profiles
                        .iter()
                        .map(|profile| selects_now_one_at_a_time(store.as_ref(), &rule(text), profile, now_time))
                        .collect();
                    proptest::prop_assert_eq!(
                        evaluation.select(&sample).unwrap(), one_at_a_time,
                        "a preview of {} at {} answers as each profile's whole timeline does", text, now_time
                    );
                }
                proptest::prop_assert!(store.retired_audience_profiles(10).unwrap().is_empty());
                for record in store.list_audiences().unwrap() {
                    let members = store.audience_members(&record.definition.name, None, 1_000).unwrap();
                    proptest::prop_assert_eq!(record.size, members.len() as u64, "the kept size is the member count");
                }
            }
        }
    }
}
