//! SQLite queries for people rather than the pipeline: filtered reads of the
//! log, profile listing and identifier search, and the administration of
//! sources and tokens.

use super::profile_state;
use super::{log_entry_from_row, source_from_row, SOURCE_COLUMNS};
use crate::{LogEntry, LogFilter, StoreError, TokenInfo};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use tandem_core::source::validate_source_name;
use tandem_core::{Identifier, Profile, ProfileId, Source, WriteKey};

pub fn filter_log(connection: &Connection, filter: &LogFilter, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
    let mut conditions = Vec::new();
    let mut values: Vec<SqlValue> = Vec::new();
    let mut condition = |sql: &str, value: SqlValue| {
        values.push(value);
        conditions.push(format!("{sql} ?{}", values.len()));
    };
    if let Some(source) = &filter.source_id {
        condition("source_id =", SqlValue::Text(source.as_str().to_owned()));
    }
    if let Some(event_type) = filter.event_type {
        condition("type =", SqlValue::Text(event_type.as_str().to_owned()));
    }
    if let Some(since) = filter.since_ms {
        condition("timestamp >=", SqlValue::Integer(since));
    }
    if let Some(until) = filter.until_ms {
        condition("timestamp <", SqlValue::Integer(until));
    }
    if let Some(after) = filter.after {
        condition("position >", SqlValue::Integer(after.0 as i64));
    }
    if let Some(before) = filter.before {
        condition("position <", SqlValue::Integer(before.0 as i64));
    }
    let clause = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
    let order = if filter.newest_first { "DESC" } else { "ASC" };
    values.push(SqlValue::Integer(limit as i64));
    let sql = format!(
        "SELECT position, source_id, message_id, type, received_at, payload, timestamp FROM events {clause}
         ORDER BY position {order} LIMIT ?{}",
        values.len()
    );
    let mut statement = connection.prepare_cached(&sql)?;
    let rows = statement.query_map(params_from_iter(values), log_entry_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn list_profiles(
    connection: &Connection,
    after: Option<ProfileId>,
    limit: usize,
) -> Result<Vec<Profile>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT state FROM profiles WHERE id > ?1 AND merged_into IS NULL AND state IS NOT NULL ORDER BY id LIMIT ?2",
    )?;
    let after = after.map_or(0, |id| id.0 as i64);
    let mut rows = statement.query(params![after, limit as i64])?;
    let mut profiles = Vec::new();
    while let Some(row) = rows.next()? {
        profiles.push(profile_state::decode(row.get_ref(0)?)?);
    }
    Ok(profiles)
}

pub fn list_profile_ids(
    connection: &Connection,
    after: Option<ProfileId>,
    limit: usize,
) -> Result<Vec<ProfileId>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id FROM profiles WHERE id > ?1 AND merged_into IS NULL AND state IS NOT NULL ORDER BY id LIMIT ?2",
    )?;
    let after = after.map_or(0, |id| id.0 as i64);
    let rows = statement.query_map(params![after, limit as i64], |row| Ok(ProfileId(row.get::<_, i64>(0)? as u64)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn identifiers_with_prefix(
    connection: &Connection,
    kind: &str,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(Identifier, ProfileId)>, StoreError> {
    // A range on the primary key (type, value), not LIKE: no escaping, and
    // the index serves it. Every value with the prefix sorts at or after the
    // prefix and before the prefix followed by the highest character.
    let upper = format!("{prefix}\u{10FFFF}");
    let lower = after.unwrap_or("");
    let mut statement = connection.prepare_cached(
        "SELECT value, profile_id FROM identifiers
         WHERE type = ?1 AND value >= ?2 AND value < ?3 AND value > ?4 ORDER BY value LIMIT ?5",
    )?;
    let rows = statement.query_map(params![kind, prefix, upper, lower, limit as i64], |row| {
        Ok((Identifier::new(kind, row.get::<_, String>(0)?), ProfileId(row.get::<_, i64>(1)? as u64)))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The columns [`token_from_row`] reads, in order.
pub const TOKEN_COLUMNS: &str = "id, name, created_at, role, expires_at, last_used_at";

pub fn token_from_row(row: &rusqlite::Row) -> rusqlite::Result<TokenInfo> {
    let role: String = row.get(3)?;
    Ok(TokenInfo {
        id: row.get(0)?,
        name: row.get(1)?,
        created_at_ms: row.get(2)?,
        // The column only ever holds a role's name; a hand-edited value
        // grants nothing beyond the least powerful role.
        role: role.parse().unwrap_or(tandem_core::govern::Role::Auditor),
        expires_at_ms: row.get(4)?,
        last_used_at_ms: row.get(5)?,
    })
}

pub fn list_tokens(connection: &Connection) -> Result<Vec<TokenInfo>, StoreError> {
    let mut statement =
        connection.prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id"))?;
    let rows = statement.query_map([], token_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes a token and, in the same transaction, the console sessions it
/// signed in.
pub fn revoke_token(connection: &mut Connection, id: &str) -> Result<TokenInfo, StoreError> {
    let transaction = connection.transaction()?;
    let found = transaction
        .prepare_cached(&format!("DELETE FROM api_tokens WHERE id = ?1 RETURNING {TOKEN_COLUMNS}"))?
        .query_row([id.trim()], token_from_row)
        .optional()?;
    let token = found.ok_or_else(|| StoreError::TokenNotFound(id.trim().to_owned()))?;
    transaction.prepare_cached("DELETE FROM console_sessions WHERE token_id = ?1")?.execute([&token.id])?;
    transaction.commit()?;
    Ok(token)
}

fn source_named(connection: &Connection, name: &str) -> Result<Source, StoreError> {
    connection
        .prepare_cached(&format!("SELECT {SOURCE_COLUMNS} FROM sources WHERE name = ?1"))?
        .query_row([name.trim()], source_from_row)
        .optional()?
        .ok_or_else(|| StoreError::SourceNotFound(name.trim().to_owned()))
}

pub fn rename_source(connection: &Connection, name: &str, new_name: &str) -> Result<Source, StoreError> {
    let new_name = validate_source_name(new_name)?;
    let mut source = source_named(connection, name)?;
    if source.name == new_name {
        return Ok(source);
    }
    let taken: bool = connection
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM sources WHERE name = ?1)")?
        .query_row([new_name], |row| row.get(0))?;
    if taken {
        return Err(StoreError::SourceExists(new_name.to_owned()));
    }
    connection.execute("UPDATE sources SET name = ?1 WHERE id = ?2", params![new_name, source.id.as_str()])?;
    source.name = new_name.to_owned();
    Ok(source)
}

pub fn set_write_key(connection: &Connection, name: &str, write_key: &WriteKey) -> Result<Source, StoreError> {
    let mut source = source_named(connection, name)?;
    connection
        .execute("UPDATE sources SET write_key = ?1 WHERE id = ?2", params![write_key.as_str(), source.id.as_str()])?;
    source.write_key = write_key.clone();
    Ok(source)
}

pub fn delete_source(connection: &mut Connection, name: &str) -> Result<Source, StoreError> {
    let transaction = connection.transaction()?;
    let source = source_named(&transaction, name)?;
    // The counters count every stored event, so no scan of the log is needed.
    let events: i64 = transaction
        .prepare_cached("SELECT COALESCE(SUM(stored), 0) FROM ingest_counters WHERE source_id = ?1")?
        .query_row([source.id.as_str()], |row| row.get(0))?;
    if events > 0 {
        return Err(StoreError::SourceInUse { name: source.name, events: events as u64 });
    }
    for sql in [
        "DELETE FROM ingest_counters WHERE source_id = ?1",
        "DELETE FROM message_ids WHERE source_id = ?1",
        "DELETE FROM sources WHERE id = ?1",
    ] {
        transaction.execute(sql, [source.id.as_str()])?;
    }
    transaction.commit()?;
    Ok(source)
}
