//! Snapshots of an open volume ([`super::Volume::snapshot`]), crash-consistent at
//! a flush point: the protocol, and its side in the destage and meta tasks
//! (the volume's side, its snapshot API, is in `volume/snapshot.rs`).
//!
//! Protocol:
//! 1. New writes, trims and zeroes are held back (`State::writes_paused`;
//!    they wait in `wait_for_room`, never fail). Reads and flushes go on.
//! 2. The WAL is synced: every write acknowledged before the call is
//!    durable, and its sequence number is at most the WAL's last one, `S`.
//! 3. The destage task is asked (`State::snapshot_req`) to store everything
//!    up to `S`; once `stored_seq >= S` it hands the request to the meta
//!    task ([`super::meta::task`]), which commits a checkpoint and, before any
//!    later checkpoint can delete a chunk (it runs them all, one at a
//!    time), writes the snapshot object from that checkpoint
//!    ([`store_snapshot`]). The object put is the commit point: on any
//!    error there is no snapshot.
//! 4. Writes resume, whatever the outcome; the pause is logged and counted.
//!
//! Deleting a snapshot of the open volume: a delete that may still be
//! undone first marks the object ([`super::Volume::begin_snapshot_delete`]; the
//! snapshot keeps its chunks, since every checkpoint and compaction still
//! counts it as retained), and the caller removes the object once nothing
//! needs it back; [`super::Volume::delete_snapshot`] removes it at once. The
//! removal is the commit point. Then [`super::Volume::collect_garbage`] has the
//! meta task, between its checkpoints, delete every chunk that neither
//! the committed checkpoint nor any remaining snapshot names (chunks after
//! the checkpoint are kept: recovery may still apply them). The live map
//! only points at chunks of the store-side map, so no reader loses data.
//!
//! Invariants:
//! - One snapshot create or delete at a time per volume (a second call
//!   fails at once).
//! - A destage failure while a request waits fails the snapshot (the
//!   store may be down for long; writes must not wait for it).
//! - A request never outlives the destage task: [`StopGuard`] answers it
//!   while it waits in the state; once handed to the meta task, the meta
//!   task answers it or drops it when it ends (the caller then gets an
//!   error).
//! - The snapshot is a prefix of the write history (chunks are never cut
//!   inside a request), holding at least every op up to `S`.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::commit::checkpoint;
use super::error::EngineError;
use super::fenced_delete::FencedDeleter;
use super::format::layout::{chunk_prefix, parse_chunk_name, snapshot_key};
use super::meta::manifest::{read_manifest, Root};
use super::snapshot::{store_snapshot, RetainSet, SnapshotError, SnapshotObject};
use super::state::State;
use super::task_request::{GcRequest, Reply, SnapshotRequest};
use super::volume_core::Inner;

/// A request waits whose ops are not all taken into chunks yet (destage
/// should cut a chunk now rather than wait for its size or timer).
pub(crate) fn wants_more(st: &State) -> bool {
    st.snapshot_req
        .as_ref()
        .is_some_and(|r| r.target > st.taken_seq)
}

/// Requests taken out of the state for the meta task.
pub(crate) type Due = (Option<SnapshotRequest>, Option<GcRequest>);

/// In the destage task: take the requests the meta task can serve now
/// (a GC request, a snapshot request whose ops are all stored) out of the
/// state, to send them on ([`super::task_request::Command`]).
pub(crate) fn take_due(st: &mut State) -> Due {
    let snapshot_due = st
        .snapshot_req
        .as_ref()
        .is_some_and(|r| st.stored_seq >= r.target);
    let snapshot = if snapshot_due {
        st.snapshot_req.take()
    } else {
        None
    };
    (snapshot, st.gc_req.take())
}

/// In the meta task: delete every chunk at or before the committed
/// checkpoint that neither the volume's map nor any snapshot names, and
/// answer `req` (unless its caller went away).
pub(crate) async fn serve_gc(inner: &Inner, req: GcRequest) {
    if req.is_canceled() {
        return;
    }
    let _ = req.send(collect_unreferenced(inner).await);
}

async fn collect_unreferenced(inner: &Inner) -> Result<u64, String> {
    // Read under one lock: the chunks of the committed checkpoint are
    // exactly those of `chunks` up to `checkpoint_chunk`.
    let (checkpoint_chunk, mapped): (u64, HashSet<(u64, u64)>) = {
        let st = inner.shared.lock();
        let mapped = st
            .chunks
            .values()
            .map(|e| (e.info.seq, e.info.epoch))
            .collect();
        (st.checkpoint_chunk, mapped)
    };
    // Listed after the snapshot object was deleted.
    let retain = RetainSet::load(&inner.store, inner.id).await;
    if retain == RetainSet::All {
        return Err("the volume's snapshots cannot all be read".into());
    }
    let prefix = chunk_prefix(inner.id);
    let listed = inner.store.list(&prefix).await.map_err(|e| e.to_string())?;
    // Our view of the map is only the truth while we hold the volume.
    inner.check_not_fenced().map_err(|e| e.to_string())?;
    match manifest_holder_epoch(inner).await {
        Ok(epoch) if epoch == inner.epoch => {}
        Ok(epoch) => return Err(format!("the volume was taken over at epoch {epoch}")),
        Err(e) => return Err(format!("cannot read the manifest: {e}")),
    }
    // Only objects of our epoch or older, with fencing re-checked as the
    // loops go: a newer holder's objects are never ours to judge.
    let mut deleter = FencedDeleter::new(&inner.store, inner.id, inner.epoch);
    let res = delete_listed(
        inner,
        &mut deleter,
        listed,
        checkpoint_chunk,
        &mapped,
        &retain,
    )
    .await;
    inner
        .counters
        .chunks_deleted
        .fetch_add(deleter.deleted, Ordering::Relaxed);
    res.map(|()| deleter.deleted).map_err(|e| e.to_string())
}

/// The deleting part of [`collect_unreferenced`].
async fn delete_listed(
    inner: &Inner,
    deleter: &mut FencedDeleter<'_>,
    listed: Vec<crate::store::ObjectMeta>,
    checkpoint_chunk: u64,
    mapped: &HashSet<(u64, u64)>,
    retain: &RetainSet,
) -> Result<(), EngineError> {
    let prefix = chunk_prefix(inner.id);
    for meta in listed {
        let Some((seq, epoch)) = parse_chunk_name(&meta.key[prefix.len()..]) else {
            continue;
        };
        if seq > checkpoint_chunk || mapped.contains(&(seq, epoch)) || retain.keeps(seq, epoch) {
            continue;
        }
        inner.check_not_fenced()?;
        deleter.delete(&meta.key, epoch).await?;
    }
    super::compaction_gc::delete_unnamed(deleter, &inner.store, inner.id, mapped, retain).await?;
    Ok(())
}

/// In the meta task: commit a checkpoint and write the snapshot object of
/// `req` (all of whose ops are stored) from it, then answer. A checkpoint
/// failure is also returned, for the task's own error handling. A request
/// whose caller went away is dropped unserved.
pub(crate) async fn serve_snapshot(
    inner: &Inner,
    root: &mut Root,
    req: SnapshotRequest,
) -> Result<(), EngineError> {
    if req.reply.is_canceled() {
        return Ok(());
    }
    match checkpoint(inner, root, true).await {
        Ok(cp) => {
            let Some(cp) = cp else {
                let e = EngineError::Encode("checkpoint returned no map".into());
                let _ = req.reply.send(Err(failure(inner, &e)));
                return Err(e);
            };
            let parent = root.manifest.parent;
            let res = store_snapshot(
                &inner.store,
                inner.id,
                &req.name,
                req.created_ms,
                cp,
                parent,
            )
            .await;
            let res = match res {
                Ok(snap) => keep_if_still_ours(inner, snap).await,
                Err(e) => Err(e),
            };
            let _ = req.reply.send(res);
            Ok(())
        }
        Err(e) => {
            let _ = req.reply.send(Err(failure(inner, &e)));
            Err(e)
        }
    }
}

/// The snapshot object was written after our checkpoint commit; if another
/// writer took the volume over meanwhile, its chunk deletion may not have
/// seen the object, so the object is removed and the snapshot fails. A
/// new holder's recovery only deletes chunks outside the checkpoint it
/// loaded (ours names every chunk of the snapshot), and it commits its
/// epoch as the manifest's `history_epoch` before any later deletion, so
/// reading our own epoch there after the put proves it will see the object.
async fn keep_if_still_ours(inner: &Inner, snap: SnapshotObject) -> Reply {
    let why = match manifest_holder_epoch(inner).await {
        Ok(epoch) if epoch == inner.epoch => return Ok(snap),
        Ok(epoch) => format!("the volume was taken over at epoch {epoch}"),
        Err(e) => format!("cannot read the manifest to confirm the lease: {e}"),
    };
    let key = snapshot_key(inner.id, snap.id);
    if let Err(e) = inner.store.delete(&key).await {
        log::error!(
            "volume {:x}: could not remove unconfirmed snapshot {key}: {e}",
            inner.id
        );
    }
    Err(SnapshotError::State {
        volume: inner.id,
        reason: format!("no snapshot was taken: {why}"),
    })
}

/// The epoch of the writer that last committed the volume's manifest
/// (its `history_epoch`, which every open commits).
async fn manifest_holder_epoch(inner: &Inner) -> Result<u64, EngineError> {
    let (m, _) = read_manifest(&inner.store, inner.id).await?;
    Ok(m.history_epoch)
}

/// Fail snapshot request `req` with `e` (the meta task, on a failure while
/// it waits there).
pub(crate) fn refuse_snapshot(inner: &Inner, req: SnapshotRequest, e: &EngineError) {
    let _ = req.reply.send(Err(failure(inner, e)));
}

/// In the destage or meta task, on any failure: requests waiting in the
/// state fail with it.
pub(crate) fn refuse(inner: &Inner, e: &EngineError) {
    let (req, gc) = {
        let mut st = inner.shared.lock();
        (st.snapshot_req.take(), st.gc_req.take())
    };
    if let Some(req) = req {
        let _ = req.reply.send(Err(failure(inner, e)));
    }
    if let Some(gc) = gc {
        let _ = gc.send(Err(e.to_string()));
    }
}

fn failure(inner: &Inner, e: &EngineError) -> SnapshotError {
    match e {
        EngineError::Fenced(why) => EngineError::Fenced(why.clone()).into(),
        other => SnapshotError::State {
            volume: inner.id,
            reason: format!("no snapshot was taken: storing the volume's data failed: {other}"),
        },
    }
}

/// Marks the destage task's end and drops any request left (its sender
/// goes away, so the waiting [`super::Volume::snapshot`] returns an error).
pub(crate) struct StopGuard(Arc<Inner>);

impl StopGuard {
    pub fn new(inner: Arc<Inner>) -> StopGuard {
        StopGuard(inner)
    }
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        let reqs = {
            let mut st = self.0.shared.lock();
            st.destage_stopped = true;
            (st.snapshot_req.take(), st.gc_req.take())
        };
        drop(reqs);
    }
}
