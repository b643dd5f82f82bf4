//! Accepting connections on TCP and unix sockets, and orderly shutdown.
//!
//! Shutdown order (invariant): stop accepting → every connection stops
//! reading new requests and finishes the ones in flight → every export's
//! device is flushed → [`NbdServer::serve`] returns. Closing the devices is
//! the caller's job (it opened them).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::sockopt;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Notify};

use super::export::ExportMap;
use super::handshake::{negotiate, Negotiated};
use super::transmission::{transmit, Limits};
use super::{wait_true, ConnError};
use crate::error::BlockError;

/// A bound socket the server accepts connections on.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The path is removed when the server stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Bind a TCP address such as `127.0.0.1:10809` (port 0 picks a free one).
    pub async fn bind_tcp(addr: &str) -> std::io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// Bind a unix socket. A stale socket file at `path` is replaced; any
    /// other existing file is an error.
    pub fn bind_unix(path: &Path) -> std::io::Result<Listener> {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(_) => {}
        }
        Ok(Listener::Unix(
            UnixListener::bind(path)?,
            path.to_path_buf(),
        ))
    }

    /// Where clients connect, as `tcp:ADDR` or `unix:PATH`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Failures of a whole server run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("flushing export {name} at shutdown: {source}")]
    Flush { name: String, source: BlockError },
}

/// An NBD server over a fixed set of exports.
#[derive(Debug, Clone)]
pub struct NbdServer {
    exports: Arc<ExportMap>,
    limits: Limits,
}

impl NbdServer {
    pub fn new(exports: ExportMap) -> NbdServer {
        NbdServer {
            exports: Arc::new(exports),
            limits: Limits::default(),
        }
    }

    /// Override the per-connection in-flight limits.
    pub fn with_limits(mut self, limits: Limits) -> NbdServer {
        self.limits = limits;
        self
    }

    pub fn exports(&self) -> &ExportMap {
        &self.exports
    }

    /// Accept and serve connections until `shutdown` resolves, then shut
    /// down in the documented order.
    pub async fn serve(
        &self,
        listeners: Vec<Listener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let tracker = Tracker::default();
        let mut socket_files = Vec::new();
        let accepting = futures::future::join_all(listeners.into_iter().map(|l| {
            if let Listener::Unix(_, p) = &l {
                socket_files.push(p.clone());
            }
            self.accept_loop(l, stop_rx.clone(), tracker.clone())
        }));
        tokio::select! {
            _ = shutdown => {}
            _ = accepting => {}
        }
        // The accept loops (and their sockets) were dropped with `accepting`.
        for p in socket_files {
            let _ = std::fs::remove_file(p);
        }
        let _ = stop_tx.send(true);
        tracker.wait_idle().await;
        for export in self.exports.iter() {
            export
                .device
                .flush()
                .await
                .map_err(|source| ServerError::Flush {
                    name: export.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    async fn accept_loop(&self, listener: Listener, stop: watch::Receiver<bool>, tracker: Tracker) {
        loop {
            let accepted = match &listener {
                Listener::Tcp(l) => l.accept().await.map(|(s, peer)| {
                    // Replies are small and latency-bound; dead peers are
                    // found by keepalive so their connections do not linger.
                    let _ = s.set_nodelay(true);
                    let _ = nix::sys::socket::setsockopt(&s, sockopt::KeepAlive, &true);
                    let (r, w) = s.into_split();
                    self.spawn_connection(r, w, peer.to_string(), &stop, &tracker)
                }),
                Listener::Unix(l, _) => l.accept().await.map(|(s, _)| {
                    let (r, w) = s.into_split();
                    self.spawn_connection(r, w, "unix".into(), &stop, &tracker)
                }),
            };
            if let Err(e) = accepted {
                // Typically EMFILE; back off instead of spinning.
                log::warn!("accept on {}: {e}", listener.describe());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn spawn_connection<R, W>(
        &self,
        reader: R,
        writer: W,
        peer: String,
        stop: &watch::Receiver<bool>,
        tracker: &Tracker,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let exports = self.exports.clone();
        let stop = stop.clone();
        let limits = self.limits;
        let guard = tracker.enter();
        tokio::spawn(async move {
            let _guard = guard;
            log::info!("connection from {peer}");
            match serve_connection(reader, writer, &exports, stop, limits).await {
                Ok(()) => log::info!("connection from {peer} closed"),
                Err(ConnError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    log::info!("connection from {peer} closed by the client")
                }
                Err(e) => log::warn!("connection from {peer} closed: {e}"),
            }
        });
    }
}

/// Serve one connection from negotiation to the end of transmission. The
/// negotiation is abandoned if `stop` becomes true.
pub async fn serve_connection<R, W>(
    reader: R,
    mut writer: W,
    exports: &ExportMap,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let negotiated = tokio::select! {
        n = negotiate(&mut reader, &mut writer, exports) => n?,
        _ = wait_true(&mut stop) => return Ok(()),
    };
    match negotiated {
        Negotiated::Ended => Ok(()),
        Negotiated::Transmit(export) => {
            log::info!("serving export {}", export.name);
            transmit(reader, writer, export, stop, limits).await
        }
    }
}

/// Counts live connections so shutdown can wait for them.
#[derive(Clone, Default)]
struct Tracker {
    inner: Arc<(AtomicUsize, Notify)>,
}

struct TrackerGuard(Tracker);

impl Tracker {
    fn enter(&self) -> TrackerGuard {
        self.inner.0.fetch_add(1, Ordering::SeqCst);
        TrackerGuard(self.clone())
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.inner.1.notified();
            if self.inner.0.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        if self.0.inner.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.inner.1.notify_waiters();
        }
    }
}
