//! NBD server frontend: exports [`crate::engine::BlockDevice`]s to NBD
//! clients (qemu, nbdcopy, nbd-client, fio's nbd engine).
//!
//! Protocol subset: fixed newstyle negotiation with `NBD_OPT_EXPORT_NAME`,
//! `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`
//! and `SET_META_CONTEXT` (one context: `base:allocation`) and, when TLS is
//! configured, `STARTTLS`; simple replies, and structured replies once
//! negotiated; commands READ (+DF with structured replies), WRITE (+FUA),
//! FLUSH, TRIM (+FUA), WRITE_ZEROES (+FUA, +NO_HOLE), BLOCK_STATUS
//! (+REQ_ONE, once `base:allocation` is selected) and DISC. Requests on a
//! connection run concurrently and are answered as they complete. Offsets
//! and lengths must be multiples of 512 (the advertised minimum block
//! size; a block status length is a hint and is rounded up); others get
//! `EINVAL`, as do out-of-range requests, and the connection stays usable.
//!
//! Modules: [`protocol`] (wire constants, error values), [`codec`] (pure
//! encode/decode), [`meta`] (metadata context queries), [`export`] (name →
//! device), [`access`] (who may connect and open what), [`tls`] and
//! [`cert_name`] (STARTTLS with client certificates), [`handshake`]
//! (negotiation), [`transmission`] (request loop, limits), [`turnaround`]
//! (a brief spin for the next request when all are answered), [`buffers`]
//! (reused read buffers), [`server`] (listeners, admission, shutdown).

pub mod access;
pub mod buffers;
pub mod cert_name;
pub mod codec;
pub mod export;
pub mod handshake;
pub mod meta;
pub mod protocol;
pub mod server;
pub mod tls;
pub mod transmission;
pub mod turnaround;

pub use access::{AccessPolicy, Cidr, ClientMatch, ExportRule, Peer};
pub use export::{Export, ExportError, ExportMap};
pub use server::{Listener, NbdServer, ServerError};
pub use transmission::Limits;

/// Why a connection ended abnormally. Affects that connection only.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Resolve once the flag is true (never, if its sender is gone).
pub(crate) async fn wait_true(flag: &mut tokio::sync::watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}
