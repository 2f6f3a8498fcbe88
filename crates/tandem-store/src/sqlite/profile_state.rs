//! The embedded store's reading of a profile's state (`profiles.state`):
//! the compact record of [`tandem_core::profile_record`].
//!
//! At a million profiles the resolver rewrites each touched profile's row on
//! a page spread over the whole table, and every dirty page is written to
//! the WAL and again by the checkpoint: fewer bytes per row means fewer
//! pages in the table, so fewer pages per commit, and less to serialize.
//! Rows written before this encoding hold the profile's JSON as TEXT and
//! keep being read ([`decode`] looks at the column's type); a profile is
//! rewritten in the new encoding the next time the resolver changes it.

use crate::StoreError;
use tandem_core::profile_record::{decode_record, ProfileRecordError};
use tandem_core::Profile;

/// A stored state that cannot be read back as a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileStateError {
    #[error(transparent)]
    Record(#[from] ProfileRecordError),
    #[error("the profile's JSON is unreadable: {0}")]
    LegacyJson(serde_json::Error),
}

impl From<ProfileStateError> for StoreError {
    fn from(error: ProfileStateError) -> Self {
        StoreError::Backend(Box::new(error))
    }
}

/// A profile from the `state` column, whichever encoding wrote it: a BLOB
/// is a compact record, TEXT is the JSON rows written before it.
pub fn decode(state: rusqlite::types::ValueRef<'_>) -> Result<Profile, StoreError> {
    use rusqlite::types::ValueRef;
    match state {
        ValueRef::Blob(bytes) => Ok(decode_record(bytes).map_err(ProfileStateError::Record)?),
        ValueRef::Text(text) => Ok(serde_json::from_slice(text).map_err(ProfileStateError::LegacyJson)?),
        other => Err(StoreError::Backend(
            format!("a profile's state is stored as {:?}, not a record", other.data_type()).into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::{Identifier, ProfileId};

    fn sample() -> Profile {
        let mut profile = Profile::new(ProfileId(7));
        profile.identifiers = vec![Identifier::new("user_id", "ann"), Identifier::new("loyalty_card", "LC-9")];
        profile.traits = serde_json::from_str(r#"{"plan": "pro"}"#).unwrap();
        profile.event_counts.insert("track".into(), 3);
        profile
    }

    #[test]
    fn both_column_types_decode() {
        use rusqlite::types::ValueRef;
        let profile = sample();
        let json = serde_json::to_string(&profile).unwrap();
        assert_eq!(decode(ValueRef::Text(json.as_bytes())).unwrap(), profile);
        let record = tandem_core::profile_record::encode(&profile);
        assert_eq!(decode(ValueRef::Blob(&record)).unwrap(), profile);
        assert!(decode(ValueRef::Integer(3)).is_err());
        assert!(decode(ValueRef::Text(b"{not json")).is_err());
    }
}
