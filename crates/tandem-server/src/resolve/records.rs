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

use foldhash::fast::RandomState;
use std::collections::hash_map::RandomState as SipHashState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use tandem_core::profile_record::{self, ProfileRecordError};
use tandem_core::{Identifier, Profile, ProfileId};

/// Memory a kept record costs beyond its bytes: its entry in the record
/// map and in the eviction queue, the reference counts of its shared
/// allocation (a commit may hold it too), with the maps' spare capacity.
const RECORD_OVERHEAD: usize = 80;
/// Memory one indexed identifier costs (a hash and a profile id, with the
/// map's spare capacity).
const IDENTIFIER_OVERHEAD: usize = 32;

/// Profiles held as compact records, by id and by identifier hash.
pub(crate) struct ProfileRecords {
    budget_bytes: usize,
    used_bytes: usize,
    /// Hashes identifiers into the index's keys: SipHash, since a hash two
    /// identifiers share costs the tier its completeness (a read per new
    /// identifier until the resolver restarts), and identifiers come from
    /// clients. The maps hash their keys with foldhash.
    hasher: SipHashState,
    /// Each kept record with the number it was kept under and its cost.
    records: HashMap<ProfileId, (u64, usize, Arc<[u8]>), RandomState>,
    owners: HashMap<u64, ProfileId, RandomState>,
    /// Kept ids with their numbers, oldest first. An entry whose number is
    /// not its record's any more (taken out, perhaps kept again since) is
    /// skipped when dropping: a profile kept again is dropped in its turn.
    order: VecDeque<(u64, ProfileId)>,
    next_number: u64,
    /// Profiles kept here whose latest state is not durable yet, each with
    /// the batch whose commit will write it. They are never dropped:
    /// storage would answer with an older state.
    unwritten: HashMap<ProfileId, u64, RandomState>,
    unwritten_bytes: usize,
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
            hasher: SipHashState::new(),
            records: HashMap::default(),
            owners: HashMap::default(),
            order: VecDeque::new(),
            next_number: 0,
            unwritten: HashMap::default(),
            unwritten_bytes: 0,
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
        debug_assert!(
            !self.unwritten.contains_key(&profile.id),
            "an unwritten record is replaced only by taking it out"
        );
        if self.records.contains_key(&profile.id) {
            // Not expected (a profile is kept only once it left the graph);
            // the newer state replaces the kept one.
            let _ = self.take(profile.id);
        }
        let record: Arc<[u8]> = profile_record::encode(profile).into();
        let cost = cost_of(record.len(), profile.identifiers.len());
        if cost > self.budget_bytes {
            return false;
        }
        let mut whole = true;
        for identifier in &profile.identifiers {
            let hash = self.hasher.hash_one(identifier);
            match self.owners.get(&hash) {
                Some(previous) if *previous == profile.id => {}
                // An unwritten profile keeps its entry: it must stay found.
                Some(previous) if self.unwritten.contains_key(previous) => whole = false,
                previous => {
                    whole &= previous.is_none();
                    self.owners.insert(hash, profile.id);
                }
            }
        }
        self.insert(profile.id, record, cost);
        whole & self.drop_over_budget()
    }

    fn insert(&mut self, id: ProfileId, record: Arc<[u8]>, cost: usize) {
        self.next_number += 1;
        self.records.insert(id, (self.next_number, cost, record));
        self.order.push_back((self.next_number, id));
        self.used_bytes += cost;
    }

    /// Drops the oldest written records until the tier is within its
    /// budget (unwritten ones go to the back of the queue instead); returns
    /// `false` when it dropped any.
    fn drop_over_budget(&mut self) -> bool {
        let mut whole = true;
        // Unwritten records never pass the budget on their own, so written
        // ones remain to drop while the tier is over it; the bound only
        // guards against a queue of unwritten ones alone.
        let mut turns = self.order.len();
        while self.used_bytes > self.budget_bytes && turns > 0 {
            turns -= 1;
            let Some((number, oldest)) = self.order.pop_front() else { break };
            if self.records.get(&oldest).is_none_or(|(kept, _, _)| *kept != number) {
                continue;
            }
            if self.unwritten.contains_key(&oldest) {
                self.order.push_back((number, oldest));
            } else if self.take(oldest).is_some() {
                whole = false;
            }
        }
        whole
    }

    /// Keeps `profile` whose latest state is not durable yet: batch
    /// `batch` changed it and the commit that writes it is in flight or not
    /// yet made. Such a record is never dropped until
    /// [`ProfileRecords::written_through`] says its batch is durable.
    /// Returns whether the tier still holds every profile it held (as
    /// [`ProfileRecords::keep`]), or `None`, keeping nothing, when it cannot
    /// promise to keep this one: one of its identifiers' hashes points at
    /// another profile (a look-up by that identifier would miss it), or the
    /// unwritten records would pass the budget with it. `encoded` is the
    /// profile's record as its commit carries it, shared rather than encoded
    /// again; `None` encodes it here.
    pub(crate) fn keep_unwritten(
        &mut self,
        profile: &Profile,
        encoded: Option<&Arc<[u8]>>,
        batch: u64,
    ) -> Option<bool> {
        let collides = profile.identifiers.iter().any(|identifier| {
            self.owners.get(&self.hasher.hash_one(identifier)).is_some_and(|owner| *owner != profile.id)
        });
        if collides || self.records.contains_key(&profile.id) {
            return None;
        }
        let record: Arc<[u8]> = match encoded {
            Some(record) => record.clone(),
            None => profile_record::encode(profile).into(),
        };
        let cost = cost_of(record.len(), profile.identifiers.len());
        if self.unwritten_bytes + cost > self.budget_bytes {
            return None;
        }
        self.unwritten_bytes += cost;
        self.unwritten.insert(profile.id, batch);
        for identifier in &profile.identifiers {
            self.owners.insert(self.hasher.hash_one(identifier), profile.id);
        }
        self.insert(profile.id, record, cost);
        Some(self.drop_over_budget())
    }

    /// The record of unwritten profile `id` as it was kept, shared, for the
    /// commit that writes it.
    pub(crate) fn unwritten_record(&self, id: ProfileId) -> Option<&Arc<[u8]>> {
        self.unwritten.get(&id)?;
        self.records.get(&id).map(|(_, _, record)| record)
    }

    /// Batches up to `batch` are durable: their records may be dropped like
    /// any other.
    pub(crate) fn written_through(&mut self, batch: u64) {
        let records = &self.records;
        let mut freed = 0;
        self.unwritten.retain(|id, changed_in| {
            let written = *changed_in <= batch;
            if written {
                freed += records.get(id).map_or(0, |(_, cost, _)| *cost);
            }
            !written
        });
        self.unwritten_bytes -= freed;
    }

    /// Bytes of the records that are not durable yet.
    #[cfg(test)]
    pub(crate) fn unwritten_bytes(&self) -> usize {
        self.unwritten_bytes
    }

    /// Takes out the profile holding `identifier`, if it is kept here.
    pub(crate) fn take_owner(&mut self, identifier: &Identifier) -> Result<Owner, ProfileRecordError> {
        let hash = self.hasher.hash_one(identifier);
        let Some(&id) = self.owners.get(&hash) else {
            return Ok(Owner::NotHere);
        };
        let Some((_, _, record)) = self.records.get(&id) else {
            return Ok(Owner::NotHere);
        };
        let profile = match profile_record::decode_record(record) {
            Ok(profile) => profile,
            Err(error) => {
                // The caller reports it and starts again from storage.
                self.remove_record(id);
                return Err(error);
            }
        };
        if !profile.identifiers.contains(identifier) {
            // Another identifier with the same hash.
            return Ok(Owner::NotHere);
        }
        self.forget(&profile);
        Ok(Owner::Found(profile))
    }

    /// Takes out profile `id`, if it is kept here.
    pub(crate) fn take(&mut self, id: ProfileId) -> Option<Result<Profile, ProfileRecordError>> {
        let (_, _, record) = self.records.get(&id)?;
        match profile_record::decode_record(record) {
            Ok(profile) => {
                self.forget(&profile);
                Some(Ok(profile))
            }
            Err(error) => {
                // A record this tier wrote and cannot read: the caller
                // reports it and starts again from storage. Its index
                // entries stay, pointing at nothing: a look-up by them
                // finds nothing here.
                self.remove_record(id);
                Some(Err(error))
            }
        }
    }

    /// Removes a decoded profile's record and the index entries pointing at it.
    fn forget(&mut self, profile: &Profile) {
        self.remove_record(profile.id);
        for identifier in &profile.identifiers {
            let hash = self.hasher.hash_one(identifier);
            if self.owners.get(&hash) == Some(&profile.id) {
                self.owners.remove(&hash);
            }
        }
    }

    /// Removes record `id` with its cost (its index entries are the caller's).
    fn remove_record(&mut self, id: ProfileId) {
        let Some((_, cost, _)) = self.records.remove(&id) else { return };
        self.used_bytes -= cost;
        if self.unwritten.remove(&id).is_some() {
            self.unwritten_bytes -= cost;
        }
        // The id stays in `order` and is skipped when its turn comes; the
        // queue is compacted when it is mostly such ids.
        if self.order.len() > 2 * self.records.len() + 1024 {
            let records = &self.records;
            self.order.retain(|(number, id)| records.get(id).is_some_and(|(kept, _, _)| kept == number));
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
    fn unwritten_profiles_are_kept_only_when_none_of_them_can_be_lost() {
        let one = cost_of(profile_record::encode(&profile(1, &["user_id:u1"])).len(), 1);
        let mut records = ProfileRecords::new(one * 3);
        for id in 1..=3 {
            assert!(records.keep(&profile(id, &[&format!("user_id:u{id}")])));
        }
        for id in 4..=6 {
            let kept = records.keep_unwritten(&profile(id, &[&format!("user_id:u{id}")]), None, 7);
            assert_eq!(kept, Some(false), "each pushes out an older, written record");
        }
        assert_eq!(records.unwritten_bytes(), 3 * one);
        assert_eq!(
            records.keep_unwritten(&profile(7, &["user_id:u7"]), None, 7),
            None,
            "a fourth would push out an unwritten one"
        );
        for id in 4..=6 {
            assert!(records.take(ProfileId(id)).is_some(), "unwritten profile {id} is still held");
        }
        assert_eq!(records.unwritten_bytes(), 0, "taken out, they are no longer the tier's to keep");
        assert!(records.take(ProfileId(1)).is_none());

        // Kept, taken out and kept again unwritten: its first, older turn in
        // the queue does not drop it.
        let mut records = ProfileRecords::new(one * 3);
        assert!(records.keep(&profile(1, &["user_id:u1"])));
        assert!(records.take(ProfileId(1)).is_some());
        assert!(records.keep(&profile(2, &["user_id:u2"])));
        assert_eq!(records.keep_unwritten(&profile(1, &["user_id:u1"]), None, 1), Some(true));
        assert!(records.keep(&profile(3, &["user_id:u3"])));
        assert!(!records.keep(&profile(4, &["user_id:u4"])), "one is pushed out");
        assert!(records.take(ProfileId(2)).is_none(), "the oldest kept went");
        assert!(records.take(ProfileId(1)).is_some(), "the unwritten one stayed");

        // A hash another profile holds: a look-up could not find this one.
        let mut records = ProfileRecords::new(1 << 20);
        assert!(records.keep(&profile(1, &["user_id:ann"])));
        let hash = records.hasher.hash_one("user_id:bob".parse::<Identifier>().unwrap());
        records.owners.insert(hash, ProfileId(1));
        assert_eq!(records.keep_unwritten(&profile(2, &["user_id:bob"]), None, 1), None);
        assert_eq!(records.len(), 1, "nothing was kept");
    }

    #[test]
    fn unwritten_records_older_than_written_ones_survive_until_their_batch_is_durable() {
        let one = cost_of(profile_record::encode(&profile(1, &["user_id:u1"])).len(), 1);
        let mut records = ProfileRecords::new(one * 3);
        assert_eq!(records.keep_unwritten(&profile(1, &["user_id:u1"]), None, 1), Some(true));
        assert_eq!(records.keep_unwritten(&profile(2, &["user_id:u2"]), None, 2), Some(true));
        // Written profiles kept after them push out only written ones.
        assert!(records.keep(&profile(3, &["user_id:u3"])));
        assert!(!records.keep(&profile(4, &["user_id:u4"])));
        assert!(records.take(ProfileId(3)).is_none(), "the written one went, though kept after the unwritten");
        assert!(records.unwritten_record(ProfileId(1)).is_some() && records.unwritten_record(ProfileId(2)).is_some());
        assert!(records.unwritten_record(ProfileId(4)).is_none(), "a written record is not offered as unwritten");

        // Batch 1 is durable: its record is now the oldest written one.
        records.written_through(1);
        assert_eq!(records.unwritten_bytes(), one);
        assert!(records.unwritten_record(ProfileId(1)).is_none());
        assert!(!records.keep(&profile(5, &["user_id:u5"])));
        assert!(!records.keep(&profile(6, &["user_id:u6"])));
        assert!(records.take(ProfileId(1)).is_none(), "written now, it may go");
        assert!(records.take(ProfileId(2)).is_some(), "batch 2 is not durable yet");
    }

    #[test]
    fn an_unreadable_record_leaves_with_its_cost() {
        let mut records = ProfileRecords::new(1 << 20);
        let junk: Arc<[u8]> = vec![0xff; 40].into();
        records.insert(ProfileId(9), junk, cost_of(40, 1));
        records.unwritten.insert(ProfileId(9), 1);
        records.unwritten_bytes = cost_of(40, 1);
        assert!(matches!(records.take(ProfileId(9)), Some(Err(_))));
        assert_eq!((records.len(), records.used_bytes(), records.unwritten_bytes()), (0, 0, 0));
        assert!(records.take(ProfileId(9)).is_none(), "gone");
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
