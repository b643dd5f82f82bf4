//! The meta task: owns the volume's root ([`Root`]: the committed manifest
//! and its version) and does every manifest write of an open volume off
//! the destage loop: progress commits, checkpoints (with the compaction
//! that precedes them), snapshot and garbage-collection requests, and the
//! final checkpoint at close. The destage task tells it what happened
//! through a typed channel ([`Command`],
//! [`MetaSender`](crate::engine::task_request::MetaSender)) and never waits
//! for it, so chunk puts start and chunks are applied while a checkpoint
//! uploads.
//!
//! Invariants:
//! 1. Only this task writes the manifest of the open volume, one write at
//!    a time (each commit is awaited before the next starts), always by
//!    compare-and-swap ([`super::manifest::commit`]).
//! 2. It names only stored chunks: a checkpoint captures the store-side
//!    map, to which destage applies a chunk only after its put succeeded,
//!    and a progress commit names `last_chunk` and `stored_seq`, which only
//!    that apply advances. Commands report what already happened; the task
//!    reads the positions it commits from the state itself.
//! 3. [`Command::Close`] comes only once every write is stored and applied
//!    and none can come (the volume is closing and nothing is pending), and
//!    after every command sent before it; the final checkpoint thus covers
//!    every write, and the close is answered only after it.
//! 4. Failures are handled as in the destage task ([`fail`]): fencing ends
//!    the task (the destage task sees it and ends too); any other failure
//!    fails the waiting snapshot and GC requests, those handed to this
//!    task and, through a [`DestageCommand::Refuse`], those the destage
//!    task still holds; it backs off, and the work still owed is retried; while closing, repeated failures give up. A
//!    failed final checkpoint ends the close with its error, as before.
//! 5. The task ends with the destage task (its sender dropped) unless a
//!    close is owed, on fencing, on giving up, and after the close.
//! 6. A snapshot or GC request whose caller went away (its reply channel
//!    closed) is dropped unserved, as the destage task drops it while it
//!    holds it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::manifest::Root;
use crate::engine::commit::{checkpoint, commit_progress, final_checkpoint};
use crate::engine::destage::fail;
use crate::engine::error::EngineError;
use crate::engine::live_snapshot;
use crate::engine::task_request::{
    Command, DestageCommand, DestageSender, GcRequest, MetaReceiver, SnapshotRequest,
};
use crate::engine::volume_core::Inner;

/// The work the commands received so far ask for.
#[derive(Default)]
struct Owed {
    /// The newest chunk applied (a checkpoint is due once it is
    /// `checkpoint_every_chunks` past the committed checkpoint).
    applied: u64,
    /// Commit the store position once it passes this op.
    commit_upto: u64,
    snapshots: VecDeque<SnapshotRequest>,
    gcs: Vec<GcRequest>,
    close: bool,
}

impl Owed {
    fn add(&mut self, cmd: Command) {
        match cmd {
            Command::ChunkApplied { chunk } => self.applied = self.applied.max(chunk),
            Command::CommitWanted { upto } => self.commit_upto = self.commit_upto.max(upto),
            Command::Snapshot(req) => self.snapshots.push_back(req),
            Command::CollectGarbage(req) => self.gcs.push(req),
            Command::Close => self.close = true,
        }
    }

    fn checkpoint_due(&self, inner: &Inner, root: &Root) -> bool {
        self.applied.saturating_sub(root.manifest.checkpoint_chunk)
            >= inner.cfg.checkpoint_every_chunks
    }

    fn commit_due(&self, root: &Root) -> bool {
        self.commit_upto > root.manifest.last_seq
    }

    /// Nothing to do until the next command.
    fn idle(&self, inner: &Inner, root: &Root) -> bool {
        !self.close
            && !self.checkpoint_due(inner, root)
            && !self.commit_due(root)
            && self.snapshots.is_empty()
            && self.gcs.is_empty()
    }

    /// Fail every waiting request with `e` (invariant 4).
    fn refuse(&mut self, inner: &Inner, e: &EngineError) {
        for req in self.snapshots.drain(..) {
            live_snapshot::refuse_snapshot(inner, req, e);
        }
        for gc in self.gcs.drain(..) {
            let _ = gc.send(Err(e.to_string()));
        }
    }
}

/// How one round of work ended.
enum Round {
    /// Go on waiting for commands.
    Continue,
    /// The close was answered: end the task.
    Closed,
}

/// The task body: runs until the close is answered, fencing, giving up,
/// or the end of the destage task. `to_destage` carries its failures to
/// the requests the destage task holds (invariant 4).
pub(crate) async fn run(
    inner: Arc<Inner>,
    mut root: Root,
    rx: MetaReceiver,
    to_destage: DestageSender,
) {
    let mut rx = rx.0;
    // Recovery may hand over a chain of chunks already far past the
    // checkpoint: a checkpoint is then due before any new chunk is applied
    // (destage waits for it at the lag bound, `destage.rs` invariant 6).
    let mut owed = Owed {
        applied: inner.shared.lock().last_chunk,
        ..Owed::default()
    };
    let mut backoff = Duration::from_millis(10);
    loop {
        if owed.idle(&inner, &root) {
            match rx.recv().await {
                Some(cmd) => owed.add(cmd),
                None => return,
            }
        }
        // Every command already queued joins this round.
        let mut ended = false;
        loop {
            match rx.try_recv() {
                Ok(cmd) => owed.add(cmd),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    ended = true;
                    break;
                }
            }
        }
        if ended && !owed.close {
            // The destage task ended without a close to finish (fenced,
            // or it gave up and answered the close itself).
            return;
        }
        if let Err(e) = inner.check_not_fenced() {
            owed.refuse(&inner, &e);
            fail(&inner, e, &mut backoff, false).await;
            return;
        }
        match round(&inner, &mut root, &mut owed).await {
            Ok(Round::Continue) => backoff = Duration::from_millis(10),
            Ok(Round::Closed) => return,
            Err(e) => {
                owed.refuse(&inner, &e);
                refuse_held_by_destage(&to_destage, &e);
                if fail(&inner, e, &mut backoff, true).await {
                    return;
                }
            }
        }
    }
}

/// Do what `owed` asks, in the order the destage loop used to: a due
/// checkpoint (which also commits) or else a progress commit, then the
/// requests, then the close.
async fn round(inner: &Inner, root: &mut Root, owed: &mut Owed) -> Result<Round, EngineError> {
    // While closing, the final checkpoint stands for a periodic one.
    if owed.checkpoint_due(inner, root) && !owed.close {
        checkpoint(inner, root, false).await?;
    } else if owed.commit_due(root) {
        commit_progress(inner, root).await?;
    }
    for gc in owed.gcs.drain(..) {
        live_snapshot::serve_gc(inner, gc).await;
    }
    while let Some(req) = owed.snapshots.pop_front() {
        live_snapshot::serve_snapshot(inner, root, req).await?;
    }
    if owed.close {
        let res = final_checkpoint(inner, root).await;
        inner.finish_close(res);
        return Ok(Round::Closed);
    }
    Ok(Round::Continue)
}

/// Have the destage task fail the requests it holds with `e` (invariant
/// 4). Not for fencing, which the destage task sees itself and answers
/// with the fencing error.
fn refuse_held_by_destage(to_destage: &DestageSender, e: &EngineError) {
    if matches!(e, EngineError::Fenced(_)) {
        return;
    }
    // The destage task may have ended: it then holds nothing.
    let _ = to_destage.send(DestageCommand::Refuse { why: e.to_string() });
}
