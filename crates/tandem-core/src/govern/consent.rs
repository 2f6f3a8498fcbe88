//! Consent: the categories a person agreed to, as Segment's
//! `context.consent.categoryPreferences` (`{category: bool}`) carries them,
//! and the rule deciding whether a destination may receive something about
//! that person.
//!
//! A destination names the categories it needs (`consent_categories`); it
//! receives an event or an audience change only when the person consented
//! to every one of them. What the person said last about a category counts,
//! whether or not the event at hand carries a consent object; a category
//! the person never spoke about follows the configured default.

use crate::event::Event;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// What counts for a category the person never spoke about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentDefault {
    /// Assume consent (an opt-out regime).
    #[default]
    Grant,
    /// Assume none (an opt-in regime).
    Deny,
}

impl ConsentDefault {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentDefault::Grant => "grant",
            ConsentDefault::Deny => "deny",
        }
    }
}

impl fmt::Display for ConsentDefault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text is neither `grant` nor `deny`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("consent_default must be grant or deny, got {0:?}")]
pub struct UnknownConsentDefault(pub String);

impl FromStr for ConsentDefault {
    type Err = UnknownConsentDefault;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "grant" => Ok(ConsentDefault::Grant),
            "deny" => Ok(ConsentDefault::Deny),
            other => Err(UnknownConsentDefault(other.to_owned())),
        }
    }
}

/// A person's consent: category → granted.
pub type Consent = BTreeMap<String, bool>;

/// The categories an event states, from `context.consent.categoryPreferences`;
/// `None` when it has no consent object. Values that are not booleans are
/// ignored.
pub fn stated_consent(event: &Event) -> Option<Consent> {
    let preferences = event.context.get("consent")?.get("categoryPreferences")?.as_object()?;
    Some(preferences.iter().filter_map(|(category, granted)| Some((category.clone(), granted.as_bool()?))).collect())
}

/// The categories a stored event (its log payload) states; `None` when it
/// has no consent object. Reads the JSON only when the text mentions consent.
pub fn stated_consent_in_payload(payload: &str) -> Option<Consent> {
    if !payload.contains("\"categoryPreferences\"") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(payload).ok()?;
    let preferences = value.get("context")?.get("consent")?.get("categoryPreferences")?.as_object()?;
    Some(preferences.iter().filter_map(|(category, granted)| Some((category.clone(), granted.as_bool()?))).collect())
}

/// Whether `category` is granted under `consent`.
pub fn is_granted(consent: Option<&Consent>, category: &str, default: ConsentDefault) -> bool {
    match consent.and_then(|consent| consent.get(category)) {
        Some(granted) => *granted,
        None => default == ConsentDefault::Grant,
    }
}

/// The categories of `required` the person has not granted, in order; empty
/// when the destination may receive.
pub fn withheld_categories<'a>(
    consent: Option<&Consent>,
    required: &'a [String],
    default: ConsentDefault,
) -> Vec<&'a str> {
    required.iter().filter(|category| !is_granted(consent, category, default)).map(String::as_str).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(context: serde_json::Value) -> Event {
        serde_json::from_value(json!({
            "messageId": "m1", "type": "track", "userId": "u1", "event": "E", "context": context,
            "timestamp": "2026-01-01T00:00:00.000Z", "receivedAt": "2026-01-01T00:00:00.000Z", "sourceId": "src_1",
        }))
        .unwrap()
    }

    #[test]
    fn consent_is_read_from_segments_category_preferences() {
        let stated = stated_consent(&event(
            json!({"consent": {"categoryPreferences": {"marketing": true, "ads": false, "odd": "yes"}}}),
        ))
        .unwrap();
        assert_eq!(stated, Consent::from([("ads".into(), false), ("marketing".into(), true)]));
        assert_eq!(stated_consent(&event(json!({}))), None);
    }

    #[test]
    fn every_required_category_must_be_granted_and_unknown_ones_follow_the_default() {
        let consent = Consent::from([("marketing".into(), true), ("ads".into(), false)]);
        let required = vec!["marketing".to_owned(), "ads".to_owned(), "analytics".to_owned()];
        assert_eq!(withheld_categories(Some(&consent), &required, ConsentDefault::Grant), vec!["ads"]);
        assert_eq!(withheld_categories(Some(&consent), &required, ConsentDefault::Deny), vec!["ads", "analytics"]);
        assert!(withheld_categories(None, &required[..1], ConsentDefault::Grant).is_empty());
        assert!(withheld_categories(None, &[], ConsentDefault::Deny).is_empty());
        assert_eq!("deny".parse::<ConsentDefault>().unwrap(), ConsentDefault::Deny);
        assert!("maybe".parse::<ConsentDefault>().is_err());
    }
}
