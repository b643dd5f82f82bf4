//! Clones: volumes whose unmapped ranges read through to a parent snapshot
//! (to any depth), and flatten, which makes a clone stand alone.
//!
//! Invariants:
//! 1. Creating a clone writes only the new volume's manifest, naming the
//!    parent by ids ([`ParentRef`]); no data is copied and no object of the
//!    parent is ever written by a clone.
//! 2. A parent chain is followed snapshot object by snapshot object; a
//!    missing or corrupt object, or a chain that comes back to a snapshot
//!    it already passed, is [`EngineError::Parent`], never a silent zero.
//! 3. Flatten first copies (through the clone's own engine, as ordinary
//!    writes) every non-zero range the clone reads from its parent, then,
//!    with the volume closed, drops the parent from the manifest in one
//!    compare-and-swap. A crash before the swap leaves a clone that still
//!    reads through (the copies read the same bytes); after it, a volume
//!    that stands alone.
//! 4. Flatten is refused while a snapshot of the clone reads through the
//!    parent: such a snapshot would lose its parent's protection from
//!    deletion (the catalog only sees the volume record's parent).

use super::checkpoint::Checkpoint;
use super::error::EngineError;
use super::format::layout::checkpoint_key;
use super::format::manifest::ParentRef;
use super::format::snapshot::SnapshotObject;
use super::meta::manifest::{self, Put};
use super::meta::prepare;
use super::snapshot::store::{committed_checkpoint, list_snapshots, SnapshotError};
use super::snapshot::swap_checkpoint;
use super::view::{Resolved, SnapshotView};
use super::volume::Volume;
use super::{BlockDevice, SECTOR};
use crate::store::DynStore;

/// Bytes read and written at a time while flattening.
const COPY_PIECE: usize = 1 << 20;
/// Granularity at which all-zero data is skipped while flattening.
const ZERO_BLOCK: usize = 64 << 10;

/// Make `new_id` a clone of `snap`: create its manifest (no checkpoint, no
/// chunks) naming `snap` as its parent. `new_id` must be fresh: the
/// manifest is created, never replaced.
pub async fn write_clone(
    store: &DynStore,
    snap: &SnapshotObject,
    new_id: u64,
) -> Result<(), SnapshotError> {
    let parent = ParentRef {
        volume: snap.volume,
        snapshot: snap.id,
    };
    let m = prepare::fresh(new_id, 0, Some(parent));
    match manifest::create(store, &m).await? {
        Put::Stored(_) => Ok(()),
        Put::Conflict => Err(SnapshotError::State {
            volume: new_id,
            reason: "already has a manifest; a clone needs a fresh volume".into(),
        }),
    }
}

/// What [`copy_parent_data`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes the clone read from its parent's chunks (all were read).
    pub read_through: u64,
    /// Of those, bytes that held data and were written into the clone.
    pub copied: u64,
}

/// Byte ranges `(offset, len)` of `vol` where it reads data from its parent
/// chain (unmapped in its live map, and a parent layer holds data there);
/// empty for a volume without a parent.
pub fn read_through_ranges(vol: &Volume) -> Result<Vec<(u64, u64)>, EngineError> {
    let Some(parent) = &vol.inner.parent else {
        return Ok(Vec::new());
    };
    let sectors = vol.inner.size / SECTOR;
    let unmapped: Vec<(u64, u64)> = {
        let st = vol.inner.shared.lock();
        st.view_lookup(0, sectors)
            .into_iter()
            .filter(|p| p.loc.is_none())
            .map(|p| (p.start, p.len))
            .collect()
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, len) in unmapped {
        let runs = parent
            .resolve(start, len)
            .map_err(|e| EngineError::Parent {
                volume: vol.inner.id,
                reason: e.to_string(),
            })?;
        for (s, l, source) in runs {
            if !matches!(source, Resolved::Chunk { .. }) {
                continue;
            }
            let (off, n) = (s * SECTOR, l * SECTOR);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += n,
                _ => out.push((off, n)),
            }
        }
    }
    Ok(out)
}

/// The first step of a flatten (invariant 3): write into `vol` every
/// non-zero range it reads from its parent, then flush. Ranges no layer of
/// the parent chain holds data for are skipped without reading. `progress` is
/// called with (bytes done, bytes to do) after each piece. The caller must
/// be the volume's only user until it closes it.
pub async fn copy_parent_data(
    vol: &Volume,
    mut progress: impl FnMut(u64, u64),
) -> Result<CopyStats, EngineError> {
    let ranges = read_through_ranges(vol)?;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let mut stats = CopyStats::default();
    let mut buf = vec![0u8; COPY_PIECE];
    for (start, len) in ranges {
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(COPY_PIECE as u64) as usize;
            let piece = &mut buf[..n];
            vol.read(off, piece).await.map_err(block_err)?;
            for (i, run) in nonzero_runs(piece) {
                vol.write(off + i as u64, run, false)
                    .await
                    .map_err(block_err)?;
                stats.copied += run.len() as u64;
            }
            off += n as u64;
            stats.read_through += n as u64;
            progress(stats.read_through, total);
        }
    }
    vol.flush().await.map_err(block_err)?;
    Ok(stats)
}

fn block_err(e: crate::error::BlockError) -> EngineError {
    match e {
        crate::error::BlockError::Fenced(m) => EngineError::Fenced(m),
        crate::error::BlockError::Closed => EngineError::Closed,
        other => EngineError::LocalIo(format!("copying from the parent: {other}")),
    }
}

/// `(offset in data, run)` for each maximal run of [`ZERO_BLOCK`]-sized
/// blocks of `data` that are not all zero.
fn nonzero_runs(data: &[u8]) -> Vec<(usize, &[u8])> {
    let mut out = Vec::new();
    let mut run_start = None;
    let blocks = data.len().div_ceil(ZERO_BLOCK);
    for b in 0..=blocks {
        let block = data.get(b * ZERO_BLOCK..((b + 1) * ZERO_BLOCK).min(data.len()));
        let nonzero = block.is_some_and(|blk| blk.iter().any(|&x| x != 0));
        match (nonzero, run_start) {
            (true, None) => run_start = Some(b * ZERO_BLOCK),
            (false, Some(s)) => {
                let end = (b * ZERO_BLOCK).min(data.len());
                out.push((s, &data[s..end]));
                run_start = None;
            }
            _ => {}
        }
    }
    out
}

/// The last step of a flatten (invariant 3): on a detached volume of
/// `size` bytes closed cleanly after [`copy_parent_data`], commit a
/// checkpoint without zero ranges and a manifest without the parent
/// (compare-and-swap). `epoch` is the caller's lease epoch. Refused if the
/// committed map still leaves a range to the parent's data (the copy did
/// not finish). Returns false if the volume had no parent (nothing to do,
/// e.g. a flatten finished before a crash).
pub async fn finish_flatten(
    store: &DynStore,
    volume: u64,
    size: u64,
    epoch: u64,
) -> Result<bool, SnapshotError> {
    let (m, version, cp) = committed_checkpoint(store, volume).await?;
    let Some(parent) = m.parent else {
        return Ok(false);
    };
    if let Some((start, len)) = first_uncopied(store, &cp, parent, size).await? {
        return Err(SnapshotError::State {
            volume,
            reason: format!(
                "bytes {}..{} still read from the parent; copy them before dropping it",
                start * SECTOR,
                (start + len) * SECTOR
            ),
        });
    }
    let through: Vec<String> = list_snapshots(store, volume)
        .await?
        .into_iter()
        .filter(|s| s.parent.is_some())
        .map(|s| s.name)
        .collect();
    if !through.is_empty() {
        return Err(SnapshotError::State {
            volume,
            reason: format!(
                "snapshots {} read through the parent; delete them before flattening",
                through.join(", ")
            ),
        });
    }
    let stand_alone = Checkpoint {
        zeros: Vec::new(),
        ..cp
    };
    let key = format!(
        "{}-flatten",
        checkpoint_key(volume, m.checkpoint_chunk, epoch)
    );
    let new = prepare::flattened(&m, key.clone());
    let conflict = format!(
        "the manifest changed during the flatten (is the volume attached?); \
         it still reads through {parent}"
    );
    swap_checkpoint(store, &m, version, &key, &stand_alone, new, &conflict).await?;
    log::info!("volume {volume:x} no longer reads through {parent}");
    Ok(true)
}

/// The first sector run `(start, len)` that `cp` leaves unmapped and a
/// layer of the parent chain holds data for.
async fn first_uncopied(
    store: &DynStore,
    cp: &Checkpoint,
    parent: ParentRef,
    size: u64,
) -> Result<Option<(u64, u64)>, SnapshotError> {
    let view = SnapshotView::of_parent(store.clone(), parent, size).await?;
    let map = cp
        .to_map(size / SECTOR)
        .map_err(|source| EngineError::Checkpoint {
            key: format!("checkpoint of volume {:016x}", cp.volume),
            source,
        })?;
    for gap in map.lookup(0, size / SECTOR) {
        if gap.loc.is_some() {
            continue;
        }
        let runs = view
            .resolve(gap.start, gap.len)
            .map_err(|e| EngineError::Parent {
                volume: parent.volume,
                reason: e.to_string(),
            })?;
        if let Some((s, l, _)) = runs
            .into_iter()
            .find(|r| matches!(r.2, Resolved::Chunk { .. }))
        {
            return Ok(Some((s, l)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_runs_skip_zero_blocks() {
        let b = ZERO_BLOCK;
        let mut data = vec![0u8; 5 * b + 512];
        data[10] = 1;
        data[b + 5] = 2;
        data[3 * b] = 3;
        data[5 * b + 100] = 4;
        let runs: Vec<(usize, usize)> = nonzero_runs(&data)
            .iter()
            .map(|(o, r)| (*o, r.len()))
            .collect();
        assert_eq!(runs, vec![(0, 2 * b), (3 * b, b), (5 * b, 512)]);
        assert!(nonzero_runs(&vec![0u8; 3 * b]).is_empty());
        assert_eq!(nonzero_runs(&[7u8; 100]).len(), 1);
        assert!(nonzero_runs(&[]).is_empty());
    }
}
