//! What the engine must not take on trust from the store:
//! - garbage collection by a writer that loses the volume mid-way never
//!   deletes objects of a newer holder;
//! - a listing that lags behind the store's writes never makes recovery
//!   drop or delete stored history;
//! - hostile but checksum-valid numbers in metadata objects (checkpoints,
//!   chunk headers, manifests, snapshot objects) and oversized metadata
//!   objects give clear errors naming the object, never wraps, panics or
//!   deleted WAL data.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shale::clock::SystemClock;
use shale::engine::checkpoint::Checkpoint;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::format::chunk::{encode, ChunkExtent, ChunkHeader};
use shale::engine::format::layout::{
    chunk_key, chunk_prefix, compacted_prefix, manifest_key, parse_chunk_name, snapshot_key,
};
use shale::engine::format::manifest::Manifest;
use shale::engine::snapshot::SnapshotObject;
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::faulty::{FaultPoint, FaultyStore};
use shale::store::memory::MemoryStore;
use shale::store::{DynStore, ObjectStore, PutMode};

const SIZE: u64 = 1 << 20;
const ID: u64 = 0x7e;
const BLOCK: usize = 4096;

/// Small chunks; checkpoints only every 100 chunks (so chunks after the
/// checkpoint are common); compaction of chunks below 50% live.
fn cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 10,
        max_unstored_bytes: 8 << 20,
        max_unstored_seconds: 3600,
        durability: Durability::Local,
        checkpoint_every_chunks: 100,
        checkpoint_max_deltas: 64,
        cache_size: 0,
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        compact_below_percent: 50,
        readahead_max: 32 << 20,
        prefetch_max_in_flight: 64 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    }
}

/// [`cfg`] with destage only on close: writes stay in the WAL until then.
fn wal_only_cfg() -> EngineConfig {
    EngineConfig {
        destage_interval_ms: 3_600_000,
        ..cfg()
    }
}

async fn try_open(
    store: &DynStore,
    dir: &Path,
    epoch: u64,
    cfg: EngineConfig,
) -> Result<Arc<Volume>, String> {
    let p = VolumeParams {
        id: ID,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    };
    Volume::open(store.clone(), p, cfg, Arc::new(SystemClock))
        .await
        .map_err(|e| e.to_string())
}

async fn open(store: &DynStore, dir: &Path, epoch: u64) -> Arc<Volume> {
    try_open(store, dir, epoch, cfg())
        .await
        .expect("open volume")
}

fn block(seed: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| ((i as u64 * 7 + seed * 131) % 251) as u8 + 1)
        .collect()
}

async fn read_all(v: &dyn BlockDevice) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; SIZE as usize];
    v.read(0, &mut b).await.map_err(|e| e.to_string())?;
    Ok(b)
}

/// Write `blocks` blocks from block `first`, seeds from `seed`, into `v`
/// and `model`.
async fn write_blocks(v: &Volume, model: &mut [u8], first: usize, blocks: usize, seed: u64) {
    for i in first..first + blocks {
        let d = block(seed + i as u64);
        v.write((i * BLOCK) as u64, &d, false).await.unwrap();
        model[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&d);
    }
    v.flush().await.unwrap();
}

/// Wait until everything written is in chunk objects.
async fn wait_stored(v: &Volume) {
    for _ in 0..10_000 {
        let s = v.stats();
        if s.stored_seq >= s.last_seq {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("destage did not catch up: {:?}", v.stats());
}

async fn keys(store: &DynStore, prefix: &str) -> BTreeSet<String> {
    let list = store.list(prefix).await.expect("list");
    list.into_iter().map(|m| m.key).collect()
}

async fn manifest(store: &DynStore) -> Manifest {
    let o = store.get(&manifest_key(ID)).await.expect("manifest");
    serde_json::from_slice(&o.data).expect("manifest parses")
}

async fn put(store: &DynStore, key: &str, data: Vec<u8>) {
    store
        .put(key, Bytes::from(data), PutMode::Overwrite)
        .await
        .expect("put");
}

/// Bytes held by the WAL segment files of `dir`.
fn wal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("wal"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

// ---- item 4: garbage collection by a writer losing the volume ----------

/// Writer A (epoch 1) collects garbage; after it checked that it still
/// holds the volume and before it lists compaction objects, writer B
/// (epoch 2) takes the volume over and compacts: A must not delete B's
/// compaction object, which B's checkpoint names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_by_a_fenced_writer_spares_the_new_holders_objects() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 4));
    let store: DynStore = faulty.clone();
    let mut model = vec![0u8; SIZE as usize];
    let dir_a = tempfile::tempdir().unwrap();
    let a = open(&store, dir_a.path(), 1).await;
    write_blocks(&a, &mut model, 0, 64, 1).await;
    a.snapshot("s", 1).await.expect("snapshot");
    wait_stored(&a).await;

    let at_list = faulty.hold(FaultPoint::List, &compacted_prefix(ID));
    let gc = tokio::spawn({
        let a = a.clone();
        async move { a.collect_garbage().await }
    });
    at_list.reached().await;

    // B takes over: 4 chunks, then most of each overwritten, so the first
    // ones are compacted into an object of epoch 2 that B's map names.
    let dir_b = tempfile::tempdir().unwrap();
    let b = open(&store, dir_b.path(), 2).await;
    write_blocks(&b, &mut model, 64, 64, 1000).await;
    wait_stored(&b).await;
    for i in 64..128 {
        if i % 16 != 0 {
            write_blocks(&b, &mut model, i, 1, 5000).await;
        }
    }
    b.close().await.unwrap();
    assert!(b.stats().chunks_compacted > 0, "{:?}", b.stats());
    let theirs: Vec<String> = keys(&store, &compacted_prefix(ID))
        .await
        .into_iter()
        .filter(|k| k.ends_with("-00000002"))
        .collect();
    assert!(!theirs.is_empty(), "B wrote compaction objects");

    at_list.release();
    let _ = gc.await.unwrap();
    let left = keys(&store, &compacted_prefix(ID)).await;
    for k in &theirs {
        assert!(left.contains(k), "{k} of epoch 2 was deleted by epoch 1");
    }
    let dir_c = tempfile::tempdir().unwrap();
    let c = open(&store, dir_c.path(), 3).await;
    assert_eq!(read_all(&*c).await, Ok(model), "the new holder's data");
    c.close().await.unwrap();
}

// ---- item 6: listings that lag ------------------------------------------

/// Chunks after the checkpoint (stored, their WAL gone with the local
/// disk) with the first of them missing from listings: recovery must find
/// it by reading it directly, keep every chunk, and recover all data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_reads_past_a_lagging_listing_and_deletes_nothing() {
    let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 6));
    let store: DynStore = faulty.clone();
    let mut model = vec![0u8; SIZE as usize];
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1).await;
    write_blocks(&v, &mut model, 0, 16, 1).await;
    v.close().await.unwrap();
    let v = open(&store, dir.path(), 2).await;
    for round in 0..4u64 {
        write_blocks(&v, &mut model, 16 + 16 * round as usize, 16, 100 * round).await;
        wait_stored(&v).await;
    }
    v.crash().await;
    drop(v);
    let m = manifest(&store).await;
    let later: Vec<String> = keys(&store, &chunk_prefix(ID))
        .await
        .into_iter()
        .filter(|k| {
            let name = &k[chunk_prefix(ID).len()..];
            parse_chunk_name(name).is_some_and(|(seq, _)| seq > m.checkpoint_chunk)
        })
        .collect();
    assert!(later.len() >= 3, "chunks after the checkpoint: {later:?}");
    let all_chunks = keys(&store, &chunk_prefix(ID)).await;

    // The local disk is lost; the listing misses the first later chunk.
    faulty.hide_in_listings([later[0].clone()]);
    let fresh = tempfile::tempdir().unwrap();
    let v = open(&store, fresh.path(), 3).await;
    faulty.show_in_listings();
    assert_eq!(
        keys(&store, &chunk_prefix(ID)).await,
        all_chunks,
        "no chunk deleted"
    );
    assert_eq!(read_all(&*v).await, Ok(model.clone()), "every stored write");
    v.close().await.unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let v = open(&store, fresh.path(), 4).await;
    assert_eq!(read_all(&*v).await, Ok(model), "and after reopening");
    v.close().await.unwrap();
}

/// A real gap (a chunk missing from the store, not just from listings)
/// ends the history there, but the chunks past it stay in the store for a
/// later open to judge; they are logged, not deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_past_a_real_gap_are_left_alone() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let mut model = vec![0u8; SIZE as usize];
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1).await;
    write_blocks(&v, &mut model, 0, 16, 1).await;
    v.close().await.unwrap();
    let before = model.clone();
    let v = open(&store, dir.path(), 2).await;
    for round in 0..3u64 {
        write_blocks(&v, &mut model, 16, 16, 100 * round).await;
        wait_stored(&v).await;
    }
    v.crash().await;
    drop(v);
    let m = manifest(&store).await;
    let later: Vec<String> = keys(&store, &chunk_prefix(ID))
        .await
        .into_iter()
        .filter(|k| {
            let name = &k[chunk_prefix(ID).len()..];
            parse_chunk_name(name).is_some_and(|(seq, _)| seq > m.last_chunk)
        })
        .collect();
    assert!(later.len() >= 2, "uncommitted chunks: {later:?}");
    store.delete(&later[0]).await.unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let v = open(&store, fresh.path(), 3).await;
    assert_eq!(read_all(&*v).await, Ok(before), "history ends at the gap");
    let left = keys(&store, &chunk_prefix(ID)).await;
    for k in &later[1..] {
        assert!(left.contains(k), "{k} past the gap was deleted");
    }
    v.close().await.unwrap();
}

// ---- item 7: hostile numbers and oversized objects -----------------------

/// A volume with a checkpoint and acknowledged writes only in its WAL (the
/// process crashed): returns the WAL's image and the checkpoint key.
async fn crashed_with_wal(store: &DynStore, dir: &Path) -> (Vec<u8>, String) {
    let mut model = vec![0u8; SIZE as usize];
    let v = open(store, dir, 1).await;
    write_blocks(&v, &mut model, 0, 16, 1).await;
    v.close().await.unwrap();
    drop(v);
    let v = try_open(store, dir, 2, wal_only_cfg()).await.unwrap();
    write_blocks(&v, &mut model, 8, 16, 77).await;
    v.crash().await;
    drop(v);
    let key = manifest(store).await.checkpoint.expect("a checkpoint");
    (model, key)
}

/// Open with a hostile `key` object in place: the open fails naming the
/// key and the WAL keeps its bytes.
async fn refused_and_nothing_lost(store: &DynStore, dir: &Path, key: &str) {
    let wal_before = wal_bytes(dir);
    assert!(wal_before > 0, "the WAL holds the crashed writes");
    let e = try_open(store, dir, 3, wal_only_cfg())
        .await
        .err()
        .unwrap_or_else(|| panic!("open with a hostile {key} succeeded"));
    assert!(e.contains(key), "the error names {key}: {e}");
    assert_eq!(wal_bytes(dir), wal_before, "the WAL is untouched");
}

/// With the original `key` object back the volume opens with every
/// acknowledged write.
async fn restore_and_check(store: &DynStore, dir: &Path, key: &str, original: Bytes, model: &[u8]) {
    store
        .put(key, original, PutMode::Overwrite)
        .await
        .expect("restore");
    let v = try_open(store, dir, 4, wal_only_cfg())
        .await
        .expect("opens again");
    assert_eq!(read_all(&*v).await.as_deref(), Ok(model), "nothing lost");
    v.close().await.unwrap();
}

/// A checkpoint whose `last_seq` is u64::MAX would skip (and delete) every
/// WAL record; chunk fields that overflow or disagree would wrap reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_checkpoint_numbers_are_refused() {
    type Mutate = fn(&mut Checkpoint);
    let cases: [(&str, Mutate); 4] = [
        ("last_seq", |cp| cp.last_seq = u64::MAX),
        ("data_start", |cp| cp.chunks[0].data_start = u64::MAX - 8),
        ("data_len", |cp| cp.chunks[0].data_len = u64::MAX),
        ("chunk seq", |cp| {
            cp.chunks[0].seq = u64::MAX;
            for e in &mut cp.extents {
                e.2 = u64::MAX;
            }
        }),
    ];
    for (what, mutate) in cases {
        let store: DynStore = Arc::new(MemoryStore::new());
        let dir = tempfile::tempdir().unwrap();
        let (model, key) = crashed_with_wal(&store, dir.path()).await;
        let original = store.get(&key).await.unwrap().data;
        let mut cp = Checkpoint::decode(&original).unwrap();
        mutate(&mut cp);
        put(&store, &key, cp.encode()).await;
        println!("case {what}");
        refused_and_nothing_lost(&store, dir.path(), &key).await;
        restore_and_check(&store, dir.path(), &key, original, &model).await;
    }
}

/// A chunk after the checkpoint whose header (checksum valid) ends at
/// sequence u64::MAX: taking it would skip every WAL record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_ending_at_the_last_sequence_number_is_refused() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let (model, cp_key) = crashed_with_wal(&store, dir.path()).await;
    let cp = Checkpoint::decode(&store.get(&cp_key).await.unwrap().data).unwrap();
    let m = manifest(&store).await;
    let data = vec![9u8; BLOCK];
    let h = ChunkHeader {
        volume: ID,
        epoch: m.epoch,
        chunk_seq: cp.chunk_seq + 1,
        first_seq: cp.last_seq + 1,
        last_seq: u64::MAX,
        extents: vec![ChunkExtent {
            lba: 0,
            sectors: 8,
            data_off: Some(0),
        }],
        block_crcs: Vec::new(),
        data_len: 0,
        header_len: 0,
    };
    let key = chunk_key(ID, cp.chunk_seq + 1, m.epoch);
    put(&store, &key, encode(&h, &data)).await;
    let wal_before = wal_bytes(dir.path());
    let e = try_open(&store, dir.path(), 3, wal_only_cfg())
        .await
        .expect_err("open with a hostile chunk succeeded");
    assert!(e.contains(&key), "the error names {key}: {e}");
    assert_eq!(wal_bytes(dir.path()), wal_before, "the WAL is untouched");
    store.delete(&key).await.unwrap();
    let v = try_open(&store, dir.path(), 4, wal_only_cfg())
        .await
        .expect("opens without it");
    assert_eq!(read_all(&*v).await, Ok(model), "nothing lost");
    v.close().await.unwrap();
}

/// Manifests with numbers that contradict each other, and a manifest and
/// a checkpoint too large to be real, are refused naming the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_manifests_and_oversized_metadata_are_refused() {
    type Mutate = fn(&mut Manifest);
    let cases: [(&str, Mutate); 4] = [
        ("checkpoint after last chunk", |m| {
            m.last_chunk = m.checkpoint_chunk.saturating_sub(1)
        }),
        ("last_chunk", |m| m.last_chunk = u64::MAX),
        ("last_seq", |m| m.last_seq = u64::MAX),
        ("history epoch", |m| m.history_epoch = m.epoch + 1),
    ];
    let key = manifest_key(ID);
    for (what, mutate) in cases {
        let store: DynStore = Arc::new(MemoryStore::new());
        let dir = tempfile::tempdir().unwrap();
        let (model, _) = crashed_with_wal(&store, dir.path()).await;
        let original = store.get(&key).await.unwrap().data;
        let mut m: Manifest = serde_json::from_slice(&original).unwrap();
        mutate(&mut m);
        put(&store, &key, serde_json::to_vec(&m).unwrap()).await;
        println!("case {what}");
        refused_and_nothing_lost(&store, dir.path(), &key).await;
        restore_and_check(&store, dir.path(), &key, original, &model).await;
    }

    // Valid JSON, padded far past any real manifest or checkpoint.
    for manifest_too_large in [true, false] {
        let store: DynStore = Arc::new(MemoryStore::new());
        let dir = tempfile::tempdir().unwrap();
        let (model, cp_key) = crashed_with_wal(&store, dir.path()).await;
        let key = if manifest_too_large {
            manifest_key(ID)
        } else {
            cp_key
        };
        let original = store.get(&key).await.unwrap().data;
        let big = if manifest_too_large {
            let mut big = original.to_vec();
            big.extend(std::iter::repeat_n(b' ', 2 << 20));
            big
        } else {
            let mut cp = Checkpoint::decode(&original).unwrap();
            cp.zeros = (0..2_000_000u64).map(|i| (i * 2, 1)).collect();
            // The older JSON form (still read) is the larger one.
            cp.encode_json()
        };
        put(&store, &key, big).await;
        let e = try_open(&store, dir.path(), 3, wal_only_cfg())
            .await
            .err()
            .unwrap_or_else(|| panic!("open with an oversized {key} succeeded"));
        assert!(e.contains(&key) && e.contains("larger"), "{e}");
        restore_and_check(&store, dir.path(), &key, original, &model).await;
    }
}

/// Snapshot objects with an id that would wrap the next id, or an id that
/// disagrees with their key, are refused; nothing is deleted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_snapshot_objects_are_refused() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1).await;
    let mut model = vec![0u8; SIZE as usize];
    write_blocks(&v, &mut model, 0, 16, 1).await;
    let good = v.snapshot("good", 1).await.unwrap();
    for (key, id) in [
        (snapshot_key(ID, u64::MAX), u64::MAX),
        (snapshot_key(ID, 7), 8),
    ] {
        let hostile = SnapshotObject {
            id,
            name: format!("h{id}"),
            ..good.clone()
        };
        put(&store, &key, hostile.encode()).await;
        let e = v
            .snapshot("next", 2)
            .await
            .expect_err("a snapshot next to a hostile object");
        assert!(e.to_string().contains(&key), "{e}");
        store.delete(&key).await.unwrap();
    }
    let next = v.snapshot("next", 3).await.expect("snapshot");
    assert_eq!(next.id, good.id + 1);
    assert_eq!(read_all(&*v).await, Ok(model));
    v.close().await.unwrap();
}
