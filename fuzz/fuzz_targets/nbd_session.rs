//! A whole NBD connection as the server sees it: the input is everything
//! the client sends (greeting flags, options, requests); the server runs
//! negotiation (plain, or TLS-required when the first byte is odd) and then
//! transmission against a RAM disk, with small limits and timeouts.
#![no_main]
use std::io::Cursor;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shale::engine::memdisk::MemDisk;
use shale::engine::BlockDevice;
use shale::frontend::nbd::handshake::{greet, options, Gate, Negotiated, TlsState};
use shale::frontend::nbd::transmission::{transmit, Link};
use shale::frontend::nbd::{AccessPolicy, ExportMap, Limits, Peer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads the scripted client bytes, then EOF; swallows what the server writes.
struct Scripted(Cursor<Vec<u8>>);

impl AsyncRead for Scripted {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let pos = self.0.position() as usize;
        let rest = &self.0.get_ref()[pos.min(self.0.get_ref().len())..];
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.0.set_position((pos + n) as u64);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, script)) = data.split_first() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        let disk: Arc<dyn BlockDevice> = Arc::new(MemDisk::new(1 << 20));
        let exports = ExportMap::new([("a".to_string(), disk)]).unwrap();
        let policy = AccessPolicy::default();
        let peer = Peer::Unix { uid: 0, groups: Default::default() };
        let gate = Gate { exports: &exports, policy: &policy, peer: &peer };
        let mut stream = Scripted(Cursor::new(script.to_vec()));
        let Ok(no_zeroes) = greet(&mut stream).await else { return };
        let tls = if mode & 1 == 1 { TlsState::Required } else { TlsState::Off };
        let Ok(Negotiated::Transmit(export, features)) = options(&mut stream, gate, no_zeroes, tls).await else {
            return;
        };
        let limits = Limits {
            max_requests: 4,
            max_bytes: 0,
            request_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let link = Link {
            reader: stream,
            writer: tokio::io::sink(),
            turnaround: Arc::default(),
        };
        let _ = transmit(link, export, features, stop, limits, limits.global_budget()).await;
    });
});
