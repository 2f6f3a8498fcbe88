//! What every backend's [`AuditStore`](crate::AuditStore) must do: chain
//! entries, filter them, and detect an entry edited, deleted or reordered
//! behind its back (tampered with by raw SQL through [`RawSql`]).

use crate::{AuditFilter, Store};
use serde_json::json;
use tandem_core::govern::audit::AuditDraft;

/// Runs one SQL statement on the backend as given, bypassing the store's
/// interface: how the suite plays an intruder editing the database.
pub trait RawSql {
    fn raw_sql(&self, statement: &str);
}

fn draft(actor: &str, action: &str, target: &str, at_ms: i64) -> AuditDraft {
    AuditDraft {
        actor: actor.into(),
        role: "admin".into(),
        action: action.into(),
        target: target.into(),
        before: None,
        after: Some(json!({"name": target, "rule": "trait plan = \"pro\""})),
        at_ms,
    }
}

fn three_entries(store: &impl Store) {
    store.append_audit(draft("tok_a", "audience.create", "vip", 1_000)).unwrap();
    store.append_audit(draft("cli", "destination.create", "hook", 2_000)).unwrap();
    store.append_audit(draft("tok_a", "audience.delete", "vip", 3_000)).unwrap();
}

pub fn entries_chain_in_order_and_filter(store: &impl Store) {
    assert_eq!(store.verify_audit().unwrap(), Ok(0), "an empty log is intact");
    three_entries(store);
    let all = store.audit_entries(&AuditFilter::default()).unwrap();
    assert_eq!(all.iter().map(|entry| entry.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(all[1].prev_hash, all[0].hash);
    assert_eq!(all[2].after.as_ref().unwrap()["rule"], "trait plan = \"pro\"");
    assert_eq!(store.verify_audit().unwrap(), Ok(3));

    let by_actor = store.audit_entries(&AuditFilter { actor: Some("tok_a".into()), ..Default::default() }).unwrap();
    assert_eq!(by_actor.iter().map(|entry| entry.seq).collect::<Vec<_>>(), [1, 3]);
    let by_area = store.audit_entries(&AuditFilter { action: Some("audience".into()), ..Default::default() }).unwrap();
    assert_eq!(by_area.len(), 2, "an action's area matches its actions");
    let exact =
        store.audit_entries(&AuditFilter { action: Some("audience.delete".into()), ..Default::default() }).unwrap();
    assert_eq!(exact.iter().map(|entry| entry.seq).collect::<Vec<_>>(), [3]);
    let none = store.audit_entries(&AuditFilter { action: Some("audi".into()), ..Default::default() }).unwrap();
    assert!(none.is_empty(), "a partial word is not an area");
    let since = store.audit_entries(&AuditFilter { since_ms: Some(2_000), ..Default::default() }).unwrap();
    assert_eq!(since.len(), 2);
    let page = store.audit_entries(&AuditFilter { after_seq: 1, limit: 1, ..Default::default() }).unwrap();
    assert_eq!(page.iter().map(|entry| entry.seq).collect::<Vec<_>>(), [2]);

    // Newest first, a page at a time, with the same filters.
    let seqs = |filter: AuditFilter| store.audit_entries(&filter).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>();
    let newest = AuditFilter { newest_first: true, ..Default::default() };
    assert_eq!(seqs(newest.clone()), [3, 2, 1]);
    assert_eq!(seqs(AuditFilter { limit: 2, ..newest.clone() }), [3, 2]);
    assert_eq!(seqs(AuditFilter { before_seq: Some(2), ..newest.clone() }), [1]);
    assert_eq!(seqs(AuditFilter { actor: Some("tok_a".into()), limit: 1, ..newest.clone() }), [3]);
    assert_eq!(seqs(AuditFilter { actor: Some("tok_a".into()), before_seq: Some(3), ..newest }), [1]);
}

pub fn concurrent_appends_form_one_chain(store: &(impl Store + Sync)) {
    // Each caller gets back its own entry, as stored, whichever caller's
    // transaction wrote it.
    let returned: Vec<_> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..8)
            .map(|writer| {
                scope.spawn(move || {
                    (0..10)
                        .map(|index| {
                            let target = format!("w{writer}-{index}");
                            let entry = store
                                .append_audit(draft(&format!("tok_{writer}"), "audience.create", &target, index))
                                .unwrap();
                            assert_eq!(
                                (entry.actor.as_str(), entry.target.as_str()),
                                (format!("tok_{writer}").as_str(), target.as_str())
                            );
                            entry
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        writers.into_iter().flat_map(|writer| writer.join().unwrap()).collect()
    });
    assert_eq!(store.verify_audit().unwrap(), Ok(80));
    let stored = store.audit_entries(&AuditFilter::default()).unwrap();
    for entry in returned {
        assert_eq!(stored[entry.seq as usize - 1], entry, "entry {} as stored", entry.seq);
    }
}

pub fn an_edited_entry_is_detected(store: &(impl Store + RawSql)) {
    three_entries(store);
    store.raw_sql("UPDATE audit_log SET target = 'someone-else' WHERE seq = 2");
    assert_eq!(store.verify_audit().unwrap().unwrap_err().seq, 2);
}

pub fn an_edit_with_a_recomputed_hash_is_detected_at_the_next_entry(store: &(impl Store + RawSql)) {
    three_entries(store);
    let second = store.audit_entries(&AuditFilter { after_seq: 1, limit: 1, ..Default::default() }).unwrap();
    let mut forged = second[0].clone();
    forged.target = "someone-else".into();
    let hash = forged.expected_hash();
    store.raw_sql(&format!("UPDATE audit_log SET target = 'someone-else', hash = '{hash}' WHERE seq = 2"));
    assert_eq!(store.verify_audit().unwrap().unwrap_err().seq, 3);
}

pub fn a_deleted_entry_is_detected(store: &(impl Store + RawSql)) {
    three_entries(store);
    store.raw_sql("DELETE FROM audit_log WHERE seq = 2");
    assert_eq!(store.verify_audit().unwrap().unwrap_err().seq, 3);
}

pub fn a_reordered_entry_is_detected(store: &(impl Store + RawSql)) {
    three_entries(store);
    // Swap the sequence numbers of the first two entries.
    store.raw_sql("UPDATE audit_log SET seq = -1 WHERE seq = 1");
    store.raw_sql("UPDATE audit_log SET seq = 1 WHERE seq = 2");
    store.raw_sql("UPDATE audit_log SET seq = 2 WHERE seq = -1");
    assert_eq!(store.verify_audit().unwrap().unwrap_err().seq, 1);
}
