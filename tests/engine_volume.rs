//! Volume behaviour tests: reopen, checksums, store durability,
//! backpressure under a store outage, fencing, torn WAL tails.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::error::BlockError;
use shale::store::faulty::FaultyStore;
use shale::store::memory::MemoryStore;
use shale::store::{DynStore, ObjectStore, PutMode};

const SIZE: u64 = 4 << 20;

fn small_cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 20,
        max_unstored_bytes: 128 << 10,
        max_unstored_seconds: 3600,
        durability: Durability::Local,
        checkpoint_every_chunks: 2,
        checkpoint_max_deltas: 64,
        cache_size: 1 << 20,
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        compact_below_percent: 25,
        readahead_max: 32 << 20,
        prefetch_max_in_flight: 64 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    }
}

fn params(dir: &Path, epoch: u64) -> VolumeParams {
    VolumeParams {
        id: 0x42,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 31 + seed * 7) % 251) as u8 + 1)
        .collect()
}

async fn open(store: &DynStore, dir: &Path, epoch: u64, cfg: EngineConfig) -> Arc<Volume> {
    Volume::open(
        store.clone(),
        params(dir, epoch),
        cfg,
        Arc::new(SystemClock),
    )
    .await
    .expect("open volume")
}

async fn read_all(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    v.read(0, &mut b).await.expect("read");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_close_reopen_and_lose_wal() {
    write_read_close_reopen(false).await;
}

/// The same with the WAL written with O_DIRECT (`engine.wal_direct_io`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_close_reopen_and_lose_wal_with_direct_wal_writes() {
    write_read_close_reopen(true).await;
}

async fn write_read_close_reopen(direct: bool) {
    let small_cfg = || EngineConfig {
        wal_direct_io: direct,
        ..small_cfg()
    };
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1, small_cfg()).await;
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..40u64 {
        let off = (i * 37 % 2000) * 512;
        let data = pattern(i, 512 * (1 + (i as usize % 19)));
        v.write(off, &data, false).await.unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    v.trim(8192, 4096).await.unwrap();
    model[8192..12288].fill(0);
    v.write_zeroes(1 << 20, 1 << 20, false).await.unwrap();
    model[1 << 20..2 << 20].fill(0);
    assert_eq!(read_all(&v).await, model);
    // Out of range and misaligned requests fail and change nothing.
    assert!(matches!(
        v.write(SIZE, &[1u8; 512], false).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write(100, &[1u8; 512], false).await,
        Err(BlockError::InvalidArgument(_))
    ));
    v.flush().await.unwrap();
    v.close().await.unwrap();
    let s = v.stats();
    assert!(s.chunks_written > 0 && s.checkpoints_written > 0, "{s:?}");
    assert_eq!(s.unstored_bytes, 0);
    assert!(matches!(
        v.write(0, &[1u8; 512], false).await,
        Err(BlockError::Closed)
    ));
    drop(v);

    let v = open(&store, dir.path(), 2, small_cfg()).await;
    assert_eq!(read_all(&v).await, model, "after clean reopen");
    v.close().await.unwrap();
    drop(v);
    // Everything is in the store: a fresh local dir sees the same data.
    let dir2 = tempfile::tempdir().unwrap();
    let v = open(&store, dir2.path(), 3, small_cfg()).await;
    assert_eq!(read_all(&v).await, model, "store alone");
    let s = v.stats();
    assert!(s.store_reads > 0, "{s:?}");
    // Second read is served by the cache.
    assert_eq!(read_all(&v).await, model);
    assert!(v.stats().cache_hits > 0);
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_chunk_data_is_an_io_error() {
    let mem: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&mem, dir.path(), 1, small_cfg()).await;
    v.write(0, &pattern(1, 8192), false).await.unwrap();
    v.close().await.unwrap();
    drop(v);
    let chunks = mem.list("volumes/0000000000000042/chunks/").await.unwrap();
    assert!(!chunks.is_empty());
    for c in &chunks {
        let o = mem.get(&c.key).await.unwrap();
        let mut data = o.data.to_vec();
        let n = data.len();
        data[n - 100] ^= 0x40; // inside the data area
        mem.put(&c.key, Bytes::from(data), PutMode::Overwrite)
            .await
            .unwrap();
    }
    let dir2 = tempfile::tempdir().unwrap();
    let v = open(&mem, dir2.path(), 2, small_cfg()).await;
    let mut b = vec![0u8; 8192];
    let err = v.read(0, &mut b).await.unwrap_err();
    assert!(matches!(err, BlockError::Io(_)), "{err:?}");
    assert_eq!(err.errno(), libc::EIO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_durability_flush_survives_losing_the_wal() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        durability: Durability::Store,
        destage_interval_ms: 3_600_000,
        ..small_cfg()
    };
    let v = open(&store, dir.path(), 1, cfg.clone()).await;
    let data = pattern(5, 12288);
    v.write(4096, &data, false).await.unwrap();
    v.flush().await.unwrap();
    let s = v.stats();
    assert_eq!(
        s.stored_seq, s.last_seq,
        "flush waited for the store: {s:?}"
    );
    // FUA write in store mode is in the store when acknowledged.
    v.write(65536, &data, true).await.unwrap();
    let s = v.stats();
    assert_eq!(s.stored_seq, s.last_seq, "{s:?}");
    v.crash().await;
    drop(v);
    let dir2 = tempfile::tempdir().unwrap();
    let v = open(&store, dir2.path(), 2, cfg).await;
    let mut b = vec![0u8; 12288];
    v.read(4096, &mut b).await.unwrap();
    assert_eq!(b, data);
    v.read(65536, &mut b).await.unwrap();
    assert_eq!(b, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_waits_during_outage_then_completes() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 7));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(); // bound 128 KiB
    let v = open(&store, dir.path(), 1, cfg.clone()).await;
    faulty.set_outage(true);
    // Up to the bound writes are acknowledged from the WAL.
    for i in 0..32u64 {
        v.write(i * 4096, &pattern(i, 4096), false).await.unwrap();
    }
    assert_eq!(v.stats().unstored_bytes, 128 << 10);
    // The next write waits (it cannot finish while the store is down).
    let v2 = v.clone();
    let mut blocked =
        tokio::spawn(async move { v2.write(32 * 4096, &pattern(32, 4096), false).await });
    let waited = tokio::time::timeout(Duration::from_millis(300), &mut blocked).await;
    assert!(waited.is_err(), "write completed during the outage");
    assert!(v.stats().destage_errors > 0);
    faulty.set_outage(false);
    blocked.await.unwrap().unwrap();
    let mut b = vec![0u8; 4096];
    for i in 0..33u64 {
        v.read(i * 4096, &mut b).await.unwrap();
        assert_eq!(b, pattern(i, 4096), "block {i}");
    }
    v.close().await.unwrap();
    drop(v);
    let dir2 = tempfile::tempdir().unwrap();
    let v = open(&store, dir2.path(), 2, cfg).await;
    for i in 0..33u64 {
        v.read(i * 4096, &mut b).await.unwrap();
        assert_eq!(b, pattern(i, 4096), "block {i} from the store");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_epoch_fences_the_old_writer() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        checkpoint_every_chunks: 1,
        checkpoint_max_deltas: 64,
        ..small_cfg()
    };
    let old = open(&store, d1.path(), 5, cfg.clone()).await;
    old.write(0, &pattern(1, 4096), false).await.unwrap();
    let new = open(&store, d2.path(), 6, cfg.clone()).await;
    // An open with an older epoch than the manifest's is refused.
    let stale = Volume::open(
        store.clone(),
        params(d1.path(), 4),
        cfg,
        Arc::new(SystemClock),
    )
    .await;
    assert!(matches!(stale, Err(shale::engine::EngineError::Fenced(_))));
    // The old writer keeps writing until its next manifest commit fails.
    let mut fenced = false;
    for i in 0..400u64 {
        match old.write((i % 64) * 65536, &pattern(i, 65536), false).await {
            Ok(()) => {}
            Err(BlockError::Fenced(_)) => {
                fenced = true;
                break;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(fenced, "old writer was never fenced");
    assert!(matches!(old.flush().await, Err(BlockError::Fenced(_))));
    new.write(0, &pattern(9, 4096), false).await.unwrap();
    let mut b = vec![0u8; 4096];
    new.read(0, &mut b).await.unwrap();
    assert_eq!(b, pattern(9, 4096));
    new.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_wal_tail_is_cut_off() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        destage_interval_ms: 3_600_000,
        ..small_cfg()
    };
    let v = open(&store, dir.path(), 1, cfg.clone()).await;
    v.write(0, &pattern(1, 4096), false).await.unwrap();
    v.write(8192, &pattern(2, 1024), true).await.unwrap();
    v.crash().await;
    drop(v);
    // Garbage after the last record, as a torn append would leave.
    let wal = dir.path().join("wal");
    let mut segs: Vec<_> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let last = segs
        .iter()
        .rev()
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .unwrap();
    let mut bytes = std::fs::read(last).unwrap();
    bytes.extend_from_slice(&[0x53, 0x48, 0x57, 0x4c, 9, 9, 9]);
    bytes.extend_from_slice(&pattern(3, 700));
    std::fs::write(last, bytes).unwrap();
    for epoch in 2..4 {
        let v = open(&store, dir.path(), epoch, cfg.clone()).await;
        let mut b = vec![0u8; 4096];
        v.read(0, &mut b).await.unwrap();
        assert_eq!(b, pattern(1, 4096));
        let mut b = vec![0u8; 1024];
        v.read(8192, &mut b).await.unwrap();
        assert_eq!(b, pattern(2, 1024));
        v.write(16384 * epoch, &pattern(epoch, 512), true)
            .await
            .unwrap();
        v.crash().await;
    }
    let v = open(&store, dir.path(), 9, cfg).await;
    let mut b = vec![0u8; 512];
    for epoch in 2..4 {
        v.read(16384 * epoch, &mut b).await.unwrap();
        assert_eq!(
            b,
            pattern(epoch, 512),
            "write after the torn tail, epoch {epoch}"
        );
    }
}

/// Writes `n` random sub-ranges into `[base, base+len)` and checks reads;
/// returns the region's expected content.
async fn hammer_region(v: Arc<Volume>, seed: u64, base: u64, len: u64) -> Vec<u8> {
    let mut model = vec![0u8; len as usize];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..120u64 {
        let sectors = 1 + rnd() % 24;
        let start = rnd() % (len / 512 - sectors + 1);
        let (off, n) = (start * 512, (sectors * 512) as usize);
        match rnd() % 6 {
            0 => {
                v.trim(base + off, n as u64).await.unwrap();
                model[off as usize..off as usize + n].fill(0);
            }
            1 => {
                let mut b = vec![0u8; n];
                v.read(base + off, &mut b).await.unwrap();
                assert_eq!(
                    b,
                    model[off as usize..off as usize + n],
                    "seed {seed} op {i}"
                );
            }
            2 => v.flush().await.unwrap(),
            _ => {
                let d = pattern(seed * 1000 + i, n);
                v.write(base + off, &d, rnd() % 8 == 0).await.unwrap();
                model[off as usize..off as usize + n].copy_from_slice(&d);
            }
        }
    }
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_tokio_and_foreign_threads() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1, small_cfg()).await;
    const REGION: u64 = 256 << 10;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        tasks.push(tokio::spawn(hammer_region(
            v.clone(),
            t + 1,
            t * REGION,
            REGION,
        )));
    }
    // Two plain threads with their own executor: the futures must not need tokio.
    let mut threads = Vec::new();
    for t in 8..10u64 {
        let v = v.clone();
        threads.push(std::thread::spawn(move || {
            futures::executor::block_on(hammer_region(v, t + 1, t * REGION, REGION))
        }));
    }
    let mut expect = vec![0u8; SIZE as usize];
    for (t, task) in tasks.into_iter().enumerate() {
        let m = task.await.unwrap();
        let o = t * REGION as usize;
        expect[o..o + m.len()].copy_from_slice(&m);
    }
    for (t, th) in threads.into_iter().enumerate() {
        let m = th.join().unwrap();
        let o = (t + 8) * REGION as usize;
        expect[o..o + m.len()].copy_from_slice(&m);
    }
    assert_eq!(read_all(&v).await, expect);
    v.crash().await;
    drop(v);
    // Reopening with the same epoch after a crash also works.
    let v = open(&store, dir.path(), 1, small_cfg()).await;
    assert_eq!(read_all(&v).await, expect, "after crash");
    v.close().await.unwrap();
    drop(v);
    let v = open(&store, dir.path(), 2, small_cfg()).await;
    assert_eq!(read_all(&v).await, expect, "after close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_bound_makes_writes_wait_for_the_store() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 3));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(shale::clock::ManualClock::new(Duration::from_secs(1000)));
    let cfg = EngineConfig {
        destage_interval_ms: 3_600_000,
        max_unstored_seconds: 5,
        max_unstored_bytes: 64 << 20,
        ..small_cfg()
    };
    let v = Volume::open(store.clone(), params(dir.path(), 1), cfg, clock.clone())
        .await
        .unwrap();
    faulty.set_outage(true);
    v.write(0, &pattern(1, 4096), false).await.unwrap();
    clock.advance(Duration::from_secs(4));
    // Younger than the bound: still acknowledged at once.
    v.write(4096, &pattern(2, 4096), false).await.unwrap();
    clock.advance(Duration::from_secs(2));
    // The oldest unstored write is now 6 s old: the next write waits.
    let v2 = v.clone();
    let mut blocked = tokio::spawn(async move { v2.write(8192, &pattern(3, 4096), false).await });
    let waited = tokio::time::timeout(Duration::from_millis(300), &mut blocked).await;
    assert!(waited.is_err(), "write completed while the store was down");
    faulty.set_outage(false);
    blocked.await.unwrap().unwrap();
    let s = v.stats();
    assert!(s.chunks_written >= 1, "{s:?}");
    let mut b = vec![0u8; 4096];
    for i in 0..3u64 {
        v.read(i * 4096, &mut b).await.unwrap();
        assert_eq!(b, pattern(i + 1, 4096));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwritten_chunks_are_garbage_collected() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynStore = mem.clone();
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        checkpoint_every_chunks: 1,
        checkpoint_max_deltas: 64,
        ..small_cfg()
    };
    let v = open(&store, dir.path(), 1, cfg.clone()).await;
    // Rewrite the same 64 KiB many times: older chunks lose all live data.
    for round in 0..30u64 {
        v.write(0, &pattern(round, 64 << 10), false).await.unwrap();
        v.flush().await.unwrap();
    }
    v.close().await.unwrap();
    let s = v.stats();
    assert!(s.chunks_deleted > 0, "{s:?}");
    let chunks = mem.list("volumes/0000000000000042/chunks/").await.unwrap();
    let cps = mem
        .list("volumes/0000000000000042/checkpoints/")
        .await
        .unwrap();
    assert!(chunks.len() < 5, "{} chunks left", chunks.len());
    assert_eq!(cps.len(), 1, "superseded checkpoints are deleted");
    drop(v);
    let dir2 = tempfile::tempdir().unwrap();
    let v = open(&store, dir2.path(), 2, cfg).await;
    let mut b = vec![0u8; 64 << 10];
    v.read(0, &mut b).await.unwrap();
    assert_eq!(b, pattern(29, 64 << 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_clear_errors_and_lose_nothing() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1, small_cfg()).await;
    v.write(SIZE - 4096, &pattern(4, 4096), false)
        .await
        .unwrap();
    v.close().await.unwrap();
    drop(v);
    let clock = || -> shale::clock::DynClock { Arc::new(SystemClock) };
    // Misaligned size, invalid config.
    let mut p = params(dir.path(), 2);
    p.size = 1000;
    let e = Volume::open(store.clone(), p, small_cfg(), clock())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("multiple of 512"), "{e}");
    let bad_cfg = EngineConfig {
        chunk_size: 1000,
        ..small_cfg()
    };
    let e = Volume::open(store.clone(), params(dir.path(), 2), bad_cfg, clock())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("chunk_size"), "{e}");
    // Smaller than the data already written (no local WAL): refused.
    let dir2 = tempfile::tempdir().unwrap();
    let mut p = params(dir2.path(), 3);
    p.size = SIZE / 2;
    let e = Volume::open(store.clone(), p, small_cfg(), clock())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("past the volume size"), "{e}");
    // Same when the data is in a chunk no checkpoint covers yet.
    let store2: DynStore = Arc::new(MemoryStore::new());
    let cfg2 = EngineConfig {
        durability: Durability::Store,
        checkpoint_every_chunks: 1000,
        checkpoint_max_deltas: 64,
        ..small_cfg()
    };
    let d3 = tempfile::tempdir().unwrap();
    let v = open(&store2, d3.path(), 1, cfg2.clone()).await;
    v.write(SIZE - 4096, &pattern(5, 4096), false)
        .await
        .unwrap();
    v.flush().await.unwrap();
    v.crash().await;
    drop(v);
    let d4 = tempfile::tempdir().unwrap();
    let mut p = params(d4.path(), 2);
    p.size = SIZE / 2;
    let e = Volume::open(store2.clone(), p, cfg2.clone(), clock())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("past the volume size"), "{e}");
    let v = open(&store2, d4.path(), 3, cfg2).await;
    let mut b = vec![0u8; 4096];
    v.read(SIZE - 4096, &mut b).await.unwrap();
    assert_eq!(b, pattern(5, 4096), "the refused open deleted nothing");
    drop(v);
    // Another volume's WAL directory is refused and left alone.
    let mut p = params(dir.path(), 4);
    p.id = 0x43;
    assert!(Volume::open(store.clone(), p, small_cfg(), clock())
        .await
        .is_err());
    // Nothing was lost by any of that.
    let v = open(&store, dir.path(), 5, small_cfg()).await;
    let mut b = vec![0u8; 4096];
    v.read(SIZE - 4096, &mut b).await.unwrap();
    assert_eq!(b, pattern(4, 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_during_outage_fails_clearly_and_the_wal_keeps_the_data() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 11));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        destage_interval_ms: 3_600_000,
        ..small_cfg()
    };
    let v = open(&store, dir.path(), 1, cfg.clone()).await;
    v.write(0, &pattern(8, 16384), false).await.unwrap();
    faulty.set_outage(true);
    let e = v.close().await.unwrap_err();
    assert!(e.to_string().contains("store"), "{e}");
    drop(v);
    faulty.set_outage(false);
    let v = open(&store, dir.path(), 2, cfg).await;
    let mut b = vec![0u8; 16384];
    v.read(0, &mut b).await.unwrap();
    assert_eq!(b, pattern(8, 16384));
    v.close().await.unwrap();
}

/// The allocation query (what NBD block status reports) against a model:
/// many fragments (more map pieces than one lock hold copies), trims and
/// all-zero writes as holes, the same answer from the WAL and from chunks,
/// limits on the number of runs, and range checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_matches_a_model_from_wal_and_chunks() {
    use shale::engine::{Allocation, Extent};
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(MemoryStore::new());
    let cfg = EngineConfig {
        max_unstored_bytes: 8 << 20,
        ..small_cfg()
    };
    let v = open(&store, dir.path(), 1, cfg.clone()).await;
    let whole = |st| Extent::whole(SIZE, st);
    assert_eq!(v.allocation(0, SIZE, 16).unwrap(), whole(Allocation::Zero));
    // Data in every other 1 KiB block of the first 3 MiB: 3072 runs.
    let mut model = vec![false; (SIZE / 512) as usize];
    for i in 0..1536u64 {
        v.write(i * 2048, &pattern(i, 1024), false).await.unwrap();
        model[(i * 4) as usize..(i * 4 + 2) as usize].fill(true);
    }
    // A trim and an all-zero write make holes.
    v.trim(0, 2048).await.unwrap();
    v.write(4096, &[0u8; 1024], false).await.unwrap();
    model[0..2].fill(false);
    model[8..10].fill(false);
    let want: Vec<Extent> = {
        let mut runs: Vec<Extent> = Vec::new();
        for &data in &model {
            let state = if data {
                Allocation::Data
            } else {
                Allocation::Zero
            };
            match runs.last_mut() {
                Some(r) if r.state == state => r.len += 512,
                _ => runs.push(Extent { len: 512, state }),
            }
        }
        runs
    };
    assert!(want.len() > 3000);
    assert_eq!(
        v.allocation(0, SIZE, usize::MAX).unwrap(),
        want,
        "from the WAL"
    );
    // At most `max_runs` runs: a prefix of the full answer.
    assert_eq!(v.allocation(0, SIZE, 10).unwrap(), want[..10]);
    // A sub-range starting inside a run.
    let sub = v.allocation(11 * 512, 1024, 8).unwrap();
    assert_eq!(
        sub,
        [
            Extent {
                len: 512,
                state: Allocation::Zero
            },
            Extent {
                len: 512,
                state: Allocation::Data
            },
        ]
    );
    // Range checks like a read.
    assert!(matches!(
        v.allocation(SIZE, 512, 1),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.allocation(100, 512, 1),
        Err(BlockError::InvalidArgument(_))
    ));
    assert_eq!(v.allocation(512, 0, 1).unwrap(), vec![]);
    v.close().await.unwrap();
    let v = open(&store, dir.path(), 2, cfg).await;
    assert_eq!(
        v.allocation(0, SIZE, usize::MAX).unwrap(),
        want,
        "from chunks"
    );
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_writes_land_like_borrowed_ones() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1, small_cfg()).await;
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..30u64 {
        let off = (i * 53 % 1900) * 512;
        let data = pattern(i, 512 * (1 + (i as usize % 23)));
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        v.write_owned(off, data, i % 7 == 0).await.unwrap();
    }
    // An all-zero buffer over data: the range reads as zeros.
    v.write_owned(4096, vec![0u8; 8192], false).await.unwrap();
    model[4096..12288].fill(0);
    v.write_owned(0, Vec::new(), false).await.unwrap();
    assert_eq!(read_all(&v).await, model);
    // Bad requests fail as with `write` and change nothing.
    assert!(matches!(
        v.write_owned(SIZE, vec![1u8; 512], false).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write_owned(100, vec![1u8; 512], false).await,
        Err(BlockError::InvalidArgument(_))
    ));
    assert!(matches!(
        v.write_owned(0, vec![1u8; 100], false).await,
        Err(BlockError::InvalidArgument(_))
    ));
    assert_eq!(read_all(&v).await, model);
    v.close().await.unwrap();
    drop(v);
    let v = open(&store, dir.path(), 2, small_cfg()).await;
    assert_eq!(read_all(&v).await, model, "after reopen");
    v.close().await.unwrap();
}
