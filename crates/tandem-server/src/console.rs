//! The web console at `/`: server-rendered pages (askama templates, one
//! stylesheet and one small script, all compiled into the binary) over the
//! same storage and rules as the admin API. Signing in with an admin token
//! starts a server-side session ([`session`]) bound to the token's role;
//! every page asks the permission table ([`crate::access`]) for the API
//! route it mirrors, so a role sees in the console what it may call in the
//! API, and every value shown passes through the API's PII masking
//! ([`crate::pii::shown_to`]). Every POST carries the session's CSRF token.
//!
//! Pages: sign-in, goals (the landing page, [`goals`]), customers (search
//! and the 360° view of one profile), audiences (list, the builder with a
//! live size preview, one audience's members), the stack ([`stack`]), data
//! quality ([`quality`]) and governance ([`governance`]).

pub mod goals;
pub mod governance;
pub mod quality;
pub mod session;
pub mod stack;

use crate::error::{ApiError, ErrorCode};
use crate::extract::AdminToken;
use crate::profile::{format_ms, read};
use crate::AppState;
use askama::Template;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use session::Session;
use std::collections::HashMap;
use tandem_core::govern::Role;
use tandem_core::identity::{needs_phone_region, Normalizer};
use tandem_core::ProfileId;
use tandem_store::browse::{self, ProfileQuery};
use tandem_store::{MembershipChangeKind, TimelineCursor};

/// The console's stylesheet and script, compiled in.
const STYLESHEET: &str = include_str!("../assets/console.css");
const SCRIPT: &str = include_str!("../assets/console.js");

/// Profiles per page of a customer search, events per page of a timeline,
/// members per page of an audience.
const CUSTOMER_PAGE: usize = 25;
const TIMELINE_PAGE: usize = 20;
const MEMBER_PAGE: usize = 25;

/// The console's routes, for [`crate::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(home))
        .route("/console", get(home))
        .route("/console/sign-in", get(sign_in_form).post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/customers", get(customers))
        .route("/console/customers/{id}", get(customer))
        .route("/console/audiences", get(audiences).post(create_audience))
        .route("/console/audiences/preview", post(preview_audience))
        .route("/console/audiences/{name}", get(audience))
        .route("/console/assets/console.css", get(stylesheet))
        .route("/console/assets/console.js", get(script))
        .merge(stack::routes())
        .merge(quality::routes())
        .merge(governance::routes())
        .merge(goals::routes())
        .layer(axum::middleware::from_fn(resend_cookie))
}

// ---------------------------------------------------------------------------
// Sessions, permissions and responses

/// A request from a signed-in session whose token is still valid; anything
/// else is sent to the sign-in page.
struct Console {
    session: Session,
    token: AdminToken,
}

impl Console {
    fn role(&self) -> Role {
        self.token.role()
    }

    /// Whether the role may call this API route (the permission table).
    fn may(&self, method: &str, route: &str, query: Option<&str>) -> bool {
        crate::access::authorize(self.role(), method, route, query).is_ok()
    }

    /// `None` when the role may call the API route this page mirrors, a
    /// readable `403` page otherwise.
    fn refused(&self, method: &str, route: &str, query: Option<&str>) -> Option<Response> {
        crate::access::authorize(self.role(), method, route, query).err().map(|error| self.error_page(error))
    }

    /// The `403` page for a page the role may not see, naming what the
    /// role lacks for the API route it mirrors.
    fn refused_page(&self, method: &str, route: &str) -> Response {
        self.refused(method, route, None).unwrap_or_else(|| {
            self.error_page(
                ApiError::new(ErrorCode::PermissionDenied, "this role may not see this page").with_field("permission"),
            )
        })
    }

    fn chrome(&self, title: &str, section: &'static str) -> Chrome {
        Chrome {
            title: title.to_owned(),
            section,
            signed_in: true,
            role: self.role().as_str().to_owned(),
            token_name: self.token.0.name.clone(),
            csrf: self.session.csrf.clone(),
            may_customers: self.may("GET", "/api/v1/profiles", Some("identifier")),
            may_audiences: self.may("GET", "/api/v1/audiences", None),
            may_stack: stack::visible(self),
            may_quality: quality::visible(self),
            may_governance: governance::visible(self),
            may_goals: self.may("GET", "/api/v1/goals", None),
        }
    }

    fn error_page(&self, error: ApiError) -> Response {
        let status = error.status();
        let chrome = self.chrome(status.canonical_reason().unwrap_or("error"), "");
        page(status, ErrorPage { chrome, status: status.as_u16(), message: error.message })
    }

    /// `body` as this role may see it ([`crate::pii::shown_to`]).
    fn shown(&self, state: &AppState, body: Value) -> Value {
        crate::pii::shown_to(&self.token, &state.pii.current(), body)
    }
}

impl FromRequestParts<AppState> for Console {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let to_sign_in = || Redirect::to("/console/sign-in").into_response();
        // The session comes with its token as stored now: a revoked or
        // expired token has ended it.
        let CurrentSession(session) = CurrentSession::from_request_parts(parts, state).await?;
        let session = session.ok_or_else(to_sign_in)?;
        let Some(token) = session.token.clone() else {
            return Err(to_sign_in());
        };
        Ok(Console { session, token: AdminToken(token) })
    }
}

/// The live session the request's cookie names, if any, signed in or not;
/// a storage failure is an error page.
struct CurrentSession(Option<Session>);

impl FromRequestParts<AppState> for CurrentSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let Some(id) = session::session_id(&parts.headers) else {
            return Ok(CurrentSession(None));
        };
        let session = state.sessions.get(&id).await.map_err(plain_error)?;
        if let (Some(session), Some(extended)) = (&session, parts.extensions.get::<ExtendedSession>()) {
            if session.extended {
                extended.note(&session.id);
            }
        }
        Ok(CurrentSession(session))
    }
}

/// Where [`CurrentSession`] leaves the id of a session whose expiry it
/// moved, for [`resend_cookie`].
#[derive(Clone, Default)]
struct ExtendedSession(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl ExtendedSession {
    fn note(&self, id: &str) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(id.to_owned());
    }

    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }
}

/// Sends the session cookie again, with a fresh `Max-Age`, on a response to
/// a request that moved its session's expiry, so the browser keeps the
/// cookie as long as the server keeps the session. A response that sets
/// the cookie itself (signing in or out) is left as it is.
async fn resend_cookie(mut request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let extended = ExtendedSession::default();
    request.extensions_mut().insert(extended.clone());
    let mut response = next.run(request).await;
    if let Some(id) = extended.take() {
        if !response.headers().contains_key(header::SET_COOKIE) {
            if let Ok(value) = HeaderValue::from_str(&session::cookie(&id)) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
        }
    }
    response
}

/// What every page's frame shows.
struct Chrome {
    title: String,
    section: &'static str,
    signed_in: bool,
    role: String,
    token_name: String,
    csrf: String,
    may_customers: bool,
    may_audiences: bool,
    may_stack: bool,
    may_quality: bool,
    may_governance: bool,
    may_goals: bool,
}

fn page(status: StatusCode, template: impl Template) -> Response {
    match template.render() {
        Ok(html) => (
            status,
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
                (
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
                ),
            ],
            html,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "rendering a console page failed");
            plain_error(ApiError::new(ErrorCode::Internal, "internal error"))
        }
    }
}

/// An error as a bare page, for when no session frame can be drawn.
fn plain_error(error: ApiError) -> Response {
    let status = error.status();
    let chrome = Chrome {
        title: status.canonical_reason().unwrap_or("error").to_owned(),
        section: "",
        signed_in: false,
        role: String::new(),
        token_name: String::new(),
        csrf: String::new(),
        may_customers: false,
        may_audiences: false,
        may_stack: false,
        may_quality: false,
        may_governance: false,
        may_goals: false,
    };
    match (ErrorPage { chrome, status: status.as_u16(), message: error.message.clone() }).render() {
        Ok(html) => (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(_) => error.into_response(),
    }
}

fn csrf_refused() -> ApiError {
    ApiError::new(ErrorCode::InvalidCsrfToken, "the form is out of date or was not sent by the console; reload it")
        .with_field("csrf")
}

/// A form body, or `400`.
fn form<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_urlencoded::from_bytes(body)
        .map_err(|error| ApiError::new(ErrorCode::InvalidRequest, format!("the form is malformed: {error}")))
}

fn redirect_with_cookie(to: &str, cookie: &str) -> Response {
    let mut response = Redirect::to(to).into_response();
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn stylesheet() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")], STYLESHEET)
}

async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")], SCRIPT)
}

// ---------------------------------------------------------------------------
// Sign-in and sign-out

#[derive(Template)]
#[template(path = "console/sign_in.html")]
struct SignInPage {
    chrome: Chrome,
    error: Option<String>,
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage {
    chrome: Chrome,
    status: u16,
    message: String,
}

async fn home(CurrentSession(session): CurrentSession) -> Response {
    let signed_in = session.and_then(|session| session.token).map(|token| token.role);
    match signed_in {
        // The goals are the landing page: the numbers both sides own.
        Some(role) if role.grants(tandem_core::govern::Permission::GoalsRead) => {
            Redirect::to("/console/goals").into_response()
        }
        Some(role) if role.grants(tandem_core::govern::Permission::ProfilesLookup) => {
            Redirect::to("/console/customers").into_response()
        }
        Some(role) if !role.grants(tandem_core::govern::Permission::AudiencesRead) => {
            Redirect::to("/console/governance").into_response()
        }
        Some(_) => Redirect::to("/console/audiences").into_response(),
        None => Redirect::to("/console/sign-in").into_response(),
    }
}

fn sign_in_page(status: StatusCode, session: &Session, error: Option<String>) -> Response {
    let chrome = Chrome {
        title: "Sign in".to_owned(),
        section: "sign-in",
        signed_in: false,
        role: String::new(),
        token_name: String::new(),
        csrf: session.csrf.clone(),
        may_customers: false,
        may_audiences: false,
        may_stack: false,
        may_quality: false,
        may_governance: false,
        may_goals: false,
    };
    page(status, SignInPage { chrome, error })
}

/// `GET /console/sign-in`: the form, under an anonymous session whose CSRF
/// token the form carries.
async fn sign_in_form(State(state): State<AppState>, CurrentSession(session): CurrentSession) -> Response {
    if let Some(session) = session {
        return sign_in_page(StatusCode::OK, &session, None);
    }
    let session = match state.sessions.start(None).await {
        Ok(session) => session,
        Err(error) => return plain_error(error),
    };
    let mut response = sign_in_page(StatusCode::OK, &session, None);
    if let Ok(value) = HeaderValue::from_str(&session::cookie(&session.id)) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/sign-in`: checks the form's CSRF token against the
/// session and the admin token against storage, then replaces the session
/// by a signed-in one under a new id.
async fn sign_in(State(state): State<AppState>, CurrentSession(session): CurrentSession, body: Bytes) -> Response {
    let Some(session) = session else {
        return plain_error(csrf_refused());
    };
    let form: SignInForm = match form(&body) {
        Ok(form) => form,
        Err(error) => return plain_error(error),
    };
    if !session::csrf_matches(&session, &form.csrf) {
        return plain_error(csrf_refused());
    }
    let secret = form.token.trim().to_owned();
    let mut bearer = HeaderMap::new();
    let Ok(value) = HeaderValue::from_str(&format!("Bearer {secret}")) else {
        return sign_in_page(StatusCode::UNAUTHORIZED, &session, Some("the token is not valid".to_owned()));
    };
    bearer.insert(header::AUTHORIZATION, value);
    match state.tokens.authenticate(&bearer).await {
        Ok(token) => {
            if let Err(error) = state.sessions.end(&session.id).await {
                return plain_error(error);
            }
            tracing::info!(token = %token.id, role = %token.role, "console sign-in");
            match state.sessions.start(Some(token)).await {
                Ok(signed_in) => redirect_with_cookie("/", &session::cookie(&signed_in.id)),
                Err(error) => plain_error(error),
            }
        }
        Err(error) if error.status() == StatusCode::UNAUTHORIZED => {
            sign_in_page(StatusCode::UNAUTHORIZED, &session, Some(error.message))
        }
        Err(error) => plain_error(error),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /console/sign-out`: ends the session.
async fn sign_out(State(state): State<AppState>, console: Console, body: Bytes) -> Response {
    match form::<CsrfForm>(&body) {
        Ok(form) if session::csrf_matches(&console.session, &form.csrf) => {
            match state.sessions.end(&console.session.id).await {
                Ok(()) => redirect_with_cookie("/console/sign-in", &session::cleared_cookie()),
                Err(error) => console.error_page(error),
            }
        }
        Ok(_) => console.error_page(csrf_refused()),
        Err(error) => console.error_page(error),
    }
}

// ---------------------------------------------------------------------------
// Customers

/// One profile in a list: its id, identifiers and a few traits, as shown.
struct ProfileRow {
    id: String,
    identifiers: Vec<String>,
    name: String,
}

#[derive(Template)]
#[template(path = "console/customers.html")]
struct CustomersPage {
    chrome: Chrome,
    identifier: String,
    trait_filter: String,
    may_list: bool,
    searched: bool,
    error: Option<String>,
    profiles: Vec<ProfileRow>,
    next_page: Option<String>,
}

#[derive(Deserialize, Default)]
struct CustomerSearch {
    #[serde(default)]
    identifier: String,
    #[serde(default, rename = "trait")]
    trait_filter: String,
    after: Option<String>,
}

/// `type:value` strings of a shown profile's identifiers.
fn identifiers_of(shown: &Value) -> Vec<String> {
    shown["identifiers"]
        .as_array()
        .map(|identifiers| {
            identifiers
                .iter()
                .map(|identifier| format!("{}:{}", text(&identifier["type"]), text(&identifier["value"])))
                .collect()
        })
        .unwrap_or_default()
}

/// A JSON value as page text: strings without their quotes.
fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// An instant (milliseconds) as page text; empty for none.
fn when(ms: Option<i64>) -> String {
    ms.map(|ms| text(&format_ms(ms))).unwrap_or_default()
}

/// `text` cut to at most `max` characters, marked with `…` when cut, so a
/// long payload cannot swell a page.
fn clipped(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

impl Console {
    /// A stored payload (an event, a refused message, a sample) as this
    /// role may see it, cut to `max` characters: JSON passes through the
    /// PII masking; text that is not JSON (malformed, or cut when stored)
    /// cannot be masked, so only a role that sees PII in clear is shown it.
    fn shown_payload(&self, state: &AppState, payload: &str, max: usize) -> String {
        match serde_json::from_str::<Value>(payload) {
            Ok(value) => clipped(&self.shown(state, value).to_string(), max),
            Err(_) if self.token.sees_pii() => clipped(payload, max),
            Err(_) => "(not JSON, so it cannot be masked: shown only to roles with pii:read)".to_owned(),
        }
    }
}

fn profile_row(shown: &Value) -> ProfileRow {
    let traits = &shown["traits"];
    let name = ["name", "first_name", "firstName"]
        .iter()
        .map(|key| text(&traits[*key]))
        .find(|name| !name.is_empty())
        .unwrap_or_default();
    ProfileRow { id: text(&shown["id"]), identifiers: identifiers_of(shown), name }
}

/// `GET /console/customers`: search by identifier (an exact `type:value`
/// opens that customer; a prefix lists those holding one) or by trait.
async fn customers(State(state): State<AppState>, console: Console, RawQuery(raw): RawQuery) -> Response {
    if let Some(refused) = console.refused("GET", "/api/v1/profiles", Some("identifier")) {
        return refused;
    }
    let search: CustomerSearch = serde_urlencoded::from_str(raw.as_deref().unwrap_or("")).unwrap_or_default();
    let may_list = console.may("GET", "/api/v1/profiles", None);
    let identifier = search.identifier.trim().to_owned();
    let trait_filter = search.trait_filter.trim().to_owned();
    let mut listing = CustomersPage {
        chrome: console.chrome("Customers", "customers"),
        identifier: identifier.clone(),
        trait_filter: trait_filter.clone(),
        may_list,
        searched: !identifier.is_empty() || !trait_filter.is_empty(),
        error: None,
        profiles: Vec::new(),
        next_page: None,
    };
    if !listing.searched {
        return page(StatusCode::OK, listing);
    }
    // An exact identifier opens its customer.
    if !identifier.is_empty() && trait_filter.is_empty() && search.after.is_none() {
        match exact_lookup(&state, &identifier).await {
            Ok(Some(id)) => return Redirect::to(&format!("/console/customers/{id}")).into_response(),
            Ok(None) => {}
            Err(error) if !may_list => {
                listing.error = Some(error.message);
                return page(StatusCode::OK, listing);
            }
            Err(_) => {}
        }
        if !may_list {
            listing.error = Some(format!("no customer holds {identifier}"));
            return page(StatusCode::OK, listing);
        }
    }
    if let Some(refused) = console.refused("GET", "/api/v1/profiles", None) {
        return refused;
    }
    let mut query = ProfileQuery { after: search.after.clone(), ..ProfileQuery::default() };
    if !identifier.is_empty() {
        match browse::parse_identifier_prefix(&identifier) {
            Some(prefix) => query.identifier_prefix = Some(prefix),
            None => {
                listing.error = Some("an identifier is type:value, such as email:ann@example.com".to_owned());
                return page(StatusCode::BAD_REQUEST, listing);
            }
        }
    }
    if !trait_filter.is_empty() {
        match trait_filter.split_once(':') {
            Some((name, wanted)) => query.traits.push((name.trim().to_owned(), wanted.trim().to_owned())),
            None => {
                listing.error = Some("a trait is name:value, such as plan:pro".to_owned());
                return page(StatusCode::BAD_REQUEST, listing);
            }
        }
    }
    let store = state.store.clone();
    let found = tokio::task::spawn_blocking(move || {
        browse::find_profiles(store.as_ref(), &query, CUSTOMER_PAGE, browse::DEFAULT_SCAN_BUDGET)
    })
    .await;
    let found = match found {
        Ok(Ok(found)) => found,
        Ok(Err(browse::BrowseError::InvalidCursor(message))) => {
            listing.error = Some(format!("this page cannot be continued: {message}"));
            return page(StatusCode::BAD_REQUEST, listing);
        }
        Ok(Err(browse::BrowseError::Store(error))) => {
            tracing::error!(%error, "console customer search failed");
            return console.error_page(ApiError::unavailable());
        }
        Err(_) => return console.error_page(ApiError::new(ErrorCode::Internal, "internal error")),
    };
    if console.token.sees_pii() && !found.profiles.is_empty() {
        let ids: Vec<String> = found.profiles.iter().map(|profile| profile.id.to_string()).collect();
        let target = format!("{} profiles", ids.len());
        crate::audit::record(&state, &console.token, "profile.list", &target, None, Some(json!({"profiles": ids})))
            .await;
    }
    listing.profiles = found
        .profiles
        .iter()
        .map(|profile| profile_row(&console.shown(&state, crate::profile::profile_json(profile))))
        .collect();
    listing.next_page = found.next_after.map(|after| {
        serde_urlencoded::to_string([
            ("identifier", identifier.as_str()),
            ("trait", trait_filter.as_str()),
            ("after", after.as_str()),
        ])
        .unwrap_or_default()
    });
    page(StatusCode::OK, listing)
}

/// The profile holding exactly this `type:value`, if any.
async fn exact_lookup(state: &AppState, text: &str) -> Result<Option<ProfileId>, ApiError> {
    let normalizer = if needs_phone_region(text) {
        read(state, |store| store.identity_rules()).await?.normalizer().unwrap_or_default()
    } else {
        Normalizer::default()
    };
    let identifier = normalizer
        .parse(text)
        .map_err(|error| ApiError::new(ErrorCode::InvalidIdentifier, error.to_string()).with_field("identifier"))?;
    Ok(read(state, move |store| store.profile_by_identifier(&identifier)).await?.map(|profile| profile.id))
}

/// One event of a timeline, as shown.
struct TimelineRow {
    at: String,
    kind: String,
    name: String,
    source: String,
    details: String,
}

/// One audience a customer is or was in.
struct MembershipRow {
    audience: String,
    entered: String,
    exited: String,
}

#[derive(Template)]
#[template(path = "console/customer.html")]
struct CustomerPage {
    chrome: Chrome,
    id: String,
    identifiers: Vec<String>,
    traits: Vec<(String, String)>,
    computed: Vec<(String, String)>,
    first_seen: String,
    last_seen: String,
    history: Option<Vec<String>>,
    timeline: Option<Vec<TimelineRow>>,
    older: Option<String>,
    memberships: Option<Vec<MembershipRow>>,
}

#[derive(Deserialize, Default)]
struct TimelineQuery {
    before: Option<String>,
}

/// `GET /console/customers/{id}`: the 360° view of one customer — traits
/// and computed traits, identities, the timeline across sources (paged),
/// and audiences with entry and exit times — each part shown when the role
/// may read it.
async fn customer(
    State(state): State<AppState>,
    console: Console,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    if let Some(refused) = console.refused("GET", "/api/v1/profiles/{id}", None) {
        return refused;
    }
    let not_found = || ApiError::new(ErrorCode::ProfileNotFound, format!("no customer {id}")).with_field("id");
    let Ok(profile_id) = id.parse::<ProfileId>() else {
        return console.error_page(not_found());
    };
    let query: TimelineQuery = serde_urlencoded::from_str(raw.as_deref().unwrap_or("")).unwrap_or_default();
    let before = match query.before.as_deref().map(str::parse::<TimelineCursor>).transpose() {
        Ok(before) => before,
        Err(error) => {
            return console.error_page(ApiError::new(ErrorCode::InvalidValue, error.to_string()).with_field("before"))
        }
    };
    let may_events = console.may("GET", "/api/v1/profiles/{id}/events", None);
    let may_identities = console.may("GET", "/api/v1/profiles/{id}/identities", None);
    let may_audiences = console.may("GET", "/api/v1/audiences", None);
    let loaded = read(&state, move |store| {
        let Some(profile) = store.profile(profile_id)? else {
            return Ok(None);
        };
        let computed = store.computed_trait_states(&[profile_id])?;
        let history = if may_identities {
            let records = store.identity_history(profile_id)?;
            Some(
                records
                    .iter()
                    .map(|record| crate::profile::history_json(store, record))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        } else {
            None
        };
        let events = if may_events { Some(store.profile_events(profile_id, before, TIMELINE_PAGE)?) } else { None };
        let memberships = if may_audiences {
            let mut rows = Vec::new();
            for record in store.list_audiences()? {
                let name = record.definition.name;
                let changes = store.membership_history(&name, profile_id)?;
                rows.extend(membership_rows(&name, &changes));
            }
            Some(rows)
        } else {
            None
        };
        let sources: HashMap<String, String> =
            store.list_sources()?.into_iter().map(|source| (source.id.to_string(), source.name)).collect();
        Ok(Some((profile, computed, history, events, memberships, sources)))
    })
    .await;
    let (profile, computed, history, events, memberships, sources) = match loaded {
        Ok(Some(loaded)) => loaded,
        Ok(None) => return console.error_page(not_found()),
        Err(error) => return console.error_page(error),
    };
    if console.token.sees_pii() {
        crate::audit::record(&state, &console.token, "profile.read", &profile.id.to_string(), None, None).await;
    }
    let computed: serde_json::Map<String, Value> =
        computed.into_iter().filter_map(|stored| Some((stored.name, stored.value?))).collect();
    let older = events
        .as_ref()
        .filter(|entries| entries.len() == TIMELINE_PAGE)
        .and_then(|entries| entries.last())
        .map(|entry| TimelineCursor::at(entry).to_string());
    let events: Option<Vec<Value>> = events.map(|entries| {
        entries
            .into_iter()
            .map(|entry| {
                let mut event: Value = serde_json::from_str(&entry.payload).unwrap_or(Value::Null);
                event["_source"] = json!(sources.get(entry.source_id.as_str()).cloned().unwrap_or_default());
                event["_at"] = format_ms(entry.timestamp_ms);
                event
            })
            .collect()
    });
    let shown = console.shown(
        &state,
        json!({
            "profile": crate::profile::profile_json(&profile),
            "computed_traits": computed,
            "history": history,
            "events": events,
        }),
    );
    let pairs = |object: &Value| -> Vec<(String, String)> {
        object
            .as_object()
            .map(|map| map.iter().map(|(key, value)| (key.clone(), text(value))).collect())
            .unwrap_or_default()
    };
    let timeline = shown["events"].as_array().map(|events| {
        events
            .iter()
            .map(|event| {
                let kind = text(&event["type"]);
                let name = match kind.as_str() {
                    "track" => text(&event["event"]),
                    "page" | "screen" => text(&event["name"]),
                    "group" => text(&event["groupId"]),
                    _ => String::new(),
                };
                let details = ["properties", "traits"]
                    .iter()
                    .map(|key| &event[*key])
                    .find(|value| value.as_object().is_some_and(|map| !map.is_empty()))
                    .map(Value::to_string)
                    .unwrap_or_default();
                TimelineRow { at: text(&event["_at"]), kind, name, source: text(&event["_source"]), details }
            })
            .collect()
    });
    let template = CustomerPage {
        chrome: console.chrome(&format!("Customer {}", profile.id), "customers"),
        id: profile.id.to_string(),
        identifiers: identifiers_of(&shown["profile"]),
        traits: pairs(&shown["profile"]["traits"]),
        computed: pairs(&shown["computed_traits"]),
        first_seen: text(&shown["profile"]["first_seen"]),
        last_seen: text(&shown["profile"]["last_seen"]),
        history: shown["history"].as_array().map(|history| history.iter().map(Value::to_string).collect()),
        timeline,
        older: older.map(|before| serde_urlencoded::to_string([("before", before)]).unwrap_or_default()),
        memberships,
    };
    page(StatusCode::OK, template)
}

/// A profile's stays in one audience from its history: each entry with the
/// exit that ended it, if any.
fn membership_rows(audience: &str, changes: &[tandem_store::MembershipChange]) -> Vec<MembershipRow> {
    let mut rows: Vec<MembershipRow> = Vec::new();
    for change in changes {
        match change.kind {
            MembershipChangeKind::Entered => rows.push(MembershipRow {
                audience: audience.to_owned(),
                entered: text(&format_ms(change.at_ms)),
                exited: String::new(),
            }),
            MembershipChangeKind::Exited => match rows.last_mut().filter(|row| row.exited.is_empty()) {
                Some(row) => row.exited = text(&format_ms(change.at_ms)),
                None => rows.push(MembershipRow {
                    audience: audience.to_owned(),
                    entered: String::new(),
                    exited: text(&format_ms(change.at_ms)),
                }),
            },
        }
    }
    rows
}

// ---------------------------------------------------------------------------
// Audiences

struct AudienceRow {
    name: String,
    size: u64,
}

#[derive(Template)]
#[template(path = "console/audiences.html")]
struct AudiencesPage {
    chrome: Chrome,
    audiences: Vec<AudienceRow>,
    may_write: bool,
    name: String,
    rule: String,
    error: Option<String>,
}

async fn audience_rows(state: &AppState) -> Result<Vec<AudienceRow>, ApiError> {
    let records = read(state, |store| store.list_audiences()).await?;
    Ok(records.into_iter().map(|record| AudienceRow { name: record.definition.name, size: record.size }).collect())
}

/// `GET /console/audiences`: every audience with its size, and the builder.
async fn audiences(State(state): State<AppState>, console: Console) -> Response {
    if let Some(refused) = console.refused("GET", "/api/v1/audiences", None) {
        return refused;
    }
    let audiences = match audience_rows(&state).await {
        Ok(audiences) => audiences,
        Err(error) => return console.error_page(error),
    };
    let template = AudiencesPage {
        chrome: console.chrome("Audiences", "audiences"),
        audiences,
        may_write: console.may("POST", "/api/v1/audiences", None),
        name: String::new(),
        rule: String::new(),
        error: None,
    };
    page(StatusCode::OK, template)
}

#[derive(Deserialize)]
struct AudienceForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    rule: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /console/audiences`: creates an audience from the builder's text
/// rule, as `POST /api/v1/audiences` does; a refusal shows the builder again
/// with the message.
async fn create_audience(State(state): State<AppState>, console: Console, body: Bytes) -> Response {
    let form: AudienceForm = match form(&body) {
        Ok(form) => form,
        Err(error) => return console.error_page(error),
    };
    if !session::csrf_matches(&console.session, &form.csrf) {
        return console.error_page(csrf_refused());
    }
    if let Some(refused) = console.refused("POST", "/api/v1/audiences", None) {
        return refused;
    }
    let name = form.name.trim().to_owned();
    let created = match crate::audience_api::parse_rule(&json!({"text": form.rule})) {
        Ok(rule) => {
            let now = chrono::Utc::now();
            let wanted = name.clone();
            let store = state.store.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                crate::audience::create_audience(store.as_ref(), &wanted, rule, now)?;
                store
                    .audience(&wanted)?
                    .ok_or(crate::audience::DefineError::Store(tandem_store::StoreError::AudienceNotFound(wanted)))
            })
            .await;
            match outcome {
                Ok(Ok(record)) => Ok(record),
                Ok(Err(error)) => Err(crate::audience_api::define_error(error)),
                Err(_) => Err(ApiError::new(ErrorCode::Internal, "internal error")),
            }
        }
        Err(error) => Err(error),
    };
    match created {
        Ok(record) => {
            let shown = crate::audience_api::audience_json(&record);
            crate::audit::record(&state, &console.token, "audience.create", &name, None, Some(shown)).await;
            Redirect::to(&format!("/console/audiences/{}", path_segment(&name))).into_response()
        }
        Err(error) if error.status().is_client_error() => {
            let audiences = audience_rows(&state).await.unwrap_or_default();
            let template = AudiencesPage {
                chrome: console.chrome("Audiences", "audiences"),
                audiences,
                may_write: true,
                name,
                rule: form.rule,
                error: Some(error.message.clone()),
            };
            page(error.status(), template)
        }
        Err(error) => console.error_page(error),
    }
}

/// `name` percent-encoded for a path segment.
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[derive(Deserialize)]
struct PreviewBody {
    #[serde(default)]
    rule: String,
}

/// `POST /console/audiences/preview` (fetched by the builder as it is
/// typed, the CSRF token in `X-CSRF-Token`): the size the text rule selects
/// now — exact up to [`crate::audience::ESTIMATE_PROFILES`] profiles,
/// estimated from a sample of that many above, so it answers as fast with a
/// million profiles — or the parse error with its line and column, as JSON.
async fn preview_audience(
    State(state): State<AppState>,
    console: Console,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let given = headers.get("x-csrf-token").and_then(|value| value.to_str().ok()).unwrap_or("");
    if !session::csrf_matches(&console.session, given) {
        return csrf_refused().into_response();
    }
    if let Err(error) = crate::access::authorize(console.role(), "POST", "/api/v1/audiences/preview", None) {
        return error.into_response();
    }
    let text = match serde_json::from_slice::<PreviewBody>(&body) {
        Ok(body) => body.rule,
        Err(error) => {
            return ApiError::new(ErrorCode::InvalidJson, format!("the body is not JSON: {error}")).into_response()
        }
    };
    let rule = match crate::audience_api::parse_rule(&json!({ "text": text })) {
        Ok(rule) => rule,
        Err(error) => return error.into_response(),
    };
    let now = chrono::Utc::now();
    let store = state.store.clone();
    let estimate = tokio::task::spawn_blocking(move || {
        crate::audience::estimate(store.as_ref(), &rule, now, crate::audience::ESTIMATE_PROFILES)
    })
    .await;
    match estimate {
        Ok(Ok(estimate)) => Json(json!({
            "size": estimate.size,
            "exact": estimate.exact,
            "margin": estimate.margin,
            "profiles": estimate.profiles,
            "profiles_evaluated": estimate.profiles_evaluated,
        }))
        .into_response(),
        Ok(Err(error)) => crate::audience_api::define_error(error).into_response(),
        Err(_) => ApiError::new(ErrorCode::Internal, "internal error").into_response(),
    }
}

#[derive(Template)]
#[template(path = "console/audience.html")]
struct AudiencePage {
    chrome: Chrome,
    name: String,
    rule: String,
    size: u64,
    created_at: String,
    backfilled: bool,
    may_members: bool,
    /// Whether member ids link to their 360° view.
    may_lookup: bool,
    members: Vec<MemberRow>,
    next_page: Option<String>,
}

struct MemberRow {
    id: String,
    identifiers: Vec<String>,
    entered: String,
}

#[derive(Deserialize, Default)]
struct MembersQuery {
    after: Option<String>,
}

/// `GET /console/audiences/{name}`: the rule, the size, and the members a
/// page at a time, with their identifiers as the role may see them.
async fn audience(
    State(state): State<AppState>,
    console: Console,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    if let Some(refused) = console.refused("GET", "/api/v1/audiences/{name}", None) {
        return refused;
    }
    let query: MembersQuery = serde_urlencoded::from_str(raw.as_deref().unwrap_or("")).unwrap_or_default();
    let after = match query.after.as_deref().map(str::parse::<ProfileId>).transpose() {
        Ok(after) => after,
        Err(error) => {
            return console.error_page(ApiError::new(ErrorCode::InvalidValue, error.to_string()).with_field("after"))
        }
    };
    let may_members = console.may("GET", "/api/v1/audiences/{name}/members", None);
    let wanted = name.clone();
    let loaded = read(&state, move |store| {
        let Some(record) = store.audience(&wanted)? else {
            return Ok(None);
        };
        let mut members = Vec::new();
        if may_members {
            for member in store.audience_members(&wanted, after, MEMBER_PAGE)? {
                let profile = store.profile(member.profile)?;
                members.push((member, profile));
            }
        }
        Ok(Some((record, members)))
    })
    .await;
    let (record, members) = match loaded {
        Ok(Some(loaded)) => loaded,
        Ok(None) => {
            return console.error_page(
                ApiError::new(ErrorCode::AudienceNotFound, format!("no audience named {name:?}")).with_field("name"),
            )
        }
        Err(error) => return console.error_page(error),
    };
    let next_page = (members.len() == MEMBER_PAGE)
        .then(|| members.last().map(|(member, _)| member.profile.to_string()))
        .flatten()
        .map(|after| serde_urlencoded::to_string([("after", after)]).unwrap_or_default());
    let shown: Vec<Value> = members
        .iter()
        .map(|(member, profile)| {
            let identifiers = profile.as_ref().map(|profile| json!(profile.identifiers)).unwrap_or(json!([]));
            let entered = format_ms(member.entered_at_ms);
            console.shown(&state, json!({"id": member.profile, "identifiers": identifiers, "entered": entered}))
        })
        .collect();
    let members = shown
        .iter()
        .map(|member| MemberRow {
            id: text(&member["id"]),
            identifiers: identifiers_of(member),
            entered: text(&member["entered"]),
        })
        .collect();
    let template = AudiencePage {
        chrome: console.chrome(&format!("Audience {name}"), "audiences"),
        rule: record.definition.rule.to_string(),
        size: record.size,
        created_at: text(&format_ms(record.definition.created_at_ms)),
        backfilled: record.backfill == tandem_store::Backfill::Done,
        name,
        may_members,
        may_lookup: console.may("GET", "/api/v1/profiles/{id}", None),
        members,
        next_page,
    };
    page(StatusCode::OK, template)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_store::MembershipChange;

    fn change(kind: MembershipChangeKind, at_ms: i64) -> MembershipChange {
        MembershipChange { audience: "vip".into(), profile: ProfileId(7), kind, at_ms }
    }

    #[test]
    fn each_stay_in_an_audience_pairs_its_entry_with_its_exit() {
        use MembershipChangeKind::{Entered, Exited};
        let rows = membership_rows("vip", &[change(Entered, 0), change(Exited, 60_000), change(Entered, 120_000)]);
        let shown: Vec<(&str, &str)> = rows.iter().map(|row| (row.entered.as_str(), row.exited.as_str())).collect();
        assert_eq!(shown, [("1970-01-01T00:00:00.000Z", "1970-01-01T00:01:00.000Z"), ("1970-01-01T00:02:00.000Z", "")]);
        assert_eq!(path_segment("recent buyers/ä"), "recent%20buyers%2F%C3%A4");
    }

    #[test]
    fn long_text_is_clipped_on_a_character_boundary() {
        assert_eq!(clipped("short", 5), "short");
        assert_eq!(clipped("äöüß", 2), "äö…");
        assert_eq!(when(None), "");
        assert_eq!(when(Some(60_000)), "1970-01-01T00:01:00.000Z");
    }
}
