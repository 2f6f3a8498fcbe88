//! `tandem audience`: create, preview, list, show, page through the members
//! of, and delete audiences in the data directory. Rules are written in the
//! text syntax (or as the JSON tree when they start with `{`). Reads first
//! bring the resolver and the audience stage up to date with the log, as
//! `tandem profile` does, so the answer holds without a running server.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::io::Write;
use std::sync::Arc;
use tandem_core::audience::Condition;
use tandem_core::ProfileId;
use tandem_server::audience::{self, AudienceStage};
use tandem_server::audience_api::{audience_json, size_over_time_json};
use tandem_store::{Backfill, Store};

/// Members printed per page unless told otherwise.
pub const DEFAULT_MEMBER_PAGE: usize = 100;
/// Members a preview prints.
const PREVIEW_SAMPLE: usize = 10;

/// A rule from the command line: the text syntax, or the JSON tree.
pub fn parse_rule(rule: &str) -> anyhow::Result<Condition> {
    if rule.trim_start().starts_with('{') {
        return Condition::from_json(rule).context("the rule is not a valid JSON rule tree");
    }
    Condition::parse(rule).map_err(|error| {
        let line = rule.lines().nth(error.line.saturating_sub(1)).unwrap_or(rule);
        let caret = " ".repeat(error.column.saturating_sub(1));
        anyhow::anyhow!("the rule does not parse {error}\n  {line}\n  {caret}^")
    })
}

/// Applies what the log holds to profiles and audiences, and due timers.
fn catch_up(store: &Arc<dyn Store>) -> anyhow::Result<()> {
    crate::commands::catch_up(store)?;
    AudienceStage::new(store.clone(), audience::system_clock()).catch_up()?;
    Ok(())
}

pub fn create(store: Arc<dyn Store>, name: &str, rule: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let rule = parse_rule(rule)?;
    audience::create_audience(store.as_ref(), name, rule, chrono::Utc::now())?;
    catch_up(&store)?;
    let record = store.audience(name)?.context("the audience was deleted meanwhile")?;
    writeln!(out, "created audience {:?} with {} members", name, record.size)?;
    Ok(())
}

pub fn preview(store: Arc<dyn Store>, rule: &str, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let rule = parse_rule(rule)?;
    catch_up(&store)?;
    let preview = audience::preview(store.as_ref(), &rule, chrono::Utc::now(), PREVIEW_SAMPLE)?;
    if as_json {
        let body = json!({"rule_text": rule.to_string(), "size": preview.size, "sample": preview.sample});
        writeln!(out, "{body}")?;
        return Ok(());
    }
    writeln!(out, "{} of {} profiles match {}", preview.size, preview.profiles_evaluated, rule)?;
    for profile in &preview.sample {
        writeln!(out, "  {profile}")?;
    }
    Ok(())
}

pub fn list(store: Arc<dyn Store>, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let records = store.list_audiences()?;
    if as_json {
        let list: Vec<Value> = records.iter().map(audience_json).collect();
        writeln!(out, "{}", Value::Array(list))?;
        return Ok(());
    }
    if records.is_empty() {
        writeln!(out, "no audiences; create one with tandem audience create NAME --rule '…'")?;
    }
    for record in &records {
        let pending = if record.backfill == Backfill::Done { "" } else { "  (backfilling)" };
        writeln!(out, "{:<24} {:>8} members{pending}", record.definition.name, record.size)?;
    }
    Ok(())
}

pub fn show(store: Arc<dyn Store>, name: &str, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let Some(record) = store.audience(name)? else { bail!("no audience named {name:?}") };
    let days = store.audience_changes_by_day(name)?;
    let over_time = size_over_time_json(&days);
    if as_json {
        let mut body = audience_json(&record);
        body["size_over_time"] = over_time;
        writeln!(out, "{body}")?;
        return Ok(());
    }
    writeln!(out, "audience {}", record.definition.name)?;
    writeln!(out, "  rule     {}", record.definition.rule)?;
    writeln!(out, "  members  {}", record.size)?;
    writeln!(out, "  json     {}", serde_json::to_string(&record.definition.rule)?)?;
    // The last two weeks that changed it, oldest first.
    let days = over_time.as_array().map(Vec::as_slice).unwrap_or_default();
    if !days.is_empty() {
        writeln!(out, "  size over time (end of each day that changed it)")?;
        for day in &days[days.len().saturating_sub(14)..] {
            writeln!(out, "    {}  {}", day["date"].as_str().unwrap_or_default(), day["size"])?;
        }
    }
    Ok(())
}

pub fn members(
    store: Arc<dyn Store>,
    name: &str,
    after: Option<&str>,
    limit: usize,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    catch_up(&store)?;
    if store.audience(name)?.is_none() {
        bail!("no audience named {name:?}");
    }
    let after = after.map(str::parse::<ProfileId>).transpose()?;
    let members = store.audience_members(name, after, limit)?;
    let next_after = (members.len() == limit).then(|| members.last().map(|member| member.profile)).flatten();
    let format = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms).map(tandem_core::event::format_timestamp).unwrap_or_default()
    };
    if as_json {
        let list: Vec<Value> = members
            .iter()
            .map(|member| json!({"profile": member.profile, "entered_at": format(member.entered_at_ms)}))
            .collect();
        writeln!(out, "{}", json!({"audience": name, "members": list, "next_after": next_after}))?;
        return Ok(());
    }
    for member in &members {
        writeln!(out, "{:<16} entered {}", member.profile.to_string(), format(member.entered_at_ms))?;
    }
    if let Some(next) = next_after {
        writeln!(out, "more: --after {next}")?;
    }
    Ok(())
}

pub fn delete(store: Arc<dyn Store>, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    audience::delete_audience(store.as_ref(), name)?;
    writeln!(out, "deleted audience {name:?}")?;
    Ok(())
}
