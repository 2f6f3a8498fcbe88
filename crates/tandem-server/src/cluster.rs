//! Several nodes on one store: which stage leases this node holds
//! ([`LeaseBoard`], reported by `/health`), and the whole store's view
//! ([`ClusterStatus`]: each stage's position and lag against the log head,
//! and whether some node holds its lease), which `tandem cluster status`
//! and `/api/v1/cluster` print; and [`LeaseKeeper`], the loop step that
//! takes and keeps a stage's lease for the stages that follow the log.

use crate::error::{ApiError, ErrorCode};
use crate::extract::AdminToken;
use crate::AppState;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tandem_store::{LeaseHolder, LeaseLost, Stage, StageLease, Store, StoreError, StoreKind};

use crate::resolve::RateLimitedWarning;

/// How often a stage without its lease asks again, and how often one that
/// holds it checks it still does.
const LEASE_INTERVAL: Duration = Duration::from_secs(1);

/// Takes and keeps one stage's lease for a loop that runs the stage only
/// while it holds it (the audience and outbox stages): call
/// [`LeaseKeeper::poll`] once per turn.
pub struct LeaseKeeper {
    store: Arc<dyn Store>,
    stage: Stage,
    lease: Option<StageLease>,
    last_check: Instant,
    failing: RateLimitedWarning,
}

/// What the loop does this turn.
pub enum LeaseTurn {
    /// The lease is this node's: run the stage.
    Held,
    /// Another node holds it, or asking failed; the call already waited.
    Waiting,
    /// The lease was held and is lost: stop what runs under it.
    Lost(LeaseLost),
}

impl LeaseKeeper {
    pub fn new(store: Arc<dyn Store>, stage: Stage) -> Self {
        LeaseKeeper {
            store,
            stage,
            lease: None,
            last_check: Instant::now(),
            failing: RateLimitedWarning::new(Duration::from_secs(30)),
        }
    }

    /// Takes the lease when it is free (waiting [`LEASE_INTERVAL`] when it
    /// is not), and checks a held one at most once per interval.
    pub fn poll(&mut self) -> LeaseTurn {
        match &mut self.lease {
            None => match self.store.try_lease(self.stage) {
                Ok(Some(granted)) => {
                    self.lease = Some(granted);
                    self.last_check = Instant::now();
                    LeaseTurn::Held
                }
                Ok(None) => {
                    std::thread::sleep(LEASE_INTERVAL);
                    LeaseTurn::Waiting
                }
                Err(error) => {
                    if let Some(held_back) = self.failing.admit(Instant::now()) {
                        tracing::warn!(%error, stage = self.stage.0, held_back, "asking for a stage lease failed; retrying");
                    }
                    std::thread::sleep(LEASE_INTERVAL);
                    LeaseTurn::Waiting
                }
            },
            Some(held) if self.last_check.elapsed() >= LEASE_INTERVAL => {
                self.last_check = Instant::now();
                match held.check() {
                    Ok(()) => LeaseTurn::Held,
                    Err(lost) => {
                        self.lease = None;
                        LeaseTurn::Lost(lost)
                    }
                }
            }
            Some(_) => LeaseTurn::Held,
        }
    }
}

/// `GET /api/v1/cluster`, for an admin token.
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/cluster", get(cluster))
}

async fn cluster(State(state): State<AppState>, _token: AdminToken) -> Result<Json<ClusterStatus>, ApiError> {
    let store = state.store.clone();
    let drain = match &state.stream {
        Some(stream) => match stream.position().await {
            Ok(position) => Some(position),
            Err(error) => {
                tracing::error!(%error, "reading the event stream's last sequence failed");
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "the event stream cannot be read right now, retry later",
                ));
            }
        },
        None => None,
    };
    match tokio::task::spawn_blocking(move || cluster_status_with_stream(store.as_ref(), drain)).await {
        Ok(Ok(status)) => Ok(Json(status)),
        Ok(Err(error)) => {
            tracing::error!(%error, "reading the cluster status failed");
            Err(ApiError::new(ErrorCode::Unavailable, "the store cannot be read right now, retry later"))
        }
        Err(_) => Err(ApiError::new(ErrorCode::Internal, "internal error")),
    }
}

/// The stage leases this node holds now; cheap to clone and share.
#[derive(Clone, Default)]
pub struct LeaseBoard {
    held: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl LeaseBoard {
    /// Records whether this node holds `stage`'s lease.
    pub fn set(&self, stage: Stage, held: bool) {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).insert(stage.0, held);
    }

    /// Whether this node holds `stage`'s lease (false before it tried).
    pub fn holds(&self, stage: Stage) -> bool {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).get(stage.0).copied().unwrap_or(false)
    }

    /// Every stage this node runs or waits to run, with whether it holds the lease.
    pub fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// The store's stages as every node sees them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClusterStatus {
    /// `sqlite` (one node) or `postgres` (any number).
    pub store: StoreKind,
    /// The newest committed log position.
    pub head: u64,
    /// Each stage that has committed a position, in the flow's order.
    pub stages: Vec<StageStatus>,
}

/// One stage's place in the log and who runs it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageStatus {
    pub stage: &'static str,
    /// The last log position whose effects this stage committed (for the
    /// drain stage: the last stream sequence it appended to the log).
    pub position: u64,
    /// Events in the log this stage has not committed yet (for the drain
    /// stage: messages in the stream it has not appended yet).
    pub lag: u64,
    /// `held`, `vacant` (no node runs it), or `embedded` (SQLite).
    pub lease: LeaseHolder,
}

/// Reads the cluster's status from the store (a few small queries).
pub fn cluster_status(store: &dyn Store) -> Result<ClusterStatus, StoreError> {
    cluster_status_with_stream(store, None)
}

/// What an event stream holds, for the drain stage's lag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPosition {
    /// The stream's name.
    pub stream: String,
    /// The sequence of its oldest message still kept (older ones aged out).
    pub first_sequence: u64,
    /// The sequence of its newest message.
    pub last_sequence: u64,
    /// Sequences between the two whose messages were deleted (a person's
    /// erasure), ascending.
    pub deleted: Vec<u64>,
}

impl StreamPosition {
    /// Messages the stream holds after `sequence`: the sequences past it,
    /// less those deleted or aged out, which no drain can append.
    pub fn messages_after(&self, sequence: u64) -> u64 {
        let from = sequence.max(self.first_sequence.saturating_sub(1));
        let span = self.last_sequence.saturating_sub(from);
        let deleted = self.deleted.iter().filter(|&&gone| gone > from && gone <= self.last_sequence).count();
        span.saturating_sub(deleted as u64)
    }
}

/// [`cluster_status`] of a cluster that ingests through an event stream:
/// the drain stage comes first, its position the last stream sequence it
/// appended and its lag the stream's messages it has not appended yet.
pub fn cluster_status_with_stream(
    store: &dyn Store,
    stream: Option<StreamPosition>,
) -> Result<ClusterStatus, StoreError> {
    let head = store.head()?.0;
    let mut stages = Vec::new();
    if let Some(stream) = stream {
        let drained = store.drained_sequence(&stream.stream)?;
        stages.push(StageStatus {
            stage: Stage::DRAIN.0,
            position: drained,
            lag: stream.messages_after(drained),
            lease: store.lease_holder(Stage::DRAIN)?,
        });
    }
    for &stage in Stage::ALL {
        let Some(cursor) = store.stage_cursor(stage)? else { continue };
        stages.push(StageStatus {
            stage: stage.0,
            position: cursor.position.0,
            lag: head.saturating_sub(cursor.position.0),
            lease: store.lease_holder(stage)?,
        });
    }
    Ok(ClusterStatus { store: store.kind(), head, stages })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_board_remembers_each_stage() {
        let board = LeaseBoard::default();
        assert!(!board.holds(Stage::RESOLVE));
        board.clone().set(Stage::RESOLVE, true);
        assert!(board.holds(Stage::RESOLVE));
        board.set(Stage::RESOLVE, false);
        assert_eq!(board.snapshot().get("resolve"), Some(&false));
    }

    #[test]
    fn an_embedded_store_reports_its_resolver_lag() {
        let dir = tempfile::tempdir().unwrap();
        let store = tandem_store::SqliteStore::open(dir.path()).unwrap();
        let status = cluster_status(&store).unwrap();
        assert_eq!(status.store, StoreKind::Sqlite);
        assert_eq!(status.head, 0);
        assert_eq!(
            status.stages,
            vec![StageStatus { stage: "resolve", position: 0, lag: 0, lease: LeaseHolder::Embedded }]
        );
    }

    #[test]
    fn the_drain_lags_by_the_messages_left_not_by_deleted_or_aged_out_sequences() {
        let position =
            StreamPosition { stream: "S".into(), first_sequence: 1, last_sequence: 10, deleted: vec![4, 9, 10] };
        assert_eq!(position.messages_after(0), 7);
        assert_eq!(position.messages_after(5), 3, "6, 7 and 8");
        assert_eq!(position.messages_after(8), 0, "only deleted messages are left");
        assert_eq!(position.messages_after(10), 0);
        assert_eq!(position.messages_after(12), 0, "a sequence past the end");
        let aged = StreamPosition { stream: "S".into(), first_sequence: 6, last_sequence: 10, deleted: vec![] };
        assert_eq!(aged.messages_after(2), 5, "messages 3 to 5 aged out of the stream");
        assert_eq!(StreamPosition::default().messages_after(0), 0, "an empty stream");
    }
}
