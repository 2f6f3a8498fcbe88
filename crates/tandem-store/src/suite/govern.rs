//! What every backend's [`GovernStore`](crate::GovernStore) must do.

use super::{batch, record};
use crate::{PlanViolationRecord, Store};
use tandem_core::govern::plan::{PlanMode, TrackingPlan};
use tandem_core::{EventType, SourceId, SourceKind};

pub fn plans_are_kept_per_source_and_replaced(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap();
    let app = store.create_source("app", SourceKind::App).unwrap();
    assert_eq!(store.plan(&web.id).unwrap(), None);
    let plan = TrackingPlan::from_json(
        r#"{"mode":"block_invalid","events":{"Order Completed":{"type":"object","required":["total"]}},
            "identify":{"type":"object"},"common":{"required":["userId"]}}"#,
    )
    .unwrap();
    let stored = store.set_plan(&web.id, &plan).unwrap();
    assert_eq!(store.plan(&web.id).unwrap(), Some(stored.clone()));
    assert_eq!(store.plan(&app.id).unwrap(), None);
    let replaced = TrackingPlan { mode: PlanMode::Report, ..plan.clone() };
    store.set_plan(&web.id, &replaced).unwrap();
    store.set_plan(&app.id, &TrackingPlan::default()).unwrap();
    let all = store.plans().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all.iter().find(|stored| stored.source_id == web.id).unwrap().plan, replaced);
    assert!(store.delete_plan(&app.id).unwrap());
    assert!(!store.delete_plan(&app.id).unwrap());
    assert_eq!(store.plans().unwrap().len(), 1);
}

pub fn violations_are_counted_with_the_append_per_event_and_path(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap();
    let other = SourceId::new("src_other");
    let violation = |source: &SourceId, path: &str, sample: &str, at: i64| {
        PlanViolationRecord::new(
            source.clone(),
            "invalid_event",
            "Order Completed",
            path,
            &format!("bad {path}"),
            sample,
            at,
        )
    };
    let mut first = batch(vec![record(&web.id, "m1", EventType::Track, 1_000)]);
    first.violations = vec![violation(&web.id, "/properties/total", "{\"a\":1}", 1_000)];
    let mut second = batch(Vec::new());
    second.violations = vec![
        violation(&web.id, "/properties/total", "{\"a\":2}", 2_000),
        violation(&web.id, "/properties/currency", "nul \0 kept", 1_500),
        violation(&other, "/properties/total", "{}", 3_000),
    ];
    store.append(&[first, second], 0).unwrap();
    let listed = store.plan_violations(&web.id, 10).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0].path, "/properties/total", "most recently seen first");
    assert_eq!((listed[0].count, listed[0].first_seen_ms, listed[0].last_seen_ms), (2, 1_000, 2_000));
    assert_eq!(listed[0].sample, "{\"a\":2}", "the latest sample is kept");
    assert_eq!(listed[1].sample, "nul \u{fffd} kept");
    assert_eq!(store.plan_violations(&web.id, 1).unwrap().len(), 1);
    assert_eq!(store.plan_violations(&other, 10).unwrap().len(), 1);
    let long = "é".repeat(5_000);
    let cut = violation(&web.id, "/x", &long, 4_000);
    assert!(cut.sample.len() <= crate::govern::MAX_VIOLATION_SAMPLE_BYTES && cut.sample.starts_with('é'));
}

pub fn requests_and_suppressions_are_kept_by_digest(store: &impl Store) {
    use tandem_core::govern::dsr::{DsrKind, DsrStatus};
    let first = crate::govern::new_dsr(DsrKind::Access, "aaaa");
    let mut second = crate::govern::new_dsr(DsrKind::Delete, "bbbb");
    second.created_at_ms = first.created_at_ms + 1;
    store.insert_dsr(&first).unwrap();
    store.insert_dsr(&second).unwrap();
    store.finish_dsr(&second.id, DsrStatus::Done, "{\"events\":3}", second.created_at_ms + 5).unwrap();
    let listed = store.list_dsr(10).unwrap();
    assert_eq!(listed.iter().map(|request| request.id.as_str()).collect::<Vec<_>>(), vec![&second.id, &first.id]);
    assert_eq!(listed[0].status, DsrStatus::Done);
    assert_eq!(listed[0].finished_at_ms, Some(second.created_at_ms + 5));
    assert_eq!(listed[0].detail.as_deref(), Some("{\"events\":3}"));
    assert_eq!((listed[1].status, listed[1].kind), (DsrStatus::Pending, DsrKind::Access));
    assert_eq!(store.list_dsr(1).unwrap().len(), 1);

    assert!(store.suppress("d1", 1).unwrap());
    assert!(!store.suppress("d1", 2).unwrap(), "suppressing twice changes nothing");
    assert!(store.suppress("d2", 3).unwrap());
    assert_eq!(store.suppressed().unwrap(), vec!["d1", "d2"]);
    assert!(store.unsuppress("d1").unwrap());
    assert!(!store.unsuppress("d1").unwrap());
    assert_eq!(store.suppressed().unwrap(), vec!["d2"]);
}

pub fn erasing_a_person_removes_their_rows_everywhere_and_keeps_others(store: &impl Store) {
    use crate::{EventLink, HistoryRecord, IdentityCommit, QuarantineRecord};
    use tandem_core::{Identifier, IdentityChange, LogPosition, LogRecord, MessageId, Profile, ProfileId};
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    let event = |n: u64, user: &str| LogRecord {
        source_id: web.clone(),
        message_id: MessageId::new(format!("m{n}")),
        event_type: EventType::Track,
        received_at_ms: n as i64,
        timestamp_ms: n as i64,
        payload: format!(r#"{{"messageId":"m{n}","type":"track","userId":"{user}"}}"#),
    };
    let mut first = batch(vec![event(1, "ann-secret"), event(2, "ann-secret"), event(3, "bob")]);
    first.rejected = vec![
        QuarantineRecord {
            source_id: web.clone(),
            received_at_ms: 1,
            batch_index: None,
            code: "invalid_type".into(),
            field: None,
            message: "bad".into(),
            payload: r#"{"userId":"ANN-SECRET","event":5}"#.into(),
        },
        QuarantineRecord {
            source_id: web.clone(),
            received_at_ms: 1,
            batch_index: None,
            code: "invalid_type".into(),
            field: None,
            message: "bad".into(),
            payload: r#"{"userId":"bob","event":5}"#.into(),
        },
    ];
    store.append(&[first], 0).unwrap();
    let ann = Identifier::new("user_id", "ann-secret");
    let bob = Identifier::new("user_id", "bob");
    let state = store.identity_state().unwrap();
    let mut ann_profile = Profile::new(ProfileId(1));
    ann_profile.identifiers = vec![ann.clone()];
    ann_profile.traits.insert("email".into(), serde_json::json!("ann@example.com"));
    let mut bob_profile = Profile::new(ProfileId(2));
    bob_profile.identifiers = vec![bob.clone()];
    let link = |position: u64, profile: u64| EventLink {
        position: LogPosition(position),
        timestamp_ms: position as i64,
        profile: ProfileId(profile),
    };
    let commit = IdentityCommit {
        epoch: state.epoch,
        from: LogPosition(0),
        to: LogPosition(3),
        profiles: vec![ann_profile, bob_profile].into(),
        identifiers: vec![(ann.clone(), ProfileId(1)), (bob.clone(), ProfileId(2))],
        events: vec![link(1, 1), link(2, 1), link(3, 2)],
        history: vec![HistoryRecord {
            position: Some(LogPosition(1)),
            profile: Some(ProfileId(1)),
            change: IdentityChange::Created { profile: ProfileId(1), identifiers: vec![ann.clone()] },
            recorded_at_ms: 5,
        }],
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    store.commit_identity(&commit).unwrap();
    assert_eq!(store.identity_state().unwrap().live_profiles, 2);

    let report = store.erase_person(&ann).unwrap();
    assert_eq!(report.get("events"), Some(&2), "{report:?}");
    assert_eq!(report.get("profiles"), Some(&1), "{report:?}");
    assert_eq!(report.get("quarantine"), Some(&1), "matched without regard to case: {report:?}");
    assert_eq!(report.get("message_ids"), Some(&2), "{report:?}");
    assert_eq!(store.profile_by_identifier(&ann).unwrap(), None);
    assert!(store.profile_by_identifier(&bob).unwrap().is_some(), "others are kept");
    let left: Vec<u64> = store.read_log(LogPosition(0), 10).unwrap().iter().map(|entry| entry.position.0).collect();
    assert_eq!(left, vec![3]);
    assert!(store.identity_history(ProfileId(1)).unwrap().is_empty());
    let quarantine = store.list_quarantine(0, 10).unwrap();
    assert_eq!(quarantine.len(), 1);
    assert!(quarantine[0].record.payload.contains("bob"));
    let after = store.identity_state().unwrap();
    assert_eq!(after.live_profiles, 1);
    assert_eq!(after.epoch, state.epoch + 1, "a running resolver must start again from storage");
    // The dedup claims went with the events: the same message is stored anew.
    let outcome = store.append(&[batch(vec![event(1, "ann-secret")])], 0).unwrap();
    assert_eq!(outcome[0].stored, 1);
    assert!(store.erase_person(&Identifier::new("user_id", "nobody")).unwrap().is_empty());
}

pub fn consent_keeps_the_latest_value_per_category_with_history_and_withheld_counts(store: &impl Store) {
    use crate::ConsentChange;
    use std::collections::BTreeMap;
    use tandem_core::{LogPosition, ProfileId};
    let change = |profile: u64, category: &str, granted: bool, position: u64| ConsentChange {
        profile: ProfileId(profile),
        category: category.to_owned(),
        granted,
        position: LogPosition(position),
        at_ms: position as i64 * 10,
    };
    store.record_consent(&[change(1, "marketing", false, 2), change(1, "ads", true, 2)]).unwrap();
    store.record_consent(&[change(1, "marketing", true, 5), change(2, "ads", false, 3)]).unwrap();
    // A replay of an older event neither changes the value nor the history.
    store.record_consent(&[change(1, "marketing", false, 2)]).unwrap();
    let consent = store.consent_of(&[ProfileId(1), ProfileId(2), ProfileId(3)]).unwrap();
    assert_eq!(consent.len(), 2, "profile 3 said nothing");
    assert_eq!(consent[&ProfileId(1)], BTreeMap::from([("ads".to_owned(), true), ("marketing".to_owned(), true)]));
    assert_eq!(consent[&ProfileId(2)], BTreeMap::from([("ads".to_owned(), false)]));
    let history = store.consent_history(ProfileId(1)).unwrap();
    assert_eq!(
        history,
        vec![change(1, "ads", true, 2), change(1, "marketing", false, 2), change(1, "marketing", true, 5)]
    );

    store.count_withheld("crm", &BTreeMap::from([("ads".to_owned(), 2), ("marketing".to_owned(), 1)])).unwrap();
    store.count_withheld("crm", &BTreeMap::from([("ads".to_owned(), 3)])).unwrap();
    assert_eq!(
        store.withheld_counts("crm").unwrap(),
        BTreeMap::from([("ads".to_owned(), 5), ("marketing".to_owned(), 1)])
    );
    assert!(store.withheld_counts("other").unwrap().is_empty());

    // The outbox stage records both with its commit, and a stale commit
    // records neither.
    use crate::{OutboxCommit, OutboxCommitOutcome};
    let commit = OutboxCommit {
        from: LogPosition(0),
        to: LogPosition(9),
        consent: vec![change(3, "ads", true, 9)],
        withheld: BTreeMap::from([("crm".to_owned(), BTreeMap::from([("ads".to_owned(), 1)]))]),
        ..Default::default()
    };
    assert_eq!(store.commit_outbox(&commit).unwrap(), OutboxCommitOutcome::Committed);
    assert_eq!(store.commit_outbox(&commit).unwrap(), OutboxCommitOutcome::StalePosition);
    assert!(store.consent_of(&[ProfileId(3)]).unwrap()[&ProfileId(3)]["ads"]);
    assert_eq!(store.withheld_counts("crm").unwrap()["ads"], 6);
}

pub fn the_stack_registry_keeps_entries_and_merges_unknown_key_sightings(store: &impl Store) {
    use tandem_core::govern::stack::{Department, ShadowKey, ToolInfo, ToolKind};
    let info = ToolInfo {
        owner: Some("ann".into()),
        department: Some(Department::Marketing),
        purpose: Some("ads".into()),
        annual_cost: Some(1200.5),
    };
    store.set_tool_info(ToolKind::Source, "src_1", &info).unwrap();
    store.set_tool_info(ToolKind::Destination, "ads", &ToolInfo::default()).unwrap();
    let replaced = ToolInfo { owner: Some("bob".into()), ..info.clone() };
    store.set_tool_info(ToolKind::Source, "src_1", &replaced).unwrap();
    let entries = store.tool_infos().unwrap();
    assert_eq!(entries.len(), 2);
    assert!(entries.contains(&(ToolKind::Source, "src_1".to_owned(), replaced)));
    assert!(entries.contains(&(ToolKind::Destination, "ads".to_owned(), ToolInfo::default())));

    let sighting = |digest: &str, at: i64, ip: &str| ShadowKey {
        key_digest: digest.to_owned(),
        key_hint: "abcd".to_owned(),
        requests: 2,
        first_seen_ms: at,
        last_seen_ms: at,
        ips: vec![ip.to_owned()],
        user_agents: vec!["curl/8".to_owned()],
    };
    store.record_shadow_traffic(&[sighting("k1", 100, "10.0.0.1"), sighting("k2", 150, "10.0.0.9")]).unwrap();
    store.record_shadow_traffic(&[sighting("k1", 200, "10.0.0.2"), sighting("k1", 50, "10.0.0.1")]).unwrap();
    let seen = store.shadow_traffic(10).unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].key_digest, "k1", "most recently seen first");
    assert_eq!((seen[0].requests, seen[0].first_seen_ms, seen[0].last_seen_ms), (6, 50, 200));
    assert_eq!(seen[0].ips, vec!["10.0.0.1", "10.0.0.2"]);
    assert_eq!(seen[0].user_agents, vec!["curl/8"]);
    assert_eq!(store.shadow_traffic(1).unwrap().len(), 1);
}
