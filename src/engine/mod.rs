//! The volume engine: WAL, extent map, destage into chunk objects, read path,
//! read cache, checkpoints, recovery and garbage collection. It knows nothing
//! of ublk or NBD; frontends drive it through [`BlockDevice`].
//!
//! Layout of one volume:
//! - local: `<local_dir>/wal/<segment:016x>.wal` (WAL segments, see
//!   [`wal`]), `<local_dir>/cache/{data,index,owner,lock}` (read cache, kept
//!   across opens, see [`cache`]; or under `engine.cache_dir`),
//!   `<local_dir>/wal.quarantine-e<epoch>-<secs>/` (a WAL that did not
//!   extend the store's history, never applied; see `wal_open.rs`) and
//!   `<local_dir>/wal.discarded-<secs>/` (copies kept by
//!   [`wal::discard`]);
//! - store: `volumes/<id:016x>/manifest` (root, compare-and-swap only),
//!   `volumes/<id:016x>/chunks/` (immutable chunk objects, see
//!   [`format::chunk`]),
//!   `volumes/<id:016x>/compacted/` (compaction objects: live data of
//!   sparse chunks, high-bit ids outside the chunk sequence, see
//!   `compact.rs`), `volumes/<id:016x>/checkpoints/` (serialized
//!   store-side map, see [`checkpoint`]), `volumes/<id:016x>/snapshots/`
//!   (see [`snapshot`]); every key is spelled and parsed in
//!   [`format::layout`],
//!   which lists them all. A clone's manifest names its parent snapshot;
//!   unmapped ranges read through to it (see [`clone`]).
//!
//! Data flow: write → WAL record (group commit) → live map points at the
//! WAL → destage packs records into a chunk → put → maps point at the chunk
//! and the WAL segment is released → every `checkpoint_every_chunks` chunks
//! a checkpoint plus manifest swap, after which dead chunks are deleted.
//! Recovery: manifest → checkpoint → later chunks in order up to the first
//! gap (a chunk missing from the listing is read directly first) → WAL
//! records newer than the store. Every number read back is checked first
//! ([`format::limits`]).
//!
//! The modules form layers whose imports point one way, bottom first:
//! [`format`](mod@format) (chunk ids and bounds, object keys, the chunk codec),
//! [`map`], [`wal`], the metadata codecs ([`checkpoint`], [`crc_table`]),
//! [`cache`] and [`space`], [`error`], the metadata store I/O ([`capped`],
//! [`meta`]: the manifest store and checkpoint chain, `fenced_delete`),
//! stored snapshots ([`snapshot::store`], [`retain_index`], [`view`],
//! [`diff`]), snapshot operations on a stored volume ([`snapshot`],
//! `compaction_gc`), detached volume tools ([`usage`], [`scrub`]), an open
//! volume's state (`task_request`, `state`, `read_state`), its core
//! (`volume_core`: what its tasks and request paths share), the request
//! paths (`read`, `inflight`, `prefetch`, [`warm_start`],
//! `space_admission`, `wal_open`), test and bench aids, compaction and
//! checkpoint commits, open-volume snapshots and recovery, the background
//! tasks (`destage`, `meta::task`), and on top the façade ([`volume`],
//! [`clone`]). No layer imports a higher one, and no units import each
//! other in a cycle.
//! `tests/engine_layers.rs` holds the table and enforces it.

use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BlockError;

mod allocation;
pub mod bench_support;
pub mod cache;
pub mod capped;
pub mod checkpoint;
pub mod clone;
mod commit;
mod compact;
mod compaction_gc;
pub mod config;
pub mod crc_table;
pub mod damage;
mod destage;
pub mod diff;
pub mod error;
mod fenced_delete;
pub mod format;
mod inflight;
pub mod live;
mod live_snapshot;
pub mod map;
pub mod memdisk;
pub mod meta;
pub mod payload_pool;
mod prefetch;
mod read;
mod read_state;
mod recovery;
pub mod retain_index;
pub mod scrub;
pub mod snapshot;
pub mod space;
mod space_admission;
mod state;
mod task_request;
pub mod usage;
pub mod view;
pub mod volume;
mod volume_core;
pub mod wal;
mod wal_open;
pub mod warm_start;

pub use allocation::{Allocation, Extent};
pub use error::EngineError;
pub use volume::{Volume, VolumeStats};
pub use volume_core::VolumeParams;

/// Bytes per sector: the addressing unit of every request.
pub const SECTOR: u64 = 512;

/// The block-device API every frontend speaks. Offsets and lengths are in
/// bytes and must be multiples of [`SECTOR`].
///
/// # Contract
/// 1. A `write` that returned `Ok` is visible to every later `read`
///    (read-your-writes), on any connection or queue.
/// 2. After `flush` returns `Ok`, every write that returned `Ok` before the
///    flush was called survives a crash of the process or the host.
///    A `write` with `fua = true` is durable when it returns `Ok`.
/// 3. `trim` and `write_zeroes` make the range read as zeros; `trim` may
///    release space.
/// 4. Out-of-range or misaligned requests fail with
///    [`BlockError::OutOfRange`] / [`BlockError::InvalidArgument`] and change
///    nothing. `flush` has no range and is never bounds-checked.
/// 5. The futures are runtime-agnostic: they can be polled by tokio or by a
///    ublk queue's own executor, and never block the polling thread for long.
#[async_trait]
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes (a multiple of [`SECTOR`]).
    fn size(&self) -> u64;
    /// Fill `buf` with the bytes at `offset`. On `Ok`, every byte of `buf`
    /// was written: callers may pass a reused buffer holding stale bytes
    /// (the NBD server does, [`crate::frontend::nbd::buffers`]).
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// [`BlockDevice::read`] of `buf.len()` bytes at `offset` into a
    /// buffer the caller lends (it may hold stale bytes), answered as
    /// [`ReadParts`]: runs of that buffer and bytes the device shares
    /// instead of copying them (data it fetched and checked), so a frontend
    /// can send them as they are. Same contract and errors as `read`; the
    /// default reads into the whole buffer.
    async fn read_parts(&self, offset: u64, mut buf: Vec<u8>) -> Result<ReadParts, BlockError> {
        self.read(offset, &mut buf).await?;
        Ok(ReadParts::whole(buf))
    }
    /// Write `data` at `offset`; durable on return when `fua`.
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError>;
    /// [`BlockDevice::write`] of a buffer the caller gives away, so a
    /// device that keeps the bytes (a WAL record) need not copy them. Same
    /// contract as `write`; the default lends the buffer to it.
    async fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        self.write(offset, &data, fua).await
    }
    /// Make every completed write durable.
    async fn flush(&self) -> Result<(), BlockError>;
    /// Discard a range: it reads as zeros afterwards and its space may be freed.
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Zero a range (stored as unmapped, or in a clone as a zero range that
    /// hides the parent; either way it takes no space).
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError>;

    /// How `[offset, offset+len)` is stored, without reading data: runs in
    /// order, each at least one sector, that cover a prefix of the range
    /// (all of it unless `max_runs` runs did not suffice; at least one run
    /// when `len > 0`), adjacent runs differing in [`Allocation`]. Checked
    /// like a read. The default says "data" for the whole range, which is
    /// always a safe answer (see [`Allocation`]).
    fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        check_range(offset, len, self.size())?;
        let _ = max_runs;
        Ok(Extent::whole(len, Allocation::Data))
    }
}

/// The bytes of one read ([`BlockDevice::read_parts`]), in order: runs of
/// the buffer the caller lent, and shared bytes.
///
/// Invariant: the parts cover the read exactly once, in order (every byte
/// of it is in one part, and the parts' lengths sum to its length).
#[derive(Debug, Default)]
pub struct ReadParts {
    buf: Vec<u8>,
    parts: Vec<ReadPart>,
}

#[derive(Debug)]
enum ReadPart {
    /// A run of the lent buffer.
    Lent(Range<usize>),
    Shared(Bytes),
}

impl ReadParts {
    /// All of `buf`, as one part (none when it is empty).
    pub fn whole(buf: Vec<u8>) -> ReadParts {
        let parts = if buf.is_empty() {
            Vec::new()
        } else {
            vec![ReadPart::Lent(0..buf.len())]
        };
        ReadParts { buf, parts }
    }

    /// The read of `buf.len()` bytes whose byte ranges starting at the
    /// offsets of `shared` are those shared bytes and whose other bytes are
    /// `buf`'s. `None` if a shared run overlaps another or ends past
    /// `buf.len()` (the caller's bug: nothing is guessed).
    pub fn with_shared(buf: Vec<u8>, mut shared: Vec<(usize, Bytes)>) -> Option<ReadParts> {
        shared.sort_by_key(|(at, _)| *at);
        let mut parts = Vec::with_capacity(2 * shared.len() + 1);
        let mut at = 0;
        for (start, bytes) in shared {
            if start < at {
                return None;
            }
            if start > at {
                parts.push(ReadPart::Lent(at..start));
            }
            at = start.checked_add(bytes.len())?;
            if !bytes.is_empty() {
                parts.push(ReadPart::Shared(bytes));
            }
        }
        if at > buf.len() {
            return None;
        }
        if at < buf.len() {
            parts.push(ReadPart::Lent(at..buf.len()));
        }
        Some(ReadParts { buf, parts })
    }

    /// Bytes of the read.
    pub fn len(&self) -> usize {
        self.slices().map(<[u8]>::len).sum()
    }

    /// Whether the read has no bytes.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The parts' bytes, in order.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.parts.iter().map(|p| match p {
            ReadPart::Lent(r) => &self.buf[r.clone()],
            ReadPart::Shared(b) => &b[..],
        })
    }

    /// Number of parts.
    pub fn count(&self) -> usize {
        self.parts.len()
    }

    /// The whole read in one buffer (copies the shared parts).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for s in self.slices() {
            out.extend_from_slice(s);
        }
        out
    }

    /// The lent buffer back (to be lent again), shared parts dropped.
    pub fn into_buf(self) -> Vec<u8> {
        self.buf
    }
}

/// Check alignment and bounds of a ranged request against a device size.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
        return Err(BlockError::InvalidArgument(format!(
            "offset {offset} and length {len} must be multiples of {SECTOR}"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_parts_cover_the_read_in_order() {
        let buf: Vec<u8> = (0..100u8).collect();
        let shared = vec![
            (60, Bytes::from_static(&[200; 10])),
            (0, Bytes::from_static(&[201; 5])),
            (70, Bytes::from_static(&[202; 30])),
        ];
        let parts = ReadParts::with_shared(buf.clone(), shared).unwrap();
        let mut want = buf.clone();
        want[60..70].fill(200);
        want[..5].fill(201);
        want[70..].fill(202);
        assert_eq!(parts.len(), 100);
        assert_eq!(parts.to_vec(), want);
        assert_eq!(parts.count(), 4, "{parts:?}");
        assert_eq!(parts.into_buf(), buf, "the lent buffer comes back");
        let whole = ReadParts::whole(vec![7; 9]);
        assert_eq!((whole.len(), whole.count()), (9, 1));
        assert!(ReadParts::whole(Vec::new()).is_empty());
    }

    #[test]
    fn read_parts_refuse_overlaps_and_overruns() {
        let b = |n| Bytes::from(vec![1u8; n]);
        assert!(ReadParts::with_shared(vec![0; 10], vec![(0, b(6)), (5, b(2))]).is_none());
        assert!(ReadParts::with_shared(vec![0; 10], vec![(8, b(3))]).is_none());
        assert!(ReadParts::with_shared(vec![0; 10], vec![(usize::MAX, b(3))]).is_none());
        let exact = ReadParts::with_shared(vec![0; 10], vec![(0, b(10))]).unwrap();
        assert_eq!((exact.len(), exact.count()), (10, 1));
    }

    #[test]
    fn range_checks() {
        assert!(check_range(0, 4096, 4096).is_ok());
        assert!(check_range(512, 0, 512).is_ok());
        assert!(matches!(
            check_range(1, 512, 4096),
            Err(BlockError::InvalidArgument(_))
        ));
        assert!(matches!(
            check_range(4096, 512, 4096),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(u64::MAX - 511, 1024, u64::MAX),
            Err(BlockError::OutOfRange { .. })
        ));
    }
}
