//! Metrics decorator: counts every request a store backend receives, by
//! method and outcome, with its latency and bytes, for the cost and health
//! metrics of a volume.
//!
//! It sits *below* the retry decorator ([`open`]), so every attempt is
//! counted: that is what an S3 bill charges. Retries are counted by the
//! retry decorator, whose [`RetryStats`] [`StoreMetrics`] shares.
//!
//! Invariants:
//! 1. Results pass through unchanged; the decorator adds no request.
//! 2. `get_range` counts as `GET`; bytes read are the bytes returned,
//!    bytes written the bytes of successful puts.
//! 3. While [`StoreMetrics::set_idle`] says the volume is idle, requests
//!    are also counted as idle requests (the cost of an idle volume).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use super::retry::{RetryPolicy, RetryStats, RetryStore};
use super::{
    Body, DynStore, Object, ObjectMeta, ObjectStore, PutMode, StoreConfig, StoreError, StoreResult,
    Version,
};
use crate::metrics::histogram::Histogram;
use crate::metrics::report::{Family, Kind, Sample, Unit};

/// Request methods, as labelled (`method="..."`), in S3's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Put,
    Get,
    Head,
    List,
    Delete,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::Put,
        Method::Get,
        Method::Head,
        Method::List,
        Method::Delete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Put => "PUT",
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::List => "LIST",
            Method::Delete => "DELETE",
        }
    }
}

/// Outcomes, as labelled (`outcome="..."`).
pub const OUTCOMES: [&str; 6] = [
    "ok",
    "not_found",
    "conflict",
    "invalid",
    "transient_error",
    "error",
];

fn outcome<T>(r: &StoreResult<T>) -> usize {
    match r {
        Ok(_) => 0,
        Err(StoreError::NotFound { .. }) => 1,
        Err(StoreError::AlreadyExists { .. } | StoreError::PreconditionFailed { .. }) => 2,
        Err(StoreError::InvalidRange { .. } | StoreError::InvalidKey { .. }) => 3,
        Err(StoreError::Transient(_)) => 4,
        Err(StoreError::Permanent(_)) => 5,
    }
}

#[derive(Debug, Default)]
struct MethodMetrics {
    outcomes: [AtomicU64; OUTCOMES.len()],
    idle: AtomicU64,
    latency: Histogram,
}

/// What one store handle did (see the module docs).
#[derive(Debug, Default)]
pub struct StoreMetrics {
    methods: [MethodMetrics; 5],
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    idle: AtomicBool,
    retry: Arc<RetryStats>,
}

impl StoreMetrics {
    fn method(&self, m: Method) -> &MethodMetrics {
        &self.methods[m as usize]
    }

    fn record<T>(&self, m: Method, started: Instant, r: &StoreResult<T>) {
        let mm = self.method(m);
        mm.latency.observe(started.elapsed());
        mm.outcomes[outcome(r)].fetch_add(1, Ordering::Relaxed);
        if self.idle.load(Ordering::Relaxed) {
            mm.idle.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the volume is idle now (see invariant 3).
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Relaxed);
    }

    /// Requests of `method`, every outcome.
    pub fn requests(&self, method: Method) -> u64 {
        self.method(method)
            .outcomes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests of `method` made while the volume was idle.
    pub fn idle_requests(&self, method: Method) -> u64 {
        self.method(method).idle.load(Ordering::Relaxed)
    }

    /// Requests of every method.
    pub fn total_requests(&self) -> u64 {
        Method::ALL.iter().map(|&m| self.requests(m)).sum()
    }

    /// Requests of every method made while idle.
    pub fn total_idle_requests(&self) -> u64 {
        Method::ALL.iter().map(|&m| self.idle_requests(m)).sum()
    }

    /// The retry decorator's counters.
    pub fn retry(&self) -> &RetryStats {
        &self.retry
    }

    /// The store families of one volume.
    pub fn families(&self) -> Vec<Family> {
        let mut req = Family::new(
            "store_requests",
            Kind::Counter,
            None,
            "Object store requests (each attempt), by method and outcome",
        );
        let mut idle = Family::new(
            "store_idle_requests",
            Kind::Counter,
            None,
            "Object store requests made while the volume was idle, by method",
        );
        let mut lat = Family::new(
            "store_request_duration",
            Kind::Histogram,
            Some(Unit::Seconds),
            "Object store request latency (each attempt), by method",
        );
        for m in Method::ALL {
            let mm = self.method(m);
            for (i, o) in OUTCOMES.iter().enumerate() {
                let n = mm.outcomes[i].load(Ordering::Relaxed);
                if n > 0 || i == 0 {
                    req.samples.push(Sample::value(
                        &[("method", m.as_str()), ("outcome", o)],
                        n as f64,
                    ));
                }
            }
            idle.samples.push(Sample::value(
                &[("method", m.as_str())],
                mm.idle.load(Ordering::Relaxed) as f64,
            ));
            lat.samples.push(Sample::histogram(
                &[("method", m.as_str())],
                mm.latency.snapshot(),
            ));
        }
        let counter = |name, unit, help, v: u64| {
            Family::new(name, Kind::Counter, unit, help).with(Sample::value(&[], v as f64))
        };
        let r = &self.retry;
        vec![
            req,
            idle,
            lat,
            counter(
                "store_read",
                Some(Unit::Bytes),
                "Bytes read from the object store",
                self.read_bytes.load(Ordering::Relaxed),
            ),
            counter(
                "store_written",
                Some(Unit::Bytes),
                "Bytes written to the object store",
                self.written_bytes.load(Ordering::Relaxed),
            ),
            counter(
                "store_retries",
                None,
                "Object store attempts that were retries of a transient failure",
                r.retries.load(Ordering::Relaxed),
            ),
            counter(
                "store_retries_exhausted",
                None,
                "Object store calls that gave up after their retries",
                r.exhausted.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// Counts what passes to `inner` into shared [`StoreMetrics`].
#[derive(Debug)]
pub struct MeteredStore<S> {
    inner: S,
    metrics: Arc<StoreMetrics>,
}

impl<S: ObjectStore> MeteredStore<S> {
    pub fn new(inner: S, metrics: Arc<StoreMetrics>) -> Self {
        MeteredStore { inner, metrics }
    }

    /// Count a ranged read that started at `t`, and its bytes.
    fn record_read(&self, t: Instant, r: &StoreResult<Bytes>) {
        self.metrics.record(Method::Get, t, r);
        if let Ok(b) = r {
            let n = b.len() as u64;
            self.metrics.read_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Count a put of `n` bytes that started at `t`.
    fn record_put(&self, t: Instant, n: u64, r: &StoreResult<Version>) {
        self.metrics.record(Method::Put, t, r);
        if r.is_ok() {
            self.metrics.written_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for MeteredStore<S> {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        let t = Instant::now();
        let r = self.inner.get(key).await;
        self.metrics.record(Method::Get, t, &r);
        if let Ok(o) = &r {
            let n = o.data.len() as u64;
            self.metrics.read_bytes.fetch_add(n, Ordering::Relaxed);
        }
        r
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let t = Instant::now();
        let r = self.inner.get_range(key, range).await;
        self.record_read(t, &r);
        r
    }

    async fn get_range_placed(
        &self,
        key: &str,
        range: Range<u64>,
        page_at: u64,
    ) -> StoreResult<Bytes> {
        let t = Instant::now();
        let r = self.inner.get_range_placed(key, range, page_at).await;
        self.record_read(t, &r);
        r
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        let t = Instant::now();
        let n = data.len() as u64;
        let r = self.inner.put(key, data, mode).await;
        self.record_put(t, n, &r);
        r
    }

    async fn put_body(&self, key: &str, body: Body, mode: PutMode) -> StoreResult<Version> {
        let t = Instant::now();
        let n = body.len() as u64;
        let r = self.inner.put_body(key, body, mode).await;
        self.record_put(t, n, &r);
        r
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let t = Instant::now();
        let r = self.inner.head(key).await;
        self.metrics.record(Method::Head, t, &r);
        r
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        let t = Instant::now();
        let r = self.inner.list(prefix).await;
        self.metrics.record(Method::List, t, &r);
        r
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let t = Instant::now();
        let r = self.inner.delete(key).await;
        self.metrics.record(Method::Delete, t, &r);
        r
    }

    fn puts_in_flight(&self) -> usize {
        self.inner.puts_in_flight()
    }

    fn writes_parts(&self) -> bool {
        self.inner.writes_parts()
    }
}

/// Open the configured backend as [`super::open`] does, with this
/// decorator between the backend and the retry decorator; returns the
/// store and its metrics.
pub async fn open(cfg: &StoreConfig) -> StoreResult<(DynStore, Arc<StoreMetrics>)> {
    let backend = super::open_backend(cfg).await?;
    let retry = Arc::new(RetryStats::default());
    let metrics = Arc::new(StoreMetrics {
        retry: retry.clone(),
        ..StoreMetrics::default()
    });
    let metered = MeteredStore::new(backend, metrics.clone());
    let store = RetryStore::with_stats(
        metered,
        RetryPolicy::default(),
        super::default_jitter_seed(),
        retry,
    );
    Ok((Arc::new(store), metrics))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::faulty::{Fault, FaultPoint, FaultRule, FaultyStore};
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn counts_methods_outcomes_bytes_and_idle_requests() {
        let m = Arc::new(StoreMetrics::default());
        let s = MeteredStore::new(MemoryStore::new(), m.clone());
        s.put("a", Bytes::from_static(b"hello"), PutMode::Create)
            .await
            .unwrap();
        assert!(s
            .put("a", Bytes::from_static(b"x"), PutMode::Create)
            .await
            .is_err());
        assert_eq!(s.get_range("a", 1..3).await.unwrap(), "el");
        assert!(s.get("missing").await.is_err());
        m.set_idle(true);
        s.list("").await.unwrap();
        s.head("a").await.unwrap();
        m.set_idle(false);
        s.delete("a").await.unwrap();

        assert_eq!(m.requests(Method::Put), 2);
        assert_eq!(m.requests(Method::Get), 2);
        assert_eq!(m.total_requests(), 7);
        assert_eq!(m.total_idle_requests(), 2);
        assert_eq!(m.idle_requests(Method::List), 1);
        let fams = m.families();
        let req = &fams[0];
        let val = |method: &str, outcome: &str| {
            req.samples
                .iter()
                .find(|s| s.label("method") == Some(method) && s.label("outcome") == Some(outcome))
                .map(|s| s.value)
        };
        assert_eq!(val("PUT", "ok"), Some(1.0));
        assert_eq!(val("PUT", "conflict"), Some(1.0));
        assert_eq!(val("GET", "not_found"), Some(1.0));
        assert_eq!(fams[3].samples[0].value, 2.0, "bytes read");
        assert_eq!(fams[4].samples[0].value, 5.0, "bytes written");
    }

    #[tokio::test]
    async fn retries_are_counted_below_and_above_the_retry_decorator() {
        let m = Arc::new(StoreMetrics::default());
        let faulty = FaultyStore::new(MemoryStore::new(), 1);
        faulty.set(FaultPoint::Put, FaultRule::next(Fault::Transient, 2));
        let retry = RetryStore::with_stats(
            MeteredStore::new(faulty, m.clone()),
            RetryPolicy {
                base: std::time::Duration::from_millis(1),
                cap: std::time::Duration::from_millis(2),
                ..RetryPolicy::default()
            },
            1,
            m.retry.clone(),
        );
        retry
            .put("k", Bytes::from_static(b"v"), PutMode::Overwrite)
            .await
            .unwrap();
        assert_eq!(m.requests(Method::Put), 3, "every attempt is a request");
        let fams = m.families();
        let transient = fams[0]
            .samples
            .iter()
            .find(|s| s.label("outcome") == Some("transient_error"))
            .map(|s| s.value);
        assert_eq!(transient, Some(2.0));
        let retries = fams.iter().find(|f| f.name == "store_retries").unwrap();
        assert_eq!(retries.samples[0].value, 2.0);
    }
}
