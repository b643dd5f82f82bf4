//! The control channel of an attached volume: a Unix socket the process
//! that holds the volume serves, so commands of other processes on the same
//! host (`shale snapshot create` while `shale nbd serve` or a ublk server
//! runs) can act on the open volume.
//!
//! Protocol: the client connects to `<volume dir>/control.sock`, writes one
//! JSON [`Request`] on one line, and reads one JSON [`Reply`] on one line;
//! then both sides close.
//!
//! Invariants:
//! 1. The socket is created only by the lease holder (by `daemon::attach`,
//!    after the lease was taken), so a socket file found before binding is
//!    stale (its process is gone or lost the lease) and is replaced.
//! 2. The socket file is mode 0600, and a peer whose uid is neither ours
//!    nor root's is refused.
//! 3. Every request names the volume id; a mismatch is refused, so a
//!    client never acts on a different volume than the one it resolved.
//! 4. Bad input (not JSON, unknown fields, too long, bad names) gets an
//!    error reply; nothing a peer sends can stop the server.
//! 5. Dropping the [`ControlServer`] stops it (requests in progress are
//!    dropped, which withdraws them) and removes the socket file if it is
//!    still the one it created.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;

use crate::catalog::validate_name;
use crate::engine::snapshot::SnapshotObject;
use crate::engine::Volume;
use crate::metrics::report::VolumeReport;
use crate::metrics::volume::VolumeMetrics;

/// File name of the socket inside the volume's local directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Longest request line accepted, in bytes.
const MAX_LINE: u64 = 64 << 10;
/// Longest reply line accepted, in bytes (a metrics reply is some tens of KiB).
const MAX_REPLY: u64 = 4 << 20;
/// Most bytes read and dropped after a reply (see `Server::serve`).
const MAX_DRAIN: u64 = 1 << 20;

/// Where the control socket of the volume with local directory `volume_dir` is.
pub fn socket_path(volume_dir: &Path) -> PathBuf {
    volume_dir.join(SOCKET_NAME)
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Take snapshot `name` of the open volume at a flush point.
    SnapshotCreate {
        volume: u64,
        name: String,
        created_ms: u64,
    },
    /// Begin deleting snapshot `name`: mark its object (it keeps its chunks
    /// until the client, having checked for clones, removes the object or
    /// clears the mark; see `Volume::begin_snapshot_delete`).
    SnapshotDelete { volume: u64, name: String },
    /// Delete the chunks no map and no snapshot names any more.
    CollectGarbage { volume: u64 },
    /// The volume's metrics and state ([`VolumeReport`]); changes nothing.
    Metrics { volume: u64 },
}

/// A snapshot as the reply describes it. Replies accept unknown fields, so
/// a newer server can add some without breaking older clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub id: u64,
    pub name: String,
    pub created_ms: u64,
    pub chunks: u64,
    /// How long new writes were held back, in microseconds.
    pub pause_us: u64,
}

/// One reply: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotSummary>,
    /// Chunks `collect_garbage` freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freed_chunks: Option<u64>,
    /// Id of the snapshot `snapshot_delete` marked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_id: Option<u64>,
    /// The answer to `metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<VolumeReport>,
}

impl Reply {
    fn error(msg: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(msg.into()),
            snapshot: None,
            freed_chunks: None,
            deleted_id: None,
            report: None,
        }
    }
}

/// Control channel failures.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {}: bad reply: {reason}", .path.display())]
    Protocol { path: PathBuf, reason: String },
}

/// A running control server for one open volume.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// Inode of the socket file we created (to remove only our own).
    ino: u64,
    task: tokio::task::JoinHandle<()>,
}

impl ControlServer {
    /// Bind `path` (replacing a stale socket file) and serve `volume`, whose
    /// id is `volume_id`, on the current tokio runtime.
    pub fn start(
        path: PathBuf,
        volume: &Arc<Volume>,
        volume_id: u64,
    ) -> Result<ControlServer, ControlError> {
        Self::start_with_metrics(path, volume, volume_id, None)
    }

    /// [`ControlServer::start`], answering `metrics` from `metrics` (without
    /// them, `metrics` requests get an error reply).
    pub fn start_with_metrics(
        path: PathBuf,
        volume: &Arc<Volume>,
        volume_id: u64,
        metrics: Option<Arc<VolumeMetrics>>,
    ) -> Result<ControlServer, ControlError> {
        let io = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => log::info!("removed stale control socket {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = UnixListener::bind(&path).map_err(io)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let meta = std::fs::metadata(&path).map_err(io)?;
        let server = Server {
            volume: Arc::downgrade(volume),
            volume_id,
            owner: meta.uid(),
            metrics,
        };
        let task = tokio::spawn(server.run(listener));
        Ok(ControlServer {
            path,
            ino: meta.ino(),
            task,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        let ours = std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("removing control socket {}: {e}", self.path.display());
            }
        }
    }
}

struct Server {
    volume: Weak<Volume>,
    volume_id: u64,
    owner: u32,
    metrics: Option<Arc<VolumeMetrics>>,
}

impl Server {
    async fn run(self, listener: UnixListener) {
        let server = Arc::new(self);
        // Owning the set aborts every connection when the task is aborted.
        let mut conns = JoinSet::new();
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    conns.spawn(server.clone().serve(stream));
                }
                Err(e) => {
                    log::warn!("control socket accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
            while conns.try_join_next().is_some() {}
        }
    }

    async fn serve(self: Arc<Self>, stream: UnixStream) {
        let allowed = match stream.peer_cred() {
            Ok(c) => c.uid() == self.owner || c.uid() == 0,
            Err(_) => false,
        };
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let reply = if allowed {
            match read_line(&mut read, MAX_LINE).await {
                Ok(line) => self.handle(&line).await,
                Err(e) => Reply::error(e),
            }
        } else {
            Reply::error("permission denied: only the volume server's user or root may use it")
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        if let Err(e) = write.write_all(&out).await {
            log::debug!("control reply not delivered: {e}");
        }
        // Read what the peer still sends (bounded) so closing with unread
        // input does not reset the connection before it read the reply.
        let _ = write.shutdown().await;
        let _ = tokio::io::copy(&mut (&mut read).take(MAX_DRAIN), &mut tokio::io::sink()).await;
    }

    async fn handle(&self, line: &str) -> Reply {
        let req: Request = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => return Reply::error(format!("malformed request: {e}")),
        };
        let (volume, name) = match &req {
            Request::SnapshotCreate { volume, name, .. }
            | Request::SnapshotDelete { volume, name } => (*volume, Some(name)),
            Request::CollectGarbage { volume } | Request::Metrics { volume } => (*volume, None),
        };
        if volume != self.volume_id {
            return Reply::error(format!(
                "this socket serves volume {:016x}, not {volume:016x}",
                self.volume_id
            ));
        }
        if let Some(Err(e)) = name.map(|n| validate_name(n)) {
            return Reply::error(e.to_string());
        }
        let Some(vol) = self.volume.upgrade() else {
            return Reply::error("the volume is closed");
        };
        let done = Reply {
            ok: true,
            error: None,
            snapshot: None,
            freed_chunks: None,
            deleted_id: None,
            report: None,
        };
        match req {
            Request::SnapshotCreate {
                name, created_ms, ..
            } => match vol.snapshot(&name, created_ms).await {
                Ok(s) => Reply {
                    snapshot: Some(summary(&s, vol.stats().last_snapshot_pause_us)),
                    ..done
                },
                Err(e) => Reply::error(e.to_string()),
            },
            Request::SnapshotDelete { name, .. } => match vol.begin_snapshot_delete(&name).await {
                Ok(s) => Reply {
                    deleted_id: Some(s.id),
                    ..done
                },
                Err(e) => Reply::error(e.to_string()),
            },
            Request::CollectGarbage { .. } => match vol.collect_garbage().await {
                Ok(n) => Reply {
                    freed_chunks: Some(n),
                    ..done
                },
                Err(e) => Reply::error(e.to_string()),
            },
            Request::Metrics { .. } => match self.metrics.as_ref().and_then(|m| m.report()) {
                Some(r) => Reply {
                    report: Some(r),
                    ..done
                },
                None => Reply::error("this server keeps no metrics for the volume"),
            },
        }
    }
}

fn summary(s: &SnapshotObject, pause_us: u64) -> SnapshotSummary {
    SnapshotSummary {
        id: s.id,
        name: s.name.clone(),
        created_ms: s.created_ms,
        chunks: s.checkpoint.chunks.len() as u64,
        pause_us,
    }
}

/// One line of at most `max` bytes, without its newline.
async fn read_line(
    read: &mut (impl tokio::io::AsyncBufRead + Unpin),
    max: u64,
) -> Result<String, String> {
    let mut buf = Vec::new();
    read.take(max + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| format!("reading the line: {e}"))?;
    if buf.len() as u64 > max {
        return Err(format!("line longer than {max} bytes"));
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| "request is not UTF-8".to_string())
}

/// Send `req` to the control socket at `path` and wait for the reply.
/// `Err` only for transport failures (no socket, nobody listening, a
/// malformed reply); a refusal is an `Ok` reply with `ok: false`.
pub async fn request(path: &Path, req: &Request) -> Result<Reply, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).await.map_err(io)?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).unwrap_or_default();
    line.push(b'\n');
    write.write_all(&line).await.map_err(io)?;
    let reply = read_line(&mut BufReader::new(read), MAX_REPLY)
        .await
        .map_err(|reason| ControlError::Protocol {
            path: path.to_path_buf(),
            reason,
        })?;
    serde_json::from_str(&reply).map_err(|e| ControlError::Protocol {
        path: path.to_path_buf(),
        reason: format!("{e}: {reply:?}"),
    })
}

#[cfg(test)]
mod tests;
