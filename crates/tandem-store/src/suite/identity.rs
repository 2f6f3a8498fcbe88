//! What every backend's [`IdentityStore`](crate::IdentityStore) must do.

use super::{batch, record};
use crate::browse::{find_profiles, ProfileQuery};
use crate::{
    CommitOutcome, EventLink, HistoryRecord, IdentityCommit, IdentityRepair, IngestBatch, Store, TimelineCursor,
    UnresolvedEvent,
};
use tandem_core::{EventType, Identifier, IdentityChange, IdentityRules, LogPosition, Profile, ProfileId, SourceKind};

pub fn identity_commits_round_trip_and_refuse_stale_writers(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    store
        .append(&[batch((1..=3).map(|n| record(&web, &format!("m{n}"), EventType::Identify, n)).collect())], 0)
        .unwrap();
    let empty = store.identity_state().unwrap();
    assert_eq!((empty.position, empty.next_profile_id, empty.live_profiles), (LogPosition(0), 1, 0));
    assert_eq!(empty.rules, IdentityRules::default());
    let ann = Identifier::new("user_id", "ann");
    let anon = Identifier::new("anonymous_id", "a1");
    let mut first = Profile::new(ProfileId(1));
    first.identifiers = vec![anon.clone()];
    let mut second = Profile::new(ProfileId(2));
    second.identifiers = vec![ann.clone()];
    let commit = IdentityCommit {
        epoch: empty.epoch,
        from: LogPosition(0),
        to: LogPosition(2),
        profiles: vec![first.clone(), second.clone()].into(),
        identifiers: vec![(anon.clone(), ProfileId(1)), (ann.clone(), ProfileId(2))],
        events: vec![link(1, 1), link(2, 2)],
        history: vec![HistoryRecord {
            position: Some(LogPosition(1)),
            profile: Some(ProfileId(1)),
            change: IdentityChange::Created { profile: ProfileId(1), identifiers: vec![anon.clone()] },
            recorded_at_ms: 5,
        }],
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&commit).unwrap(), CommitOutcome::Committed);
    assert_eq!(
        store.commit_identity(&commit).unwrap(),
        CommitOutcome::StalePosition,
        "a commit from an old position is refused"
    );
    // Event 3 merges profile 2 into profile 1.
    first.identifiers.push(ann.clone());
    let merge = IdentityCommit {
        epoch: empty.epoch,
        from: LogPosition(2),
        to: LogPosition(3),
        profiles: vec![first.clone()].into(),
        merged: vec![(ProfileId(2), ProfileId(1))],
        events: vec![link(3, 1)],
        history: vec![HistoryRecord {
            position: Some(LogPosition(3)),
            profile: Some(ProfileId(1)),
            change: IdentityChange::Merged {
                profile: ProfileId(1),
                merged: vec![ProfileId(2)],
                identifiers: vec![ann.clone()],
            },
            recorded_at_ms: 6,
        }],
        next_profile_id: 3,
        unresolved: vec![UnresolvedEvent { position: LogPosition(3), reason: "unreadable".into() }],
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&merge).unwrap(), CommitOutcome::Committed);
    assert_eq!(
        store.unresolved_events(LogPosition(0), 10).unwrap(),
        vec![UnresolvedEvent { position: LogPosition(3), reason: "unreadable".into() }]
    );
    assert!(store.unresolved_events(LogPosition(3), 10).unwrap().is_empty());
    assert_eq!(store.profile(ProfileId(2)).unwrap(), Some(first.clone()), "a merged id resolves to its survivor");
    assert_eq!(store.profile_by_identifier(&ann).unwrap(), Some(first.clone()));
    assert_eq!(store.profile_by_identifier(&Identifier::new("email", "x@y.z")).unwrap(), None);
    let timeline: Vec<u64> =
        store.profile_events(ProfileId(1), None, 10).unwrap().iter().map(|entry| entry.position.0).collect();
    assert_eq!(timeline, vec![3, 2, 1], "newest first, merged profile's events included");
    let newest = TimelineCursor::at(&store.profile_events(ProfileId(1), None, 1).unwrap()[0]);
    let page: Vec<u64> =
        store.profile_events(ProfileId(1), Some(newest), 1).unwrap().iter().map(|entry| entry.position.0).collect();
    assert_eq!(page, vec![2]);
    assert_eq!(store.identity_history(ProfileId(2)).unwrap().len(), 2);
    assert_eq!(store.event_owners(LogPosition(0), LogPosition(3)).unwrap().len(), 3);
    let snapshot = store.identity_state().unwrap();
    assert_eq!((snapshot.position, snapshot.live_profiles, snapshot.next_profile_id), (LogPosition(3), 1, 3));
    let stats = store.stats().unwrap();
    assert_eq!((stats.resolver_position, stats.resolver_lag, stats.profiles), (LogPosition(3), 0, 1));

    // Changing the rules starts a new epoch: commits computed before are refused.
    let rules = IdentityRules { default_limit: 3, ..IdentityRules::default() };
    store.set_identity_rules(&rules).unwrap();
    let stale =
        IdentityCommit { epoch: snapshot.epoch, from: LogPosition(3), to: LogPosition(3), ..IdentityCommit::default() };
    assert_eq!(store.commit_identity(&stale).unwrap(), CommitOutcome::EpochChanged);
    let reloaded = store.identity_state().unwrap();
    assert_eq!(reloaded.rules, rules);
    assert_eq!(store.identity_rules().unwrap(), rules, "the rules alone");
    assert_eq!(
        store.stage_cursor(crate::Stage::RESOLVE).unwrap(),
        Some(crate::StageCursor { position: LogPosition(3), epoch: reloaded.epoch })
    );
    assert_eq!(store.stage_cursor(crate::Stage("audience")).unwrap(), None);
    assert!(reloaded.epoch > snapshot.epoch);
    // A repair replays part of the graph: here `user_id:ann` is blocked, so
    // event 3 no longer merges, and profile 2 comes back on its own.
    let mut kept = Profile::new(ProfileId(1));
    kept.identifiers = vec![anon.clone()];
    let blocked = IdentityRules { blocked_identifiers: vec![ann.clone()], ..rules.clone() };
    let repair = IdentityRepair {
        commit: IdentityCommit {
            epoch: reloaded.epoch,
            from: LogPosition(3),
            to: LogPosition(3),
            profiles: vec![kept.clone(), second.clone()].into(),
            identifiers: vec![(anon.clone(), ProfileId(1)), (ann.clone(), ProfileId(2))],
            events: vec![link(1, 1), link(2, 2), link(3, 1)],
            history: vec![HistoryRecord {
                position: Some(LogPosition(3)),
                profile: Some(ProfileId(1)),
                change: IdentityChange::Dropped {
                    profile: Some(ProfileId(1)),
                    identifier: ann.clone(),
                    reason: "blocked identifier".into(),
                },
                recorded_at_ms: 7,
            }],
            next_profile_id: 3,
            rules: Some(blocked.clone()),
            ..IdentityCommit::default()
        },
        replaced_profiles: vec![ProfileId(1)],
        replayed: vec![LogPosition(1), LogPosition(2), LogPosition(3)],
    };
    let stale_repair = IdentityRepair {
        commit: IdentityCommit { from: LogPosition(2), to: LogPosition(2), ..repair.commit.clone() },
        ..repair.clone()
    };
    assert_eq!(store.repair_identity(&stale_repair).unwrap(), CommitOutcome::StalePosition);
    assert_eq!(store.repair_identity(&repair).unwrap(), CommitOutcome::Committed);
    assert_eq!(store.repair_identity(&repair).unwrap(), CommitOutcome::EpochChanged, "a repair starts a new epoch");
    let repaired = store.identity_state().unwrap();
    assert_eq!((repaired.rules, repaired.live_profiles), (blocked, 2));
    assert_eq!(store.profile(ProfileId(2)).unwrap(), Some(second.clone()), "a merged-away id can live again");
    assert_eq!(store.profile_by_identifier(&ann).unwrap(), Some(second.clone()));
    assert_eq!(store.profile_by_identifier(&anon).unwrap(), Some(kept));
    let timeline = |id: u64| -> Vec<u64> {
        store.profile_events(ProfileId(id), None, 10).unwrap().iter().map(|entry| entry.position.0).collect()
    };
    assert_eq!((timeline(1), timeline(2)), (vec![3, 1], vec![2]));
    let history = store.identity_history(ProfileId(1)).unwrap();
    assert_eq!(history.len(), 1, "the replayed events' old history is replaced: {history:?}");
    assert!(matches!(history[0].change, IdentityChange::Dropped { .. }));
    assert_eq!(store.dropped_at(&[ann.clone(), bob()]).unwrap(), vec![(LogPosition(3), Some(ProfileId(1)))]);
    assert_eq!(store.stats().unwrap().unresolved, 1, "a repair keeps the unresolved list");
    // A replaced profile the repair neither writes nor retires is gone.
    let gone = IdentityRepair {
        commit: IdentityCommit {
            epoch: repaired.epoch,
            from: LogPosition(3),
            to: LogPosition(3),
            next_profile_id: 3,
            ..IdentityCommit::default()
        },
        replaced_profiles: vec![ProfileId(1)],
        replayed: vec![LogPosition(1), LogPosition(3)],
    };
    assert_eq!(store.repair_identity(&gone).unwrap(), CommitOutcome::Committed);
    assert_eq!(store.profile(ProfileId(1)).unwrap(), None);
    assert_eq!(store.profile_by_identifier(&anon).unwrap(), None);
    assert_eq!(store.identity_state().unwrap().live_profiles, 1);
    assert_eq!(store.profile_by_identifier(&ann).unwrap(), Some(second), "profiles it does not replace stay");
}

fn bob() -> Identifier {
    Identifier::new("user_id", "bob")
}

pub fn batched_look_ups_find_live_owners_and_profiles(store: &impl Store) {
    let ann = Identifier::new("user_id", "ann");
    let bob = Identifier::new("user_id", "bob");
    let mut first = Profile::new(ProfileId(1));
    first.identifiers = vec![ann.clone()];
    let mut second = Profile::new(ProfileId(2));
    second.identifiers = vec![bob.clone()];
    let epoch = store.identity_state().unwrap().epoch;
    let commit = IdentityCommit {
        epoch,
        profiles: vec![first.clone(), second.clone()].into(),
        identifiers: vec![(ann.clone(), ProfileId(1)), (bob.clone(), ProfileId(2))],
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&commit).unwrap(), CommitOutcome::Committed);
    let mut owners =
        store.identifier_owners(&[ann.clone(), Identifier::new("email", "nobody@x.y"), bob.clone()]).unwrap();
    owners.sort_by_key(|(_, profile)| *profile);
    assert_eq!(owners, vec![(ann.clone(), ProfileId(1)), (bob.clone(), ProfileId(2))], "unknown ids are left out");
    first.identifiers.push(bob.clone());
    let merge = IdentityCommit {
        epoch,
        profiles: vec![first.clone()].into(),
        merged: vec![(ProfileId(2), ProfileId(1))],
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&merge).unwrap(), CommitOutcome::Committed);
    assert_eq!(store.identifier_owners(std::slice::from_ref(&bob)).unwrap(), vec![(bob, ProfileId(1))]);
    assert_eq!(
        store.profiles(&[ProfileId(1), ProfileId(2), ProfileId(9)]).unwrap(),
        vec![first],
        "merged-away and unknown ids are skipped"
    );
}

pub fn profiles_list_by_id_and_search_by_identifier_prefix_and_trait(store: &impl Store) {
    let empty = store.identity_state().unwrap();
    let mut profiles = Vec::new();
    let mut identifiers = Vec::new();
    for n in 1..=7u64 {
        let mut profile = Profile::new(ProfileId(n));
        let email = Identifier::new("email", format!("{}{n}@example.com", if n % 2 == 0 { "ann" } else { "bob" }));
        profile.identifiers = vec![email.clone()];
        profile.traits.insert("plan".into(), serde_json::json!(if n <= 3 { "Pro" } else { "free" }));
        profile.traits.insert("seats".into(), serde_json::json!(n));
        identifiers.push((email, ProfileId(n)));
        profiles.push(profile);
    }
    let commit = IdentityCommit {
        epoch: empty.epoch,
        profiles: profiles.into(),
        identifiers,
        next_profile_id: 8,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&commit).unwrap(), CommitOutcome::Committed);
    // Profile 7 is then merged into profile 6: it is no longer listed.
    let merge = IdentityCommit {
        epoch: empty.epoch,
        merged: vec![(ProfileId(7), ProfileId(6))],
        next_profile_id: 8,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&merge).unwrap(), CommitOutcome::Committed);
    let listed: Vec<u64> = store.list_profiles(None, 10).unwrap().iter().map(|profile| profile.id.0).collect();
    assert_eq!(listed, [1, 2, 3, 4, 5, 6]);
    let after: Vec<u64> =
        store.list_profiles(Some(ProfileId(4)), 10).unwrap().iter().map(|profile| profile.id.0).collect();
    assert_eq!(after, [5, 6]);
    let ids = |after: Option<u64>, limit: usize| -> Vec<u64> {
        store.list_profile_ids(after.map(ProfileId), limit).unwrap().iter().map(|id| id.0).collect()
    };
    assert_eq!(ids(None, 10), listed, "ids are listed as whole profiles are");
    assert_eq!(ids(Some(4), 10), after);
    assert_eq!(ids(Some(1), 2), [2, 3]);
    assert_eq!(ids(Some(6), 10), Vec::<u64>::new(), "the merged-away profile 7 is not listed");

    let page_ids =
        |page: &crate::browse::ProfilePage| page.profiles.iter().map(|profile| profile.id.0).collect::<Vec<_>>();
    let first = find_profiles(store, &ProfileQuery::default(), 4, usize::MAX).unwrap();
    assert_eq!((page_ids(&first), first.next_after.as_deref()), (vec![1, 2, 3, 4], Some("prof_4")));
    let second =
        find_profiles(store, &ProfileQuery { after: first.next_after, ..ProfileQuery::default() }, 4, usize::MAX);
    let second = second.unwrap();
    assert_eq!((page_ids(&second), second.next_after), (vec![5, 6], None));
    let pro = ProfileQuery { traits: vec![("plan".into(), "pro".into())], ..ProfileQuery::default() };
    assert_eq!(page_ids(&find_profiles(store, &pro, 10, usize::MAX).unwrap()), [1, 2, 3], "strings match in any case");
    let three_seats = ProfileQuery { traits: vec![("seats".into(), "3".into())], ..ProfileQuery::default() };
    assert_eq!(page_ids(&find_profiles(store, &three_seats, 10, usize::MAX).unwrap()), [3]);
    let anns = ProfileQuery { identifier_prefix: Some(Identifier::new("email", "ann")), ..ProfileQuery::default() };
    assert_eq!(page_ids(&find_profiles(store, &anns, 10, usize::MAX).unwrap()), [2, 4, 6]);
    let first_ann = find_profiles(store, &anns, 1, usize::MAX).unwrap();
    let next = ProfileQuery { after: first_ann.next_after, ..anns.clone() };
    assert_eq!(page_ids(&find_profiles(store, &next, 10, usize::MAX).unwrap()), [4, 6]);
    let free_anns = ProfileQuery { traits: vec![("plan".into(), "free".into())], ..anns };
    assert_eq!(page_ids(&find_profiles(store, &free_anns, 10, usize::MAX).unwrap()), [4, 6]);
    let bad = ProfileQuery { after: Some("nonsense".into()), ..ProfileQuery::default() };
    assert!(find_profiles(store, &bad, 10, usize::MAX).is_err());
}

/// Timelines are ordered by event time, then position; an event that arrives
/// late with an old timestamp takes its place in time, and paging with the
/// cursor of each page's last event visits every event once.
pub fn timelines_follow_event_time_and_page_by_cursor(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    // Positions 1..=5 with times 50, 10, 30, 10, 40: two share a time.
    let times = [50, 10, 30, 10, 40];
    let records = times
        .iter()
        .enumerate()
        .map(|(index, time)| {
            let mut record = record(&web, &format!("m{index}"), EventType::Track, 1_000);
            record.timestamp_ms = *time;
            record
        })
        .collect();
    store.append(&[IngestBatch { records, ..Default::default() }], 0).unwrap();
    let epoch = store.identity_state().unwrap().epoch;
    let commit = IdentityCommit {
        epoch,
        to: LogPosition(5),
        profiles: vec![Profile::new(ProfileId(1))].into(),
        events: (1..=5u64)
            .map(|position| EventLink {
                position: LogPosition(position),
                timestamp_ms: times[position as usize - 1],
                profile: ProfileId(1),
            })
            .collect(),
        next_profile_id: 2,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&commit).unwrap(), CommitOutcome::Committed);
    let all: Vec<u64> = store.profile_events(ProfileId(1), None, 10).unwrap().iter().map(|e| e.position.0).collect();
    assert_eq!(all, vec![1, 5, 3, 4, 2], "newest event time first; equal times by position, higher first");
    let mut paged = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.profile_events(ProfileId(1), cursor, 2).unwrap();
        paged.extend(page.iter().map(|entry| entry.position.0));
        match page.last() {
            Some(last) if page.len() == 2 => cursor = Some(TimelineCursor::at(last)),
            _ => break,
        }
    }
    assert_eq!(paged, all, "pages of two visit every event once, in order");
    let cursor = TimelineCursor { timestamp_ms: 10, position: LogPosition(4) };
    assert_eq!(cursor.to_string().parse::<TimelineCursor>(), Ok(cursor));
    assert!("10".parse::<TimelineCursor>().is_err());
    assert!("x_4".parse::<TimelineCursor>().is_err());
}

/// Many profiles' events come back from one read, each with the profile
/// whose timeline holds it (a merged profile's events with its survivor),
/// only those stamped at or after the time asked for.
pub fn events_of_many_profiles_are_read_at_once_from_a_time(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    // Positions 1..=6 at times 10, 20, 30, 40, 50, 60.
    let records = (1..=6)
        .map(|n| {
            let mut record = record(&web, &format!("m{n}"), EventType::Track, 1_000);
            record.timestamp_ms = n * 10;
            record
        })
        .collect();
    store.append(&[IngestBatch { records, ..Default::default() }], 0).unwrap();
    let epoch = store.identity_state().unwrap().epoch;
    let owners = [1, 2, 1, 3, 2, 3];
    let linked = |positions: std::ops::RangeInclusive<u64>| -> Vec<EventLink> {
        positions
            .map(|position| EventLink {
                position: LogPosition(position),
                timestamp_ms: position as i64 * 10,
                profile: ProfileId(owners[position as usize - 1]),
            })
            .collect()
    };
    let created = IdentityCommit {
        epoch,
        to: LogPosition(5),
        profiles: vec![Profile::new(ProfileId(1)), Profile::new(ProfileId(2)), Profile::new(ProfileId(3))].into(),
        events: linked(1..=5),
        next_profile_id: 4,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&created).unwrap(), CommitOutcome::Committed);
    // Event 6 merges profile 2 into profile 3.
    let merged = IdentityCommit {
        epoch,
        from: LogPosition(5),
        to: LogPosition(6),
        profiles: vec![Profile::new(ProfileId(3))].into(),
        merged: vec![(ProfileId(2), ProfileId(3))],
        events: linked(6..=6),
        next_profile_id: 4,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&merged).unwrap(), CommitOutcome::Committed);
    let read = |ids: &[u64], since_ms: i64| -> Vec<(u64, u64, i64)> {
        let ids: Vec<ProfileId> = ids.iter().copied().map(ProfileId).collect();
        let mut found: Vec<(u64, u64, i64)> = store
            .events_of_profiles(&ids, since_ms)
            .unwrap()
            .into_iter()
            .map(|(profile, entry)| (profile.0, entry.position.0, entry.timestamp_ms))
            .collect();
        found.sort();
        found
    };
    assert_eq!(
        read(&[3, 1, 2], i64::MIN),
        vec![(1, 1, 10), (1, 3, 30), (3, 2, 20), (3, 4, 40), (3, 5, 50), (3, 6, 60)],
        "each event once, on the timeline that holds it; the merged-away id has none"
    );
    assert_eq!(read(&[1, 3], 30), vec![(1, 3, 30), (3, 4, 40), (3, 5, 50), (3, 6, 60)], "from a time, inclusive");
    assert_eq!(read(&[1], 31), vec![]);
    assert_eq!(read(&[], i64::MIN), vec![]);
    let (_, entry) = store
        .events_of_profiles(&[ProfileId(1)], 0)
        .unwrap()
        .into_iter()
        .find(|(_, entry)| entry.position == LogPosition(1))
        .expect("event 1");
    assert_eq!(
        entry,
        store.profile_events(ProfileId(1), None, 10).unwrap().pop().unwrap(),
        "entries as a timeline reads them"
    );
}

/// Event `position` tied to profile `profile`, with the time `record()` gave
/// it: received at `position` ms, dated 5 ms earlier.
fn link(position: u64, profile: u64) -> EventLink {
    EventLink { position: LogPosition(position), timestamp_ms: position as i64 - 5, profile: ProfileId(profile) }
}

pub fn merges_and_drops_list_newest_first_a_page_at_a_time(store: &impl Store) {
    let web = store.create_source("web", SourceKind::Website).unwrap().id;
    store
        .append(&[batch((1..=6).map(|n| record(&web, &format!("m{n}"), EventType::Identify, n)).collect())], 0)
        .unwrap();
    let (ann, anon, tablet) = (
        Identifier::new("user_id", "ann"),
        Identifier::new("anonymous_id", "a1"),
        Identifier::new("device_id", "tablet"),
    );
    let entry = |position: u64, change: IdentityChange| HistoryRecord {
        position: Some(LogPosition(position)),
        profile: change.profile(),
        change,
        recorded_at_ms: position as i64,
    };
    let merged = entry(
        3,
        IdentityChange::Merged {
            profile: ProfileId(1),
            merged: vec![ProfileId(2)],
            identifiers: vec![ann.clone(), anon.clone()],
        },
    );
    let dropped = |position: u64| {
        entry(
            position,
            IdentityChange::Dropped {
                profile: Some(ProfileId(1)),
                identifier: tablet.clone(),
                reason: "user_id limit 1".to_owned(),
            },
        )
    };
    let history = vec![
        entry(1, IdentityChange::Created { profile: ProfileId(1), identifiers: vec![anon.clone()] }),
        entry(2, IdentityChange::Created { profile: ProfileId(2), identifiers: vec![ann.clone()] }),
        merged.clone(),
        entry(4, IdentityChange::Attached { profile: ProfileId(1), identifiers: vec![tablet.clone()] }),
        dropped(5),
        entry(
            6,
            IdentityChange::Repaired {
                profile: Some(ProfileId(1)),
                identifier: tablet.clone(),
                action: "unlink".to_owned(),
            },
        ),
        dropped(6),
    ];
    let mut profile = Profile::new(ProfileId(1));
    profile.identifiers = vec![anon.clone(), ann.clone()];
    let commit = IdentityCommit {
        epoch: store.identity_state().unwrap().epoch,
        from: LogPosition(0),
        to: LogPosition(6),
        profiles: vec![profile].into(),
        identifiers: vec![(anon, ProfileId(1)), (ann, ProfileId(1))],
        history,
        next_profile_id: 3,
        ..IdentityCommit::default()
    };
    assert_eq!(store.commit_identity(&commit).unwrap(), CommitOutcome::Committed);

    let all = store.merges_and_drops(None, 10).unwrap();
    let records: Vec<HistoryRecord> = all.iter().map(|(_, record)| record.clone()).collect();
    assert_eq!(records, vec![dropped(6), dropped(5), merged.clone()], "only merges and drops, newest first");
    assert!(all.windows(2).all(|pair| pair[0].0 > pair[1].0), "ids decrease");
    let first_page = store.merges_and_drops(None, 2).unwrap();
    assert_eq!(first_page, all[..2]);
    let next_page = store.merges_and_drops(Some(first_page[1].0), 2).unwrap();
    assert_eq!(next_page, all[2..]);
    assert!(store.merges_and_drops(Some(all[2].0), 2).unwrap().is_empty());
}
