//! Roles and permissions. A token carries exactly one [`Role`]; a role grants
//! a fixed set of [`Permission`]s ([`Role::grants`]), the one table every
//! admin request is decided by. Permissions are named `area:verb`, the name a
//! refused request is told it lacks.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What a token may do, as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, with PII in clear.
    Admin,
    /// Audiences, computed traits, destinations and goals; PII masked.
    Marketer,
    /// Reads profiles, events, audiences and computed traits, and exports
    /// audience members; PII masked.
    Analyst,
    /// Looks up one customer at a time, with PII; no lists or exports.
    Support,
    /// Reads the audit log and governance reports; changes nothing.
    Auditor,
}

/// A permission a route requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// Lists and searches profiles.
    ProfilesList,
    /// Reads one profile, found by identifier or id.
    ProfilesLookup,
    /// Reads one profile's event timeline.
    EventsRead,
    /// Reads one profile's identity history.
    IdentitiesRead,
    /// Sees PII in clear rather than masked.
    PiiRead,
    AudiencesRead,
    AudiencesWrite,
    /// Lists an audience's members (an export).
    AudiencesExport,
    ComputedTraitsRead,
    ComputedTraitsWrite,
    DestinationsRead,
    DestinationsWrite,
    ImportsRead,
    ImportsWrite,
    /// Reads the cluster's nodes and stage leases.
    ClusterRead,
    /// Reads the audit log.
    AuditRead,
    /// Reads governance reports (the PII inventory, tracking plans and
    /// their violations, the stack registry, data subject requests).
    GovernanceRead,
    /// Changes governance settings (tracking plans, the stack registry) and
    /// carries out data subject requests.
    GovernanceWrite,
    /// Reads the API's own description (the OpenAPI document).
    DocsRead,
    /// Reads the shared goals and where each stands.
    GoalsRead,
    /// Creates and deletes goals.
    GoalsWrite,
}

impl Permission {
    /// Every permission, for tables and tests.
    pub const ALL: [Permission; 21] = [
        Permission::ProfilesList,
        Permission::ProfilesLookup,
        Permission::EventsRead,
        Permission::IdentitiesRead,
        Permission::PiiRead,
        Permission::AudiencesRead,
        Permission::AudiencesWrite,
        Permission::AudiencesExport,
        Permission::ComputedTraitsRead,
        Permission::ComputedTraitsWrite,
        Permission::DestinationsRead,
        Permission::DestinationsWrite,
        Permission::ImportsRead,
        Permission::ImportsWrite,
        Permission::ClusterRead,
        Permission::AuditRead,
        Permission::GovernanceRead,
        Permission::GovernanceWrite,
        Permission::DocsRead,
        Permission::GoalsRead,
        Permission::GoalsWrite,
    ];

    /// The permission's name, `area:verb`.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ProfilesList => "profiles:list",
            Permission::ProfilesLookup => "profiles:lookup",
            Permission::EventsRead => "events:read",
            Permission::IdentitiesRead => "identities:read",
            Permission::PiiRead => "pii:read",
            Permission::AudiencesRead => "audiences:read",
            Permission::AudiencesWrite => "audiences:write",
            Permission::AudiencesExport => "audiences:export",
            Permission::ComputedTraitsRead => "computed-traits:read",
            Permission::ComputedTraitsWrite => "computed-traits:write",
            Permission::DestinationsRead => "destinations:read",
            Permission::DestinationsWrite => "destinations:write",
            Permission::ImportsRead => "imports:read",
            Permission::ImportsWrite => "imports:write",
            Permission::ClusterRead => "cluster:read",
            Permission::AuditRead => "audit:read",
            Permission::GovernanceRead => "governance:read",
            Permission::GovernanceWrite => "governance:write",
            Permission::DocsRead => "docs:read",
            Permission::GoalsRead => "goals:read",
            Permission::GoalsWrite => "goals:write",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl Role {
    /// Every role, for tables and tests.
    pub const ALL: [Role; 5] = [Role::Admin, Role::Marketer, Role::Analyst, Role::Support, Role::Auditor];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Marketer => "marketer",
            Role::Analyst => "analyst",
            Role::Support => "support",
            Role::Auditor => "auditor",
        }
    }

    /// The role table: whether this role holds `permission`.
    pub fn grants(self, permission: Permission) -> bool {
        use Permission as P;
        match self {
            Role::Admin => true,
            // Every role may read what the API offers, and the goals
            // marketing and IT share.
            _ if permission == P::DocsRead || permission == P::GoalsRead => true,
            Role::Marketer => matches!(
                permission,
                P::GoalsWrite
                    | P::AudiencesRead
                    | P::AudiencesWrite
                    | P::AudiencesExport
                    | P::ComputedTraitsRead
                    | P::ComputedTraitsWrite
                    | P::DestinationsRead
                    | P::DestinationsWrite
            ),
            Role::Analyst => matches!(
                permission,
                P::ProfilesList
                    | P::ProfilesLookup
                    | P::EventsRead
                    | P::IdentitiesRead
                    | P::AudiencesRead
                    | P::AudiencesExport
                    | P::ComputedTraitsRead
            ),
            Role::Support => {
                matches!(permission, P::ProfilesLookup | P::EventsRead | P::IdentitiesRead | P::PiiRead)
            }
            Role::Auditor => matches!(permission, P::AuditRead | P::GovernanceRead),
        }
    }

    /// The permissions this role holds, in [`Permission::ALL`]'s order.
    pub fn permissions(self) -> Vec<Permission> {
        Permission::ALL.into_iter().filter(|permission| self.grants(*permission)).collect()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected admin, marketer, analyst, support or auditor")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str().eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| UnknownRole(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip_and_unknown_names_are_refused() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(serde_json::to_value(role).unwrap(), serde_json::json!(role.as_str()));
        }
        assert_eq!(" Support ".parse::<Role>().unwrap(), Role::Support);
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn only_admin_and_support_see_pii_in_clear() {
        let clear: Vec<Role> = Role::ALL.into_iter().filter(|role| role.grants(Permission::PiiRead)).collect();
        assert_eq!(clear, [Role::Admin, Role::Support]);
    }

    #[test]
    fn support_has_no_lists_or_exports_and_the_auditor_changes_nothing() {
        assert!(!Role::Support.grants(Permission::ProfilesList));
        assert!(!Role::Support.grants(Permission::AudiencesExport));
        assert!(Role::Support.grants(Permission::ProfilesLookup));
        assert!(Role::Auditor.permissions().iter().all(|permission| permission.as_str().ends_with(":read")));
        assert_eq!(Role::Admin.permissions().len(), Permission::ALL.len());
    }

    #[test]
    fn permission_names_are_distinct() {
        let mut names: Vec<&str> = Permission::ALL.iter().map(|permission| permission.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Permission::ALL.len());
    }
}
