//! The destage task: packs WAL records into chunk objects, writes
//! checkpoints, commits the manifest and deletes dead chunks.
//!
//! Invariants:
//! 1. Chunks are put one at a time in chunk-sequence order; chunk `n` holds
//!    exactly the records `stored_seq+1 ..= last_seq` (a prefix of
//!    `pending`), so the store always holds a prefix of the history.
//! 2. The maps and the WAL are updated only after the put succeeded; the WAL
//!    space is released only then.
//! 3. The manifest is only replaced by compare-and-swap; losing the swap to
//!    another epoch fences the volume.
//! 4. A chunk is deleted only after a committed checkpoint no longer
//!    references it (it had no live sectors when the checkpoint was taken).

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::checkpoint::{checkpoint_key, manifest_key, Checkpoint, ChunkInfo, Manifest};
use super::chunk::{chunk_key, decode_header, encode, ChunkExtent, ChunkHeader};
use super::error::EngineError;
use super::map::{ExtentMap, Loc};
use super::state::PendingRec;
use super::volume::Inner;
use super::wal::record::RecordKind;
use super::{wal, SECTOR};
use crate::store::{PutMode, StoreError, Version};

/// Consecutive failures after which a pending `close` gives up.
const CLOSE_GIVE_UP: u32 = 5;

/// The task body; runs until close, fencing or abort.
pub(crate) async fn run(inner: Arc<Inner>, manifest: Manifest, version: Version) {
    let mut root = Root { manifest, version };
    let tick = Duration::from_millis(inner.cfg.destage_interval_ms.clamp(5, 100));
    let mut backoff = Duration::from_millis(10);
    loop {
        let step = step(&inner, &mut root).await;
        let (closing, idle) = {
            let st = inner.shared.lock();
            (st.closing, st.pending.is_empty())
        };
        match step {
            Ok(true) => {
                backoff = Duration::from_millis(10);
                continue;
            }
            Ok(false) if closing && idle => {
                let res = final_checkpoint(&inner, &mut root).await;
                finish(&inner, res);
                return;
            }
            Ok(false) => {
                tokio::select! {
                    _ = inner.shared.notify.notified() => {}
                    _ = tokio::time::sleep(tick) => {}
                }
            }
            Err(EngineError::Fenced(why)) => {
                log::error!("volume {:x} fenced: {why}", inner.id);
                {
                    let mut st = inner.shared.lock();
                    st.fenced = Some(why.clone());
                    st.wake_all();
                }
                finish(&inner, Err(EngineError::Fenced(why)));
                return;
            }
            Err(e) => {
                inner
                    .counters
                    .destage_errors
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!("volume {:x} destage failed (will retry): {e}", inner.id);
                let give_up = {
                    let mut st = inner.shared.lock();
                    st.destage_failures += 1;
                    st.closing && st.destage_failures >= CLOSE_GIVE_UP
                };
                if give_up {
                    finish(&inner, Err(e));
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Report the end of a close, if one is waiting.
fn finish(inner: &Inner, res: Result<(), EngineError>) {
    let tx = inner
        .close_tx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(tx) = tx {
        let _ = tx.send(res);
    }
    inner.shared.lock().wake_all();
}

/// The manifest as last committed, with its version.
struct Root {
    manifest: Manifest,
    version: Version,
}

/// One unit of work; `Ok(true)` if something was done.
async fn step(inner: &Arc<Inner>, root: &mut Root) -> Result<bool, EngineError> {
    let (batch, want_commit) = {
        let mut st = inner.shared.lock();
        let batch = next_batch(inner, &mut st);
        let want_commit = st.store_target > st.committed_seq && st.stored_seq > st.committed_seq;
        (batch, want_commit)
    };
    if let Some((chunk_seq, recs, files)) = batch {
        destage_chunk(inner, chunk_seq, &recs, &files).await?;
        let due = {
            let st = inner.shared.lock();
            st.last_chunk - st.checkpoint_chunk >= inner.cfg.checkpoint_every_chunks
        };
        if due {
            checkpoint(inner, root).await?;
        }
        return Ok(true);
    }
    if want_commit {
        commit_progress(inner, root).await?;
        return Ok(true);
    }
    Ok(false)
}

type Batch = (u64, Vec<PendingRec>, HashMap<u64, Arc<File>>);

/// The records for the next chunk, if destage is due.
fn next_batch(inner: &Inner, st: &mut super::state::State) -> Option<Batch> {
    let front = st.pending.front()?;
    let age = inner.clock.now().saturating_sub(front.at);
    let due = st.pending_bytes >= inner.cfg.chunk_size
        || age >= Duration::from_millis(inner.cfg.destage_interval_ms)
        || !st.waiters.is_empty()
        || st.store_target > st.stored_seq
        || st.closing;
    if !due {
        return None;
    }
    let mut recs = Vec::new();
    let mut bytes = 0;
    let mut files = HashMap::new();
    for p in &st.pending {
        if bytes >= inner.cfg.chunk_size {
            break;
        }
        bytes += p.cost();
        if let Some(w) = p.loc {
            if let std::collections::hash_map::Entry::Vacant(e) = files.entry(w.seg) {
                e.insert(inner.wal.segment_file(w.seg)?);
            }
        }
        recs.push(*p);
    }
    Some((st.last_chunk + 1, recs, files))
}

/// Newest-wins extents and data of `recs`, all-zero sectors unmapped.
fn build_chunk(
    recs: &[PendingRec],
    files: &HashMap<u64, Arc<File>>,
) -> Result<(Vec<ChunkExtent>, Vec<u8>), EngineError> {
    let mut mini = ExtentMap::new();
    for r in recs {
        match (r.kind, r.loc) {
            (RecordKind::Write, Some(w)) => {
                mini.insert(r.lba, r.sectors, Loc::Wal(w));
            }
            _ => {
                mini.insert(r.lba, r.sectors, Loc::Zero);
            }
        }
    }
    let mut extents = Vec::new();
    let mut data = Vec::new();
    let mut rec_data: HashMap<u64, Vec<u8>> = HashMap::new();
    let s = SECTOR as usize;
    for (lba, len, loc) in mini.iter() {
        let Loc::Wal(w) = loc else {
            extents.push(ChunkExtent {
                lba,
                sectors: len,
                data_off: None,
            });
            continue;
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = rec_data.entry(w.seq) {
            let file = files.get(&w.seg).ok_or(wal::WalError::SegmentGone(w.seg))?;
            let whole = super::map::WalLoc { skip: 0, ..w };
            let mut buf = vec![0u8; (w.rec_sectors * SECTOR) as usize];
            wal::read_record(file, &whole, w.seg, &mut buf)?;
            slot.insert(buf);
        }
        let rd = &rec_data[&w.seq];
        let part = &rd[(w.skip * SECTOR) as usize..((w.skip + len) * SECTOR) as usize];
        // Split into runs of all-zero / non-zero sectors.
        let mut i = 0usize;
        let n = len as usize;
        while i < n {
            let zero = part[i * s..(i + 1) * s].iter().all(|&b| b == 0);
            let mut j = i + 1;
            while j < n && part[j * s..(j + 1) * s].iter().all(|&b| b == 0) == zero {
                j += 1;
            }
            let data_off = (!zero).then(|| {
                let off = data.len() as u64;
                data.extend_from_slice(&part[i * s..j * s]);
                off
            });
            extents.push(ChunkExtent {
                lba: lba + i as u64,
                sectors: (j - i) as u64,
                data_off,
            });
            i = j;
        }
    }
    Ok((extents, data))
}

/// Create `key`; an existing object with identical bytes (our own earlier
/// attempt) counts as success, any other content means another writer.
async fn put_create(inner: &Inner, key: &str, obj: Bytes) -> Result<(), EngineError> {
    match inner.store.put(key, obj.clone(), PutMode::Create).await {
        Ok(_) => Ok(()),
        Err(StoreError::AlreadyExists { .. }) => {
            let cur = inner.store.get(key).await?;
            if cur.data == obj {
                Ok(())
            } else {
                Err(EngineError::Fenced(format!(
                    "{key} was written by another writer"
                )))
            }
        }
        Err(e) => Err(e.into()),
    }
}

async fn destage_chunk(
    inner: &Inner,
    chunk_seq: u64,
    recs: &[PendingRec],
    files: &HashMap<u64, Arc<File>>,
) -> Result<(), EngineError> {
    let (Some(first), Some(last)) = (recs.first(), recs.last()) else {
        return Ok(());
    };
    let (extents, data) = build_chunk(recs, files)?;
    let header = ChunkHeader {
        volume: inner.id,
        epoch: inner.epoch,
        chunk_seq,
        first_seq: first.seq,
        last_seq: last.seq,
        extents,
        block_crcs: Vec::new(),
        data_len: data.len() as u64,
        header_len: 0,
    };
    let obj = encode(&header, &data);
    let decoded = decode_header(&obj).map_err(|source| EngineError::Chunk {
        key: chunk_key(inner.id, chunk_seq, inner.epoch),
        source,
    })?;
    let key = chunk_key(inner.id, chunk_seq, inner.epoch);
    let size = obj.len() as u64;
    put_create(inner, &key, Bytes::from(obj)).await?;
    let info = Arc::new(ChunkInfo {
        seq: chunk_seq,
        epoch: inner.epoch,
        data_start: decoded.header_len,
        data_len: decoded.data_len,
        crcs: decoded.block_crcs,
    });
    let stored_seq = {
        let mut st = inner.shared.lock();
        st.apply_chunk_to_stored(info, &header.extents);
        st.apply_chunk_to_live(chunk_seq, last.seq, &header.extents);
        st.pop_stored(last.seq);
        st.last_chunk = chunk_seq;
        st.destage_failures = 0;
        st.wake_all();
        st.stored_seq
    };
    inner.wal.release_upto(stored_seq);
    inner
        .counters
        .chunks_written
        .fetch_add(1, Ordering::Relaxed);
    inner
        .counters
        .chunk_bytes_written
        .fetch_add(size, Ordering::Relaxed);
    Ok(())
}

/// Replace the manifest with `m` by compare-and-swap.
async fn commit(inner: &Inner, root: &mut Root, m: Manifest) -> Result<(), EngineError> {
    let key = manifest_key(inner.id);
    let data = Bytes::from(serde_json::to_vec(&m).unwrap_or_default());
    for _ in 0..3 {
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
async fn commit_progress(inner: &Inner, root: &mut Root) -> Result<(), EngineError> {
    let (last_chunk, last_seq) = {
        let st = inner.shared.lock();
        (st.last_chunk, st.stored_seq)
    };
    let m = Manifest {
        last_chunk,
        last_seq,
        epoch: inner.epoch,
        ..root.manifest.clone()
    };
    commit(inner, root, m).await?;
    let mut st = inner.shared.lock();
    st.committed_seq = st.committed_seq.max(last_seq);
    st.wake_all();
    Ok(())
}

async fn final_checkpoint(inner: &Inner, root: &mut Root) -> Result<(), EngineError> {
    let due = {
        let st = inner.shared.lock();
        st.last_chunk > st.checkpoint_chunk
    };
    if due {
        checkpoint(inner, root).await
    } else {
        Ok(())
    }
}

/// Write a checkpoint of the store-side map, commit it, then delete the
/// previous checkpoint and chunks nothing references any more.
async fn checkpoint(inner: &Inner, root: &mut Root) -> Result<(), EngineError> {
    let (cp, dead, old_key) = {
        let st = inner.shared.lock();
        let mut chunks = Vec::new();
        let mut dead = Vec::new();
        for e in st.chunks.values() {
            if e.live_sectors > 0 {
                chunks.push((*e.info).clone());
            } else {
                dead.push((e.info.seq, e.info.epoch));
            }
        }
        chunks.sort_by_key(|c| c.seq);
        let cp = Checkpoint::from_map(
            inner.id,
            inner.epoch,
            st.last_chunk,
            st.stored_seq,
            &st.stored,
            chunks,
        );
        (cp, dead, st.checkpoint_key.clone())
    };
    let key = checkpoint_key(inner.id, cp.chunk_seq, inner.epoch);
    inner
        .store
        .put(&key, Bytes::from(cp.encode()), PutMode::Overwrite)
        .await?;
    let m = Manifest {
        volume: inner.id,
        epoch: inner.epoch,
        checkpoint: Some(key.clone()),
        checkpoint_chunk: cp.chunk_seq,
        last_chunk: cp.chunk_seq,
        last_seq: cp.last_seq,
    };
    commit(inner, root, m).await?;
    inner
        .counters
        .checkpoints_written
        .fetch_add(1, Ordering::Relaxed);
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
    Ok(())
}
