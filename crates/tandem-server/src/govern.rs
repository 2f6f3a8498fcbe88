//! Governance at ingestion, the same on every way in (tracking calls,
//! webhooks, imports over HTTP and from the command line): each valid event
//! is checked against the suppressed identifiers (a match is quarantined as
//! `suppressed`, keeping only a digest of the message), then against the PII
//! rules (a red value whose policy is `refuse` quarantines the event as
//! `red_value_refused`; other red values are hashed later, by the log
//! writer), then passes through its source's tracking plan. Blocked events
//! become refusals (quarantined with `unplanned_event` or `plan_violation`,
//! listed in the response like any refused message), unplanned properties are
//! removed in that mode, and every violation is counted with the append.
//! [`Gate`] holds what one request or one import is checked against, read
//! once; its check is synchronous, so an import's reader thread runs it.
//!
//! Plans are cached per source for [`PLAN_CACHE_TTL`], including the answer
//! "no plan", so a source without one costs a map look-up per request and
//! nothing per event; a plan set through this server's API applies at once,
//! one set by another process within the TTL. Suppressions are cached the
//! same way; while storage cannot be read, both keep what was read before
//! ([`crate::read_through`]).

use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::read_through::ReadThrough;
use crate::AppState;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::collect::{RejectedMessage, Rejection, RejectionCode};
use tandem_core::govern::dsr::{identifier_digest, payload_digest};
use tandem_core::govern::plan::{CompiledPlan, PlanError, PlanVerdict, TrackingPlan, ViolationKind};
use tandem_core::govern::PiiPolicy;
use tandem_core::identity::CompiledRules;
use tandem_core::{Event, IdentityGraph, Source, SourceId};
use tandem_store::{PlanViolationRecord, PlanViolationSummary, Store, StoreError, StoredPlan};

/// How long a source's plan (or its absence) is trusted without reading it again.
pub const PLAN_CACHE_TTL: Duration = Duration::from_secs(10);

/// Source → compiled tracking plan, read through from storage.
pub struct PlanDirectory {
    plans: ReadThrough<Option<Arc<CompiledPlan>>>,
}

impl PlanDirectory {
    pub fn new(store: Arc<dyn Store>) -> Self {
        PlanDirectory { plans: ReadThrough::new(store, "a tracking plan", PLAN_CACHE_TTL) }
    }

    /// The source's compiled plan, if it has one.
    pub async fn plan_for(&self, source_id: &SourceId) -> Result<Option<Arc<CompiledPlan>>, ApiError> {
        let read = self
            .plans
            .get(source_id.as_str(), |store, source| {
                let source_id = SourceId::new(source);
                Ok(Some(compiled(store.plan(&source_id)?, &source_id)))
            })
            .await?;
        Ok(read.flatten())
    }

    /// Drops the cached plan of a source, after it was set or deleted here.
    pub fn forget(&self, source_id: &SourceId) {
        self.plans.forget(source_id.as_str());
    }
}

/// A stored plan, compiled. Plans are compiled before they are stored; one
/// that no longer compiles (a newer build stored it) is not applied.
fn compiled(stored: Option<StoredPlan>, source_id: &SourceId) -> Option<Arc<CompiledPlan>> {
    match stored?.plan.compile() {
        Ok(plan) => Some(Arc::new(plan)),
        Err(error) => {
            tracing::error!(source = %source_id, %error, "a stored tracking plan does not compile");
            None
        }
    }
}

/// The suppressed identifier digests with the identity rules that say which
/// identifiers an event carries, read through from storage every
/// [`PLAN_CACHE_TTL`]; with no suppression the check costs one look at an
/// empty set per request.
pub struct SuppressionDirectory {
    /// Under the one key [`SUPPRESSIONS_KEY`].
    read: ReadThrough<Arc<Suppressions>>,
}

/// The key of the suppressions in [`SuppressionDirectory`]'s cache.
const SUPPRESSIONS_KEY: &str = "";

/// What the suppression check needs, read at once.
pub struct Suppressions {
    digests: HashSet<String>,
    rules: Option<CompiledRules>,
}

impl SuppressionDirectory {
    pub fn new(store: Arc<dyn Store>) -> Self {
        SuppressionDirectory { read: ReadThrough::new(store, "suppressions", PLAN_CACHE_TTL) }
    }

    async fn current(&self) -> Result<Arc<Suppressions>, ApiError> {
        let read = self.read.get(SUPPRESSIONS_KEY, |store, _| Ok(Some(Arc::new(Suppressions::read(store)?)))).await?;
        read.ok_or_else(|| ApiError::new(ErrorCode::Internal, "internal error"))
    }

    /// Reads the suppressions again on next use (after one was added or removed here).
    pub fn forget(&self) {
        self.read.forget(SUPPRESSIONS_KEY);
    }
}

impl Suppressions {
    /// Reads the suppressed digests, and the identity rules when there are any.
    pub fn read(store: &dyn Store) -> Result<Suppressions, StoreError> {
        let digests: HashSet<String> = store.suppressed()?.into_iter().collect();
        let rules = if digests.is_empty() { None } else { store.identity_rules()?.compile().ok() };
        Ok(Suppressions { digests, rules })
    }

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

/// What one request's (or one import's) events are checked against, read
/// once: the suppressed identifiers, the PII rules in force and the
/// source's tracking plan.
#[derive(Clone)]
pub struct Gate {
    pub suppressions: Arc<Suppressions>,
    pub pii: Arc<PiiPolicy>,
    pub plan: Option<Arc<CompiledPlan>>,
    /// Where violations are counted (`None` outside a server).
    pub metrics: Option<Metrics>,
}

impl Gate {
    /// The server's gate for a source's events, from its caches.
    pub async fn for_source(state: &AppState, source_id: &SourceId) -> Result<Gate, ApiError> {
        Ok(Gate {
            suppressions: state.suppressions.current().await?,
            pii: state.pii.current(),
            plan: state.plans.plan_for(source_id).await?,
            metrics: Some(state.metrics.clone()),
        })
    }

    /// The gate for a source's events read straight from `store`, with the
    /// PII rules `pii` (the command line's imports).
    pub fn read(store: &dyn Store, pii: Arc<PiiPolicy>, source_id: &SourceId) -> Result<Gate, StoreError> {
        let plan = compiled(store.plan(source_id)?, source_id);
        Ok(Gate { suppressions: Arc::new(Suppressions::read(store)?), pii, plan, metrics: None })
    }

    /// A gate that lets everything through with the built-in PII classes:
    /// for tests of what happens after governance.
    pub fn open() -> Gate {
        Gate {
            suppressions: Arc::new(Suppressions { digests: HashSet::new(), rules: None }),
            pii: Arc::default(),
            plan: None,
            metrics: None,
        }
    }

    /// Whether [`Gate::check`] may refuse or change an event: some identifier
    /// is suppressed, some red value is refused, or the source has a plan.
    /// When not, callers need not prepare the message as sent.
    pub fn inspects(&self) -> bool {
        !self.suppressions.digests.is_empty() || self.pii.refuses_any() || self.plan.is_some()
    }

    /// Checks one event: suppression, then red values the PII rules refuse,
    /// then the tracking plan. `raw` gives the message as sent (kept in
    /// quarantine, with its red values hashed by the log writer, and as a
    /// violation's sample), asked for only when needed; `index` is its place
    /// in the request. The event to store (perhaps with properties removed),
    /// or why it is refused; violations found are added to `violations`
    /// either way.
    pub fn check(
        &self,
        mut event: Event,
        index: Option<usize>,
        raw: &dyn Fn() -> String,
        received_at_ms: i64,
        violations: &mut Vec<PlanViolationRecord>,
    ) -> Result<Event, RejectedMessage> {
        if let Some(kind) = self.suppressions.suppressed_identifier(&event) {
            return Err(RejectedMessage {
                index,
                // Only a digest: the message is about someone who asked
                // not to be processed.
                raw: payload_digest(raw().as_bytes()),
                rejection: Rejection::new(
                    RejectionCode::Suppressed,
                    &kind,
                    format!("a {kind} of this message belongs to a suppressed person"),
                ),
            });
        }
        if let Some(path) = self.pii.refused_red_field(&event) {
            return Err(RejectedMessage {
                index,
                raw: raw(),
                rejection: Rejection::new(
                    RejectionCode::RedValueRefused,
                    &path,
                    format!("{path} holds a red pii value, and the pii rules refuse events carrying it"),
                ),
            });
        }
        let Some(plan) = &self.plan else { return Ok(event) };
        let verdict = plan.check(&mut event);
        let found = verdict.violations();
        let mut sent = None;
        if !found.is_empty() {
            let text: &str = sent.insert(raw());
            // A sample keeps the message as sent, so it is scrubbed of red
            // values before it is cut to size (a cut one is no longer JSON).
            let scrubbed = self.pii.scrub_anywhere(text);
            let sample = scrubbed.as_deref().unwrap_or(text);
            for violation in found {
                if let Some(metrics) = &self.metrics {
                    metrics.count_plan_violation(violation.kind.as_str());
                }
                violations.push(PlanViolationRecord::new(
                    event.source_id.clone(),
                    violation.kind.as_str(),
                    &violation.event_name,
                    &violation.path,
                    &violation.message,
                    sample,
                    received_at_ms,
                ));
            }
        }
        match verdict {
            PlanVerdict::Keep(_) | PlanVerdict::Trimmed(_) => Ok(event),
            PlanVerdict::Block(blocked) => {
                let reason = &blocked[0];
                let code = match reason.kind {
                    ViolationKind::UnplannedEvent => RejectionCode::UnplannedEvent,
                    _ => RejectionCode::PlanViolation,
                };
                let field = if reason.path.is_empty() { "message" } else { reason.path.as_str() };
                Err(RejectedMessage {
                    index,
                    raw: sent.unwrap_or_else(raw),
                    rejection: Rejection::new(code, field, format!("tracking plan: {}", reason.message)),
                })
            }
        }
    }

    /// [`Gate::check`] for a request's events. `indexes` gives each event's
    /// batch index (`None` for a single call) and `raw` the message as sent.
    pub fn screen<'a>(
        &self,
        events: Vec<Event>,
        indexes: &[Option<usize>],
        raw: impl Fn(Option<usize>) -> &'a str,
        received_at_ms: i64,
    ) -> Screened {
        debug_assert_eq!(events.len(), indexes.len());
        let mut screened = Screened { events: Vec::with_capacity(events.len()), ..Screened::default() };
        for (event, index) in events.into_iter().zip(indexes.iter().copied()) {
            let sent = raw(index);
            match self.check(event, index, &|| sent.to_owned(), received_at_ms, &mut screened.violations) {
                Ok(event) => screened.events.push(event),
                Err(refused) => screened.refused.push(refused),
            }
        }
        screened
    }
}

/// Governance for one request's valid events (see [`Gate::check`]).
pub async fn screen<'a>(
    state: &AppState,
    source_id: &SourceId,
    events: Vec<Event>,
    indexes: &[Option<usize>],
    raw: impl Fn(Option<usize>) -> &'a str,
    received_at_ms: i64,
) -> Result<Screened, ApiError> {
    Ok(Gate::for_source(state, source_id).await?.screen(events, indexes, raw, received_at_ms))
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
