//! Governance rules, free of I/O: who may do what (roles and the permissions
//! they grant), which keys and values are PII (classes, hashing, masking)
//! and the tamper-evident chain of the audit log. The server
//! decides every admin request with [`roles`]; the store keeps the audit
//! entries that [`audit`] hashes.

pub mod audit;
pub mod pii;
pub mod roles;

pub use audit::{AuditDraft, AuditEntry, ChainBreak, GENESIS_HASH};
pub use pii::{PiiClass, PiiPolicy, PiiSettings};
pub use roles::{Permission, Role, UnknownRole};
