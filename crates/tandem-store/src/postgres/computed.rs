//! Computed traits in PostgreSQL: definitions with their backfill progress,
//! and per-profile states, values and due-timers, written inside the
//! audience stage's commit (see `audience.rs`).

use super::PostgresStore;
use crate::audience::{
    backfill_columns, backfill_from_columns, computed_state_from_text, computed_state_to_text, definition_from_text,
    definition_to_text, value_from_text, value_to_text,
};
use crate::{AudienceCommit, ComputedTraitRecord, StoreError, StoredComputedTrait};
use postgres::{Row, Transaction};
use tandem_core::audience::ComputedTraitDefinition;
use tandem_core::ProfileId;

pub fn create(
    store: &PostgresStore,
    name: &str,
    definition: &ComputedTraitDefinition,
    created_at_ms: i64,
) -> Result<(), StoreError> {
    let text = definition_to_text(definition)?;
    store.with_client(|client| {
        let inserted = client.execute(
            "INSERT INTO computed_traits (name, definition, created_at, backfilled, backfill_after)
             VALUES ($1, $2, $3, FALSE, 0) ON CONFLICT (name) DO NOTHING",
            &[&name, &text, &created_at_ms],
        )?;
        if inserted == 0 {
            return Err(StoreError::ComputedTraitExists(name.to_owned()));
        }
        Ok(())
    })
}

const RECORD_QUERY: &str = "SELECT name, definition, created_at, backfilled, backfill_after FROM computed_traits";

fn decode_record(row: &Row) -> Result<ComputedTraitRecord, StoreError> {
    let definition: String = row.try_get(1)?;
    Ok(ComputedTraitRecord {
        name: row.try_get(0)?,
        definition: definition_from_text(&definition)?,
        created_at_ms: row.try_get(2)?,
        backfill: backfill_from_columns(row.try_get(3)?, row.try_get(4)?),
    })
}

pub fn list(store: &PostgresStore) -> Result<Vec<ComputedTraitRecord>, StoreError> {
    store.with_client(|client| {
        client.query(&format!("{RECORD_QUERY} ORDER BY name"), &[])?.iter().map(decode_record).collect()
    })
}

pub fn get(store: &PostgresStore, name: &str) -> Result<Option<ComputedTraitRecord>, StoreError> {
    store.with_client(|client| {
        client.query_opt(&format!("{RECORD_QUERY} WHERE name = $1"), &[&name])?.as_ref().map(decode_record).transpose()
    })
}

pub fn delete(store: &PostgresStore, name: &str) -> Result<(), StoreError> {
    store.with_client(|client| {
        let mut transaction = client.transaction()?;
        if transaction.execute("DELETE FROM computed_traits WHERE name = $1", &[&name])? == 0 {
            return Err(StoreError::ComputedTraitNotFound(name.to_owned()));
        }
        transaction.execute("DELETE FROM computed_trait_states WHERE name = $1", &[&name])?;
        transaction.commit()?;
        Ok(())
    })
}

fn decode_state(row: &Row) -> Result<StoredComputedTrait, StoreError> {
    let state: String = row.try_get(2)?;
    let value: Option<String> = row.try_get(3)?;
    Ok(StoredComputedTrait {
        name: row.try_get(0)?,
        profile: ProfileId(row.try_get::<_, i64>(1)? as u64),
        state: computed_state_from_text(&state)?,
        value: value_from_text(value.as_deref())?,
        next_change_at_ms: row.try_get(4)?,
    })
}

pub fn states(store: &PostgresStore, profiles: &[ProfileId]) -> Result<Vec<StoredComputedTrait>, StoreError> {
    let ids: Vec<i64> = profiles.iter().map(|id| id.0 as i64).collect();
    store.with_client(|client| {
        client
            .query(
                "SELECT name, profile_id, state, value, next_change_at FROM computed_trait_states
                 WHERE profile_id = ANY($1)",
                &[&ids],
            )?
            .iter()
            .map(decode_state)
            .collect()
    })
}

pub fn due(store: &PostgresStore, now_ms: i64, limit: usize) -> Result<Vec<StoredComputedTrait>, StoreError> {
    store.with_client(|client| {
        client
            .query(
                "SELECT name, profile_id, state, value, next_change_at FROM computed_trait_states
                 WHERE next_change_at IS NOT NULL AND next_change_at <= $1
                 ORDER BY next_change_at, name, profile_id LIMIT $2",
                &[&now_ms, &(limit as i64)],
            )?
            .iter()
            .map(decode_state)
            .collect()
    })
}

/// One state row to write: name, profile, state text (`None` removes the
/// row), value text and due-timer.
type EncodedState = (String, i64, Option<String>, Option<String>, Option<i64>);

/// The computed-trait part of a commit, encoded before the transaction
/// opens.
pub struct Encoded {
    states: Vec<EncodedState>,
    backfill: Vec<(String, bool, i64)>,
}

impl Encoded {
    pub fn new(commit: &AudienceCommit) -> Result<Encoded, StoreError> {
        let states = commit
            .computed
            .iter()
            .map(|write| {
                let state = write.state.as_ref().map(computed_state_to_text).transpose()?;
                Ok((
                    write.name.clone(),
                    write.profile.0 as i64,
                    state,
                    value_to_text(write.value.as_ref()),
                    write.next_change_at_ms,
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        let backfill = commit
            .computed_backfill
            .iter()
            .map(|(name, backfill)| {
                let (backfilled, after) = backfill_columns(*backfill);
                (name.clone(), backfilled, after)
            })
            .collect();
        Ok(Encoded { states, backfill })
    }
}

/// Writes the computed-trait part of an audience commit in its transaction.
pub fn write(transaction: &mut Transaction<'_>, encoded: &Encoded) -> Result<(), StoreError> {
    let upsert = transaction.prepare(
        "INSERT INTO computed_trait_states (name, profile_id, state, value, next_change_at)
         SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM computed_traits WHERE name = $1)
         ON CONFLICT (name, profile_id) DO UPDATE SET state = excluded.state, value = excluded.value,
             next_change_at = excluded.next_change_at",
    )?;
    let remove = transaction.prepare("DELETE FROM computed_trait_states WHERE name = $1 AND profile_id = $2")?;
    for (name, profile, state, value, next) in &encoded.states {
        match state {
            Some(state) => transaction.execute(&upsert, &[name, profile, state, value, next])?,
            None => transaction.execute(&remove, &[name, profile])?,
        };
    }
    for (name, backfilled, after) in &encoded.backfill {
        transaction.execute(
            "UPDATE computed_traits SET backfilled = $2, backfill_after = $3 WHERE name = $1",
            &[name, backfilled, after],
        )?;
    }
    Ok(())
}
