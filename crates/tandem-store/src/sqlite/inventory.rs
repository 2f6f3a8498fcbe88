//! The PII inventory in SQLite: one upsert per key and source.

use super::SqliteStore;
use crate::inventory::{fold_rows, PiiInventoryStore, PiiKeyRecord, PiiKeySeen};
use crate::StoreError;
use rusqlite::params;

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
}
