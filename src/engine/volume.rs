//! A volume: wiring of WAL, maps, destage, read path and recovery behind
//! [`BlockDevice`].
//!
//! Invariants:
//! 1. A write is acknowledged only after its WAL record is written (and
//!    synced for FUA), and the live map already points at it.
//! 2. `flush` syncs the WAL; with `durability: store` it then waits until a
//!    manifest commit covers every write acknowledged before it.
//! 3. While the unstored data is at its bound (bytes or age), new writes wait
//!    for destage; they never fail because of the bound. The byte bound is
//!    `engine.max_unstored_bytes`, or less when destage cannot use that much
//!    ([`super::destage::window::backlog_bound`]). The byte bound is
//!    checked against the unstored bytes plus those of requests already
//!    admitted and not yet logged ([`Room`]), so concurrent writers cannot
//!    pass it together: unstored bytes exceed it by less than one request.
//! 4. Once fenced, no write or flush is acknowledged again.
//! 5. All futures here are runtime-agnostic: they wait only on
//!    `futures::channel::oneshot`, never on tokio timers or I/O.
//! 6. While [`Volume::snapshot`] runs, new writes, trims and zeroes wait
//!    (they do not fail); reads and flushes go on.
//! 7. With an [`AckGate`] installed, no write, trim, write_zeroes or flush
//!    is acknowledged unless the gate admits it at that moment (the lease's
//!    acknowledgement deadline, see `catalog::lease`); a refusal fails the
//!    request with [`BlockError::Fenced`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::channel::oneshot;

use super::allocation::{Allocation, Extent, Runs, BATCH};
use super::config::{Durability, EngineConfig};
use super::destage;
use super::error::EngineError;
use super::map::Loc;
use super::meta;
use super::meta::manifest::Root;
use super::recovery;
use super::state::State;
use super::task_request;
use super::volume_core::{Counters, Inner, Shared};
use super::wal::record::RecordKind;
use super::wal::{NewRecord, Wal};
use super::{check_range, read, warm_start, BlockDevice, ReadParts, SECTOR};
use crate::clock::DynClock;
use crate::error::BlockError;
use crate::store::DynStore;

mod snapshot;
mod space;

pub use super::volume_core::VolumeParams;

/// Counters describing a volume (see [`Volume::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Bytes acknowledged but not yet in the store.
    pub unstored_bytes: u64,
    /// Bytes in WAL segment files.
    pub wal_bytes: u64,
    /// Last op sequence number written to the WAL.
    pub last_seq: u64,
    /// Last op sequence number in the store.
    pub stored_seq: u64,
    pub chunks_written: u64,
    pub chunk_bytes_written: u64,
    pub checkpoints_written: u64,
    pub chunks_deleted: u64,
    /// Sparse chunks whose live data compaction moved into a new object.
    pub chunks_compacted: u64,
    /// Bytes of compaction objects written.
    pub compacted_bytes_written: u64,
    pub destage_errors: u64,
    pub store_reads: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Entries in the live extent map.
    pub map_extents: u64,
    /// Snapshots taken while open ([`Volume::snapshot`]).
    pub snapshots_taken: u64,
    /// How long the last snapshot held new writes back, in microseconds.
    pub last_snapshot_pause_us: u64,
    /// Age of the oldest acknowledged write not yet in the store, in ms.
    pub oldest_unstored_ms: u64,
    /// The bounds on unstored data in force: `engine.max_unstored_seconds`,
    /// and `engine.max_unstored_bytes` or less
    /// ([`super::destage::window::backlog_bound`]).
    pub max_unstored_bytes: u64,
    pub max_unstored_seconds: u64,
    /// Total time writes waited for room (unstored bound or a snapshot), µs.
    pub backpressure_us: u64,
    /// Total time chunk puts took (destage), µs.
    pub destage_us: u64,
    /// Total time checkpoints took (compaction, put and commit), µs.
    pub checkpoint_us: u64,
    /// Bytes read requests took from the read cache.
    pub cache_hit_bytes: u64,
    /// Read cache windows evicted for new ones.
    pub cache_evictions: u64,
    /// Read cache entries that failed their CRC check (damaged or stale)
    /// and were dropped and refetched from the store.
    pub cache_corrupt: u64,
    /// Read cache windows found on disk at open (kept from the last run).
    pub cache_restored: u64,
    /// Bytes of read cache fills copied into an aligned buffer before
    /// their `O_DIRECT` write (GET bodies that did not land page-aligned).
    pub cache_fill_copied_bytes: u64,
    /// Size of the read cache in bytes (0: disabled).
    pub cache_capacity_bytes: u64,
    /// Bytes readahead sent store GETs for.
    pub prefetch_bytes: u64,
    /// Bytes reads took from prefetched data still in memory (a part of
    /// `cache_hit_bytes`).
    pub prefetch_hit_bytes: u64,
    /// Readahead GETs that failed (logged; reads fetch the data themselves).
    pub prefetch_errors: u64,
    /// Cache windows a read took from a GET already in flight (sent by
    /// another read or by readahead) instead of sending its own.
    pub fetch_shared: u64,
}

/// Whether acknowledgements may be given now (invariant 7). Implemented by
/// the lease (`catalog::lease`); the engine only asks.
pub trait AckGate: Send + Sync {
    /// Decide for an acknowledgement about to be given. Must be cheap when
    /// the answer is [`Admission::Now`].
    fn admit(&self) -> Admission;
}

/// The answer of an [`AckGate`].
#[derive(Debug)]
pub enum Admission {
    /// Acknowledge.
    Now,
    /// Ask again once this resolves (or is dropped).
    Wait(oneshot::Receiver<()>),
    /// Fail the request, for this reason.
    Refused(String),
}

/// Largest WAL record payload; bigger writes are split (chained with the
/// record flag `more`). As large as the biggest NBD request, so every
/// frontend request is one record: one CRC pass, one channel send, one
/// extent. Reads inside a big record stay small because the record has a
/// CRC per 4 KiB block (see [`super::wal::record`]).
const MAX_RECORD: usize = 32 << 20;

/// Room under the unstored bound taken by one admitted request until its
/// records are in the pending queue (or it failed): counted in
/// [`State::admitted_bytes`] meanwhile; dropping it gives the room back
/// and wakes the writers waiting for room: a failed request's room is free
/// again, and a logged one's records counted twice (pending and here)
/// until now, so writers refused meanwhile may fit; nothing else would
/// wake them while the store holds every put back.
struct Room {
    shared: Arc<Shared>,
    bytes: u64,
}

impl Drop for Room {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.admitted_bytes -= self.bytes;
        st.wake_all();
    }
}

/// The volume's read cache: in `<local_dir>/cache`, or
/// `<engine.cache_dir>/<id as 16 hex digits>` when that is set; owned by
/// the local directory's identity file (store, volume and directory ids),
/// or by the directory's path where there is none (volumes opened without
/// a claim, as tests do).
fn open_cache(
    params: &VolumeParams,
    cfg: &EngineConfig,
) -> Result<Option<super::cache::Cache>, EngineError> {
    let dir = match &cfg.cache_dir {
        Some(d) => d.join(format!("{:016x}", params.id)),
        None => params.local_dir.join("cache"),
    };
    let owner = std::fs::read(params.local_dir.join("identity.json"))
        .unwrap_or_else(|_| params.local_dir.as_os_str().as_encoded_bytes().to_vec());
    Ok(super::cache::Cache::open(&dir, cfg.cache_size, &owner)?)
}

/// An open volume. Dropping it without [`Volume::close`] stops its
/// background work at once, like a crash (the WAL keeps what was written).
pub struct Volume {
    pub(crate) inner: Arc<Inner>,
    /// The snapshot API's requests to the destage task
    /// (`volume/snapshot.rs`, `live_snapshot.rs`).
    to_destage: task_request::DestageSender,
    /// The destage and meta tasks: aborting both stops every store write.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    ack_gate: OnceLock<Arc<dyn AckGate>>,
    warm: OnceLock<WarmStart>,
}

/// A running warm start ([`Volume::start_warm_start`]).
struct WarmStart {
    recorder: Arc<warm_start::Recorder>,
    playback: Arc<warm_start::Playback>,
    /// Playback, and the task that stores the recording when its window ends.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl WarmStart {
    fn abort(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("id", &self.inner.id)
            .field("size", &self.inner.size)
            .finish_non_exhaustive()
    }
}

impl Volume {
    /// What every read does first: check the range, and note it for the
    /// warm-start recording.
    fn admit_read(&self, offset: u64, len: usize) -> Result<(), BlockError> {
        check_range(offset, len as u64, self.inner.size)?;
        if let Some(w) = self.warm.get() {
            w.recorder
                .note(self.inner.clock.monotonic(), offset, len as u64);
        }
        Ok(())
    }

    /// Open (recovering as needed) a volume. Must be called inside a tokio
    /// runtime: the destage task and store reads run on it.
    pub async fn open(
        store: DynStore,
        params: VolumeParams,
        cfg: EngineConfig,
        clock: DynClock,
    ) -> Result<Arc<Volume>, EngineError> {
        let fs = super::wal::fs::real_with(super::wal::fs::WalIo::direct_if(cfg.wal_direct_io));
        Self::open_with_fs(store, params, cfg, clock, fs).await
    }

    /// [`Volume::open`] with the WAL on `fs` (tests use a file system that
    /// can lose power; see [`super::wal::power_loss`]).
    pub async fn open_with_fs(
        store: DynStore,
        params: VolumeParams,
        cfg: EngineConfig,
        clock: DynClock,
        fs: super::wal::fs::DynWalFs,
    ) -> Result<Arc<Volume>, EngineError> {
        cfg.validate()?;
        if params.size == 0 || !params.size.is_multiple_of(SECTOR) {
            return Err(EngineError::InvalidParams(format!(
                "size {} must be a non-zero multiple of {SECTOR}",
                params.size
            )));
        }
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            EngineError::InvalidParams("Volume::open must run inside a tokio runtime".into())
        })?;
        crate::private::create_dir_all(&params.local_dir)
            .map_err(|e| EngineError::LocalIo(format!("{}: {e}", params.local_dir.display())))?;
        let mut rec = recovery::recover(&store, &params, clock.now(), &fs).await?;
        let refs = super::space_admission::load_snapshot_refs(&store, params.id).await;
        rec.state.track(refs);
        let shared = Arc::new(Shared {
            state: Mutex::new(rec.state),
            notify: tokio::sync::Notify::new(),
        });
        let apply_shared = shared.clone();
        let apply_clock = clock.clone();
        let chunk_size = cfg.chunk_size;
        let apply = Box::new(move |recs: &[super::wal::Appended]| {
            let now = apply_clock.now();
            let due = {
                let mut st = apply_shared.lock();
                st.apply_appended(recs, now);
                st.pending_bytes >= chunk_size
            };
            if due {
                apply_shared.notify.notify_one();
            }
        });
        let seg_limit = (cfg.chunk_size * 4).max(16 << 20);
        let wal = Wal::start(
            fs,
            &params.local_dir.join("wal"),
            params.id,
            rec.wal,
            seg_limit,
            cfg.wal_memory,
            apply,
        )?;
        let cache = open_cache(&params, &cfg)?;
        let unstored_bound = {
            use super::destage::window;
            let l = window::limits(
                store.puts_in_flight(),
                cfg.max_unstored_bytes,
                cfg.chunk_size,
            );
            window::backlog_bound(l, cfg.chunk_size, cfg.wal_memory, cfg.max_unstored_bytes)
        };
        let inner = Arc::new(Inner {
            id: params.id,
            size: params.size,
            epoch: params.epoch,
            unstored_bound,
            cfg,
            clock,
            store,
            rt: rt.clone(),
            wal,
            shared,
            counters: Counters::default(),
            cache: cache.map(Arc::new),
            fetches: Default::default(),
            tables: rec.tables.clone(),
            prefetch: Default::default(),
            parent: rec.parent,
            parent_ref: rec.manifest.parent,
            close_tx: Mutex::new(None),
        });
        // The meta task owns the manifest; destage tells it what happened.
        // The snapshot API asks destage for snapshots and GC.
        let (to_meta, meta_rx) = task_request::meta_channel();
        let (to_destage, destage_rx) = task_request::destage_channel();
        let root = Root {
            manifest: rec.manifest,
            version: rec.manifest_version,
        };
        let tasks = vec![
            rt.spawn(meta::task::run(
                inner.clone(),
                root,
                meta_rx,
                to_destage.clone(),
            )),
            rt.spawn(destage::run(inner.clone(), to_meta, destage_rx)),
        ];
        Ok(Arc::new(Volume {
            inner,
            to_destage,
            tasks: Mutex::new(tasks),
            ack_gate: OnceLock::new(),
            warm: OnceLock::new(),
        }))
    }

    /// Start warm start ([`warm_start`]): read back in the background what
    /// the previous attach recorded, and record the user reads of the next
    /// `cfg.seconds` (stored when that window ends, or at close). Only the
    /// first call takes effect; `seconds: 0` does nothing.
    pub fn start_warm_start(&self, cfg: &warm_start::WarmStartConfig) {
        if cfg.seconds == 0 {
            return;
        }
        let recorder = Arc::new(warm_start::Recorder::new(self.inner.clock.monotonic(), cfg));
        let playback = Arc::new(warm_start::Playback::default());
        let w = WarmStart {
            recorder: recorder.clone(),
            playback: playback.clone(),
            tasks: Mutex::new(Vec::new()),
        };
        if self.warm.set(w).is_err() {
            return;
        }
        let play = self
            .inner
            .rt
            .spawn(warm_start::play(self.inner.clone(), cfg.clone(), playback));
        let inner = self.inner.clone();
        let window = Duration::from_secs(cfg.seconds);
        let record = self.inner.rt.spawn(async move {
            tokio::time::sleep(window).await;
            warm_start::store_recording(&inner, &recorder).await;
        });
        if let Some(w) = self.warm.get() {
            w.tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend([play, record]);
        }
    }

    /// How far warm start playback got (`None` without warm start).
    pub fn warm_start_progress(&self) -> Option<warm_start::Progress> {
        self.warm.get().map(|w| w.playback.progress())
    }

    /// Flush, destage everything, write a final checkpoint and stop.
    /// Later requests fail with [`BlockError::Closed`]. The read cache is
    /// released when this returns, even if the volume is still referenced,
    /// so the volume can be opened again at once.
    pub async fn close(&self) -> Result<(), EngineError> {
        if let Some(w) = self.warm.get() {
            w.abort();
            warm_start::store_recording(&self.inner, &w.recorder).await;
        }
        let res = self.close_volume().await;
        self.release_cache();
        res
    }

    /// Release the read cache's directory (cache invariant 6).
    fn release_cache(&self) {
        if let Some(c) = &self.inner.cache {
            c.close();
        }
    }

    async fn close_volume(&self) -> Result<(), EngineError> {
        // A fenced volume may store nothing more (its destage task has
        // stopped or is stopping): keep the WAL as it is and say why.
        if let Some(why) = self.fenced() {
            self.inner.wal.stop();
            return Err(EngineError::Fenced(why));
        }
        let synced = self.inner.wal.sync().await;
        let (tx, rx) = oneshot::channel();
        // The sender is in place before anyone can see `closing`: a close
        // finished at once (nothing to store) still finds it to answer.
        *self
            .inner
            .close_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(tx);
        {
            let mut st = self.inner.shared.lock();
            st.closing = true;
            st.wake_all();
        }
        self.inner.shared.notify.notify_one();
        // Fenced meanwhile, and the destage task may have ended before it
        // could see our sender: answer for it (if it took the sender, it
        // sends the answer itself).
        if let Some(why) = self.fenced() {
            let ours = self
                .inner
                .close_tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if ours.is_some() {
                self.inner.wal.stop();
                return Err(EngineError::Fenced(why));
            }
        }
        let res = rx.await.unwrap_or(Err(EngineError::Closed));
        self.inner.wal.stop();
        synced?;
        res
    }

    /// Stop everything at once without flushing or destaging, as `kill -9`
    /// would: once this returns nothing more is written to the WAL or store
    /// by this volume. Meant for crash tests.
    pub async fn crash(&self) {
        if let Some(w) = self.warm.get() {
            w.abort();
        }
        self.inner.wal.stop();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        {
            let mut st = self.inner.shared.lock();
            st.closing = true;
            st.wake_all();
        }
        self.release_cache();
    }

    /// Fence the volume (its lease was lost): from now on every write, trim,
    /// write_zeroes and flush fails with [`BlockError::Fenced`] naming
    /// `reason`, and destage stores nothing more (no chunk, checkpoint or
    /// manifest), so nothing written after this call can become visible to
    /// the next holder. Idempotent; the first reason is kept. Reads still work.
    pub fn fence(&self, reason: &str) {
        {
            let mut st = self.inner.shared.lock();
            if st.fenced.is_none() {
                log::error!("volume {:x} fenced: {reason}", self.inner.id);
                st.fenced = Some(reason.to_string());
            }
            st.wake_all();
        }
        self.inner.shared.notify.notify_one();
    }

    /// Install the gate every later acknowledgement must pass (invariant 7).
    /// Only the first call takes effect; returns whether this one did.
    pub fn set_ack_gate(&self, gate: Arc<dyn AckGate>) -> bool {
        self.ack_gate.set(gate).is_ok()
    }

    /// Pass the [`AckGate`], if any, waiting while it says so.
    async fn admit_ack(&self) -> Result<(), BlockError> {
        let Some(gate) = self.ack_gate.get() else {
            return Ok(());
        };
        loop {
            match gate.admit() {
                Admission::Now => return Ok(()),
                Admission::Refused(why) => return Err(BlockError::Fenced(why)),
                Admission::Wait(rx) => {
                    let _ = rx.await;
                }
            }
        }
    }

    /// The snapshot this volume (a clone) reads through to, if any; a
    /// snapshot taken of its map must record it.
    pub fn parent(&self) -> Option<super::format::manifest::ParentRef> {
        self.inner.parent_ref
    }

    /// Why the volume is fenced, if it is.
    pub fn fenced(&self) -> Option<String> {
        self.inner.shared.lock().fenced.clone()
    }

    /// Current counters.
    pub fn stats(&self) -> VolumeStats {
        let c = &self.inner.counters;
        let (unstored, stored_seq, extents, oldest) = {
            let st = self.inner.shared.lock();
            let oldest = st.pending.front().map(|p| p.at);
            (
                st.pending_bytes,
                st.stored_seq,
                st.extent_count() as u64,
                oldest,
            )
        };
        let oldest_unstored_ms = oldest.map_or(0, |at| {
            let age = self.inner.clock.now().saturating_sub(at);
            u64::try_from(age.as_millis()).unwrap_or(u64::MAX)
        });
        let cfg = &self.inner.cfg;
        let us = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VolumeStats {
            unstored_bytes: unstored,
            wal_bytes: self.inner.wal.bytes(),
            last_seq: self.inner.wal.last_seq(),
            stored_seq,
            chunks_written: c.chunks_written.load(Ordering::Relaxed),
            chunk_bytes_written: c.chunk_bytes_written.load(Ordering::Relaxed),
            checkpoints_written: c.checkpoints_written.load(Ordering::Relaxed),
            chunks_deleted: c.chunks_deleted.load(Ordering::Relaxed),
            chunks_compacted: c.chunks_compacted.load(Ordering::Relaxed),
            compacted_bytes_written: c.compacted_bytes_written.load(Ordering::Relaxed),
            destage_errors: c.destage_errors.load(Ordering::Relaxed),
            store_reads: c.store_reads.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            cache_misses: c.cache_misses.load(Ordering::Relaxed),
            map_extents: extents,
            snapshots_taken: c.snapshots_taken.load(Ordering::Relaxed),
            last_snapshot_pause_us: c.last_snapshot_pause_us.load(Ordering::Relaxed),
            oldest_unstored_ms,
            max_unstored_bytes: self.inner.unstored_bound,
            max_unstored_seconds: cfg.max_unstored_seconds,
            backpressure_us: us(&c.backpressure_us),
            destage_us: us(&c.destage_us),
            checkpoint_us: us(&c.checkpoint_us),
            cache_hit_bytes: us(&c.cache_hit_bytes),
            cache_evictions: self.inner.cache.as_ref().map_or(0, |c| c.evictions()),
            cache_corrupt: us(&c.cache_corrupt),
            cache_restored: self.inner.cache.as_ref().map_or(0, |c| c.restored()),
            cache_fill_copied_bytes: self
                .inner
                .cache
                .as_ref()
                .map_or(0, |c| c.fill_copied_bytes()),
            cache_capacity_bytes: self.inner.cache.as_ref().map_or(0, |c| c.capacity()),
            prefetch_bytes: us(&self.inner.prefetch.bytes),
            prefetch_hit_bytes: us(&c.prefetch_hit_bytes),
            prefetch_errors: us(&self.inner.prefetch.errors),
            fetch_shared: us(&self.inner.fetches.joined),
        }
    }

    fn gate(st: &State) -> Result<(), BlockError> {
        if let Some(f) = &st.fenced {
            return Err(BlockError::Fenced(f.clone()));
        }
        if st.closing {
            return Err(BlockError::Closed);
        }
        Ok(())
    }

    fn gate_fenced(st: &State) -> Result<(), BlockError> {
        match &st.fenced {
            Some(f) => Err(BlockError::Fenced(f.clone())),
            None => Ok(()),
        }
    }

    /// Wait while the unstored data is at its bound (invariant 3) or a
    /// snapshot holds writes back (invariant 6); then take `cost` bytes of
    /// room (at least what the request's records will count) until the
    /// returned [`Room`] is dropped, once the records are logged.
    async fn wait_for_room(&self, cost: u64) -> Result<Room, BlockError> {
        let cfg = &self.inner.cfg;
        let mut waiting_since = None;
        loop {
            let rx = {
                let mut st = self.inner.shared.lock();
                Self::gate(&st)?;
                let now = self.inner.clock.now();
                let too_old = st.pending.front().is_some_and(|p| {
                    now.saturating_sub(p.at).as_secs() >= cfg.max_unstored_seconds
                });
                let used = st.pending_bytes + st.admitted_bytes;
                if !st.writes_paused && used < self.inner.unstored_bound && !too_old {
                    if let Some(since) = waiting_since {
                        let waited = now.saturating_sub(since).as_micros();
                        let waited = u64::try_from(waited).unwrap_or(u64::MAX);
                        let c = &self.inner.counters;
                        c.backpressure_us.fetch_add(waited, Ordering::Relaxed);
                    }
                    st.admitted_bytes += cost;
                    return Ok(Room {
                        shared: self.inner.shared.clone(),
                        bytes: cost,
                    });
                }
                waiting_since.get_or_insert(now);
                let (tx, rx) = oneshot::channel();
                st.waiters.push(tx);
                rx
            };
            self.inner.shared.notify.notify_one();
            let _ = rx.await;
        }
    }

    /// Wait until a manifest commit covers op `seq` (durability: store).
    async fn wait_store(&self, seq: u64) -> Result<(), BlockError> {
        loop {
            let rx = {
                let mut st = self.inner.shared.lock();
                if let Some(f) = &st.fenced {
                    return Err(BlockError::Fenced(f.clone()));
                }
                if st.committed_seq >= seq {
                    return Ok(());
                }
                st.store_target = st.store_target.max(seq);
                let (tx, rx) = oneshot::channel();
                st.waiters.push(tx);
                rx
            };
            self.inner.shared.notify.notify_one();
            if rx.await.is_err() {
                return Err(BlockError::Closed);
            }
        }
    }

    async fn log_op(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), BlockError> {
        check_range(offset, len, self.inner.size)?;
        if len == 0 {
            return Ok(());
        }
        // Trims and zeroes count one sector (`PendingRec::cost`).
        let room = self.wait_for_room(SECTOR).await?;
        let seq = self
            .inner
            .wal
            .append(kind, offset / SECTOR, len / SECTOR, data, fua)
            .await?;
        drop(room);
        Self::gate_fenced(&self.inner.shared.lock())?;
        if fua && self.inner.cfg.durability == Durability::Store {
            self.wait_store(seq).await?;
        }
        self.admit_ack().await
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Some(w) = self.warm.get() {
            w.abort();
        }
        self.inner.wal.stop();
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
        self.release_cache();
    }
}

/// The record of `piece`, written at byte `offset`: a zero record when
/// every byte is zero, else a write record holding the bytes (moved when
/// owned, copied when borrowed).
fn new_record(offset: u64, piece: std::borrow::Cow<'_, [u8]>) -> NewRecord {
    let zero = piece.iter().all(|&b| b == 0);
    NewRecord {
        kind: if zero {
            RecordKind::Zero
        } else {
            RecordKind::Write
        },
        lba: offset / SECTOR,
        sectors: piece.len() as u64 / SECTOR,
        data: match piece {
            _ if zero => Vec::new(),
            std::borrow::Cow::Owned(v) => v,
            // Copied into a payload buffer (the ublk frontend lends its
            // request buffers), which the WAL tail gives back.
            std::borrow::Cow::Borrowed(b) => {
                let mut v = super::payload_pool::take(b.len());
                v.extend_from_slice(b);
                v
            }
        },
    }
}

impl Volume {
    /// Log `recs`, the records of a checked write of `len` bytes at
    /// `offset`, once the unstored bound has room; durable on return when
    /// `fua`.
    async fn write_records(
        &self,
        offset: u64,
        len: u64,
        recs: Vec<NewRecord>,
        fua: bool,
    ) -> Result<(), BlockError> {
        if len == 0 {
            return Ok(());
        }
        // `len` is at least what the records count (a zero piece counts
        // one sector).
        let room = self.wait_for_room(len).await?;
        let _space = super::space_admission::admit(&self.inner.shared, offset, len, &recs)?;
        let waits = self.inner.wal.submit_many(recs, fua)?;
        let mut last = 0;
        for w in waits {
            last = last.max(w.await?);
        }
        drop(room);
        // A fence that raced with the WAL append wins: nothing is
        // acknowledged after `fence` returned (invariant 4).
        Self::gate_fenced(&self.inner.shared.lock())?;
        if fua && self.inner.cfg.durability == Durability::Store {
            self.wait_store(last).await?;
        }
        self.admit_ack().await
    }
}

#[async_trait]
impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.inner.size
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.admit_read(offset, buf.len())?;
        read::read(&self.inner, offset, buf).await
    }

    async fn read_parts(&self, offset: u64, buf: Vec<u8>) -> Result<ReadParts, BlockError> {
        self.admit_read(offset, buf.len())?;
        read::read_parts(&self.inner, offset, buf).await
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        check_range(offset, data.len() as u64, self.inner.size)?;
        // One record per request (up to MAX_RECORD).
        let recs = data
            .chunks(MAX_RECORD)
            .enumerate()
            .map(|(i, piece)| {
                new_record(
                    offset + (i * MAX_RECORD) as u64,
                    std::borrow::Cow::Borrowed(piece),
                )
            })
            .collect();
        self.write_records(offset, data.len() as u64, recs, fua)
            .await
    }

    async fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        if data.len() > MAX_RECORD {
            return self.write(offset, &data, fua).await;
        }
        check_range(offset, data.len() as u64, self.inner.size)?;
        let len = data.len() as u64;
        // The buffer becomes the record's data: no copy.
        let recs = vec![new_record(offset, std::borrow::Cow::Owned(data))];
        self.write_records(offset, len, recs, fua).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Self::gate(&self.inner.shared.lock())?;
        self.inner.wal.sync().await?;
        Self::gate_fenced(&self.inner.shared.lock())?;
        if self.inner.cfg.durability == Durability::Store {
            self.wait_store(self.inner.wal.last_seq()).await?;
        }
        self.admit_ack().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.log_op(RecordKind::Trim, offset, len, Vec::new(), false)
            .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.log_op(RecordKind::Zero, offset, len, Vec::new(), fua)
            .await
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        allocation_of(&self.inner, offset, len, max_runs)
    }
}

/// The allocation of bytes `[offset, offset+len)` of an open volume (see
/// [`BlockDevice::allocation`]): the live map's view, so writes
/// still in the WAL count as data and, in a clone, unmapped ranges take
/// the parent chain's allocation.
fn allocation_of(
    inner: &Inner,
    offset: u64,
    len: u64,
    max_runs: usize,
) -> Result<Vec<Extent>, BlockError> {
    check_range(offset, len, inner.size)?;
    let mut runs = Runs::new(max_runs);
    let (mut pos, end) = (offset / SECTOR, (offset + len) / SECTOR);
    while pos < end {
        // `allocation.rs` invariant 2: a short lock to copy a batch of pieces out.
        let pieces = inner
            .shared
            .lock()
            .view_lookup_limited(pos, end - pos, BATCH);
        for p in pieces {
            let more = match (p.loc, &inner.parent) {
                (None, Some(parent)) => parent.allocation_into(p.start, p.len, &mut runs),
                (None | Some(Loc::Zero), _) => runs.push(p.len, Allocation::Zero),
                (Some(Loc::Wal(_) | Loc::Chunk { .. }), _) => runs.push(p.len, Allocation::Data),
            };
            if !more {
                return Ok(runs.into_vec());
            }
            pos = p.start + p.len;
        }
    }
    Ok(runs.into_vec())
}
