//! A profile's compact binary record, about a third the size of its JSON.
//! The embedded store keeps each profile's
//! state in this form (`profiles.state`), and the resolver keeps profiles it
//! dropped from its working set in this form too, so a bounded memory holds
//! several times more of the customer base.
//!
//! At a million profiles the resolver rewrites each touched profile's row on
//! a page spread over the whole table, and every dirty page is written to
//! the WAL and again by the checkpoint: fewer bytes per row means fewer
//! pages in the table, so fewer pages per commit, and less to serialize.
//!
//! Layout (integers are LEB128 varints, signed ones zigzag-encoded; a
//! "word" is either a dictionary index of a common identifier type or
//! event type, or a length-prefixed UTF-8 string):
//!
//! ```text
//! FORMAT_V1, id, identifier count, (type word, value string)*,
//! traits (JSON object text, empty for none), first_seen_ms,
//! last_seen_ms - first_seen_ms, stamp count,
//! (key: trait index + 1 or 0 then string, timestamp - first_seen_ms, position)*,
//! groups (JSON object text, empty for none), count of event types, (type word, count)*
//! ```
//!
//! Trait values and groups stay JSON inside the record: they are arbitrary
//! JSON, and serde_json is both the fastest and the exact way to keep them.
//! Differences of timestamps are taken with wrapping arithmetic, so every
//! `i64` (the `i64::MAX`/`i64::MIN` of a profile that saw no event included)
//! round-trips.

use crate::identity::Identifier;
use crate::profile::{Profile, ProfileId, Stamp};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The first byte of a record in this encoding (JSON rows are TEXT and
/// start with `{`).
const FORMAT_V1: u8 = 1;

/// Words stored as a one-byte index: identifier types and event types.
const DICTIONARY: [&str; 12] = [
    crate::identity::USER_ID,
    crate::identity::ANONYMOUS_ID,
    crate::identity::EMAIL,
    crate::identity::PHONE,
    crate::identity::DEVICE_ID,
    crate::identity::ADVERTISING_ID,
    "identify",
    "track",
    "page",
    "screen",
    "group",
    "alias",
];

/// A stored state that cannot be read back as a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileRecordError {
    #[error("the profile record ends early")]
    Truncated,
    #[error("the profile record has an unknown format {0}")]
    UnknownFormat(u8),
    #[error("the profile record has an unknown word {0}")]
    UnknownWord(u64),
    #[error("the profile record holds text that is not UTF-8")]
    NotText,
    #[error("the profile record's {0} are not a JSON object: {1}")]
    Json(&'static str, serde_json::Error),
    #[error("the profile record has {0} bytes left over")]
    TrailingBytes(usize),
}

/// The compact record of `profile`.
pub fn encode(profile: &Profile) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(FORMAT_V1);
    put_unsigned(&mut out, profile.id.0);
    put_unsigned(&mut out, profile.identifiers.len() as u64);
    for identifier in &profile.identifiers {
        put_word(&mut out, &identifier.kind);
        put_string(&mut out, &identifier.value);
    }
    put_json_object(&mut out, &profile.traits);
    let base = profile.first_seen_ms;
    put_signed(&mut out, base);
    put_signed(&mut out, profile.last_seen_ms.wrapping_sub(base));
    put_unsigned(&mut out, profile.trait_stamps.len() as u64);
    // Both maps iterate in key order, so one walk finds each stamp's trait;
    // a key not found that way is written out, which is always readable.
    let mut trait_keys = profile.traits.keys().enumerate().peekable();
    for (key, stamp) in &profile.trait_stamps {
        while trait_keys.next_if(|(_, trait_key)| trait_key.as_str() < key.as_str()).is_some() {}
        match trait_keys.peek() {
            Some((index, trait_key)) if *trait_key == key => put_unsigned(&mut out, *index as u64 + 1),
            _ => {
                put_unsigned(&mut out, 0);
                put_string(&mut out, key);
            }
        }
        put_signed(&mut out, stamp.timestamp_ms.wrapping_sub(base));
        put_unsigned(&mut out, stamp.position);
    }
    if profile.groups.is_empty() {
        put_unsigned(&mut out, 0);
    } else {
        let text = serde_json::to_string(&profile.groups).expect("a map of JSON objects serializes");
        put_string(&mut out, &text);
    }
    put_unsigned(&mut out, profile.event_counts.len() as u64);
    for (event_type, count) in &profile.event_counts {
        put_word(&mut out, event_type);
        put_unsigned(&mut out, *count);
    }
    out
}

/// A profile from a record [`encode`] wrote.
pub fn decode_record(bytes: &[u8]) -> Result<Profile, ProfileRecordError> {
    let mut reader = Reader { bytes, at: 0 };
    match reader.byte()? {
        FORMAT_V1 => {}
        other => return Err(ProfileRecordError::UnknownFormat(other)),
    }
    let mut profile = Profile::new(ProfileId(reader.unsigned()?));
    let identifiers = reader.count()?;
    profile.identifiers.reserve(identifiers);
    for _ in 0..identifiers {
        let kind = reader.word()?;
        let value = reader.string()?.to_owned();
        profile.identifiers.push(Identifier { kind, value });
    }
    profile.traits = reader.json_object("traits")?;
    let base = reader.signed()?;
    profile.first_seen_ms = base;
    profile.last_seen_ms = base.wrapping_add(reader.signed()?);
    let stamps = reader.count()?;
    let trait_keys: Vec<&String> = profile.traits.keys().collect();
    for _ in 0..stamps {
        let key = match reader.unsigned()? {
            0 => reader.string()?.to_owned(),
            index => trait_keys
                .get(index as usize - 1)
                .map(|key| (*key).clone())
                .ok_or(ProfileRecordError::UnknownWord(index))?,
        };
        let timestamp_ms = base.wrapping_add(reader.signed()?);
        let position = reader.unsigned()?;
        profile.trait_stamps.insert(key, Stamp { timestamp_ms, position });
    }
    let groups = reader.string()?;
    if !groups.is_empty() {
        profile.groups = serde_json::from_str::<BTreeMap<String, Map<String, Value>>>(groups)
            .map_err(|error| ProfileRecordError::Json("groups", error))?;
    }
    let counts = reader.count()?;
    for _ in 0..counts {
        let event_type = reader.word()?;
        profile.event_counts.insert(event_type, reader.unsigned()?);
    }
    match bytes.len() - reader.at {
        0 => Ok(profile),
        left => Err(ProfileRecordError::TrailingBytes(left)),
    }
}

fn put_unsigned(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_signed(out: &mut Vec<u8>, value: i64) {
    put_unsigned(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    put_unsigned(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// A dictionary word as its index + 1, anything else as 0 and the string.
fn put_word(out: &mut Vec<u8>, word: &str) {
    match DICTIONARY.iter().position(|known| *known == word) {
        Some(index) => put_unsigned(out, index as u64 + 1),
        None => {
            put_unsigned(out, 0);
            put_string(out, word);
        }
    }
}

fn put_json_object(out: &mut Vec<u8>, object: &Map<String, Value>) {
    if object.is_empty() {
        put_unsigned(out, 0);
    } else {
        let text = serde_json::to_string(object).expect("a JSON object serializes");
        put_string(out, &text);
    }
}

/// Reads a record front to back; every read is bounds-checked, so a damaged
/// record is an error, never a panic.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, ProfileRecordError> {
        let byte = *self.bytes.get(self.at).ok_or(ProfileRecordError::Truncated)?;
        self.at += 1;
        Ok(byte)
    }

    fn unsigned(&mut self) -> Result<u64, ProfileRecordError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ProfileRecordError::Truncated)
    }

    fn signed(&mut self) -> Result<i64, ProfileRecordError> {
        let raw = self.unsigned()?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    /// A count of items that follow, each at least one byte long, so a
    /// damaged count cannot make the decoder reserve absurd memory.
    fn count(&mut self) -> Result<usize, ProfileRecordError> {
        let count = self.unsigned()?;
        if count > (self.bytes.len() - self.at) as u64 {
            return Err(ProfileRecordError::Truncated);
        }
        Ok(count as usize)
    }

    fn string(&mut self) -> Result<&'a str, ProfileRecordError> {
        let length = self.unsigned()?;
        let end = self.at.checked_add(usize::try_from(length).map_err(|_| ProfileRecordError::Truncated)?);
        let slice = end.and_then(|end| self.bytes.get(self.at..end)).ok_or(ProfileRecordError::Truncated)?;
        self.at += slice.len();
        std::str::from_utf8(slice).map_err(|_| ProfileRecordError::NotText)
    }

    fn word(&mut self) -> Result<String, ProfileRecordError> {
        match self.unsigned()? {
            0 => Ok(self.string()?.to_owned()),
            index => DICTIONARY
                .get(index as usize - 1)
                .map(|word| (*word).to_owned())
                .ok_or(ProfileRecordError::UnknownWord(index)),
        }
    }

    fn json_object(&mut self, what: &'static str) -> Result<Map<String, Value>, ProfileRecordError> {
        let text = self.string()?;
        if text.is_empty() {
            return Ok(Map::new());
        }
        serde_json::from_str(text).map_err(|error| ProfileRecordError::Json(what, error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Profile {
        let mut profile = Profile::new(ProfileId(123_456));
        profile.identifiers = vec![
            Identifier::new("anonymous_id", "anon-123456"),
            Identifier::new("user_id", "user-123456"),
            Identifier::new("email", "p123456@mail.example"),
            Identifier::new("loyalty_card", "LC-9"),
        ];
        profile.traits = serde_json::from_str(
            r#"{"email": "p123456@mail.example", "name": "Person 123456", "plan": "pro", "address": {"city": "Oslo"}}"#,
        )
        .unwrap();
        for (key, position) in [("email", 7), ("name", 7), ("plan", 9), ("address", 11), ("gone", 3)] {
            profile
                .trait_stamps
                .insert(key.to_owned(), Stamp { timestamp_ms: 1_767_225_600_000 + position as i64, position });
        }
        profile.groups.insert("acme".into(), serde_json::from_str(r#"{"seats": 12}"#).unwrap());
        profile.first_seen_ms = 1_767_225_600_000;
        profile.last_seen_ms = 1_767_312_000_000;
        profile.event_counts = BTreeMap::from([("identify".into(), 2), ("track".into(), 31), ("custom".into(), 1)]);
        profile
    }

    #[test]
    fn a_profile_round_trips_in_about_a_third_of_its_json() {
        let profile = sample();
        let record = encode(&profile);
        assert_eq!(decode_record(&record).unwrap(), profile);
        let json = serde_json::to_string(&profile).unwrap();
        assert!(record.len() * 2 < json.len(), "{} bytes against {} of JSON", record.len(), json.len());
    }

    #[test]
    fn a_profile_that_saw_no_event_round_trips() {
        let profile = Profile::new(ProfileId(1));
        assert_eq!(decode_record(&encode(&profile)).unwrap(), profile);
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let record = encode(&sample());
        for length in 0..record.len() {
            assert!(decode_record(&record[..length]).is_err(), "cut at {length}");
        }
        let mut longer = record.clone();
        longer.push(0);
        assert!(matches!(decode_record(&longer), Err(ProfileRecordError::TrailingBytes(1))));
        let mut unknown = record;
        unknown[0] = 9;
        assert!(matches!(decode_record(&unknown), Err(ProfileRecordError::UnknownFormat(9))));
        assert!(decode_record(&[FORMAT_V1, 1, 1, 200, 0]).is_err(), "a word past the dictionary");
        assert!(decode_record(&[FORMAT_V1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err(), "an absurd count");
    }

    proptest! {
        #[test]
        fn any_profile_round_trips(
            id in any::<u64>(),
            identifiers in proptest::collection::vec(("[a-z_]{1,12}|user_id|email", "\\PC{0,20}"), 0..6),
            traits in proptest::collection::btree_map("\\PC{0,8}", any::<i64>(), 0..5),
            extra_stamps in proptest::collection::btree_map("\\PC{0,8}", (any::<i64>(), any::<u64>()), 0..3),
            seen in (any::<i64>(), any::<i64>()),
            counts in proptest::collection::btree_map("track|page|[a-z]{1,6}", any::<u64>(), 0..4),
            group in proptest::option::of("\\PC{0,8}"),
        ) {
            let mut profile = Profile::new(ProfileId(id));
            profile.identifiers = identifiers.into_iter().map(|(kind, value)| Identifier::new(kind, value)).collect();
            for (index, (key, value)) in traits.into_iter().enumerate() {
                profile.traits.insert(key.clone(), Value::from(value));
                profile.trait_stamps.insert(key, Stamp { timestamp_ms: value, position: index as u64 });
            }
            for (key, (timestamp_ms, position)) in extra_stamps {
                profile.trait_stamps.entry(key).or_insert(Stamp { timestamp_ms, position });
            }
            (profile.first_seen_ms, profile.last_seen_ms) = seen;
            profile.event_counts = counts;
            if let Some(group) = group {
                profile.groups.insert(group, Map::new());
            }
            prop_assert_eq!(decode_record(&encode(&profile)).unwrap(), profile);
        }
    }
}
