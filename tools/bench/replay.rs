//! `shale-bench --wal-replay BYTES [--replay-bs 4KiB|1MiB]`: the time an
//! open takes to replay a WAL of BYTES of acknowledged, flushed writes
//! (issue 11).
//!
//! A volume on the local-directory store (under `--dir`) is written with
//! BYTES of `--replay-bs` writes at QD32 (4 KiB: random distinct blocks of
//! a volume four times larger; larger blocks: sequential), flushed, then
//! crashed ([`Volume::crash`], what `kill -9` leaves). While it is written
//! the store refuses to take chunks (their PUTs never complete), so the
//! whole BYTES is still only in the WAL at the crash; the unstored-data
//! bounds are raised so writes never wait for the store.
//!
//! Then the volume is opened twice, each time timed up to `Volume::open`'s
//! return (the replay and the recovery around it):
//! 1. cold: the WAL files were dropped from the page cache first
//!    (`fdatasync` then `POSIX_FADV_DONTNEED`, no root needed);
//! 2. warm: right after, with the files in the page cache.
//!
//! The store still stalls chunk PUTs, so nothing destages between the two
//! opens and both replay the same records. After each open a sample of
//! the written blocks (and some never written) is read back and compared
//! with what was written, so a replay that lost data fails the run.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use shale::clock::SystemClock;
use shale::engine::config::EngineConfig;
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::fs::FsStore;
use shale::store::{DynStore, Object, ObjectMeta, ObjectStore, PutMode, StoreResult, Version};

const VOLUME: u64 = 1;
const BLOCK: u64 = 4096;
const QD: u64 = 32;
/// Blocks read back after each open.
const SAMPLE: u64 = 4096;

/// The local-directory store, except that chunk PUTs never complete
/// while `stall` is set (the store is "down" for data).
#[derive(Debug)]
struct Stalling {
    inner: FsStore,
    stall: AtomicBool,
}

#[async_trait]
impl ObjectStore for Stalling {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> StoreResult<Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        if key.contains("/chunks/") && self.stall.load(Ordering::SeqCst) {
            // Dropped (never completes) when the volume crashes.
            std::future::pending::<()>().await;
        }
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

/// Where the writes go.
#[derive(Clone, Copy)]
struct Layout {
    /// Bytes per write.
    bs: u64,
    /// Number of writes.
    ops: u64,
    /// Volume size.
    size: u64,
}

/// Multiplier of the block permutation (odd, so a bijection modulo a
/// power of two).
const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;

impl Layout {
    /// Byte offset of write `i`: 4 KiB writes go to distinct pseudo-random
    /// blocks (`i * SPREAD` modulo the block count, a power of two), larger
    /// ones one after the other.
    fn offset(&self, i: u64) -> u64 {
        if self.bs == BLOCK {
            let blocks = self.size / BLOCK;
            (i.wrapping_mul(SPREAD) & (blocks - 1)) * BLOCK
        } else {
            i * self.bs
        }
    }
}

/// The content of 4 KiB block `b` (by index in the volume).
fn block_data(b: u64, out: &mut [u8]) {
    let mut x = b.wrapping_mul(SPREAD) | 1;
    for c in out.chunks_mut(8) {
        let v = crate::next_rand(&mut x).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

fn params(root: &Path, l: Layout, epoch: u64) -> VolumeParams {
    VolumeParams {
        id: VOLUME,
        size: l.size,
        epoch,
        local_dir: root.join("local"),
    }
}

fn cfg(wal_bytes: u64) -> EngineConfig {
    EngineConfig {
        cache_size: 0,
        readahead_max: 0,
        compact_below_percent: 0,
        max_unstored_bytes: (wal_bytes * 2).max(1 << 30),
        max_unstored_seconds: 86_400,
        destage_interval_ms: 3_600_000,
        ..EngineConfig::default()
    }
}

async fn write_all(v: &Arc<Volume>, l: Layout) -> Result<()> {
    let mut tasks = Vec::new();
    for q in 0..QD {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; l.bs as usize];
            let mut i = q;
            while i < l.ops {
                let off = l.offset(i);
                for (k, b) in buf.chunks_mut(BLOCK as usize).enumerate() {
                    block_data(off / BLOCK + k as u64, b);
                }
                v.write(off, &buf, false).await?;
                i += QD;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("writer task")??;
    }
    v.flush().await?;
    Ok(())
}

/// Read back `SAMPLE` written blocks and a few unwritten ones.
async fn verify(v: &Volume, l: Layout) -> Result<u64> {
    let mut rng = 0xC0FF_EE00_1234_5678u64;
    let mut got = vec![0u8; BLOCK as usize];
    let mut want = vec![0u8; BLOCK as usize];
    let per_op = l.bs / BLOCK;
    let mut checked = 0;
    for _ in 0..SAMPLE {
        let i = crate::next_rand(&mut rng) % l.ops;
        let b = l.offset(i) / BLOCK + crate::next_rand(&mut rng) % per_op;
        v.read(b * BLOCK, &mut got).await?;
        block_data(b, &mut want);
        if got != want {
            bail!("block {b} (write {i}) reads back other data after the replay");
        }
        checked += 1;
    }
    // Blocks no write touched read as zeros.
    let mut zeros = 0;
    for i in l.ops..l.ops + 64 {
        let off = l.offset(i);
        if off + BLOCK > l.size {
            break;
        }
        v.read(off, &mut got).await?;
        ensure!(
            got.iter().all(|&x| x == 0),
            "unwritten block at {off} holds data after the replay"
        );
        zeros += 1;
    }
    Ok(checked + zeros)
}

/// Profile only the opens: with `SHALE_BENCH_PERF_CTL` naming the
/// control FIFO of `perf record --control=fifo:<path> -D -1`, profiling
/// is switched on for each timed open and off after it.
struct PerfCtl(Option<std::fs::File>);

impl PerfCtl {
    fn from_env() -> Result<PerfCtl> {
        match std::env::var_os("SHALE_BENCH_PERF_CTL") {
            Some(p) => Ok(PerfCtl(Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .with_context(|| format!("open {}", Path::new(&p).display()))?,
            ))),
            None => Ok(PerfCtl(None)),
        }
    }
    fn send(&mut self, cmd: &str) -> Result<()> {
        if let Some(f) = &mut self.0 {
            use std::io::Write;
            f.write_all(cmd.as_bytes())?;
            f.flush()?;
        }
        Ok(())
    }
}

/// User plus system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: `getrusage` only writes the struct we pass, which is valid
    // and fully initialized (zeroed) memory.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

/// Bytes and file count of the WAL directory; with `evict`, sync each
/// file and drop it from the page cache.
fn wal_files(dir: &Path, evict: bool) -> Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    for e in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let e = e?;
        let f = std::fs::File::open(e.path())?;
        bytes += f.metadata()?.len();
        files += 1;
        if evict {
            f.sync_data()?;
            // SAFETY: a valid open descriptor; fadvise only drops clean
            // cached pages of the file and reads or writes no memory of ours.
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            ensure!(r == 0, "posix_fadvise: error {r}");
        }
    }
    Ok((bytes, files))
}

pub async fn run(root: &Path, wal_bytes: u64, bs: u64) -> Result<()> {
    ensure!(
        bs >= BLOCK && bs.is_multiple_of(BLOCK) && bs <= 32 << 20,
        "--replay-bs must be a multiple of 4 KiB up to 32 MiB"
    );
    ensure!(wal_bytes >= bs, "--wal-replay must be at least --replay-bs");
    let ops = wal_bytes / bs;
    let size = if bs == BLOCK {
        (ops * BLOCK * 4).next_power_of_two()
    } else {
        ops * bs
    };
    let l = Layout { bs, ops, size };
    let store = Arc::new(Stalling {
        inner: FsStore::new(root.join("objects")),
        stall: AtomicBool::new(true),
    });
    let dyn_store: DynStore = store.clone();
    let wal_dir = root.join("local").join("wal");

    let t = Instant::now();
    let v = Volume::open(
        dyn_store.clone(),
        params(root, l, 1),
        cfg(wal_bytes),
        Arc::new(SystemClock),
    )
    .await
    .context("create the volume")?;
    write_all(&v, l).await?;
    let unstored = v.stats().unstored_bytes;
    v.crash().await;
    drop(v);
    let write_s = t.elapsed().as_secs_f64();
    ensure!(
        unstored >= ops * bs,
        "only {unstored} of {} bytes were still unstored at the crash",
        ops * bs
    );
    let (wal_size, segs) = wal_files(&wal_dir, false)?;
    println!(
        "wrote {ops} x {} KiB ({} MiB) into a {} MiB volume in {write_s:.1} s; crashed with \
         {} MiB unstored; WAL: {segs} files, {} MiB on disk",
        bs >> 10,
        (ops * bs) >> 20,
        size >> 20,
        unstored >> 20,
        wal_size >> 20
    );
    println!(
        "{:<6} {:>9} {:>9} {:>8} {:>7} {:>9} {:>12} {:>10}",
        "cache", "records", "WAL MiB", "open s", "CPU s", "MB/s", "RSS MiB", "verified"
    );
    let mut perf = PerfCtl::from_env()?;
    for (epoch, cold) in [(2u64, true), (3, false)] {
        wal_files(&wal_dir, cold)?;
        let rss0 = crate::rss()?;
        perf.send("enable\n")?;
        let cpu0 = cpu_seconds();
        let t = Instant::now();
        let v = Volume::open(
            dyn_store.clone(),
            params(root, l, epoch),
            cfg(wal_bytes),
            Arc::new(SystemClock),
        )
        .await
        .context("reopen (replay)")?;
        let open_s = t.elapsed().as_secs_f64();
        let cpu_s = cpu_seconds() - cpu0;
        perf.send("disable\n")?;
        let rss1 = crate::rss()?;
        let replayed = v.stats().unstored_bytes;
        ensure!(
            replayed == ops * bs,
            "the replay holds {replayed} unstored bytes, {} were written",
            ops * bs
        );
        let checked = verify(&v, l).await?;
        v.crash().await;
        drop(v);
        println!(
            "{:<6} {:>9} {:>9} {:>8.3} {:>7.3} {:>9.0} {:>5} (+{:>4}) {:>10}",
            if cold { "cold" } else { "warm" },
            ops,
            replayed >> 20,
            open_s,
            cpu_s,
            wal_size as f64 / open_s / 1e6,
            rss1 >> 20,
            rss1.saturating_sub(rss0) >> 20,
            checked
        );
    }
    store.stall.store(false, Ordering::SeqCst);
    Ok(())
}
