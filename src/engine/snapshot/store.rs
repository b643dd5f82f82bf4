//! Reading snapshot objects from the store: one snapshot by id or name,
//! every snapshot of a volume, a clone's parent chain, and the committed
//! checkpoint a snapshot is taken from. Nothing here writes, and nothing
//! here knows an open volume: the layer `clone`, `view`, `retain_index`,
//! `usage` and the rest build on (see `tests/engine_layers.rs`); writing
//! snapshots is [`super`]'s.

use std::collections::HashSet;

use crate::engine::capped::get_capped;
use crate::engine::checkpoint::Checkpoint;
use crate::engine::error::EngineError;
use crate::engine::format::layout::{parse_snapshot_key, snapshot_key, snapshot_prefix};
use crate::engine::format::limits::MAX_METADATA_BYTES;
use crate::engine::format::manifest::{Manifest, ParentRef};
use crate::engine::format::snapshot::{SnapshotDecodeError, SnapshotObject};
use crate::engine::meta::manifest::{read_manifest, WriteError};
use crate::store::{DynStore, StoreError};

/// Read snapshot `id` of `volume` (at most [`MAX_METADATA_BYTES`]), decode
/// and [validate](SnapshotObject::validate) it.
pub async fn read_snapshot(
    store: &DynStore,
    volume: u64,
    id: u64,
) -> Result<SnapshotObject, SnapshotError> {
    Ok(read_snapshot_versioned(store, volume, id).await?.0)
}

/// [`read_snapshot`], with the version of the object as read (for a
/// compare-and-swap of it, or to key what is derived from it).
pub(crate) async fn read_snapshot_versioned(
    store: &DynStore,
    volume: u64,
    id: u64,
) -> Result<(SnapshotObject, crate::store::Version), SnapshotError> {
    let key = snapshot_key(volume, id);
    let obj = get_capped(store, &key, MAX_METADATA_BYTES, "snapshot object").await?;
    let corrupt = |source| SnapshotError::Corrupt {
        key: key.clone(),
        source,
    };
    let snap = SnapshotObject::decode(&obj.data).map_err(corrupt)?;
    snap.validate(volume, id).map_err(corrupt)?;
    Ok((snap, obj.version))
}

/// Failures of snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error("snapshot object {key}: {source}")]
    Corrupt {
        key: String,
        source: SnapshotDecodeError,
    },
    #[error("volume {volume:016x} has no snapshot named {name:?}")]
    NotFound { volume: u64, name: String },
    #[error("volume {volume:016x} already has a snapshot named {name:?}")]
    AlreadyExists { volume: u64, name: String },
    #[error("volume {volume:016x}: {reason}")]
    State { volume: u64, reason: String },
}

impl From<WriteError> for SnapshotError {
    /// A store failure stays [`SnapshotError::Store`]; a refused write is
    /// the engine's [`EngineError::Manifest`].
    fn from(e: WriteError) -> SnapshotError {
        match e {
            WriteError::Store(e) => SnapshotError::Store(e),
            refused => SnapshotError::Engine(refused.into()),
        }
    }
}

/// The snapshot id of `key`, listed under [`snapshot_prefix`]`(volume)`;
/// anything but a snapshot key there is an error (never skipped: it may be
/// a snapshot holding chunks).
pub(crate) fn snapshot_id_of(volume: u64, key: &str) -> Result<u64, SnapshotError> {
    parse_snapshot_key(volume, key).ok_or_else(|| SnapshotError::Corrupt {
        key: key.to_string(),
        source: SnapshotDecodeError::Invalid("not a snapshot key".into()),
    })
}

/// Every snapshot of `volume`, sorted by id. A snapshot that fails to
/// decode is an error (it may hold chunks; never guess).
pub async fn list_snapshots(
    store: &DynStore,
    volume: u64,
) -> Result<Vec<SnapshotObject>, SnapshotError> {
    let prefix = snapshot_prefix(volume);
    let mut out = Vec::new();
    for meta in store.list(&prefix).await? {
        let id = snapshot_id_of(volume, &meta.key)?;
        match read_snapshot(store, volume, id).await {
            Ok(snap) => out.push(snap),
            Err(SnapshotError::Engine(EngineError::Store(StoreError::NotFound { .. })))
            | Err(SnapshotError::Store(StoreError::NotFound { .. })) => continue,
            Err(e) => return Err(e),
        }
    }
    out.sort_by_key(|s| s.id);
    Ok(out)
}

/// The snapshot of `volume` named `name`.
pub async fn find_snapshot(
    store: &DynStore,
    volume: u64,
    name: &str,
) -> Result<SnapshotObject, SnapshotError> {
    list_snapshots(store, volume)
        .await?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| SnapshotError::NotFound {
            volume,
            name: name.to_string(),
        })
}

/// The volume's committed manifest and checkpoint (an empty checkpoint if
/// it has none). Fails unless the checkpoint covers every stored chunk,
/// which holds right after a clean `close`.
pub async fn committed_checkpoint(
    store: &DynStore,
    volume: u64,
) -> Result<(Manifest, crate::store::Version, Checkpoint), SnapshotError> {
    let (m, o) = read_manifest(store, volume).await?;
    if m.volume != volume || m.checkpoint_chunk != m.last_chunk {
        return Err(SnapshotError::State {
            volume,
            reason: format!(
                "manifest is not fully checkpointed (checkpoint chunk {}, last chunk {})",
                m.checkpoint_chunk, m.last_chunk
            ),
        });
    }
    let cp = load_checkpoint(store, &m).await?;
    Ok((m, o.version, cp))
}

/// The checkpoint manifest `m` names (an empty one if it names none),
/// validated and checked to belong to it. It covers the chunks up to
/// `m.checkpoint_chunk`, which may lag `m.last_chunk`.
pub async fn load_checkpoint(store: &DynStore, m: &Manifest) -> Result<Checkpoint, SnapshotError> {
    let volume = m.volume;
    let cp = match &m.checkpoint {
        None => Checkpoint::empty(volume, m.epoch, m.last_seq),
        Some(_) if m.checkpoint_base.is_some() => {
            // A chain: rebuilt from its base and deltas (no volume size is
            // known here; ranges are still checked against overflow).
            crate::engine::meta::chain::load(store, m, u64::MAX, MAX_METADATA_BYTES)
                .await?
                .chain
                .into_checkpoint()
        }
        Some(k) => {
            let d = get_capped(store, k, MAX_METADATA_BYTES, "checkpoint").await?;
            let cp_err = |source| EngineError::Checkpoint {
                key: k.clone(),
                source,
            };
            let cp = Checkpoint::decode(&d.data).map_err(cp_err)?;
            cp.validate().map_err(cp_err)?;
            if cp.volume != volume || cp.chunk_seq != m.checkpoint_chunk {
                return Err(SnapshotError::State {
                    volume,
                    reason: format!("checkpoint {k} does not match the manifest"),
                });
            }
            cp
        }
    };
    Ok(cp)
}

/// The snapshots from `first` down to the root of its chain (`first` at
/// index 0, each next one the previous one's parent). Fails with
/// [`EngineError::Parent`] if one is missing or corrupt, or the chain
/// loops.
pub(crate) async fn load_chain(
    store: &DynStore,
    first: ParentRef,
) -> Result<Vec<SnapshotObject>, EngineError> {
    let mut chain = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some(first);
    while let Some(p) = next {
        let err = |reason: String| EngineError::Parent {
            volume: p.volume,
            reason,
        };
        if !seen.insert(p) {
            return Err(err(format!("the parent chain loops back to {p}")));
        }
        let key = snapshot_key(p.volume, p.snapshot);
        let snap = match read_snapshot(store, p.volume, p.snapshot).await {
            Ok(s) => s,
            Err(SnapshotError::Engine(EngineError::Store(StoreError::NotFound { .. }))) => {
                return Err(err(format!("{p} is missing ({key} not found)")))
            }
            Err(SnapshotError::Engine(e)) => return Err(e),
            Err(SnapshotError::Store(e)) => return Err(e.into()),
            Err(e) => return Err(err(e.to_string())),
        };
        next = snap.parent;
        chain.push(snap);
    }
    Ok(chain)
}
