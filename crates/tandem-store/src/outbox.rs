//! The delivery stage's storage interface: destination definitions, the
//! outbox (each destination's items waiting for delivery, in the order they
//! were enqueued, with their attempts and next due time), the dead letters
//! of items that ran out of retries, and the outbox stage's cursor in
//! `stage_cursors`. [`OutboxStore::commit_outbox`] writes new items together
//! with the cursor, so a crash neither loses nor doubles an enqueue; a
//! delivered item is removed only after its delivery, so a crash between the
//! two delivers it again (at least once).

use serde::Serialize;
use tandem_core::activate::DestinationDefinition;
use tandem_core::{LogPosition, ProfileId};

use crate::{MembershipChange, Stage, StoreError};

impl Stage {
    /// The outbox stage: enqueues the log's events for each destination.
    pub const OUTBOX: Stage = Stage("outbox");
    /// The outbox stage's position in the audience history (the id of the
    /// last membership change it enqueued, not a log position).
    pub const OUTBOX_AUDIENCES: Stage = Stage("outbox-audiences");
}

/// Which cursor an [`OutboxCommit`] moves: the log's, or the audience
/// history's (whose "positions" are history ids).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutboxCursor {
    #[default]
    Log,
    AudienceHistory,
}

impl OutboxCursor {
    /// The `stage_cursors` row this cursor is kept in.
    pub fn stage(self) -> Stage {
        match self {
            OutboxCursor::Log => Stage::OUTBOX,
            OutboxCursor::AudienceHistory => Stage::OUTBOX_AUDIENCES,
        }
    }
}

/// An outbox item's id: increasing in enqueue order across all
/// destinations, and never reused, so a replayed dead letter takes back its
/// place in its destination's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct OutboxItemId(pub u64);

/// How many items of a destination are where.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutboxCounts {
    /// Waiting for their first attempt.
    pub pending: u64,
    /// Attempted and failed at least once, waiting for a retry.
    pub retrying: u64,
    /// Delivered since the destination was created.
    pub delivered: u64,
    /// Out of retries, in the dead-letter list.
    pub dead: u64,
}

/// A stored destination with its counts.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationRecord {
    pub definition: DestinationDefinition,
    pub created_at_ms: i64,
    pub counts: OutboxCounts,
    /// Paused: items are still enqueued, in order, but none is sent.
    pub paused: bool,
    /// When the head of the outbox (the next item to send) was first
    /// enqueued; `None` when the outbox is empty or the item predates the
    /// record. `now - this` is how far the destination lags.
    pub head_enqueued_at_ms: Option<i64>,
    /// When an item was last delivered; `None` before the first.
    pub last_delivered_at_ms: Option<i64>,
}

/// An item to enqueue: one event of the log for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOutboxItem {
    pub destination: String,
    pub position: LogPosition,
    /// What is delivered: the event as Segment JSON.
    pub payload: String,
    /// The profile the item is about when enqueued (the event's owner, or
    /// the profile that entered or left), for filtering dead letters.
    pub profile: Option<ProfileId>,
}

/// An item waiting in a destination's outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxItem {
    pub id: OutboxItemId,
    pub destination: String,
    pub position: LogPosition,
    pub payload: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When the first attempt failed, if one did: the retry time limit
    /// counts from here.
    pub first_failed_at_ms: Option<i64>,
    /// Not attempted before this instant (0 for a new item).
    pub next_attempt_at_ms: i64,
    pub last_error: Option<String>,
    /// When the item was first enqueued (milliseconds); `None` for an item
    /// that predates the column.
    pub enqueued_at_ms: Option<i64>,
}

/// An item that ran out of retries, kept with the last error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub id: OutboxItemId,
    pub destination: String,
    pub position: LogPosition,
    pub payload: String,
    pub attempts: u32,
    pub last_error: String,
    pub dead_at_ms: i64,
    /// The profile the item was about when enqueued, if known.
    pub profile: Option<ProfileId>,
}

/// Which dead letters a listing or a replay takes: all, or only those that
/// died at or after `since_ms`, only those about `profile`, only the one
/// item `item`, only those after `after` (a page's last item); each narrows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    pub since_ms: Option<i64>,
    pub profile: Option<ProfileId>,
    /// Exactly this item (one dead letter, replayed on its own).
    pub item: Option<OutboxItemId>,
    /// Items enqueued after this one: the next page of a listing.
    pub after: Option<OutboxItemId>,
}

/// What the outbox stage writes in one transaction.
#[derive(Clone, Debug, Default)]
pub struct OutboxCommit {
    /// The cursor `from` and `to` belong to.
    pub cursor: OutboxCursor,
    /// The stage position the items were read from.
    pub from: LogPosition,
    /// The stage position once committed.
    pub to: LogPosition,
    /// Enqueued in this order; items of a destination that no longer
    /// exists (deleted while the stage read) are dropped.
    pub items: Vec<NewOutboxItem>,
    /// When the items are enqueued (milliseconds); kept with each item,
    /// into the dead letters and back, to measure a destination's lag.
    pub at_ms: i64,
    /// What the events read said about their profiles' consent, recorded
    /// as [`crate::GovernStore::record_consent`] does.
    pub consent: Vec<crate::ConsentChange>,
    /// Deliveries withheld for want of consent: destination → category → count.
    pub withheld: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

/// What became of an [`OutboxCommit`]; only `Committed` wrote anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxCommitOutcome {
    Committed,
    /// The stage's position is no longer the commit's `from`: another
    /// outbox stage enqueued those events first.
    StalePosition,
}

/// A failed attempt to record: either a retry later, or a dead letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailedAttempt {
    /// Keep the item at its place and try again at `next_attempt_at_ms`.
    Retry { first_failed_at_ms: i64, next_attempt_at_ms: i64, error: String },
    /// Move the item to the dead-letter list.
    DeadLetter { at_ms: i64, error: String },
}

/// The delivery stage's storage.
pub trait OutboxStore: Send + Sync + 'static {
    /// Stores a new destination; refused with
    /// [`StoreError::DestinationExists`] when the name is taken. It receives
    /// the events the outbox stage reads after this call.
    fn create_destination(&self, definition: &DestinationDefinition, created_at_ms: i64) -> Result<(), StoreError>;

    /// Every destination, by name, with its counts.
    fn list_destinations(&self) -> Result<Vec<DestinationRecord>, StoreError>;

    /// One destination by name, with its counts.
    fn destination(&self, name: &str) -> Result<Option<DestinationRecord>, StoreError>;

    /// Pauses (`true`) or resumes a destination's delivery;
    /// [`StoreError::DestinationNotFound`] when there is none of that name.
    fn set_destination_paused(&self, name: &str, paused: bool) -> Result<(), StoreError>;

    /// Removes a destination with its outbox and dead letters;
    /// [`StoreError::DestinationNotFound`] when there is none of that name.
    fn delete_destination(&self, name: &str) -> Result<(), StoreError>;

    /// Enqueues the commit's items and moves the outbox stage's cursor
    /// (`commit.cursor`) from `commit.from` to `commit.to`, in one transaction.
    fn commit_outbox(&self, commit: &OutboxCommit) -> Result<OutboxCommitOutcome, StoreError>;

    /// The entries and exits the audience stage recorded after history id
    /// `after` (0 for all), oldest first, at most `limit`, each with its id.
    fn membership_changes_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, MembershipChange)>, StoreError>;

    /// The first `limit` items of a destination's outbox, in enqueue order
    /// (due or not: the head's due time holds back everything behind it).
    fn outbox_head(&self, destination: &str, limit: usize) -> Result<Vec<OutboxItem>, StoreError>;

    /// Removes delivered items from the outbox and counts them as delivered;
    /// ids no longer in the outbox (the destination was deleted) are skipped.
    fn mark_delivered(&self, destination: &str, ids: &[OutboxItemId]) -> Result<(), StoreError>;

    /// Records a failed attempt of one item: a retry or a dead letter.
    fn record_failure(&self, id: OutboxItemId, failure: &FailedAttempt) -> Result<(), StoreError>;

    /// Dead letters that pass `filter`, of one destination or (`None`) of
    /// every destination, in enqueue order (oldest item first), at most `limit`.
    fn dead_letters(
        &self,
        destination: Option<&str>,
        filter: &DeadLetterFilter,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// Puts the dead letters of a destination that pass `filter` back in
    /// its outbox, each at its original place in the order, as new (no
    /// attempts); returns how many. [`StoreError::DestinationNotFound`]
    /// when there is none of that name.
    fn replay_dead_letters(&self, destination: &str, filter: &DeadLetterFilter) -> Result<u64, StoreError>;
}

/// A definition as stored: JSON text.
pub(crate) fn definition_to_text(definition: &DestinationDefinition) -> Result<String, StoreError> {
    serde_json::to_string(definition).map_err(|error| StoreError::Backend(Box::new(error)))
}

pub(crate) fn definition_from_text(text: &str) -> Result<DestinationDefinition, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Backend(Box::new(error)))
}
