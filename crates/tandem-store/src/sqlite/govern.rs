//! SQLite queries of governance: tracking plans and violation counts, data
//! subject requests, suppressions, and erasing a person. An erasure runs
//! with `secure_delete` on, so the pages it frees are overwritten with
//! zeros, and ends with a WAL checkpoint that truncates the WAL, so no copy
//! of an erased page is left in either file.

use super::SqliteStore;
use crate::govern::{
    erasure_patterns, like_escape, plan_from_text, plan_to_text, samples_from_text, samples_to_text,
    tool_info_from_text, ConsentChange, DsrRecord, ErasureReport, GovernStore, PersonDelivery, PlanViolationRecord,
    PlanViolationSummary, StoredPlan, MAX_SHADOW_KEYS,
};
use crate::{Stage, StoreError};
use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use std::collections::BTreeMap;
use tandem_core::govern::consent::Consent;
use tandem_core::govern::dsr::{DsrKind, DsrStatus};
use tandem_core::govern::plan::TrackingPlan;
use tandem_core::govern::stack::{ShadowKey, ToolInfo, ToolKind};
use tandem_core::{Identifier, LogPosition, ProfileId, SourceId};

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

/// Records consent changes inside `transaction` (the outbox stage's commit
/// or [`GovernStore::record_consent`]'s own).
pub(super) fn write_consent(transaction: &Transaction<'_>, changes: &[ConsentChange]) -> Result<(), StoreError> {
    let mut current = transaction.prepare_cached(
        "INSERT INTO profile_consent (profile_id, category, granted, position, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (profile_id, category) DO UPDATE
         SET granted = excluded.granted, position = excluded.position, updated_at = excluded.updated_at
         WHERE excluded.position >= profile_consent.position",
    )?;
    let mut history = transaction.prepare_cached(
        "INSERT INTO consent_history (profile_id, category, granted, position, at)
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
    )?;
    for change in changes {
        let row =
            params![change.profile.0 as i64, change.category, change.granted, change.position.0 as i64, change.at_ms];
        current.execute(row)?;
        history.execute(row)?;
    }
    Ok(())
}

/// Adds withheld counts inside `transaction`.
pub(super) fn add_withheld(
    transaction: &Transaction<'_>,
    destination: &str,
    counts: &BTreeMap<String, u64>,
) -> Result<(), StoreError> {
    let mut add = transaction.prepare_cached(
        "INSERT INTO consent_withheld (destination, category, count) VALUES (?1, ?2, ?3)
         ON CONFLICT (destination, category) DO UPDATE SET count = count + excluded.count",
    )?;
    for (category, count) in counts {
        add.execute(params![destination, category, *count as i64])?;
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

    fn insert_dsr(&self, request: &DsrRecord) -> Result<(), StoreError> {
        self.with_writer(|connection| {
            connection.execute(
                "INSERT INTO dsr_requests (id, kind, subject_digest, status, created_at, finished_at, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    request.id,
                    request.kind.as_str(),
                    request.subject_digest,
                    request.status.as_str(),
                    request.created_at_ms,
                    request.finished_at_ms,
                    request.detail
                ],
            )?;
            Ok(())
        })
    }

    fn finish_dsr(&self, id: &str, status: DsrStatus, detail: &str, at_ms: i64) -> Result<(), StoreError> {
        self.with_writer(|connection| {
            connection.execute(
                "UPDATE dsr_requests SET status = ?2, detail = ?3, finished_at = ?4 WHERE id = ?1",
                params![id, status.as_str(), detail, at_ms],
            )?;
            Ok(())
        })
    }

    fn list_dsr(&self, limit: usize) -> Result<Vec<DsrRecord>, StoreError> {
        self.dsr_requests(limit)
    }

    fn suppress(&self, digest: &str, at_ms: i64) -> Result<bool, StoreError> {
        self.with_writer(|connection| {
            Ok(connection.execute(
                "INSERT INTO suppressions (digest, created_at) VALUES (?1, ?2) ON CONFLICT (digest) DO NOTHING",
                params![digest, at_ms],
            )? > 0)
        })
    }

    fn unsuppress(&self, digest: &str) -> Result<bool, StoreError> {
        self.with_writer(|connection| {
            Ok(connection.execute("DELETE FROM suppressions WHERE digest = ?1", [digest])? > 0)
        })
    }

    fn suppressed(&self) -> Result<Vec<String>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached("SELECT digest FROM suppressions ORDER BY digest")?;
            let rows = statement.query_map([], |row| row.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn deliveries_of(&self, positions: &[LogPosition]) -> Result<Vec<PersonDelivery>, StoreError> {
        self.with_reader(|connection| {
            let mut found = Vec::new();
            let mut outbox = connection.prepare_cached(
                "SELECT destination, attempts, last_error FROM outbox WHERE position = ?1 ORDER BY id",
            )?;
            let mut dead = connection.prepare_cached(
                "SELECT destination, attempts, last_error FROM dead_letters WHERE position = ?1 ORDER BY id",
            )?;
            for position in positions {
                let at = position.0 as i64;
                for row in outbox.query_map([at], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, Option<String>>(2)?))
                })? {
                    let (destination, attempts, last_error) = row?;
                    let state = if attempts == 0 { "pending" } else { "retrying" };
                    found.push(PersonDelivery {
                        destination,
                        position: *position,
                        state,
                        attempts: attempts as u32,
                        last_error,
                    });
                }
                for row in dead.query_map([at], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?, row.get::<_, Option<String>>(2)?))
                })? {
                    let (destination, attempts, last_error) = row?;
                    found.push(PersonDelivery {
                        destination,
                        position: *position,
                        state: "dead",
                        attempts: attempts as u32,
                        last_error,
                    });
                }
            }
            Ok(found)
        })
    }

    fn record_consent(&self, changes: &[ConsentChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            write_consent(&transaction, changes)?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn consent_of(&self, profiles: &[ProfileId]) -> Result<BTreeMap<ProfileId, Consent>, StoreError> {
        self.with_reader(|connection| {
            let mut statement =
                connection.prepare_cached("SELECT category, granted FROM profile_consent WHERE profile_id = ?1")?;
            let mut found = BTreeMap::new();
            for profile in profiles {
                let consent: Consent = statement
                    .query_map([profile.0 as i64], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                if !consent.is_empty() {
                    found.insert(*profile, consent);
                }
            }
            Ok(found)
        })
    }

    fn consent_history(&self, profile: ProfileId) -> Result<Vec<ConsentChange>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT category, granted, position, at FROM consent_history WHERE profile_id = ?1
                 ORDER BY position, category",
            )?;
            let rows = statement.query_map([profile.0 as i64], |row| {
                Ok(ConsentChange {
                    profile,
                    category: row.get(0)?,
                    granted: row.get(1)?,
                    position: LogPosition(row.get::<_, i64>(2)? as u64),
                    at_ms: row.get(3)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn count_withheld(&self, destination: &str, counts: &BTreeMap<String, u64>) -> Result<(), StoreError> {
        if counts.is_empty() {
            return Ok(());
        }
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            add_withheld(&transaction, destination, counts)?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn withheld_counts(&self, destination: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT category, count FROM consent_withheld WHERE destination = ?1 ORDER BY category",
            )?;
            let rows = statement.query_map([destination], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn set_tool_info(&self, kind: ToolKind, key: &str, info: &ToolInfo) -> Result<(), StoreError> {
        let text = serde_json::to_string(info).expect("an entry always serializes");
        self.with_writer(|connection| {
            connection.execute(
                "INSERT INTO tool_registry (kind, key, info) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kind, key) DO UPDATE SET info = excluded.info",
                params![kind.as_str(), key, text],
            )?;
            Ok(())
        })
    }

    fn tool_infos(&self) -> Result<Vec<(ToolKind, String, ToolInfo)>, StoreError> {
        let rows: Vec<(String, String, String)> = self.with_reader(|connection| {
            let mut statement =
                connection.prepare_cached("SELECT kind, key, info FROM tool_registry ORDER BY kind, key")?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })?;
        rows.into_iter()
            .map(|(kind, key, info)| Ok((ToolKind::from_text(&kind), key, tool_info_from_text(&info)?)))
            .collect()
    }

    fn record_shadow_traffic(&self, seen: &[ShadowKey]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for sighting in seen {
                let existing = transaction
                    .query_row(
                        "SELECT key_hint, requests, first_seen, last_seen, ips, user_agents FROM shadow_keys
                         WHERE key_digest = ?1",
                        [&sighting.key_digest],
                        |row| {
                            Ok(ShadowKey {
                                key_digest: sighting.key_digest.clone(),
                                key_hint: row.get(0)?,
                                requests: row.get::<_, i64>(1)? as u64,
                                first_seen_ms: row.get(2)?,
                                last_seen_ms: row.get(3)?,
                                ips: samples_from_text(&row.get::<_, String>(4)?),
                                user_agents: samples_from_text(&row.get::<_, String>(5)?),
                            })
                        },
                    )
                    .optional()?;
                let merged = match existing {
                    Some(mut known) => {
                        known.absorb(sighting);
                        known
                    }
                    None => {
                        let kept: i64 =
                            transaction.query_row("SELECT COUNT(*) FROM shadow_keys", [], |row| row.get(0))?;
                        if kept >= MAX_SHADOW_KEYS {
                            continue;
                        }
                        sighting.clone()
                    }
                };
                transaction.execute(
                    "INSERT INTO shadow_keys (key_digest, key_hint, requests, first_seen, last_seen, ips, user_agents)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (key_digest) DO UPDATE SET requests = excluded.requests,
                         first_seen = excluded.first_seen, last_seen = excluded.last_seen,
                         ips = excluded.ips, user_agents = excluded.user_agents",
                    params![
                        merged.key_digest,
                        merged.key_hint,
                        merged.requests as i64,
                        merged.first_seen_ms,
                        merged.last_seen_ms,
                        samples_to_text(&merged.ips),
                        samples_to_text(&merged.user_agents)
                    ],
                )?;
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn shadow_traffic(&self, limit: usize) -> Result<Vec<ShadowKey>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT key_digest, key_hint, requests, first_seen, last_seen, ips, user_agents FROM shadow_keys
                 ORDER BY last_seen DESC, key_digest LIMIT ?1",
            )?;
            let rows = statement.query_map([limit as i64], |row| {
                Ok(ShadowKey {
                    key_digest: row.get(0)?,
                    key_hint: row.get(1)?,
                    requests: row.get::<_, i64>(2)? as u64,
                    first_seen_ms: row.get(3)?,
                    last_seen_ms: row.get(4)?,
                    ips: samples_from_text(&row.get::<_, String>(5)?),
                    user_agents: samples_from_text(&row.get::<_, String>(6)?),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn erase_person(&self, identifier: &Identifier) -> Result<ErasureReport, StoreError> {
        self.with_writer(|connection| {
            connection.pragma_update(None, "secure_delete", true)?;
            let result = (|| {
                let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let report = erase(&transaction, identifier)?;
                transaction.commit()?;
                Ok::<_, StoreError>(report)
            })();
            let reset = connection.pragma_update(None, "secure_delete", false);
            let report = result?;
            reset?;
            // Copy the zeroed pages into the database file and empty the WAL,
            // which still holds the pages as they were before the erasure.
            connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            Ok(report)
        })
    }

    fn erasure_patterns_of(&self, identifier: &Identifier) -> Result<Vec<String>, StoreError> {
        self.with_reader(|connection| Ok(erasure_patterns(&person_of(connection, identifier)?.values)))
    }
}

/// A person as an erasure finds them: their profiles (the live one and every
/// one merged into it), the values to look for in text, and their
/// identifiers as `type:value`.
struct Person {
    profiles: Vec<i64>,
    values: Vec<String>,
    identifiers: Vec<String>,
}

fn person_of(connection: &rusqlite::Connection, identifier: &Identifier) -> Result<Person, StoreError> {
    let owner: Option<i64> = connection
        .query_row(
            "SELECT profile_id FROM identifiers WHERE type = ?1 AND value = ?2",
            params![identifier.kind, identifier.value],
            |row| row.get(0),
        )
        .optional()?;
    // The live profile, then every profile merged into it.
    let mut profiles: Vec<i64> = Vec::new();
    if let Some(mut live) = owner {
        while let Some(Some(next)) = connection
            .query_row("SELECT merged_into FROM profiles WHERE id = ?1", [live], |row| row.get::<_, Option<i64>>(0))
            .optional()?
        {
            live = next;
        }
        let mut statement = connection.prepare(
            "WITH RECURSIVE part(id) AS (
                 SELECT ?1 UNION SELECT profiles.id FROM profiles JOIN part ON profiles.merged_into = part.id
             ) SELECT id FROM part",
        )?;
        profiles = statement.query_map([live], |row| row.get(0))?.collect::<Result<_, _>>()?;
    }
    let mut values = vec![identifier.value.clone()];
    let mut identifiers = vec![identifier.to_string()];
    for profile in &profiles {
        let mut statement = connection.prepare_cached("SELECT type, value FROM identifiers WHERE profile_id = ?1")?;
        let held: Vec<(String, String)> =
            statement.query_map([profile], |row| Ok((row.get(0)?, row.get(1)?)))?.collect::<Result<_, _>>()?;
        for (kind, value) in held {
            identifiers.push(format!("{kind}:{value}"));
            values.push(value);
        }
        values.push(ProfileId(*profile as u64).to_string());
    }
    Ok(Person { profiles, values, identifiers })
}

fn dsr_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DsrRecord> {
    let kind: String = row.get(1)?;
    let status: String = row.get(3)?;
    Ok(DsrRecord {
        id: row.get(0)?,
        kind: kind.parse().unwrap_or(DsrKind::Access),
        subject_digest: row.get(2)?,
        status: DsrStatus::from_text(&status),
        created_at_ms: row.get(4)?,
        finished_at_ms: row.get(5)?,
        detail: row.get(6)?,
    })
}

impl SqliteStore {
    fn dsr_requests(&self, limit: usize) -> Result<Vec<DsrRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, kind, subject_digest, status, created_at, finished_at, detail
                 FROM dsr_requests ORDER BY created_at DESC, id DESC LIMIT ?1",
            )?;
            let rows = statement.query_map([limit as i64], dsr_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

/// Erases inside `transaction` (see [`GovernStore::erase_person`]).
fn erase(transaction: &Transaction<'_>, identifier: &Identifier) -> Result<ErasureReport, StoreError> {
    let mut report = ErasureReport::new();
    let Person { profiles, values, identifiers: dropped } = person_of(transaction, identifier)?;
    let mut positions: Vec<i64> = Vec::new();
    for profile in &profiles {
        let mut statement = transaction.prepare_cached("SELECT position FROM profile_events WHERE profile_id = ?1")?;
        positions.extend(statement.query_map([profile], |row| row.get::<_, i64>(0))?.collect::<Result<Vec<_>, _>>()?);
    }
    let patterns = erasure_patterns(&values);
    for pattern in &patterns {
        let like = format!("%{}%", like_escape(pattern));
        let mut statement =
            transaction.prepare_cached("SELECT position FROM events WHERE payload LIKE ?1 ESCAPE '\\'")?;
        positions.extend(statement.query_map([&like], |row| row.get::<_, i64>(0))?.collect::<Result<Vec<_>, _>>()?);
    }
    positions.sort_unstable();
    positions.dedup();

    let mut count = |table: &'static str, rows: usize| *report.entry(table).or_insert(0) += rows as u64;
    for position in &positions {
        let claim: Option<(String, String)> = transaction
            .query_row("SELECT source_id, message_id FROM events WHERE position = ?1", [position], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        if let Some((source_id, message_id)) = claim {
            count(
                "message_ids",
                transaction.execute(
                    "DELETE FROM message_ids WHERE source_id = ?1 AND message_id = ?2",
                    params![source_id, message_id],
                )?,
            );
        }
        count("events", transaction.execute("DELETE FROM events WHERE position = ?1", [position])?);
        count("profile_events", transaction.execute("DELETE FROM profile_events WHERE position = ?1", [position])?);
        count("identity_history", transaction.execute("DELETE FROM identity_history WHERE position = ?1", [position])?);
        count(
            "unresolved_events",
            transaction.execute("DELETE FROM unresolved_events WHERE position = ?1", [position])?,
        );
        count("outbox", transaction.execute("DELETE FROM outbox WHERE position = ?1", [position])?);
        count("dead_letters", transaction.execute("DELETE FROM dead_letters WHERE position = ?1", [position])?);
    }
    let live_removed: i64 = profiles
        .iter()
        .map(|profile| {
            transaction.query_row(
                "SELECT COUNT(*) FROM profiles WHERE id = ?1 AND state IS NOT NULL",
                [profile],
                |row| row.get::<_, i64>(0),
            )
        })
        .sum::<rusqlite::Result<i64>>()?;
    for profile in &profiles {
        let mut statement =
            transaction.prepare_cached("SELECT audience FROM audience_members WHERE profile_id = ?1")?;
        let audiences: Vec<String> = statement.query_map([profile], |row| row.get(0))?.collect::<Result<_, _>>()?;
        for audience in audiences {
            transaction.execute("UPDATE audiences SET size = size - 1 WHERE name = ?1 AND size > 0", [&audience])?;
        }
        for (table, sql) in [
            ("profile_events", "DELETE FROM profile_events WHERE profile_id = ?1"),
            ("identity_history", "DELETE FROM identity_history WHERE profile_id = ?1"),
            ("identifiers", "DELETE FROM identifiers WHERE profile_id = ?1"),
            ("profiles", "DELETE FROM profiles WHERE id = ?1"),
            ("audience_members", "DELETE FROM audience_members WHERE profile_id = ?1"),
            ("audience_history", "DELETE FROM audience_history WHERE profile_id = ?1"),
            ("audience_states", "DELETE FROM audience_states WHERE profile_id = ?1"),
            ("computed_trait_states", "DELETE FROM computed_trait_states WHERE profile_id = ?1"),
            ("profile_consent", "DELETE FROM profile_consent WHERE profile_id = ?1"),
            ("consent_history", "DELETE FROM consent_history WHERE profile_id = ?1"),
        ] {
            count(table, transaction.execute(sql, [profile])?);
        }
    }
    for text in &dropped {
        count("identity_history", transaction.execute("DELETE FROM identity_history WHERE dropped = ?1", [text])?);
    }
    for pattern in &patterns {
        let like = format!("%{}%", like_escape(pattern));
        for (table, sql) in [
            ("identity_history", "DELETE FROM identity_history WHERE change LIKE ?1 ESCAPE '\\'"),
            ("quarantine", "DELETE FROM quarantine WHERE payload LIKE ?1 ESCAPE '\\'"),
            ("outbox", "DELETE FROM outbox WHERE payload LIKE ?1 ESCAPE '\\'"),
            ("dead_letters", "DELETE FROM dead_letters WHERE payload LIKE ?1 ESCAPE '\\'"),
            (
                "plan_violations",
                "DELETE FROM plan_violations WHERE sample LIKE ?1 ESCAPE '\\' OR message LIKE ?1 ESCAPE '\\'",
            ),
        ] {
            count(table, transaction.execute(sql, [&like])?);
        }
    }
    transaction
        .execute("UPDATE identity_state SET live_profiles = MAX(live_profiles - ?1, 0) WHERE id = 1", [live_removed])?;
    // A running resolver caches profiles: a new epoch makes it start again
    // from storage rather than write the erased profile back.
    transaction.execute("UPDATE stage_cursors SET epoch = epoch + 1 WHERE stage = ?1", [Stage::RESOLVE.0])?;
    report.retain(|_, rows| *rows > 0);
    Ok(report)
}
