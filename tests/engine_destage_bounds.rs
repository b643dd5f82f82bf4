//! Bounds on destage (issue 12), with chunk puts held at a gate while the
//! writer keeps far ahead:
//! - the destage task sizes its chunk puts in flight from the store: never
//!   more than the store asks for (`ObjectStore::puts_in_flight`), and a
//!   store that asks for 32 gets 16 at first, more only once chunks land
//!   faster with more in flight;
//! - concurrent writers arriving together do not pass the unstored bound
//!   together (`engine.max_unstored_bytes`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::memory::MemoryStore;
use shale::store::{DynStore, StoreResult, DEFAULT_PUTS_IN_FLIGHT};

#[path = "support/hooked_store.rs"]
mod hooked_store;
use hooked_store::{Hooked, StoreHook};

const CHUNK: u64 = 64 << 10;

/// Asks for `hint` puts in flight; holds chunk puts while `hold` is set,
/// counting those on their way and the most seen at once.
#[derive(Debug)]
struct GatedPuts {
    hint: usize,
    hold: AtomicBool,
    active: AtomicUsize,
    peak: AtomicUsize,
}

impl GatedPuts {
    fn new(hint: usize) -> Arc<Hooked<GatedPuts>> {
        let gate = GatedPuts {
            hint,
            hold: AtomicBool::new(true),
            active: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        };
        Hooked::new(Arc::new(MemoryStore::new()), gate)
    }
}

/// Only chunk puts are counted and held.
fn is_chunk(key: &str) -> bool {
    key.contains("/chunks/")
}

#[async_trait]
impl StoreHook for GatedPuts {
    async fn before_put(&self, _inner: &DynStore, key: &str) -> StoreResult<()> {
        if is_chunk(key) {
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            while self.hold.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Ok(())
    }

    fn after_put(&self, key: &str) {
        if is_chunk(key) {
            self.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn puts_in_flight(&self) -> Option<usize> {
        Some(self.hint)
    }
}

fn cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: CHUNK,
        destage_interval_ms: 10,
        max_unstored_bytes: 16 << 20,
        max_unstored_seconds: 3600,
        durability: Durability::Local,
        checkpoint_every_chunks: 1000,
        checkpoint_max_deltas: 64,
        cache_size: 0,
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        compact_below_percent: 0,
        readahead_max: 0,
        prefetch_max_in_flight: 64 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    }
}

/// Open volume `id` (64 chunks) on `store` at `epoch`, its local
/// directory in `local`.
async fn open(
    store: &Arc<Hooked<GatedPuts>>,
    local: &std::path::Path,
    id: u64,
    epoch: u64,
    cfg: EngineConfig,
) -> Arc<Volume> {
    let params = VolumeParams {
        id,
        size: 64 * CHUNK,
        epoch,
        local_dir: local.to_path_buf(),
    };
    let dyn_store: DynStore = store.clone();
    Volume::open(dyn_store, params, cfg, Arc::new(SystemClock))
        .await
        .unwrap()
}

/// Write 64 chunks' worth with chunk puts held; returns the most chunk
/// puts seen at once once the window is full, after checking every write
/// reads back once the gate opens and the volume closes cleanly.
async fn peak_puts(hint: usize, expect_full: usize) -> usize {
    let store = GatedPuts::new(hint);
    let local = tempfile::tempdir().unwrap();
    let vol = open(&store, local.path(), 0x12, 1, cfg()).await;
    let block = |i: u64| vec![(i as u8) | 1; CHUNK as usize];
    for i in 0..64 {
        vol.write(i * CHUNK, &block(i), false).await.unwrap();
    }
    // Wait (without a deadline on success: the window fills as soon as
    // the task has taken that many chunks) until the window is full.
    for _ in 0..20_000 {
        if store.hook.active.load(Ordering::SeqCst) >= expect_full {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(store.hook.active.load(Ordering::SeqCst), expect_full);
    // Give a task that ignored the window the chance to start more.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let peak = store.hook.peak.load(Ordering::SeqCst);
    store.hook.hold.store(false, Ordering::SeqCst);
    vol.close().await.unwrap();
    let vol = open(&store, local.path(), 0x12, 2, cfg()).await;
    let mut buf = vec![0; CHUNK as usize];
    for i in 0..64 {
        vol.read(i * CHUNK, &mut buf).await.unwrap();
        assert!(buf == block(i), "block {i} reads back wrong");
    }
    vol.close().await.unwrap();
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_asking_for_few_puts_gets_no_more() {
    assert_eq!(peak_puts(3, 3).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_asking_for_many_starts_at_16() {
    // Nothing lands while the gate holds, so the window cannot grow.
    assert_eq!(peak_puts(32, 16).await, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_do_not_pass_the_unstored_bound_together() {
    let store = GatedPuts::new(DEFAULT_PUTS_IN_FLIGHT);
    let local = tempfile::tempdir().unwrap();
    let bound = 16 * CHUNK;
    let cfg = EngineConfig {
        max_unstored_bytes: bound,
        ..cfg()
    };
    let vol = open(&store, local.path(), 0x13, 1, cfg).await;
    // 32 writes of a chunk each, twice the bound, all checked against it
    // in one poll (before any of them is logged).
    let done = Arc::new(AtomicUsize::new(0));
    let writes = (0..32u64).map(|i| {
        let (vol, done) = (vol.clone(), done.clone());
        async move {
            let data = vec![(i as u8) | 1; CHUNK as usize];
            vol.write(i * CHUNK, &data, false).await.unwrap();
            done.fetch_add(1, Ordering::SeqCst);
        }
    });
    let all = tokio::spawn(futures::future::join_all(writes));
    // Wait until the writes that fit are acknowledged (no store put lands
    // meanwhile: nothing leaves the unstored bytes).
    for _ in 0..20_000 {
        if vol.stats().unstored_bytes >= bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Give writers that slipped past the bound the chance to land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let unstored = vol.stats().unstored_bytes;
    assert_eq!(unstored, bound, "unstored bytes against the bound");
    assert_eq!(done.load(Ordering::SeqCst), 16);
    store.hook.hold.store(false, Ordering::SeqCst);
    all.await.unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 32);
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_at_the_backlog_destage_can_use() {
    // A store taking 3 puts at once, no WAL memory tail: destage can use
    // 3 chunks in flight plus 2, so writes wait at 5 chunks of unstored
    // data, far below the configured 16 MiB.
    let store = GatedPuts::new(3);
    let local = tempfile::tempdir().unwrap();
    let no_tail = EngineConfig {
        wal_memory: 0,
        wal_direct_io: false,
        ..cfg()
    };
    let vol = open(&store, local.path(), 0x14, 1, no_tail).await;
    let bound = 5 * CHUNK;
    assert_eq!(vol.stats().max_unstored_bytes, bound);
    let done = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (vol, done) = (vol.clone(), done.clone());
        tokio::spawn(async move {
            for i in 0..16u64 {
                let data = vec![(i as u8) | 1; CHUNK as usize];
                vol.write(i * CHUNK, &data, false).await.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    for _ in 0..20_000 {
        if vol.stats().unstored_bytes >= bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Give a write that ignored the bound the chance to land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(vol.stats().unstored_bytes, bound);
    assert_eq!(done.load(Ordering::SeqCst), 5);
    store.hook.hold.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 16);
    vol.close().await.unwrap();
    let vol = open(&store, local.path(), 0x14, 2, cfg()).await;
    let mut buf = vec![0; CHUNK as usize];
    for i in 0..16u64 {
        vol.read(i * CHUNK, &mut buf).await.unwrap();
        assert!(buf == vec![(i as u8) | 1; CHUNK as usize], "chunk {i}");
    }
    vol.close().await.unwrap();
}
