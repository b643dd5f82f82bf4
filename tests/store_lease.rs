//! Leases (src/catalog/lease.rs) on every backend, with an injected clock.

#[path = "support/s3.rs"]
mod s3_support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shale::catalog::lease::{read_lease, Lease, LeaseError};
use shale::clock::{DynClock, ManualClock};
use shale::engine::format::layout::lease_key;
use shale::store::fs::FsStore;
use shale::store::memory::MemoryStore;
use shale::store::s3::S3Store;
use shale::store::{DynStore, ObjectStore, PutMode};
use tokio::sync::Barrier;

const TTL: Duration = Duration::from_secs(30);
const VOL: u64 = 0x2a;

struct Fixture {
    store: DynStore,
    clock: Arc<ManualClock>,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    fn clock(&self) -> DynClock {
        self.clock.clone()
    }

    async fn acquire(&self, holder: &str) -> Result<Lease, LeaseError> {
        Lease::acquire(self.store.clone(), VOL, holder, TTL, self.clock()).await
    }
}

fn fixture(store: DynStore, dir: Option<tempfile::TempDir>) -> Fixture {
    Fixture {
        store,
        clock: Arc::new(ManualClock::new(Duration::from_secs(1_700_000_000))),
        _dir: dir,
    }
}

async fn make_memory() -> Option<Fixture> {
    Some(fixture(Arc::new(MemoryStore::new()), None))
}

async fn make_fs() -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(FsStore::new(dir.path().join("store")));
    Some(fixture(store, Some(dir)))
}

async fn make_s3() -> Option<Fixture> {
    let moto = s3_support::moto()?;
    let bucket = moto.unique_bucket("lease");
    let store = S3Store::connect(&moto.settings(&bucket, ""))
        .await
        .expect("S3 client");
    Some(fixture(Arc::new(store), None))
}

async fn second_acquirer_is_refused_naming_the_holder(f: Fixture) {
    let first = f.acquire("server-a").await.expect("first acquire");
    assert_eq!(first.epoch(), 1);
    let err = f.acquire("server-b").await.expect_err("lease is live");
    let msg = err.to_string();
    assert!(matches!(err, LeaseError::Held { .. }), "{err:?}");
    assert!(msg.contains("server-a"), "{msg}");
    assert!(msg.contains(&first.expires_at_ms().to_string()), "{msg}");
    // Still refused just before expiry; the holder is untouched.
    f.clock.advance(TTL - Duration::from_millis(1));
    assert!(matches!(
        f.acquire("server-b").await,
        Err(LeaseError::Held { .. })
    ));
    first.check().expect("still valid");
    first.renew().await.expect("holder can renew");
}

async fn takeover_after_expiry_fences_the_old_holder(f: Fixture) {
    let old = f.acquire("server-a").await.expect("acquire");
    f.clock.advance(TTL);
    assert!(
        matches!(old.check(), Err(LeaseError::Expired { .. })),
        "past its expiry the old holder must stop by itself"
    );
    let new = f.acquire("server-b").await.expect("takeover after expiry");
    assert_eq!(new.epoch(), old.epoch() + 1);
    let err = old.renew().await.expect_err("old holder is fenced");
    assert!(
        matches!(err, LeaseError::Fenced { epoch: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("server-b"), "{err}");
    assert!(matches!(old.check(), Err(LeaseError::Fenced { .. })));
    assert!(matches!(old.renew().await, Err(LeaseError::Fenced { .. })));
    new.renew().await.expect("new holder renews");
    let (record, _) = read_lease(&f.store, VOL)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(record.holder, "server-b");
    assert_eq!(record.epoch, 2);
}

async fn renewal_keeps_others_out(f: Fixture) {
    let lease = f.acquire("server-a").await.expect("acquire");
    for _ in 0..5 {
        f.clock.advance(TTL / 2);
        lease.renew().await.expect("renew");
        assert!(matches!(
            f.acquire("server-b").await,
            Err(LeaseError::Held { .. })
        ));
    }
    assert_eq!(lease.epoch(), 1, "renewal keeps the epoch");
    lease.check().expect("valid after renewals");
}

async fn steal_bumps_the_epoch_and_fences(f: Fixture) {
    let old = f.acquire("server-a").await.expect("acquire");
    let thief = Lease::steal(f.store.clone(), VOL, "operator", TTL, f.clock())
        .await
        .expect("steal a live lease");
    assert_eq!(thief.epoch(), 2);
    let err = old.renew().await.expect_err("fenced");
    assert!(err.to_string().contains("operator"), "{err}");
    // Stealing a never-taken lease simply creates it.
    let fresh = Lease::steal(f.store.clone(), VOL + 1, "operator", TTL, f.clock())
        .await
        .expect("steal absent");
    assert_eq!(fresh.epoch(), 1);
}

async fn release_hands_over_at_once_and_epochs_keep_rising(f: Fixture) {
    let mut last_epoch = 0;
    for round in 0..4 {
        let lease = f
            .acquire(&format!("server-{round}"))
            .await
            .expect("acquire");
        assert!(lease.epoch() > last_epoch, "epochs must strictly increase");
        last_epoch = lease.epoch();
        lease.release().await.expect("release");
        assert!(matches!(lease.check(), Err(LeaseError::Released { .. })));
        assert!(matches!(
            lease.renew().await,
            Err(LeaseError::Released { .. })
        ));
        lease.release().await.expect("second release is a no-op");
    }
    let (record, _) = read_lease(&f.store, VOL)
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(
        record.epoch, last_epoch,
        "release never deletes the history"
    );
}

/// 8 contenders take over one expired lease at once: exactly one wins, the
/// others are refused naming the winner; repeated with rising epochs.
async fn race_on_expired_lease_has_one_winner(f: Fixture) {
    let f = Arc::new(f);
    let mut epoch = f.acquire("initial").await.expect("acquire").epoch();
    for round in 0..4 {
        f.clock.advance(TTL);
        let barrier = Arc::new(Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (f, barrier) = (f.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    f.acquire(&format!("racer-{round}-{i}")).await
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut refusals = Vec::new();
        for t in tasks {
            match t.await.expect("task") {
                Ok(lease) => winners.push(lease),
                Err(LeaseError::Held { holder, .. }) => refusals.push(holder),
                Err(e) => panic!("round {round}: unexpected {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}");
        let winner = &winners[0];
        assert_eq!(winner.epoch(), epoch + 1, "round {round}");
        assert_eq!(refusals.len(), 7);
        for holder in refusals {
            assert_eq!(holder, winner.holder(), "refusals name the winner");
        }
        epoch = winner.epoch();
    }
}

async fn corrupt_lease_is_reported_not_overwritten(f: Fixture) {
    let key = lease_key(VOL);
    f.store
        .put(&key, Bytes::from_static(b"not json"), PutMode::Create)
        .await
        .expect("plant garbage");
    let err = f.acquire("server-a").await.expect_err("corrupt");
    assert!(matches!(err, LeaseError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains(&key), "{err}");
    let steal = Lease::steal(f.store.clone(), VOL, "op", TTL, f.clock()).await;
    assert!(matches!(steal, Err(LeaseError::Corrupt { .. })));
    assert_eq!(f.store.get(&key).await.expect("get").data, &b"not json"[..]);
}

async fn bad_requests_are_refused(f: Fixture) {
    for holder in ["", "bad\nname"] {
        let err = f.acquire(holder).await.expect_err("bad holder");
        assert!(matches!(err, LeaseError::Invalid(_)), "{err:?}");
    }
    let err = Lease::acquire(f.store.clone(), VOL, "a", Duration::ZERO, f.clock())
        .await
        .expect_err("zero ttl");
    assert!(matches!(err, LeaseError::Invalid(_)), "{err:?}");
    assert!(read_lease(&f.store, VOL).await.expect("read").is_none());
}

/// A renewal whose reply is lost (the store applied it, the holder saw an
/// error) is followed by one that finds the version changed (412). That is
/// the holder's own write, not a takeover: it keeps the lease. The same for
/// a release. A real takeover is still detected. (On main the second
/// renewal declared the holder fenced.)
async fn a_lost_renewal_reply_is_not_a_takeover(f: Fixture) {
    use shale::store::faulty::{Fault, FaultPoint, FaultRule, FaultyStore};
    let faulty = Arc::new(FaultyStore::new(f.store.clone(), 3));
    let store: DynStore = faulty.clone();
    let start_ms = 1_700_000_000_000u64;
    let ttl_ms = TTL.as_millis() as u64;
    let lease = Lease::acquire(store.clone(), VOL, "server-a", TTL, f.clock())
        .await
        .expect("acquire");
    let stored_expiry = || async {
        read_lease(&f.store, VOL)
            .await
            .expect("read")
            .expect("present")
            .0
    };

    faulty.set_scoped(
        FaultPoint::Put,
        FaultRule::next(Fault::LostResponse, 1),
        &lease_key(VOL),
    );
    f.clock.advance(Duration::from_secs(1));
    let err = lease.renew().await.expect_err("the reply was lost");
    assert!(matches!(err, LeaseError::Store(_)), "{err:?}");
    assert_eq!(
        stored_expiry().await.expires_at_ms,
        start_ms + 1000 + ttl_ms,
        "the store applied the renewal"
    );
    f.clock.advance(Duration::from_secs(1));
    lease
        .renew()
        .await
        .expect("our own earlier write is no takeover");
    lease.check().expect("still held");
    assert_eq!(lease.epoch(), 1);
    let stored = stored_expiry().await;
    assert_eq!(stored.holder, "server-a");
    assert_eq!(stored.expires_at_ms, start_ms + 2000 + ttl_ms);

    faulty.set_scoped(
        FaultPoint::Put,
        FaultRule::next(Fault::LostResponse, 1),
        &lease_key(VOL),
    );
    assert!(lease.release().await.is_err(), "the release reply was lost");
    lease.release().await.expect("released, not fenced");
    assert_eq!(stored_expiry().await.expires_at_ms, 0);

    let again = Lease::acquire(store, VOL, "server-a", TTL, f.clock())
        .await
        .expect("after release");
    Lease::steal(f.store.clone(), VOL, "operator", TTL, f.clock())
        .await
        .expect("steal");
    let err = again.renew().await.expect_err("a real takeover");
    assert!(
        matches!(err, LeaseError::Fenced { epoch: 3, .. }),
        "{err:?}"
    );
}

macro_rules! lease_tests {
    ($module:ident, $make:ident) => {
        mod $module {
            use super::*;
            lease_tests!(@each $make;
                second_acquirer_is_refused_naming_the_holder,
                takeover_after_expiry_fences_the_old_holder,
                renewal_keeps_others_out,
                steal_bumps_the_epoch_and_fences,
                release_hands_over_at_once_and_epochs_keep_rising,
                race_on_expired_lease_has_one_winner,
                corrupt_lease_is_reported_not_overwritten,
                bad_requests_are_refused,
                a_lost_renewal_reply_is_not_a_takeover);
        }
    };
    (@each $make:ident; $($test:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
        async fn $test() {
            let Some(f) = $make().await else { return };
            super::$test(f).await;
        }
    )*};
}

lease_tests!(memory, make_memory);
lease_tests!(fs, make_fs);
lease_tests!(s3, make_s3);

/// Wait (bounded, for liveness only) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_renewal_extends_until_fenced() {
    let f = make_memory().await.expect("memory");
    let lease = Arc::new(f.acquire("server-a").await.expect("acquire"));
    let renewer = lease.spawn_renewer(Duration::from_millis(2));
    let start = lease.expires_at_ms();
    f.clock.advance(TTL / 2);
    eventually("a renewal after the clock moved", || {
        lease.expires_at_ms() > start
    })
    .await;
    f.clock.advance(TTL / 2);
    lease
        .check()
        .expect("renewed in the background, so still valid");
    assert!(matches!(
        f.acquire("server-b").await,
        Err(LeaseError::Held { .. })
    ));

    Lease::steal(f.store.clone(), VOL, "operator", TTL, f.clock())
        .await
        .expect("steal");
    eventually("the renewer notices the steal", || renewer.is_finished()).await;
    let err = lease.check().expect_err("fenced");
    assert!(
        matches!(err, LeaseError::Fenced { epoch: 2, .. }),
        "{err:?}"
    );
    renewer.stop().await;
}

#[tokio::test]
async fn stopped_renewer_lets_the_lease_lapse() {
    let f = make_memory().await.expect("memory");
    let lease = Arc::new(f.acquire("server-a").await.expect("acquire"));
    let renewer = lease.spawn_renewer(Duration::from_secs(3600));
    renewer.stop().await;
    f.clock.advance(TTL);
    assert!(matches!(lease.check(), Err(LeaseError::Expired { .. })));
    f.acquire("server-b")
        .await
        .expect("lapsed lease is taken over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_renewals_of_one_lease_do_not_fence_it() {
    let f = make_memory().await.expect("memory");
    let lease = Arc::new(f.acquire("server-a").await.expect("acquire"));
    for _ in 0..5 {
        f.clock.advance(Duration::from_secs(1));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let lease = lease.clone();
                tokio::spawn(async move { lease.renew().await })
            })
            .collect();
        for t in tasks {
            t.await
                .expect("task")
                .expect("renewal by the holder itself");
        }
    }
    lease.check().expect("still held");
    lease.release().await.expect("release");
    assert!(matches!(
        lease.renew().await,
        Err(LeaseError::Released { .. })
    ));
    let (record, _) = read_lease(&f.store, VOL)
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(
        record.expires_at_ms, 0,
        "a renewal never resurrects a released lease"
    );
}

/// Leases work through the retry layer while 30% of store calls fail or
/// lose their responses; epochs still rise by exactly one per takeover.
#[tokio::test]
async fn lease_cycles_survive_faults_through_the_retry_layer() {
    use shale::store::faulty::{Fault, FaultPoint, FaultRule, FaultyStore};
    use shale::store::retry::{RetryPolicy, RetryStore};
    let faulty = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()) as DynStore,
        11,
    ));
    faulty.set_all(FaultRule::share(Fault::Transient, 0.3));
    faulty.set(FaultPoint::Put, FaultRule::share(Fault::LostResponse, 0.3));
    let policy = RetryPolicy {
        base: Duration::from_millis(1),
        cap: Duration::from_millis(4),
        max_attempts: 40,
        max_elapsed: Duration::from_secs(60),
    };
    let store: DynStore = Arc::new(RetryStore::new(faulty.clone(), policy, 11));
    let f = fixture(store, None);
    for round in 0..10u64 {
        let lease = f
            .acquire(&format!("server-{round}"))
            .await
            .expect("acquire");
        assert_eq!(lease.epoch(), round + 1);
        for _ in 0..3 {
            f.clock.advance(Duration::from_secs(1));
            lease.renew().await.expect("renew");
        }
        if round % 2 == 0 {
            lease.release().await.expect("release");
        } else {
            f.clock.advance(TTL);
        }
    }
    assert!(faulty.injected_total() > 10, "{}", faulty.injected_total());
}

#[tokio::test]
async fn epoch_floor_lifts_new_and_taken_over_leases() {
    use shale::catalog::lease::AcquireOptions;
    let f = make_memory().await.expect("memory");
    let opts = AcquireOptions {
        steal: false,
        min_epoch: 41,
        ..AcquireOptions::default()
    };
    let first = Lease::acquire_with(f.store.clone(), VOL, "a", TTL, f.clock(), opts.clone())
        .await
        .expect("create above the floor");
    assert_eq!(first.epoch(), 42);
    let refused = Lease::acquire_with(f.store.clone(), VOL, "b", TTL, f.clock(), opts).await;
    assert!(
        matches!(refused, Err(LeaseError::Held { .. })),
        "a floor is no steal"
    );
    first.release().await.expect("release");
    let low_floor = AcquireOptions {
        steal: false,
        min_epoch: 5,
        ..AcquireOptions::default()
    };
    let second = Lease::acquire_with(f.store.clone(), VOL, "b", TTL, f.clock(), low_floor)
        .await
        .expect("takeover");
    assert_eq!(
        second.epoch(),
        43,
        "the stored epoch wins over a lower floor"
    );
    let high_floor = AcquireOptions {
        steal: true,
        min_epoch: 100,
        ..AcquireOptions::default()
    };
    let third = Lease::acquire_with(f.store.clone(), VOL, "c", TTL, f.clock(), high_floor)
        .await
        .expect("steal");
    assert_eq!(third.epoch(), 101);
}

/// Local takeover (lease rule 8): a live lease is taken over at once only
/// if its recorded owner is on this machine, in the same local directory,
/// and its process is gone; every other live lease still refuses.
#[tokio::test]
async fn local_takeover_needs_same_machine_same_dir_and_a_gone_holder() {
    use shale::catalog::lease::{AcquireOptions, HolderId, LocalTakeover};
    let f = make_memory().await.expect("memory");
    let owner = |machine: &str, dir: &str, pid: u32| HolderId {
        machine: machine.into(),
        boot: "boot-1".into(),
        pid,
        start: 100,
        dir: dir.into(),
    };
    // Pids 1..=99 are "alive" for this test, others gone.
    let takeover = LocalTakeover {
        holder_gone: |o: &HolderId| o.pid >= 100,
    };
    let take = |me: HolderId| {
        let opts = AcquireOptions {
            owner: Some(me),
            local_takeover: Some(takeover),
            ..AcquireOptions::default()
        };
        Lease::acquire_with(f.store.clone(), VOL, "restarted", TTL, f.clock(), opts)
    };
    let plain = f.acquire("no-owner-recorded").await.expect("first");
    assert!(
        matches!(
            take(owner("m", "d", 200)).await,
            Err(LeaseError::Held { .. })
        ),
        "a record without an owner is never taken over early"
    );
    plain.release().await.expect("release");

    let nameless = Lease::acquire_with(
        f.store.clone(),
        VOL,
        "nameless-host",
        TTL,
        f.clock(),
        AcquireOptions {
            owner: Some(owner("unknown", "d", 500)),
            ..AcquireOptions::default()
        },
    )
    .await
    .expect("a host without a machine id");
    assert!(
        matches!(
            take(owner("unknown", "d", 200)).await,
            Err(LeaseError::Held { .. })
        ),
        "hosts without a machine id are never the same host"
    );
    nameless.release().await.expect("release");

    let crashed = Lease::acquire_with(
        f.store.clone(),
        VOL,
        "crashed",
        TTL,
        f.clock(),
        AcquireOptions {
            owner: Some(owner("m", "d", 500)),
            ..AcquireOptions::default()
        },
    )
    .await
    .expect("the holder that will crash");
    for (who, why) in [
        (owner("other-machine", "d", 200), "another machine"),
        (owner("m", "other-dir", 200), "another local directory"),
    ] {
        assert!(
            matches!(take(who).await, Err(LeaseError::Held { .. })),
            "{why} must wait for expiry"
        );
    }
    let taken = take(owner("m", "d", 200)).await.expect("local takeover");
    assert_eq!(taken.epoch(), crashed.epoch() + 1);
    assert!(matches!(
        crashed.renew().await,
        Err(LeaseError::Fenced { .. })
    ));

    // The new holder (pid 1) is alive: a further restart must wait.
    let live = Lease::acquire_with(
        f.store.clone(),
        VOL,
        "live",
        TTL,
        f.clock(),
        AcquireOptions {
            owner: Some(owner("m", "d", 1)),
            steal: true,
            ..AcquireOptions::default()
        },
    )
    .await
    .expect("steal");
    assert!(
        matches!(
            take(owner("m", "d", 300)).await,
            Err(LeaseError::Held { .. })
        ),
        "a live holder of this host and directory still blocks"
    );
    live.check().expect("untouched");
}
