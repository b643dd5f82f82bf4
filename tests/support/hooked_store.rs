//! A pass-through object store with hooks: tests that count, hold, slow
//! down or fail some calls wrap a real store in [`Hooked`] and write only
//! the hooks they need ([`StoreHook`]); every call they do not hook goes
//! to the inner store unchanged.

#![allow(dead_code)]

use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use shale::store::{DynStore, Object, ObjectMeta, ObjectStore, PutMode, StoreResult, Version};

/// What a test adds to a store's calls. Every hook defaults to doing
/// nothing; an error from a `before_*` hook (or [`StoreHook::check`])
/// fails the call without reaching the inner store.
#[async_trait]
pub trait StoreHook: std::fmt::Debug + Send + Sync + 'static {
    /// Runs first in every call (get, get_range, put, head, list, delete).
    fn check(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Runs before a ranged GET (placed or not) reaches the inner store.
    async fn before_get_range(&self, _key: &str, _range: &Range<u64>) -> StoreResult<()> {
        Ok(())
    }

    /// Runs before a put reaches the inner store; `inner` is that store.
    async fn before_put(&self, _inner: &DynStore, _key: &str) -> StoreResult<()> {
        Ok(())
    }

    /// Runs after a put that `before_put` let through, however it ended.
    fn after_put(&self, _key: &str) {}

    /// Runs before a delete reaches the inner store; `inner` is that store.
    async fn before_delete(&self, _inner: &DynStore, _key: &str) -> StoreResult<()> {
        Ok(())
    }

    /// The puts in flight the store asks for (`None`: the inner store's).
    fn puts_in_flight(&self) -> Option<usize> {
        None
    }
}

/// `inner` with `hook` run around its calls.
#[derive(Debug)]
pub struct Hooked<H> {
    pub inner: DynStore,
    pub hook: H,
}

impl<H: StoreHook> Hooked<H> {
    pub fn new(inner: DynStore, hook: H) -> std::sync::Arc<Hooked<H>> {
        std::sync::Arc::new(Hooked { inner, hook })
    }
}

#[async_trait]
impl<H: StoreHook> ObjectStore for Hooked<H> {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        self.hook.check()?;
        self.inner.get(key).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.hook.check()?;
        self.hook.before_get_range(key, &range).await?;
        self.inner.get_range(key, range).await
    }

    async fn get_range_placed(
        &self,
        key: &str,
        range: Range<u64>,
        page_at: u64,
    ) -> StoreResult<Bytes> {
        self.hook.check()?;
        self.hook.before_get_range(key, &range).await?;
        self.inner.get_range_placed(key, range, page_at).await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        self.hook.check()?;
        self.hook.before_put(&self.inner, key).await?;
        let r = self.inner.put(key, data, mode).await;
        self.hook.after_put(key);
        r
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.hook.check()?;
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        self.hook.check()?;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.hook.check()?;
        self.hook.before_delete(&self.inner, key).await?;
        self.inner.delete(key).await
    }

    fn puts_in_flight(&self) -> usize {
        self.hook
            .puts_in_flight()
            .unwrap_or_else(|| self.inner.puts_in_flight())
    }
}
