//! Scratch volumes for `shale nbd serve --scratch NAME:SIZE`: real volumes
//! (WAL, chunk objects, the configured store) that live only for one
//! server run, for tests and benchmarks that need the real data path
//! without the catalog.

use std::sync::Arc;

use anyhow::{bail, Context};
use shale::clock::SystemClock;
use shale::config::Config;
use shale::engine::volume::{Volume, VolumeParams};
use shale::store::DynStore;

/// Scratch ids count down from the top of the id space, far from the
/// catalog's counter.
const SCRATCH_ID_TOP: u64 = u64::MAX;

/// An open scratch volume and where its data lives.
pub struct Scratch {
    pub volume: Arc<Volume>,
    store: DynStore,
    prefix: String,
    local_dir: std::path::PathBuf,
    /// The read cache when `engine.cache_dir` puts it outside `local_dir`.
    cache_dir: Option<std::path::PathBuf>,
}

/// Open scratch volume number `index` of `size` bytes. Refuses if its
/// store prefix or local directory holds anything (a previous run that did
/// not shut down cleanly): that data is not ours to reuse or delete.
pub async fn open(cfg: &Config, index: u64, size: u64) -> anyhow::Result<Scratch> {
    let id = SCRATCH_ID_TOP - index;
    let store = shale::store::open(&cfg.store)
        .await
        .context("opening the store")?;
    let prefix = shale::engine::format::layout::volume_prefix(id);
    let existing = store.list(&prefix).await.context("listing the store")?;
    let local_dir = cfg.volume_dir(id);
    if !existing.is_empty() || local_dir.exists() {
        bail!(
            "scratch volume id {id:016x} already has data (store prefix {prefix} or {}); \
             remove it or use a fresh data_dir",
            local_dir.display()
        );
    }
    // Scratch ids and epochs repeat from run to run, so a read cache left
    // by an earlier run (outside the local directory) is dropped.
    let cache_dir = cfg.external_cache_dir(id);
    if let Some(d) = &cache_dir {
        remove_if_present(d)?;
    }
    let params = VolumeParams {
        id,
        size,
        epoch: 1,
        local_dir: local_dir.clone(),
    };
    let volume = Volume::open(
        store.clone(),
        params,
        cfg.engine.clone(),
        Arc::new(SystemClock),
    )
    .await?;
    Ok(Scratch {
        volume,
        store,
        prefix,
        local_dir,
        cache_dir,
    })
}

impl Scratch {
    /// Close the volume, then delete its objects and local files.
    pub async fn close_and_delete(self) -> anyhow::Result<()> {
        self.volume
            .close()
            .await
            .context("closing scratch volume")?;
        for obj in self.store.list(&self.prefix).await? {
            self.store.delete(&obj.key).await?;
        }
        std::fs::remove_dir_all(&self.local_dir)
            .with_context(|| format!("removing {}", self.local_dir.display()))?;
        if let Some(d) = &self.cache_dir {
            remove_if_present(d)?;
        }
        Ok(())
    }
}

/// Remove directory `d` and what it holds; a missing one is fine.
fn remove_if_present(d: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", d.display()))
        }
        _ => Ok(()),
    }
}
