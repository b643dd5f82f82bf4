//! A lock-free latency histogram for the request path: fixed bucket bounds,
//! one atomic add per bucket and one for the sum per observation.
//!
//! Invariants:
//! 1. [`BOUNDS_US`] is strictly increasing; an observation of `d` counts in
//!    the first bucket whose bound is `>= d`, or in the overflow bucket.
//! 2. A [`HistogramSnapshot`] is taken bucket by bucket without a lock, so
//!    its `count` is the sum of its buckets (never read separately) and it
//!    is never less than a snapshot taken before it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds of the buckets, in microseconds: 25 µs to 10 s, roughly
/// ×2.5 apart, so p50 and p99 of local (WAL) and remote (store) requests
/// both fall in a bucket of their own size.
pub const BOUNDS_US: [u64; 18] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Observations of durations (see the module docs).
#[derive(Debug)]
pub struct Histogram {
    /// One per bound plus the overflow bucket.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Count one observation of `d`.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: BOUNDS_US.iter().map(|&b| b as f64 / 1e6).collect(),
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A histogram's counts as reported: per-bucket (not cumulative) counts,
/// `counts.len() == bounds.len() + 1`, the last bucket unbounded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// Upper bounds of the finite buckets, in the family's unit.
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    /// Sum of all observations, in the family's unit.
    pub sum: f64,
}

impl HistogramSnapshot {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Whether the shape is one a histogram can have: one more count than
    /// bounds, finite bounds strictly increasing, a finite sum.
    pub fn is_well_formed(&self) -> bool {
        self.counts.len() == self.bounds.len() + 1
            && self.bounds.iter().all(|b| b.is_finite())
            && self.bounds.windows(2).all(|w| w[0] < w[1])
            && self.sum.is_finite()
    }

    /// What was observed after `earlier` (same bounds; counts that went
    /// down, as after a server restart, count as zero).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        if earlier.bounds != self.bounds || earlier.counts.len() != self.counts.len() {
            return self.clone();
        }
        HistogramSnapshot {
            bounds: self.bounds.clone(),
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum: (self.sum - earlier.sum).max(0.0),
        }
    }

    /// The `q` quantile (0..=1) as the upper bound of the bucket it falls
    /// in; `None` without observations. The overflow bucket reports the
    /// largest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return self.bounds.get(i).or(self.bounds.last()).copied();
            }
        }
        self.bounds.last().copied()
    }

    /// Mean observation; `None` without observations.
    pub fn mean(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_at_or_above_them() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(25)); // bucket 0 (<= 25 µs)
        h.observe(Duration::from_micros(26)); // bucket 1 (<= 50 µs)
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(60)); // overflow
        let s = h.snapshot();
        assert!(s.is_well_formed());
        assert_eq!(s.count(), 4);
        assert_eq!(s.counts[0], 1);
        assert_eq!(s.counts[1], 1);
        assert_eq!(
            s.counts[BOUNDS_US.iter().position(|&b| b == 5_000).unwrap()],
            1
        );
        assert_eq!(*s.counts.last().unwrap(), 1);
        assert!((s.sum - 60.003051).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn quantiles_and_deltas() {
        let h = Histogram::default();
        for _ in 0..99 {
            h.observe(Duration::from_micros(80));
        }
        let before = h.snapshot();
        h.observe(Duration::from_millis(40));
        let s = h.snapshot();
        assert_eq!(s.quantile(0.5), Some(100e-6));
        assert_eq!(s.quantile(0.99), Some(100e-6));
        assert_eq!(s.quantile(1.0), Some(50e-3));
        let d = s.since(&before);
        assert_eq!(d.count(), 1);
        assert_eq!(d.quantile(0.5), Some(50e-3));
        assert_eq!(
            HistogramSnapshot {
                counts: vec![0; 19],
                ..s.clone()
            }
            .quantile(0.5),
            None
        );
    }
}
