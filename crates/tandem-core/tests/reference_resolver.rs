//! A deliberately naive resolver written from the identity rules the README
//! states — no code shared with `tandem_core::resolve` or the identifier
//! extraction in `tandem_core::identity` — and a property test that the real
//! resolver partitions identifiers, drops identifiers and keeps traits exactly
//! as the README says, on random streams rich in collisions, placeholders,
//! aliases and case variants. When the two disagree, either the code or the
//! README is wrong.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use tandem_core::collect::{normalize_message, BatchDefaults, IdRequirement, RequestContext};
use tandem_core::{Event, IdentityChange, IdentityGraph, IdentityRules, SourceId};

/// The README's default rules, restated.
const BLOCKED_VALUES: [&str; 6] = ["-1", "null", "anonymous", "undefined", "none", "nil"];
const PRIORITY: [&str; 3] = ["user_id", "email", "phone"];

fn limit(kind: &str) -> usize {
    if kind == "user_id" {
        1
    } else {
        5
    }
}

fn rank(kind: &str) -> (usize, String) {
    match PRIORITY.iter().position(|listed| *listed == kind) {
        Some(position) => (position, String::new()),
        None => (PRIORITY.len(), kind.to_owned()),
    }
}

/// What the README says of each phone form the generator writes.
enum Phone {
    Number(&'static str),
    Placeholder(&'static str),
    Invalid,
}

fn phone(written: &str) -> Phone {
    match written {
        "+49 30 1234567" | "(0049) 30 1234567" | "(+49) 30 1234567" => Phone::Number("+49301234567"),
        "+1 415 555 2671" => Phone::Number("+14155552671"),
        "+44 7777 777777" => Phone::Placeholder("+447777777777"),
        _ => Phone::Invalid,
    }
}

fn email_placeholder(email: &str) -> bool {
    let (local, domain) = email.split_once('@').unwrap();
    ["noreply", "no-reply", "test", "none"].contains(&local) || domain == "test.com"
}

/// One candidate identifier: `(type, value)` and whether a rule blocks it.
type Candidate = ((String, String), bool);

fn candidates(event: &Value) -> Vec<Candidate> {
    let mut found = Vec::new();
    let all_zero_or_dash = |text: &str| text.chars().all(|c| c == '0' || c == '-');
    let plain = |kind: &str, value: Option<&Value>, found: &mut Vec<Candidate>| {
        if let Some(Value::String(text)) = value {
            let value = text.trim().to_owned();
            if !value.is_empty() {
                let blocked = BLOCKED_VALUES.contains(&value.to_lowercase().as_str()) || all_zero_or_dash(&value);
                found.push(((kind.to_owned(), value), blocked));
            }
        }
    };
    plain("user_id", event.get("userId"), &mut found);
    plain("anonymous_id", event.get("anonymousId"), &mut found);
    if event["type"] == "alias" {
        plain("anonymous_id", event.get("previousId"), &mut found);
    }
    let empty = Map::new();
    let object = |value: Option<&Value>| value.and_then(Value::as_object).unwrap_or(&empty).clone();
    let traits = if event["type"] == "group" { empty.clone() } else { object(event.get("traits")) };
    for source in [traits, object(event["context"].get("traits")), object(event.get("properties"))] {
        if let Some(Value::String(email)) = source.get("email") {
            let email = email.trim().to_lowercase();
            if email.matches('@').count() == 1 && !email.starts_with('@') && !email.ends_with('@') {
                let blocked = email_placeholder(&email);
                found.push((("email".to_owned(), email), blocked));
            }
        }
        if let Some(Value::String(written)) = source.get("phone") {
            match phone(written) {
                Phone::Number(e164) => found.push((("phone".to_owned(), e164.to_owned()), false)),
                Phone::Placeholder(e164) => found.push((("phone".to_owned(), e164.to_owned()), true)),
                Phone::Invalid => {}
            }
        }
    }
    plain("device_id", event["context"].get("device").and_then(|device| device.get("id")), &mut found);
    for external in event["context"].get("externalIds").and_then(Value::as_array).into_iter().flatten() {
        let kind: String = external["type"]
            .as_str()
            .unwrap()
            .trim()
            .to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' })
            .collect();
        plain(&kind, external.get("id"), &mut found);
    }
    let mut unique: Vec<Candidate> = Vec::new();
    for candidate in found {
        if !unique.iter().any(|(seen, _)| *seen == candidate.0) {
            unique.push(candidate);
        }
    }
    unique
}

#[derive(Clone, Debug, Default)]
struct NaiveProfile {
    id: u64,
    identifiers: Vec<(String, String)>,
    /// trait → ((timestamp, position), value)
    traits: BTreeMap<String, ((i64, u64), Value)>,
    events: u64,
}

#[derive(Default)]
struct Naive {
    profiles: Vec<NaiveProfile>,
    next_id: u64,
    /// (position, "type:value") of every identifier not used, blocked or over a limit.
    drops: Vec<(u64, String)>,
}

impl Naive {
    fn holder(&self, identifier: &(String, String)) -> Option<usize> {
        self.profiles.iter().position(|profile| profile.identifiers.contains(identifier))
    }

    fn resolve(&mut self, position: u64, event: &Value) {
        let mut usable: Vec<(String, String)> = Vec::new();
        for (identifier, blocked) in candidates(event) {
            if blocked {
                self.drops.push((position, format!("{}:{}", identifier.0, identifier.1)));
            } else {
                usable.push(identifier);
            }
        }
        // An alias's previousId is a user id when a profile holds it as one.
        if event["type"] == "alias" {
            let previous = event["previousId"].as_str().unwrap().trim().to_owned();
            let as_user = ("user_id".to_owned(), previous.clone());
            let as_anonymous = ("anonymous_id".to_owned(), previous.clone());
            if self.holder(&as_user).is_some() {
                let own = event.get("anonymousId").and_then(Value::as_str).map(str::trim) == Some(previous.as_str());
                if self.holder(&as_anonymous).is_none() && !own {
                    usable.retain(|identifier| *identifier != as_anonymous);
                }
                if !usable.contains(&as_user) {
                    usable.push(as_user);
                }
            }
        }
        usable.sort_by_key(|(kind, _)| rank(kind));
        loop {
            let matched: BTreeSet<usize> = usable.iter().filter_map(|identifier| self.holder(identifier)).collect();
            let mut union: BTreeSet<(String, String)> = usable.iter().cloned().collect();
            for index in &matched {
                union.extend(self.profiles[*index].identifiers.iter().cloned());
            }
            let broken =
                union.iter().any(|(kind, _)| union.iter().filter(|(other, _)| other == kind).count() > limit(kind));
            if !broken {
                break;
            }
            let (kind, value) = usable.pop().unwrap();
            self.drops.push((position, format!("{kind}:{value}")));
        }
        if usable.is_empty() {
            return;
        }
        let mut matched: Vec<usize> = usable.iter().filter_map(|identifier| self.holder(identifier)).collect();
        matched.sort_by_key(|index| self.profiles[*index].id);
        matched.dedup();
        let survivor = match matched.first() {
            None => {
                self.next_id += 1;
                self.profiles.push(NaiveProfile { id: self.next_id, ..NaiveProfile::default() });
                self.profiles.len() - 1
            }
            Some(first) => *first,
        };
        let survivor_id = self.profiles[survivor].id;
        for index in matched.iter().skip(1) {
            let absorbed = self.profiles[*index].clone();
            let into = &mut self.profiles[survivor];
            for identifier in absorbed.identifiers {
                if !into.identifiers.contains(&identifier) {
                    into.identifiers.push(identifier);
                }
            }
            for (key, (stamp, value)) in absorbed.traits {
                if into.traits.get(&key).is_none_or(|(held, _)| stamp > *held) {
                    into.traits.insert(key, (stamp, value));
                }
            }
            into.events += absorbed.events;
        }
        let merged: BTreeSet<u64> = matched.iter().skip(1).map(|index| self.profiles[*index].id).collect();
        self.profiles.retain(|profile| !merged.contains(&profile.id));
        let profile = self.profiles.iter_mut().find(|profile| profile.id == survivor_id).unwrap();
        for identifier in usable {
            if !profile.identifiers.contains(&identifier) {
                profile.identifiers.push(identifier);
            }
        }
        profile.events += 1;
        let timestamp = chrono::DateTime::parse_from_rfc3339(event["timestamp"].as_str().unwrap()).unwrap();
        let stamp = (timestamp.timestamp_millis(), position);
        let mut set = |traits: Option<&Value>| {
            for (key, value) in traits.and_then(Value::as_object).into_iter().flatten() {
                if profile.traits.get(key).is_none_or(|(held, _)| stamp > *held) {
                    profile.traits.insert(key.clone(), (stamp, value.clone()));
                }
            }
        };
        if event["type"] == "identify" {
            set(event.get("traits"));
        }
        set(event["context"].get("traits"));
    }
}

/// Identifier sets, each with its traits and event count.
type Partition = BTreeMap<BTreeSet<String>, (BTreeMap<String, Value>, u64)>;

fn naive_partition(naive: &Naive) -> Partition {
    naive
        .profiles
        .iter()
        .map(|profile| {
            let identifiers = profile.identifiers.iter().map(|(kind, value)| format!("{kind}:{value}")).collect();
            let traits = profile.traits.iter().map(|(key, (_, value))| (key.clone(), value.clone())).collect();
            (identifiers, (traits, profile.events))
        })
        .collect()
}

fn real_partition(graph: &IdentityGraph) -> Partition {
    graph
        .profiles()
        .map(|profile| {
            let identifiers = profile.identifiers.iter().map(ToString::to_string).collect();
            let traits = profile.traits.iter().map(|(key, value)| (key.clone(), value.clone())).collect();
            (identifiers, (traits, profile.event_counts.values().sum()))
        })
        .collect()
}

fn pick(options: &[&'static str]) -> impl Strategy<Value = &'static str> {
    proptest::sample::select(options.to_vec())
}

/// Random calls over a small population, so that identifiers collide often.
fn arbitrary_message() -> impl Strategy<Value = Value> {
    let user = proptest::option::of(pick(&["u1", "u2", " u1 ", "U1", "null", "0", "-1"]));
    let anonymous = proptest::option::of(pick(&["a1", "a2", "a3", "anonymous", "u1"]));
    let email = proptest::option::of(pick(&[
        "ann@x.com",
        " ANN@X.com",
        "bob@x.com",
        "cy@x.com",
        "noreply@x.com",
        "test@test.com",
        "not-an-email",
    ]));
    let phone = proptest::option::of(pick(&[
        "+49 30 1234567",
        "(0049) 30 1234567",
        "(+49) 30 1234567",
        "+1 415 555 2671",
        "+44 7777 777777",
        "000-000-0000",
        "12345",
    ]));
    let where_email = pick(&["traits", "context", "properties"]);
    let device = proptest::option::of(pick(&["d1", "d2", "0000"]));
    let external = proptest::option::of(pick(&["C-1", "C-2"]));
    let kind = pick(&["identify", "identify", "track", "page", "group", "alias"]);
    let plan = (
        pick(&["free", "pro", "team"]),
        proptest::option::of(pick(&["free", "team"])),
        pick(&["Oslo", "Lima"]),
        0..3i64,
    );
    (kind, user, anonymous, email, where_email, phone, device, external, plan).prop_map(
        |(kind, user, anonymous, email, where_email, phone, device, external, (plan, context_plan, city, second))| {
            let mut message = json!({
                "type": kind,
                "event": "E",
                "groupId": "acme",
                "timestamp": format!("2026-01-01T00:00:0{second}Z"),
                "traits": {"plan": plan},
                "context": {"traits": {"city": city}},
            });
            if let Some(context_plan) = context_plan {
                message["context"]["traits"]["plan"] = json!(context_plan);
            }
            message["userId"] = json!(user.unwrap_or("u2"));
            if let Some(anonymous) = anonymous {
                message["anonymousId"] = json!(anonymous);
            }
            if kind == "alias" {
                message["previousId"] = json!(anonymous.unwrap_or("u1"));
            }
            let mut contact = Map::new();
            if let Some(email) = email {
                contact.insert("email".into(), json!(email));
            }
            if let Some(phone) = phone {
                contact.insert("phone".into(), json!(phone));
            }
            match where_email {
                "traits" => message["traits"].as_object_mut().unwrap().extend(contact),
                "context" => message["context"]["traits"].as_object_mut().unwrap().extend(contact),
                _ => message["properties"] = Value::Object(contact),
            }
            if let Some(device) = device {
                message["context"]["device"] = json!({"id": device});
            }
            if let Some(external) = external {
                message["context"]["externalIds"] = json!([{"id": external, "type": "CRM-Id", "collection": "users"}]);
            }
            message
        },
    )
}

fn normalize(message: Value) -> Option<Event> {
    let source = SourceId::new("src");
    let received_at = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:10Z").unwrap().to_utc();
    let request =
        RequestContext { source_id: &source, received_at, client_ip: None, ids: IdRequirement::UserOrAnonymousId };
    let Value::Object(message) = message else { unreachable!() };
    normalize_message(message, None, &BatchDefaults::default(), &request).ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_resolver_follows_the_readme_rules(messages in proptest::collection::vec(arbitrary_message(), 1..40)) {
        let rules = IdentityRules::default().compile().unwrap();
        let mut graph = IdentityGraph::new();
        let mut naive = Naive::default();
        let mut real_drops = Vec::new();
        for (index, message) in messages.into_iter().enumerate() {
            let Some(event) = normalize(message) else { continue };
            let position = index as u64 + 1;
            // Both read the event as the log stores it.
            naive.resolve(position, &serde_json::to_value(&event).unwrap());
            for change in graph.resolve(position, &event, &rules).changes {
                if let IdentityChange::Dropped { identifier, .. } = change {
                    real_drops.push((position, identifier.to_string()));
                }
            }
        }
        prop_assert_eq!(real_partition(&graph), naive_partition(&naive));
        real_drops.sort();
        naive.drops.sort();
        prop_assert_eq!(real_drops, naive.drops);
        let real_ids: BTreeSet<u64> = graph.profiles().map(|profile| profile.id.0).collect();
        let naive_ids: BTreeSet<u64> = naive.profiles.iter().map(|profile| profile.id).collect();
        prop_assert_eq!(real_ids, naive_ids, "the oldest profile survives a merge");
    }
}
