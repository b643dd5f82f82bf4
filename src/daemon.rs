//! Wiring shared by the frontends: from a config and a volume name to an
//! open, recovered [`Volume`] that this process alone may write.
//!
//! Invariants:
//! 1. The volume's lease is taken before anything else touches it, and its
//!    epoch is the writer epoch given to the engine, so a server that lost
//!    the lease is fenced by the engine's manifest compare-and-swap.
//! 2. After taking the lease the record is read again: a volume being
//!    deleted is never opened (the lease is released and open fails).
//!    Together with `Catalog::delete` (mark, then read the lease) this keeps
//!    delete and open from both going ahead.
//! 3. Local state for volume `id` lives in [`Config::volume_dir`]`(id)`,
//!    created here if missing.
//! 4. [`Attached::close`] closes the volume (flush, destage, checkpoint)
//!    before releasing the lease, so the next holder sees everything.
//! 5. Before the volume serves, its pool task ([`PoolWatcher`]) has set its
//!    space limit from the pool (when `pool.capacity` is set); the task
//!    publishes its usage while attached and once more at close.
//! 6. While attached, the volume's control socket ([`crate::control`]) is
//!    served from its local directory; it is removed before the volume is
//!    closed. Failing to create it is logged, not fatal.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::lease::{Lease, LeaseError, Renewer};
use crate::catalog::{Catalog, CatalogError, VolumeRecord, VolumeState};
use crate::clock::{DynClock, SystemClock};
use crate::config::Config;
use crate::control::{self, ControlServer};
use crate::engine::{EngineError, Volume, VolumeParams};
use crate::pool::watch::PoolWatcher;
use crate::pool::PoolError;
use crate::store::{DynStore, StoreError};

/// How long a lease stays live without renewal. A crashed server's volume
/// can be opened again after at most this long.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// How often a held lease is renewed (a third of the TTL).
pub const LEASE_RENEW_PERIOD: Duration = Duration::from_secs(10);

/// Why a volume could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open the object store")]
    Store(#[source] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("cannot create local directory {}", .path.display())]
    LocalDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("volume {name:?}")]
    Engine { name: String, source: EngineError },
    #[error("volume {name:?}: cannot check the pool's capacity")]
    Pool { name: String, source: PoolError },
}

/// A volume this process has open, with the lease that makes it the only
/// writer. Close it with [`Attached::close`]; dropping it stops renewing the
/// lease, which then expires after [`LEASE_TTL`].
#[derive(Debug)]
pub struct Attached {
    pub volume: Arc<Volume>,
    pub record: VolumeRecord,
    lease: Arc<Lease>,
    renewer: Renewer,
    /// The control socket; `None` if it could not be created.
    control: Option<ControlServer>,
    pool: PoolWatcher,
}

impl Attached {
    /// The lease held for this volume (its epoch is the writer epoch).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Close the volume (flush, destage, checkpoint, stop its tasks), then
    /// stop renewing and release the lease. The lease is released only if
    /// the volume closed cleanly; otherwise it is left to expire.
    pub async fn close(self) -> Result<(), DaemonError> {
        drop(self.control);
        let closed = self.volume.close().await;
        if closed.is_ok() {
            self.pool.finish(&self.volume).await;
        }
        self.renewer.stop().await;
        closed.map_err(|source| DaemonError::Engine {
            name: self.record.name.clone(),
            source,
        })?;
        self.lease.release().await?;
        Ok(())
    }
}

/// Open the configured object store (with retries).
pub async fn open_store(cfg: &Config) -> Result<DynStore, DaemonError> {
    crate::store::open(&cfg.store)
        .await
        .map_err(DaemonError::Store)
}

/// Who holds a lease: `<hostname>:<pid>`.
pub fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string());
    format!("{host}:{}", std::process::id())
}

/// Take `name`'s lease, prepare its local directory and open it (running
/// recovery), renewing the lease in the background. Must be called inside
/// a tokio runtime: the volume and the renewer spawn their work there.
pub async fn attach(cfg: &Config, name: &str) -> Result<Attached, DaemonError> {
    let clock: DynClock = Arc::new(SystemClock);
    let store = open_store(cfg).await?;
    let catalog = Catalog::new(store.clone());
    let record = catalog.get(name).await?;
    let lease = Lease::acquire(
        store.clone(),
        record.id,
        &holder_name(),
        LEASE_TTL,
        clock.clone(),
    )
    .await?;
    let lease = Arc::new(lease);
    match open_leased(cfg, &catalog, store, name, &lease, clock).await {
        Ok((volume, record, pool)) => {
            let renewer = spawn_fencing_renewer(&lease, &volume, LEASE_RENEW_PERIOD);
            let path = control::socket_path(&cfg.volume_dir(record.id));
            let control = match ControlServer::start(path, &volume, record.id) {
                Ok(c) => Some(c),
                Err(e) => {
                    log::warn!(
                        "volume {name:?}: no control socket ({e}); snapshots of it are refused while it is attached"
                    );
                    None
                }
            };
            Ok(Attached {
                volume,
                record,
                lease,
                renewer,
                control,
                pool,
            })
        }
        Err(e) => {
            if let Err(release) = lease.release().await {
                log::warn!("could not release the lease of volume {name:?}: {release}");
            }
            Err(e)
        }
    }
}

/// Renew `lease` every `period`; if it is lost (taken over, or expired
/// before a renewal succeeded) fence `volume` at once, so it acknowledges
/// no more writes and stores nothing more.
pub fn spawn_fencing_renewer(
    lease: &Arc<Lease>,
    volume: &Arc<Volume>,
    period: Duration,
) -> Renewer {
    let volume = Arc::downgrade(volume);
    lease.spawn_renewer_with(
        period,
        Box::new(move |lost| {
            if let Some(volume) = volume.upgrade() {
                volume.fence(&lost.to_string());
            }
        }),
    )
}

/// The part of [`attach`] that runs while holding the lease.
async fn open_leased(
    cfg: &Config,
    catalog: &Catalog,
    store: DynStore,
    name: &str,
    lease: &Lease,
    clock: DynClock,
) -> Result<(Arc<Volume>, VolumeRecord, PoolWatcher), DaemonError> {
    let record = catalog.get(name).await?;
    if record.state != VolumeState::Ready {
        return Err(CatalogError::Deleting {
            name: name.to_string(),
        }
        .into());
    }
    let local_dir = cfg.volume_dir(record.id);
    crate::private::create_dir_all(&local_dir).map_err(|source| DaemonError::LocalDir {
        path: local_dir.clone(),
        source,
    })?;
    let params = VolumeParams {
        id: record.id,
        size: record.size,
        epoch: lease.epoch(),
        local_dir,
    };
    let volume = Volume::open(store.clone(), params, cfg.engine.clone(), clock.clone())
        .await
        .map_err(|source| DaemonError::Engine {
            name: name.to_string(),
            source,
        })?;
    match PoolWatcher::start(store, &cfg.pool, &record, &volume, clock).await {
        Ok(pool) => Ok((volume, record, pool)),
        Err(source) => {
            // Nothing was written: close cleanly so the lease can be released.
            if let Err(e) = volume.close().await {
                log::warn!("closing volume {name:?}: {e}");
            }
            Err(DaemonError::Pool {
                name: name.to_string(),
                source,
            })
        }
    }
}

/// [`attach`] for callers that only want the volume: the lease is renewed
/// for as long as the current tokio runtime runs and then expires after
/// [`LEASE_TTL`] (it is not released). Prefer [`attach`] and
/// [`Attached::close`], which release it so the volume can be reopened at once.
pub async fn open_volume(
    cfg: &Config,
    name: &str,
) -> Result<(Arc<Volume>, VolumeRecord), DaemonError> {
    let attached = attach(cfg, name).await?;
    let Attached {
        volume,
        record,
        lease,
        renewer,
        pool,
        control,
    } = attached;
    tokio::spawn(async move {
        // Owning the renewer keeps it running until the runtime shuts down.
        let _keep = (lease, renewer, pool, control);
        std::future::pending::<()>().await
    });
    Ok((volume, record))
}
