//! A unified customer profile: the identifiers resolved to one person, their
//! traits (newest event wins per trait), the accounts they belong to, when
//! they were first and last seen, and how many events of each type they sent.

use crate::event::{Event, EventType};
use crate::identity::Identifier;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A profile's id. Ids are handed out in the order profiles are created, so
/// the older of two profiles has the smaller id; shown as `prof_N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ProfileId(pub u64);

impl fmt::Display for ProfileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("prof_{}", self.0))
    }
}

impl From<ProfileId> for String {
    fn from(id: ProfileId) -> String {
        id.to_string()
    }
}

/// The text is not a profile id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a profile id (prof_N)")]
pub struct MalformedProfileId(pub String);

impl FromStr for ProfileId {
    type Err = MalformedProfileId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.strip_prefix("prof_")
            .and_then(|number| number.parse().ok())
            .map(ProfileId)
            .ok_or_else(|| MalformedProfileId(text.to_owned()))
    }
}

impl TryFrom<String> for ProfileId {
    type Error = MalformedProfileId;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

/// When a value was set: the event's timestamp, then its log position to
/// break ties, so the outcome never depends on the order of processing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    pub timestamp_ms: i64,
    pub position: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub id: ProfileId,
    /// Every identifier, in the order they joined the profile.
    pub identifiers: Vec<Identifier>,
    pub traits: Map<String, Value>,
    /// When each trait was last set.
    pub trait_stamps: BTreeMap<String, Stamp>,
    /// Accounts (`group` calls) by group id, with their traits.
    pub groups: BTreeMap<String, Map<String, Value>>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub event_counts: BTreeMap<String, u64>,
}

impl Profile {
    pub fn new(id: ProfileId) -> Profile {
        Profile {
            id,
            identifiers: Vec::new(),
            traits: Map::new(),
            trait_stamps: BTreeMap::new(),
            groups: BTreeMap::new(),
            first_seen_ms: i64::MAX,
            last_seen_ms: i64::MIN,
            event_counts: BTreeMap::new(),
        }
    }

    pub fn count_of(&self, kind: &str) -> usize {
        self.identifiers.iter().filter(|identifier| identifier.kind == kind).count()
    }

    /// Takes in what one event says about this person.
    pub fn observe(&mut self, event: &Event, position: u64) {
        let stamp = Stamp { timestamp_ms: event.timestamp.timestamp_millis(), position };
        self.first_seen_ms = self.first_seen_ms.min(stamp.timestamp_ms);
        self.last_seen_ms = self.last_seen_ms.max(stamp.timestamp_ms);
        *self.event_counts.entry(event.event_type.as_str().to_owned()).or_default() += 1;
        // An identify call's own `traits` are what the caller meant to set:
        // they go first, and a `context.traits` value for the same key, with
        // the same stamp, does not replace them.
        if let (EventType::Identify, Some(traits)) = (event.event_type, &event.traits) {
            self.set_traits(traits, stamp);
        }
        if let Some(Value::Object(traits)) = event.context.get("traits") {
            self.set_traits(traits, stamp);
        }
        if let (EventType::Group, Some(group_id)) = (event.event_type, &event.group_id) {
            let group = self.groups.entry(group_id.clone()).or_default();
            for (key, value) in event.traits.iter().flatten() {
                group.insert(key.clone(), value.clone());
            }
        }
    }

    /// Sets each trait unless a value with the same or a newer stamp is held.
    fn set_traits(&mut self, traits: &Map<String, Value>, stamp: Stamp) {
        for (key, value) in traits {
            let newer = self.trait_stamps.get(key).is_none_or(|current| stamp > *current);
            if newer {
                self.traits.insert(key.clone(), value.clone());
                self.trait_stamps.insert(key.clone(), stamp);
            }
        }
    }

    /// Takes in a profile merged into this one: identifiers joined, the newer
    /// value of each trait, counts added, the wider seen range.
    pub fn absorb(&mut self, other: Profile) {
        for identifier in other.identifiers {
            if !self.identifiers.contains(&identifier) {
                self.identifiers.push(identifier);
            }
        }
        for (key, stamp) in other.trait_stamps {
            let newer = self.trait_stamps.get(&key).is_none_or(|current| stamp > *current);
            if newer {
                if let Some(value) = other.traits.get(&key) {
                    self.traits.insert(key.clone(), value.clone());
                }
                self.trait_stamps.insert(key, stamp);
            }
        }
        for (group_id, traits) in other.groups {
            let group = self.groups.entry(group_id).or_default();
            for (key, value) in traits {
                group.entry(key).or_insert(value);
            }
        }
        self.first_seen_ms = self.first_seen_ms.min(other.first_seen_ms);
        self.last_seen_ms = self.last_seen_ms.max(other.last_seen_ms);
        for (event_type, count) in other.event_counts {
            *self.event_counts.entry(event_type).or_default() += count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_ids_round_trip() {
        assert_eq!("prof_42".parse(), Ok(ProfileId(42)));
        assert_eq!(ProfileId(42).to_string(), "prof_42");
        assert!("42".parse::<ProfileId>().is_err());
        assert_eq!(serde_json::to_string(&ProfileId(7)).unwrap(), "\"prof_7\"");
    }

    #[test]
    fn the_newest_trait_wins_in_a_merge_whatever_the_order() {
        let mut older = Profile::new(ProfileId(1));
        older.set_traits(
            &serde_json::from_str(r#"{"plan": "free", "city": "Oslo"}"#).unwrap(),
            Stamp { timestamp_ms: 10, position: 1 },
        );
        let mut newer = Profile::new(ProfileId(2));
        newer.set_traits(&serde_json::from_str(r#"{"plan": "pro"}"#).unwrap(), Stamp { timestamp_ms: 20, position: 2 });
        let mut first = older.clone();
        first.absorb(newer.clone());
        let mut second = newer;
        second.absorb(older);
        assert_eq!(first.traits, second.traits);
        assert_eq!(first.traits["plan"], "pro");
        assert_eq!(first.traits["city"], "Oslo");
    }

    /// Regression: in an identify call a `context.traits` value beat the
    /// call's own `traits` value for the same key.
    #[test]
    fn regression_an_identify_calls_own_traits_beat_its_context_traits() {
        use crate::collect::{normalize_message, BatchDefaults, IdRequirement, RequestContext};
        let source = crate::SourceId::new("src");
        let received_at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let request =
            RequestContext { source_id: &source, received_at, client_ip: None, ids: IdRequirement::UserOrAnonymousId };
        let message = serde_json::json!({
            "type": "identify", "userId": "ann",
            "traits": {"plan": "pro"},
            "context": {"traits": {"plan": "free", "city": "Oslo"}}
        });
        let serde_json::Value::Object(message) = message else { unreachable!() };
        let event = normalize_message(message, None, &BatchDefaults::default(), &request).unwrap();
        let mut profile = Profile::new(ProfileId(1));
        profile.observe(&event, 1);
        assert_eq!(profile.traits["plan"], "pro");
        assert_eq!(profile.traits["city"], "Oslo", "context traits still fill keys the call did not set");
    }
}
