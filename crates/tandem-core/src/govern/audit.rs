//! The audit log's chain. Each entry stores `SHA-256(previous hash ||
//! canonical entry)`, where the canonical entry is the JSON of its sequence
//! number, time, actor, role, action, target, before and after with keys in
//! sorted order. Editing, deleting or reordering any entry but the newest
//! breaks the chain at that entry, which [`verify`] names. Values under
//! sensitive keys are replaced by a digest ([`redact`]) before an entry is
//! made, so the log never holds raw PII or secrets.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The previous hash of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a caller records; the store gives it its place in the chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditDraft {
    /// The token id, or `cli` for the command line.
    pub actor: String,
    /// The actor's role (`admin` for the command line).
    pub role: String,
    /// What was done, `area.verb` (`audience.create`, `profile.read_pii`).
    pub action: String,
    /// What it was done to (a name or an id).
    pub target: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub at_ms: i64,
}

/// A stored entry: a draft with its sequence number and hashes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// 1 for the first entry, then one more per entry.
    pub seq: i64,
    pub at_ms: i64,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub target: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    /// Chains `draft` after the entry numbered `seq - 1` whose hash is `prev_hash`.
    pub fn chain(draft: AuditDraft, seq: i64, prev_hash: &str) -> AuditEntry {
        let mut entry = AuditEntry {
            seq,
            at_ms: draft.at_ms,
            actor: draft.actor,
            role: draft.role,
            action: draft.action,
            target: draft.target,
            before: draft.before,
            after: draft.after,
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
        };
        entry.hash = entry.expected_hash();
        entry
    }

    /// The entry's canonical form: JSON with sorted keys, hashes excluded.
    pub fn canonical(&self) -> Vec<u8> {
        // serde_json's maps are ordered by key, so this is stable.
        let value = json!({
            "seq": self.seq,
            "at_ms": self.at_ms,
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "target": self.target,
            "before": self.before,
            "after": self.after,
        });
        serde_json::to_vec(&value).unwrap_or_default()
    }

    /// `SHA-256(prev_hash || canonical)`, hex, as it should be stored.
    pub fn expected_hash(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.prev_hash.as_bytes());
        hasher.update(self.canonical());
        hex(&hasher.finalize())
    }
}

/// Where a chain stops being intact.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit entry {seq} is broken: {reason}")]
pub struct ChainBreak {
    /// The first entry that does not verify.
    pub seq: i64,
    pub reason: String,
}

/// Checks entries given in stored order (by sequence number); the number
/// verified, or the first broken entry.
pub fn verify<'a>(entries: impl IntoIterator<Item = &'a AuditEntry>) -> Result<usize, ChainBreak> {
    let mut previous_hash = GENESIS_HASH.to_owned();
    let mut previous_seq = 0;
    let mut count = 0;
    for entry in entries {
        let broken = |reason: String| ChainBreak { seq: entry.seq, reason };
        if entry.seq != previous_seq + 1 {
            return Err(broken(format!("expected sequence number {}", previous_seq + 1)));
        }
        if entry.prev_hash != previous_hash {
            return Err(broken("its previous hash does not match the entry before it".into()));
        }
        if entry.hash != entry.expected_hash() {
            return Err(broken("its content does not match its hash".into()));
        }
        previous_hash.clone_from(&entry.hash);
        previous_seq = entry.seq;
        count += 1;
    }
    Ok(count)
}

/// A value's digest as the audit log shows it: `sha256:` and 16 hex digits,
/// enough to tell two values apart without revealing either.
pub fn digest(value: &Value) -> Value {
    let text = match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let full = hex(&Sha256::digest(text.as_bytes()));
    Value::String(format!("sha256:{}", &full[..16]))
}

/// `value` with every non-null value under a key `is_sensitive` names
/// replaced by its [`digest`], at any depth.
pub fn redact(value: &Value, is_sensitive: &dyn Fn(&str) -> bool) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, inner)| {
                    let shown = if is_sensitive(key) && !inner.is_null() && !inner.is_object() && !inner.is_array() {
                        digest(inner)
                    } else if is_sensitive(key) && (inner.is_object() || inner.is_array()) {
                        redact_all(inner)
                    } else {
                        redact(inner, is_sensitive)
                    };
                    (key.clone(), shown)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|item| redact(item, is_sensitive)).collect()),
        other => other.clone(),
    }
}

fn redact_all(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(map.iter().map(|(key, inner)| (key.clone(), redact_all(inner))).collect()),
        Value::Array(items) => Value::Array(items.iter().map(redact_all).collect()),
        Value::Null => Value::Null,
        other => digest(other),
    }
}

/// Keys whose values are secrets rather than PII, digested in audit entries.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "token", "password", "api_key", "apikey", "authorization", "write_key"]
        .iter()
        .any(|word| key.contains(word))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(action: &str) -> AuditDraft {
        AuditDraft {
            actor: "tok_a".into(),
            role: "admin".into(),
            action: action.into(),
            target: "vip".into(),
            before: None,
            after: Some(json!({"rule": "x"})),
            at_ms: 1_000,
        }
    }

    fn chain(actions: &[&str]) -> Vec<AuditEntry> {
        let mut entries: Vec<AuditEntry> = Vec::new();
        for action in actions {
            let previous = entries.last().map_or(GENESIS_HASH.to_owned(), |entry| entry.hash.clone());
            entries.push(AuditEntry::chain(draft(action), entries.len() as i64 + 1, &previous));
        }
        entries
    }

    #[test]
    fn an_intact_chain_verifies() {
        let entries = chain(&["a.create", "a.delete", "b.create"]);
        assert_eq!(verify(&entries), Ok(3));
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn edits_deletions_and_reorders_name_the_first_broken_entry() {
        let mut edited = chain(&["a", "b", "c"]);
        edited[1].target = "other".into();
        assert_eq!(verify(&edited).unwrap_err().seq, 2);

        let mut deleted = chain(&["a", "b", "c"]);
        deleted.remove(1);
        assert_eq!(verify(&deleted).unwrap_err().seq, 3);

        let mut reordered = chain(&["a", "b", "c"]);
        reordered.swap(0, 1);
        assert_eq!(verify(&reordered).unwrap_err().seq, 2);

        // Renumbered to hide the swap: the hashes still give it away.
        let mut renumbered = chain(&["a", "b", "c"]);
        renumbered.swap(0, 1);
        renumbered[0].seq = 1;
        renumbered[1].seq = 2;
        assert_eq!(verify(&renumbered).unwrap_err().seq, 1);
    }

    #[test]
    fn redaction_digests_sensitive_values_at_any_depth() {
        let value = json!({"name": "vip", "settings": {"api_key": "k-123", "url": "https://x"}, "email": "a@b.c"});
        let shown = redact(&value, &|key| is_secret_key(key) || key == "email");
        assert_eq!(shown["name"], "vip");
        assert_eq!(shown["settings"]["url"], "https://x");
        assert!(shown["settings"]["api_key"].as_str().unwrap().starts_with("sha256:"));
        assert_eq!(shown["email"], digest(&json!("a@b.c")));
        assert!(!shown.to_string().contains("k-123"));
    }
}
