//! SQLite storage of the identity graph: profiles (merged ones keep a row
//! pointing at their survivor), the identifier index, which events belong to
//! which profile, the identity history, and the resolver's position, epoch
//! and rules — all written together in one transaction per resolver batch.

use super::profile_state;
use crate::identity::{history_record, MERGES_AND_DROPS};
use crate::{CommitOutcome, HistoryRecord, IdentityCommit, IdentityState, Stage, StoreError};
use rusqlite::{params, Connection, TransactionBehavior};
use tandem_core::{Identifier, IdentityChange, LogPosition, Profile, ProfileId};

fn json_error(error: serde_json::Error) -> StoreError {
    StoreError::Backend(Box::new(error))
}

pub fn state(connection: &Connection) -> Result<IdentityState, StoreError> {
    connection.execute_batch("BEGIN")?;
    let result = state_in_transaction(connection);
    connection.execute_batch("COMMIT")?;
    result
}

fn state_in_transaction(connection: &Connection) -> Result<IdentityState, StoreError> {
    let (next_profile_id, rules): (i64, Option<String>) =
        connection.query_row("SELECT next_profile_id, rules FROM identity_state WHERE id = 1", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    let (position, epoch) = cursor(connection)?;
    let live_profiles: i64 =
        connection.query_row("SELECT live_profiles FROM identity_state WHERE id = 1", [], |row| row.get(0))?;
    Ok(IdentityState {
        position: LogPosition(position as u64),
        next_profile_id: next_profile_id as u64,
        epoch: epoch as u64,
        rules: match rules {
            Some(text) => serde_json::from_str(&text).map_err(json_error)?,
            None => Default::default(),
        },
        live_profiles: live_profiles as u64,
    })
}

/// The resolver's `(position, epoch)` from `stage_cursors`.
fn cursor(connection: &Connection) -> Result<(i64, i64), StoreError> {
    Ok(connection.query_row(
        "SELECT position, epoch FROM stage_cursors WHERE stage = ?1",
        [Stage::RESOLVE.0],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?)
}

/// What a repair clears before its commit is written: the replaced
/// profiles' identifiers and timeline links, the replayed events' history.
pub struct Cleared<'a> {
    pub profiles: &'a [ProfileId],
    pub replayed: &'a [LogPosition],
}

/// Writes `commit` and moves the resolver's cursor; a repair clears what it
/// replaces first and starts a new epoch.
pub fn commit(
    connection: &mut Connection,
    commit: &IdentityCommit,
    repair: Option<Cleared<'_>>,
) -> Result<CommitOutcome, StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (position, epoch) = cursor(&transaction)?;
    if epoch as u64 != commit.epoch {
        return Ok(CommitOutcome::EpochChanged);
    }
    if position as u64 != commit.from.0 {
        return Ok(CommitOutcome::StalePosition);
    }
    let repairing = repair.is_some();
    // Live profiles gained (new or revived) minus lost (removed or merged
    // away), kept in `identity_state`: each write first tries the statement
    // that applies to a live row, and its row count says which case it was.
    let mut live_delta: i64 = 0;
    if let Some(cleared) = repair {
        let mut clear_identifiers = transaction.prepare_cached("DELETE FROM identifiers WHERE profile_id = ?1")?;
        let mut clear_events = transaction.prepare_cached("DELETE FROM profile_events WHERE profile_id = ?1")?;
        let mut clear_live = transaction.prepare_cached("DELETE FROM profiles WHERE id = ?1 AND state IS NOT NULL")?;
        let mut clear_profile = transaction.prepare_cached("DELETE FROM profiles WHERE id = ?1")?;
        for profile in cleared.profiles {
            clear_identifiers.execute([profile.0 as i64])?;
            clear_events.execute([profile.0 as i64])?;
            live_delta -= clear_live.execute([profile.0 as i64])? as i64;
            clear_profile.execute([profile.0 as i64])?;
        }
        let mut clear_history = transaction.prepare_cached("DELETE FROM identity_history WHERE position = ?1")?;
        for position in cleared.replayed {
            clear_history.execute([position.0 as i64])?;
        }
    }
    {
        let mut retire_live = transaction
            .prepare_cached("UPDATE profiles SET merged_into = ?2, state = NULL WHERE id = ?1 AND state IS NOT NULL")?;
        let mut retire = transaction.prepare_cached(
            "INSERT INTO profiles (id, merged_into, state) VALUES (?1, ?2, NULL)
             ON CONFLICT (id) DO UPDATE SET merged_into = excluded.merged_into, state = NULL",
        )?;
        let mut repoint = transaction.prepare_cached("UPDATE profiles SET merged_into = ?2 WHERE merged_into = ?1")?;
        let mut move_identifiers =
            transaction.prepare_cached("UPDATE identifiers SET profile_id = ?2 WHERE profile_id = ?1")?;
        let mut move_events =
            transaction.prepare_cached("UPDATE profile_events SET profile_id = ?2 WHERE profile_id = ?1")?;
        for (from, into) in &commit.merged {
            let (from, into) = (from.0 as i64, into.0 as i64);
            if retire_live.execute([from, into])? == 1 {
                live_delta -= 1;
            } else {
                retire.execute([from, into])?;
            }
            repoint.execute([from, into])?;
            move_identifiers.execute([from, into])?;
            move_events.execute([from, into])?;
        }
        let mut save_live =
            transaction.prepare_cached("UPDATE profiles SET state = ?2 WHERE id = ?1 AND state IS NOT NULL")?;
        let mut save_profile = transaction.prepare_cached(
            "INSERT INTO profiles (id, merged_into, state) VALUES (?1, NULL, ?2)
             ON CONFLICT (id) DO UPDATE SET merged_into = NULL, state = excluded.state",
        )?;
        for (id, record) in commit.profiles.records() {
            let row = params![id.0 as i64, record];
            if save_live.execute(row)? == 0 {
                save_profile.execute(row)?;
                live_delta += 1;
            }
        }
        let mut save_identifier = transaction.prepare_cached(
            "INSERT INTO identifiers (type, value, profile_id) VALUES (?1, ?2, ?3)
             ON CONFLICT (type, value) DO UPDATE SET profile_id = excluded.profile_id",
        )?;
        // Rows go in key order: consecutive inserts land on the same or the
        // next B-tree page, which SQLite then has at hand.
        let mut identifiers: Vec<&(Identifier, ProfileId)> = commit.identifiers.iter().collect();
        identifiers.sort_by(|(left, _), (right, _)| left.cmp(right));
        for (identifier, profile) in identifiers {
            save_identifier.execute(params![identifier.kind, identifier.value, profile.0 as i64])?;
        }
        let mut links: Vec<[i64; 3]> = commit
            .events
            .iter()
            .map(|link| [link.profile.0 as i64, link.timestamp_ms, link.position.0 as i64])
            .collect();
        links.sort_unstable();
        let insert_links = "INSERT INTO profile_events (profile_id, timestamp, position) VALUES ";
        let mut save_links = transaction.prepare_cached(&repeated(insert_links, "(?, ?, ?)", INSERT_CHUNK, ""))?;
        let mut save_link = transaction.prepare_cached(&repeated(insert_links, "(?, ?, ?)", 1, ""))?;
        let mut chunks = links.chunks_exact(INSERT_CHUNK);
        for rows in chunks.by_ref() {
            save_links.execute(rusqlite::params_from_iter(rows.iter().flatten()))?;
        }
        for row in chunks.remainder() {
            save_link.execute(*row)?;
        }
        let mut save_history = transaction.prepare_cached(
            "INSERT INTO identity_history (position, profile_id, change, recorded_at, dropped)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for record in &commit.history {
            let dropped = match &record.change {
                IdentityChange::Dropped { identifier, .. } => Some(identifier.to_string()),
                _ => None,
            };
            save_history.execute(params![
                record.position.map(|position| position.0 as i64),
                record.profile.map(|profile| profile.0 as i64),
                serde_json::to_string(&record.change).map_err(json_error)?,
                record.recorded_at_ms,
                dropped
            ])?;
        }
        let mut save_unresolved = transaction.prepare_cached(
            "INSERT INTO unresolved_events (position, reason) VALUES (?1, ?2) ON CONFLICT (position) DO NOTHING",
        )?;
        for unresolved in &commit.unresolved {
            save_unresolved.execute(params![unresolved.position.0 as i64, unresolved.reason])?;
        }
    }
    if let Some(rules) = &commit.rules {
        let text = serde_json::to_string(rules).map_err(json_error)?;
        transaction.execute("UPDATE identity_state SET rules = ?1 WHERE id = 1", [text])?;
    }
    let new_epoch = if repairing || commit.rules.is_some() { epoch + 1 } else { epoch };
    transaction.execute(
        "UPDATE identity_state SET next_profile_id = ?1, live_profiles = live_profiles + ?2 WHERE id = 1",
        params![commit.next_profile_id as i64, live_delta],
    )?;
    transaction.execute(
        "UPDATE stage_cursors SET position = ?1, epoch = ?2 WHERE stage = ?3",
        params![commit.to.0 as i64, new_epoch, Stage::RESOLVE.0],
    )?;
    transaction.commit()?;
    Ok(CommitOutcome::Committed)
}

/// Identifiers or profile ids per statement in the batched look-ups: a
/// statement per chunk rather than per key saves SQLite's per-statement
/// work, and keys are sorted so neighbouring look-ups share B-tree pages.
const LOOK_UP_CHUNK: usize = 256;

/// Rows per multi-row `INSERT`: one statement per chunk saves SQLite's
/// per-statement work (a full chunk's text is prepared once and cached).
const INSERT_CHUNK: usize = 128;

/// A statement text with `count` copies of `row` joined by commas, for a
/// `VALUES` list or an `IN` list.
fn repeated(head: &str, row: &str, count: usize, tail: &str) -> String {
    let mut text = String::with_capacity(head.len() + tail.len() + count * (row.len() + 1));
    text.push_str(head);
    for index in 0..count {
        if index > 0 {
            text.push(',');
        }
        text.push_str(row);
    }
    text.push_str(tail);
    text
}

/// The live owner of each identifier found, in sorted chunks inside one read
/// transaction.
pub fn identifier_owners(
    connection: &Connection,
    identifiers: &[Identifier],
) -> Result<Vec<(Identifier, ProfileId)>, StoreError> {
    let mut sorted: Vec<&Identifier> = identifiers.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut owners = Vec::new();
    for chunk in sorted.chunks(LOOK_UP_CHUNK) {
        let text = repeated(
            "WITH wanted (type, value) AS (VALUES ",
            "(?, ?)",
            chunk.len(),
            ") SELECT i.type, i.value, i.profile_id FROM wanted w
               JOIN identifiers i ON i.type = w.type AND i.value = w.value",
        );
        let mut statement = connection.prepare_cached(&text)?;
        let parameters =
            rusqlite::params_from_iter(chunk.iter().flat_map(|identifier| [&identifier.kind, &identifier.value]));
        let rows = statement.query_map(parameters, |row| {
            Ok((
                Identifier::new(row.get::<_, String>(0)?, row.get::<_, String>(1)?),
                ProfileId(row.get::<_, i64>(2)? as u64),
            ))
        })?;
        for row in rows {
            owners.push(row?);
        }
    }
    Ok(owners)
}

/// Events that carried one of `identifiers` and dropped it, with the profile
/// each went to.
pub fn dropped_at(
    connection: &Connection,
    identifiers: &[Identifier],
) -> Result<Vec<(LogPosition, Option<ProfileId>)>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT position, profile_id FROM identity_history WHERE dropped = ?1 AND position IS NOT NULL",
    )?;
    let mut found = Vec::new();
    for identifier in identifiers {
        let rows = statement.query_map([identifier.to_string()], |row| {
            Ok((
                LogPosition(row.get::<_, i64>(0)? as u64),
                row.get::<_, Option<i64>>(1)?.map(|id| ProfileId(id as u64)),
            ))
        })?;
        for row in rows {
            found.push(row?);
        }
    }
    Ok(found)
}

/// The live profiles among `ids`, in sorted chunks.
pub fn profiles(connection: &Connection, ids: &[ProfileId]) -> Result<Vec<Profile>, StoreError> {
    let mut sorted: Vec<i64> = ids.iter().map(|id| id.0 as i64).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut profiles = Vec::with_capacity(sorted.len());
    for chunk in sorted.chunks(LOOK_UP_CHUNK) {
        let text = repeated(
            "SELECT state FROM profiles WHERE id IN (",
            "?",
            chunk.len(),
            ") AND merged_into IS NULL AND state IS NOT NULL",
        );
        let mut statement = connection.prepare_cached(&text)?;
        let mut rows = statement.query(rusqlite::params_from_iter(chunk))?;
        while let Some(row) = rows.next()? {
            profiles.push(profile_state::decode(row.get_ref(0)?)?);
        }
    }
    Ok(profiles)
}

/// Follows merges from `id` to the live profile.
fn live_id(connection: &Connection, id: ProfileId) -> Result<Option<(ProfileId, Profile)>, StoreError> {
    let mut statement = connection.prepare_cached("SELECT merged_into, state FROM profiles WHERE id = ?1")?;
    let mut current = id;
    for _ in 0..64 {
        let mut rows = statement.query([current.0 as i64])?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        match (row.get::<_, Option<i64>>(0)?, row.get_ref(1)?) {
            (Some(into), _) => current = ProfileId(into as u64),
            (None, rusqlite::types::ValueRef::Null) => return Ok(None),
            (None, state) => return Ok(Some((current, profile_state::decode(state)?))),
        }
    }
    Ok(None)
}

pub fn profile(connection: &Connection, id: ProfileId) -> Result<Option<Profile>, StoreError> {
    Ok(live_id(connection, id)?.map(|(_, profile)| profile))
}

pub fn merges_and_drops(
    connection: &Connection,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, HistoryRecord)>, StoreError> {
    let before = before.map_or(i64::MAX, |id| id.min(i64::MAX as u64) as i64);
    let mut statement = connection.prepare_cached(&format!(
        "SELECT id, position, profile_id, change, recorded_at FROM identity_history
         WHERE {MERGES_AND_DROPS} AND id < ?1 ORDER BY id DESC LIMIT ?2"
    ))?;
    let rows = statement.query_map(params![before, limit as i64], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, Option<i64>>(1)?,
            row.get::<_, Option<i64>>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, i64>(4)?,
        ))
    })?;
    let mut records = Vec::new();
    for row in rows {
        let (id, position, profile, change, recorded_at_ms) = row?;
        records.push((id as u64, history_record(position, profile, &change, recorded_at_ms)?));
    }
    Ok(records)
}

pub fn history(connection: &Connection, id: ProfileId) -> Result<Vec<HistoryRecord>, StoreError> {
    let Some((live, _)) = live_id(connection, id)? else {
        return Ok(Vec::new());
    };
    let mut statement = connection.prepare_cached(
        "SELECT position, profile_id, change, recorded_at FROM identity_history
         WHERE profile_id = ?1 OR profile_id IN (SELECT id FROM profiles WHERE merged_into = ?1)
         ORDER BY id",
    )?;
    let rows = statement.query_map([live.0 as i64], |row| {
        Ok((
            row.get::<_, Option<i64>>(0)?,
            row.get::<_, Option<i64>>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, i64>(3)?,
        ))
    })?;
    let mut records = Vec::new();
    for row in rows {
        let (position, profile, change, recorded_at_ms) = row?;
        records.push(history_record(position, profile, &change, recorded_at_ms)?);
    }
    Ok(records)
}
