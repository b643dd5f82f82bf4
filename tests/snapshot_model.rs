//! Snapshot/clone model test: a random tree of volumes, snapshots and
//! clones (of clones, to any depth; clones read through to their parents)
//! under random writes, trims, zeroing, crashes, rollbacks, snapshot and
//! volume deletes and flattens, with a reference byte image for every
//! volume and snapshot. After every step each volume (reopened, so recovery
//! runs) and each snapshot view must equal its reference, and every refusal
//! must be the expected one. Runs on the memory and fs stores.
//!
//! Plus: a snapshot keeps its content through many overwrites and
//! checkpoints (the engine's chunk deletion must spare chunks snapshots
//! name), and deleting a snapshot with clones is refused naming them.
//! `SHALE_SNAP_SEED=<n>` runs one seed.

#[path = "support/attach.rs"]
mod attach;
#[path = "support/rng.rs"]
mod rng;

use rng::Rng;
use std::path::Path;
use std::sync::Arc;

use shale::catalog::lease::Lease;
use shale::catalog::snapshot::{SnapError, Snapshots};
use shale::catalog::{Catalog, CatalogError, VolumeRecord};
use shale::clock::{DynClock, SystemClock};
use shale::engine::clone::copy_parent_data;
use shale::engine::config::EngineConfig;
use shale::engine::{BlockDevice, Volume};
use shale::store::fs::FsStore;
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const VOL_SIZE: u64 = 256 << 10;
const SECTOR: u64 = 512;

fn engine_cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 10,
        max_unstored_bytes: 1 << 20,
        checkpoint_every_chunks: 1,
        checkpoint_max_deltas: 64,
        cache_size: 0,
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

impl Env {
    fn new(store: DynStore, data_dir: &Path) -> Env {
        let clock: DynClock = Arc::new(SystemClock);
        Env {
            snaps: Snapshots::new(
                store.clone(),
                engine_cfg(),
                data_dir.to_path_buf(),
                clock.clone(),
                "model",
            ),
            catalog: Catalog::new(store.clone()),
            store,
            data_dir: data_dir.to_path_buf(),
            clock,
        }
    }

    /// Attach `name` the way a server does: lease, then open at its epoch.
    async fn attach(&self, name: &str) -> (Arc<Volume>, Lease, VolumeRecord) {
        let rec = self.catalog.get(name).await.unwrap();
        let (lease, params) = attach::lease_for(
            &self.store,
            &self.clock,
            &self.data_dir,
            &rec,
            "model-server",
        )
        .await;
        let vol = Volume::open(self.store.clone(), params, engine_cfg(), self.clock.clone())
            .await
            .unwrap();
        (vol, lease, rec)
    }

    async fn read_all(&self, dev: &dyn BlockDevice) -> Vec<u8> {
        let mut buf = vec![0u8; dev.size() as usize];
        dev.read(0, &mut buf).await.unwrap();
        buf
    }

    async fn read_volume(&self, name: &str) -> Vec<u8> {
        let (vol, lease, _) = self.attach(name).await;
        let data = self.read_all(vol.as_ref()).await;
        vol.close().await.unwrap();
        lease.release().await.unwrap();
        data
    }
}

/// One random write, trim or zeroing on `vol`, mirrored into `image`.
async fn random_op(rng: &mut Rng, vol: &Volume, image: &mut [u8]) {
    let sectors = VOL_SIZE / SECTOR;
    let start = rng.below(sectors);
    let len = 1 + rng.below((sectors - start).min(64));
    let (b0, b1) = ((start * SECTOR) as usize, ((start + len) * SECTOR) as usize);
    match rng.below(10) {
        0 => {
            vol.trim(start * SECTOR, len * SECTOR).await.unwrap();
            image[b0..b1].fill(0);
        }
        1 => {
            vol.write_zeroes(start * SECTOR, len * SECTOR, false)
                .await
                .unwrap();
            image[b0..b1].fill(0);
        }
        _ => {
            let fill = rng.next();
            let data: Vec<u8> = (0..b1 - b0)
                .map(|i| (fill.wrapping_add(i as u64 / 7) % 251) as u8)
                .collect();
            vol.write(start * SECTOR, &data, false).await.unwrap();
            image[b0..b1].copy_from_slice(&data);
        }
    }
}

struct Model {
    vols: Vec<(String, Vec<u8>)>,
    /// (spec, image)
    snaps: Vec<(String, Vec<u8>)>,
    /// (clone name, parent spec): volumes that read through to a parent.
    clones: Vec<(String, String)>,
    /// Specs of snapshots taken while their volume was a clone (they read
    /// through to its parent, so they block a flatten).
    through: Vec<String>,
    counter: u64,
    /// How often each kind of step happened (the test checks coverage).
    done: std::collections::BTreeMap<&'static str, u32>,
}

impl Model {
    fn count(&mut self, what: &'static str) {
        *self.done.entry(what).or_default() += 1;
    }

    fn volume_of(spec: &str) -> &str {
        spec.split('@').next().unwrap_or_default()
    }

    /// Clones whose parent is a snapshot of `vol`, sorted.
    fn clones_of_volume(&self, vol: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .clones
            .iter()
            .filter(|c| Self::volume_of(&c.1) == vol)
            .map(|c| c.0.clone())
            .collect();
        v.sort();
        v
    }
}

async fn check_all(env: &Env, m: &Model, step: usize) {
    for (name, image) in &m.vols {
        let got = env.read_volume(name).await;
        assert!(got == *image, "step {step}: volume {name} differs");
    }
    for (spec, image) in &m.snaps {
        let view = env.snaps.view(spec).await.unwrap();
        let got = env.read_all(&view).await;
        assert!(got == *image, "step {step}: snapshot {spec} differs");
    }
}

async fn run_model(
    store: DynStore,
    seed: u64,
    steps: usize,
) -> std::collections::BTreeMap<&'static str, u32> {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(store, dir.path());
    // Spread small seeds apart (xorshift needs a non-zero state).
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    env.catalog.create("v0", VOL_SIZE, false, 0).await.unwrap();
    let mut m = Model {
        vols: vec![("v0".into(), vec![0u8; VOL_SIZE as usize])],
        snaps: Vec::new(),
        clones: Vec::new(),
        through: Vec::new(),
        counter: 0,
        done: Default::default(),
    };
    for step in 0..steps {
        m.counter += 1;
        let op = rng.below(16);
        if std::env::var("SHALE_SNAP_TRACE").is_ok() {
            println!("step {step}: op {op}, {} volumes", m.vols.len());
        }
        match op {
            0..=4 => {
                let i = rng.below(m.vols.len() as u64) as usize;
                let name = m.vols[i].0.clone();
                let (vol, lease, _) = env.attach(&name).await;
                for _ in 0..1 + rng.below(30) {
                    random_op(&mut rng, &vol, &mut m.vols[i].1).await;
                }
                if rng.below(3) == 0 {
                    // Crash: the WAL keeps every acknowledged write.
                    vol.flush().await.unwrap();
                    vol.crash().await;
                } else {
                    vol.close().await.unwrap();
                }
                lease.release().await.unwrap();
            }
            5 | 6 => {
                let i = rng.below(m.vols.len() as u64) as usize;
                let spec = format!("{}@s{}", m.vols[i].0, m.counter);
                env.snaps.create(&spec, 0).await.unwrap();
                if m.clones.iter().any(|c| c.0 == m.vols[i].0) {
                    m.through.push(spec.clone());
                    m.count("snapshot of clone");
                }
                m.snaps.push((spec, m.vols[i].1.clone()));
            }
            7 | 8 if !m.snaps.is_empty() => {
                let j = rng.below(m.snaps.len() as u64) as usize;
                let name = format!("c{}", m.counter);
                let rec = env
                    .snaps
                    .clone_volume(&m.snaps[j].0, &name, 0)
                    .await
                    .unwrap();
                assert_eq!(rec.parent.as_deref(), Some(m.snaps[j].0.as_str()));
                if m.through.contains(&m.snaps[j].0) {
                    m.count("clone of clone");
                }
                m.vols.push((name.clone(), m.snaps[j].1.clone()));
                m.clones.push((name, m.snaps[j].0.clone()));
            }
            9 if !m.snaps.is_empty() => {
                // Half the time a snapshot of a clone, if there is one.
                let of_clones: Vec<usize> = (0..m.snaps.len())
                    .filter(|&j| {
                        let vol = Model::volume_of(&m.snaps[j].0);
                        m.clones.iter().any(|c| c.0 == vol)
                    })
                    .collect();
                let j = match rng.below(2) {
                    0 if !of_clones.is_empty() => {
                        of_clones[rng.below(of_clones.len() as u64) as usize]
                    }
                    _ => rng.below(m.snaps.len() as u64) as usize,
                };
                let spec = m.snaps[j].0.clone();
                let vol = spec.split('@').next().unwrap().to_string();
                env.snaps.rollback(&spec).await.unwrap();
                if m.clones.iter().any(|c| c.0 == vol) {
                    m.count("rollback of clone");
                }
                let i = m.vols.iter().position(|v| v.0 == vol).unwrap();
                m.vols[i].1 = m.snaps[j].1.clone();
            }
            10 if !m.snaps.is_empty() => {
                let j = rng.below(m.snaps.len() as u64) as usize;
                let spec = m.snaps[j].0.clone();
                let mut clones: Vec<String> = m
                    .clones
                    .iter()
                    .filter(|c| c.1 == spec)
                    .map(|c| c.0.clone())
                    .collect();
                clones.sort();
                match env.snaps.delete(&spec).await {
                    Ok(_) => {
                        assert!(clones.is_empty(), "step {step}: deleted {spec} with clones");
                        m.snaps.remove(j);
                        m.through.retain(|s| *s != spec);
                    }
                    Err(SnapError::HasClones {
                        clones: mut named, ..
                    }) => {
                        named.sort();
                        assert_eq!(named, clones, "step {step}");
                        assert!(!clones.is_empty());
                    }
                    Err(e) => panic!("step {step}: delete {spec}: {e}"),
                }
            }
            11 | 12 => {
                // Mostly a clone; sometimes any volume (refused if not one).
                let name = match rng.below(4) {
                    0 => None,
                    _ => (!m.clones.is_empty()).then(|| {
                        m.clones[rng.below(m.clones.len() as u64) as usize]
                            .0
                            .clone()
                    }),
                };
                let i = match name {
                    Some(n) => m.vols.iter().position(|v| v.0 == n).unwrap(),
                    None => rng.below(m.vols.len() as u64) as usize,
                };
                if rng.below(3) == 0 {
                    // A flatten that crashed after copying: still a clone.
                    crashed_flatten(&env, &mut m, i).await;
                }
                if rng.below(4) != 0 {
                    flatten_step(&env, &mut m, i, step).await;
                }
            }
            13 | 14 if m.vols.len() > 1 => {
                // Mostly a parent of clones (refused); sometimes any volume.
                let parents: Vec<usize> = (0..m.vols.len())
                    .filter(|&i| !m.clones_of_volume(&m.vols[i].0).is_empty())
                    .collect();
                let i = match rng.below(3) {
                    0 | 1 if !parents.is_empty() => {
                        parents[rng.below(parents.len() as u64) as usize]
                    }
                    _ => rng.below(m.vols.len() as u64) as usize,
                };
                delete_volume_step(&env, &mut m, i, step).await;
            }
            _ => {}
        }
        check_all(&env, &m, step).await;
    }
    println!("seed {seed}: {:?}", m.done);
    m.done
}

/// Flatten volume `i`: refused for a volume that is not a clone or whose
/// snapshots read through; otherwise its content is unchanged and it no
/// longer depends on its parent (whose snapshot may then be deleted).
async fn flatten_step(env: &Env, m: &mut Model, i: usize, step: usize) {
    let name = m.vols[i].0.clone();
    let clone = m.clones.iter().position(|c| c.0 == name);
    let blocking: Vec<String> = m
        .through
        .iter()
        .filter(|s| Model::volume_of(s) == name)
        .cloned()
        .collect();
    match env.snaps.flatten(&name, |_, _| {}).await {
        Ok(report) => {
            assert!(clone.is_some(), "step {step}: flattened non-clone {name}");
            assert!(blocking.is_empty(), "step {step}: flattened {name}");
            assert_eq!(report.record.parent, None);
            let rec = env.catalog.get(&name).await.unwrap();
            assert_eq!(rec.parent, None, "step {step}");
            if let Some(c) = clone {
                m.clones.remove(c);
            }
            m.count("flatten");
        }
        Err(SnapError::NotAClone { .. }) => {
            assert!(clone.is_none(), "step {step}: {name} is a clone");
        }
        Err(SnapError::SnapshotsReadThrough { snapshots, .. }) => {
            assert!(clone.is_some(), "step {step}");
            m.count("flatten refused");
            let mut want = blocking.clone();
            want.sort();
            let mut got = snapshots;
            got.sort();
            assert_eq!(got, want, "step {step}");
        }
        Err(e) => panic!("step {step}: flatten {name}: {e}"),
    }
}

/// The first step of a flatten (copy what the clone reads from its
/// parent), then a crash: the volume must read the same and stay a clone.
async fn crashed_flatten(env: &Env, m: &mut Model, i: usize) {
    let name = m.vols[i].0.clone();
    let (vol, lease, _) = env.attach(&name).await;
    copy_parent_data(&vol, |_, _| {}).await.unwrap();
    vol.crash().await;
    lease.release().await.unwrap();
    if m.clones.iter().any(|c| c.0 == name) {
        m.count("crashed flatten");
    }
}

/// Delete volume `i` (with its snapshots): refused, naming them, while
/// clones read through one of its snapshots.
async fn delete_volume_step(env: &Env, m: &mut Model, i: usize, step: usize) {
    let name = m.vols[i].0.clone();
    let clones = m.clones_of_volume(&name);
    match env.catalog.delete(&name, 0).await {
        Ok(_) => {
            assert!(clones.is_empty(), "step {step}: deleted {name} with clones");
            m.vols.remove(i);
            m.snaps.retain(|s| Model::volume_of(&s.0) != name);
            m.through.retain(|s| Model::volume_of(s) != name);
            m.clones.retain(|c| c.0 != name);
            m.count("volume delete");
        }
        Err(CatalogError::HasClones {
            clones: mut named, ..
        }) => {
            named.sort();
            assert_eq!(named, clones, "step {step}");
            assert!(!clones.is_empty());
            m.count("volume delete refused");
        }
        Err(e) => panic!("step {step}: delete volume {name}: {e}"),
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("SHALE_SNAP_SEED") {
        Ok(s) => vec![s.parse().expect("SHALE_SNAP_SEED must be a number")],
        Err(_) => vec![1, 2, 3],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_memory_store() {
    let mut total = std::collections::BTreeMap::new();
    for seed in seeds() {
        for (k, n) in run_model(Arc::new(MemoryStore::new()), seed, 60).await {
            *total.entry(k).or_insert(0) += n;
        }
    }
    // The default seeds must reach every kind of clone step (a single
    // SHALE_SNAP_SEED need not).
    if std::env::var("SHALE_SNAP_SEED").is_err() {
        for what in [
            "snapshot of clone",
            "clone of clone",
            "rollback of clone",
            "flatten",
            "flatten refused",
            "crashed flatten",
            "volume delete",
            "volume delete refused",
        ] {
            assert!(total.contains_key(what), "no {what:?} step ran: {total:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_fs_store() {
    for seed in seeds() {
        println!("seed {seed}");
        let dir = tempfile::tempdir().unwrap();
        let store: DynStore = Arc::new(FsStore::new(dir.path()));
        run_model(store, seed, 40).await;
    }
}

/// Overwrite a volume many times (each chunk checkpointed, dead chunks
/// deleted); its snapshot must still read back intact, also after the
/// volume is reopened (recovery deletes orphan chunks too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_spares_chunks_snapshots_need() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(Arc::new(MemoryStore::new()), dir.path());
    env.catalog.create("g", VOL_SIZE, false, 0).await.unwrap();
    let (vol, lease, _) = env.attach("g").await;
    let first: Vec<u8> = (0..VOL_SIZE).map(|i| (i % 253) as u8 + 1).collect();
    vol.write(0, &first, false).await.unwrap();
    vol.close().await.unwrap();
    lease.release().await.unwrap();
    env.snaps.create("g@keep", 0).await.unwrap();
    let (vol, lease, _) = env.attach("g").await;
    for round in 0..8u8 {
        let data = vec![round + 1; VOL_SIZE as usize];
        vol.write(0, &data, false).await.unwrap();
        vol.flush().await.unwrap();
    }
    vol.close().await.unwrap();
    let stats = vol.stats();
    lease.release().await.unwrap();
    assert!(
        stats.chunks_deleted > 0,
        "the test must make the engine delete chunks"
    );
    let view = env.snaps.view("g@keep").await.unwrap();
    assert!(env.read_all(&view).await == first, "snapshot lost data");
    assert_eq!(env.read_volume("g").await, vec![8u8; VOL_SIZE as usize]);
    let view = env.snaps.view("g@keep").await.unwrap();
    assert!(
        env.read_all(&view).await == first,
        "snapshot lost data after reopen"
    );
    // Deleting the snapshot frees its chunks; the volume is unaffected.
    let freed = env.snaps.delete("g@keep").await.unwrap();
    assert!(freed > 0);
    assert_eq!(env.read_volume("g").await, vec![8u8; VOL_SIZE as usize]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(Arc::new(MemoryStore::new()), dir.path());
    env.catalog.create("p", VOL_SIZE, false, 0).await.unwrap();
    env.snaps.create("p@a", 0).await.unwrap();
    // Duplicate snapshot name.
    let e = env.snaps.create("p@a", 0).await.unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    // Bad specs.
    for bad in ["p", "p@", "@a", "p@a@b", "p@bad name", "nosuch@a"] {
        assert!(env.snaps.create(bad, 0).await.is_err(), "{bad}");
    }
    env.snaps.clone_volume("p@a", "c1", 0).await.unwrap();
    env.snaps.clone_volume("p@a", "c2", 0).await.unwrap();
    let e = env.snaps.clone_volume("p@a", "c1", 0).await.unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let e = env.snaps.delete("p@a").await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("c1") && msg.contains("c2"), "{msg}");
    assert!(env.snaps.view("p@a").await.is_ok());
    // Attached volumes refuse rollback and delete; a snapshot needs the
    // holder's control socket, which this holder (no daemon) does not serve.
    let (vol, lease, _) = env.attach("p").await;
    let e = env.snaps.rollback("p@a").await.unwrap_err();
    assert!(matches!(e, SnapError::Attached { .. }), "{e}");
    assert!(e.to_string().contains("attached"), "{e}");
    let e = env.snaps.create("p@b", 0).await.unwrap_err();
    assert!(matches!(e, SnapError::NoControl { .. }), "{e}");
    assert!(e.to_string().contains("run the command on the host"), "{e}");
    vol.close().await.unwrap();
    lease.release().await.unwrap();
    // A view is read-only.
    let view = env.snaps.view("p@a").await.unwrap();
    assert!(view.write(0, &[1u8; 512], false).await.is_err());
    assert!(view.trim(0, 512).await.is_err());
    let listed = env.snaps.list(Some("p")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].clones, vec!["c1".to_string(), "c2".to_string()]);
}

/// A snapshot object that cannot be read makes the engine keep every chunk
/// (it may name any of them), and is reported clearly; a corrupted chunk
/// under a snapshot reads as an I/O error, never as wrong data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_objects_fail_safe() {
    use bytes::Bytes;
    use shale::engine::format::layout::snapshot_key;
    use shale::engine::snapshot::list_snapshots;
    use shale::store::PutMode;

    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(Arc::new(MemoryStore::new()), dir.path());
    let rec = env.catalog.create("k", VOL_SIZE, false, 0).await.unwrap();
    let (vol, lease, _) = env.attach("k").await;
    vol.write(0, &vec![7u8; VOL_SIZE as usize], false)
        .await
        .unwrap();
    vol.close().await.unwrap();
    lease.release().await.unwrap();
    env.snaps.create("k@good", 0).await.unwrap();
    let bad_key = snapshot_key(rec.id, 99);
    env.store
        .put(&bad_key, Bytes::from_static(b"garbage"), PutMode::Create)
        .await
        .unwrap();
    let e = list_snapshots(&env.store, rec.id).await.unwrap_err();
    assert!(e.to_string().contains(&bad_key), "{e}");
    let (vol, lease, _) = env.attach("k").await;
    for round in 0..4u8 {
        vol.write(0, &vec![round; VOL_SIZE as usize], false)
            .await
            .unwrap();
        vol.flush().await.unwrap();
    }
    vol.close().await.unwrap();
    assert_eq!(vol.stats().chunks_deleted, 0, "nothing may be deleted");
    lease.release().await.unwrap();
    env.store.delete(&bad_key).await.unwrap();

    // Flip one byte of the snapshot's only chunk: reads fail, loudly.
    let snap = shale::engine::snapshot::find_snapshot(&env.store, rec.id, "good")
        .await
        .unwrap();
    let c = &snap.checkpoint.chunks[0];
    let key = shale::engine::format::layout::chunk_key(rec.id, c.seq, c.epoch);
    let mut data = env.store.get(&key).await.unwrap().data.to_vec();
    let at = (c.data_start + 100) as usize;
    data[at] ^= 0xff;
    env.store
        .put(&key, Bytes::from(data), PutMode::Overwrite)
        .await
        .unwrap();
    let view = env.snaps.view("k@good").await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(view.read(0, &mut buf).await.is_err());
}
