//! The fault-injecting decorator itself: determinism, shares, limits, the
//! outage switch, each fault kind and the counters.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shale::store::faulty::{Fault, FaultPoint, FaultRule, FaultyStore};
use shale::store::memory::MemoryStore;
use shale::store::{ObjectStore, PutMode, StoreError};

fn faulty(seed: u64) -> FaultyStore<Arc<MemoryStore>> {
    FaultyStore::new(Arc::new(MemoryStore::new()), seed)
}

async fn failure_pattern(seed: u64, n: usize) -> Vec<bool> {
    let s = faulty(seed);
    s.inner()
        .put("k", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .expect("seed object");
    s.set(FaultPoint::Get, FaultRule::share(Fault::Transient, 0.3));
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(s.get("k").await.is_err());
    }
    out
}

#[tokio::test]
async fn same_seed_same_faults() {
    let a = failure_pattern(42, 300).await;
    assert_eq!(a, failure_pattern(42, 300).await);
    assert_ne!(a, failure_pattern(43, 300).await);
}

#[tokio::test]
async fn share_is_respected_roughly() {
    let pattern = failure_pattern(7, 1000).await;
    let failed = pattern.iter().filter(|f| **f).count();
    // Seeded, so the count is fixed; the bounds document what "30%" means.
    assert!((200..400).contains(&failed), "{failed} of 1000 failed");
}

#[tokio::test]
async fn limit_fails_exactly_the_next_n_calls() {
    let s = faulty(1);
    s.set(FaultPoint::Head, FaultRule::next(Fault::Transient, 3));
    let mut results = Vec::new();
    for _ in 0..6 {
        results.push(match s.head("k").await {
            Err(e) if e.is_transient() => "transient",
            Err(StoreError::NotFound { .. }) => "reached backend",
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(
        results,
        [
            "transient",
            "transient",
            "transient",
            "reached backend",
            "reached backend",
            "reached backend"
        ]
    );
    assert_eq!(s.injected(FaultPoint::Head), 3);
    assert_eq!(s.injected_total(), 3);
}

#[tokio::test]
async fn outage_fails_everything_until_switched_off() {
    let s = faulty(1);
    s.set_outage(true);
    let put = s.put("k", Bytes::from_static(b"x"), PutMode::Create).await;
    assert!(put.is_err_and(|e| e.is_transient()));
    assert!(s.get("k").await.is_err_and(|e| e.is_transient()));
    assert!(s
        .get_range("k", 0..1)
        .await
        .is_err_and(|e| e.is_transient()));
    assert!(s.head("k").await.is_err_and(|e| e.is_transient()));
    assert!(s.list("").await.is_err_and(|e| e.is_transient()));
    assert!(s.delete("k").await.is_err_and(|e| e.is_transient()));
    assert!(
        s.inner().list("").await.expect("list").is_empty(),
        "nothing reached the backend"
    );
    for p in FaultPoint::ALL {
        assert_eq!(s.injected(p), 1, "{}", p.name());
    }
    s.set_outage(false);
    s.put("k", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .expect("after outage");
    assert_eq!(s.injected_total(), 6);
}

#[tokio::test]
async fn torn_put_leaves_a_prefix() {
    let s = faulty(1);
    s.set(FaultPoint::Put, FaultRule::next(Fault::TornPut, 1));
    let err = s
        .put("k", Bytes::from_static(b"0123456789"), PutMode::Create)
        .await
        .expect_err("torn");
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(
        s.inner().get("k").await.expect("prefix written").data,
        &b"01234"[..]
    );
}

#[tokio::test]
async fn dropped_put_writes_nothing() {
    let s = faulty(1);
    s.set(FaultPoint::Put, FaultRule::next(Fault::DroppedPut, 1));
    let err = s
        .put("k", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .expect_err("dropped");
    assert!(err.is_transient(), "{err:?}");
    assert!(matches!(
        s.inner().get("k").await,
        Err(StoreError::NotFound { .. })
    ));
}

#[tokio::test]
async fn lost_response_performs_the_operation() {
    let s = faulty(1);
    s.set(FaultPoint::Put, FaultRule::next(Fault::LostResponse, 1));
    let err = s
        .put("k", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .expect_err("lost");
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(s.inner().get("k").await.expect("written").data, &b"x"[..]);
    s.set(FaultPoint::Delete, FaultRule::next(Fault::LostResponse, 1));
    assert!(s.delete("k").await.is_err());
    assert!(matches!(
        s.inner().get("k").await,
        Err(StoreError::NotFound { .. })
    ));
}

#[tokio::test]
async fn permanent_fault_is_permanent_and_writes_nothing() {
    let s = faulty(1);
    s.set(FaultPoint::Put, FaultRule::next(Fault::Permanent, 1));
    let err = s
        .put("k", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .expect_err("fails");
    assert!(matches!(err, StoreError::Permanent(_)), "{err:?}");
    assert!(err.to_string().contains("put"), "{err}");
    assert!(matches!(
        s.inner().get("k").await,
        Err(StoreError::NotFound { .. })
    ));
}

#[tokio::test]
async fn delayed_requests_still_succeed() {
    let s = faulty(1);
    s.set(
        FaultPoint::Put,
        FaultRule::next(Fault::Delay(Duration::from_millis(5)), 1),
    );
    s.put("k", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .expect("delayed put");
    assert_eq!(s.get("k").await.expect("get").data, &b"x"[..]);
    assert_eq!(s.injected(FaultPoint::Put), 1);
}

#[tokio::test]
async fn clear_disarms_a_point() {
    let s = faulty(1);
    s.set_all(FaultRule::share(Fault::Transient, 1.0));
    assert!(s.get("k").await.is_err_and(|e| e.is_transient()));
    s.clear(FaultPoint::Get);
    assert!(matches!(s.get("k").await, Err(StoreError::NotFound { .. })));
    assert!(s.head("k").await.is_err_and(|e| e.is_transient()));
    s.clear_all();
    assert!(matches!(
        s.head("k").await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(s.injected_total(), 2);
}

#[tokio::test]
async fn scoped_rules_touch_only_their_prefix() {
    let s = faulty(1);
    s.set_scoped(
        FaultPoint::Put,
        FaultRule::share(Fault::Transient, 1.0),
        "volumes/0001/chunks/",
    );
    s.put(
        "volumes/0001/manifest",
        Bytes::from_static(b"m"),
        PutMode::Create,
    )
    .await
    .expect("outside the scope");
    let err = s
        .put(
            "volumes/0001/chunks/c1",
            Bytes::from_static(b"c"),
            PutMode::Create,
        )
        .await
        .expect_err("inside the scope");
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(s.injected(FaultPoint::Put), 1);
    s.set(FaultPoint::Put, FaultRule::next(Fault::Transient, 1));
    assert!(
        s.put("elsewhere", Bytes::new(), PutMode::Create)
            .await
            .is_err(),
        "set() is unscoped"
    );
}

/// A hold stops exactly the next matching call until released; other
/// calls pass meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_stops_one_call_until_released() {
    let s = Arc::new(faulty(5));
    s.put("a/1", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .unwrap();
    let hold = s.hold(FaultPoint::Get, "a/");
    let held = tokio::spawn({
        let s = s.clone();
        async move { s.get("a/1").await.map(|o| o.data) }
    });
    hold.reached().await;
    assert!(!held.is_finished(), "the held get waits");
    // Other points and keys outside the prefix pass; the hold is used up.
    s.put("b/1", Bytes::from_static(b"y"), PutMode::Create)
        .await
        .unwrap();
    assert_eq!(s.get("b/1").await.unwrap().data, Bytes::from_static(b"y"));
    assert!(!held.is_finished(), "still held");
    hold.release();
    assert_eq!(held.await.unwrap().unwrap(), Bytes::from_static(b"x"));
    assert_eq!(s.get("a/1").await.unwrap().data, Bytes::from_static(b"x"));
    // Released before it is reached: the call passes.
    let early = s.hold(FaultPoint::Put, "a/");
    early.release();
    s.put("a/2", Bytes::from_static(b"z"), PutMode::Create)
        .await
        .unwrap();
}

/// Keys hidden from listings stay readable; showing them again restores
/// complete listings.
#[tokio::test]
async fn hidden_keys_are_left_out_of_listings_only() {
    let s = faulty(6);
    for k in ["p/1", "p/2", "p/3"] {
        s.put(k, Bytes::from_static(b"v"), PutMode::Create)
            .await
            .unwrap();
    }
    s.hide_in_listings(["p/2".to_string()]);
    let keys: Vec<String> = s
        .list("p/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, ["p/1", "p/3"]);
    assert!(s.get("p/2").await.is_ok());
    assert!(s.head("p/2").await.is_ok());
    s.show_in_listings();
    assert_eq!(s.list("p/").await.unwrap().len(), 3);
}
