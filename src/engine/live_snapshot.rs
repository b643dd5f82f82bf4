//! Snapshots of an open volume ([`super::Volume::snapshot`]), crash-consistent at
//! a flush point: the protocol, and its side in the destage and meta tasks
//! (the volume's side, its snapshot API, is in `volume/snapshot.rs`).
//!
//! Protocol:
//! 1. New writes, trims and zeroes are held back (`State::writes_paused`;
//!    they wait in `wait_for_room`, never fail). Reads and flushes go on.
//! 2. The WAL is synced: every write acknowledged before the call is
//!    durable, and its sequence number is at most the WAL's last one, `S`.
//! 3. The destage task is asked, by a command on its channel
//!    ([`super::task_request::DestageCommand::Snapshot`]), to store
//!    everything up to `S`. It holds the request ([`Requests`]; chunks are
//!    cut at once while it waits) until `stored_seq >= S`, then hands it
//!    to the meta task ([`super::meta::task`]), which commits a checkpoint
//!    and, before any later checkpoint can delete a chunk (it runs them
//!    all, one at a time), writes the snapshot object from that checkpoint
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
//! 1. One snapshot create, delete or GC at a time per volume (a second
//!    call fails at once): the façade sends one request per operation,
//!    and frees the slot only once the request is answered or its caller
//!    went away.
//! 2. A failure of the destage or the meta task while a request waits
//!    fails it (the store may be down for long; writes must not wait for
//!    it): the destage task fails those it holds on its own failures and
//!    on the meta task's ([`super::task_request::DestageCommand::Refuse`];
//!    fencing it sees itself), the meta task those handed to it.
//! 3. A request never outlives the tasks: one the destage task holds, or
//!    one still queued on its channel, is dropped with the task (its
//!    reply sender goes away, so the caller gets an error); once handed to
//!    the meta task, that task answers it or drops it when it ends. A
//!    request sent while the volume is not closing is taken in before the
//!    destage task sees the close (the façade sends under the state lock,
//!    and the destage task takes queued commands under it when it looks at
//!    `closing`), so it is served before the final checkpoint.
//! 4. A request whose caller went away (its reply receiver dropped) is
//!    dropped unserved by whichever task holds it, and no longer makes
//!    destage cut chunks early.
//! 5. The snapshot is a prefix of the write history (chunks are never cut
//!    inside a request), holding at least every op up to `S`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::commit::checkpoint;
use super::error::EngineError;
use super::fenced_delete::FencedDeleter;
use super::format::layout::{chunk_prefix, parse_chunk_name, snapshot_key};
use super::meta::manifest::{read_manifest, Root};
use super::snapshot::{store_snapshot, RetainSet, SnapshotError, SnapshotObject};
use super::task_request::{DestageCommand, DestageReceiver, GcRequest, Reply, SnapshotRequest};
use super::volume_core::Inner;

/// The façade's requests as the destage task holds them: its end of the
/// destage channel, the snapshots waiting for their ops to be stored, and
/// the GC requests to hand on to the meta task. It lives in the destage
/// task and is dropped with it, and with it every request held or still
/// queued: their callers get an error (invariant 3).
pub(crate) struct Requests {
    /// The volume's id, for the errors.
    volume: u64,
    rx: DestageReceiver,
    /// Nothing can send any more (the volume and the meta task are gone).
    closed: bool,
    /// Snapshots whose ops are not all stored yet, in arrival order.
    snapshots: VecDeque<SnapshotRequest>,
    gcs: Vec<GcRequest>,
}

/// Requests the meta task can serve now, to be sent on to it
/// ([`super::task_request::Command`]).
#[derive(Default)]
pub(crate) struct Due {
    pub gcs: Vec<GcRequest>,
    pub snapshots: Vec<SnapshotRequest>,
}

impl Requests {
    pub fn new(volume: u64, rx: DestageReceiver) -> Requests {
        Requests {
            volume,
            rx,
            closed: false,
            snapshots: VecDeque::new(),
            gcs: Vec::new(),
        }
    }

    /// Wait for the next command and take it in; never ends once nothing
    /// can send. Cancel-safe (for `select!`): nothing is awaited after a
    /// command is received.
    pub async fn recv(&mut self) {
        if self.closed {
            return std::future::pending().await;
        }
        match self.rx.0.recv().await {
            Some(cmd) => self.take_in(cmd),
            None => self.closed = true,
        }
    }

    /// Take in every command already queued, without waiting.
    pub fn take_queued(&mut self) {
        loop {
            match self.rx.0.try_recv() {
                Ok(cmd) => self.take_in(cmd),
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn take_in(&mut self, cmd: DestageCommand) {
        match cmd {
            DestageCommand::Snapshot(req) => self.snapshots.push_back(req),
            DestageCommand::CollectGarbage(gc) => self.gcs.push(gc),
            DestageCommand::Refuse { why } => {
                let volume = self.volume;
                self.refuse_with(|| failed(volume, &why), &why);
            }
        }
    }

    /// A snapshot waits whose ops are not all taken into chunks yet
    /// (destage should cut a chunk now rather than wait for its size or
    /// timer). A request whose caller went away does not count.
    pub fn wants_more(&self, taken_seq: u64) -> bool {
        self.snapshots
            .iter()
            .any(|r| r.target > taken_seq && !r.reply.is_canceled())
    }

    /// Take out the requests the meta task can serve now: every GC
    /// request, and every snapshot whose ops are all stored (up to
    /// `stored_seq`). Requests whose callers went away are dropped.
    pub fn take_due(&mut self, stored_seq: u64) -> Due {
        self.snapshots.retain(|r| !r.reply.is_canceled());
        self.gcs.retain(|gc| !gc.is_canceled());
        let (due, waiting): (VecDeque<_>, VecDeque<_>) = self
            .snapshots
            .drain(..)
            .partition(|r| r.target <= stored_seq);
        self.snapshots = waiting;
        Due {
            gcs: std::mem::take(&mut self.gcs),
            snapshots: due.into(),
        }
    }

    /// A failure of the destage task or the meta task: every request held
    /// fails with `e` (invariant 2).
    pub fn refuse(&mut self, e: &EngineError) {
        let volume = self.volume;
        self.refuse_with(|| failure(volume, e), &e.to_string());
    }

    fn refuse_with(&mut self, snapshot_error: impl Fn() -> SnapshotError, why: &str) {
        for req in self.snapshots.drain(..) {
            let _ = req.reply.send(Err(snapshot_error()));
        }
        for gc in self.gcs.drain(..) {
            let _ = gc.send(Err(why.to_string()));
        }
    }
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
                let _ = req.reply.send(Err(failure(inner.id, &e)));
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
            let _ = req.reply.send(Err(failure(inner.id, &e)));
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
    let _ = req.reply.send(Err(failure(inner.id, e)));
}

/// How a failure `e` of the destage or meta task fails a snapshot of
/// volume `volume`.
fn failure(volume: u64, e: &EngineError) -> SnapshotError {
    match e {
        EngineError::Fenced(why) => EngineError::Fenced(why.clone()).into(),
        other => failed(volume, &other.to_string()),
    }
}

/// How a failure other than fencing, for reason `why`, fails a snapshot
/// of volume `volume`.
fn failed(volume: u64, why: &str) -> SnapshotError {
    SnapshotError::State {
        volume,
        reason: format!("no snapshot was taken: storing the volume's data failed: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use futures::channel::oneshot;

    use super::*;
    use crate::engine::task_request::{destage_channel, DestageSender};

    /// A snapshot request for every op up to `target`, and its caller's end.
    fn snapshot(target: u64) -> (SnapshotRequest, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        let req = SnapshotRequest {
            target,
            name: format!("s{target}"),
            created_ms: 1,
            reply,
        };
        (req, rx)
    }

    fn requests() -> (DestageSender, Requests) {
        let (tx, rx) = destage_channel();
        (tx, Requests::new(7, rx))
    }

    #[test]
    fn a_snapshot_is_held_until_its_ops_are_stored() {
        let (tx, mut reqs) = requests();
        let (req, _caller) = snapshot(10);
        assert!(tx.send(DestageCommand::Snapshot(req)));
        reqs.take_queued();
        assert!(reqs.wants_more(9), "its ops are not all in chunks yet");
        assert!(!reqs.wants_more(10));
        assert!(reqs.take_due(9).snapshots.is_empty(), "op 10 is not stored");
        let due = reqs.take_due(10);
        assert_eq!(
            due.snapshots.iter().map(|r| r.target).collect::<Vec<_>>(),
            [10]
        );
        assert!(
            reqs.take_due(u64::MAX).snapshots.is_empty(),
            "handed on once"
        );
    }

    #[test]
    fn a_request_whose_caller_went_away_is_dropped_and_cuts_no_chunk() {
        let (tx, mut reqs) = requests();
        let (gone, caller) = snapshot(10);
        drop(caller);
        let (gc, gc_caller) = oneshot::channel();
        drop(gc_caller);
        let (live, _live_caller) = snapshot(5);
        assert!(tx.send(DestageCommand::Snapshot(gone)));
        assert!(tx.send(DestageCommand::CollectGarbage(gc)));
        assert!(tx.send(DestageCommand::Snapshot(live)));
        reqs.take_queued();
        assert!(
            !reqs.wants_more(9),
            "only the withdrawn request wants op 10"
        );
        let due = reqs.take_due(u64::MAX);
        assert!(due.gcs.is_empty());
        assert_eq!(
            due.snapshots.iter().map(|r| r.target).collect::<Vec<_>>(),
            [5]
        );
    }

    #[test]
    fn a_meta_task_failure_fails_every_request_held() {
        let (tx, mut reqs) = requests();
        let (req, mut caller) = snapshot(10);
        let (gc, mut gc_caller) = oneshot::channel();
        assert!(tx.send(DestageCommand::Snapshot(req)));
        assert!(tx.send(DestageCommand::CollectGarbage(gc)));
        assert!(tx.send(DestageCommand::Refuse {
            why: "checkpoint put failed".into()
        }));
        reqs.take_queued();
        match caller.try_recv() {
            Ok(Some(Err(SnapshotError::State { volume: 7, reason }))) => {
                assert!(reason.contains("checkpoint put failed"), "{reason}");
            }
            other => panic!("snapshot not failed: {other:?}"),
        }
        assert_eq!(
            gc_caller.try_recv(),
            Ok(Some(Err("checkpoint put failed".to_string())))
        );
        let due = reqs.take_due(u64::MAX);
        assert!(due.snapshots.is_empty() && due.gcs.is_empty());
    }

    #[test]
    fn a_destage_failure_fails_a_snapshot_with_its_error() {
        let (tx, mut reqs) = requests();
        let (req, mut caller) = snapshot(10);
        assert!(tx.send(DestageCommand::Snapshot(req)));
        reqs.take_queued();
        reqs.refuse(&EngineError::Fenced("lease lost".into()));
        match caller.try_recv() {
            Ok(Some(Err(SnapshotError::Engine(EngineError::Fenced(why))))) => {
                assert_eq!(why, "lease lost");
            }
            other => panic!("snapshot not failed as fenced: {other:?}"),
        }
    }

    #[test]
    fn requests_left_when_the_destage_task_ends_are_answered_with_an_error() {
        let (tx, mut reqs) = requests();
        let (held, mut held_caller) = snapshot(10);
        assert!(tx.send(DestageCommand::Snapshot(held)));
        reqs.take_queued();
        let (queued, mut queued_caller) = snapshot(11);
        assert!(tx.send(DestageCommand::Snapshot(queued)));
        drop(reqs);
        assert!(held_caller.try_recv().is_err(), "held request dropped");
        assert!(queued_caller.try_recv().is_err(), "queued request dropped");
        let (late, mut late_caller) = snapshot(12);
        assert!(!tx.send(DestageCommand::Snapshot(late)), "nobody receives");
        assert!(late_caller.try_recv().is_err(), "late request dropped");
    }
}
