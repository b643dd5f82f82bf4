//! The retry decorator over the fault-injecting one, on every backend.

#[path = "support/s3.rs"]
mod s3_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shale::store::faulty::{Fault, FaultPoint, FaultRule, FaultyStore};
use shale::store::fs::FsStore;
use shale::store::memory::MemoryStore;
use shale::store::retry::{RetryPolicy, RetryStore};
use shale::store::s3::S3Store;
use shale::store::{DynStore, ObjectStore, PutMode, StoreError};

fn fast_policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(1),
        cap: Duration::from_millis(8),
        max_attempts,
        max_elapsed: Duration::from_secs(120),
    }
}

type Stack = RetryStore<Arc<FaultyStore<DynStore>>>;

fn stack(inner: DynStore, seed: u64, attempts: u32) -> (Stack, Arc<FaultyStore<DynStore>>) {
    let faulty = Arc::new(FaultyStore::new(inner, seed));
    (
        RetryStore::new(faulty.clone(), fast_policy(attempts), seed),
        faulty,
    )
}

fn data(i: usize, round: usize) -> Bytes {
    Bytes::from(format!("object {i} round {round} ").repeat(i % 7 + 1))
}

/// Every operation of a small workload succeeds through the retry layer while
/// the faulty layer fails 30% of all calls; the content read back is right.
async fn workload_survives_faults(inner: DynStore, seed: u64, put_fault: Fault) {
    let (s, faulty) = stack(inner.clone(), seed, 40);
    faulty.set_all(FaultRule::share(Fault::Transient, 0.3));
    faulty.set(FaultPoint::Put, FaultRule::share(put_fault, 0.3));
    const N: usize = 40;
    let mut versions = Vec::new();
    for i in 0..N {
        let key = format!("w/{i:03}");
        versions.push(
            s.put(&key, data(i, 0), PutMode::Create)
                .await
                .expect("create"),
        );
    }
    for (i, version) in versions.iter_mut().enumerate() {
        let key = format!("w/{i:03}");
        let got = s.get(&key).await.expect("get");
        assert_eq!(got.data, data(i, 0));
        *version = s
            .put(&key, data(i, 1), PutMode::IfMatch(got.version))
            .await
            .expect("if-match");
    }
    for (i, version) in versions.iter().enumerate() {
        let key = format!("w/{i:03}");
        let meta = s.head(&key).await.expect("head");
        assert_eq!(&meta.version, version, "{key}: version returned by put");
        let expect = data(i, 1);
        let range = s
            .get_range(&key, 3..expect.len() as u64)
            .await
            .expect("range");
        assert_eq!(range, expect.slice(3..));
    }
    let listed = s.list("w/").await.expect("list");
    assert_eq!(listed.len(), N);
    for i in (0..N).step_by(2) {
        s.delete(&format!("w/{i:03}")).await.expect("delete");
    }
    faulty.clear_all();
    let left: Vec<String> = inner
        .list("w/")
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.key)
        .collect();
    let expect: Vec<String> = (1..N).step_by(2).map(|i| format!("w/{i:03}")).collect();
    assert_eq!(left, expect);
    for i in (1..N).step_by(2) {
        let key = format!("w/{i:03}");
        assert_eq!(inner.get(&key).await.expect("get").data, data(i, 1));
    }
    assert!(
        faulty.injected_total() > 50,
        "faults injected: {}",
        faulty.injected_total()
    );
    assert!(s.stats().retries.load(Ordering::Relaxed) > 50);
    assert_eq!(s.stats().exhausted.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn memory_survives_30_percent_transient_errors() {
    workload_survives_faults(Arc::new(MemoryStore::new()), 1, Fault::Transient).await;
}

#[tokio::test]
async fn memory_survives_30_percent_lost_put_responses() {
    workload_survives_faults(Arc::new(MemoryStore::new()), 2, Fault::LostResponse).await;
}

#[tokio::test]
async fn fs_survives_30_percent_faults() {
    let dir = tempfile::tempdir().expect("tempdir");
    workload_survives_faults(Arc::new(FsStore::new(dir.path())), 3, Fault::Transient).await;
    let dir = tempfile::tempdir().expect("tempdir");
    workload_survives_faults(Arc::new(FsStore::new(dir.path())), 4, Fault::LostResponse).await;
}

#[tokio::test]
async fn s3_survives_30_percent_faults() {
    let Some(moto) = s3_support::moto() else {
        return;
    };
    for (seed, fault) in [(5, Fault::Transient), (6, Fault::LostResponse)] {
        let bucket = moto.unique_bucket("retry");
        let store = S3Store::connect(&moto.settings(&bucket, ""))
            .await
            .expect("client");
        workload_survives_faults(Arc::new(store), seed, fault).await;
    }
}

fn memory_stack(attempts: u32) -> (Stack, Arc<FaultyStore<DynStore>>) {
    stack(Arc::new(MemoryStore::new()), 9, attempts)
}

#[tokio::test]
async fn permanent_errors_are_not_retried() {
    let (s, faulty) = memory_stack(10);
    faulty.set(FaultPoint::Get, FaultRule::next(Fault::Permanent, 1));
    let err = s.get("k").await.expect_err("permanent");
    assert!(matches!(err, StoreError::Permanent(_)), "{err:?}");
    assert_eq!(s.stats().attempts.load(Ordering::Relaxed), 1);
    // NotFound is not transient either.
    let err = s.get("k").await.expect_err("missing");
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert_eq!(s.stats().attempts.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn gives_up_after_max_attempts_with_a_transient_error() {
    let (s, faulty) = memory_stack(4);
    faulty.set_outage(true);
    let err = s.head("k").await.expect_err("outage");
    assert!(err.is_transient(), "{err:?}");
    assert!(
        err.to_string().contains("gave up after 4 attempts"),
        "{err}"
    );
    assert_eq!(faulty.injected(FaultPoint::Head), 4);
    assert_eq!(s.stats().exhausted.load(Ordering::Relaxed), 1);
    faulty.set_outage(false);
    s.put("k", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .expect("after outage");
}

#[tokio::test]
async fn gives_up_when_time_budget_is_spent() {
    let faulty = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()) as DynStore,
        1,
    ));
    let policy = RetryPolicy {
        base: Duration::from_millis(5),
        cap: Duration::from_millis(5),
        max_attempts: 1000,
        max_elapsed: Duration::ZERO,
    };
    let s = RetryStore::new(faulty.clone(), policy, 1);
    faulty.set_outage(true);
    let err = s.list("").await.expect_err("outage");
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(
        faulty.injected(FaultPoint::List),
        1,
        "no time for a second attempt"
    );
}

#[tokio::test]
async fn lost_create_response_is_recognised_as_our_write() {
    let (s, faulty) = memory_stack(10);
    faulty.set(FaultPoint::Put, FaultRule::next(Fault::LostResponse, 1));
    let v = s
        .put("k", Bytes::from_static(b"mine"), PutMode::Create)
        .await
        .expect("the create landed; its lost response must not become AlreadyExists");
    assert_eq!(s.head("k").await.expect("head").version, v);
    assert_eq!(
        s.stats().lost_responses_recovered.load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn lost_if_match_response_is_recognised_as_our_write() {
    let (s, faulty) = memory_stack(10);
    let v1 = s
        .put("k", Bytes::from_static(b"one"), PutMode::Create)
        .await
        .expect("create");
    faulty.set(FaultPoint::Put, FaultRule::next(Fault::LostResponse, 1));
    let v2 = s
        .put(
            "k",
            Bytes::from_static(b"two"),
            PutMode::IfMatch(v1.clone()),
        )
        .await
        .expect("the CAS landed");
    assert_ne!(v1, v2);
    assert_eq!(s.get("k").await.expect("get").data, &b"two"[..]);
    assert_eq!(
        s.stats().lost_responses_recovered.load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn refusal_after_an_ambiguous_attempt_with_other_content_stays_an_error() {
    let (s, faulty) = memory_stack(10);
    // A torn put leaves half the bytes behind: not ours, so AlreadyExists.
    faulty.set(FaultPoint::Put, FaultRule::next(Fault::TornPut, 1));
    let err = s
        .put("k", Bytes::from_static(b"full content"), PutMode::Create)
        .await
        .expect_err("someone else's bytes are there");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(
        s.stats().lost_responses_recovered.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn first_attempt_refusal_is_never_second_guessed() {
    let (s, _faulty) = memory_stack(10);
    s.put("k", Bytes::from_static(b"same"), PutMode::Create)
        .await
        .expect("create");
    let err = s
        .put("k", Bytes::from_static(b"same"), PutMode::Create)
        .await
        .expect_err("a genuine second create fails even with equal bytes");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
}

#[tokio::test]
async fn dropped_create_is_simply_retried() {
    let (s, faulty) = memory_stack(10);
    faulty.set(FaultPoint::Put, FaultRule::next(Fault::DroppedPut, 2));
    s.put("k", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .expect("third attempt");
    assert_eq!(s.stats().attempts.load(Ordering::Relaxed), 3);
    assert_eq!(
        s.stats().lost_responses_recovered.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn forever_policy_waits_out_an_outage() {
    let faulty = Arc::new(FaultyStore::new(
        Arc::new(MemoryStore::new()) as DynStore,
        3,
    ));
    let policy = RetryPolicy {
        base: Duration::from_millis(1),
        cap: Duration::from_millis(2),
        ..RetryPolicy::forever()
    };
    let s = Arc::new(RetryStore::new(faulty.clone(), policy, 3));
    faulty.set_outage(true);
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            s.put("k", Bytes::from_static(b"patient"), PutMode::Create)
                .await
        })
    };
    // Let the outage swallow a number of attempts, then end it.
    while faulty.injected(FaultPoint::Put) < 20 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    faulty.set_outage(false);
    writer
        .await
        .expect("task")
        .expect("put succeeds after the outage");
    assert_eq!(s.get("k").await.expect("get").data, &b"patient"[..]);
    assert_eq!(s.stats().exhausted.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn open_backend_has_no_retry_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = shale::store::StoreConfig::Fs {
        path: dir.path().join("s"),
    };
    let raw = shale::store::open_backend(&cfg)
        .await
        .expect("open backend");
    raw.put("k", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .expect("put");
    let wrapped = shale::store::open(&cfg).await.expect("open");
    assert_eq!(
        wrapped.get("k").await.expect("same directory").data,
        &b"x"[..]
    );
    assert!(format!("{raw:?}").starts_with("FsStore"), "{raw:?}");
    assert!(
        format!("{wrapped:?}").starts_with("RetryStore"),
        "{wrapped:?}"
    );
}
