//! SQLite queries of the insight stage: goals and the trackers they share,
//! each tracker's day values and per-profile states, the stage's commit,
//! snapshots and ingest latency.

use super::SqliteStore;
use crate::insight::{
    backfill_columns, backfill_from_columns, identity_event, settings_from_text, settings_to_text, spec_from_text,
    state_from_text,
};
use crate::{
    DayValue, GoalRecord, InsightCommit, InsightCommitOutcome, InsightCounters, InsightStore, Stage, StoreError,
    TrackerId, TrackerRecord,
};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use tandem_core::insight::goals::GoalSettings;
use tandem_core::insight::rollup::{Day, IdentityEvent, ProfileState, TrackerSpec};
use tandem_core::{LogPosition, ProfileId};

fn goal_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, i64)> {
    Ok((row.get(0)?, row.get(1)?))
}

fn decode_goal((settings, created_at_ms): (String, i64)) -> Result<GoalRecord, StoreError> {
    Ok(GoalRecord { settings: settings_from_text(&settings)?, created_at_ms })
}

/// Removes trackers no goal needs any more, with their days and states.
fn drop_unused_trackers(transaction: &Transaction<'_>) -> Result<(), StoreError> {
    let unused = "SELECT id FROM insight_trackers WHERE spec NOT IN (SELECT spec FROM goal_trackers)";
    transaction.execute(&format!("DELETE FROM insight_days WHERE tracker_id IN ({unused})"), [])?;
    transaction.execute(&format!("DELETE FROM insight_profile_states WHERE tracker_id IN ({unused})"), [])?;
    transaction.execute("DELETE FROM insight_trackers WHERE spec NOT IN (SELECT spec FROM goal_trackers)", [])?;
    Ok(())
}

fn commit(connection: &mut Connection, commit: &InsightCommit) -> Result<InsightCommitOutcome, StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let position: i64 = transaction
        .query_row("SELECT position FROM stage_cursors WHERE stage = ?1", [Stage::INSIGHT.0], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    if position as u64 != commit.from.0 {
        return Ok(InsightCommitOutcome::StalePosition);
    }
    if commit.restart_all {
        transaction.execute_batch(
            "DELETE FROM insight_days;
             DELETE FROM insight_profile_states;
             UPDATE insight_trackers SET started = 0, done = 0, backfill_after = 0, backfill_through = 0;",
        )?;
    }
    {
        let mut progress = transaction.prepare_cached(
            "UPDATE insight_trackers SET started = ?2, done = ?3, backfill_after = ?4, backfill_through = ?5
             WHERE id = ?1 AND started = ?6 AND done = ?7 AND backfill_after = ?8 AND backfill_through = ?9",
        )?;
        let mut exists = transaction.prepare_cached("SELECT 1 FROM insight_trackers WHERE id = ?1")?;
        for moved in &commit.backfill {
            let (started, done, after, through) = backfill_columns(moved.to);
            let (was_started, was_done, was_after, was_through) = backfill_columns(moved.from);
            let changed = progress.execute(params![
                moved.tracker.0,
                started,
                done,
                after,
                through,
                was_started,
                was_done,
                was_after,
                was_through
            ])?;
            if changed == 0 && exists.exists([moved.tracker.0])? {
                // Dropping the transaction rolls back what was written.
                return Ok(InsightCommitOutcome::StalePosition);
            }
        }
        let mut add = transaction.prepare_cached(
            "INSERT INTO insight_days (tracker_id, series, day, value)
             SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM insight_trackers WHERE id = ?1)
             ON CONFLICT (tracker_id, series, day) DO UPDATE SET value = value + excluded.value",
        )?;
        for day in &commit.days {
            add.execute(params![day.tracker.0, day.series, day.day, day.value])?;
        }
        let mut save = transaction.prepare_cached(
            "INSERT INTO insight_profile_states (tracker_id, profile_id, state)
             SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM insight_trackers WHERE id = ?1)
             ON CONFLICT (tracker_id, profile_id) DO UPDATE SET state = excluded.state",
        )?;
        let mut remove = transaction
            .prepare_cached("DELETE FROM insight_profile_states WHERE tracker_id = ?1 AND profile_id = ?2")?;
        for write in &commit.states {
            match &write.state {
                Some(state) => save.execute(params![write.tracker.0, write.profile.0 as i64, state.to_text()])?,
                None => remove.execute(params![write.tracker.0, write.profile.0 as i64])?,
            };
        }
    }
    transaction.execute(
        "INSERT INTO stage_cursors (stage, position, epoch) VALUES (?1, ?2, ?3)
         ON CONFLICT (stage) DO UPDATE SET position = excluded.position, epoch = excluded.epoch",
        params![Stage::INSIGHT.0, commit.to.0 as i64, commit.epoch as i64],
    )?;
    transaction.commit()?;
    Ok(InsightCommitOutcome::Committed)
}

impl InsightStore for SqliteStore {
    fn create_goal(
        &self,
        settings: &GoalSettings,
        trackers: &[TrackerSpec],
        created_at_ms: i64,
    ) -> Result<(), StoreError> {
        let text = settings_to_text(settings)?;
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let inserted = transaction.execute(
                "INSERT INTO goals (name, settings, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING",
                params![settings.name, text, created_at_ms],
            )?;
            if inserted == 0 {
                return Err(StoreError::GoalExists(settings.name.clone()));
            }
            for spec in trackers {
                let key = spec.key();
                transaction
                    .execute("INSERT INTO insight_trackers (spec) VALUES (?1) ON CONFLICT (spec) DO NOTHING", [&key])?;
                transaction.execute(
                    "INSERT INTO goal_trackers (goal, spec) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    params![settings.name, key],
                )?;
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn list_goals(&self) -> Result<Vec<GoalRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached("SELECT settings, created_at FROM goals ORDER BY name")?;
            let rows = statement.query_map([], goal_from_row)?.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(decode_goal).collect()
        })
    }

    fn goal(&self, name: &str) -> Result<Option<GoalRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached("SELECT settings, created_at FROM goals WHERE name = ?1")?;
            statement.query_row([name], goal_from_row).optional()?.map(decode_goal).transpose()
        })
    }

    fn delete_goal(&self, name: &str) -> Result<(), StoreError> {
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if transaction.execute("DELETE FROM goals WHERE name = ?1", [name])? == 0 {
                return Err(StoreError::GoalNotFound(name.to_owned()));
            }
            transaction.execute("DELETE FROM goal_trackers WHERE goal = ?1", [name])?;
            drop_unused_trackers(&transaction)?;
            transaction.commit()?;
            Ok(())
        })
    }

    fn trackers(&self) -> Result<Vec<TrackerRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, spec, started, done, backfill_after, backfill_through FROM insight_trackers ORDER BY id",
            )?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, bool>(2)?,
                        row.get::<_, bool>(3)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, i64>(5)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(id, spec, started, done, after, through)| {
                    Ok(TrackerRecord {
                        id: TrackerId(id),
                        spec: spec_from_text(&spec)?,
                        backfill: backfill_from_columns(started, done, after, through),
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
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT series, day, value FROM insight_days
                 WHERE tracker_id = ?1 AND day >= ?2 AND day <= ?3 ORDER BY series, day",
            )?;
            let from = from_day.unwrap_or(Day::MIN);
            let rows = statement.query_map(params![tracker.0, from, to_day], |row| {
                Ok(DayValue { series: row.get(0)?, day: row.get(1)?, value: row.get(2)? })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn profile_states(
        &self,
        trackers: &[TrackerId],
        profiles: &[ProfileId],
    ) -> Result<Vec<(TrackerId, ProfileId, ProfileState)>, StoreError> {
        self.with_read_transaction(|connection| {
            let mut statement = connection
                .prepare_cached("SELECT state FROM insight_profile_states WHERE tracker_id = ?1 AND profile_id = ?2")?;
            let mut found = Vec::new();
            for tracker in trackers {
                for profile in profiles {
                    let state: Option<String> =
                        statement.query_row(params![tracker.0, profile.0 as i64], |row| row.get(0)).optional()?;
                    if let Some(state) = state {
                        found.push((*tracker, *profile, state_from_text(&state)?));
                    }
                }
            }
            Ok(found)
        })
    }

    fn identity_events(&self, after: LogPosition, up_to: LogPosition) -> Result<Vec<IdentityEvent>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT change, recorded_at FROM identity_history WHERE position > ?1 AND position <= ?2 ORDER BY id",
            )?;
            let rows = statement
                .query_map(params![after.0 as i64, up_to.0 as i64], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut events = Vec::new();
            for (change, recorded_at_ms) in rows {
                events.extend(identity_event(&change, recorded_at_ms)?);
            }
            Ok(events)
        })
    }

    fn commit_insight(&self, insight: &InsightCommit) -> Result<InsightCommitOutcome, StoreError> {
        self.with_stage_writer(|connection| commit(connection, insight))
    }

    fn insight_counters(&self) -> Result<InsightCounters, StoreError> {
        self.with_reader(|connection| {
            let count = |sql: &str| -> Result<u64, StoreError> {
                Ok(connection.query_row(sql, [], |row| row.get::<_, i64>(0))?.max(0) as u64)
            };
            Ok(InsightCounters {
                events: count("SELECT COALESCE(SUM(stored), 0) FROM ingest_counters")?,
                violations: count("SELECT COALESCE(SUM(count), 0) FROM plan_violations")?,
                delivered: count("SELECT COALESCE(SUM(delivered), 0) FROM destinations")?,
                dead_letters: count("SELECT COUNT(*) FROM dead_letters")?,
            })
        })
    }

    fn record_snapshots(&self, day: Day, values: &[(String, f64)]) -> Result<(), StoreError> {
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut record = transaction.prepare_cached(
                    "INSERT INTO insight_snapshots (key, day, value) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key, day) DO UPDATE SET value = excluded.value",
                )?;
                for (key, value) in values {
                    record.execute(params![key, day, value])?;
                }
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn snapshots(&self, keys: &[String], from_day: Day, to_day: Day) -> Result<Vec<(String, Day, f64)>, StoreError> {
        self.with_reader(|connection| {
            let mut before = connection.prepare_cached(
                "SELECT day, value FROM insight_snapshots WHERE key = ?1 AND day < ?2 ORDER BY day DESC LIMIT 1",
            )?;
            let mut within = connection.prepare_cached(
                "SELECT day, value FROM insight_snapshots WHERE key = ?1 AND day >= ?2 AND day <= ?3 ORDER BY day",
            )?;
            let mut found = Vec::new();
            for key in keys {
                if let Some((day, value)) = before
                    .query_row(params![key, from_day], |row| Ok((row.get::<_, Day>(0)?, row.get::<_, f64>(1)?)))
                    .optional()?
                {
                    found.push((key.clone(), day, value));
                }
                let rows = within.query_map(params![key, from_day, to_day], |row| {
                    Ok((key.clone(), row.get::<_, Day>(0)?, row.get::<_, f64>(1)?))
                })?;
                for row in rows {
                    found.push(row?);
                }
            }
            Ok(found)
        })
    }

    fn add_ingest_latency(&self, counts: &[(Day, u16, u64)]) -> Result<(), StoreError> {
        if counts.is_empty() {
            return Ok(());
        }
        self.with_writer(|connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut add = transaction.prepare_cached(
                    "INSERT INTO ingest_latency (day, bucket, count) VALUES (?1, ?2, ?3)
                     ON CONFLICT (day, bucket) DO UPDATE SET count = count + excluded.count",
                )?;
                for (day, bucket, count) in counts {
                    add.execute(params![day, bucket, *count as i64])?;
                }
            }
            transaction.commit()?;
            Ok(())
        })
    }

    fn ingest_latency(&self, from_day: Day, to_day: Day) -> Result<Vec<(Day, u16, u64)>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT day, bucket, count FROM ingest_latency WHERE day >= ?1 AND day <= ?2 ORDER BY day, bucket",
            )?;
            let rows = statement.query_map(params![from_day, to_day], |row| {
                Ok((row.get::<_, Day>(0)?, row.get::<_, u16>(1)?, row.get::<_, i64>(2)?.max(0) as u64))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}
