//! `tandem destination` and `tandem deliveries`: create, list, show, test,
//! pause and delete destinations in the data directory; list failed
//! deliveries (dead letters) by destination, time and profile, and replay
//! them. A definition is given as JSON (inline, or `@FILE`) and validated
//! before anything is stored. Delivery itself runs in the server (`tandem
//! serve`); `replay` puts dead letters back in the outbox for it, and
//! `test` sends one sample item from this process, outside the outbox.

use anyhow::{bail, Context};
use serde_json::Value;
use std::io::Write;
use std::sync::Arc;
use tandem_core::activate::DestinationDefinition;
use tandem_core::govern::stack::{ToolInfo, ToolKind};
use tandem_server::activate;
use tandem_server::destination_api::{
    dead_letter_filter, dead_letter_json, destination_json, parse_definition, test_json,
};
use tandem_server::stack::set_tool;
use tandem_store::Store;

/// Dead letters printed unless told otherwise.
pub const DEFAULT_DEAD_LETTER_PAGE: usize = 100;

/// A definition from the command line: JSON text, or `@FILE` naming a file
/// of it, with an optional `"registry"` entry.
fn read_definition(definition: &str) -> anyhow::Result<(DestinationDefinition, Option<ToolInfo>)> {
    let text = match definition.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?,
        None => definition.to_owned(),
    };
    parse_definition(text.as_bytes()).map_err(|error| anyhow::anyhow!("{}", error.message))
}

pub fn create(store: Arc<dyn Store>, definition: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let (definition, registry) = read_definition(definition)?;
    activate::create_destination(store.as_ref(), &definition, chrono::Utc::now().timestamp_millis())?;
    if let Some(registry) = registry {
        set_tool(store.as_ref(), ToolKind::Destination, &definition.name, registry)?;
    }
    writeln!(
        out,
        "created {} destination {:?}; the server delivers events logged from now on",
        definition.destination.kind(),
        definition.name
    )?;
    Ok(())
}

pub fn list(store: Arc<dyn Store>, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let records = store.list_destinations()?;
    if as_json {
        let list: Vec<Value> = records.iter().map(destination_json).collect();
        writeln!(out, "{}", Value::Array(list))?;
        return Ok(());
    }
    if records.is_empty() {
        writeln!(out, "no destinations; create one with tandem destination create '{{…}}'")?;
    }
    for record in &records {
        let counts = record.counts;
        writeln!(
            out,
            "{:<24} {:<8} {:>8} delivered {:>6} pending {:>6} retrying {:>6} dead{}",
            record.definition.name,
            record.definition.destination.kind(),
            counts.delivered,
            counts.pending,
            counts.retrying,
            counts.dead,
            if record.paused { "  (paused)" } else { "" }
        )?;
    }
    Ok(())
}

pub fn show(store: Arc<dyn Store>, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let Some(record) = store.destination(name)? else { bail!("no destination named {name:?}") };
    let mut shown = destination_json(&record);
    shown["consent_withheld"] = serde_json::to_value(store.withheld_counts(name)?)?;
    writeln!(out, "{}", serde_json::to_string_pretty(&shown)?)?;
    Ok(())
}

fn filter(since: Option<&str>, profile: Option<&str>) -> anyhow::Result<tandem_store::DeadLetterFilter> {
    dead_letter_filter(since, profile, chrono::Utc::now().timestamp_millis())
        .map_err(|(field, message)| anyhow::anyhow!("--{field}: {message}"))
}

/// `tandem deliveries failed` (and `destination dead-letters NAME`).
pub fn failed(
    store: Arc<dyn Store>,
    name: Option<&str>,
    since: Option<&str>,
    profile: Option<&str>,
    limit: usize,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let letters = activate::dead_letters(store.as_ref(), name, &filter(since, profile)?, limit)?;
    if as_json {
        writeln!(out, "{}", Value::Array(letters.iter().map(dead_letter_json).collect()))?;
        return Ok(());
    }
    if letters.is_empty() {
        match name {
            Some(name) => writeln!(out, "no failed deliveries for {name:?}")?,
            None => writeln!(out, "no failed deliveries")?,
        }
    }
    for letter in &letters {
        let profile = letter.profile.map(|id| id.to_string()).unwrap_or_else(|| "-".to_owned());
        writeln!(
            out,
            "{:<20} position {:<10} {:<14} attempts {:<4} {}  {}",
            letter.destination,
            letter.position.0,
            profile,
            letter.attempts,
            chrono::DateTime::from_timestamp_millis(letter.dead_at_ms)
                .map(tandem_core::event::format_timestamp)
                .unwrap_or_default(),
            letter.last_error
        )?;
    }
    Ok(())
}

/// `tandem destination test NAME`: one sample item, now, outside the outbox.
pub fn test(store: Arc<dyn Store>, name: &str, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let outcome = activate::send_test(store.as_ref(), name, chrono::Utc::now().timestamp_millis())?;
    if as_json {
        writeln!(out, "{}", test_json(name, &outcome))?;
    } else {
        match &outcome {
            Ok(receipt) => writeln!(out, "test sent to {name:?}: {}", receipt.detail)?,
            Err(failure) => writeln!(out, "test to {name:?} failed: {failure}")?,
        }
    }
    if outcome.is_err() {
        bail!("the test delivery to {name:?} failed");
    }
    Ok(())
}

pub fn set_paused(store: Arc<dyn Store>, name: &str, paused: bool, out: &mut impl Write) -> anyhow::Result<()> {
    store.set_destination_paused(name, paused)?;
    if paused {
        writeln!(out, "{name:?} is paused: its items are kept, in order, until `tandem destination resume {name}`")?;
    } else {
        writeln!(out, "{name:?} is sending again, starting with what it kept")?;
    }
    Ok(())
}

/// `tandem deliveries replay` (and `destination replay NAME`).
pub fn replay(
    store: Arc<dyn Store>,
    name: &str,
    since: Option<&str>,
    profile: Option<&str>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let replayed = activate::replay(store.as_ref(), name, &filter(since, profile)?)?;
    writeln!(out, "put {replayed} dead letters of {name:?} back in its outbox, in their order")?;
    Ok(())
}

pub fn delete(store: Arc<dyn Store>, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    store.delete_destination(name)?;
    writeln!(out, "deleted destination {name:?} with its outbox and dead letters")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_store::SqliteStore;

    #[test]
    fn create_list_replay_and_delete_a_destination() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let mut out = Vec::new();
        let definition =
            r#"{"name": "archive", "destination": {"kind": "file", "path": "/tmp/archive.jsonl"}, "events": {}}"#;
        create(store.clone(), definition, &mut out).unwrap();
        assert!(create(store.clone(), r#"{"name": "Bad", "destination": {"kind": "file", "path": "x"}}"#, &mut out)
            .unwrap_err()
            .to_string()
            .contains("name"));
        list(store.clone(), false, &mut out).unwrap();
        replay(store.clone(), "archive", None, None, &mut out).unwrap();
        set_paused(store.clone(), "archive", true, &mut out).unwrap();
        assert!(store.destination("archive").unwrap().unwrap().paused);
        set_paused(store.clone(), "archive", false, &mut out).unwrap();
        assert!(!store.destination("archive").unwrap().unwrap().paused);
        assert!(set_paused(store.clone(), "nobody", true, &mut out).is_err());
        failed(store.clone(), Some("archive"), Some("2h"), None, 10, false, &mut out).unwrap();
        assert!(failed(store.clone(), None, Some("soon"), None, 10, false, &mut out)
            .unwrap_err()
            .to_string()
            .contains("--since"));
        assert!(failed(store.clone(), None, None, Some("ann"), 10, false, &mut out).is_err());
        delete(store.clone(), "archive", &mut out).unwrap();
        assert!(replay(store.clone(), "archive", None, None, &mut out).is_err());
        assert!(failed(store.clone(), Some("archive"), None, None, 10, false, &mut out).is_err());
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("created file destination \"archive\""), "{text}");
        assert!(text.contains("archive                  file            0 delivered"), "{text}");
        assert!(text.contains("put 0 dead letters"), "{text}");
        assert!(text.contains("no failed deliveries for \"archive\""), "{text}");
    }
}
