//! The stack registry: every connected tool (source or destination) with
//! its owner, department, purpose and annual cost, and the report IT and
//! marketing read together — spend by department, tools nobody owns, and
//! traffic arriving with write keys that match no source (shadow IT).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The department a tool belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Department {
    Marketing,
    It,
    Sales,
    Support,
    Other,
}

impl Department {
    pub const ALL: [Department; 5] =
        [Department::Marketing, Department::It, Department::Sales, Department::Support, Department::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            Department::Marketing => "marketing",
            Department::It => "it",
            Department::Sales => "sales",
            Department::Support => "support",
            Department::Other => "other",
        }
    }
}

impl fmt::Display for Department {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Department {
    type Err = RegistryError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Department::ALL
            .into_iter()
            .find(|department| department.as_str() == text.trim())
            .ok_or_else(|| RegistryError::new("department", "must be marketing, it, sales, support or other"))
    }
}

/// What kind of tool an entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolKind {
    Source,
    Destination,
}

impl ToolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolKind::Source => "source",
            ToolKind::Destination => "destination",
        }
    }

    /// The kind stored as text; anything else reads as a destination.
    pub fn from_text(text: &str) -> ToolKind {
        if text == "source" {
            ToolKind::Source
        } else {
            ToolKind::Destination
        }
    }
}

/// A tool's registry entry; every field may be unknown.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(example = json!({"owner": "Ann Lee", "department": "marketing", "purpose": "web analytics", "annual_cost": 1200.0}))
)]
pub struct ToolInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<Department>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// What the tool costs a year, in the company's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annual_cost: Option<f64>,
}

/// A registry entry that cannot be stored; `field` names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {message}")]
pub struct RegistryError {
    pub field: &'static str,
    pub message: String,
}

impl RegistryError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        RegistryError { field, message: message.into() }
    }
}

/// The longest owner or purpose, in characters.
pub const MAX_TEXT_CHARS: usize = 500;

impl ToolInfo {
    /// Trims the text fields (blank ones become unknown) and checks them.
    pub fn validated(self) -> Result<ToolInfo, RegistryError> {
        let text = |field: &'static str, value: Option<String>| -> Result<Option<String>, RegistryError> {
            let value = value.map(|value| value.trim().to_owned()).filter(|value| !value.is_empty());
            if value.as_ref().is_some_and(|value| value.chars().count() > MAX_TEXT_CHARS) {
                return Err(RegistryError::new(field, format!("must be at most {MAX_TEXT_CHARS} characters")));
            }
            Ok(value)
        };
        if self.annual_cost.is_some_and(|cost| !cost.is_finite() || cost < 0.0) {
            return Err(RegistryError::new("annual_cost", "must be a number of at least 0"));
        }
        Ok(ToolInfo {
            owner: text("owner", self.owner)?,
            department: self.department,
            purpose: text("purpose", self.purpose)?,
            annual_cost: self.annual_cost,
        })
    }

    /// This entry with the fields `change` sets replaced.
    pub fn updated_by(&self, change: &ToolInfo) -> ToolInfo {
        ToolInfo {
            owner: change.owner.clone().or_else(|| self.owner.clone()),
            department: change.department.or(self.department),
            purpose: change.purpose.clone().or_else(|| self.purpose.clone()),
            annual_cost: change.annual_cost.or(self.annual_cost),
        }
    }
}

/// One tool as the report lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tool {
    pub kind: ToolKind,
    pub name: String,
    #[serde(flatten)]
    pub info: ToolInfo,
}

/// Traffic that arrived with one write key matching no source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowKey {
    /// The SHA-256 of the key (hex): how sightings of one key are grouped
    /// without storing the key.
    #[serde(skip)]
    pub key_digest: String,
    /// The first characters of the key, enough to recognise it, not to use it.
    pub key_hint: String,
    pub requests: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Sending addresses, at most [`MAX_SHADOW_SAMPLES`].
    pub ips: Vec<String>,
    /// User agents, at most [`MAX_SHADOW_SAMPLES`].
    pub user_agents: Vec<String>,
}

/// Addresses and user agents kept per unknown key.
pub const MAX_SHADOW_SAMPLES: usize = 10;

impl ShadowKey {
    /// Adds `other`'s sightings of the same key: counts add up, the seen
    /// range widens, samples join up to [`MAX_SHADOW_SAMPLES`] each.
    pub fn absorb(&mut self, other: &ShadowKey) {
        self.requests += other.requests;
        self.first_seen_ms = self.first_seen_ms.min(other.first_seen_ms);
        self.last_seen_ms = self.last_seen_ms.max(other.last_seen_ms);
        for (kept, more) in [(&mut self.ips, &other.ips), (&mut self.user_agents, &other.user_agents)] {
            for sample in more {
                if kept.len() >= MAX_SHADOW_SAMPLES {
                    break;
                }
                if !kept.contains(sample) {
                    kept.push(sample.clone());
                }
            }
        }
    }
}

/// The stack report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StackReport {
    /// Annual cost per department; tools without a department under `unassigned`.
    pub spend_by_department: BTreeMap<String, f64>,
    pub total_annual_cost: f64,
    pub tools: Vec<Tool>,
    /// Tools whose owner is unknown.
    pub without_owner: Vec<String>,
    /// Traffic with unknown or revoked write keys, most recent first.
    pub shadow_traffic: Vec<ShadowKey>,
}

impl StackReport {
    pub fn build(mut tools: Vec<Tool>, mut shadow_traffic: Vec<ShadowKey>) -> StackReport {
        tools.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        let mut spend_by_department: BTreeMap<String, f64> = BTreeMap::new();
        for tool in &tools {
            let department = tool.info.department.map_or("unassigned", Department::as_str);
            *spend_by_department.entry(department.to_owned()).or_insert(0.0) += tool.info.annual_cost.unwrap_or(0.0);
        }
        let total_annual_cost = spend_by_department.values().sum();
        let without_owner = tools
            .iter()
            .filter(|tool| tool.info.owner.is_none())
            .map(|tool| format!("{} {}", tool.kind.as_str(), tool.name))
            .collect();
        shadow_traffic.sort_by_key(|key| std::cmp::Reverse(key.last_seen_ms));
        StackReport { spend_by_department, total_annual_cost, tools, without_owner, shadow_traffic }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(kind: ToolKind, name: &str, owner: Option<&str>, department: Option<Department>, cost: f64) -> Tool {
        Tool {
            kind,
            name: name.to_owned(),
            info: ToolInfo { owner: owner.map(str::to_owned), department, purpose: None, annual_cost: Some(cost) },
        }
    }

    #[test]
    fn the_report_sums_spend_per_department_and_lists_tools_without_an_owner() {
        let report = StackReport::build(
            vec![
                tool(ToolKind::Destination, "ads", None, Some(Department::Marketing), 1200.0),
                tool(ToolKind::Source, "web", Some("ann"), Some(Department::Marketing), 300.0),
                tool(ToolKind::Source, "crm", Some("bob"), Some(Department::Sales), 50.5),
                tool(ToolKind::Source, "app", None, None, 10.0),
            ],
            Vec::new(),
        );
        assert_eq!(report.spend_by_department["marketing"], 1500.0);
        assert_eq!(report.spend_by_department["sales"], 50.5);
        assert_eq!(report.spend_by_department["unassigned"], 10.0);
        assert_eq!(report.total_annual_cost, 1560.5);
        assert_eq!(report.without_owner, vec!["source app", "destination ads"]);
    }

    #[test]
    fn entries_are_trimmed_and_checked_and_updates_keep_what_is_not_given() {
        let info = ToolInfo { owner: Some("  ann ".into()), purpose: Some(" ".into()), ..ToolInfo::default() };
        let info = info.validated().unwrap();
        assert_eq!((info.owner.as_deref(), info.purpose.as_deref()), (Some("ann"), None));
        let bad = ToolInfo { annual_cost: Some(-1.0), ..ToolInfo::default() };
        assert_eq!(bad.validated().unwrap_err().field, "annual_cost");
        assert_eq!("it".parse::<Department>().unwrap(), Department::It);
        assert_eq!("finance".parse::<Department>().unwrap_err().field, "department");
        let updated = info.updated_by(&ToolInfo { annual_cost: Some(5.0), ..ToolInfo::default() });
        assert_eq!((updated.owner.as_deref(), updated.annual_cost), (Some("ann"), Some(5.0)));
    }
}
