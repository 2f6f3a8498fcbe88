//! The PII inventory in PostgreSQL: one upsert per key and source; the PII
//! rules users set, one row per matcher.

use super::PostgresStore;
use crate::inventory::{fold_rows, row_key, rule_from_row, PiiInventoryStore, PiiKeyRecord, PiiKeySeen, StoredPiiRule};
use crate::StoreError;
use tandem_core::govern::pii::{PiiMatcher, PiiRule};

const RULE_COLUMNS: &str = "kind, matcher, class, policy, created_at, updated_at";

fn stored(row: &postgres::Row) -> Result<StoredPiiRule, StoreError> {
    let kind: String = row.try_get(0)?;
    let class: String = row.try_get(2)?;
    let policy: Option<String> = row.try_get(3)?;
    rule_from_row(&kind, row.try_get(1)?, &class, policy.as_deref(), row.try_get(4)?, row.try_get(5)?)
}

fn rule_at(
    client: &mut impl postgres::GenericClient,
    matcher: &PiiMatcher,
    lock: &str,
) -> Result<Option<StoredPiiRule>, StoreError> {
    client
        .query_opt(
            &format!("SELECT {RULE_COLUMNS} FROM pii_rules WHERE kind = $1 AND matcher = $2 {lock}"),
            &[&matcher.kind(), &matcher.text()],
        )?
        .as_ref()
        .map(stored)
        .transpose()
}

impl PiiInventoryStore for PostgresStore {
    fn record_pii_keys(&self, seen: &[PiiKeySeen]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            let upsert = transaction.prepare(
                "INSERT INTO pii_keys (key, source_id, class, last_seen) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (key, source_id) DO UPDATE
                 SET class = excluded.class, last_seen = GREATEST(pii_keys.last_seen, excluded.last_seen)",
            )?;
            for key in seen {
                transaction
                    .execute(&upsert, &[&key.key, &key.source_id.as_str(), &key.class.as_str(), &key.last_seen_ms])?;
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn pii_inventory(&self) -> Result<Vec<PiiKeyRecord>, StoreError> {
        self.with_client(|client| {
            let rows = client
                .query("SELECT key, source_id, class, last_seen FROM pii_keys ORDER BY key, source_id", &[])?
                .iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(fold_rows(rows))
        })
    }

    fn set_pii_rule(&self, rule: &PiiRule, at_ms: i64) -> Result<Option<StoredPiiRule>, StoreError> {
        let matcher = row_key(rule)?;
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            let before = rule_at(&mut transaction, &matcher, "FOR UPDATE")?;
            transaction.execute(
                "INSERT INTO pii_rules (kind, matcher, class, policy, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (kind, matcher) DO UPDATE
                 SET class = excluded.class, policy = excluded.policy, updated_at = excluded.updated_at",
                &[
                    &matcher.kind(),
                    &matcher.text(),
                    &rule.class.as_str(),
                    &rule.policy.map(|policy| policy.as_str()),
                    &at_ms,
                ],
            )?;
            transaction.commit()?;
            Ok(before)
        })
    }

    fn remove_pii_rule(&self, matcher: &PiiMatcher) -> Result<Option<StoredPiiRule>, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            let before = rule_at(&mut transaction, matcher, "FOR UPDATE")?;
            transaction.execute(
                "DELETE FROM pii_rules WHERE kind = $1 AND matcher = $2",
                &[&matcher.kind(), &matcher.text()],
            )?;
            transaction.commit()?;
            Ok(before)
        })
    }

    fn pii_rules(&self) -> Result<Vec<StoredPiiRule>, StoreError> {
        self.with_client(|client| {
            client
                .query(&format!("SELECT {RULE_COLUMNS} FROM pii_rules ORDER BY kind, created_at, matcher"), &[])?
                .iter()
                .map(stored)
                .collect()
        })
    }
}
