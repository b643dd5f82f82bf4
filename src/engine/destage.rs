//! The destage task: packs WAL records into chunk objects, puts them
//! (several at a time), applies them in order, and tells the meta task
//! ([`super::meta::task`]), which writes checkpoints and the manifest, what
//! happened. It never waits for the meta task: puts start and chunks are
//! applied while a checkpoint uploads.
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
//! 4. All chunk puts run inside this task, and every other store write of
//!    the open volume in the meta task: aborting both stops every store
//!    write. Chunks are built on the blocking pool ([`build`]), at most
//!    [`MAX_BUILDS`] at once, never on the runtime's threads.
//! 5. The meta task learns of a chunk ([`Command::ChunkApplied`]) only
//!    after it is applied, and of the close ([`Command::Close`]) only once
//!    every write is stored and applied; a snapshot request (which the
//!    façade sends this task on its own channel,
//!    [`DestageCommand`](super::task_request::DestageCommand)) goes to it
//!    only once every op it needs is stored, and a request sent before the
//!    close began goes to it before the close (`live_snapshot.rs`
//!    invariant 3). The WAL is released up to a
//!    stored chunk without waiting for a manifest to name it: recovery
//!    finds stored chunks after the manifest's `last_chunk` by listing
//!    (`recovery.rs` invariant 2).
//! 6. Destage runs ahead of the meta task by a bounded amount: no chunk
//!    starts while `last_chunk` is [`max_meta_lag`] or more past the
//!    committed checkpoint. Without it, a store slow at checkpoints and
//!    deletes lets each checkpoint find more dead chunks to delete than the
//!    last, and a crash then leaves them all behind as orphans.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::Semaphore;

use self::build::Batch;
use super::checkpoint::ChunkInfo;
use super::error::EngineError;
use super::format::chunk::{decode_header, ChunkExtent};
use super::format::layout::chunk_key;
use super::live_snapshot::{self, Requests};
use super::state::State;
use super::task_request::{Command, DestageReceiver, MetaSender};
use super::volume_core::Inner;
use crate::store::Body;
#[cfg(doc)]
use crate::store::{ObjectStore, DEFAULT_PUTS_IN_FLIGHT};

mod build;
mod newest;
mod stream;
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
    obj: Body,
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
        let res = inner.put_create(&built.key, built.obj.clone()).await;
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

/// The task body; runs until close, fencing or abort. Everything that
/// writes the manifest (commits, checkpoints, snapshots, GC, the final
/// checkpoint) runs in the meta task ([`super::meta::task`]), which `meta`
/// tells what happened and which this loop never waits for. The façade's
/// snapshot and GC requests come on `requests`; however the task ends,
/// those it still holds are dropped with it (their callers get an error).
pub(crate) async fn run(inner: Arc<Inner>, meta: MetaSender, requests: DestageReceiver) {
    let mut requests = Requests::new(inner.id, requests);
    let tick = Duration::from_millis(inner.cfg.destage_interval_ms.clamp(5, 100));
    let mut backoff = Duration::from_millis(10);
    let mut inflight: FuturesOrdered<ChunkFuture> = FuturesOrdered::new();
    let builds = Arc::new(Semaphore::new(MAX_BUILDS));
    let mut window = window::Window::new(window::limits(
        inner.store.puts_in_flight(),
        inner.cfg.max_unstored_bytes,
        inner.cfg.chunk_size,
    ));
    // The newest store position a commit was asked for (asked once).
    let mut commit_asked = 0;
    loop {
        if let Err(e) = inner.check_not_fenced() {
            requests.refuse(&e);
            fail(&inner, e, &mut backoff, false).await;
            return;
        }
        requests.take_queued();
        let due = requests.take_due(inner.shared.lock().stored_seq);
        if !forward_requests(&meta, due) {
            return meta_gone(&inner);
        }
        // Start puts for every chunk that is due, up to the limit.
        while inflight.len() < window.limit() {
            let batch = {
                let mut st = inner.shared.lock();
                if meta_lags(&inner, &st) {
                    break;
                }
                let wants_more = requests.wants_more(st.taken_seq);
                next_batch(&inner, &mut st, wants_more)
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
        if inflight.is_empty() {
            // One look at the state, taking in the queued requests under
            // its lock: a request sent before the close began is forwarded
            // before the close (`live_snapshot.rs` invariant 3).
            let (closing, idle, want_commit, stored_seq, due) = {
                let st = inner.shared.lock();
                let want = st.store_target > st.committed_seq && st.stored_seq > st.committed_seq;
                requests.take_queued();
                let due = requests.take_due(st.stored_seq);
                (st.closing, st.pending.is_empty(), want, st.stored_seq, due)
            };
            if !forward_requests(&meta, due) {
                return meta_gone(&inner);
            }
            if want_commit && stored_seq > commit_asked {
                commit_asked = stored_seq;
                if !meta.send(Command::CommitWanted { upto: stored_seq }) {
                    return meta_gone(&inner);
                }
            }
            if closing && idle {
                // Every write is stored and applied, none can come: the
                // meta task writes the final checkpoint and answers the
                // close (after the commands sent before this one).
                if !meta.send(Command::Close) {
                    meta_gone(&inner);
                }
                return;
            }
            tokio::select! {
                _ = inner.shared.notify.notified() => {}
                _ = requests.recv() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            continue;
        }
        let done = tokio::select! {
            done = inflight.next() => match done {
                Some(done) => done,
                None => continue,
            },
            _ = inner.shared.notify.notified() => continue,
            _ = requests.recv() => continue,
            _ = tokio::time::sleep(tick) => continue,
        };
        match done {
            Ok(built) => {
                backoff = Duration::from_millis(10);
                window.stored(inner.clock.now(), built.obj.len() as u64);
                let chunk = built.seq;
                let stored_seq = apply(&inner, built);
                // Releasing recycles WAL segments (a write, an
                // fdatasync, a rename, a directory sync): on the
                // WAL's releaser thread, not in this loop. The chunk is
                // stored: recovery finds it after the manifest's last
                // chunk, committed or not.
                inner.wal.release_upto_later(stored_seq);
                let want_commit = {
                    let st = inner.shared.lock();
                    st.store_target > st.committed_seq && st.stored_seq >= st.store_target
                };
                let mut told = meta.send(Command::ChunkApplied { chunk });
                if told && want_commit {
                    commit_asked = stored_seq;
                    told = meta.send(Command::CommitWanted { upto: stored_seq });
                }
                if !told {
                    return meta_gone(&inner);
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
                requests.refuse(&e);
                if fail(&inner, e, &mut backoff, false).await {
                    return;
                }
                inflight.push_front(chunk_future(inner.clone(), builds.clone(), stage, delay));
            }
        }
    }
}

/// Checkpoints' worth of chunks the meta task may lag behind destage.
const META_LAG_CHECKPOINTS: u64 = 4;
/// The least lag allowed, whatever `checkpoint_every_chunks` says.
const MIN_META_LAG: u64 = 32;

/// Whether the chunks applied since the committed checkpoint reach the
/// bound of invariant 6: no new chunk starts until the meta task catches up.
fn meta_lags(inner: &Inner, st: &State) -> bool {
    st.last_chunk.saturating_sub(st.checkpoint_chunk) >= max_meta_lag(&inner.cfg)
}

/// Invariant 6's bound for `cfg`.
pub(crate) fn max_meta_lag(cfg: &super::config::EngineConfig) -> u64 {
    cfg.checkpoint_every_chunks
        .saturating_mul(META_LAG_CHECKPOINTS)
        .max(MIN_META_LAG)
}

/// Hand the requests taken by [`Requests::take_due`] to the meta task;
/// false if it has ended (the requests are then dropped: their callers
/// get an error).
fn forward_requests(meta: &MetaSender, due: live_snapshot::Due) -> bool {
    let gcs_told = due
        .gcs
        .into_iter()
        .all(|gc| meta.send(Command::CollectGarbage(gc)));
    let snapshots_told = due
        .snapshots
        .into_iter()
        .all(|req| meta.send(Command::Snapshot(req)));
    gcs_told && snapshots_told
}

/// The meta task ended before the destage task (it was fenced, or a close
/// gave up): nothing more can be committed, so destage stops too. A close
/// still waiting is answered.
fn meta_gone(inner: &Inner) {
    let res = match inner.check_not_fenced() {
        Err(e) => Err(e),
        Ok(()) => Err(EngineError::Closed),
    };
    inner.finish_close(res);
}

/// Record a failure (the caller has failed the requests it holds with
/// it). Returns true when the task must stop (fenced, or a close gave up);
/// otherwise doubles the backoff, after waiting it out if `wait` (a failed
/// put instead waits inside its retry).
pub(crate) async fn fail(
    inner: &Inner,
    e: EngineError,
    backoff: &mut Duration,
    wait: bool,
) -> bool {
    if let EngineError::Fenced(why) = e {
        log::error!("volume {:x} fenced: {why}", inner.id);
        {
            let mut st = inner.shared.lock();
            st.fenced = Some(why.clone());
            st.wake_all();
        }
        // The other task (destage or meta) stops at its next look.
        inner.shared.notify.notify_one();
        inner.finish_close(Err(EngineError::Fenced(why)));
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
        inner.finish_close(Err(e));
        return true;
    }
    let delay = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(1));
    if wait {
        tokio::time::sleep(delay).await;
    }
    false
}

/// Take the records for the next chunk, if destage is due (`wants_more`:
/// a snapshot waits for records not yet taken, [`Requests::wants_more`]).
fn next_batch(inner: &Inner, st: &mut State, wants_more: bool) -> Option<Batch> {
    let start = st.pending.partition_point(|p| p.seq <= st.taken_seq);
    let front = st.pending.get(start)?;
    let age = inner.clock.now().saturating_sub(front.at);
    let untaken = st.pending_bytes - st.taken_bytes;
    let due = untaken >= inner.cfg.chunk_size
        || age >= Duration::from_millis(inner.cfg.destage_interval_ms)
        || !st.waiters.is_empty()
        || st.store_target > st.taken_seq
        || wants_more
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
    let head = obj.body.parts().first().map_or(&[][..], |b| &b[..]);
    let decoded = decode_header(head).map_err(|source| EngineError::Chunk {
        key: key.clone(),
        source,
    })?;
    let info = Arc::new(ChunkInfo {
        seq: b.seq,
        epoch: inner.epoch,
        data_start: decoded.header_len,
        data_len: decoded.data_len,
        table_crc: super::format::chunk::table_crc(&decoded.block_crcs),
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
        // A store that joins the parts anyway gets them joined here, on
        // the blocking pool, so the buffers they lie in (WAL spans) go now
        // instead of after the put.
        obj: if inner.store.writes_parts() {
            obj.body
        } else {
            Body::from(obj.body.into_bytes())
        },
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
