//! Deleting objects as a writer that may lose the volume while it deletes
//! (garbage collection of chunks and compaction objects).
//!
//! Invariants:
//! 1. Only objects of the deleter's own epoch or older are deleted: an
//!    object of a newer epoch belongs to a newer holder, whose map may name
//!    it, and is never ours to judge.
//! 2. Before the first delete, and again after every [`RECHECK_EVERY`]
//!    deletes, the manifest is read: if its epoch is newer than ours, the
//!    volume was taken over and the loop stops with [`EngineError::Fenced`]
//!    (a newer holder may have built a map our view of "unreferenced" does
//!    not know). A long loop thus deletes at most [`RECHECK_EVERY`] objects
//!    after a takeover, all of them of older epochs and unreferenced when
//!    the takeover's recovery read the store.

use super::error::EngineError;
use super::meta::manifest::read_manifest;
use crate::store::{DynStore, StoreError};

/// Deletes between two reads of the manifest.
pub const RECHECK_EVERY: u32 = 32;

/// Deletes objects of one volume for the writer at `epoch` (see the module
/// docs).
pub(crate) struct FencedDeleter<'a> {
    store: &'a DynStore,
    volume: u64,
    epoch: u64,
    /// Deletes since the manifest was last read (`None`: never read).
    since_check: Option<u32>,
    /// Objects deleted so far.
    pub deleted: u64,
}

impl<'a> FencedDeleter<'a> {
    pub fn new(store: &'a DynStore, volume: u64, epoch: u64) -> Self {
        FencedDeleter {
            store,
            volume,
            epoch,
            since_check: None,
            deleted: 0,
        }
    }

    /// Fail with [`EngineError::Fenced`] if the manifest's epoch is newer
    /// than ours.
    pub async fn check(&mut self) -> Result<(), EngineError> {
        let (m, _) = read_manifest(self.store, self.volume).await?;
        if m.epoch > self.epoch {
            return Err(EngineError::Fenced(format!(
                "the volume was taken over at epoch {} while epoch {} collected garbage",
                m.epoch, self.epoch
            )));
        }
        self.since_check = Some(0);
        Ok(())
    }

    /// Delete `key`, an object written at `epoch`, unless that epoch is
    /// newer than ours (then returns false and touches nothing).
    pub async fn delete(&mut self, key: &str, epoch: u64) -> Result<bool, EngineError> {
        if epoch > self.epoch {
            log::info!("keeping {key}: written at epoch {epoch}, newer than ours");
            return Ok(false);
        }
        if self.since_check.is_none_or(|n| n >= RECHECK_EVERY) {
            self.check().await?;
        }
        match self.store.delete(key).await {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.since_check = self.since_check.map(|n| n + 1);
        self.deleted += 1;
        Ok(true)
    }
}
