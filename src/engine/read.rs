//! The read path: split a request by the live map into zeros, WAL pieces
//! and chunk pieces; chunk pieces come from the read cache or from ranged
//! store reads run in parallel on the tokio runtime.
//!
//! Invariants:
//! 1. Every byte returned from the WAL or a chunk was checked against its
//!    CRC; a mismatch is [`BlockError::Io`], never wrong data.
//! 2. The map lookup and the resolution of WAL segment files / chunk
//!    entries happen under one lock, so a piece never names a released
//!    segment. A chunk deleted by GC between lookup and fetch makes the whole
//!    read start over (bounded number of times).
//! 3. The futures only wait on `oneshot` channels (runtime-agnostic).
//! 4. In a clone, unmapped pieces are resolved through the parent view's
//!    chain to the parents' chunks, which are then read like the volume's
//!    own (same CRC checks, retries and read cache, keyed by volume);
//!    `Loc::Zero` pieces read as zeros without I/O.
//! 5. [`read_parts`] answers the same bytes as [`read`], after the same
//!    checks: it only hands over bytes that were already checked and held
//!    in memory (a staged prefetch window, a GET's bytes, a slow piece's
//!    buffer) as they are instead of copying them into the caller's buffer.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::{BoxFuture, FutureExt};

use super::cache::{Cache, Hit, Served, Wait, WindowId, SLOT};
use super::checkpoint::ChunkInfo;
use super::crc_table::{CrcTables, Table, TableError};
use super::format::chunk::{aligned_range, verify_blocks, CRC_BLOCK};
use super::format::layout::chunk_key;
use super::map::{Loc, WalLoc};
use super::read_state::{FetchError, Mode};
use super::view::Resolved;
use super::volume_core::Inner;
use super::{wal, ReadParts, SECTOR};
use crate::error::BlockError;
use crate::store::StoreError;

enum Src {
    Zero,
    Wal(wal::fs::SegFile, WalLoc),
    /// Data at an offset in a chunk of a volume (this one or a parent).
    Chunk(u64, Arc<ChunkInfo>, u64),
}

/// Bytes `[b0, b1)` of a request and where they come from.
type Piece = (usize, usize, Src);

enum Attempt {
    Done,
    Retry,
}

/// How often a read restarts after racing with chunk deletion.
const MAX_ATTEMPTS: usize = 4;

pub(crate) async fn read(inner: &Inner, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
    read_with(inner, offset, buf, None).await
}

/// [`read`] of `buf.len()` bytes, handing over checked bytes held in
/// memory instead of copying them into `buf` (invariant 5).
pub(crate) async fn read_parts(
    inner: &Inner,
    offset: u64,
    mut buf: Vec<u8>,
) -> Result<ReadParts, BlockError> {
    let mut shared = Vec::new();
    read_with(inner, offset, &mut buf, Some(&mut shared)).await?;
    ReadParts::with_shared(buf, shared)
        .ok_or_else(|| BlockError::Io(format!("read at {offset}: its parts overlap")))
}

/// Read into `buf`, or with `shared`, partly into `shared` ([`Out`]).
async fn read_with(
    inner: &Inner,
    offset: u64,
    buf: &mut [u8],
    mut shared: Option<&mut Vec<(usize, Bytes)>>,
) -> Result<(), BlockError> {
    inner.prefetch.on_read(inner, offset, buf.len() as u64);
    for _ in 0..MAX_ATTEMPTS {
        // An attempt that starts over fills every byte again.
        if let Some(s) = shared.as_deref_mut() {
            s.clear();
        }
        let mut out = Out {
            buf: &mut *buf,
            shared: shared.as_deref_mut(),
        };
        if let Attempt::Done = read_once(inner, offset, &mut out).await? {
            return Ok(());
        }
    }
    Err(BlockError::Io(format!(
        "read at {offset} kept racing with chunk deletion"
    )))
}

/// Where one attempt of a read puts its bytes: request bytes go into
/// `buf`, except that with `shared`, checked bytes held in memory are
/// listed there (with their request offset) instead of copied.
struct Out<'a> {
    buf: &'a mut [u8],
    shared: Option<&'a mut Vec<(usize, Bytes)>>,
}

impl Out<'_> {
    /// Request bytes `[at, at + src.len())` are `src`.
    fn put(&mut self, at: usize, src: Bytes) {
        match self.shared.as_deref_mut() {
            Some(list) => list.push((at, src)),
            None => self.buf[at..at + src.len()].copy_from_slice(&src),
        }
    }

    /// Request bytes `[b0, b1)` from `parts` (consecutive byte runs, the
    /// first starting `skip` bytes before `b0`); false if they end first.
    fn put_parts(&mut self, parts: &[Bytes], skip: u64, b0: usize, b1: usize) -> bool {
        match self.shared.as_deref_mut() {
            Some(list) => match share_parts(parts, skip, b1 - b0) {
                Some(runs) => {
                    let mut at = b0;
                    for run in runs {
                        let n = run.len();
                        list.push((at, run));
                        at += n;
                    }
                    true
                }
                None => false,
            },
            None => copy_parts(parts, skip, &mut self.buf[b0..b1]),
        }
    }
}

/// The request's pieces as `(b0, b1, source)`; `Ok(None)` when a piece
/// names a released segment or chunk (the caller starts over).
fn resolve(inner: &Inner, offset: u64, len: u64) -> Result<Option<Vec<Piece>>, BlockError> {
    let st = inner.shared.lock();
    let mut out = Vec::new();
    let at = |start: u64, sectors: u64| {
        let b0 = ((start * SECTOR) - offset) as usize;
        (b0, b0 + (sectors * SECTOR) as usize)
    };
    for p in st.view_lookup(offset / SECTOR, len / SECTOR) {
        let (b0, b1) = at(p.start, p.len);
        let src = match (p.loc, &inner.parent) {
            (None, Some(parent)) => {
                for (s, l, source) in parent.resolve(p.start, p.len)? {
                    let (b0, b1) = at(s, l);
                    let src = match source {
                        Resolved::Chunk { volume, info, off } => Src::Chunk(volume, info, off),
                        Resolved::Zero => Src::Zero,
                    };
                    out.push((b0, b1, src));
                }
                continue;
            }
            (None | Some(Loc::Zero), _) => Src::Zero,
            (Some(Loc::Wal(w)), _) => match inner.wal.segment_file(w.seg) {
                Some(f) => Src::Wal(f, w),
                None => return Ok(None),
            },
            (Some(Loc::Chunk { chunk, off }), _) => match st.chunks.get(&chunk) {
                Some(c) => Src::Chunk(inner.id, c.info.clone(), off),
                None => return Ok(None),
            },
        };
        out.push((b0, b1, src));
    }
    Ok(Some(out))
}

/// A piece of a volume range held in a chunk: volume bytes
/// `[at, at+len)` are the chunk's data bytes `[off, off+len)`.
#[derive(Debug, Clone)]
pub(super) struct ChunkPiece {
    pub at: u64,
    /// The volume whose chunk it is (this one or a parent).
    pub volume: u64,
    pub info: Arc<ChunkInfo>,
    pub off: u64,
    pub len: u64,
}

/// The chunk pieces of volume bytes `[offset, offset+len)` (clipped to the
/// volume), in order, resolved through the map like a read (for readahead;
/// other pieces and a range racing with chunk deletion yield nothing).
pub(super) fn chunk_pieces(inner: &Inner, offset: u64, len: u64) -> Vec<ChunkPiece> {
    let end = offset.saturating_add(len).min(inner.size);
    if offset >= end || !offset.is_multiple_of(SECTOR) || !end.is_multiple_of(SECTOR) {
        return Vec::new();
    }
    match resolve(inner, offset, end - offset) {
        Ok(Some(pieces)) => pieces
            .into_iter()
            .filter_map(|(b0, b1, src)| match src {
                Src::Chunk(volume, info, off) => Some(ChunkPiece {
                    at: offset + b0 as u64,
                    volume,
                    info,
                    off,
                    len: (b1 - b0) as u64,
                }),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// What one fetch of a read yields: the data-area offset of its first
/// byte and its bytes in parts (one per cache window when shared), copied
/// straight into the request buffer, never concatenated first.
type Fetched = (u64, Vec<Bytes>);

async fn read_once(inner: &Inner, offset: u64, out: &mut Out<'_>) -> Result<Attempt, BlockError> {
    let Some(pieces) = resolve(inner, offset, out.buf.len() as u64)? else {
        return Ok(Attempt::Retry);
    };
    let mut fetches = Vec::new();
    // Reads the page cache could not serve at once, done off this thread.
    let mut slow = Vec::new();
    // Per chunk piece: whether any of it went to the store (a cache miss).
    let mut missed: Vec<bool> = Vec::new();
    let mut served = 0u64;
    for (b0, b1, src) in pieces {
        match src {
            Src::Zero => out.buf[b0..b1].fill(0),
            Src::Wal(file, loc) => {
                if !wal::read_record_cached(file.as_ref(), &loc, loc.seg, &mut out.buf[b0..b1])? {
                    slow.push(Slow::Wal { b0, b1, file, loc });
                }
            }
            Src::Chunk(volume, info, off) => {
                let cached = read_cached(inner, volume, &info, off, out, b0..b1);
                let piece = missed.len();
                missed.push(!cached.missing.is_empty());
                served += cached.served;
                for miss in cached.missing {
                    let at = b0 + (miss.start - off) as usize;
                    let len = (miss.end - miss.start) as usize;
                    fetches.push((at, at + len, volume, info.clone(), miss.start));
                }
                for w in cached.deferred {
                    let at = b0 + (w.from - off) as usize;
                    let len = (w.to - w.from) as usize;
                    slow.push(Slow::Window {
                        b0: at,
                        b1: at + len,
                        piece,
                        volume,
                        info: info.clone(),
                        w,
                    });
                }
            }
        }
    }
    for (item, res) in slow.iter().zip(read_slow(inner, &slow).await) {
        let (b0, b1) = item.bytes();
        match (item, res?) {
            (_, SlowRead::Data(data)) => {
                if data.len() != b1 - b0 {
                    return Err(BlockError::Io("a slow read returned a short range".into()));
                }
                served += data.len() as u64;
                out.put(b0, Bytes::from(data));
            }
            (
                Slow::Window {
                    piece,
                    volume,
                    info,
                    w,
                    ..
                },
                got,
            ) => {
                if let SlowRead::Corrupt = got {
                    inner.counters.cache_corrupt.fetch_add(1, Ordering::Relaxed);
                }
                missed[*piece] = true;
                fetches.push((b0, b1, *volume, info.clone(), w.from));
            }
            (Slow::Wal { .. }, _) => {
                return Err(BlockError::Io("a WAL read returned no data".into()))
            }
        }
    }
    if inner.cache.is_some() {
        let c = &inner.counters;
        let misses = missed.iter().filter(|&&m| m).count() as u64;
        c.cache_hits
            .fetch_add(missed.len() as u64 - misses, Ordering::Relaxed);
        c.cache_misses.fetch_add(misses, Ordering::Relaxed);
        c.cache_hit_bytes.fetch_add(served, Ordering::Relaxed);
    }
    if fetches.is_empty() {
        return Ok(Attempt::Done);
    }
    let mut waits: Vec<BoxFuture<'static, Result<Fetched, FetchError>>> =
        Vec::with_capacity(fetches.len());
    for (b0, b1, volume, info, off) in &fetches {
        let len = (b1 - b0) as u64;
        if inner.cache.is_some() {
            // Whole cache windows, shared with any GET already in flight.
            let (w0, w1) = windows(*off, len, info.data_len);
            let (parts, _) = inner.fetches.fetch(
                inner,
                *volume,
                info,
                w0..w1,
                Mode::Read {
                    used: *off..off + len,
                },
            );
            waits.push(
                async move {
                    let mut out = Vec::with_capacity(parts.len());
                    for p in parts {
                        out.push(p.bytes().await?);
                    }
                    Ok((w0 * SLOT, out))
                }
                .boxed(),
            );
            continue;
        }
        let (start, end) = aligned_range(*off, len, info.data_len);
        let (tx, rx) = oneshot::channel();
        let store = inner.store.clone();
        let key = chunk_key(*volume, info.seq, info.epoch);
        let info = info.clone();
        inner.counters.store_reads.fetch_add(1, Ordering::Relaxed);
        let budget = std::time::Duration::from_millis(inner.cfg.store_read_timeout_ms);
        let (tables, volume) = (inner.tables.clone(), *volume);
        inner.rt.spawn(async move {
            let res = fetch_within(budget, store, &tables, volume, key, info, start, end).await;
            let _ = tx.send(res.map(|(data, _)| data).map_err(FetchError::from));
        });
        waits.push(
            async move {
                let data = rx.await.unwrap_or(Err(FetchError::Closed))?;
                Ok((start, vec![data]))
            }
            .boxed(),
        );
    }
    let results = futures::future::join_all(waits).await;
    let mut retry = false;
    for ((b0, b1, volume, info, off), res) in fetches.iter().zip(results) {
        let key = || chunk_key(*volume, info.seq, info.epoch);
        let (start, data) = match res {
            Ok(d) => d,
            // Only our own GC deletes chunks under our feet; a parent's
            // chunk is kept while we read through to it.
            Err(FetchError::NotFound) if *volume == inner.id => {
                retry = true;
                continue;
            }
            Err(FetchError::NotFound) => {
                return Err(BlockError::Io(format!("reading {}: not found", key())))
            }
            Err(FetchError::Store(e)) => {
                return Err(BlockError::Io(format!("reading {}: {e}", key())))
            }
            Err(FetchError::Crc(e)) => {
                let key = key();
                super::damage::report(&key, &e);
                return Err(BlockError::Io(format!("{key}: {e}")));
            }
            Err(FetchError::Closed) => return Err(BlockError::Closed),
        };
        if !out.put_parts(&data, off - start, *b0, *b1) {
            return Err(BlockError::Io(format!(
                "chunk {} returned a short range",
                info.seq
            )));
        }
    }
    Ok(if retry { Attempt::Retry } else { Attempt::Done })
}

/// Walk the runs of `parts` (consecutive byte runs, the first starting
/// `skip` bytes before the wanted ones) that make up `len` bytes: `run`
/// gets each part and the range of it wanted, in order. False if the
/// parts end first.
fn walk_parts(
    parts: &[Bytes],
    skip: u64,
    len: usize,
    mut run: impl FnMut(&Bytes, Range<usize>),
) -> bool {
    let mut skip = usize::try_from(skip).unwrap_or(usize::MAX);
    let mut left = len;
    for p in parts {
        if left == 0 {
            break;
        }
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let n = (p.len() - skip).min(left);
        run(p, skip..skip + n);
        left -= n;
        skip = 0;
    }
    left == 0
}

/// Fill `dst` from `parts` ([`walk_parts`] of `dst.len()` bytes); false
/// if they end before `dst` is full.
fn copy_parts(parts: &[Bytes], skip: u64, dst: &mut [u8]) -> bool {
    let mut at = 0;
    walk_parts(parts, skip, dst.len(), |p, r| {
        let n = r.len();
        dst[at..at + n].copy_from_slice(&p[r]);
        at += n;
    })
}

/// The runs of `parts` ([`walk_parts`] of `len` bytes), shared, not
/// copied; `None` if the parts end first.
fn share_parts(parts: &[Bytes], skip: u64, len: usize) -> Option<Vec<Bytes>> {
    let mut out = Vec::new();
    walk_parts(parts, skip, len, |p, r| out.push(p.slice(r))).then_some(out)
}

/// Block CRCs per cache window.
pub(super) const CRCS_PER_WINDOW: usize = (SLOT / CRC_BLOCK) as usize;

/// The cache's name for window `w` of chunk `info` of `volume`: the chunk
/// identity plus a tag over the data area's position and length, the
/// chunk's table CRC and the window number, so an entry of any other
/// object is a miss (cache invariant 1). Needs no CRC table: a cached
/// window is found and checked with no store access.
pub(super) fn window_id(volume: u64, info: &ChunkInfo, w: u64) -> WindowId {
    let mut buf = [0u8; 28];
    buf[..8].copy_from_slice(&info.data_start.to_le_bytes());
    buf[8..16].copy_from_slice(&info.data_len.to_le_bytes());
    buf[16..20].copy_from_slice(&info.table_crc.to_le_bytes());
    buf[20..28].copy_from_slice(&w.to_le_bytes());
    WindowId {
        volume,
        seq: info.seq,
        epoch: info.epoch,
        window: w,
        tag: crc32c::crc32c(&buf),
    }
}

/// The block CRCs of window `w` in the chunk's `table` (at most
/// [`CRCS_PER_WINDOW`]; fewer for a chunk's short last window).
pub(super) fn window_crcs(table: &[u32], w: u64) -> &[u32] {
    let first = usize::try_from(w)
        .unwrap_or(usize::MAX)
        .saturating_mul(CRCS_PER_WINDOW);
    let crcs = table.get(first..).unwrap_or(&[]);
    &crcs[..crcs.len().min(CRCS_PER_WINDOW)]
}

/// What the cache served of one chunk piece at once.
struct Cached {
    /// Data ranges it does not hold, in order, each a run of whole
    /// windows clipped to the piece.
    missing: Vec<Range<u64>>,
    /// Windows it holds but only on disk, not in the page cache: read off
    /// the frontend's thread ([`read_slow`]).
    deferred: Vec<Deferred>,
    /// Bytes served.
    served: u64,
}

/// A cached window to read later: the entry, and the data bytes
/// `[from, to)` of the request it serves, within CRC blocks `[a, b)`.
#[derive(Clone, Copy)]
struct Deferred {
    hit: Hit,
    window: u64,
    a: u64,
    b: u64,
    from: u64,
    to: u64,
}

/// Serve what the cache holds of request bytes `piece` (chunk data at
/// `off`) from staged prefetch windows or the page cache, window by
/// window, into `out`; windows only on disk are deferred, the
/// rest missing, each a run of whole missing windows clipped to the
/// request (an entry failing its CRC is dropped, counted and returned as
/// missing, so the caller refetches it from the store).
fn read_cached(
    inner: &Inner,
    volume: u64,
    info: &ChunkInfo,
    off: u64,
    out_to: &mut Out<'_>,
    piece: Range<usize>,
) -> Cached {
    let b0 = piece.start;
    let piece_len = piece.len();
    let end = off + piece_len as u64;
    let Some(cache) = &inner.cache else {
        return Cached {
            missing: std::iter::once(off..end).collect(),
            deferred: Vec::new(),
            served: 0,
        };
    };
    let (w0, w1) = windows(off, piece_len as u64, info.data_len);
    // Room for one window's CRC blocks read from the cache, allocated at
    // the first hit (a read served from prefetched memory or missing the
    // cache, as every read of a cold volume does, needs none).
    let mut blocks = Vec::new();
    let room = (SLOT as usize).min(piece_len + 2 * CRC_BLOCK as usize);
    let mut out = Cached {
        missing: Vec::new(),
        deferred: Vec::new(),
        served: 0,
    };
    for w in w0..w1 {
        let ws = w * SLOT;
        // The CRC blocks of this window that the request touches.
        let from = off.max(ws);
        let to = end.min(ws + SLOT);
        if let Some(win) = inner.fetches.take_staged(volume, info, w) {
            // Prefetched bytes not read yet, checked when fetched.
            let (s, e) = ((from - ws) as usize, (to - ws) as usize);
            if s <= e && e <= win.len() {
                let n = (e - s) as u64;
                out_to.put(b0 + (from - off) as usize, win.slice(s..e));
                out.served += n;
                inner
                    .counters
                    .prefetch_hit_bytes
                    .fetch_add(n, Ordering::Relaxed);
                continue;
            }
        }
        let (a, b) = aligned_range(from, to - from, info.data_len);
        let len = (b - a) as usize;
        let id = window_id(volume, info, w);
        let served = cache.lookup(&id, b - ws, from - ws..to - ws).map(|hit| {
            if blocks.is_empty() {
                blocks = vec![0u8; room];
            }
            let res = cache.read_hit(hit, a - ws, &mut blocks[..len], Wait::Never);
            (hit, res)
        });
        // What a hit read (nothing on a miss: `blocks` may be empty then).
        let got = blocks.get(..len).unwrap_or(&[]);
        let ok = match served {
            None | Some((_, Served::Failed)) => false,
            Some((hit, Served::WouldBlock)) => {
                out.deferred.push(Deferred {
                    hit,
                    window: w,
                    a,
                    b,
                    from,
                    to,
                });
                continue;
            }
            Some((hit, Served::Read)) => {
                checked_hit(inner, cache, volume, info, w, hit, a - ws, got)
            }
        };
        if !ok {
            match out.missing.last_mut() {
                Some(m) if m.end == from => m.end = to,
                _ => out.missing.push(from..to),
            }
            continue;
        }
        let n = (to - from) as usize;
        let s = (from - a) as usize;
        let at = b0 + (from - off) as usize;
        out_to.buf[at..at + n].copy_from_slice(&got[s..s + n]);
        out.served += n as u64;
    }
    out
}

/// Whether the bytes `got` that `hit` (window `w`) served from offset `a`
/// within the window pass the window's block CRCs the cache holds (kept
/// from a table verified against the chunk's table CRC); an entry that
/// fails is dropped and counted.
#[allow(clippy::too_many_arguments)]
fn checked_hit(
    inner: &Inner,
    cache: &Cache,
    volume: u64,
    info: &ChunkInfo,
    w: u64,
    hit: Hit,
    a: u64,
    got: &[u8],
) -> bool {
    let good = verify_blocks(hit.crcs(), a, got).is_ok();
    if !good && cache.discard(hit) {
        log::warn!(
            "read cache entry of {} (window {w}) failed its CRC check; refetching",
            chunk_key(volume, info.seq, info.epoch)
        );
        inner.counters.cache_corrupt.fetch_add(1, Ordering::Relaxed);
    }
    good
}

/// A read the page cache could not serve: a WAL record's bytes, or a
/// cached window's (of chunk piece number `piece`), for request bytes
/// `[b0, b1)`.
enum Slow {
    Wal {
        b0: usize,
        b1: usize,
        file: wal::fs::SegFile,
        loc: WalLoc,
    },
    Window {
        b0: usize,
        b1: usize,
        piece: usize,
        volume: u64,
        info: Arc<ChunkInfo>,
        w: Deferred,
    },
}

impl Slow {
    /// The request bytes `[b0, b1)` it fills.
    fn bytes(&self) -> (usize, usize) {
        match *self {
            Slow::Wal { b0, b1, .. } | Slow::Window { b0, b1, .. } => (b0, b1),
        }
    }
}

/// What reading a [`Slow`] piece off the frontend's thread gave.
enum SlowRead {
    /// The piece's bytes, checked.
    Data(Vec<u8>),
    /// A cached window gone or unreadable since the lookup: a miss.
    Missing,
    /// A cached window failing its CRC: dropped, a miss.
    Corrupt,
}

/// Read every slow piece on the blocking pool, in parallel, so no
/// frontend thread waits for the disk.
async fn read_slow(inner: &Inner, slow: &[Slow]) -> Vec<Result<SlowRead, BlockError>> {
    let mut waits = Vec::with_capacity(slow.len());
    for item in slow {
        let job: Box<dyn FnOnce() -> Result<SlowRead, BlockError> + Send> = match item {
            Slow::Wal { b0, b1, file, loc } => {
                let (file, loc, len) = (file.clone(), *loc, b1 - b0);
                Box::new(move || {
                    let mut data = vec![0u8; len];
                    wal::read_record(file.as_ref(), &loc, loc.seg, &mut data)?;
                    Ok(SlowRead::Data(data))
                })
            }
            Slow::Window {
                volume, info, w, ..
            } => {
                let Some(cache) = inner.cache.clone() else {
                    waits.push(futures::future::ready(Ok(SlowRead::Missing)).boxed());
                    continue;
                };
                let (volume, info, w) = (*volume, info.clone(), *w);
                Box::new(move || Ok(read_deferred(&cache, volume, &info, &w)))
            }
        };
        let (tx, rx) = oneshot::channel();
        inner.rt.spawn_blocking(move || {
            let _ = tx.send(job());
        });
        waits.push(async move { rx.await.unwrap_or(Err(BlockError::Closed)) }.boxed());
    }
    futures::future::join_all(waits).await
}

/// Read deferred window `w` of chunk `info` of `volume` from the cache,
/// waiting for the disk, and check it (blocking: on the blocking pool).
fn read_deferred(cache: &Cache, volume: u64, info: &ChunkInfo, w: &Deferred) -> SlowRead {
    let mut got = vec![0u8; (w.b - w.a) as usize];
    let ws = w.window * SLOT;
    if cache.read_hit(w.hit, w.a - ws, &mut got, Wait::Block) != Served::Read {
        return SlowRead::Missing;
    }
    if verify_blocks(w.hit.crcs(), w.a - ws, &got).is_err() {
        if !cache.discard(w.hit) {
            // The slot was reused since the lookup: not this entry's fault.
            return SlowRead::Missing;
        }
        log::warn!(
            "read cache entry of {} (window {}) failed its CRC check; refetching",
            chunk_key(volume, info.seq, info.epoch),
            w.window
        );
        return SlowRead::Corrupt;
    }
    let s = (w.from - w.a) as usize;
    got.truncate(s + (w.to - w.from) as usize);
    got.drain(..s);
    SlowRead::Data(got)
}

/// Cache windows `[w0, w1)` covering data bytes `[off, off+len)`.
pub(super) fn windows(off: u64, len: u64, data_len: u64) -> (u64, u64) {
    let end = (off + len).min(data_len);
    (off / SLOT, end.div_ceil(SLOT))
}

/// [`fetch`], retrying transient store errors (with backoff) until
/// `budget` has passed; then the last error, or a timeout, is returned
/// (the read fails with EIO). Other errors are returned at once.
#[allow(clippy::too_many_arguments)]
pub(super) async fn fetch_within(
    budget: std::time::Duration,
    store: crate::store::DynStore,
    tables: &Arc<CrcTables>,
    volume: u64,
    key: String,
    info: Arc<ChunkInfo>,
    start: u64,
    end: u64,
) -> Result<(Bytes, Table), StoreOrCrc> {
    let attempts = async {
        let mut backoff = std::time::Duration::from_millis(10);
        loop {
            match fetch(&store, tables, volume, &key, &info, start, end).await {
                Err(StoreOrCrc::Store(e)) if e.is_transient() => {
                    log::warn!("reading {key} failed (will retry): {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                }
                other => return other,
            }
        }
    };
    match tokio::time::timeout(budget, attempts).await {
        Ok(res) => res,
        Err(_) => Err(StoreOrCrc::Store(StoreError::Transient(format!(
            "no answer within store_read_timeout_ms = {}",
            budget.as_millis()
        )))),
    }
}

/// Fetch and verify chunk data `[start, end)` (block aligned) against the
/// chunk's CRC table; returns the verified bytes and the table.
///
/// The table comes from `tables`; a cold chunk costs no extra round trip
/// for it: a range from the data area's start is read with the header in
/// one GET ([`CrcTables::get_with_data`]), any other range is read while
/// the header GET runs, and checked once both are in.
async fn fetch(
    store: &crate::store::DynStore,
    tables: &Arc<CrcTables>,
    volume: u64,
    key: &str,
    info: &ChunkInfo,
    start: u64,
    end: u64,
) -> Result<(Bytes, Table), StoreOrCrc> {
    let get_data = || async {
        store
            .get_range(key, info.data_start + start..info.data_start + end)
            .await
            .map_err(StoreOrCrc::Store)
    };
    let (table, data) = match tables.cached(volume, info) {
        Some(table) => (table, get_data().await?),
        None if start == 0 => {
            let (table, with_header) = tables
                .get_with_data(store, volume, info, end)
                .await
                .map_err(StoreOrCrc::from)?;
            match with_header {
                Some(data) => (table, data),
                // Another reader's GET brought the table: read the data.
                None => (table, get_data().await?),
            }
        }
        None => {
            let (table, data) = futures::join!(tables.get(store, volume, info), get_data());
            (table.map_err(StoreOrCrc::from)?, data?)
        }
    };
    if data.len() as u64 != end - start {
        return Err(StoreOrCrc::Store(StoreError::Permanent(format!(
            "{key}: read {} bytes of data where {} were asked for",
            data.len(),
            end - start
        ))));
    }
    verify_blocks(&table, start, &data).map_err(|e| StoreOrCrc::Crc(e.to_string()))?;
    Ok((data, table))
}

impl From<TableError> for StoreOrCrc {
    fn from(e: TableError) -> Self {
        match e.store_error() {
            Some(s) => StoreOrCrc::Store(s),
            None => StoreOrCrc::Crc(e.to_string()),
        }
    }
}

pub(super) enum StoreOrCrc {
    Store(StoreError),
    Crc(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_parts_takes_the_right_bytes_across_parts() {
        let all: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        let parts: Vec<Bytes> = [0..100, 100..130, 130..300]
            .into_iter()
            .map(|r| Bytes::copy_from_slice(&all[r]))
            .collect();
        for skip in [0usize, 1, 99, 100, 129, 130, 200] {
            for len in [0usize, 1, 30, 300 - skip] {
                let mut dst = vec![0xffu8; len];
                assert!(copy_parts(&parts, skip as u64, &mut dst), "{skip}+{len}");
                assert_eq!(dst, &all[skip..skip + len], "{skip}+{len}");
            }
        }
        let mut dst = vec![0u8; 2];
        assert!(!copy_parts(&parts, 299, &mut dst), "past the end");
        assert!(!copy_parts(&parts, 1000, &mut dst), "far past the end");
    }
}
