//! The administrative commands: each reads or changes the store and prints
//! for people (aligned text) or for programs (`--json`).

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::io::Write;
use std::sync::Arc;
use tandem_core::webhook::WebhookSettings;
use tandem_core::{Identifier, IdentityChange, LogPosition, Profile, ProfileId, Source, SourceId, SourceKind};
use tandem_server::profile::{history_json, profile_json};
use tandem_server::resolve::{self, Repair, Resolver};
use tandem_store::browse::{self, EventQuery, ProfileQuery};
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
    store: &dyn Store,
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
    store: &dyn Store,
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

pub fn list_sources(store: &dyn Store, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
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

/// What `events list` shows.
pub struct EventListing {
    pub query: EventQuery,
    pub source: Option<String>,
    pub limit: usize,
    pub as_json: bool,
}

/// A point in time as the CLI takes it: RFC 3339, a date (`2026-11-01`, its
/// midnight UTC), or a span ago (`30d`, `12h`, `45m`); milliseconds since the epoch.
pub fn parse_time(text: &str, now: chrono::DateTime<chrono::Utc>) -> anyhow::Result<i64> {
    let text = text.trim();
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(time.timestamp_millis());
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_time(chrono::NaiveTime::MIN).and_utc().timestamp_millis());
    }
    let unit = text.chars().last().unwrap_or(' ');
    let amount: Option<i64> = text[..text.len() - unit.len_utf8().min(text.len())].parse().ok();
    let span = match (amount, unit) {
        (Some(amount), 'd') => chrono::Duration::try_days(amount),
        (Some(amount), 'h') => chrono::Duration::try_hours(amount),
        (Some(amount), 'm') => chrono::Duration::try_minutes(amount),
        _ => None,
    };
    match span {
        Some(span) => Ok((now - span).timestamp_millis()),
        None => bail!("{text:?} is not a time: use RFC 3339 (2026-11-01T08:00:00Z), a date (2026-11-01) or a span ago (30d, 12h, 45m)"),
    }
}

pub fn list_events(store: &dyn Store, mut listing: EventListing, out: &mut impl Write) -> anyhow::Result<()> {
    if let Some(name) = &listing.source {
        listing.query.filter.source_id = Some(store.source_by_name(name)?.id);
    }
    let names: std::collections::HashMap<SourceId, String> =
        store.list_sources()?.into_iter().map(|source| (source.id, source.name)).collect();
    if !listing.as_json {
        writeln!(
            out,
            "{:>10} {:<24} {:<16} {:<9} {:<28} {:<24} MESSAGE ID",
            "POSITION", "EVENT TIME", "SOURCE", "TYPE", "EVENT", "USER"
        )?;
    }
    let mut remaining = listing.limit;
    while remaining > 0 {
        let page = browse::find_events(store, &listing.query, remaining.min(PAGE), usize::MAX)?;
        remaining -= page.events.len();
        for entry in &page.events {
            if listing.as_json {
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
            let source = names.get(&entry.source_id).map_or(entry.source_id.as_str(), String::as_str);
            writeln!(
                out,
                "{:>10} {:<24} {:<16} {:<9} {:<28} {:<24} {}",
                entry.position,
                text("timestamp"),
                source,
                entry.event_type,
                what,
                who,
                entry.message_id
            )?;
        }
        let Some(next) = page.next else { break };
        let filter = &mut listing.query.filter;
        if filter.newest_first {
            filter.before = Some(next);
        } else {
            filter.after = Some(next);
        }
    }
    Ok(())
}

/// What `profile list` shows.
pub struct ProfileListing {
    pub query: ProfileQuery,
    pub limit: usize,
    pub as_json: bool,
    /// Set when the reader's role has no PII access: values are masked.
    pub mask: Option<tandem_core::govern::PiiPolicy>,
}

/// The policy that masks what `role` may not see in clear (the PII rules
/// in force: the stored ones in front of `settings`); `None` for a role
/// with `pii:read` (the command line acts as admin by default).
pub fn masking_for(
    role: Option<tandem_core::govern::Role>,
    store: &dyn Store,
    settings: &tandem_core::govern::PiiSettings,
) -> anyhow::Result<Option<tandem_core::govern::PiiPolicy>> {
    match role {
        Some(role) if !role.grants(tandem_core::govern::Permission::PiiRead) => {
            Ok(Some(tandem_server::pii::policy_in_force(store, settings)?))
        }
        _ => Ok(None),
    }
}

/// `profile` with its yellow and red identifier values and traits masked.
fn masked(profile: &tandem_core::Profile, policy: &tandem_core::govern::PiiPolicy) -> tandem_core::Profile {
    use tandem_core::govern::{pii::mask, PiiClass};
    let mut shown = profile.clone();
    for identifier in &mut shown.identifiers {
        let value = Value::String(identifier.value.clone());
        if policy.classify(&identifier.kind, &value) != PiiClass::Green {
            identifier.value = mask(&identifier.kind, &value);
        }
    }
    if let Value::Object(traits) = policy.mask_json(&Value::Object(shown.traits.clone())) {
        shown.traits = traits;
    }
    shown
}

pub fn list_profiles(store: Arc<dyn Store>, listing: ProfileListing, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let mut page = browse::find_profiles(store.as_ref(), &listing.query, listing.limit, usize::MAX)?;
    if let Some(policy) = &listing.mask {
        page.profiles = page.profiles.iter().map(|profile| masked(profile, policy)).collect();
    }
    if listing.as_json {
        let profiles: Vec<Value> = page.profiles.iter().map(profile_json).collect();
        writeln!(out, "{}", json!({"profiles": profiles, "next_after": page.next_after}))?;
        return Ok(());
    }
    writeln!(out, "{:<12} {:<24} {:<24} {:>7}  IDENTIFIERS", "PROFILE", "FIRST SEEN", "LAST SEEN", "EVENTS")?;
    for profile in &page.profiles {
        let events: u64 = profile.event_counts.values().sum();
        let identifiers: Vec<String> = profile.identifiers.iter().take(4).map(ToString::to_string).collect();
        let more = profile.identifiers.len().saturating_sub(4);
        writeln!(
            out,
            "{:<12} {:<24} {:<24} {:>7}  {}{}",
            profile.id,
            format_ms(profile.first_seen_ms),
            format_ms(profile.last_seen_ms),
            events,
            identifiers.join(" "),
            if more > 0 { format!(" (+{more})") } else { String::new() }
        )?;
    }
    if let Some(next) = &page.next_after {
        writeln!(out, "more: --after {next}")?;
    }
    Ok(())
}

pub fn list_quarantine(store: &dyn Store, limit: usize, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let names: std::collections::HashMap<String, String> =
        store.list_sources()?.into_iter().map(|source| (source.id.to_string(), source.name)).collect();
    let source_name = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_owned());
    let mut after = 0;
    let mut remaining = limit;
    if !as_json {
        writeln!(
            out,
            "{:>6} {:<24} {:<24} {:>5} {:<18} {:<12} MESSAGE",
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
                        "source": source_name(entry.record.source_id.as_str()),
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
                    "{:>6} {:<24} {:<24} {:>5} {:<18} {:<12} {}",
                    entry.id,
                    format_ms(entry.record.received_at_ms),
                    source_name(entry.record.source_id.as_str()),
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

pub fn stats(store: &dyn Store, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let stats = store.stats()?;
    if as_json {
        writeln!(out, "{}", serde_json::to_string(&stats)?)?;
        return Ok(());
    }
    writeln!(out, "log head     {}", stats.log_head)?;
    writeln!(out, "resolved     {} (lag {})", stats.resolver_position, stats.resolver_lag)?;
    writeln!(out, "profiles     {}", stats.profiles)?;
    writeln!(
        out,
        "unresolved   {} (events that belong to no profile: no usable identifier, or unreadable)",
        stats.unresolved
    )?;
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

/// When a new token stops working: an RFC 3339 time, or a span from now
/// (`30d`, `12h`, `45m`); milliseconds since the epoch, in the future.
pub fn parse_expiry(text: &str, now: chrono::DateTime<chrono::Utc>) -> anyhow::Result<i64> {
    let text = text.trim();
    let at = if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        time.timestamp_millis()
    } else {
        let (number, unit) = text.split_at(text.len().saturating_sub(1));
        let count: i64 = number.parse().map_err(|_| {
            anyhow::anyhow!("--expires {text:?}: expected a span such as 30d, 12h or 45m, or an RFC 3339 time")
        })?;
        let unit_ms = match unit {
            "d" => 86_400_000,
            "h" => 3_600_000,
            "m" => 60_000,
            _ => anyhow::bail!("--expires {text:?}: the span's unit must be d, h or m"),
        };
        now.timestamp_millis() + count.saturating_mul(unit_ms)
    };
    if at <= now.timestamp_millis() {
        anyhow::bail!("--expires {text:?} is not in the future");
    }
    Ok(at)
}

fn format_optional_ms(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".to_owned(), format_ms)
}

pub fn create_token(
    store: &dyn Store,
    name: &str,
    role: tandem_core::govern::Role,
    expires_at_ms: Option<i64>,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (info, secret) = store.create_token_with(name, role, expires_at_ms)?;
    if as_json {
        writeln!(
            out,
            "{}",
            json!({
                "id": info.id,
                "name": info.name,
                "role": info.role,
                "expires_at": info.expires_at_ms.map(format_ms),
                "token": secret,
                "created_at": format_ms(info.created_at_ms),
            })
        )?;
    } else {
        let expiry = info.expires_at_ms.map_or_else(String::new, |at| format!(", expires {}", format_ms(at)));
        writeln!(out, "created {} token {:?} ({}{expiry}); it is shown only now:", info.role, info.name, info.id)?;
        writeln!(out, "  {secret}")?;
        writeln!(out, "use it as: Authorization: Bearer {secret}")?;
    }
    Ok(())
}

pub fn list_tokens(store: &dyn Store, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let tokens = store.list_tokens()?;
    if as_json {
        let listed: Vec<Value> = tokens
            .iter()
            .map(|token| {
                json!({
                    "id": token.id,
                    "name": token.name,
                    "role": token.role,
                    "created_at": format_ms(token.created_at_ms),
                    "expires_at": token.expires_at_ms.map(format_ms),
                    "last_used_at": token.last_used_at_ms.map(format_ms),
                })
            })
            .collect();
        writeln!(out, "{}", Value::Array(listed))?;
        return Ok(());
    }
    writeln!(out, "{:<18} {:<20} {:<9} {:<24} {:<24} LAST USED", "ID", "NAME", "ROLE", "CREATED", "EXPIRES")?;
    let now = chrono::Utc::now().timestamp_millis();
    for token in &tokens {
        let expires = match token.expires_at_ms {
            Some(_) if token.is_expired(now) => format!("{} (expired)", format_optional_ms(token.expires_at_ms)),
            other => format_optional_ms(other),
        };
        writeln!(
            out,
            "{:<18} {:<20} {:<9} {:<24} {:<24} {}",
            token.id,
            token.name,
            token.role,
            format_ms(token.created_at_ms),
            expires,
            format_optional_ms(token.last_used_at_ms)
        )?;
    }
    Ok(())
}

pub fn revoke_token(store: &dyn Store, id: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let token = store.revoke_token(id)?;
    writeln!(
        out,
        "revoked token {:?} ({}); a running server refuses it within {} s, and its console sessions have ended",
        token.name,
        token.id,
        tandem_server::auth::CACHE_TTL.as_secs()
    )?;
    Ok(())
}

pub fn rotate_key(store: &dyn Store, name: &str, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let source = store.rotate_write_key(name)?;
    if as_json {
        writeln!(out, "{}", source_json(&source))?;
    } else {
        writeln!(out, "source {:?} has a new write key; the old one stops working", source.name)?;
        writeln!(out, "  write key  {}", source.write_key)?;
        writeln!(out, "a running server refuses the old key within {} s", tandem_server::auth::CACHE_TTL.as_secs())?;
    }
    Ok(())
}

/// The listing `profile list` asked for.
pub fn profile_listing(
    limit: usize,
    after: Option<String>,
    search: Option<String>,
    traits: &[String],
    as_json: bool,
) -> anyhow::Result<ProfileListing> {
    if limit == 0 {
        bail!("--limit must be at least 1");
    }
    let identifier_prefix = search
        .map(|text| {
            browse::parse_identifier_prefix(&text)
                .with_context(|| format!("--search {text:?} must be TYPE:PREFIX, such as email:ann"))
        })
        .transpose()?;
    let traits = traits
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
                .with_context(|| format!("--trait {pair:?} must be NAME=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(ProfileListing { query: ProfileQuery { identifier_prefix, traits, after }, limit, as_json, mask: None })
}

/// Brings profiles up to date with the log first, so the command line sees
/// every event even when no server is running.
/// When the resolver is already at the log head (a running server keeps it
/// there), nothing is loaded.
///
/// On a shared store the command resolves only while holding the resolver's
/// lease: when a server holds it, that server is catching up already, and
/// resolving here too would only race it, so the answer is what it has
/// committed so far (the lag is said on standard error).
pub fn catch_up(store: &Arc<dyn Store>) -> anyhow::Result<()> {
    let resolved = store.stage_cursor(Stage::RESOLVE)?.unwrap_or_default().position;
    let head = store.head()?;
    if resolved >= head {
        return Ok(());
    }
    let Some(_lease) = store.try_lease(Stage::RESOLVE)? else {
        eprintln!(
            "a server is resolving the log: {} newer events are not in profiles yet",
            head.0.saturating_sub(resolved.0)
        );
        return Ok(());
    };
    let mut resolver = Resolver::load(store.clone())?;
    resolver.catch_up(resolve::DEFAULT_BATCH)?;
    Ok(())
}

fn find_profile(store: &Arc<dyn Store>, target: &str) -> anyhow::Result<Profile> {
    let found = if let Ok(id) = target.parse::<ProfileId>() {
        store.profile(id)?
    } else {
        // Normalized as events are, with the phone region when it matters.
        let normalizer = if tandem_core::identity::needs_phone_region(target) {
            store.identity_rules()?.normalizer()?
        } else {
            tandem_core::identity::Normalizer::default()
        };
        let identifier: Identifier = normalizer
            .parse(target)
            .with_context(|| format!("{target:?} is neither a profile id (prof_N) nor an identifier"))?;
        store.profile_by_identifier(&identifier)?
    };
    found.with_context(|| format!("no profile {target}"))
}

pub fn show_profile(
    store: Arc<dyn Store>,
    target: &str,
    as_json: bool,
    mask: Option<&tandem_core::govern::PiiPolicy>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    catch_up(&store)?;
    // Computed traits are kept by the audience stage: bring it up to date too.
    tandem_server::audience::AudienceStage::new(store.clone(), tandem_server::audience::system_clock()).catch_up()?;
    let profile = find_profile(&store, target)?;
    let profile = match mask {
        Some(policy) => masked(&profile, policy),
        None => profile,
    };
    let computed: std::collections::BTreeMap<String, Value> = store
        .computed_trait_states(&[profile.id])?
        .into_iter()
        .filter_map(|stored| Some((stored.name, stored.value?)))
        .collect();
    if as_json {
        let mut body = profile_json(&profile);
        body["computed_traits"] = json!(computed);
        writeln!(out, "{body}")?;
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
    if !computed.is_empty() {
        writeln!(out, "computed traits")?;
        for (name, value) in &computed {
            writeln!(out, "  {name:<20} {value}")?;
        }
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

/// Events the resolver tied to no profile, oldest first, with the reason
/// and the event as stored.
pub fn list_unresolved(
    store: Arc<dyn Store>,
    after: LogPosition,
    limit: usize,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    catch_up(&store)?;
    for unresolved in store.unresolved_events(after, limit)? {
        let position = unresolved.position;
        let entry =
            store.read_log(LogPosition(position.0 - 1), 1)?.into_iter().find(|entry| entry.position == position);
        let payload = entry.map(|entry| entry.payload).unwrap_or_default();
        if as_json {
            let event: serde_json::Value = serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload));
            let line = serde_json::json!({"position": position, "reason": unresolved.reason, "event": event});
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{:>8}  {}  {}", position.0, unresolved.reason, payload)?;
        }
    }
    Ok(())
}

/// A change to the identity rules from the command line.
#[derive(Debug, clap::Args)]
pub struct RulesChange {
    /// Limit per identifier type, as TYPE=N (repeatable)
    #[arg(long = "limit", value_name = "TYPE=N")]
    pub limits: Vec<String>,
    /// Limit of every type without its own
    #[arg(long)]
    pub default_limit: Option<u32>,
    /// Priority order, most important first, as TYPE,TYPE,…
    #[arg(long, value_delimiter = ',')]
    pub priority: Option<Vec<String>>,
    /// A value that never identifies anyone (repeatable)
    #[arg(long = "block-value", value_name = "VALUE")]
    pub block_values: Vec<String>,
    /// A regular expression for values that never identify anyone (repeatable)
    #[arg(long = "block-pattern", value_name = "REGEX")]
    pub block_patterns: Vec<String>,
    /// A regular expression for values of one type that never identify anyone, e.g. email='^info@' (repeatable)
    #[arg(long = "block-type-pattern", value_name = "TYPE=REGEX")]
    pub block_type_patterns: Vec<String>,
    /// Whether phone numbers such as 111 111 1111 or 1234567890 identify anyone
    #[arg(long, value_name = "block|allow")]
    pub placeholder_phones: Option<PlaceholderPhones>,
    /// Region of phone numbers written without a country code, e.g. US or DE; "none" for international numbers only
    #[arg(long, value_name = "REGION")]
    pub phone_region: Option<String>,
    /// Declare a field as an identifier, e.g. traits.crm_id (repeatable)
    #[arg(long = "identifier", value_name = "PATH")]
    pub identifiers: Vec<String>,
}

impl RulesChange {
    /// True when nothing is to change: the command only shows the rules.
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
            && self.default_limit.is_none()
            && self.priority.is_none()
            && self.block_values.is_empty()
            && self.block_patterns.is_empty()
            && self.block_type_patterns.is_empty()
            && self.placeholder_phones.is_none()
            && self.phone_region.is_none()
            && self.identifiers.is_empty()
    }
}

/// Whether placeholder phone numbers identify anyone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PlaceholderPhones {
    Block,
    Allow,
}

pub fn identity_rules(
    store: &dyn Store,
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
    for addition in &change.block_type_patterns {
        let Some((kind, pattern)) = addition.split_once('=') else {
            bail!("--block-type-pattern must be TYPE=REGEX, got {addition:?}")
        };
        let patterns = rules.blocked_patterns_by_type.entry(kind.trim().to_ascii_lowercase()).or_default();
        if !patterns.iter().any(|known| known == pattern) {
            patterns.push(pattern.to_owned());
            changed = true;
        }
    }
    if let Some(placeholder_phones) = change.placeholder_phones {
        rules.block_placeholder_phones = placeholder_phones == PlaceholderPhones::Block;
        changed = true;
    }
    if let Some(region) = change.phone_region {
        let region = region.trim();
        rules.phone_region = (!region.eq_ignore_ascii_case("none")).then(|| region.to_ascii_uppercase());
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
        write_rules_table(&rules, out)?;
        if changed {
            writeln!(out, "rules saved; they apply to events resolved from now on (use `identity block` to rebuild)")?;
        }
    }
    Ok(())
}

/// The identity rules as a two-column table, one rule per line.
fn write_rules_table(rules: &tandem_core::IdentityRules, out: &mut impl Write) -> anyhow::Result<()> {
    let list = |items: &[String]| if items.is_empty() { "-".to_owned() } else { items.join(", ") };
    let limits: Vec<String> = rules.limits.iter().map(|(kind, limit)| format!("{kind}={limit}")).collect();
    let blocked: Vec<String> = rules.blocked_identifiers.iter().map(ToString::to_string).collect();
    writeln!(out, "{:<22} {}", "limits", list(&limits))?;
    writeln!(out, "{:<22} {}", "other types' limit", rules.default_limit)?;
    writeln!(out, "{:<22} {} (unlisted types after, by name)", "priority", list(&rules.priority))?;
    writeln!(out, "{:<22} {}", "blocked values", list(&rules.blocked_values))?;
    writeln!(out, "{:<22} {}", "blocked patterns", list(&rules.blocked_patterns))?;
    writeln!(out, "{:<22} {}", "blocked identifiers", list(&blocked))?;
    writeln!(out, "{:<22} {}", "declared identifiers", list(&rules.custom_identifiers))?;
    Ok(())
}

fn report_repair(report: &resolve::RepairReport, out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "{} is no longer used for matching; replayed {} events of {} profiles it touched",
        report.identifier, report.events_replayed, report.profiles_replayed
    )?;
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

pub fn unblock(store: &dyn Store, identifier: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let identifier: Identifier = identifier.parse()?;
    let mut rules = store.identity_rules()?;
    let before = rules.blocked_identifiers.len();
    rules.blocked_identifiers.retain(|blocked| *blocked != identifier);
    if rules.blocked_identifiers.len() == before {
        bail!("{identifier} is not blocked (blocked identifiers: `tandem identity rules`)");
    }
    resolve::set_rules(store, rules)?;
    writeln!(out, "{identifier} matches again for events resolved from now on")?;
    writeln!(out, "events resolved while it was blocked stay where they are; `identity block` and `unlink` rebuild")?;
    Ok(())
}

pub fn block(store: Arc<dyn Store>, identifier: &str, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let identifier: Identifier = identifier.parse()?;
    let report = resolve::repair(&store, &Repair::Block { identifier })?;
    report_repair(&report, out)
}

/// `tandem cluster status`: the store's kind, and each stage's position, lag
/// and lease as every node sees them; with an event stream, the drain stage
/// first (its position and lag in stream messages).
pub fn cluster_status(
    store: &dyn Store,
    stream: Option<tandem_server::cluster::StreamPosition>,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let status = tandem_server::cluster::cluster_status_with_stream(store, stream)?;
    if as_json {
        writeln!(out, "{}", serde_json::to_string(&status)?)?;
        return Ok(());
    }
    match status.store {
        tandem_store::StoreKind::Sqlite => writeln!(out, "store        sqlite (embedded: one node runs every stage)")?,
        tandem_store::StoreKind::Postgres => {
            writeln!(out, "store        postgres (shared: each stage runs on the node holding its lease)")?
        }
    }
    writeln!(out, "log head     {}", status.head)?;
    writeln!(out)?;
    writeln!(out, "{:<12} {:>12} {:>12}  LEASE", "STAGE", "POSITION", "LAG")?;
    for stage in &status.stages {
        let lease = match stage.lease {
            tandem_store::LeaseHolder::Held => "held by a node",
            tandem_store::LeaseHolder::Vacant => "vacant: no node runs this stage",
            tandem_store::LeaseHolder::Embedded => "this store's process",
        };
        writeln!(out, "{:<12} {:>12} {:>12}  {lease}", stage.stage, stage.position, stage.lag)?;
    }
    Ok(())
}
