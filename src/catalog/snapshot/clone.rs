//! Clones on named volumes: `shale clone`, `shale volume create --from`
//! and `shale flatten`.
//!
//! Invariants:
//! 1. A clone's manifest (naming its parent snapshot by ids) is written
//!    under a fresh volume id before its record exists; nothing of the
//!    parent is copied or written.
//! 2. After writing its record, a clone re-reads its parent volume's
//!    record; if a delete of the parent began meanwhile, the clone removes
//!    itself and fails (volume delete marks first, then looks for clones:
//!    one of the two sees the other).
//! 3. A snapshot delete marks the snapshot object deleting, then looks for
//!    clones of it, and clears the mark if it finds one (the snapshot kept
//!    every chunk meanwhile), else removes the object and collects chunks;
//!    a new clone, after writing its record, checks that the object still
//!    exists unmarked and removes itself if not. So a clone never ends up
//!    with a deleted parent.
//! 4. Flatten runs under the clone's lease: copy what the clone reads from
//!    its parent, close (everything checkpointed), drop the parent from the
//!    manifest, then from the record. Each step is safe to crash after;
//!    running flatten again finishes the job.

use super::{parse_spec, SnapError, Snapshots};
use crate::catalog::{encode, validate_name, CatalogError, VolumeRecord, VolumeState};
use crate::engine::clone::{copy_parent_data, finish_flatten, write_clone, CopyStats};
use crate::engine::format::layout::{catalog_record_key, volume_prefix};
use crate::engine::snapshot as snap;
use crate::store::{PutMode, StoreError};

/// What a flatten did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlattenReport {
    /// The record as it is now (`parent: None`).
    pub record: VolumeRecord,
    /// The parent it read through to before (`VOL@SNAP`).
    pub parent: Option<String>,
    pub copy: CopyStats,
}

impl Snapshots {
    /// `shale clone VOL@SNAP NEW`: a new thin volume that reads through to
    /// the snapshot (no data copied) with `parent: VOL@SNAP`. The parent is
    /// never changed.
    pub async fn clone_volume(
        &self,
        spec: &str,
        new_name: &str,
        now_ms: u64,
    ) -> Result<VolumeRecord, SnapError> {
        self.create_from(spec, new_name, None, now_ms).await
    }

    /// `shale volume create NEW [--size S] --from VOL@SNAP`: a clone; `size`,
    /// if given, must equal the parent volume's size.
    pub async fn create_from(
        &self,
        spec: &str,
        new_name: &str,
        size: Option<u64>,
        now_ms: u64,
    ) -> Result<VolumeRecord, SnapError> {
        let (vol, name) = parse_spec(spec)?;
        validate_name(new_name)?;
        let parent = self.ready(&vol).await?;
        let canonical = format!("{vol}@{name}");
        if let Some(size) = size.filter(|&s| s != parent.size) {
            return Err(SnapError::CloneSize {
                spec: canonical,
                size,
                parent_size: parent.size,
            });
        }
        let s = self.find(&parent, &name).await?;
        if s.deleting {
            return Err(being_deleted(parent.id, &canonical));
        }
        let key = catalog_record_key(new_name);
        match self.store().head(&key).await {
            Ok(_) => {
                return Err(CatalogError::AlreadyExists {
                    name: new_name.to_string(),
                }
                .into())
            }
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let id = self.catalog.allocate_id().await?;
        write_clone(self.store(), &s, id).await?;
        let record = VolumeRecord {
            id,
            name: new_name.to_string(),
            size: parent.size,
            thick: false,
            created_ms: now_ms,
            parent: Some(canonical),
            state: VolumeState::Ready,
        };
        if let Err(e) = self
            .store()
            .put(&key, encode(&key, &record)?, PutMode::Create)
            .await
        {
            self.remove_objects(id).await;
            return Err(match e {
                StoreError::AlreadyExists { .. } => CatalogError::AlreadyExists {
                    name: new_name.to_string(),
                },
                other => CatalogError::Store(other),
            }
            .into());
        }
        // Invariants 2 and 3: a delete of the parent volume or snapshot
        // that began meanwhile wins.
        let parent_now = self.catalog.get(&vol).await;
        let volume_ok =
            matches!(&parent_now, Ok(p) if p.id == parent.id && p.state == VolumeState::Ready);
        let snapshot_ok = volume_ok
            && snap::read_snapshot(self.store(), parent.id, s.id)
                .await
                .is_ok_and(|now| !now.deleting);
        if !snapshot_ok {
            if let Err(e) = self.store().delete(&key).await {
                log::warn!("could not remove the record of clone {new_name:?}: {e}");
            }
            self.remove_objects(id).await;
            return Err(if volume_ok {
                SnapError::Snapshot(snap::SnapshotError::NotFound {
                    volume: parent.id,
                    name,
                })
            } else {
                CatalogError::Deleting { name: vol }.into()
            });
        }
        Ok(record)
    }

    /// Delete snapshot `s` of `rec` (whose lease the caller holds) unless a
    /// clone names it as `spec` (invariant 3). Returns the chunks freed.
    pub(super) async fn delete_unless_cloned(
        &self,
        rec: &VolumeRecord,
        s: &snap::SnapshotObject,
        spec: &str,
        epoch: u64,
    ) -> Result<u64, SnapError> {
        snap::set_deleting(self.store(), rec.id, s.id, true).await?;
        self.recheck_clones(spec, rec, s).await?;
        snap::remove_snapshot(self.store(), rec.id, s.id).await?;
        Ok(snap::collect_garbage(self.store(), rec.id, epoch).await?)
    }

    /// Best-effort removal of a fresh volume id's objects (nobody else can
    /// know the id yet).
    async fn remove_objects(&self, id: u64) {
        match self.store().list(&volume_prefix(id)).await {
            Ok(objects) => {
                for meta in objects {
                    let _ = self.store().delete(&meta.key).await;
                }
            }
            Err(e) => log::warn!("could not list the objects of volume {id:016x}: {e}"),
        }
    }

    /// `shale flatten VOL`: copy everything the detached clone `name` reads
    /// from its parent into it, so it no longer depends on the parent.
    /// `progress(done, total)` is called as bytes are copied. Refused while
    /// a snapshot of the clone reads through the parent.
    pub async fn flatten(
        &self,
        name: &str,
        progress: impl FnMut(u64, u64),
    ) -> Result<FlattenReport, SnapError> {
        let rec = &self.ready(name).await?;
        if rec.parent.is_none() {
            return Err(SnapError::NotAClone {
                name: name.to_string(),
            });
        }
        let through: Vec<String> = snap::list_snapshots(self.store(), rec.id)
            .await?
            .into_iter()
            .filter(|s| s.parent.is_some())
            .map(|s| format!("{name}@{}", s.name))
            .collect();
        if !through.is_empty() {
            return Err(SnapError::SnapshotsReadThrough {
                name: name.to_string(),
                snapshots: through,
            });
        }
        let copy = self
            .leased(rec, |epoch| async move {
                let vol = self.open_volume(rec, epoch).await?;
                let copied = copy_parent_data(&vol, progress).await;
                let closed = vol.close().await;
                let copy = copied?;
                closed?;
                // False when a crashed flatten got this far already.
                finish_flatten(self.store(), rec.id, rec.size, epoch).await?;
                Ok(copy)
            })
            .await?;
        let record = self.catalog.clear_parent(name).await?;
        Ok(FlattenReport {
            record,
            parent: rec.parent.clone(),
            copy,
        })
    }
}

/// A clone of a snapshot whose delete has begun is refused.
fn being_deleted(volume: u64, spec: &str) -> SnapError {
    SnapError::Snapshot(snap::SnapshotError::State {
        volume,
        reason: format!("snapshot {spec} is being deleted; it gets no new clones"),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::SystemClock;
    use crate::engine::config::EngineConfig;
    use crate::store::memory::MemoryStore;
    use crate::store::DynStore;

    /// Snapshot operations on a fresh memory store, with the data
    /// directory (kept alive by the returned guard).
    fn fixture() -> (tempfile::TempDir, DynStore, Snapshots) {
        let dir = tempfile::tempdir().unwrap();
        let store: DynStore = Arc::new(MemoryStore::new());
        let snaps = Snapshots::new(
            store.clone(),
            EngineConfig::default(),
            dir.path().to_path_buf(),
            Arc::new(SystemClock),
            "test",
        );
        (dir, store, snaps)
    }

    /// A clone that appears after the delete's first look (its record
    /// written while the delete waits for the lease) still stops it: the
    /// snapshot object comes back unchanged (unmarked) and no chunk is
    /// collected.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn late_clone_stops_a_snapshot_delete() {
        let (_dir, store, snaps) = fixture();
        let rec = snaps.catalog.create("p", 1 << 20, false, 0).await.unwrap();
        let s = snaps.create("p@s", 0).await.unwrap();
        let skey = crate::engine::format::layout::snapshot_key(rec.id, s.id);
        let before = store.get(&skey).await.unwrap().data;
        snaps.clone_volume("p@s", "c", 0).await.unwrap();
        let e = snaps
            .leased(&rec, |epoch| {
                snaps.delete_unless_cloned(&rec, &s, "p@s", epoch)
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SnapError::HasClones { clones, .. } if clones == &["c"]),
            "{e}"
        );
        assert_eq!(store.get(&skey).await.unwrap().data, before);
        assert!(snaps.view("p@s").await.is_ok());
    }

    /// A delete interrupted after its mark (a crash): the snapshot still
    /// reads, gets no new clone, is listed as deleting, and running the
    /// delete again finishes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_delete_is_finished_by_running_it_again() {
        let (_dir, store, snaps) = fixture();
        let rec = snaps.catalog.create("p", 1 << 20, false, 0).await.unwrap();
        let s = snaps.create("p@s", 0).await.unwrap();
        snap::set_deleting(&store, rec.id, s.id, true)
            .await
            .unwrap();
        assert!(snaps.view("p@s").await.is_ok());
        let e = snaps.clone_volume("p@s", "c", 0).await.unwrap_err();
        assert!(e.to_string().contains("being deleted"), "{e}");
        assert!(snaps.catalog.get("c").await.is_err(), "no clone record");
        let listed = snaps.list(Some("p")).await.unwrap();
        assert!(listed[0].snapshot.deleting, "{listed:?}");
        snaps.delete("p@s").await.expect("finish the delete");
        assert!(snaps.list(Some("p")).await.unwrap().is_empty());
    }
}
