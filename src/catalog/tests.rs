use std::sync::Arc;

use super::*;
use crate::store::memory::MemoryStore;
use crate::store::ObjectStore;

/// Every key in the store.
async fn keys(store: &MemoryStore) -> Vec<String> {
    let all = store.list("").await.unwrap();
    all.into_iter().map(|m| m.key).collect()
}

fn catalog() -> (Catalog, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    (Catalog::new(store.clone()), store)
}

const GIB: u64 = 1 << 30;

#[tokio::test]
async fn create_get_list_delete() {
    let (cat, store) = catalog();
    let a = cat.create("alpha", GIB, false, 1000).await.unwrap();
    let b = cat.create("beta", 8192, true, 2000).await.unwrap();
    assert_eq!(a.id, 1);
    assert_eq!(b.id, 2);
    assert_eq!(a.state, VolumeState::Ready);
    assert_eq!(cat.get("alpha").await.unwrap(), a);
    assert_eq!(cat.get("beta").await.unwrap(), b);
    assert_eq!(cat.list().await.unwrap(), vec![a.clone(), b.clone()]);

    // Some volume data, plus a neighbour whose prefix must not be touched.
    for (k, len) in [
        ("volumes/0000000000000001/chunk-1", 100),
        ("volumes/0000000000000001/wal/x", 20),
        ("volumes/0000000000000002/chunk-1", 7),
    ] {
        store
            .put(k, Bytes::from(vec![0u8; len]), PutMode::Overwrite)
            .await
            .unwrap();
    }
    assert_eq!(
        cat.usage(&a).await.unwrap(),
        Usage {
            objects: 2,
            bytes: 120
        }
    );
    let (gone, removed) = cat.delete("alpha", 0).await.unwrap();
    assert_eq!(gone.id, a.id);
    assert_eq!(
        removed,
        Usage {
            objects: 2,
            bytes: 120
        }
    );
    assert!(matches!(
        cat.get("alpha").await,
        Err(CatalogError::NotFound { name }) if name == "alpha"
    ));
    assert_eq!(cat.list().await.unwrap(), vec![b.clone()]);
    assert!(keys(&store)
        .await
        .contains(&"volumes/0000000000000002/chunk-1".to_string()));
    assert!(!keys(&store)
        .await
        .iter()
        .any(|k| k.starts_with("volumes/0000000000000001/")));

    // Ids are never reused, even for the same name.
    let again = cat.create("alpha", GIB, false, 3000).await.unwrap();
    assert_eq!(again.id, 3);
}

#[tokio::test]
async fn duplicate_names_are_refused_and_keep_the_original() {
    let (cat, _) = catalog();
    let first = cat.create("vol", GIB, false, 1).await.unwrap();
    let e = cat.create("vol", 2 * GIB, true, 2).await.unwrap_err();
    assert!(matches!(e, CatalogError::AlreadyExists { .. }), "{e}");
    assert_eq!(e.to_string(), "volume \"vol\" already exists");
    assert_eq!(cat.get("vol").await.unwrap(), first);
}

#[tokio::test]
async fn bad_names_and_sizes_write_nothing() {
    let (cat, store) = catalog();
    let long = "a".repeat(65);
    for name in [
        "",
        ".hidden",
        "-x",
        "a b",
        "a/b",
        "a@snap",
        "é",
        long.as_str(),
    ] {
        let e = cat.create(name, GIB, false, 0).await.unwrap_err();
        assert!(
            matches!(e, CatalogError::InvalidName { .. }),
            "{name:?}: {e}"
        );
        assert!(e.to_string().contains("1 to 64 characters"), "{e}");
    }
    for size in [0, 4095, 4097, 512, MAX_VOLUME_SIZE + 4096] {
        let e = cat.create("ok", size, false, 0).await.unwrap_err();
        assert!(matches!(e, CatalogError::InvalidSize { .. }), "{size}: {e}");
    }
    assert!(keys(&store).await.is_empty(), "{:?}", keys(&store).await);
    let max_name = "A".repeat(64);
    for name in ["a", "A-1", "x.y_z", "0", max_name.as_str()] {
        cat.create(name, MAX_VOLUME_SIZE, false, 0).await.unwrap();
    }
    assert!(matches!(
        cat.get("../x").await,
        Err(CatalogError::InvalidName { .. })
    ));
}

#[tokio::test]
async fn missing_volumes_are_not_found() {
    let (cat, _) = catalog();
    assert!(matches!(
        cat.get("nope").await,
        Err(CatalogError::NotFound { .. })
    ));
    let e = cat.delete("nope", 0).await.unwrap_err();
    assert_eq!(e.to_string(), "volume \"nope\" not found");
    assert!(cat.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn interrupted_delete_is_finished_by_a_second_delete() {
    let (cat, store) = catalog();
    let rec = cat.create("v", GIB, false, 0).await.unwrap();
    store
        .put(
            "volumes/0000000000000001/chunk",
            Bytes::from_static(b"data"),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    // Simulate a crash right after the record was marked deleting.
    let (marked, was_ready) = cat.mark_deleting("v").await.unwrap();
    assert_eq!(marked.state, VolumeState::Deleting);
    assert!(was_ready);
    let seen = cat.get("v").await.unwrap();
    assert_eq!(seen.state, VolumeState::Deleting);
    assert_eq!(seen.id, rec.id);
    let (_, removed) = cat.delete("v", 0).await.unwrap();
    assert_eq!(removed.objects, 1);
    assert!(keys(&store)
        .await
        .iter()
        .all(|k| !k.starts_with("volumes/")));
    assert!(matches!(
        cat.get("v").await,
        Err(CatalogError::NotFound { .. })
    ));
}

#[tokio::test]
async fn corrupt_records_are_reported_not_trusted() {
    let (cat, store) = catalog();
    store
        .put(
            "catalog/volumes/bad",
            Bytes::from_static(b"{not json"),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    let e = cat.get("bad").await.unwrap_err();
    assert!(matches!(e, CatalogError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("catalog/volumes/bad"), "{e}");
    assert!(cat.list().await.is_err());

    let (cat, store) = catalog();
    let rec = cat.create("real", GIB, false, 0).await.unwrap();
    let json = serde_json::to_vec(&rec).unwrap();
    store
        .put(
            "catalog/volumes/copy",
            Bytes::from(json),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    assert!(matches!(
        cat.get("copy").await,
        Err(CatalogError::Corrupt { .. })
    ));

    store
        .put(
            "catalog/next-id",
            Bytes::from_static(b"garbage"),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    assert!(matches!(
        cat.create("other", GIB, false, 0).await,
        Err(CatalogError::Corrupt { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_get_unique_ids_and_one_winner_per_name() {
    let (cat, _) = catalog();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let cat = cat.clone();
        tasks.push(tokio::spawn(async move {
            cat.create(&format!("v{i}"), GIB, false, 0).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap().id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8);

    let mut tasks = Vec::new();
    for i in 0..8 {
        let cat = cat.clone();
        tasks.push(tokio::spawn(async move {
            cat.create("same", GIB + i * 4096, false, 0).await
        }));
    }
    let mut winners = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => winners += 1,
            Err(CatalogError::AlreadyExists { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(cat.list().await.unwrap().len(), 9);
}

#[tokio::test]
async fn a_volume_with_a_live_lease_is_not_deleted() {
    use crate::catalog::lease::Lease;
    use crate::clock::{DynClock, ManualClock};
    use std::time::Duration;

    let (cat, store) = catalog();
    let rec = cat.create("busy", GIB, false, 0).await.unwrap();
    let chunk = "volumes/0000000000000001/chunk";
    store
        .put(chunk, Bytes::from_static(b"data"), PutMode::Overwrite)
        .await
        .unwrap();
    let clock: DynClock = Arc::new(ManualClock::new(Duration::from_secs(1000)));
    let lease = Lease::acquire(
        store.clone(),
        rec.id,
        "host:42",
        Duration::from_secs(30),
        clock,
    )
    .await
    .unwrap();
    let expires = lease.expires_at_ms();

    let e = cat.delete("busy", expires - 1).await.unwrap_err();
    assert!(matches!(e, CatalogError::InUse { .. }), "{e}");
    assert!(e.to_string().contains("host:42"), "{e}");
    // Nothing was lost and the volume is usable again.
    assert_eq!(cat.get("busy").await.unwrap(), rec);
    assert!(keys(&store).await.contains(&chunk.to_string()));

    // Once the lease has expired, delete goes ahead.
    let (_, removed) = cat.delete("busy", expires).await.unwrap();
    assert_eq!(removed.objects, 2, "chunk and lease");
    assert!(keys(&store)
        .await
        .iter()
        .all(|k| !k.starts_with("volumes/")));
}
