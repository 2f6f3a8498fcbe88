//! Data subject requests: what a person may ask (access, delete, suppress,
//! unsuppress), a request's status, and the digests that let Tandem
//! remember whom a request was about, and whom to refuse at ingestion,
//! without keeping the identifier itself.

use crate::identity::Identifier;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// What a person asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum DsrKind {
    /// Everything kept about the person, as JSON.
    Access,
    /// Remove the person from every table.
    Delete,
    /// Refuse future events carrying the identifier.
    Suppress,
    /// Accept them again.
    Unsuppress,
}

impl DsrKind {
    pub const ALL: [DsrKind; 4] = [DsrKind::Access, DsrKind::Delete, DsrKind::Suppress, DsrKind::Unsuppress];

    pub fn as_str(self) -> &'static str {
        match self {
            DsrKind::Access => "access",
            DsrKind::Delete => "delete",
            DsrKind::Suppress => "suppress",
            DsrKind::Unsuppress => "unsuppress",
        }
    }
}

impl fmt::Display for DsrKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The text names no request kind.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown request kind {0:?}, use access, delete, suppress or unsuppress")]
pub struct UnknownDsrKind(pub String);

impl FromStr for DsrKind {
    type Err = UnknownDsrKind;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        DsrKind::ALL.into_iter().find(|kind| kind.as_str() == value).ok_or_else(|| UnknownDsrKind(value.to_owned()))
    }
}

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DsrStatus {
    Pending,
    Done,
    Failed,
}

impl DsrStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DsrStatus::Pending => "pending",
            DsrStatus::Done => "done",
            DsrStatus::Failed => "failed",
        }
    }

    /// The status stored as text; unknown text reads as failed.
    pub fn from_text(text: &str) -> DsrStatus {
        match text {
            "pending" => DsrStatus::Pending,
            "done" => DsrStatus::Done,
            _ => DsrStatus::Failed,
        }
    }
}

/// The SHA-256 of a normalized `type:value`, in hex: how requests and
/// suppressions name a person without keeping the identifier.
pub fn identifier_digest(identifier: &Identifier) -> String {
    hex_sha256(identifier.to_string().as_bytes())
}

/// The SHA-256 of a payload, in hex, as `sha256:…`: what the quarantine keeps
/// of a suppressed message instead of the message.
pub fn payload_digest(payload: &[u8]) -> String {
    format!("sha256:{}", hex_sha256(payload))
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_of_the_normalized_identifier() {
        let a: Identifier = "email:Ann@Example.com ".parse().unwrap();
        let b: Identifier = "email:ann@example.com".parse().unwrap();
        assert_eq!(identifier_digest(&a), identifier_digest(&b));
        assert_eq!(identifier_digest(&a).len(), 64);
        assert!(!identifier_digest(&a).contains("ann"));
        assert!(payload_digest(b"x").starts_with("sha256:"));
        assert_eq!("delete".parse::<DsrKind>().unwrap(), DsrKind::Delete);
        assert!("erase".parse::<DsrKind>().is_err());
        assert_eq!(DsrStatus::from_text(DsrStatus::Done.as_str()), DsrStatus::Done);
    }
}
