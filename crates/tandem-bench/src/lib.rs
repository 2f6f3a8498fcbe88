//! What the load generators share: the synthetic customers of
//! [`synthetic`], so the audience benchmark and the console benchmark's
//! million-profile store describe the same company.

pub mod synthetic;
