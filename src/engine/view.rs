//! A read-only [`BlockDevice`] over a frozen map (a snapshot's checkpoint)
//! and the object store.
//!
//! Invariants:
//! 1. Every byte read from a chunk was checked against the chunk's block
//!    CRCs; a mismatch or a missing chunk is [`BlockError::Io`].
//! 2. Writes, trims and zeroing fail with [`BlockError::ReadOnly`] and change
//!    nothing; `flush` succeeds (there is nothing to make durable).
//! 3. A view of a clone's snapshot (or a clone's parent) has a `parent`
//!    view: ranges unmapped in this map read from it, to any depth;
//!    [`Loc::Zero`] ranges read as zeros. A view without a parent reads
//!    unmapped ranges as zeros.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::checkpoint::{Checkpoint, ChunkInfo};
use super::chunk::{aligned_range, chunk_key, verify_blocks};
use super::clone::load_chain;
use super::error::EngineError;
use super::map::{ExtentMap, Loc};
use super::snapshot::{ParentRef, SnapshotObject};
use super::{check_range, BlockDevice, SECTOR};
use crate::error::BlockError;
use crate::store::DynStore;

/// A read-only view of a frozen map of volume `volume`.
pub struct SnapshotView {
    store: DynStore,
    volume: u64,
    size: u64,
    map: ExtentMap,
    chunks: HashMap<u64, Arc<ChunkInfo>>,
    /// What unmapped ranges read through to (invariant 3).
    parent: Option<Arc<SnapshotView>>,
}

impl std::fmt::Debug for SnapshotView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotView")
            .field("volume", &self.volume)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl SnapshotView {
    /// A view of `cp` (whose chunks live under `cp.volume`'s prefix) as a
    /// device of `size` bytes. Fails if the checkpoint does not fit `size`.
    pub fn new(store: DynStore, cp: &Checkpoint, size: u64) -> Result<SnapshotView, EngineError> {
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(EngineError::InvalidParams(format!(
                "size {size} must be a non-zero multiple of {SECTOR}"
            )));
        }
        let map = cp
            .to_map(size / SECTOR)
            .map_err(|source| EngineError::Checkpoint {
                key: format!("snapshot of volume {:016x}", cp.volume),
                source,
            })?;
        let chunks = cp
            .chunks
            .iter()
            .map(|c| (c.seq, Arc::new(c.clone())))
            .collect();
        Ok(SnapshotView {
            store,
            volume: cp.volume,
            size,
            map,
            chunks,
            parent: None,
        })
    }

    /// A view of snapshot `snap` as a device of `size` bytes, reading
    /// through to its parent chain (if it is a clone's snapshot).
    pub async fn of_snapshot(
        store: DynStore,
        snap: &SnapshotObject,
        size: u64,
    ) -> Result<SnapshotView, EngineError> {
        let parent = match snap.parent {
            Some(p) => Some(Arc::new(Self::of_parent(store.clone(), p, size).await?)),
            None => None,
        };
        let mut view = SnapshotView::new(store, &snap.checkpoint, size)?;
        view.parent = parent;
        Ok(view)
    }

    /// The view a clone reads through to: snapshot `parent` and its own
    /// parents, every layer `size` bytes. Fails with
    /// [`EngineError::Parent`] if a snapshot in the chain is missing or
    /// corrupt, or the chain loops.
    pub async fn of_parent(
        store: DynStore,
        parent: ParentRef,
        size: u64,
    ) -> Result<SnapshotView, EngineError> {
        let chain = load_chain(&store, parent).await?;
        let mut view: Option<SnapshotView> = None;
        for snap in chain.iter().rev() {
            let mut layer = SnapshotView::new(store.clone(), &snap.checkpoint, size)?;
            layer.parent = view.map(Arc::new);
            view = Some(layer);
        }
        view.ok_or_else(|| EngineError::Parent {
            volume: parent.volume,
            reason: "empty parent chain".into(),
        })
    }

    /// Sector ranges `(start, len)` this layer's own map holds (data or
    /// explicit zeros; not what it reads through to its parent).
    pub fn mapped_ranges(&self) -> Vec<(u64, u64)> {
        self.map.iter().map(|(s, l, _)| (s, l)).collect()
    }

    /// The view unmapped ranges read through to, if any.
    pub fn parent(&self) -> Option<&Arc<SnapshotView>> {
        self.parent.as_ref()
    }

    /// Number of layers: 1 plus the parent's depth.
    pub fn depth(&self) -> usize {
        1 + self.parent.as_ref().map_or(0, |p| p.depth())
    }

    async fn read_chunk(
        &self,
        info: &ChunkInfo,
        off: u64,
        dst: &mut [u8],
    ) -> Result<(), BlockError> {
        let len = dst.len() as u64;
        let (start, end) = aligned_range(off, len, info.data_len);
        let key = chunk_key(self.volume, info.seq, info.epoch);
        let data = self
            .store
            .get_range(&key, info.data_start + start..info.data_start + end)
            .await
            .map_err(|e| BlockError::Io(format!("reading {key}: {e}")))?;
        verify_blocks(&info.crcs, start, &data)
            .map_err(|e| BlockError::Io(format!("{key}: {e}")))?;
        let s = (off - start) as usize;
        let src = data
            .get(s..s + dst.len())
            .ok_or_else(|| BlockError::Io(format!("{key} returned a short range")))?;
        dst.copy_from_slice(src);
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for SnapshotView {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.size)?;
        for p in self.map.lookup(offset / SECTOR, buf.len() as u64 / SECTOR) {
            let b0 = (p.start * SECTOR - offset) as usize;
            let dst = &mut buf[b0..b0 + (p.len * SECTOR) as usize];
            match p.loc {
                Some(Loc::Chunk { chunk, off }) => {
                    let info = self.chunks.get(&chunk).ok_or_else(|| {
                        BlockError::Io(format!("snapshot names unknown chunk {chunk}"))
                    })?;
                    self.read_chunk(info, off, dst).await?;
                }
                None => match &self.parent {
                    Some(parent) => parent.read(p.start * SECTOR, dst).await?,
                    None => dst.fill(0),
                },
                Some(Loc::Zero | Loc::Wal(_)) => dst.fill(0),
            }
        }
        Ok(())
    }

    async fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }
}
