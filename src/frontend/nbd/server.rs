//! Accepting connections on TCP and unix sockets, admission, TLS, and
//! orderly shutdown.
//!
//! Per connection: cap check ([`Limits::max_connections`]) → listener gate
//! ([`AccessPolicy::admits`], from `SO_PEERCRED` or the TCP address) →
//! negotiation (with STARTTLS on TCP when TLS is configured), all within
//! [`Limits::handshake_timeout`] → transmission.
//!
//! Shutdown order (invariant): stop accepting → every connection stops
//! reading new requests and finishes the ones in flight, for at most
//! [`Limits::shutdown_timeout`], after which the remaining connections are
//! dropped → every export's device is flushed → [`NbdServer::serve`]
//! returns. Closing the devices is the caller's job (it opened them).
//! Dropping a connection is safe for the data: the engine's futures are
//! cancel-safe (they wait on channels), and a request that was not answered
//! was not acknowledged.

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::sockopt;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::access::{AccessPolicy, Peer};
use super::cert_name::common_name;
use super::codec::Features;
use super::export::ExportMap;
use super::handshake::{greet, options, Gate, Negotiated, TlsState};
use super::tls::TlsAcceptor;
use super::transmission::{transmit, Limits, Link};
use super::turnaround::{SpinRead, Turnaround};
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

    /// Bind a unix socket with mode 0600. A stale socket file at `path` is
    /// replaced; any other existing file is an error.
    pub fn bind_unix(path: &Path) -> std::io::Result<Listener> {
        Listener::bind_unix_with(path, 0o600, None)
    }

    /// Bind a unix socket, then give it exactly `mode` (for example 0660)
    /// and, if given, the group `gid`. Connecting needs write permission on
    /// the socket file, so these decide who can reach it at all; the peer
    /// credentials are checked again on every connection.
    pub fn bind_unix_with(path: &Path, mode: u32, gid: Option<u32>) -> std::io::Result<Listener> {
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
        let listener = UnixListener::bind(path)?;
        let restrict = || -> std::io::Result<()> {
            if let Some(gid) = gid {
                std::os::unix::fs::chown(path, None, Some(gid))?;
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        };
        if let Err(e) = restrict() {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Listener::Unix(listener, path.to_path_buf()))
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
#[derive(Clone)]
pub struct NbdServer {
    exports: Arc<ExportMap>,
    limits: Limits,
    policy: Arc<AccessPolicy>,
    tls: Option<TlsAcceptor>,
    /// The uid the server runs as (always admitted on unix sockets).
    uid: u32,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.exports)
            .field("limits", &self.limits)
            .field("policy", &self.policy)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// What every connection of one server shares.
struct Shared {
    server: NbdServer,
    /// Server-wide budget of buffered request bytes.
    budget: Arc<Semaphore>,
    /// One permit per connection being served.
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    connections: Mutex<JoinSet<()>>,
}

/// A freshly accepted stream.
enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A stream after negotiation: plain TCP, unix, or TCP with TLS.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl NbdServer {
    pub fn new(exports: ExportMap) -> NbdServer {
        NbdServer {
            exports: Arc::new(exports),
            limits: Limits::default(),
            policy: Arc::new(AccessPolicy::default()),
            tls: None,
            uid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Override the limits.
    pub fn with_limits(mut self, limits: Limits) -> NbdServer {
        self.limits = limits;
        self
    }

    /// Who may connect and open which exports.
    pub fn with_policy(mut self, policy: AccessPolicy) -> NbdServer {
        self.policy = Arc::new(policy);
        self
    }

    /// Require TLS (STARTTLS with a client certificate) on TCP listeners.
    pub fn with_tls(mut self, tls: TlsAcceptor) -> NbdServer {
        self.tls = Some(tls);
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
        let shared = Arc::new(Shared {
            server: self.clone(),
            budget: self.limits.global_budget(),
            slots: Arc::new(Semaphore::new(self.limits.max_connections.max(1))),
            stop: stop_rx,
            connections: Mutex::new(JoinSet::new()),
        });
        let mut socket_files = Vec::new();
        let accepting = futures::future::join_all(listeners.into_iter().map(|l| {
            if let Listener::Unix(_, p) = &l {
                socket_files.push(p.clone());
            }
            accept_loop(shared.clone(), l)
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
        let mut connections = std::mem::take(&mut *lock(&shared.connections));
        let drained = tokio::time::timeout(self.limits.shutdown_timeout, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            log::warn!(
                "{} connection(s) still busy {} ms after the shutdown request: dropping them",
                connections.len(),
                self.limits.shutdown_timeout.as_millis()
            );
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(shared: Arc<Shared>, listener: Listener) {
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| {
                // Replies are small and latency-bound; dead peers are
                // found by keepalive so their connections do not linger.
                let _ = s.set_nodelay(true);
                let _ = nix::sys::socket::setsockopt(&s, sockopt::KeepAlive, &true);
                (Accepted::Tcp(s), peer.to_string())
            }),
            Listener::Unix(l, _) => l
                .accept()
                .await
                .map(|(s, _)| (Accepted::Unix(s), "unix".into())),
        };
        match accepted {
            Ok((conn, peer)) => spawn_connection(&shared, conn, peer),
            Err(e) => {
                // Typically EMFILE; back off instead of spinning.
                log::warn!("accept on {}: {e}", listener.describe());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, conn: Accepted, peer: String) {
    let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
        log::warn!(
            "connection from {peer} refused: {} connections are being served (nbd.max_connections)",
            shared.server.limits.max_connections
        );
        return; // dropping `conn` closes it
    };
    let task_shared = shared.clone();
    let mut connections = lock(&shared.connections);
    while connections.try_join_next().is_some() {}
    connections.spawn(async move {
        let _slot = slot;
        log::info!("connection from {peer}");
        match serve_connection(&task_shared, conn).await {
            Ok(()) => log::info!("connection from {peer} closed"),
            Err(ConnError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                log::info!("connection from {peer} closed by the client")
            }
            Err(e) => log::warn!("connection from {peer} closed: {e}"),
        }
    });
}

/// Who is on the other end of a unix socket, from `SO_PEERCRED` and the
/// group database (primary and supplementary groups of the peer's user).
async fn unix_peer(stream: &UnixStream) -> std::io::Result<Peer> {
    let cred = stream.peer_cred()?;
    let (uid, gid) = (cred.uid(), cred.gid());
    // Name-service lookups may block (LDAP, NIS): keep them off the runtime.
    let groups = tokio::task::spawn_blocking(move || {
        let mut groups = std::collections::BTreeSet::from([gid]);
        if let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            if let Ok(name) = std::ffi::CString::new(user.name) {
                if let Ok(list) = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
                {
                    groups.extend(list.into_iter().map(|g| g.as_raw()));
                }
            }
        }
        groups
    })
    .await
    .map_err(std::io::Error::other)?;
    Ok(Peer::Unix { uid, groups })
}

/// Admit, negotiate (within the handshake timeout) and serve one connection.
async fn serve_connection(shared: &Shared, conn: Accepted) -> Result<(), ConnError> {
    let server = &shared.server;
    let mut stop = shared.stop.clone();
    let peer = match &conn {
        Accepted::Unix(s) => unix_peer(s).await?,
        Accepted::Tcp(s) => Peer::Tcp {
            addr: s.peer_addr()?.ip(),
            cert_name: None,
        },
    };
    if !server.policy.admits(&peer, server.uid) {
        log::warn!("refusing connection from {peer}: not allowed by the nbd access settings");
        return Ok(());
    }
    let limit = server.limits.handshake_timeout;
    let negotiated = tokio::select! {
        r = tokio::time::timeout(limit, negotiate(server, conn, peer)) => match r {
            Ok(r) => r?,
            Err(_) => {
                return Err(ConnError::Protocol(format!(
                    "negotiation took longer than {} ms (nbd.handshake_timeout_ms)",
                    limit.as_millis()
                )))
            }
        },
        _ = wait_true(&mut stop) => return Ok(()),
    };
    let Some((conn, export, features)) = negotiated else {
        return Ok(());
    };
    log::info!(
        "serving export {} (structured replies: {}, base:allocation: {})",
        export.name,
        features.structured,
        features.allocation
    );
    let (limits, budget) = (server.limits, shared.budget.clone());
    match conn {
        Conn::Tcp(s) => {
            let fd = s.as_raw_fd();
            let (r, w) = s.into_split();
            transmit(link(r, Some(fd), w), export, features, stop, limits, budget).await
        }
        Conn::Unix(s) => {
            let fd = s.as_raw_fd();
            let (r, w) = s.into_split();
            transmit(link(r, Some(fd), w), export, features, stop, limits, budget).await
        }
        Conn::Tls(s) => {
            let (r, w) = tokio::io::split(*s);
            transmit(link(r, None, w), export, features, stop, limits, budget).await
        }
    }
}

/// A negotiated connection: its stream, export and features.
type Chosen = (Conn, super::Export, Features);

/// The negotiation phase, with the STARTTLS upgrade on TCP when the
/// server has TLS. Returns the (possibly upgraded) stream, the export and
/// the negotiated features, or `None` when the client left.
async fn negotiate(
    server: &NbdServer,
    conn: Accepted,
    mut peer: Peer,
) -> Result<Option<Chosen>, ConnError> {
    let exports = &server.exports;
    let policy = &server.policy;
    match conn {
        Accepted::Unix(mut s) => {
            let no_zeroes = greet(&mut s).await?;
            let gate = Gate {
                exports,
                policy,
                peer: &peer,
            };
            let n = options_plain(&mut s, gate, no_zeroes).await?;
            Ok(chosen(Conn::Unix, s, n))
        }
        Accepted::Tcp(mut s) => {
            let no_zeroes = greet(&mut s).await?;
            let Some(acceptor) = &server.tls else {
                let gate = Gate {
                    exports,
                    policy,
                    peer: &peer,
                };
                let n = options_plain(&mut s, gate, no_zeroes).await?;
                return Ok(chosen(Conn::Tcp, s, n));
            };
            let gate = Gate {
                exports,
                policy,
                peer: &peer,
            };
            match options(&mut s, gate, no_zeroes, TlsState::Required).await? {
                Negotiated::StartTls => {}
                Negotiated::Ended => return Ok(None),
                Negotiated::Transmit(e, _) => {
                    // `options` refuses exports until TLS is up; never
                    // serve one in plaintext should that ever change.
                    return Err(ConnError::Protocol(format!(
                        "internal: export {} chosen before TLS",
                        e.name
                    )));
                }
            }
            let mut tls = acceptor.accept(s).await.map_err(|e| {
                ConnError::Protocol(format!("TLS handshake with {peer} failed: {e}"))
            })?;
            let cert_name = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| common_name(c));
            if let Peer::Tcp { cert_name: cn, .. } = &mut peer {
                *cn = cert_name;
            }
            log::info!("TLS established with {peer}");
            let gate = Gate {
                exports,
                policy,
                peer: &peer,
            };
            match options(&mut tls, gate, no_zeroes, TlsState::Active).await? {
                Negotiated::Transmit(e, f) => Ok(Some((Conn::Tls(Box::new(tls)), e, f))),
                Negotiated::Ended | Negotiated::StartTls => Ok(None),
            }
        }
    }
}

fn buffered<R: AsyncRead>(r: R) -> BufReader<R> {
    BufReader::with_capacity(64 << 10, r)
}

/// A connection's halves for [`transmit`]: the reader buffered, and
/// spinning on its socket `fd` (if any; it must be the one `r` reads)
/// once every request is answered ([`super::turnaround`]).
fn link<R: AsyncRead + Unpin, W>(r: R, fd: Option<RawFd>, w: W) -> Link<BufReader<SpinRead<R>>, W> {
    let turnaround = Arc::new(Turnaround::default());
    Link {
        reader: buffered(SpinRead::new(r, fd, Arc::clone(&turnaround))),
        writer: w,
        turnaround,
    }
}

async fn options_plain<S>(
    stream: &mut S,
    gate: Gate<'_>,
    no_zeroes: bool,
) -> Result<Negotiated, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    options(stream, gate, no_zeroes, TlsState::Off).await
}

fn chosen<S>(wrap: impl FnOnce(S) -> Conn, stream: S, n: Negotiated) -> Option<Chosen> {
    match n {
        Negotiated::Transmit(e, f) => Some((wrap(stream), e, f)),
        Negotiated::Ended | Negotiated::StartTls => None,
    }
}
