//! Ingest latency as a fixed-bucket histogram, one per UTC day.
//!
//! **Why a histogram and not samples.** A 99th percentile needs the whole
//! distribution, and at thousands of requests a second keeping every sample
//! (or a reservoir per day that still merges exactly over a quarter) costs
//! far more than the answer is worth. Fixed buckets whose bounds grow by
//! 10 % each merge by adding counts — across days, nodes and flushes — so
//! the store keeps at most [`BUCKETS`] small rows per day whatever the
//! traffic, and the percentile read from them is the upper bound of the
//! bucket it falls in: never below the true value, at most 10 % above it.
//! Buckets start at 0.1 ms and the last one holds everything beyond about
//! ten minutes.

use std::collections::BTreeMap;

/// The number of buckets: bucket `i` holds latencies up to
/// `FIRST_BOUND_MICROS × GROWTH^i`; the last also everything above.
pub const BUCKETS: u16 = 180;
/// The upper bound of the first bucket, in microseconds.
const FIRST_BOUND_MICROS: f64 = 100.0;
/// How much each bucket's bound exceeds the previous one's.
const GROWTH: f64 = 1.1;

/// The bucket a latency of `micros` microseconds falls in.
pub fn bucket_of(micros: u64) -> u16 {
    if micros as f64 <= FIRST_BOUND_MICROS {
        return 0;
    }
    let index = ((micros as f64 / FIRST_BOUND_MICROS).ln() / GROWTH.ln()).ceil();
    let index = if index.is_finite() { index as u64 } else { u64::from(BUCKETS) };
    // Rounding can put a value exactly on a bound one bucket too high.
    let mut bucket = index.min(u64::from(BUCKETS - 1)) as u16;
    while bucket > 0 && micros as f64 <= upper_bound_micros(bucket - 1) {
        bucket -= 1;
    }
    bucket
}

/// The largest latency bucket `bucket` holds, in microseconds.
pub fn upper_bound_micros(bucket: u16) -> f64 {
    FIRST_BOUND_MICROS * GROWTH.powi(i32::from(bucket))
}

/// Counts per bucket; merging two adds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: BTreeMap<u16, u64>,
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn record_micros(&mut self, micros: u64) {
        self.add(bucket_of(micros), 1);
    }

    /// Adds `count` latencies to a bucket (as read back from storage);
    /// buckets beyond the last count in the last.
    pub fn add(&mut self, bucket: u16, count: u64) {
        if count > 0 {
            *self.counts.entry(bucket.min(BUCKETS - 1)).or_default() += count;
        }
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (bucket, count) in &other.counts {
            self.add(*bucket, *count);
        }
    }

    /// The latencies counted.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Nonzero buckets and their counts, by bucket.
    pub fn buckets(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.counts.iter().map(|(bucket, count)| (*bucket, *count))
    }

    /// The `quantile` (0 to 1) in milliseconds: the upper bound of the
    /// bucket holding it, so at or above the true value and at most 10 %
    /// above; `None` when nothing was counted.
    pub fn quantile_ms(&self, quantile: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        // The rank of the quantile among the sorted latencies, 1-based.
        let rank = ((quantile.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, count) in &self.counts {
            seen += count;
            if seen >= rank {
                return Some(upper_bound_micros(*bucket) / 1_000.0);
            }
        }
        self.counts.keys().next_back().map(|bucket| upper_bound_micros(*bucket) / 1_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_grow_by_ten_percent_from_a_tenth_of_a_millisecond() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(100), 0);
        assert_eq!(bucket_of(101), 1);
        assert_eq!(bucket_of(110), 1);
        assert_eq!(bucket_of(111), 2);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert!(upper_bound_micros(BUCKETS - 1) > 600_000_000.0, "the last bound passes ten minutes");
    }

    #[test]
    fn the_99th_percentile_of_a_hundred_requests_is_the_slowest_but_one() {
        let mut histogram = LatencyHistogram::default();
        for millis in 1..=100u64 {
            histogram.record_micros(millis * 1_000);
        }
        let p99 = histogram.quantile_ms(0.99).unwrap();
        assert!((99.0..=99.0 * 1.1).contains(&p99), "{p99}");
        assert_eq!(LatencyHistogram::default().quantile_ms(0.99), None);
    }

    proptest! {
        /// Merging per-day histograms gives the histogram of every sample,
        /// and a quantile read from it is never below the exact one nor more
        /// than 10 % above it.
        #[test]
        fn quantiles_bound_the_exact_value_within_ten_percent(
            days in prop::collection::vec(prop::collection::vec(0u64..5_000_000, 1..60), 1..5),
            quantile in 0.01f64..1.0,
        ) {
            let mut merged = LatencyHistogram::default();
            let mut whole = LatencyHistogram::default();
            let mut all: Vec<u64> = Vec::new();
            for day in &days {
                let mut histogram = LatencyHistogram::default();
                for micros in day {
                    histogram.record_micros(*micros);
                    whole.record_micros(*micros);
                    all.push(*micros);
                }
                merged.merge(&histogram);
            }
            prop_assert_eq!(&merged, &whole);
            all.sort_unstable();
            let rank = ((quantile * all.len() as f64).ceil() as usize).max(1);
            let exact_ms = all[rank - 1] as f64 / 1_000.0;
            let read = merged.quantile_ms(quantile).unwrap();
            prop_assert!(read >= exact_ms - 1e-9, "{} below {}", read, exact_ms);
            prop_assert!(read <= (exact_ms * 1.1).max(0.1) + 1e-9, "{} too far above {}", read, exact_ms);
        }
    }
}
