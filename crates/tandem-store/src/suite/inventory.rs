//! What every backend's [`PiiInventoryStore`](crate::PiiInventoryStore) must do.

use crate::inventory::PiiKeySeen;
use crate::Store;
use tandem_core::govern::pii::{PiiMatcher, PiiRule, RedPolicy};
use tandem_core::govern::PiiClass;
use tandem_core::SourceId;

fn seen(key: &str, source: &str, class: PiiClass, at: i64) -> PiiKeySeen {
    PiiKeySeen { key: key.into(), source_id: SourceId::new(source), class, last_seen_ms: at }
}

pub fn keys_are_kept_per_source_with_their_latest_sighting(store: &impl Store) {
    assert!(store.pii_inventory().unwrap().is_empty());
    store
        .record_pii_keys(&[
            seen("email", "src_web", PiiClass::Yellow, 100),
            seen("plan", "src_web", PiiClass::Green, 100),
            seen("email", "src_crm", PiiClass::Yellow, 50),
        ])
        .unwrap();
    store
        .record_pii_keys(&[seen("email", "src_web", PiiClass::Yellow, 80), seen("note", "src_app", PiiClass::Red, 300)])
        .unwrap();
    let inventory = store.pii_inventory().unwrap();
    let keys: Vec<&str> = inventory.iter().map(|record| record.key.as_str()).collect();
    assert_eq!(keys, ["email", "note", "plan"]);
    assert_eq!(inventory[0].sources, [SourceId::new("src_crm"), SourceId::new("src_web")]);
    assert_eq!(inventory[0].last_seen_ms, 100, "an older sighting does not move the time back");
    assert_eq!((inventory[1].class, inventory[1].last_seen_ms), (PiiClass::Red, 300));
    assert_eq!(inventory[2].class, PiiClass::Green);
    store.record_pii_keys(&[]).unwrap();
}

fn name_rule(name: &str, class: PiiClass, policy: Option<RedPolicy>) -> PiiRule {
    PiiRule { name: Some(name.into()), pattern: None, class, policy }
}

fn pattern_rule(pattern: &str, class: PiiClass) -> PiiRule {
    PiiRule { name: None, pattern: Some(pattern.into()), class, policy: None }
}

pub fn pii_rules_are_kept_by_matcher_in_deciding_order(store: &impl Store) {
    assert!(store.pii_rules().unwrap().is_empty());
    assert_eq!(store.set_pii_rule(&pattern_rule("^billing_", PiiClass::Yellow), 10).unwrap(), None);
    assert_eq!(store.set_pii_rule(&name_rule("tax_id", PiiClass::Red, Some(RedPolicy::Refuse)), 20).unwrap(), None);
    assert_eq!(store.set_pii_rule(&pattern_rule("^acct_", PiiClass::Red), 30).unwrap(), None);
    // Setting the first pattern again replaces its class and keeps its place.
    let replaced = store.set_pii_rule(&pattern_rule("^billing_", PiiClass::Green), 40).unwrap().unwrap();
    assert_eq!((replaced.rule.class, replaced.created_at_ms, replaced.updated_at_ms), (PiiClass::Yellow, 10, 10));
    let rules = store.pii_rules().unwrap();
    let listed: Vec<&PiiRule> = rules.iter().map(|stored| &stored.rule).collect();
    assert_eq!(
        listed,
        [
            &name_rule("tax_id", PiiClass::Red, Some(RedPolicy::Refuse)),
            &pattern_rule("^billing_", PiiClass::Green),
            &pattern_rule("^acct_", PiiClass::Red),
        ],
        "names first, then patterns as first set"
    );
    assert_eq!((rules[1].created_at_ms, rules[1].updated_at_ms), (10, 40));
    // A name and a pattern with the same text are two rules.
    store.set_pii_rule(&pattern_rule("tax_id", PiiClass::Green), 50).unwrap();
    assert_eq!(store.pii_rules().unwrap().len(), 4);

    let removed = store.remove_pii_rule(&PiiMatcher::Name("tax_id".into())).unwrap().unwrap();
    assert_eq!(removed.rule, name_rule("tax_id", PiiClass::Red, Some(RedPolicy::Refuse)));
    assert_eq!(store.remove_pii_rule(&PiiMatcher::Name("tax_id".into())).unwrap(), None);
    let left: Vec<String> = store
        .pii_rules()
        .unwrap()
        .iter()
        .map(|stored| format!("{:?}{:?}", stored.rule.name, stored.rule.pattern))
        .collect();
    assert_eq!(left, ["NoneSome(\"^billing_\")", "NoneSome(\"^acct_\")", "NoneSome(\"tax_id\")"]);
}
