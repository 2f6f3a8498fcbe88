//! Governance in PostgreSQL: tracking plans and violation counts (see
//! `sqlite/govern.rs` for the SQLite twin).

use super::PostgresStore;
use crate::govern::{plan_from_text, plan_to_text, GovernStore, PlanViolationRecord, PlanViolationSummary, StoredPlan};
use crate::StoreError;
use postgres::{GenericClient, Row};
use tandem_core::govern::plan::TrackingPlan;
use tandem_core::SourceId;

/// Counts violations inside the log append's transaction.
pub(super) fn record_violations(
    client: &mut impl GenericClient,
    violations: &[PlanViolationRecord],
) -> Result<(), StoreError> {
    if violations.is_empty() {
        return Ok(());
    }
    let upsert = client.prepare(
        "INSERT INTO plan_violations (source_id, kind, event_name, path, count, first_seen, last_seen, message, sample)
         VALUES ($1, $2, $3, $4, 1, $5, $5, $6, $7)
         ON CONFLICT (source_id, kind, event_name, path) DO UPDATE
         SET count = plan_violations.count + 1,
             last_seen = GREATEST(plan_violations.last_seen, excluded.last_seen),
             message = excluded.message, sample = excluded.sample",
    )?;
    for violation in violations {
        client.execute(
            &upsert,
            &[
                &violation.source_id.as_str(),
                &violation.kind,
                &violation.event_name,
                &violation.path,
                &violation.seen_at_ms,
                &violation.message,
                &violation.sample,
            ],
        )?;
    }
    Ok(())
}

fn stored_plan(row: &Row) -> Result<StoredPlan, StoreError> {
    Ok(StoredPlan {
        source_id: SourceId::new(row.try_get::<_, String>(0)?),
        plan: plan_from_text(row.try_get(1)?)?,
        updated_at_ms: row.try_get(2)?,
    })
}

impl GovernStore for PostgresStore {
    fn set_plan(&self, source_id: &SourceId, plan: &TrackingPlan) -> Result<StoredPlan, StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        self.with_client(|client| {
            client.execute(
                "INSERT INTO tracking_plans (source_id, plan, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (source_id) DO UPDATE SET plan = excluded.plan, updated_at = excluded.updated_at",
                &[&source_id.as_str(), &plan_to_text(plan), &now],
            )?;
            Ok(())
        })?;
        Ok(StoredPlan { source_id: source_id.clone(), plan: plan.clone(), updated_at_ms: now })
    }

    fn plan(&self, source_id: &SourceId) -> Result<Option<StoredPlan>, StoreError> {
        self.with_client(|client| {
            client
                .query_opt(
                    "SELECT source_id, plan, updated_at FROM tracking_plans WHERE source_id = $1",
                    &[&source_id.as_str()],
                )?
                .map(|row| stored_plan(&row))
                .transpose()
        })
    }

    fn delete_plan(&self, source_id: &SourceId) -> Result<bool, StoreError> {
        self.with_client(|client| {
            Ok(client.execute("DELETE FROM tracking_plans WHERE source_id = $1", &[&source_id.as_str()])? > 0)
        })
    }

    fn plans(&self) -> Result<Vec<StoredPlan>, StoreError> {
        self.with_client(|client| {
            client
                .query("SELECT source_id, plan, updated_at FROM tracking_plans ORDER BY source_id", &[])?
                .iter()
                .map(stored_plan)
                .collect()
        })
    }

    fn plan_violations(&self, source_id: &SourceId, limit: usize) -> Result<Vec<PlanViolationSummary>, StoreError> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT kind, event_name, path, count, first_seen, last_seen, message, sample
                 FROM plan_violations WHERE source_id = $1
                 ORDER BY last_seen DESC, kind, event_name, path LIMIT $2",
                &[&source_id.as_str(), &(limit as i64)],
            )?;
            rows.iter()
                .map(|row| {
                    Ok(PlanViolationSummary {
                        kind: row.try_get(0)?,
                        event_name: row.try_get(1)?,
                        path: row.try_get(2)?,
                        count: row.try_get::<_, i64>(3)? as u64,
                        first_seen_ms: row.try_get(4)?,
                        last_seen_ms: row.try_get(5)?,
                        message: row.try_get(6)?,
                        sample: row.try_get(7)?,
                    })
                })
                .collect()
        })
    }
}
