//! Browsing for people: the event log filtered by source, type, time, event
//! name and user, newest or oldest first, and profiles listed or searched by
//! identifier prefix and by trait, a page at a time. Written once over the
//! [`Store`] interface, so every backend browses alike: storage filters what
//! it can index ([`LogFilter`], profile ids, the identifier index), and the
//! rest is checked here in Rust — profiles are decoded by the store's own
//! profile reader and their traits compared here, never by querying the
//! stored format.
//!
//! Each call reads at most a scan budget of rows, so a search that matches
//! little answers promptly with a cursor to continue from.

use crate::{LogEntry, LogFilter, Store, StoreError};
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
    store: &(impl Store + ?Sized),
    query: &EventQuery,
    limit: usize,
    scan_budget: usize,
) -> Result<EventPage, StoreError> {
    let mut filter = query.filter.clone();
    let mut page = EventPage::default();
    let mut scanned = 0;
    while page.events.len() < limit {
        if scanned >= scan_budget {
            return Ok(page);
        }
        let chunk = store.filter_log(&filter, CHUNK.min(scan_budget - scanned).max(1))?;
        let exhausted = chunk.len() < CHUNK.min(scan_budget - scanned).max(1);
        for entry in chunk {
            scanned += 1;
            let position = entry.position;
            if filter.newest_first {
                filter.before = Some(position);
            } else {
                filter.after = Some(position);
            }
            page.next = Some(position);
            if query.matches(&entry) {
                page.events.push(entry);
                if page.events.len() == limit {
                    return Ok(page);
                }
            }
        }
        if exhausted {
            page.next = None;
            return Ok(page);
        }
    }
    Ok(page)
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
    store: &(impl Store + ?Sized),
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
    store: &(impl Store + ?Sized),
    query: &ProfileQuery,
    limit: usize,
    scan_budget: usize,
) -> Result<ProfilePage, BrowseError> {
    let mut after = match &query.after {
        Some(cursor) => Some(cursor.parse::<ProfileId>().map_err(|_| BrowseError::InvalidCursor(cursor.clone()))?),
        None => None,
    };
    let mut page = ProfilePage::default();
    let mut scanned = 0;
    while scanned < scan_budget {
        let want = CHUNK.min(scan_budget - scanned);
        let chunk = store.list_profiles(after, want)?;
        let exhausted = chunk.len() < want;
        for profile in chunk {
            scanned += 1;
            after = Some(profile.id);
            if query.traits_match(&profile) {
                page.profiles.push(profile);
                if page.profiles.len() == limit {
                    page.next_after = after.map(|id| id.to_string());
                    return Ok(page);
                }
            }
        }
        if exhausted {
            return Ok(page);
        }
    }
    page.next_after = after.map(|id| id.to_string());
    Ok(page)
}

fn search_identifiers(
    store: &(impl Store + ?Sized),
    query: &ProfileQuery,
    prefix: &Identifier,
    limit: usize,
    scan_budget: usize,
) -> Result<ProfilePage, BrowseError> {
    let mut after = query.after.clone();
    let mut page = ProfilePage::default();
    // A profile holding several matching identifiers is listed once per page.
    let mut seen = HashSet::new();
    let mut scanned = 0;
    while scanned < scan_budget {
        let want = CHUNK.min(scan_budget - scanned);
        let chunk = store.identifiers_with_prefix(&prefix.kind, &prefix.value, after.as_deref(), want)?;
        let exhausted = chunk.len() < want;
        for (identifier, profile_id) in chunk {
            scanned += 1;
            after = Some(identifier.value);
            if !seen.insert(profile_id) {
                continue;
            }
            let Some(profile) = store.profile(profile_id)? else { continue };
            if query.traits_match(&profile) {
                page.profiles.push(profile);
                if page.profiles.len() == limit {
                    page.next_after = after;
                    return Ok(page);
                }
            }
        }
        if exhausted {
            return Ok(page);
        }
    }
    page.next_after = after;
    Ok(page)
}
