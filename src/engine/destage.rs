//! The destage task: packs WAL records into chunk objects, puts them
//! (several at a time), applies them in order, and triggers checkpoints.
//!
//! Invariants:
//! 1. Chunk `n` holds exactly the records following chunk `n-1`'s (a run of
//!    `pending`), and is never cut inside a write request; so any set of
//!    landed chunks read in order up to the first gap is a prefix of the
//!    history (recovery stops at the first gap).
//! 2. Up to the window's limit of chunks are on their way at once (being
//!    built, then put; [`window`]: at least [`DEFAULT_PUTS_IN_FLIGHT`],
//!    growing towards the store's [`ObjectStore::puts_in_flight`] while
//!    throughput grows), but chunks are applied to the maps strictly in
//!    chunk order, and only after their put succeeded; the WAL space is released
//!    only then (on the WAL's releaser thread, not in this task).
//! 3. A failed put is retried with the very same bytes, so a put that
//!    landed despite an error is recognised (identical content) on retry;
//!    a failed build is retried from the very same records.
//! 4. All puts run inside this task: aborting it stops every store write.
//!    Chunks are built on the blocking pool ([`build`]), at most
//!    [`MAX_BUILDS`] at once, never on the runtime's threads.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::Semaphore;

use self::build::Batch;
use super::checkpoint::{ChunkInfo, Manifest};
use super::chunk::{decode_header, ChunkExtent};
use super::commit::{checkpoint, commit_progress, final_checkpoint, Root};
use super::error::EngineError;
use super::layout::chunk_key;
use super::live_snapshot;
use super::state::State;
use super::volume::Inner;
#[cfg(doc)]
use crate::store::{ObjectStore, DEFAULT_PUTS_IN_FLIGHT};
use crate::store::{PutMode, StoreError, Version};

mod build;
mod newest;
pub(crate) mod window;

/// Consecutive failures after which a pending `close` gives up.
const CLOSE_GIVE_UP: u32 = 5;
/// Chunks being built at once (each holds a chunk's worth of WAL reads
/// and its object: memory, and the blocking pool's threads).
pub const MAX_BUILDS: usize = 2;

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

/// Where a chunk is on its way: records to build, or bytes to put.
enum Stage {
    Records(Arc<Batch>),
    Built(Built),
}

/// How a chunk's way to the store ended: stored, or where it failed.
type ChunkResult = Result<Built, (Stage, EngineError)>;
type ChunkFuture = Pin<Box<dyn Future<Output = ChunkResult> + Send>>;

/// Build (unless built) and put one chunk, after `delay`.
fn chunk_future(
    inner: Arc<Inner>,
    builds: Arc<Semaphore>,
    stage: Stage,
    delay: Duration,
) -> ChunkFuture {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let built = match stage {
            Stage::Built(b) => b,
            Stage::Records(batch) => match build_off_runtime(&inner, &builds, &batch).await {
                Ok(b) => b,
                Err(e) => return Err((Stage::Records(batch), e)),
            },
        };
        let started = inner.clock.now();
        let res = put_create(&inner, &built.key, built.obj.clone()).await;
        let took = inner.clock.now().saturating_sub(started).as_micros();
        let took = u64::try_from(took).unwrap_or(u64::MAX);
        inner.counters.destage_us.fetch_add(took, Ordering::Relaxed);
        match res {
            Ok(()) => Ok(built),
            Err(e) => Err((Stage::Built(built), e)),
        }
    })
}

/// [`build`] on the blocking pool, at most [`MAX_BUILDS`] at once.
async fn build_off_runtime(
    inner: &Arc<Inner>,
    builds: &Semaphore,
    batch: &Arc<Batch>,
) -> Result<Built, EngineError> {
    let _permit = builds
        .acquire()
        .await
        .map_err(|_| EngineError::LocalIo("chunk builds stopped".into()))?;
    let (i, b) = (inner.clone(), batch.clone());
    tokio::task::spawn_blocking(move || build(&i, &b))
        .await
        .map_err(|e| EngineError::LocalIo(format!("chunk build did not finish: {e}")))?
}

/// The task body; runs until close, fencing or abort.
pub(crate) async fn run(inner: Arc<Inner>, manifest: Manifest, version: Version) {
    let mut root = Root { manifest, version };
    // However the task ends, a snapshot request left behind is answered.
    let _requests = live_snapshot::StopGuard::new(inner.clone());
    let tick = Duration::from_millis(inner.cfg.destage_interval_ms.clamp(5, 100));
    let mut backoff = Duration::from_millis(10);
    let mut inflight: FuturesOrdered<ChunkFuture> = FuturesOrdered::new();
    // Chunks that finished while the loop was busy (checkpointing), in
    // chunk order: handled before anything from `inflight`.
    let mut ready: VecDeque<ChunkResult> = VecDeque::new();
    let builds = Arc::new(Semaphore::new(MAX_BUILDS));
    let mut window = window::Window::new(window::limits(
        inner.store.puts_in_flight(),
        inner.cfg.max_unstored_bytes,
        inner.cfg.chunk_size,
    ));
    loop {
        if let Err(e) = check_not_fenced(&inner) {
            fail(&inner, e, &mut backoff, false).await;
            return;
        }
        // Start puts for every chunk that is due, up to the limit.
        while inflight.len() + ready.len() < window.limit() {
            let batch = {
                let mut st = inner.shared.lock();
                next_batch(&inner, &mut st)
            };
            let Some(batch) = batch else {
                window.starved();
                break;
            };
            let stage = Stage::Records(Arc::new(batch));
            inflight.push_back(chunk_future(
                inner.clone(),
                builds.clone(),
                stage,
                Duration::ZERO,
            ));
        }
        if inflight.is_empty() && ready.is_empty() {
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
        let done = match ready.pop_front() {
            Some(done) => done,
            None => tokio::select! {
                done = inflight.next() => match done {
                    Some(done) => done,
                    None => continue,
                },
                _ = inner.shared.notify.notified() => continue,
                _ = tokio::time::sleep(tick) => continue,
            },
        };
        match done {
            Ok(built) => {
                backoff = Duration::from_millis(10);
                window.stored(inner.clock.now(), built.obj.len() as u64);
                let stored_seq = apply(&inner, built);
                // Releasing recycles WAL segments (a write, an
                // fdatasync, a rename, a directory sync): on the
                // WAL's releaser thread, not in this loop.
                inner.wal.release_upto_later(stored_seq);
                let (due, want_commit) = {
                    let st = inner.shared.lock();
                    (
                        st.last_chunk - st.checkpoint_chunk >= inner.cfg.checkpoint_every_chunks,
                        st.store_target > st.committed_seq && st.stored_seq >= st.store_target,
                    )
                };
                let work = async {
                    let res = if due {
                        checkpoint(&inner, &mut root, false).await.map(drop)
                    } else if want_commit {
                        commit_progress(&inner, &mut root).await
                    } else {
                        Ok(())
                    };
                    match res {
                        Ok(()) => live_snapshot::serve(&inner, &mut root).await,
                        Err(e) => Err(e),
                    }
                };
                // The chunks on their way keep moving meanwhile.
                let res = driving(work, &mut inflight, &mut ready).await;
                if let Err(e) = res {
                    if fail(&inner, e, &mut backoff, true).await {
                        return;
                    }
                }
            }
            Err((stage, e)) => {
                window.failed();
                // A failed build (the local WAL did not read) is retried
                // after the backoff and a tick, the loop's own pace; a
                // failed put after the backoff.
                let delay = match stage {
                    Stage::Records(_) => backoff + tick,
                    Stage::Built(_) => backoff,
                };
                if fail(&inner, e, &mut backoff, false).await {
                    return;
                }
                inflight.push_front(chunk_future(inner.clone(), builds.clone(), stage, delay));
            }
        }
    }
}

/// Run `work` while the chunks in `inflight` keep moving; those that
/// finish meanwhile are queued on `ready`, in chunk order.
async fn driving<T>(
    work: impl Future<Output = T>,
    inflight: &mut FuturesOrdered<ChunkFuture>,
    ready: &mut VecDeque<ChunkResult>,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            Some(done) = inflight.next(), if !inflight.is_empty() => ready.push_back(done),
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
    st.next_chunk += 1;
    st.taken_seq = last;
    st.taken_bytes += cut_bytes;
    Some(Batch {
        seq,
        recs,
        files,
        cost: cut_bytes,
    })
}

/// Build the chunk of `b` ([`build::build`]) and what applying it needs.
fn build(inner: &Inner, b: &Batch) -> Result<Built, EngineError> {
    let obj = build::build(inner.id, inner.epoch, b)?;
    let key = chunk_key(inner.id, b.seq, inner.epoch);
    let decoded = decode_header(&obj.bytes).map_err(|source| EngineError::Chunk {
        key: key.clone(),
        source,
    })?;
    let info = Arc::new(ChunkInfo {
        seq: b.seq,
        epoch: inner.epoch,
        data_start: decoded.header_len,
        data_len: decoded.data_len,
        table_crc: super::chunk::table_crc(&decoded.block_crcs),
    });
    // Destage has the table at hand: readers of the fresh chunk need no
    // header GET.
    inner
        .tables
        .insert(inner.id, &info, decoded.block_crcs.into());
    Ok(Built {
        seq: b.seq,
        last_seq: obj.last_seq,
        key,
        obj: Bytes::from(obj.bytes),
        extents: obj.extents,
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
