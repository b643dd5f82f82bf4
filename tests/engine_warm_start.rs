//! Warm start: what one attach reads in its first seconds is read back in
//! the background at the next attach, so reads of it are served from the
//! local cache even when that cache started empty (another host) and the
//! store has become unreachable for data.

use std::sync::Arc;
use std::time::Duration;

use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::format::layout::warm_start_key;
use shale::engine::warm_start::WarmStartConfig;
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::faulty::{Fault, FaultPoint, FaultRule, FaultyStore};
use shale::store::memory::MemoryStore;
use shale::store::{DynStore, PutMode};

const ID: u64 = 0x3a;
const MIB: u64 = 1 << 20;

fn cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 256 << 10,
        destage_interval_ms: 20,
        max_unstored_bytes: 8 << 20,
        max_unstored_seconds: 3600,
        durability: Durability::Store,
        checkpoint_every_chunks: 4,
        checkpoint_max_deltas: 64,
        cache_size: 16 << 20,
        cache_dir: None,
        store_read_timeout_ms: 1_000,
        compact_below_percent: 0,
        ..EngineConfig::default()
    }
}

fn warm() -> WarmStartConfig {
    WarmStartConfig {
        seconds: 3600,
        max_bytes: 64 * MIB,
        rate: 256 * MIB,
    }
}

struct Env {
    faulty: Arc<FaultyStore<MemoryStore>>,
    store: DynStore,
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 1));
        Env {
            store: faulty.clone(),
            faulty,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    async fn open(&self, epoch: u64) -> Arc<Volume> {
        let p = VolumeParams {
            id: ID,
            size: 16 * MIB,
            epoch,
            local_dir: self.dir.path().to_path_buf(),
        };
        Volume::open(self.store.clone(), p, cfg(), Arc::new(SystemClock))
            .await
            .expect("open volume")
    }

    /// Another host: the local directory (WAL and read cache) is gone.
    fn lose_local_dir(&self) {
        for entry in std::fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
}

fn pattern(off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|i| (i / 4096 * 31 + i % 251) as u8 | 1)
        .collect()
}

async fn read(v: &Volume, off: u64, len: u64) -> Result<Vec<u8>, shale::error::BlockError> {
    let mut buf = vec![0u8; len as usize];
    v.read(off, &mut buf).await.map(|_| buf)
}

/// Wait until playback ended (it reads at most 64 MiB at 256 MiB/s here;
/// the bound only keeps a broken playback from hanging the test).
async fn wait_for_playback(v: &Volume) -> shale::engine::warm_start::Progress {
    for _ in 0..600 {
        let p = v.warm_start_progress().expect("warm start running");
        if p.finished {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("warm start playback never finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_recorded_at_one_attach_are_cached_at_the_next() {
    let env = Env::new();
    let v = env.open(1).await;
    v.write(0, &pattern(0, 16 * MIB), false).await.unwrap();
    v.close().await.unwrap();
    drop(v);

    // Attach 2 reads two ranges while recording.
    let hot = [(MIB, MIB), (9 * MIB, 512 << 10)];
    let v = env.open(2).await;
    v.start_warm_start(&warm());
    assert_eq!(wait_for_playback(&v).await.total, 0, "nothing recorded yet");
    for (off, len) in hot {
        assert!(read(&v, off, len).await.unwrap() == pattern(off, len));
    }
    v.close().await.unwrap();
    drop(v);
    assert!(
        env.store.get(&warm_start_key(ID)).await.is_ok(),
        "recording stored"
    );

    // Attach 3 on "another host": empty local directory.
    env.lose_local_dir();
    let v = env.open(3).await;
    v.start_warm_start(&warm());
    let p = wait_for_playback(&v).await;
    assert_eq!(p.total, MIB + (512 << 10), "{p:?}");
    assert_eq!(p.done, p.total, "{p:?}");
    let before = v.stats();
    env.faulty.set(
        FaultPoint::GetRange,
        FaultRule::share(Fault::Permanent, 1.0),
    );
    for (off, len) in hot {
        let got = read(&v, off, len).await.expect("served from the cache");
        assert!(got == pattern(off, len), "warm data differs at {off}");
    }
    // Every byte came from the cache (readahead may still try the store
    // beyond the ranges; those attempts fail and serve nobody).
    let after = v.stats();
    assert_eq!(after.cache_misses, before.cache_misses, "{after:?}");
    assert_eq!(
        after.cache_hit_bytes - before.cache_hit_bytes,
        MIB + (512 << 10),
        "{after:?}"
    );
    // A range that was not recorded needs the store, which is cut off.
    assert!(
        read(&v, 5 * MIB, 4096).await.is_err(),
        "store really cut off"
    );
    v.crash().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_recording_is_ignored_and_the_volume_works() {
    let env = Env::new();
    let v = env.open(1).await;
    v.write(0, &pattern(0, MIB), false).await.unwrap();
    v.close().await.unwrap();
    drop(v);
    for junk in [&b"SHALEWS1-garbage-garbage"[..], &b"x"[..]] {
        env.store
            .put(
                &warm_start_key(ID),
                bytes::Bytes::copy_from_slice(junk),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
        let v = env.open(2).await;
        v.start_warm_start(&warm());
        let p = wait_for_playback(&v).await;
        assert_eq!((p.total, p.done), (0, 0), "{p:?}");
        assert!(read(&v, 0, MIB).await.unwrap() == pattern(0, MIB));
        v.crash().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_warm_start_records_nothing() {
    let env = Env::new();
    let v = env.open(1).await;
    v.start_warm_start(&WarmStartConfig {
        seconds: 0,
        ..warm()
    });
    assert!(v.warm_start_progress().is_none());
    v.write(0, &pattern(0, MIB), false).await.unwrap();
    assert!(read(&v, 0, MIB).await.unwrap() == pattern(0, MIB));
    v.close().await.unwrap();
    assert!(env.store.get(&warm_start_key(ID)).await.is_err());
}
