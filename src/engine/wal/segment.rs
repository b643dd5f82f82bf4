//! Segment header: which writer wrote a segment and which history it extends.
//!
//! Layout (little endian), 48 bytes at offset 0, records follow:
//! `magic u32 ("SHWS") | version u16 | flags u16 | volume u64 | epoch u64 |
//!  base_epoch u64 | reserved u64 | reserved u32 | header_crc u32`.
//! `header_crc` is CRC32C over the 44 bytes before it; version is 1, flags
//! and reserved fields are 0 and ignored when read.
//!
//! Segments written before headers existed ("legacy") start directly with
//! a record (its magic "SHWL") or are empty; they are still read.
//!
//! `epoch` is the writer's lease epoch; `base_epoch` is the manifest's
//! `history_epoch` that writer read when it opened, i.e. the history its
//! records continue. A WAL extends the store's history exactly when the
//! manifest's `history_epoch` is one of its segments' `epoch` or
//! `base_epoch` (see [`super::scan::Lineage`]).

use super::record::MAGIC as RECORD_MAGIC;

pub const SEG_MAGIC: u32 = 0x5357_4853; // "SHWS"
pub const SEG_HEADER_LEN: usize = 48;
const VERSION: u16 = 1;

/// Who wrote a segment, over which history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The writer's lease epoch.
    pub epoch: u64,
    /// The manifest's `history_epoch` as the writer read it at open.
    pub base_epoch: u64,
}

/// What the first bytes of a segment file say about its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// An empty file.
    Empty,
    /// A legacy segment: records start at offset 0.
    Legacy,
    /// A header of this volume (or another: the caller checks `volume`).
    Stamped { volume: u64, stamp: Stamp },
    /// Neither a whole header nor a record: a torn or damaged start.
    Damaged(String),
}

pub fn encode(volume: u64, stamp: Stamp) -> [u8; SEG_HEADER_LEN] {
    let mut b = [0u8; SEG_HEADER_LEN];
    b[0..4].copy_from_slice(&SEG_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&volume.to_le_bytes());
    b[16..24].copy_from_slice(&stamp.epoch.to_le_bytes());
    b[24..32].copy_from_slice(&stamp.base_epoch.to_le_bytes());
    let crc = crc32c::crc32c(&b[..44]);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Classify the start of a segment file.
pub fn decode(buf: &[u8]) -> Head {
    if buf.is_empty() {
        return Head::Empty;
    }
    let Some(m) = buf.get(0..4) else {
        return Head::Damaged(format!("{} bytes, too short for a header", buf.len()));
    };
    let magic = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
    if magic == RECORD_MAGIC {
        return Head::Legacy;
    }
    if magic != SEG_MAGIC {
        return Head::Damaged("no segment header".into());
    }
    let Some(h) = buf.get(0..SEG_HEADER_LEN) else {
        return Head::Damaged("segment header cut short".into());
    };
    let crc = u32::from_le_bytes([h[44], h[45], h[46], h[47]]);
    if crc32c::crc32c(&h[..44]) != crc {
        return Head::Damaged("segment header checksum mismatch".into());
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Head::Damaged(format!("unknown segment header version {version}"));
    }
    Head::Stamped {
        volume: u64_at(h, 8),
        stamp: Stamp {
            epoch: u64_at(h, 16),
            base_epoch: u64_at(h, 24),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let s = Stamp {
            epoch: 7,
            base_epoch: 5,
        };
        let b = encode(42, s);
        assert_eq!(
            decode(&b),
            Head::Stamped {
                volume: 42,
                stamp: s
            }
        );
        assert_eq!(decode(&[]), Head::Empty);
        assert_eq!(decode(&RECORD_MAGIC.to_le_bytes()), Head::Legacy);
        for cut in [1, 3, 4, 20, 47] {
            assert!(matches!(decode(&b[..cut]), Head::Damaged(_)), "cut {cut}");
        }
        let mut bad = b;
        bad[17] ^= 1;
        assert!(matches!(decode(&bad), Head::Damaged(_)));
        assert!(matches!(decode(&[0u8; 64]), Head::Damaged(_)));
    }
}
