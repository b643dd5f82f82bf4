//! What an open volume's request paths ask of its background tasks and
//! leave in [`super::state::State`] until the destage task hands it to the
//! meta task: take a snapshot, delete unreferenced chunks (served in
//! `live_snapshot.rs`). Only the requests live here, below the state.

use futures::channel::oneshot;

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
