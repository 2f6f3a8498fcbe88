//! Browsing for people: the event log filtered by source, type, time, event
//! name and user, newest or oldest first, and profiles listed or searched by
//! identifier prefix and by trait, a page at a time. Written once over the
//! storage interfaces ([`EventLog`], [`IdentityStore`]), so every backend browses alike: storage filters what
//! it can index ([`LogFilter`], profile ids, the identifier index), and the
//! rest is checked here in Rust — profiles are decoded by the store's own
//! profile reader and their traits compared here, never by querying the
//! stored format.
//!
//! Each call reads at most a scan budget of rows, so a search that matches
//! little answers promptly with a cursor to continue from.

use crate::{EventLog, IdentityStore, LogEntry, LogFilter, StoreError};
use serde_json::Value;
use std::collections::HashSet;
use tandem_core::{Identifier, LogPosition, Profile, ProfileId};

/// Rows one call reads from storage at most, unless told otherwise.
pub const DEFAULT_SCAN_BUDGET: usize = 20_000;
/// Rows asked of storage at a time.
const CHUNK: usize = 500;

/// A browsing request that cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    #[error("cursor {0:?} is not one this listing gave (a profile id such as prof_42)")]
    InvalidCursor(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which events to list: what storage filters, plus the event name (`event`
/// of a track, `name` of a page or screen) and the user (`userId` or
/// `anonymousId`), compared exactly.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    pub filter: LogFilter,
    pub event_name: Option<String>,
    pub user: Option<String>,
}

impl EventQuery {
    /// Whether an event passes the filters storage does not apply.
    pub fn matches(&self, entry: &LogEntry) -> bool {
        if self.event_name.is_none() && self.user.is_none() {
            return true;
        }
        let Ok(event) = serde_json::from_str::<Value>(&entry.payload) else { return false };
        let text = |key: &str| event.get(key).and_then(Value::as_str);
        let name_matches =
            self.event_name.as_deref().is_none_or(|wanted| text("event").or_else(|| text("name")) == Some(wanted));
        let user_matches = self
            .user
            .as_deref()
            .is_none_or(|wanted| text("userId") == Some(wanted) || text("anonymousId") == Some(wanted));
        name_matches && user_matches
    }
}

/// A page of events and where the next one starts.
#[derive(Clone, Debug, Default)]
pub struct EventPage {
    pub events: Vec<LogEntry>,
    /// The position to continue from (as `after` oldest first, as `before`
    /// newest first); `None` when the log holds no more matches.
    pub next: Option<LogPosition>,
}

/// Up to `limit` events matching `query`, reading at most `scan_budget` rows.
pub fn find_events(
    store: &(impl EventLog + ?Sized),
    query: &EventQuery,
    limit: usize,
    scan_budget: usize,
) -> Result<EventPage, StoreError> {
    let (events, next) = scan(
        limit,
        scan_budget,
        None,
        |after: Option<&LogPosition>, want| {
            let mut filter = query.filter.clone();
            if let Some(position) = after {
                if filter.newest_first {
                    filter.before = Some(*position);
                } else {
                    filter.after = Some(*position);
                }
            }
            store.filter_log(&filter, want)
        },
        |entry| entry.position,
        |entry| Ok(query.matches(&entry).then_some(entry)),
    )?;
    Ok(EventPage { events, next })
}

/// The one paging loop of browsing: reads rows a chunk at a time from
/// `fetch(cursor, how_many)` and keeps those `keep` returns, until `limit`
/// are kept, the rows run out, or `scan_budget` rows were read. Returns what
/// was kept and the cursor of the last row read, or `None` when the rows ran
/// out.
fn scan<Row, Cursor, Kept, Error>(
    limit: usize,
    scan_budget: usize,
    mut cursor: Option<Cursor>,
    mut fetch: impl FnMut(Option<&Cursor>, usize) -> Result<Vec<Row>, Error>,
    cursor_of: impl Fn(&Row) -> Cursor,
    mut keep: impl FnMut(Row) -> Result<Option<Kept>, Error>,
) -> Result<(Vec<Kept>, Option<Cursor>), Error> {
    let mut kept = Vec::new();
    let mut scanned = 0;
    while scanned < scan_budget {
        let want = CHUNK.min(scan_budget - scanned);
        let rows = fetch(cursor.as_ref(), want)?;
        let exhausted = rows.len() < want;
        for row in rows {
            scanned += 1;
            cursor = Some(cursor_of(&row));
            if let Some(item) = keep(row)? {
                kept.push(item);
                if kept.len() == limit {
                    return Ok((kept, cursor));
                }
            }
        }
        if exhausted {
            return Ok((kept, None));
        }
    }
    Ok((kept, cursor))
}

/// Which profiles to list: all of them, or those holding an identifier of a
/// type whose value starts with a prefix; optionally only those whose traits
/// have given values (strings compared without regard to case).
#[derive(Clone, Debug, Default)]
pub struct ProfileQuery {
    /// Type and value prefix (`email:ann` finds `ann@…` and `anna@…`).
    pub identifier_prefix: Option<Identifier>,
    /// `(trait, value)` pairs a profile must all have.
    pub traits: Vec<(String, String)>,
    /// The cursor a previous page returned.
    pub after: Option<String>,
}

impl ProfileQuery {
    fn traits_match(&self, profile: &Profile) -> bool {
        self.traits.iter().all(|(key, wanted)| match profile.traits.get(key) {
            Some(Value::String(text)) => text.eq_ignore_ascii_case(wanted),
            Some(other) => serde_json::from_str::<Value>(wanted).is_ok_and(|wanted| wanted == *other),
            None => false,
        })
    }
}

/// Reads `type:prefix` for [`ProfileQuery::identifier_prefix`]. Unlike a
/// whole identifier, a prefix is not normalized for its type (half an e-mail
/// address is no address), only trimmed, with e-mail prefixes lower-cased as
/// stored e-mails are; `None` without a type.
pub fn parse_identifier_prefix(text: &str) -> Option<Identifier> {
    let (kind, prefix) = text.split_once(':')?;
    let kind = kind.trim().to_ascii_lowercase();
    if kind.is_empty() {
        return None;
    }
    let prefix = prefix.trim();
    let prefix = if kind == "email" { prefix.to_lowercase() } else { prefix.to_owned() };
    Some(Identifier::new(kind, prefix))
}

/// A page of profiles and the cursor of the next one.
#[derive(Clone, Debug, Default)]
pub struct ProfilePage {
    pub profiles: Vec<Profile>,
    /// Pass as `after` for the next page; `None` when there are no more.
    pub next_after: Option<String>,
}

/// Up to `limit` profiles matching `query`, reading at most `scan_budget` rows.
pub fn find_profiles(
    store: &(impl IdentityStore + ?Sized),
    query: &ProfileQuery,
    limit: usize,
    scan_budget: usize,
) -> Result<ProfilePage, BrowseError> {
    match &query.identifier_prefix {
        None => list_profiles(store, query, limit, scan_budget),
        Some(prefix) => search_identifiers(store, query, prefix, limit, scan_budget),
    }
}

fn list_profiles(
    store: &(impl IdentityStore + ?Sized),
    query: &ProfileQuery,
    limit: usize,
    scan_budget: usize,
) -> Result<ProfilePage, BrowseError> {
    let after = match &query.after {
        Some(cursor) => Some(cursor.parse::<ProfileId>().map_err(|_| BrowseError::InvalidCursor(cursor.clone()))?),
        None => None,
    };
    let (profiles, next) = scan(
        limit,
        scan_budget,
        after,
        |after: Option<&ProfileId>, want| store.list_profiles(after.copied(), want),
        |profile| profile.id,
        |profile| Ok::<_, StoreError>(query.traits_match(&profile).then_some(profile)),
    )?;
    Ok(ProfilePage { profiles, next_after: next.map(|id| id.to_string()) })
}

fn search_identifiers(
    store: &(impl IdentityStore + ?Sized),
    query: &ProfileQuery,
    prefix: &Identifier,
    limit: usize,
    scan_budget: usize,
) -> Result<ProfilePage, BrowseError> {
    // A profile holding several matching identifiers is listed once per page.
    let mut seen = HashSet::new();
    let (profiles, next_after) = scan(
        limit,
        scan_budget,
        query.after.clone(),
        |after: Option<&String>, want| {
            store.identifiers_with_prefix(&prefix.kind, &prefix.value, after.map(String::as_str), want)
        },
        |(identifier, _)| identifier.value.clone(),
        |(_, profile_id)| {
            if !seen.insert(profile_id) {
                return Ok(None);
            }
            Ok(store.profile(profile_id)?.filter(|profile| query.traits_match(profile)))
        },
    )?;
    Ok(ProfilePage { profiles, next_after })
}
