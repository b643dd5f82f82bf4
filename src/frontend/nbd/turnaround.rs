//! A brief spin for the next request once every request of a connection is
//! answered, so a client at queue depth one (a write, then a FLUSH, then
//! the next write) does not wait for this server's thread to be woken.
//!
//! Why: on a VM whose idle vCPUs halt, waking a sleeping thread when a
//! request arrives costs tens of microseconds, a large share of a
//! write + FLUSH pair that takes about 250 us in all. The reader therefore
//! polls its socket, without sleeping, for at most [`SPIN`] after the
//! last reply went out; a client that sends its next request within that
//! time is served at once.
//!
//! Invariants:
//! 1. The reader spins only when every request it read is answered (the
//!    reply is written to the socket), and at most once per such moment:
//!    the reply writer arms one spin when the last unanswered reply goes
//!    out, and the reader disarms it when it starts. So a busy connection
//!    (requests in flight) never spins, and an idle one spins once for at
//!    most [`SPIN`], then sleeps as before.
//! 2. A spin reads the socket with a non-blocking `recv` into the caller's
//!    buffer: bytes it gets are the stream's next bytes, as from any read.
//! 3. Only streams with a socket of their own spin (TCP and Unix sockets);
//!    a TLS stream, or any other reader, reads as before.

use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, ReadBuf};

/// How long the reader polls its socket after the last reply. A client
/// at queue depth one sends its next request within some tens of
/// microseconds of its reply.
pub const SPIN: Duration = Duration::from_micros(50);

/// What the request reader and the reply writer of one connection share.
#[derive(Debug, Default)]
pub struct Turnaround {
    /// Requests read whose reply is not yet written to the socket.
    unanswered: AtomicUsize,
    /// One spin allowed (invariant 1).
    armed: AtomicBool,
    /// The reading task, woken when a spin is armed.
    reader: AtomicWaker,
}

impl Turnaround {
    /// A request was read; its reply is to come.
    pub fn request_read(&self) {
        self.unanswered.fetch_add(1, Ordering::SeqCst);
    }

    /// `n` replies were written to the socket: when none is left to
    /// write, arm one spin and wake the reader to make it.
    pub fn replies_written(&self, n: usize) {
        if n == 0 {
            return;
        }
        if self.unanswered.fetch_sub(n, Ordering::SeqCst) == n {
            self.armed.store(true, Ordering::SeqCst);
            self.reader.wake();
        }
    }

    /// Whether the reader may spin now; disarms the spin.
    fn take_spin(&self) -> bool {
        self.unanswered.load(Ordering::SeqCst) == 0 && self.armed.swap(false, Ordering::SeqCst)
    }
}

/// A reader that spins on its socket when its [`Turnaround`] allows.
pub struct SpinRead<R> {
    inner: R,
    /// The socket `inner` reads, if it is one (invariant 3).
    fd: Option<RawFd>,
    turnaround: Arc<Turnaround>,
}

impl<R> SpinRead<R> {
    /// `fd` must be the socket `inner` reads from, open as long as `inner`.
    pub fn new(inner: R, fd: Option<RawFd>, turnaround: Arc<Turnaround>) -> Self {
        SpinRead {
            inner,
            fd,
            turnaround,
        }
    }
}

/// One non-blocking read of `fd` into `buf`: `None` when nothing is there.
fn try_recv(fd: RawFd, buf: &mut ReadBuf<'_>) -> Option<std::io::Result<()>> {
    let room = buf.remaining();
    // SAFETY: `unfilled_mut` is `room` bytes of writable (possibly
    // uninitialised) memory that `recv` writes at most `room` bytes into;
    // `fd` is an open socket (the caller's contract of `SpinRead::new`).
    let n = unsafe {
        let dst = buf.unfilled_mut();
        libc::recv(fd, dst.as_mut_ptr().cast(), room, libc::MSG_DONTWAIT)
    };
    if n >= 0 {
        let n = n as usize;
        // SAFETY: `recv` initialised the first `n` bytes of the unfilled part.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        return Some(Ok(()));
    }
    let e = std::io::Error::last_os_error();
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => None,
        _ => Some(Err(e)),
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for SpinRead<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        let Some(fd) = this.fd else {
            return Poll::Pending;
        };
        this.turnaround.reader.register(cx.waker());
        if buf.remaining() == 0 || !this.turnaround.take_spin() {
            return Poll::Pending;
        }
        let until = Instant::now() + SPIN;
        loop {
            if let Some(r) = try_recv(fd, buf) {
                return Poll::Ready(r);
            }
            if Instant::now() >= until {
                return Poll::Pending;
            }
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_spin_is_armed_only_when_the_last_reply_is_written() {
        let t = Turnaround::default();
        assert!(!t.take_spin(), "nothing answered yet: no spin");
        t.request_read();
        t.request_read();
        t.replies_written(1);
        assert!(!t.take_spin(), "one reply still unwritten");
        t.replies_written(1);
        assert!(t.take_spin(), "all answered: one spin");
        assert!(!t.take_spin(), "only one spin per idle moment");
        t.replies_written(0);
        assert!(!t.take_spin(), "writing nothing arms nothing");
    }

    #[tokio::test]
    async fn a_spinning_reader_gets_the_bytes_in_order() {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("socket pair");
        let fd = a.as_raw_fd();
        let t = Arc::new(Turnaround::default());
        let mut r = SpinRead::new(a, Some(fd), Arc::clone(&t));
        for round in 0..50u8 {
            t.request_read();
            t.replies_written(1);
            let writer = async {
                tokio::task::yield_now().await;
                b.write_all(&[round, round.wrapping_add(1)]).await
            };
            let mut got = [0u8; 2];
            let (w, r) = tokio::join!(writer, r.read_exact(&mut got));
            w.expect("write");
            r.expect("read");
            assert_eq!(got, [round, round.wrapping_add(1)]);
        }
        drop(b);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.expect("end of stream");
        assert!(rest.is_empty());
    }
}
