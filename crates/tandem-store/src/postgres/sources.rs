//! Sources, their write keys and webhook settings, and admin API tokens in
//! PostgreSQL. Name clashes are told apart from other failures by the
//! unique constraint that caught them, so two nodes creating the same source
//! at once get [`StoreError::SourceExists`], not a storage failure.

use super::log::lock_log_head;
use super::{json_error, PostgresStore};
use crate::{Sources, StoreError, TokenInfo};
use postgres::error::SqlState;
use postgres::{GenericClient, Row};
use tandem_core::source::validate_source_name;
use tandem_core::webhook::WebhookSettings;
use tandem_core::{Source, SourceId, SourceKind, WriteKey};

const SOURCE_COLUMNS: &str = "id, name, kind, write_key, created_at";

fn source_from_row(row: &Row) -> Result<Source, StoreError> {
    let kind: String = row.try_get(2)?;
    Ok(Source {
        id: SourceId::new(row.try_get::<_, String>(0)?),
        name: row.try_get(1)?,
        kind: kind.parse().unwrap_or(SourceKind::Backend),
        write_key: WriteKey::new(row.try_get::<_, String>(3)?),
        created_at_ms: row.try_get(4)?,
    })
}

/// The columns [`token_from_row`] reads, in order.
const TOKEN_COLUMNS: &str = "id, name, created_at, role, expires_at, last_used_at";

pub(super) fn token_from_row(row: &Row) -> Result<TokenInfo, StoreError> {
    let role: String = row.try_get(3)?;
    Ok(TokenInfo {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        created_at_ms: row.try_get(2)?,
        // As in SQLite: a hand-edited role grants no more than the least powerful one.
        role: role.parse().unwrap_or(tandem_core::govern::Role::Auditor),
        expires_at_ms: row.try_get(4)?,
        last_used_at_ms: row.try_get(5)?,
    })
}

/// Whether `error` is a violation of the unique constraint `constraint`.
fn violates(error: &postgres::Error, constraint: &str) -> bool {
    error.code() == Some(&SqlState::UNIQUE_VIOLATION)
        && error.as_db_error().and_then(|db_error| db_error.constraint()) == Some(constraint)
}

fn source_named(client: &mut impl GenericClient, name: &str) -> Result<Source, StoreError> {
    let row = client.query_opt(&format!("SELECT {SOURCE_COLUMNS} FROM sources WHERE name = $1"), &[&name.trim()])?;
    match row {
        Some(row) => source_from_row(&row),
        None => Err(StoreError::SourceNotFound(name.trim().to_owned())),
    }
}

impl Sources for PostgresStore {
    fn insert_source(&self, source: &Source) -> Result<(), StoreError> {
        self.with_client(|client| {
            let inserted = client.execute(
                "INSERT INTO sources (id, name, kind, write_key, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO NOTHING",
                &[
                    &source.id.as_str(),
                    &source.name,
                    &source.kind.as_str(),
                    &source.write_key.as_str(),
                    &source.created_at_ms,
                ],
            )?;
            if inserted == 0 {
                return Err(StoreError::SourceExists(source.name.clone()));
            }
            Ok(())
        })
    }

    fn list_sources(&self) -> Result<Vec<Source>, StoreError> {
        self.with_client(|client| {
            client
                .query(&format!("SELECT {SOURCE_COLUMNS} FROM sources ORDER BY listed_order"), &[])?
                .iter()
                .map(source_from_row)
                .collect()
        })
    }

    fn set_webhook(&self, name: &str, settings: &WebhookSettings) -> Result<Source, StoreError> {
        let text = serde_json::to_string(settings).map_err(json_error)?;
        self.with_client(|client| {
            let row = client.query_opt(
                &format!("UPDATE sources SET webhook = $1 WHERE name = $2 RETURNING {SOURCE_COLUMNS}"),
                &[&text, &name.trim()],
            )?;
            match row {
                Some(row) => source_from_row(&row),
                None => Err(StoreError::SourceNotFound(name.trim().to_owned())),
            }
        })
    }

    fn webhook(&self, id: &SourceId) -> Result<Option<(Source, WebhookSettings)>, StoreError> {
        self.with_client(|client| {
            let row = client
                .query_opt(&format!("SELECT {SOURCE_COLUMNS}, webhook FROM sources WHERE id = $1"), &[&id.as_str()])?;
            let Some(row) = row else { return Ok(None) };
            let Some(text) = row.try_get::<_, Option<String>>(5)? else { return Ok(None) };
            let settings = serde_json::from_str(&text).map_err(json_error)?;
            Ok(Some((source_from_row(&row)?, settings)))
        })
    }

    fn source_by_write_key(&self, write_key: &WriteKey) -> Result<Option<Source>, StoreError> {
        self.with_client(|client| {
            client
                .query_opt(
                    &format!("SELECT {SOURCE_COLUMNS} FROM sources WHERE write_key = $1"),
                    &[&write_key.as_str()],
                )?
                .map(|row| source_from_row(&row))
                .transpose()
        })
    }

    fn source_by_name(&self, name: &str) -> Result<Source, StoreError> {
        self.with_client(|client| source_named(client, name))
    }

    fn insert_token(&self, info: &TokenInfo, secret_digest: &str) -> Result<(), StoreError> {
        self.with_client(|client| {
            client.execute(
                "INSERT INTO api_tokens (id, name, secret_sha256, created_at, role, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&info.id, &info.name, &secret_digest, &info.created_at_ms, &info.role.as_str(), &info.expires_at_ms],
            )?;
            Ok(())
        })
    }

    fn token_by_digest(&self, secret_digest: &str) -> Result<Option<TokenInfo>, StoreError> {
        self.with_client(|client| {
            client
                .query_opt(
                    &format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE secret_sha256 = $1"),
                    &[&secret_digest],
                )?
                .map(|row| token_from_row(&row))
                .transpose()
        })
    }

    fn touch_token(&self, id: &str, at_ms: i64) -> Result<(), StoreError> {
        self.with_client(|client| {
            client.execute("UPDATE api_tokens SET last_used_at = $2 WHERE id = $1", &[&id, &at_ms])?;
            Ok(())
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        self.with_client(|client| {
            client
                .query(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id"), &[])?
                .iter()
                .map(token_from_row)
                .collect()
        })
    }

    fn revoke_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            let row = transaction
                .query_opt(&format!("DELETE FROM api_tokens WHERE id = $1 RETURNING {TOKEN_COLUMNS}"), &[&id.trim()])?;
            let token = match row {
                Some(row) => token_from_row(&row)?,
                None => return Err(StoreError::TokenNotFound(id.trim().to_owned())),
            };
            // The console sessions it signed in end with it.
            transaction.execute("DELETE FROM console_sessions WHERE token_id = $1", &[&token.id])?;
            transaction.commit()?;
            Ok(token)
        })
    }

    fn rename_source(&self, name: &str, new_name: &str) -> Result<Source, StoreError> {
        let new_name = validate_source_name(new_name)?;
        self.with_client(|client| {
            let mut source = source_named(client, name)?;
            if source.name == new_name {
                return Ok(source);
            }
            match client.execute("UPDATE sources SET name = $1 WHERE id = $2", &[&new_name, &source.id.as_str()]) {
                Ok(_) => {}
                Err(error) if violates(&error, "sources_name_key") => {
                    return Err(StoreError::SourceExists(new_name.to_owned()))
                }
                Err(error) => return Err(error.into()),
            }
            source.name = new_name.to_owned();
            Ok(source)
        })
    }

    fn set_write_key(&self, name: &str, write_key: &WriteKey) -> Result<Source, StoreError> {
        self.with_client(|client| {
            let row = client.query_opt(
                &format!("UPDATE sources SET write_key = $1 WHERE name = $2 RETURNING {SOURCE_COLUMNS}"),
                &[&write_key.as_str(), &name.trim()],
            )?;
            match row {
                Some(row) => source_from_row(&row),
                None => Err(StoreError::SourceNotFound(name.trim().to_owned())),
            }
        })
    }

    fn delete_source(&self, name: &str) -> Result<Source, StoreError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            // Under the append lock, so no append can add an event naming the
            // source between the count and the delete.
            lock_log_head(&mut transaction)?;
            let source = source_named(&mut transaction, name)?;
            // The counters count every stored event, so no scan of the log is needed.
            let events: i64 = transaction
                .query_one(
                    "SELECT COALESCE(SUM(stored), 0)::BIGINT FROM ingest_counters WHERE source_id = $1",
                    &[&source.id.as_str()],
                )?
                .try_get(0)?;
            if events > 0 {
                return Err(StoreError::SourceInUse { name: source.name, events: events as u64 });
            }
            for sql in [
                "DELETE FROM ingest_counters WHERE source_id = $1",
                "DELETE FROM message_ids WHERE source_id = $1",
                "DELETE FROM sources WHERE id = $1",
            ] {
                transaction.execute(sql, &[&source.id.as_str()])?;
            }
            transaction.commit()?;
            Ok(source)
        })
    }
}
