//! Acknowledgements never outlive the lease (issue 10, item 5).
//!
//! A "server" is what `daemon::attach` builds: a lease, a volume opened at
//! its epoch and `daemon::spawn_fencing_renewer`, which installs the lease's
//! acknowledgement gate and renews on its own thread. Lease time is a
//! ManualClock (wall and monotonic readings); nothing sleeps for a lease to
//! lapse. Another host is a second lease on the same store.

use std::sync::Arc;
use std::time::Duration;

use shale::catalog::lease::{read_lease, Lease, LeaseError, Renewer};
use shale::clock::{DynClock, ManualClock};
use shale::daemon::spawn_fencing_renewer;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::format::layout::lease_key;
use shale::engine::volume::Admission;
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::error::BlockError;
use shale::store::faulty::{Fault, FaultPoint, FaultRule, FaultyStore};
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const VOL: u64 = 0x77;
const SIZE: u64 = 1 << 20;
const TTL: Duration = Duration::from_secs(30);
/// The default margin of a lease: a tenth of the ttl.
const MARGIN: Duration = Duration::from_secs(3);
/// Real-time renew period: short, so the renewer looks at the clock often.
const RENEW: Duration = Duration::from_millis(5);

fn engine_cfg() -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms: 10,
        max_unstored_bytes: 256 << 10,
        max_unstored_seconds: 3600,
        durability: Durability::Local,
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

struct Fixture {
    /// The store as every host sees it.
    store: DynStore,
    /// Server A's path to it, where its renewals can be held up.
    a_store: Arc<FaultyStore<DynStore>>,
    clock: Arc<ManualClock>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let store: DynStore = Arc::new(MemoryStore::new());
        Fixture {
            a_store: Arc::new(FaultyStore::new(store.clone(), 5)),
            store,
            clock: Arc::new(ManualClock::new(Duration::from_secs(1_800_000_000))),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn clock(&self) -> DynClock {
        self.clock.clone()
    }

    /// Server A, on its faulty path to the store.
    async fn serve_a(&self) -> Server {
        let store: DynStore = self.a_store.clone();
        let lease = Arc::new(
            Lease::acquire(store.clone(), VOL, "server-a", TTL, self.clock())
                .await
                .expect("lease"),
        );
        let params = VolumeParams {
            id: VOL,
            size: SIZE,
            epoch: lease.epoch(),
            local_dir: self.dir.path().join("a"),
        };
        let volume = Volume::open(store, params, engine_cfg(), self.clock())
            .await
            .expect("open");
        let renewer = spawn_fencing_renewer(&lease, &volume, RENEW);
        Server {
            lease,
            volume,
            renewer,
        }
    }

    /// Hold up every renewal of A in the store for an hour, and wait until
    /// one is stuck there.
    async fn stall_a_renewals(&self) {
        self.a_store.set_scoped(
            FaultPoint::Put,
            FaultRule::share(Fault::Delay(Duration::from_secs(3600)), 1.0),
            &lease_key(VOL),
        );
        let before = self.a_store.injected(FaultPoint::Put);
        eventually("a renewal is stuck in the store", || {
            self.a_store.injected(FaultPoint::Put) > before
        })
        .await;
    }
}

struct Server {
    lease: Arc<Lease>,
    volume: Arc<Volume>,
    renewer: Renewer,
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
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

/// A's renewal is stuck (a stalled store connection, or a starved renewer)
/// while its lease runs out; another host takes the volume over. A must
/// not acknowledge a write or a flush from then on: the new holder will
/// never see them. (On main, both were acknowledged: nothing on the
/// acknowledgement path looked at the lease, and the renewer, stuck in its
/// request, never fenced the volume.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_renewal_stops_acknowledgements_before_a_takeover() {
    let f = Fixture::new();
    let a = f.serve_a().await;
    a.volume
        .write(0, &pattern(1, 8192), false)
        .await
        .expect("write while the lease is fresh");
    a.volume
        .flush()
        .await
        .expect("flush while the lease is fresh");

    f.stall_a_renewals().await;
    f.clock.advance(TTL + Duration::from_secs(1));
    let b = Lease::acquire(f.store.clone(), VOL, "server-b", TTL, f.clock())
        .await
        .expect("another host takes the expired lease");
    assert_eq!(b.epoch(), 2);

    let write = a.volume.write(8192, &pattern(2, 4096), false).await;
    assert!(
        matches!(write, Err(BlockError::Fenced(_))),
        "a write acknowledged after the takeover: {write:?}"
    );
    let flush = a.volume.flush().await;
    assert!(
        matches!(flush, Err(BlockError::Fenced(_))),
        "a flush acknowledged after the takeover: {flush:?}"
    );
    let fua = a.volume.write(0, &pattern(3, 4096), true).await;
    assert!(matches!(fua, Err(BlockError::Fenced(_))), "{fua:?}");
    assert!(matches!(a.lease.check(), Err(LeaseError::Expired { .. })));
    a.renewer.stop().await;
}

/// Past the acknowledgement deadline (ttl − margin after the last renewal
/// was sent) while renewals fail, acknowledgements wait; once a renewal
/// succeeds they go through, at the same epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_wait_past_the_deadline_until_a_renewal_succeeds() {
    let f = Fixture::new();
    let a = f.serve_a().await;
    let gate = a.lease.ack_gate();
    assert!(matches!(gate.admit(), Admission::Now));

    f.a_store.set_outage(true);
    f.clock.advance(TTL - MARGIN + Duration::from_millis(500));
    assert!(
        matches!(gate.admit(), Admission::Wait(_)),
        "past the deadline without a renewal, acknowledgements must wait"
    );
    let waiting = {
        let volume = a.volume.clone();
        tokio::spawn(async move {
            volume.write(0, &pattern(4, 4096), false).await?;
            volume.flush().await
        })
    };
    eventually("the renewer retries against the outage", || {
        f.a_store.injected(FaultPoint::Put) >= 3
    })
    .await;
    f.a_store.set_outage(false);
    waiting
        .await
        .expect("task")
        .expect("acknowledged once a renewal succeeded");
    assert!(matches!(gate.admit(), Admission::Now));
    assert_eq!(a.lease.epoch(), 1);
    assert!(a.volume.fenced().is_none());
    a.volume.close().await.expect("close");
    a.renewer.stop().await;
    a.lease.release().await.expect("release");
}

/// Past the lease's own expiry without a renewal, acknowledgements fail
/// (they never succeed late), and the volume is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_fail_once_the_lease_expires_unrenewed() {
    let f = Fixture::new();
    let a = f.serve_a().await;
    f.a_store.set_outage(true);
    f.clock.advance(TTL);
    let flush = a.volume.flush().await;
    assert!(matches!(flush, Err(BlockError::Fenced(_))), "{flush:?}");
    eventually("the renewer gives up", || a.renewer.is_finished()).await;
    assert!(a.volume.fenced().is_some());
    f.a_store.set_outage(false);
    let write = a.volume.write(0, &pattern(5, 512), true).await;
    assert!(matches!(write, Err(BlockError::Fenced(_))), "{write:?}");
}

/// The holder judges its deadline by the monotonic clock: a step of the
/// wall clock (NTP, an operator) neither fences a healthy holder nor lets
/// it acknowledge past its deadline. (On main a forward step of more than
/// the ttl fenced the volume: its expiry was judged by the wall clock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_steps_do_not_move_the_deadline() {
    let f = Fixture::new();
    let a = f.serve_a().await;
    f.clock.jump_wall(Duration::from_secs(3600), true);
    // Let the renewer run a few rounds on the stepped clock.
    let before = f.a_store.injected(FaultPoint::Put);
    f.a_store.set_scoped(
        FaultPoint::Put,
        FaultRule::share(Fault::Delay(Duration::ZERO), 1.0),
        &lease_key(VOL),
    );
    eventually("renewals after the step", || {
        f.a_store.injected(FaultPoint::Put) >= before + 3
    })
    .await;
    a.volume
        .write(0, &pattern(6, 4096), true)
        .await
        .expect("a forward wall step does not fence");
    assert!(a.volume.fenced().is_none());
    let (stored, _) = read_lease(&f.store, VOL)
        .await
        .expect("read")
        .expect("lease");
    assert!(
        stored.expires_at_ms >= 1_800_003_600_000,
        "renewals write the stepped wall clock: {stored:?}"
    );

    // A backward step does not extend the deadline either: with renewals
    // stuck, the monotonic deadline still passes.
    f.clock.jump_wall(Duration::from_secs(7200), false);
    f.stall_a_renewals().await;
    f.clock.advance(TTL);
    let flush = a.volume.flush().await;
    assert!(matches!(flush, Err(BlockError::Fenced(_))), "{flush:?}");
    a.renewer.stop().await;
}

/// Blocking work on the server's runtime (here: its only thread, busy
/// without yielding) does not hold renewals back: they run on their own
/// thread. (On main the renewer was a task of that runtime and renewed
/// nothing until the blocking work ended.)
#[test]
fn blocking_work_on_the_servers_runtime_does_not_starve_renewals() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let f = Fixture::new();
        let lease = Arc::new(
            Lease::acquire(f.store.clone(), VOL, "server-a", TTL, f.clock())
                .await
                .expect("lease"),
        );
        let renewer = lease.spawn_renewer(RENEW);
        f.clock.advance(Duration::from_secs(10));
        let before = lease.expires_at_ms();
        // Blocking work: this thread never yields to the runtime meanwhile.
        let began = std::time::Instant::now();
        while lease.expires_at_ms() == before && began.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            lease.expires_at_ms() > before,
            "no renewal while the server's runtime was blocked"
        );
        renewer.stop().await;
    });
}
