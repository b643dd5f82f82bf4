//! Randomized model test: random writes (sub-4K too), trims, write_zeroes,
//! flushes, reads and crashes at random points (including mid-destage and
//! mid-checkpoint, by freezing the store after a random number of puts)
//! against a plain in-memory reference disk, for every store backend.
//!
//! After each recovery:
//! - clean close, or crash with the WAL kept: the volume equals the
//!   reference exactly (every acknowledged write is in the WAL);
//! - crash with the WAL deleted: the volume equals the reference state at
//!   some point of the history since the last state known to be in the store
//!   (a crash-consistent prefix), and not before the last `durability: store`
//!   flush.
//!
//! Seeds are fixed (and printed on failure); `SHALE_MODEL_SEED=<n>` runs one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[path = "support/hooked_store.rs"]
mod hooked_store;
#[path = "support/s3.rs"]
mod s3_support;

use async_trait::async_trait;
use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::faulty::{Fault, FaultPoint, FaultRule, FaultyStore};
use shale::store::fs::FsStore;
use shale::store::memory::MemoryStore;
use shale::store::retry::{RetryPolicy, RetryStore};
use shale::store::s3::S3Store;
use shale::store::{DynStore, StoreError, StoreResult};

use hooked_store::{Hooked, StoreHook};

const SIZE: u64 = 1 << 20;
const SECTORS: u64 = SIZE / 512;

/// Small deterministic RNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Fails every call once frozen; freezes itself after a set number of puts.
#[derive(Debug)]
struct CrashStore {
    puts_left: AtomicI64,
    frozen: AtomicBool,
}

impl CrashStore {
    fn arm(&self, puts: i64) {
        self.puts_left.store(puts, Ordering::SeqCst);
    }
    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
    fn thaw(&self) {
        self.puts_left.store(-1, Ordering::SeqCst);
        self.frozen.store(false, Ordering::SeqCst);
    }
}

#[async_trait]
impl StoreHook for CrashStore {
    fn check(&self) -> StoreResult<()> {
        if self.frozen.load(Ordering::SeqCst) {
            return Err(StoreError::Transient("crashed".into()));
        }
        Ok(())
    }

    async fn before_put(&self, _inner: &DynStore, _key: &str) -> StoreResult<()> {
        let left = self.puts_left.load(Ordering::SeqCst);
        if left == 0 {
            self.freeze();
            return Err(StoreError::Transient("crashed".into()));
        }
        if left > 0 {
            self.puts_left.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// What content-changing op was acknowledged.
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
}

fn apply(disk: &mut [u8], op: &Op) {
    match op {
        Op::Write(off, d) => disk[*off as usize..*off as usize + d.len()].copy_from_slice(d),
        Op::Zero(off, len) => disk[*off as usize..(*off + *len) as usize].fill(0),
    }
}

/// The reference: a base state known to be in the store plus the ops since.
struct Model {
    base: Vec<u8>,
    ops: Vec<Op>,
    cur: Vec<u8>,
    /// Ops (count) covered by the last completed store-mode flush.
    store_floor: usize,
}

impl Model {
    fn push(&mut self, op: Op) {
        apply(&mut self.cur, &op);
        self.ops.push(op);
    }
    fn rebase(&mut self, state: Vec<u8>) {
        self.cur = state.clone();
        self.base = state;
        self.ops.clear();
        self.store_floor = 0;
    }
    /// Smallest `k >= store_floor` with `base + ops[..k] == actual`.
    fn find_prefix(&self, actual: &[u8]) -> Option<usize> {
        let mut s = self.base.clone();
        for k in 0..=self.ops.len() {
            if k > 0 {
                apply(&mut s, &self.ops[k - 1]);
            }
            if k >= self.store_floor && s == actual {
                return Some(k);
            }
        }
        None
    }
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Fs,
    S3,
}

struct Run {
    seed: u64,
    backend: Backend,
    rng: Rng,
    crash: Arc<Hooked<CrashStore>>,
    store: DynStore,
    local: PathBuf,
    cfg: EngineConfig,
    epoch: u64,
    _dirs: Vec<tempfile::TempDir>,
}

impl Run {
    fn fail(&self, what: String) -> ! {
        panic!(
            "model test failed (seed {}, backend {:?}; rerun with SHALE_MODEL_SEED={}): {what}",
            self.seed, self.backend, self.seed
        )
    }

    async fn open(&mut self) -> Arc<Volume> {
        self.epoch += 1;
        let p = VolumeParams {
            id: 0x77,
            size: SIZE,
            epoch: self.epoch,
            local_dir: self.local.clone(),
        };
        match Volume::open(
            self.store.clone(),
            p,
            self.cfg.clone(),
            Arc::new(SystemClock),
        )
        .await
        {
            Ok(v) => v,
            Err(e) => self.fail(format!("open failed: {e}")),
        }
    }

    async fn read_all(&self, v: &Volume) -> Vec<u8> {
        let mut b = vec![0u8; SIZE as usize];
        if let Err(e) = v.read(0, &mut b).await {
            self.fail(format!("full read failed: {e}"));
        }
        b
    }

    fn random_range(&mut self) -> (u64, u64) {
        let max = if self.rng.chance(70) { 16 } else { 256 };
        let len = 1 + self.rng.below(max);
        let start = self.rng.below(SECTORS - len + 1);
        (start * 512, len * 512)
    }

    /// One random op against both the volume and the model.
    async fn step(&mut self, v: &Volume, m: &mut Model, i: usize) {
        let r = self.rng.below(100);
        let (off, len) = self.random_range();
        let res = if r < 45 {
            let zero = self.rng.chance(5);
            let fill = self.rng.next();
            let data: Vec<u8> = (0..len)
                .map(|j| {
                    if zero {
                        0
                    } else {
                        (fill.wrapping_add(j * 131) >> 3) as u8
                    }
                })
                .collect();
            let fua = self.rng.chance(5);
            let res = v.write(off, &data, fua).await;
            m.push(Op::Write(off, data));
            res
        } else if r < 52 {
            let res = v.trim(off, len).await;
            m.push(Op::Zero(off, len));
            res
        } else if r < 58 {
            let res = v.write_zeroes(off, len, false).await;
            m.push(Op::Zero(off, len));
            res
        } else if r < 64 {
            let res = v.flush().await;
            if res.is_ok() && self.cfg.durability == Durability::Store {
                m.store_floor = m.ops.len();
            }
            res
        } else if r < 94 {
            let mut b = vec![0u8; len as usize];
            let res = v.read(off, &mut b).await;
            if res.is_ok() && b[..] != m.cur[off as usize..(off + len) as usize] {
                self.fail(format!(
                    "op {i}: read {off}+{len} differs from the reference"
                ));
            }
            res
        } else {
            tokio::time::sleep(Duration::from_millis(self.rng.below(15))).await;
            Ok(())
        };
        if let Err(e) = res {
            self.fail(format!("op {i} ({r}) at {off}+{len} failed: {e}"));
        }
    }

    /// Append garbage to the newest WAL segment, as a torn append would.
    fn tear_wal_tail(&mut self) {
        let dir = self.local.join("wal");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut segs: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        segs.sort();
        if let Some(last) = segs.last() {
            let mut b = std::fs::read(last).unwrap_or_default();
            let n = 1 + self.rng.below(600) as usize;
            // Sometimes a plausible header start, sometimes noise.
            if self.rng.chance(50) {
                b.extend_from_slice(&0x4c57_4853u32.to_le_bytes());
            }
            b.extend((0..n).map(|_| self.rng.next() as u8));
            std::fs::write(last, b).expect("write torn tail");
        }
    }
}

fn wipe(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

async fn run_seed(seed: u64, backend: Backend) {
    let mut rng = Rng::new(seed);
    let mut dirs = Vec::new();
    let backend_store: DynStore = match backend {
        Backend::Memory => Arc::new(MemoryStore::new()),
        Backend::Fs => {
            let d = tempfile::tempdir().unwrap();
            let s = Arc::new(FsStore::new(d.path().join("objects")));
            dirs.push(d);
            s
        }
        Backend::S3 => {
            // moto() prints a SKIP line (or panics when CI=true) if absent.
            let Some(moto) = s3_support::moto() else {
                return;
            };
            let bucket = moto.unique_bucket("engine-model");
            let s3 = S3Store::connect(&moto.settings(&bucket, "pool"))
                .await
                .expect("S3 client");
            Arc::new(s3)
        }
    };
    let faulty = FaultyStore::new(backend_store, seed);
    match rng.below(3) {
        0 => faulty.set(FaultPoint::Put, FaultRule::share(Fault::LostResponse, 0.05)),
        1 => faulty.set(FaultPoint::Put, FaultRule::share(Fault::Transient, 0.1)),
        _ => {}
    }
    let policy = RetryPolicy {
        base: Duration::from_millis(2),
        cap: Duration::from_millis(20),
        max_attempts: 30,
        max_elapsed: Duration::from_secs(20),
    };
    let crash = Hooked::new(
        Arc::new(RetryStore::new(faulty, policy, seed)),
        CrashStore {
            puts_left: AtomicI64::new(-1),
            frozen: AtomicBool::new(false),
        },
    );
    let local_root = tempfile::tempdir().unwrap();
    let local = local_root.path().join("vol");
    dirs.push(local_root);
    let cfg = EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 10 + rng.below(40),
        max_unstored_bytes: 256 << 10,
        max_unstored_seconds: 3600,
        durability: if rng.chance(30) {
            Durability::Store
        } else {
            Durability::Local
        },
        checkpoint_every_chunks: 1 + rng.below(3),
        checkpoint_max_deltas: 64,
        cache_size: if rng.chance(50) { 256 << 10 } else { 0 },
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        compact_below_percent: [0, 25, 60, 90][rng.below(4) as usize],
        readahead_max: 32 << 20,
        prefetch_max_in_flight: 64 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    };
    let mut run = Run {
        seed,
        backend,
        rng,
        crash: crash.clone(),
        store: crash,
        local,
        cfg,
        epoch: 0,
        _dirs: dirs,
    };
    let mut model = Model {
        base: vec![0u8; SIZE as usize],
        ops: Vec::new(),
        cur: vec![0u8; SIZE as usize],
        store_floor: 0,
    };
    let mut v = run.open().await;
    for cycle in 0..10 {
        let nops = 20 + run.rng.below(60) as usize;
        for i in 0..nops {
            run.step(&v, &mut model, i).await;
        }
        let mode = run.rng.below(10);
        if mode < 2 {
            if let Err(e) = v.close().await {
                run.fail(format!("cycle {cycle}: close failed: {e}"));
            }
            drop(v);
            v = run.open().await;
            let got = run.read_all(&v).await;
            if got != model.cur {
                run.fail(format!(
                    "cycle {cycle}: after clean close the volume differs"
                ));
            }
            model.rebase(got);
            continue;
        }
        // Crash, possibly after letting a few more puts through (so the
        // crash lands between a chunk and its checkpoint or manifest).
        if run.rng.chance(70) {
            run.crash.hook.arm(run.rng.below(4) as i64);
            tokio::time::sleep(Duration::from_millis(run.rng.below(30))).await;
        }
        run.crash.hook.freeze();
        v.crash().await;
        drop(v);
        run.crash.hook.thaw();
        if mode < 7 {
            if run.rng.chance(40) {
                run.tear_wal_tail();
            }
            v = run.open().await;
            let got = run.read_all(&v).await;
            if got != model.cur {
                run.fail(format!(
                    "cycle {cycle}: after a crash with the WAL kept the volume differs"
                ));
            }
        } else {
            wipe(&run.local);
            v = run.open().await;
            let got = run.read_all(&v).await;
            match model.find_prefix(&got) {
                Some(_) => model.rebase(got),
                None => run.fail(format!(
                    "cycle {cycle}: store alone is not a prefix of the history ({} ops, floor {})",
                    model.ops.len(),
                    model.store_floor
                )),
            }
        }
    }
    if let Err(e) = v.close().await {
        run.fail(format!("final close failed: {e}"));
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("SHALE_MODEL_SEED") {
        Ok(s) => vec![s.parse().expect("SHALE_MODEL_SEED must be a number")],
        Err(_) => (1..=8).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_memory_store() {
    for seed in seeds() {
        run_seed(seed, Backend::Memory).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_s3_store() {
    // Fewer seeds: every chunk and manifest goes through a real S3 server.
    for seed in seeds().into_iter().take(3) {
        run_seed(seed + 2000, Backend::S3).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_fs_store() {
    for seed in seeds() {
        run_seed(seed + 1000, Backend::Fs).await;
    }
}
