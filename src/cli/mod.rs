//! Subcommand implementations (binary-only; `anyhow` is allowed here).
pub mod config;
pub mod discard;
pub mod docs;
pub mod exporter;
pub mod image;
pub mod logging;
pub mod nbd;
pub mod pool;
pub mod progress;
pub mod snapshot;
pub mod status;
pub mod transfer;
pub mod ublk;
pub mod volume;

use anyhow::Context;
use shale::catalog::snapshot::Snapshots;
use shale::clock::SystemClock;
use shale::config::Config;
use shale::store::DynStore;

/// The async runtime of one command. Commands that open a volume need
/// worker threads (destage, lease renewal); catalog-only ones do not.
pub fn runtime(opens_volume: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    if opens_volume {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .context("cannot start the async runtime")
}

/// The configured object store.
pub async fn open_store(cfg: &Config) -> anyhow::Result<DynStore> {
    shale::store::open(&cfg.store)
        .await
        .context("cannot open the object store")
}

/// Snapshot and clone operations on the configured store; leases they take
/// name this process as `<command>:<pid>`.
pub async fn open_snapshots(cfg: &Config, command: &str) -> anyhow::Result<Snapshots> {
    Ok(Snapshots::new(
        open_store(cfg).await?,
        cfg.engine.clone(),
        cfg.data_dir.clone(),
        std::sync::Arc::new(SystemClock),
        &format!("{command}:{}", std::process::id()),
    ))
}
