//! Manifest commits and checkpoints (with the simple GC they allow). All
//! of it runs in the meta task ([`super::meta::task`]), which owns [`Root`];
//! the destage task applies chunks to the maps meanwhile.
//!
//! Invariants:
//! 1. The manifest is only replaced by compare-and-swap; losing the swap to
//!    another epoch fences the volume.
//! 2. A checkpoint captures the store-side map exactly at chunk
//!    `last_chunk`; it is written before the manifest names it.
//! 3. A chunk is deleted only after a committed checkpoint no longer
//!    references it (it had no live sectors when the checkpoint was taken).
//! 4. A checkpoint is a delta of the committed chain while the chain has
//!    fewer than `checkpoint_max_deltas` deltas and its deltas, this one
//!    included, add up to at most its base's bytes; otherwise it is a new
//!    full base. Metadata written thus stays within about twice the delta
//!    bytes, and open reads at most twice a base.
//! 5. A new base never reuses a key of the chain the committed manifest
//!    names, and the superseded chain is deleted only after the manifest
//!    naming the new base is committed. A failed checkpoint hands its
//!    dirty ranges back, so the next delta still carries them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::checkpoint::capture::Capture;
use super::checkpoint::delta::Delta;
use super::checkpoint::dirty::DirtySet;
use super::checkpoint::{Checkpoint, ChunkInfo};
use super::error::EngineError;
use super::format::layout::{checkpoint_base_key, checkpoint_key, chunk_key, delta_key};
use super::format::manifest::Manifest;
use super::meta::chain::ChainPos;
use super::meta::manifest::{self, Root};
use super::meta::prepare;
use super::volume_core::Inner;
use crate::store::delete_many::{delete_many, DELETES_IN_FLIGHT};
use crate::store::PutMode;

/// Replace the manifest with `m` by compare-and-swap, as the open
/// volume's writer ([`super::meta::manifest::commit`]).
pub(crate) async fn commit(inner: &Inner, root: &mut Root, m: Manifest) -> Result<(), EngineError> {
    manifest::commit(&inner.store, inner.epoch, root, m, || {
        inner.check_not_fenced()
    })
    .await
}

/// Commit the current store position without a new checkpoint.
pub(crate) async fn commit_progress(inner: &Inner, root: &mut Root) -> Result<(), EngineError> {
    let (last_chunk, last_seq) = {
        let st = inner.shared.lock();
        (st.last_chunk, st.stored_seq)
    };
    let m = prepare::at_position(&root.manifest, inner.epoch, last_chunk, last_seq);
    commit(inner, root, m).await?;
    let mut st = inner.shared.lock();
    st.committed_seq = st.committed_seq.max(last_seq);
    st.wake_all();
    Ok(())
}

pub(crate) async fn final_checkpoint(inner: &Inner, root: &mut Root) -> Result<(), EngineError> {
    let due = {
        let st = inner.shared.lock();
        st.last_chunk > st.checkpoint_chunk
    };
    if due {
        checkpoint(inner, root, false).await.map(drop)
    } else {
        Ok(())
    }
}

/// What one checkpoint captured under the state lock.
struct Taken {
    capture: Capture,
    /// Chunks of the new table that the committed one lacks.
    added: Vec<ChunkInfo>,
    /// Chunk ids of the committed table the new one lacks.
    removed: Vec<u64>,
    /// The new table: seq -> epoch.
    table: HashMap<u64, u64>,
    /// Chunks no range uses any more: deleted after the commit.
    dead: Vec<(u64, u64)>,
    dirty: DirtySet,
    pos: ChainPos,
}

/// The object a checkpoint writes: a full one or the next delta.
struct Written {
    key: String,
    bytes: usize,
    /// `Some(full)` if it was a full checkpoint.
    full: Option<Checkpoint>,
    chunk_seq: u64,
    last_seq: u64,
}

/// Write a checkpoint of the store-side map (a delta of the committed
/// chain, or a new full one: see [`super::checkpoint::delta`]), commit it,
/// then delete the chain it supersedes (after a new full one) and chunks
/// nothing references any more. With `want_full`, returns the map as one
/// full checkpoint (built from the captured map if a delta was written).
pub(crate) async fn checkpoint(
    inner: &Inner,
    root: &mut Root,
    want_full: bool,
) -> Result<Option<Checkpoint>, EngineError> {
    let started = inner.clock.now();
    // Sparse chunks drained here lose their last live sector, so this very
    // checkpoint stops naming them and deletes them after it commits.
    match super::compact::compact(inner).await {
        Ok(()) => {}
        Err(EngineError::Fenced(why)) => return Err(EngineError::Fenced(why)),
        Err(e) => log::warn!("volume {:x}: compaction skipped: {e}", inner.id),
    }
    let taken = take(inner);
    let dead = taken.dead.clone();
    let pos = taken.pos.clone();
    let table = taken.table.clone();
    // The dirty ranges are handed back if nothing was committed, so the
    // next delta still carries them.
    let dirty = taken.dirty.clone();
    let (written, full) = match write(inner, root, taken, want_full).await {
        Ok(w) => w,
        Err(e) => {
            inner.shared.lock().dirty.merge(dirty);
            return Err(e);
        }
    };
    let Written {
        key,
        bytes,
        full: new_base,
        chunk_seq,
        last_seq,
    } = written;
    inner
        .counters
        .checkpoints_written
        .fetch_add(1, Ordering::Relaxed);
    let took = inner.clock.now().saturating_sub(started).as_micros();
    let took = u64::try_from(took).unwrap_or(u64::MAX);
    inner
        .counters
        .checkpoint_us
        .fetch_add(took, Ordering::Relaxed);
    let is_base = new_base.is_some();
    {
        let mut st = inner.shared.lock();
        st.checkpoint_chunk = chunk_seq;
        st.checkpoint_key = Some(key.clone());
        st.committed_seq = st.committed_seq.max(last_seq);
        st.cp_table = table;
        if is_base {
            st.chain = ChainPos {
                base: Some(key.clone()),
                base_bytes: bytes as u64,
                deltas: Vec::new(),
                delta_bytes: 0,
                chunk_seq,
                extendable: true,
            };
        } else {
            st.chain.deltas.push(key.clone());
            st.chain.delta_bytes += bytes as u64;
            st.chain.chunk_seq = chunk_seq;
        }
        for (seq, _) in &dead {
            st.chunks.remove(seq);
        }
        st.wake_all();
    }
    // Destage may wait for this checkpoint (`destage.rs` invariant 6).
    inner.shared.notify.notify_one();
    // A superseded chain goes only after the manifest naming the new base
    // is durable (the commit above).
    if is_base {
        for old in pos.keys().into_iter().filter(|o| *o != key) {
            if let Err(e) = inner.store.delete(&old).await {
                log::warn!("deleting old checkpoint {old}: {e}");
            }
        }
    }
    // Snapshots may still name chunks the volume's own map dropped.
    let retain = super::retain_index::RetainSet::load(&inner.store, inner.id).await;
    let doomed: Vec<String> = dead
        .into_iter()
        .filter(|&(seq, epoch)| !retain.keeps(seq, epoch))
        .map(|(seq, epoch)| chunk_key(inner.id, seq, epoch))
        .collect();
    let tried = doomed.len() as u64;
    // Many at once: a checkpoint that drops hundreds of chunks must not
    // fall behind the chunks destage keeps storing meanwhile.
    let failed = delete_many(&*inner.store, doomed, DELETES_IN_FLIGHT).await;
    for (key, e) in &failed {
        log::warn!("deleting dead chunk {key}: {e} (the next open deletes it as an orphan)");
    }
    inner
        .counters
        .chunks_deleted
        .fetch_add(tried - failed.len() as u64, Ordering::Relaxed);
    Ok(full.or(new_base.filter(|_| want_full)))
}

/// Invariant 2: everything the checkpoint describes is taken in this one
/// lock section (the map as of `last_chunk`, shared copy-on-write, its
/// chunk table and the ranges changed since the committed checkpoint);
/// walking and encoding the map run after it. Chunks the destage task
/// applies meanwhile change the state's own map (copied first, once, while
/// the capture holds it: `state.rs` invariant 2) and mark their ranges in
/// the state's fresh dirty set, so the next checkpoint carries them; a
/// chunk they empty is deleted only by a later checkpoint (this one still
/// names it). Only the meta task removes entries of `chunks`.
fn take(inner: &Inner) -> Taken {
    let mut st = inner.shared.lock();
    let mut chunks = Vec::with_capacity(st.chunks.len());
    let mut dead = Vec::new();
    let mut table = HashMap::with_capacity(st.chunks.len());
    let mut added = Vec::new();
    for e in st.chunks.values() {
        if e.live_sectors > 0 {
            chunks.push(e.info.clone());
            table.insert(e.info.seq, e.info.epoch);
            if st.cp_table.get(&e.info.seq) != Some(&e.info.epoch) {
                added.push((*e.info).clone());
            }
        } else {
            dead.push((e.info.seq, e.info.epoch));
        }
    }
    let removed = st
        .cp_table
        .iter()
        .filter(|(s, e)| table.get(s) != Some(e))
        .map(|(&s, _)| s)
        .collect();
    let capture = Capture::take(
        inner.id,
        inner.epoch,
        st.last_chunk,
        st.stored_seq,
        &st.stored,
        chunks,
    );
    Taken {
        capture,
        added,
        removed,
        table,
        dead,
        dirty: std::mem::take(&mut st.dirty),
        pos: st.chain.clone(),
    }
}

/// Whether the next checkpoint may be a delta of the chain at `pos`.
fn delta_allowed(inner: &Inner, pos: &ChainPos) -> bool {
    let max = inner.cfg.checkpoint_max_deltas;
    max > 0 && pos.base.is_some() && pos.extendable && (pos.deltas.len() as u64) < max
}

/// Encode and store the checkpoint `t` describes, then commit a manifest
/// naming it. Returns what was written and, with `want_full` after a
/// delta, the full checkpoint.
async fn write(
    inner: &Inner,
    root: &mut Root,
    t: Taken,
    want_full: bool,
) -> Result<(Written, Option<Checkpoint>), EngineError> {
    let (chunk_seq, last_seq) = (t.capture.chunk_seq, t.capture.last_seq);
    let mut full_key = checkpoint_key(inner.id, chunk_seq, inner.epoch);
    let chain_keys = t.pos.keys();
    let mut n = 0u64;
    while chain_keys.contains(&full_key) {
        // A new base must never overwrite an object of the chain the
        // committed manifest still names.
        n += 1;
        full_key = checkpoint_base_key(inner.id, chunk_seq, inner.epoch, n);
    }
    let mut delta = None;
    if delta_allowed(inner, &t.pos) {
        let position = t.pos.deltas.len() as u64 + 1;
        let base = t.pos.base.clone().unwrap_or_default();
        let prev = t.pos.deltas.last().cloned().unwrap_or_else(|| base.clone());
        let d = Delta::capture(
            (inner.id, inner.epoch, chunk_seq, last_seq),
            (position, t.pos.chunk_seq, base, prev),
            t.capture.map(),
            t.dirty.iter(),
            t.added,
            t.removed,
        );
        let bytes = d.encode();
        // Amortised bound: the deltas since the base never outgrow it.
        if t.pos.delta_bytes + bytes.len() as u64 <= t.pos.base_bytes {
            delta = Some((delta_key(inner.id, chunk_seq, inner.epoch, position), bytes));
        }
    }
    let (key, bytes, full, extra) = match delta {
        Some((key, bytes)) => {
            let extra = if want_full {
                Some(
                    t.capture
                        .encode_full()
                        .await
                        .map_err(|e| EngineError::Encode(e.to_string()))?,
                )
            } else {
                drop(t.capture);
                None
            };
            (key, bytes, None, extra)
        }
        None => {
            let (cp, bytes) = t
                .capture
                .encode()
                .await
                .map_err(|e| EngineError::Encode(e.to_string()))?;
            (full_key, bytes, Some(cp), None)
        }
    };
    let len = bytes.len();
    inner
        .store
        .put(&key, Bytes::from(bytes), PutMode::Overwrite)
        .await?;
    let base = if full.is_some() {
        None
    } else {
        t.pos.base.clone()
    };
    let m = prepare::with_checkpoint(
        &root.manifest,
        inner.epoch,
        key.clone(),
        base,
        chunk_seq,
        last_seq,
    );
    commit(inner, root, m).await?;
    Ok((
        Written {
            key,
            bytes: len,
            full,
            chunk_seq,
            last_seq,
        },
        extra,
    ))
}
