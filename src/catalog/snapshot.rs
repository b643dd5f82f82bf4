//! Snapshot and clone commands on named volumes: `VOL@SNAP` names, leases,
//! and the engine's snapshot operations ([`crate::engine::snapshot`]).
//!
//! Invariants:
//! 1. Rollback runs only on a detached volume: it takes the volume's lease
//!    (refused while another holder's lease is live, i.e. while the volume
//!    is attached) and holds it until done. Before a rollback (or a create
//!    on a detached volume) the volume is opened and closed once, so every
//!    write of its WAL is in the store and checkpointed.
//! 2. Create and delete on a detached volume work the same way under its
//!    lease. On an attached volume they ask the holding process over the
//!    volume's control socket ([`crate::control`]) to act on the open volume
//!    (a create is then crash-consistent at a flush point); with no socket
//!    answering (holder on another host, or an older server) they fail,
//!    naming the holder.
//! 3. A snapshot some clone names as its parent is never deleted; the
//!    refusal names the clones. A delete marks the snapshot first, looks
//!    for clones, and only then removes it (or clears the mark): the
//!    snapshot keeps its chunks until its delete is final.
//! 4. A clone's manifest is written under a fresh, unused volume id before
//!    its record is created, so a crash part-way never leaves a record that
//!    opens as an empty volume (only unreferenced objects). See `snapshot/clone.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::lease::{read_lease, Lease, LeaseError};
use super::local_dir::{claim_volume_dir, LocalDirClaim, LocalDirError};
mod clone;

pub use clone::FlattenReport;

use super::{validate_name, Catalog, CatalogError, VolumeRecord, VolumeState};
use crate::clock::DynClock;
use crate::control::{self, ControlError, Request};
use crate::engine::config::EngineConfig;
use crate::engine::snapshot::{self as snap, SnapshotError, SnapshotObject};
use crate::engine::view::SnapshotView;
use crate::engine::{EngineError, Volume, VolumeParams};
use crate::store::{DynStore, StoreError};

/// How long a maintenance lease lasts between renewals.
const LEASE_TTL: Duration = Duration::from_secs(30);
const LEASE_RENEW: Duration = Duration::from_secs(10);

/// Failures of snapshot and clone commands.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("invalid snapshot name {spec:?}: expected VOLUME@SNAPSHOT ({reason})")]
    InvalidSpec { spec: String, reason: String },
    #[error("there is no snapshot {spec} (`shale snapshot list` shows them)")]
    NoSuchSnapshot { spec: String },
    #[error("snapshot {spec} already exists")]
    SnapshotExists { spec: String },
    #[error(
        "volume {name:?} is attached (lease held by {holder:?}); detach it first: \
         rollbacks run on detached volumes"
    )]
    Attached { name: String, holder: String },
    #[error(
        "volume {name:?} is attached by {holder:?}, and no server on this host answers \
         on its control socket ({source}); run the command on the host where {holder:?} runs \
         (a server on this host without a control socket must be restarted first)"
    )]
    NoControl {
        name: String,
        holder: String,
        source: ControlError,
    },
    #[error("volume {name:?} (attached by {holder:?}): {reason}")]
    Remote {
        name: String,
        holder: String,
        reason: String,
    },
    #[error("snapshot {spec} has clones ({}); delete or flatten them first", clones.join(", "))]
    HasClones { spec: String, clones: Vec<String> },
    #[error("volume {name:?} is not a clone (it has no parent to flatten)")]
    NotAClone { name: String },
    #[error(
        "volume {name:?} has snapshots that read through its parent ({}); \
         delete them before flattening",
        snapshots.join(", ")
    )]
    SnapshotsReadThrough {
        name: String,
        snapshots: Vec<String>,
    },
    #[error(
        "a clone of {spec} must have the parent's size ({parent_size} bytes), not {size} bytes"
    )]
    CloneSize {
        spec: String,
        size: u64,
        parent_size: u64,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    LocalDir(#[from] LocalDirError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<StoreError> for SnapError {
    fn from(e: StoreError) -> Self {
        SnapError::Catalog(CatalogError::Store(e))
    }
}

/// Split `VOL@SNAP` and check both names.
pub fn parse_spec(spec: &str) -> Result<(String, String), SnapError> {
    let bad = |reason: String| SnapError::InvalidSpec {
        spec: spec.to_string(),
        reason,
    };
    let (vol, name) = spec.split_once('@').ok_or_else(|| bad("no '@'".into()))?;
    validate_name(vol).map_err(|e| bad(e.to_string()))?;
    validate_name(name).map_err(|e| bad(e.to_string()))?;
    Ok((vol.to_string(), name.to_string()))
}

/// One snapshot as listed.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    pub volume: String,
    pub snapshot: SnapshotObject,
    /// Names of volumes cloned from it.
    pub clones: Vec<String>,
}

/// Snapshot and clone commands over one store.
pub struct Snapshots {
    catalog: Catalog,
    engine: EngineConfig,
    data_dir: PathBuf,
    clock: DynClock,
    holder: String,
}

impl Snapshots {
    /// `data_dir` is the configured data directory (volume WALs live in
    /// `<data_dir>/volumes/<id:016x>`); `holder` names this process in leases.
    pub fn new(
        store: DynStore,
        engine: EngineConfig,
        data_dir: PathBuf,
        clock: DynClock,
        holder: &str,
    ) -> Snapshots {
        Snapshots {
            catalog: Catalog::new(store),
            engine,
            data_dir,
            clock,
            holder: holder.to_string(),
        }
    }

    fn store(&self) -> &DynStore {
        self.catalog.store()
    }

    fn volume_dir(&self, id: u64) -> PathBuf {
        self.data_dir.join("volumes").join(format!("{id:016x}"))
    }

    async fn ready(&self, name: &str) -> Result<VolumeRecord, SnapError> {
        let rec = self.catalog.get(name).await?;
        if rec.state != VolumeState::Ready {
            return Err(CatalogError::Deleting {
                name: name.to_string(),
            }
            .into());
        }
        Ok(rec)
    }

    /// Take the lease of a detached volume, holding its local directory
    /// (see [`super::local_dir`]): a lease left by a crashed process of this
    /// host and directory is taken over at once. A volume another process
    /// holds is refused with [`SnapError::Attached`] naming the holder.
    async fn detach_lease(
        &self,
        rec: &VolumeRecord,
    ) -> Result<(Arc<Lease>, LocalDirClaim), SnapError> {
        let local = match claim_volume_dir(self.store(), &self.volume_dir(rec.id), rec.id).await {
            Ok(local) => local,
            Err(busy @ LocalDirError::Busy { .. }) => {
                // A process of this host has the volume open: if it holds
                // the lease, it is the one to ask.
                let now_ms = u64::try_from(self.clock.now().as_millis()).unwrap_or(u64::MAX);
                return match read_lease(self.store(), rec.id).await? {
                    Some((l, _)) if l.is_live(now_ms) => Err(SnapError::Attached {
                        name: rec.name.clone(),
                        holder: l.holder,
                    }),
                    _ => Err(busy.into()),
                };
            }
            Err(e) => return Err(e.into()),
        };
        match Lease::acquire_local(
            self.store().clone(),
            rec.id,
            &self.holder,
            LEASE_TTL,
            None,
            self.clock.clone(),
            &local,
        )
        .await
        {
            Ok(l) => Ok((Arc::new(l), local)),
            Err(LeaseError::Held { holder, .. }) => Err(SnapError::Attached {
                name: rec.name.clone(),
                holder,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Run `op` while holding the volume's lease (and its local directory),
    /// then release both.
    async fn leased<T, F, Fut>(&self, rec: &VolumeRecord, op: F) -> Result<T, SnapError>
    where
        F: FnOnce(u64) -> Fut,
        Fut: std::future::Future<Output = Result<T, SnapError>>,
    {
        let (lease, local) = self.detach_lease(rec).await?;
        let renewer = lease.spawn_renewer(LEASE_RENEW);
        let res = op(lease.epoch()).await;
        if res.is_ok() {
            self.republish_usage(rec).await;
        }
        renewer.stop().await;
        if let Err(e) = lease.release().await {
            log::warn!("could not release the lease of volume {:?}: {e}", rec.name);
        }
        drop(local);
        res
    }

    /// Publish the space of a detached volume whose maps an operation just
    /// changed (see [`crate::engine::usage`]); on failure (logged) the pool
    /// keeps the older figure until the volume is next attached.
    async fn republish_usage(&self, rec: &VolumeRecord) {
        let now_ms = u64::try_from(self.clock.now().as_millis()).unwrap_or(u64::MAX);
        if let Err(e) =
            crate::engine::usage::refresh_detached(self.store(), rec.id, rec.size, now_ms).await
        {
            log::warn!("volume {:?}: cannot publish its space: {e}", rec.name);
        }
    }

    /// Open and cleanly close the volume at `epoch`: its WAL is destaged
    /// and everything is checkpointed.
    async fn settle(&self, rec: &VolumeRecord, epoch: u64) -> Result<(), SnapError> {
        self.open_volume(rec, epoch).await?.close().await?;
        Ok(())
    }

    /// Snapshot `name` of volume `rec`; a missing one is named `VOL@SNAP`.
    pub(super) async fn find(
        &self,
        rec: &VolumeRecord,
        name: &str,
    ) -> Result<SnapshotObject, SnapError> {
        match snap::find_snapshot(self.store(), rec.id, name).await {
            Err(SnapshotError::NotFound { .. }) => Err(SnapError::NoSuchSnapshot {
                spec: format!("{}@{name}", rec.name),
            }),
            other => Ok(other?),
        }
    }

    /// Open (recovering) the volume at `epoch`, which the caller's lease holds.
    async fn open_volume(&self, rec: &VolumeRecord, epoch: u64) -> Result<Arc<Volume>, SnapError> {
        let params = VolumeParams {
            id: rec.id,
            size: rec.size,
            epoch,
            local_dir: self.volume_dir(rec.id),
        };
        Ok(Volume::open(
            self.store().clone(),
            params,
            self.engine.clone(),
            self.clock.clone(),
        )
        .await?)
    }

    /// After snapshot `s` of `rec` (`spec`) was marked deleting: if a clone
    /// of it appeared meanwhile (or clones cannot be listed), clear the mark
    /// and fail. The snapshot kept every chunk while marked.
    async fn recheck_clones(
        &self,
        spec: &str,
        rec: &VolumeRecord,
        s: &SnapshotObject,
    ) -> Result<(), SnapError> {
        let clones = match self.clones_of(spec).await {
            Ok(c) => c,
            Err(e) => {
                self.unmark(rec, s).await?;
                return Err(e);
            }
        };
        if !clones.is_empty() {
            self.unmark(rec, s).await?;
            return Err(SnapError::HasClones {
                spec: spec.to_string(),
                clones,
            });
        }
        Ok(())
    }

    /// Undo a delete's mark on snapshot `s` of `rec`.
    async fn unmark(&self, rec: &VolumeRecord, s: &SnapshotObject) -> Result<(), SnapError> {
        if let Err(e) = snap::set_deleting(self.store(), rec.id, s.id, false).await {
            log::error!(
                "could not clear the deleting mark of snapshot {}@{} (clones need it; \
                 it keeps its data meanwhile): {e}",
                rec.name,
                s.name
            );
            return Err(e.into());
        }
        Ok(())
    }

    /// `shale snapshot create VOL@SNAP` (detached volumes only).
    pub async fn create(&self, spec: &str, now_ms: u64) -> Result<SnapshotObject, SnapError> {
        let (vol, name) = parse_spec(spec)?;
        let rec = &self.ready(&vol).await?;
        if snap::list_snapshots(self.store(), rec.id)
            .await?
            .iter()
            .any(|s| s.name == name)
        {
            return Err(SnapError::SnapshotExists {
                spec: format!("{}@{name}", rec.name),
            });
        }
        let name = name.as_str();
        let detached = self
            .leased(rec, |epoch| async move {
                self.settle(rec, epoch).await?;
                Ok(snap::take_snapshot(self.store(), rec.id, name, now_ms).await?)
            })
            .await;
        match detached {
            Err(SnapError::Attached { holder, .. }) => {
                self.create_attached(rec, name, holder, now_ms).await
            }
            other => other,
        }
    }

    /// Ask the process holding `rec` to snapshot the open volume.
    async fn create_attached(
        &self,
        rec: &VolumeRecord,
        name: &str,
        holder: String,
        now_ms: u64,
    ) -> Result<SnapshotObject, SnapError> {
        let req = Request::SnapshotCreate {
            volume: rec.id,
            name: name.to_string(),
            created_ms: now_ms,
        };
        self.ask_holder(rec, holder, &req).await?;
        self.find(rec, name).await
    }

    /// Send `req` to the process holding `rec` (`holder`); its refusal is
    /// an error.
    async fn ask_holder(
        &self,
        rec: &VolumeRecord,
        holder: String,
        req: &Request,
    ) -> Result<control::Reply, SnapError> {
        let path = control::socket_path(&self.volume_dir(rec.id));
        let reply = match control::request(&path, req).await {
            Ok(r) => r,
            Err(source @ ControlError::Io { .. }) => {
                return Err(SnapError::NoControl {
                    name: rec.name.clone(),
                    holder,
                    source,
                })
            }
            Err(e) => {
                return Err(SnapError::Remote {
                    name: rec.name.clone(),
                    holder,
                    reason: e.to_string(),
                })
            }
        };
        if !reply.ok {
            return Err(SnapError::Remote {
                name: rec.name.clone(),
                holder,
                reason: reply
                    .error
                    .unwrap_or_else(|| "refused (no reason given)".into()),
            });
        }
        Ok(reply)
    }

    /// Every snapshot, of one volume or of all, with the clones of each.
    pub async fn list(&self, volume: Option<&str>) -> Result<Vec<SnapshotEntry>, SnapError> {
        let all = self.catalog.list().await?;
        let mut out = Vec::new();
        for rec in all.iter().filter(|r| volume.is_none_or(|v| r.name == v)) {
            for s in snap::list_snapshots(self.store(), rec.id).await? {
                let spec = format!("{}@{}", rec.name, s.name);
                let clones = all
                    .iter()
                    .filter(|c| c.parent.as_deref() == Some(spec.as_str()))
                    .map(|c| c.name.clone())
                    .collect();
                out.push(SnapshotEntry {
                    volume: rec.name.clone(),
                    snapshot: s,
                    clones,
                });
            }
        }
        if let Some(v) = volume {
            if !all.iter().any(|r| r.name == v) {
                return Err(CatalogError::NotFound {
                    name: v.to_string(),
                }
                .into());
            }
        }
        Ok(out)
    }

    async fn clones_of(&self, spec: &str) -> Result<Vec<String>, SnapError> {
        Ok(self
            .catalog
            .list()
            .await?
            .into_iter()
            .filter(|c| c.parent.as_deref() == Some(spec))
            .map(|c| c.name)
            .collect())
    }

    /// `shale snapshot delete VOL@SNAP`: refused while clones name it.
    /// Returns the number of chunks freed. On an attached volume, done by
    /// its server (invariant 2).
    pub async fn delete(&self, spec: &str) -> Result<u64, SnapError> {
        let (vol, name) = parse_spec(spec)?;
        let rec = &self.ready(&vol).await?;
        let s = self.find(rec, &name).await?;
        let canonical = format!("{vol}@{name}");
        let clones = self.clones_of(&canonical).await?;
        if !clones.is_empty() {
            return Err(SnapError::HasClones {
                spec: canonical,
                clones,
            });
        }
        let detached = self
            .leased(rec, |epoch| {
                self.delete_unless_cloned(rec, &s, &canonical, epoch)
            })
            .await;
        match detached {
            Err(SnapError::Attached { holder, .. }) => {
                self.delete_attached(rec, &s, &canonical, holder).await
            }
            other => other,
        }
    }

    /// [`Snapshots::delete`] by the server holding `rec`: it marks the
    /// snapshot deleting; then we check for clones made meanwhile (clearing
    /// the mark if there are), remove the object (the delete is final) and
    /// let the server free chunks, like `delete_unless_cloned` does for a
    /// detached volume. While marked, the snapshot keeps its chunks through
    /// every checkpoint and compaction of the attached volume.
    async fn delete_attached(
        &self,
        rec: &VolumeRecord,
        s: &SnapshotObject,
        spec: &str,
        holder: String,
    ) -> Result<u64, SnapError> {
        let delete = Request::SnapshotDelete {
            volume: rec.id,
            name: s.name.clone(),
        };
        self.ask_holder(rec, holder.clone(), &delete).await?;
        self.recheck_clones(spec, rec, s).await?;
        snap::remove_snapshot(self.store(), rec.id, s.id).await?;
        let collect = Request::CollectGarbage { volume: rec.id };
        let reply = self.ask_holder(rec, holder, &collect).await?;
        Ok(reply.freed_chunks.unwrap_or(0))
    }

    /// `shale snapshot rollback VOL@SNAP` (detached volumes only).
    pub async fn rollback(&self, spec: &str) -> Result<(), SnapError> {
        let (vol, name) = parse_spec(spec)?;
        let rec = &self.ready(&vol).await?;
        let s = self.find(rec, &name).await?;
        self.leased(rec, |epoch| async move {
            self.settle(rec, epoch).await?;
            snap::rollback(self.store(), rec.id, epoch, &s).await?;
            Ok(())
        })
        .await
    }

    /// A read-only device showing snapshot `VOL@SNAP`.
    pub async fn view(&self, spec: &str) -> Result<SnapshotView, SnapError> {
        let (vol, name) = parse_spec(spec)?;
        let rec = self.ready(&vol).await?;
        let s = self.find(&rec, &name).await?;
        Ok(SnapshotView::of_snapshot(self.store().clone(), &s, rec.size).await?)
    }
}
