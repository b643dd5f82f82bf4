//! The transmission phase of one connection: read requests, run them on the
//! export's device concurrently, send simple replies through one writer.
//!
//! Invariants:
//! 1. Every request that was read in full gets exactly one reply, unless the
//!    socket fails first; replies may come out of order (by handle).
//! 2. Requests in flight are bounded by count and by bytes
//!    ([`Limits`]): the reader waits for a permit before reading a payload
//!    or allocating a read buffer, so a connection holds bounded memory.
//! 3. When the connection ends (DISC, EOF, protocol violation, shutdown),
//!    no new request is read, every request already read runs to completion
//!    and its reply is written before [`transmit`] returns.
//! 4. A protocol violation ends this connection only.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::codec::*;
use super::export::Export;
use super::protocol::*;
use super::{wait_true, ConnError};
use crate::engine::BlockDevice;
use crate::error::BlockError;

/// Per-connection bounds on work in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests read but not yet answered. Default 128.
    pub max_requests: usize,
    /// Payload and read-buffer bytes held by those requests. Default 128 MiB;
    /// values below [`MAX_PAYLOAD`] are raised to it so the largest request
    /// can run.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_requests: 128,
            max_bytes: 128 << 20,
        }
    }
}

/// Unit of the byte semaphore.
const BYTE_UNIT: usize = 4096;

/// A reply waiting for the writer. The permits are released once written.
struct Reply {
    handle: u64,
    error: u32,
    data: Option<Vec<u8>>,
    _permits: Permits,
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Budget {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl Budget {
    fn new(limits: Limits) -> Budget {
        let units = limits.max_bytes.max(MAX_PAYLOAD as usize) / BYTE_UNIT;
        Budget {
            requests: Arc::new(Semaphore::new(limits.max_requests.max(1))),
            bytes: Arc::new(Semaphore::new(units)),
        }
    }

    async fn acquire(&self, bytes: u32) -> Permits {
        // The semaphores are never closed, so acquiring cannot fail.
        let request = self.requests.clone().acquire_owned().await;
        let units = (bytes as usize).div_ceil(BYTE_UNIT) as u32;
        let bytes = if units == 0 {
            None
        } else {
            self.bytes.clone().acquire_many_owned(units).await.ok()
        };
        Permits {
            _request: request.expect("request semaphore is never closed"),
            _bytes: bytes,
        }
    }
}

/// Serve requests for `export` until the client disconnects, violates the
/// protocol, or `shutdown` becomes true.
pub async fn transmit<R, W>(
    mut reader: R,
    writer: W,
    export: Export,
    mut shutdown: watch::Receiver<bool>,
    limits: Limits,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(write_replies(writer, rx));
    let budget = Budget::new(limits);
    let mut tasks = JoinSet::new();

    let outcome = loop {
        while tasks.try_join_next().is_some() {}
        let mut hdr = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            biased;
            _ = wait_true(&mut shutdown) => break Ok(()),
            _ = tx.closed() => break Err(ConnError::Protocol("reply writer stopped".into())),
            r = reader.read_exact(&mut hdr) => r,
        };
        match read {
            Ok(_) => {}
            // A client may close without NBD_CMD_DISC; that is not an error.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let req = match Request::decode(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(ConnError::Protocol(e.to_string())),
        };
        let op = match classify(&req) {
            Action::Close(reason) => break Err(ConnError::Protocol(reason)),
            Action::Run(Op::Disconnect) => break Ok(()),
            Action::Reject { error, skip } => {
                let permits = budget.acquire(0).await;
                if let Err(e) = skip_bytes(&mut reader, skip).await {
                    break Err(e.into());
                }
                log::debug!("{}: rejecting {req:?} with error {error}", export.name);
                let _ = tx.send(Reply {
                    handle: req.handle,
                    error,
                    data: None,
                    _permits: permits,
                });
                continue;
            }
            Action::Run(op) => op,
        };
        let held = match op {
            Op::Read { len, .. } | Op::Write { len, .. } => len,
            _ => 0,
        };
        let permits = budget.acquire(held).await;
        let payload = match op {
            Op::Write { len, .. } => {
                let mut buf = vec![0u8; len as usize];
                if let Err(e) = reader.read_exact(&mut buf).await {
                    break Err(e.into());
                }
                buf
            }
            _ => Vec::new(),
        };
        let device = export.device.clone();
        let tx = tx.clone();
        let name = export.name.clone();
        tasks.spawn(async move {
            let (error, data) = execute(device.as_ref(), op, payload).await;
            if error != 0 {
                log::debug!("{name}: {op:?} failed with NBD error {error}");
            }
            let _ = tx.send(Reply {
                handle: req.handle,
                error,
                data,
                _permits: permits,
            });
        });
    };

    drop(tx);
    while tasks.join_next().await.is_some() {}
    let written = writer_task
        .await
        .map_err(|e| ConnError::Protocol(format!("reply writer failed: {e}")))?;
    outcome?;
    written.map_err(ConnError::from)
}

async fn skip_bytes<R: AsyncRead + Unpin>(reader: &mut R, n: u32) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(n.into()), &mut tokio::io::sink()).await?;
    if copied < u64::from(n) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Run one operation; returns the NBD error value (0 = success) and, for
/// a successful read, the data.
async fn execute(device: &dyn BlockDevice, op: Op, payload: Vec<u8>) -> (u32, Option<Vec<u8>>) {
    let result: Result<Option<Vec<u8>>, BlockError> = match op {
        Op::Read { offset, len } => {
            let mut buf = vec![0u8; len as usize];
            device.read(offset, &mut buf).await.map(|()| Some(buf))
        }
        Op::Write { offset, fua, .. } => device.write(offset, &payload, fua).await.map(|()| None),
        Op::Flush => device.flush().await.map(|()| None),
        Op::Trim { offset, len, fua } => match device.trim(offset, len.into()).await {
            Ok(()) if fua => device.flush().await.map(|()| None),
            r => r.map(|()| None),
        },
        Op::WriteZeroes { offset, len, fua } => device
            .write_zeroes(offset, len.into(), fua)
            .await
            .map(|()| None),
        Op::Disconnect => Ok(None),
    };
    match result {
        Ok(data) => (0, data),
        Err(e) => {
            if matches!(e, BlockError::Io(_) | BlockError::Fenced(_)) {
                log::warn!("{op:?}: {e}");
            }
            (nbd_error_from_errno(e.errno()), None)
        }
    }
}

/// Write replies as they come; batch whatever is ready into one flush.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(256 << 10, writer);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next {
            out.write_all(&encode_simple_reply(reply.handle, reply.error))
                .await?;
            if let Some(data) = &reply.data {
                out.write_all(data).await?;
            }
            next = rx.try_recv().ok();
        }
        out.flush().await?;
    }
    out.shutdown().await
}
