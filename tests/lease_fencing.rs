//! One writer per volume (issue 6): leases fence the engine.
//!
//! A "server" here is what `daemon::attach` builds: a lease, a volume opened
//! at the lease's epoch with its own local directory (its own machine), and
//! `daemon::spawn_fencing_renewer`. Time for lease expiry is a ManualClock;
//! nothing sleeps for a lease to lapse.
//!
//! The outage-longer-than-the-bound case (writes acknowledged up to the
//! bound, then backpressure, then completion with nothing lost) is covered
//! by tests/engine_volume.rs (`backpressure_waits_during_outage_then_completes`,
//! `age_bound_makes_writes_wait_for_the_store`) and not repeated here.

#[path = "support/s3.rs"]
mod s3_support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use shale::catalog::lease::{Lease, LeaseError, Renewer};
use shale::clock::{DynClock, ManualClock};
use shale::daemon::spawn_fencing_renewer;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::error::BlockError;
use shale::store::faulty::{Fault, FaultRule, FaultyStore};
use shale::store::fs::FsStore;
use shale::store::memory::MemoryStore;
use shale::store::retry::{RetryPolicy, RetryStore};
use shale::store::s3::S3Store;
use shale::store::{DynStore, ObjectStore};

const VOL: u64 = 0x51;
const SIZE: u64 = 2 << 20;
const TTL: Duration = Duration::from_secs(30);
/// Real-time renew period: short, so the renewer looks at the manual clock often.
const RENEW: Duration = Duration::from_millis(5);

fn cfg(durability: Durability) -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 10,
        max_unstored_bytes: 256 << 10,
        max_unstored_seconds: 3600,
        durability,
        checkpoint_every_chunks: 2,
        checkpoint_max_deltas: 64,
        cache_size: 0,
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        compact_below_percent: 25,
        readahead_max: 32 << 20,
        prefetch_max_in_flight: 64 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 13 + seed * 101) % 251) as u8 + 1)
        .collect()
}

/// The shared store plus a clock and scratch space for local directories.
struct Fixture {
    store: DynStore,
    clock: Arc<ManualClock>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(store: DynStore) -> Fixture {
        Fixture {
            store,
            clock: Arc::new(ManualClock::new(Duration::from_secs(1_800_000_000))),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn clock(&self) -> DynClock {
        self.clock.clone()
    }

    async fn all_keys(&self) -> BTreeSet<String> {
        self.store
            .list("volumes/")
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.key)
            .collect()
    }
}

async fn make_memory() -> Option<Fixture> {
    Some(Fixture::new(Arc::new(MemoryStore::new())))
}

async fn make_fs() -> Option<Fixture> {
    let root = tempfile::tempdir().expect("tempdir").keep();
    Some(Fixture::new(Arc::new(FsStore::new(root.join("store")))))
}

async fn make_s3() -> Option<Fixture> {
    let moto = s3_support::moto()?;
    let bucket = moto.unique_bucket("fencing");
    let store = S3Store::connect(&moto.settings(&bucket, ""))
        .await
        .expect("S3 client");
    Some(Fixture::new(Arc::new(store)))
}

/// What `daemon::attach` holds for one served volume.
struct Server {
    lease: Arc<Lease>,
    volume: Arc<Volume>,
    renewer: Renewer,
}

async fn serve(
    f: &Fixture,
    store: DynStore,
    name: &str,
    durability: Durability,
    steal: bool,
) -> Result<Server, LeaseError> {
    let lease = if steal {
        Lease::steal(store.clone(), VOL, name, TTL, f.clock()).await?
    } else {
        Lease::acquire(store.clone(), VOL, name, TTL, f.clock()).await?
    };
    let lease = Arc::new(lease);
    let params = VolumeParams {
        id: VOL,
        size: SIZE,
        epoch: lease.epoch(),
        local_dir: f.dir.path().join(name),
    };
    let volume = Volume::open(store, params, cfg(durability), f.clock())
        .await
        .expect("open volume");
    let renewer = spawn_fencing_renewer(&lease, &volume, RENEW);
    Ok(Server {
        lease,
        volume,
        renewer,
    })
}

impl Server {
    async fn close(self) {
        self.volume.close().await.expect("close");
        self.renewer.stop().await;
        self.lease.release().await.expect("release");
    }
}

async fn read_all(v: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    v.read(0, &mut b).await.expect("read");
    b
}

/// Wait (bounded, for liveness only) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..4000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never happened: {what}");
}

fn assert_fenced(r: Result<(), BlockError>, what: &str) {
    match r {
        Err(BlockError::Fenced(_)) => {}
        other => panic!("{what}: expected Fenced, got {other:?}"),
    }
}

/// Every write-side request of a fenced volume fails with Fenced.
async fn assert_all_fenced(v: &Volume) {
    assert_fenced(v.write(0, &[7u8; 4096], false).await, "write");
    assert_fenced(v.write(4096, &[7u8; 512], true).await, "fua write");
    assert_fenced(v.trim(0, 4096).await, "trim");
    assert_fenced(v.write_zeroes(0, 4096, false).await, "write_zeroes");
    assert_fenced(v.flush().await, "flush");
}

/// A second server on a held volume is refused, naming the holder; the
/// holder keeps serving; after it releases, the second one gets in.
async fn second_server_is_refused(f: Fixture) {
    let a = serve(&f, f.store.clone(), "server-a", Durability::Local, false)
        .await
        .expect("first server");
    let err = match serve(&f, f.store.clone(), "server-b", Durability::Local, false).await {
        Ok(_) => panic!("second server attached a held volume"),
        Err(e) => e,
    };
    assert!(
        matches!(&err, LeaseError::Held { holder, epoch: 1, .. } if holder == "server-a"),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"server-a\""), "{err}");
    // Still refused just before the ttl ends without renewal.
    f.clock.advance(TTL - Duration::from_secs(1));
    eventually("a renewal", || {
        a.lease.expires_at_ms() > 1_800_000_000_000 + 30_000
    })
    .await;
    f.clock.advance(Duration::from_secs(2));
    assert!(matches!(
        serve(&f, f.store.clone(), "server-b", Durability::Local, false).await,
        Err(LeaseError::Held { .. })
    ));
    let data = pattern(1, 8192);
    a.volume
        .write(0, &data, false)
        .await
        .expect("holder writes");
    assert!(a.volume.fenced().is_none());
    a.close().await;
    let b = serve(&f, f.store.clone(), "server-b", Durability::Local, false)
        .await
        .expect("after release");
    assert_eq!(b.lease.epoch(), 2);
    assert_eq!(read_all(&b.volume).await[..8192], data[..]);
    b.close().await;
}

/// Server A loses the store, its lease expires by the clock and it fences
/// itself; B takes over. Nothing A does afterwards reaches the store, and
/// the volume is A's flushed history followed by B's writes.
async fn takeover_after_expiry_fences_the_old_writer(f: Fixture) {
    let a_store = Arc::new(FaultyStore::new(f.store.clone(), 7));
    let a_dyn: DynStore = a_store.clone();
    let a = serve(&f, a_dyn, "server-a", Durability::Store, false)
        .await
        .expect("server a");
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..24u64 {
        let off = (i * 53 % 3000) * 512;
        let data = pattern(i, 512 * (1 + (i as usize % 16)));
        a.volume.write(off, &data, false).await.expect("a writes");
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    a.volume.flush().await.expect("a flushes to the store");

    // A loses the store; its unflushed writes are still acknowledged.
    a_store.set_outage(true);
    a.volume
        .write(0, &pattern(99, 65536), false)
        .await
        .expect("acknowledged from the WAL during the outage");
    f.clock.advance(TTL);
    eventually("a fences itself at expiry", || a.volume.fenced().is_some()).await;
    assert!(a.renewer.is_finished());
    assert_all_fenced(&a.volume).await;
    assert!(matches!(a.lease.check(), Err(LeaseError::Expired { .. })));

    let b = serve(&f, f.store.clone(), "server-b", Durability::Local, false)
        .await
        .expect("takeover after expiry");
    assert_eq!(b.lease.epoch(), 2);
    assert_eq!(
        read_all(&b.volume).await,
        model,
        "b sees a's flushed history"
    );

    // The store comes back for A: it stores nothing more.
    let before = f.all_keys().await;
    a_store.set_outage(false);
    let closed = a.volume.close().await;
    assert!(
        matches!(closed, Err(shale::engine::EngineError::Fenced(_))),
        "{closed:?}"
    );
    assert_all_fenced(&a.volume).await;
    assert_eq!(
        f.all_keys().await,
        before,
        "a fenced server wrote to the store"
    );
    a.renewer.stop().await;
    assert!(
        matches!(
            a.lease.release().await,
            Err(LeaseError::Fenced { epoch: 2, .. })
        ),
        "the old holder cannot release the new holder's lease"
    );

    for i in 0..10u64 {
        let off = (i * 211 % 3000) * 512;
        let data = pattern(1000 + i, 4096);
        b.volume.write(off, &data, false).await.expect("b writes");
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    b.volume.trim(65536, 8192).await.expect("b trims");
    model[65536..65536 + 8192].fill(0);
    b.close().await;

    // A third server elsewhere sees exactly A's flushed prefix then B's writes.
    let c = serve(&f, f.store.clone(), "server-c", Durability::Local, false)
        .await
        .expect("server c");
    assert_eq!(c.lease.epoch(), 3);
    assert_eq!(read_all(&c.volume).await, model);
    c.close().await;
}

/// An explicit steal bumps the epoch and fences the live holder at its
/// next renewal; the holder's later writes fail and never become visible.
async fn steal_fences_the_live_holder(f: Fixture) {
    let a = serve(&f, f.store.clone(), "server-a", Durability::Store, false)
        .await
        .expect("server a");
    let data = pattern(5, 32768);
    a.volume
        .write(4096, &data, true)
        .await
        .expect("a fua write");
    let mut model = vec![0u8; SIZE as usize];
    model[4096..4096 + data.len()].copy_from_slice(&data);

    let b = serve(&f, f.store.clone(), "operator", Durability::Local, true)
        .await
        .expect("steal");
    assert_eq!(b.lease.epoch(), 2);
    eventually("a notices the steal", || a.volume.fenced().is_some()).await;
    let why = a.volume.fenced().unwrap_or_default();
    assert!(
        why.contains("operator"),
        "fence reason names the new holder: {why}"
    );
    assert_all_fenced(&a.volume).await;
    assert!(a.volume.close().await.is_err());

    assert_eq!(read_all(&b.volume).await, model);
    b.volume
        .write(0, &[3u8; 4096], false)
        .await
        .expect("b writes");
    model[..4096].fill(3);
    b.close().await;
    let c = serve(&f, f.store.clone(), "server-c", Durability::Local, false)
        .await
        .expect("server c");
    assert_eq!(read_all(&c.volume).await, model);
    c.close().await;
}

/// 10% transient errors on every store operation (under the retry
/// decorator): the client sees no error and the content survives close,
/// losing the WAL and reopening from the store.
async fn transient_errors_never_reach_the_client(f: Fixture) {
    let faulty = FaultyStore::new(f.store.clone(), 42);
    faulty.set_all(FaultRule::share(Fault::Transient, 0.1));
    let policy = RetryPolicy {
        base: Duration::from_millis(1),
        cap: Duration::from_millis(20),
        ..RetryPolicy::forever()
    };
    let retrying: DynStore = Arc::new(RetryStore::new(faulty, policy, 9));
    let a = serve(&f, retrying.clone(), "server-a", Durability::Local, false)
        .await
        .expect("attach despite faults");
    let mut model = vec![0u8; SIZE as usize];
    for i in 0..120u64 {
        let off = (i * 97 % 3500) * 512;
        let len = 512 * (1 + (i as usize * 7 % 64));
        let len = len.min(SIZE as usize - off as usize);
        let data = pattern(i, len);
        a.volume
            .write(off, &data, i % 10 == 0)
            .await
            .expect("write");
        model[off as usize..off as usize + len].copy_from_slice(&data);
        if i % 25 == 0 {
            a.volume.flush().await.expect("flush");
        }
    }
    // Reads of destaged data go through the faulty store too.
    assert_eq!(read_all(&a.volume).await, model);
    assert!(a.volume.fenced().is_none());
    a.close().await;

    let b = serve(&f, retrying, "server-b", Durability::Local, false)
        .await
        .expect("reopen elsewhere");
    assert_eq!(read_all(&b.volume).await, model);
    b.close().await;
}

macro_rules! backend_tests {
    ($module:ident, $make:ident; $($test:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some(f) = super::$make().await else { return };
                    super::$test(f).await;
                }
            )*
        }
    };
}

backend_tests!(memory, make_memory;
    second_server_is_refused,
    takeover_after_expiry_fences_the_old_writer,
    steal_fences_the_live_holder,
    transient_errors_never_reach_the_client);
backend_tests!(fs, make_fs;
    second_server_is_refused,
    takeover_after_expiry_fences_the_old_writer,
    steal_fences_the_live_holder,
    transient_errors_never_reach_the_client);
backend_tests!(s3, make_s3;
    second_server_is_refused,
    takeover_after_expiry_fences_the_old_writer,
    steal_fences_the_live_holder);

fn shale_cli(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_shale"))
        .env_remove("SHALE_CONFIG")
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run shale")
}

/// Through the real binary: attaching (export) a volume another live process
/// holds fails naming the holder; `volume unlock` refuses without --force;
/// `--force` steals at a new epoch, the holder is fenced, attach works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_refuses_a_held_volume_and_unlock_force_steals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("shale.yaml");
    std::fs::write(&config, "data_dir: data\nengine:\n  cache_size: 16MiB\n").expect("config");
    let out = shale_cli(&config, &["volume", "create", "v", "--size", "1MiB"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let store: DynStore = Arc::new(FsStore::new(dir.path().join("data/store")));
    let id = shale::catalog::Catalog::new(store.clone())
        .get("v")
        .await
        .expect("record")
        .id;
    let clock: DynClock = Arc::new(shale::clock::SystemClock);
    let other = Lease::acquire(store.clone(), id, "other-host:77", TTL, clock)
        .await
        .expect("another process holds it");

    let image = dir.path().join("v.img");
    let image = image.to_str().expect("utf-8 path");
    let out = shale_cli(&config, &["volume", "export", "v", image]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "export of a held volume succeeded");
    assert!(stderr.contains("other-host:77"), "{stderr}");

    let out = shale_cli(&config, &["volume", "unlock", "v"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("other-host:77") && stderr.contains("--force"),
        "{stderr}"
    );
    other.check().expect("a refused unlock changes nothing");

    let out = shale_cli(&config, &["volume", "unlock", "v", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(matches!(
        other.renew().await,
        Err(LeaseError::Fenced { epoch: 2, .. })
    ));
    let out = shale_cli(&config, &["volume", "export", "v", image]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = shale_cli(&config, &["volume", "unlock", "v"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("not locked"));
}

/// Reads of data held only in the store retry transient errors for
/// `store_read_timeout_ms`, then fail with EIO; a read whose outage ends
/// within that time returns the right data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_reads_retry_then_fail_with_eio() {
    use shale::store::faulty::FaultPoint;
    let f = Fixture::new(Arc::new(MemoryStore::new()));
    let faulty = Arc::new(FaultyStore::new(f.store.clone(), 3));
    let store: DynStore = faulty.clone();
    let a = serve(&f, store.clone(), "server-a", Durability::Local, false)
        .await
        .expect("server a");
    let data = pattern(8, 65536);
    a.volume.write(0, &data, false).await.expect("write");
    a.close().await;

    let open_b = |timeout_ms: u64, name: &'static str| {
        let store = store.clone();
        let f = &f;
        async move {
            let params = VolumeParams {
                id: VOL,
                size: SIZE,
                epoch: 100 + timeout_ms,
                local_dir: f.dir.path().join(name),
            };
            let cfg = EngineConfig {
                store_read_timeout_ms: timeout_ms,
                ..cfg(Durability::Local)
            };
            Volume::open(store, params, cfg, f.clock())
                .await
                .expect("open")
        }
    };
    // Fails with EIO once the budget is spent.
    let b = open_b(200, "server-b").await;
    faulty.set(
        FaultPoint::GetRange,
        FaultRule::share(Fault::Transient, 1.0),
    );
    let mut buf = vec![0u8; 65536];
    let err = b
        .read(0, &mut buf)
        .await
        .expect_err("read during an outage");
    assert!(matches!(err, BlockError::Io(_)), "{err:?}");
    assert_eq!(err.errno(), libc::EIO, "{err:?}");
    assert!(faulty.injected(FaultPoint::GetRange) >= 2, "it retried");
    b.close().await.expect("close b");

    // Succeeds when the outage ends within the budget.
    let c = Arc::new(open_b(3_600_000, "server-c").await);
    let before = faulty.injected(FaultPoint::GetRange);
    let reader = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            c.read(0, &mut buf).await.map(|()| buf)
        })
    };
    eventually("the read retries", || {
        faulty.injected(FaultPoint::GetRange) >= before + 3
    })
    .await;
    faulty.clear(FaultPoint::GetRange);
    let got = reader.await.expect("task").expect("read after the outage");
    assert_eq!(got, data);
    c.close().await.expect("close c");
}
