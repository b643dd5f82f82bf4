//! The destage task: packs WAL records into chunk objects, puts them
//! (several at a time), applies them in order, and triggers checkpoints.
//!
//! Invariants:
//! 1. Chunk `n` holds exactly the records following chunk `n-1`'s (a run of
//!    `pending`), and is never cut inside a write request; so any set of
//!    landed chunks read in order up to the first gap is a prefix of the
//!    history (recovery stops at the first gap).
//! 2. Up to [`MAX_INFLIGHT`] puts run at once, but chunks are applied to
//!    the maps strictly in chunk order, and only after their put succeeded;
//!    the WAL space is released only then.
//! 3. A failed put is retried with the very same bytes, so a put that
//!    landed despite an error is recognised (identical content) on retry.
//! 4. All puts run inside this task: aborting it stops every store write.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};

use super::checkpoint::{ChunkInfo, Manifest};
use super::chunk::{chunk_key, decode_header, encode, ChunkExtent, ChunkHeader};
use super::commit::{checkpoint, commit_progress, final_checkpoint, Root};
use super::error::EngineError;
use super::live_snapshot;
use super::map::{ExtentMap, Loc};
use super::state::{PendingRec, State};
use super::volume::Inner;
use super::wal::record::RecordKind;
use super::{wal, SECTOR};
use crate::store::{PutMode, StoreError, Version};

/// Consecutive failures after which a pending `close` gives up.
const CLOSE_GIVE_UP: u32 = 5;
/// Chunk puts in flight at once.
pub const MAX_INFLIGHT: usize = 8;

/// A chunk ready to put (kept for retries) and what applying it needs.
struct Built {
    seq: u64,
    last_seq: u64,
    key: String,
    obj: Bytes,
    extents: Vec<ChunkExtent>,
    info: Arc<ChunkInfo>,
    cost: u64,
}

type PutFuture = Pin<Box<dyn Future<Output = (Built, Result<(), EngineError>)> + Send>>;

fn put_future(inner: Arc<Inner>, built: Built, delay: Duration) -> PutFuture {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let started = inner.clock.now();
        let res = put_create(&inner, &built.key, built.obj.clone()).await;
        let took = inner.clock.now().saturating_sub(started).as_micros();
        let took = u64::try_from(took).unwrap_or(u64::MAX);
        inner.counters.destage_us.fetch_add(took, Ordering::Relaxed);
        (built, res)
    })
}

/// The task body; runs until close, fencing or abort.
pub(crate) async fn run(inner: Arc<Inner>, manifest: Manifest, version: Version) {
    let mut root = Root { manifest, version };
    // However the task ends, a snapshot request left behind is answered.
    let _requests = live_snapshot::StopGuard::new(inner.clone());
    let tick = Duration::from_millis(inner.cfg.destage_interval_ms.clamp(5, 100));
    let mut backoff = Duration::from_millis(10);
    let mut inflight: FuturesOrdered<PutFuture> = FuturesOrdered::new();
    loop {
        if let Err(e) = check_not_fenced(&inner) {
            fail(&inner, e, &mut backoff, false).await;
            return;
        }
        // Start puts for every chunk that is due, up to the limit.
        while inflight.len() < MAX_INFLIGHT {
            let batch = {
                let mut st = inner.shared.lock();
                next_batch(&inner, &mut st)
            };
            let Some(batch) = batch else { break };
            match build(&inner, batch) {
                Ok(b) => inflight.push_back(put_future(inner.clone(), b, Duration::ZERO)),
                Err((e, taken)) => {
                    untake(&inner, &taken);
                    if fail(&inner, e, &mut backoff, true).await {
                        return;
                    }
                    break;
                }
            }
        }
        if inflight.is_empty() {
            let (closing, idle, want_commit) = {
                let st = inner.shared.lock();
                let want = st.store_target > st.committed_seq && st.stored_seq > st.committed_seq;
                (st.closing, st.pending.is_empty(), want)
            };
            if want_commit {
                if let Err(e) = commit_progress(&inner, &mut root).await {
                    if fail(&inner, e, &mut backoff, true).await {
                        return;
                    }
                }
                continue;
            }
            if live_snapshot::due(&inner) {
                if let Err(e) = live_snapshot::serve(&inner, &mut root).await {
                    if fail(&inner, e, &mut backoff, true).await {
                        return;
                    }
                }
                continue;
            }
            if closing && idle {
                let res = final_checkpoint(&inner, &mut root).await;
                finish(&inner, res);
                return;
            }
            tokio::select! {
                _ = inner.shared.notify.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            continue;
        }
        tokio::select! {
            done = inflight.next() => {
                let Some((built, res)) = done else { continue };
                match res {
                    Ok(()) => {
                        backoff = Duration::from_millis(10);
                        let stored_seq = apply(&inner, built);
                        // Releasing recycles WAL segments (a write, an
                        // fdatasync, a rename, a directory sync): not on
                        // the runtime's threads.
                        let w = inner.clone();
                        let _ = tokio::task::spawn_blocking(move || w.wal.release_upto(stored_seq)).await;
                        let (due, want_commit) = {
                            let st = inner.shared.lock();
                            (
                                st.last_chunk - st.checkpoint_chunk >= inner.cfg.checkpoint_every_chunks,
                                st.store_target > st.committed_seq && st.stored_seq >= st.store_target,
                            )
                        };
                        let res = if due {
                            checkpoint(&inner, &mut root, false).await.map(drop)
                        } else if want_commit {
                            commit_progress(&inner, &mut root).await
                        } else {
                            Ok(())
                        };
                        let res = match res {
                            Ok(()) => live_snapshot::serve(&inner, &mut root).await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = res {
                            if fail(&inner, e, &mut backoff, true).await {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let delay = backoff;
                        if fail(&inner, e, &mut backoff, false).await {
                            return;
                        }
                        inflight.push_front(put_future(inner.clone(), built, delay));
                    }
                }
            }
            _ = inner.shared.notify.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// Record a failure. Returns true when the task must stop (fenced, or a
/// close gave up); otherwise doubles the backoff, after waiting it out if
/// `wait` (a failed put instead waits inside its retry).
async fn fail(inner: &Inner, e: EngineError, backoff: &mut Duration, wait: bool) -> bool {
    live_snapshot::refuse(inner, &e);
    if let EngineError::Fenced(why) = e {
        log::error!("volume {:x} fenced: {why}", inner.id);
        {
            let mut st = inner.shared.lock();
            st.fenced = Some(why.clone());
            st.wake_all();
        }
        finish(inner, Err(EngineError::Fenced(why)));
        return true;
    }
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
        finish(inner, Err(e));
        return true;
    }
    let delay = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(1));
    if wait {
        tokio::time::sleep(delay).await;
    }
    false
}

/// Err once the volume was fenced ([`super::Volume::fence`]): a fenced
/// volume stores nothing more.
pub(crate) fn check_not_fenced(inner: &Inner) -> Result<(), EngineError> {
    match &inner.shared.lock().fenced {
        Some(why) => Err(EngineError::Fenced(why.clone())),
        None => Ok(()),
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

struct Batch {
    seq: u64,
    recs: Vec<PendingRec>,
    files: HashMap<u64, wal::fs::SegFile>,
    cost: u64,
    prev_taken_seq: u64,
}

/// Take the records for the next chunk, if destage is due.
fn next_batch(inner: &Inner, st: &mut State) -> Option<Batch> {
    let start = st.pending.partition_point(|p| p.seq <= st.taken_seq);
    let front = st.pending.get(start)?;
    let age = inner.clock.now().saturating_sub(front.at);
    let untaken = st.pending_bytes - st.taken_bytes;
    let due = untaken >= inner.cfg.chunk_size
        || age >= Duration::from_millis(inner.cfg.destage_interval_ms)
        || !st.waiters.is_empty()
        || st.store_target > st.taken_seq
        || live_snapshot::wants_more(st)
        || st.closing;
    if !due {
        return None;
    }
    let mut recs = Vec::new();
    let mut bytes = 0;
    let mut cut_bytes = 0;
    let mut files = HashMap::new();
    // Cut only after a record that ends its request, so the store never
    // holds part of a write (while closing, a request whose tail never
    // came, because the WAL broke, may be cut).
    let mut cut = 0;
    for p in st.pending.range(start..) {
        if bytes >= inner.cfg.chunk_size && cut == recs.len() {
            break;
        }
        bytes += p.cost();
        if let Some(w) = p.loc {
            if let std::collections::hash_map::Entry::Vacant(e) = files.entry(w.seg) {
                e.insert(inner.wal.segment_file(w.seg)?);
            }
        }
        recs.push(*p);
        if !p.more || st.closing {
            cut = recs.len();
            cut_bytes = bytes;
        }
    }
    recs.truncate(cut);
    let last = recs.last()?.seq;
    let seq = st.next_chunk;
    let prev_taken_seq = st.taken_seq;
    st.next_chunk += 1;
    st.taken_seq = last;
    st.taken_bytes += cut_bytes;
    Some(Batch {
        seq,
        recs,
        files,
        cost: cut_bytes,
        prev_taken_seq,
    })
}

/// Give back the batch just taken (its chunk could not be built).
fn untake(inner: &Inner, b: &Taken) {
    let mut st = inner.shared.lock();
    st.next_chunk -= 1;
    st.taken_bytes -= b.cost;
    st.taken_seq = b.prev_taken_seq;
}

/// What taking a batch changed, so it can be given back.
struct Taken {
    cost: u64,
    prev_taken_seq: u64,
}

fn build(inner: &Inner, b: Batch) -> Result<Built, (EngineError, Taken)> {
    let taken = Taken {
        cost: b.cost,
        prev_taken_seq: b.prev_taken_seq,
    };
    let (Some(first), Some(last)) = (b.recs.first(), b.recs.last()) else {
        return Err((EngineError::LocalIo("empty destage batch".into()), taken));
    };
    let (extents, data) = match build_chunk(&b.recs, &b.files) {
        Ok(r) => r,
        Err(e) => return Err((e, taken)),
    };
    let key = chunk_key(inner.id, b.seq, inner.epoch);
    let header = ChunkHeader {
        volume: inner.id,
        epoch: inner.epoch,
        chunk_seq: b.seq,
        first_seq: first.seq,
        last_seq: last.seq,
        extents,
        block_crcs: Vec::new(),
        data_len: data.len() as u64,
        header_len: 0,
    };
    let obj = encode(&header, &data);
    let decoded = match decode_header(&obj) {
        Ok(d) => d,
        Err(source) => {
            let e = EngineError::Chunk {
                key: key.clone(),
                source,
            };
            return Err((e, taken));
        }
    };
    let info = Arc::new(ChunkInfo {
        seq: b.seq,
        epoch: inner.epoch,
        data_start: decoded.header_len,
        data_len: decoded.data_len,
        crcs: decoded.block_crcs,
    });
    Ok(Built {
        seq: b.seq,
        last_seq: last.seq,
        key,
        obj: Bytes::from(obj),
        extents: header.extents,
        info,
        cost: b.cost,
    })
}

/// Point the maps at a stored chunk; returns the seq up to which the
/// store now holds every write (the caller releases the WAL up to it).
fn apply(inner: &Inner, b: Built) -> u64 {
    let size = b.obj.len() as u64;
    let stored_seq = {
        let mut st = inner.shared.lock();
        st.apply_chunk_to_stored(b.info, &b.extents);
        st.apply_chunk_to_live(b.seq, b.last_seq, &b.extents);
        st.pop_stored(b.last_seq);
        st.taken_bytes -= b.cost;
        st.last_chunk = b.seq;
        st.destage_failures = 0;
        st.wake_all();
        st.stored_seq
    };
    inner
        .counters
        .chunks_written
        .fetch_add(1, Ordering::Relaxed);
    inner
        .counters
        .chunk_bytes_written
        .fetch_add(size, Ordering::Relaxed);
    stored_seq
}

/// Newest-wins extents and data of `recs`, all-zero sectors unmapped.
fn build_chunk(
    recs: &[PendingRec],
    files: &HashMap<u64, wal::fs::SegFile>,
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
        let file = files.get(&w.seg).ok_or(wal::WalError::SegmentGone(w.seg))?;
        let piece;
        let part: &[u8] = if w.block_crcs {
            // Blocks check alone: read only the live part.
            let mut buf = vec![0u8; (len * SECTOR) as usize];
            wal::read_record(file.as_ref(), &w, w.seg, &mut buf)?;
            piece = buf;
            &piece
        } else {
            // One CRC over the whole record: read it once, whole.
            if let std::collections::hash_map::Entry::Vacant(slot) = rec_data.entry(w.seq) {
                let whole = super::map::WalLoc { skip: 0, ..w };
                let mut buf = vec![0u8; (w.rec_sectors * SECTOR) as usize];
                wal::read_record(file.as_ref(), &whole, w.seg, &mut buf)?;
                slot.insert(buf);
            }
            let rd = &rec_data[&w.seq];
            &rd[(w.skip * SECTOR) as usize..((w.skip + len) * SECTOR) as usize]
        };
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
pub(crate) async fn put_create(inner: &Inner, key: &str, obj: Bytes) -> Result<(), EngineError> {
    check_not_fenced(inner)?;
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
