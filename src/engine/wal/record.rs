//! WAL record codec.
//!
//! Layout (little endian), 48-byte header then data:
//! `magic u32 | kind u16 | flags u16 | volume u64 | seq u64 | lba u64 |
//!  sectors u64 | data_crc u32 | header_crc u32`.
//! `header_crc` is CRC32C over the 44 bytes before it. Only `Write` records
//! carry data (`sectors * 512` bytes); `Trim` and `Zero` are header-only.
//! Flag bit 0 (`more`): the next record continues the same write request
//! (big writes are split); no other flag bits are defined.
//! A decoder never trusts a length before the header CRC has matched.

use super::super::SECTOR;

pub const MAGIC: u32 = 0x4c57_4853; // "SHWL"
pub const HEADER_LEN: usize = 48;

/// What a record does to its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Write = 1,
    Trim = 2,
    Zero = 3,
}

impl RecordKind {
    fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Trim),
            3 => Some(RecordKind::Zero),
            _ => None,
        }
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub volume: u64,
    pub seq: u64,
    pub lba: u64,
    pub sectors: u64,
    pub data_crc: u32,
    /// The next record belongs to the same write request.
    pub more: bool,
}

impl RecordHeader {
    /// Bytes of data following the header.
    pub fn data_len(&self) -> u64 {
        match self.kind {
            RecordKind::Write => self.sectors * SECTOR,
            _ => 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[6..8].copy_from_slice(&u16::from(self.more).to_le_bytes());
        b[8..16].copy_from_slice(&self.volume.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.lba.to_le_bytes());
        b[32..40].copy_from_slice(&self.sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..44]);
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

/// Decode the record starting at `buf[pos..]`, checking both CRCs.
/// Returns the header and the data range within `buf`.
pub fn decode_at(
    buf: &[u8],
    pos: usize,
) -> Result<(RecordHeader, std::ops::Range<usize>), RecordError> {
    let at = pos as u64;
    let Some(h) = buf.get(pos..pos + HEADER_LEN) else {
        return Err(RecordError::Truncated(at));
    };
    if u32_at(h, 0) != MAGIC {
        return Err(RecordError::BadMagic(at));
    }
    if crc32c::crc32c(&h[..44]) != u32_at(h, 44) {
        return Err(RecordError::HeaderCrc(at));
    }
    let kind_raw = u16::from_le_bytes([h[4], h[5]]);
    let kind = RecordKind::from_u16(kind_raw).ok_or(RecordError::BadKind(at, kind_raw))?;
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
    };
    let data_start = pos + HEADER_LEN;
    let data_len = usize::try_from(hdr.sectors)
        .ok()
        .and_then(|s| s.checked_mul(SECTOR as usize))
        .ok_or(RecordError::Truncated(at))?;
    let data_len = if kind == RecordKind::Write {
        data_len
    } else {
        0
    };
    let data_end = data_start
        .checked_add(data_len)
        .ok_or(RecordError::Truncated(at))?;
    let Some(data) = buf.get(data_start..data_end) else {
        return Err(RecordError::Truncated(at));
    };
    if kind == RecordKind::Write && crc32c::crc32c(data) != hdr.data_crc {
        return Err(RecordError::DataCrc(at));
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
        };
        let mut v = h.encode().to_vec();
        v.extend_from_slice(data);
        v
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
