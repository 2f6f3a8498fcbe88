//! The profile API: profiles listed and searched (by identifier prefix and by
//! trait, a page at a time), one customer's unified profile, their event
//! timeline across every source, and the identity history that explains each link.
//! Every endpoint needs an admin bearer token.

use crate::error::{ApiError, ErrorCode};
use crate::extract::{AdminToken, ApiPath, ApiQuery};
use crate::AppState;
use axum::extract::{RawQuery, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tandem_core::event::format_timestamp;
use tandem_core::identity::{needs_phone_region, Normalizer};
use tandem_core::{Identifier, LogPosition, Profile, ProfileId};
use tandem_store::browse::{self, BrowseError, ProfileQuery};
use tandem_store::{HistoryRecord, Membership, Store, StoreError, StoredComputedTrait, TimelineCursor};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/profiles", get(find_profile))
        .route("/api/v1/profiles/{id}", get(get_profile))
        .route("/api/v1/profiles/{id}/events", get(profile_events))
        .route("/api/v1/profiles/{id}/identities", get(profile_identities))
}

pub fn format_ms(ms: i64) -> Value {
    chrono::DateTime::from_timestamp_millis(ms).map(format_timestamp).map_or(Value::Null, Value::String)
}

/// A profile as the API and the CLI show it.
pub fn profile_json(profile: &Profile) -> Value {
    json!({
        "id": profile.id,
        "identifiers": profile.identifiers,
        "traits": profile.traits,
        "groups": profile.groups,
        "first_seen": format_ms(profile.first_seen_ms),
        "last_seen": format_ms(profile.last_seen_ms),
        "event_counts": profile.event_counts,
    })
}

/// A profile with what its endpoint shows beside it: its current audience
/// memberships and its computed traits.
struct ProfileView {
    profile: Profile,
    memberships: Vec<Membership>,
    computed: Vec<StoredComputedTrait>,
}

impl ProfileView {
    /// What the endpoint shows beside `profile`, read from `store` (in the
    /// same call on the blocking pool as the profile itself).
    fn read(store: &dyn Store, profile: Option<Profile>) -> Result<Option<ProfileView>, StoreError> {
        let Some(profile) = profile else { return Ok(None) };
        let memberships = store.profile_audiences(profile.id)?;
        let computed = store.computed_trait_states(&[profile.id])?;
        Ok(Some(ProfileView { profile, memberships, computed }))
    }

    /// [`profile_json`] with `audiences` (name and `entered_at`) and
    /// `computed_traits` (name to value, as the audience stage last computed
    /// them; a trait with no value is left out).
    fn into_json(self) -> Value {
        let mut body = profile_json(&self.profile);
        body["audiences"] = self
            .memberships
            .iter()
            .map(|membership| json!({"name": membership.audience, "entered_at": format_ms(membership.entered_at_ms)}))
            .collect();
        let computed: std::collections::BTreeMap<String, Value> =
            self.computed.into_iter().filter_map(|stored| Some((stored.name, stored.value?))).collect();
        body["computed_traits"] = json!(computed);
        body
    }
}

/// One identity-history entry, with the message id of the event behind it.
pub fn history_json(store: &dyn Store, record: &HistoryRecord) -> Result<Value, StoreError> {
    let message_id = match record.position {
        Some(position) => store
            .read_log(LogPosition(position.0 - 1), 1)?
            .into_iter()
            .next()
            .filter(|entry| entry.position == position)
            .map(|entry| entry.message_id.to_string()),
        None => None,
    };
    let mut value = serde_json::to_value(&record.change).unwrap_or(Value::Null);
    value["position"] = json!(record.position);
    value["message_id"] = json!(message_id);
    value["recorded_at"] = format_ms(record.recorded_at_ms);
    Ok(value)
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::ProfileNotFound, format!("no profile {id}")).with_field("id")
}

fn storage_error(error: StoreError) -> ApiError {
    tracing::error!(%error, "profile read failed");
    ApiError::unavailable()
}

/// Runs a read on the blocking pool.
pub(crate) async fn read<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || work(store.as_ref()))
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
        .map_err(storage_error)
}

async fn load_profile(state: &AppState, id: &str) -> Result<Profile, ApiError> {
    let profile_id: ProfileId = id.parse().map_err(|_| not_found(id))?;
    read(state, move |store| store.profile(profile_id)).await?.ok_or_else(|| not_found(id))
}

/// Profiles per page of a listing, unless `limit` says otherwise.
const DEFAULT_PROFILE_PAGE: usize = 50;

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidValue, message).with_field(field)
}

/// Parses `type:value` exactly as an event's identifier is normalized,
/// with the identity rules' phone region.
fn parse_identifier(normalizer: &Normalizer, field: &str, text: &str) -> Result<Identifier, ApiError> {
    normalizer
        .parse(text)
        .map_err(|error| ApiError::new(ErrorCode::InvalidIdentifier, error.to_string()).with_field(field))
}

/// `GET /api/v1/profiles`: with `identifier=type:value` the one profile
/// holding it; otherwise a page of profiles, by id, optionally only those
/// holding an identifier starting with `search=type:prefix` and having every
/// `trait=key:value`; `after` continues from `next_after`.
async fn find_profile(
    State(state): State<AppState>,
    token: AdminToken,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|_| ApiError::new(ErrorCode::InvalidRequest, "the query string is malformed").with_field("query"))?;
    let mut query = ProfileQuery::default();
    let (mut identifier, mut limit) = (None, DEFAULT_PROFILE_PAGE);
    for (key, value) in pairs {
        let repeated = || invalid(&key, format!("{key} is given twice"));
        match key.as_str() {
            "identifier" if identifier.is_some() => return Err(repeated()),
            "identifier" => identifier = Some(value),
            "search" if query.identifier_prefix.is_some() => return Err(repeated()),
            "search" => {
                query.identifier_prefix = Some(browse::parse_identifier_prefix(&value).ok_or_else(|| {
                    ApiError::new(ErrorCode::InvalidIdentifier, "search must be type:prefix").with_field("search")
                })?)
            }
            "trait" => {
                let (name, wanted) =
                    value.split_once(':').ok_or_else(|| invalid("trait", "trait must be name:value"))?;
                query.traits.push((name.trim().to_owned(), wanted.trim().to_owned()));
            }
            "after" => query.after = Some(value),
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=MAX_PAGE).contains(limit))
                    .ok_or_else(|| invalid("limit", format!("limit must be between 1 and {MAX_PAGE}")))?;
            }
            _ => return Err(invalid(&key, format!("unknown parameter {key}"))),
        }
    }
    if let Some(text) = identifier {
        let normalizer = if needs_phone_region(&text) {
            read(&state, |store| store.identity_rules()).await?.normalizer().unwrap_or_default()
        } else {
            Normalizer::default()
        };
        let identifier = parse_identifier(&normalizer, "identifier", &text)?;
        let shown = identifier.to_string();
        let view = read(&state, move |store| ProfileView::read(store, store.profile_by_identifier(&identifier)?))
            .await?
            .ok_or_else(|| {
                ApiError::new(ErrorCode::ProfileNotFound, format!("no profile holds {shown}")).with_field("identifier")
            })?;
        read_in_clear(&state, &token, "profile.read", &view.profile).await;
        return Ok(Json(crate::pii::shown_to(&token, &state.pii.current(), view.into_json())));
    }
    let store = state.store.clone();
    let page = tokio::task::spawn_blocking(move || {
        browse::find_profiles(store.as_ref(), &query, limit, browse::DEFAULT_SCAN_BUDGET)
    })
    .await
    .map_err(|_| ApiError::new(ErrorCode::Internal, "internal error"))?
    .map_err(|error| match error {
        BrowseError::InvalidCursor(_) => invalid("after", error.to_string()),
        BrowseError::Store(error) => storage_error(error),
    })?;
    if token.sees_pii() && !page.profiles.is_empty() {
        let ids: Vec<String> = page.profiles.iter().map(|profile| profile.id.to_string()).collect();
        crate::audit::record(
            &state,
            &token,
            "profile.list",
            &format!("{} profiles", ids.len()),
            None,
            Some(json!({"profiles": ids})),
        )
        .await;
    }
    let profiles: Vec<Value> = page.profiles.iter().map(profile_json).collect();
    Ok(Json(crate::pii::shown_to(
        &token,
        &state.pii.current(),
        json!({"profiles": profiles, "next_after": page.next_after}),
    )))
}

/// Records a read of one profile's PII in clear, for callers who see it so.
async fn read_in_clear(state: &AppState, token: &AdminToken, action: &str, profile: &Profile) {
    if token.sees_pii() {
        crate::audit::record(state, token, action, &profile.id.to_string(), None, None).await;
    }
}

async fn get_profile(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let profile_id: ProfileId = id.parse().map_err(|_| not_found(&id))?;
    let view = read(&state, move |store| ProfileView::read(store, store.profile(profile_id)?))
        .await?
        .ok_or_else(|| not_found(&id))?;
    read_in_clear(&state, &token, "profile.read", &view.profile).await;
    Ok(Json(crate::pii::shown_to(&token, &state.pii.current(), view.into_json())))
}

/// The query of `GET /api/v1/profiles/{id}/events`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Events per page (1 to 1000; 50 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// A `next_before` from the previous page.
    before: Option<String>,
}

/// The query of `GET /api/v1/profiles`, for the document: [`find_profile`]
/// reads the pairs itself, since `trait` may repeat and every unknown or
/// repeated parameter is named in its error.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct ProfileListQuery {
    /// Look one profile up: the `type:value` of an identifier it holds
    /// (needs only `profiles:lookup`); the other parameters then do not apply.
    identifier: Option<String>,
    /// Only profiles holding an identifier starting so: `type:prefix`.
    search: Option<String>,
    /// Only profiles with this trait value, `name:value` (text ignores case); may repeat.
    #[param(rename = "trait")]
    traits: Option<Vec<String>>,
    /// A `next_after` from the previous page.
    after: Option<String>,
    /// Profiles per page (1 to 1000; 50 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

const MAX_PAGE: usize = 1_000;

async fn profile_events(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::new(ErrorCode::InvalidValue, format!("limit must be between 1 and {MAX_PAGE}"))
            .with_field("limit"));
    }
    let before = match query.before.as_deref().map(str::parse::<TimelineCursor>).transpose() {
        Ok(before) => before,
        Err(error) => return Err(ApiError::new(ErrorCode::InvalidValue, error.to_string()).with_field("before")),
    };
    let profile = load_profile(&state, &id).await?;
    read_in_clear(&state, &token, "profile.read_events", &profile).await;
    let entries = read(&state, move |store| store.profile_events(profile.id, before, limit)).await?;
    let next_before =
        (entries.len() == limit).then(|| entries.last().map(|entry| TimelineCursor::at(entry).to_string())).flatten();
    let events: Vec<Value> = entries
        .into_iter()
        .map(|entry| {
            let mut event: Value = serde_json::from_str(&entry.payload).unwrap_or(Value::Null);
            event["position"] = json!(entry.position);
            event
        })
        .collect();
    let body = json!({"profile": profile.id, "events": events, "next_before": next_before});
    Ok(Json(crate::pii::shown_to(&token, &state.pii.current(), body)))
}

async fn profile_identities(
    State(state): State<AppState>,
    token: AdminToken,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let profile = load_profile(&state, &id).await?;
    read_in_clear(&state, &token, "profile.read_identities", &profile).await;
    let profile_id = profile.id;
    let history = read(&state, move |store| {
        store
            .identity_history(profile_id)?
            .iter()
            .map(|record| history_json(store, record))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let body = json!({"id": profile.id, "identifiers": profile.identifiers, "history": history});
    Ok(Json(crate::pii::shown_to(&token, &state.pii.current(), body)))
}
