//! Manifest commits and checkpoints (with the simple GC they allow).
//!
//! Invariants:
//! 1. The manifest is only replaced by compare-and-swap; losing the swap to
//!    another epoch fences the volume.
//! 2. A checkpoint captures the store-side map exactly at chunk
//!    `last_chunk`; it is written before the manifest names it.
//! 3. A chunk is deleted only after a committed checkpoint no longer
//!    references it (it had no live sectors when the checkpoint was taken).

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::checkpoint::capture::Capture;
use super::checkpoint::{checkpoint_key, manifest_key, Checkpoint, Manifest};
use super::chunk::chunk_key;
use super::error::EngineError;
use super::volume::Inner;
use crate::store::{PutMode, StoreError, Version};

/// The manifest as last committed, with its version.
pub(crate) struct Root {
    pub manifest: Manifest,
    pub version: Version,
}

/// Replace the manifest with `m` by compare-and-swap.
pub(crate) async fn commit(inner: &Inner, root: &mut Root, m: Manifest) -> Result<(), EngineError> {
    let key = manifest_key(inner.id);
    let data = Bytes::from(serde_json::to_vec(&m).unwrap_or_default());
    for _ in 0..3 {
        super::destage::check_not_fenced(inner)?;
        match inner
            .store
            .put(&key, data.clone(), PutMode::IfMatch(root.version.clone()))
            .await
        {
            Ok(v) => {
                root.version = v;
                root.manifest = m;
                return Ok(());
            }
            Err(StoreError::PreconditionFailed { .. }) => {
                // Our own earlier attempt may have landed; only another
                // epoch's write means we lost the volume.
                let cur = inner.store.get(&key).await?;
                let theirs: Option<Manifest> = serde_json::from_slice(&cur.data).ok();
                match theirs {
                    Some(t) if t.volume == inner.id && t.epoch == inner.epoch => {
                        root.version = cur.version;
                    }
                    Some(t) => {
                        return Err(EngineError::Fenced(format!(
                            "manifest taken over by epoch {}",
                            t.epoch
                        )))
                    }
                    None => {
                        return Err(EngineError::Fenced(
                            "manifest replaced by something unreadable".into(),
                        ))
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(EngineError::Fenced(
        "manifest keeps changing under us".into(),
    ))
}

/// Commit the current store position without a new checkpoint.
pub(crate) async fn commit_progress(inner: &Inner, root: &mut Root) -> Result<(), EngineError> {
    let (last_chunk, last_seq) = {
        let st = inner.shared.lock();
        (st.last_chunk, st.stored_seq)
    };
    let m = Manifest {
        last_chunk,
        last_seq,
        epoch: inner.epoch,
        history_epoch: inner.epoch,
        ..root.manifest.clone()
    };
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
        checkpoint(inner, root).await.map(drop)
    } else {
        Ok(())
    }
}

/// Write a checkpoint of the store-side map, commit it, then delete the
/// previous checkpoint and chunks nothing references any more. Returns the
/// checkpoint committed.
pub(crate) async fn checkpoint(inner: &Inner, root: &mut Root) -> Result<Checkpoint, EngineError> {
    let started = inner.clock.now();
    // Sparse chunks drained here lose their last live sector, so this very
    // checkpoint stops naming them and deletes them after it commits.
    match super::compact::compact(inner).await {
        Ok(()) => {}
        Err(EngineError::Fenced(why)) => return Err(EngineError::Fenced(why)),
        Err(e) => log::warn!("volume {:x}: compaction skipped: {e}", inner.id),
    }
    // Invariant 2: everything the checkpoint describes is taken in this
    // one lock section (the map as of `last_chunk`, shared copy-on-write,
    // and its chunk table); walking and encoding the map run after it, a
    // large map on a blocking thread. Nothing mutates `stored` until this
    // task applies its next chunk, after the encode released the map.
    let (capture, dead, old_key) = {
        let st = inner.shared.lock();
        let mut chunks = Vec::with_capacity(st.chunks.len());
        let mut dead = Vec::new();
        for e in st.chunks.values() {
            if e.live_sectors > 0 {
                chunks.push(e.info.clone());
            } else {
                dead.push((e.info.seq, e.info.epoch));
            }
        }
        let capture = Capture::take(
            inner.id,
            inner.epoch,
            st.last_chunk,
            st.stored_seq,
            &st.stored,
            chunks,
        );
        (capture, dead, st.checkpoint_key.clone())
    };
    let (cp, bytes) = capture
        .encode()
        .await
        .map_err(|e| EngineError::Encode(e.to_string()))?;
    let key = checkpoint_key(inner.id, cp.chunk_seq, inner.epoch);
    inner
        .store
        .put(&key, Bytes::from(bytes), PutMode::Overwrite)
        .await?;
    let m = Manifest {
        volume: inner.id,
        epoch: inner.epoch,
        checkpoint: Some(key.clone()),
        checkpoint_chunk: cp.chunk_seq,
        last_chunk: cp.chunk_seq,
        last_seq: cp.last_seq,
        history_epoch: inner.epoch,
        parent: root.manifest.parent,
    };
    commit(inner, root, m).await?;
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
    {
        let mut st = inner.shared.lock();
        st.checkpoint_chunk = cp.chunk_seq;
        st.checkpoint_key = Some(key.clone());
        st.committed_seq = st.committed_seq.max(cp.last_seq);
        for (seq, _) in &dead {
            st.chunks.remove(seq);
        }
        st.wake_all();
    }
    if let Some(old) = old_key.filter(|o| *o != key) {
        if let Err(e) = inner.store.delete(&old).await {
            log::warn!("deleting old checkpoint {old}: {e}");
        }
    }
    // Snapshots may still name chunks the volume's own map dropped.
    let retain = super::snapshot::RetainSet::load(&inner.store, inner.id).await;
    for (seq, epoch) in dead {
        if retain.keeps(seq, epoch) {
            continue;
        }
        match inner.store.delete(&chunk_key(inner.id, seq, epoch)).await {
            Ok(()) => {
                inner
                    .counters
                    .chunks_deleted
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log::warn!("deleting dead chunk {seq}: {e}"),
        }
    }
    Ok(cp)
}
