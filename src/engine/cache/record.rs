//! On-disk format of the read cache's index file: a file header, then one
//! fixed-size record per slot of the data file naming the window the slot
//! holds. Rebuilding the index at open reads only this file, never the
//! cached data.
//!
//! ```text
//! file header (128 bytes): magic "SHALERC1" | version u32 (2) | slot_size u32 |
//!                          slots u64 | zeros | crc32c u32 (of bytes 0..124)
//! record i (128 bytes, at 128 + 128 * i):
//!     magic u32 | len u32 | volume u64 | seq u64 | epoch u64 | window u64 |
//!     stamp u64 | tag u32 | block crcs u32 x 16 | zeros (8) |
//!     crc32c u32 (of bytes 0..124)
//! ```
//! All integers little-endian. An all-zero record is a free slot. The
//! block CRCs are those of the window's [`CRC_BLOCK`]s (`len` rounded up
//! to blocks of them; the rest zero), copied from a chunk CRC table that
//! was checked against the chunk's table CRC when the window was fetched:
//! readers check cached bytes against them, so a cache restarted with the
//! store unreachable still verifies what it serves. Version 1 files (64-byte
//! records without CRCs) start cold.
//!
//! Invariants:
//! 1. [`decode_record`] accepts a record only if its magic and CRC match
//!    and its numbers are in range (`1 <= len <= slot_size`); anything
//!    else is a free slot, never an entry.
//! 2. The record never vouches for the data: readers check every byte
//!    served against the block CRCs the record carries (copied from a
//!    chunk table verified against its table CRC before the window was
//!    reserved).

use crate::engine::format::chunk::CRC_BLOCK;

/// Bytes of the file header and of each record.
pub const RECORD: usize = 128;
const FILE_MAGIC: &[u8; 8] = b"SHALERC1";
const VERSION: u32 = 2;
/// Most block CRCs a window has (a 64 KiB slot of 4 KiB blocks).
pub const WINDOW_CRCS: usize = 16;
const CRCS_AT: usize = 52;
const ZEROS_AT: usize = CRCS_AT + 4 * WINDOW_CRCS;

/// The block CRCs of one cached window (fixed size: index memory per slot
/// stays constant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crcs {
    n: u8,
    v: [u32; WINDOW_CRCS],
}

impl Crcs {
    /// `crcs` if there are at most [`WINDOW_CRCS`] of them.
    pub fn new(crcs: &[u32]) -> Option<Crcs> {
        if crcs.len() > WINDOW_CRCS {
            return None;
        }
        let mut v = [0; WINDOW_CRCS];
        v[..crcs.len()].copy_from_slice(crcs);
        Some(Crcs {
            n: crcs.len() as u8,
            v,
        })
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.v[..self.n as usize]
    }
}

/// Block CRCs a window of `len` bytes has.
pub fn crcs_for(len: u64) -> usize {
    len.div_ceil(CRC_BLOCK) as usize
}
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

/// A decoded record: the window, its length in bytes, its insertion
/// stamp (larger = newer) and its block CRCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub id: WindowId,
    pub len: u32,
    pub stamp: u64,
    pub crcs: Crcs,
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
    for (i, c) in r.crcs.v.iter().enumerate() {
        b[CRCS_AT + 4 * i..CRCS_AT + 4 * i + 4].copy_from_slice(&c.to_le_bytes());
    }
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
    if len == 0 || len > slot_size || b[ZEROS_AT..RECORD - 4].iter().any(|&x| x != 0) {
        return Decoded::Damaged;
    }
    let n = crcs_for(u64::from(len));
    if n > WINDOW_CRCS {
        return Decoded::Damaged;
    }
    let mut v = [0u32; WINDOW_CRCS];
    for (i, c) in v.iter_mut().enumerate() {
        *c = u32_at(b, CRCS_AT + 4 * i);
    }
    // CRCs past the window's blocks must be zero, as written.
    if v[n..].iter().any(|&c| c != 0) {
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
        crcs: Crcs { n: n as u8, v },
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
            len: 4096 + 100,
            stamp: 11,
            crcs: Crcs::new(&[0x1234_5678, 0x9abc_def0]).unwrap(),
        };
        let b = encode_record(&r);
        assert_eq!(decode_record(&b, 65536), Decoded::Entry(r));
        assert_eq!(decode_record(&[0u8; RECORD], 65536), Decoded::Free);
        assert_eq!(decode_record(&b, 1024), Decoded::Damaged);
        let Decoded::Entry(back) = decode_record(&b, 65536) else {
            panic!("not an entry");
        };
        assert_eq!(back.crcs.as_slice(), &[0x1234_5678, 0x9abc_def0]);
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
