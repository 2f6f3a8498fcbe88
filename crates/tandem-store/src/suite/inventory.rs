//! What every backend's [`PiiInventoryStore`](crate::PiiInventoryStore) must do.

use crate::inventory::PiiKeySeen;
use crate::Store;
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
