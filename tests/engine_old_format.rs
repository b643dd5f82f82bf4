//! Stores written by older versions still open: `tests/fixtures/store-cp1`
//! is a local-directory store made with the JSON checkpoint format
//! (`SHALECP1`) and JSON snapshot objects (`SHALESN1`): a volume `p` with
//! data, trims and a zeroed range, a snapshot `p@s`, later writes to `p`,
//! and a clone `c` of `p@s` with its own writes and trims (so its
//! checkpoint holds zero ranges).
//!
//! The test copies the fixture to a temporary directory, checks every byte
//! of `p`, `p@s` and `c`, writes new data (the next checkpoint is in the
//! current format), closes, reopens, and checks every byte again.
//!
//! The fixture was made once by running this test with
//! `SHALE_WRITE_OLD_FORMAT_FIXTURE=1` at the commit that added it (before
//! the binary checkpoint format existed); the contents are deterministic
//! ([`build`] describes them and the expected images follow from it).
//! Running the generator with newer code writes the newer formats, which
//! the test then refuses (it checks the fixture's magics).

#[path = "support/attach.rs"]
mod attach;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shale::catalog::lease::Lease;
use shale::catalog::snapshot::Snapshots;
use shale::catalog::Catalog;
use shale::clock::{DynClock, SystemClock};
use shale::engine::config::EngineConfig;
use shale::engine::{BlockDevice, Volume};
use shale::store::fs::FsStore;
use shale::store::DynStore;

const SIZE: u64 = 1 << 20;
const K: usize = 4096;

fn engine_cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 10,
        max_unstored_bytes: 1 << 20,
        checkpoint_every_chunks: 2,
        checkpoint_max_deltas: 64,
        cache_size: 1 << 20,
        ..EngineConfig::default()
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-cp1")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(37).wrapping_add((i / 512) as u8) | 1)
        .collect()
}

struct Env {
    store: DynStore,
    snaps: Snapshots,
    catalog: Catalog,
    data_dir: PathBuf,
    clock: DynClock,
}

struct Open {
    vol: Arc<Volume>,
    lease: Lease,
}

impl Env {
    fn new(store_dir: &Path, data_dir: &Path) -> Env {
        let store: DynStore = Arc::new(FsStore::new(store_dir));
        let clock: DynClock = Arc::new(SystemClock);
        Env {
            snaps: Snapshots::new(
                store.clone(),
                engine_cfg(),
                data_dir.to_path_buf(),
                clock.clone(),
                "old-format-test",
            ),
            catalog: Catalog::new(store.clone()),
            store,
            data_dir: data_dir.to_path_buf(),
            clock,
        }
    }

    async fn open(&self, name: &str) -> Open {
        let rec = self.catalog.get(name).await.unwrap();
        let (lease, params) =
            attach::lease_for(&self.store, &self.clock, &self.data_dir, &rec, "old-format").await;
        let vol = Volume::open(self.store.clone(), params, engine_cfg(), self.clock.clone())
            .await
            .unwrap_or_else(|e| panic!("open {name}: {e}"));
        Open { vol, lease }
    }

    async fn close(&self, o: Open) {
        o.vol.close().await.unwrap();
        o.lease.release().await.unwrap();
    }

    async fn write(&self, name: &str, f: impl FnOnce(&mut Writes)) {
        let o = self.open(name).await;
        let mut w = Writes(Vec::new());
        f(&mut w);
        for op in w.0 {
            match op {
                Op::Write(off, data) => o.vol.write(off as u64, &data, false).await.unwrap(),
                Op::Trim(off, len) => o.vol.trim(off as u64, len as u64).await.unwrap(),
                Op::Zero(off, len) => o
                    .vol
                    .write_zeroes(off as u64, len as u64, false)
                    .await
                    .unwrap(),
            }
        }
        self.close(o).await;
    }

    async fn read(&self, name: &str) -> Vec<u8> {
        let o = self.open(name).await;
        let mut buf = vec![0u8; SIZE as usize];
        o.vol.read(0, &mut buf).await.unwrap();
        self.close(o).await;
        buf
    }

    async fn read_snapshot(&self, spec: &str) -> Vec<u8> {
        let view = self.snaps.view(spec).await.unwrap();
        let mut buf = vec![0u8; SIZE as usize];
        view.read(0, &mut buf).await.unwrap();
        buf
    }

    /// The magic of every object under `volumes/` whose key contains `part`.
    async fn magics(&self, part: &str) -> Vec<String> {
        let mut out = Vec::new();
        for meta in self.store.list("volumes/").await.unwrap() {
            if meta.key.contains(part) {
                let o = self.store.get(&meta.key).await.unwrap();
                out.push(String::from_utf8_lossy(&o.data[..8.min(o.data.len())]).to_string());
            }
        }
        out
    }
}

enum Op {
    Write(usize, Vec<u8>),
    Trim(usize, usize),
    Zero(usize, usize),
}

/// Operations on a volume, applied to the engine and to a model image.
struct Writes(Vec<Op>);

impl Writes {
    fn write(&mut self, model: &mut [u8], off: usize, data: Vec<u8>) {
        model[off..off + data.len()].copy_from_slice(&data);
        self.0.push(Op::Write(off, data));
    }
    fn trim(&mut self, model: &mut [u8], off: usize, len: usize) {
        model[off..off + len].fill(0);
        self.0.push(Op::Trim(off, len));
    }
    fn zero(&mut self, model: &mut [u8], off: usize, len: usize) {
        model[off..off + len].fill(0);
        self.0.push(Op::Zero(off, len));
    }
}

/// Expected images of the fixture: `(p, p@s, c)`.
struct Images {
    p: Vec<u8>,
    snap: Vec<u8>,
    c: Vec<u8>,
}

/// The first writes to `p` (before `p@s`): scattered 4K..24K writes over
/// the first half, a trim and a zeroed range; about 150 KiB of data.
fn p_first(model: &mut [u8], w: &mut Writes) {
    for i in 0..24usize {
        let off = (i * 37 % 120) * K;
        let len = K * (1 + i % 3);
        w.write(model, off, pattern(i as u8, len));
    }
    w.trim(model, 10 * K, 2 * K);
    w.zero(model, 30 * K, 3 * K);
}

/// `p` after `p@s`: overwrite a few blocks, trim one.
fn p_second(model: &mut [u8], w: &mut Writes) {
    w.write(model, 4 * K, pattern(100, 2 * K));
    w.write(model, 200 * K, pattern(101, 3 * K));
    w.trim(model, 37 * K, K);
}

/// The clone `c` of `p@s`: writes, a trim and a zeroed range over data it
/// reads from its parent (so its map keeps zero ranges).
fn c_writes(model: &mut [u8], w: &mut Writes) {
    w.write(model, 0, pattern(150, K));
    w.write(model, 150 * K, pattern(151, 2 * K));
    w.trim(model, 74 * K, 2 * K);
    w.zero(model, 111 * K, K);
}

/// Applies the fixture's history to the models (and to the engine if
/// `env` is given); returns the expected images.
async fn build(env: Option<&Env>) -> Images {
    let mut p = vec![0u8; SIZE as usize];
    let mut w = Writes(Vec::new());
    p_first(&mut p, &mut w);
    if let Some(env) = env {
        env.catalog.create("p", SIZE, false, 0).await.unwrap();
        env.write("p", |x| x.0 = w.0).await;
        env.snaps.create("p@s", 0).await.unwrap();
    }
    let snap = p.clone();
    let mut w = Writes(Vec::new());
    p_second(&mut p, &mut w);
    if let Some(env) = env {
        env.write("p", |x| x.0 = w.0).await;
        env.snaps.clone_volume("p@s", "c", 0).await.unwrap();
    }
    let mut c = snap.clone();
    let mut w = Writes(Vec::new());
    c_writes(&mut c, &mut w);
    if let Some(env) = env {
        env.write("c", |x| x.0 = w.0).await;
    }
    Images { p, snap, c }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

async fn check(env: &Env, want: &Images, when: &str) {
    assert!(env.read("p").await == want.p, "p differs {when}");
    assert!(
        env.read_snapshot("p@s").await == want.snap,
        "p@s differs {when}"
    );
    assert!(env.read("c").await == want.c, "c differs {when}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_format_store_opens_migrates_and_reopens() {
    if std::env::var_os("SHALE_WRITE_OLD_FORMAT_FIXTURE").is_some() {
        let out = fixture_dir();
        let _ = std::fs::remove_dir_all(&out);
        let data = tempfile::tempdir().unwrap();
        let env = Env::new(&out, data.path());
        build(Some(&env)).await;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    copy_dir(&fixture_dir(), &store_dir);
    let env = Env::new(&store_dir, &tmp.path().join("data"));
    let mut want = build(None).await;

    // The fixture is what it claims to be: old checkpoints and snapshots.
    let cps = env.magics("/checkpoints/").await;
    assert_eq!(cps, vec!["SHALECP1".to_string(); 2], "fixture checkpoints");
    let sns = env.magics("/snapshots/").await;
    assert_eq!(sns, vec!["SHALESN1".to_string()], "fixture snapshots");

    check(&env, &want, "as found").await;

    // New writes: the next checkpoints are written in the current format.
    let mut w = Writes(Vec::new());
    w.write(&mut want.p, 230 * K, pattern(200, 5 * K));
    w.trim(&mut want.p, 0, K);
    env.write("p", |x| x.0 = w.0).await;
    let mut w = Writes(Vec::new());
    w.write(&mut want.c, 20 * K, pattern(201, K));
    w.zero(&mut want.c, 60 * K, 2 * K);
    env.write("c", |x| x.0 = w.0).await;
    check(&env, &want, "after writing").await;
    let cps = env.magics("/checkpoints/").await;
    assert_eq!(cps, vec!["SHALECP2".to_string(); 2], "migrated checkpoints");
    // A fresh environment (new data directory: no local WAL) sees the same.
    let env2 = Env::new(&store_dir, &tmp.path().join("data2"));
    check(&env2, &want, "from the store alone").await;

    // A snapshot taken now (current format) of the migrated clone reads back.
    env2.snaps.create("c@t", 0).await.unwrap();
    assert!(env2.read_snapshot("c@t").await == want.c, "c@t differs");
}
