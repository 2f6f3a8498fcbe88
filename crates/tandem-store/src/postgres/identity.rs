//! The identity graph in PostgreSQL: profiles (merged ones keep a row
//! pointing at their survivor), the identifier index, which events belong to
//! which profile, the identity history, and the resolver's position, epoch
//! and rules — all written together in one transaction per resolver batch.
//!
//! A commit locks the resolver's `stage_cursors` row before checking its
//! position and epoch, so two resolvers (on two nodes) cannot both commit
//! from the same position: the second waits, then sees the moved cursor and
//! gets [`CommitOutcome::StalePosition`]. Rows are written with one `unnest`
//! statement per table; merges, whose order matters, one after another.

use super::log::{log_entry_from_row, LOG_ENTRY_COLUMNS};
use super::{json_error, text_from_bytes, PostgresStore};
use crate::identity::{history_record, MERGES_AND_DROPS};
use crate::{
    CommitOutcome, CommitProfiles, HistoryRecord, IdentityCommit, IdentityRepair, IdentityState, IdentityStore,
    LogEntry, Stage, StoreError, TimelineCursor, UnresolvedEvent,
};
use postgres::{GenericClient, IsolationLevel, Transaction};
use std::collections::HashMap;
use tandem_core::{Identifier, IdentityChange, IdentityRules, LogPosition, Profile, ProfileId};

/// How many merges [`live_profile`] follows before giving up on a chain.
const MAX_MERGE_CHAIN: i32 = 64;

/// A profile from its stored state: the one decoder every read of a profile uses.
fn decode_profile(state: &str) -> Result<Profile, StoreError> {
    serde_json::from_str(state).map_err(json_error)
}

fn state(transaction: &mut Transaction<'_>) -> Result<IdentityState, StoreError> {
    let row = transaction.query_one("SELECT next_profile_id, rules FROM identity_state WHERE id = 1", &[])?;
    let next_profile_id: i64 = row.try_get(0)?;
    let rules: Option<String> = row.try_get(1)?;
    let cursor =
        transaction.query_one("SELECT position, epoch FROM stage_cursors WHERE stage = $1", &[&Stage::RESOLVE.0])?;
    let live_profiles: i64 =
        transaction.query_one("SELECT live_profiles FROM identity_state WHERE id = 1", &[])?.try_get(0)?;
    Ok(IdentityState {
        position: LogPosition(cursor.try_get::<_, i64>(0)? as u64),
        epoch: cursor.try_get::<_, i64>(1)? as u64,
        next_profile_id: next_profile_id as u64,
        rules: match rules {
            Some(text) => serde_json::from_str(&text).map_err(json_error)?,
            None => IdentityRules::default(),
        },
        live_profiles: live_profiles as u64,
    })
}

/// What a repair clears before its commit is written: the replaced
/// profiles with their identifiers and timeline links, the replayed events'
/// history.
struct Cleared<'a> {
    profiles: &'a [ProfileId],
    replayed: &'a [LogPosition],
}

/// Writes `commit` and moves the resolver's cursor; a repair clears what it
/// replaces first and starts a new epoch.
fn commit(
    transaction: &mut Transaction<'_>,
    commit: &IdentityCommit,
    repair: Option<Cleared<'_>>,
) -> Result<CommitOutcome, StoreError> {
    let cursor = transaction
        .query_one("SELECT position, epoch FROM stage_cursors WHERE stage = $1 FOR UPDATE", &[&Stage::RESOLVE.0])?;
    let (position, epoch): (i64, i64) = (cursor.try_get(0)?, cursor.try_get(1)?);
    if epoch as u64 != commit.epoch {
        return Ok(CommitOutcome::EpochChanged);
    }
    if position as u64 != commit.from.0 {
        return Ok(CommitOutcome::StalePosition);
    }
    let repairing = repair.is_some();
    // Live profiles gained (new or revived) minus lost (removed or merged
    // away), counted as each write happens, kept in `identity_state`.
    let mut live_delta: i64 = 0;
    let live_among = |transaction: &mut Transaction<'_>, ids: &[i64]| -> Result<i64, StoreError> {
        Ok(transaction
            .query_one("SELECT COUNT(*) FROM profiles WHERE id = ANY($1) AND state IS NOT NULL", &[&ids])?
            .try_get(0)?)
    };
    if let Some(cleared) = repair {
        let profiles: Vec<i64> = cleared.profiles.iter().map(|id| id.0 as i64).collect();
        live_delta -= live_among(transaction, &profiles)?;
        for sql in [
            "DELETE FROM identifiers WHERE profile_id = ANY($1)",
            "DELETE FROM profile_events WHERE profile_id = ANY($1)",
            "DELETE FROM profiles WHERE id = ANY($1)",
        ] {
            transaction.execute(sql, &[&profiles])?;
        }
        let replayed: Vec<i64> = cleared.replayed.iter().map(|position| position.0 as i64).collect();
        transaction.execute("DELETE FROM identity_history WHERE position = ANY($1)", &[&replayed])?;
    }
    if !commit.merged.is_empty() {
        // Merged-away ids are distinct and none is written live before its
        // merge, so counting the live ones up front equals counting each
        // before its retirement.
        let froms: Vec<i64> = commit.merged.iter().map(|(from, _)| from.0 as i64).collect();
        live_delta -= live_among(transaction, &froms)?;
        let retire = transaction.prepare(
            "INSERT INTO profiles (id, merged_into, state) VALUES ($1, $2, NULL)
             ON CONFLICT (id) DO UPDATE SET merged_into = excluded.merged_into, state = NULL",
        )?;
        let repoint = transaction.prepare("UPDATE profiles SET merged_into = $2 WHERE merged_into = $1")?;
        let move_identifiers = transaction.prepare("UPDATE identifiers SET profile_id = $2 WHERE profile_id = $1")?;
        let move_events = transaction.prepare("UPDATE profile_events SET profile_id = $2 WHERE profile_id = $1")?;
        for (from, into) in &commit.merged {
            let (from, into) = (from.0 as i64, into.0 as i64);
            for statement in [&retire, &repoint, &move_identifiers, &move_events] {
                transaction.execute(statement, &[&from, &into])?;
            }
        }
    }
    let saved: Vec<i64> = commit
        .profiles
        .records()
        .map(|(id, _)| id.0 as i64)
        .collect::<std::collections::BTreeSet<i64>>()
        .into_iter()
        .collect();
    live_delta += saved.len() as i64 - live_among(transaction, &saved)?;
    save_profiles(transaction, &commit.profiles)?;
    save_identifiers(transaction, &commit.identifiers)?;
    if !commit.events.is_empty() {
        let profiles: Vec<i64> = commit.events.iter().map(|link| link.profile.0 as i64).collect();
        let timestamps: Vec<i64> = commit.events.iter().map(|link| link.timestamp_ms).collect();
        let positions: Vec<i64> = commit.events.iter().map(|link| link.position.0 as i64).collect();
        transaction.execute(
            "INSERT INTO profile_events (profile_id, timestamp_ms, position)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])",
            &[&profiles, &timestamps, &positions],
        )?;
    }
    save_history(transaction, &commit.history)?;
    if !commit.unresolved.is_empty() {
        let positions: Vec<i64> = commit.unresolved.iter().map(|event| event.position.0 as i64).collect();
        let reasons: Vec<&[u8]> = commit.unresolved.iter().map(|event| event.reason.as_bytes()).collect();
        transaction.execute(
            "INSERT INTO unresolved_events (position, reason) SELECT * FROM unnest($1::bigint[], $2::bytea[])
             ON CONFLICT (position) DO NOTHING",
            &[&positions, &reasons],
        )?;
    }
    if let Some(rules) = &commit.rules {
        let text = serde_json::to_string(rules).map_err(json_error)?;
        transaction.execute("UPDATE identity_state SET rules = $1 WHERE id = 1", &[&text])?;
    }
    let new_epoch = if repairing || commit.rules.is_some() { epoch + 1 } else { epoch };
    transaction.execute(
        "UPDATE identity_state SET next_profile_id = $1, live_profiles = live_profiles + $2 WHERE id = 1",
        &[&(commit.next_profile_id as i64), &live_delta],
    )?;
    transaction.execute(
        "UPDATE stage_cursors SET position = $1, epoch = $2 WHERE stage = $3",
        &[&(commit.to.0 as i64), &new_epoch, &Stage::RESOLVE.0],
    )?;
    Ok(CommitOutcome::Committed)
}

/// Writes live profiles in full; the last copy of a profile in the commit wins.
fn save_profiles(transaction: &mut Transaction<'_>, profiles: &CommitProfiles) -> Result<(), StoreError> {
    if profiles.is_empty() {
        return Ok(());
    }
    let mut latest: HashMap<i64, String> = HashMap::with_capacity(profiles.len());
    for profile in profiles.decoded() {
        let profile = profile?;
        latest.insert(profile.id.0 as i64, serde_json::to_string(&profile).map_err(json_error)?);
    }
    let (ids, states): (Vec<i64>, Vec<String>) = latest.into_iter().unzip();
    transaction.execute(
        "INSERT INTO profiles (id, merged_into, state) SELECT id, NULL, state FROM unnest($1::bigint[], $2::text[])
             AS saved (id, state)
         ON CONFLICT (id) DO UPDATE SET merged_into = NULL, state = excluded.state",
        &[&ids, &states],
    )?;
    Ok(())
}

/// Points identifiers at their profiles; the last owner in the commit wins.
fn save_identifiers(
    transaction: &mut Transaction<'_>,
    identifiers: &[(Identifier, ProfileId)],
) -> Result<(), StoreError> {
    if identifiers.is_empty() {
        return Ok(());
    }
    let mut latest: HashMap<(&str, &[u8]), i64> = HashMap::with_capacity(identifiers.len());
    for (identifier, profile) in identifiers {
        latest.insert((identifier.kind.as_str(), identifier.value.as_bytes()), profile.0 as i64);
    }
    let (mut kinds, mut values, mut owners) = (Vec::new(), Vec::new(), Vec::new());
    for ((kind, value), owner) in latest {
        kinds.push(kind);
        values.push(value);
        owners.push(owner);
    }
    transaction.execute(
        "INSERT INTO identifiers (type, value, profile_id) SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[])
         ON CONFLICT (type, value) DO UPDATE SET profile_id = excluded.profile_id",
        &[&kinds, &values, &owners],
    )?;
    Ok(())
}

/// Appends history records; their ids follow the commit's order.
fn save_history(transaction: &mut Transaction<'_>, history: &[HistoryRecord]) -> Result<(), StoreError> {
    if history.is_empty() {
        return Ok(());
    }
    let positions: Vec<Option<i64>> =
        history.iter().map(|record| record.position.map(|position| position.0 as i64)).collect();
    let profiles: Vec<Option<i64>> =
        history.iter().map(|record| record.profile.map(|profile| profile.0 as i64)).collect();
    let changes: Vec<String> = history
        .iter()
        .map(|record| serde_json::to_string(&record.change).map_err(json_error))
        .collect::<Result<_, _>>()?;
    let recorded_at: Vec<i64> = history.iter().map(|record| record.recorded_at_ms).collect();
    // The identifier a drop was about, as `type:value`, which `dropped_at` finds.
    let dropped: Vec<Option<Vec<u8>>> = history
        .iter()
        .map(|record| match &record.change {
            IdentityChange::Dropped { identifier, .. } => Some(identifier.to_string().into_bytes()),
            _ => None,
        })
        .collect();
    transaction.execute(
        "INSERT INTO identity_history (position, profile_id, change, recorded_at, dropped)
         SELECT position, profile_id, change, recorded_at, dropped
         FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bytea[]) WITH ORDINALITY
             AS saved (position, profile_id, change, recorded_at, dropped, ordinal)
         ORDER BY ordinal",
        &[&positions, &profiles, &changes, &recorded_at, &dropped],
    )?;
    Ok(())
}

/// The live profile `id` is, or was merged into: its id and stored state.
fn live_profile(client: &mut impl GenericClient, id: ProfileId) -> Result<Option<(ProfileId, String)>, StoreError> {
    let row = client.query_opt(
        "WITH RECURSIVE chain (id, merged_into, state, depth) AS (
            SELECT id, merged_into, state, 0 FROM profiles WHERE id = $1
            UNION ALL
            SELECT p.id, p.merged_into, p.state, chain.depth + 1
            FROM chain JOIN profiles p ON p.id = chain.merged_into
            WHERE chain.depth < $2
         )
         SELECT id, state FROM chain WHERE merged_into IS NULL AND state IS NOT NULL LIMIT 1",
        &[&(id.0 as i64), &MAX_MERGE_CHAIN],
    )?;
    row.map(|row| Ok((ProfileId(row.try_get::<_, i64>(0)? as u64), row.try_get(1)?))).transpose()
}

fn history(client: &mut impl GenericClient, id: ProfileId) -> Result<Vec<HistoryRecord>, StoreError> {
    let Some((live, _)) = live_profile(client, id)? else {
        return Ok(Vec::new());
    };
    let rows = client.query(
        "SELECT position, profile_id, change, recorded_at FROM identity_history
         WHERE profile_id = $1 OR profile_id IN (SELECT id FROM profiles WHERE merged_into = $1)
         ORDER BY id",
        &[&(live.0 as i64)],
    )?;
    rows.iter().map(|row| history_record(row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?)).collect()
}

fn identifiers_and_owners(rows: Vec<postgres::Row>) -> Result<Vec<(Identifier, ProfileId)>, StoreError> {
    rows.iter()
        .map(|row| {
            let identifier = Identifier::new(row.try_get::<_, String>(0)?, text_from_bytes(row.try_get(1)?)?);
            Ok((identifier, ProfileId(row.try_get::<_, i64>(2)? as u64)))
        })
        .collect()
}

/// One column (`state` or `id`) of the live profiles with an id above
/// `after`, by id, at most `limit`.
fn live_profiles_after(
    client: &mut impl GenericClient,
    column: &str,
    after: Option<ProfileId>,
    limit: usize,
) -> Result<Vec<postgres::Row>, StoreError> {
    let after = after.map_or(0, |id| id.0 as i64);
    Ok(client.query(
        &format!(
            "SELECT {column} FROM profiles WHERE id > $1 AND merged_into IS NULL AND state IS NOT NULL
             ORDER BY id LIMIT $2"
        ),
        &[&after, &(limit as i64)],
    )?)
}

impl IdentityStore for PostgresStore {
    fn identity_state(&self) -> Result<IdentityState, StoreError> {
        self.with_client(|client| {
            // One snapshot, so the count agrees with the position.
            let mut transaction =
                client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?;
            let state = state(&mut transaction)?;
            transaction.commit()?;
            Ok(state)
        })
    }

    fn commit_identity(&self, identity: &IdentityCommit) -> Result<CommitOutcome, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            let outcome = commit(&mut transaction, identity, None)?;
            transaction.commit()?;
            Ok(outcome)
        })
    }

    fn repair_identity(&self, repair: &IdentityRepair) -> Result<CommitOutcome, StoreError> {
        let cleared = Cleared { profiles: &repair.replaced_profiles, replayed: &repair.replayed };
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            let outcome = commit(&mut transaction, &repair.commit, Some(cleared))?;
            transaction.commit()?;
            Ok(outcome)
        })
    }

    fn dropped_at(&self, identifiers: &[Identifier]) -> Result<Vec<(LogPosition, Option<ProfileId>)>, StoreError> {
        if identifiers.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<Vec<u8>> = identifiers.iter().map(|identifier| identifier.to_string().into_bytes()).collect();
        self.with_client(|client| {
            client
                .query(
                    "SELECT position, profile_id FROM identity_history
                     WHERE dropped = ANY($1) AND position IS NOT NULL",
                    &[&keys],
                )?
                .iter()
                .map(|row| {
                    let profile: Option<i64> = row.try_get(1)?;
                    Ok((LogPosition(row.try_get::<_, i64>(0)? as u64), profile.map(|id| ProfileId(id as u64))))
                })
                .collect()
        })
    }

    fn identity_rules(&self) -> Result<IdentityRules, StoreError> {
        self.with_client(|client| {
            let text: Option<String> =
                client.query_one("SELECT rules FROM identity_state WHERE id = 1", &[])?.try_get(0)?;
            match text {
                Some(text) => serde_json::from_str(&text).map_err(json_error),
                None => Ok(IdentityRules::default()),
            }
        })
    }

    fn set_identity_rules(&self, rules: &IdentityRules) -> Result<(), StoreError> {
        let text = serde_json::to_string(rules).map_err(json_error)?;
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            // The cursor row first, as a commit locks it first: the same lock
            // order in both, so they queue rather than deadlock.
            transaction.execute("UPDATE stage_cursors SET epoch = epoch + 1 WHERE stage = $1", &[&Stage::RESOLVE.0])?;
            transaction.execute("UPDATE identity_state SET rules = $1 WHERE id = 1", &[&text])?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn identifier_owners(&self, identifiers: &[Identifier]) -> Result<Vec<(Identifier, ProfileId)>, StoreError> {
        if identifiers.is_empty() {
            return Ok(Vec::new());
        }
        let kinds: Vec<&str> = identifiers.iter().map(|identifier| identifier.kind.as_str()).collect();
        let values: Vec<&[u8]> = identifiers.iter().map(|identifier| identifier.value.as_bytes()).collect();
        self.with_client(|client| {
            identifiers_and_owners(client.query(
                "SELECT i.type, i.value, i.profile_id
                 FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::bytea[]) AS wanted (type, value)) wanted
                 JOIN identifiers i ON i.type = wanted.type AND i.value = wanted.value",
                &[&kinds, &values],
            )?)
        })
    }

    fn profiles(&self, ids: &[ProfileId]) -> Result<Vec<Profile>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = ids.iter().map(|id| id.0 as i64).collect();
        self.with_client(|client| {
            client
                .query(
                    "SELECT state FROM profiles WHERE id = ANY($1) AND merged_into IS NULL AND state IS NOT NULL",
                    &[&ids],
                )?
                .iter()
                .map(|row| decode_profile(row.try_get(0)?))
                .collect()
        })
    }

    fn unresolved_events(&self, after: LogPosition, limit: usize) -> Result<Vec<UnresolvedEvent>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT position, reason FROM unresolved_events WHERE position > $1 ORDER BY position LIMIT $2",
                    &[&(after.0 as i64), &(limit as i64)],
                )?
                .iter()
                .map(|row| {
                    Ok(UnresolvedEvent {
                        position: LogPosition(row.try_get::<_, i64>(0)? as u64),
                        reason: text_from_bytes(row.try_get(1)?)?,
                    })
                })
                .collect()
        })
    }

    fn profile(&self, id: ProfileId) -> Result<Option<Profile>, StoreError> {
        self.with_client(|client| live_profile(client, id)?.map(|(_, state)| decode_profile(&state)).transpose())
    }

    fn profile_by_identifier(&self, identifier: &Identifier) -> Result<Option<Profile>, StoreError> {
        self.with_client(|client| {
            let owner = client.query_opt(
                "SELECT profile_id FROM identifiers WHERE type = $1 AND value = $2",
                &[&identifier.kind, &identifier.value.as_bytes()],
            )?;
            match owner {
                Some(row) => {
                    let id = ProfileId(row.try_get::<_, i64>(0)? as u64);
                    live_profile(client, id)?.map(|(_, state)| decode_profile(&state)).transpose()
                }
                None => Ok(None),
            }
        })
    }

    fn profile_events(
        &self,
        id: ProfileId,
        before: Option<TimelineCursor>,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let (timestamp, position) =
            before.map_or((i64::MAX, i64::MAX), |cursor| (cursor.timestamp_ms, cursor.position.0 as i64));
        self.with_client(|client| {
            client
                .query(
                    &format!(
                        "SELECT {LOG_ENTRY_COLUMNS} FROM profile_events p JOIN events e ON e.position = p.position
                         WHERE p.profile_id = $1 AND (p.timestamp_ms, p.position) < ($2, $3)
                         ORDER BY p.timestamp_ms DESC, p.position DESC LIMIT $4"
                    ),
                    &[&(id.0 as i64), &timestamp, &position, &(limit as i64)],
                )?
                .iter()
                .map(log_entry_from_row)
                .collect()
        })
    }

    fn events_of_profiles(&self, ids: &[ProfileId], since_ms: i64) -> Result<Vec<(ProfileId, LogEntry)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = ids.iter().map(|id| id.0 as i64).collect();
        self.with_client(|client| {
            client
                .query(
                    &format!(
                        "SELECT {LOG_ENTRY_COLUMNS}, p.profile_id FROM profile_events p
                         JOIN events e ON e.position = p.position
                         WHERE p.profile_id = ANY($1) AND p.timestamp_ms >= $2"
                    ),
                    &[&ids, &since_ms],
                )?
                .iter()
                .map(|row| Ok((ProfileId(row.try_get::<_, i64>(7)? as u64), log_entry_from_row(row)?)))
                .collect()
        })
    }

    fn identity_history(&self, id: ProfileId) -> Result<Vec<HistoryRecord>, StoreError> {
        self.with_client(|client| history(client, id))
    }

    fn merges_and_drops(&self, before: Option<u64>, limit: usize) -> Result<Vec<(u64, HistoryRecord)>, StoreError> {
        let before = before.map_or(i64::MAX, |id| id.min(i64::MAX as u64) as i64);
        self.with_client(|client| {
            let rows = client.query(
                &format!(
                    "SELECT id, position, profile_id, change, recorded_at FROM identity_history
                     WHERE {MERGES_AND_DROPS} AND id < $1 ORDER BY id DESC LIMIT $2"
                ),
                &[&before, &(limit as i64)],
            )?;
            rows.iter()
                .map(|row| {
                    let record = history_record(row.try_get(1)?, row.try_get(2)?, row.try_get(3)?, row.try_get(4)?)?;
                    Ok((row.try_get::<_, i64>(0)? as u64, record))
                })
                .collect()
        })
    }

    fn event_owners(
        &self,
        after: LogPosition,
        up_to: LogPosition,
    ) -> Result<Vec<(LogPosition, ProfileId)>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT position, profile_id FROM profile_events WHERE position > $1 AND position <= $2",
                    &[&(after.0 as i64), &(up_to.0 as i64)],
                )?
                .iter()
                .map(|row| {
                    Ok((LogPosition(row.try_get::<_, i64>(0)? as u64), ProfileId(row.try_get::<_, i64>(1)? as u64)))
                })
                .collect()
        })
    }

    fn list_profiles(&self, after: Option<ProfileId>, limit: usize) -> Result<Vec<Profile>, StoreError> {
        self.with_client(|client| {
            live_profiles_after(client, "state", after, limit)?
                .iter()
                .map(|row| decode_profile(row.try_get(0)?))
                .collect()
        })
    }

    fn list_profile_ids(&self, after: Option<ProfileId>, limit: usize) -> Result<Vec<ProfileId>, StoreError> {
        self.with_client(|client| {
            live_profiles_after(client, "id", after, limit)?
                .iter()
                .map(|row| Ok(ProfileId(row.try_get::<_, i64>(0)? as u64)))
                .collect()
        })
    }

    fn identifiers_with_prefix(
        &self,
        kind: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(Identifier, ProfileId)>, StoreError> {
        // A range on the primary key (type, value), not LIKE: no escaping, and
        // the index serves it. Values are UTF-8 bytes, which sort as their
        // characters do, and 0xFF never occurs in UTF-8, so every value with
        // the prefix sorts at or after the prefix and before prefix + 0xFF.
        let mut upper = prefix.as_bytes().to_vec();
        upper.push(0xFF);
        let lower = after.unwrap_or("").as_bytes();
        self.with_client(|client| {
            identifiers_and_owners(client.query(
                "SELECT type, value, profile_id FROM identifiers
                 WHERE type = $1 AND value >= $2 AND value < $3 AND value > $4 ORDER BY value LIMIT $5",
                &[&kind, &prefix.as_bytes(), &upper, &lower, &(limit as i64)],
            )?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing;
    use crate::prelude::*;
    use crate::{CommitOutcome, IdentityCommit, UnresolvedEvent};
    use tandem_core::{Identifier, LogPosition, Profile, ProfileId};

    /// Regression: an identifier value (and so an unresolved reason quoting
    /// it) can hold a NUL character from the event's JSON; storing it must
    /// not fail the resolver's commit, which would stop resolution for good.
    #[test]
    fn identifiers_with_a_nul_character_are_stored_and_found() {
        let Some(store) = testing::fresh_store() else { return };
        let odd = Identifier::new("user_id", "ann\0x");
        let mut profile = Profile::new(ProfileId(1));
        profile.identifiers = vec![odd.clone()];
        let reason = UnresolvedEvent { position: LogPosition(2), reason: "user_id:\0 (blocked value)".into() };
        let commit = IdentityCommit {
            to: LogPosition(2),
            profiles: vec![profile.clone()].into(),
            identifiers: vec![(odd.clone(), ProfileId(1))],
            unresolved: vec![reason.clone()],
            next_profile_id: 2,
            ..IdentityCommit::default()
        };
        assert_eq!(store.commit_identity(&commit).unwrap(), CommitOutcome::Committed);
        assert_eq!(store.identifier_owners(std::slice::from_ref(&odd)).unwrap(), vec![(odd.clone(), ProfileId(1))]);
        assert_eq!(store.profile_by_identifier(&odd).unwrap(), Some(profile));
        assert_eq!(store.identifiers_with_prefix("user_id", "ann", None, 10).unwrap(), vec![(odd, ProfileId(1))]);
        assert_eq!(store.unresolved_events(LogPosition(0), 10).unwrap(), vec![reason]);
    }

    #[test]
    fn resolvers_committing_from_one_position_cannot_both_win() {
        let Some(store) = testing::fresh_store() else { return };
        let outcomes: Vec<CommitOutcome> = std::thread::scope(|scope| {
            let racers: Vec<_> = (1..=4)
                .map(|racer| {
                    let store = &store;
                    scope.spawn(move || {
                        let commit = IdentityCommit {
                            to: LogPosition(10),
                            profiles: vec![Profile::new(ProfileId(racer))].into(),
                            next_profile_id: racer + 1,
                            ..IdentityCommit::default()
                        };
                        store.commit_identity(&commit).unwrap()
                    })
                })
                .collect();
            racers.into_iter().map(|racer| racer.join().unwrap()).collect()
        });
        let won = outcomes.iter().filter(|outcome| **outcome == CommitOutcome::Committed).count();
        assert_eq!(won, 1, "{outcomes:?}");
        assert!(outcomes
            .iter()
            .all(|outcome| matches!(outcome, CommitOutcome::Committed | CommitOutcome::StalePosition)));
        assert_eq!(store.identity_state().unwrap().live_profiles, 1, "only the winner's profile was written");
    }

    #[test]
    fn rule_changes_during_commits_refuse_them_without_deadlock() {
        let Some(store) = testing::fresh_store() else { return };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..20 {
                    store.set_identity_rules(&tandem_core::IdentityRules::default()).unwrap();
                }
            });
            scope.spawn(|| {
                for round in 0..40_u64 {
                    let snapshot = store.identity_state().unwrap();
                    let commit = IdentityCommit {
                        epoch: snapshot.epoch,
                        from: snapshot.position,
                        to: LogPosition(snapshot.position.0 + 1),
                        profiles: vec![Profile::new(ProfileId(round + 1))].into(),
                        next_profile_id: round + 2,
                        ..IdentityCommit::default()
                    };
                    let outcome = store.commit_identity(&commit).unwrap();
                    assert!(matches!(outcome, CommitOutcome::Committed | CommitOutcome::EpochChanged), "{outcome:?}");
                }
            });
        });
        assert_eq!(store.identity_state().unwrap().epoch, 20, "every rule change started an epoch");
    }

    #[test]
    fn prefix_search_orders_by_character_whatever_the_database_collation() {
        let Some(store) = testing::fresh_store() else { return };
        let values = ["b", "B", "a-1", "a_1", "a1", "a\u{e9}", "ab", "a"];
        let commit = IdentityCommit {
            to: LogPosition(0),
            identifiers: values.iter().map(|value| (Identifier::new("email", *value), ProfileId(1))).collect(),
            next_profile_id: 2,
            ..IdentityCommit::default()
        };
        assert_eq!(store.commit_identity(&commit).unwrap(), CommitOutcome::Committed);
        let found = |prefix: &str, after: Option<&str>| -> Vec<String> {
            store
                .identifiers_with_prefix("email", prefix, after, 10)
                .unwrap()
                .into_iter()
                .map(|(identifier, _)| identifier.value)
                .collect()
        };
        assert_eq!(found("a", None), ["a", "a-1", "a1", "a_1", "ab", "a\u{e9}"], "by code point, as SQLite orders");
        assert_eq!(found("a", Some("a1")), ["a_1", "ab", "a\u{e9}"]);
        assert_eq!(found("B", None), ["B"]);
        assert!(found("c", None).is_empty());
    }
}
