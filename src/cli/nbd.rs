//! `shale nbd ...`: serve volumes over NBD.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use shale::engine::memdisk::MemDisk;
use shale::engine::BlockDevice;
use shale::frontend::nbd::{ExportMap, Listener, NbdServer};

/// Default TCP address (the IANA NBD port on loopback).
const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

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
    /// TCP address to listen on. Default 127.0.0.1:10809, unless only
    /// --socket is given.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Unix socket to listen on (a stale socket file is replaced).
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
}

pub fn run(config: Option<&Path>, cmd: NbdCmd) -> anyhow::Result<()> {
    match cmd {
        NbdCmd::Serve(args) => serve(config, args),
    }
}

fn serve(_config: Option<&Path>, args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut devices: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
        for spec in &args.memory {
            let (name, size) = parse_memory_spec(spec)?;
            devices.push((name, Arc::new(MemDisk::new(size))));
        }
        if !args.volumes.is_empty() || args.memory.is_empty() {
            bail!(
                "serving catalog volumes needs the volume engine and catalog, \
                 which this build does not have yet"
            );
        }
        let exports = ExportMap::new(devices).context("building the export list")?;

        let mut listeners = Vec::new();
        if args.listen.is_some() || args.socket.is_none() {
            let addr = args.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
            listeners.push(
                Listener::bind_tcp(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?,
            );
        }
        if let Some(path) = &args.socket {
            listeners.push(
                Listener::bind_unix(path)
                    .with_context(|| format!("listening on {}", path.display()))?,
            );
        }
        let mut out = std::io::stdout().lock();
        for l in &listeners {
            writeln!(out, "listening on {}", l.describe())?;
        }
        out.flush()?;
        drop(out);

        let server = NbdServer::new(exports);
        let shutdown = shutdown_signal()?;
        server.serve(listeners, shutdown).await?;
        log::info!("nbd server stopped");
        Ok(())
    })
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: shutting down"),
            _ = int.recv() => log::info!("SIGINT: shutting down"),
        }
    })
}

/// Parse `NAME:SIZE` where SIZE is bytes with an optional K/M/G/T suffix
/// (binary units) and must be a non-zero multiple of 512.
fn parse_memory_spec(spec: &str) -> anyhow::Result<(String, u64)> {
    let Some((name, size)) = spec.rsplit_once(':') else {
        bail!("--memory {spec:?}: expected NAME:SIZE");
    };
    let size = parse_size(size).with_context(|| format!("--memory {spec:?}"))?;
    if size == 0 || !size.is_multiple_of(512) {
        bail!("--memory {spec:?}: size must be a non-zero multiple of 512");
    }
    if size > 64 << 30 {
        bail!("--memory {spec:?}: a RAM export is limited to 64 GiB");
    }
    Ok((name.to_string(), size))
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => bail!("unknown size suffix {c:?} (use K, M, G or T)"),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("invalid size {s:?}"))?;
    n.checked_mul(1u64 << shift)
        .with_context(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_specs() {
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
