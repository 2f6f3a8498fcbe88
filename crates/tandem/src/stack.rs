//! `tandem stack report` and the registry flags of `tandem source` and
//! `tandem destination`: who owns each connected tool, for which department,
//! why, and what it costs a year; spend by department, tools nobody owns,
//! and traffic arriving with write keys that match no source.

use clap::Args;
use std::io::Write;
use std::sync::Arc;
use tandem_core::govern::stack::{Department, ToolInfo, ToolKind};
use tandem_server::stack::{report_json, set_tool, stack_report};
use tandem_store::Store;

/// A tool's registry entry on the command line; what is not given stays.
#[derive(Args, Debug, Default, Clone, PartialEq)]
pub struct RegistryArgs {
    /// Who answers for the tool
    #[arg(long)]
    pub owner: Option<String>,
    /// marketing, it, sales, support or other
    #[arg(long)]
    pub department: Option<Department>,
    /// What the tool is for
    #[arg(long)]
    pub purpose: Option<String>,
    /// What the tool costs a year
    #[arg(long, value_name = "AMOUNT")]
    pub annual_cost: Option<f64>,
}

impl RegistryArgs {
    pub fn is_empty(&self) -> bool {
        *self == RegistryArgs::default()
    }

    fn info(&self) -> ToolInfo {
        ToolInfo {
            owner: self.owner.clone(),
            department: self.department,
            purpose: self.purpose.clone(),
            annual_cost: self.annual_cost,
        }
    }
}

/// Sets the given fields of a tool's entry and prints it.
pub fn set(
    store: &dyn Store,
    kind: ToolKind,
    name: &str,
    args: &RegistryArgs,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let tool = set_tool(store, kind, name, args.info())?;
    let info = &tool.info;
    writeln!(
        out,
        "{} {:?}: owner {}, department {}, purpose {}, annual cost {}",
        kind.as_str(),
        name,
        info.owner.as_deref().unwrap_or("-"),
        info.department.map_or("-", Department::as_str),
        info.purpose.as_deref().unwrap_or("-"),
        info.annual_cost.map_or("-".to_owned(), |cost| format!("{cost:.2}")),
    )?;
    Ok(())
}

pub fn report(store: Arc<dyn Store>, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let report = stack_report(store.as_ref())?;
    if as_json {
        writeln!(out, "{}", report_json(store.as_ref(), &report))?;
        return Ok(());
    }
    writeln!(out, "spend by department (annual)")?;
    for (department, spend) in &report.spend_by_department {
        writeln!(out, "  {department:<12} {spend:>14.2}")?;
    }
    writeln!(out, "  {:<12} {:>14.2}", "total", report.total_annual_cost)?;
    writeln!(out, "tools")?;
    for tool in &report.tools {
        writeln!(
            out,
            "  {:<12} {:<24} {:<20} {:<10} {:>12}  {}",
            tool.kind.as_str(),
            tool.name,
            tool.info.owner.as_deref().unwrap_or("(no owner)"),
            tool.info.department.map_or("-", Department::as_str),
            tool.info.annual_cost.map_or("-".to_owned(), |cost| format!("{cost:.2}")),
            tool.info.purpose.as_deref().unwrap_or(""),
        )?;
    }
    if !report.without_owner.is_empty() {
        writeln!(out, "without an owner: {}", report.without_owner.join(", "))?;
    }
    if report.shadow_traffic.is_empty() {
        writeln!(out, "no traffic with unknown write keys")?;
    } else {
        writeln!(out, "traffic with unknown or revoked write keys (shadow IT)")?;
    }
    for key in &report.shadow_traffic {
        writeln!(
            out,
            "  key {:<8} {:>8} requests  first {}  last {}  from {}  agents {}",
            key.key_hint,
            key.requests,
            time(key.first_seen_ms),
            time(key.last_seen_ms),
            key.ips.join(" "),
            key.user_agents.join(" | "),
        )?;
    }
    writeln!(out, "tools touching personal data: not known yet (the PII inventory will tell)")?;
    Ok(())
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(tandem_core::event::format_timestamp).unwrap_or_default()
}
