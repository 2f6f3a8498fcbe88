//! Governance rules, free of I/O: who may do what (roles and the permissions
//! they grant), which keys and values are PII (classes, hashing, masking),
//! the tamper-evident chain of the audit log, tracking plans (which events a
//! source may send and what they must look like), consent (which categories
//! a person agreed to and what a destination may receive), data subject
//! requests (their kinds, statuses and the digests that name a person
//! without keeping the identifier) and the stack registry (every tool's
//! owner, department and cost; the report). The server decides every admin
//! request with [`roles`] and applies the rest; the store keeps what they
//! describe.

pub mod audit;
pub mod consent;
pub mod dsr;
pub mod pii;
pub mod plan;
pub mod roles;
pub mod stack;

pub use audit::{AuditDraft, AuditEntry, ChainBreak, GENESIS_HASH};
pub use pii::{PiiClass, PiiPolicy, PiiSettings};
pub use roles::{Permission, Role, UnknownRole};
