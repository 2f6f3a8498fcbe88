//! The audit log's storage interface: entries are appended one at a time,
//! each chained to the newest by the backend under a write lock (so two
//! writers never chain to the same entry), listed with filters, and the
//! whole chain verified. The chain's rules live in `tandem_core::govern::audit`.

use crate::StoreError;
use tandem_core::govern::audit::{verify, AuditDraft, AuditEntry, ChainBreak};

/// Which entries a listing wants, oldest first unless `newest_first`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only entries by this actor (a token id, or `cli`).
    pub actor: Option<String>,
    /// Only entries with this action, or whose action starts with it and a
    /// dot (`audience` matches `audience.create`).
    pub action: Option<String>,
    /// Only entries made at or after this time.
    pub since_ms: Option<i64>,
    /// Only entries after this sequence number (a page's last).
    pub after_seq: i64,
    /// At most this many entries; 0 for no limit.
    pub limit: usize,
    /// Newest first (by sequence number descending) instead of oldest first.
    pub newest_first: bool,
    /// Only entries before this sequence number (a newest-first page's last).
    pub before_seq: Option<i64>,
}

impl AuditFilter {
    /// `ORDER BY` for the listing's direction.
    pub(crate) fn order(&self) -> &'static str {
        if self.newest_first {
            "seq DESC"
        } else {
            "seq"
        }
    }
}

/// Storage for the audit log.
pub trait AuditStore: Send + Sync + 'static {
    /// Appends `draft` as the newest entry, chained to the one before.
    fn append_audit(&self, draft: AuditDraft) -> Result<AuditEntry, StoreError>;

    /// Entries matching `filter`, by sequence number.
    fn audit_entries(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError>;

    /// Checks the whole chain: the number of entries, or the first broken one.
    fn verify_audit(&self) -> Result<Result<usize, ChainBreak>, StoreError> {
        let entries = self.audit_entries(&AuditFilter::default())?;
        Ok(verify(&entries))
    }
}

/// The `LIKE` pattern matching actions under `action` (`audience` →
/// `audience.%`), with `LIKE`'s own wildcards escaped by `\`.
pub(crate) fn action_prefix_pattern(action: &str) -> String {
    let escaped: String = action
        .chars()
        .flat_map(|c| match c {
            '%' | '_' | '\\' => vec!['\\', c],
            other => vec![other],
        })
        .collect();
    format!("{escaped}.%")
}
