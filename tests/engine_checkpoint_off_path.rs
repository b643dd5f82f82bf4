//! Checkpoints run off the destage loop (issue 11 item 3): while a
//! checkpoint (or the compaction that precedes it) is held at the store,
//! new chunk puts start, land and are applied, and the WAL behind them is
//! released; once the hold opens, or after a crash meanwhile, every write
//! reads back after a reopen, and a snapshot asked for meanwhile holds
//! every write.
//!
//! Waits are bounded (a stuck destage fails the test instead of hanging
//! it); nothing is asserted about how long anything took.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::format::layout::{
    checkpoint_prefix, chunk_prefix, compacted_prefix, manifest_key,
};
use shale::engine::format::manifest::Manifest;
use shale::engine::view::SnapshotView;
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::faulty::{FaultPoint, FaultyStore, Hold};
use shale::store::memory::MemoryStore;
use shale::store::{DynStore, StoreResult};

#[path = "support/hooked_store.rs"]
mod hooked_store;
use hooked_store::{Hooked, StoreHook};

const ID: u64 = 0x3c;
const BLOCK: u64 = 4096;
const CHUNK: u64 = 64 << 10;
const SIZE: u64 = 256 * BLOCK;
/// Upper bound on any wait (a hang guard, not a performance threshold).
const PATIENCE: Duration = Duration::from_secs(60);

fn cfg(checkpoint_every_chunks: u64, compact_below_percent: u64) -> EngineConfig {
    cfg_with(
        checkpoint_every_chunks,
        compact_below_percent,
        Durability::Local,
    )
}

fn cfg_with(
    checkpoint_every_chunks: u64,
    compact_below_percent: u64,
    durability: Durability,
) -> EngineConfig {
    EngineConfig {
        chunk_size: CHUNK,
        destage_interval_ms: 10,
        max_unstored_bytes: 16 << 20,
        max_unstored_seconds: 3600,
        durability,
        checkpoint_every_chunks,
        checkpoint_max_deltas: 64,
        cache_size: 0,
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        compact_below_percent,
        readahead_max: 0,
        prefetch_max_in_flight: 64 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    }
}

async fn open(store: &DynStore, dir: &Path, epoch: u64, cfg: EngineConfig) -> Arc<Volume> {
    let p = VolumeParams {
        id: ID,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    };
    Volume::open(store.clone(), p, cfg, Arc::new(SystemClock))
        .await
        .expect("open")
}

/// The volume's contents as the test wrote them.
struct Model(Vec<u8>);

impl Model {
    fn new() -> Model {
        Model(vec![0; SIZE as usize])
    }

    /// Write block `b` with a pattern of `salt`, here and on `v`.
    async fn write(&mut self, v: &Volume, b: u64, salt: u64) {
        let data: Vec<u8> = (0..BLOCK)
            .map(|i| (i.wrapping_mul(31) ^ salt.wrapping_mul(131) ^ b) as u8 | 1)
            .collect();
        v.write(b * BLOCK, &data, false).await.expect("write");
        let at = (b * BLOCK) as usize;
        self.0[at..at + BLOCK as usize].copy_from_slice(&data);
    }

    async fn check(&self, v: &Volume, when: &str) {
        let mut buf = vec![0; BLOCK as usize];
        for b in 0..SIZE / BLOCK {
            v.read(b * BLOCK, &mut buf).await.expect("read");
            let at = (b * BLOCK) as usize;
            assert!(
                buf[..] == self.0[at..at + BLOCK as usize],
                "{when}: block {b} reads back wrong"
            );
        }
    }
}

async fn manifest(store: &DynStore) -> Manifest {
    let o = store.get(&manifest_key(ID)).await.expect("manifest");
    Manifest::parse(ID, &o.data).expect("manifest parses")
}

async fn count(store: &DynStore, prefix: &str) -> usize {
    store.list(prefix).await.expect("list").len()
}

/// Wait (bounded) until `hold` is reached.
async fn reached(hold: &Hold, what: &str) {
    tokio::time::timeout(PATIENCE, hold.reached())
        .await
        .unwrap_or_else(|_| panic!("{what} never reached the store"));
}

/// Wait (bounded) until every write is stored and applied, and at least
/// `chunks` chunks were applied; fails naming what is stuck.
async fn wait_applied(v: &Volume, chunks: u64, what: &str) {
    let give_up = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = v.stats();
        if s.stored_seq >= s.last_seq && s.chunks_written >= chunks {
            return;
        }
        if tokio::time::Instant::now() >= give_up {
            panic!("{what}: destage made no progress while the checkpoint was held: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Write two chunks' worth, so a checkpoint becomes due (every 2 chunks),
/// hold its upload, then write 8 more chunks' worth: they must be stored
/// and applied while the checkpoint waits. Returns what was written.
async fn held_checkpoint(
    store: &DynStore,
    faulty: &FaultyStore<MemoryStore>,
    dir: &Path,
) -> (Arc<Volume>, Model, Arc<Hold>) {
    held_checkpoint_with(store, faulty, dir, Durability::Local).await
}

/// [`held_checkpoint`] with `durability`.
async fn held_checkpoint_with(
    store: &DynStore,
    faulty: &FaultyStore<MemoryStore>,
    dir: &Path,
    durability: Durability,
) -> (Arc<Volume>, Model, Arc<Hold>) {
    let hold = faulty.hold(FaultPoint::Put, &checkpoint_prefix(ID));
    let v = open(store, dir, 1, cfg_with(2, 0, durability)).await;
    let mut model = Model::new();
    // Two chunks' worth (16 blocks each): the checkpoint comes due.
    for b in 0..32 {
        model.write(&v, b, 1).await;
    }
    reached(&hold, "the checkpoint").await;
    let before = v.stats();
    let chunks_before = count(store, &chunk_prefix(ID)).await;
    // Eight more chunks' worth, half of them over earlier blocks.
    for b in 16..144 {
        model.write(&v, b, 2).await;
    }
    wait_applied(&v, before.chunks_written + 8, "writes after the hold").await;
    let s = v.stats();
    assert_eq!(s.checkpoints_written, 0, "the checkpoint is still held");
    assert!(
        count(store, &chunk_prefix(ID)).await >= chunks_before + 8,
        "eight new chunk objects landed"
    );
    // The held checkpoint is not committed: the manifest names none.
    assert_eq!(manifest(store).await.checkpoint, None);
    // Nothing of the store-side map was lost to the concurrent applies.
    model.check(&v, "while the checkpoint is held").await;
    (v, model, hold)
}

/// New chunks are stored and applied while a checkpoint upload is held;
/// after the hold opens, close ends with a checkpoint of the last chunk
/// and a reopen reads every write back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_land_while_a_checkpoint_upload_is_held() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 1));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let (v, model, hold) = held_checkpoint(&store, &faulty, dir.path()).await;
    hold.release();
    tokio::time::timeout(PATIENCE, v.close())
        .await
        .expect("close finished")
        .expect("close");
    let m = manifest(&store).await;
    assert!(m.checkpoint.is_some(), "{m:?}");
    assert_eq!(
        m.checkpoint_chunk, m.last_chunk,
        "close ends with a checkpoint"
    );
    assert!(v.stats().checkpoints_written >= 2, "{:?}", v.stats());
    let v = open(&store, dir.path(), 2, cfg(2, 0)).await;
    model.check(&v, "after reopen").await;
    v.close().await.unwrap();
}

/// A crash while the checkpoint is held: the chunks applied meanwhile
/// (whose WAL records may be released) are recovered from the store, after
/// the manifest, and every write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_a_checkpoint_is_held_loses_nothing() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 2));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let (v, model, _hold) = held_checkpoint(&store, &faulty, dir.path()).await;
    v.crash().await;
    assert_eq!(manifest(&store).await.checkpoint, None);
    let v = open(&store, dir.path(), 2, cfg(2, 0)).await;
    model.check(&v, "after the crash").await;
    v.close().await.unwrap();
    // Recovery from the store alone (the local WAL lost) also holds every
    // write: all were stored before the crash.
    let empty = tempfile::tempdir().unwrap();
    let v = open(&store, empty.path(), 3, cfg(2, 0)).await;
    model.check(&v, "from the store alone").await;
    v.close().await.unwrap();
}

/// Compaction (which runs before a checkpoint) held at its put while new
/// writes overwrite part of what it copies and those chunks are applied:
/// the newer writes win, and after the checkpoint, close and a reopen
/// every write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_racing_a_held_compaction_win() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 3));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let hold = faulty.hold(FaultPoint::Put, &compacted_prefix(ID));
    let v = open(&store, dir.path(), 1, cfg(4, 50)).await;
    let mut model = Model::new();
    // Two chunks' worth, stored; then all but every 8th block of them
    // overwritten, so the first chunks turn sparse (below 50% live), and
    // more until a checkpoint (and its compaction) comes due.
    for b in 0..32 {
        model.write(&v, b, 1).await;
    }
    wait_applied(&v, 2, "the first writes").await;
    for b in (0..32).filter(|b| b % 8 != 0) {
        model.write(&v, b, 2).await;
    }
    for b in 64..128 {
        model.write(&v, b, 3).await;
    }
    reached(&hold, "the compaction").await;
    let before = v.stats();
    // Overwrite two of the blocks still live in the first (sparse) chunks,
    // which compaction is copying, and write on.
    for b in [0, 16] {
        model.write(&v, b, 4).await;
    }
    for b in 128..192 {
        model.write(&v, b, 5).await;
    }
    wait_applied(&v, before.chunks_written + 4, "writes during compaction").await;
    assert_eq!(v.stats().checkpoints_written, 0, "{:?}", v.stats());
    hold.release();
    tokio::time::timeout(PATIENCE, v.close())
        .await
        .expect("close finished")
        .expect("close");
    let s = v.stats();
    assert!(s.chunks_compacted > 0, "{s:?}");
    let v = open(&store, dir.path(), 2, cfg(4, 50)).await;
    model.check(&v, "after reopen").await;
    v.close().await.unwrap();
}

/// A snapshot asked for while a checkpoint is held is handed to the meta
/// task behind it: once the hold opens it completes and holds every write
/// acknowledged before it was asked for. (The request is made before the
/// hold opens; it may reach the meta task before or after that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_asked_during_a_held_checkpoint_holds_every_write() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 4));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let (v, model, hold) = held_checkpoint(&store, &faulty, dir.path()).await;
    let snap = tokio::spawn({
        let v = v.clone();
        async move { v.snapshot("during", 1).await }
    });
    hold.release();
    let snap = tokio::time::timeout(PATIENCE, snap)
        .await
        .expect("snapshot finished")
        .unwrap()
        .expect("snapshot");
    let view = SnapshotView::of_snapshot(store.clone(), &snap, SIZE)
        .await
        .expect("view");
    let mut got = vec![0u8; SIZE as usize];
    view.read(0, &mut got).await.expect("read snapshot");
    assert!(got == model.0, "the snapshot holds every write");
    v.close().await.unwrap();
    let v = open(&store, dir.path(), 2, cfg(2, 0)).await;
    model.check(&v, "after reopen").await;
    v.close().await.unwrap();
}

/// Counts manifest puts in flight (and the most at once).
#[derive(Debug, Default)]
struct ManifestPuts {
    active: AtomicUsize,
    peak: AtomicUsize,
}

#[async_trait]
impl StoreHook for ManifestPuts {
    async fn before_put(&self, _inner: &DynStore, key: &str) -> StoreResult<()> {
        if key == manifest_key(ID) {
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            // Give a second writer, if there were one, time to overlap.
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    fn after_put(&self, key: &str) {
        if key == manifest_key(ID) {
            self.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// With `durability: store`, flushes made while a checkpoint is held are
/// answered once a manifest covers them (after the hold opens); manifest
/// writes never overlap, and the manifest then covers every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_flushes_during_a_held_checkpoint_wait_for_a_covering_commit() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 5));
    let counting = Hooked::new(faulty.clone(), ManifestPuts::default());
    let store: DynStore = counting.clone();
    let dir = tempfile::tempdir().unwrap();
    let (v, model, hold) =
        held_checkpoint_with(&store, &faulty, dir.path(), Durability::Store).await;
    let last = v.stats().last_seq;
    // Several flushes at once, each asking for a commit.
    let flushes: Vec<_> = (0..4)
        .map(|_| {
            let v = v.clone();
            tokio::spawn(async move { v.flush().await })
        })
        .collect();
    hold.release();
    for f in flushes {
        tokio::time::timeout(PATIENCE, f)
            .await
            .expect("flush finished")
            .unwrap()
            .expect("flush");
    }
    let m = manifest(&store).await;
    assert!(
        m.last_seq >= last,
        "the manifest covers every flushed write: {m:?}"
    );
    v.close().await.unwrap();
    assert_eq!(
        counting.hook.peak.load(Ordering::SeqCst),
        1,
        "one manifest write at a time"
    );
    let v = open(&store, dir.path(), 2, cfg(2, 0)).await;
    model.check(&v, "after reopen").await;
    v.close().await.unwrap();
}

/// Hold the first checkpoint and write until destage stops at the lag
/// bound (`destage.rs` invariant 6: here 32 chunks, the least bound); fails
/// if destage runs past it. Returns the volume and what was written.
async fn lagging(
    store: &DynStore,
    faulty: &FaultyStore<MemoryStore>,
    dir: &Path,
) -> (Arc<Volume>, Model, Arc<Hold>) {
    let hold = faulty.hold(FaultPoint::Put, &checkpoint_prefix(ID));
    let v = open(store, dir, 1, cfg(2, 0)).await;
    let mut model = Model::new();
    for b in 0..32 {
        model.write(&v, b, 1).await;
    }
    reached(&hold, "the checkpoint").await;
    // Three passes over the volume: 48 more chunks' worth of 16 blocks.
    for i in 0..3 * (SIZE / BLOCK) {
        model
            .write(&v, i % (SIZE / BLOCK), 2 + i / (SIZE / BLOCK))
            .await;
    }
    let give_up = tokio::time::Instant::now() + PATIENCE;
    while v.stats().chunks_written < 32 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "destage never reached the bound: {:?}",
            v.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Time for destage to run on if nothing stopped it (it never needs
    // this long to store 16 more chunks in memory; a slow machine can only
    // hide the bug, never fail the test falsely).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = v.stats();
    assert_eq!(s.checkpoints_written, 0, "the checkpoint is still held");
    assert!(
        s.stored_seq < s.last_seq && s.chunks_written < 48,
        "destage ran past the bound while the checkpoint was held: {s:?}"
    );
    (v, model, hold)
}

/// Destage runs ahead of a held checkpoint only so far, then waits; once
/// the hold opens it stores the rest, and every write reads back. Without
/// the bound, a store slow at checkpoints let each checkpoint find more
/// dead chunks to delete than the last (the soak's first reopen found
/// 1,378 orphans where main leaves a handful).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destage_waits_for_a_checkpoint_that_lags_too_far() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 5));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let (v, model, hold) = lagging(&store, &faulty, dir.path()).await;
    hold.release();
    wait_applied(&v, 48, "after the hold opened").await;
    tokio::time::timeout(PATIENCE, v.close())
        .await
        .expect("close finished")
        .expect("close");
    let v = open(&store, dir.path(), 2, cfg(2, 0)).await;
    model.check(&v, "after reopen").await;
    v.close().await.unwrap();
}

/// A crash at the lag bound: the reopened volume starts with its chain of
/// chunks already at the bound past its (absent) checkpoint, so its first
/// checkpoint must come without waiting for a new chunk (which could never
/// come: destage waits for that checkpoint). Before, the soak's writes
/// hung here after the first kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_at_the_lag_bound_checkpoints_and_writes_go_on() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 6));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let (v, mut model, _hold) = lagging(&store, &faulty, dir.path()).await;
    v.crash().await;
    let v = open(&store, dir.path(), 2, cfg(2, 0)).await;
    model.check(&v, "after the crash").await;
    // Counted before the writes: destage may store all of them before
    // the last one returns.
    let before = v.stats();
    for b in 0..SIZE / BLOCK {
        model.write(&v, b, 9).await;
    }
    wait_applied(&v, before.chunks_written + 1, "writes after the reopen").await;
    assert!(v.stats().checkpoints_written >= 1, "{:?}", v.stats());
    tokio::time::timeout(PATIENCE, v.close())
        .await
        .expect("close finished")
        .expect("close");
    let v = open(&store, dir.path(), 3, cfg(2, 0)).await;
    model.check(&v, "after the last reopen").await;
    v.close().await.unwrap();
}
