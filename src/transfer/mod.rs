//! Moving volume content in and out of shale as files: full exports of a
//! snapshot as a sparse raw image, incremental exports as delta files
//! ([`delta`]), and imports of either.
//!
//! The functions here work on [`SnapshotView`](crate::engine::view::SnapshotView)s
//! and [`BlockDevice`](crate::engine::BlockDevice)s; [`volumes`] adds the
//! catalog side (creating the volume of a raw import, attaching the volume
//! a delta applies to). Progress is reported through [`Progress`]; the CLI
//! draws it on a terminal.

pub mod delta;
pub mod export;
pub mod import;
pub mod sparse;
pub mod volumes;

use std::path::PathBuf;

use crate::catalog::snapshot::SnapError;
use crate::catalog::CatalogError;
use crate::daemon::DaemonError;
use crate::error::BlockError;

pub use delta::DeltaError;

/// Unit of reads and writes while copying data.
pub const COPY_BLOCK: u64 = 1 << 20;

/// Receives the progress of a long copy. Calls come from one task, in order:
/// `start`, any number of `advance`, `finish`.
pub trait Progress: Send + Sync {
    /// A copy of `total` bytes named `what` begins.
    fn start(&self, what: &str, total: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The copy ended (successfully or not).
    fn finish(&self);
    /// True once the user asked to stop: the copy then ends with
    /// [`TransferError::Interrupted`] at the next block, cleaning up as
    /// after any other error.
    fn cancelled(&self) -> bool {
        false
    }
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// Failures of exports and imports.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{}", .path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; pass --force to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("{}", .path.display())]
    Delta { path: PathBuf, source: DeltaError },
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Snapshot(#[from] SnapError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(
        "the volume holds neither {base} nor {target} at bytes {offset}+{len}: this delta \
         does not apply to it; nothing was written"
    )]
    NotBase {
        base: String,
        target: String,
        offset: u64,
        len: u64,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Invalid(String),
}
