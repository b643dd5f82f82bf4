//! What `shale status` and `shale top` show of one attached volume, from
//! two reports of it taken some time apart (rates and latency are over
//! that interval; everything else is as of the later report).

use serde::Serialize;

use super::cost::Cost;
use super::histogram::HistogramSnapshot;
use super::report::{FrontendInfo, VolumeReport};

/// The lease as shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaseStatus {
    pub holder: String,
    pub epoch: u64,
    /// Expiry, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// Seconds until expiry as the server saw it (negative: expired).
    pub expires_in_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced: Option<String>,
}

/// Block requests over the sampling interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recent {
    /// Length of the interval, seconds (0: a single report, no rates).
    pub interval_seconds: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    /// All operations (flush, trim and write_zeroes included).
    pub total_iops: f64,
    pub read_bytes_per_second: f64,
    pub write_bytes_per_second: f64,
    /// Latency over the interval, all operations, in milliseconds (bucket
    /// upper bounds for the percentiles); `None` without requests.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_mean_ms: Option<f64>,
}

/// One attached volume.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeStatus {
    pub volume: String,
    pub id: String,
    pub frontends: Vec<FrontendInfo>,
    pub lease: LeaseStatus,
    pub unstored_bytes: u64,
    pub unstored_age_seconds: f64,
    pub max_unstored_bytes: u64,
    pub max_unstored_seconds: u64,
    /// Share of store-data reads the read cache served, since attach;
    /// `None` before the first such read.
    pub cache_hit_ratio: Option<f64>,
    pub recent: Recent,
    pub cost: Cost,
}

fn rate(
    cur: &VolumeReport,
    prev: Option<&VolumeReport>,
    secs: f64,
    name: &str,
    filter: &[(&str, &str)],
) -> f64 {
    match prev {
        Some(p) if secs > 0.0 => (cur.sum(name, filter) - p.sum(name, filter)).max(0.0) / secs,
        _ => 0.0,
    }
}

impl VolumeStatus {
    /// The status of `cur`, with rates since `prev` (an earlier report of
    /// the same volume) when given.
    pub fn new(prev: Option<&VolumeReport>, cur: &VolumeReport) -> VolumeStatus {
        let prev = prev.filter(|p| p.id == cur.id && p.now_ms < cur.now_ms);
        let secs = prev.map_or(0.0, |p| (cur.now_ms - p.now_ms) as f64 / 1e3);
        let lat: Option<HistogramSnapshot> = match (prev, cur.histogram("request_duration", &[])) {
            (Some(p), Some(now)) => Some(match p.histogram("request_duration", &[]) {
                Some(before) => now.since(&before),
                None => now,
            }),
            _ => None,
        };
        let ms = |v: Option<f64>| v.map(|s| s * 1e3);
        let hits = cur.sum("cache_hits", &[]);
        let misses = cur.sum("cache_misses", &[]);
        VolumeStatus {
            volume: cur.volume.clone(),
            id: format!("{:016x}", cur.id),
            frontends: cur.frontends.clone(),
            lease: LeaseStatus {
                holder: cur.lease.holder.clone(),
                epoch: cur.lease.epoch,
                expires_at_ms: cur.lease.expires_at_ms,
                expires_in_seconds: (cur.lease.expires_at_ms as f64 - cur.now_ms as f64) / 1e3,
                fenced: cur.lease.fenced.clone(),
            },
            unstored_bytes: cur.sum("unstored", &[]) as u64,
            unstored_age_seconds: cur.sum("unstored_age", &[]),
            max_unstored_bytes: cur.sum("unstored_limit", &[]) as u64,
            max_unstored_seconds: cur.sum("unstored_age_limit", &[]) as u64,
            cache_hit_ratio: (hits + misses > 0.0).then(|| hits / (hits + misses)),
            recent: Recent {
                interval_seconds: secs,
                read_iops: rate(cur, prev, secs, "requests", &[("op", "read")]),
                write_iops: rate(cur, prev, secs, "requests", &[("op", "write")]),
                total_iops: rate(cur, prev, secs, "requests", &[]),
                read_bytes_per_second: rate(cur, prev, secs, "request", &[("op", "read")]),
                write_bytes_per_second: rate(cur, prev, secs, "request", &[("op", "write")]),
                latency_p50_ms: ms(lat.as_ref().and_then(|h| h.quantile(0.5))),
                latency_p99_ms: ms(lat.as_ref().and_then(|h| h.quantile(0.99))),
                latency_mean_ms: ms(lat.as_ref().and_then(|h| h.mean())),
            },
            cost: Cost::from_report(cur),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::histogram::Histogram;
    use crate::metrics::report::{Family, Kind, LeaseInfo, Sample};
    use std::time::Duration;

    fn report(now_ms: u64, reads: f64, lat: &Histogram) -> VolumeReport {
        VolumeReport {
            volume: "v".into(),
            id: 7,
            now_ms,
            attached_ms: 0,
            frontends: vec![],
            lease: LeaseInfo {
                holder: "h:1".into(),
                epoch: 3,
                expires_at_ms: now_ms + 20_000,
                fenced: None,
            },
            families: vec![
                Family::new("requests", Kind::Counter, None, "h")
                    .with(Sample::value(&[("frontend", "nbd"), ("op", "read")], reads)),
                Family::new("request_duration", Kind::Histogram, None, "h")
                    .with(Sample::histogram(&[("op", "read")], lat.snapshot())),
                Family::new("cache_hits", Kind::Counter, None, "h").with(Sample::value(&[], 3.0)),
                Family::new("cache_misses", Kind::Counter, None, "h").with(Sample::value(&[], 1.0)),
            ],
        }
    }

    #[test]
    fn rates_and_latency_are_over_the_interval() {
        let h = Histogram::default();
        for _ in 0..10 {
            h.observe(Duration::from_secs(1));
        }
        let a = report(10_000, 100.0, &h);
        for _ in 0..100 {
            h.observe(Duration::from_micros(90));
        }
        let b = report(12_000, 300.0, &h);
        let s = VolumeStatus::new(Some(&a), &b);
        assert_eq!(s.recent.interval_seconds, 2.0);
        assert_eq!(s.recent.read_iops, 100.0);
        assert_eq!(
            s.recent.latency_p99_ms,
            Some(0.1),
            "old slow requests are not recent"
        );
        assert_eq!(s.cache_hit_ratio, Some(0.75));
        assert_eq!(s.lease.expires_in_seconds, 20.0);
        assert_eq!(s.id, "0000000000000007");
        let single = VolumeStatus::new(None, &b);
        assert_eq!(single.recent.read_iops, 0.0);
        assert_eq!(single.recent.latency_p50_ms, None);
    }
}
