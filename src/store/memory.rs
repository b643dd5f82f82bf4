//! In-memory store for tests: a `BTreeMap` behind one mutex.
//!
//! Invariants: every successful `put` takes a fresh version from one counter
//! that only grows, so no two writes ever share a version, even after a key
//! is deleted and re-created. All checks and updates of one call happen under
//! the single lock, which makes Create and IfMatch atomic.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    check_range, validate_key, validate_prefix, Object, ObjectMeta, ObjectStore, PutMode,
    StoreError, StoreResult, Version,
};

#[derive(Debug, Default)]
struct Inner {
    objects: BTreeMap<String, (Bytes, u64)>,
    next_version: u64,
}

/// A store kept in process memory; lost when dropped.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated
        // (each update is one insert), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn version(v: u64) -> Version {
    Version(v.to_string())
}

fn not_found(key: &str) -> StoreError {
    StoreError::NotFound {
        key: key.to_string(),
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        validate_key(key)?;
        let inner = self.lock();
        let (data, v) = inner.objects.get(key).ok_or_else(|| not_found(key))?;
        Ok(Object {
            data: data.clone(),
            version: version(*v),
        })
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        validate_key(key)?;
        let inner = self.lock();
        let (data, _) = inner.objects.get(key).ok_or_else(|| not_found(key))?;
        check_range(key, &range, data.len() as u64)?;
        Ok(data.slice(range.start as usize..range.end as usize))
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        validate_key(key)?;
        let mut inner = self.lock();
        let current = inner.objects.get(key).map(|(_, v)| version(*v));
        match (&mode, current) {
            (PutMode::Create, Some(_)) => {
                return Err(StoreError::AlreadyExists {
                    key: key.to_string(),
                })
            }
            (PutMode::IfMatch(want), current) if current.as_ref() != Some(want) => {
                return Err(StoreError::PreconditionFailed {
                    key: key.to_string(),
                })
            }
            _ => {}
        }
        inner.next_version += 1;
        let v = inner.next_version;
        inner.objects.insert(key.to_string(), (data, v));
        Ok(version(v))
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        validate_key(key)?;
        let inner = self.lock();
        let (data, v) = inner.objects.get(key).ok_or_else(|| not_found(key))?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: data.len() as u64,
            version: version(*v),
        })
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let inner = self.lock();
        Ok(inner
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (data, v))| ObjectMeta {
                key: k.clone(),
                size: data.len() as u64,
                version: version(*v),
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        validate_key(key)?;
        self.lock().objects.remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn versions_never_repeat_across_delete_and_recreate() {
        let s = MemoryStore::new();
        let v1 = s.put("a", Bytes::from_static(b"x"), PutMode::Create).await;
        let v1 = v1.expect("create");
        s.delete("a").await.expect("delete");
        let v2 = s.put("a", Bytes::from_static(b"x"), PutMode::Create).await;
        assert_ne!(v1, v2.expect("re-create"));
    }

    #[tokio::test]
    async fn list_stops_at_prefix_end() {
        let s = MemoryStore::new();
        for k in ["a/1", "a/2", "ab", "b/1"] {
            s.put(k, Bytes::new(), PutMode::Overwrite)
                .await
                .expect("put");
        }
        let keys: Vec<String> = s
            .list("a/")
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["a/1", "a/2"]);
    }
}
