use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::clock::SystemClock;
use crate::engine::config::EngineConfig;
use crate::engine::map::LocSet;
use crate::engine::snapshot::{delete_snapshot, take_snapshot, SnapshotObject};
use crate::engine::{BlockDevice, Volume, VolumeParams};
use crate::error::BlockError;
use crate::store::memory::MemoryStore;
use crate::store::DynStore;

const SIZE: u64 = 1 << 20;
const ID: u64 = 7;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn loc_set_matches_a_per_byte_model() {
    let mut rng = Rng(0x1234_5678);
    let mut set = LocSet::new();
    let mut model: HashSet<(u64, u64)> = HashSet::new();
    for _ in 0..400 {
        let chunk = rng.below(3);
        let off = rng.below(200);
        let len = rng.below(30);
        set.insert(chunk, off, len);
        for b in off..off + len {
            model.insert((chunk, b));
        }
        assert_eq!(set.bytes(), model.len() as u64);
        let (qc, qo, ql) = (rng.below(3), rng.below(220), rng.below(50));
        let want = (qo..qo + ql).filter(|b| model.contains(&(qc, *b))).count() as u64;
        assert_eq!(set.overlap(qc, qo, ql), want, "overlap {qc} {qo} {ql}");
    }
}

/// Every location (per sector) a map references.
fn locations(m: &ExtentMap) -> HashSet<(u8, u64, u64)> {
    let mut out = HashSet::new();
    for (s, l, loc) in m.iter() {
        let _ = s;
        for i in 0..l {
            match loc.advance(i) {
                Loc::Zero => {}
                Loc::Wal(w) => {
                    out.insert((0, w.seq, w.skip));
                }
                Loc::Chunk { chunk, off } => {
                    out.insert((1, chunk, off));
                }
            }
        }
    }
    out
}

fn checkpoint_locations(cp: &Checkpoint) -> HashSet<(u8, u64, u64)> {
    let mut out = HashSet::new();
    for &(_, l, c, off) in &cp.extents {
        for i in 0..l {
            out.insert((1, c, off + i * SECTOR));
        }
    }
    out
}

#[test]
fn map_counters_match_brute_force() {
    let mut rng = Rng(0xfeed_beef);
    let mut refs = LocSet::new();
    for _ in 0..20 {
        refs.insert(
            rng.below(4),
            rng.below(100) * SECTOR,
            rng.below(20) * SECTOR,
        );
    }
    let refs = Arc::new(refs);
    let mut m = ExtentMap::new();
    m.track(Some(refs.clone()));
    for step in 0..2000u64 {
        let start = rng.below(200);
        let len = 1 + rng.below(30);
        match rng.below(4) {
            0 => {
                m.remove(start, len);
            }
            1 => {
                m.insert(start, len, Loc::Zero);
            }
            _ => {
                let loc = Loc::Chunk {
                    chunk: rng.below(4),
                    off: rng.below(100) * SECTOR,
                };
                m.insert(start, len, loc);
            }
        }
        let data: u64 = m
            .iter()
            .filter(|(_, _, loc)| *loc != Loc::Zero)
            .map(|(_, l, _)| l * SECTOR)
            .sum();
        assert_eq!(m.data_bytes(), data, "step {step}");
        let mut fresh = m.clone();
        fresh.track(Some(refs.clone()));
        assert_eq!(m.shared_bytes(), fresh.shared_bytes(), "step {step}");
    }
}

fn engine_cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 10,
        max_unstored_bytes: 1 << 20,
        checkpoint_every_chunks: 1,
        checkpoint_max_deltas: 64,
        cache_size: 0,
        ..EngineConfig::default()
    }
}

async fn open(store: &DynStore, dir: &Path, epoch: u64) -> Arc<Volume> {
    open_id(store, dir, ID, epoch).await
}

async fn open_id(store: &DynStore, dir: &Path, id: u64, epoch: u64) -> Arc<Volume> {
    let params = VolumeParams {
        id,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    };
    Volume::open(store.clone(), params, engine_cfg(), Arc::new(SystemClock))
        .await
        .expect("open")
}

/// `used` and per-snapshot unique bytes counted location by location.
fn brute_force(vol: &Volume, snaps: &[SnapshotObject]) -> (u64, Vec<u64>) {
    let live = locations(&vol.inner.shared.lock().view_map());
    let sets: Vec<_> = snaps
        .iter()
        .map(|s| checkpoint_locations(&s.checkpoint))
        .collect();
    let mut all = live.clone();
    for s in &sets {
        all.extend(s.iter().copied());
    }
    let unique = (0..sets.len())
        .map(|i| {
            sets[i]
                .iter()
                .filter(|l| {
                    !live.contains(l)
                        && !sets
                            .iter()
                            .enumerate()
                            .any(|(j, o)| j != i && o.contains(l))
                })
                .count() as u64
                * SECTOR
        })
        .collect();
    (all.len() as u64 * SECTOR, unique)
}

fn check(vol: &Volume, snaps: &[SnapshotObject], what: &str) {
    let (used, unique) = brute_force(vol, snaps);
    let got = vol.space_usage();
    assert_eq!(got.used, used, "{what}: used");
    assert_eq!(got.used, got.live + got.snapshot_only, "{what}");
    let cps: Vec<&Checkpoint> = snaps.iter().map(|s| &s.checkpoint).collect();
    let from_maps = usage_of(&vol.inner.shared.lock().view_map(), &cps);
    assert_eq!(from_maps.used, used, "{what}: usage_of");
    assert_eq!(from_maps.live, got.live, "{what}: usage_of live");
    assert_eq!(from_maps.snapshot_unique, unique, "{what}: unique");
}

fn block(seed: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| ((i * 13 + seed * 7) % 251) as u8 + 1)
        .collect()
}

/// Random writes, overwrites, trims and zeroes with snapshots taken and
/// deleted between reopenings: `used` always equals the brute-force count,
/// across close/reopen too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounting_is_exact_through_snapshots_and_reopen() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0xabcd_ef01);
    let mut epoch = 1;
    let mut snaps: Vec<SnapshotObject> = Vec::new();
    let blocks = SIZE / 4096;
    for round in 0..6u64 {
        let vol = open(&store, dir.path(), epoch).await;
        check(&vol, &snaps, &format!("round {round} after open"));
        for step in 0..60u64 {
            let b = rng.below(blocks);
            let n = 1 + rng.below(4).min(blocks - b - 1);
            let (off, len) = (b * 4096, n * 4096);
            match rng.below(6) {
                0 => vol.trim(off, len).await.unwrap(),
                1 => vol.write_zeroes(off, len, false).await.unwrap(),
                2 => vol
                    .write(off, &vec![0u8; len as usize], false)
                    .await
                    .unwrap(),
                _ => {
                    let data: Vec<u8> = (0..n).flat_map(|i| block(step * 10 + i)).collect();
                    vol.write(off, &data, false).await.unwrap();
                }
            }
            check(&vol, &snaps, &format!("round {round} step {step}"));
        }
        let vol = if round % 2 == 1 {
            // Crash and recover: the WAL replay rebuilds the same counts.
            vol.crash().await;
            drop(vol);
            epoch += 1;
            let vol = open(&store, dir.path(), epoch).await;
            check(&vol, &snaps, &format!("round {round} after crash"));
            vol
        } else {
            vol
        };
        vol.close().await.unwrap();
        epoch += 1;
        if round % 3 == 2 && !snaps.is_empty() {
            let victim = snaps.remove(rng.below(snaps.len() as u64) as usize);
            delete_snapshot(&store, ID, epoch, &victim).await.unwrap();
        } else {
            let s = take_snapshot(&store, ID, &format!("s{round}"), round)
                .await
                .unwrap();
            snaps.push(s);
        }
    }
    let vol = open(&store, dir.path(), epoch).await;
    check(&vol, &snaps, "final");
    assert!(vol.space_usage().snapshot_only > 0, "snapshots pin data");
    vol.close().await.unwrap();
}

async fn read_all(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    v.read(0, &mut b).await.unwrap();
    b
}

/// The ENOSPC case: with the pool nearly full a write fails with NoSpace,
/// every earlier byte stays readable and unchanged, overwrites in place and
/// trims still work, and a trim gives back the space for the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_beyond_the_limit_fails_with_no_space_and_keeps_data() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let vol = open(&store, dir.path(), 1).await;
    vol.set_space_limit(Some(16 * 4096));
    let mut model = vec![0u8; SIZE as usize];
    for b in 0..16u64 {
        let data = block(b);
        vol.write(b * 4096, &data, false).await.unwrap();
        model[(b * 4096) as usize..][..4096].copy_from_slice(&data);
    }
    assert_eq!(vol.space_usage().used, 16 * 4096);
    let err = vol.write(100 * 4096, &block(99), false).await.unwrap_err();
    assert_eq!(err, BlockError::NoSpace);
    assert_eq!(err.errno(), libc::ENOSPC);
    // A write straddling old and new blocks needs one new block: refused whole.
    let two: Vec<u8> = [block(1), block(2)].concat();
    assert_eq!(
        vol.write(15 * 4096, &two, false).await.unwrap_err(),
        BlockError::NoSpace
    );
    assert_eq!(read_all(&vol).await, model, "nothing changed");
    // Overwriting in place and all-zero writes need no space.
    vol.write(3 * 4096, &block(33), false).await.unwrap();
    model[3 * 4096..][..4096].copy_from_slice(&block(33));
    vol.write(200 * 4096, &[0u8; 4096], false).await.unwrap();
    vol.write_zeroes(201 * 4096, 4096, false).await.unwrap();
    // A trim gives space back.
    vol.trim(5 * 4096, 4096).await.unwrap();
    model[5 * 4096..][..4096].fill(0);
    assert_eq!(vol.space_usage().used, 15 * 4096);
    vol.write(100 * 4096, &block(99), false).await.unwrap();
    model[100 * 4096..][..4096].copy_from_slice(&block(99));
    assert_eq!(read_all(&vol).await, model);
    vol.close().await.unwrap();
    let vol = open(&store, dir.path(), 2).await;
    assert_eq!(read_all(&vol).await, model, "after reopen");
    assert_eq!(vol.space_usage().used, 16 * 4096);
    vol.close().await.unwrap();
}

/// Data a snapshot shares is pinned: overwriting it needs new space, a trim
/// frees nothing, and a thick reserve admits writes the limit would refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_pin_overwritten_data_and_reserve_admits() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let vol = open(&store, dir.path(), 1).await;
    for b in 0..8u64 {
        vol.write(b * 4096, &block(b), false).await.unwrap();
    }
    vol.close().await.unwrap();
    take_snapshot(&store, ID, "s", 0).await.unwrap();
    let vol = open(&store, dir.path(), 2).await;
    let u = vol.space_usage();
    assert_eq!((u.used, u.live, u.snapshot_only), (8 * 4096, 8 * 4096, 0));
    vol.set_space_limit(Some(8 * 4096));
    assert_eq!(
        vol.write(0, &block(50), false).await.unwrap_err(),
        BlockError::NoSpace,
        "the old block stays in the snapshot"
    );
    vol.trim(0, 4096).await.unwrap();
    let u = vol.space_usage();
    assert_eq!(
        (u.used, u.live, u.snapshot_only),
        (8 * 4096, 7 * 4096, 4096)
    );
    vol.set_space_reserve(9 * 4096);
    vol.write(0, &block(50), false).await.unwrap();
    assert_eq!(vol.space_usage().used, 9 * 4096);
    assert_eq!(
        vol.write(4096, &block(51), false).await.unwrap_err(),
        BlockError::NoSpace
    );
    vol.close().await.unwrap();
    let snaps = crate::engine::snapshot::list_snapshots(&store, ID)
        .await
        .unwrap();
    let vol = open(&store, dir.path(), 3).await;
    check(&vol, &snaps, "reopened");
    assert_eq!(vol.space_usage().used, 9 * 4096);
    vol.close().await.unwrap();
    delete_snapshot(&store, ID, 3, &snaps[0]).await.unwrap();
    let vol = open(&store, dir.path(), 4).await;
    assert_eq!(
        vol.space_usage().used,
        8 * 4096,
        "delete frees the pinned block"
    );
    vol.close().await.unwrap();
}

/// A clone counts only its own data: ranges it reads through its parent
/// take nothing, and trims over them (kept as zero ranges) take nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_counts_only_its_own_data() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let parent = open(&store, dir.path(), 1).await;
    for b in 0..16u64 {
        parent.write(b * 4096, &block(b), false).await.unwrap();
    }
    parent.close().await.unwrap();
    let snap = take_snapshot(&store, ID, "base", 0).await.unwrap();
    let clone_id = ID + 1;
    crate::engine::clone::write_clone(&store, &snap, clone_id)
        .await
        .unwrap();
    let clone_dir = tempfile::tempdir().unwrap();
    let clone = open_id(&store, clone_dir.path(), clone_id, 1).await;
    assert_eq!(clone.space_usage().used, 0, "reads through, owns nothing");
    clone.write(0, &block(70), false).await.unwrap();
    clone.write(40 * 4096, &block(71), false).await.unwrap();
    clone.trim(4 * 4096, 4 * 4096).await.unwrap();
    clone.write_zeroes(41 * 4096, 4096, false).await.unwrap();
    check(&clone, &[], "clone");
    assert_eq!(clone.space_usage().used, 2 * 4096);
    clone.set_space_limit(Some(2 * 4096));
    clone.trim(40 * 4096, 4096).await.unwrap();
    clone.write(50 * 4096, &block(72), false).await.unwrap();
    assert_eq!(
        clone.write(51 * 4096, &block(73), false).await.unwrap_err(),
        BlockError::NoSpace
    );
    clone.close().await.unwrap();
    let clone = open_id(&store, clone_dir.path(), clone_id, 2).await;
    check(&clone, &[], "clone reopened");
    assert_eq!(clone.space_usage().used, 2 * 4096);
    clone.close().await.unwrap();
}
