//! A WAL is replayed only over the history it extends (issue 10, item 2):
//! a host that lost the volume keeps its WAL, and when it opens the volume
//! again after another writer (or a rollback) changed the history, that
//! WAL is quarantined, never applied.

#[path = "support/engine.rs"]
mod engine_support;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shale::clock::SystemClock;
use shale::engine::config::EngineConfig;
use shale::engine::wal::record::{RecordHeader, RecordKind};
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const SIZE: u64 = 4 << 20;
const ID: u64 = 0x3c;
const BLOCK: usize = 4096;

/// Destage only on close (or when a snapshot needs it).
fn cfg() -> EngineConfig {
    engine_support::destage_on_close(4 << 20)
}

fn params(dir: &Path, epoch: u64) -> VolumeParams {
    VolumeParams {
        id: ID,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    }
}

async fn open(store: &DynStore, dir: &Path, epoch: u64) -> Arc<Volume> {
    Volume::open(
        store.clone(),
        params(dir, epoch),
        cfg(),
        Arc::new(SystemClock),
    )
    .await
    .expect("open volume")
}

fn block(tag: u8, i: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|j| tag ^ (i as u8).wrapping_mul(29) ^ (j as u8) | 1)
        .collect()
}

async fn read_block(v: &Volume, i: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    v.read(i * BLOCK as u64, &mut b).await.expect("read");
    b
}

/// The quarantine directories in `dir`, with the files each holds.
fn quarantined(dir: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("wal.quarantine-") {
            let mut files: Vec<String> = std::fs::read_dir(&p)
                .unwrap()
                .map(|f| f.unwrap().file_name().to_string_lossy().to_string())
                .collect();
            files.sort();
            out.push((p, files));
        }
    }
    out
}

/// Host A writes 64 flushed blocks and is killed; host B (its own local
/// directory) takes the volume at a newer epoch, writes one block
/// elsewhere and closes cleanly; A opens it again. Before the fix A's
/// records whose sequence numbers follow B's reappeared over B's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_wal_of_a_host_that_lost_the_volume_is_quarantined() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let a = open(&store, dir_a.path(), 1).await;
    for i in 0..64 {
        a.write(i * BLOCK as u64, &block(0xa, i), false)
            .await
            .unwrap();
    }
    a.flush().await.unwrap();
    assert_eq!(a.stats().stored_seq, 0, "A's writes are in its WAL only");
    a.crash().await;
    drop(a);

    let b = open(&store, dir_b.path(), 2).await;
    b.write(500 * BLOCK as u64, &block(0xb, 500), false)
        .await
        .unwrap();
    b.close().await.unwrap();
    drop(b);

    let a = open(&store, dir_a.path(), 3).await;
    for i in 0..64 {
        assert!(
            read_block(&a, i).await == vec![0u8; BLOCK],
            "A's stale write to block {i} reappeared over B's history"
        );
    }
    assert!(read_block(&a, 500).await == block(0xb, 500), "B's write");
    let q = quarantined(dir_a.path());
    assert_eq!(q.len(), 1, "one quarantine directory: {q:?}");
    assert!(
        q[0].1.iter().any(|f| f.ends_with(".wal")),
        "A's segments are kept there: {q:?}"
    );
    a.close().await.unwrap();
    drop(a);

    // The quarantined files are never picked up again.
    let again = open(&store, dir_a.path(), 4).await;
    assert!(read_block(&again, 3).await == vec![0u8; BLOCK]);
    assert_eq!(quarantined(dir_a.path()).len(), 1);
    again.close().await.unwrap();
}

/// A rollback (run from another local directory) while A's WAL holds
/// records: A must not replay them over the rolled-back history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_written_before_a_rollback_is_not_replayed_over_it() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    let a = open(&store, dir_a.path(), 1).await;
    a.write(0, &block(1, 0), false).await.unwrap();
    let snap = a.snapshot("before", 0).await.expect("snapshot");
    for i in 0..64 {
        a.write(i * BLOCK as u64, &block(2, i), false)
            .await
            .unwrap();
    }
    a.flush().await.unwrap();
    a.crash().await;
    drop(a);

    // The rollback settles the volume from another directory (its WAL is
    // empty there), then swaps in the snapshot's map.
    open(&store, dir_b.path(), 2).await.close().await.unwrap();
    shale::engine::snapshot::rollback(&store, ID, 2, &snap)
        .await
        .expect("rollback");

    let a = open(&store, dir_a.path(), 3).await;
    assert!(read_block(&a, 0).await == block(1, 0), "rolled back");
    for i in 1..64 {
        assert!(
            read_block(&a, i).await == vec![0u8; BLOCK],
            "a write from before the rollback reappeared at block {i}"
        );
    }
    assert_eq!(quarantined(dir_a.path()).len(), 1);
    a.close().await.unwrap();
}

/// A record as the previous release wrote it (segments had no header).
fn legacy_record(seq: u64, lba_block: u64, data: &[u8]) -> Vec<u8> {
    let h = RecordHeader {
        kind: RecordKind::Write,
        volume: ID,
        seq,
        lba: lba_block * (BLOCK as u64 / 512),
        sectors: data.len() as u64 / 512,
        data_crc: crc32c::crc32c(data),
        more: false,
        block_crcs: false,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(data);
    v
}

/// Replace the WAL of `dir` by one legacy segment holding `records`.
fn write_legacy_wal(dir: &Path, records: &[Vec<u8>]) {
    let wal = dir.join("wal");
    std::fs::remove_dir_all(&wal).unwrap();
    std::fs::create_dir_all(&wal).unwrap();
    std::fs::write(wal.join("0000000000000001.wal"), records.concat()).unwrap();
}

/// A WAL without segment headers (written by the previous release) is
/// replayed when it provably continues the store's history: it holds the
/// store's last write, with the same data. Otherwise it is quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_wal_replays_only_when_it_continues_the_store() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1).await;
    v.write(0, &block(1, 0), false).await.unwrap(); // seq 1
    v.close().await.unwrap();
    drop(v);

    // It continues the store: seq 1 is the store's last write, same data.
    write_legacy_wal(
        dir.path(),
        &[
            legacy_record(1, 0, &block(1, 0)),
            legacy_record(2, 10, &block(3, 10)),
        ],
    );
    let v = open(&store, dir.path(), 2).await;
    assert!(
        read_block(&v, 10).await == block(3, 10),
        "legacy WAL replayed"
    );
    assert!(quarantined(dir.path()).is_empty());
    v.close().await.unwrap(); // seq 2 is now the store's last write
    drop(v);

    // Another history's WAL: its seq 2 is not the store's seq 2.
    write_legacy_wal(
        dir.path(),
        &[
            legacy_record(2, 10, &block(9, 10)),
            legacy_record(3, 20, &block(9, 20)),
        ],
    );
    let v = open(&store, dir.path(), 3).await;
    assert!(read_block(&v, 10).await == block(3, 10));
    assert!(read_block(&v, 20).await == vec![0u8; BLOCK], "not replayed");
    assert_eq!(quarantined(dir.path()).len(), 1);
    v.close().await.unwrap();
    drop(v);

    // One that does not reach back to the store's last write (seq 2)
    // cannot be shown to continue it.
    write_legacy_wal(dir.path(), &[legacy_record(3, 30, &block(4, 30))]);
    let v = open(&store, dir.path(), 4).await;
    assert!(read_block(&v, 30).await == vec![0u8; BLOCK], "not replayed");
    assert_eq!(quarantined(dir.path()).len(), 2);
    v.close().await.unwrap();
}
