//! The PII inventory in SQLite: one upsert per key and source; the PII
//! rules users set, one row per matcher.

use super::SqliteStore;
use crate::inventory::{fold_rows, row_key, rule_from_row, PiiInventoryStore, PiiKeyRecord, PiiKeySeen, StoredPiiRule};
use crate::StoreError;
use rusqlite::{params, OptionalExtension};
use tandem_core::govern::pii::{PiiMatcher, PiiRule};

const RULE_COLUMNS: &str = "kind, matcher, class, policy, created_at, updated_at";

fn read_rule(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, Option<String>, i64, i64)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?))
}

fn stored(row: (String, String, String, Option<String>, i64, i64)) -> Result<StoredPiiRule, StoreError> {
    let (kind, matcher, class, policy, created, updated) = row;
    rule_from_row(&kind, matcher, &class, policy.as_deref(), created, updated)
}

fn rule_at(connection: &rusqlite::Connection, matcher: &PiiMatcher) -> Result<Option<StoredPiiRule>, StoreError> {
    connection
        .prepare_cached(&format!("SELECT {RULE_COLUMNS} FROM pii_rules WHERE kind = ?1 AND matcher = ?2"))?
        .query_row(params![matcher.kind(), matcher.text()], read_rule)
        .optional()?
        .map(stored)
        .transpose()
}

impl PiiInventoryStore for SqliteStore {
    fn record_pii_keys(&self, seen: &[PiiKeySeen]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.with_writer(|connection| {
            let transaction = connection.transaction()?;
            {
                let mut upsert = transaction.prepare_cached(
                    "INSERT INTO pii_keys (key, source_id, class, last_seen) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (key, source_id) DO UPDATE
                     SET class = excluded.class, last_seen = MAX(last_seen, excluded.last_seen)",
                )?;
                for key in seen {
                    upsert.execute(params![key.key, key.source_id.as_str(), key.class.as_str(), key.last_seen_ms])?;
                }
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn pii_inventory(&self) -> Result<Vec<PiiKeyRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached("SELECT key, source_id, class, last_seen FROM pii_keys ORDER BY key, source_id")?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?;
            Ok(fold_rows(rows.collect::<Result<_, _>>()?))
        })
    }

    fn set_pii_rule(&self, rule: &PiiRule, at_ms: i64) -> Result<Option<StoredPiiRule>, StoreError> {
        let matcher = row_key(rule)?;
        self.with_writer(|connection| {
            let transaction = connection.transaction()?;
            let before = rule_at(&transaction, &matcher)?;
            transaction.execute(
                "INSERT INTO pii_rules (kind, matcher, class, policy, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (kind, matcher) DO UPDATE
                 SET class = excluded.class, policy = excluded.policy, updated_at = excluded.updated_at",
                params![
                    matcher.kind(),
                    matcher.text(),
                    rule.class.as_str(),
                    rule.policy.map(|policy| policy.as_str()),
                    at_ms
                ],
            )?;
            transaction.commit()?;
            Ok(before)
        })
    }

    fn remove_pii_rule(&self, matcher: &PiiMatcher) -> Result<Option<StoredPiiRule>, StoreError> {
        self.with_writer(|connection| {
            let transaction = connection.transaction()?;
            let before = rule_at(&transaction, matcher)?;
            transaction.execute(
                "DELETE FROM pii_rules WHERE kind = ?1 AND matcher = ?2",
                params![matcher.kind(), matcher.text()],
            )?;
            transaction.commit()?;
            Ok(before)
        })
    }

    fn pii_rules(&self) -> Result<Vec<StoredPiiRule>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(&format!("SELECT {RULE_COLUMNS} FROM pii_rules ORDER BY kind, created_at, matcher"))?;
            let rows = statement.query_map([], read_rule)?.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(stored).collect()
        })
    }
}
