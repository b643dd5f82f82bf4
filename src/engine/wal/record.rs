//! WAL record codec.
//!
//! Layout (little endian), 48-byte header then the body:
//! `magic u32 | kind u16 | flags u16 | volume u64 | seq u64 | lba u64 |
//!  sectors u64 | data_crc u32 | header_crc u32`.
//! `header_crc` is CRC32C over the 44 bytes before it, started from the
//! segment's incarnation (a random number its version 3 header names; 0
//! in older segments, which is plain CRC32C), so a record written into a
//! file in an earlier life of that file never checks in a later one (see
//! [`super::segment`]). `Trim` and `Zero`
//! records are header-only. Write records carry `sectors * 512` data bytes
//! in one of two on-disk kinds:
//! - kind 1 ("whole", written by releases before block CRCs; still read):
//!   the body is the data, `data_crc` is CRC32C of all of it;
//! - kind 4 ("blocks", written now): the body is a table of CRC32C values,
//!   one `u32` per [`BLOCK`] bytes of data (the last block may be short,
//!   a multiple of 512), then the data; `data_crc` is CRC32C of the table.
//!   A reader can check any block alone: it reads its table entry and the
//!   block. A release that knows only kind 1 stops at a kind-4 record as
//!   an unknown kind (never reads it as data).
//!
//! A record is whole only if its header CRC, its table CRC and every block
//! CRC match (replay's torn-record rules rely on that).
//! Flag bit 0 (`more`): the next record continues the same write request
//! (requests larger than the biggest record are split); no other flag bits
//! are defined.
//! A decoder never trusts a length before the header CRC has matched.

use super::super::SECTOR;

pub const MAGIC: u32 = 0x4c57_4853; // "SHWL"
pub const HEADER_LEN: usize = 48;
/// Data bytes covered by one CRC of a "blocks" record.
pub const BLOCK: usize = 4096;
/// On-disk kind of a write record with one CRC over all its data.
const KIND_WRITE_WHOLE: u16 = 1;
/// On-disk kind of a write record with a CRC per [`BLOCK`].
const KIND_WRITE_BLOCKS: u16 = 4;

/// What a record does to its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Write = 1,
    Trim = 2,
    Zero = 3,
}

impl RecordKind {
    /// The kind and whether the data has a CRC per block.
    fn from_u16(v: u16) -> Option<(Self, bool)> {
        match v {
            KIND_WRITE_WHOLE => Some((RecordKind::Write, false)),
            KIND_WRITE_BLOCKS => Some((RecordKind::Write, true)),
            2 => Some((RecordKind::Trim, false)),
            3 => Some((RecordKind::Zero, false)),
            _ => None,
        }
    }
}

/// Number of [`BLOCK`]s (the last one possibly short) in `data_len` bytes.
pub fn blocks_of(data_len: u64) -> u64 {
    data_len.div_ceil(BLOCK as u64)
}

/// The CRC table of `data` (one little-endian CRC32C per [`BLOCK`]).
pub fn block_table(data: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(data.len().div_ceil(BLOCK) * 4);
    for b in data.chunks(BLOCK) {
        t.extend_from_slice(&crc32c::crc32c(b).to_le_bytes());
    }
    t
}

/// Check `data` (whole blocks, the last possibly short) against `table`
/// (their CRCs, in order); returns the index of the first bad block.
pub fn check_blocks(data: &[u8], table: &[u8]) -> Result<(), usize> {
    let mut crcs = table.chunks_exact(4);
    for (i, b) in data.chunks(BLOCK).enumerate() {
        match crcs.next() {
            Some(c) if crc32c::crc32c(b) == u32::from_le_bytes([c[0], c[1], c[2], c[3]]) => {}
            _ => return Err(i),
        }
    }
    Ok(())
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub volume: u64,
    pub seq: u64,
    pub lba: u64,
    pub sectors: u64,
    /// Whole-data CRC (`block_crcs` false) or CRC of the block table.
    pub data_crc: u32,
    /// The next record belongs to the same write request.
    pub more: bool,
    /// A write record with a CRC per [`BLOCK`] (kind 4), not one CRC.
    pub block_crcs: bool,
}

impl RecordHeader {
    /// Bytes of data in the record.
    pub fn data_len(&self) -> u64 {
        match self.kind {
            RecordKind::Write => self.sectors * SECTOR,
            _ => 0,
        }
    }

    /// Bytes of the block CRC table between the header and the data.
    pub fn table_len(&self) -> u64 {
        if self.kind == RecordKind::Write && self.block_crcs {
            blocks_of(self.data_len()) * 4
        } else {
            0
        }
    }

    fn kind_u16(&self) -> u16 {
        match (self.kind, self.block_crcs) {
            (RecordKind::Write, false) => KIND_WRITE_WHOLE,
            (RecordKind::Write, true) => KIND_WRITE_BLOCKS,
            (k, _) => k as u16,
        }
    }

    /// The header as written into a segment of incarnation 0 (before
    /// version 3).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        self.encode_for(0)
    }

    /// The header as written into a segment of `incarnation`.
    pub fn encode_for(&self, incarnation: u32) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.kind_u16().to_le_bytes());
        b[6..8].copy_from_slice(&u16::from(self.more).to_le_bytes());
        b[8..16].copy_from_slice(&self.volume.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.lba.to_le_bytes());
        b[32..40].copy_from_slice(&self.sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c::crc32c_append(incarnation, &b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Why decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("truncated record at offset {0}")]
    Truncated(u64),
    #[error("bad magic at offset {0}")]
    BadMagic(u64),
    #[error("header checksum mismatch at offset {0}")]
    HeaderCrc(u64),
    #[error("unknown record kind {1} at offset {0}")]
    BadKind(u64, u16),
    #[error("data checksum mismatch at offset {0}")]
    DataCrc(u64),
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

/// A decoded header and the range of its data.
pub type Decoded = (RecordHeader, std::ops::Range<usize>);

/// Decode the record starting at `buf[pos..]`, checking every CRC.
/// Returns the header and the data range within `buf` (after the block
/// table, if any; the record ends where the data ends). For segments of
/// incarnation 0 (before version 3).
pub fn decode_at(buf: &[u8], pos: usize) -> Result<Decoded, RecordError> {
    decode_in(buf, pos, 0)
}

/// [`decode_at`] in a segment of `incarnation`: a record written in
/// another incarnation fails its header CRC.
pub fn decode_in(buf: &[u8], pos: usize, incarnation: u32) -> Result<Decoded, RecordError> {
    let at = pos as u64;
    let Some(h) = buf.get(pos..pos + HEADER_LEN) else {
        return Err(RecordError::Truncated(at));
    };
    if u32_at(h, 0) != MAGIC {
        return Err(RecordError::BadMagic(at));
    }
    if crc32c::crc32c_append(incarnation, &h[..44]) != u32_at(h, 44) {
        return Err(RecordError::HeaderCrc(at));
    }
    let kind_raw = u16::from_le_bytes([h[4], h[5]]);
    let (kind, block_crcs) =
        RecordKind::from_u16(kind_raw).ok_or(RecordError::BadKind(at, kind_raw))?;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags & !1 != 0 {
        return Err(RecordError::BadKind(at, kind_raw));
    }
    let hdr = RecordHeader {
        kind,
        volume: u64_at(h, 8),
        seq: u64_at(h, 16),
        lba: u64_at(h, 24),
        sectors: u64_at(h, 32),
        data_crc: u32_at(h, 40),
        more: flags & 1 != 0,
        block_crcs,
    };
    let body_start = pos + HEADER_LEN;
    let data_len = usize::try_from(hdr.sectors)
        .ok()
        .and_then(|s| s.checked_mul(SECTOR as usize))
        .ok_or(RecordError::Truncated(at))?;
    let data_len = if kind == RecordKind::Write {
        data_len
    } else {
        0
    };
    let table_len = if block_crcs {
        data_len.div_ceil(BLOCK) * 4
    } else {
        0
    };
    let data_start = body_start
        .checked_add(table_len)
        .ok_or(RecordError::Truncated(at))?;
    let data_end = data_start
        .checked_add(data_len)
        .ok_or(RecordError::Truncated(at))?;
    let (Some(table), Some(data)) = (
        buf.get(body_start..data_start),
        buf.get(data_start..data_end),
    ) else {
        return Err(RecordError::Truncated(at));
    };
    if kind == RecordKind::Write {
        let ok = if block_crcs {
            crc32c::crc32c(table) == hdr.data_crc && check_blocks(data, table).is_ok()
        } else {
            crc32c::crc32c(data) == hdr.data_crc
        };
        if !ok {
            return Err(RecordError::DataCrc(at));
        }
    }
    Ok((hdr, data_start..data_end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, kind: RecordKind, data: &[u8]) -> Vec<u8> {
        let h = RecordHeader {
            kind,
            volume: 7,
            seq,
            lba: 100 + seq,
            sectors: if kind == RecordKind::Write {
                data.len() as u64 / 512
            } else {
                9
            },
            data_crc: crc32c::crc32c(data),
            more: seq == 1,
            block_crcs: false,
        };
        let mut v = h.encode().to_vec();
        v.extend_from_slice(data);
        v
    }

    /// A kind-4 write record: header, CRC table, data.
    fn rec_blocks(seq: u64, data: &[u8]) -> Vec<u8> {
        let table = block_table(data);
        let h = RecordHeader {
            kind: RecordKind::Write,
            volume: 7,
            seq,
            lba: 100 + seq,
            sectors: data.len() as u64 / 512,
            data_crc: crc32c::crc32c(&table),
            more: false,
            block_crcs: true,
        };
        let mut v = h.encode().to_vec();
        v.extend_from_slice(&table);
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn block_records_round_trip_with_a_short_last_block() {
        // 3 blocks and a 1536-byte tail: 4 table entries.
        let data: Vec<u8> = (0..3 * BLOCK + 1536).map(|i| (i % 251) as u8).collect();
        let mut log = rec_blocks(1, &data);
        log.extend(rec(2, RecordKind::Write, &[4u8; 512]));
        let (h, r) = decode_at(&log, 0).unwrap();
        assert!(h.block_crcs);
        assert_eq!(
            (h.kind, h.sectors, h.table_len()),
            (RecordKind::Write, 27, 16)
        );
        assert_eq!(r.start, HEADER_LEN + 16, "data follows the table");
        assert_eq!(&log[r.clone()], &data[..]);
        let (h2, r2) = decode_at(&log, r.end).unwrap();
        assert!(!h2.block_crcs, "old kind-1 records still decode");
        assert_eq!(&log[r2], &[4u8; 512][..]);
        assert_eq!(u16::from_le_bytes([log[4], log[5]]), 4, "written as kind 4");
    }

    /// A record is whole only if its table and every block match.
    #[test]
    fn any_bad_block_or_table_entry_fails_the_record() {
        let data: Vec<u8> = (0..4 * BLOCK).map(|i| (i % 13) as u8 | 1).collect();
        let full = rec_blocks(1, &data);
        for at in [
            HEADER_LEN + 1,
            HEADER_LEN + 15,
            HEADER_LEN + 16 + 5,
            full.len() - 1,
        ] {
            let mut bad = full.clone();
            bad[at] ^= 0x10;
            assert_eq!(
                decode_at(&bad, 0),
                Err(RecordError::DataCrc(0)),
                "byte {at}"
            );
        }
        for cut in [HEADER_LEN + 3, HEADER_LEN + 16, full.len() - 1] {
            assert_eq!(decode_at(&full[..cut], 0), Err(RecordError::Truncated(0)));
        }
        assert_eq!(check_blocks(&data, &block_table(&data)), Ok(()));
        let mut t = block_table(&data);
        t[9] ^= 1;
        assert_eq!(check_blocks(&data, &t), Err(2));
        assert_eq!(check_blocks(&data, &t[..8]), Err(2), "a short table fails");
    }

    #[test]
    fn round_trip_several() {
        let mut log = rec(1, RecordKind::Write, &[5u8; 1024]);
        log.extend(rec(2, RecordKind::Trim, &[]));
        log.extend(rec(3, RecordKind::Zero, &[]));
        let (h, r) = decode_at(&log, 0).unwrap();
        assert_eq!(
            (h.seq, h.kind, h.lba, h.sectors),
            (1, RecordKind::Write, 101, 2)
        );
        assert_eq!(&log[r.clone()], &[5u8; 1024][..]);
        let (h2, r2) = decode_at(&log, r.end).unwrap();
        assert_eq!(
            (h2.kind, h2.sectors, r2.len(), h2.more),
            (RecordKind::Trim, 9, 0, false)
        );
        let (h3, r3) = decode_at(&log, r2.end).unwrap();
        assert_eq!(h3.kind, RecordKind::Zero);
        assert_eq!(
            decode_at(&log, r3.end),
            Err(RecordError::Truncated(r3.end as u64))
        );
    }

    #[test]
    fn torn_and_garbage_tails_are_rejected() {
        let full = rec(1, RecordKind::Write, &[9u8; 4096]);
        for cut in [1, 20, HEADER_LEN, HEADER_LEN + 100, full.len() - 1] {
            assert!(
                matches!(decode_at(&full[..cut], 0), Err(RecordError::Truncated(0))),
                "cut {cut}"
            );
        }
        let mut bad = full.clone();
        bad[HEADER_LEN + 7] ^= 1;
        assert_eq!(decode_at(&bad, 0), Err(RecordError::DataCrc(0)));
        let mut bad = full.clone();
        bad[30] ^= 0x80;
        assert_eq!(decode_at(&bad, 0), Err(RecordError::HeaderCrc(0)));
        assert_eq!(decode_at(&[0u8; 100], 0), Err(RecordError::BadMagic(0)));
        // A header claiming a huge length with a valid CRC is "truncated", not a panic.
        let h = RecordHeader {
            kind: RecordKind::Write,
            volume: 1,
            seq: 1,
            lba: 0,
            sectors: u64::MAX / 2,
            data_crc: 0,
            more: false,
            block_crcs: true,
        };
        assert!(matches!(
            decode_at(&h.encode(), 0),
            Err(RecordError::Truncated(0))
        ));
    }

    /// Random bytes and mutated logs give errors, never panics.
    #[test]
    fn decoder_survives_random_input() {
        let mut log = rec(1, RecordKind::Write, &[3u8; 2048]);
        log.extend(rec(2, RecordKind::Zero, &[]));
        log.extend(rec_blocks(3, &[6u8; 9 * 512]));
        let mut x = 7u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5000 {
            let mut m = log.clone();
            let i = (rnd() as usize) % m.len();
            m[i] = rnd() as u8;
            let mut pos = 0;
            while let Ok((_, r)) = decode_at(&m, pos) {
                pos = r.end;
            }
            let junk: Vec<u8> = (0..rnd() % 200).map(|_| rnd() as u8).collect();
            let _ = decode_at(&junk, (rnd() % 10) as usize);
        }
    }
}
