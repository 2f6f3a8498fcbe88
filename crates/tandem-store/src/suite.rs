//! The behaviour every storage backend must show, written once as generic
//! test cases, one module per stage's interface. A backend runs them all with
//! `tandem_store::store_test_suite!(|dir: &Path| -> impl Store { ... })`, or
//! one stage's with that stage's macro; the closure returns a fresh, empty
//! store, or `Option` of one that is `None` when the backend is skipped on
//! purpose (see [`MadeStore`]). The cases take a whole
//! [`Store`](crate::Store) because each needs a little of the others (a
//! source to append for, a log to resolve).

pub mod audience;
#[cfg(test)]
pub mod audit;
pub mod govern;
pub mod identity;
pub mod insight;
pub mod inventory;
pub mod log;
pub mod outbox;
pub mod session;
pub mod sources;

use crate::{IngestBatch, Store};
use tandem_core::{EventType, LogRecord, MessageId, SourceId};

/// The [`EventLog`](crate::EventLog) suite: one `#[test]` per case.
#[macro_export]
macro_rules! event_log_test_suite {
    ($make:expr) => {
        $crate::suite_cases!(log, $make;
            appended_events_read_back_in_order,
            duplicates_within_the_window_are_stored_once,
            message_ids_outside_the_window_are_stored_again,
            forgotten_message_ids_no_longer_deduplicate,
            message_ids_kept_forever_are_never_forgotten,
            rejected_messages_are_kept_in_quarantine,
            stats_count_per_source_and_type,
            concurrent_appends_are_all_kept,
            the_log_filters_by_source_type_time_and_direction,
            browsing_events_filters_by_name_and_user_across_chunks,
            a_reader_following_concurrent_appends_skips_nothing,
            client_text_with_a_nul_character_is_kept_as_sent,
            drained_batches_record_their_stream_sequence_with_the_events,
            a_stale_drain_commit_writes_nothing
        );
    };
}

/// The [`Sources`](crate::Sources) suite: one `#[test]` per case.
#[macro_export]
macro_rules! sources_test_suite {
    ($make:expr) => {
        $crate::suite_cases!(sources, $make;
            sources_have_unique_names_and_write_keys,
            tokens_verify_by_secret_only,
            webhook_settings_round_trip,
            revoked_tokens_no_longer_verify,
            tokens_keep_their_role_expiry_and_last_use,
            sources_rename_rotate_and_delete_only_without_events
        );
    };
}

/// The [`IdentityStore`](crate::IdentityStore) suite: one `#[test]` per case.
#[macro_export]
macro_rules! identity_store_test_suite {
    ($make:expr) => {
        $crate::suite_cases!(identity, $make;
            identity_commits_round_trip_and_refuse_stale_writers,
            batched_look_ups_find_live_owners_and_profiles,
            profiles_list_by_id_and_search_by_identifier_prefix_and_trait,
            timelines_follow_event_time_and_page_by_cursor,
            events_of_many_profiles_are_read_at_once_from_a_time,
            merges_and_drops_list_newest_first_a_page_at_a_time
        );
    };
}

/// The [`AudienceStore`](crate::AudienceStore) suite: one `#[test]` per case.
#[macro_export]
macro_rules! audience_store_test_suite {
    ($make:expr) => {
        $crate::suite_cases!(audience, $make;
            audiences_have_unique_names_and_delete_with_their_members,
            commits_record_memberships_history_and_states_and_refuse_stale_writers,
            due_timers_come_back_soonest_first_until_cleared,
            retired_profiles_are_found_after_a_merge,
            computed_traits_have_unique_names_and_delete_with_their_values,
            computed_trait_timers_come_back_soonest_first_until_cleared
        );
    };
}

/// The [`AuditStore`](crate::AuditStore) suite: one `#[test]` per case. The
/// store must also implement `suite::audit::RawSql`, through which the cases
/// tamper with the log; only the crate's own tests run it.
#[macro_export]
macro_rules! audit_store_test_suite {
    ($make:expr) => {
        $crate::suite_cases!(audit, $make;
            entries_chain_in_order_and_filter,
            concurrent_appends_form_one_chain,
            an_edited_entry_is_detected,
            an_edit_with_a_recomputed_hash_is_detected_at_the_next_entry,
            a_deleted_entry_is_detected,
            a_reordered_entry_is_detected
        );
    };
}

/// The [`PiiInventoryStore`](crate::PiiInventoryStore) suite: one `#[test]` per case.
#[macro_export]
macro_rules! pii_inventory_test_suite {
    ($make:expr) => {
        $crate::suite_cases!(inventory, $make;
            keys_are_kept_per_source_with_their_latest_sighting,
            pii_rules_are_kept_by_matcher_in_deciding_order
        );
    };
}

/// The [`OutboxStore`](crate::OutboxStore) suite: one `#[test]` per case.
#[macro_export]
macro_rules! outbox_store_test_suite {
    ($make:expr) => {
        $crate::suite_cases!(outbox, $make;
            destinations_have_unique_names_and_delete_with_their_items,
            commits_enqueue_in_order_and_refuse_stale_writers,
            failures_retry_in_place_then_dead_letters_replay_in_order,
            dead_letters_are_listed_and_replayed_by_time_and_profile,
            dead_letters_page_after_an_item_and_replay_one_at_a_time,
            audience_changes_are_read_after_their_own_cursor
        );
    };
}

/// The [`GovernStore`](crate::GovernStore) suite: one `#[test]` per case.
#[macro_export]
macro_rules! govern_store_test_suite {
    ($make:expr) => {
        $crate::suite_cases!(govern, $make;
            plans_are_kept_per_source_and_replaced,
            violations_are_counted_with_the_append_per_event_and_path,
            requests_and_suppressions_are_kept_by_digest,
            erasing_a_person_removes_their_rows_everywhere_and_keeps_others,
            consent_keeps_the_latest_value_per_category_with_history_and_withheld_counts,
            the_stack_registry_keeps_entries_and_merges_unknown_key_sightings
        );
    };
}

/// The [`InsightStore`](crate::InsightStore) suite: one `#[test]` per case.
#[macro_export]
macro_rules! insight_store_test_suite {
    ($make:expr) => {
        $crate::suite_cases!(insight, $make;
            goals_have_unique_names_and_share_trackers_until_the_last_is_deleted,
            commits_add_day_values_and_states_with_the_cursor_and_refuse_stale_writers,
            identity_events_are_the_creations_and_merges_of_a_position_range,
            snapshots_keep_each_days_last_value_and_the_one_before_a_range,
            ingest_latency_adds_up_per_day_and_bucket,
            counters_read_events_violations_deliveries_and_dead_letters,
            a_backfill_page_is_committed_once
        );
    };
}

/// The [`ConsoleSessionStore`](crate::ConsoleSessionStore) suite: one `#[test]` per case.
#[macro_export]
macro_rules! console_session_test_suite {
    ($make:expr) => {
        $crate::suite_cases!(session, $make;
            sessions_are_found_by_digest_until_they_expire_or_end,
            signed_in_sessions_read_their_token_as_stored_now,
            revoking_a_token_ends_its_sessions,
            starting_a_session_prunes_expired_ones_and_keeps_the_cap,
            extending_never_shortens_a_session
        );
    };
}

/// What a suite's maker returns: a fresh store, or `Option` of one for a
/// backend that needs a server, whose tests the developer may skip
/// explicitly (`None`: the case returns without running).
pub trait MadeStore {
    type Store: Store;
    fn into_store(self) -> Option<Self::Store>;
}

impl<S: Store> MadeStore for S {
    type Store = S;
    fn into_store(self) -> Option<S> {
        Some(self)
    }
}

impl<S: Store> MadeStore for Option<S> {
    type Store = S;
    fn into_store(self) -> Option<S> {
        self
    }
}

fn record(source: &SourceId, message_id: &str, event_type: EventType, received_at_ms: i64) -> LogRecord {
    LogRecord {
        source_id: source.clone(),
        message_id: MessageId::new(message_id),
        event_type,
        received_at_ms,
        timestamp_ms: received_at_ms - 5,
        payload: format!(r#"{{"messageId":"{message_id}","type":"{event_type}"}}"#),
    }
}

fn batch(records: Vec<LogRecord>) -> IngestBatch {
    IngestBatch { records, rejected: Vec::new(), ..Default::default() }
}
