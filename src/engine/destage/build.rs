//! Building one chunk object from a run of WAL records, meant for the
//! blocking pool: one read per segment the records live in (a span, see
//! [`wal::span`]), newest-wins resolution ([`super::newest`]), and one copy
//! of each live byte, from the span straight into the object
//! ([`chunk::encode_into`]), a buffer of the body pool.
//!
//! Invariants:
//! 1. Every byte put in the chunk passed the WAL CRCs covering it.
//! 2. All-zero sectors are stored as unmapped extents, never as data.
//! 3. The same records always build the same bytes (a retried build of a
//!    chunk whose put may have landed is recognised as identical).

use std::collections::HashMap;

use bytes::Bytes;

use super::newest::{resolve, Piece};
use crate::engine::error::EngineError;
use crate::engine::format::chunk::{self, ChunkExtent, ChunkHeader};
use crate::engine::format::layout::chunk_key;
use crate::engine::state::PendingRec;
use crate::engine::wal::record::RecordKind;
use crate::engine::wal::span::{extent_of, read_span, record_in_span, Span};
use crate::engine::wal::{self, fs::SegFile};
use crate::engine::SECTOR;
use crate::store::aligned::PooledBuf;

/// The records of one chunk and the segment files holding their data.
#[derive(Debug)]
pub(super) struct Batch {
    pub seq: u64,
    pub recs: Vec<PendingRec>,
    pub files: HashMap<u64, SegFile>,
    /// Bytes the records count against the unstored bound.
    pub cost: u64,
}

/// The encoded chunk and its extents.
#[derive(Debug)]
pub(super) struct Object {
    pub bytes: Bytes,
    pub extents: Vec<ChunkExtent>,
    pub last_seq: u64,
}

/// Build chunk `b.seq` of `volume` in `epoch` from `b`'s records.
pub(super) fn build(volume: u64, epoch: u64, b: &Batch) -> Result<Object, EngineError> {
    let (Some(first), Some(last)) = (b.recs.first(), b.recs.last()) else {
        return Err(EngineError::LocalIo("empty destage batch".into()));
    };
    let ranges: Vec<(u64, u64)> = b.recs.iter().map(|r| (r.lba, r.sectors)).collect();
    let pieces = resolve(&ranges);
    let spans = read_spans(b, &pieces)?;
    let mut plan = Plan::default();
    for p in &pieces {
        let r = &b.recs[p.rec];
        match (r.kind, r.loc) {
            (RecordKind::Write, Some(w)) => {
                let span = spans.get(&w.seg).ok_or(wal::WalError::SegmentGone(w.seg))?;
                let loc = crate::engine::map::WalLoc {
                    skip: w.skip + p.off,
                    ..w
                };
                let part = record_in_span(span, &loc, p.sectors)?;
                plan.data(p.lba, part);
            }
            _ => plan.zero(p.lba, p.sectors),
        }
    }
    let key = || chunk_key(volume, b.seq, epoch);
    let header = ChunkHeader {
        volume,
        epoch,
        chunk_seq: b.seq,
        first_seq: first.seq,
        last_seq: last.seq,
        extents: plan.extents,
        block_crcs: Vec::new(),
        data_len: plan.data_len as u64,
        header_len: 0,
    };
    // The object's buffer comes from the body pool (its own huge-page
    // mapping at chunk size, used again once the put is done) rather than
    // the allocator, whose arenas kept the freed chunk buffers of every
    // build thread resident.
    let mut buf = PooledBuf::take(chunk::encoded_len(&header, plan.data_len));
    chunk::encode_into(&header, &plan.parts, buf.bytes_mut())
        .map_err(|source| EngineError::Chunk { key: key(), source })?;
    let bytes = buf.freeze();
    Ok(Object {
        bytes,
        extents: header.extents,
        last_seq: last.seq,
    })
}

/// One read per segment: the range holding every record a piece uses.
fn read_spans(b: &Batch, pieces: &[Piece]) -> Result<HashMap<u64, Span>, EngineError> {
    let mut want: HashMap<u64, (u64, u64)> = HashMap::new();
    for p in pieces {
        let r = &b.recs[p.rec];
        let (RecordKind::Write, Some(w)) = (r.kind, r.loc) else {
            continue;
        };
        let (s, e) = extent_of(&w).ok_or(wal::WalError::Corrupt {
            seg: w.seg,
            off: w.data_off,
        })?;
        let range = want.entry(w.seg).or_insert((s, e));
        *range = (range.0.min(s), range.1.max(e));
    }
    let mut spans = HashMap::with_capacity(want.len());
    for (seg, (s, e)) in want {
        let file = b.files.get(&seg).ok_or(wal::WalError::SegmentGone(seg))?;
        spans.insert(seg, read_span(file.as_ref(), seg, s, e)?);
    }
    Ok(spans)
}

/// The extents and data parts of a chunk, in LBA order, adjacent extents
/// of the same kind (zero, or data that follows on in the data area)
/// merged.
#[derive(Default)]
struct Plan<'a> {
    extents: Vec<ChunkExtent>,
    parts: Vec<&'a [u8]>,
    data_len: usize,
}

impl<'a> Plan<'a> {
    fn zero(&mut self, lba: u64, sectors: u64) {
        if let Some(e) = self.extents.last_mut() {
            if e.data_off.is_none() && e.lba + e.sectors == lba {
                e.sectors += sectors;
                return;
            }
        }
        self.extents.push(ChunkExtent {
            lba,
            sectors,
            data_off: None,
        });
    }

    fn nonzero(&mut self, lba: u64, part: &'a [u8]) {
        let off = self.data_len as u64;
        let sectors = part.len() as u64 / SECTOR;
        self.parts.push(part);
        self.data_len += part.len();
        if let Some(e) = self.extents.last_mut() {
            if e.lba + e.sectors == lba && e.data_off.map(|o| o + e.sectors * SECTOR) == Some(off) {
                e.sectors += sectors;
                return;
            }
        }
        self.extents.push(ChunkExtent {
            lba,
            sectors,
            data_off: Some(off),
        });
    }

    /// Sectors at `lba` holding `part`: runs of all-zero sectors become
    /// zero extents (invariant 2), the rest data.
    fn data(&mut self, lba: u64, part: &'a [u8]) {
        let s = SECTOR as usize;
        let n = part.len() / s;
        let mut i = 0;
        while i < n {
            let zero = is_zero(&part[i * s..(i + 1) * s]);
            let mut j = i + 1;
            while j < n && is_zero(&part[j * s..(j + 1) * s]) == zero {
                j += 1;
            }
            if zero {
                self.zero(lba + i as u64, (j - i) as u64);
            } else {
                self.nonzero(lba + i as u64, &part[i * s..j * s]);
            }
            i = j;
        }
    }
}

/// All bytes zero (no early exit, so it vectorises).
fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, &x| acc | x) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_merges_and_unmaps_zero_sectors() {
        let mut d = vec![1u8; 4 * 512];
        d[512..1024].fill(0);
        let z = vec![0u8; 512];
        let mut p = Plan::default();
        p.data(10, &d); // 10 data, 11 zero, 12-13 data
        p.zero(14, 2); // merges with nothing (13 is data)
        p.data(16, &z); // zero, merges with 14-15
        p.data(18, &d[..512]); // data, not adjacent to 13
        p.data(19, &d[2048 - 512..]); // adjacent, follows on in the data area
        let ext: Vec<(u64, u64, Option<u64>)> = p
            .extents
            .iter()
            .map(|e| (e.lba, e.sectors, e.data_off))
            .collect();
        assert_eq!(
            ext,
            vec![
                (10, 1, Some(0)),
                (11, 1, None),
                (12, 2, Some(512)),
                (14, 3, None),
                (18, 2, Some(1536)),
            ]
        );
        assert_eq!(p.data_len, 2560);
        assert_eq!(p.parts.iter().map(|x| x.len()).sum::<usize>(), 2560);
    }
}
