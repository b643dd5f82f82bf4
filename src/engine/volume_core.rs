//! The core of an open volume: what its background tasks (destage, the
//! meta task, warm start) and its request paths (write admission, the read
//! path) share. The façade [`super::volume::Volume`] owns it and sits on top;
//! every module that works for an open volume takes an [`Inner`] from
//! here, below them all.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::channel::oneshot;

use super::cache::Cache;
use super::config::EngineConfig;
use super::crc_table::CrcTables;
use super::error::EngineError;
use super::format::manifest::ParentRef;
use super::read_state::{Inflight, Prefetch};
use super::state::State;
use super::view::SnapshotView;
use super::wal::Wal;
use crate::clock::DynClock;
use crate::store::{Body, DynStore, PutMode, StoreError};

/// Identity and placement of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub id: u64,
    /// Size in bytes; a non-zero multiple of 512.
    pub size: u64,
    /// Writer epoch from the lease; every open must use a new, higher one.
    pub epoch: u64,
    /// Local directory for the WAL and read cache of this volume.
    pub local_dir: PathBuf,
}

/// Counters of an open volume's work ([`super::volume::Volume::stats`]
/// reports them).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub chunks_written: AtomicU64,
    pub chunk_bytes_written: AtomicU64,
    pub checkpoints_written: AtomicU64,
    pub chunks_deleted: AtomicU64,
    pub chunks_compacted: AtomicU64,
    pub compacted_bytes_written: AtomicU64,
    pub destage_errors: AtomicU64,
    pub store_reads: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub snapshots_taken: AtomicU64,
    pub last_snapshot_pause_us: AtomicU64,
    pub backpressure_us: AtomicU64,
    pub destage_us: AtomicU64,
    pub checkpoint_us: AtomicU64,
    pub cache_hit_bytes: AtomicU64,
    pub prefetch_hit_bytes: AtomicU64,
    pub cache_corrupt: AtomicU64,
}

/// State shared with the WAL writer thread.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub notify: tokio::sync::Notify,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything the background tasks and the request paths share.
pub(crate) struct Inner {
    pub id: u64,
    pub size: u64,
    pub epoch: u64,
    pub cfg: EngineConfig,
    /// Unstored bytes at which writes wait: `cfg.max_unstored_bytes` or
    /// less ([`super::destage::window::backlog_bound`]).
    pub unstored_bound: u64,
    pub clock: DynClock,
    pub store: DynStore,
    pub rt: tokio::runtime::Handle,
    pub wal: Wal,
    pub shared: Arc<Shared>,
    pub counters: Counters,
    pub cache: Option<Arc<Cache>>,
    /// Chunk window GETs in flight, shared by concurrent readers.
    pub fetches: Arc<Inflight>,
    /// Chunk block-CRC tables, read from chunk headers on first use.
    pub tables: Arc<CrcTables>,
    /// Readahead of sequential reads into the cache.
    pub prefetch: Prefetch,
    /// A clone's parent: unmapped ranges of `live` read from it.
    pub parent: Option<Arc<SnapshotView>>,
    /// The snapshot `parent` shows (as the manifest names it).
    pub parent_ref: Option<ParentRef>,
    /// Where the destage or meta task reports the end of a `close`.
    pub close_tx: Mutex<Option<oneshot::Sender<Result<(), EngineError>>>>,
}

impl Inner {
    /// Err once the volume was fenced ([`super::Volume::fence`]): a fenced
    /// volume stores nothing more.
    pub fn check_not_fenced(&self) -> Result<(), EngineError> {
        match &self.shared.lock().fenced {
            Some(why) => Err(EngineError::Fenced(why.clone())),
            None => Ok(()),
        }
    }

    /// Report the end of a close, if one is waiting.
    pub fn finish_close(&self, res: Result<(), EngineError>) {
        let tx = self
            .close_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(res);
        }
        self.shared.lock().wake_all();
    }

    /// Create `key`; an existing object with identical bytes (our own
    /// earlier attempt) counts as success, any other content means another
    /// writer.
    pub async fn put_create(&self, key: &str, obj: Body) -> Result<(), EngineError> {
        self.check_not_fenced()?;
        match self.store.put_body(key, obj.clone(), PutMode::Create).await {
            Ok(_) => Ok(()),
            Err(StoreError::AlreadyExists { .. }) => {
                let cur = self.store.get(key).await?;
                if obj.eq_bytes(&cur.data) {
                    Ok(())
                } else {
                    Err(EngineError::Fenced(format!(
                        "{key} was written by another writer"
                    )))
                }
            }
            Err(e) => Err(e.into()),
        }
    }
}
