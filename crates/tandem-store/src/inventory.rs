//! The PII inventory's storage interface: every trait and property key the
//! collect path has seen, per source, with its class and when it was last
//! seen. The log writer gathers keys in memory and records them in one call
//! after its commits, so the inventory costs one small upsert per second at
//! most, not a write per event. Beside it, the PII rules users set at run
//! time (`tandem pii set`, `/api/v1/pii/rules`), which the collect path
//! layers in front of the configured ones.

use crate::StoreError;
use tandem_core::govern::pii::{PiiMatcher, PiiRule, RedPolicy};
use tandem_core::govern::PiiClass;
use tandem_core::SourceId;

/// A PII rule set by a user, with when it was first and last set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredPiiRule {
    pub rule: PiiRule,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A stored rule from its row: kind (`name` or `pattern`), matcher, class,
/// policy, created and updated.
pub(crate) fn rule_from_row(
    kind: &str,
    matcher: String,
    class: &str,
    policy: Option<&str>,
    created_at_ms: i64,
    updated_at_ms: i64,
) -> Result<StoredPiiRule, StoreError> {
    let corrupt = |what: String| StoreError::Backend(what.into());
    let class: PiiClass = class.parse().map_err(corrupt)?;
    let policy = policy.map(str::parse::<RedPolicy>).transpose().map_err(corrupt)?;
    let (name, pattern) = match kind {
        "name" => (Some(matcher), None),
        "pattern" => (None, Some(matcher)),
        other => return Err(corrupt(format!("unknown pii rule kind {other:?}"))),
    };
    Ok(StoredPiiRule { rule: PiiRule { name, pattern, class, policy }, created_at_ms, updated_at_ms })
}

/// The row key of a rule: its matcher's kind and text. The rule must have
/// been validated ([`PiiRule::validated`]).
pub(crate) fn row_key(rule: &PiiRule) -> Result<PiiMatcher, StoreError> {
    rule.matcher().map_err(|error| StoreError::Backend(Box::new(error)))
}

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

    /// Sets a rule, validated by the caller ([`PiiRule::validated`]),
    /// replacing the one with the same matcher (which keeps its place);
    /// the rule it replaced.
    fn set_pii_rule(&self, rule: &PiiRule, at_ms: i64) -> Result<Option<StoredPiiRule>, StoreError>;

    /// Removes the rule with this matcher; the rule removed.
    fn remove_pii_rule(&self, matcher: &PiiMatcher) -> Result<Option<StoredPiiRule>, StoreError>;

    /// Every stored rule in the order they decide: exact names first (they
    /// cannot overlap), then patterns in the order they were first set.
    fn pii_rules(&self) -> Result<Vec<StoredPiiRule>, StoreError>;
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
