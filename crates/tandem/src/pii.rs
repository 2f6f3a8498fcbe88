//! `tandem pii`: the keys seen in events with their classes (`inventory`),
//! and the PII rules users set at run time (`set`, `list`, `remove`), kept
//! in the store in front of the `[pii]` rules of `tandem.toml`. A running
//! server applies a rule set here within ten seconds.

use anyhow::bail;
use serde_json::Value;
use std::io::Write;
use tandem_core::govern::pii::{PiiMatcher, PiiRule, RedPolicy};
use tandem_core::govern::{PiiClass, PiiSettings};
use tandem_server::pii::{policy_in_force, rule_target, rules_json, set_rule_in, PiiRuleError};
use tandem_store::Store;

/// Prints the PII inventory, a table or one JSON object per key; classes by
/// the rules in force.
pub fn inventory(store: &dyn Store, settings: &PiiSettings, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let policy = policy_in_force(store, settings)?;
    let keys = tandem_server::pii::inventory_json(store, &policy)?;
    if as_json {
        for key in &keys {
            writeln!(out, "{key}")?;
        }
        return Ok(());
    }
    writeln!(out, "{:<28} {:<7} {:<24} SOURCES", "KEY", "CLASS", "LAST SEEN")?;
    for key in &keys {
        let sources: Vec<&str> = key["sources"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        writeln!(
            out,
            "{:<28} {:<7} {:<24} {}",
            key["key"].as_str().unwrap_or_default(),
            key["class"].as_str().unwrap_or_default(),
            key["last_seen"].as_str().unwrap_or_default(),
            sources.join(", ")
        )?;
    }
    Ok(())
}

/// The rule `tandem pii set` is given.
pub fn rule_from_args(
    name: Option<String>,
    pattern: Option<String>,
    class: PiiClass,
    policy: Option<RedPolicy>,
) -> PiiRule {
    PiiRule { name, pattern, class, policy }
}

/// `tandem pii set`: stores the rule (replacing the one with the same
/// matcher).
pub fn set(store: &dyn Store, rule: &PiiRule, out: &mut impl Write) -> anyhow::Result<()> {
    let (rule, replaced) = match set_rule_in(store, rule) {
        Ok(set) => set,
        Err(PiiRuleError::Invalid(invalid)) => bail!("{invalid}"),
        Err(PiiRuleError::Store(error)) => return Err(error.into()),
    };
    let target = rule_target(&rule.matcher()?);
    let policy = rule.policy.map(|policy| format!(", {} red values", policy.as_str())).unwrap_or_default();
    let verb = if replaced.is_some() { "replaced" } else { "set" };
    writeln!(out, "{verb} pii rule {target}: {}{policy}", rule.class.as_str())?;
    writeln!(out, "a running server applies it within 10 seconds, to events it receives from then on")?;
    Ok(())
}

/// `tandem pii remove`.
pub fn remove(store: &dyn Store, matcher: &PiiMatcher, out: &mut impl Write) -> anyhow::Result<()> {
    let target = rule_target(matcher);
    match store.remove_pii_rule(matcher)? {
        Some(_) => {
            writeln!(out, "removed pii rule {target}")?;
            Ok(())
        }
        None => bail!("no stored pii rule matches {target} (`tandem pii list` shows them; rules in tandem.toml are changed there)"),
    }
}

/// `tandem pii list`: every rule in force in the order they decide, then
/// the default policy and the built-in classes.
pub fn list(store: &dyn Store, settings: &PiiSettings, as_json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let shown = rules_json(store, settings)?;
    if as_json {
        writeln!(out, "{shown}")?;
        return Ok(());
    }
    writeln!(out, "{:<8} {:<32} {:<7} {:<8} ORIGIN", "MATCHES", "KEY", "CLASS", "POLICY")?;
    for rule in shown["rules"].as_array().into_iter().flatten() {
        let (kind, key) = match (rule["name"].as_str(), rule["pattern"].as_str()) {
            (Some(name), _) => ("name", name),
            (None, Some(pattern)) => ("pattern", pattern),
            (None, None) => ("?", ""),
        };
        writeln!(
            out,
            "{kind:<8} {key:<32} {:<7} {:<8} {}",
            rule["class"].as_str().unwrap_or_default(),
            rule["policy"].as_str().unwrap_or("-"),
            rule["origin"].as_str().unwrap_or_default()
        )?;
    }
    writeln!(out, "red values without a policy of their own: {}", shown["red_policy"].as_str().unwrap_or("hash"))?;
    let defaults = |class: &str| -> Vec<&str> {
        shown["defaults"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["class"] == class)
            .filter_map(|entry| entry["name"].as_str())
            .collect()
    };
    writeln!(
        out,
        "built in, after every rule: red {}; yellow {}",
        defaults("red").join(", "),
        defaults("yellow").join(", ")
    )?;
    writeln!(out, "and any string holding a payment card number is red")?;
    Ok(())
}
