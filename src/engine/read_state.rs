//! The read path's state in the volume core ([`super::volume_core::Inner`]):
//! the table of chunk window GETs in flight (operated by `inflight`, whose
//! module docs state its invariants) and the prefetcher's streams and
//! budget (operated by `prefetch`). Only the types live here, below the
//! core that holds them; the operations stay above it, with the read path.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};

/// A chunk window: `(volume, chunk seq, epoch, window number)`.
pub(super) type WinKey = (u64, u64, u64, u64);

/// A window's entry: the run it belongs to, the run's bytes (a shared
/// future) and the data-area offset where the run starts.
pub(super) type Entry = (u64, RunFuture, u64);

/// A cached prefetch run whose windows wait in memory for a read
/// (invariant 5).
#[derive(Debug)]
pub(super) struct Staged {
    /// `(volume, chunk seq, epoch)` of the run's chunk.
    pub(super) chunk: (u64, u64, u64),
    /// The run's windows not yet taken.
    pub(super) left: Vec<u64>,
    /// The run's bytes, from data-area offset `start` to `stop`.
    pub(super) data: Bytes,
    pub(super) start: u64,
    pub(super) stop: u64,
    /// The prefetcher's budget the bytes are counted in.
    pub(super) in_flight: Arc<AtomicU64>,
}

/// The table's contents, under one lock.
#[derive(Debug, Default)]
pub(super) struct Table {
    pub(super) windows: HashMap<WinKey, Entry>,
    /// Staged runs by run id (ids grow, so the first is the oldest).
    pub(super) staged: BTreeMap<u64, Staged>,
}

/// Why a shared GET failed (cloneable, since every waiter gets it).
#[derive(Debug, Clone)]
pub(crate) enum FetchError {
    /// The chunk object is gone (deleted by GC after the map named it).
    NotFound,
    Store(String),
    /// The bytes failed their block CRC check.
    Crc(String),
    /// The runtime dropped the GET (shutting down).
    Closed,
}

pub(super) type RunResult = Result<Bytes, FetchError>;
pub(super) type RunFuture = Shared<BoxFuture<'static, RunResult>>;

/// What [`Inflight::fetch`] does about windows of the range.
pub(crate) enum Mode<'a> {
    /// A foreground read: join GETs in flight, send GETs for the rest.
    Read {
        /// Data-area bytes the read uses (for the cache's reuse detection).
        used: Range<u64>,
    },
    /// Readahead: skip windows cached or in flight; send GETs for the rest
    /// only while `in_flight < limit` (counted in `in_flight`, and given
    /// back when the GET ends).
    Prefetch {
        in_flight: &'a Arc<AtomicU64>,
        limit: u64,
        /// Counted on errors (which are logged, never returned).
        errors: &'a Arc<AtomicU64>,
    },
}

/// The table of GETs in flight, per volume.
#[derive(Debug, Default)]
pub(crate) struct Inflight {
    pub(super) table: Mutex<Table>,
    pub(super) next_run: AtomicU64,
    /// Windows whose reader joined a GET another reader or the prefetcher
    /// had sent.
    pub joined: AtomicU64,
}

/// One sequential stream.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stream {
    /// Where the stream's furthest read ended (volume bytes).
    pub(super) next: u64,
    /// Readahead window, bytes (0 until the stream is seen to continue).
    pub(super) window: u64,
    /// Volume bytes up to which readahead was sent.
    pub(super) issued: u64,
    /// Last use, for replacement.
    pub(super) tick: u64,
}

/// The stream detector (pure: no I/O; unit tested on its own).
#[derive(Debug, Default)]
pub struct Streams {
    pub(super) streams: Vec<Stream>,
    pub(super) tick: u64,
}

/// A volume's prefetcher.
#[derive(Debug, Default)]
pub(crate) struct Prefetch {
    pub(super) streams: Mutex<Streams>,
    /// Bytes of prefetch GETs in flight (invariant 3).
    pub(super) in_flight: Arc<AtomicU64>,
    /// Prefetch GETs that failed.
    pub errors: Arc<AtomicU64>,
    /// Bytes prefetch GETs were sent for.
    pub bytes: AtomicU64,
}
