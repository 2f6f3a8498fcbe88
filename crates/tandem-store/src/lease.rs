//! How nodes sharing one store divide the pipeline's stages between them:
//! [`Coordination`] says what kind of store this is, whether it answers, and
//! hands out a [`StageLease`] — the right to run one stage (the resolver
//! today) on this node while no other node does.
//!
//! A lease is about not wasting work, not about correctness: every stage
//! commits its effects with its log position, and a commit from a position
//! another node already moved past is refused
//! ([`CommitOutcome::StalePosition`](crate::CommitOutcome)). Two nodes that
//! both believed they held a lease would duplicate effort, never effects.
//!
//! The embedded SQLite store grants every lease at once: the process that
//! opens the file runs its stages, as before scale-out. PostgreSQL uses a
//! session-level advisory lock per stage, held on a connection of its own
//! (see `postgres.rs`): when the node holding it dies, its connection
//! closes, the lock goes with it, and a waiting node takes it.

use crate::{Stage, StoreError};

/// Which backend a store is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The embedded single-file store; one node.
    Sqlite,
    /// The shared database several nodes can use.
    Postgres,
}

impl StoreKind {
    /// The kind's name, as `/health` and `tandem cluster status` print it.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// Who, if anyone, holds a stage's lease now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseHolder {
    /// A node holds it (PostgreSQL: a session holds the stage's advisory lock).
    Held,
    /// No node holds it: the stage is not running anywhere.
    Vacant,
    /// The embedded store: whichever process opens the file runs the stage.
    Embedded,
}

/// What the server needs to share a store with other nodes.
pub trait Coordination: Send + Sync + 'static {
    /// Which backend this is.
    fn kind(&self) -> StoreKind;

    /// One round trip to the store: `Ok` when it answers.
    fn ping(&self) -> Result<(), StoreError>;

    /// Tries once to take `stage`'s lease for this node; `None` while another
    /// node holds it. The lease lasts until the returned value is dropped or
    /// [`StageLease::check`] reports it lost.
    fn try_lease(&self, stage: Stage) -> Result<Option<StageLease>, StoreError>;

    /// Whether any node (this one included) holds `stage`'s lease now.
    fn lease_holder(&self, stage: Stage) -> Result<LeaseHolder, StoreError>;
}

/// What keeps a lease held in a backend (a connection holding a lock).
pub trait LeaseKeeper: Send {
    /// `Ok` while the lease is still this node's.
    fn check(&mut self) -> Result<(), LeaseLost>;
}

/// This node's right to run one stage; released when dropped.
pub struct StageLease {
    stage: Stage,
    keeper: Option<Box<dyn LeaseKeeper>>,
}

/// A lease this node held is no longer its own.
#[derive(Debug, thiserror::Error)]
#[error("the {stage} lease was lost: {reason}")]
pub struct LeaseLost {
    pub stage: &'static str,
    pub reason: String,
}

impl StageLease {
    /// A lease nothing can take away (the embedded store's).
    pub fn granted(stage: Stage) -> StageLease {
        StageLease { stage, keeper: None }
    }

    /// A lease kept by `keeper` for as long as it says so.
    pub fn kept_by(stage: Stage, keeper: Box<dyn LeaseKeeper>) -> StageLease {
        StageLease { stage, keeper: Some(keeper) }
    }

    /// The stage this lease runs.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// `Ok` while the lease is still this node's; an error means another node
    /// may run the stage now, so this node must stop running it.
    pub fn check(&mut self) -> Result<(), LeaseLost> {
        match &mut self.keeper {
            Some(keeper) => keeper.check(),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for StageLease {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StageLease")
            .field("stage", &self.stage.0)
            .field("embedded", &self.keeper.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SqliteStore;

    #[test]
    fn the_embedded_store_grants_every_lease_and_answers_a_ping() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.ping().unwrap();
        assert_eq!(store.kind().name(), "sqlite");
        let mut first = store.try_lease(Stage::RESOLVE).unwrap().expect("granted");
        let second = store.try_lease(Stage::RESOLVE).unwrap();
        assert!(second.is_some(), "one process owns the file, so nothing competes for it");
        first.check().unwrap();
        assert_eq!(store.lease_holder(Stage::RESOLVE).unwrap(), LeaseHolder::Embedded);
    }
}
