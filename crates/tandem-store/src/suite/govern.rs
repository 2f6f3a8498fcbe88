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
