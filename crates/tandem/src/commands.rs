//! The administrative commands: each reads or changes the store and prints
//! for people (aligned text) or for programs (`--json`).

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::io::Write;
use std::sync::Arc;
use tandem_core::webhook::WebhookSettings;
use tandem_core::{Identifier, IdentityChange, LogPosition, Profile, ProfileId, Source, SourceKind};
use tandem_server::profile::{history_json, profile_json};
use tandem_server::resolve::{self, Repair, Resolver};
use tandem_store::{Stage, Store};

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
    webhook: Option<&WebhookSettings>,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let source = store.create_source(name, kind)?;
    if let Some(settings) = webhook {
        store.set_webhook(&source.name, settings)?;
    }
    if as_json {
        let mut shown = source_json(&source);
        if let Some(settings) = webhook {
            shown["webhook"] = json!({"format": settings.format, "path": webhook_path(&source)});
        }
        writeln!(out, "{shown}")?;
    } else {
        writeln!(out, "created source {:?} ({})", source.name, source.kind)?;
        writeln!(out, "  id         {}", source.id)?;
        writeln!(out, "  write key  {}", source.write_key)?;
        if let Some(settings) = webhook {
            writeln!(out, "  webhook    POST {} ({})", webhook_path(&source), settings.format)?;
        }
    }
    Ok(())
}

fn webhook_path(source: &Source) -> String {
    format!("/v1/webhooks/{}", source.id)
}

pub fn set_webhook(
    store: &impl Store,
    name: &str,
    settings: &WebhookSettings,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let source = store.set_webhook(name, settings)?;
    let signed = if settings.secret.is_some() { "signed deliveries only" } else { "unsigned deliveries accepted" };
    writeln!(
        out,
        "source {:?} takes {} webhooks at POST {} ({signed})",
        source.name,
        settings.format,
        webhook_path(&source)
    )?;
    Ok(())
}

pub fn list_sources(store: &impl Store, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let sources = store.list_sources()?;
    let mut webhooks = Vec::with_capacity(sources.len());
    for source in &sources {
        let settings = match source.kind {
            SourceKind::Webhook => store.webhook(&source.id)?.map(|(_, settings)| settings),
            _ => None,
        };
        webhooks.push(settings);
    }
    if as_json {
        let listed: Vec<Value> = sources
            .iter()
            .zip(&webhooks)
            .map(|(source, webhook)| {
                let mut shown = source_json(source);
                if let Some(settings) = webhook {
                    shown["webhook"] = json!({
                        "format": settings.format,
                        "path": webhook_path(source),
                        "signed": settings.secret.is_some(),
                    });
                }
                shown
            })
            .collect();
        writeln!(out, "{}", Value::Array(listed))?;
        return Ok(());
    }
    writeln!(out, "{:<26} {:<24} {:<8} {:<34} CREATED", "ID", "NAME", "KIND", "WRITE KEY")?;
    for (source, webhook) in sources.iter().zip(&webhooks) {
        writeln!(
            out,
            "{:<26} {:<24} {:<8} {:<34} {}",
            source.id,
            source.name,
            source.kind,
            source.write_key,
            format_ms(source.created_at_ms)
        )?;
        if let Some(settings) = webhook {
            let signed = if settings.secret.is_some() { "signed" } else { "unsigned" };
            writeln!(out, "  webhook: POST {} ({}, {signed})", webhook_path(source), settings.format)?;
        }
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
    writeln!(out, "resolved     {} (lag {})", stats.resolver_position, stats.resolver_lag)?;
    writeln!(out, "profiles     {}", stats.profiles)?;
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

pub fn create_token(store: &impl Store, name: &str, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let (info, secret) = store.create_token(name)?;
    if as_json {
        writeln!(
            out,
            "{}",
            json!({"id": info.id, "name": info.name, "token": secret, "created_at": format_ms(info.created_at_ms)})
        )?;
    } else {
        writeln!(out, "created token {:?} ({}); it is shown only now:", info.name, info.id)?;
        writeln!(out, "  {secret}")?;
        writeln!(out, "use it as: Authorization: Bearer {secret}")?;
    }
    Ok(())
}

/// Brings profiles up to date with the log first, so the command line sees
/// every event even when no server is running.
/// When the resolver is already at the log head (a running server keeps it
/// there), nothing is loaded.
fn catch_up(store: &Arc<dyn Store>) -> anyhow::Result<()> {
    let resolved = store.stage_cursor(Stage::RESOLVE)?.unwrap_or_default().position;
    if resolved >= store.head()? {
        return Ok(());
    }
    let mut resolver = Resolver::load(store.clone())?;
    resolver.catch_up(resolve::DEFAULT_BATCH)?;
    Ok(())
}

fn find_profile(store: &Arc<dyn Store>, target: &str) -> anyhow::Result<Profile> {
    let found = if let Ok(id) = target.parse::<ProfileId>() {
        store.profile(id)?
    } else {
        let identifier: Identifier =
            target.parse().with_context(|| format!("{target:?} is neither a profile id (prof_N) nor an identifier"))?;
        store.profile_by_identifier(&identifier)?
    };
    found.with_context(|| format!("no profile {target}"))
}

pub fn show_profile(store: Arc<dyn Store>, target: &str, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let profile = find_profile(&store, target)?;
    if as_json {
        writeln!(out, "{}", profile_json(&profile))?;
        return Ok(());
    }
    writeln!(out, "profile {}", profile.id)?;
    writeln!(out, "  first seen  {}", format_ms(profile.first_seen_ms))?;
    writeln!(out, "  last seen   {}", format_ms(profile.last_seen_ms))?;
    writeln!(out, "identifiers")?;
    for identifier in &profile.identifiers {
        writeln!(out, "  {identifier}")?;
    }
    writeln!(out, "traits")?;
    for (key, value) in &profile.traits {
        writeln!(out, "  {key:<20} {value}")?;
    }
    for (group, traits) in &profile.groups {
        writeln!(out, "account {group}  {}", Value::Object(traits.clone()))?;
    }
    let counts: Vec<String> = profile.event_counts.iter().map(|(kind, count)| format!("{kind}={count}")).collect();
    writeln!(out, "events  {}", counts.join(" "))?;
    Ok(())
}

fn describe(change: &IdentityChange) -> String {
    let list = |identifiers: &[Identifier]| identifiers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    match change {
        IdentityChange::Created { profile, identifiers } => format!("created {profile} with {}", list(identifiers)),
        IdentityChange::Attached { profile, identifiers } => format!("attached {} to {profile}", list(identifiers)),
        IdentityChange::Merged { profile, merged, identifiers } => {
            let merged: Vec<String> = merged.iter().map(ToString::to_string).collect();
            format!("merged {} into {profile}: the event carried {}", merged.join(", "), list(identifiers))
        }
        IdentityChange::Dropped { identifier, reason, .. } => format!("dropped {identifier}: {reason}"),
        IdentityChange::Repaired { identifier, action, .. } => {
            format!("{action} {identifier} by an admin; profiles rebuilt")
        }
    }
}

pub fn explain_profile(store: Arc<dyn Store>, target: &str, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let profile = find_profile(&store, target)?;
    let history = store.identity_history(profile.id)?;
    let asked: Option<Identifier> = target.parse::<ProfileId>().is_err().then(|| target.parse().ok()).flatten();
    let adds = |identifier: &Identifier, change: &IdentityChange| match change {
        IdentityChange::Created { identifiers, .. } | IdentityChange::Attached { identifiers, .. } => {
            identifiers.contains(identifier)
        }
        _ => false,
    };
    if as_json {
        let entries =
            history.iter().map(|record| history_json(store.as_ref(), record)).collect::<Result<Vec<_>, _>>()?;
        let reason = asked
            .as_ref()
            .and_then(|identifier| history.iter().find(|record| adds(identifier, &record.change)))
            .map(|record| history_json(store.as_ref(), record))
            .transpose()?;
        writeln!(
            out,
            "{}",
            json!({"profile": profile_json(&profile), "identifier": asked, "reason": reason, "history": entries})
        )?;
        return Ok(());
    }
    writeln!(out, "profile {} holds {} identifiers", profile.id, profile.identifiers.len())?;
    for identifier in &profile.identifiers {
        match history.iter().find(|record| adds(identifier, &record.change)) {
            Some(record) => {
                let entry = history_json(store.as_ref(), record)?;
                writeln!(
                    out,
                    "  {identifier}: added by event {} (message {}) at {}",
                    record.position.map_or("-".into(), |position| position.to_string()),
                    entry["message_id"].as_str().unwrap_or("-"),
                    entry["recorded_at"].as_str().unwrap_or("-"),
                )?;
            }
            None => writeln!(out, "  {identifier}: added by a rebuild")?,
        }
    }
    writeln!(out, "history")?;
    for record in &history {
        let entry = history_json(store.as_ref(), record)?;
        writeln!(
            out,
            "  {:>8}  {:<38}  {}",
            record.position.map_or("admin".into(), |position| position.to_string()),
            entry["message_id"].as_str().unwrap_or("-"),
            describe(&record.change)
        )?;
    }
    Ok(())
}

/// A change to the identity rules from the command line.
pub struct RulesChange {
    pub limits: Vec<String>,
    pub default_limit: Option<u32>,
    pub priority: Option<Vec<String>>,
    pub block_values: Vec<String>,
    pub block_patterns: Vec<String>,
    pub identifiers: Vec<String>,
}

pub fn identity_rules(
    store: &impl Store,
    change: RulesChange,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut rules = store.identity_rules()?;
    let mut changed = false;
    for limit in &change.limits {
        let Some((kind, number)) = limit.split_once('=') else { bail!("--limit must be TYPE=N, got {limit:?}") };
        let number: u32 =
            number.trim().parse().with_context(|| format!("--limit {limit:?}: N must be a whole number"))?;
        rules.limits.insert(kind.trim().to_owned(), number);
        changed = true;
    }
    if let Some(default_limit) = change.default_limit {
        rules.default_limit = default_limit;
        changed = true;
    }
    if let Some(priority) = change.priority {
        rules.priority =
            priority.into_iter().map(|kind| kind.trim().to_owned()).filter(|kind| !kind.is_empty()).collect();
        changed = true;
    }
    for (list, additions) in [
        (&mut rules.blocked_values, change.block_values),
        (&mut rules.blocked_patterns, change.block_patterns),
        (&mut rules.custom_identifiers, change.identifiers),
    ] {
        for addition in additions {
            if !list.contains(&addition) {
                list.push(addition);
                changed = true;
            }
        }
    }
    if changed {
        resolve::set_rules(store, rules.clone())?;
    }
    if as_json {
        writeln!(out, "{}", serde_json::to_string(&rules)?)?;
    } else {
        writeln!(out, "{}", serde_json::to_string_pretty(&rules)?)?;
        if changed {
            writeln!(out, "rules saved; they apply to events resolved from now on (use `identity block` to rebuild)")?;
        }
    }
    Ok(())
}

fn report_repair(report: &resolve::RepairReport, out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(out, "{} is no longer used for matching; replayed {} events", report.identifier, report.events_replayed)?;
    writeln!(out, "profiles: {} before, {} after", report.profiles_before, report.profiles_after)?;
    if let Some(before) = report.profile_before {
        let now: Vec<String> = report.profiles_now.iter().map(ToString::to_string).collect();
        writeln!(out, "the events of {before} now belong to: {}", now.join(", "))?;
    }
    Ok(())
}

pub fn unlink(store: Arc<dyn Store>, profile: &str, identifier: &str, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let profile: ProfileId = profile.parse()?;
    let identifier: Identifier = identifier.parse()?;
    let report = resolve::repair(&store, &Repair::Unlink { profile, identifier })?;
    report_repair(&report, out)
}

pub fn block(store: Arc<dyn Store>, identifier: &str, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let identifier: Identifier = identifier.parse()?;
    let report = resolve::repair(&store, &Repair::Block { identifier })?;
    report_repair(&report, out)
}
