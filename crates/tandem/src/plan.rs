//! `tandem plan`: set, show and delete a source's tracking plan, and list
//! the violations its events were found with. A plan is a JSON document
//! (`{"mode", "events", "identify", "common"}`) validated and compiled
//! before it is stored; a running server applies it within 10 seconds.

use anyhow::Context;
use serde_json::Value;
use std::io::Write;
use std::sync::Arc;
use tandem_server::govern;
use tandem_server::plan_api::{plan_json, violations_json};
use tandem_store::Store;

/// Violations printed unless told otherwise.
pub const DEFAULT_VIOLATIONS: usize = 50;

pub fn set(store: Arc<dyn Store>, source: &str, file: &std::path::Path, out: &mut impl Write) -> anyhow::Result<()> {
    let document = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let stored = govern::set_plan(store.as_ref(), source, &document)?;
    writeln!(
        out,
        "set the tracking plan of {source:?}: mode {}, {} events planned{}{}",
        stored.plan.mode,
        stored.plan.events.len(),
        if stored.plan.identify.is_some() { ", identify traits" } else { "" },
        if stored.plan.common.is_some() { ", a common schema" } else { "" },
    )?;
    Ok(())
}

pub fn show(store: Arc<dyn Store>, source: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let (source, plan, _) = govern::plan_report(store.as_ref(), source, 0)?;
    match plan {
        Some(plan) => writeln!(out, "{}", serde_json::to_string_pretty(&plan_json(&source.name, &plan))?)?,
        None => anyhow::bail!("source {:?} has no tracking plan; set one with tandem plan set", source.name),
    }
    Ok(())
}

pub fn delete(store: Arc<dyn Store>, source: &str, out: &mut impl Write) -> anyhow::Result<()> {
    if govern::delete_plan(store.as_ref(), source)? {
        writeln!(out, "deleted the tracking plan of {source:?}; its events are no longer checked")?;
        Ok(())
    } else {
        anyhow::bail!("source {source:?} has no tracking plan")
    }
}

pub fn violations(
    store: Arc<dyn Store>,
    source: &str,
    limit: usize,
    as_json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (source, _, listed) = govern::plan_report(store.as_ref(), source, limit)?;
    if as_json {
        writeln!(out, "{}", Value::Array(violations_json(&listed)))?;
        return Ok(());
    }
    if listed.is_empty() {
        writeln!(out, "no violations for {:?}", source.name)?;
    }
    for violation in &listed {
        writeln!(
            out,
            "{:<17} {:<24} {:<28} {:>6}x  last {}  {}",
            violation.kind,
            violation.event_name,
            if violation.path.is_empty() { "/" } else { &violation.path },
            violation.count,
            violations_json(std::slice::from_ref(violation))[0]["last_seen"].as_str().unwrap_or(""),
            violation.message
        )?;
    }
    Ok(())
}
