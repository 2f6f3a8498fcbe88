//! `tandem computed`: create, list, show and delete computed traits in the
//! data directory. Definitions are written in the text syntax
//! (`sum(total) of "Order Completed" within 30d`), or as the JSON object
//! when they start with `{`. Commands first bring the resolver and the
//! audience stage (which keeps computed traits) up to date with the log, so
//! a new trait is backfilled before `create` returns.

use anyhow::{bail, Context};
use serde_json::Value;
use std::io::Write;
use std::sync::Arc;
use tandem_core::audience::ComputedTraitDefinition;
use tandem_server::audience::{self, AudienceStage};
use tandem_server::computed_api::computed_trait_json;
use tandem_store::{Backfill, ComputedTraitRecord, Store};

/// A definition from the command line: the text syntax, or the JSON object.
pub fn parse_definition(definition: &str) -> anyhow::Result<ComputedTraitDefinition> {
    if definition.trim_start().starts_with('{') {
        return ComputedTraitDefinition::from_json(definition)
            .context("the definition is not a valid JSON computed trait");
    }
    ComputedTraitDefinition::parse(definition).map_err(|error| {
        let line = definition.lines().nth(error.line.saturating_sub(1)).unwrap_or(definition);
        let caret = " ".repeat(error.column.saturating_sub(1));
        anyhow::anyhow!("the definition does not parse {error}\n  {line}\n  {caret}^")
    })
}

/// Applies what the log holds to profiles, computed traits and audiences.
fn catch_up(store: &Arc<dyn Store>) -> anyhow::Result<()> {
    crate::commands::catch_up(store)?;
    AudienceStage::new(store.clone(), audience::system_clock()).catch_up()?;
    Ok(())
}

fn progress(record: &ComputedTraitRecord) -> String {
    match record.backfill {
        Backfill::Done => "backfilled".to_owned(),
        Backfill::Pending { after: None } => "backfill not started".to_owned(),
        Backfill::Pending { after: Some(id) } => format!("backfilled through {id}"),
    }
}

pub fn create(store: Arc<dyn Store>, name: &str, definition: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let definition = parse_definition(definition)?;
    audience::create_computed_trait(store.as_ref(), name, &definition, chrono::Utc::now())?;
    catch_up(&store)?;
    let record = store.computed_trait(name)?.context("the computed trait was deleted meanwhile")?;
    writeln!(out, "created computed trait {name:?} ({})", progress(&record))?;
    Ok(())
}

pub fn list(store: Arc<dyn Store>, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let records = store.list_computed_traits()?;
    if as_json {
        let list: Vec<Value> = records.iter().map(computed_trait_json).collect();
        writeln!(out, "{}", Value::Array(list))?;
        return Ok(());
    }
    if records.is_empty() {
        writeln!(out, "no computed traits; create one with tandem computed create NAME --definition '…'")?;
    }
    for record in &records {
        writeln!(out, "{:<24} {}  ({})", record.name, record.definition, progress(record))?;
    }
    Ok(())
}

pub fn show(store: Arc<dyn Store>, name: &str, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    catch_up(&store)?;
    let Some(record) = store.computed_trait(name)? else { bail!("no computed trait named {name:?}") };
    if as_json {
        writeln!(out, "{}", computed_trait_json(&record))?;
        return Ok(());
    }
    writeln!(out, "computed trait {}", record.name)?;
    writeln!(out, "  definition  {}", record.definition)?;
    writeln!(out, "  json        {}", serde_json::to_string(&record.definition)?)?;
    writeln!(out, "  backfill    {}", progress(&record))?;
    Ok(())
}

pub fn delete(store: Arc<dyn Store>, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    audience::delete_computed_trait(store.as_ref(), name)?;
    writeln!(out, "deleted computed trait {name:?}")?;
    Ok(())
}
