//! Governance in PostgreSQL: tracking plans and violation counts, data
//! subject requests, suppressions and erasing a person (see
//! `sqlite/govern.rs` for the SQLite twin). An erasure deletes rows; the
//! space they held is reclaimed by (auto)vacuum, and until then, and in WAL
//! segments and backups, their bytes may remain on disk: see the README.

use super::PostgresStore;
use crate::govern::{
    erasure_patterns, like_escape, plan_from_text, plan_to_text, samples_from_text, samples_to_text,
    tool_info_from_text, ConsentChange, DsrRecord, ErasureReport, GovernStore, PersonDelivery, PlanViolationRecord,
    PlanViolationSummary, StoredPlan, MAX_SHADOW_KEYS,
};
use crate::{Stage, StoreError};
use postgres::{GenericClient, Row, Transaction};
use std::collections::BTreeMap;
use tandem_core::govern::consent::Consent;
use tandem_core::govern::dsr::{DsrKind, DsrStatus};
use tandem_core::govern::plan::TrackingPlan;
use tandem_core::govern::stack::{ShadowKey, ToolInfo, ToolKind};
use tandem_core::{Identifier, LogPosition, ProfileId, SourceId};

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

/// Records consent changes inside `transaction` (the outbox stage's commit
/// or [`GovernStore::record_consent`]'s own).
pub(super) fn write_consent(transaction: &mut Transaction<'_>, changes: &[ConsentChange]) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let current = transaction.prepare(
        "INSERT INTO profile_consent (profile_id, category, granted, position, updated_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (profile_id, category) DO UPDATE
         SET granted = excluded.granted, position = excluded.position, updated_at = excluded.updated_at
         WHERE excluded.position >= profile_consent.position",
    )?;
    let history = transaction.prepare(
        "INSERT INTO consent_history (profile_id, category, granted, position, at)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )?;
    for change in changes {
        let profile = change.profile.0 as i64;
        let position = change.position.0 as i64;
        let row: [&(dyn postgres::types::ToSql + Sync); 5] =
            [&profile, &change.category, &change.granted, &position, &change.at_ms];
        transaction.execute(&current, &row)?;
        transaction.execute(&history, &row)?;
    }
    Ok(())
}

/// Adds withheld counts for one destination.
pub(super) fn add_withheld(
    client: &mut impl GenericClient,
    destination: &str,
    counts: &BTreeMap<String, u64>,
) -> Result<(), StoreError> {
    if counts.is_empty() {
        return Ok(());
    }
    let categories: Vec<&str> = counts.keys().map(String::as_str).collect();
    let added: Vec<i64> = counts.values().map(|count| *count as i64).collect();
    client.execute(
        "INSERT INTO consent_withheld (destination, category, count)
         SELECT $1, category, added FROM unnest($2::text[], $3::bigint[]) AS counts (category, added)
         ON CONFLICT (destination, category) DO UPDATE
         SET count = consent_withheld.count + excluded.count",
        &[&destination, &categories, &added],
    )?;
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

    fn insert_dsr(&self, request: &DsrRecord) -> Result<(), StoreError> {
        self.with_client(|client| {
            client.execute(
                "INSERT INTO dsr_requests (id, kind, subject_digest, status, created_at, finished_at, detail)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &request.id,
                    &request.kind.as_str(),
                    &request.subject_digest,
                    &request.status.as_str(),
                    &request.created_at_ms,
                    &request.finished_at_ms,
                    &request.detail,
                ],
            )?;
            Ok(())
        })
    }

    fn finish_dsr(&self, id: &str, status: DsrStatus, detail: &str, at_ms: i64) -> Result<(), StoreError> {
        self.with_client(|client| {
            client.execute(
                "UPDATE dsr_requests SET status = $2, detail = $3, finished_at = $4 WHERE id = $1",
                &[&id, &status.as_str(), &detail, &at_ms],
            )?;
            Ok(())
        })
    }

    fn list_dsr(&self, limit: usize) -> Result<Vec<DsrRecord>, StoreError> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT id, kind, subject_digest, status, created_at, finished_at, detail
                 FROM dsr_requests ORDER BY created_at DESC, id DESC LIMIT $1",
                &[&(limit as i64)],
            )?;
            rows.iter()
                .map(|row| {
                    let kind: String = row.try_get(1)?;
                    let status: String = row.try_get(3)?;
                    Ok(DsrRecord {
                        id: row.try_get(0)?,
                        kind: kind.parse().unwrap_or(DsrKind::Access),
                        subject_digest: row.try_get(2)?,
                        status: DsrStatus::from_text(&status),
                        created_at_ms: row.try_get(4)?,
                        finished_at_ms: row.try_get(5)?,
                        detail: row.try_get(6)?,
                    })
                })
                .collect()
        })
    }

    fn suppress(&self, digest: &str, at_ms: i64) -> Result<bool, StoreError> {
        self.with_client(|client| {
            Ok(client.execute(
                "INSERT INTO suppressions (digest, created_at) VALUES ($1, $2) ON CONFLICT (digest) DO NOTHING",
                &[&digest, &at_ms],
            )? > 0)
        })
    }

    fn unsuppress(&self, digest: &str) -> Result<bool, StoreError> {
        self.with_client(|client| Ok(client.execute("DELETE FROM suppressions WHERE digest = $1", &[&digest])? > 0))
    }

    fn suppressed(&self) -> Result<Vec<String>, StoreError> {
        self.with_client(|client| {
            client
                .query("SELECT digest FROM suppressions ORDER BY digest", &[])?
                .iter()
                .map(|row| Ok(row.try_get(0)?))
                .collect()
        })
    }

    fn deliveries_of(&self, positions: &[LogPosition]) -> Result<Vec<PersonDelivery>, StoreError> {
        let wanted: Vec<i64> = positions.iter().map(|position| position.0 as i64).collect();
        self.with_client(|client| {
            let rows = client.query(
                "SELECT destination, position, attempts, last_error, 0 AS dead, id FROM outbox WHERE position = ANY($1)
                 UNION ALL
                 SELECT destination, position, attempts, last_error, 1 AS dead, id FROM dead_letters
                 WHERE position = ANY($1)
                 ORDER BY position, dead, id",
                &[&wanted],
            )?;
            rows.iter()
                .map(|row| {
                    let attempts: i32 = row.try_get(2)?;
                    let dead: i32 = row.try_get(4)?;
                    Ok(PersonDelivery {
                        destination: row.try_get(0)?,
                        position: LogPosition(row.try_get::<_, i64>(1)? as u64),
                        state: if dead == 1 {
                            "dead"
                        } else if attempts == 0 {
                            "pending"
                        } else {
                            "retrying"
                        },
                        attempts: attempts as u32,
                        last_error: row.try_get(3)?,
                    })
                })
                .collect()
        })
    }

    fn record_consent(&self, changes: &[ConsentChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            write_consent(&mut transaction, changes)?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn consent_of(&self, profiles: &[ProfileId]) -> Result<BTreeMap<ProfileId, Consent>, StoreError> {
        let ids: Vec<i64> = profiles.iter().map(|profile| profile.0 as i64).collect();
        self.with_client(|client| {
            let mut found: BTreeMap<ProfileId, Consent> = BTreeMap::new();
            for row in client.query(
                "SELECT profile_id, category, granted FROM profile_consent WHERE profile_id = ANY($1)",
                &[&ids],
            )? {
                let profile = ProfileId(row.try_get::<_, i64>(0)? as u64);
                found.entry(profile).or_default().insert(row.try_get(1)?, row.try_get(2)?);
            }
            Ok(found)
        })
    }

    fn consent_history(&self, profile: ProfileId) -> Result<Vec<ConsentChange>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT category, granted, position, at FROM consent_history WHERE profile_id = $1
                     ORDER BY position, category",
                    &[&(profile.0 as i64)],
                )?
                .iter()
                .map(|row| {
                    Ok(ConsentChange {
                        profile,
                        category: row.try_get(0)?,
                        granted: row.try_get(1)?,
                        position: LogPosition(row.try_get::<_, i64>(2)? as u64),
                        at_ms: row.try_get(3)?,
                    })
                })
                .collect()
        })
    }

    fn count_withheld(&self, destination: &str, counts: &BTreeMap<String, u64>) -> Result<(), StoreError> {
        self.with_client(|client| add_withheld(client, destination, counts))
    }

    fn withheld_counts(&self, destination: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT category, count FROM consent_withheld WHERE destination = $1 ORDER BY category",
                    &[&destination],
                )?
                .iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get::<_, i64>(1)? as u64)))
                .collect()
        })
    }

    fn set_tool_info(&self, kind: ToolKind, key: &str, info: &ToolInfo) -> Result<(), StoreError> {
        let text = serde_json::to_string(info).expect("an entry always serializes");
        self.with_client(|client| {
            client.execute(
                "INSERT INTO tool_registry (kind, key, info) VALUES ($1, $2, $3)
                 ON CONFLICT (kind, key) DO UPDATE SET info = excluded.info",
                &[&kind.as_str(), &key, &text],
            )?;
            Ok(())
        })
    }

    fn tool_infos(&self) -> Result<Vec<(ToolKind, String, ToolInfo)>, StoreError> {
        self.with_client(|client| {
            client
                .query("SELECT kind, key, info FROM tool_registry ORDER BY kind, key", &[])?
                .iter()
                .map(|row| {
                    let kind: String = row.try_get(0)?;
                    let info: String = row.try_get(2)?;
                    Ok((ToolKind::from_text(&kind), row.try_get(1)?, tool_info_from_text(&info)?))
                })
                .collect()
        })
    }

    fn record_shadow_traffic(&self, seen: &[ShadowKey]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            // One writer at a time keeps the bound on keys and the merges exact.
            transaction.execute("LOCK TABLE shadow_keys IN SHARE ROW EXCLUSIVE MODE", &[])?;
            for sighting in seen {
                let existing = transaction.query_opt(
                    "SELECT key_hint, requests, first_seen, last_seen, ips, user_agents FROM shadow_keys
                     WHERE key_digest = $1",
                    &[&sighting.key_digest],
                )?;
                let merged = match existing {
                    Some(row) => {
                        let mut known = ShadowKey {
                            key_digest: sighting.key_digest.clone(),
                            key_hint: row.try_get(0)?,
                            requests: row.try_get::<_, i64>(1)? as u64,
                            first_seen_ms: row.try_get(2)?,
                            last_seen_ms: row.try_get(3)?,
                            ips: samples_from_text(row.try_get(4)?),
                            user_agents: samples_from_text(row.try_get(5)?),
                        };
                        known.absorb(sighting);
                        known
                    }
                    None => {
                        let kept: i64 = transaction.query_one("SELECT COUNT(*) FROM shadow_keys", &[])?.try_get(0)?;
                        if kept >= MAX_SHADOW_KEYS {
                            continue;
                        }
                        sighting.clone()
                    }
                };
                transaction.execute(
                    "INSERT INTO shadow_keys (key_digest, key_hint, requests, first_seen, last_seen, ips, user_agents)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (key_digest) DO UPDATE SET requests = excluded.requests,
                         first_seen = excluded.first_seen, last_seen = excluded.last_seen,
                         ips = excluded.ips, user_agents = excluded.user_agents",
                    &[
                        &merged.key_digest,
                        &merged.key_hint,
                        &(merged.requests as i64),
                        &merged.first_seen_ms,
                        &merged.last_seen_ms,
                        &samples_to_text(&merged.ips),
                        &samples_to_text(&merged.user_agents),
                    ],
                )?;
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn shadow_traffic(&self, limit: usize) -> Result<Vec<ShadowKey>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT key_digest, key_hint, requests, first_seen, last_seen, ips, user_agents FROM shadow_keys
                     ORDER BY last_seen DESC, key_digest LIMIT $1",
                    &[&(limit as i64)],
                )?
                .iter()
                .map(|row| {
                    Ok(ShadowKey {
                        key_digest: row.try_get(0)?,
                        key_hint: row.try_get(1)?,
                        requests: row.try_get::<_, i64>(2)? as u64,
                        first_seen_ms: row.try_get(3)?,
                        last_seen_ms: row.try_get(4)?,
                        ips: samples_from_text(row.try_get(5)?),
                        user_agents: samples_from_text(row.try_get(6)?),
                    })
                })
                .collect()
        })
    }

    fn erase_person(&self, identifier: &Identifier) -> Result<ErasureReport, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            let report = erase(&mut transaction, identifier)?;
            transaction.commit()?;
            Ok(report)
        })
    }

    fn erasure_patterns_of(&self, identifier: &Identifier) -> Result<Vec<String>, StoreError> {
        self.with_client(|client| Ok(erasure_patterns(&person_of(client, identifier)?.values)))
    }
}

/// A person as an erasure finds them: their profiles (the live one and every
/// one merged into it), the values to look for in text, and their
/// identifiers as `type:value`.
struct Person {
    profiles: Vec<i64>,
    values: Vec<String>,
    identifiers: Vec<Vec<u8>>,
}

fn person_of(client: &mut impl GenericClient, identifier: &Identifier) -> Result<Person, StoreError> {
    let owner: Option<i64> = client
        .query_opt(
            "SELECT profile_id FROM identifiers WHERE type = $1 AND value = $2",
            &[&identifier.kind, &identifier.value.as_bytes()],
        )?
        .map(|row| row.try_get(0))
        .transpose()?;
    let mut profiles: Vec<i64> = Vec::new();
    if let Some(mut live) = owner {
        while let Some(next) = client
            .query_opt("SELECT merged_into FROM profiles WHERE id = $1", &[&live])?
            .and_then(|row| row.try_get::<_, Option<i64>>(0).ok().flatten())
        {
            live = next;
        }
        profiles = client
            .query(
                "WITH RECURSIVE part(id) AS (
                     SELECT $1::bigint UNION SELECT profiles.id FROM profiles JOIN part ON profiles.merged_into = part.id
                 ) SELECT id FROM part",
                &[&live],
            )?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
    }
    let mut values = vec![identifier.value.clone()];
    let mut identifiers: Vec<Vec<u8>> = vec![identifier.to_string().into_bytes()];
    for row in client.query("SELECT type, value FROM identifiers WHERE profile_id = ANY($1)", &[&profiles])? {
        let kind: String = row.try_get(0)?;
        let value = super::text_from_bytes(row.try_get(1)?)?;
        identifiers.push(format!("{kind}:{value}").into_bytes());
        values.push(value);
    }
    values.extend(profiles.iter().map(|profile| ProfileId(*profile as u64).to_string()));
    Ok(Person { profiles, values, identifiers })
}

/// Erases inside `transaction` (see [`GovernStore::erase_person`]).
fn erase(transaction: &mut Transaction<'_>, identifier: &Identifier) -> Result<ErasureReport, StoreError> {
    let mut report = ErasureReport::new();
    // Taken first, as every appender and resolver commit takes it, so the
    // erasure does not interleave with them.
    super::log::lock_log_head(transaction)?;
    let Person { profiles, values, identifiers: dropped } = person_of(transaction, identifier)?;
    let patterns: Vec<String> =
        erasure_patterns(&values).iter().map(|pattern| format!("%{}%", like_escape(pattern))).collect();
    let mut positions: Vec<i64> = transaction
        .query("SELECT position FROM profile_events WHERE profile_id = ANY($1)", &[&profiles])?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    for row in transaction
        .query("SELECT position FROM events WHERE convert_from(payload, 'UTF8') ILIKE ANY($1)", &[&patterns])?
    {
        positions.push(row.try_get(0)?);
    }
    positions.sort_unstable();
    positions.dedup();

    let mut count = |table: &'static str, rows: u64| *report.entry(table).or_insert(0) += rows;
    count(
        "message_ids",
        transaction.execute(
            "DELETE FROM message_ids m USING events e
             WHERE e.position = ANY($1) AND m.source_id = e.source_id AND m.message_id = e.message_id",
            &[&positions],
        )?,
    );
    for (table, sql) in [
        ("events", "DELETE FROM events WHERE position = ANY($1)"),
        ("profile_events", "DELETE FROM profile_events WHERE position = ANY($1)"),
        ("identity_history", "DELETE FROM identity_history WHERE position = ANY($1)"),
        ("unresolved_events", "DELETE FROM unresolved_events WHERE position = ANY($1)"),
        ("outbox", "DELETE FROM outbox WHERE position = ANY($1)"),
        ("dead_letters", "DELETE FROM dead_letters WHERE position = ANY($1)"),
    ] {
        count(table, transaction.execute(sql, &[&positions])?);
    }
    let live_removed: i64 = transaction
        .query_one("SELECT COUNT(*) FROM profiles WHERE id = ANY($1) AND state IS NOT NULL", &[&profiles])?
        .try_get(0)?;
    transaction.execute(
        "UPDATE audiences a SET size = GREATEST(a.size - m.members, 0)
         FROM (SELECT audience, COUNT(*) AS members FROM audience_members WHERE profile_id = ANY($1) GROUP BY audience) m
         WHERE a.name = m.audience",
        &[&profiles],
    )?;
    for (table, sql) in [
        ("profile_events", "DELETE FROM profile_events WHERE profile_id = ANY($1)"),
        ("identity_history", "DELETE FROM identity_history WHERE profile_id = ANY($1)"),
        ("identifiers", "DELETE FROM identifiers WHERE profile_id = ANY($1)"),
        ("profiles", "DELETE FROM profiles WHERE id = ANY($1)"),
        ("audience_members", "DELETE FROM audience_members WHERE profile_id = ANY($1)"),
        ("audience_history", "DELETE FROM audience_history WHERE profile_id = ANY($1)"),
        ("audience_states", "DELETE FROM audience_states WHERE profile_id = ANY($1)"),
        ("computed_trait_states", "DELETE FROM computed_trait_states WHERE profile_id = ANY($1)"),
        ("profile_consent", "DELETE FROM profile_consent WHERE profile_id = ANY($1)"),
        ("consent_history", "DELETE FROM consent_history WHERE profile_id = ANY($1)"),
    ] {
        count(table, transaction.execute(sql, &[&profiles])?);
    }
    count(
        "identity_history",
        transaction.execute("DELETE FROM identity_history WHERE dropped = ANY($1)", &[&dropped])?,
    );
    for (table, sql) in [
        ("identity_history", "DELETE FROM identity_history WHERE change ILIKE ANY($1)"),
        ("quarantine", "DELETE FROM quarantine WHERE convert_from(payload, 'UTF8') ILIKE ANY($1)"),
        ("outbox", "DELETE FROM outbox WHERE convert_from(payload, 'UTF8') ILIKE ANY($1)"),
        ("dead_letters", "DELETE FROM dead_letters WHERE convert_from(payload, 'UTF8') ILIKE ANY($1)"),
        ("plan_violations", "DELETE FROM plan_violations WHERE sample ILIKE ANY($1) OR message ILIKE ANY($1)"),
    ] {
        count(table, transaction.execute(sql, &[&patterns])?);
    }
    transaction.execute(
        "UPDATE identity_state SET live_profiles = GREATEST(live_profiles - $1, 0) WHERE id = 1",
        &[&live_removed],
    )?;
    transaction.execute("UPDATE stage_cursors SET epoch = epoch + 1 WHERE stage = $1", &[&Stage::RESOLVE.0])?;
    report.retain(|_, rows| *rows > 0);
    Ok(report)
}
