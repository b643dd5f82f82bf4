//! What an open volume's parts ask of its background tasks, as typed
//! commands on two channels: the façade's snapshot API asks the destage
//! task ([`DestageCommand`]: take a snapshot, delete unreferenced chunks;
//! served in `live_snapshot.rs`), and the destage task hands those
//! requests, and its progress, to the meta task ([`Command`],
//! [`super::meta::task`]). Only the messages and channels live here, below
//! the state and the tasks.

use futures::channel::oneshot;
use tokio::sync::mpsc;

use super::format::snapshot::SnapshotObject;
use super::snapshot::store::SnapshotError;

/// The answer to a [`SnapshotRequest`].
pub(crate) type Reply = Result<SnapshotObject, SnapshotError>;

/// A request to delete unreferenced chunks (destage hands it to the meta
/// task); the answer
/// is how many it deleted, or why it stopped.
pub(crate) type GcRequest = oneshot::Sender<Result<u64, String>>;

/// A snapshot asked of the destage task (which hands it to the meta task
/// once its ops are stored).
#[derive(Debug)]
pub(crate) struct SnapshotRequest {
    /// Every op up to this sequence number must be in the snapshot.
    pub(super) target: u64,
    pub(super) name: String,
    pub(super) created_ms: u64,
    pub(super) reply: oneshot::Sender<Reply>,
}

/// What the destage task tells the meta task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Chunk `chunk` is stored and applied to the maps.
    ChunkApplied { chunk: u64 },
    /// A `durability: store` flush waits: commit the store position, which
    /// holds every op up to `upto`.
    CommitWanted { upto: u64 },
    /// Take this snapshot: every op it must hold is stored.
    Snapshot(SnapshotRequest),
    /// Delete the chunks nothing names any more.
    CollectGarbage(GcRequest),
    /// Every write is stored and applied, and none can come: write the
    /// final checkpoint, answer the close, end.
    Close,
}

/// The destage task's end of the channel.
pub(crate) struct MetaSender(mpsc::UnboundedSender<Command>);

/// The meta task's end of the channel.
pub(crate) struct MetaReceiver(pub(super) mpsc::UnboundedReceiver<Command>);

/// A new destage → meta channel. Unbounded: the destage task sends at most one
/// [`Command::ChunkApplied`] per chunk and each other command once per
/// event (it never repeats a [`Command::CommitWanted`] for the same
/// position), and the meta task takes every queued command at once.
pub(crate) fn meta_channel() -> (MetaSender, MetaReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (MetaSender(tx), MetaReceiver(rx))
}

impl MetaSender {
    /// Send `cmd`; false if the meta task has ended.
    #[must_use]
    pub fn send(&self, cmd: Command) -> bool {
        self.0.send(cmd).is_ok()
    }
}

/// What the destage task is asked: by the façade's snapshot API
/// (`volume/snapshot.rs`), and by the meta task when it fails.
#[derive(Debug)]
pub(crate) enum DestageCommand {
    /// Take this snapshot: the destage task holds it until every op up
    /// to its target is stored, then hands it to the meta task.
    Snapshot(SnapshotRequest),
    /// Delete the chunks nothing names any more: handed on to the meta
    /// task at once.
    CollectGarbage(GcRequest),
    /// The meta task failed (not fenced: the destage task sees fencing
    /// itself), with this error: fail every request the destage task
    /// holds, as a failure of its own would.
    Refuse { why: String },
}

/// The façade's and the meta task's end of the destage channel.
#[derive(Clone)]
pub(crate) struct DestageSender(mpsc::UnboundedSender<DestageCommand>);

/// The destage task's end of the channel. Dropped with the task, and with
/// it every command still queued: each request's reply sender goes away,
/// so its caller gets an error rather than waiting.
pub(crate) struct DestageReceiver(pub(super) mpsc::UnboundedReceiver<DestageCommand>);

/// A new façade → destage channel. Unbounded: the façade sends one request
/// per snapshot operation, which holds the volume's one slot for them
/// (`State::snapshot_busy`) until it is answered or its caller went away;
/// the meta task sends one [`DestageCommand::Refuse`] per failure, paced by
/// its backoff; and the destage task takes every queued command at each
/// turn of its loop.
pub(crate) fn destage_channel() -> (DestageSender, DestageReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (DestageSender(tx), DestageReceiver(rx))
}

impl DestageSender {
    /// Send `cmd`; false if the destage task has ended (`cmd` is then
    /// dropped, and with it any reply sender it holds).
    #[must_use]
    pub fn send(&self, cmd: DestageCommand) -> bool {
        self.0.send(cmd).is_ok()
    }
}
