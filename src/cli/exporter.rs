//! `shale exporter`: serve every attached volume's metrics of this host at
//! `GET /metrics` (see [`shale::metrics::exporter`]).
use std::path::Path;

use anyhow::Context;
use clap::Args;
use sd_notify::NotifyState;
use shale::config::Config;

#[derive(Args, Debug)]
pub struct ExporterArgs {
    /// Address to listen on (`IP:port`; port 0 picks a free one). Default:
    /// `metrics.listen` from the config (127.0.0.1:9810).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
}

pub fn run(config: Option<&Path>, a: ExporterArgs) -> anyhow::Result<()> {
    let cfg = Config::load(config).context("loading configuration")?;
    let addr = a.listen.unwrap_or_else(|| cfg.metrics.listen.to_string());
    let rt = super::runtime(false)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        println!("listening on http://{local}/metrics");
        if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
            log::warn!("sd_notify failed: {e}");
        }
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! {
                        _ = t.recv() => {}
                        _ = i.recv() => {}
                    }
                }
                _ => std::future::pending().await,
            }
        };
        shale::metrics::exporter::serve(listener, cfg.data_dir.clone(), shutdown)
            .await
            .context("serving metrics")
    })
}
