//! The pool task of an attached volume: it publishes the volume's usage,
//! gives the engine its space limit from the pool, and logs the warning.
//!
//! Every [`POOL_REFRESH`] (and once before the volume serves):
//! 1. every [`RARE_REFRESH`]: if the volume's snapshot objects changed, the
//!    engine re-reads them for its accounting. A safety net only: snapshots
//!    of an attached volume are taken and deleted through its server, whose
//!    engine accounts for them at once;
//! 2. the volume's usage is published when it changed (no request when not);
//! 3. with a capacity configured, when the usage changed and at least every
//!    [`RARE_REFRESH`]: the pool is added up, the engine's limit set to what
//!    the other volumes leave, and a warning logged when the pool crosses
//!    `warn_percent` (and when this volume has no room left).
//!
//! So an idle volume makes no store request here between rare refreshes
//! (one LIST of its snapshots, and with a capacity one pool read, every
//! [`RARE_REFRESH`]), and a writing one publishes and re-reads the pool
//! every [`POOL_REFRESH`].
//!
//! Staleness: the limit reflects other volumes' usage as they published it.
//! While this volume writes, it is up to two refresh periods old; in the
//! first [`POOL_REFRESH`] after an idle spell it may be up to
//! [`RARE_REFRESH`] old. Volumes attached at once can together overshoot the
//! capacity by what they write in that time. The volume's own usage is
//! always exact.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{status, PoolError};
use crate::catalog::{Catalog, VolumeRecord};
use crate::clock::DynClock;
use crate::config::PoolConfig;
use crate::engine::format::layout::snapshot_prefix;
use crate::engine::usage::{publish, VolumeUsage};
use crate::engine::Volume;
use crate::size::format_size;
use crate::store::DynStore;

/// How often an attached volume publishes its usage (when it changed) and
/// then refreshes its limit.
pub const POOL_REFRESH: Duration = Duration::from_secs(10);
/// How often the pool and the snapshot objects are re-read although
/// nothing changed.
pub const RARE_REFRESH: Duration = Duration::from_secs(300);

struct Ctx {
    store: DynStore,
    cfg: PoolConfig,
    id: u64,
    name: String,
    clock: DynClock,
    volume: Weak<Volume>,
    published: Option<(u64, u64, u64)>,
    snapshot_keys: Option<Vec<String>>,
    /// When the snapshots and the pool were last read.
    snapshots_read: Option<Duration>,
    pool_read: Option<Duration>,
    warned: bool,
    full: bool,
}

/// Whether `last` is unset or at least [`RARE_REFRESH`] before `now`.
fn due(last: Option<Duration>, now: Duration) -> bool {
    last.is_none_or(|t| now.saturating_sub(t) >= RARE_REFRESH)
}

impl Ctx {
    fn new(
        store: DynStore,
        cfg: &PoolConfig,
        record: &VolumeRecord,
        volume: &Arc<Volume>,
        clock: DynClock,
    ) -> Ctx {
        Ctx {
            store,
            cfg: cfg.clone(),
            id: record.id,
            name: record.name.clone(),
            clock,
            volume: Arc::downgrade(volume),
            published: None,
            snapshot_keys: None,
            snapshots_read: None,
            pool_read: None,
            warned: false,
            full: false,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.now().as_millis()).unwrap_or(u64::MAX)
    }

    async fn reload_snapshots_if_changed(&mut self, vol: &Volume) {
        let keys = match self.store.list(&snapshot_prefix(self.id)).await {
            Ok(metas) => metas.into_iter().map(|m| m.key).collect::<Vec<_>>(),
            Err(e) => {
                log::warn!("volume {:?}: cannot list its snapshots: {e}", self.name);
                return;
            }
        };
        if self.snapshot_keys.as_ref() == Some(&keys) {
            return;
        }
        // The engine read them at open; only later changes need a reload.
        if self.snapshot_keys.is_some() {
            if let Err(e) = vol.reload_snapshots().await {
                log::warn!("volume {:?}: cannot reload its snapshots: {e}", self.name);
                return;
            }
        }
        self.snapshot_keys = Some(keys);
    }

    /// Publish the usage if it changed since last published; returns
    /// whether it had changed.
    async fn publish(&mut self, vol: &Volume) -> bool {
        // A fenced volume is no longer ours to speak for.
        if vol.fenced().is_some() {
            return false;
        }
        let s = vol.space_usage();
        let key = (s.used, s.live, s.snapshot_only);
        if self.published == Some(key) {
            return false;
        }
        let u = VolumeUsage::from_space(self.id, &s, self.now_ms());
        match publish(&self.store, &u).await {
            Ok(()) => self.published = Some(key),
            Err(e) => log::warn!("volume {:?}: cannot publish its usage: {e}", self.name),
        }
        true
    }

    async fn enforce(&mut self, vol: &Volume) -> Result<(), PoolError> {
        if self.cfg.capacity.is_none() {
            vol.set_space_limit(None);
            return Ok(());
        }
        let st = status(&Catalog::new(self.store.clone()), &self.cfg).await?;
        let limit = st.limit_for(self.id);
        vol.set_space_limit(limit);
        match st.warning_message() {
            Some(m) if !self.warned => log::warn!("{m}"),
            None if self.warned => log::info!("pool is below its warning threshold again"),
            _ => {}
        }
        self.warned = st.warning();
        let s = vol.space_usage();
        let full = limit.is_some_and(|l| s.used >= l.max(s.reserve));
        if full && !self.full {
            log::warn!(
                "volume {:?} has no pool space left (uses {}, may use {}): writes needing space fail with ENOSPC until space is freed",
                self.name,
                format_size(s.used),
                format_size(limit.unwrap_or(0).max(s.reserve))
            );
        }
        self.full = full;
        Ok(())
    }

    async fn refresh(&mut self) -> Result<(), PoolError> {
        let Some(vol) = self.volume.upgrade() else {
            return Ok(());
        };
        let now = self.clock.now();
        if due(self.snapshots_read, now) {
            self.reload_snapshots_if_changed(&vol).await;
            self.snapshots_read = Some(now);
        }
        let changed = self.publish(&vol).await;
        if changed || due(self.pool_read, now) {
            self.enforce(&vol).await?;
            self.pool_read = Some(now);
        }
        Ok(())
    }
}

/// The running pool task of one attached volume.
pub struct PoolWatcher {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Ctx>>,
}

impl std::fmt::Debug for PoolWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolWatcher").finish_non_exhaustive()
    }
}

impl PoolWatcher {
    /// Set the volume's reserve (its size if thick), refresh once (failing
    /// if a configured capacity cannot be checked), then keep refreshing
    /// every [`POOL_REFRESH`] on the current tokio runtime.
    pub async fn start(
        store: DynStore,
        cfg: &PoolConfig,
        record: &VolumeRecord,
        volume: &Arc<Volume>,
        clock: DynClock,
    ) -> Result<PoolWatcher, PoolError> {
        volume.set_space_reserve(if record.thick { record.size } else { 0 });
        let mut ctx = Ctx::new(store, cfg, record, volume, clock);
        ctx.refresh().await?;
        let (tx, mut rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut rx => return ctx,
                    _ = tokio::time::sleep(POOL_REFRESH) => {}
                }
                if let Err(e) = ctx.refresh().await {
                    log::warn!(
                        "volume {:?}: cannot refresh the pool's space: {e}",
                        ctx.name
                    );
                }
            }
        });
        Ok(PoolWatcher {
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// Stop refreshing and publish the volume's final usage (call after the
    /// volume was closed, before its lease is released).
    pub async fn finish(mut self, volume: &Volume) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            if let Ok(mut ctx) = task.await {
                ctx.publish(volume).await;
            }
        }
    }
}

impl Drop for PoolWatcher {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::engine::config::EngineConfig;
    use crate::engine::{BlockDevice, VolumeParams};
    use crate::store::memory::MemoryStore;
    use crate::store::metered::{MeteredStore, Method, StoreMetrics};

    /// An idle attached volume's pool task makes no store request between
    /// rare refreshes; a change of its usage publishes it and re-reads the
    /// pool at the next refresh. (Before: a LIST of the snapshots every
    /// refresh, 6 a minute.)
    #[tokio::test]
    async fn an_idle_volume_reads_the_pool_only_on_change_or_rarely() {
        let metrics = Arc::new(StoreMetrics::default());
        // The volume's own destage does not go through the metered handle.
        let backend: DynStore = Arc::new(MemoryStore::new());
        let store: DynStore = Arc::new(MeteredStore::new(backend.clone(), metrics.clone()));
        let catalog = Catalog::new(store.clone());
        let rec = catalog.create("v", 64 << 20, false, 0).await.unwrap();
        catalog.create("w", 64 << 20, false, 0).await.unwrap();
        let clock = Arc::new(ManualClock::new(Duration::from_secs(1_000_000)));
        let dir = tempfile::tempdir().unwrap();
        let params = VolumeParams {
            id: rec.id,
            size: rec.size,
            epoch: 1,
            local_dir: dir.path().to_path_buf(),
        };
        let vol = Volume::open(backend, params, EngineConfig::default(), clock.clone())
            .await
            .unwrap();
        let cfg = PoolConfig {
            capacity: Some(1 << 30),
            warn_percent: 80,
        };
        let mut ctx = Ctx::new(store, &cfg, &rec, &vol, clock.clone());
        ctx.refresh().await.unwrap();
        let first = metrics.total_requests();
        assert!(
            metrics.requests(Method::List) >= 2,
            "snapshots and pool read at start"
        );

        // Up to RARE_REFRESH - 2 periods, so the write below is still seen
        // before the snapshots are due again.
        let ticks = RARE_REFRESH.as_secs() / POOL_REFRESH.as_secs() - 2;
        for _ in 0..ticks {
            clock.advance(POOL_REFRESH);
            ctx.refresh().await.unwrap();
        }
        assert_eq!(
            metrics.total_requests(),
            first,
            "idle refreshes make no request"
        );

        vol.write(0, &[1u8; 4096], false).await.unwrap();
        let (puts, lists) = (
            metrics.requests(Method::Put),
            metrics.requests(Method::List),
        );
        clock.advance(POOL_REFRESH);
        ctx.refresh().await.unwrap();
        assert_eq!(metrics.requests(Method::Put), puts + 1, "usage published");
        // Adding up the pool lists the catalog (and, for the volume that
        // published nothing, its snapshots).
        let pool_lists = metrics.requests(Method::List) - lists;
        assert!(pool_lists >= 1, "pool re-read");

        let before = metrics.total_requests();
        clock.advance(POOL_REFRESH / 2);
        ctx.refresh().await.unwrap();
        assert_eq!(metrics.total_requests(), before, "unchanged again");
        clock.advance(RARE_REFRESH);
        ctx.refresh().await.unwrap();
        assert_eq!(
            metrics.requests(Method::List),
            lists + 2 * pool_lists + 1,
            "the rare refresh reads the snapshots and the pool"
        );
        vol.close().await.unwrap();
    }
}
