//! Delta checkpoints (issue 11): a volume whose checkpoints are a full base
//! plus deltas reads back exactly what was written through random writes,
//! trims, zeroes, snapshots, compaction, checkpoints and reopening; a
//! missing or damaged delta fails the open naming its key; a new base
//! deletes the old chain only after the manifest names the new base.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::format::layout::{checkpoint_prefix, manifest_key};
use shale::engine::format::manifest::Manifest;
use shale::engine::meta::chain;
use shale::engine::snapshot::SnapshotObject;
use shale::engine::view::SnapshotView;
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::memory::MemoryStore;
use shale::store::{DynStore, PutMode, StoreResult};

#[path = "support/hooked_store.rs"]
mod hooked_store;
use hooked_store::{Hooked, StoreHook};

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = SIZE / BLOCK;
const VOLUME: u64 = 0xc4a1;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Records checkpoint writes and checks every checkpoint delete against
/// the chain the latest committed manifest names.
#[derive(Debug, Default)]
struct Watch {
    delta_puts: AtomicU64,
    base_puts: AtomicU64,
    /// Checkpoint objects deleted while the committed chain still used them.
    violations: Mutex<Vec<String>>,
    deleted: AtomicU64,
}

#[async_trait]
impl StoreHook for Watch {
    async fn before_put(&self, _inner: &DynStore, key: &str) -> StoreResult<()> {
        if key.starts_with(&checkpoint_prefix(VOLUME)) {
            if key.contains("-delta-") {
                self.delta_puts.fetch_add(1, Ordering::SeqCst);
            } else {
                self.base_puts.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    async fn before_delete(&self, inner: &DynStore, key: &str) -> StoreResult<()> {
        if !key.starts_with(&checkpoint_prefix(VOLUME)) {
            return Ok(());
        }
        self.deleted.fetch_add(1, Ordering::SeqCst);
        let m = inner.get(&manifest_key(VOLUME)).await?;
        let m = Manifest::parse(VOLUME, &m.data).expect("manifest");
        match chain::keys(inner, &m, 1 << 30).await {
            Ok(keys) if keys.iter().any(|k| k == key) => {
                self.violations.lock().unwrap().push(key.to_string());
            }
            Ok(_) => {}
            Err(e) => self
                .violations
                .lock()
                .unwrap()
                .push(format!("{key} (committed chain unreadable: {e})")),
        }
        Ok(())
    }
}

fn cfg(max_deltas: u64) -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 20,
        max_unstored_bytes: 1 << 20,
        max_unstored_seconds: 3600,
        durability: Durability::Store,
        checkpoint_every_chunks: 1,
        checkpoint_max_deltas: max_deltas,
        cache_size: 0,
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        compact_below_percent: 25,
        readahead_max: 0,
        prefetch_max_in_flight: 64 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    }
}

async fn open(store: &DynStore, dir: &Path, epoch: u64, c: EngineConfig) -> Arc<Volume> {
    let params = VolumeParams {
        id: VOLUME,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    };
    Volume::open(store.clone(), params, c, Arc::new(SystemClock))
        .await
        .expect("open volume")
}

fn block_data(seed: u64) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..BLOCK).map(|_| r.next() as u8).collect()
}

async fn read_all(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    v.read(0, &mut b).await.expect("read");
    b
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Random writes, trims, zeroes, flushes (each a destage and checkpoint,
/// durability `store`), live snapshots and reopenings against a byte
/// model. After every reopen and at the end the volume equals the model,
/// and every snapshot its model copy; deltas and several bases were
/// written, and no checkpoint object the committed chain used was deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_model_reads_back_exactly() {
    for seed in [1u64, 2, 3] {
        let hooked = Hooked::new(Arc::new(MemoryStore::new()), Watch::default());
        let store: DynStore = hooked.clone();
        let watch = &hooked.hook;
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut model = vec![0u8; SIZE as usize];
        let mut epoch = 1;
        let mut v = open(&store, dir.path(), epoch, cfg(8)).await;
        let mut snaps: Vec<(SnapshotObject, Vec<u8>)> = Vec::new();
        // A fragmented start, so the base outweighs a few chunks of deltas.
        for i in 0..600 {
            let b = rng.below(BLOCKS);
            let d = block_data(seed * 1_000_003 + i);
            v.write(b * BLOCK, &d, false).await.unwrap();
            model[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&d);
        }
        v.flush().await.unwrap();
        for i in 0..900u64 {
            let b = rng.below(BLOCKS);
            let n = 1 + rng.below(4).min(BLOCKS - b - 1);
            let (s, e) = ((b * BLOCK) as usize, ((b + n) * BLOCK) as usize);
            match rng.below(100) {
                0..=69 => {
                    let d = block_data(seed * 7_000_001 + i);
                    v.write(b * BLOCK, &d, false).await.unwrap();
                    model[s..s + BLOCK as usize].copy_from_slice(&d);
                }
                70..=79 => {
                    v.trim(b * BLOCK, n * BLOCK).await.unwrap();
                    model[s..e].fill(0);
                }
                80..=84 => {
                    v.write_zeroes(b * BLOCK, n * BLOCK, false).await.unwrap();
                    model[s..e].fill(0);
                }
                85..=95 => v.flush().await.unwrap(),
                96..=97 => {
                    let snap = v.snapshot(&format!("s{i}"), i).await.expect("snapshot");
                    snaps.push((snap, model.clone()));
                }
                _ => {
                    v.close().await.unwrap();
                    epoch += 1;
                    v = open(&store, dir.path(), epoch, cfg(8)).await;
                    let got = read_all(&v).await;
                    assert_eq!(
                        first_diff(&got, &model),
                        None,
                        "seed {seed} op {i} after reopen"
                    );
                }
            }
        }
        v.close().await.unwrap();
        epoch += 1;
        let v = open(&store, dir.path(), epoch, cfg(8)).await;
        let got = read_all(&v).await;
        assert_eq!(first_diff(&got, &model), None, "seed {seed} at the end");
        v.close().await.unwrap();
        for (snap, want) in &snaps {
            let view = SnapshotView::new(store.clone(), &snap.checkpoint, SIZE).expect("view");
            let mut got = vec![0u8; SIZE as usize];
            view.read(0, &mut got).await.expect("read snapshot");
            assert_eq!(
                first_diff(&got, want),
                None,
                "seed {seed} snapshot {}",
                snap.name
            );
        }
        let deltas = watch.delta_puts.load(Ordering::SeqCst);
        let bases = watch.base_puts.load(Ordering::SeqCst);
        assert!(deltas > 10, "seed {seed}: only {deltas} deltas written");
        assert!(
            bases > 1,
            "seed {seed}: no rollover to a new base ({bases} bases)"
        );
        assert!(
            watch.deleted.load(Ordering::SeqCst) > 0,
            "no old chain deleted"
        );
        let bad = watch.violations.lock().unwrap().clone();
        assert!(
            bad.is_empty(),
            "{} checkpoint objects deleted while still in the committed chain, first: {:?}",
            bad.len(),
            &bad[..bad.len().min(3)]
        );
    }
}

/// A volume closed with a base and several deltas; returns the store, the
/// model and the manifest.
async fn volume_with_deltas(dir: &Path) -> (DynStore, Vec<u8>, Manifest) {
    let store: DynStore = Arc::new(MemoryStore::new());
    let v = open(&store, dir, 1, cfg(64)).await;
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(77);
    // The base must outweigh the deltas after it (the amortised bound in
    // commit.rs); it no longer carries chunk CRCs, so it takes more
    // extents and fewer later rounds than it did to stay the larger.
    for round in 0..4u64 {
        let n = if round == 0 { 1600 } else { 20 };
        for i in 0..n {
            let b = rng.below(BLOCKS);
            let d = block_data(round * 10_000 + i + 1);
            v.write(b * BLOCK, &d, false).await.unwrap();
            model[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&d);
        }
        v.flush().await.unwrap();
    }
    v.close().await.unwrap();
    let o = store.get(&manifest_key(VOLUME)).await.unwrap();
    let m: Manifest = serde_json::from_slice(&o.data).unwrap();
    (store, model, m)
}

/// The delta chain of a volume closed cleanly: the manifest names the
/// newest delta and its base; deleting any delta, or damaging one, fails
/// the open with an error naming that delta's key; put back, it opens and
/// reads back the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_damaged_delta_fails_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let (store, model, m) = volume_with_deltas(dir.path()).await;
    let base = m
        .checkpoint_base
        .clone()
        .expect("the manifest names a delta");
    let keys = chain::keys(&store, &m, 1 << 30).await.unwrap();
    assert_eq!(keys[0], base);
    assert!(keys.len() >= 3, "chain {keys:?}");
    assert!(keys[1..].iter().all(|k| k.contains("-delta-")), "{keys:?}");
    let open_err = |epoch| {
        let store = store.clone();
        let dir = dir.path().to_path_buf();
        async move {
            let params = VolumeParams {
                id: VOLUME,
                size: SIZE,
                epoch,
                local_dir: dir,
            };
            match Volume::open(store, params, cfg(64), Arc::new(SystemClock)).await {
                Ok(_) => panic!("opened with a broken chain"),
                Err(e) => e.to_string(),
            }
        }
    };
    let mut epoch = 2;
    // Every object of the chain, base included: missing, then damaged.
    for key in &keys {
        let saved = store.get(key).await.unwrap().data;
        store.delete(key).await.unwrap();
        let e = open_err(epoch).await;
        epoch += 1;
        assert!(
            e.contains(key.as_str()) && e.contains("missing"),
            "{key}: {e}"
        );
        let mut bad = saved.to_vec();
        let at = bad.len() / 2;
        bad[at] ^= 0x40;
        store
            .put(key, Bytes::from(bad), PutMode::Overwrite)
            .await
            .unwrap();
        let e = open_err(epoch).await;
        epoch += 1;
        assert!(e.contains(key.as_str()), "{key}: {e}");
        store.put(key, saved, PutMode::Overwrite).await.unwrap();
    }
    // A manifest naming another base than the delta's is refused too.
    let mut wrong = m.clone();
    wrong.checkpoint_base = Some(format!("{}other", checkpoint_prefix(VOLUME)));
    wrong.epoch = epoch;
    let o = store.get(&manifest_key(VOLUME)).await.unwrap();
    store
        .put(
            &manifest_key(VOLUME),
            Bytes::from(serde_json::to_vec(&wrong).unwrap()),
            PutMode::IfMatch(o.version),
        )
        .await
        .unwrap();
    let e = open_err(epoch).await;
    assert!(e.contains("manifest names base"), "{e}");
    let o = store.get(&manifest_key(VOLUME)).await.unwrap();
    store
        .put(
            &manifest_key(VOLUME),
            Bytes::from(serde_json::to_vec(&Manifest { epoch, ..m.clone() }).unwrap()),
            PutMode::IfMatch(o.version),
        )
        .await
        .unwrap();
    let v = open(&store, dir.path(), epoch + 1, cfg(64)).await;
    assert_eq!(first_diff(&read_all(&v).await, &model), None);
    v.close().await.unwrap();
}

/// With at most two deltas per base, many checkpoints roll over into new
/// bases; after each close the store holds exactly the committed chain
/// (older chains deleted), and a volume reopened with deltas disabled
/// (every checkpoint full, as before deltas existed) still reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollover_keeps_only_the_committed_chain() {
    let dir = tempfile::tempdir().unwrap();
    let store: DynStore = Arc::new(MemoryStore::new());
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(5);
    for epoch in 1..=4u64 {
        let v = open(&store, dir.path(), epoch, cfg(2)).await;
        let n = if epoch == 1 { 800 } else { 40 };
        for i in 0..n {
            let b = rng.below(BLOCKS);
            let d = block_data(epoch * 100_000 + i + 1);
            v.write(b * BLOCK, &d, false).await.unwrap();
            model[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&d);
            if i % 10 == 9 {
                v.flush().await.unwrap();
            }
        }
        v.close().await.unwrap();
        let o = store.get(&manifest_key(VOLUME)).await.unwrap();
        let m: Manifest = serde_json::from_slice(&o.data).unwrap();
        let mut want = chain::keys(&store, &m, 1 << 30).await.unwrap();
        assert!(want.len() <= 3, "{want:?}");
        let mut have: Vec<String> = store
            .list(&checkpoint_prefix(VOLUME))
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        want.sort();
        have.sort();
        assert_eq!(have, want, "epoch {epoch}");
    }
    let v = open(&store, dir.path(), 5, cfg(0)).await;
    assert_eq!(first_diff(&read_all(&v).await, &model), None);
    v.write(0, &block_data(9), false).await.unwrap();
    model[..BLOCK as usize].copy_from_slice(&block_data(9));
    v.close().await.unwrap();
    let o = store.get(&manifest_key(VOLUME)).await.unwrap();
    let m: Manifest = serde_json::from_slice(&o.data).unwrap();
    assert_eq!(
        m.checkpoint_base, None,
        "deltas disabled: a full checkpoint"
    );
    let keys: Vec<_> = store.list(&checkpoint_prefix(VOLUME)).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let v = open(&store, dir.path(), 6, cfg(64)).await;
    assert_eq!(first_diff(&read_all(&v).await, &model), None);
    v.close().await.unwrap();
}

/// Checkpoint objects no manifest names (a crash or a lost swap between
/// uploading a checkpoint and committing the manifest, or a failed delete
/// of a superseded chain) are deleted when the volume next opens; the
/// committed chain, objects of a newer epoch and keys that are not
/// checkpoint names are kept, and the volume reads back the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_checkpoint_objects_are_deleted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (store, model, m) = volume_with_deltas(dir.path()).await;
    let chain_keys = chain::keys(&store, &m, 1 << 30).await.unwrap();
    let body = store.get(&chain_keys[0]).await.unwrap().data;
    let prefix = checkpoint_prefix(VOLUME);
    let orphans = [
        format!("{prefix}0000000000000003-00000001"),
        format!("{prefix}0000000000000005-00000001-delta-0001"),
        format!("{prefix}0000000000000007-00000002"),
        format!("{prefix}0000000000000007-00000002-base-0001"),
    ];
    let kept = [
        format!("{prefix}0000000000000009-00000063"),
        format!("{prefix}notes"),
    ];
    for k in orphans.iter().chain(&kept) {
        store
            .put(k, body.clone(), PutMode::Overwrite)
            .await
            .unwrap();
    }
    let v = open(&store, dir.path(), 2, cfg(64)).await;
    assert_eq!(first_diff(&read_all(&v).await, &model), None);
    let have: Vec<String> = store
        .list(&prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    for k in &orphans {
        assert!(!have.contains(k), "orphan {k} survived the open: {have:?}");
    }
    for k in chain_keys.iter().chain(&kept) {
        assert!(have.contains(k), "{k} was deleted: {have:?}");
    }
    v.close().await.unwrap();
    let v = open(&store, dir.path(), 3, cfg(64)).await;
    assert_eq!(first_diff(&read_all(&v).await, &model), None);
    v.close().await.unwrap();
}
