//! SQLite queries of computed traits: definitions with their backfill
//! progress, and per-profile states, values and due-timers, written inside
//! the audience stage's commit.

use crate::audience::{
    backfill_columns, backfill_from_columns, computed_state_from_text, computed_state_to_text, definition_from_text,
    definition_to_text, value_from_text, value_to_text,
};
use crate::{AudienceCommit, ComputedTraitRecord, StoreError, StoredComputedTrait};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use tandem_core::audience::ComputedTraitDefinition;
use tandem_core::ProfileId;

pub fn create(
    connection: &Connection,
    name: &str,
    definition: &ComputedTraitDefinition,
    created_at_ms: i64,
) -> Result<(), StoreError> {
    let inserted = connection.execute(
        "INSERT INTO computed_traits (name, definition, created_at, backfilled, backfill_after)
         VALUES (?1, ?2, ?3, 0, 0) ON CONFLICT (name) DO NOTHING",
        params![name, definition_to_text(definition)?, created_at_ms],
    )?;
    if inserted == 0 {
        return Err(StoreError::ComputedTraitExists(name.to_owned()));
    }
    Ok(())
}

const RECORD_QUERY: &str = "SELECT name, definition, created_at, backfilled, backfill_after FROM computed_traits";

type RecordRow = (String, String, i64, bool, i64);

fn record_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RecordRow> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
}

fn decode_record(
    (name, definition, created_at_ms, backfilled, after): RecordRow,
) -> Result<ComputedTraitRecord, StoreError> {
    Ok(ComputedTraitRecord {
        name,
        definition: definition_from_text(&definition)?,
        created_at_ms,
        backfill: backfill_from_columns(backfilled, after),
    })
}

pub fn list(connection: &Connection) -> Result<Vec<ComputedTraitRecord>, StoreError> {
    let mut statement = connection.prepare_cached(&format!("{RECORD_QUERY} ORDER BY name"))?;
    let rows = statement.query_map([], record_row)?.collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(decode_record).collect()
}

pub fn get(connection: &Connection, name: &str) -> Result<Option<ComputedTraitRecord>, StoreError> {
    let mut statement = connection.prepare_cached(&format!("{RECORD_QUERY} WHERE name = ?1"))?;
    statement.query_row([name], record_row).optional()?.map(decode_record).transpose()
}

pub fn delete(connection: &mut Connection, name: &str) -> Result<(), StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if transaction.execute("DELETE FROM computed_traits WHERE name = ?1", [name])? == 0 {
        return Err(StoreError::ComputedTraitNotFound(name.to_owned()));
    }
    transaction.execute("DELETE FROM computed_trait_states WHERE name = ?1", [name])?;
    transaction.commit()?;
    Ok(())
}

type StateRow = (String, i64, String, Option<String>, Option<i64>);

fn state_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StateRow> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
}

fn decode_state((name, profile, state, value, next_change_at_ms): StateRow) -> Result<StoredComputedTrait, StoreError> {
    Ok(StoredComputedTrait {
        name,
        profile: ProfileId(profile as u64),
        state: computed_state_from_text(&state)?,
        value: value_from_text(value.as_deref())?,
        next_change_at_ms,
    })
}

pub fn states(connection: &Connection, profiles: &[ProfileId]) -> Result<Vec<StoredComputedTrait>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT name, profile_id, state, value, next_change_at FROM computed_trait_states WHERE profile_id = ?1",
    )?;
    let mut found = Vec::new();
    for profile in profiles {
        for row in statement.query_map([profile.0 as i64], state_row)? {
            found.push(decode_state(row?)?);
        }
    }
    Ok(found)
}

pub fn due(connection: &Connection, now_ms: i64, limit: usize) -> Result<Vec<StoredComputedTrait>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT name, profile_id, state, value, next_change_at FROM computed_trait_states
         WHERE next_change_at IS NOT NULL AND next_change_at <= ?1
         ORDER BY next_change_at, name, profile_id LIMIT ?2",
    )?;
    let rows = statement.query_map(params![now_ms, limit as i64], state_row)?.collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(decode_state).collect()
}

/// The computed-trait part of an audience commit, inside its transaction.
pub fn write(transaction: &Transaction<'_>, commit: &AudienceCommit) -> Result<(), StoreError> {
    let mut upsert = transaction.prepare_cached(
        "INSERT INTO computed_trait_states (name, profile_id, state, value, next_change_at)
         SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM computed_traits WHERE name = ?1)
         ON CONFLICT (name, profile_id) DO UPDATE SET state = excluded.state, value = excluded.value,
             next_change_at = excluded.next_change_at",
    )?;
    let mut remove =
        transaction.prepare_cached("DELETE FROM computed_trait_states WHERE name = ?1 AND profile_id = ?2")?;
    for write in &commit.computed {
        match &write.state {
            Some(state) => upsert.execute(params![
                write.name,
                write.profile.0 as i64,
                computed_state_to_text(state)?,
                value_to_text(write.value.as_ref()),
                write.next_change_at_ms
            ])?,
            None => remove.execute(params![write.name, write.profile.0 as i64])?,
        };
    }
    let mut progress = transaction
        .prepare_cached("UPDATE computed_traits SET backfilled = ?2, backfill_after = ?3 WHERE name = ?1")?;
    for (name, backfill) in &commit.computed_backfill {
        let (backfilled, after) = backfill_columns(*backfill);
        progress.execute(params![name, backfilled, after])?;
    }
    Ok(())
}
