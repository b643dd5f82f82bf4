//! Chunk window GETs in flight, shared: concurrent readers (and the
//! prefetcher) of one cache window cost one store request.
//!
//! A GET covers a *run* of whole cache windows ([`SLOT`] bytes each, the
//! last window of a chunk may be shorter) of one chunk object. While it is
//! in flight, every window of the run is registered here under its chunk
//! identity `(volume, seq, epoch, window)`; a reader that misses the cache
//! for such a window waits on that GET instead of sending its own.
//!
//! Invariants:
//! 1. An entry names an immutable chunk object (see the cache's invariant
//!    1), so any reader that resolved a window of that chunk through the
//!    map may take the bytes of a GET started by anyone: they are the same
//!    bytes.
//! 2. Every GET's bytes are CRC-checked ([`super::read::fetch_within`])
//!    before anyone sees them, and go into the read cache (each window's
//!    slot reserved, then the run's windows written together:
//!    [`Cache::reserve`], [`Cache::fill_run`]) before the run leaves this
//!    table and before any waiting read gets them, so a read's data is
//!    cached when the read returns, and a reader finds the bytes in the
//!    cache or the table (if it looks at the cache just before the fill
//!    and at the table just after the removal it sends a GET of its own:
//!    one extra request, never wrong data).
//! 3. A run's table entries are removed by the task that ran its GET, and
//!    only if they still belong to that run.
//! 4. Waiting never blocks a thread: the GET runs on the runtime and
//!    waiters await a shared `oneshot`.
//! 5. A prefetch run, once cached, stays in the table as *staged* bytes
//!    until a read takes its windows ([`Inflight::take_staged`]: the bytes
//!    are handed over from memory, so a sequential reader does not read
//!    back from the cache file what was just written there) or until it is
//!    evicted, oldest first ([`Inflight::evict_staged`]). Staged bytes stay
//!    counted in the prefetcher's in-flight budget, so prefetched data in
//!    memory (in flight or staged) is bounded by
//!    `engine.prefetch_max_in_flight` plus one run.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::FutureExt;

use super::cache::{Cache, Reservation, SLOT};
use super::checkpoint::ChunkInfo;
use super::format::layout::chunk_key;
use super::read::{fetch_within, window_crcs, window_id, StoreOrCrc};
use super::read_state::{FetchError, Inflight, Mode, RunFuture, RunResult, Staged, Table};
use super::volume_core::Inner;
use crate::store::StoreError;

/// The longest run one GET covers.
pub const MAX_RUN: u64 = 8 << 20;

impl Staged {
    /// Bytes of window `w` of the run.
    fn window_len(&self, w: u64) -> u64 {
        self.stop.min((w + 1) * SLOT).saturating_sub(w * SLOT)
    }

    /// Give window `w`'s bytes back to the budget.
    fn release(&self, w: u64) {
        give_back(&self.in_flight, self.window_len(w));
    }
}

/// Take `len` bytes off a prefetch budget (saturating: the budget is only
/// ever a bound, never a reason to panic).
fn give_back(budget: &AtomicU64, len: u64) {
    let _ = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(len))
    });
}

impl From<StoreOrCrc> for FetchError {
    fn from(e: StoreOrCrc) -> Self {
        match e {
            StoreOrCrc::Store(StoreError::NotFound { .. }) => FetchError::NotFound,
            StoreOrCrc::Store(e) => FetchError::Store(e.to_string()),
            StoreOrCrc::Crc(e) => FetchError::Crc(e),
        }
    }
}

/// One window's share of a GET.
pub(crate) struct WindowWait {
    run: RunFuture,
    /// Offset of the window in the run's bytes.
    at: usize,
}

impl WindowWait {
    /// The window's bytes (at most [`SLOT`]).
    pub async fn bytes(self) -> RunResult {
        let data = self.run.await?;
        let end = (self.at + SLOT as usize).min(data.len());
        if self.at >= end {
            return Err(FetchError::Store("chunk GET returned a short range".into()));
        }
        Ok(data.slice(self.at..end))
    }
}

impl std::fmt::Debug for WindowWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowWait").field("at", &self.at).finish()
    }
}

impl Inflight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bytes of window `w` of chunk `info` of `volume` if a staged
    /// prefetch run holds them (CRC-checked when fetched); the window
    /// leaves the table and its bytes leave the prefetch budget.
    pub fn take_staged(&self, volume: u64, info: &ChunkInfo, w: u64) -> Option<Bytes> {
        let key = (volume, info.seq, info.epoch, w);
        let mut table = self.lock();
        let run = table.windows.get(&key)?.0;
        let staged = table.staged.get_mut(&run)?;
        if !staged.left.contains(&w) {
            return None;
        }
        let at = usize::try_from(w * SLOT - staged.start).ok()?;
        let end = (at + SLOT as usize).min(staged.data.len());
        let bytes = (at < end).then(|| staged.data.slice(at..end));
        staged.left.retain(|&x| x != w);
        staged.release(w);
        if staged.left.is_empty() {
            table.staged.remove(&run);
        }
        table.windows.remove(&key);
        bytes
    }

    /// Drop the oldest staged run (its windows stay in the read cache) and
    /// give its bytes back to the budget; false when nothing is staged.
    pub fn evict_staged(&self) -> bool {
        let mut table = self.lock();
        let Some((run, staged)) = table.staged.pop_first() else {
            return false;
        };
        let (volume, seq, epoch) = staged.chunk;
        for &w in &staged.left {
            let key = (volume, seq, epoch, w);
            if table.windows.get(&key).is_some_and(|(r, _, _)| *r == run) {
                table.windows.remove(&key);
            }
            staged.release(w);
        }
        true
    }

    /// Windows `wins` of chunk `info` of `volume` (which the caller
    /// resolved through the map). In [`Mode::Read`], one wait per window,
    /// in order; in [`Mode::Prefetch`], none, and the bytes of the GETs
    /// sent (0 when everything was cached, in flight or over the limit).
    pub fn fetch(
        self: &Arc<Self>,
        inner: &Inner,
        volume: u64,
        info: &Arc<ChunkInfo>,
        wins: Range<u64>,
        mode: Mode<'_>,
    ) -> (Vec<WindowWait>, u64) {
        let last = info.data_len.div_ceil(SLOT);
        let wins = wins.start..wins.end.min(last);
        let mut waits = Vec::new();
        let mut sent = 0u64;
        let mut table = self.lock();
        let map = &mut table.windows;
        let mut w = wins.start;
        while w < wins.end {
            let key = (volume, info.seq, info.epoch, w);
            if let Some((_, run, start)) = map.get(&key) {
                if let Mode::Read { .. } = mode {
                    self.joined.fetch_add(1, Ordering::Relaxed);
                    waits.push(WindowWait {
                        run: run.clone(),
                        at: (w * SLOT - start) as usize,
                    });
                }
                w += 1;
                continue;
            }
            let cached = |w: u64| {
                inner
                    .cache
                    .as_ref()
                    .is_some_and(|c| c.contains(&window_id(volume, info, w)))
            };
            if let Mode::Prefetch { .. } = mode {
                if cached(w) {
                    w += 1;
                    continue;
                }
            }
            // A run of windows neither in flight nor (for prefetch) cached.
            let mut end = w + 1;
            while end < wins.end
                && (end - w) * SLOT < MAX_RUN
                && !map.contains_key(&(volume, info.seq, info.epoch, end))
                && !(matches!(mode, Mode::Prefetch { .. }) && cached(end))
            {
                end += 1;
            }
            let (start, stop) = (w * SLOT, (end * SLOT).min(info.data_len));
            let len = stop - start;
            let (used, done): (Range<u64>, Option<Done>) = match &mode {
                Mode::Read { used } => (used.clone(), None),
                Mode::Prefetch {
                    in_flight,
                    limit,
                    errors,
                } => {
                    if in_flight.load(Ordering::Relaxed) >= *limit {
                        break;
                    }
                    in_flight.fetch_add(len, Ordering::Relaxed);
                    sent += len;
                    (
                        0..0,
                        Some(Done {
                            in_flight: Arc::clone(in_flight),
                            errors: Arc::clone(errors),
                            len,
                        }),
                    )
                }
            };
            let run = self.launch(inner, volume, info, w..end, used, done);
            for x in w..end {
                map.insert(
                    (volume, info.seq, info.epoch, x),
                    (run.0, run.1.clone(), start),
                );
                if let Mode::Read { .. } = mode {
                    waits.push(WindowWait {
                        run: run.1.clone(),
                        at: ((x - w) * SLOT) as usize,
                    });
                }
            }
            w = end;
        }
        (waits, sent)
    }

    /// Send the GET of windows `wins` (called with the table locked; the
    /// caller registers the run).
    fn launch(
        self: &Arc<Self>,
        inner: &Inner,
        volume: u64,
        info: &Arc<ChunkInfo>,
        wins: Range<u64>,
        used: Range<u64>,
        done: Option<Done>,
    ) -> (u64, RunFuture) {
        let id = self.next_run.fetch_add(1, Ordering::Relaxed);
        let (start, end) = (wins.start * SLOT, (wins.end * SLOT).min(info.data_len));
        let (tx, rx) = oneshot::channel::<RunResult>();
        let run: RunFuture = rx
            .map(|r| r.unwrap_or(Err(FetchError::Closed)))
            .boxed()
            .shared();
        inner.counters.store_reads.fetch_add(1, Ordering::Relaxed);
        let store = inner.store.clone();
        let key = chunk_key(volume, info.seq, info.epoch);
        let budget = std::time::Duration::from_millis(inner.cfg.store_read_timeout_ms);
        // Weak: a GET outliving its volume (closed meanwhile) must not keep
        // the cache directory locked against the next open.
        let cache = inner.cache.as_ref().map(Arc::downgrade);
        let info = info.clone();
        let table = Arc::clone(self);
        let tables = inner.tables.clone();
        inner.rt.spawn(async move {
            let got = fetch_within(
                budget,
                store,
                &tables,
                volume,
                key.clone(),
                info.clone(),
                start,
                end,
            )
            .await
            .map_err(FetchError::from);
            // Cache the windows (with their block CRCs from the verified
            // table), then free the table entries, then hand the bytes to
            // the waiting reads (invariant 2).
            let fills = match (&got, cache.and_then(|c| c.upgrade())) {
                (Ok((data, crcs)), Some(cache)) => Some(Fills::reserve(
                    cache, volume, &info, crcs, wins.start, data, &used,
                )),
                _ => None,
            };
            let res: RunResult = got.map(|(data, _)| data);
            if let Some(fills) = fills {
                // File writes: off the async workers.
                if tokio::task::spawn_blocking(move || fills.write())
                    .await
                    .is_err()
                {
                    log::warn!("read cache: caching {key} failed");
                }
            }
            {
                let mut guard = table.lock();
                let t = &mut *guard;
                let mut mine = Vec::new();
                for w in wins.clone() {
                    let k = (volume, info.seq, info.epoch, w);
                    if t.windows.get(&k).is_some_and(|(r, _, _)| *r == id) {
                        mine.push(w);
                    }
                }
                // A cached prefetch run waits in memory for its reader
                // (invariant 5); every other run leaves the table.
                let stage = match (&done, &res) {
                    (Some(d), Ok(data)) if !mine.is_empty() => Some(Staged {
                        chunk: (volume, info.seq, info.epoch),
                        left: mine.clone(),
                        data: data.clone(),
                        start,
                        stop: end,
                        in_flight: Arc::clone(&d.in_flight),
                    }),
                    _ => None,
                };
                match stage {
                    Some(staged) => {
                        // Windows given up before staging leave the budget now.
                        for w in wins.clone().filter(|w| !mine.contains(w)) {
                            staged.release(w);
                        }
                        t.staged.insert(id, staged);
                    }
                    None => {
                        for w in mine {
                            t.windows.remove(&(volume, info.seq, info.epoch, w));
                        }
                        if let Some(d) = &done {
                            d.release();
                        }
                    }
                }
            }
            if let Some(d) = done {
                d.report(&key, &res);
            }
            let _ = tx.send(res);
        });
        (id, run)
    }
}

/// The cache windows of one GET, reserved and waiting to be written.
/// Dropped unwritten (the blocking task never ran), it gives the slots
/// back, so [`Cache::close`] never waits for them.
struct Fills {
    cache: Arc<Cache>,
    /// The GET's bytes; each window's are a range of them.
    data: Bytes,
    windows: Vec<(Reservation, Range<usize>)>,
}

impl Fills {
    /// Reserve a slot for each window of `data` (the bytes of windows
    /// from `first` on of chunk `info`); `used` is the data-area range
    /// the sending read needs.
    fn reserve(
        cache: Arc<Cache>,
        volume: u64,
        info: &ChunkInfo,
        table: &[u32],
        first: u64,
        data: &Bytes,
        used: &Range<u64>,
    ) -> Fills {
        let mut windows = Vec::new();
        for (i, at) in (0..data.len()).step_by(SLOT as usize).enumerate() {
            let win = at..(at + SLOT as usize).min(data.len());
            let w = first + i as u64;
            let ws = w * SLOT;
            // The part of the window the sending read used.
            let u = used.start.clamp(ws, ws + SLOT) - ws..used.end.clamp(ws, ws + SLOT) - ws;
            let id = window_id(volume, info, w);
            let crcs = window_crcs(table, w);
            if let Some(r) = cache.reserve(&id, crcs, win.len() as u64, u) {
                windows.push((r, win));
            }
        }
        Fills {
            cache,
            data: data.clone(),
            windows,
        }
    }

    fn write(mut self) {
        let windows = std::mem::take(&mut self.windows);
        self.cache.fill_run(&self.data, windows);
    }
}

impl Drop for Fills {
    fn drop(&mut self) {
        for (r, _) in self.windows.drain(..) {
            self.cache.abandon(r);
        }
    }
}

/// Bookkeeping of a prefetch GET when it ends.
struct Done {
    in_flight: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    len: u64,
}

impl Done {
    /// Give the whole GET's bytes back to the budget (it was not staged).
    fn release(&self) {
        give_back(&self.in_flight, self.len);
    }

    /// Count and log the GET's failure, if it failed.
    fn report(self, key: &str, res: &RunResult) {
        match res {
            Ok(_) => {}
            // GC deleted the chunk after the map named it: nothing to read.
            Err(FetchError::NotFound) => log::debug!("prefetch of {key}: object gone"),
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("prefetch of {key} failed (the read will retry it): {e:?}");
            }
        }
    }
}
