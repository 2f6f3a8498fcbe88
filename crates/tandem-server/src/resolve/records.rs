//! The resolver's second tier of memory: profiles dropped from the working
//! graph, kept as compact records ([`tandem_core::profile_record`], about
//! 160 bytes for a typical profile against some 3 KB as a decoded `Profile`
//! with its identifiers indexed) within a byte budget, with a hashed index of
//! their identifiers.
//!
//! A batch that meets one of these profiles decodes it instead of reading
//! storage. And while the graph and this tier together hold every stored
//! profile (the resolver's `complete`), an identifier found in neither is
//! new and costs no read at all: at a million customers the default budget
//! holds them all, so the resolver reads nothing from storage.
//!
//! The index keys are 64-bit hashes of identifiers, not the identifiers: a
//! hit is checked against the decoded profile's identifiers, and a hash two
//! identifiers share makes the tier report that it lost track (the resolver
//! then asks storage about whatever it cannot find).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use tandem_core::profile_record::{self, ProfileRecordError};
use tandem_core::{Identifier, Profile, ProfileId};

/// Memory a kept record costs beyond its bytes: its entry in the record
/// map and in the eviction queue, with the maps' spare capacity.
const RECORD_OVERHEAD: usize = 64;
/// Memory one indexed identifier costs (a hash and a profile id, with the
/// map's spare capacity).
const IDENTIFIER_OVERHEAD: usize = 32;

/// Profiles held as compact records, by id and by identifier hash.
pub(crate) struct ProfileRecords {
    budget_bytes: usize,
    used_bytes: usize,
    hasher: RandomState,
    records: HashMap<ProfileId, Box<[u8]>>,
    owners: HashMap<u64, ProfileId>,
    /// Kept ids, oldest first; ids taken out since are skipped when dropping.
    order: VecDeque<ProfileId>,
}

/// What the tier knows of an identifier's owner.
pub(crate) enum Owner {
    /// The owner, taken out of the tier (the caller puts it in the graph).
    Found(Profile),
    /// No profile kept here holds it.
    NotHere,
}

impl ProfileRecords {
    /// An empty tier holding at most about `budget_bytes` of records and index.
    pub(crate) fn new(budget_bytes: usize) -> Self {
        ProfileRecords {
            budget_bytes,
            used_bytes: 0,
            hasher: RandomState::new(),
            records: HashMap::new(),
            owners: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Profiles kept.
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// Memory the kept records and their index take, about.
    pub(crate) fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// Keeps `profile`. Returns `false` when the tier lost track of some
    /// stored profile doing so: it dropped older records to stay within its
    /// budget, or an identifier's hash was already another profile's.
    pub(crate) fn keep(&mut self, profile: &Profile) -> bool {
        if self.records.contains_key(&profile.id) {
            // Not expected (a profile is kept only once it left the graph);
            // the newer state replaces the kept one.
            let _ = self.take(profile.id);
        }
        let record = profile_record::encode(profile).into_boxed_slice();
        let cost = cost_of(record.len(), profile.identifiers.len());
        if cost > self.budget_bytes {
            return false;
        }
        let mut whole = true;
        for identifier in &profile.identifiers {
            let hash = self.hasher.hash_one(identifier);
            if let Some(previous) = self.owners.insert(hash, profile.id) {
                whole &= previous == profile.id;
            }
        }
        self.records.insert(profile.id, record);
        self.order.push_back(profile.id);
        self.used_bytes += cost;
        while self.used_bytes > self.budget_bytes {
            let Some(oldest) = self.order.pop_front() else { break };
            if self.take(oldest).is_some() {
                whole = false;
            }
        }
        whole
    }

    /// Takes out the profile holding `identifier`, if it is kept here.
    pub(crate) fn take_owner(&mut self, identifier: &Identifier) -> Result<Owner, ProfileRecordError> {
        let hash = self.hasher.hash_one(identifier);
        let Some(&id) = self.owners.get(&hash) else {
            return Ok(Owner::NotHere);
        };
        let Some(record) = self.records.get(&id) else {
            return Ok(Owner::NotHere);
        };
        let length = record.len();
        let profile = profile_record::decode_record(record)?;
        if !profile.identifiers.contains(identifier) {
            // Another identifier with the same hash.
            return Ok(Owner::NotHere);
        }
        self.forget(&profile, length);
        Ok(Owner::Found(profile))
    }

    /// Takes out profile `id`, if it is kept here.
    pub(crate) fn take(&mut self, id: ProfileId) -> Option<Result<Profile, ProfileRecordError>> {
        let record = self.records.get(&id)?;
        let length = record.len();
        match profile_record::decode_record(record) {
            Ok(profile) => {
                self.forget(&profile, length);
                Some(Ok(profile))
            }
            Err(error) => {
                // A record this tier wrote and cannot read: the caller
                // reports it and starts again from storage.
                self.records.remove(&id);
                Some(Err(error))
            }
        }
    }

    /// Removes a decoded profile's record and the index entries pointing at it.
    fn forget(&mut self, profile: &Profile, record_length: usize) {
        self.records.remove(&profile.id);
        for identifier in &profile.identifiers {
            let hash = self.hasher.hash_one(identifier);
            if self.owners.get(&hash) == Some(&profile.id) {
                self.owners.remove(&hash);
            }
        }
        self.used_bytes -= cost_of(record_length, profile.identifiers.len());
        // The id stays in `order` and is skipped when its turn comes; the
        // queue is compacted when it is mostly such ids.
        if self.order.len() > 2 * self.records.len() + 1024 {
            let records = &self.records;
            self.order.retain(|id| records.contains_key(id));
        }
    }
}

fn cost_of(record_length: usize, identifiers: usize) -> usize {
    record_length + RECORD_OVERHEAD + identifiers * IDENTIFIER_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(id: u64, identifiers: &[&str]) -> Profile {
        let mut profile = Profile::new(ProfileId(id));
        profile.identifiers = identifiers.iter().map(|text| text.parse().unwrap()).collect();
        profile.event_counts.insert("track".into(), id);
        profile
    }

    fn found(owner: Owner) -> Option<Profile> {
        match owner {
            Owner::Found(profile) => Some(profile),
            Owner::NotHere => None,
        }
    }

    #[test]
    fn a_kept_profile_is_found_by_each_identifier_once_and_then_gone() {
        let mut records = ProfileRecords::new(1 << 20);
        let ann = profile(1, &["user_id:ann", "email:ann@example.com"]);
        assert!(records.keep(&ann));
        assert!(records.keep(&profile(2, &["user_id:bob"])));
        let email: Identifier = "email:ann@example.com".parse().unwrap();
        assert_eq!(found(records.take_owner(&email).unwrap()), Some(ann));
        assert!(found(records.take_owner(&email).unwrap()).is_none(), "taken out with its record");
        assert!(found(records.take_owner(&"user_id:ann".parse().unwrap()).unwrap()).is_none());
        assert!(found(records.take_owner(&"user_id:carl".parse().unwrap()).unwrap()).is_none());
        assert_eq!(records.len(), 1);
        assert_eq!(records.take(ProfileId(2)).unwrap().unwrap().id, ProfileId(2));
        assert_eq!((records.len(), records.used_bytes()), (0, 0), "the accounting returns to nothing");
    }

    #[test]
    fn over_its_budget_the_tier_drops_the_oldest_and_says_it_lost_track() {
        let one = cost_of(profile_record::encode(&profile(1, &["user_id:u1"])).len(), 1);
        let mut records = ProfileRecords::new(one * 3);
        for id in 1..=3 {
            assert!(records.keep(&profile(id, &[&format!("user_id:u{id}")])), "three fit");
        }
        assert!(!records.keep(&profile(4, &["user_id:u4"])), "the fourth pushes one out");
        assert!(records.used_bytes() <= one * 3);
        assert!(records.take(ProfileId(1)).is_none(), "the oldest went first");
        assert!(found(records.take_owner(&"user_id:u4".parse().unwrap()).unwrap()).is_some());
    }

    #[test]
    fn an_identifier_whose_hash_another_holds_is_not_mistaken_for_it() {
        let mut records = ProfileRecords::new(1 << 20);
        assert!(records.keep(&profile(1, &["user_id:ann"])));
        // Force a shared hash: point ann's entry at another kept profile,
        // as a collision would.
        assert!(records.keep(&profile(2, &["user_id:bob"])));
        let hash = records.hasher.hash_one("user_id:ann".parse::<Identifier>().unwrap());
        records.owners.insert(hash, ProfileId(2));
        assert!(found(records.take_owner(&"user_id:ann".parse().unwrap()).unwrap()).is_none());
        assert_eq!(records.len(), 2, "nothing was taken out");
    }
}
