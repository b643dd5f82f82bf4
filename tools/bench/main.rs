//! `shale-bench`: the engine against plain file I/O on the same disk.
//!
//! Runs, in process, through a volume on the fs store in a temp dir under
//! `--dir`: 4K random write QD32, 4K random read QD32 (hot: the data is in
//! the WAL or read cache), 1 MiB sequential write and read (QD4), 4K
//! write+flush QD1. Then the same patterns as pwrite/pread/fdatasync on a
//! plain file in the same directory, with one thread per queue slot.
//! Prints a table with both and their ratio.
//!
//! Other modes, each instead of that: `--snapshots N`, `--map-extents N`,
//! `--volume-extents N`, `--checkpoint-cost N [--cp-write BYTES]`,
//! `--open-extents N` (open time of a fragmented volume, [`openbig`]) and
//! `--wal-replay BYTES [--replay-bs 4KiB|1MiB]` (open time of a crashed
//! volume replaying its WAL, [`replay`]); see the README's Benchmarks.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use shale::clock::SystemClock;
mod cpcost;
mod map;
mod openbig;
mod replay;
mod snapshots;
mod volmap;

use shale::engine::config::EngineConfig;
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::fs::FsStore;
use shale::store::DynStore;

#[derive(Parser, Debug)]
#[command(name = "shale-bench", about = "Engine vs plain file I/O benchmark")]
struct Args {
    /// Directory on the disk to measure (a temp dir is made inside).
    #[arg(long, default_value = "/tmp")]
    dir: PathBuf,
    /// Volume / file size, e.g. 1GiB.
    #[arg(long, default_value = "512MiB", value_parser = parse_size)]
    size: u64,
    /// Seconds per pattern.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Instead: compare 4K random writes with this many snapshots vs none.
    #[arg(long, default_value_t = 0)]
    snapshots: u64,
    /// Instead: memory per extent and open time of a map of this many
    /// random 4K extents (issue 11).
    #[arg(long, default_value_t = 0)]
    map_extents: u64,
    /// Instead: memory per extent and lookup time of a volume's maps
    /// (store-side map and what reads see) after this many random 4K
    /// extents, built through the volume state's write and destage path.
    #[arg(long, default_value_t = 0)]
    volume_extents: u64,
    /// Instead: metadata bytes written per GiB of 4K random writes into a
    /// volume already holding this many fragmented extents, full
    /// checkpoints against delta checkpoints, and its open time (issue 11).
    #[arg(long, default_value_t = 0)]
    checkpoint_cost: u64,
    /// Bytes of 4K random writes for `--checkpoint-cost`.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    cp_write: u64,
    /// Instead: open time and memory of a volume whose checkpoint holds
    /// this many fragmented 4K extents, seeded in one sorted pass (fast
    /// enough for 100M; issue 11).
    #[arg(long, default_value_t = 0)]
    open_extents: u64,
    /// Instead: open time of a volume whose WAL holds this many bytes of
    /// flushed writes not yet in the store (the process crashed), with
    /// the WAL cold and warm in the page cache; reads a sample back after
    /// each replay (issue 11).
    #[arg(long, value_parser = parse_size)]
    wal_replay: Option<u64>,
    /// Write size for `--wal-replay`: 4KiB writes go to random distinct
    /// blocks, larger ones are sequential.
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    replay_bs: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    shale::size::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Clone, Copy, Debug)]
enum Pattern {
    RandWrite4k,
    RandRead4k,
    SeqWrite1m,
    SeqRead1m,
    WriteFlush4k,
}

impl Pattern {
    const ALL: [Pattern; 5] = [
        Pattern::RandWrite4k,
        Pattern::RandRead4k,
        Pattern::SeqWrite1m,
        Pattern::SeqRead1m,
        Pattern::WriteFlush4k,
    ];
    fn name(self) -> &'static str {
        match self {
            Pattern::RandWrite4k => "4K randwrite QD32",
            Pattern::RandRead4k => "4K randread QD32 (hot)",
            Pattern::SeqWrite1m => "1M seqwrite QD4",
            Pattern::SeqRead1m => "1M seqread QD4",
            Pattern::WriteFlush4k => "4K write+flush QD1",
        }
    }
    fn block(self) -> u64 {
        match self {
            Pattern::SeqWrite1m | Pattern::SeqRead1m => 1 << 20,
            _ => 4096,
        }
    }
    fn qd(self) -> usize {
        match self {
            Pattern::RandWrite4k | Pattern::RandRead4k => 32,
            Pattern::SeqWrite1m | Pattern::SeqRead1m => 4,
            Pattern::WriteFlush4k => 1,
        }
    }
}

/// Result of one pattern: operations and bytes over the elapsed time.
#[derive(Clone, Copy, Debug, Default)]
struct Measure {
    ops: u64,
    secs: f64,
    block: u64,
}

impl Measure {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn mbps(&self) -> f64 {
        self.ops as f64 * self.block as f64 / self.secs / 1e6
    }
}

/// Small per-worker RNG (xorshift64).
/// Resident set size of this process in bytes (from /proc/self/statm).
pub(crate) fn rss() -> Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("read /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("statm has no rss field")?
        .parse()
        .context("statm rss")?;
    Ok(pages * 4096)
}

fn next_rand(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for c in buf.chunks_mut(8) {
        let v = next_rand(&mut x).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

/// Offset for op `i` of worker `w` within `[0, span)`.
fn offset(p: Pattern, rng: &mut u64, seq: &AtomicU64, span: u64) -> u64 {
    let b = p.block();
    match p {
        Pattern::SeqWrite1m | Pattern::SeqRead1m => {
            (seq.fetch_add(1, Ordering::Relaxed) * b) % (span / b * b)
        }
        _ => next_rand(rng) % (span / b) * b,
    }
}

async fn engine_pattern(v: Arc<Volume>, p: Pattern, span: u64, secs: u64) -> Result<Measure> {
    let seq = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..p.qd() {
        let (v, seq) = (v.clone(), seq.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x1234_5678_9abc_def1u64 ^ (w as u64 * 0x9E37_79B9);
            let mut buf = vec![0u8; p.block() as usize];
            fill(&mut buf, w as u64 + 1);
            let mut ops = 0u64;
            // Requests served from local data complete without yielding:
            // check the clock, and yield now and then so other tasks run.
            while Instant::now() < deadline {
                if ops % 16 == 15 {
                    tokio::task::yield_now().await;
                }
                let off = offset(p, &mut rng, &seq, span);
                match p {
                    Pattern::RandWrite4k | Pattern::SeqWrite1m => {
                        buf[0] = buf[0].wrapping_add(1);
                        v.write(off, &buf, false).await?
                    }
                    Pattern::RandRead4k | Pattern::SeqRead1m => v.read(off, &mut buf).await?,
                    Pattern::WriteFlush4k => {
                        buf[0] = buf[0].wrapping_add(1);
                        v.write(off, &buf, false).await?;
                        v.flush().await?
                    }
                }
                ops += 1;
            }
            Ok::<u64, shale::error::BlockError>(ops)
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await.context("bench task")??;
    }
    Ok(Measure {
        ops,
        secs: start.elapsed().as_secs_f64(),
        block: p.block(),
    })
}

fn file_pattern(f: Arc<File>, p: Pattern, span: u64, secs: u64) -> Result<Measure> {
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut threads = Vec::new();
    for w in 0..p.qd() {
        let (f, stop, seq) = (f.clone(), stop.clone(), seq.clone());
        threads.push(std::thread::spawn(move || -> std::io::Result<u64> {
            let mut rng = 0x1234_5678_9abc_def1u64 ^ (w as u64 * 0x9E37_79B9);
            let mut buf = vec![0u8; p.block() as usize];
            fill(&mut buf, w as u64 + 1);
            let mut ops = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = offset(p, &mut rng, &seq, span);
                match p {
                    Pattern::RandWrite4k | Pattern::SeqWrite1m => {
                        buf[0] = buf[0].wrapping_add(1);
                        f.write_all_at(&buf, off)?
                    }
                    Pattern::RandRead4k | Pattern::SeqRead1m => f.read_exact_at(&mut buf, off)?,
                    Pattern::WriteFlush4k => {
                        buf[0] = buf[0].wrapping_add(1);
                        f.write_all_at(&buf, off)?;
                        f.sync_data()?
                    }
                }
                ops += 1;
            }
            Ok(ops)
        }));
    }
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut ops = 0;
    for t in threads {
        ops += t
            .join()
            .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
    }
    Ok(Measure {
        ops,
        secs: start.elapsed().as_secs_f64(),
        block: p.block(),
    })
}

/// The region hot reads use (kept within the read cache / WAL).
fn hot_span(size: u64) -> u64 {
    size.min(64 << 20)
}

async fn run_engine(root: &Path, size: u64, secs: u64) -> Result<Vec<(Measure, String)>> {
    let store: DynStore = Arc::new(FsStore::new(root.join("objects")));
    let cfg = EngineConfig {
        cache_size: 256 << 20,
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        ..EngineConfig::default()
    };
    let params = VolumeParams {
        id: 1,
        size,
        epoch: 1,
        local_dir: root.join("local"),
    };
    let v = Volume::open(store, params, cfg, Arc::new(SystemClock)).await?;
    let mut out = Vec::new();
    for p in Pattern::ALL {
        let span = match p {
            Pattern::RandRead4k => {
                // Write the hot region, then read it once so it is local.
                let hot = hot_span(size);
                let buf = vec![0x5au8; 1 << 20];
                for off in (0..hot).step_by(1 << 20) {
                    v.write(off, &buf, false).await?;
                }
                v.flush().await?;
                let mut rb = vec![0u8; 1 << 20];
                for off in (0..hot).step_by(1 << 20) {
                    v.read(off, &mut rb).await?;
                }
                hot
            }
            _ => size,
        };
        let m = engine_pattern(v.clone(), p, span, secs).await?;
        let s = v.stats();
        out.push((
            m,
            format!(
                "chunks {} unstored {} MiB cache hit/miss {}/{}",
                s.chunks_written,
                s.unstored_bytes >> 20,
                s.cache_hits,
                s.cache_misses
            ),
        ));
    }
    v.close().await?;
    Ok(out)
}

fn run_file(root: &Path, size: u64, secs: u64) -> Result<Vec<Measure>> {
    let path = root.join("plain.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    let f = Arc::new(f);
    let mut out = Vec::new();
    for p in Pattern::ALL {
        let span = match p {
            Pattern::RandRead4k => {
                let hot = hot_span(size);
                let buf = vec![0x5au8; 1 << 20];
                for off in (0..hot).step_by(1 << 20) {
                    f.write_all_at(&buf, off)?;
                }
                f.sync_data()?;
                hot
            }
            _ => size,
        };
        out.push(file_pattern(f.clone(), p, span, secs)?);
    }
    Ok(out)
}

fn main() -> Result<()> {
    env_logger::init();
    let args = Args::parse();
    if args.volume_extents > 0 {
        return volmap::run(args.volume_extents);
    }
    if args.map_extents > 0 {
        return map::run(args.map_extents);
    }
    if args.open_extents > 0 {
        let root = args.dir.join(format!("shale-bench-{}", std::process::id()));
        std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let res = rt.block_on(openbig::run(&root, args.open_extents));
        drop(rt);
        let _ = std::fs::remove_dir_all(&root);
        return res;
    }
    if let Some(bytes) = args.wal_replay {
        let root = args.dir.join(format!("shale-bench-{}", std::process::id()));
        std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let res = rt.block_on(replay::run(&root, bytes, args.replay_bs));
        drop(rt);
        let _ = std::fs::remove_dir_all(&root);
        return res;
    }
    if args.checkpoint_cost > 0 {
        let root = args.dir.join(format!("shale-bench-{}", std::process::id()));
        std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let res = rt.block_on(cpcost::run(&root, args.checkpoint_cost, args.cp_write));
        let _ = std::fs::remove_dir_all(&root);
        return res;
    }
    if args.size < (64 << 20) || !args.size.is_multiple_of(1 << 20) {
        bail!("--size must be a multiple of 1 MiB and at least 64 MiB");
    }
    let root = args.dir.join(format!("shale-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let res = bench(&args, &root);
    let _ = std::fs::remove_dir_all(&root);
    res
}

fn bench(args: &Args, root: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.snapshots > 0 {
        return rt.block_on(snapshots::run(
            root,
            args.size,
            args.seconds,
            args.snapshots,
        ));
    }
    let engine = rt.block_on(run_engine(root, args.size, args.seconds))?;
    let file = run_file(root, args.size, args.seconds)?;
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>7}",
        "pattern", "shale MB/s", "shale IOPS", "file MB/s", "file IOPS", "ratio"
    );
    for ((p, (e, note)), f) in Pattern::ALL.iter().zip(&engine).zip(&file) {
        println!(
            "{:<24} {:>10.1} {:>10.0} {:>10.1} {:>10.0} {:>7.2}   {}",
            p.name(),
            e.mbps(),
            e.iops(),
            f.mbps(),
            f.iops(),
            e.iops() / f.iops(),
            note
        );
    }
    Ok(())
}
