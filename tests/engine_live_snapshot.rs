//! Snapshots of an open volume (`Volume::snapshot`): taken under concurrent
//! writers, crash-consistent at a flush point, stable afterwards through
//! overwrites, checkpoints, chunk deletion and reopening; failures leave no
//! snapshot and writes go on.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::snapshot::{find_snapshot, list_snapshots, SnapshotError, SnapshotObject};
use shale::engine::view::SnapshotView;
use shale::engine::{BlockDevice, EngineError, Volume, VolumeParams};
use shale::store::faulty::FaultyStore;
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const SIZE: u64 = 4 << 20;
const VOLUME: u64 = 0x51;
const BLOCK: u64 = 4096;
/// Blocks each writer cycles over.
const BLOCKS: u64 = 48;
const WRITERS: u64 = 4;

/// Small chunks and a checkpoint after every chunk, so overwrites kill
/// chunks and checkpoints delete them all the time; a slow destage timer,
/// so a snapshot usually finds up to a chunk of writes only in the WAL.
fn busy_cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 128 << 10,
        destage_interval_ms: 500,
        max_unstored_bytes: 512 << 10,
        max_unstored_seconds: 3600,
        durability: Durability::Local,
        checkpoint_every_chunks: 1,
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

async fn open(store: &DynStore, dir: &Path, epoch: u64) -> Arc<Volume> {
    let params = VolumeParams {
        id: VOLUME,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    };
    Volume::open(store.clone(), params, busy_cfg(), Arc::new(SystemClock))
        .await
        .expect("open volume")
}

fn region(writer: u64) -> u64 {
    writer * BLOCKS * BLOCK
}

/// Writer `w`'s op number `n` (from 1): every 7th a trim of its block,
/// otherwise a write whose block names `(w, n)`.
fn op_block(n: u64) -> u64 {
    n % BLOCKS
}

fn op_is_trim(n: u64) -> bool {
    n.is_multiple_of(7)
}

fn op_data(w: u64, n: u64) -> Vec<u8> {
    let mut b: Vec<u8> = (0..BLOCK)
        .map(|i| ((i * 13 + n * 29 + w * 101) % 251) as u8 + 1)
        .collect();
    b[..8].copy_from_slice(&w.to_le_bytes());
    b[8..16].copy_from_slice(&n.to_le_bytes());
    b
}

/// Writer `w`'s region after its first `n` ops.
fn region_after(w: u64, n: u64) -> Vec<u8> {
    let mut r = vec![0u8; (BLOCKS * BLOCK) as usize];
    for op in n.saturating_sub(BLOCKS - 1).max(1)..=n {
        let o = (op_block(op) * BLOCK) as usize;
        if op_is_trim(op) {
            r[o..o + BLOCK as usize].fill(0);
        } else {
            r[o..o + BLOCK as usize].copy_from_slice(&op_data(w, op));
        }
    }
    r
}

/// Runs writer `w` until `stop`; `acked` is its last acknowledged op.
async fn writer(v: Arc<Volume>, w: u64, acked: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> u64 {
    let mut n = 0;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let off = region(w) + op_block(n) * BLOCK;
        if op_is_trim(n) {
            v.trim(off, BLOCK).await.expect("trim");
        } else {
            v.write(off, &op_data(w, n), n % 5 == 0)
                .await
                .expect("write");
        }
        acked.store(n, Ordering::Release);
    }
    n
}

/// Wait until every writer acknowledged at least `n` more ops than `from`.
async fn wait_progress(acked: &[Arc<AtomicU64>], from: &[u64], n: u64) {
    while acked
        .iter()
        .zip(from)
        .any(|(a, f)| a.load(Ordering::Acquire) < f + n)
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn counts(acked: &[Arc<AtomicU64>]) -> Vec<u64> {
    acked.iter().map(|a| a.load(Ordering::Acquire)).collect()
}

async fn read_view(store: &DynStore, snap: &SnapshotObject) -> Vec<u8> {
    let view = SnapshotView::new(store.clone(), &snap.checkpoint, SIZE).expect("view");
    let mut b = vec![0u8; SIZE as usize];
    view.read(0, &mut b).await.expect("read snapshot");
    b
}

/// Each writer's region in `image` is its state after some op count in
/// `before[w]..=after[w] + 1` (one write per writer may be in flight when
/// the snapshot returns): every op acknowledged before the snapshot is in,
/// and the image is a prefix of each writer's history.
fn check_flush_point(image: &[u8], before: &[u64], after: &[u64]) -> Vec<u64> {
    let mut at = Vec::new();
    for w in 0..WRITERS {
        let o = region(w) as usize;
        let got = &image[o..o + (BLOCKS * BLOCK) as usize];
        let (lo, hi) = (before[w as usize], after[w as usize] + 1);
        let n = (lo..=hi).find(|&n| region_after(w, n) == got);
        let n = n.unwrap_or_else(|| {
            panic!("writer {w}: snapshot shows no state between op {lo} and op {hi}")
        });
        at.push(n);
    }
    let rest = &image[region(WRITERS) as usize..];
    assert!(
        rest.iter().all(|&b| b == 0),
        "nothing written past the regions"
    );
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_under_concurrent_writers_are_flush_points_and_stay_fixed() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Vec<Arc<AtomicU64>> = (0..WRITERS).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(writer(
                v.clone(),
                w,
                acked[w as usize].clone(),
                stop.clone(),
            ))
        })
        .collect();

    let mut taken = Vec::new();
    for i in 0..3 {
        wait_progress(&acked, &counts(&acked), 150).await;
        let before = counts(&acked);
        let snap = v
            .snapshot(&format!("s{i}"), 1000 + i)
            .await
            .expect("snapshot of the open volume");
        let after = counts(&acked);
        let image = read_view(&store, &snap).await;
        let at = check_flush_point(&image, &before, &after);
        eprintln!(
            "snapshot s{i}: ops before {before:?}, in it {at:?}, pause {} us",
            v.stats().last_snapshot_pause_us
        );
        taken.push((snap, image));
    }
    // Many more overwrites after the last snapshot: its chunks die in the
    // volume's own map and checkpoints delete what no snapshot keeps.
    wait_progress(&acked, &counts(&acked), 400).await;
    stop.store(true, Ordering::Release);
    let mut expect = vec![0u8; SIZE as usize];
    for (w, t) in tasks.into_iter().enumerate() {
        let n = t.await.unwrap();
        let o = region(w as u64) as usize;
        expect[o..o + (BLOCKS * BLOCK) as usize].copy_from_slice(&region_after(w as u64, n));
    }
    let mut now = vec![0u8; SIZE as usize];
    v.read(0, &mut now).await.unwrap();
    assert_eq!(now, expect, "the volume's own content");
    let stats = v.stats();
    assert_eq!(stats.snapshots_taken, 3);
    assert!(
        stats.chunks_deleted > 0,
        "checkpoints deleted dead chunks: {stats:?}"
    );
    for (snap, image) in &taken {
        assert_eq!(
            &read_view(&store, snap).await,
            image,
            "snapshot {} changed after later writes",
            snap.name
        );
    }
    v.close().await.unwrap();
    drop(v);

    let v = open(&store, dir.path(), 2).await;
    v.read(0, &mut now).await.unwrap();
    assert_eq!(now, expect, "the volume after reopening");
    for (snap, image) in &taken {
        let stored = find_snapshot(&store, VOLUME, &snap.name).await.unwrap();
        assert_eq!(&stored, snap);
        assert_eq!(
            &read_view(&store, &stored).await,
            image,
            "snapshot {} after reopening",
            snap.name
        );
    }
    // The volume goes on working and snapshots again after reopening.
    v.write(0, &op_data(9, 9), false).await.unwrap();
    let again = v.snapshot("after-reopen", 5).await.unwrap();
    let image = read_view(&store, &again).await;
    assert_eq!(&image[..BLOCK as usize], &op_data(9, 9)[..]);
    let dup = v.snapshot("after-reopen", 6).await;
    assert!(
        matches!(dup, Err(SnapshotError::AlreadyExists { .. })),
        "{dup:?}"
    );
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_fails_the_snapshot_cleanly_and_writes_go_on() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 7));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1).await;
    v.write(0, &op_data(1, 1), false).await.unwrap();
    v.flush().await.unwrap();
    // Quiet volume (everything stored): the checkpoint put fails.
    while v.stats().unstored_bytes > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    faulty.set_outage(true);
    let err = v.snapshot("down", 1).await.expect_err("store is down");
    assert!(err.to_string().contains("no snapshot was taken"), "{err}");
    // Unstored data (a chunk put fails) fails it as well.
    v.write(BLOCK, &op_data(1, 2), false).await.unwrap();
    let err = v.snapshot("down", 2).await.expect_err("store is down");
    assert!(err.to_string().contains("no snapshot was taken"), "{err}");
    // Writes were let go: this one returns while the store is still down.
    v.write(2 * BLOCK, &op_data(1, 3), false).await.unwrap();
    faulty.set_outage(false);
    assert!(list_snapshots(&store, VOLUME).await.unwrap().is_empty());

    let snap = v.snapshot("up", 3).await.expect("store is back");
    assert_eq!(snap.id, 1);
    let image = read_view(&store, &snap).await;
    let mut now = vec![0u8; SIZE as usize];
    v.read(0, &mut now).await.unwrap();
    assert_eq!(image, now);
    assert_eq!(
        &image[2 * BLOCK as usize..3 * BLOCK as usize],
        &op_data(1, 3)[..]
    );
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_or_closed_volumes_take_no_snapshot() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1).await;
    v.write(0, &op_data(2, 1), false).await.unwrap();
    v.fence("lease lost in a test");
    let err = v.snapshot("f", 1).await.expect_err("fenced");
    assert!(
        matches!(err, SnapshotError::Engine(EngineError::Fenced(_))),
        "{err:?}"
    );
    drop(v);
    let v = open(&store, dir.path(), 2).await;
    v.close().await.unwrap();
    let err = v.snapshot("c", 2).await.expect_err("closed");
    assert!(
        matches!(err, SnapshotError::Engine(EngineError::Closed)),
        "{err:?}"
    );
    assert!(list_snapshots(&store, VOLUME).await.unwrap().is_empty());
}

/// Keys of the volume's chunk objects.
async fn chunk_keys(store: &DynStore) -> std::collections::BTreeSet<String> {
    let prefix = shale::engine::format::layout::chunk_prefix(VOLUME);
    store
        .list(&prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect()
}

fn snapshot_chunk_keys(snap: &SnapshotObject) -> Vec<String> {
    snap.checkpoint
        .chunks
        .iter()
        .map(|c| shale::engine::format::layout::chunk_key(VOLUME, c.seq, c.epoch))
        .collect()
}

/// Fill the first MiB with `byte`.
async fn fill(v: &Volume, byte: u8) -> Vec<u8> {
    let data = vec![byte; 1 << 20];
    v.write(0, &data, false).await.unwrap();
    let mut image = vec![0u8; SIZE as usize];
    image[..data.len()].copy_from_slice(&data);
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_snapshot_of_an_open_volume_frees_only_its_chunks() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1).await;
    let x = fill(&v, 0x11).await;
    let s1 = v.snapshot("x", 1).await.unwrap();
    let y = fill(&v, 0x22).await;
    let s2 = v.snapshot("y", 2).await.unwrap();
    let z = fill(&v, 0x33).await;
    // Its checkpoint drops the chunks of x and y from the volume's map;
    // the snapshots still name them.
    let s3 = v.snapshot("z", 3).await.unwrap();
    assert_eq!(read_view(&store, &s1).await, x);
    let before = chunk_keys(&store).await;
    for key in snapshot_chunk_keys(&s1) {
        assert!(before.contains(&key), "{key} kept for snapshot x");
    }

    let deleted = v.delete_snapshot("x").await.expect("delete x");
    assert_eq!(deleted, s1);
    assert_eq!(
        chunk_keys(&store).await,
        before,
        "chunks stay until collected"
    );
    let freed = v.collect_garbage().await.expect("collect");
    let after = chunk_keys(&store).await;
    assert!(freed > 0, "x's chunks are freed");
    assert_eq!(before.len() - after.len(), freed as usize);
    for key in snapshot_chunk_keys(&s1) {
        assert!(!after.contains(&key), "{key} of x was freed");
    }
    for key in snapshot_chunk_keys(&s2)
        .into_iter()
        .chain(snapshot_chunk_keys(&s3))
    {
        assert!(after.contains(&key), "{key} still named by a snapshot");
    }
    assert_eq!(read_view(&store, &s2).await, y);
    assert_eq!(read_view(&store, &s3).await, z);
    let names: Vec<_> = list_snapshots(&store, VOLUME)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["y", "z"]);
    let missing = v.delete_snapshot("x").await;
    assert!(
        matches!(missing, Err(SnapshotError::NotFound { .. })),
        "{missing:?}"
    );
    // Nothing the volume reads was freed, before or after reopening.
    let mut now = vec![0u8; SIZE as usize];
    v.read(0, &mut now).await.unwrap();
    assert_eq!(now, z);
    // A snapshot can be taken (and reuses nothing of x's) after the delete.
    let s4 = v.snapshot("x", 4).await.unwrap();
    assert_eq!(read_view(&store, &s4).await, z);
    v.close().await.unwrap();
    drop(v);
    let v = open(&store, dir.path(), 2).await;
    v.read(0, &mut now).await.unwrap();
    assert_eq!(now, z);
    assert_eq!(read_view(&store, &s2).await, y);
    v.delete_snapshot("y").await.unwrap();
    let freed = v.collect_garbage().await.unwrap();
    assert!(freed > 0, "y's chunks are freed after reopening");
    assert_eq!(
        v.collect_garbage().await.unwrap(),
        0,
        "nothing more to free"
    );
    v.read(0, &mut now).await.unwrap();
    assert_eq!(now, z);
    assert_eq!(read_view(&store, &s3).await, z);
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_an_open_clone_reads_through_to_its_parent() {
    use shale::engine::format::manifest::ParentRef;
    const CLONE: u64 = 0x52;
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let parent = open(&store, &dir.path().join("parent"), 1).await;
    let base_image = fill(&parent, 0x44).await;
    let base = parent.snapshot("base", 1).await.unwrap();
    parent.close().await.unwrap();
    shale::engine::clone::write_clone(&store, &base, CLONE)
        .await
        .unwrap();
    let params = VolumeParams {
        id: CLONE,
        size: SIZE,
        epoch: 1,
        local_dir: dir.path().join("clone"),
    };
    let clone = Volume::open(store.clone(), params, busy_cfg(), Arc::new(SystemClock))
        .await
        .expect("open the clone");
    clone.write(BLOCK, &op_data(3, 3), false).await.unwrap();
    let snap = clone.snapshot("c1", 2).await.unwrap();
    assert_eq!(
        snap.parent,
        Some(ParentRef {
            volume: VOLUME,
            snapshot: base.id
        })
    );
    let mut expect = base_image.clone();
    expect[BLOCK as usize..2 * BLOCK as usize].copy_from_slice(&op_data(3, 3));
    let view = SnapshotView::of_snapshot(store.clone(), &snap, SIZE)
        .await
        .unwrap();
    let mut got = vec![0u8; SIZE as usize];
    view.read(0, &mut got).await.unwrap();
    assert_eq!(
        got, expect,
        "clone snapshot = parent data + the clone's write"
    );
    // Later clone writes change neither the clone's snapshot nor the parent's.
    fill(&clone, 0x55).await;
    clone.snapshot("c2", 3).await.unwrap();
    view.read(0, &mut got).await.unwrap();
    assert_eq!(got, expect, "after later clone writes");
    assert_eq!(read_view(&store, &base).await, base_image);
    clone.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_lost_the_volume_takes_no_snapshot() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let old = open(&store, &dir.path().join("old"), 1).await;
    old.write(0, &op_data(4, 1), false).await.unwrap();
    // Another server takes the volume over at a higher epoch (its recovery
    // commits the manifest); the old one has not noticed yet.
    let new = open(&store, &dir.path().join("new"), 2).await;
    let err = old.snapshot("late", 1).await.expect_err("taken over");
    assert!(
        matches!(err, SnapshotError::Engine(EngineError::Fenced(_))),
        "{err:?}"
    );
    assert!(list_snapshots(&store, VOLUME).await.unwrap().is_empty());
    let gc = old.collect_garbage().await;
    assert!(gc.is_err(), "{gc:?}");
    // The new holder snapshots fine.
    new.write(BLOCK, &op_data(4, 2), false).await.unwrap();
    let snap = new.snapshot("ok", 2).await.unwrap();
    let image = read_view(&store, &snap).await;
    assert_eq!(
        &image[BLOCK as usize..2 * BLOCK as usize],
        &op_data(4, 2)[..]
    );
    new.close().await.unwrap();
}

/// A memory store whose snapshot-object puts wait at a gate: the test sees
/// when one arrives and decides when it goes on.
#[derive(Debug)]
struct GatedStore {
    inner: MemoryStore,
    arrived: tokio::sync::Semaphore,
    open: tokio::sync::Semaphore,
}

#[async_trait::async_trait]
impl shale::store::ObjectStore for GatedStore {
    async fn get(&self, key: &str) -> shale::store::StoreResult<shale::store::Object> {
        self.inner.get(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> shale::store::StoreResult<bytes::Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn put(
        &self,
        key: &str,
        data: bytes::Bytes,
        mode: shale::store::PutMode,
    ) -> shale::store::StoreResult<shale::store::Version> {
        if key.contains("/snapshots/") {
            self.arrived.add_permits(1);
            self.open.acquire().await.expect("gate").forget();
        }
        self.inner.put(key, data, mode).await
    }
    async fn head(&self, key: &str) -> shale::store::StoreResult<shale::store::ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> shale::store::StoreResult<Vec<shale::store::ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> shale::store::StoreResult<()> {
        self.inner.delete(key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_while_a_snapshot_is_taken_and_reads_go_on() {
    let gated = Arc::new(GatedStore {
        inner: MemoryStore::new(),
        arrived: tokio::sync::Semaphore::new(0),
        open: tokio::sync::Semaphore::new(0),
    });
    let store: DynStore = gated.clone();
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1).await;
    v.write(0, &op_data(5, 1), false).await.unwrap();
    let taking = tokio::spawn({
        let v = v.clone();
        async move { v.snapshot("held", 1).await }
    });
    // The snapshot is now between its checkpoint and its object put.
    gated.arrived.acquire().await.unwrap().forget();
    let mut b = vec![0u8; BLOCK as usize];
    v.read(0, &mut b).await.expect("reads go on");
    assert_eq!(b, op_data(5, 1));
    v.flush().await.expect("flushes go on");
    let busy = v.snapshot("second", 2).await;
    assert!(
        busy.as_ref()
            .is_err_and(|e| e.to_string().contains("in progress")),
        "{busy:?}"
    );
    let busy = v.delete_snapshot("held").await;
    assert!(busy.is_err(), "{busy:?}");
    let writing = tokio::spawn({
        let v = v.clone();
        async move { v.write(0, &op_data(5, 2), false).await }
    });
    // Give the write every chance to (wrongly) complete; a correct engine
    // never lets it, however long this is.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!writing.is_finished(), "a write waits for the snapshot");
    gated.open.add_permits(1);
    let snap = taking.await.unwrap().expect("snapshot");
    writing
        .await
        .unwrap()
        .expect("the write goes on afterwards");
    let image = read_view(&store, &snap).await;
    assert_eq!(
        &image[..BLOCK as usize],
        &op_data(5, 1)[..],
        "not the later write"
    );
    v.read(0, &mut b).await.unwrap();
    assert_eq!(b, op_data(5, 2));
    assert!(v.stats().last_snapshot_pause_us > 0);
    gated.open.add_permits(100);
    v.close().await.unwrap();
}

/// A snapshot waiting for the destage task to store its ops fails when
/// the meta task fails meanwhile (here: every checkpoint put), as one
/// failing in destage would; it does not wait for the store to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meta_task_failure_fails_a_snapshot_still_waiting_for_its_chunks() {
    use shale::engine::format::layout::{checkpoint_prefix, chunk_key, parse_chunk_key};
    use shale::store::faulty::{Fault, FaultPoint, FaultRule};

    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 11));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1).await;
    // Every checkpoint put fails from now on: the checkpoint due after the
    // next chunk fails, and the meta task retries it again and again.
    faulty.set_scoped(
        FaultPoint::Put,
        FaultRule::share(Fault::Transient, 1.0),
        &checkpoint_prefix(VOLUME),
    );
    v.write(0, &op_data(6, 1), false).await.unwrap();
    while v.stats().unstored_bytes > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The next chunk's put waits: the snapshot's last write cannot be
    // stored, so its request stays with the destage task.
    let next = chunk_keys(&store)
        .await
        .iter()
        .filter_map(|k| parse_chunk_key(VOLUME, k))
        .map(|(seq, _)| seq)
        .max()
        .expect("a chunk is stored")
        + 1;
    let held = faulty.hold(FaultPoint::Put, &chunk_key(VOLUME, next, 1));
    v.write(BLOCK, &op_data(6, 2), false).await.unwrap();
    let taking = tokio::spawn({
        let v = v.clone();
        async move { v.snapshot("waiting", 1).await }
    });
    held.reached().await;
    let err = taking
        .await
        .unwrap()
        .expect_err("the meta task keeps failing");
    assert!(err.to_string().contains("no snapshot was taken"), "{err}");
    faulty.clear(FaultPoint::Put);
    held.release();
    let snap = v.snapshot("later", 2).await.expect("the store is back");
    assert_eq!(
        &read_view(&store, &snap).await[BLOCK as usize..2 * BLOCK as usize],
        &op_data(6, 2)[..]
    );
    v.close().await.unwrap();
    let names: Vec<String> = list_snapshots(&store, VOLUME)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["later"]);
}

/// A snapshot or GC asked while the volume closes is answered, never left
/// waiting: served before the final checkpoint, or refused, at whatever
/// point of the close it comes (each round yields a different number of
/// times before closing). The close succeeds either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_gc_requests_racing_a_close_are_answered() {
    for round in 0..24u64 {
        let store: DynStore = Arc::new(MemoryStore::new());
        let dir = tempfile::tempdir().unwrap();
        let v = open(&store, dir.path(), 1).await;
        v.write(0, &op_data(7, round), false).await.unwrap();
        let gc = round % 2 == 1;
        let asking = tokio::spawn({
            let v = v.clone();
            async move {
                if gc {
                    v.collect_garbage().await.map(|_| None)
                } else {
                    v.snapshot("racing", round).await.map(Some)
                }
            }
        });
        for _ in 0..round / 2 {
            tokio::task::yield_now().await;
        }
        v.close().await.expect("close");
        let answer = asking.await.unwrap();
        let taken = list_snapshots(&store, VOLUME).await.unwrap();
        match answer {
            Ok(Some(snap)) => {
                assert_eq!(taken.len(), 1, "round {round}");
                assert_eq!(taken[0].id, snap.id, "round {round}");
                assert_eq!(
                    &read_view(&store, &snap).await[..BLOCK as usize],
                    &op_data(7, round)[..],
                    "round {round}"
                );
            }
            Ok(None) => assert!(taken.is_empty(), "round {round}"),
            Err(e) => {
                assert!(taken.is_empty(), "round {round}: {e}");
                assert!(
                    e.to_string().contains(&EngineError::Closed.to_string()),
                    "round {round}: {e:?}"
                );
            }
        }
    }
}
