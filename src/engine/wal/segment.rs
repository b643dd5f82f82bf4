//! Segment header: which writer wrote a segment and which history it extends.
//!
//! Layout (little endian), 48 bytes at offset 0, records follow:
//! `magic u32 ("SHWS") | version u16 | flags u16 | volume u64 | epoch u64 |
//!  base_epoch u64 | first_seq u64 | incarnation u32 | header_crc u32`.
//! `header_crc` is CRC32C over the 44 bytes before it.
//!
//! Version 1 (written before segments were preallocated and recycled): the
//! `first_seq` field is reserved (0, ignored) and the file ends where its
//! records end. Version 2: the file is preallocated and may be a recycled
//! one, so past its last record it holds zeros, padding or stale records
//! of an earlier life. Its records are exactly the run `first_seq,
//! first_seq + 1, ...` read from offset 48: the first thing that is not
//! the next record of that run (unreadable, or another seq) ends the
//! segment (see [`super::scan`]). `incarnation` is 0.
//!
//! Version 3 is version 2 with a nonzero random
//! `incarnation`, drawn each time a file becomes a segment; every record
//! header CRC in it starts from that number ([`super::record`]). So a
//! stale record of an earlier life of the file never reads as a record of
//! this one, whatever its seq. Seqs alone do not ensure that: after a
//! power cut, replay ends the log before records that did reach the disk
//! (in a file whose new header did not), and the next writer reuses their
//! seqs, in that file or another.
//!
//! Version 4 (written now) is version 3 written by a log that may start a
//! segment before the one it leaves is durable (a buffered log rolls
//! without `fdatasync`, see invariant 3 of [`super`]). Its flag bit 1,
//! "prior durable", says every earlier segment was durable (synced, or
//! all its records in the store) by the time this header was: it is set
//! in the header a segment starts with when that already holds, and
//! otherwise written into the header before the first sync that makes a
//! record of the segment durable. Versions 1 to 3 were written by logs that
//! synced a segment before starting the next, so they are read as prior
//! durable. Replay ([`super::replay`]) takes a missing run of records
//! before a segment as a power cut's loss, not damage, only while no
//! later segment is prior durable.
//!
//! Flag bit 0 (versions 2 to 4) marks a spare: a preallocated file waiting
//! in the pool to become a segment; it holds no records whatever follows
//! the header (spares are written as version 2). Other flag bits are 0 and
//! ignored.
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
const VERSION_1: u16 = 1;
const VERSION_2: u16 = 2;
const VERSION_3: u16 = 3;
const VERSION: u16 = 4;
const FLAG_SPARE: u16 = 1;
const FLAG_PRIOR_DURABLE: u16 = 2;

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
    /// A header of this volume (or another: the caller checks `volume`);
    /// `first_seq` is `Some` for versions 2 to 4 (records must continue
    /// its run); `incarnation` seeds its record header CRCs (0 before
    /// version 3); `prior_durable`: every earlier segment was durable by
    /// the time this header was (always for versions 1 to 3).
    Stamped {
        volume: u64,
        stamp: Stamp,
        first_seq: Option<u64>,
        incarnation: u32,
        prior_durable: bool,
    },
    /// A spare of the pool (version 2, flag bit 0): no records.
    Spare { volume: u64 },
    /// Neither a whole header nor a record: a torn or damaged start.
    Damaged(String),
}

/// The fields of a header, as [`encode_raw`] lays them out.
struct Fields {
    version: u16,
    flags: u16,
    volume: u64,
    stamp: Stamp,
    first_seq: u64,
    incarnation: u32,
}

fn encode_raw(f: Fields) -> [u8; SEG_HEADER_LEN] {
    let Fields {
        version,
        flags,
        volume,
        stamp,
        first_seq,
        incarnation,
    } = f;
    let mut b = [0u8; SEG_HEADER_LEN];
    b[0..4].copy_from_slice(&SEG_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&flags.to_le_bytes());
    b[8..16].copy_from_slice(&volume.to_le_bytes());
    b[16..24].copy_from_slice(&stamp.epoch.to_le_bytes());
    b[24..32].copy_from_slice(&stamp.base_epoch.to_le_bytes());
    b[32..40].copy_from_slice(&first_seq.to_le_bytes());
    b[40..44].copy_from_slice(&incarnation.to_le_bytes());
    let crc = crc32c::crc32c(&b[..44]);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A fresh incarnation: random, never 0 (0 is the plain CRC of the
/// formats before version 3).
pub fn new_incarnation() -> u32 {
    loop {
        let n = rand::random::<u32>();
        if n != 0 {
            return n;
        }
    }
}

/// The header of a segment whose first record will be `first_seq`, whose
/// records are written for `incarnation` ([`new_incarnation`]), saying
/// whether every earlier segment is durable (`prior_durable`).
pub fn encode(
    volume: u64,
    stamp: Stamp,
    first_seq: u64,
    incarnation: u32,
    prior_durable: bool,
) -> [u8; SEG_HEADER_LEN] {
    encode_raw(Fields {
        version: VERSION,
        flags: if prior_durable { FLAG_PRIOR_DURABLE } else { 0 },
        volume,
        stamp,
        first_seq,
        incarnation,
    })
}

/// The header of a spare (a pool file holding no records).
pub fn encode_spare(volume: u64) -> [u8; SEG_HEADER_LEN] {
    let none = Stamp {
        epoch: 0,
        base_epoch: 0,
    };
    encode_raw(Fields {
        version: VERSION_2,
        flags: FLAG_SPARE,
        volume,
        stamp: none,
        first_seq: 0,
        incarnation: 0,
    })
}

/// A version 2 header, as releases before version 3 wrote (for tests and
/// fuzz seeds of old segments; never written by the log).
pub fn encode_v2(volume: u64, stamp: Stamp, first_seq: u64) -> [u8; SEG_HEADER_LEN] {
    encode_raw(Fields {
        version: VERSION_2,
        flags: 0,
        volume,
        stamp,
        first_seq,
        incarnation: 0,
    })
}

/// A version 1 header, as releases before recycling wrote (for tests and
/// fuzz seeds of old segments; never written by the log).
pub fn encode_v1(volume: u64, stamp: Stamp) -> [u8; SEG_HEADER_LEN] {
    encode_raw(Fields {
        version: VERSION_1,
        flags: 0,
        volume,
        stamp,
        first_seq: 0,
        incarnation: 0,
    })
}

/// `header` (a whole version 2 to 4 header) with its `first_seq` set to
/// `first_seq`, everything else kept; `None` if it is no such header.
pub fn restamp(header: &[u8], first_seq: u64) -> Option<[u8; SEG_HEADER_LEN]> {
    let Head::Stamped {
        volume,
        stamp,
        first_seq: Some(_),
        incarnation,
        ..
    } = decode(header)
    else {
        return None;
    };
    Some(encode_raw(Fields {
        version: u16::from_le_bytes([header[4], header[5]]),
        flags: u16::from_le_bytes([header[6], header[7]]),
        volume,
        stamp,
        first_seq,
        incarnation,
    }))
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
    let flags = u16::from_le_bytes([h[6], h[7]]);
    let volume = u64_at(h, 8);
    let stamp = Stamp {
        epoch: u64_at(h, 16),
        base_epoch: u64_at(h, 24),
    };
    let incarnation = u32::from_le_bytes([h[40], h[41], h[42], h[43]]);
    match version {
        VERSION_1 => Head::Stamped {
            volume,
            stamp,
            first_seq: None,
            incarnation: 0,
            prior_durable: true,
        },
        VERSION_2 | VERSION_3 | VERSION if flags & FLAG_SPARE != 0 => Head::Spare { volume },
        VERSION_2 => Head::Stamped {
            volume,
            stamp,
            first_seq: Some(u64_at(h, 32)),
            incarnation: 0,
            prior_durable: true,
        },
        VERSION_3 | VERSION => Head::Stamped {
            volume,
            stamp,
            first_seq: Some(u64_at(h, 32)),
            incarnation,
            prior_durable: version == VERSION_3 || flags & FLAG_PRIOR_DURABLE != 0,
        },
        _ => Head::Damaged(format!("unknown segment header version {version}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header of volume 42 with the stamp of [`round_trip_and_damage`].
    fn stamped(first_seq: Option<u64>, incarnation: u32, prior_durable: bool) -> Head {
        Head::Stamped {
            volume: 42,
            stamp: Stamp {
                epoch: 7,
                base_epoch: 5,
            },
            first_seq,
            incarnation,
            prior_durable,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let s = Stamp {
            epoch: 7,
            base_epoch: 5,
        };
        let b = encode(42, s, 77, 0xdead_beef, false);
        assert_eq!(decode(&b), stamped(Some(77), 0xdead_beef, false));
        assert_eq!(
            decode(&encode(42, s, 77, 0xdead_beef, true)),
            stamped(Some(77), 0xdead_beef, true)
        );
        assert_eq!(
            decode(&restamp(&b, 80).expect("version 4")),
            stamped(Some(80), 0xdead_beef, false)
        );
        let mut v3 = b;
        v3[4..6].copy_from_slice(&VERSION_3.to_le_bytes());
        let crc = crc32c::crc32c(&v3[..44]);
        v3[44..48].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode(&v3),
            stamped(Some(77), 0xdead_beef, true),
            "a version 3 log synced each segment before the next"
        );
        assert_eq!(decode(&encode_v2(42, s, 77)), stamped(Some(77), 0, true));
        assert_eq!(
            restamp(&encode_v2(42, s, 77), 80),
            Some(encode_v2(42, s, 80))
        );
        assert_eq!(decode(&encode_v1(42, s)), stamped(None, 0, true));
        assert_eq!(restamp(&encode_v1(42, s), 80), None);
        assert_ne!(new_incarnation(), 0);
        assert_eq!(decode(&encode_spare(42)), Head::Spare { volume: 42 });
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
