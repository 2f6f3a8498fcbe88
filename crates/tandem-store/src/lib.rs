//! Storage for Tandem: one interface per stage of the flow — the event log
//! ([`EventLog`]), sources and tokens ([`Sources`]), the identity graph
//! ([`IdentityStore`]), audiences and memberships ([`AudienceStore`]), destinations and their
//! outbox ([`OutboxStore`]), the audit log ([`AuditStore`]), the PII
//! inventory ([`PiiInventoryStore`]), tracking plans, consent, data subject
//! requests and the stack registry ([`GovernStore`]), goals and their daily
//! rollups ([`InsightStore`]), the web console's sessions
//! ([`ConsoleSessionStore`]) — the embedded SQLite backend behind them (and
//! PostgreSQL for scale-out, in preview: [`PostgresStore`]), and one
//! shared test suite per interface ([`event_log_test_suite!`],
//! [`sources_test_suite!`], [`identity_store_test_suite!`],
//! [`audience_store_test_suite!`], [`outbox_store_test_suite!`],
//! [`console_session_test_suite!`]) that every backend
//! must pass. [`Store`] bundles the interfaces for the server, which needs
//! all of them.
//!
//! Policy that a second backend must not repeat (ids, write keys, token
//! secrets) lives here, outside the backends, and is passed in.
//!
//! The interfaces are synchronous: backends are driven from dedicated threads
//! (the log writer) or blocking tasks, which lets the embedded backend group
//! many requests into one transaction without an async runtime in the way.

pub mod audience;
pub mod audit;
pub mod browse;
pub mod govern;
pub mod identity;
pub mod insight;
pub mod inventory;
pub mod lease;
pub mod log;
pub mod outbox;
pub mod postgres;
pub mod session;
pub mod sources;
pub mod sqlite;
pub mod suite;

use tandem_core::source::SourceError;

pub use self::postgres::PostgresStore;
pub use audience::{
    size_over_time, AudienceCommit, AudienceCommitOutcome, AudienceDefinition, AudienceRecord, AudienceStateWrite,
    AudienceStore, Backfill, ComputedTraitRecord, ComputedTraitWrite, DailyChanges, DailySize, Membership,
    MembershipChange, MembershipChangeKind, StoredAudienceState, StoredComputedTrait,
};
pub use audit::{AuditFilter, AuditStore};
pub use govern::{
    ConsentChange, DsrRecord, ErasureReport, GovernStore, PersonDelivery, PlanViolationRecord, PlanViolationSummary,
    StoredPlan,
};
pub use identity::{
    CommitOutcome, CommitProfiles, EventLink, HistoryRecord, IdentityCommit, IdentityRepair, IdentityState,
    IdentityStore, TimelineCursor, TimelineCursorError, UnresolvedEvent,
};
pub use insight::{
    BackfillMove, DayAdd, DayValue, GoalRecord, InsightCommit, InsightCommitOutcome, InsightCounters, InsightStore,
    ProfileStateWrite, TrackerBackfill, TrackerId, TrackerRecord,
};
pub use inventory::{PiiInventoryStore, PiiKeyRecord, PiiKeySeen, StoredPiiRule};
pub use lease::{Coordination, LeaseHolder, LeaseKeeper, LeaseLost, StageLease, StoreKind};
pub use log::{
    Dedup, DrainCommit, EventLog, IngestBatch, IngestOutcome, IngestStats, LogEntry, LogFilter, QuarantineEntry,
    QuarantineRecord, SourceStats, StageCursor, StreamRange,
};
pub use outbox::{
    DeadLetter, DeadLetterFilter, DestinationRecord, FailedAttempt, NewOutboxItem, OutboxCommit, OutboxCommitOutcome,
    OutboxCounts, OutboxCursor, OutboxItem, OutboxItemId, OutboxStore,
};
pub use session::{session_id_digest, ConsoleSessionStore, NewConsoleSession, StoredConsoleSession};
pub use sources::{Sources, TokenInfo};
pub use sqlite::SqliteStore;

/// What went wrong in storage, in the caller's terms.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a source named {0:?} already exists")]
    SourceExists(String),
    #[error("no source named {0:?}")]
    SourceNotFound(String),
    #[error("source {name:?} has {events} events in the log, which keep naming it; rotate its write key to stop senders instead")]
    SourceInUse { name: String, events: u64 },
    #[error("an audience named {0:?} already exists")]
    AudienceExists(String),
    #[error("no audience named {0:?}")]
    AudienceNotFound(String),
    #[error("a computed trait named {0:?} already exists")]
    ComputedTraitExists(String),
    #[error("no computed trait named {0:?}")]
    ComputedTraitNotFound(String),
    #[error("a destination named {0:?} already exists")]
    DestinationExists(String),
    #[error("no destination named {0:?}")]
    DestinationNotFound(String),
    #[error("a goal named {0:?} already exists")]
    GoalExists(String),
    #[error("no goal named {0:?}")]
    GoalNotFound(String),
    #[error("no token {0:?}")]
    TokenNotFound(String),
    #[error(transparent)]
    InvalidSource(#[from] SourceError),
    #[error("the data directory was written by a newer tandem (schema {found}, this build knows {known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error(transparent)]
    Tls(#[from] crate::postgres::tls::TlsError),
    #[error("storage failure: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The name of a pipeline stage's row in `stage_cursors`: each stage that
/// reads the log keeps its position (and epoch) there, written in the same
/// transaction as that stage's effects, so a crash replays from exactly the
/// last committed effects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stage(pub &'static str);

impl Stage {
    /// The identity resolver.
    pub const RESOLVE: Stage = Stage("resolve");

    /// Every stage that reads the log, in the flow's order.
    pub const ALL: &'static [Stage] = &[Stage::RESOLVE, Stage::AUDIENCE, Stage::OUTBOX, Stage::INSIGHT];
}

/// Every stage's storage, for the server and the CLI, which use all of them.
/// Implemented for anything that implements each stage's interface.
pub trait Store:
    EventLog
    + Sources
    + IdentityStore
    + AudienceStore
    + OutboxStore
    + AuditStore
    + PiiInventoryStore
    + GovernStore
    + InsightStore
    + ConsoleSessionStore
    + Coordination
{
}

impl<
        T: EventLog
            + Sources
            + IdentityStore
            + AudienceStore
            + OutboxStore
            + AuditStore
            + PiiInventoryStore
            + GovernStore
            + InsightStore
            + ConsoleSessionStore
            + Coordination
            + ?Sized,
    > Store for T
{
}

/// Runs every stage's shared suite against one backend: `$make` turns a fresh
/// directory into a fresh, empty store.
#[macro_export]
macro_rules! store_test_suite {
    ($make:expr) => {
        mod event_log_suite {
            use super::*;
            $crate::event_log_test_suite!($make);
        }
        mod sources_suite {
            use super::*;
            $crate::sources_test_suite!($make);
        }
        mod identity_store_suite {
            use super::*;
            $crate::identity_store_test_suite!($make);
        }
        mod audience_store_suite {
            use super::*;
            $crate::audience_store_test_suite!($make);
        }
        mod outbox_store_suite {
            use super::*;
            $crate::outbox_store_test_suite!($make);
        }
        mod audit_store_suite {
            use super::*;
            $crate::audit_store_test_suite!($make);
        }
        mod pii_inventory_suite {
            use super::*;
            $crate::pii_inventory_test_suite!($make);
        }
        mod govern_store_suite {
            use super::*;
            $crate::govern_store_test_suite!($make);
        }
        mod insight_store_suite {
            use super::*;
            $crate::insight_store_test_suite!($make);
        }
        mod console_session_suite {
            use super::*;
            $crate::console_session_test_suite!($make);
        }
    };
}

/// Generates one `#[test]` per named case of a suite module.
#[doc(hidden)]
#[macro_export]
macro_rules! suite_cases {
    ($module:ident, $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let dir = tempfile::tempdir().expect("temporary directory");
                let make = $make;
                let Some(store) = $crate::suite::MadeStore::into_store(make(dir.path())) else {
                    return;
                };
                $crate::suite::$module::$case(&store);
            }
        )*
    };
}

/// The stage interfaces, for code that calls them on a concrete backend
/// (`use tandem_store::prelude::*`).
pub mod prelude {
    pub use crate::{
        AudienceStore, AuditStore, ConsoleSessionStore, Coordination, EventLog, GovernStore, IdentityStore,
        InsightStore, OutboxStore, PiiInventoryStore, Sources, Store,
    };
}
