//! Wiring shared by the frontends: from a config and a volume name to an
//! open, recovered [`Volume`] that this process alone may write.
//!
//! Invariants:
//! 1. The volume's local directory [`Config::volume_dir`]`(id)` is claimed
//!    first (`catalog::local_dir`: created if missing, locked for as long as
//!    the volume is open, and refused if it belongs to another store or
//!    volume), then the volume's lease is taken, before anything else
//!    touches the volume. The lease's epoch is the writer epoch given to the
//!    engine, so a server that lost the lease is fenced by the engine's
//!    manifest compare-and-swap.
//! 2. A lease left by a crashed process of this host and the same local
//!    directory is taken over at once (`lease` rule 8): the directory lock
//!    proves that process is gone. Any other live holder refuses.
//! 3. After taking the lease the record is read again: a volume being
//!    deleted is never opened (the lease is released and open fails).
//!    Together with `Catalog::delete` (mark, then read the lease) this keeps
//!    delete and open from both going ahead.
//! 4. The volume acknowledges writes only within the lease's deadline
//!    (`lease` rule 7): its [`Lease::ack_gate`] is installed together with
//!    the renewer, which runs on its own thread.
//! 5. [`Attached::close`] closes the volume (flush, destage, checkpoint)
//!    before releasing the lease, so the next holder sees everything; the
//!    local directory is unlocked last.
//! 6. Before the volume serves, its pool task ([`PoolWatcher`]) has set its
//!    space limit from the pool (when `pool.capacity` is set); the task
//!    publishes its usage while attached and once more at close.
//! 7. While attached, the volume's control socket ([`crate::control`]) is
//!    served from its local directory; it is removed before the volume is
//!    closed. Failing to create it is logged, not fatal.
//! 8. Every attached volume has its own store handle and
//!    [`VolumeMetrics`], which its control socket reports; frontends wrap
//!    the volume in a [`crate::metrics::requests::MeteredDevice`] from
//!    [`Attached::metered`].
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::lease::{Lease, LeaseError, Renewer};
use crate::catalog::local_dir::{claim_volume_dir, LocalDirClaim, LocalDirError};
use crate::catalog::{Catalog, CatalogError, VolumeRecord, VolumeState};
use crate::clock::{DynClock, SystemClock};
use crate::config::Config;
use crate::control::{self, ControlServer};
use crate::engine::{BlockDevice, EngineError, Volume, VolumeParams};
use crate::metrics::requests::MeteredDevice;
use crate::metrics::volume::VolumeMetrics;
use crate::pool::watch::PoolWatcher;
use crate::pool::PoolError;
use crate::store::{DynStore, StoreError};

/// Why a volume could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot open the object store")]
    Store(#[source] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    LocalDir(#[from] LocalDirError),
    #[error("volume {name:?}")]
    Engine { name: String, source: EngineError },
    #[error("volume {name:?}: cannot check the pool's capacity")]
    Pool { name: String, source: PoolError },
}

/// A volume this process has open, with the lease that makes it the only
/// writer. Close it with [`Attached::close`]; dropping it stops renewing the
/// lease, which then expires after `lease.ttl_seconds` (or is taken over at
/// once by the next server on this host, see invariant 2).
#[derive(Debug)]
pub struct Attached {
    pub volume: Arc<Volume>,
    pub record: VolumeRecord,
    lease: Arc<Lease>,
    renewer: Renewer,
    /// The control socket; `None` if it could not be created.
    control: Option<ControlServer>,
    pool: PoolWatcher,
    metrics: Arc<VolumeMetrics>,
    ticker: AbortOnDrop,
    /// The local directory's lock; dropped last.
    local: LocalDirClaim,
}

/// A task aborted when this is dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Attached {
    /// The lease held for this volume (its epoch is the writer epoch).
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The volume's metrics (what its control socket reports).
    pub fn metrics(&self) -> &Arc<VolumeMetrics> {
        &self.metrics
    }

    /// The volume as frontend `kind` (`nbd`, `ublk`) should serve it: every
    /// request counted in the volume's metrics. `device` says where clients
    /// find it (see [`VolumeMetrics::frontend`]).
    pub fn metered(&self, kind: &str, device: &str) -> Arc<dyn BlockDevice> {
        Arc::new(MeteredDevice::new(
            self.volume.clone(),
            self.metrics.frontend(kind, device),
        ))
    }

    /// Close the volume (flush, destage, checkpoint, stop its tasks), then
    /// stop renewing and release the lease. The lease is released only if
    /// the volume closed cleanly; otherwise it is left to expire.
    pub async fn close(self) -> Result<(), DaemonError> {
        drop(self.control);
        drop(self.ticker);
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
        drop(self.local);
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

/// Claim `name`'s local directory, take its lease and open it (running
/// recovery), renewing the lease in the background. Must be called inside
/// a tokio runtime: the volume spawns its work there.
pub async fn attach(cfg: &Config, name: &str) -> Result<Attached, DaemonError> {
    let clock: DynClock = Arc::new(SystemClock);
    let (store, store_metrics) = crate::store::metered::open(&cfg.store)
        .await
        .map_err(DaemonError::Store)?;
    let catalog = Catalog::new(store.clone());
    let record = catalog.get(name).await?;
    let local = claim_volume_dir(&store, &cfg.volume_dir(record.id), record.id).await?;
    let lease = Lease::acquire_local(
        store.clone(),
        record.id,
        &holder_name(),
        cfg.lease.ttl(),
        Some(cfg.lease.margin()),
        clock.clone(),
        &local,
    )
    .await?;
    let lease = Arc::new(lease);
    match open_leased(cfg, &catalog, store, name, &lease, &local, clock.clone()).await {
        Ok((volume, record, pool)) => {
            let renewer = spawn_fencing_renewer(&lease, &volume, cfg.lease.renew_period());
            let metrics = Arc::new(VolumeMetrics::new(
                &record.name,
                record.id,
                &volume,
                store_metrics,
                &lease,
                cfg.pool.capacity,
                clock,
            ));
            let ticker = AbortOnDrop(metrics.spawn_ticker());
            let path = control::socket_path(local.path());
            let with = Some(metrics.clone());
            let control = match ControlServer::start_with_metrics(path, &volume, record.id, with) {
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
                metrics,
                ticker,
                local,
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

/// Make `volume` acknowledge writes only within `lease`'s deadline (its
/// [`Lease::ack_gate`]) and renew `lease` every `period` on its own thread;
/// if the lease is lost (taken over, or expired before a renewal
/// succeeded) fence `volume` at once, so it acknowledges no more writes and
/// stores nothing more.
pub fn spawn_fencing_renewer(
    lease: &Arc<Lease>,
    volume: &Arc<Volume>,
    period: Duration,
) -> Renewer {
    volume.set_ack_gate(lease.ack_gate());
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
    local: &LocalDirClaim,
    clock: DynClock,
) -> Result<(Arc<Volume>, VolumeRecord, PoolWatcher), DaemonError> {
    let record = catalog.get(name).await?;
    if record.state != VolumeState::Ready {
        return Err(CatalogError::Deleting {
            name: name.to_string(),
        }
        .into());
    }
    let params = VolumeParams {
        id: record.id,
        size: record.size,
        epoch: lease.epoch(),
        local_dir: local.path().to_path_buf(),
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
/// (and the local directory kept locked) for as long as the current tokio
/// runtime runs; the lease then expires (it is not released). Prefer [`attach`] and
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
        metrics,
        ticker,
        local,
    } = attached;
    tokio::spawn(async move {
        // Owning the renewer keeps it running until the runtime shuts down.
        let _keep = (lease, renewer, pool, control, metrics, ticker, local);
        std::future::pending::<()>().await
    });
    Ok((volume, record))
}
