//! On-disk format of the read cache's index file: a file header, then one
//! fixed-size record per slot of the data file naming the window the slot
//! holds. Rebuilding the index at open reads only this file, never the
//! cached data.
//!
//! ```text
//! file header (64 bytes): magic "SHALERC1" | version u32 | slot_size u32 |
//!                         slots u64 | zeros | crc32c u32 (of bytes 0..60)
//! record i (64 bytes, at 64 + 64 * i):
//!     magic u32 | len u32 | volume u64 | seq u64 | epoch u64 | window u64 |
//!     stamp u64 | tag u32 | zeros (8) | crc32c u32 (of bytes 0..60)
//! ```
//! All integers little-endian. An all-zero record is a free slot.
//!
//! Invariants:
//! 1. [`decode_record`] accepts a record only if its magic and CRC match
//!    and its numbers are in range (`1 <= len <= slot_size`); anything
//!    else is a free slot, never an entry.
//! 2. The record never vouches for the data: readers still check every
//!    byte served against the chunk's block CRCs.

/// Bytes of the file header and of each record.
pub const RECORD: usize = 64;
const FILE_MAGIC: &[u8; 8] = b"SHALERC1";
const VERSION: u32 = 1;
const RECORD_MAGIC: u32 = 0x544f_4c53; // "SLOT"

/// What a slot holds: window `window` of chunk `(volume, seq, epoch)`
/// whose data-area position and block CRCs hash to `tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowId {
    pub volume: u64,
    pub seq: u64,
    pub epoch: u64,
    pub window: u64,
    pub tag: u32,
}

/// A decoded record: the window, its length in bytes and its insertion
/// stamp (larger = newer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub id: WindowId,
    pub len: u32,
    pub stamp: u64,
}

fn seal(b: &mut [u8; RECORD]) {
    let crc = crc32c::crc32c(&b[..RECORD - 4]);
    b[RECORD - 4..].copy_from_slice(&crc.to_le_bytes());
}

fn sealed(b: &[u8]) -> bool {
    b.len() == RECORD && crc32c::crc32c(&b[..RECORD - 4]).to_le_bytes() == b[RECORD - 4..]
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The file header for `slots` slots of `slot_size` bytes.
pub fn encode_file_header(slot_size: u32, slots: u64) -> [u8; RECORD] {
    let mut b = [0u8; RECORD];
    b[..8].copy_from_slice(FILE_MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&slot_size.to_le_bytes());
    b[16..24].copy_from_slice(&slots.to_le_bytes());
    seal(&mut b);
    b
}

/// `(slot_size, slots)` of a valid file header.
pub fn decode_file_header(b: &[u8]) -> Option<(u32, u64)> {
    if !sealed(b) || &b[..8] != FILE_MAGIC || u32_at(b, 8) != VERSION {
        return None;
    }
    Some((u32_at(b, 12), u64_at(b, 16)))
}

pub fn encode_record(r: &Record) -> [u8; RECORD] {
    let mut b = [0u8; RECORD];
    b[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&r.len.to_le_bytes());
    b[8..16].copy_from_slice(&r.id.volume.to_le_bytes());
    b[16..24].copy_from_slice(&r.id.seq.to_le_bytes());
    b[24..32].copy_from_slice(&r.id.epoch.to_le_bytes());
    b[32..40].copy_from_slice(&r.id.window.to_le_bytes());
    b[40..48].copy_from_slice(&r.stamp.to_le_bytes());
    b[48..52].copy_from_slice(&r.id.tag.to_le_bytes());
    seal(&mut b);
    b
}

/// What one record slot of the file says.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// All zeros: a free slot.
    Free,
    Entry(Record),
    /// Neither: damaged (torn, flipped or foreign bytes); a free slot.
    Damaged,
}

/// Decode one record (invariant 1).
pub fn decode_record(b: &[u8], slot_size: u32) -> Decoded {
    if b.iter().all(|&x| x == 0) {
        return Decoded::Free;
    }
    if !sealed(b) || u32_at(b, 0) != RECORD_MAGIC {
        return Decoded::Damaged;
    }
    let len = u32_at(b, 4);
    if len == 0 || len > slot_size || b[52..60].iter().any(|&x| x != 0) {
        return Decoded::Damaged;
    }
    Decoded::Entry(Record {
        id: WindowId {
            volume: u64_at(b, 8),
            seq: u64_at(b, 16),
            epoch: u64_at(b, 24),
            window: u64_at(b, 32),
            tag: u32_at(b, 48),
        },
        len,
        stamp: u64_at(b, 40),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let r = Record {
            id: WindowId {
                volume: 7,
                seq: 9,
                epoch: 3,
                window: 2,
                tag: 0xdead_beef,
            },
            len: 4096,
            stamp: 11,
        };
        let b = encode_record(&r);
        assert_eq!(decode_record(&b, 65536), Decoded::Entry(r));
        assert_eq!(decode_record(&[0u8; RECORD], 65536), Decoded::Free);
        assert_eq!(decode_record(&b, 1024), Decoded::Damaged);
        for i in 0..RECORD {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert_eq!(decode_record(&bad, 65536), Decoded::Damaged, "byte {i}");
        }
        assert_eq!(decode_record(&b[..10], 65536), Decoded::Damaged);
        let h = encode_file_header(65536, 12);
        assert_eq!(decode_file_header(&h), Some((65536, 12)));
        let mut bad = h;
        bad[17] ^= 1;
        assert_eq!(decode_file_header(&bad), None);
        assert_eq!(decode_file_header(&b), None);
    }
}
