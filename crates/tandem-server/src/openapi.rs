//! The OpenAPI 3.1 document of the admin API, `GET /api/v1/openapi.json`,
//! built with `utoipa`'s document model from the permission table itself:
//! every `/api/v1` route the table lists becomes an operation carrying the
//! permission it requires (`x-permission`, and in its description), its path
//! parameters, bearer authentication, and the one error body every refusal
//! uses. Because the document is generated from the same table that
//! authorizes requests, it cannot list a route the server refuses to decide
//! or omit one it serves.
//!
//! What each route takes besides its path is [`ROUTE_INPUTS`]: its query
//! parameters and request body, from the types the handlers read them into
//! (`utoipa`'s `IntoParams` and `ToSchema` derives on the query structs and on
//! the documents themselves — plans, destinations, registry entries, PII
//! rules). Every table route must have a line there, even one that takes
//! nothing, so a new route cannot go undescribed.

use crate::access::{RouteRule, PERMISSION_TABLE};
use crate::extract::AdminToken;
use axum::Json;
use serde_json::{json, Value};
use utoipa::openapi::extensions::ExtensionsBuilder;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, Parameter, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::{RequestBody, RequestBodyBuilder};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, ObjectBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Ref, RefOr,
    Required, ResponseBuilder, Schema, Type,
};
use utoipa::{IntoParams, ToSchema};

/// Schemas a request body refers to, gathered for the document's components.
type Components = Vec<(String, RefOr<Schema>)>;

/// What one route takes besides its path parameters.
pub struct RouteInput {
    pub method: &'static str,
    pub path: &'static str,
    /// Its query parameters.
    pub query: fn() -> Vec<Parameter>,
    /// Its request body, registering the schemas it refers to.
    pub body: Option<fn(&mut Components) -> RequestBody>,
}

const fn input(method: &'static str, path: &'static str) -> RouteInput {
    RouteInput { method, path, query: no_query, body: None }
}

const fn with_query(method: &'static str, path: &'static str, query: fn() -> Vec<Parameter>) -> RouteInput {
    RouteInput { method, path, query, body: None }
}

const fn with_body(method: &'static str, path: &'static str, body: fn(&mut Components) -> RequestBody) -> RouteInput {
    RouteInput { method, path, query: no_query, body: Some(body) }
}

fn no_query() -> Vec<Parameter> {
    Vec::new()
}

fn query<T: IntoParams>() -> Vec<Parameter> {
    T::into_params(|| Some(ParameterIn::Query))
}

/// A body of `content_type` described by `T`, registered with the schemas it refers to.
fn body_of<T: ToSchema>(components: &mut Components, content_type: &str) -> RequestBody {
    let name = T::name().into_owned();
    components.push((name.clone(), T::schema()));
    T::schemas(components);
    RequestBodyBuilder::new()
        .required(Some(Required::True))
        .content(content_type, ContentBuilder::new().schema(Some(Ref::from_schema_name(name))).build())
        .build()
}

fn json<T: ToSchema>(components: &mut Components) -> RequestBody {
    body_of::<T>(components, "application/json")
}

fn multipart<T: ToSchema>(components: &mut Components) -> RequestBody {
    body_of::<T>(components, "multipart/form-data")
}

/// The dead-letter filters a route reads, without the parameters it does not.
fn dead_letter_query(leave_out: &[&str]) -> Vec<Parameter> {
    let mut parameters = query::<crate::destination_api::DeadLetterQuery>();
    parameters.retain(|parameter| !leave_out.contains(&parameter.name.as_str()));
    parameters
}

fn destination_dead_letters() -> Vec<Parameter> {
    dead_letter_query(&["destination"])
}

fn destination_replay() -> Vec<Parameter> {
    dead_letter_query(&["destination", "limit", "after"])
}

fn deliveries_replay() -> Vec<Parameter> {
    let mut parameters = dead_letter_query(&["limit", "after"]);
    for parameter in &mut parameters {
        if parameter.name == "destination" {
            parameter.required = Required::True;
        }
    }
    parameters
}

/// What every table route takes besides its path: one line per method and
/// route of [`PERMISSION_TABLE`] (a test holds the two together).
pub const ROUTE_INPUTS: &[RouteInput] = &[
    with_query("GET", "/api/v1/profiles", query::<crate::profile::ProfileListQuery>),
    input("GET", "/api/v1/profiles/{id}"),
    with_query("GET", "/api/v1/profiles/{id}/events", query::<crate::profile::EventsQuery>),
    input("GET", "/api/v1/profiles/{id}/identities"),
    input("GET", "/api/v1/audiences"),
    with_body("POST", "/api/v1/audiences", json::<crate::audience_api::NewAudience>),
    with_body("POST", "/api/v1/audiences/preview", json::<crate::audience_api::AudiencePreview>),
    input("GET", "/api/v1/audiences/{name}"),
    input("DELETE", "/api/v1/audiences/{name}"),
    with_query("GET", "/api/v1/audiences/{name}/members", query::<crate::audience_api::MembersQuery>),
    input("GET", "/api/v1/computed-traits"),
    with_body("POST", "/api/v1/computed-traits", json::<crate::computed_api::NewComputedTrait>),
    input("GET", "/api/v1/computed-traits/{name}"),
    input("DELETE", "/api/v1/computed-traits/{name}"),
    input("GET", "/api/v1/destinations"),
    with_body("POST", "/api/v1/destinations", json::<crate::destination_api::NewDestination>),
    input("GET", "/api/v1/destinations/{name}"),
    input("DELETE", "/api/v1/destinations/{name}"),
    with_query("GET", "/api/v1/destinations/{name}/dead-letters", destination_dead_letters),
    with_query("POST", "/api/v1/destinations/{name}/replay", destination_replay),
    input("POST", "/api/v1/destinations/{name}/pause"),
    input("POST", "/api/v1/destinations/{name}/resume"),
    input("POST", "/api/v1/destinations/{name}/test"),
    with_query("GET", "/api/v1/deliveries/failed", query::<crate::destination_api::DeadLetterQuery>),
    with_query("POST", "/api/v1/deliveries/replay", deliveries_replay),
    input("GET", "/api/v1/imports"),
    with_body("POST", "/api/v1/imports", multipart::<crate::import::jobs::ImportUpload>),
    input("GET", "/api/v1/imports/{id}"),
    input("GET", "/api/v1/imports/{id}/rejects"),
    input("GET", "/api/v1/cluster"),
    input("GET", "/api/v1/goals"),
    // A goal's settings are read by `GoalSettings::from_json`, which names
    // the field it refuses; the body is documented in the README.
    input("POST", "/api/v1/goals"),
    input("GET", "/api/v1/goals/{name}"),
    input("DELETE", "/api/v1/goals/{name}"),
    with_query("GET", "/api/v1/audit", query::<crate::audit::ListQuery>),
    input("GET", "/api/v1/audit/verify"),
    input("GET", "/api/v1/pii/inventory"),
    input("GET", "/api/v1/pii/rules"),
    with_body("POST", "/api/v1/pii/rules", json::<tandem_core::govern::pii::PiiRule>),
    with_query("DELETE", "/api/v1/pii/rules", query::<crate::pii::RuleSelector>),
    input("GET", "/api/v1/plans"),
    with_query("GET", "/api/v1/plans/{source}", query::<crate::plan_api::ViolationQuery>),
    with_body("PUT", "/api/v1/plans/{source}", json::<tandem_core::govern::plan::TrackingPlan>),
    input("DELETE", "/api/v1/plans/{source}"),
    with_query("GET", "/api/v1/plans/{source}/violations", query::<crate::plan_api::ViolationQuery>),
    input("GET", "/api/v1/stack"),
    with_body("PUT", "/api/v1/stack/sources/{name}", json::<tandem_core::govern::stack::ToolInfo>),
    with_body("PUT", "/api/v1/stack/destinations/{name}", json::<tandem_core::govern::stack::ToolInfo>),
    with_query("GET", "/api/v1/dsr", query::<crate::dsr::ListQuery>),
    with_body("POST", "/api/v1/dsr", json::<crate::dsr::NewRequest>),
    input("GET", "/api/v1/openapi.json"),
];

/// The line of [`ROUTE_INPUTS`] for a route.
pub fn route_input(method: &str, path: &str) -> Option<&'static RouteInput> {
    ROUTE_INPUTS.iter().find(|input| input.method == method && input.path == path)
}

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
    let mut components = ComponentsBuilder::new();
    let mut schemas = Components::new();
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
        if let Some(input) = route_input(rule.method, rule.path) {
            for parameter in (input.query)() {
                operation = operation.parameter(parameter);
            }
            if let Some(body) = input.body {
                operation = operation.request_body(Some(body(&mut schemas)));
            }
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
    for (name, schema) in schemas {
        components = components.schema(name, schema);
    }
    let components = components
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

    #[test]
    fn every_table_route_says_what_it_takes_and_no_other_route_does() {
        for rule in PERMISSION_TABLE {
            assert!(
                route_input(rule.method, rule.path).is_some(),
                "{} {} has no line in ROUTE_INPUTS (its query parameters and body)",
                rule.method,
                rule.path
            );
        }
        for input in ROUTE_INPUTS {
            assert!(
                PERMISSION_TABLE.iter().any(|rule| rule.method == input.method && rule.path == input.path),
                "{} {} is described but in no permission table line",
                input.method,
                input.path
            );
            let twice = ROUTE_INPUTS.iter().filter(|other| other.method == input.method && other.path == input.path);
            assert_eq!(twice.count(), 1, "{} {} is described twice", input.method, input.path);
        }
    }

    #[test]
    fn query_parameters_and_bodies_are_documented_with_their_schemas() {
        let document = serde_json::to_value(document()).unwrap();
        let names = |path: &str, method: &str| -> Vec<String> {
            document["paths"][path][method]["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|parameter| parameter["in"] == "query")
                .map(|parameter| parameter["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names("/api/v1/audit", "get"), ["actor", "action", "since", "after", "limit"]);
        assert_eq!(names("/api/v1/profiles", "get"), ["identifier", "search", "trait", "after", "limit"]);
        assert_eq!(
            names("/api/v1/destinations/{name}/dead-letters", "get"),
            ["limit", "since", "profile", "item", "after"]
        );
        let replay = &document["paths"]["/api/v1/deliveries/replay"]["post"]["parameters"];
        let destination = replay.as_array().unwrap().iter().find(|parameter| parameter["name"] == "destination");
        assert_eq!(destination.unwrap()["required"], true);

        let body = |path: &str, method: &str| -> String {
            let content = &document["paths"][path][method]["requestBody"]["content"];
            let (media, schema) = content.as_object().unwrap().iter().next().unwrap();
            format!("{media} {}", schema["schema"]["$ref"].as_str().unwrap())
        };
        assert_eq!(body("/api/v1/plans/{source}", "put"), "application/json #/components/schemas/TrackingPlan");
        assert_eq!(body("/api/v1/imports", "post"), "multipart/form-data #/components/schemas/ImportUpload");
        assert_eq!(body("/api/v1/pii/rules", "post"), "application/json #/components/schemas/PiiRule");
        let schemas = &document["components"]["schemas"];
        for nested in ["PlanMode", "PiiClass", "RedPolicy", "NewDestination", "WebhookSettings", "ToolInfo", "DsrKind"]
        {
            assert!(schemas.get(nested).is_some(), "{nested} is referred to but not in the components");
        }
        let destination = &schemas["NewDestination"]["properties"];
        assert!(destination.get("registry").is_some(), "{destination}");
        let kinds: Vec<&Value> = destination["destination"]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kind| &kind["properties"]["kind"]["enum"][0])
            .collect();
        assert_eq!(kinds, [&json!("webhook"), &json!("file"), &json!("warehouse")]);
        let modes = serde_json::to_string(&schemas["PlanMode"]).unwrap();
        assert!(modes.contains("block_invalid") && modes.contains("omit_unplanned_properties"), "{modes}");
        // Every reference resolves.
        let text = document.to_string();
        for reference in text.split("\"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(schemas.get(name).is_some(), "#/components/schemas/{name} does not resolve");
        }
    }
}
