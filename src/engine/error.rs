//! The engine's precise error type; converts into the edge [`BlockError`].

use super::cache::OpenError as CacheOpenError;
use super::checkpoint::CheckpointError;
use super::config::ConfigError;
use super::format::chunk::ChunkError;
use super::format::manifest::ManifestError;
use super::wal::WalError;
use crate::error::BlockError;
use crate::store::StoreError;

/// Everything that can go wrong inside a volume.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid volume parameters: {0}")]
    InvalidParams(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("chunk {key}: {source}")]
    Chunk { key: String, source: ChunkError },
    /// A chunk's block-CRC table could not be read, or its header is
    /// corrupt (the error names the key).
    #[error(transparent)]
    CrcTable(#[from] super::crc_table::TableError),
    #[error("checkpoint {key}: {source}")]
    Checkpoint {
        key: String,
        source: CheckpointError,
    },
    #[error(
        "{what} {key} is {size} bytes, larger than any real one can be ({cap} bytes); \
         refusing to read it (corrupt or not written by shale)"
    )]
    Oversized {
        what: &'static str,
        key: String,
        size: u64,
        cap: u64,
    },
    #[error("manifest {key}: {reason}")]
    Manifest { key: String, reason: String },
    /// A checkpoint's encoding task did not finish (it panicked, or the
    /// runtime is shutting down).
    #[error("checkpoint encoding failed: {0}")]
    Encode(String),
    #[error("volume is fenced: {0}")]
    Fenced(String),
    #[error("volume is closed")]
    Closed,
    #[error("local I/O: {0}")]
    LocalIo(String),
    /// A clone's parent chain cannot be followed (missing, corrupt, loop).
    #[error("parent of volume {volume:016x}: {reason}")]
    Parent { volume: u64, reason: String },
}

impl From<EngineError> for BlockError {
    fn from(e: EngineError) -> BlockError {
        match e {
            EngineError::InvalidParams(m) => BlockError::InvalidArgument(m),
            EngineError::Fenced(m) => BlockError::Fenced(m),
            EngineError::Closed | EngineError::Wal(WalError::Stopped) => BlockError::Closed,
            EngineError::Wal(WalError::NoSpace(m)) => BlockError::LocalNoSpace(m),
            other => BlockError::Io(other.to_string()),
        }
    }
}

impl From<WalError> for BlockError {
    fn from(e: WalError) -> BlockError {
        EngineError::Wal(e).into()
    }
}

impl From<CacheOpenError> for EngineError {
    fn from(e: CacheOpenError) -> EngineError {
        EngineError::LocalIo(e.to_string())
    }
}

impl From<ManifestError> for EngineError {
    fn from(e: ManifestError) -> EngineError {
        EngineError::Manifest {
            key: e.key,
            reason: e.reason,
        }
    }
}
