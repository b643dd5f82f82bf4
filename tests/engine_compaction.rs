//! Compaction: random 4K overwrites leave chunks sparse; compaction rewrites
//! their live data so the store shrinks, while the content always equals a
//! plain in-memory reference, across closes, crashes and with snapshots
//! present, on the memory and fs stores.

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;
use std::path::Path;
use std::sync::Arc;

use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::snapshot::take_snapshot;
use shale::engine::view::SnapshotView;
use shale::engine::{BlockDevice, Volume, VolumeParams, VolumeStats};
use shale::store::fs::FsStore;
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const SIZE: u64 = 2 << 20;
const ID: u64 = 0x42;
const BLOCK: usize = 4096;

fn cfg(compact_below_percent: u64) -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 10,
        max_unstored_bytes: 256 << 10,
        max_unstored_seconds: 3600,
        durability: Durability::Store,
        checkpoint_every_chunks: 2,
        checkpoint_max_deltas: 64,
        cache_size: 0,
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        compact_below_percent,
        readahead_max: 32 << 20,
        prefetch_max_in_flight: 64 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    }
}

async fn open(store: &DynStore, dir: &Path, epoch: u64, pct: u64) -> Arc<Volume> {
    let p = VolumeParams {
        id: ID,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    };
    Volume::open(store.clone(), p, cfg(pct), Arc::new(SystemClock))
        .await
        .expect("open volume")
}

/// Bytes of chunk and compaction objects the volume holds in the store.
async fn data_bytes(store: &DynStore) -> (u64, usize) {
    let objs = store
        .list(&format!("volumes/{ID:016x}/"))
        .await
        .expect("list");
    let data: Vec<_> = objs
        .iter()
        .filter(|o| o.key.contains("/chunks/") || o.key.contains("/compacted/"))
        .collect();
    (data.iter().map(|o| o.size).sum(), data.len())
}

fn block(seed: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| ((i as u64 * 13 + seed * 101) % 253) as u8 + 1)
        .collect()
}

async fn read_all(v: &dyn BlockDevice) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    v.read(0, &mut b).await.expect("read");
    b
}

/// Fill the volume, then `n` random 4K overwrites (flushed every 32);
/// mirrors every write into `model`.
async fn overwrite(v: &Volume, model: &mut [u8], rng: &mut Rng, n: u64, fill: bool) {
    if fill {
        for i in 0..(SIZE as usize / BLOCK) {
            let d = block(i as u64 + 7777);
            v.write((i * BLOCK) as u64, &d, false).await.unwrap();
            model[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&d);
        }
        v.flush().await.unwrap();
    }
    for k in 0..n {
        let i = rng.below(SIZE / BLOCK as u64) as usize;
        let d = block(rng.below(1 << 30));
        v.write((i * BLOCK) as u64, &d, false).await.unwrap();
        model[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&d);
        if k % 32 == 31 {
            v.flush().await.unwrap();
        }
    }
    v.flush().await.unwrap();
}

/// The workload with compaction at `pct`: stats and store bytes after a
/// clean close; checks the content before and after reopening.
async fn workload(store: DynStore, pct: u64) -> (VolumeStats, u64, usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let v = open(&store, dir.path(), 1, pct).await;
    overwrite(&v, &mut model, &mut rng, 1500, true).await;
    assert!(read_all(&*v).await == model, "content differs before close");
    v.close().await.unwrap();
    let stats = v.stats();
    let (bytes, objects) = data_bytes(&store).await;
    let v = open(&store, dir.path(), 2, pct).await;
    assert!(read_all(&*v).await == model, "content differs after reopen");
    v.close().await.unwrap();
    // Reopening from the store alone (WAL lost) gives the same content.
    let fresh = tempfile::tempdir().unwrap();
    let v = open(&store, fresh.path(), 3, pct).await;
    assert!(read_all(&*v).await == model, "store alone differs");
    v.close().await.unwrap();
    (stats, bytes, objects)
}

async fn gives_space_back(mk: impl Fn() -> DynStore) {
    let (plain, plain_bytes, plain_objs) = workload(mk(), 0).await;
    let (comp, comp_bytes, comp_objs) = workload(mk(), 50).await;
    println!(
        "4K random overwrite of a full {SIZE}-byte volume: without compaction {plain_bytes} bytes in {plain_objs} objects; \
         with compact_below_percent=50 {comp_bytes} bytes in {comp_objs} objects \
         ({} chunks compacted, {} bytes rewritten, {} chunks deleted)",
        comp.chunks_compacted, comp.compacted_bytes_written, comp.chunks_deleted
    );
    assert_eq!(plain.chunks_compacted, 0);
    assert_eq!(plain.compacted_bytes_written, 0);
    assert!(comp.chunks_compacted > 0, "{comp:?}");
    assert!(comp.compacted_bytes_written > 0, "{comp:?}");
    assert!(
        comp.chunks_deleted > plain.chunks_deleted,
        "{comp:?} vs {plain:?}"
    );
    assert!(
        comp_bytes < plain_bytes,
        "compaction left {comp_bytes} bytes, without it {plain_bytes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_gives_space_back_memory() {
    gives_space_back(|| Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_gives_space_back_fs() {
    let root = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    gives_space_back(|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(FsStore::new(root.path().join(format!("objects{i}"))))
    })
    .await;
}

/// Crashes at random points (the WAL kept) during compacting workloads:
/// every reopen shows exactly the acknowledged content, and orphaned
/// compaction objects do not pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_reopen_keep_content() {
    for seed in 1..=4u64 {
        let store: DynStore = Arc::new(MemoryStore::new());
        let dir = tempfile::tempdir().unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = Rng(seed * 0x1234_5678_9abc_def1);
        let mut v = open(&store, dir.path(), 1, 60).await;
        overwrite(&v, &mut model, &mut rng, 200, true).await;
        let mut compacted = 0;
        for epoch in 2..8 {
            let n = 50 + rng.below(300);
            overwrite(&v, &mut model, &mut rng, n, false).await;
            compacted += v.stats().chunks_compacted;
            // Crash without a flush of the last writes' destage.
            let d = block(rng.below(1 << 30));
            v.write(0, &d, false).await.unwrap();
            model[..BLOCK].copy_from_slice(&d);
            v.flush().await.unwrap();
            v.crash().await;
            drop(v);
            v = open(&store, dir.path(), epoch, 60).await;
            assert!(
                read_all(&*v).await == model,
                "seed {seed} epoch {epoch}: content differs after crash"
            );
        }
        v.close().await.unwrap();
        compacted += v.stats().chunks_compacted;
        assert!(compacted > 0, "seed {seed}: nothing was compacted");
        let fresh = tempfile::tempdir().unwrap();
        let v = open(&store, fresh.path(), 100, 60).await;
        assert!(
            read_all(&*v).await == model,
            "seed {seed}: store alone differs"
        );
        v.close().await.unwrap();
        let referenced = {
            let objs = store
                .list(&format!("volumes/{ID:016x}/compacted/"))
                .await
                .unwrap();
            objs.len()
        };
        // Each compaction object left must be one the volume still reads.
        let (_, cp) = committed(&store).await;
        let named = cp
            .chunks
            .iter()
            .filter(|c| c.seq & shale::engine::format::limits::COMPACTED_BIT != 0)
            .count();
        assert_eq!(referenced, named, "seed {seed}: orphan compaction objects");
    }
}

async fn committed(store: &DynStore) -> (u64, shale::engine::checkpoint::Checkpoint) {
    let (m, _, cp) = shale::engine::snapshot::committed_checkpoint(store, ID)
        .await
        .expect("checkpoint");
    (m.epoch, cp)
}

/// Snapshots keep their content while the volume compacts around them,
/// including snapshots taken after compaction objects exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_keep_their_content() {
    let root = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(FsStore::new(root.path().join("objects")));
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(77);
    let mut snaps = Vec::new();
    let mut fill = true;
    for epoch in 1..=4u64 {
        let v = open(&store, dir.path(), epoch, 60).await;
        overwrite(&v, &mut model, &mut rng, 600, fill).await;
        fill = false;
        v.close().await.unwrap();
        let snap = take_snapshot(&store, ID, &format!("s{epoch}"), epoch)
            .await
            .expect("snapshot");
        snaps.push((snap, model.clone()));
        for (s, want) in &snaps {
            let view = SnapshotView::of_snapshot(store.clone(), s, SIZE)
                .await
                .expect("view");
            assert!(
                read_all(&view).await == *want,
                "snapshot {} differs after epoch {epoch}",
                s.name
            );
        }
    }
    let v = open(&store, dir.path(), 10, 60).await;
    overwrite(&v, &mut model, &mut rng, 600, false).await;
    assert!(read_all(&*v).await == model);
    let stats = v.stats();
    v.close().await.unwrap();
    assert!(stats.chunks_compacted > 0, "{stats:?}");
    for (s, want) in &snaps {
        let view = SnapshotView::of_snapshot(store.clone(), s, SIZE)
            .await
            .expect("view");
        assert!(
            read_all(&view).await == *want,
            "snapshot {} differs",
            s.name
        );
    }
    // Snapshots taken after compaction name compaction objects the volume
    // itself dropped since: deleting the snapshots (detached) frees them.
    let compacted = |cp: &shale::engine::checkpoint::Checkpoint| -> usize {
        cp.chunks
            .iter()
            .filter(|c| c.seq & shale::engine::format::limits::COMPACTED_BIT != 0)
            .count()
    };
    let held: usize = snaps.iter().map(|(s, _)| compacted(&s.checkpoint)).sum();
    assert!(held > 0, "no snapshot names a compaction object");
    for (s, _) in &snaps {
        shale::engine::snapshot::delete_snapshot(&store, ID, 10, s)
            .await
            .expect("delete snapshot");
    }
    let left = store
        .list(&format!("volumes/{ID:016x}/compacted/"))
        .await
        .unwrap()
        .len();
    let (_, cp) = committed(&store).await;
    assert_eq!(left, compacted(&cp), "compaction objects nothing names");
    let v = open(&store, dir.path(), 11, 60).await;
    assert!(read_all(&*v).await == model, "volume differs after GC");
    v.close().await.unwrap();
}

/// Snapshots of the open volume taken between compacting overwrites keep
/// their content, also after one of them is deleted and its chunks are
/// collected, and after a crash and reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_snapshots_keep_their_content() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(4242);
    let v = open(&store, dir.path(), 1, 60).await;
    overwrite(&v, &mut model, &mut rng, 300, true).await;
    let mut snaps = Vec::new();
    for i in 0..4 {
        let s = v.snapshot(&format!("live{i}"), i).await.expect("snapshot");
        snaps.push((s, model.clone()));
        overwrite(&v, &mut model, &mut rng, 400, false).await;
    }
    assert!(v.stats().chunks_compacted > 0, "{:?}", v.stats());
    let gone = snaps.remove(1);
    v.delete_snapshot(&gone.0.name).await.expect("delete");
    v.collect_garbage().await.expect("gc");
    overwrite(&v, &mut model, &mut rng, 400, false).await;
    assert!(read_all(&*v).await == model);
    for (s, want) in &snaps {
        let view = SnapshotView::of_snapshot(store.clone(), s, SIZE)
            .await
            .expect("view");
        assert!(
            read_all(&view).await == *want,
            "snapshot {} differs",
            s.name
        );
    }
    v.crash().await;
    drop(v);
    let v = open(&store, dir.path(), 2, 60).await;
    assert!(read_all(&*v).await == model, "volume differs after crash");
    v.close().await.unwrap();
    for (s, want) in &snaps {
        let view = SnapshotView::of_snapshot(store.clone(), s, SIZE)
            .await
            .expect("view");
        assert!(
            read_all(&view).await == *want,
            "snapshot {} differs after reopen",
            s.name
        );
    }
}
