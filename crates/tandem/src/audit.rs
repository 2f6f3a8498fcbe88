//! The CLI's side of governance: `tandem audit list` and `tandem audit
//! verify`, the entry every changing command leaves in the audit log, with
//! actor `cli` (the command line acts as admin).

use serde_json::{json, Value};
use std::io::Write;
use tandem_store::{AuditFilter, Store};

/// Records a change made from the command line.
pub fn record(store: &dyn Store, action: &str, target: &str, after: Option<Value>) -> anyhow::Result<()> {
    let draft = tandem_server::audit::draft("cli", "admin", action, target, None, after);
    store.append_audit(draft)?;
    Ok(())
}

/// An identifier (`type:value`) as the audit log names it: its type in
/// clear, its value digested, since identifiers are PII.
pub fn identifier_target(identifier: &str) -> String {
    match identifier.split_once(':') {
        Some((kind, value)) => {
            let digest = tandem_core::govern::audit::digest(&json!(value.trim()));
            format!("{}:{}", kind.trim(), digest.as_str().unwrap_or_default())
        }
        None => tandem_core::govern::audit::digest(&json!(identifier)).as_str().unwrap_or_default().to_owned(),
    }
}

pub fn list(store: &dyn Store, filter: AuditFilter, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let entries = store.audit_entries(&filter)?;
    if as_json {
        for entry in &entries {
            writeln!(out, "{}", tandem_server::audit::entry_json(entry))?;
        }
        return Ok(());
    }
    writeln!(out, "{:>6}  {:<24}  {:<18} {:<9} {:<24} TARGET", "SEQ", "AT", "ACTOR", "ROLE", "ACTION")?;
    for entry in &entries {
        let at = tandem_server::profile::format_ms(entry.at_ms);
        writeln!(
            out,
            "{:>6}  {:<24}  {:<18} {:<9} {:<24} {}",
            entry.seq,
            at.as_str().unwrap_or_default(),
            entry.actor,
            entry.role,
            entry.action,
            entry.target
        )?;
    }
    Ok(())
}

/// Prints whether the chain is intact; an error naming the first broken
/// entry when it is not, so the exit status tells scripts.
pub fn verify(store: &dyn Store, out: &mut impl Write) -> anyhow::Result<()> {
    match store.verify_audit()? {
        Ok(count) => {
            writeln!(out, "the audit log is intact: {count} entries verified")?;
            Ok(())
        }
        Err(broken) => anyhow::bail!("the audit log is NOT intact: entry {} is broken ({})", broken.seq, broken.reason),
    }
}
