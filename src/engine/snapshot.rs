//! Snapshots: immutable copies of a volume's checkpoint, and the data-level
//! operations on them (take, rollback, clone, garbage collection).
//!
//! A snapshot of volume `v` is the object `volumes/<v:016x>/snapshots/<id:016x>`
//! ([`SnapshotObject`], encoded and decoded in [`super::format::snapshot`]).
//! It holds the store-side map and the chunk table exactly as the
//! volume's checkpoint had them when the snapshot was taken (redirect on
//! write: no data is copied, later writes go to new chunks).
//!
//! Invariants:
//! 1. A snapshot object is written once ([`PutMode::Create`]); its map
//!    never changes. Its only change is the `deleting` mark
//!    ([`set_deleting`], by compare-and-swap): a delete that may still be
//!    undone (a clone appeared) marks the object instead of removing it, so
//!    the snapshot's chunks stay retained (invariant 2) until the delete is
//!    final and the object is removed ([`remove_snapshot`], or
//!    [`delete_snapshot`] on a detached volume, `Volume::delete_snapshot`
//!    on an open one). A marked snapshot gets no new clones.
//! 2. A chunk named by any snapshot of its volume is never deleted: the
//!    engine's destage and recovery consult [`RetainSet`] (listed after the
//!    checkpoint that dropped the chunk was committed) before deleting.
//!    If any snapshot object cannot be read, nothing is deleted.
//! 3. Operations here run on a *detached* volume: the caller holds its lease
//!    and passes the lease's epoch, and nothing else writes the volume.
//!    The exception is [`store_snapshot`], which an open volume also calls
//!    from its meta task (see `engine/live_snapshot.rs`).
//! 4. A snapshot of a clone records the clone's parent ([`ParentRef`]), so
//!    its view reads through to the same parent as the clone did.

use std::collections::HashSet;

use super::checkpoint::Checkpoint;
use super::fenced_delete::FencedDeleter;
use super::format::layout::{checkpoint_key, chunk_prefix, parse_chunk_name, snapshot_key};
use super::format::limits::MAX_METADATA_BYTES;
use super::format::manifest::{Manifest, ParentRef};
pub use super::format::snapshot::{SnapshotDecodeError, SnapshotObject};
use super::meta::manifest::{self, Put};
use super::meta::prepare;
pub use super::retain_index::RetainSet;
use crate::store::{DynStore, PutMode, StoreError};
use bytes::Bytes;
pub(crate) use store::read_snapshot_versioned;
pub use store::{
    committed_checkpoint, find_snapshot, list_snapshots, load_checkpoint, read_snapshot,
    SnapshotError,
};

pub mod store;

/// Store a snapshot named `name` of the volume's committed state. The
/// volume must have been closed cleanly just before (see
/// [`committed_checkpoint`]) and be detached. A clone's snapshot keeps the
/// clone's parent.
pub async fn take_snapshot(
    store: &DynStore,
    volume: u64,
    name: &str,
    created_ms: u64,
) -> Result<SnapshotObject, SnapshotError> {
    let (m, _, checkpoint) = committed_checkpoint(store, volume).await?;
    store_snapshot(store, volume, name, created_ms, checkpoint, m.parent).await
}

/// Write the snapshot object for `checkpoint` (a frozen map of `volume`
/// whose chunks the caller keeps until this returns) under the next free
/// id, once ([`PutMode::Create`]). `parent` must be the parent the volume
/// read through to for that map (its manifest's). The only place snapshot
/// objects are written.
pub async fn store_snapshot(
    store: &DynStore,
    volume: u64,
    name: &str,
    created_ms: u64,
    checkpoint: Checkpoint,
    parent: Option<ParentRef>,
) -> Result<SnapshotObject, SnapshotError> {
    let existing = list_snapshots(store, volume).await?;
    if existing.iter().any(|s| s.name == name) {
        return Err(SnapshotError::AlreadyExists {
            volume,
            name: name.to_string(),
        });
    }
    // Ids are validated below MAX_SEQ when read, so this never wraps.
    let snap = SnapshotObject {
        id: existing.iter().map(|s| s.id).max().unwrap_or(0) + 1,
        name: name.to_string(),
        volume,
        created_ms,
        checkpoint,
        parent,
        deleting: false,
    };
    let key = snapshot_key(volume, snap.id);
    match store
        .put(&key, Bytes::from(snap.encode()), PutMode::Create)
        .await
    {
        Ok(_) => Ok(snap),
        Err(StoreError::AlreadyExists { .. }) => Err(SnapshotError::State {
            volume,
            reason: format!("{key} appeared concurrently; is another snapshot command running?"),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Replace the volume's map by the snapshot's: a new checkpoint (at a key
/// no earlier checkpoint used, since `epoch` is this holder's fresh lease
/// epoch) committed by compare-and-swap on the manifest. The volume must
/// have been closed cleanly just before, so its local WAL holds no record
/// newer than the manifest's `last_seq`; the new checkpoint keeps that
/// `last_seq`, so recovery replays none of those records over the rolled
/// back map. A crash before the swap changes nothing; after it, the
/// rollback is complete (the old checkpoint is only garbage).
pub async fn rollback(
    store: &DynStore,
    volume: u64,
    epoch: u64,
    snap: &SnapshotObject,
) -> Result<(), SnapshotError> {
    let (m, version, _) = committed_checkpoint(store, volume).await?;
    if snap.parent != m.parent {
        // Flatten refuses while snapshots read through the parent, so the
        // two always agree; never mix one parent's map with another.
        return Err(SnapshotError::State {
            volume,
            reason: format!(
                "snapshot {:?} reads through {} but the volume through {}; not rolled back",
                snap.name,
                parent_name(snap.parent),
                parent_name(m.parent)
            ),
        });
    }
    let cp = Checkpoint {
        volume,
        epoch: m.epoch,
        chunk_seq: m.last_chunk,
        last_seq: m.last_seq,
        chunks: snap.checkpoint.chunks.clone(),
        extents: snap.checkpoint.extents.clone(),
        zeros: snap.checkpoint.zeros.clone(),
    };
    let key = format!(
        "{}-rollback-{:016x}",
        checkpoint_key(volume, m.last_chunk, epoch),
        snap.id
    );
    let new = prepare::rolled_back(&m, key.clone());
    swap_checkpoint(
        store,
        &m,
        version,
        &key,
        &cp,
        new,
        "the manifest changed during the rollback (is the volume attached?); nothing was rolled back",
    )
    .await?;
    collect_garbage(store, volume, epoch).await?;
    Ok(())
}

/// Store checkpoint `cp` at `key`, then swap the manifest from `old` (at
/// `version`) to `new` (which names `key`) by compare-and-swap, then delete
/// `old`'s checkpoint. A lost swap is [`SnapshotError::State`] with
/// `conflict` as the reason and changes nothing the volume reads (the new
/// checkpoint is only an unnamed object). For detached volumes only.
pub(crate) async fn swap_checkpoint(
    store: &DynStore,
    old: &Manifest,
    version: crate::store::Version,
    key: &str,
    cp: &Checkpoint,
    new: Manifest,
    conflict: &str,
) -> Result<(), SnapshotError> {
    // The superseded chain (base and deltas), named before the swap.
    let old_keys = match crate::engine::meta::chain::keys(store, old, MAX_METADATA_BYTES).await {
        Ok(k) => k,
        Err(e) => {
            log::warn!(
                "reading the old checkpoint chain of volume {:x}: {e}",
                old.volume
            );
            old.checkpoint
                .iter()
                .chain(&old.checkpoint_base)
                .cloned()
                .collect()
        }
    };
    store
        .put(key, Bytes::from(cp.encode()), PutMode::Overwrite)
        .await?;
    match manifest::swap(store, old, version, &new).await? {
        Put::Stored(_) => {}
        Put::Conflict => {
            return Err(SnapshotError::State {
                volume: old.volume,
                reason: conflict.to_string(),
            })
        }
    }
    for prev in old_keys.iter().filter(|o| *o != key) {
        if let Err(e) = store.delete(prev).await {
            log::warn!("deleting old checkpoint {prev}: {e}");
        }
    }
    Ok(())
}

fn parent_name(p: Option<ParentRef>) -> String {
    p.map_or_else(|| "no parent".to_string(), |p| p.to_string())
}

/// Delete chunks of a detached volume that neither its checkpoint nor any
/// snapshot names (only chunks at or before the checkpoint: later ones may
/// still be applied by recovery), and compaction objects neither names.
/// `epoch` is the caller's lease epoch: only objects of that epoch or older
/// are deleted, and the loop stops (fenced) if the manifest shows a newer
/// epoch, checked before the first delete and every few deletes after
/// (see `fenced_delete.rs`). Returns how many were deleted.
pub async fn collect_garbage(
    store: &DynStore,
    volume: u64,
    epoch: u64,
) -> Result<u64, SnapshotError> {
    let (_, _, cp) = committed_checkpoint(store, volume).await?;
    let retain = RetainSet::load(store, volume).await;
    let live: HashSet<(u64, u64)> = cp.chunks.iter().map(|c| (c.seq, c.epoch)).collect();
    let prefix = chunk_prefix(volume);
    let mut deleter = FencedDeleter::new(store, volume, epoch);
    for meta in store.list(&prefix).await? {
        let Some((seq, e)) = parse_chunk_name(&meta.key[prefix.len()..]) else {
            continue;
        };
        if seq > cp.chunk_seq || live.contains(&(seq, e)) || retain.keeps(seq, e) {
            continue;
        }
        deleter.delete(&meta.key, e).await?;
    }
    super::compaction_gc::delete_unnamed(&mut deleter, store, volume, &live, &retain).await?;
    Ok(deleter.deleted)
}

/// Delete snapshot `snap` of a detached volume (whose lease at `epoch` the
/// caller holds) and the chunks only it held.
pub async fn delete_snapshot(
    store: &DynStore,
    volume: u64,
    epoch: u64,
    snap: &SnapshotObject,
) -> Result<u64, SnapshotError> {
    remove_snapshot(store, volume, snap.id).await?;
    collect_garbage(store, volume, epoch).await
}

/// Set (`on`) or clear the `deleting` mark of snapshot `id` of `volume`
/// (invariant 1), by compare-and-swap on the object as read; returns the
/// object as it is now. Fails if the snapshot is gone or changed meanwhile.
pub async fn set_deleting(
    store: &DynStore,
    volume: u64,
    id: u64,
    on: bool,
) -> Result<SnapshotObject, SnapshotError> {
    let key = snapshot_key(volume, id);
    let (snap, version) = read_snapshot_versioned(store, volume, id).await?;
    if snap.deleting == on {
        return Ok(snap);
    }
    let new = SnapshotObject {
        deleting: on,
        ..snap
    };
    match store
        .put(&key, Bytes::from(new.encode()), PutMode::IfMatch(version))
        .await
    {
        Ok(_) => Ok(new),
        Err(StoreError::PreconditionFailed { .. }) => Err(SnapshotError::State {
            volume,
            reason: format!("{key} changed meanwhile; is another snapshot delete running?"),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Remove the object of snapshot `id` of `volume`: the final, committing
/// step of its delete (its chunks are freed by the next garbage collection).
pub async fn remove_snapshot(store: &DynStore, volume: u64, id: u64) -> Result<(), SnapshotError> {
    match store.delete(&snapshot_key(volume, id)).await {
        Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
