//! Deleting many objects at once, a bounded number in flight.
//!
//! A checkpoint that drops hundreds of dead chunks, or an open that finds
//! hundreds of orphans, must not pay one store round trip after another:
//! the objects are independent, so their deletes overlap.
//!
//! Invariants:
//! 1. At most `in_flight` (at least 1) deletes are outstanding at any time.
//! 2. Every key is tried once, whatever happened to the others; the keys
//!    whose delete failed come back with their errors, in no set order.

use futures::stream::{self, StreamExt};

use super::{ObjectStore, StoreError};

/// Deletes in flight for callers that do not say: a few times a local
/// directory's useful depth, well below what an S3 endpoint takes.
pub const DELETES_IN_FLIGHT: usize = 16;

/// Delete every key in `keys`, up to `in_flight` at once. Returns the keys
/// that could not be deleted, each with its error.
pub async fn delete_many<S: ObjectStore + ?Sized>(
    store: &S,
    keys: Vec<String>,
    in_flight: usize,
) -> Vec<(String, StoreError)> {
    stream::iter(keys)
        .map(|key| async move {
            match store.delete(&key).await {
                Ok(()) => None,
                Err(e) => Some((key, e)),
            }
        })
        .buffer_unordered(in_flight.max(1))
        .filter_map(|failed| async move { failed })
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::store::faulty::{Fault, FaultPoint, FaultRule, FaultyStore};
    use crate::store::memory::MemoryStore;
    use crate::store::{Object, ObjectMeta, PutMode, StoreResult, Version};

    /// Counts deletes outstanding at once; each takes a little while.
    #[derive(Debug)]
    struct Counting<S> {
        inner: S,
        now: AtomicUsize,
        peak: AtomicUsize,
    }

    #[async_trait]
    impl<S: ObjectStore> ObjectStore for Counting<S> {
        async fn get(&self, key: &str) -> StoreResult<Object> {
            self.inner.get(key).await
        }
        async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
            self.inner.get_range(key, range).await
        }
        async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
            self.inner.put(key, data, mode).await
        }
        async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
            self.inner.head(key).await
        }
        async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> StoreResult<()> {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.inner.delete(key).await
        }
    }

    async fn filled<S: ObjectStore>(store: &S, n: usize) -> Vec<String> {
        let mut keys = Vec::new();
        for i in 0..n {
            let key = format!("obj/{i:04}");
            store
                .put(&key, Bytes::from_static(b"x"), PutMode::Overwrite)
                .await
                .unwrap();
            keys.push(key);
        }
        keys
    }

    #[tokio::test]
    async fn every_key_is_deleted_with_deletes_overlapping_up_to_the_bound() {
        let store = Counting {
            inner: MemoryStore::new(),
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        };
        let keys = filled(&store, 40).await;
        let failed = delete_many(&store, keys, 8).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert!(store.list("obj/").await.unwrap().is_empty());
        // One at a time would peak at 1; the bound is 8.
        assert_eq!(store.peak.load(Ordering::SeqCst), 8);
    }

    #[tokio::test]
    async fn a_failed_delete_is_returned_and_the_others_still_go() {
        let store = FaultyStore::new(MemoryStore::new(), 3);
        let keys = filled(&store, 20).await;
        store.set_scoped(
            FaultPoint::Delete,
            FaultRule::share(Fault::Permanent, 1.0),
            "obj/0007",
        );
        let failed = delete_many(&store, keys, 4).await;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, "obj/0007");
        let left: Vec<String> = store
            .list("obj/")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(left, vec!["obj/0007".to_string()]);
    }
}
