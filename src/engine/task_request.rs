//! What an open volume's parts ask of its background tasks: the requests
//! its snapshot API leaves in [`super::state::State`] (take a snapshot,
//! delete unreferenced chunks; served in `live_snapshot.rs`), and the
//! channel on which the destage task hands them, and its progress, to the
//! meta task ([`super::meta::task`]). Only the messages live here, below
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

/// A new channel. Unbounded: the destage task sends at most one
/// [`Command::ChunkApplied`] per chunk and each other command once per
/// event (it never repeats a [`Command::CommitWanted`] for the same
/// position), and the meta task takes every queued command at once.
pub(crate) fn channel() -> (MetaSender, MetaReceiver) {
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
