//! Clones that read through to their parent snapshot: nothing is copied at
//! creation, the parent's objects never change, trims and zeroes in a
//! clone hide the parent's data, chains of any depth, clear errors for a
//! broken chain, and flatten (including crashes part-way through).

#[path = "support/attach.rs"]
mod attach;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shale::catalog::lease::Lease;
use shale::catalog::snapshot::{SnapError, Snapshots};
use shale::catalog::{Catalog, CatalogError};
use shale::clock::{DynClock, SystemClock};
use shale::engine::clone::{copy_parent_data, finish_flatten};
use shale::engine::config::EngineConfig;
use shale::engine::format::layout::{chunk_prefix, snapshot_key, volume_prefix};
use shale::engine::format::manifest::ParentRef;
use shale::engine::snapshot::find_snapshot;
use shale::engine::view::SnapshotView;
use shale::engine::{BlockDevice, EngineError, Volume};
use shale::store::memory::MemoryStore;
use shale::store::{DynStore, PutMode};

const SIZE: u64 = 1 << 20;
const K: usize = 4096;

fn engine_cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 10,
        max_unstored_bytes: 1 << 20,
        checkpoint_every_chunks: 2,
        checkpoint_max_deltas: 64,
        cache_size: 1 << 20,
        ..EngineConfig::default()
    }
}

struct Env {
    store: DynStore,
    snaps: Snapshots,
    catalog: Catalog,
    data_dir: std::path::PathBuf,
    clock: DynClock,
}

/// An open volume with its lease.
struct Open {
    vol: Arc<Volume>,
    lease: Lease,
    id: u64,
}

impl Env {
    fn new(data_dir: &Path) -> Env {
        let store: DynStore = Arc::new(MemoryStore::new());
        let clock: DynClock = Arc::new(SystemClock);
        Env {
            snaps: Snapshots::new(
                store.clone(),
                engine_cfg(),
                data_dir.to_path_buf(),
                clock.clone(),
                "clone-test",
            ),
            catalog: Catalog::new(store.clone()),
            store,
            data_dir: data_dir.to_path_buf(),
            clock,
        }
    }

    async fn open(&self, name: &str) -> Result<Open, EngineError> {
        let rec = self.catalog.get(name).await.unwrap();
        let (lease, params) = attach::lease_for(
            &self.store,
            &self.clock,
            &self.data_dir,
            &rec,
            "clone-test-server",
        )
        .await;
        match Volume::open(self.store.clone(), params, engine_cfg(), self.clock.clone()).await {
            Ok(vol) => Ok(Open {
                vol,
                lease,
                id: rec.id,
            }),
            Err(e) => {
                lease.release().await.unwrap();
                Err(e)
            }
        }
    }

    async fn close(&self, o: Open) {
        o.vol.close().await.unwrap();
        o.lease.release().await.unwrap();
    }

    async fn read(&self, name: &str) -> Vec<u8> {
        let o = self.open(name).await.unwrap();
        let mut buf = vec![0u8; SIZE as usize];
        o.vol.read(0, &mut buf).await.unwrap();
        self.close(o).await;
        buf
    }

    /// Every object under `prefix`, key → bytes.
    async fn objects(&self, prefix: &str) -> BTreeMap<String, Bytes> {
        let mut out = BTreeMap::new();
        for meta in self.store.list(prefix).await.unwrap() {
            let o = self.store.get(&meta.key).await.unwrap();
            out.insert(meta.key, o.data);
        }
        out
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 512) as u8) | 1)
        .collect()
}

/// A parent `p` with data everywhere and snapshot `p@s`; returns its image.
async fn parent_with_snapshot(env: &Env) -> Vec<u8> {
    env.catalog.create("p", SIZE, false, 0).await.unwrap();
    let o = env.open("p").await.unwrap();
    let image = pattern(1, SIZE as usize);
    o.vol.write(0, &image, false).await.unwrap();
    env.close(o).await;
    env.snaps.create("p@s", 0).await.unwrap();
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_copies_nothing_and_never_changes_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    let mut want = parent_with_snapshot(&env).await;
    let p = env.catalog.get("p").await.unwrap();
    let parent_before = env.objects(&volume_prefix(p.id)).await;
    assert!(!parent_before.is_empty());

    let c = env.snaps.clone_volume("p@s", "c", 0).await.unwrap();
    // Only the clone's manifest exists: no chunk, no checkpoint copied.
    let created = env.objects(&volume_prefix(c.id)).await;
    assert_eq!(
        created.keys().cloned().collect::<Vec<_>>(),
        vec![format!("{}manifest", volume_prefix(c.id))]
    );
    assert!(env
        .store
        .list(&chunk_prefix(c.id))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(env.read("c").await, want, "a fresh clone reads its parent");

    // Writes, trims, zeroing and all-zero data in the clone hide the
    // parent's bytes there; the rest still reads through.
    let o = env.open("c").await.unwrap();
    let data = pattern(9, 3 * K);
    o.vol.write(8 * K as u64, &data, false).await.unwrap();
    want[8 * K..11 * K].copy_from_slice(&data);
    o.vol.trim(20 * K as u64, 2 * K as u64).await.unwrap();
    want[20 * K..22 * K].fill(0);
    o.vol
        .write_zeroes(40 * K as u64, 5 * K as u64, false)
        .await
        .unwrap();
    want[40 * K..45 * K].fill(0);
    o.vol
        .write(100 * K as u64, &vec![0u8; 64 * K], false)
        .await
        .unwrap();
    want[100 * K..164 * K].fill(0);
    let mut buf = vec![0u8; SIZE as usize];
    o.vol.read(0, &mut buf).await.unwrap();
    assert!(buf == want, "clone differs before close");
    // Crash (WAL replay on reopen), then reopen and compare.
    o.vol.flush().await.unwrap();
    o.vol.crash().await;
    o.lease.release().await.unwrap();
    assert!(env.read("c").await == want, "clone differs after a crash");
    assert!(env.read("c").await == want, "clone differs after a reopen");

    // A clone of the clone's snapshot (depth 2) reads through both.
    env.snaps.create("c@x", 0).await.unwrap();
    env.snaps.clone_volume("c@x", "d", 0).await.unwrap();
    let o = env.open("d").await.unwrap();
    o.vol.trim(0, 4 * K as u64).await.unwrap();
    env.close(o).await;
    let mut want_d = want.clone();
    want_d[..4 * K].fill(0);
    assert!(env.read("d").await == want_d);
    let view = env.snaps.view("c@x").await.unwrap();
    assert_eq!(view.depth(), 2);
    let mut got = vec![0u8; SIZE as usize];
    view.read(0, &mut got).await.unwrap();
    assert!(got == want, "snapshot of a clone reads through");

    assert!(
        env.objects(&volume_prefix(p.id)).await == parent_before,
        "the parent's objects changed"
    );
    assert!(env.read("p").await == pattern(1, SIZE as usize));
}

/// A volume without a parent keeps unmapping on trim (its map does not
/// grow); a clone keeps an explicit zero entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clones_keep_zero_entries() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    parent_with_snapshot(&env).await;
    env.snaps.clone_volume("p@s", "c", 0).await.unwrap();
    env.catalog.create("plain", SIZE, false, 0).await.unwrap();
    for (name, extents_after_trim) in [("plain", 0), ("c", 1)] {
        let o = env.open(name).await.unwrap();
        assert_eq!(o.vol.parent().is_some(), name == "c");
        o.vol.write(0, &pattern(3, 64 * K), false).await.unwrap();
        o.vol.trim(0, 64 * K as u64).await.unwrap();
        assert_eq!(o.vol.stats().map_extents, extents_after_trim, "{name}");
        env.close(o).await;
        let o = env.open(name).await.unwrap();
        assert_eq!(
            o.vol.stats().map_extents,
            extents_after_trim,
            "{name} after reopen"
        );
        let mut buf = vec![1u8; 64 * K];
        o.vol.read(0, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0), "{name}: trimmed range");
        env.close(o).await;
    }
}

/// Missing, corrupt or looping parents are clear errors, never zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_parent_chains_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    let image = parent_with_snapshot(&env).await;
    env.snaps.clone_volume("p@s", "c", 0).await.unwrap();
    let p = env.catalog.get("p").await.unwrap();
    let s = find_snapshot(&env.store, p.id, "s").await.unwrap();

    // A flipped byte in a parent chunk: the clone's read fails (EIO).
    let c = &s.checkpoint.chunks[0];
    let key = shale::engine::format::layout::chunk_key(p.id, c.seq, c.epoch);
    let good = env.store.get(&key).await.unwrap().data;
    let mut bad = good.to_vec();
    bad[c.data_start as usize + 10] ^= 0xff;
    env.store
        .put(&key, Bytes::from(bad), PutMode::Overwrite)
        .await
        .unwrap();
    let o = env.open("c").await.unwrap();
    let mut buf = vec![0u8; 4 * K];
    assert!(
        o.vol.read(0, &mut buf).await.is_err(),
        "corrupt parent data"
    );
    env.close(o).await;
    env.store.put(&key, good, PutMode::Overwrite).await.unwrap();
    assert!(env.read("c").await == image);

    // The parent snapshot object gone (behind the catalog's back).
    let skey = snapshot_key(p.id, s.id);
    let sobj = env.store.get(&skey).await.unwrap().data;
    env.store.delete(&skey).await.unwrap();
    let Err(e) = env.open("c").await else {
        panic!("a clone whose parent is missing opened");
    };
    assert!(matches!(e, EngineError::Parent { .. }), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
    env.store
        .put(&skey, sobj.clone(), PutMode::Create)
        .await
        .unwrap();

    // A snapshot whose parent chain comes back to itself.
    let mut looped = s.clone();
    looped.parent = Some(ParentRef {
        volume: p.id,
        snapshot: s.id,
    });
    env.store
        .put(&skey, Bytes::from(looped.encode()), PutMode::Overwrite)
        .await
        .unwrap();
    let e = SnapshotView::of_parent(
        env.store.clone(),
        ParentRef {
            volume: p.id,
            snapshot: s.id,
        },
        SIZE,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("loops"), "{e}");
    env.store
        .put(&skey, sobj, PutMode::Overwrite)
        .await
        .unwrap();
    assert!(env.read("c").await == image);
}

/// Flatten copies what the clone reads from its parent; a crash before its
/// last step leaves a clone that still reads through, and running flatten
/// again finishes it. Afterwards the parent can go entirely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flatten_survives_crashes_and_frees_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    let mut want = parent_with_snapshot(&env).await;
    env.snaps.clone_volume("p@s", "c", 0).await.unwrap();
    let o = env.open("c").await.unwrap();
    o.vol.trim(0, 8 * K as u64).await.unwrap();
    o.vol
        .write(64 * K as u64, &pattern(5, K), false)
        .await
        .unwrap();
    env.close(o).await;
    want[..8 * K].fill(0);
    want[64 * K..65 * K].copy_from_slice(&pattern(5, K));

    // Refusals: not a clone; a snapshot of the clone reads through.
    let e = env.snaps.flatten("p", |_, _| {}).await.unwrap_err();
    assert!(matches!(e, SnapError::NotAClone { .. }), "{e}");
    env.snaps.create("c@before", 0).await.unwrap();
    let e = env.snaps.flatten("c", |_, _| {}).await.unwrap_err();
    assert!(e.to_string().contains("c@before"), "{e}");
    env.snaps.delete("c@before").await.unwrap();

    // Dropping the parent before the copy is refused.
    let c = env.catalog.get("c").await.unwrap();
    let lease = Lease::acquire(
        env.store.clone(),
        c.id,
        "flatten-test",
        Duration::from_secs(60),
        env.clock.clone(),
    )
    .await
    .unwrap();
    let e = finish_flatten(&env.store, c.id, SIZE, lease.epoch())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("still read from the parent"), "{e}");
    lease.release().await.unwrap();
    assert!(
        env.read("c").await == want,
        "a refused finish changes nothing"
    );

    // Crash right after the copy, before the manifest drops the parent.
    let o = env.open("c").await.unwrap();
    let stats = copy_parent_data(&o.vol, |_, _| {}).await.unwrap();
    assert_eq!(stats.read_through, SIZE - 8 * K as u64 - K as u64);
    assert_eq!(stats.copied, stats.read_through);
    o.vol.crash().await;
    o.lease.release().await.unwrap();
    assert!(env.read("c").await == want, "after a crash mid-flatten");
    let c = env.catalog.get("c").await.unwrap();
    assert_eq!(c.parent.as_deref(), Some("p@s"));

    // Crash after the manifest swap, before the record update.
    let o = env.open("c").await.unwrap();
    env.close(o).await;
    let lease = Lease::acquire(
        env.store.clone(),
        c.id,
        "flatten-test",
        Duration::from_secs(60),
        env.clock.clone(),
    )
    .await
    .unwrap();
    assert!(finish_flatten(&env.store, c.id, SIZE, lease.epoch())
        .await
        .unwrap());
    lease.release().await.unwrap();
    assert!(env.read("c").await == want, "after the manifest swap");

    // Flatten again: finishes the record; nothing left to copy.
    let report = env.snaps.flatten("c", |_, _| {}).await.unwrap();
    assert_eq!(report.copy.read_through, 0);
    assert_eq!(report.parent.as_deref(), Some("p@s"));
    assert_eq!(env.catalog.get("c").await.unwrap().parent, None);
    let e = env.snaps.flatten("c", |_, _| {}).await.unwrap_err();
    assert!(matches!(e, SnapError::NotAClone { .. }), "{e}");

    // The parent and its snapshot can go; the clone stands alone.
    env.catalog.delete("p", 0).await.unwrap();
    assert!(env.read("c").await == want, "after the parent was deleted");
    let o = env.open("c").await.unwrap();
    assert_eq!(o.id, c.id);
    let before = o.vol.stats().map_extents;
    o.vol.trim(0, 8 * K as u64).await.unwrap();
    assert_eq!(
        o.vol.stats().map_extents,
        before,
        "no zero entries any more"
    );
    env.close(o).await;
}

/// A full flatten through the catalog; deleting the parent volume is
/// refused (naming the clone) until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_delete_waits_for_clones() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    let want = parent_with_snapshot(&env).await;
    env.snaps.clone_volume("p@s", "c1", 0).await.unwrap();
    env.snaps
        .create_from("p@s", "c2", Some(SIZE), 0)
        .await
        .unwrap();
    let e = env
        .snaps
        .create_from("p@s", "c3", Some(2 * SIZE), 0)
        .await
        .unwrap_err();
    assert!(matches!(e, SnapError::CloneSize { .. }), "{e}");
    match env.catalog.delete("p", 0).await {
        Err(CatalogError::HasClones { clones, .. }) => assert_eq!(clones, ["c1", "c2"]),
        other => panic!("{other:?}"),
    }
    assert!(
        env.read("p").await == want,
        "a refused delete changes nothing"
    );
    let mut done = Vec::new();
    let report = env
        .snaps
        .flatten("c1", |d, t| done.push((d, t)))
        .await
        .unwrap();
    assert_eq!(report.copy.copied, SIZE);
    assert_eq!(done.last(), Some(&(SIZE, SIZE)));
    env.catalog.delete("c2", 0).await.unwrap();
    env.snaps.delete("p@s").await.unwrap();
    env.catalog.delete("p", 0).await.unwrap();
    assert!(env.read("c1").await == want);
}

/// A clone's reads of its parent's chunks fill and then hit its own read
/// cache (parent and clone chunks with the same sequence number do not mix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_data_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    let image = parent_with_snapshot(&env).await;
    env.snaps.clone_volume("p@s", "c", 0).await.unwrap();
    let o = env.open("c").await.unwrap();
    // The clone's own chunk 1 covers the first 64 KiB; the parent's chunk
    // 1 is read for the next 64 KiB.
    o.vol.write(0, &pattern(4, 64 * K), false).await.unwrap();
    env.close(o).await;
    let o = env.open("c").await.unwrap();
    let mut buf = vec![0u8; 128 * K];
    o.vol.read(0, &mut buf).await.unwrap();
    let first = o.vol.stats();
    assert!(first.store_reads >= 2, "{first:?}");
    o.vol.read(0, &mut buf).await.unwrap();
    let second = o.vol.stats();
    assert_eq!(second.store_reads, first.store_reads, "{second:?}");
    assert!(second.cache_hits >= first.cache_hits + 2, "{second:?}");
    assert!(buf[..64 * K] == pattern(4, 64 * K)[..]);
    assert!(buf[64 * K..] == image[64 * K..128 * K]);
    env.close(o).await;
}

/// The parent volume keeps writing (its GC deletes chunks its own map no
/// longer needs) and is rolled back; the clone still reads the snapshot's
/// data, because the snapshot keeps its chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_gc_and_rollback_spare_what_clones_read() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(dir.path());
    let want = parent_with_snapshot(&env).await;
    env.snaps.clone_volume("p@s", "c", 0).await.unwrap();
    let o = env.open("p").await.unwrap();
    for round in 0..6u8 {
        o.vol
            .write(0, &pattern(10 + round, SIZE as usize), false)
            .await
            .unwrap();
        o.vol.flush().await.unwrap();
    }
    o.vol.close().await.unwrap();
    let deleted = o.vol.stats().chunks_deleted;
    o.lease.release().await.unwrap();
    assert!(deleted > 0, "the parent's GC must have run");
    env.snaps.create("p@t", 0).await.unwrap();
    env.snaps.rollback("p@s").await.unwrap();
    env.snaps.rollback("p@t").await.unwrap();
    assert!(env.read("p").await == pattern(15, SIZE as usize));
    assert!(env.read("c").await == want, "clone lost its parent's data");
}
