//! What every backend's [`OutboxStore`](crate::OutboxStore) must do.

use crate::{
    AudienceCommit, AudienceDefinition, DeadLetterFilter, FailedAttempt, MembershipChange, MembershipChangeKind,
    NewOutboxItem, OutboxCommit, OutboxCommitOutcome, OutboxCounts, OutboxCursor, OutboxItemId, Stage, StageCursor,
    Store, StoreError,
};
use tandem_core::activate::{DestinationDefinition, DestinationSettings, EventFilter, FileSettings, RetrySettings};
use tandem_core::{LogPosition, ProfileId};

fn definition(name: &str) -> DestinationDefinition {
    DestinationDefinition {
        name: name.to_owned(),
        destination: DestinationSettings::File(FileSettings {
            path: Some(format!("/tmp/{name}.jsonl")),
            ..Default::default()
        }),
        events: Some(EventFilter::default()),
        audiences: Vec::new(),
        retry: RetrySettings::default(),
        max_events_per_second: None,
        batch_size: None,
        consent_categories: Vec::new(),
    }
}

fn item(destination: &str, position: u64) -> NewOutboxItem {
    NewOutboxItem {
        destination: destination.to_owned(),
        position: LogPosition(position),
        // A NUL character, as a client may send one inside a string.
        payload: format!(r#"{{"position":{position},"note":"a\u0000b"}}"#),
        profile: Some(ProfileId(100 + position % 2)),
    }
}

fn enqueue(store: &impl Store, from: u64, to: u64, items: Vec<NewOutboxItem>) -> OutboxCommitOutcome {
    store
        .commit_outbox(&OutboxCommit { from: LogPosition(from), to: LogPosition(to), items, ..Default::default() })
        .unwrap()
}

pub fn destinations_have_unique_names_and_delete_with_their_items(store: &impl Store) {
    let crm = definition("crm");
    store.create_destination(&crm, 1_000).unwrap();
    store.create_destination(&definition("archive"), 2_000).unwrap();
    assert!(matches!(
        store.create_destination(&definition("crm"), 3_000),
        Err(StoreError::DestinationExists(name)) if name == "crm"
    ));
    let names: Vec<_> = store.list_destinations().unwrap().into_iter().map(|record| record.definition.name).collect();
    assert_eq!(names, vec!["archive", "crm"]);
    let record = store.destination("crm").unwrap().expect("stored");
    assert_eq!(record.definition, crm, "the definition round-trips");
    assert_eq!((record.created_at_ms, record.counts), (1_000, OutboxCounts::default()));
    assert_eq!(store.destination("nobody").unwrap(), None);

    assert_eq!(
        enqueue(store, 0, 2, vec![item("crm", 1), item("crm", 2), item("archive", 2)]),
        OutboxCommitOutcome::Committed
    );
    store.delete_destination("crm").unwrap();
    assert!(matches!(store.delete_destination("crm"), Err(StoreError::DestinationNotFound(_))));
    assert!(store.outbox_head("crm", 10).unwrap().is_empty(), "its items went with it");
    assert_eq!(store.outbox_head("archive", 10).unwrap().len(), 1);
    assert!(matches!(
        store.replay_dead_letters("crm", &DeadLetterFilter::default()),
        Err(StoreError::DestinationNotFound(_))
    ));
}

pub fn commits_enqueue_in_order_and_refuse_stale_writers(store: &impl Store) {
    store.create_destination(&definition("crm"), 1_000).unwrap();
    assert_eq!(
        enqueue(store, 0, 3, vec![item("crm", 1), item("crm", 3), item("gone", 3)]),
        OutboxCommitOutcome::Committed
    );
    assert_eq!(store.stage_cursor(Stage::OUTBOX).unwrap(), Some(StageCursor { position: LogPosition(3), epoch: 0 }));
    assert_eq!(enqueue(store, 0, 5, vec![item("crm", 4)]), OutboxCommitOutcome::StalePosition);
    assert_eq!(enqueue(store, 3, 5, vec![item("crm", 5)]), OutboxCommitOutcome::Committed);

    let head = store.outbox_head("crm", 10).unwrap();
    let positions: Vec<u64> = head.iter().map(|item| item.position.0).collect();
    assert_eq!(positions, vec![1, 3, 5], "the stale commit wrote nothing, the unknown destination was dropped");
    assert!(head.windows(2).all(|pair| pair[0].id < pair[1].id));
    assert_eq!(head[0].payload, item("crm", 1).payload, "payloads round-trip, NUL included");
    assert_eq!((head[0].attempts, head[0].next_attempt_at_ms, head[0].last_error.clone()), (0, 0, None));
    assert_eq!(store.outbox_head("crm", 2).unwrap().len(), 2);

    assert_eq!(store.destination("crm").unwrap().unwrap().last_delivered_at_ms, None, "nothing delivered yet");
    let before_ms = chrono::Utc::now().timestamp_millis();
    store.mark_delivered("crm", &[head[0].id, head[1].id, OutboxItemId(999_999)]).unwrap();
    let record = store.destination("crm").unwrap().unwrap();
    assert_eq!(record.counts, OutboxCounts { pending: 1, retrying: 0, delivered: 2, dead: 0 });
    let delivered_at = record.last_delivered_at_ms.expect("the time of the last delivery");
    assert!((before_ms..=chrono::Utc::now().timestamp_millis()).contains(&delivered_at), "{delivered_at}");
    store.mark_delivered("crm", &[OutboxItemId(999_999)]).unwrap();
    let unchanged = store.destination("crm").unwrap().unwrap().last_delivered_at_ms;
    assert_eq!(unchanged, Some(delivered_at), "marking nothing delivered keeps the time");
    assert_eq!(store.outbox_head("crm", 10).unwrap()[0].position, LogPosition(5));
}

pub fn failures_retry_in_place_then_dead_letters_replay_in_order(store: &impl Store) {
    store.create_destination(&definition("crm"), 1_000).unwrap();
    enqueue(store, 0, 3, vec![item("crm", 1), item("crm", 2), item("crm", 3)]);
    let head = store.outbox_head("crm", 10).unwrap();

    let retry = FailedAttempt::Retry {
        first_failed_at_ms: 10,
        next_attempt_at_ms: 500,
        error: "the receiver answered 503".to_owned(),
    };
    store.record_failure(head[0].id, &retry).unwrap();
    store
        .record_failure(
            head[0].id,
            &FailedAttempt::Retry { first_failed_at_ms: 10, next_attempt_at_ms: 900, error: "timeout".to_owned() },
        )
        .unwrap();
    let first = &store.outbox_head("crm", 1).unwrap()[0];
    assert_eq!(first.id, head[0].id, "a retrying item keeps its place");
    assert_eq!((first.attempts, first.first_failed_at_ms, first.next_attempt_at_ms), (2, Some(10), 900));
    assert_eq!(first.last_error.as_deref(), Some("timeout"));
    assert_eq!(
        store.destination("crm").unwrap().unwrap().counts,
        OutboxCounts { pending: 2, retrying: 1, delivered: 0, dead: 0 }
    );

    store
        .record_failure(head[0].id, &FailedAttempt::DeadLetter { at_ms: 2_000, error: "gave up: 503".to_owned() })
        .unwrap();
    store.mark_delivered("crm", &[head[1].id]).unwrap();
    store
        .record_failure(
            head[2].id,
            &FailedAttempt::DeadLetter { at_ms: 3_000, error: "the receiver answered 400".to_owned() },
        )
        .unwrap();
    enqueue(store, 3, 4, vec![item("crm", 4)]);

    let dead = store.dead_letters(Some("crm"), &DeadLetterFilter::default(), 10).unwrap();
    assert_eq!(dead.iter().map(|letter| letter.position.0).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!((dead[0].attempts, dead[0].last_error.as_str(), dead[0].dead_at_ms), (3, "gave up: 503", 2_000));
    assert_eq!(dead[1].attempts, 1);
    assert_eq!(dead[0].payload, item("crm", 1).payload);
    assert_eq!(
        store.destination("crm").unwrap().unwrap().counts,
        OutboxCounts { pending: 1, retrying: 0, delivered: 1, dead: 2 }
    );

    assert_eq!(store.replay_dead_letters("crm", &DeadLetterFilter::default()).unwrap(), 2);
    assert!(store.dead_letters(Some("crm"), &DeadLetterFilter::default(), 10).unwrap().is_empty());
    let replayed = store.outbox_head("crm", 10).unwrap();
    assert_eq!(
        replayed.iter().map(|item| item.position.0).collect::<Vec<_>>(),
        vec![1, 3, 4],
        "replayed items take back their place ahead of later ones"
    );
    assert!(replayed
        .iter()
        .all(|item| item.attempts == 0 && item.next_attempt_at_ms == 0 && item.last_error.is_none()));
    assert_eq!(store.replay_dead_letters("crm", &DeadLetterFilter::default()).unwrap(), 0);
    // New items still come after everything replayed.
    enqueue(store, 4, 5, vec![item("crm", 5)]);
    assert_eq!(store.outbox_head("crm", 10).unwrap().last().unwrap().position, LogPosition(5));
}

pub fn dead_letters_are_listed_and_replayed_by_time_and_profile(store: &impl Store) {
    store.create_destination(&definition("crm"), 1).unwrap();
    store.create_destination(&definition("ads"), 1).unwrap();
    // Positions 1..=4 for crm (profiles 101, 100, 101, 100), 5 for ads.
    let items = vec![item("crm", 1), item("crm", 2), item("crm", 3), item("crm", 4), item("ads", 5)];
    let commit = OutboxCommit { from: LogPosition(0), to: LogPosition(5), items, at_ms: 5_000, ..Default::default() };
    assert_eq!(store.commit_outbox(&commit).unwrap(), OutboxCommitOutcome::Committed);
    assert_eq!(
        store.destination("crm").unwrap().unwrap().head_enqueued_at_ms,
        Some(5_000),
        "when the head was enqueued"
    );
    let dead_at = |position: u64| 1_000 * position as i64;
    for destination in ["crm", "ads"] {
        for head in store.outbox_head(destination, 10).unwrap() {
            let failure = FailedAttempt::DeadLetter { at_ms: dead_at(head.position.0), error: "400".to_owned() };
            store.record_failure(head.id, &failure).unwrap();
        }
    }
    let positions = |letters: Vec<crate::DeadLetter>| letters.iter().map(|l| l.position.0).collect::<Vec<_>>();
    let all = DeadLetterFilter::default();
    assert_eq!(positions(store.dead_letters(None, &all, 10).unwrap()), vec![1, 2, 3, 4, 5], "every destination");
    assert_eq!(store.destination("crm").unwrap().unwrap().head_enqueued_at_ms, None, "an empty outbox");
    assert_eq!(positions(store.dead_letters(Some("crm"), &all, 10).unwrap()), vec![1, 2, 3, 4]);
    assert_eq!(positions(store.dead_letters(None, &all, 2).unwrap()), vec![1, 2], "the limit");
    let letters = store.dead_letters(Some("crm"), &all, 10).unwrap();
    assert_eq!(letters[0].profile, Some(ProfileId(101)), "the profile is kept from the outbox");
    let since = DeadLetterFilter { since_ms: Some(3_000), ..Default::default() };
    assert_eq!(positions(store.dead_letters(None, &since, 10).unwrap()), vec![3, 4, 5]);
    let of_profile = DeadLetterFilter { profile: Some(ProfileId(100)), ..Default::default() };
    assert_eq!(positions(store.dead_letters(Some("crm"), &of_profile, 10).unwrap()), vec![2, 4]);
    let both = DeadLetterFilter { since_ms: Some(3_000), profile: Some(ProfileId(101)), ..Default::default() };
    assert_eq!(positions(store.dead_letters(None, &both, 10).unwrap()), vec![3, 5]);

    // Replay takes only what passes the filter, and only of that destination.
    assert_eq!(store.replay_dead_letters("crm", &both).unwrap(), 1);
    assert_eq!(positions(store.dead_letters(None, &all, 10).unwrap()), vec![1, 2, 4, 5]);
    assert_eq!(store.outbox_head("crm", 10).unwrap().iter().map(|i| i.position.0).collect::<Vec<_>>(), vec![3]);
    let record = store.destination("crm").unwrap().unwrap();
    assert_eq!(record.head_enqueued_at_ms, Some(5_000), "a replayed item keeps its first enqueue time");
    assert_eq!(store.replay_dead_letters("crm", &of_profile).unwrap(), 2);
    let head: Vec<_> = store.outbox_head("crm", 10).unwrap().iter().map(|i| i.position.0).collect();
    assert_eq!(head, vec![2, 3, 4], "replayed items are back in their order");
    assert_eq!(store.replay_dead_letters("crm", &all).unwrap(), 1);
    assert_eq!(positions(store.dead_letters(None, &all, 10).unwrap()), vec![5]);
    assert!(matches!(store.replay_dead_letters("nobody", &all), Err(StoreError::DestinationNotFound(_))));
}

pub fn dead_letters_page_after_an_item_and_replay_one_at_a_time(store: &impl Store) {
    store.create_destination(&definition("crm"), 1).unwrap();
    let items = (1..=5).map(|position| item("crm", position)).collect();
    assert_eq!(enqueue(store, 0, 5, items), OutboxCommitOutcome::Committed);
    for head in store.outbox_head("crm", 10).unwrap() {
        store.record_failure(head.id, &FailedAttempt::DeadLetter { at_ms: 10, error: "410".to_owned() }).unwrap();
    }
    let all = DeadLetterFilter::default();
    let letters = store.dead_letters(Some("crm"), &all, 10).unwrap();
    let ids: Vec<OutboxItemId> = letters.iter().map(|letter| letter.id).collect();
    let positions = |letters: Vec<crate::DeadLetter>| letters.iter().map(|l| l.position.0).collect::<Vec<_>>();

    // Pages: two at a time, each after the last one shown.
    let first = store.dead_letters(Some("crm"), &all, 2).unwrap();
    assert_eq!(positions(first.clone()), vec![1, 2]);
    let next = DeadLetterFilter { after: Some(first[1].id), ..Default::default() };
    assert_eq!(positions(store.dead_letters(Some("crm"), &next, 2).unwrap()), vec![3, 4]);
    let last = DeadLetterFilter { after: Some(ids[3]), ..Default::default() };
    assert_eq!(positions(store.dead_letters(Some("crm"), &last, 2).unwrap()), vec![5]);

    // One item alone, listed and replayed; the others stay dead.
    let third = DeadLetterFilter { item: Some(ids[2]), ..Default::default() };
    assert_eq!(positions(store.dead_letters(None, &third, 10).unwrap()), vec![3]);
    assert_eq!(store.replay_dead_letters("crm", &third).unwrap(), 1);
    assert_eq!(positions(store.dead_letters(Some("crm"), &all, 10).unwrap()), vec![1, 2, 4, 5]);
    let head = store.outbox_head("crm", 10).unwrap();
    assert_eq!((head.len(), head[0].id, head[0].attempts), (1, ids[2], 0), "back in the outbox as new");
    assert_eq!(store.replay_dead_letters("crm", &third).unwrap(), 0, "replaying it again finds nothing");
    // An item of another destination is not this destination's to replay.
    store.create_destination(&definition("ads"), 1).unwrap();
    let first_of_crm = DeadLetterFilter { item: Some(ids[0]), ..Default::default() };
    assert_eq!(store.replay_dead_letters("ads", &first_of_crm).unwrap(), 0);
    assert_eq!(store.destination("crm").unwrap().unwrap().counts.dead, 4);
}

pub fn audience_changes_are_read_after_their_own_cursor(store: &impl Store) {
    let rule = tandem_core::audience::Condition::parse(r#"trait plan = "pro""#).unwrap();
    store.create_audience(&AudienceDefinition { name: "pro".to_owned(), rule, created_at_ms: 1 }).unwrap();
    let change = |profile: u64, kind: MembershipChangeKind, at_ms: i64| MembershipChange {
        audience: "pro".to_owned(),
        profile: tandem_core::ProfileId(profile),
        kind,
        at_ms,
    };
    let changes = vec![
        change(1, MembershipChangeKind::Entered, 10),
        change(2, MembershipChangeKind::Entered, 20),
        change(1, MembershipChangeKind::Exited, 30),
    ];
    store.commit_audience(&AudienceCommit { changes: changes.clone(), ..Default::default() }).unwrap();
    let read = store.membership_changes_after(0, 10).unwrap();
    assert_eq!(read.iter().map(|(_, change)| change.clone()).collect::<Vec<_>>(), changes);
    assert!(read.windows(2).all(|pair| pair[0].0 < pair[1].0), "ids increase");
    let after_first = store.membership_changes_after(read[0].0, 1).unwrap();
    assert_eq!(after_first, vec![read[1].clone()]);

    store.create_destination(&definition("ads"), 1).unwrap();
    let commit = |from: u64, to: u64| OutboxCommit {
        cursor: OutboxCursor::AudienceHistory,
        from: LogPosition(from),
        to: LogPosition(to),
        items: vec![item("ads", to)],
        at_ms: 0,
        ..Default::default()
    };
    assert_eq!(store.commit_outbox(&commit(0, read[2].0)).unwrap(), OutboxCommitOutcome::Committed);
    assert_eq!(store.commit_outbox(&commit(0, read[2].0)).unwrap(), OutboxCommitOutcome::StalePosition);
    assert_eq!(
        store.stage_cursor(Stage::OUTBOX_AUDIENCES).unwrap().map(|cursor| cursor.position),
        Some(LogPosition(read[2].0))
    );
    assert_eq!(store.stage_cursor(Stage::OUTBOX).unwrap(), None, "the log's cursor is another row");
    assert_eq!(store.outbox_head("ads", 10).unwrap().len(), 1);
}
