//! What a volume costs in object store requests, from its report: requests
//! by method since attach, and two rates an operator can price:
//! - requests per GiB written: the requests other than GETs made while the
//!   volume was not idle, per GiB of block writes (attach and recovery
//!   requests included, so short runs read a little high; GETs are left
//!   out because reads cause them);
//! - requests per idle hour: the requests made while idle, per hour idle
//!   (lease renewals and pool refreshes: the price of an attached volume
//!   nobody uses).
//!
//! A rate is `None` until it has a meaning: no byte written yet, or less
//! than a minute idle.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::report::{Family, Kind, Sample, VolumeReport};
use crate::store::metered::Method;

const GIB: f64 = (1u64 << 30) as f64;
/// Idle time below which no idle rate is given.
const MIN_IDLE_SECONDS: f64 = 60.0;

/// The cost figures of one volume (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// Store requests since attach, by method (every attempt).
    pub store_requests: BTreeMap<String, u64>,
    /// Of those, the requests made while the volume was idle.
    pub idle_store_requests: BTreeMap<String, u64>,
    /// Bytes of block writes since attach.
    pub written_bytes: u64,
    /// Time the volume was idle since attach.
    pub idle_seconds: f64,
    pub requests_per_gib_written: Option<f64>,
    pub requests_per_idle_hour: Option<f64>,
}

impl Cost {
    /// The figures of `r` (from its `store_requests`, `store_idle_requests`,
    /// `request` (bytes, op="write") and `idle` families).
    pub fn from_report(r: &VolumeReport) -> Cost {
        let mut store_requests = BTreeMap::new();
        let mut idle_store_requests = BTreeMap::new();
        for m in Method::ALL {
            let filter = [("method", m.as_str())];
            store_requests.insert(
                m.as_str().to_string(),
                r.sum("store_requests", &filter) as u64,
            );
            idle_store_requests.insert(
                m.as_str().to_string(),
                r.sum("store_idle_requests", &filter) as u64,
            );
        }
        let get = Method::Get.as_str();
        let not_get = |m: &BTreeMap<String, u64>| -> u64 {
            m.iter().filter(|(k, _)| *k != get).map(|(_, v)| v).sum()
        };
        let writing = not_get(&store_requests).saturating_sub(not_get(&idle_store_requests));
        let idle: u64 = idle_store_requests.values().sum();
        let written_bytes = r.sum("request", &[("op", "write")]) as u64;
        let idle_seconds = r.sum("idle", &[]);
        Cost {
            requests_per_gib_written: (written_bytes > 0)
                .then(|| writing as f64 / (written_bytes as f64 / GIB)),
            requests_per_idle_hour: (idle_seconds >= MIN_IDLE_SECONDS)
                .then(|| idle as f64 / idle_seconds * 3600.0),
            store_requests,
            idle_store_requests,
            written_bytes,
            idle_seconds,
        }
    }

    /// The rates as gauges (a family without a sample while its rate has
    /// no value).
    pub fn families(&self) -> Vec<Family> {
        let gauge = |name, help, v: Option<f64>| {
            let f = Family::new(name, Kind::Gauge, None, help);
            match v {
                Some(v) => f.with(Sample::value(&[], v)),
                None => f,
            }
        };
        vec![
            gauge(
                "cost_store_requests_per_gib_written",
                "Object store requests other than GETs made while not idle per GiB of block writes, since attach",
                self.requests_per_gib_written,
            ),
            gauge(
                "cost_store_requests_per_idle_hour",
                "Object store requests made while idle per hour idle, since attach",
                self.requests_per_idle_hour,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::report::{LeaseInfo, Unit};

    #[test]
    fn rates_from_families() {
        let req = Family::new("store_requests", Kind::Counter, None, "h")
            .with(Sample::value(
                &[("method", "PUT"), ("outcome", "ok")],
                300.0,
            ))
            .with(Sample::value(
                &[("method", "PUT"), ("outcome", "conflict")],
                2.0,
            ))
            .with(Sample::value(
                &[("method", "LIST"), ("outcome", "ok")],
                10.0,
            ))
            .with(Sample::value(
                &[("method", "GET"), ("outcome", "ok")],
                1000.0,
            ));
        let idle = Family::new("store_idle_requests", Kind::Counter, None, "h")
            .with(Sample::value(&[("method", "PUT")], 12.0));
        let bytes = Family::new("request", Kind::Counter, Some(Unit::Bytes), "h")
            .with(Sample::value(
                &[("frontend", "nbd"), ("op", "write")],
                2.0 * GIB,
            ))
            .with(Sample::value(
                &[("frontend", "nbd"), ("op", "read")],
                5.0 * GIB,
            ));
        let idle_s = Family::new("idle", Kind::Counter, Some(Unit::Seconds), "h")
            .with(Sample::value(&[], 7200.0));
        let mut r = VolumeReport {
            volume: "v".into(),
            id: 1,
            now_ms: 0,
            attached_ms: 0,
            frontends: vec![],
            lease: LeaseInfo {
                holder: String::new(),
                epoch: 1,
                expires_at_ms: 0,
                fenced: None,
            },
            families: vec![req, idle, bytes, idle_s],
        };
        let c = Cost::from_report(&r);
        assert_eq!(c.store_requests["PUT"], 302);
        assert_eq!(c.store_requests["LIST"], 10);
        assert_eq!(c.idle_store_requests["PUT"], 12);
        assert_eq!(c.written_bytes, 2 << 30);
        assert_eq!(c.requests_per_gib_written, Some(150.0));
        assert_eq!(c.requests_per_idle_hour, Some(6.0));
        assert!(c.families().iter().all(|f| f.samples.len() == 1));

        r.families.truncate(1);
        let c = Cost::from_report(&r);
        assert_eq!(c.requests_per_gib_written, None);
        assert_eq!(c.requests_per_idle_hour, None);
        assert!(c.families().iter().all(|f| f.samples.is_empty()));
    }
}
