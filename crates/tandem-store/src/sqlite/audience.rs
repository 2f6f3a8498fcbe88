//! SQLite queries of the audience stage: definitions, memberships and their
//! history, per-profile states with their due-timers, and the stage's commit.

use crate::audience::{
    backfill_columns, backfill_from_columns, change_kind_from_text, rule_from_text, rule_to_text, state_from_text,
    state_to_text,
};
use crate::{
    AudienceCommit, AudienceCommitOutcome, AudienceDefinition, AudienceRecord, DailyChanges, Membership,
    MembershipChange, Stage, StoreError, StoredAudienceState,
};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tandem_core::ProfileId;

pub fn create(connection: &Connection, definition: &AudienceDefinition) -> Result<(), StoreError> {
    let inserted = connection.execute(
        "INSERT INTO audiences (name, rule, created_at, backfilled, backfill_after) VALUES (?1, ?2, ?3, 0, 0)
         ON CONFLICT (name) DO NOTHING",
        params![definition.name, rule_to_text(&definition.rule)?, definition.created_at_ms],
    )?;
    if inserted == 0 {
        return Err(StoreError::AudienceExists(definition.name.clone()));
    }
    Ok(())
}

const RECORD_QUERY: &str = "SELECT a.name, a.rule, a.created_at, a.backfilled, a.backfill_after, a.size
     FROM audiences a";

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, i64, bool, i64, i64)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?))
}

fn decode_record(
    (name, rule, created_at_ms, backfilled, after, size): (String, String, i64, bool, i64, i64),
) -> Result<AudienceRecord, StoreError> {
    Ok(AudienceRecord {
        definition: AudienceDefinition { name, rule: rule_from_text(&rule)?, created_at_ms },
        size: size as u64,
        backfill: backfill_from_columns(backfilled, after),
    })
}

pub fn list(connection: &Connection) -> Result<Vec<AudienceRecord>, StoreError> {
    let mut statement = connection.prepare_cached(&format!("{RECORD_QUERY} ORDER BY a.name"))?;
    let rows = statement.query_map([], record_from_row)?.collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(decode_record).collect()
}

pub fn get(connection: &Connection, name: &str) -> Result<Option<AudienceRecord>, StoreError> {
    let mut statement = connection.prepare_cached(&format!("{RECORD_QUERY} WHERE a.name = ?1"))?;
    statement.query_row([name], record_from_row).optional()?.map(decode_record).transpose()
}

pub fn delete(connection: &mut Connection, name: &str) -> Result<(), StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if transaction.execute("DELETE FROM audiences WHERE name = ?1", [name])? == 0 {
        return Err(StoreError::AudienceNotFound(name.to_owned()));
    }
    for sql in [
        "DELETE FROM audience_members WHERE audience = ?1",
        "DELETE FROM audience_history WHERE audience = ?1",
        "DELETE FROM audience_states WHERE audience = ?1",
    ] {
        transaction.execute(sql, [name])?;
    }
    transaction.commit()?;
    Ok(())
}

fn membership_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Membership> {
    Ok(Membership {
        audience: row.get(0)?,
        profile: ProfileId(row.get::<_, i64>(1)? as u64),
        entered_at_ms: row.get(2)?,
    })
}

pub fn members(
    connection: &Connection,
    name: &str,
    after: Option<ProfileId>,
    limit: usize,
) -> Result<Vec<Membership>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT audience, profile_id, entered_at FROM audience_members
         WHERE audience = ?1 AND profile_id > ?2 ORDER BY profile_id LIMIT ?3",
    )?;
    let after = after.map_or(-1, |id| id.0 as i64);
    let rows = statement.query_map(params![name, after, limit as i64], membership_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn profile_audiences(connection: &Connection, profile: ProfileId) -> Result<Vec<Membership>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT audience, profile_id, entered_at FROM audience_members WHERE profile_id = ?1 ORDER BY audience",
    )?;
    let rows = statement.query_map([profile.0 as i64], membership_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn history(connection: &Connection, name: &str, profile: ProfileId) -> Result<Vec<MembershipChange>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT audience, profile_id, change, at FROM audience_history
         WHERE audience = ?1 AND profile_id = ?2 ORDER BY id",
    )?;
    let rows = statement.query_map(params![name, profile.0 as i64], |row| {
        Ok(MembershipChange {
            audience: row.get(0)?,
            profile: ProfileId(row.get::<_, i64>(1)? as u64),
            kind: change_kind_from_text(&row.get::<_, String>(2)?),
            at_ms: row.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Milliseconds in a day, to group history by UTC day.
const DAY_MS: i64 = 86_400_000;

pub fn changes_by_day(connection: &Connection, name: &str) -> Result<Vec<DailyChanges>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT at / ?2, SUM(change = 'entered'), SUM(change = 'exited') FROM audience_history
         WHERE audience = ?1 GROUP BY 1 ORDER BY 1",
    )?;
    let rows = statement.query_map(params![name, DAY_MS], |row| {
        Ok(DailyChanges {
            day_start_ms: row.get::<_, i64>(0)? * DAY_MS,
            entered: row.get::<_, i64>(1)? as u64,
            exited: row.get::<_, i64>(2)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

type StateRow = (String, i64, String, Option<i64>);

fn state_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StateRow> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
}

fn decode_state((audience, profile, state, next_change_at_ms): StateRow) -> Result<StoredAudienceState, StoreError> {
    Ok(StoredAudienceState {
        audience,
        profile: ProfileId(profile as u64),
        state: state_from_text(&state)?,
        next_change_at_ms,
    })
}

pub fn states(connection: &Connection, profiles: &[ProfileId]) -> Result<Vec<StoredAudienceState>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT audience, profile_id, state, next_change_at FROM audience_states WHERE profile_id = ?1",
    )?;
    let mut found = Vec::new();
    for profile in profiles {
        for row in statement.query_map([profile.0 as i64], state_row)? {
            found.push(decode_state(row?)?);
        }
    }
    Ok(found)
}

pub fn due(connection: &Connection, now_ms: i64, limit: usize) -> Result<Vec<StoredAudienceState>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT audience, profile_id, state, next_change_at FROM audience_states
         WHERE next_change_at IS NOT NULL AND next_change_at <= ?1
         ORDER BY next_change_at, audience, profile_id LIMIT ?2",
    )?;
    let rows = statement.query_map(params![now_ms, limit as i64], state_row)?.collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(decode_state).collect()
}

pub fn retired(connection: &Connection, limit: usize) -> Result<Vec<ProfileId>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT DISTINCT t.profile_id FROM (
             SELECT profile_id FROM audience_states UNION SELECT profile_id FROM audience_members
             UNION SELECT profile_id FROM computed_trait_states
         ) t LEFT JOIN profiles p ON p.id = t.profile_id
         WHERE p.id IS NULL OR p.merged_into IS NOT NULL OR p.state IS NULL
         ORDER BY t.profile_id LIMIT ?1",
    )?;
    let rows = statement.query_map([limit as i64], |row| Ok(ProfileId(row.get::<_, i64>(0)? as u64)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Rows are written only for audiences that still exist: one deleted while
/// the stage evaluated it leaves nothing behind (nor in a new audience that
/// takes its name).
pub fn commit(connection: &mut Connection, commit: &AudienceCommit) -> Result<AudienceCommitOutcome, StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let position: i64 = transaction
        .query_row("SELECT position FROM stage_cursors WHERE stage = ?1", [Stage::AUDIENCE.0], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    if position as u64 != commit.from.0 {
        return Ok(AudienceCommitOutcome::StalePosition);
    }
    {
        let mut upsert = transaction.prepare_cached(
            "INSERT INTO audience_states (audience, profile_id, state, next_change_at)
             SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM audiences WHERE name = ?1)
             ON CONFLICT (audience, profile_id) DO UPDATE SET state = excluded.state,
                 next_change_at = excluded.next_change_at",
        )?;
        let mut remove =
            transaction.prepare_cached("DELETE FROM audience_states WHERE audience = ?1 AND profile_id = ?2")?;
        for write in &commit.states {
            match &write.state {
                Some(state) => upsert.execute(params![
                    write.audience,
                    write.profile.0 as i64,
                    state_to_text(state)?,
                    write.next_change_at_ms
                ])?,
                None => remove.execute(params![write.audience, write.profile.0 as i64])?,
            };
        }
        let mut enter = transaction.prepare_cached(
            "INSERT INTO audience_members (audience, profile_id, entered_at)
             SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM audiences WHERE name = ?1)
             ON CONFLICT (audience, profile_id) DO NOTHING",
        )?;
        let mut exit =
            transaction.prepare_cached("DELETE FROM audience_members WHERE audience = ?1 AND profile_id = ?2")?;
        let mut record = transaction.prepare_cached(
            "INSERT INTO audience_history (audience, profile_id, change, at)
             SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM audiences WHERE name = ?1)",
        )?;
        let mut resize = transaction.prepare_cached("UPDATE audiences SET size = size + ?2 WHERE name = ?1")?;
        for change in &commit.changes {
            let profile = change.profile.0 as i64;
            let moved = match change.kind {
                crate::MembershipChangeKind::Entered => {
                    enter.execute(params![change.audience, profile, change.at_ms])? as i64
                }
                crate::MembershipChangeKind::Exited => -(exit.execute(params![change.audience, profile])? as i64),
            };
            // A change that changes nothing (a second stage applying the
            // same timer) is neither counted nor recorded.
            if moved != 0 {
                resize.execute(params![change.audience, moved])?;
                record.execute(params![change.audience, profile, change.kind.as_str(), change.at_ms])?;
            }
        }
        let mut progress =
            transaction.prepare_cached("UPDATE audiences SET backfilled = ?2, backfill_after = ?3 WHERE name = ?1")?;
        for (name, backfill) in &commit.backfill {
            let (backfilled, after) = backfill_columns(*backfill);
            progress.execute(params![name, backfilled, after])?;
        }
    }
    super::computed::write(&transaction, commit)?;
    transaction.execute(
        "INSERT INTO stage_cursors (stage, position, epoch) VALUES (?1, ?2, ?3)
         ON CONFLICT (stage) DO UPDATE SET position = excluded.position, epoch = excluded.epoch",
        params![Stage::AUDIENCE.0, commit.to.0 as i64, commit.epoch as i64],
    )?;
    transaction.commit()?;
    Ok(AudienceCommitOutcome::Committed)
}
