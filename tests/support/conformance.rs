//! The store protocol (src/store/mod.rs) as one test body per property,
//! generic over the backend. Each function gets a fresh, empty store.
#![allow(dead_code)]

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use shale::store::{Body, ObjectStore, PutMode, StoreError, Version, MAX_KEY_LEN, MAX_SEGMENT_LEN};
use tokio::sync::Barrier;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// A deterministic byte pattern of `len` bytes.
pub fn pattern(len: usize, salt: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect::<Vec<u8>>()
        .into()
}

pub async fn put_get_overwrite<S: ObjectStore + ?Sized>(s: &S) {
    let v1 = s
        .put("obj/one", b("first"), PutMode::Overwrite)
        .await
        .expect("put");
    let got = s.get("obj/one").await.expect("get");
    assert_eq!(got.data, b("first"));
    assert_eq!(got.version, v1);
    let v2 = s
        .put("obj/one", b("second, longer"), PutMode::Overwrite)
        .await
        .expect("overwrite");
    assert_ne!(v1, v2, "a write with new content must change the version");
    let got = s.get("obj/one").await.expect("get");
    assert_eq!(got.data, b("second, longer"));
    assert_eq!(got.version, v2);
    let meta = s.head("obj/one").await.expect("head");
    assert_eq!(meta.key, "obj/one");
    assert_eq!(meta.size, 14);
    assert_eq!(meta.version, v2);
}

pub async fn large_object_round_trip<S: ObjectStore + ?Sized>(s: &S) {
    let data = pattern(4 << 20, 7);
    let v = s
        .put("big/chunk", data.clone(), PutMode::Create)
        .await
        .expect("put 4 MiB");
    let got = s.get("big/chunk").await.expect("get");
    assert_eq!(got.version, v);
    assert!(got.data == data, "4 MiB object read back differs");
}

/// An object put in parts is the parts concatenated, and `put_body`
/// keeps the put's modes: a Create on a present key writes nothing.
pub async fn put_in_parts<S: ObjectStore + ?Sized>(s: &S) {
    let data = pattern((3 << 20) + 12345, 3);
    // Parts of every size: tiny ones, ones over a write piece, odd cuts.
    let cuts = [0, 1, 17, 4096, 4097, 300_000, 2 << 20, data.len()];
    let mut body = Body::new();
    for w in cuts.windows(2) {
        body.push(data.slice(w[0]..w[1]));
    }
    assert!(body.parts().len() > 5);
    let v = s
        .put_body("parts/one", body.clone(), PutMode::Create)
        .await
        .expect("put in parts");
    let got = s.get("parts/one").await.expect("get");
    assert!(got.data == data, "the object is not its parts concatenated");
    assert_eq!(got.version, v);
    assert_eq!(
        s.head("parts/one").await.expect("head").size,
        data.len() as u64
    );
    let mut other = Body::new();
    other.push(b("in"));
    other.push(b("truder"));
    let err = s
        .put_body("parts/one", other.clone(), PutMode::Create)
        .await
        .expect_err("create on a present key must fail");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    let v2 = s
        .put_body("parts/one", other, PutMode::IfMatch(v))
        .await
        .expect("if-match put in parts");
    let got = s.get("parts/one").await.expect("get");
    assert_eq!((got.data, got.version), (b("intruder"), v2));
}

pub async fn empty_object<S: ObjectStore + ?Sized>(s: &S) {
    s.put("empty", Bytes::new(), PutMode::Create)
        .await
        .expect("put empty");
    assert!(s.get("empty").await.expect("get").data.is_empty());
    assert_eq!(s.head("empty").await.expect("head").size, 0);
    assert!(s
        .get_range("empty", 0..0)
        .await
        .expect("empty range")
        .is_empty());
    let err = s.get_range("empty", 0..1).await.expect_err("past end");
    assert!(matches!(err, StoreError::InvalidRange { .. }), "{err:?}");
}

pub async fn create_on_absent_and_present<S: ObjectStore + ?Sized>(s: &S) {
    let v = s
        .put("c/key", b("original"), PutMode::Create)
        .await
        .expect("create on absent key");
    let err = s
        .put("c/key", b("intruder"), PutMode::Create)
        .await
        .expect_err("create on present key must fail");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    let got = s.get("c/key").await.expect("get");
    assert_eq!(got.data, b("original"), "a refused create must not write");
    assert_eq!(got.version, v);
}

pub async fn if_match_success_failure_missing<S: ObjectStore + ?Sized>(s: &S) {
    let v1 = s
        .put("m/key", b("v1"), PutMode::Create)
        .await
        .expect("create");
    let v2 = s
        .put("m/key", b("v2"), PutMode::IfMatch(v1.clone()))
        .await
        .expect("if-match with the current version");
    assert_ne!(v1, v2);
    let err = s
        .put("m/key", b("stale"), PutMode::IfMatch(v1))
        .await
        .expect_err("if-match with a stale version must fail");
    assert!(
        matches!(err, StoreError::PreconditionFailed { .. }),
        "{err:?}"
    );
    let got = s.get("m/key").await.expect("get");
    assert_eq!(got.data, b("v2"), "a refused if-match must not write");
    assert_eq!(got.version, v2.clone());
    let err = s
        .put("m/missing", b("x"), PutMode::IfMatch(v2))
        .await
        .expect_err("if-match on a missing key must fail");
    assert!(
        matches!(err, StoreError::PreconditionFailed { .. }),
        "{err:?}"
    );
    let err = s.head("m/missing").await.expect_err("still missing");
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    let err = s
        .put(
            "m/key",
            b("x"),
            PutMode::IfMatch(Version("no-such-version".into())),
        )
        .await
        .expect_err("made-up version");
    assert!(
        matches!(err, StoreError::PreconditionFailed { .. }),
        "{err:?}"
    );
}

pub async fn ranged_reads<S: ObjectStore + ?Sized>(s: &S) {
    let data = pattern(1000, 3);
    s.put("r/obj", data.clone(), PutMode::Overwrite)
        .await
        .expect("put");
    for range in [
        0..1000,
        0..1,
        999..1000,
        100..612,
        0..0,
        500..500,
        1000..1000,
    ] {
        let got = s.get_range("r/obj", range.clone()).await;
        let got = got.unwrap_or_else(|e| panic!("range {range:?}: {e}"));
        assert_eq!(
            got,
            data.slice(range.start as usize..range.end as usize),
            "range {range:?}"
        );
    }
    #[allow(clippy::reversed_empty_ranges)]
    let bad = [990..1001, 1000..1001, 1001..1001, 2000..3000, 10..5];
    for range in bad {
        let err = s.get_range("r/obj", range.clone()).await;
        let err = err.expect_err("bad range must fail");
        assert!(
            matches!(err, StoreError::InvalidRange { .. }),
            "range {range:?}: {err:?}"
        );
    }
    let err = s.get_range("r/missing", 0..1).await.expect_err("missing");
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    let err = s.get("r/missing").await.expect_err("missing");
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
}

pub async fn list_by_prefix_sorted<S: ObjectStore + ?Sized>(s: &S) {
    let keys = [
        "vol/b/2", "vol/a/1", "vol/a", "vol/ab", "vol/a/0", "other/x", "vol/b/10", "volume",
    ];
    for (i, k) in keys.iter().enumerate() {
        s.put(k, pattern(i + 1, i as u8), PutMode::Create)
            .await
            .expect("put");
    }
    let list_keys = |prefix: &'static str| async move {
        s.list(prefix)
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.key)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list_keys("").await,
        ["other/x", "vol/a", "vol/a/0", "vol/a/1", "vol/ab", "vol/b/10", "vol/b/2", "volume"]
    );
    assert_eq!(list_keys("vol/").await.len(), 6);
    assert_eq!(list_keys("vol/a/").await, ["vol/a/0", "vol/a/1"]);
    assert_eq!(
        list_keys("vol/a").await,
        ["vol/a", "vol/a/0", "vol/a/1", "vol/ab"]
    );
    assert_eq!(list_keys("vol").await.len(), 7);
    assert_eq!(list_keys("vol/b/1").await, ["vol/b/10"]);
    assert!(list_keys("nothing/").await.is_empty());
    assert!(list_keys("vol/c").await.is_empty());
    for m in s.list("vol/b/").await.expect("list") {
        let h = s.head(&m.key).await.expect("head");
        assert_eq!(h, m, "list and head must agree");
    }
}

/// More keys than one S3 list page (1000) holds.
pub async fn list_many_keys<S: ObjectStore + ?Sized>(s: &S) {
    const N: usize = 1100;
    stream::iter(0..N)
        .map(|i| async move {
            s.put(&format!("many/k{i:05}"), b(&i.to_string()), PutMode::Create)
                .await
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .expect("put many");
    s.put("many-not/k", b("x"), PutMode::Create)
        .await
        .expect("put neighbour");
    let listed = s.list("many/").await.expect("list");
    assert_eq!(listed.len(), N);
    for (i, m) in listed.iter().enumerate() {
        assert_eq!(m.key, format!("many/k{i:05}"));
        assert_eq!(m.size, i.to_string().len() as u64);
    }
}

pub async fn delete_is_idempotent<S: ObjectStore + ?Sized>(s: &S) {
    s.put("d/key", b("x"), PutMode::Create).await.expect("put");
    s.put("d/keep", b("y"), PutMode::Create).await.expect("put");
    s.delete("d/key").await.expect("delete existing");
    let err = s.get("d/key").await.expect_err("deleted");
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    let err = s.head("d/key").await.expect_err("deleted");
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    s.delete("d/key").await.expect("delete again");
    s.delete("d/never-existed").await.expect("delete missing");
    s.delete("nowhere/at/all")
        .await
        .expect("delete missing dir");
    let keys: Vec<String> = s
        .list("d/")
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, ["d/keep"]);
    s.put("d/key", b("again"), PutMode::Create)
        .await
        .expect("create after delete");
    assert_eq!(s.get("d/key").await.expect("get").data, b("again"));
}

/// A version names one content for its key: whatever happened in between
/// (overwrite, delete and re-create), different bytes under a key never
/// carry a version that key had before, and `list`, `head` and `get` report
/// the same version. Caches of derived data keyed by `(key, version)` (the
/// snapshot retention index) rely on this.
pub async fn versions_name_one_content<S: ObjectStore + ?Sized>(s: &S) {
    let mut seen = Vec::new();
    let v1 = s
        .put("v/k", b("first"), PutMode::Create)
        .await
        .expect("put");
    seen.push(v1.clone());
    let v2 = s
        .put("v/k", b("second"), PutMode::Overwrite)
        .await
        .expect("overwrite");
    assert!(
        !seen.contains(&v2),
        "overwrite with other bytes reused {v2:?}"
    );
    seen.push(v2);
    s.delete("v/k").await.expect("delete");
    let v3 = s
        .put("v/k", b("third!"), PutMode::Create)
        .await
        .expect("re-create");
    assert!(
        !seen.contains(&v3),
        "re-create with other bytes reused {v3:?}"
    );
    let listed = s.list("v/").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].version, v3, "list reports the put's version");
    assert_eq!(s.head("v/k").await.expect("head").version, v3);
    assert_eq!(s.get("v/k").await.expect("get").version, v3);
}

pub async fn key_and_children_coexist<S: ObjectStore + ?Sized>(s: &S) {
    s.put("t/a", b("parent"), PutMode::Create)
        .await
        .expect("put t/a");
    s.put("t/a/b", b("child"), PutMode::Create)
        .await
        .expect("put t/a/b");
    assert_eq!(s.get("t/a").await.expect("get").data, b("parent"));
    assert_eq!(s.get("t/a/b").await.expect("get").data, b("child"));
    s.delete("t/a").await.expect("delete parent");
    assert_eq!(
        s.get("t/a/b").await.expect("child survives").data,
        b("child")
    );
}

pub async fn unusual_key_characters<S: ObjectStore + ?Sized>(s: &S) {
    let key = "odd/ünï cødé +%?&=#;.bin";
    s.put(key, b("data"), PutMode::Create).await.expect("put");
    assert_eq!(s.get(key).await.expect("get").data, b("data"));
    let listed = s.list("odd/").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, key);
}

pub async fn longest_keys_work<S: ObjectStore + ?Sized>(s: &S) {
    let segment = |c: char| c.to_string().repeat(MAX_SEGMENT_LEN);
    let key = ['a', 'b', 'c', 'd', 'e'].map(segment).join("/");
    assert!(key.len() <= MAX_KEY_LEN);
    s.put(&key, b("long"), PutMode::Create)
        .await
        .expect("put longest key");
    assert_eq!(s.get(&key).await.expect("get").data, b("long"));
    assert_eq!(s.list("aaa").await.expect("list")[0].key, key);
    let too_long_segment = format!("x/{}", "y".repeat(MAX_SEGMENT_LEN + 1));
    let err = s.put(&too_long_segment, b("x"), PutMode::Create).await;
    assert!(matches!(err, Err(StoreError::InvalidKey { .. })), "{err:?}");
    let too_long = format!("{key}/{}", segment('f'));
    let err = s.put(&too_long, b("x"), PutMode::Create).await;
    assert!(matches!(err, Err(StoreError::InvalidKey { .. })), "{err:?}");
}

pub async fn invalid_keys_rejected<S: ObjectStore + ?Sized>(s: &S) {
    for key in ["", "/abs", "trail/", "a//b", "a/../b", "./a", "a\nb"] {
        let is_invalid =
            |r: Result<(), StoreError>| matches!(r, Err(StoreError::InvalidKey { .. }));
        assert!(is_invalid(s.get(key).await.map(|_| ())), "get {key:?}");
        assert!(
            is_invalid(s.get_range(key, 0..1).await.map(|_| ())),
            "get_range {key:?}"
        );
        assert!(is_invalid(s.head(key).await.map(|_| ())), "head {key:?}");
        assert!(is_invalid(s.delete(key).await), "delete {key:?}");
        assert!(
            is_invalid(s.put(key, b("x"), PutMode::Overwrite).await.map(|_| ())),
            "put {key:?}"
        );
    }
    let err = s.list("/abs").await.expect_err("bad prefix");
    assert!(matches!(err, StoreError::InvalidKey { .. }), "{err:?}");
    assert!(
        s.list("").await.expect("list").is_empty(),
        "nothing was written"
    );
}

/// Readers racing overwrites see whole objects only (protocol rule 4): every
/// object written is one repeated byte with a length derived from it, and the
/// each reader never sees an older object after a newer one.
pub async fn readers_never_see_torn_objects<S: ObjectStore + ?Sized + 'static>(s: Arc<S>) {
    const WRITES: usize = 24;
    let object = |i: usize| Bytes::from(vec![i as u8; 64 * 1024 + i * 4096]);
    s.put("torn/key", object(0), PutMode::Create)
        .await
        .expect("create");
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 1..=WRITES {
                s.put("torn/key", object(i), PutMode::Overwrite)
                    .await
                    .expect("overwrite");
            }
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut seen = 0;
                for _ in 0..WRITES {
                    let got = s.get("torn/key").await.expect("get");
                    let first = got.data[0] as usize;
                    assert!(got.data == object(first), "torn or mixed object");
                    let tail = s
                        .get_range("torn/key", 1000..2000)
                        .await
                        .expect("ranged get");
                    assert!(tail.iter().all(|b| *b == tail[0]), "torn range");
                    assert!(first >= seen, "read {first} after {seen}: went back");
                    seen = first;
                }
            })
        })
        .collect();
    writer.await.expect("writer");
    for r in readers {
        r.await.expect("reader");
    }
    assert_eq!(s.get("torn/key").await.expect("get").data, object(WRITES));
}

/// 8 tasks churn one key with Create then delete: whoever creates it owns it
/// until it deletes it, so each owner reads back exactly its own bytes.
pub async fn create_delete_churn_has_one_owner_at_a_time<S: ObjectStore + ?Sized + 'static>(
    s: Arc<S>,
) {
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut owned = 0;
                for round in 0..15 {
                    let mine = b(&format!("owner {i} round {round}"));
                    match s.put("churn/key", mine.clone(), PutMode::Create).await {
                        Ok(version) => {
                            let got = s.get("churn/key").await.expect("owner reads");
                            assert_eq!(got.data, mine, "someone else wrote while we owned it");
                            assert_eq!(got.version, version);
                            s.delete("churn/key").await.expect("owner deletes");
                            owned += 1;
                        }
                        Err(StoreError::AlreadyExists { .. }) => {}
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                owned
            })
        })
        .collect();
    let owned: usize = join_all(tasks).await.into_iter().sum();
    assert!(owned > 0, "someone must have owned the key");
    assert!(matches!(
        s.head("churn/key").await,
        Err(StoreError::NotFound { .. })
    ));
}

const RACERS: usize = 8;
const ROUNDS: usize = 5;

/// 8 concurrent Create puts on one absent key: exactly one wins, the rest get
/// `AlreadyExists`, and the object holds the winner's bytes.
pub async fn race_create<S: ObjectStore + ?Sized + 'static>(s: Arc<S>) {
    for round in 0..ROUNDS {
        let key = format!("race/create-{round}");
        let barrier = Arc::new(Barrier::new(RACERS));
        let tasks: Vec<_> = (0..RACERS)
            .map(|i| {
                let (s, key, barrier) = (s.clone(), key.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    s.put(&key, b(&format!("writer {i}")), PutMode::Create)
                        .await
                })
            })
            .collect();
        let results = join_all(tasks).await;
        let winners: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_ok())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for r in results.iter().filter(|r| r.is_err()) {
            assert!(
                matches!(r, Err(StoreError::AlreadyExists { .. })),
                "round {round}: {r:?}"
            );
        }
        let got = s.get(&key).await.expect("get");
        assert_eq!(got.data, b(&format!("writer {}", winners[0])));
        assert_eq!(Some(&got.version), results[winners[0]].as_ref().ok());
    }
}

/// 8 concurrent IfMatch puts holding the same version: exactly one wins.
pub async fn race_if_match<S: ObjectStore + ?Sized + 'static>(s: Arc<S>) {
    let key = "race/cas".to_string();
    let mut version = s
        .put(&key, b("start"), PutMode::Create)
        .await
        .expect("create");
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(RACERS));
        let tasks: Vec<_> = (0..RACERS)
            .map(|i| {
                let (s, key, barrier) = (s.clone(), key.clone(), barrier.clone());
                let held = version.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let data = b(&format!("round {round} writer {i}"));
                    s.put(&key, data, PutMode::IfMatch(held)).await
                })
            })
            .collect();
        let results = join_all(tasks).await;
        let winners: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_ok())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        for r in results.iter().filter(|r| r.is_err()) {
            assert!(
                matches!(r, Err(StoreError::PreconditionFailed { .. })),
                "round {round}: {r:?}"
            );
        }
        let got = s.get(&key).await.expect("get");
        assert_eq!(got.data, b(&format!("round {round} writer {}", winners[0])));
        version = got.version;
    }
}

async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("racer task panicked"));
    }
    out
}
