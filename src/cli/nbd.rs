//! `shale nbd ...`: serve volumes over NBD.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use shale::catalog::{Catalog, VolumeState};
use shale::config::Config;
use shale::daemon::{self, Attached};
use shale::engine::memdisk::MemDisk;
use shale::engine::BlockDevice;
use shale::frontend::nbd::{ExportMap, NbdServer};
use shale::size::parse_size;

mod listen;
mod scratch;

#[derive(Subcommand, Debug)]
pub enum NbdCmd {
    /// Serve volumes over NBD until SIGTERM or SIGINT.
    ///
    /// Prints one line `listening on tcp:ADDR` or `listening on unix:PATH`
    /// per socket once it accepts connections. On SIGTERM/SIGINT it stops
    /// accepting, finishes requests in flight, flushes every export and
    /// exits 0.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TCP address to listen on (IP:PORT, or IP for port 10809). With
    /// --listen or --socket, the server listens exactly where these flags
    /// say; without them, on `nbd.socket` (default /run/shale/nbd.sock) and
    /// `nbd.listen` (default: no TCP) from the config.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Unix socket to listen on (a stale socket file is replaced), with
    /// `nbd.socket_mode` and `nbd.socket_group` from the config.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Volumes to export, one export per name. Default: every volume in
    /// the catalog.
    #[arg(value_name = "VOLUME")]
    volumes: Vec<String>,
    /// Test-only export backed by RAM, as NAME:SIZE (e.g. scratch:64M).
    /// Contents are lost on exit. Repeatable; with it, no catalog volume is
    /// opened unless named.
    #[arg(long = "memory", value_name = "NAME:SIZE", hide = true)]
    memory: Vec<String>,
    /// Test/benchmark export backed by a real volume (WAL + chunks) on the
    /// configured store and data_dir, as NAME:SIZE. It uses a reserved id,
    /// must not exist yet, and is deleted (store objects and local files)
    /// after a clean shutdown. Repeatable.
    #[arg(long = "scratch", value_name = "NAME:SIZE", hide = true)]
    scratch: Vec<String>,
    /// Benchmark only: serve catalog volumes without counting their block
    /// requests (the metrics then show no frontend requests).
    #[arg(long, hide = true)]
    no_request_metrics: bool,
}

pub fn run(config: Option<&Path>, cmd: NbdCmd) -> anyhow::Result<()> {
    match cmd {
        NbdCmd::Serve(args) => serve(config, args),
    }
}

fn serve(config: Option<&Path>, args: ServeArgs) -> anyhow::Result<()> {
    let cfg = Config::load(config).context("loading configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut opened = Opened::default();
        let result = match open_exports(&cfg, &args, &mut opened).await {
            Ok(devices) => serve_devices(&cfg, &args, devices).await,
            Err(e) => Err(e),
        };
        // Close whatever was opened, also when opening or serving failed.
        let closed = opened.close_all().await;
        result.and(closed)
    })
}

/// Volumes this process opened and must close on the way out.
#[derive(Default)]
struct Opened {
    attached: Vec<Attached>,
    scratch: Vec<scratch::Scratch>,
}

impl Opened {
    /// Close everything; report the first failure after trying all.
    async fn close_all(self) -> anyhow::Result<()> {
        let mut first = Ok(());
        for vol in self.attached {
            let name = vol.record.name.clone();
            if let Err(e) = vol.close().await {
                let e = anyhow::Error::new(e).context(format!("closing volume {name}"));
                log::error!("{e:#}");
                first = first.and(Err(e));
            }
        }
        for vol in self.scratch {
            if let Err(e) = vol.close_and_delete().await {
                log::error!("{e:#}");
                first = first.and(Err(e));
            }
        }
        first
    }
}

/// Build the export list from the arguments, recording what was opened.
async fn open_exports(
    cfg: &Config,
    args: &ServeArgs,
    opened: &mut Opened,
) -> anyhow::Result<Vec<(String, Arc<dyn BlockDevice>)>> {
    let mut devices: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
    for spec in &args.memory {
        let (name, size) = parse_size_spec("--memory", spec, 64 << 30)?;
        devices.push((name, Arc::new(MemDisk::new(size))));
    }
    let names = if !args.volumes.is_empty() {
        args.volumes.clone()
    } else if args.memory.is_empty() && args.scratch.is_empty() {
        catalog_volume_names(cfg).await?
    } else {
        Vec::new()
    };
    if let [only] = names.as_slice() {
        if args.memory.is_empty() && args.scratch.is_empty() {
            super::logging::set_volume(only);
        }
    }
    for name in names {
        let vol = daemon::attach(cfg, &name)
            .await
            .with_context(|| format!("opening volume {name}"))?;
        vol.volume.start_warm_start(&cfg.warm_start);
        let device = if args.no_request_metrics {
            vol.volume.clone()
        } else {
            vol.metered("nbd", &format!("export {name}"))
        };
        devices.push((name, device));
        opened.attached.push(vol);
    }
    for (i, spec) in args.scratch.iter().enumerate() {
        let (name, size) = parse_size_spec("--scratch", spec, u64::MAX)?;
        let vol = scratch::open(cfg, i as u64, size)
            .await
            .with_context(|| format!("opening scratch volume {name}"))?;
        devices.push((name, vol.volume.clone()));
        opened.scratch.push(vol);
    }
    Ok(devices)
}

/// Every usable volume in the catalog, for `shale nbd serve` without names.
async fn catalog_volume_names(cfg: &Config) -> anyhow::Result<Vec<String>> {
    let store = daemon::open_store(cfg).await?;
    let names: Vec<String> = Catalog::new(store)
        .list()
        .await
        .context("listing the catalog")?
        .into_iter()
        .filter(|r| r.state == VolumeState::Ready)
        .map(|r| r.name)
        .collect();
    if names.is_empty() {
        bail!("the catalog has no volumes to serve; create one with `shale volume create NAME --size SIZE`");
    }
    Ok(names)
}

/// Bind the listeners, print where they are, serve until a signal.
async fn serve_devices(
    cfg: &Config,
    args: &ServeArgs,
    devices: Vec<(String, Arc<dyn BlockDevice>)>,
) -> anyhow::Result<()> {
    let exports = ExportMap::new(devices).context("building the export list")?;
    let server = listen::configure(NbdServer::new(exports), &cfg.nbd)?;
    let listeners = listen::bind(&cfg.nbd, args.listen.as_deref(), args.socket.as_deref()).await?;
    // Before the "listening" lines: whoever waits for them may send SIGTERM
    // at once, and it must start the orderly shutdown, not kill the process.
    let shutdown = shutdown_signal()?;
    let mut out = std::io::stdout().lock();
    for l in &listeners {
        writeln!(out, "listening on {}", l.describe())?;
    }
    out.flush()?;
    drop(out);

    server.serve(listeners, shutdown).await?;
    log::info!("nbd server stopped");
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT. A second one while shutting
/// down (e.g. a flush stuck on an unreachable store) exits at once with
/// status 1; data acknowledged by FLUSH is safe either way.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: shutting down"),
            _ = int.recv() => log::info!("SIGINT: shutting down"),
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("shale: second signal during shutdown; exiting without finishing it");
            std::process::exit(1);
        });
    })
}

/// Parse `NAME:SIZE` where SIZE is as in the config (`64M`, `1GiB`, bytes) and must be a non-zero multiple of 512, at most `max`.
fn parse_size_spec(flag: &str, spec: &str, max: u64) -> anyhow::Result<(String, u64)> {
    let Some((name, size)) = spec.rsplit_once(':') else {
        bail!("{flag} {spec:?}: expected NAME:SIZE");
    };
    let size = parse_size(size).with_context(|| format!("{flag} {spec:?}"))?;
    if size == 0 || !size.is_multiple_of(512) {
        bail!("{flag} {spec:?}: size must be a non-zero multiple of 512");
    }
    if size > max {
        bail!("{flag} {spec:?}: at most {max} bytes");
    }
    Ok((name.to_string(), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_specs() {
        let parse_memory_spec = |s| parse_size_spec("--memory", s, 64 << 30);
        assert_eq!(
            parse_memory_spec("a:64M").unwrap(),
            ("a".to_string(), 64 << 20)
        );
        assert_eq!(
            parse_memory_spec("x:y:4096").unwrap(),
            ("x:y".to_string(), 4096)
        );
        assert!(parse_memory_spec("a").is_err());
        assert!(parse_memory_spec("a:100").is_err());
        assert!(parse_memory_spec("a:0").is_err());
        assert!(parse_memory_spec("a:1Q").is_err());
        assert!(parse_memory_spec("a:99999999999T").is_err());
        assert!(parse_memory_spec("a:1T").is_err());
    }
}
