//! Governance rules, as pure logic: tracking plans (which events a source may
//! send and what they must look like). The server applies them at ingestion;
//! storage keeps them.

pub mod plan;
