//! Insight: the numbers marketing and IT own together, free of I/O.
//!
//! - [`goals`]: a goal (a metric, a target, a period and an owner) is
//!   validated once from its settings into a [`goals::Goal`], then evaluated
//!   as often as a page is drawn from daily figures the store keeps:
//!   current value, progress through the period, the pro-rated target it is
//!   judged against, and a trend series.
//! - [`rollup`]: the daily figures themselves. The insight stage follows the
//!   log and keeps, per *tracker* (what a metric needs counted: events and a
//!   property's sum per day, customers' activity, a conversion, identity
//!   merges), additive per-day values and, where a metric is about people,
//!   one small state per profile whose contribution to the days is
//!   recomputed when the profile's events or merges change it.
//! - [`latency`]: the fixed-bucket histogram ingest latency is persisted in,
//!   one per UTC day, from which a period's 99th percentile is read.
//!
//! Days are UTC calendar days, numbered from the Unix epoch ([`rollup::Day`]).

pub mod goals;
pub mod latency;
pub mod rollup;
