//! The insight stage in PostgreSQL: goals and the trackers they share, day
//! values and per-profile states, and the stage's commit, which locks the
//! stage's `stage_cursors` row before checking its position so two insight
//! stages (on two nodes) cannot both commit from one place; snapshots and
//! ingest latency, which every node adds to.

use super::PostgresStore;
use crate::insight::{
    backfill_columns, backfill_from_columns, identity_event, settings_from_text, settings_to_text, spec_from_text,
    state_from_text,
};
use crate::{
    DayValue, GoalRecord, InsightCommit, InsightCommitOutcome, InsightCounters, InsightStore, Stage, StoreError,
    TrackerId, TrackerRecord,
};
use postgres::{Row, Transaction};
use tandem_core::insight::goals::GoalSettings;
use tandem_core::insight::rollup::{Day, IdentityEvent, ProfileState, TrackerSpec};
use tandem_core::{LogPosition, ProfileId};

fn decode_goal(row: &Row) -> Result<GoalRecord, StoreError> {
    let settings: String = row.try_get(0)?;
    Ok(GoalRecord { settings: settings_from_text(&settings)?, created_at_ms: row.try_get(1)? })
}

/// Removes trackers no goal needs any more, with their days and states.
fn drop_unused_trackers(transaction: &mut Transaction<'_>) -> Result<(), StoreError> {
    transaction.batch_execute(
        "CREATE TEMPORARY TABLE unused_trackers ON COMMIT DROP AS
             SELECT id FROM insight_trackers WHERE spec NOT IN (SELECT spec FROM goal_trackers);
         DELETE FROM insight_days WHERE tracker_id IN (SELECT id FROM unused_trackers);
         DELETE FROM insight_profile_states WHERE tracker_id IN (SELECT id FROM unused_trackers);
         DELETE FROM insight_trackers WHERE id IN (SELECT id FROM unused_trackers);",
    )?;
    Ok(())
}

impl InsightStore for PostgresStore {
    fn create_goal(
        &self,
        settings: &GoalSettings,
        trackers: &[TrackerSpec],
        created_at_ms: i64,
    ) -> Result<(), StoreError> {
        let text = settings_to_text(settings)?;
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            let inserted = transaction.execute(
                "INSERT INTO goals (name, settings, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                &[&settings.name, &text, &created_at_ms],
            )?;
            if inserted == 0 {
                return Err(StoreError::GoalExists(settings.name.clone()));
            }
            for spec in trackers {
                let key = spec.key();
                transaction.execute(
                    "INSERT INTO insight_trackers (spec) VALUES ($1) ON CONFLICT (spec) DO NOTHING",
                    &[&key],
                )?;
                transaction.execute(
                    "INSERT INTO goal_trackers (goal, spec) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&settings.name, &key],
                )?;
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn list_goals(&self) -> Result<Vec<GoalRecord>, StoreError> {
        self.with_client(|client| {
            client.query("SELECT settings, created_at FROM goals ORDER BY name", &[])?.iter().map(decode_goal).collect()
        })
    }

    fn goal(&self, name: &str) -> Result<Option<GoalRecord>, StoreError> {
        self.with_client(|client| {
            client
                .query_opt("SELECT settings, created_at FROM goals WHERE name = $1", &[&name])?
                .as_ref()
                .map(decode_goal)
                .transpose()
        })
    }

    fn delete_goal(&self, name: &str) -> Result<(), StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            if transaction.execute("DELETE FROM goals WHERE name = $1", &[&name])? == 0 {
                return Err(StoreError::GoalNotFound(name.to_owned()));
            }
            transaction.execute("DELETE FROM goal_trackers WHERE goal = $1", &[&name])?;
            drop_unused_trackers(&mut transaction)?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn trackers(&self) -> Result<Vec<TrackerRecord>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT id, spec, started, done, backfill_after, backfill_through FROM insight_trackers ORDER BY id",
                    &[],
                )?
                .iter()
                .map(|row| {
                    let spec: String = row.try_get(1)?;
                    Ok(TrackerRecord {
                        id: TrackerId(row.try_get(0)?),
                        spec: spec_from_text(&spec)?,
                        backfill: backfill_from_columns(
                            row.try_get(2)?,
                            row.try_get(3)?,
                            row.try_get(4)?,
                            row.try_get(5)?,
                        ),
                    })
                })
                .collect()
        })
    }

    fn tracker_days(
        &self,
        tracker: TrackerId,
        from_day: Option<Day>,
        to_day: Day,
    ) -> Result<Vec<DayValue>, StoreError> {
        self.with_client(|client| {
            let from = from_day.unwrap_or(Day::MIN);
            client
                .query(
                    "SELECT series, day, value FROM insight_days
                     WHERE tracker_id = $1 AND day >= $2 AND day <= $3 ORDER BY series, day",
                    &[&tracker.0, &from, &to_day],
                )?
                .iter()
                .map(|row| Ok(DayValue { series: row.try_get(0)?, day: row.try_get(1)?, value: row.try_get(2)? }))
                .collect()
        })
    }

    fn profile_states(
        &self,
        trackers: &[TrackerId],
        profiles: &[ProfileId],
    ) -> Result<Vec<(TrackerId, ProfileId, ProfileState)>, StoreError> {
        let tracker_ids: Vec<i64> = trackers.iter().map(|tracker| tracker.0).collect();
        let profile_ids: Vec<i64> = profiles.iter().map(|profile| profile.0 as i64).collect();
        self.with_client(|client| {
            client
                .query(
                    "SELECT tracker_id, profile_id, state FROM insight_profile_states
                     WHERE tracker_id = ANY($1) AND profile_id = ANY($2)",
                    &[&tracker_ids, &profile_ids],
                )?
                .iter()
                .map(|row| {
                    let state: String = row.try_get(2)?;
                    Ok((
                        TrackerId(row.try_get(0)?),
                        ProfileId(row.try_get::<_, i64>(1)? as u64),
                        state_from_text(&state)?,
                    ))
                })
                .collect()
        })
    }

    fn identity_events(&self, after: LogPosition, up_to: LogPosition) -> Result<Vec<IdentityEvent>, StoreError> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT change, recorded_at FROM identity_history WHERE position > $1 AND position <= $2 ORDER BY id",
                &[&(after.0 as i64), &(up_to.0 as i64)],
            )?;
            let mut events = Vec::new();
            for row in &rows {
                let change: String = row.try_get(0)?;
                events.extend(identity_event(&change, row.try_get(1)?)?);
            }
            Ok(events)
        })
    }

    fn commit_insight(&self, commit: &InsightCommit) -> Result<InsightCommitOutcome, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            transaction.execute(
                "INSERT INTO stage_cursors (stage, position, epoch) VALUES ($1, 0, 0) ON CONFLICT (stage) DO NOTHING",
                &[&Stage::INSIGHT.0],
            )?;
            let position: i64 = transaction
                .query_one("SELECT position FROM stage_cursors WHERE stage = $1 FOR UPDATE", &[&Stage::INSIGHT.0])?
                .try_get(0)?;
            if position as u64 != commit.from.0 {
                return Ok(InsightCommitOutcome::StalePosition);
            }
            if commit.restart_all {
                transaction.batch_execute(
                    "DELETE FROM insight_days;
                     DELETE FROM insight_profile_states;
                     UPDATE insight_trackers SET started = FALSE, done = FALSE, backfill_after = 0, backfill_through = 0;",
                )?;
            }
            let progress = transaction.prepare(
                "UPDATE insight_trackers SET started = $2, done = $3, backfill_after = $4, backfill_through = $5
                 WHERE id = $1 AND started = $6 AND done = $7 AND backfill_after = $8 AND backfill_through = $9",
            )?;
            for moved in &commit.backfill {
                let (started, done, after, through) = backfill_columns(moved.to);
                let (was_started, was_done, was_after, was_through) = backfill_columns(moved.from);
                let values: [&(dyn postgres::types::ToSql + Sync); 9] = [
                    &moved.tracker.0,
                    &started,
                    &done,
                    &after,
                    &through,
                    &was_started,
                    &was_done,
                    &was_after,
                    &was_through,
                ];
                let changed = transaction.execute(&progress, &values)?;
                if changed == 0
                    && transaction
                        .query_opt("SELECT 1 FROM insight_trackers WHERE id = $1", &[&moved.tracker.0])?
                        .is_some()
                {
                    // Dropping the transaction rolls back what was written.
                    return Ok(InsightCommitOutcome::StalePosition);
                }
            }
            // One statement per kind of row, whatever the batch's size.
            let (mut trackers, mut series, mut days, mut values) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for add in &commit.days {
                trackers.push(add.tracker.0);
                series.push(add.series);
                days.push(add.day);
                values.push(add.value);
            }
            transaction.execute(
                "INSERT INTO insight_days (tracker_id, series, day, value)
                 SELECT a.tracker_id, a.series, a.day, SUM(a.value)
                 FROM unnest($1::bigint[], $2::text[], $3::integer[], $4::double precision[])
                     AS a (tracker_id, series, day, value)
                 WHERE EXISTS (SELECT 1 FROM insight_trackers t WHERE t.id = a.tracker_id)
                 GROUP BY a.tracker_id, a.series, a.day
                 ON CONFLICT (tracker_id, series, day) DO UPDATE SET value = insight_days.value + excluded.value",
                &[&trackers, &series, &days, &values],
            )?;
            let (mut saved_trackers, mut saved_profiles, mut saved_states) = (Vec::new(), Vec::new(), Vec::new());
            let (mut removed_trackers, mut removed_profiles) = (Vec::new(), Vec::new());
            // A later write of the same row wins, as it would applied in order.
            let mut last: std::collections::HashMap<(i64, i64), Option<String>> = std::collections::HashMap::new();
            for write in &commit.states {
                last.insert((write.tracker.0, write.profile.0 as i64), write.state.as_ref().map(ProfileState::to_text));
            }
            for ((tracker, profile), state) in last {
                match state {
                    Some(state) => {
                        saved_trackers.push(tracker);
                        saved_profiles.push(profile);
                        saved_states.push(state);
                    }
                    None => {
                        removed_trackers.push(tracker);
                        removed_profiles.push(profile);
                    }
                }
            }
            transaction.execute(
                "DELETE FROM insight_profile_states s
                 USING unnest($1::bigint[], $2::bigint[]) AS r (tracker_id, profile_id)
                 WHERE s.tracker_id = r.tracker_id AND s.profile_id = r.profile_id",
                &[&removed_trackers, &removed_profiles],
            )?;
            transaction.execute(
                "INSERT INTO insight_profile_states (tracker_id, profile_id, state)
                 SELECT w.tracker_id, w.profile_id, w.state
                 FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS w (tracker_id, profile_id, state)
                 WHERE EXISTS (SELECT 1 FROM insight_trackers t WHERE t.id = w.tracker_id)
                 ON CONFLICT (tracker_id, profile_id) DO UPDATE SET state = excluded.state",
                &[&saved_trackers, &saved_profiles, &saved_states],
            )?;
            transaction.execute(
                "UPDATE stage_cursors SET position = $2, epoch = $3 WHERE stage = $1",
                &[&Stage::INSIGHT.0, &(commit.to.0 as i64), &(commit.epoch as i64)],
            )?;
            transaction.commit()?;
            Ok(InsightCommitOutcome::Committed)
        })
    }

    fn insight_counters(&self) -> Result<InsightCounters, StoreError> {
        self.with_client(|client| {
            let row = client.query_one(
                "SELECT (SELECT COALESCE(SUM(stored), 0)::bigint FROM ingest_counters),
                        (SELECT COALESCE(SUM(count), 0)::bigint FROM plan_violations),
                        (SELECT COALESCE(SUM(delivered), 0)::bigint FROM destinations),
                        (SELECT COUNT(*) FROM dead_letters)",
                &[],
            )?;
            let count = |index: usize| -> Result<u64, StoreError> { Ok(row.try_get::<_, i64>(index)?.max(0) as u64) };
            Ok(InsightCounters {
                events: count(0)?,
                violations: count(1)?,
                delivered: count(2)?,
                dead_letters: count(3)?,
            })
        })
    }

    fn record_snapshots(&self, day: Day, values: &[(String, f64)]) -> Result<(), StoreError> {
        let keys: Vec<&str> = values.iter().map(|(key, _)| key.as_str()).collect();
        let numbers: Vec<f64> = values.iter().map(|(_, value)| *value).collect();
        self.with_client(|client| {
            client.execute(
                "INSERT INTO insight_snapshots (key, day, value)
                 SELECT v.key, $3, v.value FROM unnest($1::text[], $2::double precision[]) AS v (key, value)
                 ON CONFLICT (key, day) DO UPDATE SET value = excluded.value",
                &[&keys, &numbers, &day],
            )?;
            Ok(())
        })
    }

    fn snapshots(&self, keys: &[String], from_day: Day, to_day: Day) -> Result<Vec<(String, Day, f64)>, StoreError> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT k.key, b.day, b.value FROM unnest($1::text[]) AS k (key)
                 CROSS JOIN LATERAL (
                     SELECT day, value FROM insight_snapshots s WHERE s.key = k.key AND s.day < $2
                     ORDER BY day DESC LIMIT 1
                 ) b
                 UNION ALL
                 SELECT key, day, value FROM insight_snapshots WHERE key = ANY($1) AND day >= $2 AND day <= $3
                 ORDER BY 1, 2",
                &[&keys, &from_day, &to_day],
            )?;
            rows.iter().map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))).collect()
        })
    }

    fn add_ingest_latency(&self, counts: &[(Day, u16, u64)]) -> Result<(), StoreError> {
        if counts.is_empty() {
            return Ok(());
        }
        let days: Vec<i32> = counts.iter().map(|(day, _, _)| *day).collect();
        let buckets: Vec<i32> = counts.iter().map(|(_, bucket, _)| i32::from(*bucket)).collect();
        let numbers: Vec<i64> = counts.iter().map(|(_, _, count)| *count as i64).collect();
        self.with_client(|client| {
            client.execute(
                "INSERT INTO ingest_latency (day, bucket, count)
                 SELECT c.day, c.bucket, SUM(c.count)
                 FROM unnest($1::integer[], $2::integer[], $3::bigint[]) AS c (day, bucket, count)
                 GROUP BY c.day, c.bucket
                 ON CONFLICT (day, bucket) DO UPDATE SET count = ingest_latency.count + excluded.count",
                &[&days, &buckets, &numbers],
            )?;
            Ok(())
        })
    }

    fn ingest_latency(&self, from_day: Day, to_day: Day) -> Result<Vec<(Day, u16, u64)>, StoreError> {
        self.with_client(|client| {
            client
                .query(
                    "SELECT day, bucket, count FROM ingest_latency WHERE day >= $1 AND day <= $2 ORDER BY day, bucket",
                    &[&from_day, &to_day],
                )?
                .iter()
                .map(|row| {
                    Ok((
                        row.try_get(0)?,
                        row.try_get::<_, i32>(1)?.clamp(0, i32::from(u16::MAX)) as u16,
                        row.try_get::<_, i64>(2)?.max(0) as u64,
                    ))
                })
                .collect()
        })
    }
}
