//! Fencing of late chunks: a chunk upload from a writer that already lost
//! the volume (still in flight at takeover) must never enter the history,
//! even when it lands after the new holder recovered and that holder then
//! crashes before storing its own chunk at the same sequence number.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::format::layout::chunk_prefix;
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::memory::MemoryStore;
use shale::store::{DynStore, ObjectStore, PutMode};

const SIZE: u64 = 1 << 20;
const ID: u64 = 0x77;

/// Destage only on close: writes stay in the WAL until then.
fn cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 3_600_000,
        max_unstored_bytes: 8 << 20,
        max_unstored_seconds: 3600,
        durability: Durability::Local,
        checkpoint_every_chunks: 100,
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
    let p = VolumeParams {
        id: ID,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    };
    Volume::open(store.clone(), p, cfg(), Arc::new(SystemClock))
        .await
        .expect("open volume")
}

async fn keys(store: &DynStore, prefix: &str) -> BTreeSet<String> {
    let list = store.list(prefix).await.expect("list");
    list.into_iter().map(|m| m.key).collect()
}

/// Copy every object of `from` into a fresh store.
async fn copy_store(from: &DynStore) -> DynStore {
    let to: DynStore = Arc::new(MemoryStore::new());
    for key in keys(from, "").await {
        let o = from.get(&key).await.expect("get");
        to.put(&key, o.data, PutMode::Overwrite).await.expect("put");
    }
    to
}

async fn read(v: &Volume, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    v.read(off, &mut b).await.expect("read");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_chunk_of_a_fenced_writer_never_enters_the_history() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let w1 = vec![0x11u8; 4096];
    let w2 = vec![0x22u8; 4096];
    let w3 = vec![0x33u8; 4096];

    // Writer A (epoch 1) stores W1 at 0.
    let dir_a = tempfile::tempdir().unwrap();
    let a = open(&store, dir_a.path(), 1).await;
    a.write(0, &w1, false).await.unwrap();
    a.close().await.unwrap();
    drop(a);

    // The chunk A would have put next (W2 over W1), built on a copy of the
    // store and withheld: it is A's upload still in flight at takeover.
    let shadow = copy_store(&store).await;
    let dir_a2 = tempfile::tempdir().unwrap();
    let a2 = open(&shadow, dir_a2.path(), 1).await;
    a2.write(0, &w2, false).await.unwrap();
    a2.close().await.unwrap();
    drop(a2);
    let prefix = chunk_prefix(ID);
    let before = keys(&store, &prefix).await;
    let late: Vec<String> = keys(&shadow, &prefix)
        .await
        .difference(&before)
        .cloned()
        .collect();
    assert!(!late.is_empty(), "A's next chunk was captured");

    // B takes over (epoch 2), writes W3 at 64 KiB into its WAL only, crashes.
    let dir_b = tempfile::tempdir().unwrap();
    let b = open(&store, dir_b.path(), 2).await;
    b.write(65536, &w3, false).await.unwrap();
    b.flush().await.unwrap();
    let s = b.stats();
    assert!(
        s.stored_seq < s.last_seq,
        "B's write is in its WAL only: {s:?}"
    );
    b.crash().await;
    drop(b);

    // A's withheld upload lands now.
    for key in &late {
        let o = shadow.get(key).await.unwrap();
        store.put(key, o.data, PutMode::Overwrite).await.unwrap();
    }

    // C (epoch 3) recovers with B's WAL: A's state at takeover + B's write.
    let c = open(&store, dir_b.path(), 3).await;
    assert!(read(&c, 0, 4096).await == w1, "late chunk of A leaked in");
    assert!(
        read(&c, 65536, 4096).await == w3,
        "B's acknowledged write lost"
    );
    let now = keys(&store, &prefix).await;
    for key in &late {
        assert!(!now.contains(key), "stray late chunk {key} deleted");
    }
    c.close().await.unwrap();
    drop(c);

    // And it stays so after a clean reopen.
    let dir_d = tempfile::tempdir().unwrap();
    let d = open(&store, dir_d.path(), 4).await;
    assert!(
        read(&d, 0, 4096).await == w1,
        "after reopen: A's late chunk"
    );
    assert!(read(&d, 65536, 4096).await == w3, "after reopen: B's write");
    d.close().await.unwrap();
}
