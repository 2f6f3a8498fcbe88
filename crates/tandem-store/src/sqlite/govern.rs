//! SQLite queries of governance: tracking plans and violation counts.

use super::SqliteStore;
use crate::govern::{plan_from_text, plan_to_text, GovernStore, PlanViolationRecord, PlanViolationSummary, StoredPlan};
use crate::StoreError;
use rusqlite::{params, OptionalExtension, Transaction};
use tandem_core::govern::plan::TrackingPlan;
use tandem_core::SourceId;

/// Counts violations inside the log append's transaction.
pub(super) fn record_violations(
    transaction: &Transaction<'_>,
    violations: &[PlanViolationRecord],
) -> Result<(), StoreError> {
    if violations.is_empty() {
        return Ok(());
    }
    let mut upsert = transaction.prepare_cached(
        "INSERT INTO plan_violations (source_id, kind, event_name, path, count, first_seen, last_seen, message, sample)
         VALUES (?1, ?2, ?3, ?4, 1, ?5, ?5, ?6, ?7)
         ON CONFLICT (source_id, kind, event_name, path) DO UPDATE
         SET count = count + 1, last_seen = MAX(last_seen, excluded.last_seen),
             message = excluded.message, sample = excluded.sample",
    )?;
    for violation in violations {
        upsert.execute(params![
            violation.source_id.as_str(),
            violation.kind,
            violation.event_name,
            violation.path,
            violation.seen_at_ms,
            violation.message,
            violation.sample
        ])?;
    }
    Ok(())
}

fn stored_plan(source_id: String, text: String, updated_at_ms: i64) -> Result<StoredPlan, StoreError> {
    Ok(StoredPlan { source_id: SourceId::new(source_id), plan: plan_from_text(&text)?, updated_at_ms })
}

impl GovernStore for SqliteStore {
    fn set_plan(&self, source_id: &SourceId, plan: &TrackingPlan) -> Result<StoredPlan, StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        self.with_writer(|connection| {
            connection.execute(
                "INSERT INTO tracking_plans (source_id, plan, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source_id) DO UPDATE SET plan = excluded.plan, updated_at = excluded.updated_at",
                params![source_id.as_str(), plan_to_text(plan), now],
            )?;
            Ok(())
        })?;
        Ok(StoredPlan { source_id: source_id.clone(), plan: plan.clone(), updated_at_ms: now })
    }

    fn plan(&self, source_id: &SourceId) -> Result<Option<StoredPlan>, StoreError> {
        let row = self.with_reader(|connection| {
            Ok(connection
                .query_row(
                    "SELECT source_id, plan, updated_at FROM tracking_plans WHERE source_id = ?1",
                    [source_id.as_str()],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()?)
        })?;
        row.map(|(id, text, at)| stored_plan(id, text, at)).transpose()
    }

    fn delete_plan(&self, source_id: &SourceId) -> Result<bool, StoreError> {
        self.with_writer(|connection| {
            Ok(connection.execute("DELETE FROM tracking_plans WHERE source_id = ?1", [source_id.as_str()])? > 0)
        })
    }

    fn plans(&self) -> Result<Vec<StoredPlan>, StoreError> {
        let rows: Vec<(String, String, i64)> = self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached("SELECT source_id, plan, updated_at FROM tracking_plans ORDER BY source_id")?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })?;
        rows.into_iter().map(|(id, text, at)| stored_plan(id, text, at)).collect()
    }

    fn plan_violations(&self, source_id: &SourceId, limit: usize) -> Result<Vec<PlanViolationSummary>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT kind, event_name, path, count, first_seen, last_seen, message, sample
                 FROM plan_violations WHERE source_id = ?1
                 ORDER BY last_seen DESC, kind, event_name, path LIMIT ?2",
            )?;
            let rows = statement.query_map(params![source_id.as_str(), limit as i64], |row| {
                Ok(PlanViolationSummary {
                    kind: row.get(0)?,
                    event_name: row.get(1)?,
                    path: row.get(2)?,
                    count: row.get::<_, i64>(3)? as u64,
                    first_seen_ms: row.get(4)?,
                    last_seen_ms: row.get(5)?,
                    message: row.get(6)?,
                    sample: row.get(7)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}
