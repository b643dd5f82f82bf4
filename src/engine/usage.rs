//! A volume's published space: the object `volumes/<id:016x>/usage`, so
//! that the pool can add up every volume's `used` without opening them.
//!
//! Writers: the process holding the volume's lease (the attached daemon,
//! periodically and at close; detached snapshot operations, right after
//! they change the maps). Encoding: JSON [`VolumeUsage`].
//!
//! Invariants:
//! 1. The object is written only by the lease holder, with the exact
//!    `used` of [`super::space`] at `updated_ms`; it may lag the running
//!    volume by the publishing period, never by more than one lease.
//! 2. A missing object means "not published yet": readers compute the
//!    space from the volume's committed checkpoint and snapshots
//!    ([`compute_detached`]), which is exact for a cleanly closed volume.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::checkpoint::Checkpoint;
use super::error::EngineError;
use super::format::layout::usage_key;
use super::format::snapshot::SnapshotObject;
use super::map::ExtentMap;
use super::meta::manifest::read_manifest_if_any;
use super::snapshot::store::{list_snapshots, SnapshotError};
use super::space::{usage_of, MapUsage, SpaceUsage};
use super::SECTOR;
use crate::store::{DynStore, PutMode, StoreError};

/// A volume's space as last published (bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeUsage {
    pub volume: u64,
    /// Live data + data held only by snapshots.
    pub used: u64,
    /// Data the live map references.
    pub live: u64,
    /// Data only snapshots reference.
    pub snapshot_only: u64,
    /// When it was computed, milliseconds since the Unix epoch.
    pub updated_ms: u64,
}

impl VolumeUsage {
    pub fn from_space(volume: u64, s: &SpaceUsage, updated_ms: u64) -> Self {
        VolumeUsage {
            volume,
            used: s.used,
            live: s.live,
            snapshot_only: s.snapshot_only,
            updated_ms,
        }
    }

    fn from_maps(volume: u64, u: &MapUsage, updated_ms: u64) -> Self {
        VolumeUsage {
            volume,
            used: u.used,
            live: u.live,
            snapshot_only: u.snapshot_only,
            updated_ms,
        }
    }
}

/// Failures reading or computing a volume's space.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error("{key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The manifest could not be read (for example: larger than any real
    /// one can be).
    #[error(transparent)]
    Manifest(EngineError),
}

/// Write `u` as volume `u.volume`'s usage object.
pub async fn publish(store: &DynStore, u: &VolumeUsage) -> Result<(), UsageError> {
    let data = serde_json::to_vec(u).map_err(|e| UsageError::Corrupt {
        key: usage_key(u.volume),
        reason: e.to_string(),
    })?;
    store
        .put(&usage_key(u.volume), Bytes::from(data), PutMode::Overwrite)
        .await?;
    Ok(())
}

/// Volume `id`'s published usage, if any.
pub async fn read(store: &DynStore, id: u64) -> Result<Option<VolumeUsage>, UsageError> {
    let key = usage_key(id);
    let obj = match store.get(&key).await {
        Ok(o) => o,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let u: VolumeUsage = serde_json::from_slice(&obj.data).map_err(|e| UsageError::Corrupt {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    if u.volume != id {
        return Err(UsageError::Corrupt {
            key,
            reason: format!("names volume {:x}", u.volume),
        });
    }
    Ok(Some(u))
}

/// A volume's space computed from the store alone.
#[derive(Debug, Clone)]
pub struct DetachedSpace {
    pub usage: MapUsage,
    /// The snapshots, in the order of `usage.snapshot_unique`.
    pub snapshots: Vec<SnapshotObject>,
    /// False when chunks after the checkpoint exist (an attached or crashed
    /// volume): their data is not counted.
    pub complete: bool,
}

/// Space of volume `id` (of `size` bytes) from its committed checkpoint and
/// its snapshots. A volume never opened has no manifest and uses nothing.
pub async fn compute_detached(
    store: &DynStore,
    id: u64,
    size: u64,
) -> Result<DetachedSpace, UsageError> {
    let found = read_manifest_if_any(store, id)
        .await
        .map_err(manifest_error)?;
    let (map, complete) = match found {
        None => (ExtentMap::new(), true),
        Some((m, _)) => {
            let map = match &m.checkpoint {
                None => ExtentMap::new(),
                Some(k) if m.checkpoint_base.is_some() => {
                    let cap = crate::engine::format::limits::checkpoint_cap(size);
                    crate::engine::meta::chain::load(store, &m, size / SECTOR, cap)
                        .await
                        .map_err(|e| UsageError::Corrupt {
                            key: k.clone(),
                            reason: e.to_string(),
                        })?
                        .chain
                        .map
                }
                Some(k) => {
                    let d = store.get(k).await?;
                    let corrupt = |reason: String| UsageError::Corrupt {
                        key: k.clone(),
                        reason,
                    };
                    Checkpoint::decode(&d.data)
                        .map_err(|e| corrupt(e.to_string()))?
                        .to_map(size / SECTOR)
                        .map_err(|e| corrupt(e.to_string()))?
                }
            };
            (map, m.checkpoint_chunk == m.last_chunk)
        }
    };
    let snapshots = list_snapshots(store, id).await?;
    let cps: Vec<&Checkpoint> = snapshots.iter().map(|s| &s.checkpoint).collect();
    Ok(DetachedSpace {
        usage: usage_of(&map, &cps),
        snapshots,
        complete,
    })
}

/// A manifest read's error as a [`UsageError`]: the store's own errors
/// stay [`UsageError::Store`], a manifest that does not parse or whose
/// numbers disagree is [`UsageError::Corrupt`], one refused for its size
/// is [`UsageError::Manifest`].
fn manifest_error(e: EngineError) -> UsageError {
    match e {
        EngineError::Store(e) => UsageError::Store(e),
        EngineError::Manifest { key, reason } => UsageError::Corrupt { key, reason },
        other => UsageError::Manifest(other),
    }
}

/// Compute a detached volume's space from the store and publish it (after
/// a snapshot operation changed its maps). The caller holds the lease.
pub async fn refresh_detached(
    store: &DynStore,
    id: u64,
    size: u64,
    now_ms: u64,
) -> Result<VolumeUsage, UsageError> {
    let space = compute_detached(store, id, size).await?;
    let u = VolumeUsage::from_maps(id, &space.usage, now_ms);
    publish(store, &u).await?;
    Ok(u)
}
