//! Deleting a snapshot of an attached volume while a clone of it appears
//! and the volume's own checkpoints (and compaction) go on: the snapshot's
//! chunks must survive every step until its delete is final, so a delete
//! that is undone (a clone appeared) leaves the snapshot and the clone
//! whole. The windows are hit on purpose with holds of the fault-injecting
//! store, never by timing. (Before the deleting mark existed, the snapshot
//! taken in the window reused the deleted snapshot's id, the put-back then
//! failed silently, and the clone read through to the wrong snapshot.)

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shale::catalog::lease::Lease;
use shale::catalog::snapshot::{SnapError, Snapshots};
use shale::catalog::{Catalog, VolumeRecord};
use shale::clock::{DynClock, SystemClock};
use shale::control::{socket_path, ControlServer};
use shale::engine::config::EngineConfig;
use shale::engine::format::layout::lease_key;
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::faulty::{FaultPoint, FaultyStore};
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const SIZE: u64 = 512 << 10;
const BLOCK: usize = 4096;

/// Small chunks, a checkpoint after every chunk, compaction on.
fn cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 10,
        max_unstored_bytes: 1 << 20,
        checkpoint_every_chunks: 1,
        checkpoint_max_deltas: 64,
        cache_size: 0,
        cache_dir: None,
        compact_below_percent: 50,
        ..EngineConfig::default()
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..SIZE as usize)
        .map(|i| ((i / BLOCK) as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn volume_dir(data_dir: &Path, id: u64) -> std::path::PathBuf {
    data_dir.join("volumes").join(format!("{id:016x}"))
}

/// Open `rec` the way a server does: lease, then the volume at its epoch.
async fn attach(
    store: &DynStore,
    data_dir: &Path,
    rec: &VolumeRecord,
    clock: &DynClock,
) -> (Arc<Volume>, Lease) {
    let lease = Lease::acquire(
        store.clone(),
        rec.id,
        "server",
        Duration::from_secs(600),
        clock.clone(),
    )
    .await
    .expect("lease");
    let params = VolumeParams {
        id: rec.id,
        size: rec.size,
        epoch: lease.epoch(),
        local_dir: volume_dir(data_dir, rec.id),
    };
    let vol = Volume::open(store.clone(), params, cfg(), clock.clone())
        .await
        .expect("open");
    (vol, lease)
}

async fn read_all(dev: &dyn BlockDevice) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read(0, &mut buf).await.map_err(|e| e.to_string())?;
    Ok(buf)
}

/// A clone made while the delete waits for the lease, and a checkpoint
/// (after overwriting everything the snapshot holds) while the delete
/// rechecks for clones: the delete is refused, and the snapshot and its
/// clone still read the snapshot's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undone_snapshot_delete_keeps_the_chunks_its_clone_reads() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 1));
    let store: DynStore = faulty.clone();
    let dir = tempfile::tempdir().unwrap();
    let clock: DynClock = Arc::new(SystemClock);
    let snaps = Snapshots::new(
        store.clone(),
        cfg(),
        dir.path().to_path_buf(),
        clock.clone(),
        "cli",
    );
    let catalog = Catalog::new(store.clone());
    let rec = catalog.create("p", SIZE, false, 0).await.unwrap();
    let (vol, lease) = attach(&store, dir.path(), &rec, &clock).await;
    let control = ControlServer::start(socket_path(&volume_dir(dir.path(), rec.id)), &vol, rec.id)
        .expect("control socket");
    let old = pattern(0x5a);
    vol.write(0, &old, false).await.unwrap();
    let s = snaps
        .create("p@s", 1)
        .await
        .expect("snapshot of the attached volume");

    // The delete stops where it takes the lease (after its first look for
    // clones); a clone of p@s is made meanwhile.
    let at_lease = faulty.hold(FaultPoint::Get, &lease_key(rec.id));
    let deleting = tokio::spawn({
        let snaps = Snapshots::new(
            store.clone(),
            cfg(),
            dir.path().to_path_buf(),
            clock.clone(),
            "cli",
        );
        async move { snaps.delete("p@s").await }
    });
    at_lease.reached().await;
    snaps.clone_volume("p@s", "c", 2).await.expect("clone");
    // Then it stops where it looks for clones again, after the server took
    // the snapshot out; the volume overwrites all of it and checkpoints.
    let at_recheck = faulty.hold(FaultPoint::List, "catalog/volumes/");
    at_lease.release();
    at_recheck.reached().await;
    vol.write(0, &pattern(0xc3), false).await.unwrap();
    let later = vol
        .snapshot("later", 3)
        .await
        .expect("snapshot forcing a checkpoint");
    at_recheck.release();

    let refused = deleting.await.unwrap();
    assert!(
        matches!(&refused, Err(SnapError::HasClones { clones, .. }) if clones == &["c"]),
        "{refused:?}"
    );
    // A snapshot taken meanwhile never takes the id of one being deleted
    // (clones name their parent by id).
    assert_ne!(later.id, s.id);
    let view = snaps.view("p@s").await.expect("p@s is still there");
    assert_eq!(
        read_all(&view).await.as_ref(),
        Ok(&old),
        "p@s reads its data"
    );
    let crec = catalog.get("c").await.unwrap();
    let (clone, clone_lease) = attach(&store, dir.path(), &crec, &clock).await;
    assert_eq!(
        read_all(clone.as_ref()).await.as_ref(),
        Ok(&old),
        "the clone reads p@s's data"
    );
    clone.close().await.unwrap();
    clone_lease.release().await.unwrap();

    // With the clone gone the delete goes through and frees the chunks.
    catalog.delete("c", 4).await.expect("delete clone");
    drop(control);
    vol.close().await.unwrap();
    lease.release().await.unwrap();
    let freed = snaps.delete("p@s").await.expect("delete p@s");
    assert!(freed > 0, "p@s's chunks are freed");
    assert!(snaps.view("p@s").await.is_err());
}
