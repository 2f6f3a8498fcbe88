//! The identity graph: which identifier belongs to which profile, and the
//! decision, event by event, to create, attach or merge profiles under the
//! identity rules. Pure and deterministic: the same events in the same order
//! give the same graph, which is what makes replay, crash recovery and repair
//! exact. The resolver stage persists what this module decides.

use crate::event::{Event, EventType};
use crate::identity::{CompiledRules, Identifier, ANONYMOUS_ID, USER_ID};
use crate::profile::{Profile, ProfileId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};

/// Something the graph did, kept so that every link can be explained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IdentityChange {
    /// A new profile, with the identifiers of the event that created it.
    Created { profile: ProfileId, identifiers: Vec<Identifier> },
    /// New identifiers joined an existing profile.
    Attached { profile: ProfileId, identifiers: Vec<Identifier> },
    /// `merged` profiles became part of `profile` because the event carried
    /// `identifiers`, which they held between them.
    Merged { profile: ProfileId, merged: Vec<ProfileId>, identifiers: Vec<Identifier> },
    /// An identifier of the event was not used, and why.
    Dropped { profile: Option<ProfileId>, identifier: Identifier, reason: String },
    /// An admin removed an identifier (`unlink`) or blocked it (`block`) and
    /// the profiles were rebuilt without it.
    Repaired { profile: Option<ProfileId>, identifier: Identifier, action: String },
}

impl IdentityChange {
    /// The profile the change concerns, if any.
    pub fn profile(&self) -> Option<ProfileId> {
        match self {
            IdentityChange::Created { profile, .. }
            | IdentityChange::Attached { profile, .. }
            | IdentityChange::Merged { profile, .. } => Some(*profile),
            IdentityChange::Dropped { profile, .. } | IdentityChange::Repaired { profile, .. } => *profile,
        }
    }
}

/// What resolving one event did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// The profile the event belongs to; `None` when it carried no usable identifier.
    pub profile: Option<ProfileId>,
    /// Profiles merged into `profile` by this event; they no longer exist on their own.
    pub merged_away: Vec<ProfileId>,
    pub changes: Vec<IdentityChange>,
}

/// Profiles, the identifier index, and where merged profiles went.
///
/// The graph may hold the whole customer base or only part of it: the
/// resolver keeps a bounded part in memory (a cache over storage) and loads,
/// before each batch, the owner of every identifier the batch will look up
/// ([`IdentityGraph::identifiers_to_look_up`]) with its whole profile.
/// Resolving an event reads nothing else, so a partial graph that holds those
/// profiles decides exactly what the whole graph would. Invariant: an
/// identifier is indexed exactly when the profile holding it is in memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IdentityGraph {
    profiles: FastMap<ProfileId, Profile>,
    index: FastMap<Identifier, ProfileId>,
    merged_into: FastMap<ProfileId, ProfileId>,
    next_id: u64,
}

/// The graph's maps: hashed with foldhash, seeded per map, which costs a
/// fraction of the standard SipHash on every identifier of every event.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

impl IdentityGraph {
    pub fn new() -> IdentityGraph {
        IdentityGraph { next_id: 1, ..IdentityGraph::default() }
    }

    /// Rebuilds the graph from stored profiles and merge redirects.
    pub fn from_parts(
        profiles: impl IntoIterator<Item = Profile>,
        merged_into: impl IntoIterator<Item = (ProfileId, ProfileId)>,
        next_id: u64,
    ) -> IdentityGraph {
        let mut graph = IdentityGraph::new();
        for profile in profiles {
            for identifier in &profile.identifiers {
                graph.index.insert(identifier.clone(), profile.id);
            }
            graph.next_id = graph.next_id.max(profile.id.0 + 1);
            graph.profiles.insert(profile.id, profile);
        }
        graph.merged_into.extend(merged_into);
        graph.next_id = graph.next_id.max(next_id);
        graph
    }

    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Whether the profile is in memory (live and loaded).
    pub fn holds(&self, id: ProfileId) -> bool {
        self.profiles.contains_key(&id)
    }

    /// Puts a stored profile in memory, its identifiers pointing at it.
    pub fn insert_profile(&mut self, profile: Profile) {
        for identifier in &profile.identifiers {
            self.index.insert(identifier.clone(), profile.id);
        }
        self.next_id = self.next_id.max(profile.id.0 + 1);
        self.profiles.insert(profile.id, profile);
    }

    /// Drops a profile from memory (it stays in storage), with its
    /// identifiers; `false` when it was not in memory.
    pub fn evict(&mut self, id: ProfileId) -> bool {
        self.remove_profile(id).is_some()
    }

    /// Takes a profile out of memory (it stays in storage), with its
    /// identifiers; `None` when it was not in memory.
    pub fn remove_profile(&mut self, id: ProfileId) -> Option<Profile> {
        let profile = self.profiles.remove(&id)?;
        for identifier in &profile.identifiers {
            if self.index.get(identifier) == Some(&id) {
                self.index.remove(identifier);
            }
        }
        Some(profile)
    }

    /// Forgets where merged profiles went: a partial graph keeps them only
    /// for the batch that merged them (storage keeps them for good).
    pub fn forget_merges(&mut self) {
        self.merged_into.clear();
    }

    /// Every identifier `event` carries, blocked ones included, with an
    /// alias's `previousId` as a user id too: what could link the event to
    /// anything under any rules.
    pub fn identifiers_carried(event: &Event, rules: &CompiledRules) -> Vec<Identifier> {
        let (mut identifiers, blocked) = rules.identifiers_of(event);
        identifiers.extend(blocked.into_iter().map(|(identifier, _)| identifier));
        identifiers.extend(Self::previous_id_as_user(event, rules));
        identifiers
    }

    fn previous_id_as_user(event: &Event, rules: &CompiledRules) -> Option<Identifier> {
        if event.event_type != EventType::Alias {
            return None;
        }
        rules.normalizer().identifier(USER_ID, event.previous_id.as_deref()?)
    }

    pub fn profile_count(&self) -> usize {
        self.profiles.len()
    }

    pub fn profiles(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }

    pub fn merged_into(&self) -> impl Iterator<Item = (ProfileId, ProfileId)> + '_ {
        self.merged_into.iter().map(|(from, into)| (*from, *into))
    }

    /// The live profile an id refers to, following merges.
    pub fn canonical(&self, id: ProfileId) -> Option<ProfileId> {
        let mut current = id;
        for _ in 0..=self.merged_into.len() {
            if self.profiles.contains_key(&current) {
                return Some(current);
            }
            current = *self.merged_into.get(&current)?;
        }
        None
    }

    /// Where an id ends up after the merges this graph remembers, whether
    /// or not that profile is in memory now: `id` itself when it was not
    /// merged.
    pub fn survivor(&self, id: ProfileId) -> ProfileId {
        let mut current = id;
        for _ in 0..=self.merged_into.len() {
            match self.merged_into.get(&current) {
                Some(into) => current = *into,
                None => break,
            }
        }
        current
    }

    pub fn profile(&self, id: ProfileId) -> Option<&Profile> {
        self.profiles.get(&self.canonical(id)?)
    }

    pub fn lookup(&self, identifier: &Identifier) -> Option<ProfileId> {
        self.index.get(identifier).copied()
    }

    /// Resolves one event to a profile, creating, attaching or merging as
    /// the rules allow, and records the event on that profile.
    pub fn resolve(&mut self, position: u64, event: &Event, rules: &CompiledRules) -> Resolution {
        self.resolve_identified(position, event, rules, EventIdentifiers::of(event, rules))
    }

    /// [`IdentityGraph::resolve`] with the event's identifiers already read
    /// (by [`EventIdentifiers::of`] under the same rules), so a caller that
    /// needed them first does not normalize them twice.
    pub fn resolve_identified(
        &mut self,
        position: u64,
        event: &Event,
        rules: &CompiledRules,
        identified: EventIdentifiers,
    ) -> Resolution {
        let EventIdentifiers { usable: mut identifiers, blocked, .. } = identified;
        if event.event_type == EventType::Alias {
            self.type_previous_id(event, rules, &mut identifiers);
        }
        let mut dropped: Vec<(Identifier, String)> =
            blocked.into_iter().map(|(identifier, reason)| (identifier, reason.to_owned())).collect();
        // Drop the least important identifier until linking breaks no limit.
        while let Some(kind) = self.broken_limit(&identifiers, rules) {
            let identifier = identifiers.pop().expect("a broken limit needs two identifiers");
            let reason = format!("linking it would exceed the limit of {} {kind}", rules.limit(&kind));
            dropped.push((identifier, reason));
        }
        let matched: BTreeSet<ProfileId> =
            identifiers.iter().filter_map(|identifier| self.index.get(identifier).copied()).collect();
        let mut resolution = Resolution::default();
        let profile_id = match matched.first().copied() {
            None if identifiers.is_empty() => None,
            None => {
                let id = ProfileId(self.next_id);
                self.next_id += 1;
                self.profiles.insert(id, Profile::new(id));
                resolution.changes.push(IdentityChange::Created { profile: id, identifiers: identifiers.clone() });
                Some(id)
            }
            Some(survivor) => {
                let merged: Vec<ProfileId> = matched.iter().skip(1).copied().collect();
                for &other in &merged {
                    let absorbed = self.profiles.remove(&other).expect("matched profiles exist");
                    for identifier in &absorbed.identifiers {
                        self.index.insert(identifier.clone(), survivor);
                    }
                    self.profiles.get_mut(&survivor).expect("matched profiles exist").absorb(absorbed);
                    self.merged_into.insert(other, survivor);
                }
                if !merged.is_empty() {
                    resolution.changes.push(IdentityChange::Merged {
                        profile: survivor,
                        merged: merged.clone(),
                        identifiers: identifiers.clone(),
                    });
                }
                resolution.merged_away = merged;
                Some(survivor)
            }
        };
        if let Some(id) = profile_id {
            let profile = self.profiles.get_mut(&id).expect("the resolved profile exists");
            let added: Vec<Identifier> =
                identifiers.iter().filter(|identifier| !profile.identifiers.contains(identifier)).cloned().collect();
            for identifier in &added {
                profile.identifiers.push(identifier.clone());
                self.index.insert(identifier.clone(), id);
            }
            if !added.is_empty() && !matched.is_empty() {
                resolution.changes.push(IdentityChange::Attached { profile: id, identifiers: added });
            }
            profile.observe(event, position);
        }
        for (identifier, reason) in dropped {
            resolution.changes.push(IdentityChange::Dropped { profile: profile_id, identifier, reason });
        }
        resolution.profile = profile_id;
        resolution
    }

    /// An alias's `previousId` is whatever the person was known by before.
    /// [`CompiledRules::identifiers_of`] offers it as an anonymous id; when a
    /// profile holds it as a user id, it is that user id instead (and an
    /// anonymous id as well only if a profile holds it as one too, or the
    /// event's own `anonymousId` is the same value).
    fn type_previous_id(&self, event: &Event, rules: &CompiledRules, identifiers: &mut Vec<Identifier>) {
        let Some(previous) = event.previous_id.as_deref() else {
            return;
        };
        let normalizer = rules.normalizer();
        let (Some(as_user), Some(as_anonymous)) =
            (normalizer.identifier(USER_ID, previous), normalizer.identifier(ANONYMOUS_ID, previous))
        else {
            return;
        };
        if !self.index.contains_key(&as_user) || rules.blocked(&as_user, previous).is_some() {
            return;
        }
        let own_anonymous_id = event.anonymous_id.as_deref().and_then(|id| normalizer.identifier(ANONYMOUS_ID, id));
        if !self.index.contains_key(&as_anonymous) && own_anonymous_id.as_ref() != Some(&as_anonymous) {
            identifiers.retain(|identifier| identifier != &as_anonymous);
        }
        if !identifiers.contains(&as_user) {
            identifiers.push(as_user);
            // Stable: the call's own `userId` stays ahead of the previous one.
            identifiers.sort_by_key(|identifier| rules.rank(&identifier.kind));
        }
    }

    /// The identifier type whose limit linking `identifiers` would break, if
    /// any. A profile already over a limit (the rules changed) does not count
    /// against the event, only a link that adds to the excess.
    fn broken_limit(&self, identifiers: &[Identifier], rules: &CompiledRules) -> Option<String> {
        if identifiers.len() < 2 {
            return None;
        }
        let matched: BTreeSet<ProfileId> =
            identifiers.iter().filter_map(|identifier| self.index.get(identifier).copied()).collect();
        let mut values: HashMap<&str, HashSet<&str>> = HashMap::new();
        let mut largest_existing: HashMap<&str, usize> = HashMap::new();
        for id in &matched {
            let mut counts: HashMap<&str, usize> = HashMap::new();
            for identifier in &self.profiles[id].identifiers {
                values.entry(&identifier.kind).or_default().insert(&identifier.value);
                *counts.entry(&identifier.kind).or_default() += 1;
            }
            for (kind, count) in counts {
                let largest = largest_existing.entry(kind).or_default();
                *largest = (*largest).max(count);
            }
        }
        for identifier in identifiers {
            values.entry(&identifier.kind).or_default().insert(&identifier.value);
        }
        let mut broken: Vec<&str> = values
            .iter()
            .filter(|(kind, values)| {
                let allowed = (rules.limit(kind) as usize).max(largest_existing.get(*kind).copied().unwrap_or(0));
                values.len() > allowed
            })
            .map(|(kind, _)| *kind)
            .collect();
        broken.sort_by_key(|kind| rules.rank(kind));
        broken.first().map(|kind| (*kind).to_owned())
    }

    /// Keeps profile ids stable across a rebuild. `held` pairs each event's
    /// profile in `rebuilt` with the profile of `self` that held it before.
    /// A rebuilt profile whose identifiers are exactly those of a profile of
    /// `self` takes its id; then, largest share of events first, a rebuilt
    /// profile takes the id of the old profile that held most of its events;
    /// the rest get fresh ids above every id `self` ever used, in creation
    /// order.
    fn adopt_ids(
        &self,
        rebuilt: IdentityGraph,
        held: impl IntoIterator<Item = (ProfileId, Option<ProfileId>)>,
    ) -> (IdentityGraph, HashMap<ProfileId, ProfileId>) {
        let mut renames: HashMap<ProfileId, ProfileId> = HashMap::new();
        let mut taken: HashSet<ProfileId> = HashSet::new();
        let mut rebuilt_ids: Vec<ProfileId> = rebuilt.profiles.keys().copied().collect();
        rebuilt_ids.sort();
        for id in &rebuilt_ids {
            let identifiers = &rebuilt.profiles[id].identifiers;
            let Some(old) = identifiers.first().and_then(|first| self.lookup(first)) else { continue };
            let same = self.profiles.get(&old).is_some_and(|profile| {
                profile.identifiers.len() == identifiers.len()
                    && identifiers.iter().all(|identifier| self.lookup(identifier) == Some(old))
            });
            if same && taken.insert(old) {
                renames.insert(*id, old);
            }
        }
        // (events shared, first shared event) per pair of rebuilt and old profile.
        let mut shares: HashMap<(ProfileId, ProfileId), (u64, usize)> = HashMap::new();
        for (order, (rebuilt_id, old)) in held.into_iter().enumerate() {
            let (Some(rebuilt_id), Some(old)) =
                (rebuilt.canonical(rebuilt_id), old.and_then(|old| self.canonical(old)))
            else {
                continue;
            };
            shares.entry((rebuilt_id, old)).or_insert((0, order)).0 += 1;
        }
        let mut shares: Vec<_> = shares.into_iter().collect();
        shares
            .sort_by_key(|((rebuilt_id, old), (count, first))| (std::cmp::Reverse(*count), *first, *rebuilt_id, *old));
        for ((rebuilt_id, old), _) in shares {
            if !renames.contains_key(&rebuilt_id) && taken.insert(old) {
                renames.insert(rebuilt_id, old);
            }
        }
        // Profiles merged away during the rebuild need ids of their own too:
        // the rebuild's history names them.
        rebuilt_ids.extend(rebuilt.merged_into.keys());
        rebuilt_ids.sort();
        let mut next = self.next_id.max(rebuilt.next_id);
        for id in rebuilt_ids {
            renames.entry(id).or_insert_with(|| {
                next += 1;
                ProfileId(next - 1)
            });
        }
        let rename = |id: ProfileId| renames.get(&id).copied().unwrap_or(id);
        let profiles = rebuilt.profiles.into_values().map(|mut profile| {
            profile.id = rename(profile.id);
            profile
        });
        // Old ids that no longer name a profile of their own point at the
        // profile that now holds their earliest event.
        let mut merged_into: Vec<(ProfileId, ProfileId)> =
            rebuilt.merged_into.iter().map(|(from, into)| (rename(*from), rename(*into))).collect();
        merged_into.retain(|(from, into)| from != into);
        (IdentityGraph::from_parts(profiles, merged_into, next), renames)
    }
}

/// An event's identifiers under the rules, read once: those it may link by,
/// those the rules block (with why), and for an alias its `previousId` as a
/// user id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventIdentifiers {
    pub usable: Vec<Identifier>,
    pub blocked: Vec<(Identifier, &'static str)>,
    pub previous_id_as_user: Option<Identifier>,
}

impl EventIdentifiers {
    pub fn of(event: &Event, rules: &CompiledRules) -> Self {
        let (usable, blocked) = rules.identifiers_of(event);
        EventIdentifiers { usable, blocked, previous_id_as_user: IdentityGraph::previous_id_as_user(event, rules) }
    }

    /// Every identifier whose owner [`IdentityGraph::resolve`] may look up
    /// for the event: the usable ones, and an alias's `previousId` as a user
    /// id. Loading the owners of these (with their profiles) into a partial
    /// graph is all resolving the event needs.
    pub fn to_look_up(&self) -> impl Iterator<Item = &Identifier> {
        self.usable.iter().chain(self.previous_id_as_user.as_ref())
    }
}

/// A graph rebuilt from the log, with the resolution of every event, ids
/// already made stable against the graph it replaces.
#[derive(Debug)]
pub struct Rebuilt {
    pub graph: IdentityGraph,
    pub resolutions: Vec<(u64, Resolution)>,
}

impl IdentityGraph {
    /// Resolves `events` (the whole log, in order) from scratch under `rules`,
    /// which is how a repair makes profiles exactly as if a bad link had never
    /// existed. `old_owner` says which profile of `self` held the event at a
    /// position. Ids stay stable where they can: a rebuilt profile with the
    /// same identifiers as before keeps its id, and otherwise takes the id of
    /// the profile that held most of its events, if no other took it first.
    pub fn rebuild(
        &self,
        events: impl IntoIterator<Item = (u64, Event)>,
        rules: &CompiledRules,
        old_owner: impl Fn(u64) -> Option<ProfileId>,
    ) -> Rebuilt {
        let mut fresh = IdentityGraph::new();
        let mut resolutions = Vec::new();
        let mut held = Vec::new();
        for (position, event) in events {
            let resolution = fresh.resolve(position, &event, rules);
            if let Some(profile) = resolution.profile {
                held.push((profile, old_owner(position)));
            }
            resolutions.push((position, resolution));
        }
        let (graph, renames) = self.adopt_ids(fresh, held);
        let rename = |id: &mut ProfileId| *id = renames.get(id).copied().unwrap_or(*id);
        for (_, resolution) in &mut resolutions {
            resolution.profile.as_mut().map(rename);
            resolution.merged_away.iter_mut().for_each(rename);
            for change in &mut resolution.changes {
                match change {
                    IdentityChange::Created { profile, .. } | IdentityChange::Attached { profile, .. } => {
                        rename(profile)
                    }
                    IdentityChange::Merged { profile, merged, .. } => {
                        rename(profile);
                        merged.iter_mut().for_each(rename);
                    }
                    IdentityChange::Dropped { profile, .. } | IdentityChange::Repaired { profile, .. } => {
                        profile.as_mut().map(rename);
                    }
                }
            }
        }
        Rebuilt { graph, resolutions }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::{normalize_message, BatchDefaults, IdRequirement, RequestContext};
    use crate::identity::IdentityRules;
    use crate::SourceId;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn event(message: Value) -> Event {
        let source = SourceId::new("src");
        let received_at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let request =
            RequestContext { source_id: &source, received_at, client_ip: None, ids: IdRequirement::UserOrAnonymousId };
        let Value::Object(message) = message else { panic!("object expected") };
        normalize_message(message, None, &BatchDefaults::default(), &request).expect("valid test event")
    }

    fn rules() -> CompiledRules {
        IdentityRules::default().compile().unwrap()
    }

    fn run(graph: &mut IdentityGraph, events: &[Value]) -> Vec<Resolution> {
        let rules = rules();
        events
            .iter()
            .enumerate()
            .map(|(index, message)| graph.resolve(index as u64 + 1, &event(message.clone()), &rules))
            .collect()
    }

    fn identifiers_of(graph: &IdentityGraph, identifier: &str) -> Vec<String> {
        let id = graph.lookup(&identifier.parse().unwrap()).expect("known identifier");
        let mut identifiers: Vec<String> =
            graph.profile(id).unwrap().identifiers.iter().map(ToString::to_string).collect();
        identifiers.sort();
        identifiers
    }

    #[test]
    fn anonymous_browsing_then_login_attaches_the_history() {
        let mut graph = IdentityGraph::new();
        let resolutions = run(
            &mut graph,
            &[
                json!({"type": "page", "anonymousId": "anon-1", "name": "Home"}),
                json!({"type": "track", "anonymousId": "anon-1", "event": "Added to Cart"}),
                json!({"type": "identify", "anonymousId": "anon-1", "userId": "ann", "traits": {"email": "Ann@Example.com"}}),
            ],
        );
        assert_eq!(graph.profile_count(), 1);
        assert!(resolutions.iter().all(|resolution| resolution.profile == Some(ProfileId(1))));
        assert_eq!(
            identifiers_of(&graph, "user_id:ann"),
            vec!["anonymous_id:anon-1", "email:ann@example.com", "user_id:ann"]
        );
        let profile = graph.profile(ProfileId(1)).unwrap();
        assert_eq!(profile.event_counts.get("page"), Some(&1));
        assert_eq!(profile.traits["email"], "Ann@Example.com");
        assert!(matches!(&resolutions[2].changes[..], [IdentityChange::Attached { .. }]));
    }

    #[test]
    fn a_shared_device_does_not_merge_two_logged_in_users() {
        let mut graph = IdentityGraph::new();
        let resolutions = run(
            &mut graph,
            &[
                json!({"type": "identify", "userId": "ann", "anonymousId": "family-ipad", "context": {"device": {"id": "ipad-1"}}}),
                json!({"type": "identify", "userId": "bob", "anonymousId": "family-ipad", "context": {"device": {"id": "ipad-1"}}}),
            ],
        );
        assert_eq!(graph.profile_count(), 2);
        assert_ne!(resolutions[0].profile, resolutions[1].profile);
        assert_eq!(identifiers_of(&graph, "user_id:bob"), vec!["user_id:bob"]);
        let dropped: Vec<String> = resolutions[1]
            .changes
            .iter()
            .filter_map(|change| match change {
                IdentityChange::Dropped { identifier, reason, .. } => {
                    assert!(reason.contains("limit of 1 user_id"), "{reason}");
                    Some(identifier.to_string())
                }
                _ => None,
            })
            .collect();
        assert_eq!(dropped, vec!["device_id:ipad-1", "anonymous_id:family-ipad"], "lowest priority first");
    }

    #[test]
    fn an_email_links_two_profiles_and_the_older_survives() {
        let mut graph = IdentityGraph::new();
        let resolutions = run(
            &mut graph,
            &[
                json!({"type": "track", "anonymousId": "web-1", "event": "Viewed", "context": {"traits": {"email": "c@example.com"}}}),
                json!({"type": "identify", "userId": "carl"}),
                json!({"type": "identify", "userId": "carl", "traits": {"email": "C@example.com", "plan": "pro"}}),
            ],
        );
        assert_eq!(graph.profile_count(), 1);
        assert_eq!(resolutions[2].profile, Some(ProfileId(1)));
        assert_eq!(resolutions[2].merged_away, vec![ProfileId(2)]);
        assert_eq!(graph.canonical(ProfileId(2)), Some(ProfileId(1)), "merged-away ids still resolve");
        assert_eq!(graph.profile(ProfileId(1)).unwrap().event_counts.values().sum::<u64>(), 3);
    }

    #[test]
    fn blocked_values_never_match() {
        let mut graph = IdentityGraph::new();
        let resolutions = run(
            &mut graph,
            &[
                json!({"type": "identify", "userId": "ann", "traits": {"phone": "0000000"}}),
                json!({"type": "identify", "userId": "bob", "traits": {"phone": "0000000"}}),
                json!({"type": "track", "userId": "null", "event": "X"}),
            ],
        );
        assert_eq!(graph.profile_count(), 2);
        assert_eq!(resolutions[2].profile, None, "an event with only a blocked id lands nowhere");
        assert!(
            matches!(&resolutions[2].changes[..], [IdentityChange::Dropped { reason, .. }] if reason == "blocked value")
        );
    }

    #[test]
    fn the_email_limit_drops_the_sixth_email() {
        let mut graph = IdentityGraph::new();
        let events: Vec<Value> = (0..7)
            .map(|n| json!({"type": "identify", "userId": "dana", "traits": {"email": format!("d{n}@example.com")}}))
            .collect();
        let resolutions = run(&mut graph, &events);
        assert_eq!(graph.profile_count(), 1, "the user id still attaches the event");
        assert_eq!(graph.profile(ProfileId(1)).unwrap().count_of("email"), 5);
        assert!(resolutions[5].changes.iter().any(|change| matches!(change, IdentityChange::Dropped { identifier, .. } if identifier.value == "d5@example.com")));
    }

    #[test]
    fn custom_identifiers_and_external_ids_link_silos() {
        let rules = IdentityRules { custom_identifiers: vec!["traits.crm_id".into()], ..IdentityRules::default() }
            .compile()
            .unwrap();
        let mut graph = IdentityGraph::new();
        let crm = graph.resolve(
            1,
            &event(json!({"type": "identify", "anonymousId": "crm-import", "traits": {"crm_id": "C-77"}})),
            &rules,
        );
        let app = graph.resolve(
            2,
            &event(json!({"type": "identify", "userId": "eve", "traits": {"crm_id": "C-77"}, "context": {"externalIds": [{"id": "H9", "type": "hubspot_id", "collection": "users", "encoding": "none"}]}})),
            &rules,
        );
        assert_eq!(crm.profile, app.profile);
        assert!(graph.lookup(&Identifier::new("hubspot_id", "H9")).is_some());
    }

    #[test]
    fn group_calls_link_an_account_but_never_merge_people() {
        let mut graph = IdentityGraph::new();
        run(
            &mut graph,
            &[
                json!({"type": "group", "userId": "ann", "groupId": "acme", "traits": {"name": "Acme", "email": "billing@acme.test"}}),
                json!({"type": "group", "userId": "bob", "groupId": "acme", "traits": {"name": "Acme", "email": "billing@acme.test"}}),
            ],
        );
        assert_eq!(graph.profile_count(), 2);
        assert_eq!(graph.profile(ProfileId(1)).unwrap().groups["acme"]["name"], "Acme");
    }

    /// Regression: `alias previousId=u1 userId=u2` attached a new
    /// `anonymous_id:u1` to u2's profile instead of meeting `user_id:u1`.
    #[test]
    fn regression_an_alias_of_a_user_id_meets_that_user_id() {
        let messages = [
            json!({"type": "identify", "userId": "u1", "traits": {"plan": "free"}}),
            json!({"type": "identify", "userId": "u2"}),
            json!({"type": "alias", "previousId": "u1", "userId": "u2"}),
        ];
        // Under the default limit of one user id, the link is refused and recorded as a drop.
        let mut graph = IdentityGraph::new();
        let resolutions = run(&mut graph, &messages);
        assert_eq!(graph.profile_count(), 2);
        assert_eq!(identifiers_of(&graph, "user_id:u2"), vec!["user_id:u2"], "no anonymous_id:u1 was invented");
        assert!(
            resolutions[2].changes.iter().any(|change| matches!(change,
                IdentityChange::Dropped { identifier, reason, .. } if identifier.to_string() == "user_id:u1" && reason.contains("limit of 1 user_id"))),
            "{:?}",
            resolutions[2].changes
        );
        // Under a higher limit the two users merge.
        let rules =
            IdentityRules { limits: [("user_id".to_owned(), 2)].into(), ..IdentityRules::default() }.compile().unwrap();
        let mut graph = IdentityGraph::new();
        for (index, message) in messages.iter().enumerate() {
            graph.resolve(index as u64 + 1, &event(message.clone()), &rules);
        }
        assert_eq!(graph.profile_count(), 1);
        assert_eq!(identifiers_of(&graph, "user_id:u1"), vec!["user_id:u1", "user_id:u2"]);
        // An alias of an id nobody holds as a user id is an anonymous id, as before.
        let mut graph = IdentityGraph::new();
        run(&mut graph, &[json!({"type": "alias", "previousId": "visitor-9", "userId": "u3"})]);
        assert_eq!(identifiers_of(&graph, "user_id:u3"), vec!["anonymous_id:visitor-9", "user_id:u3"]);
    }

    /// A repair keeps the id of a profile it did not touch even when the
    /// rebuilt profile's first event belonged to another profile before: here
    /// `a1` was split off by the anonymous-id limit, and once the bad email is
    /// blocked the event that hit the limit starts `a1`'s profile.
    #[test]
    fn a_repair_keeps_the_id_of_a_profile_it_rebuilds_from_a_different_first_event() {
        let messages = [
            json!({"type": "identify", "anonymousId": "a2", "context": {"device": {"id": "d0"}}}),
            json!({"type": "alias", "anonymousId": "a5", "previousId": "a5", "userId": "u0"}),
            json!({"type": "identify", "anonymousId": "fallback", "context": {"traits": {"email": "p0@example.com"}}}),
            json!({"type": "identify", "anonymousId": "a3", "context": {"device": {"id": "d2"}, "traits": {"email": "p2@example.com"}}}),
            json!({"type": "alias", "anonymousId": "fallback", "previousId": "a0", "userId": "u0", "context": {"device": {"id": "d0"}, "traits": {"email": "p2@example.com"}}}),
            json!({"type": "identify", "anonymousId": "a1", "context": {"traits": {"email": "p0@example.com"}}}),
            json!({"type": "identify", "anonymousId": "a1"}),
        ];
        let events: Vec<(u64, Event)> =
            messages.iter().enumerate().map(|(index, message)| (index as u64 + 1, event(message.clone()))).collect();
        let mut before = IdentityGraph::new();
        let owners: HashMap<u64, ProfileId> = events
            .iter()
            .filter_map(|(position, event)| Some((*position, before.resolve(*position, event, &rules()).profile?)))
            .collect();
        let split_off = before.lookup(&"anonymous_id:a1".parse().unwrap()).unwrap();
        assert_ne!(split_off, owners[&6], "the limit kept a1 off the merged profile");
        let blocked = IdentityRules {
            blocked_identifiers: vec!["email:p0@example.com".parse().unwrap()],
            ..IdentityRules::default()
        }
        .compile()
        .unwrap();
        let repaired = before.rebuild(events, &blocked, |position| owners.get(&position).copied());
        assert_eq!(repaired.graph.lookup(&"anonymous_id:a1".parse().unwrap()), Some(split_off));
        assert_eq!(repaired.graph.lookup(&"user_id:u0".parse().unwrap()), Some(owners[&1]));
        assert_eq!(repaired.graph.profile_count(), 2);
    }

    /// A small random population: users, anonymous ids, emails, devices.
    fn arbitrary_event() -> impl Strategy<Value = Value> {
        (
            0..4u8,
            proptest::option::of(0..6u8),
            proptest::option::of(0..6u8),
            proptest::option::of(0..5u8),
            proptest::option::of(0..3u8),
            0..4u8,
        )
            .prop_map(|(kind, user, anonymous, email, device, plan)| {
                let kind = ["identify", "track", "page", "alias"][kind as usize];
                let mut message =
                    json!({"type": kind, "event": "E", "timestamp": format!("2024-01-01T00:00:{:02}Z", plan * 7)});
                match user {
                    Some(user) => message["userId"] = json!(format!("u{user}")),
                    None if anonymous.is_none() => message["anonymousId"] = json!("fallback"),
                    None => {}
                }
                if let Some(anonymous) = anonymous {
                    message["anonymousId"] = json!(format!("a{anonymous}"));
                }
                if kind == "alias" {
                    message["previousId"] = json!(format!("a{}", anonymous.unwrap_or(0)));
                    message["userId"] = json!(format!("u{}", user.unwrap_or(0)));
                }
                message["traits"] = json!({"plan": plan});
                if let Some(email) = email {
                    message["context"] = json!({"traits": {"email": format!("p{email}@example.com")}});
                }
                if let Some(device) = device {
                    message["context"]["device"] = json!({"id": format!("d{device}")});
                }
                message
            })
    }

    /// The graph as sets of identifier sets with their traits, ignoring ids.
    fn shape(graph: &IdentityGraph) -> Vec<(Vec<String>, String, u64)> {
        let mut shape: Vec<_> = graph
            .profiles()
            .map(|profile| {
                let mut identifiers: Vec<String> = profile.identifiers.iter().map(ToString::to_string).collect();
                identifiers.sort();
                (identifiers, Value::Object(profile.traits.clone()).to_string(), profile.event_counts.values().sum())
            })
            .collect();
        shape.sort();
        shape
    }

    proptest! {
        /// Repair: blocking a bad identifier and rebuilding gives exactly the
        /// profiles of resolving the log under that rule from the start, and
        /// profiles the bad identifier never touched keep their ids.
        #[test]
        fn repair_equals_resolving_without_the_bad_link(
            messages in proptest::collection::vec(arbitrary_event(), 1..50),
            bad in prop_oneof![Just("device_id:d0"), Just("email:p0@example.com"), Just("anonymous_id:a1")],
        ) {
            let events: Vec<(u64, Event)> = messages.into_iter().enumerate().map(|(index, message)| (index as u64 + 1, event(message))).collect();
            let before_rules = rules();
            let mut before = IdentityGraph::new();
            let mut owner = HashMap::new();
            for (position, event) in &events {
                if let Some(profile) = before.resolve(*position, event, &before_rules).profile {
                    owner.insert(*position, profile);
                }
            }
            let bad: Identifier = bad.parse().unwrap();
            let after_rules = IdentityRules { blocked_identifiers: vec![bad.clone()], ..IdentityRules::default() }.compile().unwrap();
            let repaired = before.rebuild(events.clone(), &after_rules, |position| owner.get(&position).and_then(|id| before.canonical(*id)));
            let mut scratch = IdentityGraph::new();
            for (position, event) in &events {
                scratch.resolve(*position, event, &after_rules);
            }
            prop_assert_eq!(shape(&repaired.graph), shape(&scratch));
            prop_assert!(repaired.graph.lookup(&bad).is_none());
            for profile in before.profiles().filter(|profile| !profile.identifiers.contains(&bad)) {
                if let Some(kept) = repaired.graph.profiles().find(|candidate| candidate.identifiers == profile.identifiers) {
                    prop_assert_eq!(kept.id, profile.id, "an untouched profile keeps its id");
                }
            }
            for (_, resolution) in &repaired.resolutions {
                if let Some(profile) = resolution.profile {
                    prop_assert!(repaired.graph.canonical(profile).is_some());
                }
            }
        }

        #[test]
        fn no_profile_ever_exceeds_a_limit(messages in proptest::collection::vec(arbitrary_event(), 1..60)) {
            let rules = IdentityRules { limits: [("user_id".to_owned(), 1), ("email".to_owned(), 2)].into(), ..IdentityRules::default() }.compile().unwrap();
            let mut graph = IdentityGraph::new();
            for (position, message) in messages.iter().enumerate() {
                graph.resolve(position as u64 + 1, &event(message.clone()), &rules);
                for profile in graph.profiles() {
                    for identifier in &profile.identifiers {
                        prop_assert!(profile.count_of(&identifier.kind) as u32 <= rules.limit(&identifier.kind), "{:?}", profile.identifiers);
                        prop_assert_eq!(graph.lookup(identifier), Some(profile.id));
                    }
                }
            }
            let events: u64 = graph.profiles().map(|profile| profile.event_counts.values().sum::<u64>()).sum();
            prop_assert!(events <= messages.len() as u64);
        }

        #[test]
        fn replaying_the_same_events_gives_the_same_graph(messages in proptest::collection::vec(arbitrary_event(), 1..40)) {
            let mut first = IdentityGraph::new();
            let mut second = IdentityGraph::new();
            let events: Vec<Event> = messages.into_iter().map(event).collect();
            let rules = rules();
            for (position, event) in events.iter().enumerate() {
                first.resolve(position as u64 + 1, event, &rules);
            }
            // Stored and reloaded halfway, as after a restart.
            let half = events.len() / 2;
            for (position, event) in events.iter().enumerate().take(half) {
                second.resolve(position as u64 + 1, event, &rules);
            }
            let mut second = IdentityGraph::from_parts(second.profiles().cloned().collect::<Vec<_>>(), second.merged_into().collect::<Vec<_>>(), second.next_id());
            for (position, event) in events.iter().enumerate().skip(half) {
                second.resolve(position as u64 + 1, event, &rules);
            }
            prop_assert_eq!(first, second);
        }
    }
}
