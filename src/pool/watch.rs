//! The pool task of an attached volume: it publishes the volume's usage,
//! gives the engine its space limit from the pool, and logs the warning.
//!
//! Every [`POOL_REFRESH`] (and once before the volume serves):
//! 1. if the volume's snapshot objects changed (a snapshot taken or deleted
//!    while attached), the engine re-reads them for its accounting;
//! 2. the volume's usage is published when it changed;
//! 3. with a capacity configured: the pool is added up, the engine's limit
//!    set to what the other volumes leave, and a warning logged when the
//!    pool crosses `warn_percent` (and when this volume has no room left).
//!
//! Staleness: the limit reflects other volumes' usage as they published it,
//! so it may be up to two refresh periods old; volumes attached at once can
//! together overshoot the capacity by what they write in that time. The
//! volume's own usage is always exact.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{status, PoolError};
use crate::catalog::{Catalog, VolumeRecord};
use crate::clock::DynClock;
use crate::config::PoolConfig;
use crate::engine::snapshot::snapshot_prefix;
use crate::engine::usage::{publish, VolumeUsage};
use crate::engine::Volume;
use crate::size::format_size;
use crate::store::DynStore;

/// How often an attached volume publishes its usage and refreshes its limit.
pub const POOL_REFRESH: Duration = Duration::from_secs(10);

struct Ctx {
    store: DynStore,
    cfg: PoolConfig,
    id: u64,
    name: String,
    clock: DynClock,
    volume: Weak<Volume>,
    published: Option<(u64, u64, u64)>,
    snapshot_keys: Option<Vec<String>>,
    warned: bool,
    full: bool,
}

impl Ctx {
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

    async fn publish(&mut self, vol: &Volume) {
        // A fenced volume is no longer ours to speak for.
        if vol.fenced().is_some() {
            return;
        }
        let s = vol.space_usage();
        let key = (s.used, s.live, s.snapshot_only);
        if self.published == Some(key) {
            return;
        }
        let u = VolumeUsage::from_space(self.id, &s, self.now_ms());
        match publish(&self.store, &u).await {
            Ok(()) => self.published = Some(key),
            Err(e) => log::warn!("volume {:?}: cannot publish its usage: {e}", self.name),
        }
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
        self.reload_snapshots_if_changed(&vol).await;
        self.publish(&vol).await;
        self.enforce(&vol).await
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
        let mut ctx = Ctx {
            store,
            cfg: cfg.clone(),
            id: record.id,
            name: record.name.clone(),
            clock,
            volume: Arc::downgrade(volume),
            published: None,
            snapshot_keys: None,
            warned: false,
            full: false,
        };
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
