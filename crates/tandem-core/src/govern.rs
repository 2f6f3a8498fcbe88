//! Governance rules, as pure logic: tracking plans (which events a source may
//! send and what they must look like), consent (which categories a person
//! agreed to and what a destination may receive) and data subject requests (their kinds,
//! statuses and the digests that name a person without keeping the
//! identifier), and the stack registry (every tool's owner, department and
//! cost; the report). The server applies them; storage keeps them.

pub mod consent;
pub mod dsr;
pub mod plan;
pub mod stack;
