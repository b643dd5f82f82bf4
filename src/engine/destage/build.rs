//! Building one chunk object from a run of WAL records, meant for the
//! blocking pool: the records' bytes shared from the WAL's tail in memory
//! when it holds them all, else one read per segment the records live in
//! (a span, see [`wal::span`]); newest-wins resolution
//! ([`super::newest`]); and the object as a [`Body`]: the header
//! ([`chunk::encode_head`]), then each live run of bytes shared from the
//! buffer it was read into (the tail's or a span's), never copied into a
//! buffer of its own; the store writes them from there.
//!
//! Invariants:
//! 1. Every byte put in the chunk passed the WAL CRCs covering it, or
//!    carries them into the chunk: a record the WAL's tail holds in
//!    memory (the very bytes its CRCs were computed over, never read
//!    back from a disk) is checked only where the chunk does not take
//!    its block CRCs; where it does, every read of the chunk checks them.
//! 2. All-zero sectors are stored as unmapped extents, never as data.
//! 3. The same records always build the same bytes (a retried build of a
//!    chunk whose put may have landed is recognised as identical).

use std::collections::HashMap;
use std::ops::Range;

use bytes::Bytes;

use super::newest::{resolve, Piece};
use crate::engine::error::EngineError;
use crate::engine::format::chunk::{self, ChunkExtent, ChunkHeader, Part};
use crate::engine::state::PendingRec;
use crate::engine::wal::record::RecordKind;
use crate::engine::wal::span::{
    extent_of, read_span, record_in_span, record_part, record_shared, Check, Checked, Span,
};
use crate::engine::wal::{self, fs::SegFile};
use crate::engine::SECTOR;
use crate::store::Body;

// The WAL's CRC blocks are the chunk's: a record's checked CRCs serve as
// the chunk's where the data lands on a block of the data area.
const _: () = assert!(crate::engine::wal::record::BLOCK as u64 == chunk::CRC_BLOCK);

/// The records of one chunk and the segment files holding their data.
#[derive(Debug)]
pub(super) struct Batch {
    pub seq: u64,
    pub recs: Vec<PendingRec>,
    pub files: HashMap<u64, SegFile>,
    /// Bytes the records count against the unstored bound.
    pub cost: u64,
}

/// The encoded chunk (its header is the body's first part) and its
/// extents.
#[derive(Debug)]
pub(super) struct Object {
    pub body: Body,
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
    // The newest records are all in memory, as a rule: then no read and
    // no copy; else one read per segment.
    let shared = shared_records(b, &pieces);
    let spans = match shared {
        Some(_) => HashMap::new(),
        None => read_spans(b, &pieces)?,
    };
    let mut plan = Plan::default();
    for p in &pieces {
        let r = &b.recs[p.rec];
        match (r.kind, r.loc) {
            (RecordKind::Write, Some(w)) => {
                let loc = crate::engine::map::WalLoc {
                    skip: w.skip + p.off,
                    ..w
                };
                match &shared {
                    Some(records) => {
                        let (table, data) = records
                            .get(&(w.seg, w.data_off))
                            .ok_or(wal::WalError::SegmentGone(w.seg))?;
                        let part =
                            record_part(w.seg, &loc, table, data, p.sectors, Check::TableOnly)?;
                        let carried = plan.data(p.lba, part, data);
                        check_uncarried(w.seg, &loc, table, data, p.sectors, &carried)?;
                    }
                    None => {
                        let span = spans.get(&w.seg).ok_or(wal::WalError::SegmentGone(w.seg))?;
                        plan.data(p.lba, record_in_span(span, &loc, p.sectors)?, &span.buf);
                    }
                }
            }
            _ => plan.zero(p.lba, p.sectors),
        }
    }
    let header = ChunkHeader {
        volume,
        epoch,
        chunk_seq: b.seq,
        first_seq: first.seq,
        last_seq: last.seq,
        extents: std::mem::take(&mut plan.extents),
        block_crcs: Vec::new(),
        data_len: plan.data_len as u64,
        header_len: 0,
    };
    let mut body = Body::new();
    if super::stream::streamed(&b.recs) {
        body.mark_streamed();
    }
    body.push(Bytes::from(chunk::encode_head(&header, &plan.parts)));
    plan.share_data(&mut body);
    Ok(Object {
        body,
        extents: header.extents,
        last_seq: last.seq,
    })
}

/// Check the bytes of the piece `sectors` at `loc` that lie outside the
/// `carried` ranges (bytes into the piece, in order), whose block CRCs the
/// chunk takes (invariant 1).
fn check_uncarried(
    seg: u64,
    loc: &crate::engine::map::WalLoc,
    table: &[u8],
    data: &[u8],
    sectors: u64,
    carried: &[Range<usize>],
) -> Result<(), EngineError> {
    let s = SECTOR as usize;
    let check = |from: usize, to: usize| -> Result<(), EngineError> {
        if to > from {
            let sub = crate::engine::map::WalLoc {
                skip: loc.skip + (from / s) as u64,
                ..*loc
            };
            record_part(
                seg,
                &sub,
                table,
                data,
                ((to - from) / s) as u64,
                Check::Data,
            )?;
        }
        Ok(())
    };
    let mut at = 0usize;
    for r in carried {
        check(at, r.start)?;
        at = r.end;
    }
    check(at, sectors as usize * s)
}

/// The CRC table and data of every record a piece uses, by segment and
/// data offset, shared from memory without a copy; `None` unless memory
/// holds all of them.
fn shared_records(b: &Batch, pieces: &[Piece]) -> Option<HashMap<(u64, u64), (Bytes, Bytes)>> {
    let mut records = HashMap::new();
    for p in pieces {
        let r = &b.recs[p.rec];
        let (RecordKind::Write, Some(w)) = (r.kind, r.loc) else {
            continue;
        };
        if let std::collections::hash_map::Entry::Vacant(e) = records.entry((w.seg, w.data_off)) {
            e.insert(record_shared(b.files.get(&w.seg)?.as_ref(), &w)?);
        }
    }
    Some(records)
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
/// merged. A part carries the WAL's checked CRCs of its leading whole
/// blocks, so encoding need not compute them again, and `owners[i]` is
/// the buffer `parts[i]` lies in.
#[derive(Default)]
struct Plan<'a> {
    extents: Vec<ChunkExtent>,
    parts: Vec<Part<'a>>,
    owners: Vec<&'a Bytes>,
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

    /// Put `part` at `lba`; returns how many of its bytes take the CRCs
    /// it carries.
    fn nonzero(&mut self, lba: u64, part: Part<'a>, owner: &'a Bytes) -> usize {
        let carried = part.reused_blocks(self.data_len) * chunk::CRC_BLOCK as usize;
        let off = self.data_len as u64;
        let sectors = part.data.len() as u64 / SECTOR;
        self.parts.push(part);
        self.owners.push(owner);
        self.data_len += part.data.len();
        if let Some(e) = self.extents.last_mut() {
            if e.lba + e.sectors == lba && e.data_off.map(|o| o + e.sectors * SECTOR) == Some(off) {
                e.sectors += sectors;
                return carried;
            }
        }
        self.extents.push(ChunkExtent {
            lba,
            sectors,
            data_off: Some(off),
        });
        carried
    }

    /// Sectors at `lba` holding `part`, which lies in `owner`: runs of
    /// all-zero sectors become zero extents (invariant 2), the rest data.
    /// A data run beginning on a block of `part` takes the CRCs of the
    /// blocks from there on. Returns the byte ranges of `part` (in order)
    /// whose CRCs the chunk takes.
    fn data(&mut self, lba: u64, part: Checked<'a>, owner: &'a Bytes) -> Vec<Range<usize>> {
        let mut carried = Vec::new();
        let s = SECTOR as usize;
        let bytes = part.data;
        let n = bytes.len() / s;
        let mut i = 0;
        while i < n {
            let zero = is_zero(&bytes[i * s..(i + 1) * s]);
            let mut j = i + 1;
            while j < n && is_zero(&bytes[j * s..(j + 1) * s]) == zero {
                j += 1;
            }
            if zero {
                self.zero(lba + i as u64, (j - i) as u64);
            } else {
                let block_crcs = match (i * s) % chunk::CRC_BLOCK as usize {
                    0 => {
                        let from = (i * s) / chunk::CRC_BLOCK as usize * 4;
                        part.block_crcs.get(from..).unwrap_or(&[])
                    }
                    _ => &[],
                };
                let n = self.nonzero(
                    lba + i as u64,
                    Part {
                        data: &bytes[i * s..j * s],
                        block_crcs,
                    },
                    owner,
                );
                if n > 0 {
                    carried.push(i * s..i * s + n);
                }
            }
            i = j;
        }
        carried
    }

    /// Append the data area to `body`, each part shared from its owner
    /// (no copy); parts that follow on in one owner go as one.
    fn share_data(&self, body: &mut Body) {
        let mut run: Option<(&Bytes, Range<usize>)> = None;
        for (part, &owner) in self.parts.iter().zip(&self.owners) {
            let len = part.data.len();
            let start = (part.data.as_ptr() as usize)
                .checked_sub(owner.as_ptr() as usize)
                .filter(|s| s + len <= owner.len());
            let Some(start) = start else {
                // Not inside its owner after all: copied, so never wrong.
                if let Some((o, r)) = run.take() {
                    body.push(o.slice(r));
                }
                body.push(Bytes::copy_from_slice(part.data));
                continue;
            };
            let range = start..start + len;
            match &mut run {
                Some((o, r)) if std::ptr::eq(*o, owner) && r.end == range.start => {
                    r.end = range.end
                }
                _ => {
                    if let Some((o, r)) = run.replace((owner, range)) {
                        body.push(o.slice(r));
                    }
                }
            }
        }
        if let Some((o, r)) = run {
            body.push(o.slice(r));
        }
    }
}

/// All bytes zero. A data sector nearly always has a nonzero byte among
/// its first 16, so those are looked at first; only a sector that begins
/// with zeros is scanned whole (with no early exit, so it vectorises).
fn is_zero(b: &[u8]) -> bool {
    let head = b.len().min(16);
    let or = |s: &[u8]| s.iter().fold(0u8, |acc, &x| acc | x);
    or(&b[..head]) == 0 && or(&b[head..]) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unchecked(data: &[u8]) -> Checked<'_> {
        Checked {
            data,
            block_crcs: &[],
        }
    }

    #[test]
    fn a_sector_is_zero_only_when_every_byte_is() {
        assert!(is_zero(&[0u8; 512]));
        assert!(is_zero(&[]));
        for at in [0, 15, 16, 17, 300, 511] {
            let mut s = [0u8; 512];
            s[at] = 0x80;
            assert!(!is_zero(&s), "nonzero byte at {at}");
        }
        assert!(!is_zero(&[0, 0, 1]));
    }

    #[test]
    fn plan_merges_and_unmaps_zero_sectors() {
        let mut d = vec![1u8; 4 * 512];
        d[512..1024].fill(0);
        let d = Bytes::from(d);
        let z = Bytes::from(vec![0u8; 512]);
        let mut p = Plan::default();
        p.data(10, unchecked(&d), &d); // 10 data, 11 zero, 12-13 data
        p.zero(14, 2); // merges with nothing (13 is data)
        p.data(16, unchecked(&z), &z); // zero, merges with 14-15
        p.data(18, unchecked(&d[..512]), &d); // data, not adjacent to 13
        p.data(19, unchecked(&d[2048 - 512..]), &d); // adjacent, follows on in the data area
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
        assert_eq!(p.parts.iter().map(|x| x.data.len()).sum::<usize>(), 2560);
    }

    /// The data area is shared from the owners, runs that follow on in
    /// one owner as one part, and is exactly the parts concatenated.
    #[test]
    fn the_data_area_is_shared_from_where_the_parts_lie() {
        let a = Bytes::from(vec![1u8; 4 * 512]);
        let b = Bytes::from(vec![2u8; 2 * 512]);
        let stray = vec![3u8; 512];
        let mut p = Plan::default();
        p.data(0, unchecked(&a[..1024]), &a);
        p.data(2, unchecked(&a[1024..1536]), &a); // follows on in `a`
        p.data(3, unchecked(&b), &b);
        p.data(5, unchecked(&a[..512]), &a); // `a` again, not following on
        p.data(6, unchecked(&stray), &a); // not in its owner: copied
        let mut body = Body::new();
        p.share_data(&mut body);
        let lens: Vec<usize> = body.parts().iter().map(|x| x.len()).collect();
        assert_eq!(lens, vec![1536, 1024, 512, 512]);
        assert_eq!(body.parts()[0].as_ptr(), a.as_ptr());
        assert_eq!(body.parts()[1].as_ptr(), b.as_ptr());
        let want: Vec<u8> = p.parts.iter().flat_map(|x| x.data.to_vec()).collect();
        assert!(body.eq_bytes(&want));
    }

    #[test]
    fn data_runs_keep_the_crcs_of_the_blocks_they_begin() {
        // Four blocks; sectors 9-15 (inside block 1) zero.
        let mut d: Vec<u8> = (0..4 * 4096u32).map(|i| (i % 253) as u8 + 1).collect();
        d[9 * 512..16 * 512].fill(0);
        let table = crate::engine::wal::record::block_table(&d);
        let d = Bytes::from(d);
        let mut p = Plan::default();
        p.data(
            0,
            Checked {
                data: &d,
                block_crcs: &table,
            },
            &d,
        );
        // Runs: sectors 0-8 (from block 0), 9-15 zero, 16-31 (from block 2).
        assert_eq!(p.parts.len(), 2);
        assert_eq!(p.parts[0].block_crcs, &table[..]);
        assert_eq!(p.parts[1].data, &d[16 * 512..]);
        assert_eq!(p.parts[1].block_crcs, &table[8..]);
        // A run beginning inside a block takes none.
        let mut q = Plan::default();
        q.data(
            0,
            Checked {
                data: &d[..9 * 512],
                block_crcs: &table[..4],
            },
            &d,
        );
        q.data(
            9,
            Checked {
                data: &d[9 * 512..],
                block_crcs: &[],
            },
            &d,
        );
        assert!(q.parts[1].block_crcs.is_empty());
    }

    /// A segment file holding `datas` as block-CRC records (a header, the
    /// table, the data each), and a batch writing them at `lbas` in order
    /// (later ones win where they overlap); also the entry the WAL's tail
    /// would keep of that write.
    fn segment(
        dir: &std::path::Path,
        datas: &[Vec<u8>],
        lbas: &[u64],
    ) -> (SegFile, Vec<PendingRec>, crate::engine::wal::tail::Entry) {
        use crate::engine::map::WalLoc;
        use crate::engine::wal::record;
        let file = crate::engine::wal::fs::real()
            .create(&dir.join("seg"))
            .unwrap();
        let (mut parts, mut recs, mut off) = (Vec::new(), Vec::new(), 0u64);
        for (i, (data, &lba)) in datas.iter().zip(lbas).enumerate() {
            let table = record::block_table(data);
            let loc = WalLoc {
                seq: i as u64 + 1,
                seg: 7,
                data_off: off + 64 + table.len() as u64,
                rec_sectors: data.len() as u64 / SECTOR,
                crc: crc32c::crc32c(&table),
                skip: 0,
                block_crcs: true,
            };
            off = loc.data_off + data.len() as u64;
            parts.extend([vec![0x55u8; 64], table, data.clone()]);
            recs.push(PendingRec {
                seq: loc.seq,
                kind: RecordKind::Write,
                lba,
                sectors: loc.rec_sectors,
                loc: Some(loc),
                more: false,
                at: std::time::Duration::ZERO,
            });
        }
        let all: Vec<u8> = parts.concat();
        write_all(&file, &all, 0);
        let entry = crate::engine::wal::tail::Entry {
            seg: 7,
            off: 0,
            last_seq: recs.len() as u64,
            parts,
        };
        (file, recs, entry)
    }

    /// The batch of `recs` through `file` (as segment 7).
    fn batch(file: SegFile, recs: &[PendingRec]) -> Batch {
        Batch {
            seq: 1,
            recs: recs.to_vec(),
            files: HashMap::from([(7, file)]),
            cost: 0,
        }
    }

    fn build_with(file: SegFile, recs: &[PendingRec]) -> Result<Object, EngineError> {
        build(1, 1, &batch(file, recs))
    }

    /// Whether the build of `recs` through `file` takes every record from
    /// memory.
    fn all_shared(file: SegFile, recs: &[PendingRec]) -> bool {
        let ranges: Vec<(u64, u64)> = recs.iter().map(|r| (r.lba, r.sectors)).collect();
        shared_records(&batch(file, recs), &resolve(&ranges)).is_some()
    }

    /// A chunk of large writes goes to the store marked streamed (to be
    /// written around the page cache); one of small writes does not.
    #[test]
    fn a_chunk_of_large_writes_is_marked_streamed() {
        let dir = tempfile::tempdir().unwrap();
        let data = |sectors: u64| -> Vec<u8> {
            (0..sectors * SECTOR).map(|i| (i % 241) as u8 + 1).collect()
        };
        let large = super::super::stream::STREAM_WRITE / SECTOR;
        let (file, recs, _) = segment(dir.path(), &[data(large), data(large)], &[0, large]);
        let chunk = build_with(file, &recs).unwrap();
        assert!(chunk.body.streamed());
        let other = tempfile::tempdir().unwrap();
        let (file, recs, _) = segment(other.path(), &[data(8), data(8), data(8)], &[0, 8, 16]);
        assert!(!build_with(file, &recs).unwrap().body.streamed());
    }

    /// Records the WAL's tail holds are built from memory, with no read,
    /// into the very chunk a build from the file makes; a record the tail
    /// lacks sends the whole build to the file.
    #[test]
    fn a_chunk_from_the_tail_equals_the_chunk_from_the_file() {
        use crate::engine::wal::tail::{Tail, TailFile};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let datas: Vec<Vec<u8>> = [16u32, 8, 9, 24]
            .iter()
            .enumerate()
            .map(|(r, &sectors)| {
                (0..sectors * 512)
                    .map(|i| (i % 249) as u8 ^ (r as u8 + 1))
                    .collect()
            })
            .collect();
        // Overlaps: record 2 cuts into record 1 mid-block, record 4 into 3.
        let lbas = [0, 12, 100, 105];
        let (file, recs, entry) = segment(dir.path(), &datas, &lbas);
        let from_file = build_with(file.clone(), &recs).unwrap();
        let tail = Arc::new(Tail::new(1 << 20));
        tail.push(entry);
        let through_tail = |tail: &Arc<Tail>| -> SegFile {
            Arc::new(TailFile {
                tail: tail.clone(),
                seg: 7,
                file: file.clone(),
            })
        };
        // Damage the file: only a build that never reads it succeeds.
        let zeros = vec![0u8; 4096];
        write_all(&file, &zeros, 0);
        assert!(all_shared(through_tail(&tail), &recs));
        assert!(
            !all_shared(file.clone(), &recs),
            "a bare file shares nothing"
        );
        let from_tail = build_with(through_tail(&tail), &recs).unwrap();
        assert_eq!(
            from_tail.body.clone().into_bytes(),
            from_file.body.clone().into_bytes()
        );
        // The header, then data shared from the tail (not joined).
        assert!(from_tail.body.parts().len() > 1);
        assert_eq!(from_tail.extents, from_file.extents);
        // The tail without the first record: the build reads the file and
        // finds the damage.
        let partial = Arc::new(Tail::new(1 << 20));
        let other = tempfile::tempdir().unwrap();
        let (_, _, mut entry) = segment(other.path(), &datas, &lbas);
        let first_record: usize = entry.parts[..3].iter().map(|p| p.len()).sum();
        entry.parts.drain(..3);
        entry.off = first_record as u64;
        partial.push(entry);
        write_all(&file, &zeros, 0);
        assert!(!all_shared(through_tail(&partial), &recs));
        assert!(matches!(
            build_with(through_tail(&partial), &recs),
            Err(EngineError::Wal(wal::WalError::Corrupt { .. }))
        ));
    }

    /// Bytes of the WAL's tail are checked against their record's CRCs
    /// exactly where the chunk does not carry those CRCs: a damaged byte
    /// there fails the build; one in a block whose CRC the chunk carries
    /// builds, and the chunk's CRC for that block then fails its check,
    /// as every read of it would.
    #[test]
    fn tail_bytes_are_checked_where_the_chunk_does_not_carry_their_crcs() {
        use crate::engine::wal::tail::{Tail, TailFile};
        use std::sync::Arc;
        // Record 1: two whole blocks, carried. Record 2: one whole block,
        // carried, then a 512-byte sector whose CRC the chunk computes.
        let datas: Vec<Vec<u8>> = [16u32, 9]
            .iter()
            .map(|&sectors| (0..sectors * 512).map(|i| (i % 251) as u8 + 1).collect())
            .collect();
        let lbas = [0, 100];
        let built = |damage: Option<(usize, usize)>| {
            let dir = tempfile::tempdir().unwrap();
            let (file, recs, mut entry) = segment(dir.path(), &datas, &lbas);
            if let Some((rec, at)) = damage {
                entry.parts[rec * 3 + 2][at] ^= 0x10;
            }
            let tail = Arc::new(Tail::new(1 << 20));
            tail.push(entry);
            let through: SegFile = Arc::new(TailFile { tail, seg: 7, file });
            build_with(through, &recs)
        };
        let clean = built(None).unwrap();
        let good = |o: &Object, block: usize| {
            let obj = o.body.clone().into_bytes();
            let h = chunk::decode_header(&obj).unwrap();
            let b = chunk::CRC_BLOCK as usize;
            let data = &obj[obj.len() - h.data_len as usize..];
            let bytes = &data[block * b..((block + 1) * b).min(data.len())];
            crc32c::crc32c(bytes) == h.block_crcs[block]
        };
        assert!((0..4).all(|b| good(&clean, b)));
        // A carried block of record 1 (the chunk's block 1).
        let carried = built(Some((0, 4096 + 7))).unwrap();
        assert!(!good(&carried, 1), "its read would fail the CRC");
        assert!(good(&carried, 0) && good(&carried, 2) && good(&carried, 3));
        // Record 2's last sector: its CRC is computed, so it is checked.
        assert!(matches!(
            built(Some((1, 4096 + 100))),
            Err(EngineError::Wal(wal::WalError::Corrupt { .. }))
        ));
    }

    /// Write all of `data` at `off` of a WAL file.
    fn write_all(file: &SegFile, data: &[u8], off: u64) {
        let mut done = 0;
        while done < data.len() {
            let iov = [std::io::IoSlice::new(&data[done..])];
            done += file.write_vectored_at(&iov, off + done as u64).unwrap();
        }
    }

    /// A chunk built with the WAL's CRCs is the chunk built without them.
    #[test]
    fn reused_crcs_build_the_same_chunk() {
        let mut d: Vec<u8> = (0..3 * 4096 + 1024u32)
            .map(|i| (i % 251) as u8 + 1)
            .collect();
        d[4096 + 512..4096 + 1024].fill(0);
        let table = crate::engine::wal::record::block_table(&d);
        let d = Bytes::from(d);
        let encode = |with_crcs: bool| {
            let mut p = Plan::default();
            let block_crcs = if with_crcs { &table[..] } else { &[] };
            p.data(
                3,
                Checked {
                    data: &d,
                    block_crcs,
                },
                &d,
            );
            let h = ChunkHeader {
                volume: 1,
                epoch: 1,
                chunk_seq: 1,
                first_seq: 1,
                last_seq: 1,
                extents: p.extents.clone(),
                block_crcs: Vec::new(),
                data_len: p.data_len as u64,
                header_len: 0,
            };
            let mut body = Body::new();
            body.push(Bytes::from(chunk::encode_head(&h, &p.parts)));
            p.share_data(&mut body);
            body.into_bytes()
        };
        assert_eq!(encode(true), encode(false));
    }
}
