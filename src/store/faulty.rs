//! Fault-injecting decorator for tests: named fault points per operation,
//! each of which can fail, delay, tear or lose a chosen share of requests,
//! plus an outage switch that fails everything.
//!
//! # Rules
//! 1. Decisions are drawn from an RNG seeded in the constructor, in call
//!    order, so a single-threaded test sees the same faults on every run.
//! 2. The outage switch wins over the per-point rules: while it is on, every
//!    call fails with [`StoreError::Transient`] before reaching the backend.
//! 3. Every injected fault is counted, per point and in total.
//! 4. [`Fault::TornPut`] deliberately breaks protocol rule 4 (whole objects)
//!    to emulate a backend that exposes partial uploads: it writes a prefix of
//!    the data, then fails transiently. [`Fault::DroppedPut`] is the faithful
//!    variant for atomic backends: nothing is written, the call fails
//!    transiently. [`Fault::LostResponse`] performs the operation and then
//!    reports a transient failure, as when a reply is lost on the network.
//! 5. A rule may be scoped to a key prefix ([`FaultyStore::set_scoped`]);
//!    calls outside the scope neither fail nor consume RNG draws.
//! 6. A [`Hold`] ([`FaultyStore::hold`]) stops the next call at its point
//!    and key prefix before it reaches the backend, until the test releases
//!    it: crash and race windows are hit on purpose, not by chance. Holds
//!    are checked before the fault rules and the outage switch.
//! 7. Keys hidden from listings ([`FaultyStore::hide_in_listings`]) are left
//!    out of `list` results but stay readable, as on stores whose listings
//!    lag behind their writes (this breaks protocol rule 6 on purpose).

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::{Object, ObjectMeta, ObjectStore, PutMode, StoreError, StoreResult, Version};

/// The named fault points: one per store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    Get,
    GetRange,
    Put,
    Head,
    List,
    Delete,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 6] = [
        FaultPoint::Get,
        FaultPoint::GetRange,
        FaultPoint::Put,
        FaultPoint::Head,
        FaultPoint::List,
        FaultPoint::Delete,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::Get => "get",
            FaultPoint::GetRange => "get_range",
            FaultPoint::Put => "put",
            FaultPoint::Head => "head",
            FaultPoint::List => "list",
            FaultPoint::Delete => "delete",
        }
    }
}

/// What happens to a request picked for a fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Fail with [`StoreError::Transient`] without reaching the backend.
    Transient,
    /// Fail with [`StoreError::Permanent`] without reaching the backend.
    Permanent,
    /// Wait this long, then perform the request normally.
    Delay(Duration),
    /// Put only: write the first half of the data, then fail transiently.
    /// Other operations treat it as [`Fault::Transient`].
    TornPut,
    /// Put only: write nothing, fail transiently (same as `Transient`, named
    /// for readability in upload tests).
    DroppedPut,
    /// Perform the request, discard its result, fail transiently.
    LostResponse,
}

/// A rule at one fault point: inject `fault` into `share` of the calls
/// (0.0..=1.0), at most `limit` times if set.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    pub fault: Fault,
    pub share: f64,
    pub limit: Option<u64>,
}

impl FaultRule {
    /// Inject `fault` into `share` of the calls, without limit.
    pub fn share(fault: Fault, share: f64) -> Self {
        FaultRule {
            fault,
            share,
            limit: None,
        }
    }

    /// Inject `fault` into the next `n` calls.
    pub fn next(fault: Fault, n: u64) -> Self {
        FaultRule {
            fault,
            share: 1.0,
            limit: Some(n),
        }
    }
}

/// One armed hold: the next call at a point, on a key starting with a
/// prefix, waits for [`Hold::release`]. See rule 6.
#[derive(Debug)]
pub struct Hold {
    reached: tokio::sync::Semaphore,
    released: tokio::sync::Semaphore,
}

impl Default for Hold {
    fn default() -> Self {
        Hold {
            reached: tokio::sync::Semaphore::new(0),
            released: tokio::sync::Semaphore::new(0),
        }
    }
}

impl Hold {
    /// Wait until the held call arrived (it is now waiting).
    pub async fn reached(&self) {
        if let Ok(p) = self.reached.acquire().await {
            p.forget();
        }
    }

    /// Let the held call go on (also before it arrived: it then passes).
    pub fn release(&self) {
        self.released.add_permits(1);
    }

    async fn wait(&self) {
        self.reached.add_permits(1);
        if let Ok(p) = self.released.acquire().await {
            p.forget();
        }
    }
}

#[derive(Debug)]
struct Rules {
    rules: [Option<FaultRule>; 6],
    /// Key prefix a rule is limited to ("" = every key).
    scopes: [String; 6],
    fired: [u64; 6],
    rng: StdRng,
    /// Armed holds: `(point, key prefix, hold)`, each used once.
    holds: Vec<(FaultPoint, String, Arc<Hold>)>,
    /// Keys `list` leaves out (rule 7).
    hidden: BTreeSet<String>,
}

/// Wraps a store and injects faults on command. See the module docs.
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    rules: Mutex<Rules>,
    outage: AtomicBool,
    injected: [AtomicU64; 6],
}

impl<S: ObjectStore> FaultyStore<S> {
    /// Wrap `inner` with no faults armed; `seed` drives fault selection.
    pub fn new(inner: S, seed: u64) -> Self {
        FaultyStore {
            inner,
            rules: Mutex::new(Rules {
                rules: Default::default(),
                scopes: Default::default(),
                fired: [0; 6],
                rng: StdRng::seed_from_u64(seed),
                holds: Vec::new(),
                hidden: BTreeSet::new(),
            }),
            outage: AtomicBool::new(false),
            injected: Default::default(),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Arm `rule` at `point` for every key, replacing any earlier rule there.
    pub fn set(&self, point: FaultPoint, rule: FaultRule) {
        self.set_scoped(point, rule, "");
    }

    /// Arm `rule` at `point` for keys (or list prefixes) starting with
    /// `key_prefix` only; other calls pass through without drawing from the
    /// RNG. Replaces any earlier rule at `point`.
    pub fn set_scoped(&self, point: FaultPoint, rule: FaultRule, key_prefix: &str) {
        let mut r = self.lock();
        r.rules[point.index()] = Some(rule);
        r.scopes[point.index()] = key_prefix.to_string();
        r.fired[point.index()] = 0;
    }

    /// Arm `rule` at every point.
    pub fn set_all(&self, rule: FaultRule) {
        for p in FaultPoint::ALL {
            self.set(p, rule.clone());
        }
    }

    /// Disarm `point`.
    pub fn clear(&self, point: FaultPoint) {
        self.lock().rules[point.index()] = None;
    }

    /// Disarm every point (the outage switch is separate).
    pub fn clear_all(&self) {
        self.lock().rules = Default::default();
    }

    /// Stop the next call at `point` whose key (or list prefix) starts
    /// with `key_prefix` until the returned hold is released (rule 6).
    pub fn hold(&self, point: FaultPoint, key_prefix: &str) -> Arc<Hold> {
        let hold = Arc::new(Hold::default());
        self.lock()
            .holds
            .push((point, key_prefix.to_string(), hold.clone()));
        hold
    }

    /// Leave `keys` out of every later listing (rule 7); they stay readable.
    pub fn hide_in_listings<I: IntoIterator<Item = String>>(&self, keys: I) {
        self.lock().hidden.extend(keys);
    }

    /// List every key again.
    pub fn show_in_listings(&self) {
        self.lock().hidden.clear();
    }

    /// Turn the outage on (every call fails transiently) or off.
    pub fn set_outage(&self, on: bool) {
        self.outage.store(on, Ordering::SeqCst);
    }

    /// Faults injected at `point` so far (outage failures included).
    pub fn injected(&self, point: FaultPoint) -> u64 {
        self.injected[point.index()].load(Ordering::SeqCst)
    }

    /// Faults injected at all points so far.
    pub fn injected_total(&self) -> u64 {
        FaultPoint::ALL.iter().map(|p| self.injected(*p)).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decide whether this call at `point` on `key` gets a fault, and which.
    fn pick(&self, point: FaultPoint, key: &str) -> Option<Fault> {
        if self.outage.load(Ordering::SeqCst) {
            self.injected[point.index()].fetch_add(1, Ordering::SeqCst);
            return Some(Fault::Transient);
        }
        let mut r = self.lock();
        let i = point.index();
        let rule = r.rules[i].clone()?;
        if !key.starts_with(r.scopes[i].as_str()) {
            return None;
        }
        if rule.limit.is_some_and(|limit| r.fired[i] >= limit) {
            return None;
        }
        let share = rule.share.clamp(0.0, 1.0);
        if !r.rng.random_bool(share) {
            return None;
        }
        r.fired[i] += 1;
        self.injected[i].fetch_add(1, Ordering::SeqCst);
        Some(rule.fault)
    }

    /// Wait at a hold armed for this call, if any (rule 6).
    async fn wait_if_held(&self, point: FaultPoint, key: &str) {
        let hold = {
            let mut r = self.lock();
            let at = r
                .holds
                .iter()
                .position(|(p, prefix, _)| *p == point && key.starts_with(prefix.as_str()));
            at.map(|i| r.holds.remove(i).2)
        };
        if let Some(hold) = hold {
            hold.wait().await;
        }
    }

    /// Draw a fault for `point` and apply it around `op` (the real call).
    async fn apply<T, F>(&self, point: FaultPoint, key: &str, op: F) -> StoreResult<T>
    where
        F: std::future::Future<Output = StoreResult<T>>,
    {
        self.wait_if_held(point, key).await;
        let fault = self.pick(point, key);
        self.apply_picked(point, fault, key, op).await
    }

    async fn apply_picked<T, F>(
        &self,
        point: FaultPoint,
        fault: Option<Fault>,
        key: &str,
        op: F,
    ) -> StoreResult<T>
    where
        F: std::future::Future<Output = StoreResult<T>>,
    {
        let msg = || format!("injected fault at {} on {key}", point.name());
        match fault {
            None => op.await,
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                op.await
            }
            Some(Fault::Permanent) => Err(StoreError::Permanent(msg())),
            Some(Fault::LostResponse) => {
                let _ = op.await;
                Err(StoreError::Transient(msg()))
            }
            Some(Fault::Transient | Fault::DroppedPut | Fault::TornPut) => {
                Err(StoreError::Transient(msg()))
            }
        }
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for FaultyStore<S> {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        self.apply(FaultPoint::Get, key, self.inner.get(key)).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.apply(FaultPoint::GetRange, key, self.inner.get_range(key, range))
            .await
    }

    async fn get_range_placed(
        &self,
        key: &str,
        range: Range<u64>,
        page_at: u64,
    ) -> StoreResult<Bytes> {
        let op = self.inner.get_range_placed(key, range, page_at);
        self.apply(FaultPoint::GetRange, key, op).await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        self.wait_if_held(FaultPoint::Put, key).await;
        let fault = self.pick(FaultPoint::Put, key);
        if fault == Some(Fault::TornPut) {
            let prefix = data.slice(..data.len() / 2);
            let _ = self.inner.put(key, prefix, mode).await;
            return Err(StoreError::Transient(format!("injected torn put on {key}")));
        }
        self.apply_picked(FaultPoint::Put, fault, key, self.inner.put(key, data, mode))
            .await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.apply(FaultPoint::Head, key, self.inner.head(key))
            .await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        let mut listed = self
            .apply(FaultPoint::List, prefix, self.inner.list(prefix))
            .await?;
        let r = self.lock();
        listed.retain(|m| !r.hidden.contains(&m.key));
        Ok(listed)
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.apply(FaultPoint::Delete, key, self.inner.delete(key))
            .await
    }

    fn puts_in_flight(&self) -> usize {
        self.inner.puts_in_flight()
    }
}
