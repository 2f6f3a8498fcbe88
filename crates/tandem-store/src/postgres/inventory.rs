//! The PII inventory in PostgreSQL: one upsert per key and source.

use super::PostgresStore;
use crate::inventory::{fold_rows, PiiInventoryStore, PiiKeyRecord, PiiKeySeen};
use crate::StoreError;

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
}
