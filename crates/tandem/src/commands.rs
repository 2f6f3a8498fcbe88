//! The administrative commands: each reads or changes the store and prints
//! for people (aligned text) or for programs (`--json`).

use anyhow::Context;
use serde_json::{json, Value};
use std::io::Write;
use tandem_core::{LogPosition, Source, SourceKind};
use tandem_store::Store;

/// How many rows one read fetches while streaming long listings.
const PAGE: usize = 1_000;

fn source_json(source: &Source) -> Value {
    json!({
        "id": source.id,
        "name": source.name,
        "kind": source.kind,
        "write_key": source.write_key,
        "created_at": format_ms(source.created_at_ms),
    })
}

fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(tandem_core::event::format_timestamp)
        .unwrap_or_else(|| ms.to_string())
}

pub fn create_source(
    store: &impl Store,
    name: &str,
    kind: SourceKind,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let source = store.create_source(name, kind)?;
    if as_json {
        writeln!(out, "{}", source_json(&source))?;
    } else {
        writeln!(out, "created source {:?} ({})", source.name, source.kind)?;
        writeln!(out, "  id         {}", source.id)?;
        writeln!(out, "  write key  {}", source.write_key)?;
    }
    Ok(())
}

pub fn list_sources(store: &impl Store, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let sources = store.list_sources()?;
    if as_json {
        writeln!(out, "{}", Value::Array(sources.iter().map(source_json).collect()))?;
        return Ok(());
    }
    writeln!(out, "{:<26} {:<24} {:<8} {:<34} CREATED", "ID", "NAME", "KIND", "WRITE KEY")?;
    for source in &sources {
        writeln!(
            out,
            "{:<26} {:<24} {:<8} {:<34} {}",
            source.id,
            source.name,
            source.kind,
            source.write_key,
            format_ms(source.created_at_ms)
        )?;
    }
    Ok(())
}

pub fn list_events(
    store: &impl Store,
    after: u64,
    limit: usize,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut position = LogPosition(after);
    let mut remaining = limit;
    if !as_json {
        writeln!(out, "{:>10} {:<24} {:<9} {:<28} {:<24} MESSAGE ID", "POSITION", "RECEIVED", "TYPE", "EVENT", "USER")?;
    }
    while remaining > 0 {
        let page = store.read_log(position, remaining.min(PAGE))?;
        let Some(last) = page.last() else { break };
        position = last.position;
        remaining -= page.len();
        for entry in &page {
            if as_json {
                writeln!(out, "{}", entry.payload)?;
                continue;
            }
            let event: Value = serde_json::from_str(&entry.payload).context("reading an event from the log")?;
            let text = |key: &str| event.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
            let what = [text("event"), text("name"), text("groupId"), text("previousId")]
                .into_iter()
                .find(|value| !value.is_empty())
                .unwrap_or_default();
            let who =
                [text("userId"), text("anonymousId")].into_iter().find(|value| !value.is_empty()).unwrap_or_default();
            writeln!(
                out,
                "{:>10} {:<24} {:<9} {:<28} {:<24} {}",
                entry.position,
                format_ms(entry.received_at_ms),
                entry.event_type,
                what,
                who,
                entry.message_id
            )?;
        }
    }
    Ok(())
}

pub fn list_quarantine(store: &impl Store, limit: usize, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let mut after = 0;
    let mut remaining = limit;
    if !as_json {
        writeln!(
            out,
            "{:>6} {:<24} {:<26} {:>5} {:<18} {:<12} MESSAGE",
            "ID", "RECEIVED", "SOURCE", "INDEX", "CODE", "FIELD"
        )?;
    }
    while remaining > 0 {
        let page = store.list_quarantine(after, remaining.min(PAGE))?;
        let Some(last) = page.last() else { break };
        after = last.id;
        remaining -= page.len();
        for entry in &page {
            if as_json {
                let payload = serde_json::from_str::<Value>(&entry.record.payload)
                    .unwrap_or_else(|_| Value::String(entry.record.payload.clone()));
                writeln!(
                    out,
                    "{}",
                    json!({
                        "id": entry.id,
                        "receivedAt": format_ms(entry.record.received_at_ms),
                        "sourceId": entry.record.source_id,
                        "index": entry.record.batch_index,
                        "code": entry.record.code,
                        "field": entry.record.field,
                        "message": entry.record.message,
                        "payload": payload,
                    })
                )?;
            } else {
                writeln!(
                    out,
                    "{:>6} {:<24} {:<26} {:>5} {:<18} {:<12} {}",
                    entry.id,
                    format_ms(entry.record.received_at_ms),
                    entry.record.source_id,
                    entry.record.batch_index.map(|index| index.to_string()).unwrap_or_else(|| "-".into()),
                    entry.record.code,
                    entry.record.field.as_deref().unwrap_or("-"),
                    entry.record.message
                )?;
            }
        }
    }
    Ok(())
}

pub fn stats(store: &impl Store, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let stats = store.stats()?;
    if as_json {
        writeln!(out, "{}", serde_json::to_string(&stats)?)?;
        return Ok(());
    }
    writeln!(out, "log head     {}", stats.log_head)?;
    writeln!(out, "events       {}", stats.events)?;
    writeln!(out, "duplicates   {}", stats.duplicates)?;
    writeln!(out, "rejected     {}", stats.rejected)?;
    for (event_type, count) in &stats.events_by_type {
        writeln!(out, "  {event_type:<10} {count}")?;
    }
    writeln!(out)?;
    writeln!(out, "{:<24} {:>10} {:>10} {:>10}  BY TYPE", "SOURCE", "EVENTS", "DUPLICATES", "REJECTED")?;
    for source in &stats.sources {
        let by_type: Vec<String> =
            source.events_by_type.iter().map(|(event_type, count)| format!("{event_type}={count}")).collect();
        writeln!(
            out,
            "{:<24} {:>10} {:>10} {:>10}  {}",
            source.name,
            source.events,
            source.duplicates,
            source.rejected,
            by_type.join(" ")
        )?;
    }
    Ok(())
}
