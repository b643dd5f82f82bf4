//! Many records of one segment read at once: one read of the file range
//! that holds them (a span), then each record's data sliced out of it with
//! its CRCs checked, with no further I/O or copy.
//!
//! Invariant: [`record_in_span`] returns data only after every CRC that
//! covers it matched (the block CRCs of the blocks it touches, or the one
//! CRC of an old whole-record CRC record); a mismatch is
//! [`WalError::Corrupt`], and a location the span does not hold is an
//! error, never a panic.

use bytes::Bytes;

use super::record;
use super::{io_err, WalError};
use crate::engine::map::WalLoc;
use crate::engine::SECTOR;

/// Bytes `[off, off + buf.len())` of segment `seg`.
#[derive(Debug)]
pub struct Span {
    pub seg: u64,
    pub off: u64,
    pub buf: bytes::Bytes,
}

/// The file range a record's data and CRCs occupy: from its block CRC
/// table (or its data, for a record with one CRC) to the end of its data.
/// `None` when the location's numbers do not fit in a file.
pub fn extent_of(loc: &WalLoc) -> Option<(u64, u64)> {
    let len = loc.rec_sectors.checked_mul(SECTOR)?;
    let start = if loc.block_crcs {
        loc.data_off.checked_sub(record::blocks_of(len) * 4)?
    } else {
        loc.data_off
    };
    Some((start, loc.data_off.checked_add(len)?))
}

/// Read `[start, end)` of segment `seg` with one read
/// ([`super::fs::WalFile::read_range`]: no zeroing, and no page-cache copy
/// on the real file).
pub fn read_span(
    file: &dyn super::fs::WalFile,
    seg: u64,
    start: u64,
    end: u64,
) -> Result<Span, WalError> {
    let len = end
        .checked_sub(start)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| io_err("read WAL span", format!("bad range {start}..{end}")))?;
    let buf = file
        .read_range(start, len)
        .map_err(|e| io_err("read WAL", e))?;
    Ok(Span {
        seg,
        off: start,
        buf,
    })
}

/// Record data sliced out of a span once the CRCs covering it matched.
#[derive(Debug, Clone, Copy)]
pub struct Checked<'a> {
    pub data: &'a [u8],
    /// The record's CRCs (little endian, 4 bytes a block) of the whole
    /// [`record::BLOCK`] blocks `data` begins with; empty unless `data`
    /// begins on a block of a record with a CRC per block.
    pub block_crcs: &'a [u8],
}

/// Sectors `[loc.skip, loc.skip + sectors)` of the record at `loc`, sliced
/// out of `span` once the CRCs covering them matched.
pub fn record_in_span<'a>(
    span: &'a Span,
    loc: &WalLoc,
    sectors: u64,
) -> Result<Checked<'a>, WalError> {
    let corrupt = WalError::Corrupt {
        seg: span.seg,
        off: loc.data_off,
    };
    let (rec_start, rec_end) = extent_of(loc).ok_or(corrupt)?;
    let span_end = span.off + span.buf.len() as u64;
    if rec_start < span.off || rec_end > span_end {
        return Err(io_err(
            "read WAL span",
            format!(
                "record at {} of segment {} is outside the span read",
                loc.data_off, span.seg
            ),
        ));
    }
    let at = |file_off: u64| (file_off - span.off) as usize;
    let table = &span.buf[at(rec_start)..at(loc.data_off)];
    let data = &span.buf[at(loc.data_off)..at(rec_end)];
    record_part(span.seg, loc, table, data, sectors, Check::Data)
}

/// The CRC table (empty for a record with one CRC) and the whole data of
/// the record at `loc` in segment file `file`, without a copy, when memory
/// holds each in one buffer ([`super::fs::WalFile::read_shared`]).
pub fn record_shared(file: &dyn super::fs::WalFile, loc: &WalLoc) -> Option<(Bytes, Bytes)> {
    let (rec_start, rec_end) = extent_of(loc)?;
    let table = match loc.data_off - rec_start {
        0 => Bytes::new(),
        n => file.read_shared(rec_start, usize::try_from(n).ok()?)?,
    };
    let data = file.read_shared(loc.data_off, usize::try_from(rec_end - loc.data_off).ok()?)?;
    Some((table, data))
}

/// How much of a record [`record_part`] checks against its CRCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The data and its CRC table.
    Data,
    /// Only the CRC table (its length and CRC) and the bounds: for bytes
    /// the WAL's tail holds in memory, the very buffer the CRCs were
    /// computed over, whose CRCs a chunk carries to its reads; the caller
    /// checks whatever a chunk does not carry them for.
    TableOnly,
}

/// Sectors `[loc.skip, loc.skip + sectors)` of the record at `loc` in
/// segment `seg`, whose CRC table (empty for a record with one CRC) and
/// whole data are `table` and `data`, once the CRCs covering them matched
/// (the data's only with [`Check::Data`]).
pub fn record_part<'a>(
    seg: u64,
    loc: &WalLoc,
    table: &'a [u8],
    data: &'a [u8],
    sectors: u64,
    check: Check,
) -> Result<Checked<'a>, WalError> {
    let corrupt = |off: u64| WalError::Corrupt { seg, off };
    let rec_len = data.len() as u64;
    let start = loc.skip.checked_mul(SECTOR).ok_or(corrupt(loc.data_off))?;
    let end = sectors
        .checked_mul(SECTOR)
        .and_then(|l| l.checked_add(start))
        .ok_or(corrupt(loc.data_off))?;
    if end > rec_len {
        return Err(corrupt(loc.data_off));
    }
    let wanted = &data[start as usize..end as usize];
    if !loc.block_crcs {
        // One CRC for the whole record: no part of it can be carried.
        if crc32c::crc32c(data) != loc.crc {
            return Err(corrupt(loc.data_off));
        }
        return Ok(Checked {
            data: wanted,
            block_crcs: &[],
        });
    }
    if table.len() as u64 != record::blocks_of(rec_len) * 4 || crc32c::crc32c(table) != loc.crc {
        return Err(corrupt(loc.data_off));
    }
    if start == end {
        return Ok(Checked {
            data: &[],
            block_crcs: &[],
        });
    }
    let block = record::BLOCK as u64;
    let (b0, b1) = (start / block, end.div_ceil(block));
    let (r0, r1) = (b0 * block, (b1 * block).min(rec_len));
    let checked = &table[(b0 * 4) as usize..(b1 * 4) as usize];
    if check == Check::Data {
        record::check_blocks(&data[r0 as usize..r1 as usize], checked)
            .map_err(|i| corrupt(loc.data_off + r0 + i as u64 * block))?;
    }
    let whole = if start % block == 0 {
        ((end - start) / block) as usize
    } else {
        0
    };
    Ok(Checked {
        data: wanted,
        block_crcs: &checked[..whole * 4],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flip one bit of the byte at `at` of `span`.
    fn flip(span: &mut Span, at: usize) {
        let mut b = span.buf.to_vec();
        b[at] ^= 1;
        span.buf = b.into();
    }

    /// A span holding two block-CRC records (3 blocks + 1 sector, and 1
    /// sector) after some leading bytes, and their locations.
    fn two_records() -> (Span, WalLoc, WalLoc) {
        let mut buf = vec![0xeeu8; 100];
        let mut locs = Vec::new();
        for (seq, sectors) in [(7u64, 25u64), (8, 1)] {
            let data: Vec<u8> = (0..sectors * SECTOR)
                .map(|i| (i % 251) as u8 ^ seq as u8)
                .collect();
            let table = record::block_table(&data);
            buf.extend_from_slice(&[0u8; record::HEADER_LEN]);
            buf.extend_from_slice(&table);
            let data_off = 1000 + buf.len() as u64;
            buf.extend_from_slice(&data);
            locs.push(WalLoc {
                seq,
                seg: 3,
                data_off,
                rec_sectors: sectors,
                crc: crc32c::crc32c(&table),
                skip: 0,
                block_crcs: true,
            });
        }
        let span = Span {
            seg: 3,
            off: 1000,
            buf: buf.into(),
        };
        (span, locs[0], locs[1])
    }

    #[test]
    fn records_are_sliced_out_whole_and_in_parts() {
        let (span, a, b) = two_records();
        let whole = record_in_span(&span, &a, 25).unwrap();
        assert_eq!(whole.data.len(), 25 * 512);
        assert_eq!(whole.data[0], 7);
        let part = record_in_span(&span, &WalLoc { skip: 9, ..a }, 16).unwrap();
        assert_eq!(part.data, &whole.data[9 * 512..25 * 512]);
        assert_eq!(record_in_span(&span, &b, 1).unwrap().data[1], 1 ^ 8);
    }

    #[test]
    fn the_crcs_of_leading_whole_blocks_come_with_the_data() {
        let (span, a, b) = two_records();
        let table = |data: &[u8]| record::block_table(data);
        // 25 sectors: blocks 0-2 whole, the last sector a short block.
        let whole = record_in_span(&span, &a, 25).unwrap();
        assert_eq!(whole.block_crcs, &table(&whole.data[..3 * 4096])[..]);
        // From block 1 on, 12 sectors: one whole block, then half of one.
        let from_1 = record_in_span(&span, &WalLoc { skip: 8, ..a }, 12).unwrap();
        assert_eq!(from_1.block_crcs, &table(&from_1.data[..4096])[..]);
        // Not beginning on a block, or shorter than one: none.
        let inside = record_in_span(&span, &WalLoc { skip: 9, ..a }, 16).unwrap();
        assert!(inside.block_crcs.is_empty());
        assert!(record_in_span(&span, &a, 7).unwrap().block_crcs.is_empty());
        assert!(record_in_span(&span, &b, 1).unwrap().block_crcs.is_empty());
    }

    #[test]
    fn a_flipped_bit_is_found_only_where_it_is_read() {
        let (mut span, a, b) = two_records();
        // Damage block 2 of record `a` (sectors 16..24).
        let at = (a.data_off - span.off) as usize + 2 * 4096 + 17;
        flip(&mut span, at);
        assert!(matches!(
            record_in_span(&span, &a, 25),
            Err(WalError::Corrupt { seg: 3, off }) if off == a.data_off + 8192
        ));
        // Blocks 0 and 1 and the other record still read.
        record_in_span(&span, &a, 16).unwrap();
        record_in_span(&span, &b, 1).unwrap();
        // A damaged table fails the table CRC.
        let t = (a.data_off - span.off) as usize - 1;
        flip(&mut span, t);
        assert!(record_in_span(&span, &a, 1).is_err());
    }

    #[test]
    fn out_of_span_or_past_the_record_is_an_error() {
        let (span, a, b) = two_records();
        assert!(record_in_span(&span, &WalLoc { data_off: 10, ..a }, 1).is_err());
        assert!(record_in_span(
            &span,
            &WalLoc {
                data_off: u64::MAX,
                ..b
            },
            1
        )
        .is_err());
        assert!(record_in_span(&span, &a, 26).is_err());
        assert!(record_in_span(
            &span,
            &WalLoc {
                skip: u64::MAX,
                ..a
            },
            1
        )
        .is_err());
        let short = Span {
            seg: 3,
            off: span.off,
            buf: span.buf.slice(..span.buf.len() - 1),
        };
        assert!(record_in_span(&short, &b, 1).is_err());
    }

    #[test]
    fn a_table_of_the_wrong_length_is_corrupt_not_a_panic() {
        let (span, a, _) = two_records();
        let got = record_in_span(&span, &a, 25).unwrap();
        let table =
            &span.buf[(a.data_off - span.off) as usize - 16..(a.data_off - span.off) as usize];
        assert!(record_part(3, &a, table, got.data, 25, Check::Data).is_ok());
        for short in [&table[..12], &table[..0]] {
            assert!(matches!(
                record_part(3, &a, short, got.data, 25, Check::Data),
                Err(WalError::Corrupt { seg: 3, .. })
            ));
        }
    }

    #[test]
    fn a_whole_crc_record_is_checked_whole() {
        let data: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
        let loc = WalLoc {
            seq: 1,
            seg: 0,
            data_off: 64,
            rec_sectors: 4,
            crc: crc32c::crc32c(&data),
            skip: 1,
            block_crcs: false,
        };
        let mut buf = vec![0u8; 64];
        buf.extend_from_slice(&data);
        let mut span = Span {
            seg: 0,
            off: 0,
            buf: buf.into(),
        };
        let got = record_in_span(&span, &loc, 2).unwrap();
        assert_eq!(got.data, &data[512..1536]);
        assert!(got.block_crcs.is_empty(), "one CRC: no block CRCs");
        flip(&mut span, 64 + 2000);
        assert!(record_in_span(&span, &loc, 1).is_err());
    }
}
