//! `shale-bench --checkpoint-cost N`: metadata bytes written per GiB of 4K
//! random writes into a volume that already holds N fragmented extents,
//! and the open time of such a volume (issue 11).
//!
//! The volume is seeded directly in an in-memory store: a checkpoint of N
//! random 4 KiB extents packed into 4 MiB chunks in write order (as
//! `--map-extents` builds it) and a manifest naming it; the seeded chunk
//! objects are not stored (nothing reads them: compaction is off). Then,
//! once with every checkpoint full (`checkpoint_max_deltas: 0`, what main
//! did) and once with delta checkpoints (the default 64), in the same run:
//! open the volume (timed), write `--cp-write` bytes of 4K random writes
//! at QD32, close it (final checkpoint included), and count the bytes
//! PUT under the volume's `checkpoints/` prefix and to its manifest. Chunk
//! payloads are dropped by the store wrapper (only their sizes count), so
//! the run needs no memory or disk for the data itself; the WAL is on
//! local disk under `--dir`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use shale::clock::SystemClock;
use shale::engine::checkpoint::Checkpoint;
use shale::engine::config::EngineConfig;
use shale::engine::map::{ExtentMap, Loc};
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::memory::MemoryStore;
use shale::store::{DynStore, Object, ObjectMeta, ObjectStore, PutMode, StoreResult, Version};

const BLOCK: u64 = 4096;
const SECTOR: u64 = 512;
const PER_CHUNK: u64 = 1024;
const VOLUME: u64 = 1;

/// Counts PUT bytes by kind; drops chunk payloads.
#[derive(Debug)]
struct Counting {
    inner: MemoryStore,
    checkpoint_bytes: AtomicU64,
    checkpoint_puts: AtomicU64,
    manifest_bytes: AtomicU64,
    manifest_puts: AtomicU64,
    chunk_bytes: AtomicU64,
}

impl Counting {
    fn reset(&self) {
        for c in [
            &self.checkpoint_bytes,
            &self.checkpoint_puts,
            &self.manifest_bytes,
            &self.manifest_puts,
            &self.chunk_bytes,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl ObjectStore for Counting {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> StoreResult<Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        let n = data.len() as u64;
        let data = if key.contains("/checkpoints/") {
            self.checkpoint_bytes.fetch_add(n, Ordering::Relaxed);
            self.checkpoint_puts.fetch_add(1, Ordering::Relaxed);
            data
        } else if key.ends_with("/manifest") {
            self.manifest_bytes.fetch_add(n, Ordering::Relaxed);
            self.manifest_puts.fetch_add(1, Ordering::Relaxed);
            data
        } else if key.contains("/chunks/") {
            self.chunk_bytes.fetch_add(n, Ordering::Relaxed);
            Bytes::new()
        } else {
            data
        };
        self.inner.put(key, data, mode).await
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }
}

/// The seeded checkpoint: `extents` random 4K extents; returns it with
/// the volume size.
fn seed_checkpoint(extents: u64) -> (Checkpoint, u64) {
    let blocks = extents * 4;
    let mut rng = 0x5eed_1234_abcd_0001u64;
    let mut map = ExtentMap::new();
    let mut written = 0u64;
    while (map.len() as u64) < extents {
        let lba = (crate::next_rand(&mut rng) % blocks) * (BLOCK / SECTOR);
        let chunk = 1 + written / PER_CHUNK;
        let off = (written % PER_CHUNK) * BLOCK;
        map.insert(lba, BLOCK / SECTOR, Loc::Chunk { chunk, off });
        written += 1;
    }
    let n_chunks = written.div_ceil(PER_CHUNK);
    let chunks = crate::map::fake_chunks(n_chunks, &mut rng);
    let cp = Checkpoint::from_map(VOLUME, 1, n_chunks, written, &map, chunks);
    (cp, blocks * BLOCK)
}

struct Outcome {
    open_s: f64,
    reopen_s: f64,
    write_s: f64,
    data: u64,
    checkpoint_bytes: u64,
    checkpoint_puts: u64,
    manifest_bytes: u64,
    manifest_puts: u64,
}

async fn one(
    root: &Path,
    seed: &(Vec<u8>, u64, u64, u64),
    write_bytes: u64,
    max_deltas: u64,
) -> Result<Outcome> {
    let (cp_bytes, size, chunk_seq, last_seq) = seed;
    let store = Arc::new(Counting {
        inner: MemoryStore::new(),
        checkpoint_bytes: AtomicU64::new(0),
        checkpoint_puts: AtomicU64::new(0),
        manifest_bytes: AtomicU64::new(0),
        manifest_puts: AtomicU64::new(0),
        chunk_bytes: AtomicU64::new(0),
    });
    crate::map::seed_checkpoint(
        store.as_ref(),
        VOLUME,
        Bytes::from(cp_bytes.clone()),
        *chunk_seq,
        *last_seq,
    )
    .await?;
    let cfg = EngineConfig {
        cache_size: 0,
        readahead_max: 0,
        compact_below_percent: 0,
        checkpoint_max_deltas: max_deltas,
        ..EngineConfig::default()
    };
    let dir = root.join(format!("cpcost-{max_deltas}"));
    std::fs::create_dir_all(&dir)?;
    let params = VolumeParams {
        id: VOLUME,
        size: *size,
        epoch: 2,
        local_dir: dir.clone(),
    };
    let dyn_store: DynStore = store.clone();
    let t = Instant::now();
    let v = Volume::open(dyn_store, params, cfg.clone(), Arc::new(SystemClock))
        .await
        .context("open the seeded volume")?;
    let open_s = t.elapsed().as_secs_f64();
    store.reset();
    let v = Arc::new(v);
    let t = Instant::now();
    let per_task = write_bytes / BLOCK / 32;
    let blocks = size / BLOCK;
    let mut tasks = Vec::new();
    for q in 0..32u64 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x1234_5678u64 ^ (q + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut buf = vec![0u8; BLOCK as usize];
            for i in 0..per_task {
                let b = crate::next_rand(&mut rng) % blocks;
                buf[..8].copy_from_slice(&i.to_le_bytes());
                buf[8..16].copy_from_slice(&q.to_le_bytes());
                v.write(b * BLOCK, &buf, false).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    v.close().await.context("close")?;
    let write_s = t.elapsed().as_secs_f64();
    drop(v);
    let (checkpoint_bytes, checkpoint_puts, manifest_bytes, manifest_puts) = (
        store.checkpoint_bytes.load(Ordering::SeqCst),
        store.checkpoint_puts.load(Ordering::SeqCst),
        store.manifest_bytes.load(Ordering::SeqCst),
        store.manifest_puts.load(Ordering::SeqCst),
    );
    // Open again: the chain as written (base and deltas) is read back.
    let params = VolumeParams {
        id: VOLUME,
        size: *size,
        epoch: 3,
        local_dir: dir.clone(),
    };
    let dyn_store: DynStore = store.clone();
    let t = Instant::now();
    let v = Volume::open(dyn_store, params, cfg, Arc::new(SystemClock))
        .await
        .context("reopen")?;
    let reopen_s = t.elapsed().as_secs_f64();
    v.close().await.context("close")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Outcome {
        open_s,
        reopen_s,
        write_s,
        data: per_task * 32 * BLOCK,
        checkpoint_bytes,
        checkpoint_puts,
        manifest_bytes,
        manifest_puts,
    })
}

pub async fn run(root: &Path, extents: u64, write_bytes: u64) -> Result<()> {
    let t = Instant::now();
    let (cp, size) = seed_checkpoint(extents);
    let seed = (cp.encode(), size, cp.chunk_seq, cp.last_seq);
    drop(cp);
    println!(
        "seed: {extents} extents, volume {} GiB, full checkpoint {:.1} MiB (built in {:.1} s)",
        size >> 30,
        seed.0.len() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    println!(
        "{:<22} {:>7} {:>9} {:>10} {:>15} {:>14} {:>12} {:>8}",
        "checkpoints",
        "open s",
        "reopen s",
        "written",
        "checkpoint MiB",
        "manifest",
        "meta MiB/GiB",
        "meta %"
    );
    for (name, max) in [("full (main)", 0u64), ("delta chain (max 64)", 64)] {
        let o = one(root, &seed, write_bytes, max).await?;
        let meta = o.checkpoint_bytes + o.manifest_bytes;
        let gib = o.data as f64 / (1u64 << 30) as f64;
        println!(
            "{:<22} {:>7.2} {:>9.2} {:>6.0} MiB {:>9.2} ({:>3}) {:>5.0} KiB ({:>3}) {:>12.2} {:>7.3}%   ({:.1} s of writes)",
            name,
            o.open_s,
            o.reopen_s,
            o.data as f64 / (1 << 20) as f64,
            o.checkpoint_bytes as f64 / (1 << 20) as f64,
            o.checkpoint_puts,
            o.manifest_bytes as f64 / 1024.0,
            o.manifest_puts,
            meta as f64 / (1 << 20) as f64 / gib,
            meta as f64 * 100.0 / o.data as f64,
            o.write_s,
        );
    }
    Ok(())
}
