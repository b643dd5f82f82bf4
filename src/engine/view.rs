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

use super::allocation::{Allocation, Extent, Runs, BATCH};
use super::checkpoint::{Checkpoint, ChunkInfo};
use super::crc_table::CrcTables;
use super::error::EngineError;
use super::format::chunk::{aligned_range, verify_blocks};
use super::format::layout::chunk_key;
use super::format::manifest::{Manifest, ParentRef};
use super::format::snapshot::SnapshotObject;
use super::map::{ExtentMap, Loc};
use super::meta::manifest::read_manifest;
use super::snapshot::store::{load_chain, load_checkpoint, SnapshotError};
use super::{check_range, BlockDevice, SECTOR};
use crate::error::BlockError;
use crate::store::DynStore;

/// What a run of a view's sectors reads, through the parent chain (for
/// the read paths: it carries the chunk's CRCs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Zeros: unmapped in every layer, or explicitly zeroed.
    Zero,
    /// Data at byte `off` of the data area of chunk `info` of `volume`.
    Chunk {
        volume: u64,
        info: Arc<ChunkInfo>,
        off: u64,
    },
}

/// Where a range of a view's bytes comes from (see [`SnapshotView::sources`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Nothing was ever written there (or it was trimmed): reads as zeros.
    Unmapped,
    /// Explicitly zeroed: reads as zeros.
    Zero,
    /// Bytes in chunk `chunk` (written at `epoch`) of volume `volume`,
    /// starting at byte `offset` of its data area.
    Data {
        volume: u64,
        chunk: u64,
        epoch: u64,
        offset: u64,
    },
}

impl Source {
    /// True when the range reads as zeros without any I/O.
    pub fn is_zero(&self) -> bool {
        matches!(self, Source::Unmapped | Source::Zero)
    }

    /// The source `bytes` further on (a multiple of the sector size).
    pub fn advance(&self, bytes: u64) -> Source {
        match *self {
            Source::Data {
                volume,
                chunk,
                epoch,
                offset,
            } => Source::Data {
                volume,
                chunk,
                epoch,
                offset: offset + bytes,
            },
            other => other,
        }
    }
}

/// A byte range of a view and where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRange {
    /// Byte offset in the view (a multiple of the sector size).
    pub offset: u64,
    /// Length in bytes (a non-zero multiple of the sector size).
    pub len: u64,
    pub source: Source,
}

/// A read-only view of a frozen map of volume `volume`.
pub struct SnapshotView {
    store: DynStore,
    volume: u64,
    size: u64,
    map: ExtentMap,
    chunks: HashMap<u64, Arc<ChunkInfo>>,
    /// What unmapped ranges read through to (invariant 3).
    parent: Option<Arc<SnapshotView>>,
    /// The block-CRC tables of the chunks read (from their headers).
    tables: Arc<CrcTables>,
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
            tables: Arc::new(CrcTables::default()),
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

    /// A view of volume `volume`'s newest checkpoint (which may lag the
    /// chunks stored after it), reading through to its parent chain, and
    /// the manifest that names it.
    pub async fn of_volume(
        store: DynStore,
        volume: u64,
        size: u64,
    ) -> Result<(Manifest, SnapshotView), SnapshotError> {
        let (m, _) = read_manifest(&store, volume).await?;
        let cp = load_checkpoint(&store, &m).await?;
        let parent = match m.parent {
            Some(p) => Some(Arc::new(Self::of_parent(store.clone(), p, size).await?)),
            None => None,
        };
        let mut view = SnapshotView::new(store, &cp, size)?;
        view.parent = parent;
        Ok((m, view))
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

    /// Sectors `[start, start+len)` (inside the view) split into runs
    /// `(start, len, source)` in order, following unmapped runs down the
    /// parent chain (invariant 3).
    pub fn resolve(&self, start: u64, len: u64) -> Result<Vec<(u64, u64, Resolved)>, BlockError> {
        let mut out = Vec::new();
        for p in self.map.lookup(start, len) {
            match p.loc {
                Some(Loc::Chunk { chunk, off }) => {
                    let info = self.chunks.get(&chunk).ok_or_else(|| {
                        BlockError::Io(format!(
                            "snapshot of volume {:016x} names unknown chunk {chunk}",
                            self.volume
                        ))
                    })?;
                    let source = Resolved::Chunk {
                        volume: self.volume,
                        info: info.clone(),
                        off,
                    };
                    out.push((p.start, p.len, source));
                }
                Some(Loc::Zero | Loc::Wal(_)) => out.push((p.start, p.len, Resolved::Zero)),
                None => match &self.parent {
                    Some(parent) => out.extend(parent.resolve(p.start, p.len)?),
                    None => out.push((p.start, p.len, Resolved::Zero)),
                },
            }
        }
        Ok(out)
    }

    /// Append the allocation of sectors `[start, start+len)` to `runs`,
    /// following unmapped runs down the parent chain. Returns false when
    /// `runs` stopped taking pieces before the end of the range; what was
    /// appended is then a prefix of it.
    pub(crate) fn allocation_into(&self, start: u64, len: u64, runs: &mut Runs) -> bool {
        let (mut pos, end) = (start, start + len);
        while pos < end {
            for p in self.map.lookup_limited(pos, end - pos, BATCH) {
                let more = match p.loc {
                    None => match &self.parent {
                        Some(parent) => parent.allocation_into(p.start, p.len, runs),
                        None => runs.push(p.len, Allocation::Zero),
                    },
                    // WAL locations never occur in a checkpoint's map.
                    Some(Loc::Zero | Loc::Wal(_)) => runs.push(p.len, Allocation::Zero),
                    Some(Loc::Chunk { .. }) => runs.push(p.len, Allocation::Data),
                };
                if !more {
                    return false;
                }
                pos = p.start + p.len;
            }
        }
        true
    }

    /// Where every byte of the view comes from: ranges in ascending order
    /// that cover `[0, size)` exactly, without gaps or overlaps. Ranges
    /// unmapped in this layer take their parent's sources (to any depth);
    /// only ranges unmapped in every layer are [`Source::Unmapped`].
    /// Chunks are immutable, so two ranges with the same [`Source::Data`]
    /// hold the same bytes; nothing is read to answer this.
    pub fn sources(&self) -> Vec<SourceRange> {
        let mut out = Vec::new();
        self.sources_in(0, self.size / SECTOR, &mut out);
        out
    }

    /// Append the sources of sectors `[start, start+len)` to `out`.
    fn sources_in(&self, start: u64, len: u64, out: &mut Vec<SourceRange>) {
        for p in self.map.lookup(start, len) {
            let source = match p.loc {
                None => match &self.parent {
                    Some(parent) => {
                        parent.sources_in(p.start, p.len, out);
                        continue;
                    }
                    None => Source::Unmapped,
                },
                // WAL locations never occur in a checkpoint's map.
                Some(Loc::Wal(_)) => Source::Unmapped,
                Some(Loc::Zero) => Source::Zero,
                Some(Loc::Chunk { chunk, off }) => match self.chunks.get(&chunk) {
                    Some(info) => Source::Data {
                        volume: self.volume,
                        chunk,
                        epoch: info.epoch,
                        offset: off,
                    },
                    // `new` checked every extent names a listed chunk.
                    None => Source::Unmapped,
                },
            };
            out.push(SourceRange {
                offset: p.start * SECTOR,
                len: p.len * SECTOR,
                source,
            });
        }
    }

    async fn read_chunk(
        &self,
        volume: u64,
        info: &ChunkInfo,
        off: u64,
        dst: &mut [u8],
    ) -> Result<(), BlockError> {
        let len = dst.len() as u64;
        let (start, end) = aligned_range(off, len, info.data_len);
        let key = chunk_key(volume, info.seq, info.epoch);
        let table = self
            .tables
            .get(&self.store, volume, info)
            .await
            .map_err(|e| BlockError::Io(e.to_string()))?;
        let data = self
            .store
            .get_range(&key, info.data_start + start..info.data_start + end)
            .await
            .map_err(|e| BlockError::Io(format!("reading {key}: {e}")))?;
        verify_blocks(&table, start, &data).map_err(|e| {
            super::damage::report(&key, &e);
            BlockError::Io(format!("{key}: {e}"))
        })?;
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
        for (start, len, source) in self.resolve(offset / SECTOR, buf.len() as u64 / SECTOR)? {
            let b0 = (start * SECTOR - offset) as usize;
            let dst = &mut buf[b0..b0 + (len * SECTOR) as usize];
            match source {
                Resolved::Chunk { volume, info, off } => {
                    self.read_chunk(volume, &info, off, dst).await?
                }
                Resolved::Zero => dst.fill(0),
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

    fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        check_range(offset, len, self.size)?;
        let mut runs = Runs::new(max_runs);
        self.allocation_into(offset / SECTOR, len / SECTOR, &mut runs);
        Ok(runs.into_vec())
    }
}
