//! The permission table: which [`Permission`] each admin route requires,
//! keyed by method and route pattern (axum's `MatchedPath`). It is the one
//! place a route's access is decided; [`crate::extract::AdminToken`] enforces
//! it for every `/api/v1` handler. A route missing from the table is refused
//! to every token (fail closed), and a test walks every `/api/v1` route the
//! code declares to make sure none is.
//!
//! A new route gets its line here; its handler takes `AdminToken` first.

use crate::error::{ApiError, ErrorCode};
use tandem_core::govern::{Permission, Role};

/// One line of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteRule {
    /// The HTTP method, upper case.
    pub method: &'static str,
    /// The route pattern as declared (`/api/v1/audiences/{name}`).
    pub path: &'static str,
    /// When set, the line applies only to requests whose query string has
    /// this parameter (looking one customer up by `identifier` is not
    /// listing them); such lines come before the line without it.
    pub with_query: Option<&'static str>,
    pub permission: Permission,
}

const fn rule(method: &'static str, path: &'static str, permission: Permission) -> RouteRule {
    RouteRule { method, path, with_query: None, permission }
}

use Permission as P;

/// Every admin route and the permission it requires.
pub const PERMISSION_TABLE: &[RouteRule] = &[
    RouteRule {
        method: "GET",
        path: "/api/v1/profiles",
        with_query: Some("identifier"),
        permission: P::ProfilesLookup,
    },
    rule("GET", "/api/v1/profiles", P::ProfilesList),
    rule("GET", "/api/v1/profiles/{id}", P::ProfilesLookup),
    rule("GET", "/api/v1/profiles/{id}/events", P::EventsRead),
    rule("GET", "/api/v1/profiles/{id}/identities", P::IdentitiesRead),
    rule("GET", "/api/v1/audiences", P::AudiencesRead),
    rule("POST", "/api/v1/audiences", P::AudiencesWrite),
    rule("POST", "/api/v1/audiences/preview", P::AudiencesRead),
    rule("GET", "/api/v1/audiences/{name}", P::AudiencesRead),
    rule("DELETE", "/api/v1/audiences/{name}", P::AudiencesWrite),
    rule("GET", "/api/v1/audiences/{name}/members", P::AudiencesExport),
    rule("GET", "/api/v1/computed-traits", P::ComputedTraitsRead),
    rule("POST", "/api/v1/computed-traits", P::ComputedTraitsWrite),
    rule("GET", "/api/v1/computed-traits/{name}", P::ComputedTraitsRead),
    rule("DELETE", "/api/v1/computed-traits/{name}", P::ComputedTraitsWrite),
    rule("GET", "/api/v1/destinations", P::DestinationsRead),
    rule("POST", "/api/v1/destinations", P::DestinationsWrite),
    rule("GET", "/api/v1/destinations/{name}", P::DestinationsRead),
    rule("DELETE", "/api/v1/destinations/{name}", P::DestinationsWrite),
    rule("GET", "/api/v1/destinations/{name}/dead-letters", P::DestinationsRead),
    rule("POST", "/api/v1/destinations/{name}/replay", P::DestinationsWrite),
    rule("POST", "/api/v1/destinations/{name}/pause", P::DestinationsWrite),
    rule("POST", "/api/v1/destinations/{name}/resume", P::DestinationsWrite),
    rule("POST", "/api/v1/destinations/{name}/test", P::DestinationsWrite),
    rule("GET", "/api/v1/deliveries/failed", P::DestinationsRead),
    rule("POST", "/api/v1/deliveries/replay", P::DestinationsWrite),
    rule("GET", "/api/v1/imports", P::ImportsRead),
    rule("POST", "/api/v1/imports", P::ImportsWrite),
    rule("GET", "/api/v1/imports/{id}", P::ImportsRead),
    rule("GET", "/api/v1/imports/{id}/rejects", P::ImportsRead),
    rule("GET", "/api/v1/cluster", P::ClusterRead),
    rule("GET", "/api/v1/audit", P::AuditRead),
    rule("GET", "/api/v1/audit/verify", P::AuditRead),
    rule("GET", "/api/v1/pii/inventory", P::GovernanceRead),
    rule("GET", "/api/v1/pii/rules", P::GovernanceRead),
    rule("POST", "/api/v1/pii/rules", P::GovernanceWrite),
    rule("DELETE", "/api/v1/pii/rules", P::GovernanceWrite),
    rule("GET", "/api/v1/plans", P::GovernanceRead),
    rule("GET", "/api/v1/plans/{source}", P::GovernanceRead),
    rule("PUT", "/api/v1/plans/{source}", P::GovernanceWrite),
    rule("DELETE", "/api/v1/plans/{source}", P::GovernanceWrite),
    rule("GET", "/api/v1/plans/{source}/violations", P::GovernanceRead),
    rule("GET", "/api/v1/stack", P::GovernanceRead),
    rule("PUT", "/api/v1/stack/sources/{name}", P::GovernanceWrite),
    rule("PUT", "/api/v1/stack/destinations/{name}", P::GovernanceWrite),
    rule("GET", "/api/v1/dsr", P::GovernanceRead),
    rule("POST", "/api/v1/dsr", P::GovernanceWrite),
    rule("GET", "/api/v1/goals", P::GoalsRead),
    rule("POST", "/api/v1/goals", P::GoalsWrite),
    rule("GET", "/api/v1/goals/{name}", P::GoalsRead),
    rule("DELETE", "/api/v1/goals/{name}", P::GoalsWrite),
    rule("GET", "/api/v1/openapi.json", P::DocsRead),
];

/// The permission a request needs, or `None` when the table has no line for
/// its method and route (refused: fail closed).
pub fn required_permission(method: &str, route: &str, query: Option<&str>) -> Option<Permission> {
    PERMISSION_TABLE
        .iter()
        .find(|rule| {
            rule.method == method
                && rule.path == route
                && rule.with_query.is_none_or(|name| query_has(query.unwrap_or(""), name))
        })
        .map(|rule| rule.permission)
}

/// The permissions the table lists for a route, for documentation.
pub fn permissions_of(method: &str, route: &str) -> Vec<Permission> {
    PERMISSION_TABLE
        .iter()
        .filter(|rule| rule.method == method && rule.path == route)
        .map(|rule| rule.permission)
        .collect()
}

fn query_has(query: &str, name: &str) -> bool {
    query.split('&').any(|pair| pair.split('=').next() == Some(name))
}

/// Decides a request: `Ok` when `role` holds what the route requires, `403`
/// naming the missing permission otherwise, `403` for a route the table does
/// not list.
pub fn authorize(role: Role, method: &str, route: &str, query: Option<&str>) -> Result<Permission, ApiError> {
    let Some(permission) = required_permission(method, route, query) else {
        tracing::error!(method, route, "a route has no line in the permission table and is refused");
        return Err(ApiError::new(
            ErrorCode::RouteNotPermitted,
            format!("{method} {route} is in no permission table line, so no token may call it"),
        )
        .with_field("permission"));
    };
    if role.grants(permission) {
        Ok(permission)
    } else {
        Err(denied(role, permission))
    }
}

/// The `403` for a role lacking `permission`.
pub fn denied(role: Role, permission: Permission) -> ApiError {
    ApiError::new(ErrorCode::PermissionDenied, format!("the {role} role lacks the {permission} permission"))
        .with_field("permission")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looking_one_customer_up_is_not_listing_them() {
        assert_eq!(
            required_permission("GET", "/api/v1/profiles", Some("identifier=email:a@b.c")),
            Some(P::ProfilesLookup)
        );
        assert_eq!(required_permission("GET", "/api/v1/profiles", Some("search=email:a")), Some(P::ProfilesList));
        assert_eq!(required_permission("GET", "/api/v1/profiles", None), Some(P::ProfilesList));
        assert!(authorize(Role::Support, "GET", "/api/v1/profiles", Some("identifier=email:a@b.c")).is_ok());
        let error = authorize(Role::Support, "GET", "/api/v1/profiles", None).unwrap_err();
        assert_eq!((error.code, error.field.as_deref()), (ErrorCode::PermissionDenied, Some("permission")));
        assert!(error.message.contains("profiles:list"), "{}", error.message);
    }

    #[test]
    fn a_route_missing_from_the_table_is_refused_even_to_admin() {
        let error = authorize(Role::Admin, "PATCH", "/api/v1/audiences/{name}", None).unwrap_err();
        assert_eq!(error.code, ErrorCode::RouteNotPermitted);
        assert_eq!(error.status(), axum::http::StatusCode::FORBIDDEN);
    }

    #[test]
    fn every_line_is_unique_and_lines_with_a_query_come_first() {
        for (index, rule) in PERMISSION_TABLE.iter().enumerate() {
            for later in &PERMISSION_TABLE[index + 1..] {
                assert!(
                    !(later.method == rule.method && later.path == rule.path && later.with_query == rule.with_query),
                    "{} {} is listed twice",
                    rule.method,
                    rule.path
                );
                assert!(
                    !(later.method == rule.method
                        && later.path == rule.path
                        && rule.with_query.is_none()
                        && later.with_query.is_some()),
                    "{} {}: the line with a query must come first",
                    rule.method,
                    rule.path
                );
            }
        }
    }
}
