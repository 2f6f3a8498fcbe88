//! The audience stage in PostgreSQL: definitions, memberships and their
//! history, per-profile states with their due-timers, and the stage's commit,
//! which locks the stage's `stage_cursors` row before checking its position
//! so two audience stages (on two nodes) cannot both commit from one place.

use super::PostgresStore;
use crate::audience::{
    backfill_columns, backfill_from_columns, change_kind_from_text, rule_from_text, rule_to_text, state_from_text,
    state_to_text,
};
use crate::{
    AudienceCommit, AudienceCommitOutcome, AudienceDefinition, AudienceRecord, AudienceStore, Membership,
    MembershipChange, MembershipChangeKind, Stage, StoreError, StoredAudienceState,
};
use crate::{ComputedTraitRecord, StoredComputedTrait};
use postgres::Row;
use tandem_core::audience::ComputedTraitDefinition;
use tandem_core::ProfileId;

const RECORD_QUERY: &str = "SELECT a.name, a.rule, a.created_at, a.backfilled, a.backfill_after, a.size
     FROM audiences a";

fn decode_record(row: &Row) -> Result<AudienceRecord, StoreError> {
    let rule: String = row.try_get(1)?;
    Ok(AudienceRecord {
        definition: AudienceDefinition {
            name: row.try_get(0)?,
            rule: rule_from_text(&rule)?,
            created_at_ms: row.try_get(2)?,
        },
        backfill: backfill_from_columns(row.try_get(3)?, row.try_get(4)?),
        size: row.try_get::<_, i64>(5)? as u64,
    })
}

fn decode_membership(row: &Row) -> Result<Membership, StoreError> {
    Ok(Membership {
        audience: row.try_get(0)?,
        profile: ProfileId(row.try_get::<_, i64>(1)? as u64),
        entered_at_ms: row.try_get(2)?,
    })
}

fn decode_state(row: &Row) -> Result<StoredAudienceState, StoreError> {
    let state: String = row.try_get(2)?;
    Ok(StoredAudienceState {
        audience: row.try_get(0)?,
        profile: ProfileId(row.try_get::<_, i64>(1)? as u64),
        state: state_from_text(&state)?,
        next_change_at_ms: row.try_get(3)?,
    })
}

impl AudienceStore for PostgresStore {
    fn create_audience(&self, definition: &AudienceDefinition) -> Result<(), StoreError> {
        let rule = rule_to_text(&definition.rule)?;
        self.with_client(|client| {
            let inserted = client.execute(
                "INSERT INTO audiences (name, rule, created_at, backfilled, backfill_after)
                 VALUES ($1, $2, $3, FALSE, 0) ON CONFLICT (name) DO NOTHING",
                &[&definition.name, &rule, &definition.created_at_ms],
            )?;
            if inserted == 0 {
                return Err(StoreError::AudienceExists(definition.name.clone()));
            }
            Ok(())
        })
    }

    fn list_audiences(&self) -> Result<Vec<AudienceRecord>, StoreError> {
        self.with_client(|client| {
            client.query(&format!("{RECORD_QUERY} ORDER BY a.name"), &[])?.iter().map(decode_record).collect()
        })
    }

    fn audience(&self, name: &str) -> Result<Option<AudienceRecord>, StoreError> {
        self.with_client(|client| {
            client
                .query_opt(&format!("{RECORD_QUERY} WHERE a.name = $1"), &[&name])?
                .as_ref()
                .map(decode_record)
                .transpose()
        })
    }

    fn delete_audience(&self, name: &str) -> Result<(), StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            if transaction.execute("DELETE FROM audiences WHERE name = $1", &[&name])? == 0 {
                return Err(StoreError::AudienceNotFound(name.to_owned()));
            }
            for sql in [
                "DELETE FROM audience_members WHERE audience = $1",
                "DELETE FROM audience_history WHERE audience = $1",
                "DELETE FROM audience_states WHERE audience = $1",
            ] {
                transaction.execute(sql, &[&name])?;
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn audience_members(
        &self,
        name: &str,
        after: Option<ProfileId>,
        limit: usize,
    ) -> Result<Vec<Membership>, StoreError> {
        let after = after.map_or(-1, |id| id.0 as i64);
        self.with_client(|client| {
            client
                .query(
                    "SELECT audience, profile_id, entered_at FROM audience_members
                     WHERE audience = $1 AND profile_id > $2 ORDER BY profile_id LIMIT $3",
                    &[&name, &after, &(limit as i64)],
                )?
                .iter()
                .map(decode_membership)
                .collect()
        })
    }

    fn profile_audiences(&self, profile: ProfileId) -> Result<Vec<Membership>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT audience, profile_id, entered_at FROM audience_members
                     WHERE profile_id = $1 ORDER BY audience",
                    &[&(profile.0 as i64)],
                )?
                .iter()
                .map(decode_membership)
                .collect()
        })
    }

    fn audience_changes_by_day(&self, name: &str) -> Result<Vec<crate::DailyChanges>, StoreError> {
        const DAY_MS: i64 = 86_400_000;
        self.with_client(|client| {
            client
                .query(
                    "SELECT at / $2, COUNT(*) FILTER (WHERE change = 'entered'), COUNT(*) FILTER (WHERE change = 'exited')
                     FROM audience_history WHERE audience = $1 GROUP BY 1 ORDER BY 1",
                    &[&name, &DAY_MS],
                )?
                .iter()
                .map(|row| {
                    Ok(crate::DailyChanges {
                        day_start_ms: row.try_get::<_, i64>(0)? * DAY_MS,
                        entered: row.try_get::<_, i64>(1)? as u64,
                        exited: row.try_get::<_, i64>(2)? as u64,
                    })
                })
                .collect()
        })
    }

    fn memberships_of(&self, profiles: &[ProfileId]) -> Result<Vec<Membership>, StoreError> {
        if profiles.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = profiles.iter().map(|id| id.0 as i64).collect();
        self.with_client(|client| {
            client
                .query(
                    "SELECT audience, profile_id, entered_at FROM audience_members WHERE profile_id = ANY($1)",
                    &[&ids],
                )?
                .iter()
                .map(decode_membership)
                .collect()
        })
    }

    fn membership_history(&self, name: &str, profile: ProfileId) -> Result<Vec<MembershipChange>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT audience, profile_id, change, at FROM audience_history
                     WHERE audience = $1 AND profile_id = $2 ORDER BY id",
                    &[&name, &(profile.0 as i64)],
                )?
                .iter()
                .map(|row| {
                    Ok(MembershipChange {
                        audience: row.try_get(0)?,
                        profile: ProfileId(row.try_get::<_, i64>(1)? as u64),
                        kind: change_kind_from_text(row.try_get(2)?),
                        at_ms: row.try_get(3)?,
                    })
                })
                .collect()
        })
    }

    fn audience_states(&self, profiles: &[ProfileId]) -> Result<Vec<StoredAudienceState>, StoreError> {
        let ids: Vec<i64> = profiles.iter().map(|id| id.0 as i64).collect();
        self.with_client(|client| {
            client
                .query(
                    "SELECT audience, profile_id, state, next_change_at FROM audience_states
                     WHERE profile_id = ANY($1)",
                    &[&ids],
                )?
                .iter()
                .map(decode_state)
                .collect()
        })
    }

    fn due_audience_states(&self, now_ms: i64, limit: usize) -> Result<Vec<StoredAudienceState>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT audience, profile_id, state, next_change_at FROM audience_states
                     WHERE next_change_at IS NOT NULL AND next_change_at <= $1
                     ORDER BY next_change_at, audience, profile_id LIMIT $2",
                    &[&now_ms, &(limit as i64)],
                )?
                .iter()
                .map(decode_state)
                .collect()
        })
    }

    fn retired_audience_profiles(&self, limit: usize) -> Result<Vec<ProfileId>, StoreError> {
        self.with_client(|client| {
            Ok(client
                .query(
                    "SELECT DISTINCT t.profile_id FROM (
                         SELECT profile_id FROM audience_states UNION SELECT profile_id FROM audience_members
                         UNION SELECT profile_id FROM computed_trait_states
                     ) t LEFT JOIN profiles p ON p.id = t.profile_id
                     WHERE p.id IS NULL OR p.merged_into IS NOT NULL OR p.state IS NULL
                     ORDER BY t.profile_id LIMIT $1",
                    &[&(limit as i64)],
                )?
                .iter()
                .map(|row| row.try_get::<_, i64>(0).map(|id| ProfileId(id as u64)))
                .collect::<Result<_, _>>()?)
        })
    }

    fn commit_audience(&self, commit: &AudienceCommit) -> Result<AudienceCommitOutcome, StoreError> {
        let states: Vec<(String, i64, Option<String>, Option<i64>)> = commit
            .states
            .iter()
            .map(|write| {
                let state = write.state.as_ref().map(state_to_text).transpose()?;
                Ok((write.audience.clone(), write.profile.0 as i64, state, write.next_change_at_ms))
            })
            .collect::<Result<_, StoreError>>()?;
        let computed = super::computed::Encoded::new(commit)?;
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            transaction.execute(
                "INSERT INTO stage_cursors (stage, position, epoch) VALUES ($1, 0, 0) ON CONFLICT (stage) DO NOTHING",
                &[&Stage::AUDIENCE.0],
            )?;
            let position: i64 = transaction
                .query_one("SELECT position FROM stage_cursors WHERE stage = $1 FOR UPDATE", &[&Stage::AUDIENCE.0])?
                .try_get(0)?;
            if position as u64 != commit.from.0 {
                return Ok(AudienceCommitOutcome::StalePosition);
            }
            let upsert = transaction.prepare(
                "INSERT INTO audience_states (audience, profile_id, state, next_change_at)
                 SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM audiences WHERE name = $1)
                 ON CONFLICT (audience, profile_id) DO UPDATE SET state = excluded.state,
                     next_change_at = excluded.next_change_at",
            )?;
            let remove = transaction.prepare("DELETE FROM audience_states WHERE audience = $1 AND profile_id = $2")?;
            for (audience, profile, state, next) in &states {
                match state {
                    Some(state) => transaction.execute(&upsert, &[audience, profile, state, next])?,
                    None => transaction.execute(&remove, &[audience, profile])?,
                };
            }
            let enter = transaction.prepare(
                "INSERT INTO audience_members (audience, profile_id, entered_at)
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM audiences WHERE name = $1)
                 ON CONFLICT (audience, profile_id) DO NOTHING",
            )?;
            let exit = transaction.prepare("DELETE FROM audience_members WHERE audience = $1 AND profile_id = $2")?;
            let record = transaction.prepare(
                "INSERT INTO audience_history (audience, profile_id, change, at)
                 SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM audiences WHERE name = $1)",
            )?;
            let resize = transaction.prepare("UPDATE audiences SET size = size + $2 WHERE name = $1")?;
            for change in &commit.changes {
                let profile = change.profile.0 as i64;
                let moved = match change.kind {
                    MembershipChangeKind::Entered => {
                        transaction.execute(&enter, &[&change.audience, &profile, &change.at_ms])? as i64
                    }
                    MembershipChangeKind::Exited => {
                        -(transaction.execute(&exit, &[&change.audience, &profile])? as i64)
                    }
                };
                // A change that changes nothing (a second stage applying
                // the same timer) is neither counted nor recorded.
                if moved != 0 {
                    transaction.execute(&resize, &[&change.audience, &moved])?;
                    transaction
                        .execute(&record, &[&change.audience, &profile, &change.kind.as_str(), &change.at_ms])?;
                }
            }
            for (name, backfill) in &commit.backfill {
                let (backfilled, after) = backfill_columns(*backfill);
                transaction.execute(
                    "UPDATE audiences SET backfilled = $2, backfill_after = $3 WHERE name = $1",
                    &[name, &backfilled, &after],
                )?;
            }
            super::computed::write(&mut transaction, &computed)?;
            transaction.execute(
                "UPDATE stage_cursors SET position = $2, epoch = $3 WHERE stage = $1",
                &[&Stage::AUDIENCE.0, &(commit.to.0 as i64), &(commit.epoch as i64)],
            )?;
            transaction.commit()?;
            Ok(AudienceCommitOutcome::Committed)
        })
    }

    fn create_computed_trait(
        &self,
        name: &str,
        definition: &ComputedTraitDefinition,
        created_at_ms: i64,
    ) -> Result<(), StoreError> {
        super::computed::create(self, name, definition, created_at_ms)
    }

    fn list_computed_traits(&self) -> Result<Vec<ComputedTraitRecord>, StoreError> {
        super::computed::list(self)
    }

    fn computed_trait(&self, name: &str) -> Result<Option<ComputedTraitRecord>, StoreError> {
        super::computed::get(self, name)
    }

    fn delete_computed_trait(&self, name: &str) -> Result<(), StoreError> {
        super::computed::delete(self, name)
    }

    fn computed_trait_states(&self, profiles: &[ProfileId]) -> Result<Vec<StoredComputedTrait>, StoreError> {
        super::computed::states(self, profiles)
    }

    fn due_computed_trait_states(&self, now_ms: i64, limit: usize) -> Result<Vec<StoredComputedTrait>, StoreError> {
        super::computed::due(self, now_ms, limit)
    }
}
