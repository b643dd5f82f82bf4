//! Diff, export and import through the library on a local-directory store:
//! random writes, trims and zeroing between two snapshots, then
//! - every sector outside the diff's ranges is equal in both snapshots,
//!   every range differs somewhere, and `zero` ranges read as zeros;
//! - a full export imported as a new volume equals the older snapshot, and
//!   the delta from the older to the newer snapshot applied to it makes it
//!   equal the newer one.
//!
//! `SHALE_TRANSFER_SEED=<n>` runs one seed.

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shale::catalog::snapshot::Snapshots;
use shale::clock::SystemClock;
use shale::config::Config;
use shale::daemon::attach;
use shale::engine::diff::{diff_views, DiffKind};
use shale::engine::view::SnapshotView;
use shale::engine::BlockDevice;
use shale::transfer::export::{export_delta, export_full};
use shale::transfer::sparse::RawSink;
use shale::transfer::volumes::{import_delta, import_raw};
use shale::transfer::NoProgress;

const SIZE: u64 = 2 << 20;
const SECTOR: u64 = 512;

struct Env {
    dir: tempfile::TempDir,
    cfg: Config,
    snaps: Snapshots,
}

impl Env {
    async fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shale.yaml");
        std::fs::write(
            &path,
            "data_dir: data\nengine:\n  cache_size: 0\n  chunk_size: 64KiB\n  \
             checkpoint_every_chunks: 1\n  destage_interval_ms: 10\n",
        )
        .expect("config");
        let cfg = Config::load(Some(&path)).expect("load config");
        let store = shale::store::open(&cfg.store).await.expect("store");
        let snaps = Snapshots::new(
            store,
            cfg.engine.clone(),
            cfg.data_dir.clone(),
            Arc::new(SystemClock),
            "transfer-test",
        );
        Env { dir, cfg, snaps }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn create(&self, name: &str) {
        shale::catalog::Catalog::new(shale::store::open(&self.cfg.store).await.expect("store"))
            .create(name, SIZE, false, 1)
            .await
            .expect("create");
    }

    /// `ops` random writes, trims and zeroings on volume `name`; returns
    /// which sectors they touched.
    async fn random_ops(&self, name: &str, rng: &mut Rng, ops: usize) -> Vec<bool> {
        let mut touched = vec![false; (SIZE / SECTOR) as usize];
        let attached = attach(&self.cfg, name).await.expect("attach");
        let vol = attached.volume.clone();
        let sectors = SIZE / SECTOR;
        for _ in 0..ops {
            let start = rng.below(sectors);
            let len = 1 + rng.below((sectors - start).min(256));
            let (off, bytes) = (start * SECTOR, len * SECTOR);
            touched[start as usize..(start + len) as usize].fill(true);
            match rng.below(8) {
                0 => vol.trim(off, bytes).await.expect("trim"),
                1 => vol.write_zeroes(off, bytes, false).await.expect("zero"),
                _ => {
                    let seed = rng.next() | 1;
                    let data: Vec<u8> = (0..bytes)
                        .map(|i| (seed.wrapping_mul(i + 1) >> 24) as u8 | 1)
                        .collect();
                    vol.write(off, &data, false).await.expect("write");
                }
            }
        }
        drop(vol);
        attached.close().await.expect("close");
        touched
    }

    async fn read_volume(&self, name: &str) -> Vec<u8> {
        let attached = attach(&self.cfg, name).await.expect("attach");
        let data = read_all(attached.volume.as_ref()).await;
        attached.close().await.expect("close");
        data
    }

    async fn view(&self, spec: &str) -> SnapshotView {
        self.snaps.view(spec).await.expect("view")
    }
}

async fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read(0, &mut buf).await.expect("read");
    buf
}

fn seeds() -> Vec<u64> {
    match std::env::var("SHALE_TRANSFER_SEED") {
        Ok(s) => vec![s.parse().expect("seed")],
        Err(_) => (1..=4).collect(),
    }
}

fn sector(buf: &[u8], i: u64) -> &[u8] {
    &buf[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_is_exact_and_deltas_reproduce_the_newer_snapshot() {
    for seed in seeds() {
        eprintln!("seed {seed}");
        let env = Env::new().await;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        env.create("vol").await;
        env.random_ops("vol", &mut rng, 60).await;
        env.snaps.create("vol@a", 1).await.expect("snapshot a");
        let touched = env.random_ops("vol", &mut rng, 25).await;
        env.snaps.create("vol@b", 2).await.expect("snapshot b");
        // Later writes to the volume must not show in either snapshot.
        env.random_ops("vol", &mut rng, 10).await;

        let (a, b) = (env.view("vol@a").await, env.view("vol@b").await);
        let (img_a, img_b) = (read_all(&a).await, read_all(&b).await);
        let diff = diff_views(&a, &b);
        assert!(!diff.ranges.is_empty(), "seed {seed}: writes made no diff");
        let mut in_range = vec![false; (SIZE / SECTOR) as usize];
        let mut end = 0;
        for r in &diff.ranges {
            assert!(r.offset >= end && r.len > 0, "seed {seed}: {r:?} overlaps");
            assert!(r.offset % SECTOR == 0 && r.len % SECTOR == 0);
            end = r.offset + r.len;
            let (s0, s1) = (r.offset / SECTOR, end / SECTOR);
            assert!(
                (s0..s1).any(|i| sector(&img_a, i) != sector(&img_b, i)),
                "seed {seed}: {r:?} holds equal bytes in both snapshots"
            );
            if r.kind == DiffKind::Zero {
                let bytes = &img_b[r.offset as usize..end as usize];
                assert!(bytes.iter().all(|&x| x == 0), "seed {seed}: {r:?}");
            }
            for i in s0..s1 {
                in_range[i as usize] = true;
                assert!(touched[i as usize], "seed {seed}: sector {i} never written");
            }
        }
        for i in 0..SIZE / SECTOR {
            if !in_range[i as usize] {
                assert_eq!(
                    sector(&img_a, i),
                    sector(&img_b, i),
                    "seed {seed}: sector {i} differs outside the diff"
                );
            }
        }

        // Full export of a, imported as a new volume, equals a.
        let raw = env.path("a.img");
        let file = std::fs::File::create(&raw).expect("create image");
        let sink = RawSink::sparse(file, a.size()).expect("sink");
        let stats = export_full(&a, sink, &NoProgress).await.expect("export");
        assert_eq!(std::fs::read(&raw).expect("read image"), img_a);
        assert!(stats.data_bytes <= SIZE);
        import_raw(&env.cfg, &raw, "copy", None, 3, &NoProgress)
            .await
            .expect("import");
        assert_eq!(env.read_volume("copy").await, img_a, "seed {seed}");

        // The delta from a to b applied to the copy makes it b.
        let delta = env.path("a-b.delta");
        let out = std::fs::File::create(&delta).expect("create delta");
        let (_, totals) = export_delta(&a, &b, ("vol@a", "vol@b"), out, &NoProgress)
            .await
            .expect("export delta");
        assert!(totals.data_bytes <= diff.bytes(DiffKind::Data));
        // An apply that stopped half-way is finished by applying again.
        let half = apply_first_records(&env, &delta, "copy", totals.records / 2).await;
        let (check, applied) = import_delta(&env.cfg, &delta, "copy", &NoProgress)
            .await
            .expect("apply delta");
        let header = &check.header;
        assert_eq!(
            (header.base.as_str(), header.target.as_str()),
            ("vol@a", "vol@b")
        );
        assert_eq!(applied, totals);
        assert!(check.applied <= half && (half == 0 || check.applied > 0));
        assert_eq!(env.read_volume("copy").await, img_b, "seed {seed}");
        check_only_diff_was_read(&delta, &diff);
    }
}

/// Write the first `n` records of `delta` to volume `name` by hand (an
/// apply cut short); returns `n`.
async fn apply_first_records(env: &Env, delta: &Path, name: &str, n: u64) -> u64 {
    use shale::transfer::delta::{DeltaReader, RecordKind};
    let file = std::fs::File::open(delta).expect("open delta");
    let mut r = DeltaReader::new(std::io::BufReader::new(file)).expect("header");
    let attached = attach(&env.cfg, name).await.expect("attach");
    let mut buf = Vec::new();
    for _ in 0..n {
        let rec = r.next_record(&mut buf).expect("record").expect("a record");
        match rec.kind {
            RecordKind::Data => attached.volume.write(rec.offset, &buf, false).await,
            RecordKind::Zero => {
                attached
                    .volume
                    .write_zeroes(rec.offset, rec.len, false)
                    .await
            }
        }
        .expect("write");
    }
    attached.close().await.expect("close");
    n
}

/// Stops a copy after `left` progress steps.
struct StopAfter(std::sync::atomic::AtomicU64);

impl shale::transfer::Progress for StopAfter {
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |n| n.checked_sub(1),
        );
    }
    fn finish(&self) {}
    fn cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst) == 0
    }
}

/// An interrupted raw import deletes the volume it created; an
/// interrupted export reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_copies_clean_up() {
    let env = Env::new().await;
    let raw = env.path("data.img");
    std::fs::write(&raw, vec![7u8; 3 << 20]).expect("image");
    let stop = StopAfter(std::sync::atomic::AtomicU64::new(2));
    let err = import_raw(&env.cfg, &raw, "cut", None, 1, &stop)
        .await
        .expect_err("interrupted import");
    assert!(
        matches!(err, shale::transfer::TransferError::Interrupted),
        "{err}"
    );
    let catalog =
        shale::catalog::Catalog::new(shale::store::open(&env.cfg.store).await.expect("store"));
    assert!(catalog.list().await.expect("list").is_empty());

    import_raw(&env.cfg, &raw, "whole", None, 2, &NoProgress)
        .await
        .expect("import");
    env.snaps.create("whole@s", 3).await.expect("snapshot");
    let view = env.view("whole@s").await;
    let out = env.path("cut.img");
    let sink =
        RawSink::sparse(std::fs::File::create(&out).expect("create"), view.size()).expect("sink");
    let stop = StopAfter(std::sync::atomic::AtomicU64::new(1));
    let err = export_full(&view, sink, &stop)
        .await
        .expect_err("interrupted");
    assert!(
        matches!(err, shale::transfer::TransferError::Interrupted),
        "{err}"
    );
}

/// The delta's records stay inside the diff's ranges (so only those were
/// read from the target).
fn check_only_diff_was_read(delta: &Path, diff: &shale::engine::diff::Diff) {
    use shale::transfer::delta::DeltaReader;
    let file = std::fs::File::open(delta).expect("open delta");
    let mut r = DeltaReader::new(std::io::BufReader::new(file)).expect("header");
    let mut buf = Vec::new();
    while let Some(rec) = r.next_record(&mut buf).expect("record") {
        let (off, len) = (rec.offset, rec.len);
        assert!(
            diff.ranges
                .iter()
                .any(|d| d.offset <= off && off + len <= d.offset + d.len),
            "record {off}+{len} outside the diff"
        );
    }
}

/// Clones read through to their parent snapshot, so a diff between the
/// parent snapshot and a snapshot of a clone (of a clone) lists only what
/// the clones wrote, and a delta between them reproduces the clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_and_delta_across_a_clone_lineage() {
    let env = Env::new().await;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    env.create("vol").await;
    env.random_ops("vol", &mut rng, 40).await;
    env.snaps.create("vol@a", 1).await.expect("snapshot a");
    env.snaps
        .clone_volume("vol@a", "child", 2)
        .await
        .expect("clone");
    let mut touched = env.random_ops("child", &mut rng, 15).await;
    env.snaps.create("child@c", 3).await.expect("snapshot c");
    env.snaps
        .clone_volume("child@c", "grandchild", 4)
        .await
        .expect("clone of clone");
    let more = env.random_ops("grandchild", &mut rng, 15).await;
    for (t, m) in touched.iter_mut().zip(more) {
        *t |= m;
    }
    env.snaps
        .create("grandchild@g", 5)
        .await
        .expect("snapshot g");

    let a = env.view("vol@a").await;
    let g = env.view("grandchild@g").await;
    let (img_a, img_g) = (read_all(&a).await, read_all(&g).await);
    // A clone with no writes of its own has no diff to its parent.
    env.snaps
        .clone_volume("vol@a", "idle", 6)
        .await
        .expect("idle clone");
    env.snaps.create("idle@i", 7).await.expect("snapshot i");
    let idle = env.view("idle@i").await;
    assert_eq!(diff_views(&a, &idle).ranges, vec![]);

    let diff = diff_views(&a, &g);
    assert!(!diff.ranges.is_empty());
    let mut covered = vec![false; (SIZE / SECTOR) as usize];
    for r in &diff.ranges {
        for i in r.offset / SECTOR..(r.offset + r.len) / SECTOR {
            covered[i as usize] = true;
            // Only what the clones wrote differs from the shared parent.
            assert!(touched[i as usize], "sector {i} listed but never written");
        }
    }
    for i in 0..SIZE / SECTOR {
        if !covered[i as usize] {
            assert_eq!(sector(&img_a, i), sector(&img_g, i), "sector {i}");
        }
    }

    let raw = env.path("a.img");
    let sink = RawSink::sparse(std::fs::File::create(&raw).expect("create"), SIZE).expect("sink");
    export_full(&a, sink, &NoProgress).await.expect("export");
    import_raw(&env.cfg, &raw, "restored", None, 8, &NoProgress)
        .await
        .expect("import");
    let delta = env.path("a-g.delta");
    let out = std::fs::File::create(&delta).expect("create delta");
    export_delta(&a, &g, ("vol@a", "grandchild@g"), out, &NoProgress)
        .await
        .expect("export delta");
    import_delta(&env.cfg, &delta, "restored", &NoProgress)
        .await
        .expect("apply delta");
    assert_eq!(env.read_volume("restored").await, img_g);
}

/// An image whose length is not a multiple of the sector or alignment size
/// gives a volume rounded up to 4 KiB whose tail reads as zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_sized_image_is_padded_with_zeros() {
    let env = Env::new().await;
    let raw = env.path("odd.img");
    std::fs::write(&raw, vec![0xabu8; 5000]).expect("image");
    let (rec, stats) = import_raw(&env.cfg, &raw, "odd", None, 1, &NoProgress)
        .await
        .expect("import");
    assert_eq!(rec.size, 8192);
    assert_eq!(stats.written_bytes, 5120, "the data padded to a sector");
    let mut want = vec![0xabu8; 5000];
    want.resize(8192, 0);
    assert_eq!(env.read_volume("odd").await, want);
}
