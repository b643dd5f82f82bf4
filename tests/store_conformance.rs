//! The shared conformance body (tests/support/conformance.rs) run against
//! every backend: memory, local directory, and S3 on a real moto server.

#[path = "support/conformance.rs"]
mod conformance;
#[path = "support/s3.rs"]
mod s3_support;

use std::sync::Arc;

use bytes::Bytes;
use shale::store::fs::FsStore;
use shale::store::memory::MemoryStore;
use shale::store::s3::S3Store;
use shale::store::{open, DynStore, ObjectStore, PutMode, StoreConfig, StoreError};

/// A fresh, empty store plus whatever keeps its backing alive.
struct Fixture {
    store: DynStore,
    _dir: Option<tempfile::TempDir>,
}

async fn make_memory() -> Option<Fixture> {
    Some(Fixture {
        store: Arc::new(MemoryStore::new()),
        _dir: None,
    })
}

async fn make_fs() -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("tempdir");
    Some(Fixture {
        store: Arc::new(FsStore::new(dir.path().join("store"))),
        _dir: Some(dir),
    })
}

async fn make_s3() -> Option<Fixture> {
    let moto = s3_support::moto()?;
    let bucket = moto.unique_bucket("conformance");
    let store = S3Store::connect(&moto.settings(&bucket, "some/prefix"))
        .await
        .expect("S3 client");
    Some(Fixture {
        store: Arc::new(store),
        _dir: None,
    })
}

macro_rules! backend_tests {
    ($module:ident, $make:ident) => {
        mod $module {
            use super::*;
            backend_tests!(@by_ref $make;
                put_get_overwrite, large_object_round_trip, put_in_parts, empty_object,
                create_on_absent_and_present, if_match_success_failure_missing,
                ranged_reads, list_by_prefix_sorted, list_many_keys,
                delete_is_idempotent, versions_name_one_content, key_and_children_coexist,
                unusual_key_characters, longest_keys_work, invalid_keys_rejected);
            backend_tests!(@shared $make; race_create, race_if_match, readers_never_see_torn_objects,
                create_delete_churn_has_one_owner_at_a_time);
        }
    };
    (@by_ref $make:ident; $($test:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let Some(f) = $make().await else { return };
            conformance::$test(&*f.store).await;
        }
    )*};
    (@shared $make:ident; $($test:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
        async fn $test() {
            let Some(f) = $make().await else { return };
            conformance::$test(f.store.clone()).await;
        }
    )*};
}

backend_tests!(memory, make_memory);
backend_tests!(fs, make_fs);
backend_tests!(s3, make_s3);

/// `store::open` builds each backend behind the retry decorator.
async fn open_round_trip(cfg: StoreConfig) {
    let store = open(&cfg).await.expect("open");
    let v = store
        .put("open/key", Bytes::from_static(b"hello"), PutMode::Create)
        .await
        .expect("put through open()");
    let got = store.get("open/key").await.expect("get");
    assert_eq!(got.data, &b"hello"[..]);
    assert_eq!(got.version, v);
}

#[tokio::test]
async fn open_memory() {
    open_round_trip(StoreConfig::Memory).await;
}

#[tokio::test]
async fn open_fs_creates_the_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a/b/store");
    open_round_trip(StoreConfig::Fs { path: path.clone() }).await;
    assert!(path.is_dir());
}

#[tokio::test]
async fn open_fs_on_a_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").expect("write");
    let err = open(&StoreConfig::Fs { path: file })
        .await
        .expect_err("a file is not a store directory");
    assert!(err.to_string().contains("plain-file"), "{err}");
}

#[tokio::test]
async fn open_s3() {
    let Some(moto) = s3_support::moto() else {
        return;
    };
    let bucket = moto.unique_bucket("open");
    open_round_trip(moto.store_config(&bucket, "")).await;
}

#[tokio::test]
async fn s3_missing_bucket_is_permanent_and_named() {
    let Some(moto) = s3_support::moto() else {
        return;
    };
    let store = open(&moto.store_config("no-such-bucket-here", ""))
        .await
        .expect("open makes no request");
    let err = store
        .put("k", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await
        .expect_err("missing bucket");
    assert!(matches!(err, StoreError::Permanent(_)), "{err:?}");
    assert!(err.to_string().contains("NoSuchBucket"), "{err}");
}

#[tokio::test]
async fn s3_unreachable_endpoint_is_transient() {
    let Some(moto) = s3_support::moto() else {
        return;
    };
    // A port nobody listens on: bind one, then close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut settings = moto.settings("whatever", "");
    settings.endpoint = Some(format!("http://127.0.0.1:{port}"));
    let store = S3Store::connect(&settings).await.expect("client");
    let err = store.head("k").await.expect_err("nobody listens");
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test]
async fn s3_prefixes_isolate_stores_in_one_bucket() {
    let Some(moto) = s3_support::moto() else {
        return;
    };
    let bucket = moto.unique_bucket("prefixes");
    let a = S3Store::connect(&moto.settings(&bucket, "tenant-a"))
        .await
        .expect("client a");
    let b = S3Store::connect(&moto.settings(&bucket, "tenant-a-b/"))
        .await
        .expect("client b");
    a.put("k", Bytes::from_static(b"a"), PutMode::Create)
        .await
        .expect("put a");
    b.put("k", Bytes::from_static(b"b"), PutMode::Create)
        .await
        .expect("same key under another prefix");
    let listed = a.list("").await.expect("list a");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, "k");
    assert_eq!(b.get("k").await.expect("get b").data, &b"b"[..]);
}

#[tokio::test]
async fn fs_store_persists_across_instances() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = FsStore::new(dir.path());
    let v = first
        .put("p/key", Bytes::from_static(b"kept"), PutMode::Create)
        .await
        .expect("put");
    drop(first);
    let second = FsStore::new(dir.path());
    let got = second.get("p/key").await.expect("get from a new instance");
    assert_eq!(got.data, &b"kept"[..]);
    assert_eq!(got.version, v);
    let err = second
        .put("p/key", Bytes::from_static(b"x"), PutMode::Create)
        .await
        .expect_err("still exists");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
}

/// Through the decorators the engine puts around a store (`open`'s retry
/// layer and the metering one), `get_range_placed` returns the bytes
/// `get_range` does, and where the backend places them (`places`) the
/// chosen object offset lies on a page boundary, whether it falls inside
/// the range or before it.
async fn placed_reads_round_trip(cfg: StoreConfig, places: bool) {
    use shale::store::aligned::PAGE;
    use shale::store::metered::{MeteredStore, StoreMetrics};
    let store = MeteredStore::new(
        open(&cfg).await.expect("open"),
        Arc::new(StoreMetrics::default()),
    );
    let object: Vec<u8> = (0..5 * PAGE as u32 + 77).map(|i| (i % 253) as u8).collect();
    store
        .put("placed/obj", Bytes::from(object.clone()), PutMode::Create)
        .await
        .expect("put");
    let len = object.len() as u64;
    for (range, page_at) in [
        (0..len, 4133u64),
        (0..4133 + 3 * PAGE as u64, 4133),
        (0..100, 4133),
        (4133..len, 4133),
        (8229..len - 5, 4133),
        (1..len, 0),
        (5000..6000, 5000),
    ] {
        let got = store
            .get_range_placed("placed/obj", range.clone(), page_at)
            .await
            .expect("placed read");
        assert_eq!(&got[..], &object[range.start as usize..range.end as usize]);
        if places {
            // The address object offset `page_at` has (or would have).
            let at = (got.as_ptr() as u64).wrapping_add(page_at.wrapping_sub(range.start));
            assert_eq!(at % PAGE as u64, 0, "{range:?} placed at {page_at}");
        }
        let plain = store
            .get_range("placed/obj", range.clone())
            .await
            .expect("plain read");
        assert_eq!(plain, got);
        if places {
            assert_eq!(plain.as_ptr() as usize % PAGE, 0, "{range:?} unplaced");
        }
    }
    let err = store
        .get_range_placed("placed/obj", 0..len + 1, 10)
        .await
        .expect_err("past the end");
    assert!(matches!(err, StoreError::InvalidRange { .. }), "{err:?}");
}

#[tokio::test]
async fn placed_reads_memory() {
    placed_reads_round_trip(StoreConfig::Memory, false).await;
}

#[tokio::test]
async fn placed_reads_fs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    placed_reads_round_trip(StoreConfig::Fs { path }, true).await;
}

#[tokio::test]
async fn placed_reads_s3() {
    let Some(moto) = s3_support::moto() else {
        return;
    };
    let bucket = moto.unique_bucket("placed");
    placed_reads_round_trip(moto.store_config(&bucket, ""), true).await;
}
