//! Compaction: rewrite the live data of sparse chunks into one new object so
//! the sparse chunks lose their last live sector and are deleted by the
//! normal checkpoint path.
//!
//! Runs inside the meta task, right before a checkpoint. The destage task
//! keeps applying chunks meanwhile: compaction changes the maps only in
//! one lock section, and only where they still hold the bytes it copied
//! (invariant 3), so a chunk applied while it reads or puts wins.
//!
//! Invariants:
//! 1. A compaction object's id has [`COMPACTED_BIT`] set and its key lives
//!    under [`compacted_prefix`]: it never takes a number from the normal
//!    chunk sequence, so recovery's chain of chunks after the checkpoint is
//!    untouched. Ids only grow within a volume ([`State::next_compacted`]).
//! 2. Chunks that any snapshot names ([`RetainSet`]) are never compacted
//!    (they could not be deleted, so rewriting them would only add bytes).
//! 3. The object is put (create-only, fencing checked) before any map
//!    names it; then, under the state lock, only the ranges of `stored`
//!    and `live` that STILL point at the very bytes copied are re-pointed
//!    (a newer write always wins). The maps stay content-equal.
//! 4. The old chunks are deleted only by [`super::commit::checkpoint`]
//!    after the checkpoint that no longer names them committed; readers
//!    that resolved an old location earlier see NotFound and start over.
//! 5. A crash before that commit leaves the old chunks named by the
//!    committed checkpoint and the new object unreferenced: recovery deletes
//!    such orphans ([`clean_orphans`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::checkpoint::ChunkInfo;
use super::error::EngineError;
use super::format::chunk::{decode_header, encode, verify_blocks, ChunkExtent, ChunkHeader};
use super::format::layout::{chunk_key, compacted_prefix, parse_chunk_name};
use super::format::limits::COMPACTED_BIT;
use super::map::Loc;
use super::retain_index::RetainSet;
use super::state::{ChunkEntry, State};
use super::volume_core::Inner;
use super::SECTOR;
use crate::store::DynStore;

/// Most sparse chunks rewritten in one round.
const MAX_SOURCES: usize = 64;

/// A live range of a sparse chunk: `sectors` at `lba`, stored at byte
/// `off` of chunk `chunk`'s data area.
#[derive(Debug, Clone, Copy)]
struct LiveRange {
    lba: u64,
    sectors: u64,
    chunk: u64,
    off: u64,
}

/// One round of compaction, if enabled and worthwhile. Errors leave the
/// maps untouched (at most an unreferenced object stays behind).
pub(crate) async fn compact(inner: &Inner) -> Result<(), EngineError> {
    let pct = inner.cfg.compact_below_percent;
    if pct == 0 {
        return Ok(());
    }
    let retain = RetainSet::load(&inner.store, inner.id).await;
    let (sources, ranges) = {
        let st = inner.shared.lock();
        pick(&st, &retain, pct, inner.cfg.chunk_size)
    };
    if sources.is_empty() {
        return Ok(());
    }
    let id = {
        let mut st = inner.shared.lock();
        let id = COMPACTED_BIT | st.next_compacted.max(1);
        st.next_compacted = (id & !COMPACTED_BIT) + 1;
        id
    };
    // Read every live range, verified against the chunk's CRCs.
    let mut data = Vec::new();
    let mut extents = Vec::with_capacity(ranges.len());
    let mut moved = Vec::with_capacity(ranges.len());
    for (chunk, info) in &sources {
        let key = chunk_key(inner.id, info.seq, info.epoch);
        let body = inner
            .store
            .get_range(&key, info.data_start..info.data_start + info.data_len)
            .await?;
        let table = inner.tables.get(&inner.store, inner.id, info).await?;
        verify_blocks(&table, 0, &body).map_err(|source| EngineError::Chunk {
            key: key.clone(),
            source,
        })?;
        for r in ranges.iter().filter(|r| r.chunk == *chunk) {
            let len = (r.sectors * SECTOR) as usize;
            let part = body
                .get(r.off as usize..r.off as usize + len)
                .ok_or_else(|| EngineError::LocalIo(format!("{key}: live range past its data")))?;
            let new_off = data.len() as u64;
            data.extend_from_slice(part);
            extents.push(ChunkExtent {
                lba: r.lba,
                sectors: r.sectors,
                data_off: Some(new_off),
            });
            moved.push((*r, new_off));
        }
    }
    let seq_mark = inner.shared.lock().stored_seq;
    let header = ChunkHeader {
        volume: inner.id,
        epoch: inner.epoch,
        chunk_seq: id,
        first_seq: seq_mark,
        last_seq: seq_mark,
        extents,
        block_crcs: Vec::new(),
        data_len: data.len() as u64,
        header_len: 0,
    };
    let key = chunk_key(inner.id, id, inner.epoch);
    let obj = encode(&header, &data);
    let decoded = decode_header(&obj).map_err(|source| EngineError::Chunk {
        key: key.clone(),
        source,
    })?;
    let size = obj.len() as u64;
    inner.put_create(&key, Bytes::from(obj).into()).await?;
    let info = Arc::new(ChunkInfo {
        seq: id,
        epoch: inner.epoch,
        data_start: decoded.header_len,
        data_len: decoded.data_len,
        table_crc: super::format::chunk::table_crc(&decoded.block_crcs),
    });
    inner
        .tables
        .insert(inner.id, &info, decoded.block_crcs.into());
    let drained = {
        let mut st = inner.shared.lock();
        repoint(&mut st, info, &moved);
        sources
            .keys()
            .filter(|c| st.chunks.get(c).is_some_and(|e| e.live_sectors == 0))
            .count() as u64
    };
    let c = &inner.counters;
    c.chunks_compacted.fetch_add(drained, Ordering::Relaxed);
    c.compacted_bytes_written.fetch_add(size, Ordering::Relaxed);
    log::info!(
        "volume {:x}: compacted {} sparse chunks into {key} ({size} bytes)",
        inner.id,
        sources.len()
    );
    Ok(())
}

/// The sparse chunks to rewrite (live share below `pct` percent, not
/// retained by a snapshot), sparsest first, up to about `budget` live
/// bytes, with the ranges of `stored` that use them in map order.
fn pick(
    st: &State,
    retain: &RetainSet,
    pct: u64,
    budget: u64,
) -> (BTreeMap<u64, Arc<ChunkInfo>>, Vec<LiveRange>) {
    let mut sparse: Vec<&ChunkEntry> = st
        .chunks
        .values()
        .filter(|e| {
            let live = e.live_sectors * SECTOR;
            live > 0
                && (live as u128) * 100 < (e.info.data_len as u128) * (pct as u128)
                && !retain.keeps(e.info.seq, e.info.epoch)
        })
        .collect();
    sparse.sort_by_key(|e| (e.live_sectors, e.info.seq));
    let mut sources = BTreeMap::new();
    let mut total = 0;
    for e in sparse {
        if sources.len() >= MAX_SOURCES || (total > 0 && total + e.live_sectors * SECTOR > budget) {
            break;
        }
        total += e.live_sectors * SECTOR;
        sources.insert(e.info.seq, e.info.clone());
    }
    let ranges = if sources.is_empty() {
        Vec::new()
    } else {
        st.stored
            .iter()
            .filter_map(|(lba, sectors, loc)| match loc {
                Loc::Chunk { chunk, off } if sources.contains_key(&chunk) => Some(LiveRange {
                    lba,
                    sectors,
                    chunk,
                    off,
                }),
                _ => None,
            })
            .collect()
    };
    (sources, ranges)
}

/// Point the parts of `stored` that still hold the moved bytes at the new
/// object (invariant 3) and fix the live counts (the overlay holds no
/// chunk locations: reads see the change through `stored`).
fn repoint(st: &mut State, info: Arc<ChunkInfo>, moved: &[(LiveRange, u64)]) {
    let new = info.seq;
    st.chunks.entry(new).or_insert(ChunkEntry {
        info,
        live_sectors: 0,
    });
    for (r, new_off) in moved {
        let still = |p: &super::map::Piece| match p.loc {
            Some(Loc::Chunk { chunk, off }) => {
                chunk == r.chunk && off == r.off + (p.start - r.lba) * SECTOR
            }
            _ => false,
        };
        let target = |p: &super::map::Piece| Loc::Chunk {
            chunk: new,
            off: new_off + (p.start - r.lba) * SECTOR,
        };
        for p in st.stored.lookup(r.lba, r.sectors) {
            if !still(&p) {
                continue;
            }
            st.stored_insert(p.start, p.len, target(&p));
            if let Some(e) = st.chunks.get_mut(&r.chunk) {
                e.live_sectors = e.live_sectors.saturating_sub(p.len);
            }
            if let Some(e) = st.chunks.get_mut(&new) {
                e.live_sectors += p.len;
            }
        }
    }
}

/// At open: delete compaction objects of this volume that neither the
/// recovered map nor any snapshot names (left by a crash before their
/// checkpoint committed), and return the next free compaction id.
/// Objects of a newer epoch are left alone (not ours to judge).
pub(crate) async fn clean_orphans(
    store: &DynStore,
    volume: u64,
    epoch: u64,
    st: &State,
) -> Result<u64, EngineError> {
    let prefix = compacted_prefix(volume);
    let retain = RetainSet::load(store, volume).await;
    let known: HashSet<(u64, u64)> = st
        .chunks
        .values()
        .map(|c| (c.info.seq, c.info.epoch))
        .collect();
    let mut next = 1;
    for meta in store.list(&prefix).await? {
        let Some((seq, e)) = parse_chunk_name(&meta.key[prefix.len()..]) else {
            log::warn!("ignoring unexpected object {}", meta.key);
            continue;
        };
        if !super::format::limits::valid_chunk_id(seq) || seq & COMPACTED_BIT == 0 {
            log::warn!(
                "ignoring compaction object {} with an out-of-range id",
                meta.key
            );
            continue;
        }
        next = next.max((seq & !COMPACTED_BIT) + 1);
        if e <= epoch && !known.contains(&(seq, e)) && !retain.keeps(seq, e) {
            log::warn!("deleting orphan compaction object {}", meta.key);
            store.delete(&meta.key).await?;
        }
    }
    for c in st.chunks.keys() {
        if c & COMPACTED_BIT != 0 {
            next = next.max((c & !COMPACTED_BIT) + 1);
        }
    }
    Ok(next)
}
