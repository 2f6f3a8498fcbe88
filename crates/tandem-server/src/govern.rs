//! Governance at ingestion: a request's valid events are checked against
//! the suppressed identifiers (a match is quarantined as `suppressed`,
//! keeping only a digest of the message), then pass through their source's
//! tracking plan before they reach the log writer. Blocked events
//! become refusals (quarantined with `unplanned_event` or `plan_violation`,
//! listed in the response like any refused message), unplanned properties are
//! removed in that mode, and every violation is counted with the append.
//!
//! Plans are cached per source for [`PLAN_CACHE_TTL`], including the answer
//! "no plan", so a source without one costs a map look-up per request and
//! nothing per event; a plan set through this server's API applies at once,
//! one set by another process within the TTL.

use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::AppState;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tandem_core::collect::{RejectedMessage, Rejection, RejectionCode};
use tandem_core::govern::dsr::{identifier_digest, payload_digest};
use tandem_core::govern::plan::{CompiledPlan, PlanError, PlanVerdict, TrackingPlan, ViolationKind};
use tandem_core::identity::CompiledRules;
use tandem_core::{Event, IdentityGraph, Source, SourceId};
use tandem_store::{PlanViolationRecord, PlanViolationSummary, Store, StoreError, StoredPlan};

/// How long a source's plan (or its absence) is trusted without reading it again.
pub const PLAN_CACHE_TTL: Duration = Duration::from_secs(10);

/// A source's plan (or its absence) and when it was read.
type CachedPlan = (Option<Arc<CompiledPlan>>, Instant);

/// Source → compiled tracking plan, read through from storage.
pub struct PlanDirectory {
    store: Arc<dyn Store>,
    known: RwLock<HashMap<SourceId, CachedPlan>>,
}

impl PlanDirectory {
    pub fn new(store: Arc<dyn Store>) -> Self {
        PlanDirectory { store, known: RwLock::new(HashMap::new()) }
    }

    /// The source's compiled plan, if it has one.
    pub async fn plan_for(&self, source_id: &SourceId) -> Result<Option<Arc<CompiledPlan>>, ApiError> {
        if let Some((plan, read_at)) = self.known.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(source_id)
        {
            if read_at.elapsed() < PLAN_CACHE_TTL {
                return Ok(plan.clone());
            }
        }
        let store = self.store.clone();
        let wanted = source_id.clone();
        let stored = tokio::task::spawn_blocking(move || store.plan(&wanted))
            .await
            .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
            .map_err(|error| {
                tracing::error!(%error, "reading a tracking plan failed");
                ApiError::unavailable()
            })?;
        let compiled = match stored {
            Some(stored) => match stored.plan.compile() {
                Ok(plan) => Some(Arc::new(plan)),
                Err(error) => {
                    // Plans are compiled before they are stored; one that no
                    // longer compiles (a newer build stored it) is not applied.
                    tracing::error!(source = %source_id, %error, "a stored tracking plan does not compile");
                    None
                }
            },
            None => None,
        };
        self.known
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(source_id.clone(), (compiled.clone(), Instant::now()));
        Ok(compiled)
    }

    /// Drops the cached plan of a source, after it was set or deleted here.
    pub fn forget(&self, source_id: &SourceId) {
        self.known.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(source_id);
    }
}

/// The suppressed identifier digests with the identity rules that say which
/// identifiers an event carries, read through from storage every
/// [`PLAN_CACHE_TTL`]; with no suppression the check costs one look at an
/// empty set per request.
pub struct SuppressionDirectory {
    store: Arc<dyn Store>,
    known: RwLock<Option<(Arc<Suppressions>, Instant)>>,
}

/// What the suppression check needs, read at once.
pub struct Suppressions {
    digests: HashSet<String>,
    rules: Option<CompiledRules>,
}

impl SuppressionDirectory {
    pub fn new(store: Arc<dyn Store>) -> Self {
        SuppressionDirectory { store, known: RwLock::new(None) }
    }

    async fn current(&self) -> Result<Arc<Suppressions>, ApiError> {
        if let Some((known, read_at)) = &*self.known.read().unwrap_or_else(|poisoned| poisoned.into_inner()) {
            if read_at.elapsed() < PLAN_CACHE_TTL {
                return Ok(known.clone());
            }
        }
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || -> Result<Suppressions, StoreError> {
            let digests: HashSet<String> = store.suppressed()?.into_iter().collect();
            let rules = if digests.is_empty() { None } else { store.identity_rules()?.compile().ok() };
            Ok(Suppressions { digests, rules })
        })
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
        .map_err(|error| {
            tracing::error!(%error, "reading suppressions failed");
            ApiError::unavailable()
        })?;
        let read = Arc::new(read);
        *self.known.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((read.clone(), Instant::now()));
        Ok(read)
    }

    /// Reads the suppressions again on next use (after one was added or removed here).
    pub fn forget(&self) {
        *self.known.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}

impl Suppressions {
    /// The type of the first suppressed identifier `event` carries.
    fn suppressed_identifier(&self, event: &Event) -> Option<String> {
        let rules = self.rules.as_ref()?;
        IdentityGraph::identifiers_carried(event, rules)
            .into_iter()
            .find(|identifier| self.digests.contains(&identifier_digest(identifier)))
            .map(|identifier| identifier.kind)
    }
}

/// A request's events after governance.
#[derive(Debug, Default)]
pub struct Screened {
    /// The events to append, in their order.
    pub events: Vec<Event>,
    /// Events refused here, with their batch index and the raw message.
    pub refused: Vec<RejectedMessage>,
    /// Violations to count with the append.
    pub violations: Vec<PlanViolationRecord>,
}

/// Governance for one request's valid events: the source's tracking plan,
/// when it has one (otherwise the events pass untouched).
pub async fn screen<'a>(
    state: &AppState,
    source_id: &SourceId,
    events: Vec<Event>,
    indexes: &[Option<usize>],
    raw: impl Fn(Option<usize>) -> &'a str,
    received_at_ms: i64,
) -> Result<Screened, ApiError> {
    let suppressions = state.suppressions.current().await?;
    let (events, indexes, refused) = if suppressions.digests.is_empty() {
        (events, std::borrow::Cow::Borrowed(indexes), Vec::new())
    } else {
        let mut kept = Vec::with_capacity(events.len());
        let mut kept_indexes = Vec::with_capacity(events.len());
        let mut refused = Vec::new();
        for (event, index) in events.into_iter().zip(indexes.iter().copied()) {
            match suppressions.suppressed_identifier(&event) {
                Some(kind) => refused.push(RejectedMessage {
                    index,
                    // Only a digest: the message is about someone who asked
                    // not to be processed.
                    raw: payload_digest(raw(index).as_bytes()),
                    rejection: Rejection::new(
                        RejectionCode::Suppressed,
                        &kind,
                        format!("a {kind} of this message belongs to a suppressed person"),
                    ),
                }),
                None => {
                    kept.push(event);
                    kept_indexes.push(index);
                }
            }
        }
        (kept, std::borrow::Cow::Owned(kept_indexes), refused)
    };
    let mut screened = match state.plans.plan_for(source_id).await? {
        Some(plan) => apply_plan(&plan, &state.metrics, events, &indexes, raw, received_at_ms),
        None => Screened { events, ..Screened::default() },
    };
    if !refused.is_empty() {
        screened.refused.extend(refused);
        screened.refused.sort_by_key(|refused| refused.index);
    }
    Ok(screened)
}

/// Applies the source's plan to a request's events. `indexes` gives each
/// event's batch index (`None` for a single call) and `raw` the message as
/// sent, for quarantine and samples.
pub fn apply_plan<'a>(
    plan: &CompiledPlan,
    metrics: &Metrics,
    events: Vec<Event>,
    indexes: &[Option<usize>],
    raw: impl Fn(Option<usize>) -> &'a str,
    received_at_ms: i64,
) -> Screened {
    debug_assert_eq!(events.len(), indexes.len());
    let mut screened = Screened { events: Vec::with_capacity(events.len()), ..Screened::default() };
    for (mut event, index) in events.into_iter().zip(indexes.iter().copied()) {
        let verdict = plan.check(&mut event);
        let raw_message = raw(index);
        for violation in verdict.violations() {
            metrics.count_plan_violation(violation.kind.as_str());
            screened.violations.push(PlanViolationRecord::new(
                event.source_id.clone(),
                violation.kind.as_str(),
                &violation.event_name,
                &violation.path,
                &violation.message,
                raw_message,
                received_at_ms,
            ));
        }
        match verdict {
            PlanVerdict::Keep(_) | PlanVerdict::Trimmed(_) => screened.events.push(event),
            PlanVerdict::Block(violations) => {
                let reason = &violations[0];
                let code = match reason.kind {
                    ViolationKind::UnplannedEvent => RejectionCode::UnplannedEvent,
                    _ => RejectionCode::PlanViolation,
                };
                let field = if reason.path.is_empty() { "message" } else { reason.path.as_str() };
                screened.refused.push(RejectedMessage {
                    index,
                    raw: raw_message.to_owned(),
                    rejection: Rejection::new(code, field, format!("tracking plan: {}", reason.message)),
                });
            }
        }
    }
    screened
}

/// Setting a plan went wrong.
#[derive(Debug, thiserror::Error)]
pub enum PlanSetError {
    #[error(transparent)]
    Invalid(#[from] PlanError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sets the tracking plan of the source named `source_name` from a JSON
/// document, after parsing it and compiling every schema; the one way a plan
/// is stored (CLI and API).
pub fn set_plan(store: &dyn Store, source_name: &str, document: &str) -> Result<StoredPlan, PlanSetError> {
    let source = store.source_by_name(source_name)?;
    let plan = TrackingPlan::from_json(document)?;
    plan.compile()?;
    Ok(store.set_plan(&source.id, &plan)?)
}

/// Removes the tracking plan of the source named `source_name`; whether it had one.
pub fn delete_plan(store: &dyn Store, source_name: &str) -> Result<bool, StoreError> {
    let source = store.source_by_name(source_name)?;
    store.delete_plan(&source.id)
}

/// A source's plan and its violations, most recently seen first.
pub fn plan_report(
    store: &dyn Store,
    source_name: &str,
    violations: usize,
) -> Result<(Source, Option<StoredPlan>, Vec<PlanViolationSummary>), StoreError> {
    let source = store.source_by_name(source_name)?;
    let plan = store.plan(&source.id)?;
    let listed = store.plan_violations(&source.id, violations)?;
    Ok((source, plan, listed))
}
