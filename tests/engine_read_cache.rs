//! The read cache returns exactly the bytes the map names: every 4 KiB
//! block read back after destage (served through cache windows at every
//! offset inside a window) holds what was written there.

use std::sync::Arc;
use std::time::Duration;

use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const SIZE: u64 = 16 << 20;
const BLOCK: usize = 4096;

fn cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 256 << 10,
        destage_interval_ms: 20,
        max_unstored_bytes: 1 << 20,
        max_unstored_seconds: 3600,
        durability: Durability::Local,
        checkpoint_every_chunks: 4,
        checkpoint_max_deltas: 64,
        cache_size: 8 << 20,
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        compact_below_percent: 0,
        readahead_max: 32 << 20,
        prefetch_max_in_flight: 64 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    }
}

/// A block that names itself (its number and a write counter in every
/// word) and ends with the CRC32C of the rest, as many on-disk formats do.
/// Every such block has the same CRC32C as a whole (the CRC residue), so
/// the chunk's per-block CRCs cannot tell one from another: only correct
/// addressing returns the right one.
fn stamped(block: u64, gen: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    for (i, w) in b.chunks_mut(16).enumerate() {
        w[..8].copy_from_slice(&block.to_le_bytes());
        w[8..].copy_from_slice(&(gen ^ i as u64).to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A fresh volume `id` on a memory store, its local directory in a
/// temporary directory (kept alive by the caller).
async fn open_volume(id: u64) -> (Arc<Volume>, tempfile::TempDir) {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let params = VolumeParams {
        id,
        size: SIZE,
        epoch: 1,
        local_dir: dir.path().to_path_buf(),
    };
    let v = Volume::open(store, params, cfg(), Arc::new(SystemClock))
        .await
        .unwrap();
    (v, dir)
}

/// Wait until everything written is in the store.
async fn wait_destaged(v: &Volume) {
    for _ in 0..500 {
        if v.stats().unstored_bytes == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(v.stats().unstored_bytes, 0, "destage did not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_return_the_block_asked_for() {
    let (v, _dir) = open_volume(0x51).await;
    let blocks = SIZE / BLOCK as u64;
    let mut written = std::collections::BTreeMap::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for gen in 0..300u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % blocks;
        v.write(block * BLOCK as u64, &stamped(block, gen), false)
            .await
            .unwrap();
        written.insert(block, gen);
    }
    v.flush().await.unwrap();
    wait_destaged(&v).await;
    // Twice: the first pass fills the cache windows, the second is served
    // from them at every offset.
    for pass in 0..2 {
        for (&block, &gen) in &written {
            let mut got = vec![0u8; BLOCK];
            v.read(block * BLOCK as u64, &mut got).await.unwrap();
            assert!(
                got == stamped(block, gen),
                "pass {pass}: block {block} does not hold generation {gen} \
                 (it starts with the stamp of block {})",
                u64::from_le_bytes(got[..8].try_into().unwrap())
            );
        }
    }
    assert!(v.stats().cache_hits > 0, "the second pass used the cache");
    // Big reads spanning windows, several in flight, as nbdcopy does.
    for pass in 0..2 {
        let piece = 256usize << 10;
        let mut reads = Vec::new();
        for start in (0..SIZE as usize).step_by(piece) {
            let v = v.clone();
            reads.push(tokio::spawn(async move {
                let mut got = vec![0u8; piece];
                v.read(start as u64, &mut got).await.unwrap();
                (start, got)
            }));
        }
        for r in reads {
            let (start, got) = r.await.unwrap();
            for (i, b) in got.chunks(BLOCK).enumerate() {
                let block = (start / BLOCK + i) as u64;
                let want = written.get(&block).map(|&g| stamped(block, g));
                let want = want.unwrap_or_else(|| vec![0u8; BLOCK]);
                assert!(
                    b == &want[..],
                    "big read pass {pass}: block {block} wrong (starts with the stamp of block {})",
                    u64::from_le_bytes(b[..8].try_into().unwrap())
                );
            }
        }
    }
    v.close().await.unwrap();
}

/// Drop every file under `dir` from the page cache, so reading them needs
/// the disk (the read path must then read them off the caller's thread).
fn evict_page_cache(dir: &std::path::Path) {
    use std::os::fd::AsRawFd;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            evict_page_cache(&path);
            continue;
        }
        let Ok(f) = std::fs::File::open(&path) else {
            continue;
        };
        // SAFETY: a plain advice call on a descriptor `f` owns; no memory
        // is passed.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "fadvise {}", path.display());
    }
}

/// Reads whose bytes are only on disk (WAL records and cache entries out of
/// the page cache) are read on the blocking pool: they return the right
/// bytes, cache entries still count as hits, and nothing is fetched from
/// the store again; many such reads in flight on a runtime with a single
/// worker thread all complete.
#[tokio::test(flavor = "current_thread")]
async fn reads_that_need_the_disk_return_the_right_bytes() {
    let (v, dir) = open_volume(0x52).await;
    let blocks: Vec<u64> = (0..64u64).map(|i| i * 37 % (SIZE / BLOCK as u64)).collect();
    for (gen, &block) in blocks.iter().enumerate() {
        v.write(block * BLOCK as u64, &stamped(block, gen as u64), false)
            .await
            .unwrap();
    }
    v.flush().await.unwrap();
    let check = |v: Arc<Volume>, label: &'static str| {
        let blocks = blocks.clone();
        async move {
            let mut reads = Vec::new();
            for (gen, &block) in blocks.iter().enumerate() {
                let v = v.clone();
                reads.push(tokio::spawn(async move {
                    let mut got = vec![0u8; BLOCK];
                    v.read(block * BLOCK as u64, &mut got).await.unwrap();
                    assert!(
                        got == stamped(block, gen as u64),
                        "{label}: block {block} is not generation {gen}"
                    );
                }));
            }
            for r in reads {
                r.await.unwrap();
            }
        }
    };
    // From the WAL (written with direct I/O, then evicted).
    evict_page_cache(dir.path());
    check(v.clone(), "from the WAL").await;
    wait_destaged(&v).await;
    // Fill the cache from the store, then read it back from disk.
    check(v.clone(), "from the store").await;
    let (reads, hits) = (v.stats().store_reads, v.stats().cache_hits);
    evict_page_cache(dir.path());
    check(v.clone(), "from the cache on disk").await;
    let after = v.stats();
    assert_eq!(after.store_reads, reads, "nothing was fetched again");
    assert_eq!(
        after.cache_hits - hits,
        blocks.len() as u64,
        "every read was a cache hit"
    );
    v.close().await.unwrap();
}
