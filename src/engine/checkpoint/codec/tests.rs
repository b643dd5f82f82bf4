//! Binary checkpoint codec: round trips, page splitting, and hostile input.

use super::*;
use crate::engine::format::chunk::table_crc;
use crate::engine::format::limits::COMPACTED_BIT;
use crate::engine::map::{ExtentMap, Loc};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A checkpoint of `n` extents of random lengths and gaps over `nchunks`
/// chunks (some compacted, one empty), with zero ranges between them.
fn random_checkpoint(seed: u64, n: usize, nchunks: u64) -> Checkpoint {
    let mut rng = Rng(seed | 1);
    let mut chunks: Vec<ChunkInfo> = (1..=nchunks)
        .map(|i| {
            let seq = if i % 5 == 0 { COMPACTED_BIT | i } else { i };
            let data_len = if i == 2 { 0 } else { (1 + rng.below(40)) << 16 };
            ChunkInfo {
                seq,
                epoch: 1 + rng.below(3),
                data_start: 100 + rng.below(1000),
                data_len,
                table_crc: table_crc(&table_of(seq, data_len)),
            }
        })
        .collect();
    chunks.sort_by_key(|c| c.seq);
    let mut extents = Vec::new();
    let mut zeros = Vec::new();
    let mut at = rng.below(100);
    for _ in 0..n {
        let len = 1 + rng.below(64);
        let c = &chunks[rng.below(nchunks) as usize];
        if c.data_len < len * 512 || rng.below(8) == 0 {
            zeros.push((at, len));
        } else {
            let max = c.data_len / 512 - len;
            let mut off = rng.below(max + 1) * 512;
            if rng.below(50) == 0 && off >= 1 {
                off -= 1; // unaligned: the long offset form
            }
            extents.push((at, len, c.seq, off));
        }
        at += len + rng.below(3) * rng.below(5000);
    }
    Checkpoint {
        volume: rng.next(),
        epoch: 7,
        chunk_seq: nchunks,
        last_seq: 1 << 40,
        chunks,
        extents,
        zeros,
    }
}

/// A chunk's block-CRC table, derived from its id and length.
fn table_of(seq: u64, data_len: u64) -> Vec<u32> {
    let mut rng = Rng(seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..data_len.div_ceil(CRC_BLOCK))
        .map(|_| rng.next() as u32)
        .collect()
}

/// The tables of `cp`'s chunks, in chunk order (for the old versions).
fn tables_of(cp: &Checkpoint) -> Vec<Vec<u32>> {
    cp.chunks
        .iter()
        .map(|c| table_of(c.seq, c.data_len))
        .collect()
}

/// Recompute the header CRC and every page CRC (walking pages by their
/// length fields as far as they stay in bounds), so mutations reach the
/// record decoder instead of stopping at a checksum.
fn reseal(b: &mut [u8]) {
    if b.len() < HEADER_LEN {
        return;
    }
    let c = crc32c::crc32c(&b[..HEADER_LEN - 4]);
    b[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&c.to_le_bytes());
    let mut at = HEADER_LEN;
    while at + PAGE_HEADER_LEN <= b.len() {
        let len = word32(b, at + 8) as usize;
        let start = at + PAGE_HEADER_LEN;
        let Some(end) = start.checked_add(len).filter(|&e| e <= b.len()) else {
            return;
        };
        let c = crc32c::crc32c_append(crc32c::crc32c(&b[at..at + 12]), &b[start..end]);
        b[at + 12..at + 16].copy_from_slice(&c.to_le_bytes());
        at = end;
    }
}

fn pages(b: &[u8]) -> Vec<(u8, u32, usize)> {
    let mut out = Vec::new();
    let mut at = HEADER_LEN;
    while at < b.len() {
        let len = word32(b, at + 8) as usize;
        out.push((b[at], word32(b, at + 4), len));
        at += PAGE_HEADER_LEN + len;
    }
    out
}

#[test]
fn random_maps_round_trip_across_pages() {
    for (seed, n, nchunks) in [(1, 0, 0), (2, 1, 1), (3, 100, 3), (4, 40_000, 60)] {
        let cp = random_checkpoint(seed, n, nchunks);
        let enc = encode(&cp);
        assert_eq!(&enc[..8], MAGIC);
        let dec = decode(&enc).unwrap();
        assert_eq!(dec, cp, "seed {seed}");
        // Through the public entry point too, and into a map.
        assert_eq!(Checkpoint::decode(&enc).unwrap(), cp);
        let size = cp
            .extents
            .iter()
            .map(|e| e.0 + e.1)
            .chain(cp.zeros.iter().map(|z| z.0 + z.1))
            .max()
            .unwrap_or(0);
        let map = cp.to_map(size).unwrap();
        let back = Checkpoint::from_map(
            cp.volume,
            cp.epoch,
            cp.chunk_seq,
            cp.last_seq,
            &map,
            cp.chunks.clone(),
        );
        let again = decode(&encode(&back)).unwrap().to_map(size).unwrap();
        assert_eq!(
            again.iter().collect::<Vec<_>>(),
            map.iter().collect::<Vec<_>>()
        );
        for (kind, records, len) in pages(&enc) {
            assert!(len <= MAX_PAGE_BYTES && records > 0, "kind {kind}");
        }
    }
    // The big one spans several pages of extents, in order, and none of
    // checksums; in the old version, several of checksums.
    let cp = random_checkpoint(4, 40_000, 60);
    let enc = encode(&cp);
    let kinds: Vec<u8> = pages(&enc).iter().map(|p| p.0).collect();
    assert!(!kinds.contains(&PAGE_CRCS), "{kinds:?}");
    let old = encode_old(&cp, None, &tables_of(&cp));
    let old_kinds: Vec<u8> = pages(&old).iter().map(|p| p.0).collect();
    assert!(
        old_kinds.iter().filter(|&&k| k == PAGE_CRCS).count() > 1,
        "{old_kinds:?}"
    );
    assert!(
        kinds.iter().filter(|&&k| k == PAGE_EXTENTS).count() > 1,
        "{kinds:?}"
    );
    assert!(kinds.windows(2).all(|w| w[0] <= w[1]), "{kinds:?}");
}

/// Scattered 4 KiB extents cost a few bytes each (JSON took about 37).
#[test]
fn extents_are_compact() {
    let mut map = ExtentMap::new();
    let mut rng = Rng(5);
    for _ in 0..20_000 {
        let s = rng.below(1 << 24) * 8;
        let chunk = 1 + rng.below(1000);
        let off = rng.below(16384) * 4096;
        map.insert(s, 8, Loc::Chunk { chunk, off });
    }
    let cp = Checkpoint::from_map(1, 1, 1000, 1, &map, Vec::new());
    let per = encode(&cp).len() as f64 / cp.extents.len() as f64;
    assert!(per < 12.0, "{per} bytes per extent");
    let json = cp.encode_json().len() as f64 / cp.extents.len() as f64;
    assert!(per * 3.0 < json, "{per} vs {json}");
}

/// Versions 2 (full) and 3 (delta) still decode: each chunk's table CRC is
/// computed from the CRCs listed, which then take no memory.
#[test]
fn old_versions_decode_to_table_crcs() {
    for (seed, n, nchunks) in [(11, 0, 0), (12, 5, 1), (13, 3000, 30)] {
        let cp = random_checkpoint(seed, n, nchunks);
        let old = encode_old(&cp, None, &tables_of(&cp));
        assert_eq!(word32(&old, 8), OLD_VERSION);
        assert_eq!(decode(&old).unwrap(), cp, "seed {seed}");
        let d = DeltaPages {
            position: 2,
            prev_chunk_seq: 1,
            base: "b".into(),
            prev: "p".into(),
            ranges: vec![(0, 8), (100, 1)],
            removed: vec![3, 9],
        };
        let old = encode_old(&cp, Some(&d), &tables_of(&cp));
        assert_eq!(word32(&old, 8), OLD_DELTA_VERSION);
        assert_eq!(decode_any(&old).unwrap(), (cp.clone(), Some(d.clone())));
        let new = encode_with(&cp, Some(&d));
        assert_eq!(word32(&new, 8), DELTA_VERSION);
        assert_eq!(decode_any(&new).unwrap(), (cp, Some(d)));
    }
}

/// The new encoding drops the CRC tables: smaller than the old one by the
/// CRC bytes, less the 4 bytes of table CRC each chunk now carries.
#[test]
fn checkpoints_shrink_by_the_crc_bytes() {
    let cp = random_checkpoint(14, 2000, 40);
    let tables = tables_of(&cp);
    let crc_bytes: usize = tables.iter().map(|t| 4 * t.len()).sum();
    let old = encode_old(&cp, None, &tables).len();
    let new = encode(&cp).len();
    assert!(crc_bytes > 40_000, "{crc_bytes}");
    assert!(
        old - new >= crc_bytes - 4 * cp.chunks.len(),
        "old {old}, new {new}, CRC bytes {crc_bytes}"
    );
}

/// Old-version specific damage: fewer or more CRCs than the chunks' data
/// needs, and a count the header does not announce, are refused; so are a
/// CRC count and a CRC page in the new version.
#[test]
fn bad_crc_counts_are_refused() {
    let cp = random_checkpoint(15, 20, 3);
    let mut tables = tables_of(&cp);
    let mut short = tables.clone();
    short[0].pop();
    let e = decode(&encode_old(&cp, None, &short))
        .unwrap_err()
        .to_string();
    assert!(e.contains("fewer checksums"), "{e}");
    tables[0].push(7);
    let e = decode(&encode_old(&cp, None, &tables))
        .unwrap_err()
        .to_string();
    assert!(e.contains("more checksums"), "{e}");
    // New version: a CRC count in the header.
    let mut m = encode(&cp);
    m[12 + 8 * 5..12 + 8 * 6].copy_from_slice(&1u64.to_le_bytes());
    reseal(&mut m);
    let e = decode(&m).unwrap_err().to_string();
    assert!(e.contains("keeps none"), "{e}");
    // New version: an old CRC page spliced in (header says version 4).
    let mut m = encode_old(&cp, None, &tables_of(&cp));
    m[8..12].copy_from_slice(&VERSION.to_le_bytes());
    m[12 + 8 * 5..12 + 8 * 6].copy_from_slice(&0u64.to_le_bytes());
    reseal(&mut m);
    assert!(decode(&m).is_err());
    // An unknown version is named.
    let mut m = encode(&cp);
    m[8..12].copy_from_slice(&6u32.to_le_bytes());
    reseal(&mut m);
    let e = decode(&m).unwrap_err().to_string();
    assert!(e.contains("unknown format version 6"), "{e}");
}

#[test]
fn every_truncation_and_bit_flip_is_an_error() {
    let cp = random_checkpoint(6, 300, 4);
    let old = encode_old(&cp, None, &tables_of(&cp));
    for cut in 0..old.len() {
        assert!(decode(&old[..cut]).is_err(), "old, cut at {cut}");
    }
    for byte in 0..old.len() {
        let mut m = old.clone();
        m[byte] ^= 1 << (byte % 8);
        assert!(decode(&m).is_err(), "old, flip {byte} decoded");
    }
    let enc = encode(&cp);
    for cut in 0..enc.len() {
        assert!(decode(&enc[..cut]).is_err(), "cut at {cut}");
        assert!(Checkpoint::decode(&enc[..cut]).is_err(), "cut at {cut}");
    }
    for byte in 0..enc.len() {
        for bit in 0..8 {
            let mut m = enc.clone();
            m[byte] ^= 1 << bit;
            assert!(Checkpoint::decode(&m).is_err(), "flip {byte}.{bit} decoded");
        }
    }
    // A flipped payload byte names its page.
    let mut m = enc.clone();
    m[HEADER_LEN + PAGE_HEADER_LEN + 1] ^= 4;
    let e = decode(&m).unwrap_err();
    assert!(matches!(e, CheckpointError::Page { page: 0, .. }), "{e}");
    assert!(e.to_string().contains("page 0"), "{e}");
}

#[test]
fn resealed_mutations_never_panic() {
    let cp = random_checkpoint(7, 2000, 6);
    let enc = encode(&cp);
    let mut rng = Rng(8);
    let mut errors = 0;
    for i in 0..20_000 {
        let mut m = enc.clone();
        for _ in 0..1 + i % 3 {
            let at = rng.below(m.len() as u64) as usize;
            m[at] = rng.next() as u8;
        }
        let cut = m.len() - (rng.below(4) as usize) * (i % 2);
        let m = &mut m[..cut];
        reseal(m);
        match decode(m) {
            Ok(cp) => {
                let _ = cp.to_map(1 << 30);
            }
            Err(_) => errors += 1,
        }
    }
    assert!(errors > 0);
}

#[test]
fn hostile_headers_and_pages_are_refused() {
    let cp = random_checkpoint(9, 50, 2);
    let enc = encode(&cp);
    // Huge counts: refused from the header, before any allocation.
    for field in 4..8 {
        for v in [u64::MAX, 1 << 40, enc.len() as u64] {
            let mut m = enc.clone();
            let at = 12 + 8 * field;
            m[at..at + 8].copy_from_slice(&v.to_le_bytes());
            reseal(&mut m);
            let e = decode(&m).unwrap_err();
            assert!(matches!(e, CheckpointError::Parse(_)), "field {field}: {e}");
        }
    }
    // A newer page kind is named, not misread.
    let mut m = enc.clone();
    m[HEADER_LEN] = 8;
    reseal(&mut m);
    let e = decode(&m).unwrap_err().to_string();
    assert!(e.contains("unknown page kind 8"), "{e}");
    // A page claiming more records than the header allows.
    let mut m = enc.clone();
    m[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut m);
    let e = decode(&m).unwrap_err().to_string();
    assert!(e.contains("page 0"), "{e}");
    // An oversized page length.
    let mut m = enc.clone();
    m[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut m);
    let e = decode(&m).unwrap_err().to_string();
    assert!(e.contains("page limit"), "{e}");
    // Extent starts that overflow: the second extent's gap wraps.
    let huge = Checkpoint {
        extents: vec![(u64::MAX - 1, 1, 1, 0), (0, 5, 1, 0)],
        ..random_checkpoint(10, 0, 1)
    };
    let e = decode(&encode(&huge)).unwrap_err().to_string();
    assert!(e.contains("overflows"), "{e}");
}

#[test]
fn varints() {
    for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX - 1, u64::MAX] {
        let mut b = Vec::new();
        put_varint(&mut b, v);
        let mut r = Reader { b: &b, at: 0 };
        assert_eq!(r.varint(), Ok(v));
        assert_eq!(r.at, b.len());
        assert_eq!(unzigzag(zigzag(v)), v);
    }
    // Overlong and overflowing forms are refused.
    let mut r = Reader {
        b: &[0xff; 11],
        at: 0,
    };
    assert!(r.varint().is_err());
    let mut r = Reader {
        b: &[0x80; 3],
        at: 0,
    };
    assert!(r.varint().is_err());
}
