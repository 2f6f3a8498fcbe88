//! Sources: the channels events arrive through (website, app, backend, import,
//! webhook), each with its own write key.

use crate::ids::{SourceId, WriteKey};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What kind of channel a source is; it decides nothing yet but tells people
/// where the data comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Website,
    App,
    Backend,
    Import,
    Webhook,
}

impl SourceKind {
    pub const ALL: [SourceKind; 5] =
        [SourceKind::Website, SourceKind::App, SourceKind::Backend, SourceKind::Import, SourceKind::Webhook];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Website => "website",
            SourceKind::App => "app",
            SourceKind::Backend => "backend",
            SourceKind::Import => "import",
            SourceKind::Webhook => "webhook",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for SourceKind {
    type Err = SourceError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        SourceKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == value)
            .ok_or_else(|| SourceError::UnknownKind(value.to_owned()))
    }
}

/// A registered source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub id: SourceId,
    pub name: String,
    pub kind: SourceKind,
    pub write_key: WriteKey,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

/// A source definition that breaks a rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("source name must not be empty")]
    EmptyName,
    #[error("source name must be at most {MAX_SOURCE_NAME_CHARS} characters")]
    NameTooLong,
    #[error("source kind {0:?} is not one of website, app, backend, import, webhook")]
    UnknownKind(String),
}

pub const MAX_SOURCE_NAME_CHARS: usize = 100;

/// Checks a source name and returns it trimmed.
pub fn validate_source_name(name: &str) -> Result<&str, SourceError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(SourceError::EmptyName);
    }
    if name.chars().count() > MAX_SOURCE_NAME_CHARS {
        return Err(SourceError::NameTooLong);
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(validate_source_name("  website "), Ok("website"));
        assert_eq!(validate_source_name("   "), Err(SourceError::EmptyName));
        assert_eq!(validate_source_name(&"n".repeat(101)), Err(SourceError::NameTooLong));
    }

    #[test]
    fn kinds_parse_from_their_names() {
        for kind in SourceKind::ALL {
            assert_eq!(kind.as_str().parse::<SourceKind>(), Ok(kind));
        }
        assert!(matches!("crm".parse::<SourceKind>(), Err(SourceError::UnknownKind(_))));
    }
}
