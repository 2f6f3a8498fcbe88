//! Writing to a PostgreSQL warehouse: Tandem owns four tables in the
//! destination's schema — `profiles` (traits and computed traits as
//! `jsonb`), `identifiers`, `audience_memberships` (one row per stay: entered,
//! exited) and `events` — creates them and migrates them itself (numbered
//! migrations recorded in `tandem_migrations`, applied under an advisory
//! lock so two nodes never race), and upserts each delivered batch with one
//! statement per table (`unnest` of arrays), in one transaction.
//!
//! Every statement is idempotent: events are keyed by log position, stays
//! in an audience by the id of their entry in Tandem's audience history, an
//! exit only closes a stay still open that began before it (by history id,
//! not by time: an entry found by a backfill can carry a later time than an
//! exit that follows it), and profiles and identifiers are overwritten with
//! the store's current state. Redelivering a batch (at least once) therefore
//! leaves the warehouse as one delivery did.

use std::collections::{BTreeMap, BTreeSet};

use postgres::Client;
use serde_json::Value;
use tandem_core::activate::{AttemptFailure, DestinationDefinition, WarehouseSettings};
use tandem_core::{LogPosition, ProfileId};
use tandem_store::{OutboxItem, Store};

/// The warehouse's migrations, in order; each runs once, in a transaction.
/// `{schema}` is the destination's (validated) schema name.
const MIGRATIONS: &[&str] = &[
    // 1: the four tables.
    "CREATE TABLE {schema}.profiles (
        id text PRIMARY KEY,
        traits jsonb NOT NULL DEFAULT '{}',
        computed_traits jsonb NOT NULL DEFAULT '{}',
        first_seen_at timestamptz,
        last_seen_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now()
     );
     CREATE TABLE {schema}.identifiers (
        kind text NOT NULL,
        value text NOT NULL,
        profile_id text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (kind, value)
     );
     CREATE INDEX identifiers_profile ON {schema}.identifiers (profile_id);
     CREATE TABLE {schema}.audience_memberships (
        audience text NOT NULL,
        profile_id text NOT NULL,
        entered_at timestamptz NOT NULL,
        exited_at timestamptz,
        entered_change bigint NOT NULL,
        exited_change bigint,
        PRIMARY KEY (audience, profile_id, entered_change)
     );
     CREATE TABLE {schema}.events (
        position bigint PRIMARY KEY,
        message_id text,
        profile_id text,
        type text NOT NULL,
        name text,
        timestamp timestamptz,
        payload jsonb NOT NULL
     );
     CREATE INDEX events_profile ON {schema}.events (profile_id);",
];

/// An open connection to a warehouse whose tables are migrated.
pub struct Warehouse {
    settings: WarehouseSettings,
    client: Client,
}

fn failure(error: postgres::Error) -> AttemptFailure {
    // A refused or broken connection has no SQL state; anything else is
    // the database answering, which a retry may also outlast (a lock, a
    // restart), so both are retried.
    match error.code() {
        Some(code) => AttemptFailure::Io(format!("the warehouse refused a write ({}): {error}", code.code())),
        None => AttemptFailure::Connection(error.to_string()),
    }
}

fn storage(error: tandem_store::StoreError) -> AttemptFailure {
    AttemptFailure::Io(format!("reading profiles for the warehouse: {error}"))
}

/// How many rows one batch wrote per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Upserted {
    pub events: usize,
    pub profiles: usize,
    pub memberships: usize,
}

impl std::fmt::Display for Upserted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} events, {} profiles, {} audience changes", self.events, self.profiles, self.memberships)
    }
}

impl Warehouse {
    /// Connects and brings the tables up to the latest migration.
    pub fn connect(settings: &WarehouseSettings) -> Result<Warehouse, AttemptFailure> {
        // TLS as the URL's `sslmode` and `sslrootcert` say, as for the store.
        let mut client = tandem_store::postgres::tls::connect(&settings.url)
            .map_err(|error| AttemptFailure::Connection(error.to_string()))?;
        migrate(&mut client, settings.schema()).map_err(failure)?;
        Ok(Warehouse { settings: settings.clone(), client })
    }

    /// The settings this connection was opened with.
    pub fn settings(&self) -> &WarehouseSettings {
        &self.settings
    }

    /// Upserts one batch: its events, the current state of every profile
    /// they (or the batch's audience changes) touch, with identifiers, and
    /// the audience entries and exits; one transaction.
    pub fn write_batch(
        &mut self,
        store: &dyn Store,
        _definition: &DestinationDefinition,
        batch: &[OutboxItem],
    ) -> Result<Upserted, AttemptFailure> {
        let schema = self.settings.schema().to_owned();
        let mut events = EventColumns::default();
        let mut entries = ChangeColumns::default();
        let mut exits = ChangeColumns::default();
        let mut touched: BTreeSet<ProfileId> = BTreeSet::new();
        let mut positions = Vec::new();
        for item in batch {
            let payload: Value = serde_json::from_str(&item.payload)
                .map_err(|error| AttemptFailure::Io(format!("an item is not JSON: {error}")))?;
            if payload.get("type").and_then(Value::as_str) == Some("audience") {
                let Some(profile) = payload.get("profile").and_then(Value::as_str) else { continue };
                let at = payload
                    .get("timestamp")
                    .and_then(Value::as_str)
                    .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
                    .map_or(0, |at| at.timestamp_millis());
                let changes = if payload.get("change").and_then(Value::as_str) == Some("exited") {
                    &mut exits
                } else {
                    &mut entries
                };
                changes.audiences.push(payload["audience"].as_str().unwrap_or_default().to_owned());
                changes.profiles.push(profile.to_owned());
                changes.at_ms.push(at);
                changes.ids.push(item.position.0 as i64);
                if let Ok(id) = profile.parse::<ProfileId>() {
                    touched.insert(id);
                }
            } else {
                positions.push(item.position);
                events.push(item.position, &payload);
            }
        }
        // Which profile each event belongs to, in one read.
        if let (Some(first), Some(last)) = (positions.iter().min(), positions.iter().max()) {
            let owners: BTreeMap<LogPosition, ProfileId> =
                store.event_owners(LogPosition(first.0 - 1), *last).map_err(storage)?.into_iter().collect();
            for (index, position) in events.positions.iter().enumerate() {
                if let Some(owner) = owners.get(&LogPosition(*position as u64)) {
                    events.profiles[index] = Some(owner.to_string());
                    touched.insert(*owner);
                }
            }
        }
        let touched: Vec<ProfileId> = touched.into_iter().collect();
        let profiles = store.profiles(&touched).map_err(storage)?;
        let mut computed: BTreeMap<ProfileId, serde_json::Map<String, Value>> = BTreeMap::new();
        for state in store.computed_trait_states(&touched).map_err(storage)? {
            if let Some(value) = state.value {
                computed.entry(state.profile).or_default().insert(state.name, value);
            }
        }
        let mut profile_rows = ProfileColumns::default();
        let mut identifier_rows = IdentifierColumns::default();
        for profile in &profiles {
            let id = profile.id.to_string();
            profile_rows.ids.push(id.clone());
            profile_rows.traits.push(jsonb_text(&Value::Object(profile.traits.clone())));
            profile_rows
                .computed
                .push(jsonb_text(&Value::Object(computed.get(&profile.id).cloned().unwrap_or_default())));
            profile_rows.first_seen_ms.push(profile.first_seen_ms);
            profile_rows.last_seen_ms.push(profile.last_seen_ms);
            for identifier in &profile.identifiers {
                identifier_rows.kinds.push(identifier.kind.clone());
                identifier_rows.values.push(identifier.value.clone());
                identifier_rows.profiles.push(id.clone());
            }
        }

        let mut transaction = self.client.transaction().map_err(failure)?;
        let events_written = transaction
            .execute(
                &format!(
                    "INSERT INTO {schema}.events (position, message_id, profile_id, type, name, timestamp, payload)
                     SELECT u.position, u.message_id, u.profile_id, u.type, u.name,
                            to_timestamp(u.at_ms / 1000.0), u.payload::jsonb
                     FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[])
                          AS u(position, message_id, profile_id, type, name, at_ms, payload)
                     ON CONFLICT (position) DO UPDATE SET profile_id = EXCLUDED.profile_id"
                ),
                &[
                    &events.positions,
                    &events.message_ids,
                    &events.profiles,
                    &events.types,
                    &events.names,
                    &events.at_ms,
                    &events.payloads,
                ],
            )
            .map_err(failure)?;
        transaction
            .execute(
                &format!(
                    "INSERT INTO {schema}.profiles (id, traits, computed_traits, first_seen_at, last_seen_at, updated_at)
                     SELECT u.id, u.traits::jsonb, u.computed::jsonb, to_timestamp(u.first_ms / 1000.0),
                            to_timestamp(u.last_ms / 1000.0), now()
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
                          AS u(id, traits, computed, first_ms, last_ms)
                     ON CONFLICT (id) DO UPDATE SET traits = EXCLUDED.traits,
                        computed_traits = EXCLUDED.computed_traits, first_seen_at = EXCLUDED.first_seen_at,
                        last_seen_at = EXCLUDED.last_seen_at, updated_at = now()"
                ),
                &[
                    &profile_rows.ids,
                    &profile_rows.traits,
                    &profile_rows.computed,
                    &profile_rows.first_seen_ms,
                    &profile_rows.last_seen_ms,
                ],
            )
            .map_err(failure)?;
        transaction
            .execute(
                &format!(
                    "INSERT INTO {schema}.identifiers (kind, value, profile_id, updated_at)
                     SELECT DISTINCT ON (u.kind, u.value) u.kind, u.value, u.profile_id, now()
                     FROM unnest($1::text[], $2::text[], $3::text[]) AS u(kind, value, profile_id)
                     ON CONFLICT (kind, value) DO UPDATE SET profile_id = EXCLUDED.profile_id, updated_at = now()"
                ),
                &[&identifier_rows.kinds, &identifier_rows.values, &identifier_rows.profiles],
            )
            .map_err(failure)?;
        let entered = transaction
            .execute(
                &format!(
                    "INSERT INTO {schema}.audience_memberships (audience, profile_id, entered_at, entered_change)
                     SELECT u.audience, u.profile_id, to_timestamp(u.at_ms / 1000.0), u.change
                     FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                          AS u(audience, profile_id, at_ms, change)
                     ON CONFLICT DO NOTHING"
                ),
                &[&entries.audiences, &entries.profiles, &entries.at_ms, &entries.ids],
            )
            .map_err(failure)?;
        // Each open stay is closed by the first exit after its entry.
        let exited = transaction
            .execute(
                &format!(
                    "UPDATE {schema}.audience_memberships m SET exited_at = x.at, exited_change = x.change
                     FROM (SELECT DISTINCT ON (s.audience, s.profile_id, s.entered_change)
                                  s.audience, s.profile_id, s.entered_change, u.change,
                                  to_timestamp(u.at_ms / 1000.0) AS at
                           FROM {schema}.audience_memberships s
                           JOIN unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                                AS u(audience, profile_id, at_ms, change)
                             ON s.audience = u.audience AND s.profile_id = u.profile_id AND u.change > s.entered_change
                           WHERE s.exited_change IS NULL
                           ORDER BY s.audience, s.profile_id, s.entered_change, u.change) x
                     WHERE m.audience = x.audience AND m.profile_id = x.profile_id
                       AND m.entered_change = x.entered_change"
                ),
                &[&exits.audiences, &exits.profiles, &exits.at_ms, &exits.ids],
            )
            .map_err(failure)?;
        transaction.commit().map_err(failure)?;
        Ok(Upserted {
            events: events_written as usize,
            profiles: profiles.len(),
            memberships: (entered + exited) as usize,
        })
    }
}

/// Applies the migrations not yet recorded, under an advisory lock.
fn migrate(client: &mut Client, schema: &str) -> Result<(), postgres::Error> {
    let mut transaction = client.transaction()?;
    // One key for every warehouse migration: they are rare and short.
    transaction.execute("SELECT pg_advisory_xact_lock(7242364611)", &[])?;
    transaction.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.tandem_migrations (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))?;
    let applied: i32 = transaction
        .query_one(&format!("SELECT coalesce(max(version), 0) FROM {schema}.tandem_migrations"), &[])?
        .get(0);
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
        transaction.batch_execute(&migration.replace("{schema}", schema))?;
        transaction.execute(
            &format!("INSERT INTO {schema}.tandem_migrations (version) VALUES ($1)"),
            &[&(index as i32 + 1)],
        )?;
    }
    transaction.commit()
}

/// JSON text PostgreSQL's `jsonb` accepts: it refuses the NUL character
/// (`\u0000`), which a client may send inside a string, so NUL becomes
/// U+FFFD, the replacement character.
fn jsonb_text(value: &Value) -> String {
    let text = value.to_string();
    if text.contains("\\u0000") {
        text.replace("\\u0000", "\\ufffd")
    } else {
        text
    }
}

#[derive(Default)]
struct EventColumns {
    positions: Vec<i64>,
    message_ids: Vec<Option<String>>,
    profiles: Vec<Option<String>>,
    types: Vec<String>,
    names: Vec<Option<String>>,
    at_ms: Vec<Option<i64>>,
    payloads: Vec<String>,
}

impl EventColumns {
    fn push(&mut self, position: LogPosition, event: &Value) {
        let text = |name: &str| event.get(name).and_then(Value::as_str).map(str::to_owned);
        self.positions.push(position.0 as i64);
        self.message_ids.push(text("messageId"));
        self.profiles.push(None);
        self.types.push(text("type").unwrap_or_default());
        self.names.push(text("event").or_else(|| text("name")));
        self.at_ms.push(
            text("timestamp")
                .and_then(|at| chrono::DateTime::parse_from_rfc3339(&at).ok())
                .map(|at| at.timestamp_millis()),
        );
        self.payloads.push(jsonb_text(event));
    }
}

#[derive(Default)]
struct ChangeColumns {
    audiences: Vec<String>,
    profiles: Vec<String>,
    at_ms: Vec<i64>,
    /// The change's id in the audience history (its outbox position).
    ids: Vec<i64>,
}

#[derive(Default)]
struct ProfileColumns {
    ids: Vec<String>,
    traits: Vec<String>,
    computed: Vec<String>,
    first_seen_ms: Vec<i64>,
    last_seen_ms: Vec<i64>,
}

#[derive(Default)]
struct IdentifierColumns {
    kinds: Vec<String>,
    values: Vec<String>,
    profiles: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: u64, kind: &str, at: &str) -> OutboxItem {
        OutboxItem {
            id: tandem_store::OutboxItemId(id),
            destination: "dwh".to_owned(),
            position: LogPosition(id),
            payload: serde_json::json!({
                "type": "audience", "messageId": format!("audience-{id}"), "audience": "pro",
                "change": kind, "profile": "prof_1", "timestamp": at, "traits": {}
            })
            .to_string(),
            attempts: 0,
            first_failed_at_ms: None,
            next_attempt_at_ms: 0,
            last_error: None,
            enqueued_at_ms: None,
        }
    }

    /// Regression: an exit redelivered after the profile entered again
    /// must not close the new stay, even when the entry's time is earlier
    /// (a backfill can stamp an entry with any time).
    #[test]
    fn stays_follow_the_history_order_under_redelivery() {
        let Some((database, _config)) = tandem_store::postgres::testing::TestDatabase::create() else { return };
        let settings = WarehouseSettings { url: database.url().unwrap(), schema: None };
        let dir = tempfile::tempdir().unwrap();
        let store = tandem_store::SqliteStore::open(dir.path()).unwrap();
        let definition: DestinationDefinition = serde_json::from_value(serde_json::json!({
            "name": "dwh", "destination": {"kind": "warehouse", "url": settings.url}, "audiences": [{"name": "pro"}]
        }))
        .unwrap();
        let entered = change(10, "entered", "2026-01-01T00:00:10Z");
        let exited = change(11, "exited", "2026-01-01T00:00:20Z");
        let entered_again = change(12, "entered", "2026-01-01T00:00:05Z");
        let exited_again = change(13, "exited", "2026-01-01T00:00:30Z");
        let mut warehouse = Warehouse::connect(&settings).unwrap();
        let stays = |warehouse: &mut Warehouse| -> Vec<(i64, Option<i64>)> {
            warehouse
                .client
                .query(
                    "SELECT entered_change, exited_change FROM public.audience_memberships ORDER BY entered_change",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect()
        };
        let batch = [entered.clone(), exited.clone(), entered_again.clone()];
        warehouse.write_batch(&store, &definition, &batch).unwrap();
        assert_eq!(stays(&mut warehouse), vec![(10, Some(11)), (12, None)]);
        warehouse.write_batch(&store, &definition, std::slice::from_ref(&exited)).unwrap();
        assert_eq!(stays(&mut warehouse), vec![(10, Some(11)), (12, None)], "the old exit leaves the new stay open");
        warehouse.write_batch(&store, &definition, std::slice::from_ref(&exited_again)).unwrap();
        let all = [entered, exited, entered_again, exited_again];
        warehouse.write_batch(&store, &definition, &all).unwrap();
        assert_eq!(stays(&mut warehouse), vec![(10, Some(11)), (12, Some(13))]);
        let at: (String, String) = {
            let row = warehouse
                .client
                .query_one(
                    "SELECT to_char(entered_at AT TIME ZONE 'UTC', 'SS'), to_char(exited_at AT TIME ZONE 'UTC', 'SS')
                     FROM public.audience_memberships WHERE entered_change = 12",
                    &[],
                )
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!(at, ("05".to_owned(), "30".to_owned()));
    }

    #[test]
    fn jsonb_text_replaces_the_nul_character_jsonb_refuses() {
        let value = serde_json::json!({"note": "a\u{0}b", "ok": "plain"});
        let text = jsonb_text(&value);
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["note"], "a\u{fffd}b");
        assert_eq!(back["ok"], "plain");
    }
}
