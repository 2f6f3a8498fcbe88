//! What every backend's [`AudienceStore`](crate::AudienceStore) must do.

use crate::{
    AudienceCommit, AudienceCommitOutcome, AudienceDefinition, AudienceStateWrite, Backfill, IdentityCommit,
    Membership, MembershipChange, MembershipChangeKind, Stage, StageCursor, Store, StoreError,
};
use tandem_core::audience::{AudienceState, Condition};
use tandem_core::{LogPosition, Profile, ProfileId};

fn definition(name: &str, rule: &str) -> AudienceDefinition {
    AudienceDefinition { name: name.to_owned(), rule: Condition::parse(rule).unwrap(), created_at_ms: 1_000 }
}

fn state_with_one_order() -> AudienceState {
    let compiled = Condition::parse(r#"performed "Order Completed" within 7d"#).unwrap().compile().unwrap();
    let mut state = compiled.new_state();
    let event: tandem_core::Event = serde_json::from_value(serde_json::json!({
        "messageId": "m1", "type": "track", "event": "Order Completed", "userId": "ann",
        "timestamp": "2026-01-01T00:00:00.000Z", "receivedAt": "2026-01-01T00:00:00.000Z",
        "sourceId": "src_1"
    }))
    .unwrap();
    compiled.observe(&mut state, &event);
    state
}

fn change(audience: &str, profile: u64, kind: MembershipChangeKind, at_ms: i64) -> MembershipChange {
    MembershipChange { audience: audience.to_owned(), profile: ProfileId(profile), kind, at_ms }
}

fn write(audience: &str, profile: u64, state: Option<AudienceState>, next: Option<i64>) -> AudienceStateWrite {
    AudienceStateWrite { audience: audience.to_owned(), profile: ProfileId(profile), state, next_change_at_ms: next }
}

pub fn audiences_have_unique_names_and_delete_with_their_members(store: &impl Store) {
    let buyers = definition("buyers", r#"performed "Order Completed" within 7d"#);
    store.create_audience(&buyers).unwrap();
    store.create_audience(&definition("pro", r#"trait plan = "pro""#)).unwrap();
    assert!(matches!(
        store.create_audience(&definition("buyers", r#"trait plan = "free""#)),
        Err(StoreError::AudienceExists(name)) if name == "buyers"
    ));
    let listed: Vec<_> = store.list_audiences().unwrap().into_iter().map(|record| record.definition.name).collect();
    assert_eq!(listed, vec!["buyers", "pro"]);
    let record = store.audience("buyers").unwrap().expect("stored");
    assert_eq!(record.definition, buyers, "the rule round-trips");
    assert_eq!((record.size, record.backfill), (0, Backfill::Pending { after: None }));
    assert_eq!(store.audience("nobody").unwrap(), None);

    let commit = AudienceCommit {
        changes: vec![
            change("buyers", 1, MembershipChangeKind::Entered, 50),
            change("pro", 1, MembershipChangeKind::Entered, 60),
        ],
        states: vec![write("buyers", 1, Some(state_with_one_order()), Some(900))],
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&commit).unwrap(), AudienceCommitOutcome::Committed);
    store.delete_audience("buyers").unwrap();
    assert!(matches!(store.delete_audience("buyers"), Err(StoreError::AudienceNotFound(_))));
    assert_eq!(store.audience("buyers").unwrap(), None);
    assert!(store.audience_members("buyers", None, 10).unwrap().is_empty());
    assert!(store.membership_history("buyers", ProfileId(1)).unwrap().is_empty());
    assert!(store.audience_states(&[ProfileId(1)]).unwrap().is_empty(), "its states go too");
    assert!(store.due_audience_states(i64::MAX, 10).unwrap().is_empty(), "and its timers");
    assert_eq!(
        store.profile_audiences(ProfileId(1)).unwrap(),
        vec![Membership { audience: "pro".into(), profile: ProfileId(1), entered_at_ms: 60 }],
        "other audiences keep their members"
    );
    // A stage that evaluated the audience before it was deleted writes
    // nothing for it.
    assert_eq!(store.commit_audience(&commit).unwrap(), AudienceCommitOutcome::Committed);
    assert!(store.audience_states(&[ProfileId(1)]).unwrap().is_empty());
    assert_eq!(store.profile_audiences(ProfileId(1)).unwrap().len(), 1, "only pro's membership");
    assert_eq!(
        store.membership_history("pro", ProfileId(1)).unwrap().len(),
        1,
        "entering an audience one is in records nothing"
    );
    assert_eq!(store.audience("pro").unwrap().unwrap().size, 1, "nor counts twice");
    // The name is free again, for a new audience that starts empty.
    store.create_audience(&buyers).unwrap();
    assert_eq!(store.audience("buyers").unwrap().unwrap().size, 0);
    assert!(store.membership_history("buyers", ProfileId(1)).unwrap().is_empty());
}

pub fn commits_record_memberships_history_and_states_and_refuse_stale_writers(store: &impl Store) {
    store.create_audience(&definition("buyers", r#"performed "Order Completed" within 7d"#)).unwrap();
    assert_eq!(store.stage_cursor(Stage::AUDIENCE).unwrap(), None, "a stage that never committed has no cursor");
    let state = state_with_one_order();
    let first = AudienceCommit {
        from: LogPosition(0),
        to: LogPosition(4),
        states: vec![write("buyers", 1, Some(state.clone()), Some(700)), write("buyers", 2, Some(state.clone()), None)],
        changes: vec![
            change("buyers", 1, MembershipChangeKind::Entered, 100),
            change("buyers", 2, MembershipChangeKind::Entered, 110),
            change("buyers", 3, MembershipChangeKind::Entered, 120),
        ],
        backfill: vec![("buyers".into(), Backfill::Pending { after: Some(ProfileId(2)) })],
        epoch: 0,
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&first).unwrap(), AudienceCommitOutcome::Committed);
    assert_eq!(
        store.commit_audience(&first).unwrap(),
        AudienceCommitOutcome::StalePosition,
        "a commit from an old position is refused"
    );
    assert_eq!(store.stage_cursor(Stage::AUDIENCE).unwrap(), Some(StageCursor { position: LogPosition(4), epoch: 0 }));
    let record = store.audience("buyers").unwrap().unwrap();
    assert_eq!((record.size, record.backfill), (3, Backfill::Pending { after: Some(ProfileId(2)) }));

    let second = AudienceCommit {
        from: LogPosition(4),
        to: LogPosition(6),
        states: vec![write("buyers", 2, None, None)],
        changes: vec![change("buyers", 2, MembershipChangeKind::Exited, 200)],
        backfill: vec![("buyers".into(), Backfill::Done)],
        epoch: 3,
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&second).unwrap(), AudienceCommitOutcome::Committed);
    assert_eq!(
        store.stage_cursor(Stage::AUDIENCE).unwrap(),
        Some(StageCursor { position: LogPosition(6), epoch: 3 }),
        "the epoch is kept with the position"
    );
    let record = store.audience("buyers").unwrap().unwrap();
    assert_eq!((record.size, record.backfill), (2, Backfill::Done));
    let members: Vec<(u64, i64)> = store
        .audience_members("buyers", None, 10)
        .unwrap()
        .iter()
        .map(|member| (member.profile.0, member.entered_at_ms))
        .collect();
    assert_eq!(members, vec![(1, 100), (3, 120)]);
    store.create_audience(&definition("pro", r#"trait plan = "pro""#)).unwrap();
    let pro = AudienceCommit {
        from: LogPosition(6),
        to: LogPosition(6),
        changes: vec![change("pro", 3, MembershipChangeKind::Entered, 130)],
        epoch: 3,
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&pro).unwrap(), AudienceCommitOutcome::Committed);
    let mut batched: Vec<(u64, String, i64)> = store
        .memberships_of(&[ProfileId(3), ProfileId(2), ProfileId(1), ProfileId(99)])
        .unwrap()
        .into_iter()
        .map(|membership| (membership.profile.0, membership.audience, membership.entered_at_ms))
        .collect();
    batched.sort();
    assert_eq!(
        batched,
        vec![(1, "buyers".into(), 100), (3, "buyers".into(), 120), (3, "pro".into(), 130)],
        "the memberships of many profiles in one read; one who left and one unknown have none"
    );
    assert!(store.memberships_of(&[]).unwrap().is_empty());
    let page: Vec<u64> =
        store.audience_members("buyers", Some(ProfileId(1)), 1).unwrap().iter().map(|m| m.profile.0).collect();
    assert_eq!(page, vec![3], "members page by profile id");
    assert_eq!(
        store.membership_history("buyers", ProfileId(2)).unwrap(),
        vec![
            change("buyers", 2, MembershipChangeKind::Entered, 110),
            change("buyers", 2, MembershipChangeKind::Exited, 200)
        ]
    );
    assert!(store.profile_audiences(ProfileId(2)).unwrap().is_empty());
    let states = store.audience_states(&[ProfileId(1), ProfileId(2)]).unwrap();
    assert_eq!(states.len(), 1, "profile 2's state was removed");
    assert_eq!((states[0].profile, states[0].next_change_at_ms), (ProfileId(1), Some(700)));
    assert_eq!(states[0].state, state, "the state round-trips");
    let third = AudienceCommit {
        from: LogPosition(6),
        to: LogPosition(7),
        changes: vec![change("buyers", 4, MembershipChangeKind::Entered, 2 * 86_400_000 + 5)],
        epoch: 3,
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&third).unwrap(), AudienceCommitOutcome::Committed);
    let days = store.audience_changes_by_day("buyers").unwrap();
    assert_eq!(
        days,
        vec![
            crate::DailyChanges { day_start_ms: 0, entered: 3, exited: 1 },
            crate::DailyChanges { day_start_ms: 2 * 86_400_000, entered: 1, exited: 0 }
        ]
    );
    let sizes: Vec<u64> = crate::size_over_time(&days).iter().map(|day| day.size).collect();
    assert_eq!(sizes, vec![2, 3], "the size at the end of each day");
}

pub fn due_timers_come_back_soonest_first_until_cleared(store: &impl Store) {
    store.create_audience(&definition("buyers", r#"performed "Order Completed" within 7d"#)).unwrap();
    let state = state_with_one_order();
    let commit = AudienceCommit {
        states: vec![
            write("buyers", 1, Some(state.clone()), Some(900)),
            write("buyers", 2, Some(state.clone()), Some(500)),
            write("buyers", 3, Some(state.clone()), None),
            write("buyers", 4, Some(state.clone()), Some(2_000)),
        ],
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&commit).unwrap(), AudienceCommitOutcome::Committed);
    let due: Vec<(u64, Option<i64>)> = store
        .due_audience_states(1_000, 10)
        .unwrap()
        .iter()
        .map(|state| (state.profile.0, state.next_change_at_ms))
        .collect();
    assert_eq!(due, vec![(2, Some(500)), (1, Some(900))]);
    assert_eq!(store.due_audience_states(1_000, 1).unwrap().len(), 1, "at most limit");
    let clear = AudienceCommit {
        states: vec![write("buyers", 2, Some(state.clone()), None), write("buyers", 1, Some(state), Some(5_000))],
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&clear).unwrap(), AudienceCommitOutcome::Committed);
    assert!(store.due_audience_states(1_000, 10).unwrap().is_empty());
    let later: Vec<u64> = store.due_audience_states(5_000, 10).unwrap().iter().map(|s| s.profile.0).collect();
    assert_eq!(later, vec![4, 1]);
}

pub fn retired_profiles_are_found_after_a_merge(store: &impl Store) {
    let identity = store.identity_state().unwrap();
    let commit = IdentityCommit {
        epoch: identity.epoch,
        profiles: vec![Profile::new(ProfileId(1)), Profile::new(ProfileId(2))].into(),
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&commit).unwrap(), crate::CommitOutcome::Committed);
    store.create_audience(&definition("buyers", r#"performed "Order Completed" within 7d"#)).unwrap();
    let audience = AudienceCommit {
        states: vec![
            write("buyers", 1, Some(state_with_one_order()), None),
            write("buyers", 2, Some(state_with_one_order()), None),
        ],
        changes: vec![change("buyers", 2, MembershipChangeKind::Entered, 10)],
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&audience).unwrap(), AudienceCommitOutcome::Committed);
    assert!(store.retired_audience_profiles(10).unwrap().is_empty(), "both profiles are live");
    let merge = IdentityCommit {
        epoch: identity.epoch,
        profiles: vec![Profile::new(ProfileId(1))].into(),
        merged: vec![(ProfileId(2), ProfileId(1))],
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&merge).unwrap(), crate::CommitOutcome::Committed);
    assert_eq!(store.retired_audience_profiles(10).unwrap(), vec![ProfileId(2)]);
    let cleared = AudienceCommit {
        states: vec![write("buyers", 2, None, None)],
        changes: vec![change("buyers", 2, MembershipChangeKind::Exited, 20)],
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&cleared).unwrap(), AudienceCommitOutcome::Committed);
    assert!(store.retired_audience_profiles(10).unwrap().is_empty());
}

fn computed_write(
    name: &str,
    profile: u64,
    state: Option<tandem_core::audience::ComputedTraitState>,
    value: Option<serde_json::Value>,
    next: Option<i64>,
) -> crate::ComputedTraitWrite {
    crate::ComputedTraitWrite {
        name: name.to_owned(),
        profile: ProfileId(profile),
        state,
        value,
        next_change_at_ms: next,
    }
}

pub fn computed_traits_have_unique_names_and_delete_with_their_values(store: &impl Store) {
    use tandem_core::audience::ComputedTraitDefinition;
    let orders = ComputedTraitDefinition::parse(r#"count of "Order Completed" within 30d"#).unwrap();
    let spent = ComputedTraitDefinition::parse(r#"sum(total) of "Order Completed""#).unwrap();
    store.create_computed_trait("orders", &orders, 1_000).unwrap();
    store.create_computed_trait("spent", &spent, 2_000).unwrap();
    assert!(matches!(
        store.create_computed_trait("orders", &spent, 3_000),
        Err(StoreError::ComputedTraitExists(name)) if name == "orders"
    ));
    let listed: Vec<_> = store.list_computed_traits().unwrap().into_iter().map(|record| record.name).collect();
    assert_eq!(listed, vec!["orders", "spent"]);
    let record = store.computed_trait("orders").unwrap().expect("stored");
    assert_eq!(record.definition, orders, "the definition round-trips");
    assert_eq!((record.created_at_ms, record.backfill), (1_000, Backfill::Pending { after: None }));
    assert_eq!(store.computed_trait("nothing").unwrap(), None);

    let state = orders.compile().unwrap().new_state();
    let commit = AudienceCommit {
        computed: vec![
            computed_write("orders", 1, Some(state.clone()), Some(serde_json::json!(2)), Some(900)),
            computed_write("spent", 1, Some(state.clone()), Some(serde_json::json!(12.5)), None),
        ],
        computed_backfill: vec![("orders".into(), Backfill::Pending { after: Some(ProfileId(1)) })],
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&commit).unwrap(), AudienceCommitOutcome::Committed);
    assert_eq!(
        store.computed_trait("orders").unwrap().unwrap().backfill,
        Backfill::Pending { after: Some(ProfileId(1)) }
    );
    let mut stored = store.computed_trait_states(&[ProfileId(1), ProfileId(2)]).unwrap();
    stored.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        stored.iter().map(|s| (s.name.as_str(), s.value.clone(), s.next_change_at_ms)).collect::<Vec<_>>(),
        vec![("orders", Some(serde_json::json!(2)), Some(900)), ("spent", Some(serde_json::json!(12.5)), None)]
    );
    assert_eq!(stored[0].state, state, "the state round-trips");

    store.delete_computed_trait("orders").unwrap();
    assert!(matches!(store.delete_computed_trait("orders"), Err(StoreError::ComputedTraitNotFound(_))));
    assert_eq!(store.computed_trait_states(&[ProfileId(1)]).unwrap().len(), 1, "its values go, spent's stay");
    // A stage that computed the trait before it was deleted writes nothing for it.
    assert_eq!(store.commit_audience(&commit).unwrap(), AudienceCommitOutcome::Committed);
    assert_eq!(store.computed_trait_states(&[ProfileId(1)]).unwrap().len(), 1);
}

pub fn computed_trait_timers_come_back_soonest_first_until_cleared(store: &impl Store) {
    use tandem_core::audience::ComputedTraitDefinition;
    let orders = ComputedTraitDefinition::parse(r#"count of "Order Completed" within 7d"#).unwrap();
    store.create_computed_trait("orders", &orders, 1_000).unwrap();
    let state = orders.compile().unwrap().new_state();
    let value = Some(serde_json::json!(1));
    let commit = AudienceCommit {
        computed: vec![
            computed_write("orders", 1, Some(state.clone()), value.clone(), Some(500)),
            computed_write("orders", 2, Some(state.clone()), value.clone(), Some(300)),
            computed_write("orders", 3, Some(state.clone()), value.clone(), None),
        ],
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&commit).unwrap(), AudienceCommitOutcome::Committed);
    let due =
        |now| store.due_computed_trait_states(now, 10).unwrap().into_iter().map(|s| s.profile.0).collect::<Vec<_>>();
    assert_eq!(due(299), Vec::<u64>::new());
    assert_eq!(due(500), vec![2, 1]);
    assert_eq!(store.due_computed_trait_states(500, 1).unwrap().len(), 1, "the limit holds");
    let clear = AudienceCommit {
        computed: vec![
            computed_write("orders", 2, Some(state.clone()), Some(serde_json::json!(0)), None),
            computed_write("orders", 1, None, None, None),
        ],
        ..AudienceCommit::default()
    };
    assert_eq!(store.commit_audience(&clear).unwrap(), AudienceCommitOutcome::Committed);
    assert_eq!(due(i64::MAX), Vec::<u64>::new());
    assert!(store.computed_trait_states(&[ProfileId(1)]).unwrap().is_empty(), "a removed state is gone");
    let two = store.computed_trait_states(&[ProfileId(2)]).unwrap();
    assert_eq!(two[0].value, Some(serde_json::json!(0)));
    // Profiles holding only computed-trait states are found once retired
    // (no live profile of those ids exists in this store).
    let retired = store.retired_audience_profiles(10).unwrap();
    assert_eq!(retired, vec![ProfileId(2), ProfileId(3)]);
}
