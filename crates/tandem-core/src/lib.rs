//! Tandem's domain logic, free of I/O: the identifiers that cross module
//! boundaries, the event model every channel produces, and the rules of the
//! Segment-compatible tracking API (validation, limits, timestamp correction),
//! the rule language of audiences and computed traits, the delivery
//! policy of destinations, governance (roles, the audit chain), and the
//! shared goals with the daily rollups they are computed from.
//! The storage and server crates call into it; it calls nothing outside itself,
//! so every rule here is tested with plain values.

pub mod activate;
pub mod audience;
pub mod collect;
pub mod event;
pub mod govern;
pub mod identity;
pub mod ids;
pub mod insight;
pub mod mapping;
pub mod profile;
pub mod profile_record;
pub mod random;
pub mod resolve;
pub mod source;
pub mod webhook;

pub use event::{Event, EventType, LogRecord};
pub use identity::{Identifier, IdentityRules};
pub use ids::{LogPosition, MessageId, SourceId, WriteKey};
pub use profile::{Profile, ProfileId};
pub use resolve::{EventIdentifiers, IdentityChange, IdentityGraph, Resolution};
pub use source::{Source, SourceKind};
