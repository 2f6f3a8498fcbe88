//! The PII inventory's storage interface: every trait and property key the
//! collect path has seen, per source, with its class and when it was last
//! seen. The log writer gathers keys in memory and records them in one call
//! after its commits, so the inventory costs one small upsert per second at
//! most, not a write per event.

use crate::StoreError;
use tandem_core::govern::PiiClass;
use tandem_core::SourceId;

/// A key seen in a source's events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PiiKeySeen {
    pub key: String,
    pub source_id: SourceId,
    pub class: PiiClass,
    pub last_seen_ms: i64,
}

/// A key as the inventory lists it: across every source that sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PiiKeyRecord {
    pub key: String,
    /// The highest class it was seen with.
    pub class: PiiClass,
    /// Ids of the sources that sent it, sorted.
    pub sources: Vec<SourceId>,
    pub last_seen_ms: i64,
}

/// Storage for the PII inventory.
pub trait PiiInventoryStore: Send + Sync + 'static {
    /// Adds or refreshes keys: a key's class is the last one seen, its time
    /// the latest.
    fn record_pii_keys(&self, seen: &[PiiKeySeen]) -> Result<(), StoreError>;

    /// Every key, by name.
    fn pii_inventory(&self) -> Result<Vec<PiiKeyRecord>, StoreError>;
}

/// Folds rows of (key, source, class, last seen), sorted by key, into records.
pub(crate) fn fold_rows(rows: Vec<(String, String, String, i64)>) -> Vec<PiiKeyRecord> {
    let mut records: Vec<PiiKeyRecord> = Vec::new();
    for (key, source_id, class, last_seen_ms) in rows {
        let class = match class.as_str() {
            "red" => PiiClass::Red,
            "yellow" => PiiClass::Yellow,
            _ => PiiClass::Green,
        };
        match records.last_mut() {
            Some(record) if record.key == key => {
                record.class = record.class.max(class);
                record.sources.push(SourceId::new(source_id));
                record.last_seen_ms = record.last_seen_ms.max(last_seen_ms);
            }
            _ => records.push(PiiKeyRecord { key, class, sources: vec![SourceId::new(source_id)], last_seen_ms }),
        }
    }
    records
}
