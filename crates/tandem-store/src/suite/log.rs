//! What every backend's [`EventLog`](crate::EventLog) must do.

use super::{batch, record};
use crate::browse::{find_events, EventQuery};
use crate::{Dedup, DrainCommit, IngestBatch, LogFilter, QuarantineRecord, Store, StreamRange};
use tandem_core::{EventType, LogPosition, LogRecord, SourceId, SourceKind};

pub fn appended_events_read_back_in_order(store: &impl Store) {
    let source = store.create_source("web", SourceKind::Website).unwrap().id;
    assert_eq!(store.head().unwrap(), LogPosition(0), "an empty log's head");
    let first =
        batch(vec![record(&source, "a", EventType::Track, 1_000), record(&source, "b", EventType::Identify, 1_000)]);
    let second = batch(vec![record(&source, "c", EventType::Page, 1_001)]);
    let outcomes = store.append(&[first, second], 0).unwrap();
    assert_eq!(outcomes.iter().map(|outcome| outcome.stored).collect::<Vec<_>>(), vec![2, 1]);
    let log = store.read_log(LogPosition(0), 10).unwrap();
    let ids: Vec<_> = log.iter().map(|entry| entry.message_id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b", "c"]);
    assert!(log.windows(2).all(|pair| pair[0].position < pair[1].position));
    assert_eq!(log[1].event_type, EventType::Identify);
    assert_eq!(log[1].payload, r#"{"messageId":"b","type":"identify"}"#);
    assert_eq!(log[2].received_at_ms, 1_001);
    assert_eq!(log[0].source_id, source);
    let rest = store.read_log(log[0].position, 1).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].message_id.as_str(), "b");
    assert!(store.read_log(log[2].position, 10).unwrap().is_empty());
    assert_eq!(store.head().unwrap(), log[2].position, "the head is the newest event");
}

pub fn duplicates_within_the_window_are_stored_once(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    let app = store.create_source("app", SourceKind::App).unwrap().id;
    let outcomes = store
        .append(
            &[batch(vec![record(&web, "m1", EventType::Track, 10_000), record(&web, "m1", EventType::Track, 10_000)])],
            0,
        )
        .unwrap();
    assert_eq!((outcomes[0].stored, outcomes[0].duplicates), (1, 1), "a repeat inside one batch");
    let outcomes = store
        .append(
            &[
                batch(vec![record(&web, "m1", EventType::Track, 20_000)]),
                batch(vec![record(&app, "m1", EventType::Track, 20_000)]),
            ],
            5_000,
        )
        .unwrap();
    assert_eq!((outcomes[0].stored, outcomes[0].duplicates), (0, 1), "a repeat in a later request");
    assert_eq!((outcomes[1].stored, outcomes[1].duplicates), (1, 0), "another source's id is its own");
    assert_eq!(store.read_log(LogPosition(0), 10).unwrap().len(), 2);
}

pub fn message_ids_outside_the_window_are_stored_again(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    store.append(&[batch(vec![record(&web, "m1", EventType::Track, 1_000)])], 0).unwrap();
    let outcomes = store.append(&[batch(vec![record(&web, "m1", EventType::Track, 90_000)])], 2_000).unwrap();
    assert_eq!(outcomes[0].stored, 1);
    // The repeat restarts the window.
    let outcomes = store.append(&[batch(vec![record(&web, "m1", EventType::Track, 91_000)])], 2_000).unwrap();
    assert_eq!(outcomes[0].duplicates, 1);
}

pub fn forgotten_message_ids_no_longer_deduplicate(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    store
        .append(
            &[batch(vec![record(&web, "old", EventType::Track, 1_000), record(&web, "new", EventType::Track, 9_000)])],
            0,
        )
        .unwrap();
    assert_eq!(store.forget_message_ids(5_000).unwrap(), 1);
    let outcomes = store
        .append(
            &[batch(vec![record(&web, "old", EventType::Track, 9_500), record(&web, "new", EventType::Track, 9_500)])],
            0,
        )
        .unwrap();
    assert_eq!((outcomes[0].stored, outcomes[0].duplicates), (1, 1));
}

pub fn message_ids_kept_forever_are_never_forgotten(store: &impl Store) {
    let crm = store.create_source("crm", SourceKind::Import).unwrap().id;
    let imported = IngestBatch {
        records: vec![record(&crm, "imp-1", EventType::Identify, 1_000)],
        dedup: crate::Dedup::Forever,
        ..Default::default()
    };
    assert_eq!(store.append(std::slice::from_ref(&imported), 0).unwrap()[0].stored, 1);
    assert_eq!(store.forget_message_ids(i64::MAX - 1).unwrap(), 0, "a pruner never forgets an imported row");
    let again = store.append(&[imported], 500_000_000).unwrap();
    assert_eq!((again[0].stored, again[0].duplicates), (0, 1), "long after any window it is still a duplicate");
    let later_by_sdk =
        store.append(&[batch(vec![record(&crm, "imp-1", EventType::Identify, 900_000_000)])], 800_000_000);
    assert_eq!(later_by_sdk.unwrap()[0].duplicates, 1);
}

pub fn rejected_messages_are_kept_in_quarantine(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    let rejected = |index: u32, field: Option<&str>| QuarantineRecord {
        source_id: web.clone(),
        received_at_ms: 7_000,
        batch_index: Some(index),
        code: "missing_field".into(),
        field: field.map(str::to_owned),
        message: "userId or anonymousId is required".into(),
        payload: format!(r#"{{"type":"track","i":{index}}}"#),
    };
    let outcomes = store
        .append(
            &[IngestBatch {
                records: vec![record(&web, "ok", EventType::Track, 7_000)],
                rejected: vec![rejected(1, Some("userId")), rejected(2, None)],
                ..Default::default()
            }],
            0,
        )
        .unwrap();
    assert_eq!((outcomes[0].stored, outcomes[0].quarantined), (1, 2));
    let quarantine = store.list_quarantine(0, 10).unwrap();
    assert_eq!(quarantine.len(), 2);
    assert_eq!(quarantine[0].record.batch_index, Some(1));
    assert_eq!(quarantine[0].record.field.as_deref(), Some("userId"));
    assert_eq!(quarantine[1].record.field, None);
    assert_eq!(quarantine[1].record.payload, r#"{"type":"track","i":2}"#);
    assert_eq!(quarantine[0].record.source_id, web);
    let after_first = store.list_quarantine(quarantine[0].id, 10).unwrap();
    assert_eq!(after_first, vec![quarantine[1].clone()]);
    // Newest first, a page at a time.
    assert_eq!(store.recent_quarantine(None, 10).unwrap(), vec![quarantine[1].clone(), quarantine[0].clone()]);
    assert_eq!(store.recent_quarantine(None, 1).unwrap(), vec![quarantine[1].clone()]);
    assert_eq!(store.recent_quarantine(Some(quarantine[1].id), 10).unwrap(), vec![quarantine[0].clone()]);
    assert_eq!(store.recent_quarantine(Some(quarantine[0].id), 10).unwrap(), vec![]);
}

pub fn stats_count_per_source_and_type(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    let app = store.create_source("app", SourceKind::App).unwrap().id;
    let empty = store.stats().unwrap();
    assert_eq!((empty.events, empty.log_head), (0, LogPosition(0)));
    store
        .append(
            &[IngestBatch {
                records: vec![
                    record(&web, "1", EventType::Track, 1),
                    record(&web, "2", EventType::Track, 1),
                    record(&web, "2", EventType::Track, 1),
                    record(&web, "3", EventType::Identify, 1),
                    record(&app, "1", EventType::Screen, 1),
                ],
                rejected: vec![QuarantineRecord {
                    source_id: app.clone(),
                    received_at_ms: 1,
                    batch_index: None,
                    code: "invalid_json".into(),
                    field: None,
                    message: "bad".into(),
                    payload: "{".into(),
                }],
                ..Default::default()
            }],
            0,
        )
        .unwrap();
    let stats = store.stats().unwrap();
    assert_eq!((stats.events, stats.duplicates, stats.rejected), (4, 1, 1));
    assert_eq!(stats.events_by_type.get("track"), Some(&2));
    assert_eq!(stats.log_head, store.read_log(LogPosition(0), 10).unwrap().last().unwrap().position);
    let web_stats = stats.sources.iter().find(|source| source.source_id == web).unwrap();
    assert_eq!((web_stats.name.as_str(), web_stats.events, web_stats.duplicates, web_stats.rejected), ("web", 3, 1, 0));
    assert_eq!(web_stats.events_by_type.get("identify"), Some(&1));
    let app_stats = stats.sources.iter().find(|source| source.source_id == app).unwrap();
    assert_eq!((app_stats.events, app_stats.rejected), (1, 1));
    assert_eq!(app_stats.events_by_type.get("screen"), Some(&1));
    assert_eq!((web_stats.last_received_ms, app_stats.last_received_ms), (Some(1), Some(1)));

    // The latest receipt per source, whichever of its types it was, also
    // when a later batch arrives out of order or holds only duplicates.
    let later = vec![record(&web, "4", EventType::Page, 9), record(&web, "5", EventType::Track, 7)];
    store.append(&[batch(later)], 0).unwrap();
    store.append(&[batch(vec![record(&app, "1", EventType::Screen, 5)])], 0).unwrap();
    store.append(&[batch(vec![record(&web, "6", EventType::Page, 3)])], 0).unwrap();
    let stats = store.stats().unwrap();
    let last = |id: &SourceId| stats.sources.iter().find(|source| &source.source_id == id).unwrap().last_received_ms;
    assert_eq!((last(&web), last(&app)), (Some(9), Some(5)));
    let quiet = store.create_source("quiet", SourceKind::Website).unwrap().id;
    assert_eq!(store.stats().unwrap().sources.iter().find(|s| s.source_id == quiet).unwrap().last_received_ms, None);
}

pub fn concurrent_appends_are_all_kept(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let web = web.clone();
            scope.spawn(move || {
                for round in 0..25 {
                    let records = (0..4)
                        .map(|n| record(&web, &format!("t{thread}-r{round}-{n}"), EventType::Track, 1_000))
                        .collect();
                    store.append(&[batch(records)], 0).unwrap();
                }
            });
        }
    });
    let log = store.read_log(LogPosition(0), 1_000).unwrap();
    assert_eq!(log.len(), 400);
    let mut ids: Vec<_> = log.iter().map(|entry| entry.message_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 400);
}

fn named(source: &SourceId, message_id: &str, event_type: EventType, at_ms: i64, name: &str, user: &str) -> LogRecord {
    LogRecord {
        payload: format!(r#"{{"messageId":"{message_id}","type":"{event_type}","event":"{name}","userId":"{user}"}}"#),
        ..record(source, message_id, event_type, at_ms)
    }
}

fn ids(entries: &[crate::LogEntry]) -> Vec<&str> {
    entries.iter().map(|entry| entry.message_id.as_str()).collect()
}

pub fn the_log_filters_by_source_type_time_and_direction(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    let app = store.create_source("app", SourceKind::App).unwrap().id;
    store
        .append(
            &[batch(vec![
                record(&web, "w1", EventType::Track, 1_000),
                record(&app, "a1", EventType::Track, 2_000),
                record(&web, "w2", EventType::Page, 3_000),
                record(&web, "w3", EventType::Track, 4_000),
            ])],
            0,
        )
        .unwrap();
    let all = |filter: LogFilter| store.filter_log(&filter, 10).unwrap();
    assert_eq!(ids(&all(LogFilter::default())), ["w1", "a1", "w2", "w3"]);
    assert_eq!(ids(&all(LogFilter { newest_first: true, ..LogFilter::default() })), ["w3", "w2", "a1", "w1"]);
    assert_eq!(ids(&all(LogFilter { source_id: Some(web.clone()), ..LogFilter::default() })), ["w1", "w2", "w3"]);
    assert_eq!(ids(&all(LogFilter { event_type: Some(EventType::Track), ..LogFilter::default() })), ["w1", "a1", "w3"]);
    // record() dates each event 5 ms before it was received.
    let window = LogFilter { since_ms: Some(1_995), until_ms: Some(3_995), ..LogFilter::default() };
    assert_eq!(ids(&all(window)), ["a1", "w2"]);
    let newest = store.filter_log(&LogFilter { newest_first: true, ..LogFilter::default() }, 2).unwrap();
    assert_eq!(ids(&newest), ["w3", "w2"]);
    let older = LogFilter { newest_first: true, before: Some(newest[1].position), ..LogFilter::default() };
    assert_eq!(ids(&all(older)), ["a1", "w1"]);
    let later = LogFilter { after: Some(newest[1].position), ..LogFilter::default() };
    assert_eq!(ids(&all(later)), ["w3"]);
}

pub fn browsing_events_filters_by_name_and_user_across_chunks(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    let records: Vec<LogRecord> = (0..1_200)
        .map(|n| {
            let name = if n % 100 == 7 { "Order Completed" } else { "Page Viewed" };
            let user = if (n / 100) % 2 == 0 { "ann" } else { "bob" };
            named(&web, &format!("m{n}"), EventType::Track, 1_000 + n, name, user)
        })
        .collect();
    store.append(&[batch(records)], 0).unwrap();
    let orders = EventQuery { event_name: Some("Order Completed".into()), ..EventQuery::default() };
    let page = find_events(store, &orders, 100, usize::MAX).unwrap();
    assert_eq!(page.events.len(), 12, "one order every 100 events, found across chunks");
    assert!(page.next.is_none(), "the whole log was read");
    let bob_orders = EventQuery {
        event_name: Some("Order Completed".into()),
        user: Some("bob".into()),
        filter: LogFilter { newest_first: true, ..LogFilter::default() },
    };
    let page = find_events(store, &bob_orders, 2, usize::MAX).unwrap();
    assert_eq!(ids(&page.events), ["m1107", "m907"]);
    let rest = EventQuery {
        filter: LogFilter { newest_first: true, before: page.next, ..LogFilter::default() },
        ..bob_orders.clone()
    };
    let page = find_events(store, &rest, 100, usize::MAX).unwrap();
    assert_eq!(ids(&page.events), ["m707", "m507", "m307", "m107"]);
    let budgeted = find_events(store, &orders, 100, 150).unwrap();
    assert_eq!(
        (budgeted.events.len(), budgeted.next.map(|position| position.0)),
        (2, Some(150)),
        "stops at the budget"
    );
}

/// The append-order contract: a reader that has read up to N while others
/// append never later finds an event at a position ≤ N.
pub fn a_reader_following_concurrent_appends_skips_nothing(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    let writers_done = std::sync::atomic::AtomicUsize::new(0);
    let mut seen = Vec::new();
    std::thread::scope(|scope| {
        for thread in 0..4 {
            let (web, writers_done) = (web.clone(), &writers_done);
            scope.spawn(move || {
                for round in 0..25 {
                    let records = (0..3)
                        .map(|n| record(&web, &format!("t{thread}-r{round}-{n}"), EventType::Track, 1_000))
                        .collect();
                    store.append(&[batch(records)], 0).unwrap();
                }
                writers_done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        let mut cursor = LogPosition(0);
        loop {
            let finished = writers_done.load(std::sync::atomic::Ordering::SeqCst) == 4;
            for entry in store.read_log(cursor, 7).unwrap() {
                assert!(entry.position > cursor, "positions only grow after what was read");
                cursor = entry.position;
                seen.push(entry.position);
            }
            if finished && store.read_log(cursor, 1).unwrap().is_empty() {
                break;
            }
        }
    });
    let everything: Vec<_> =
        store.read_log(LogPosition(0), 1_000).unwrap().iter().map(|entry| entry.position).collect();
    assert_eq!(everything.len(), 300);
    assert_eq!(seen, everything, "the follower read every event exactly once, in order");
}

/// Regression: JSON can carry a NUL character (`\u0000`) in a `messageId`,
/// and a refused message may hold raw NUL bytes. A backend whose text type
/// cannot hold NUL (PostgreSQL's) must still store them, or one such request
/// would fail every request grouped into the same append.
pub fn client_text_with_a_nul_character_is_kept_as_sent(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    let refused = QuarantineRecord {
        source_id: web.clone(),
        received_at_ms: 1_000,
        batch_index: Some(0),
        code: "invalid_json".into(),
        field: Some("user\0Id".into()),
        message: "bad \0 byte".into(),
        payload: "{\"type\":\0".into(),
    };
    let with_nul = IngestBatch {
        records: vec![record(&web, "m\0a", EventType::Track, 1_000), record(&web, "m\0b", EventType::Track, 1_000)],
        rejected: vec![refused.clone()],
        ..Default::default()
    };
    let outcomes = store.append(&[with_nul], 0).unwrap();
    assert_eq!((outcomes[0].stored, outcomes[0].quarantined), (2, 1));
    let log = store.read_log(LogPosition(0), 10).unwrap();
    assert_eq!(ids(&log), ["m\0a", "m\0b"]);
    assert_eq!(store.list_quarantine(0, 10).unwrap()[0].record, refused);
    let again = store.append(&[batch(vec![record(&web, "m\0a", EventType::Track, 2_000)])], 0).unwrap();
    assert_eq!(again[0].duplicates, 1, "the id still deduplicates");
}

pub fn drained_batches_record_their_stream_sequence_with_the_events(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    assert_eq!(store.drained_sequence("events").unwrap(), 0, "nothing drained yet");
    let first = batch(vec![record(&web, "a", EventType::Track, 1_000)]);
    let mut kept = batch(vec![record(&web, "imported", EventType::Track, 1_000)]);
    kept.dedup = Dedup::Forever;
    let outcome = store.append_drained("events", StreamRange { after: 0, through: 2 }, &[first, kept], 0).unwrap();
    let DrainCommit::Appended(outcomes) = outcome else { panic!("a fresh stream accepts its first commit") };
    assert_eq!(outcomes.iter().map(|outcome| outcome.stored).collect::<Vec<_>>(), vec![1, 1]);
    assert_eq!(store.drained_sequence("events").unwrap(), 2);
    assert_eq!(store.drained_sequence("other").unwrap(), 0, "each stream has its own sequence");

    // The 24-hour dedup applies to drained events as to any append, and a
    // drained id kept for good stays a duplicate past the window.
    let again = batch(vec![record(&web, "a", EventType::Track, 2_000), record(&web, "b", EventType::Track, 2_000)]);
    let mut kept_again = batch(vec![record(&web, "imported", EventType::Track, 99_000)]);
    kept_again.dedup = Dedup::Forever;
    let DrainCommit::Appended(outcomes) =
        store.append_drained("events", StreamRange { after: 2, through: 5 }, &[again, kept_again], 500).unwrap()
    else {
        panic!("the commit after the recorded sequence is accepted")
    };
    assert_eq!((outcomes[0].stored, outcomes[0].duplicates), (1, 1));
    assert_eq!((outcomes[1].stored, outcomes[1].duplicates), (0, 1));
    assert_eq!(store.drained_sequence("events").unwrap(), 5);
    let ids: Vec<_> =
        store.read_log(LogPosition(0), 10).unwrap().iter().map(|entry| entry.message_id.as_str().to_owned()).collect();
    assert_eq!(ids, vec!["a", "imported", "b"]);
}

pub fn a_stale_drain_commit_writes_nothing(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    let first = batch(vec![record(&web, "a", EventType::Track, 1_000)]);
    assert!(matches!(
        store.append_drained("events", StreamRange { after: 0, through: 3 }, &[first], 0).unwrap(),
        DrainCommit::Appended(_)
    ));
    // A second drain that read the same messages (it also believed it held
    // the lease) is refused whole: the log keeps one copy.
    let replay = batch(vec![record(&web, "a2", EventType::Track, 1_000)]);
    assert_eq!(
        store.append_drained("events", StreamRange { after: 0, through: 3 }, &[replay], 0).unwrap(),
        DrainCommit::Stale { recorded: 3 }
    );
    assert_eq!(store.drained_sequence("events").unwrap(), 3);
    assert_eq!(store.read_log(LogPosition(0), 10).unwrap().len(), 1);
    assert_eq!(store.stats().unwrap().events, 1, "a refused commit counts nothing");
}
