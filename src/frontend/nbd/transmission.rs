//! The transmission phase of one connection: read requests, run them on the
//! export's device concurrently, send replies through one writer.
//!
//! Replies: without structured replies, every reply is a simple reply.
//! With them, a read is answered by one `OFFSET_DATA` chunk (or `NONE` for
//! zero bytes), a block status by one `BLOCK_STATUS` chunk, every error by
//! one `ERROR` chunk with a message, and other successes by simple replies
//! (the protocol allows both for commands without payload).
//!
//! Invariants:
//! 1. Every request that was read in full gets exactly one reply, unless the
//!    socket fails first; replies may come out of order (by handle).
//! 2. Requests in flight are bounded by count and by bytes, per connection
//!    and across all connections ([`Limits`]): the reader waits for its
//!    permits before reading a payload or allocating a read buffer, so a
//!    connection holds bounded memory and all of them together too.
//! 3. When the connection ends (DISC, EOF, protocol violation, shutdown,
//!    timeout), no new request is read, every request already read runs to
//!    completion and its reply is written (or dropped, if the writer
//!    failed) before [`transmit`] returns.
//! 4. A protocol violation ends this connection only.
//! 5. A request whose first byte arrived must arrive whole (header and
//!    payload) within `request_timeout`, and each batch of replies must be
//!    written within it; otherwise the connection is closed. So a client
//!    that stops reading its replies releases its share of the global byte
//!    budget after at most `request_timeout`, and stops only itself.
//! 6. With an `idle_timeout`, a connection is closed once it had nothing
//!    in flight and sent no request for that long (the wait starts when
//!    its last request in flight ends).
//! 7. A flush is first polled on the reading task: one with nothing left
//!    to sync (the device answers it without waiting) is answered without
//!    a task of its own, saving a spawn and a wake-up of another worker.
//!    So is a write sent while nothing else of the connection is in
//!    flight (a client at queue depth one, waiting for it): the device
//!    may write it at once ([`crate::engine::wal`] invariant 11). Reads,
//!    and writes among others in flight, are spawned: their work before
//!    the first wait (CRCs, copies) would hold up reading the next
//!    request.
//! 8. A read is answered with the parts the device gave
//!    ([`BlockDevice::read_parts`]): the reply's header and the parts go
//!    out in vectored writes, so bytes the device shares (fetched chunk
//!    data) reach the socket without a copy into a reply buffer.
//! 9. Every request counted as read ([`Turnaround::request_read`]) gets
//!    its reply counted once it is on the socket, so the reader spins for
//!    the next request only when nothing is left unanswered
//!    ([`super::turnaround`]).

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::BufMut;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::buffers::ReadBuffers;
use super::codec::*;
use super::export::Export;
use super::protocol::*;
use super::turnaround::Turnaround;
use super::{wait_true, ConnError};
use crate::engine::{Allocation, BlockDevice, Extent, ReadParts};
use crate::error::BlockError;

/// Bounds that keep clients from exhausting the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests one connection may have read but not yet answered.
    /// Default 128.
    pub max_requests: usize,
    /// Payload and read-buffer bytes one connection's requests may hold.
    /// Default 64 MiB; values below [`MAX_PAYLOAD`] are raised to it so the
    /// largest request can run.
    pub max_bytes: usize,
    /// Connections served at once; more are closed right after accept.
    /// Default 64.
    pub max_connections: usize,
    /// Payload and read-buffer bytes all connections together may hold.
    /// Default 512 MiB; raised to `max_bytes` if below it.
    pub max_buffered_bytes: usize,
    /// Time from accept to the end of negotiation (including TLS).
    /// Default 10 s.
    pub handshake_timeout: Duration,
    /// Time for the rest of a started request to arrive, and for each batch
    /// of replies to be written. Default 30 s.
    pub request_timeout: Duration,
    /// Close a connection with no request for this long. Default none:
    /// clients such as qemu keep idle connections open for good reasons.
    pub idle_timeout: Option<Duration>,
    /// After a shutdown request, how long connections get to finish their
    /// requests before they are dropped. Default 30 s.
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_requests: 128,
            max_bytes: 64 << 20,
            max_connections: 64,
            max_buffered_bytes: 512 << 20,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            idle_timeout: None,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// Per-connection byte budget in semaphore units.
    fn connection_units(&self) -> usize {
        self.max_bytes.max(MAX_PAYLOAD as usize) / BYTE_UNIT
    }

    /// A fresh global byte budget for one server (shared by its connections).
    pub fn global_budget(&self) -> Arc<Semaphore> {
        let units = (self.max_buffered_bytes / BYTE_UNIT).max(self.connection_units());
        Arc::new(Semaphore::new(units))
    }
}

/// Unit of the byte semaphore.
const BYTE_UNIT: usize = 4096;

/// A reply waiting for the writer. The permits are released once written.
struct Reply {
    handle: u64,
    body: Body,
    _permits: Permits,
}

/// What a reply says; the writer encodes it for the connection's features.
#[derive(Debug)]
enum Body {
    /// Success without payload.
    Done,
    /// Bytes read at `offset`.
    Data { offset: u64, data: ReadParts },
    /// `base:allocation` descriptors `(length, flags)`.
    Extents(Vec<(u32, u32)>),
    /// NBD error value (not 0) and a message for structured replies.
    Error { error: u32, message: String },
}

/// Bytes a block status reply may hold (its descriptors).
const STATUS_REPLY_BYTES: u32 = (MAX_EXTENTS * 8) as u32;

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

struct Budget {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    global: Arc<Semaphore>,
}

impl Budget {
    fn new(limits: &Limits, global: Arc<Semaphore>) -> Budget {
        Budget {
            requests: Arc::new(Semaphore::new(limits.max_requests.max(1))),
            bytes: Arc::new(Semaphore::new(limits.connection_units())),
            global,
        }
    }

    /// Permits for one request holding `bytes`: the connection's first,
    /// then the server-wide budget. `None` only if a semaphore was closed.
    async fn acquire(&self, bytes: u32) -> Option<Permits> {
        let request = self.requests.clone().acquire_owned().await.ok()?;
        // At most MAX_PAYLOAD / BYTE_UNIT, which both budgets can hold.
        let units = (bytes as usize).div_ceil(BYTE_UNIT) as u32;
        let bytes = if units == 0 {
            None
        } else {
            let own = self.bytes.clone().acquire_many_owned(units).await.ok()?;
            let global = self.global.clone().acquire_many_owned(units).await.ok()?;
            Some((own, global))
        };
        Some(Permits {
            _request: request,
            _bytes: bytes,
        })
    }
}

/// `what` must finish within `limit`, else the connection is closed.
async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} took longer than {} ms", limit.as_millis()),
        )),
    }
}

/// Wait for the first byte of the next request, or forever.
async fn first_byte<R: AsyncRead + Unpin>(
    reader: &mut R,
    idle: Option<Duration>,
) -> std::io::Result<u8> {
    match idle {
        Some(limit) => within(limit, "waiting for a request (idle)", reader.read_u8()).await,
        None => reader.read_u8().await,
    }
}

/// Serve requests for `export` with the negotiated `features` until the
/// client disconnects, violates the protocol, times out, or `shutdown`
/// becomes true. `global` is the server-wide byte budget
/// ([`Limits::global_budget`]).
pub async fn transmit<R, W>(
    link: Link<R, W>,
    export: Export,
    features: Features,
    mut shutdown: watch::Receiver<bool>,
    limits: Limits,
    global: Arc<Semaphore>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Link {
        mut reader,
        writer,
        turnaround,
    } = link;
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let buffers = Arc::new(ReadBuffers::default());
    // Aborted if this future is dropped (the server's shutdown deadline),
    // so a writer stuck on a client that does not read dies with it.
    let mut writer_task = AbortOnDrop(tokio::spawn(write_replies(
        writer,
        rx,
        limits.request_timeout,
        features.structured,
        Arc::clone(&buffers),
        Arc::clone(&turnaround),
    )));
    let budget = Budget::new(&limits, global);
    let mut tasks = JoinSet::new();
    let timeout = limits.request_timeout;

    let outcome = loop {
        while tasks.try_join_next().is_some() {}
        let mut hdr = [0u8; REQUEST_LEN];
        // Idle only counts while nothing is in flight: the wait starts over
        // (now with the idle limit) when the last request in flight ends.
        // `read_u8` is cancel safe, so restarting it loses no byte.
        let first = 'wait: loop {
            let idle = limits.idle_timeout.filter(|_| tasks.is_empty());
            tokio::select! {
                biased;
                _ = wait_true(&mut shutdown) => break 'wait Err(Ok(())),
                _ = tx.closed() => {
                    break 'wait Err(Err(ConnError::Protocol("reply writer stopped".into())))
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue 'wait,
                r = first_byte(&mut reader, idle) => break 'wait Ok(r),
            }
        };
        // Err: the connection ends here, with this outcome.
        let first = match first {
            Ok(r) => r,
            Err(outcome) => break outcome,
        };
        let read = match first {
            Ok(b) => {
                hdr[0] = b;
                within(
                    timeout,
                    "the rest of a request header",
                    reader.read_exact(&mut hdr[1..]),
                )
                .await
            }
            Err(e) => Err(e),
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
        let op = match classify(&req, features) {
            Action::Close(reason) => break Err(ConnError::Protocol(reason)),
            Action::Run(Op::Disconnect) => break Ok(()),
            Action::Reject {
                error,
                skip,
                reason,
            } => {
                let Some(permits) = acquire(&budget, 0, &tx, &mut shutdown).await else {
                    break Ok(());
                };
                if let Err(e) =
                    within(timeout, "a request payload", skip_bytes(&mut reader, skip)).await
                {
                    break Err(e.into());
                }
                log::debug!("{}: rejecting {req:?} with error {error}", export.name);
                turnaround.request_read();
                let _ = tx.send(Reply {
                    handle: req.handle,
                    body: Body::Error {
                        error,
                        message: reason.to_string(),
                    },
                    _permits: permits,
                });
                continue;
            }
            Action::Run(op) => op,
        };
        let held = match op {
            Op::Read { len, .. } | Op::Write { len, .. } => len,
            Op::BlockStatus { .. } => STATUS_REPLY_BYTES,
            _ => 0,
        };
        let Some(permits) = acquire(&budget, held, &tx, &mut shutdown).await else {
            break Ok(());
        };
        let payload = match op {
            Op::Write { len, .. } => {
                match within(timeout, "a request payload", read_payload(&mut reader, len)).await {
                    Ok(buf) => buf,
                    Err(e) => break Err(e.into()),
                }
            }
            _ => Vec::new(),
        };
        turnaround.request_read();
        let device = export.device.clone();
        let tx = tx.clone();
        let name = export.name.clone();
        let buffers = Arc::clone(&buffers);
        let run = async move {
            let body = execute(device.as_ref(), op, payload, &buffers).await;
            if let Body::Error { error, message } = &body {
                log::debug!("{name}: {op:?} failed with NBD error {error}: {message}");
            }
            let _ = tx.send(Reply {
                handle: req.handle,
                body,
                _permits: permits,
            });
        };
        // Invariant 7: a flush, or a write with nothing else in flight,
        // that needs no wait is answered right here (only those are boxed
        // to be polled first).
        if matches!(op, Op::Flush) || (matches!(op, Op::Write { .. }) && tasks.is_empty()) {
            let mut run = Box::pin(run);
            if (&mut run).now_or_never().is_none() {
                tasks.spawn(run);
            }
        } else {
            tasks.spawn(run);
        }
    };

    drop(tx);
    while tasks.join_next().await.is_some() {}
    let written = (&mut writer_task.0)
        .await
        .map_err(|e| ConnError::Protocol(format!("reply writer failed: {e}")))?;
    outcome?;
    written.map_err(ConnError::from)
}

/// The two halves of a connection's stream, and what they share.
pub struct Link<R, W> {
    /// Requests come from here ([`super::turnaround::SpinRead`] over a
    /// socket, as a rule).
    pub reader: R,
    /// Replies go here.
    pub writer: W,
    /// Told of each request read and each reply written.
    pub turnaround: Arc<Turnaround>,
}

/// A task that is aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Permits for the next request; `None` when the connection must end
/// instead (shutdown, or the reply writer failed and nothing will free the
/// budget this connection holds).
async fn acquire(
    budget: &Budget,
    bytes: u32,
    tx: &mpsc::UnboundedSender<Reply>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Permits> {
    tokio::select! {
        p = budget.acquire(bytes) => p,
        _ = tx.closed() => None,
        _ = wait_true(shutdown) => None,
    }
}

/// Exactly `len` payload bytes, read straight into a fresh buffer (never
/// zeroed first: every byte handed out was read from the client).
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> std::io::Result<Vec<u8>> {
    let len = len as usize;
    let mut buf = crate::engine::payload_pool::take(len);
    while buf.len() < len {
        let room = len - buf.len();
        if reader.read_buf(&mut (&mut buf).limit(room)).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf)
}

async fn skip_bytes<R: AsyncRead + Unpin>(reader: &mut R, n: u32) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(n.into()), &mut tokio::io::sink()).await?;
    if copied < u64::from(n) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Run one operation and say what to answer. A read is lent a buffer of
/// the connection's pool ([`ReadBuffers`]).
async fn execute(
    device: &dyn BlockDevice,
    op: Op,
    payload: Vec<u8>,
    buffers: &ReadBuffers,
) -> Body {
    let result: Result<Body, BlockError> = match op {
        Op::Read { offset, len } => {
            let buf = buffers.take(len as usize);
            match device.read_parts(offset, buf).await {
                Ok(data) if data.len() == len as usize => Ok(Body::Data { offset, data }),
                Ok(data) => Err(BlockError::Io(format!(
                    "read of {len} bytes at {offset} returned {}",
                    data.len()
                ))),
                Err(e) => Err(e),
            }
        }
        Op::Write { offset, fua, .. } => device
            .write_owned(offset, payload, fua)
            .await
            .map(|()| Body::Done),
        Op::Flush => device.flush().await.map(|()| Body::Done),
        Op::Trim { offset, len, fua } => match device.trim(offset, len.into()).await {
            Ok(()) if fua => device.flush().await.map(|()| Body::Done),
            r => r.map(|()| Body::Done),
        },
        Op::WriteZeroes { offset, len, fua } => device
            .write_zeroes(offset, len.into(), fua)
            .await
            .map(|()| Body::Done),
        Op::BlockStatus {
            offset,
            len,
            req_one,
        } => block_status(device, offset, len, req_one).map(Body::Extents),
        Op::Disconnect => Ok(Body::Done),
    };
    result.unwrap_or_else(|e| {
        if matches!(e, BlockError::Io(_) | BlockError::Fenced(_)) {
            log::warn!("{op:?}: {e}");
        }
        Body::Error {
            error: nbd_error_from_errno(e.errno()),
            message: client_message(&e),
        }
    })
}

/// The `base:allocation` descriptors for a block status request: holes,
/// trimmed and zeroed ranges are `HOLE | ZERO`, stored data is 0. With
/// `req_one`, exactly one descriptor, no longer than the request.
fn block_status(
    device: &dyn BlockDevice,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, BlockError> {
    let size = device.size();
    let span = block_status_span(offset, len, size).ok_or_else(|| {
        BlockError::InvalidArgument(format!(
            "block status of {len} bytes at {offset}: the offset must be a multiple of \
             {MIN_BLOCK}, the length not 0, and the range inside the {size}-byte export"
        ))
    })?;
    let extents = device.allocation(offset, span, if req_one { 1 } else { MAX_EXTENTS })?;
    status_descriptors(&extents, req_one.then_some(len))
}

/// Descriptors for `extents`; `Some(len)` (REQ_ONE) keeps only the first,
/// cut to the largest whole block within `len`.
fn status_descriptors(
    extents: &[Extent],
    req_one: Option<u32>,
) -> Result<Vec<(u32, u32)>, BlockError> {
    let flags = |state| match state {
        Allocation::Data => 0,
        Allocation::Zero => STATE_HOLE | STATE_ZERO,
    };
    let mut out = Vec::with_capacity(extents.len().min(MAX_EXTENTS));
    for e in extents.iter().take(MAX_EXTENTS) {
        let mut len = u32::try_from(e.len)
            .map_err(|_| BlockError::Io(format!("extent of {} bytes in a block status", e.len)))?;
        if let Some(asked) = req_one {
            len = len.min(asked / MIN_BLOCK * MIN_BLOCK);
        }
        if len == 0 {
            break;
        }
        out.push((len, flags(e.state)));
        if req_one.is_some() {
            break;
        }
    }
    if out.is_empty() {
        return Err(BlockError::InvalidArgument(
            "block status shorter than one block".into(),
        ));
    }
    Ok(out)
}

/// The message a client sees with an error: the error itself when it is
/// about the request, a generic one when it could name server internals.
fn client_message(e: &BlockError) -> String {
    match e {
        BlockError::InvalidArgument(_)
        | BlockError::OutOfRange { .. }
        | BlockError::NoSpace
        | BlockError::ReadOnly => e.to_string(),
        BlockError::LocalNoSpace(_) => "no space left on the server's disk".into(),
        BlockError::Fenced(_) | BlockError::Io(_) | BlockError::Closed => {
            "I/O error on the server (details in its log)".into()
        }
    }
}

/// Write replies as they come; batch whatever is ready into one flush.
/// Each reply, and each flush, must complete within `timeout`. With
/// `structured`, reads, block status and errors go out as structured
/// reply chunks (see the module docs). The buffer of a read, once
/// written, goes back to `buffers`.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    timeout: Duration,
    structured: bool,
    buffers: Arc<ReadBuffers>,
    turnaround: Arc<Turnaround>,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(256 << 10, writer);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut written = 0;
        while let Some(reply) = next {
            written += 1;
            within(timeout, "writing a reply", async {
                let h = reply.handle;
                match (&reply.body, structured) {
                    (Body::Done, _) => out.write_all(&encode_simple_reply(h, 0)).await,
                    (Body::Data { data, .. }, false) => {
                        write_parts(&mut out, &encode_simple_reply(h, 0), data).await
                    }
                    (Body::Data { data, .. }, true) if data.is_empty() => {
                        out.write_all(&encode_none_chunk(h)).await
                    }
                    (Body::Data { offset, data }, true) => {
                        // At most MAX_PAYLOAD bytes (classify).
                        let head = encode_data_chunk_head(h, *offset, data.len() as u32);
                        write_parts(&mut out, &head, data).await
                    }
                    // Only with `base:allocation`, which needs structured replies.
                    (Body::Extents(d), _) => {
                        let chunk = encode_block_status_chunk(h, META_ALLOCATION_ID, d);
                        out.write_all(&chunk).await
                    }
                    (Body::Error { error, .. }, false) => {
                        out.write_all(&encode_simple_reply(h, *error)).await
                    }
                    (Body::Error { error, message }, true) => {
                        out.write_all(&encode_error_chunk(h, *error, message)).await
                    }
                }
            })
            .await?;
            if let Body::Data { data, .. } = reply.body {
                buffers.give(data.into_buf());
            }
            next = rx.try_recv().ok();
        }
        within(timeout, "writing replies", out.flush()).await?;
        turnaround.replies_written(written);
    }
    within(timeout, "closing the connection", out.shutdown()).await
}

/// Slices one vectored write passes at most (Linux's `IOV_MAX`).
const MAX_SLICES: usize = 1024;

/// Write `head` and then every part of `data`, in vectored writes: through
/// a [`BufWriter`], parts together larger than its buffer go straight to
/// the socket, uncopied (invariant 8).
async fn write_parts<W: AsyncWrite + Unpin>(
    out: &mut W,
    head: &[u8],
    data: &ReadParts,
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = std::iter::once(head)
        .chain(data.slices())
        .map(IoSlice::new)
        .collect();
    let mut left = &mut slices[..];
    IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        let n = out
            .write_vectored(&left[..left.len().min(MAX_SLICES)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}
