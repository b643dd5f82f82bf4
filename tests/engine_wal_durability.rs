//! WAL durability across crashes and power loss (issue 10, item 1).
//!
//! A killed process keeps the page cache, so these tests run the WAL on
//! [`PowerLossFs`], which keeps only what was synced when power is lost.

#[path = "support/engine.rs"]
mod engine_support;
use std::path::Path;
use std::sync::Arc;

use shale::clock::SystemClock;
use shale::engine::config::EngineConfig;
use shale::engine::wal::fs::DynWalFs;
use shale::engine::wal::power_loss::PowerLossFs;
use shale::engine::{BlockDevice, EngineError, Volume, VolumeParams};
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const SIZE: u64 = 4 << 20;
const ID: u64 = 0x5a;
const BLOCK: usize = 4096;

/// Destage only on close: writes stay in the WAL until then.
fn cfg() -> EngineConfig {
    engine_support::destage_on_close(64 << 10)
}

fn params(dir: &Path, epoch: u64) -> VolumeParams {
    VolumeParams {
        id: ID,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    }
}

async fn open(
    store: &DynStore,
    dir: &Path,
    epoch: u64,
    fs: &DynWalFs,
) -> Result<Arc<Volume>, EngineError> {
    Volume::open_with_fs(
        store.clone(),
        params(dir, epoch),
        cfg(),
        Arc::new(SystemClock),
        fs.clone(),
    )
    .await
}

fn block(tag: u8, i: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|j| tag ^ (i as u8).wrapping_mul(31) ^ (j as u8) | 1)
        .collect()
}

async fn read_block(v: &Volume, i: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    v.read(i * BLOCK as u64, &mut b).await.expect("read");
    b
}

/// Writes made before a process crash (never flushed) are replayed by the
/// next open; writes flushed after that open must survive a power loss.
/// Before the fix, replay kept the inherited segment only in the page
/// cache: power loss emptied it, the flushed segment after it looked like a
/// sequence gap and was dropped, and every flushed block read as zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_after_a_crash_replay_survive_power_loss() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let pfs = PowerLossFs::new();
    let fs: DynWalFs = Arc::new(pfs.clone());

    // Epoch 1: 100 writes without any flush, then kill -9.
    let v = open(&store, dir.path(), 1, &fs).await.unwrap();
    for i in 0..100 {
        v.write(i * BLOCK as u64, &block(1, i), false)
            .await
            .unwrap();
    }
    v.crash().await;
    drop(v);

    // Epoch 2 replays them, then 10 writes each followed by a flush.
    let v = open(&store, dir.path(), 2, &fs).await.unwrap();
    assert!(read_block(&v, 7).await == block(1, 7), "replayed");
    for i in 200..210 {
        v.write(i * BLOCK as u64, &block(2, i), false)
            .await
            .unwrap();
        v.flush().await.unwrap();
    }
    v.crash().await;
    drop(v);

    // The host loses power: only what was synced is left.
    pfs.lose_power();
    let v = open(&store, dir.path(), 3, &fs).await.unwrap();
    for i in 200..210 {
        assert!(
            read_block(&v, i).await == block(2, i),
            "flushed block {i} lost by the power cut"
        );
    }
    // Replay made the inherited writes durable before serving, too.
    for i in 0..100 {
        assert!(read_block(&v, i).await == block(1, i), "replayed block {i}");
    }
    v.close().await.unwrap();
}

/// A torn write at the end of the newest segment (a batch that was never
/// flushed, cut by the crash) is discarded and the volume opens with every
/// flushed write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_of_the_newest_segment_is_discarded() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let pfs = PowerLossFs::new();
    let fs: DynWalFs = Arc::new(pfs.clone());
    let v = open(&store, dir.path(), 1, &fs).await.unwrap();
    for i in 0..10 {
        v.write(i * BLOCK as u64, &block(3, i), false)
            .await
            .unwrap();
    }
    v.flush().await.unwrap();
    v.crash().await;
    drop(v);
    let wal = dir.path().join("wal");
    // The newest segment (the spares of the pool after it hold no records).
    let scans = shale::engine::wal::scan::scan(&fs, &wal, ID).unwrap();
    let newest = scans.iter().rfind(|s| !s.spare).unwrap();
    let (path, end) = (newest.path.clone(), newest.good_len);
    drop(scans);
    let mut bytes = pfs.contents(&path).unwrap();
    // Half of one more record right after the flushed ones: its header and
    // some of its data.
    let mut torn = bytes[48..48 + 48 + 1000].to_vec();
    torn[20] ^= 0x7f; // another seq: its header checksum fails too
    let end = end as usize;
    bytes[end..end + torn.len()].copy_from_slice(&torn);
    pfs.overwrite(&path, bytes).unwrap();

    let v = open(&store, dir.path(), 2, &fs).await.unwrap();
    for i in 0..10 {
        assert!(read_block(&v, i).await == block(3, i), "flushed block {i}");
    }
    // The log goes on after the flushed records: a new write and a reopen
    // see no damage and no trace of the torn record.
    v.write(20 * BLOCK as u64, &block(4, 20), false)
        .await
        .unwrap();
    v.flush().await.unwrap();
    v.crash().await;
    drop(v);
    let v = open(&store, dir.path(), 3, &fs).await.unwrap();
    for i in 0..10 {
        assert!(read_block(&v, i).await == block(3, i), "flushed block {i}");
    }
    assert!(read_block(&v, 20).await == block(4, 20), "the later write");
    v.close().await.unwrap();
}
