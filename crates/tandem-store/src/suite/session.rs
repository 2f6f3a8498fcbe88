//! What every backend's [`ConsoleSessionStore`](crate::ConsoleSessionStore)
//! must do: find a session by the digest of its id until it expires or
//! ends, read its token as stored now (so revoking or expiring a token ends
//! its sessions), prune expired sessions and keep the number of sessions
//! under the cap, anonymous ones going first.

use crate::session::{session_id_digest, NewConsoleSession};
use crate::Store;
use tandem_core::govern::Role;

const HOUR_MS: i64 = 60 * 60 * 1000;

fn session(id: &str, token_id: Option<&str>, created_at_ms: i64, expires_at_ms: i64) -> NewConsoleSession {
    NewConsoleSession {
        id_digest: session_id_digest(id),
        csrf: format!("csrf-of-{id}"),
        token_id: token_id.map(str::to_owned),
        created_at_ms,
        expires_at_ms,
    }
}

pub fn sessions_are_found_by_digest_until_they_expire_or_end(store: &impl Store) {
    store.start_console_session(&session("first", None, 1_000, 1_000 + HOUR_MS), 1_000, 100).unwrap();
    store.start_console_session(&session("second", None, 2_000, 2_000 + HOUR_MS), 2_000, 100).unwrap();
    let found = store.console_session(&session_id_digest("first"), 5_000).unwrap().expect("a live session");
    assert_eq!(
        (found.csrf.as_str(), found.token, found.created_at_ms, found.expires_at_ms),
        ("csrf-of-first", None, 1_000, 1_000 + HOUR_MS)
    );
    assert_eq!(store.console_session("first", 5_000).unwrap(), None, "only the digest names a session");
    assert_eq!(store.console_session(&session_id_digest("unknown"), 5_000).unwrap(), None);
    assert_eq!(
        store.console_session(&session_id_digest("first"), 1_000 + HOUR_MS).unwrap(),
        None,
        "a session is gone at its expiry"
    );
    assert!(store.end_console_session(&session_id_digest("first")).unwrap());
    assert!(!store.end_console_session(&session_id_digest("first")).unwrap(), "ending twice finds nothing");
    assert_eq!(store.console_session(&session_id_digest("first"), 5_000).unwrap(), None);
    assert!(store.console_session(&session_id_digest("second"), 5_000).unwrap().is_some(), "others stay");
    assert_eq!(store.count_console_sessions().unwrap(), 1);
}

pub fn signed_in_sessions_read_their_token_as_stored_now(store: &impl Store) {
    let (token, _) = store.create_token_with("desk", Role::Support, Some(10 * HOUR_MS)).unwrap();
    store.start_console_session(&session("desk", Some(&token.id), 0, HOUR_MS), 0, 100).unwrap();
    store.touch_token(&token.id, 500).unwrap();
    let found = store.console_session(&session_id_digest("desk"), 1_000).unwrap().expect("a live session");
    let read = found.token.expect("a signed-in session");
    assert_eq!(
        (read.id.as_str(), read.role, read.expires_at_ms),
        (token.id.as_str(), Role::Support, Some(10 * HOUR_MS))
    );
    assert_eq!(read.last_used_at_ms, Some(500), "the token as stored now, not as it was at sign-in");

    // A session naming a token that is not stored reads as absent.
    store.start_console_session(&session("orphan", Some("tok_gone"), 0, HOUR_MS), 0, 100).unwrap();
    assert_eq!(store.console_session(&session_id_digest("orphan"), 1_000).unwrap(), None);
}

pub fn revoking_a_token_ends_its_sessions(store: &impl Store) {
    let (ops, _) = store.create_token("ops").unwrap();
    let (desk, _) = store.create_token_with("desk", Role::Support, None).unwrap();
    store.start_console_session(&session("ops-laptop", Some(&ops.id), 0, HOUR_MS), 0, 100).unwrap();
    store.start_console_session(&session("ops-phone", Some(&ops.id), 0, HOUR_MS), 0, 100).unwrap();
    store.start_console_session(&session("desk", Some(&desk.id), 0, HOUR_MS), 0, 100).unwrap();
    store.start_console_session(&session("anonymous", None, 0, HOUR_MS), 0, 100).unwrap();
    store.revoke_token(&ops.id).unwrap();
    for id in ["ops-laptop", "ops-phone"] {
        assert_eq!(store.console_session(&session_id_digest(id), 1_000).unwrap(), None, "{id}");
    }
    assert_eq!(store.count_console_sessions().unwrap(), 2, "the revoked token's rows are deleted with it");
    assert!(store.console_session(&session_id_digest("desk"), 1_000).unwrap().is_some());
    assert!(store.console_session(&session_id_digest("anonymous"), 1_000).unwrap().is_some());
}

pub fn starting_a_session_prunes_expired_ones_and_keeps_the_cap(store: &impl Store) {
    let (ops, _) = store.create_token("ops").unwrap();
    store.start_console_session(&session("expired", Some(&ops.id), 0, 100), 0, 3).unwrap();
    store.start_console_session(&session("admin", Some(&ops.id), 0, 2 * HOUR_MS), 0, 3).unwrap();
    store.start_console_session(&session("form-late", None, 0, 3 * HOUR_MS), 0, 3).unwrap();
    assert_eq!(store.count_console_sessions().unwrap(), 3);
    // At 200 the first has expired: it goes, and the new one fits.
    store.start_console_session(&session("form-early", None, 200, HOUR_MS), 200, 3).unwrap();
    assert_eq!(store.count_console_sessions().unwrap(), 3);
    assert_eq!(store.console_session(&session_id_digest("expired"), 0).unwrap(), None, "deleted, not just hidden");
    // Full: the anonymous session nearest its expiry makes room, before
    // any signed-in one, even one expiring sooner.
    store.start_console_session(&session("form-new", None, 300, 4 * HOUR_MS), 300, 3).unwrap();
    assert_eq!(store.count_console_sessions().unwrap(), 3);
    let live = |id: &str| store.console_session(&session_id_digest(id), 400).unwrap().is_some();
    assert!(!live("form-early") && live("form-late") && live("form-new") && live("admin"));
    store.start_console_session(&session("form-newer", None, 400, 4 * HOUR_MS), 400, 3).unwrap();
    assert!(!live("form-late") && live("admin"), "signed-in sessions outlast a flood of sign-in forms");
    // With a cap of one, every other session makes room.
    store.start_console_session(&session("admin-2", Some(&ops.id), 500, 5 * HOUR_MS), 500, 1).unwrap();
    assert_eq!(store.count_console_sessions().unwrap(), 1);
    assert!(live("admin-2"));

    assert_eq!(store.prune_console_sessions(5 * HOUR_MS - 1).unwrap(), 0);
    assert_eq!(store.prune_console_sessions(5 * HOUR_MS).unwrap(), 1);
    assert_eq!(store.count_console_sessions().unwrap(), 0);
}

pub fn extending_never_shortens_a_session(store: &impl Store) {
    store.start_console_session(&session("form", None, 0, HOUR_MS), 0, 100).unwrap();
    assert!(store.extend_console_session(&session_id_digest("form"), 3 * HOUR_MS).unwrap());
    let read = |at_ms| store.console_session(&session_id_digest("form"), at_ms).unwrap();
    assert_eq!(read(2 * HOUR_MS).map(|found| found.expires_at_ms), Some(3 * HOUR_MS));
    // A node with an older view extends less far: the later expiry stays.
    assert!(store.extend_console_session(&session_id_digest("form"), 2 * HOUR_MS).unwrap());
    assert_eq!(read(2 * HOUR_MS).map(|found| found.expires_at_ms), Some(3 * HOUR_MS));
    assert!(!store.extend_console_session(&session_id_digest("unknown"), 3 * HOUR_MS).unwrap());
}
