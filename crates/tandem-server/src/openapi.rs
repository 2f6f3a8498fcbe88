//! The OpenAPI 3.1 document of the admin API, `GET /api/v1/openapi.json`,
//! built with `utoipa`'s document model from the permission table itself:
//! every `/api/v1` route the table lists becomes an operation carrying the
//! permission it requires (`x-permission`, and in its description), its path
//! parameters, bearer authentication, and the one error body every refusal
//! uses. Because the document is generated from the same table that
//! authorizes requests, it cannot list a route the server refuses to decide
//! or omit one it serves.

use crate::access::{RouteRule, PERMISSION_TABLE};
use crate::extract::AdminToken;
use axum::Json;
use serde_json::{json, Value};
use utoipa::openapi::extensions::ExtensionsBuilder;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, ObjectBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Ref, RefOr,
    Required, ResponseBuilder, Schema, Type,
};

/// The statuses an admin route may refuse with, all with [`error_schema`].
const ERROR_STATUSES: &[(&str, &str)] = &[
    ("400", "the request is malformed"),
    ("401", "no valid token"),
    ("403", "the token's role lacks the permission"),
    ("404", "not found"),
    ("405", "method not allowed"),
    ("409", "conflicts with what exists"),
    ("413", "too large"),
    ("422", "well-formed but invalid"),
    ("503", "storage unavailable; retry"),
];

/// `{"error": {"code", "message", "field"}}`.
fn error_schema() -> Schema {
    let detail = ObjectBuilder::new()
        .property("code", ObjectBuilder::new().schema_type(Type::String))
        .property("message", ObjectBuilder::new().schema_type(Type::String))
        .property(
            "field",
            ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null])),
        )
        .required("code")
        .required("message");
    Schema::Object(ObjectBuilder::new().property("error", detail).required("error").build())
}

fn method_of(rule: &RouteRule) -> Option<HttpMethod> {
    Some(match rule.method {
        "GET" => HttpMethod::Get,
        "POST" => HttpMethod::Post,
        "PUT" => HttpMethod::Put,
        "PATCH" => HttpMethod::Patch,
        "DELETE" => HttpMethod::Delete,
        _ => return None,
    })
}

/// The permission a route needs, as the document states it: one name, or
/// one per query variant (`profiles:lookup` with `identifier`, else
/// `profiles:list`).
fn permission_text(method: &str, path: &str) -> String {
    PERMISSION_TABLE
        .iter()
        .filter(|rule| rule.method == method && rule.path == path)
        .map(|rule| match rule.with_query {
            Some(parameter) => format!("{} (with {parameter})", rule.permission),
            None => rule.permission.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", otherwise ")
}

/// Builds the document.
pub fn document() -> OpenApi {
    let mut paths = PathsBuilder::new();
    let mut done: Vec<(&str, &str)> = Vec::new();
    for rule in PERMISSION_TABLE {
        if done.contains(&(rule.method, rule.path)) {
            continue;
        }
        done.push((rule.method, rule.path));
        let Some(method) = method_of(rule) else { continue };
        let permission = permission_text(rule.method, rule.path);
        let mut operation = OperationBuilder::new()
            .operation_id(Some(operation_id(rule)))
            .summary(Some(format!("{} {}", rule.method, rule.path)))
            .description(Some(format!("Requires the permission {permission}.")))
            .extensions(Some(ExtensionsBuilder::new().add("x-permission", json!(permission)).build()))
            .security(SecurityRequirement::new("bearer", Vec::<String>::new()));
        for name in path_parameters(rule.path) {
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
            );
        }
        let success = if rule.method == "DELETE" {
            ("204", ResponseBuilder::new().description("done").build())
        } else {
            let any = ContentBuilder::new().schema(Some(ObjectBuilder::new().schema_type(Type::Object))).build();
            ("2XX", ResponseBuilder::new().description("success").content("application/json", any).build())
        };
        operation = operation.response(success.0, success.1);
        for (status, description) in ERROR_STATUSES {
            let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("Error"))).build();
            operation = operation.response(
                *status,
                ResponseBuilder::new().description(*description).content("application/json", content).build(),
            );
        }
        paths = paths.path(rule.path, PathItem::new(method, operation.build()));
    }
    let components = ComponentsBuilder::new()
        .schema("Error", RefOr::T(error_schema()))
        .security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)))
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Tandem admin API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some("Every route needs `Authorization: Bearer TOKEN` and the permission it names.")),
        )
        .paths(paths.build())
        .components(Some(components))
        .build()
}

fn path_parameters(path: &str) -> Vec<&str> {
    path.split('/').filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}')).collect()
}

fn operation_id(rule: &RouteRule) -> String {
    let words: Vec<String> = rule
        .path
        .trim_start_matches("/api/v1/")
        .split('/')
        .map(|segment| segment.trim_matches(|c| c == '{' || c == '}').replace(['-', '.'], "_"))
        .collect();
    format!("{}_{}", rule.method.to_ascii_lowercase(), words.join("_"))
}

/// `GET /api/v1/openapi.json`.
pub fn routes() -> axum::Router<crate::AppState> {
    axum::Router::new().route("/api/v1/openapi.json", axum::routing::get(serve))
}

async fn serve(_token: AdminToken) -> Json<Value> {
    Json(serde_json::to_value(document()).unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_route_is_documented_with_its_permission() {
        let document = serde_json::to_value(document()).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        for rule in PERMISSION_TABLE {
            let operation = &document["paths"][rule.path][rule.method.to_ascii_lowercase()];
            let permission =
                operation["x-permission"].as_str().unwrap_or_else(|| panic!("{} {}", rule.method, rule.path));
            assert!(permission.contains(rule.permission.as_str()), "{} {}: {permission}", rule.method, rule.path);
        }
        let lookup = &document["paths"]["/api/v1/profiles"]["get"]["x-permission"];
        assert_eq!(lookup, "profiles:lookup (with identifier), otherwise profiles:list");
        let parameters = &document["paths"]["/api/v1/audiences/{name}"]["delete"]["parameters"];
        assert_eq!(parameters[0]["name"], "name");
        assert_eq!(parameters[0]["in"], "path");
    }
}
