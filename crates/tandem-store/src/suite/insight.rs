//! What every backend's [`InsightStore`](crate::InsightStore) must do.

use super::{batch, record};
use crate::{
    BackfillMove, DayAdd, DayValue, FailedAttempt, HistoryRecord, IdentityCommit, IngestBatch, InsightCommit,
    InsightCommitOutcome, InsightCounters, NewOutboxItem, OutboxCommit, PlanViolationRecord, ProfileStateWrite, Stage,
    StageCursor, Store, StoreError, TrackerBackfill, TrackerId,
};
use serde_json::json;
use tandem_core::activate::{DestinationDefinition, DestinationSettings, EventFilter, FileSettings, RetrySettings};
use tandem_core::insight::goals::GoalSettings;
use tandem_core::insight::rollup::{series, EventClock, IdentityEvent, IdentityEventKind, ProfileState, TrackerSpec};
use tandem_core::{EventType, Identifier, IdentityChange, LogPosition, ProfileId, SourceKind};

fn settings(name: &str, kind: &str) -> GoalSettings {
    GoalSettings::from_json(&json!({
        "name": name, "owner": "both", "target": 10, "period": "2026-Q3", "metric": {"kind": kind}
    }))
    .unwrap()
}

fn revenue() -> TrackerSpec {
    TrackerSpec::Events {
        event: Some("Order Completed".into()),
        property: Some("revenue".into()),
        clock: EventClock::Happened,
    }
}

fn activity() -> TrackerSpec {
    TrackerSpec::Activity { window_days: 30 }
}

fn id_of(store: &impl Store, spec: &TrackerSpec) -> Option<TrackerId> {
    store.trackers().unwrap().into_iter().find(|tracker| &tracker.spec == spec).map(|tracker| tracker.id)
}

fn add(tracker: TrackerId, series: &'static str, day: i32, value: f64) -> DayAdd {
    DayAdd { tracker, series, day, value }
}

fn state(runs: &[(i32, i32)]) -> ProfileState {
    ProfileState { runs: runs.to_vec(), ..ProfileState::default() }
}

fn days(store: &impl Store, tracker: TrackerId) -> Vec<(String, i32, f64)> {
    store
        .tracker_days(tracker, None, i32::MAX)
        .unwrap()
        .into_iter()
        .map(|DayValue { series, day, value }| (series, day, value))
        .collect()
}

pub fn goals_have_unique_names_and_share_trackers_until_the_last_is_deleted(store: &impl Store) {
    let revenue_goal = settings("Q3 revenue", "revenue");
    store.create_goal(&revenue_goal, &[revenue()], 1_000).unwrap();
    store.create_goal(&settings("new customers", "new_customers"), &[activity()], 2_000).unwrap();
    store.create_goal(&settings("active", "active_customers"), &[activity()], 3_000).unwrap();
    assert!(matches!(
        store.create_goal(&settings("Q3 revenue", "ingest_volume"), &[], 4_000),
        Err(StoreError::GoalExists(name)) if name == "Q3 revenue"
    ));
    let names: Vec<_> = store.list_goals().unwrap().into_iter().map(|goal| goal.settings.name).collect();
    assert_eq!(names, vec!["Q3 revenue", "active", "new customers"]);
    let stored = store.goal("Q3 revenue").unwrap().expect("stored");
    assert_eq!((stored.settings, stored.created_at_ms), (revenue_goal, 1_000), "settings round-trip");
    assert_eq!(store.goal("nobody").unwrap(), None);

    let trackers = store.trackers().unwrap();
    assert_eq!(trackers.len(), 2, "two goals share the activity tracker: {trackers:?}");
    assert!(trackers.iter().all(|tracker| tracker.backfill == TrackerBackfill::NotStarted));
    let shared = id_of(store, &activity()).unwrap();
    let commit = InsightCommit { days: vec![add(shared, series::NEW, 5, 2.0)], ..InsightCommit::default() };
    assert_eq!(store.commit_insight(&commit).unwrap(), InsightCommitOutcome::Committed);

    store.delete_goal("active").unwrap();
    assert_eq!(days(store, shared), vec![("new".to_owned(), 5, 2.0)], "still needed by new customers");
    store.delete_goal("new customers").unwrap();
    assert_eq!(id_of(store, &activity()), None, "gone with its last goal");
    assert!(days(store, shared).is_empty(), "and its days with it");
    assert!(matches!(store.delete_goal("active"), Err(StoreError::GoalNotFound(name)) if name == "active"));

    // Created again, the tracker has a new id, and the old id's rows are dropped.
    store.create_goal(&settings("active", "active_customers"), &[activity()], 5_000).unwrap();
    let again = id_of(store, &activity()).unwrap();
    assert_ne!(again, shared);
    let late = InsightCommit { days: vec![add(shared, series::NEW, 6, 1.0)], ..InsightCommit::default() };
    assert_eq!(store.commit_insight(&late).unwrap(), InsightCommitOutcome::Committed);
    assert!(days(store, again).is_empty() && days(store, shared).is_empty());
}

pub fn commits_add_day_values_and_states_with_the_cursor_and_refuse_stale_writers(store: &impl Store) {
    store.create_goal(&settings("active", "active_customers"), &[activity()], 1_000).unwrap();
    let tracker = id_of(store, &activity()).unwrap();
    let (ann, bob) = (ProfileId(7), ProfileId(8));
    let first = InsightCommit {
        from: LogPosition(0),
        to: LogPosition(10),
        epoch: 2,
        backfill: vec![BackfillMove {
            tracker,
            from: TrackerBackfill::NotStarted,
            to: TrackerBackfill::Running { after: LogPosition(0), through: LogPosition(0) },
        }],
        days: vec![
            add(tracker, series::NEW, 100, 1.0),
            add(tracker, series::NEW, 100, 1.0),
            add(tracker, series::ACTIVE_CHANGE, 100, 2.0),
            add(tracker, series::ACTIVE_CHANGE, 130, -2.0),
        ],
        states: vec![
            ProfileStateWrite { tracker, profile: ann, state: Some(state(&[(100, 100)])) },
            ProfileStateWrite { tracker, profile: bob, state: Some(state(&[(100, 100)])) },
        ],
        ..InsightCommit::default()
    };
    assert_eq!(store.commit_insight(&first).unwrap(), InsightCommitOutcome::Committed);
    assert_eq!(store.stage_cursor(Stage::INSIGHT).unwrap(), Some(StageCursor { position: LogPosition(10), epoch: 2 }));
    assert_eq!(store.commit_insight(&first).unwrap(), InsightCommitOutcome::StalePosition);
    assert_eq!(
        days(store, tracker),
        vec![
            ("active_change".to_owned(), 100, 2.0),
            ("active_change".to_owned(), 130, -2.0),
            ("new".to_owned(), 100, 2.0)
        ],
        "values of one day add up, and a stale commit added nothing"
    );
    assert_eq!(
        store.trackers().unwrap()[0].backfill,
        TrackerBackfill::Running { after: LogPosition(0), through: LogPosition(0) }
    );
    let second = InsightCommit {
        from: LogPosition(10),
        to: LogPosition(12),
        epoch: 2,
        backfill: vec![BackfillMove {
            tracker,
            from: TrackerBackfill::Running { after: LogPosition(0), through: LogPosition(0) },
            to: TrackerBackfill::Done,
        }],
        days: vec![add(tracker, series::NEW, 100, -1.0), add(tracker, series::NEW, 101, 1.0)],
        states: vec![
            ProfileStateWrite { tracker, profile: ann, state: Some(state(&[(100, 101)])) },
            ProfileStateWrite { tracker, profile: bob, state: None },
        ],
        ..InsightCommit::default()
    };
    assert_eq!(store.commit_insight(&second).unwrap(), InsightCommitOutcome::Committed);
    let mut states = store.profile_states(&[tracker], &[ann, bob, ProfileId(9)]).unwrap();
    states.sort_by_key(|(_, profile, _)| *profile);
    assert_eq!(states, vec![(tracker, ann, state(&[(100, 101)]))]);
    assert_eq!(store.trackers().unwrap()[0].backfill, TrackerBackfill::Done);
    let values: Vec<_> = store.tracker_days(tracker, Some(101), 200).unwrap();
    assert_eq!(
        values,
        vec![
            DayValue { series: "active_change".into(), day: 130, value: -2.0 },
            DayValue { series: "new".into(), day: 101, value: 1.0 },
        ]
    );

    // A restart forgets every day and state and starts every tracker again.
    let restart = InsightCommit {
        from: LogPosition(12),
        to: LogPosition(12),
        epoch: 3,
        restart_all: true,
        ..InsightCommit::default()
    };
    assert_eq!(store.commit_insight(&restart).unwrap(), InsightCommitOutcome::Committed);
    assert!(days(store, tracker).is_empty());
    assert!(store.profile_states(&[tracker], &[ann]).unwrap().is_empty());
    assert_eq!(store.trackers().unwrap()[0].backfill, TrackerBackfill::NotStarted);
    assert_eq!(store.stage_cursor(Stage::INSIGHT).unwrap(), Some(StageCursor { position: LogPosition(12), epoch: 3 }));
}

pub fn identity_events_are_the_creations_and_merges_of_a_position_range(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    store
        .append(&[batch((1..=3).map(|n| record(&web, &format!("m{n}"), EventType::Identify, n)).collect())], 0)
        .unwrap();
    let (one, two) = (ProfileId(1), ProfileId(2));
    let ann = Identifier::new("user_id", "ann");
    let history = |position: u64, change: IdentityChange| HistoryRecord {
        position: Some(LogPosition(position)),
        profile: change.profile(),
        change,
        recorded_at_ms: 1_000 * position as i64,
    };
    let commit = IdentityCommit {
        epoch: store.identity_state().unwrap().epoch,
        from: LogPosition(0),
        to: LogPosition(3),
        history: vec![
            history(1, IdentityChange::Created { profile: one, identifiers: vec![] }),
            history(2, IdentityChange::Created { profile: two, identifiers: vec![ann.clone()] }),
            history(3, IdentityChange::Attached { profile: one, identifiers: vec![ann.clone()] }),
            history(3, IdentityChange::Merged { profile: one, merged: vec![two], identifiers: vec![ann] }),
        ],
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&commit).unwrap(), crate::CommitOutcome::Committed);
    assert_eq!(
        store.identity_events(LogPosition(1), LogPosition(3)).unwrap(),
        vec![
            IdentityEvent { recorded_at_ms: 2_000, kind: IdentityEventKind::Created(two) },
            IdentityEvent { recorded_at_ms: 3_000, kind: IdentityEventKind::Merged { into: one, merged: vec![two] } },
        ]
    );
    assert!(store.identity_events(LogPosition(3), LogPosition(9)).unwrap().is_empty());
}

pub fn snapshots_keep_each_days_last_value_and_the_one_before_a_range(store: &impl Store) {
    let key = |name: &str| name.to_owned();
    store.record_snapshots(10, &[(key("events"), 5.0), (key("audience:vip"), 1.0)]).unwrap();
    store.record_snapshots(12, &[(key("events"), 7.0)]).unwrap();
    store.record_snapshots(12, &[(key("events"), 8.0)]).unwrap();
    store.record_snapshots(13, &[(key("events"), 9.5)]).unwrap();
    let found = store.snapshots(&[key("events"), key("audience:vip"), key("unknown")], 12, 12).unwrap();
    let mut found: Vec<_> = found.into_iter().collect();
    found.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    assert_eq!(
        found,
        vec![(key("audience:vip"), 10, 1.0), (key("events"), 10, 5.0), (key("events"), 12, 8.0)],
        "the last value before the range, then the range's days with each day's last value"
    );
}

pub fn ingest_latency_adds_up_per_day_and_bucket(store: &impl Store) {
    store.add_ingest_latency(&[(20, 3, 5), (20, 4, 1)]).unwrap();
    store.add_ingest_latency(&[(20, 3, 2), (21, 0, 7)]).unwrap();
    store.add_ingest_latency(&[]).unwrap();
    assert_eq!(store.ingest_latency(20, 21).unwrap(), vec![(20, 3, 7), (20, 4, 1), (21, 0, 7)]);
    assert_eq!(store.ingest_latency(21, 30).unwrap(), vec![(21, 0, 7)]);
}

pub fn counters_read_events_violations_deliveries_and_dead_letters(store: &impl Store) {
    assert_eq!(store.insight_counters().unwrap(), InsightCounters::default());
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    let violation =
        |path: &str| PlanViolationRecord::new(web.clone(), "invalid_event", "Signed Up", path, "bad", "{}", 1);
    let mut first = batch((1..=4).map(|n| record(&web, &format!("m{n}"), EventType::Track, n)).collect());
    first.violations = vec![violation("/properties/plan"), violation("/properties/plan"), violation("/properties/x")];
    store.append(&[first, IngestBatch::default()], 0).unwrap();
    let definition = DestinationDefinition {
        name: "crm".to_owned(),
        destination: DestinationSettings::File(FileSettings {
            path: Some("/tmp/crm.jsonl".into()),
            ..Default::default()
        }),
        events: Some(EventFilter::default()),
        audiences: Vec::new(),
        retry: RetrySettings::default(),
        max_events_per_second: None,
        batch_size: None,
        consent_categories: Vec::new(),
    };
    store.create_destination(&definition, 0).unwrap();
    let items = (1..=3)
        .map(|position| NewOutboxItem {
            destination: "crm".into(),
            position: LogPosition(position),
            payload: "{}".into(),
            profile: None,
        })
        .collect();
    store
        .commit_outbox(&OutboxCommit { from: LogPosition(0), to: LogPosition(3), items, ..Default::default() })
        .unwrap();
    let head: Vec<_> = store.outbox_head("crm", 10).unwrap();
    store.mark_delivered("crm", &[head[0].id, head[1].id]).unwrap();
    store.record_failure(head[2].id, &FailedAttempt::DeadLetter { at_ms: 9, error: "refused".into() }).unwrap();
    assert_eq!(
        store.insight_counters().unwrap(),
        InsightCounters { events: 4, violations: 3, delivered: 2, dead_letters: 1 }
    );
}

pub fn a_backfill_page_is_committed_once(store: &impl Store) {
    store.create_goal(&settings("revenue", "revenue"), &[revenue()], 1_000).unwrap();
    let tracker = id_of(store, &revenue()).unwrap();
    let running = |after: u64| TrackerBackfill::Running { after: LogPosition(after), through: LogPosition(100) };
    let start = InsightCommit {
        backfill: vec![BackfillMove { tracker, from: TrackerBackfill::NotStarted, to: running(0) }],
        ..InsightCommit::default()
    };
    assert_eq!(store.commit_insight(&start).unwrap(), InsightCommitOutcome::Committed);
    let page = InsightCommit {
        backfill: vec![BackfillMove { tracker, from: running(0), to: running(50) }],
        days: vec![add(tracker, series::SUM, 7, 12.5)],
        ..InsightCommit::default()
    };
    assert_eq!(store.commit_insight(&page).unwrap(), InsightCommitOutcome::Committed);
    // A second stage that read the same page commits it again: refused, nothing added.
    assert_eq!(store.commit_insight(&page).unwrap(), InsightCommitOutcome::StalePosition);
    assert_eq!(days(store, tracker), vec![("sum".to_owned(), 7, 12.5)]);
    assert_eq!(store.trackers().unwrap()[0].backfill, running(50));
    // A page of a tracker deleted meanwhile is skipped, the rest written.
    store.delete_goal("revenue").unwrap();
    let late = InsightCommit {
        backfill: vec![BackfillMove { tracker, from: running(50), to: TrackerBackfill::Done }],
        ..InsightCommit::default()
    };
    assert_eq!(store.commit_insight(&late).unwrap(), InsightCommitOutcome::Committed);
}
