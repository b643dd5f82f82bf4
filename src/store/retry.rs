//! Retry decorator: retries [`StoreError::Transient`] failures with
//! exponential backoff and jitter; every other error passes through at once.
//!
//! # Rules
//! 1. Attempt `n` (counting from 0) that fails transiently is followed by a
//!    sleep drawn uniformly from `[d/2, d]`, `d = min(cap, base * 2^n)`.
//!    Jitter comes from an RNG seeded in the constructor (no hidden
//!    randomness). Time is tokio's clock, so tests can pause it.
//! 2. A call gives up after `max_attempts` attempts, or when the next sleep
//!    would end past `max_elapsed` since the call began; it then returns the
//!    last transient error, still [`StoreError::Transient`], naming the
//!    number of attempts.
//! 3. Lost responses of conditional puts: if an attempt of a Create or IfMatch
//!    put failed transiently, the write may have landed anyway. A later
//!    attempt that then sees `AlreadyExists` (Create) or `PreconditionFailed`
//!    (IfMatch) reads the object back; if its bytes equal the bytes we were
//!    writing, the earlier attempt is taken to have succeeded and the call
//!    returns the object's current version. Equal bytes written by someone
//!    else are indistinguishable from ours, so callers whose writers must be
//!    told apart (leases, manifests) put the writer's identity and epoch in
//!    the content. The readback is only done after an ambiguous attempt; a
//!    first-attempt refusal is always reported as is.
//! 4. Overwrite puts, deletes and reads are idempotent and simply retried.

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::{Body, Object, ObjectMeta, ObjectStore, PutMode, StoreError, StoreResult, Version};

/// How hard to retry. Defaults: base 50 ms, cap 5 s, 12 attempts, 60 s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff step (before jitter). Must be > 0.
    pub base: Duration,
    /// Largest backoff step (before jitter).
    pub cap: Duration,
    /// Attempts per call, including the first. At least 1.
    pub max_attempts: u32,
    /// Total time budget per call, measured from its start.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(50),
            cap: Duration::from_secs(5),
            max_attempts: 12,
            max_elapsed: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Retry transient errors without limit (for writes that must wait out
    /// an outage rather than fail), with the default base and cap.
    pub fn forever() -> Self {
        RetryPolicy {
            max_attempts: u32::MAX,
            max_elapsed: Duration::MAX,
            ..RetryPolicy::default()
        }
    }

    /// The un-jittered backoff after failed attempt `attempt` (0-based).
    fn step(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// Counters of what the decorator did, for tests and metrics.
#[derive(Debug, Default)]
pub struct RetryStats {
    /// Attempts made, including first attempts.
    pub attempts: AtomicU64,
    /// Attempts that were retries.
    pub retries: AtomicU64,
    /// Calls that gave up with a transient error.
    pub exhausted: AtomicU64,
    /// Conditional puts found to have landed despite a lost response (rule 3).
    pub lost_responses_recovered: AtomicU64,
}

/// Wraps a store and retries its transient failures. See the module docs.
#[derive(Debug)]
pub struct RetryStore<S> {
    inner: S,
    policy: RetryPolicy,
    rng: Mutex<StdRng>,
    stats: Arc<RetryStats>,
}

impl<S: ObjectStore> RetryStore<S> {
    /// Wrap `inner`; `seed` drives the jitter.
    pub fn new(inner: S, policy: RetryPolicy, seed: u64) -> Self {
        Self::with_stats(inner, policy, seed, Arc::default())
    }

    /// [`RetryStore::new`] counting into `stats`, which others may share
    /// (the metrics decorator reports them).
    pub fn with_stats(inner: S, policy: RetryPolicy, seed: u64, stats: Arc<RetryStats>) -> Self {
        RetryStore {
            inner,
            policy,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            stats,
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn stats(&self) -> &RetryStats {
        &self.stats
    }

    fn jittered(&self, attempt: u32) -> Duration {
        let step = self.policy.step(attempt);
        let low = step / 2;
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let extra = rng.random_range(0..=(step - low).as_nanos().min(u64::MAX as u128) as u64);
        low + Duration::from_nanos(extra)
    }

    /// Run `op` until it succeeds, fails non-transiently or the budget is
    /// spent. `on_error` sees every non-transient error together with whether
    /// an earlier attempt failed transiently, and may turn it into a result.
    async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        self.run_with(what, &mut op, |e, _| async move { Err(e) })
            .await
    }

    async fn run_with<T, F, Fut, H, HFut>(
        &self,
        what: &str,
        op: &mut F,
        on_error: H,
    ) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
        H: FnOnce(StoreError, bool) -> HFut,
        HFut: Future<Output = StoreResult<T>>,
    {
        let start = tokio::time::Instant::now();
        let max_attempts = self.policy.max_attempts.max(1);
        let mut ambiguous = false;
        let mut attempt = 0u32;
        loop {
            self.stats.attempts.fetch_add(1, Ordering::Relaxed);
            let err = match op().await {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_transient() => return on_error(e, ambiguous).await,
                Err(e) => e,
            };
            ambiguous = true;
            let delay = self.jittered(attempt);
            attempt = attempt.saturating_add(1);
            let out_of_time = start
                .elapsed()
                .checked_add(delay)
                .is_none_or(|end| end > self.policy.max_elapsed);
            if attempt >= max_attempts || out_of_time {
                self.stats.exhausted.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Transient(format!(
                    "{what}: gave up after {attempt} attempts: {err}"
                )));
            }
            log::debug!("{what}: attempt {attempt} failed ({err}); retrying in {delay:?}");
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
        }
    }

    /// Rule 3: after an ambiguous attempt, a refused conditional put may be
    /// our own earlier write. Returns its version if the stored bytes are ours.
    async fn resolve_lost_put(&self, key: &str, data: &Body) -> StoreResult<Option<Version>> {
        let current = self.run("get (put readback)", || self.inner.get(key)).await;
        match current {
            Ok(obj) if data.eq_bytes(&obj.data) => {
                self.stats
                    .lost_responses_recovered
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Some(obj.version))
            }
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for RetryStore<S> {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        self.run("get", || self.inner.get(key)).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.run("get_range", || self.inner.get_range(key, range.clone()))
            .await
    }

    async fn get_range_placed(
        &self,
        key: &str,
        range: Range<u64>,
        page_at: u64,
    ) -> StoreResult<Bytes> {
        self.run("get_range", || {
            self.inner.get_range_placed(key, range.clone(), page_at)
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        self.put_body(key, Body::from(data), mode).await
    }

    async fn put_body(&self, key: &str, body: Body, mode: PutMode) -> StoreResult<Version> {
        let data = &body;
        let mut op = || self.inner.put_body(key, data.clone(), mode.clone());
        self.run_with("put", &mut op, |err, ambiguous| async move {
            let conditional_refusal = matches!(
                err,
                StoreError::AlreadyExists { .. } | StoreError::PreconditionFailed { .. }
            );
            if ambiguous && conditional_refusal {
                if let Some(version) = self.resolve_lost_put(key, data).await? {
                    return Ok(version);
                }
            }
            Err(err)
        })
        .await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.run("head", || self.inner.head(key)).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        self.run("list", || self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.run("delete", || self.inner.delete(key)).await
    }

    fn puts_in_flight(&self) -> usize {
        self.inner.puts_in_flight()
    }

    fn writes_parts(&self) -> bool {
        self.inner.writes_parts()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_cap() {
        let p = RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(70),
            max_attempts: 5,
            max_elapsed: Duration::from_secs(1),
        };
        let steps: Vec<u128> = (0..6).map(|a| p.step(a).as_millis()).collect();
        assert_eq!(steps, [10, 20, 40, 70, 70, 70]);
        assert_eq!(p.step(200), Duration::from_millis(70));
    }

    #[test]
    fn jitter_stays_in_half_to_full_step_and_is_seeded() {
        let p = RetryPolicy::default();
        let a = RetryStore::new(crate::store::memory::MemoryStore::new(), p.clone(), 7);
        let b = RetryStore::new(crate::store::memory::MemoryStore::new(), p.clone(), 7);
        for attempt in 0..10 {
            let d = a.jittered(attempt);
            assert!(d >= p.step(attempt) / 2 && d <= p.step(attempt), "{d:?}");
            assert_eq!(d, b.jittered(attempt), "same seed, same jitter");
        }
    }
}
