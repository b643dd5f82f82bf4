//! Snapshots of an open volume ([`Volume::snapshot`]), crash-consistent at
//! a flush point.
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
//! undone first marks the object ([`Volume::begin_snapshot_delete`]; the
//! snapshot keeps its chunks, since every checkpoint and compaction still
//! counts it as retained), and the caller removes the object once nothing
//! needs it back; [`Volume::delete_snapshot`] removes it at once. The
//! removal is the commit point. Then [`Volume::collect_garbage`] has the
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
use std::time::Duration;

use futures::channel::oneshot;

use super::commit::checkpoint;
use super::error::EngineError;
use super::fenced_delete::FencedDeleter;
use super::format::layout::{chunk_prefix, parse_chunk_name, snapshot_key};
use super::meta::manifest::{read_manifest, Root};
use super::snapshot::{
    find_snapshot, set_deleting, store_snapshot, RetainSet, SnapshotError, SnapshotObject,
};
use super::state::State;
use super::task_request::{GcRequest, Reply, SnapshotRequest};
use super::volume::Volume;
use super::volume_core::Inner;
use crate::store::StoreError;

impl Volume {
    /// Take snapshot `name` of this open volume, crash-consistent at a flush
    /// point: every write acknowledged before the call is in it, and it is a
    /// prefix of the write history. New writes wait (they do not fail) until
    /// it is done; reads go on. On error no snapshot exists and writes resume.
    pub async fn snapshot(
        &self,
        name: &str,
        created_ms: u64,
    ) -> Result<SnapshotObject, SnapshotError> {
        let inner = &self.inner;
        {
            let mut st = inner.shared.lock();
            claim(inner, &mut st)?;
            st.writes_paused = true;
        }
        let pause = Pause {
            inner,
            name,
            started: inner.clock.now(),
        };
        inner.wal.sync().await.map_err(EngineError::from)?;
        let target = inner.wal.last_seq();
        let (tx, rx) = oneshot::channel();
        {
            let mut st = inner.shared.lock();
            refuse_unless_running(&st)?;
            st.snapshot_req = Some(SnapshotRequest {
                target,
                name: name.to_string(),
                created_ms,
                reply: tx,
            });
        }
        inner.shared.notify.notify_one();
        let res = match rx.await {
            Ok(res) => res,
            Err(_) => Err(stopped_error(inner)),
        };
        if res.is_ok() {
            inner
                .counters
                .snapshots_taken
                .fetch_add(1, Ordering::Relaxed);
        }
        drop(pause);
        if res.is_ok() {
            self.account_snapshots().await;
        }
        res
    }

    /// Space accounting follows the snapshot set at once (the pool task
    /// would otherwise notice the change only at its next refresh).
    async fn account_snapshots(&self) {
        if let Err(e) = self.reload_snapshots().await {
            log::warn!(
                "volume {:x}: cannot re-read its snapshots for space accounting: {e}",
                self.inner.id
            );
        }
    }

    /// Mark snapshot `name` of this open volume as being deleted and return
    /// it (marked). It keeps every chunk it names, whatever checkpoints and
    /// compaction run meanwhile, until the caller removes its object
    /// ([`super::snapshot::remove_snapshot`]) once nothing needs it, or
    /// clears the mark ([`super::snapshot::set_deleting`]) to undo.
    pub async fn begin_snapshot_delete(&self, name: &str) -> Result<SnapshotObject, SnapshotError> {
        let inner = &self.inner;
        {
            let mut st = inner.shared.lock();
            claim(inner, &mut st)?;
        }
        let _busy = Busy(inner);
        let snap = find_snapshot(&inner.store, inner.id, name).await?;
        set_deleting(&inner.store, inner.id, snap.id, true).await
    }

    /// Delete the object of snapshot `name` of this open volume (the
    /// commit point of the delete, which cannot be undone) and return it.
    /// Its chunks stay until [`Volume::collect_garbage`].
    pub async fn delete_snapshot(&self, name: &str) -> Result<SnapshotObject, SnapshotError> {
        let inner = &self.inner;
        {
            let mut st = inner.shared.lock();
            claim(inner, &mut st)?;
        }
        let _busy = Busy(inner);
        let snap = find_snapshot(&inner.store, inner.id, name).await?;
        match inner.store.delete(&snapshot_key(inner.id, snap.id)).await {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.account_snapshots().await;
        Ok(snap)
    }

    /// Delete every chunk of this open volume that neither its committed
    /// checkpoint nor any snapshot names (after a snapshot delete). Returns
    /// how many were deleted. Runs in the meta task ([`super::meta::task`]),
    /// between its checkpoints and snapshot creations.
    pub async fn collect_garbage(&self) -> Result<u64, SnapshotError> {
        let inner = &self.inner;
        {
            let mut st = inner.shared.lock();
            claim(inner, &mut st)?;
        }
        let _busy = Busy(inner);
        let not_freed = |why: String| SnapshotError::State {
            volume: inner.id,
            reason: format!(
                "freeing unreferenced chunks failed ({why}); a later attempt frees them"
            ),
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut st = inner.shared.lock();
            if let Err(e) = refuse_unless_running(&st) {
                return Err(not_freed(e.to_string()));
            }
            st.gc_req = Some(tx);
        }
        inner.shared.notify.notify_one();
        let res = rx.await;
        // Snapshot objects a caller removed since are no longer counted.
        self.account_snapshots().await;
        match res {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(why)) => Err(not_freed(why)),
            Err(_) => Err(not_freed(stopped_error(inner).to_string())),
        }
    }
}

/// Take the volume's one snapshot-operation slot.
fn claim(inner: &Inner, st: &mut State) -> Result<(), SnapshotError> {
    refuse_unless_running(st)?;
    if st.snapshot_busy {
        return Err(SnapshotError::State {
            volume: inner.id,
            reason: "another snapshot create or delete of this volume is in progress".into(),
        });
    }
    st.snapshot_busy = true;
    Ok(())
}

/// Gives the slot back (and withdraws an unserved GC request) on drop.
struct Busy<'a>(&'a Inner);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut st = self.0.shared.lock();
        st.snapshot_busy = false;
        st.gc_req = None;
    }
}

/// Fenced, closing or without a destage task: no snapshot can be taken.
fn refuse_unless_running(st: &State) -> Result<(), SnapshotError> {
    if let Some(why) = &st.fenced {
        return Err(EngineError::Fenced(why.clone()).into());
    }
    if st.closing || st.destage_stopped {
        return Err(SnapshotError::Engine(EngineError::Closed));
    }
    Ok(())
}

/// Why the destage task went away without answering.
fn stopped_error(inner: &Inner) -> SnapshotError {
    match inner.shared.lock().fenced.clone() {
        Some(why) => EngineError::Fenced(why).into(),
        None => EngineError::Closed.into(),
    }
}

/// Holds writes back while alive; on drop (success, error or a dropped
/// future) withdraws an unserved request, lets writes go and logs the pause.
struct Pause<'a> {
    inner: &'a Inner,
    name: &'a str,
    started: Duration,
}

impl Drop for Pause<'_> {
    fn drop(&mut self) {
        {
            let mut st = self.inner.shared.lock();
            st.writes_paused = false;
            st.snapshot_busy = false;
            st.snapshot_req = None;
            st.wake_all();
        }
        let paused = self.inner.clock.now().saturating_sub(self.started);
        self.inner
            .counters
            .last_snapshot_pause_us
            .store(paused.as_micros() as u64, Ordering::Relaxed);
        log::info!(
            "volume {:x}: snapshot {:?} held writes back for {:.3} ms",
            self.inner.id,
            self.name,
            paused.as_secs_f64() * 1000.0
        );
    }
}

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
/// state, to send them on ([`super::meta::task::Command`]).
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
    super::destage::check_not_fenced(inner).map_err(|e| e.to_string())?;
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
        super::destage::check_not_fenced(inner)?;
        deleter.delete(&meta.key, epoch).await?;
    }
    super::compact::delete_unnamed(deleter, &inner.store, inner.id, mapped, retain).await?;
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
/// goes away, so the waiting [`Volume::snapshot`] returns an error).
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
