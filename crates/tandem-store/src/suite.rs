//! The behaviour every storage backend must show, written once as generic
//! test cases. A backend runs all of them with
//! `tandem_store::store_test_suite!(|dir: &Path| -> impl Store { ... })`,
//! where the closure returns a fresh, empty store.

use crate::browse::{find_events, find_profiles, EventQuery, ProfileQuery};
use crate::{HistoryRecord, IdentityCommit, IngestBatch, LogFilter, QuarantineRecord, Store, StoreError};
use tandem_core::{
    EventType, Identifier, IdentityChange, IdentityRules, LogPosition, LogRecord, MessageId, Profile, ProfileId,
    SourceId, SourceKind, WriteKey,
};

/// Generates one `#[test]` per case in this module for a backend.
#[macro_export]
macro_rules! store_test_suite {
    ($make:expr) => {
        $crate::store_test_suite!(@cases $make;
            sources_have_unique_names_and_write_keys,
            appended_events_read_back_in_order,
            duplicates_within_the_window_are_stored_once,
            message_ids_outside_the_window_are_stored_again,
            forgotten_message_ids_no_longer_deduplicate,
            message_ids_kept_forever_are_never_forgotten,
            rejected_messages_are_kept_in_quarantine,
            stats_count_per_source_and_type,
            concurrent_appends_are_all_kept,
            identity_commits_round_trip_and_refuse_stale_writers,
            tokens_verify_by_secret_only,
            webhook_settings_round_trip,
            the_log_filters_by_source_type_time_and_direction,
            browsing_events_filters_by_name_and_user_across_chunks,
            profiles_list_by_id_and_search_by_identifier_prefix_and_trait,
            revoked_tokens_no_longer_verify,
            sources_rename_rotate_and_delete_only_without_events
        );
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let dir = tempfile::tempdir().expect("temporary directory");
                let make = $make;
                let store = make(dir.path());
                $crate::suite::$case(&store);
            }
        )*
    };
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

pub fn sources_have_unique_names_and_write_keys(store: &impl Store) {
    let web = store.create_source("website", SourceKind::Website).unwrap();
    let app = store.create_source(" app ", SourceKind::App).unwrap();
    assert_eq!(app.name, "app", "names are trimmed");
    assert_ne!(web.id, app.id);
    assert_ne!(web.write_key, app.write_key);
    assert!(web.write_key.as_str().len() >= 32, "write keys are long enough to be secret");
    assert_eq!(store.list_sources().unwrap(), vec![web.clone(), app.clone()]);
    assert_eq!(store.source_by_write_key(&web.write_key).unwrap(), Some(web.clone()));
    assert_eq!(store.source_by_write_key(&WriteKey::new("nope")).unwrap(), None);
    assert_eq!(store.source_by_name("app").unwrap(), app);
    assert!(matches!(store.source_by_name("crm"), Err(StoreError::SourceNotFound(_))));
    assert!(matches!(store.create_source("website", SourceKind::Backend), Err(StoreError::SourceExists(_))));
    assert!(matches!(store.create_source("  ", SourceKind::Backend), Err(StoreError::InvalidSource(_))));
    assert_eq!(store.list_sources().unwrap().len(), 2);
}

pub fn appended_events_read_back_in_order(store: &impl Store) {
    let source = store.create_source("web", SourceKind::Website).unwrap().id;
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

pub fn identity_commits_round_trip_and_refuse_stale_writers(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    store
        .append(&[batch((1..=3).map(|n| record(&web, &format!("m{n}"), EventType::Identify, n)).collect())], 0)
        .unwrap();
    let empty = store.load_identity().unwrap();
    assert_eq!((empty.position, empty.next_profile_id, empty.profiles.len()), (LogPosition(0), 1, 0));
    assert_eq!(empty.rules, IdentityRules::default());
    let ann = Identifier::new("user_id", "ann");
    let anon = Identifier::new("anonymous_id", "a1");
    let mut first = Profile::new(ProfileId(1));
    first.identifiers = vec![anon.clone()];
    let mut second = Profile::new(ProfileId(2));
    second.identifiers = vec![ann.clone()];
    let commit = IdentityCommit {
        epoch: empty.epoch,
        from: LogPosition(0),
        to: LogPosition(2),
        profiles: vec![first.clone(), second.clone()],
        identifiers: vec![(anon.clone(), ProfileId(1)), (ann.clone(), ProfileId(2))],
        events: vec![(LogPosition(1), ProfileId(1)), (LogPosition(2), ProfileId(2))],
        history: vec![HistoryRecord {
            position: Some(LogPosition(1)),
            profile: Some(ProfileId(1)),
            change: IdentityChange::Created { profile: ProfileId(1), identifiers: vec![anon.clone()] },
            recorded_at_ms: 5,
        }],
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    assert!(store.commit_identity(&commit).unwrap());
    assert!(!store.commit_identity(&commit).unwrap(), "a commit from an old position is refused");
    // Event 3 merges profile 2 into profile 1.
    first.identifiers.push(ann.clone());
    let merge = IdentityCommit {
        epoch: empty.epoch,
        from: LogPosition(2),
        to: LogPosition(3),
        profiles: vec![first.clone()],
        merged: vec![(ProfileId(2), ProfileId(1))],
        events: vec![(LogPosition(3), ProfileId(1))],
        history: vec![HistoryRecord {
            position: Some(LogPosition(3)),
            profile: Some(ProfileId(1)),
            change: IdentityChange::Merged {
                profile: ProfileId(1),
                merged: vec![ProfileId(2)],
                identifiers: vec![ann.clone()],
            },
            recorded_at_ms: 6,
        }],
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    assert!(store.commit_identity(&merge).unwrap());
    assert_eq!(store.profile(ProfileId(2)).unwrap(), Some(first.clone()), "a merged id resolves to its survivor");
    assert_eq!(store.profile_by_identifier(&ann).unwrap(), Some(first.clone()));
    assert_eq!(store.profile_by_identifier(&Identifier::new("email", "x@y.z")).unwrap(), None);
    let timeline: Vec<u64> =
        store.profile_events(ProfileId(1), None, 10).unwrap().iter().map(|entry| entry.position.0).collect();
    assert_eq!(timeline, vec![3, 2, 1], "newest first, merged profile's events included");
    let page: Vec<u64> = store
        .profile_events(ProfileId(1), Some(LogPosition(3)), 1)
        .unwrap()
        .iter()
        .map(|entry| entry.position.0)
        .collect();
    assert_eq!(page, vec![2]);
    assert_eq!(store.identity_history(ProfileId(2)).unwrap().len(), 2);
    assert_eq!(store.event_owners(LogPosition(0), LogPosition(3)).unwrap().len(), 3);
    let snapshot = store.load_identity().unwrap();
    assert_eq!(
        (snapshot.position, snapshot.profiles.len(), snapshot.merged_into.clone()),
        (LogPosition(3), 1, vec![(ProfileId(2), ProfileId(1))])
    );
    let stats = store.stats().unwrap();
    assert_eq!((stats.resolver_position, stats.resolver_lag, stats.profiles), (LogPosition(3), 0, 1));

    // Changing the rules starts a new epoch: commits computed before are refused.
    let rules = IdentityRules { default_limit: 3, ..IdentityRules::default() };
    store.set_identity_rules(&rules).unwrap();
    let stale =
        IdentityCommit { epoch: snapshot.epoch, from: LogPosition(3), to: LogPosition(3), ..IdentityCommit::default() };
    assert!(!store.commit_identity(&stale).unwrap());
    let reloaded = store.load_identity().unwrap();
    assert_eq!(reloaded.rules, rules);
    assert!(reloaded.epoch > snapshot.epoch);
    // A replacing commit clears everything first.
    let replace = IdentityCommit {
        epoch: reloaded.epoch,
        to: LogPosition(3),
        replace: true,
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    assert!(store.commit_identity(&replace).unwrap());
    assert_eq!(store.profile(ProfileId(1)).unwrap(), None);
    assert_eq!(store.stats().unwrap().profiles, 0);
}

pub fn tokens_verify_by_secret_only(store: &impl Store) {
    let (info, secret) = store.create_token("ops").unwrap();
    assert_eq!(info.name, "ops");
    assert!(secret.len() >= 40);
    assert_eq!(store.verify_token(&secret).unwrap(), Some(info.clone()));
    assert_eq!(store.verify_token("tdm_wrong").unwrap(), None);
    assert_eq!(store.verify_token(&info.id).unwrap(), None, "a token's id is not its secret");
}

pub fn webhook_settings_round_trip(store: &impl Store) {
    use tandem_core::webhook::{WebhookFormat, WebhookSettings};
    let leads = store.create_source("fb-leads", SourceKind::Webhook).unwrap();
    let plain = store.create_source("web", SourceKind::Website).unwrap();
    assert_eq!(store.webhook(&leads.id).unwrap(), None, "no settings yet");
    let settings = WebhookSettings {
        format: WebhookFormat::FacebookLeads,
        secret: Some("app-secret-123".into()),
        verify_token: Some("verify-me".into()),
        mapping: None,
    };
    assert_eq!(store.set_webhook("fb-leads", &settings).unwrap().id, leads.id);
    assert_eq!(store.webhook(&leads.id).unwrap(), Some((leads.clone(), settings)));
    assert_eq!(store.webhook(&plain.id).unwrap(), None);
    assert_eq!(store.webhook(&SourceId::new("src_nope")).unwrap(), None);
    assert!(matches!(
        store.set_webhook(
            "nope",
            &WebhookSettings { format: WebhookFormat::SocialMentions, secret: None, verify_token: None, mapping: None }
        ),
        Err(StoreError::SourceNotFound(_))
    ));
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

pub fn profiles_list_by_id_and_search_by_identifier_prefix_and_trait(store: &impl Store) {
    let empty = store.load_identity().unwrap();
    let mut profiles = Vec::new();
    let mut identifiers = Vec::new();
    for n in 1..=7u64 {
        let mut profile = Profile::new(ProfileId(n));
        let email = Identifier::new("email", format!("{}{n}@example.com", if n % 2 == 0 { "ann" } else { "bob" }));
        profile.identifiers = vec![email.clone()];
        profile.traits.insert("plan".into(), serde_json::json!(if n <= 3 { "Pro" } else { "free" }));
        profile.traits.insert("seats".into(), serde_json::json!(n));
        identifiers.push((email, ProfileId(n)));
        profiles.push(profile);
    }
    let commit =
        IdentityCommit { epoch: empty.epoch, profiles, identifiers, next_profile_id: 8, ..IdentityCommit::default() };
    assert!(store.commit_identity(&commit).unwrap());
    // Profile 7 is then merged into profile 6: it is no longer listed.
    let merge = IdentityCommit {
        epoch: empty.epoch,
        merged: vec![(ProfileId(7), ProfileId(6))],
        next_profile_id: 8,
        ..IdentityCommit::default()
    };
    assert!(store.commit_identity(&merge).unwrap());
    let listed: Vec<u64> = store.list_profiles(None, 10).unwrap().iter().map(|profile| profile.id.0).collect();
    assert_eq!(listed, [1, 2, 3, 4, 5, 6]);
    let after: Vec<u64> =
        store.list_profiles(Some(ProfileId(4)), 10).unwrap().iter().map(|profile| profile.id.0).collect();
    assert_eq!(after, [5, 6]);

    let page_ids =
        |page: &crate::browse::ProfilePage| page.profiles.iter().map(|profile| profile.id.0).collect::<Vec<_>>();
    let first = find_profiles(store, &ProfileQuery::default(), 4, usize::MAX).unwrap();
    assert_eq!((page_ids(&first), first.next_after.as_deref()), (vec![1, 2, 3, 4], Some("prof_4")));
    let second =
        find_profiles(store, &ProfileQuery { after: first.next_after, ..ProfileQuery::default() }, 4, usize::MAX);
    let second = second.unwrap();
    assert_eq!((page_ids(&second), second.next_after), (vec![5, 6], None));
    let pro = ProfileQuery { traits: vec![("plan".into(), "pro".into())], ..ProfileQuery::default() };
    assert_eq!(page_ids(&find_profiles(store, &pro, 10, usize::MAX).unwrap()), [1, 2, 3], "strings match in any case");
    let three_seats = ProfileQuery { traits: vec![("seats".into(), "3".into())], ..ProfileQuery::default() };
    assert_eq!(page_ids(&find_profiles(store, &three_seats, 10, usize::MAX).unwrap()), [3]);
    let anns = ProfileQuery { identifier_prefix: Some(Identifier::new("email", "ann")), ..ProfileQuery::default() };
    assert_eq!(page_ids(&find_profiles(store, &anns, 10, usize::MAX).unwrap()), [2, 4, 6]);
    let first_ann = find_profiles(store, &anns, 1, usize::MAX).unwrap();
    let next = ProfileQuery { after: first_ann.next_after, ..anns.clone() };
    assert_eq!(page_ids(&find_profiles(store, &next, 10, usize::MAX).unwrap()), [4, 6]);
    let free_anns = ProfileQuery { traits: vec![("plan".into(), "free".into())], ..anns };
    assert_eq!(page_ids(&find_profiles(store, &free_anns, 10, usize::MAX).unwrap()), [4, 6]);
    let bad = ProfileQuery { after: Some("nonsense".into()), ..ProfileQuery::default() };
    assert!(find_profiles(store, &bad, 10, usize::MAX).is_err());
}

pub fn revoked_tokens_no_longer_verify(store: &impl Store) {
    let (ops, ops_secret) = store.create_token("ops").unwrap();
    let (demo, demo_secret) = store.create_token("demo").unwrap();
    let listed = store.list_tokens().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&ops) && listed.contains(&demo));
    assert_eq!(store.revoke_token(&demo.id).unwrap(), demo);
    assert_eq!(store.verify_token(&demo_secret).unwrap(), None);
    assert_eq!(store.verify_token(&ops_secret).unwrap(), Some(ops.clone()));
    assert_eq!(store.list_tokens().unwrap(), vec![ops]);
    assert!(matches!(store.revoke_token(&demo.id), Err(StoreError::TokenNotFound(_))));
}

pub fn sources_rename_rotate_and_delete_only_without_events(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap();
    let spare = store.create_source("spare", SourceKind::Backend).unwrap();
    store.append(&[batch(vec![record(&web.id, "m1", EventType::Track, 1_000)])], 0).unwrap();
    let renamed = store.rename_source("web", "website").unwrap();
    assert_eq!(
        (renamed.id.clone(), renamed.name.as_str(), &renamed.write_key),
        (web.id.clone(), "website", &web.write_key)
    );
    assert!(matches!(store.source_by_name("web"), Err(StoreError::SourceNotFound(_))));
    assert!(matches!(store.rename_source("website", "spare"), Err(StoreError::SourceExists(_))));
    assert!(matches!(store.rename_source("website", "  "), Err(StoreError::InvalidSource(_))));

    let rotated = store.rotate_write_key("website").unwrap();
    assert_ne!(rotated.write_key, web.write_key);
    assert_eq!(store.source_by_write_key(&web.write_key).unwrap(), None, "the old key stops working");
    assert_eq!(store.source_by_write_key(&rotated.write_key).unwrap().map(|source| source.id), Some(web.id.clone()));

    assert!(matches!(store.delete_source("website"), Err(StoreError::SourceInUse { events: 1, .. })));
    assert_eq!(store.delete_source("spare").unwrap().id, spare.id);
    assert_eq!(store.list_sources().unwrap().len(), 1);
    assert!(matches!(store.delete_source("spare"), Err(StoreError::SourceNotFound(_))));
}
