//! Chunk object codec and keys.
//!
//! A chunk holds the writes of one contiguous sequence range
//! `first_seq..=last_seq`, newest write winning where they overlap.
//! Layout (little endian):
//! ```text
//! magic "SHALECK1" | version u32 | header_len u32 | volume u64 | epoch u64 |
//! chunk_seq u64 | first_seq u64 | last_seq u64 | n_extents u32 | n_blocks u32 |
//! data_len u64 | extents[n_extents] | block_crcs[n_blocks] u32 | header_crc u32 | data
//! extent = lba u64 | sectors u64 | data_off u64 (u64::MAX: unmapped/zero)
//! ```
//! `header_crc` is CRC32C of every header byte before it. The data area is
//! checked in [`CRC_BLOCK`] blocks (the last one may be short), so any
//! sector-aligned part of it can be fetched and verified on its own.

use crate::engine::SECTOR;

pub const MAGIC: &[u8; 8] = b"SHALECK1";
pub const VERSION: u32 = 1;
/// Granularity of the data-area checksums.
pub const CRC_BLOCK: u64 = 4096;
const FIXED_LEN: usize = 72;
/// Shortest header (no extents, no data): where the data area of a chunk
/// starts at the earliest.
pub const MIN_HEADER_LEN: u64 = FIXED_LEN as u64 + 4;
/// Longest data area a chunk may claim (far above any chunk the engine
/// writes, low enough that offsets into it never overflow).
pub const MAX_DATA_LEN: u64 = 1 << 40;
const EXTENT_LEN: usize = 24;
const ZERO_OFF: u64 = u64::MAX;

/// One range of a chunk: data at `data_off` in the data area, or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkExtent {
    pub lba: u64,
    pub sectors: u64,
    pub data_off: Option<u64>,
}

/// Everything in a chunk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    pub volume: u64,
    pub epoch: u64,
    pub chunk_seq: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub extents: Vec<ChunkExtent>,
    pub block_crcs: Vec<u32>,
    pub data_len: u64,
    /// Byte offset of the data area in the object.
    pub header_len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk too short for its header")]
    Truncated,
    #[error("not a chunk (bad magic)")]
    BadMagic,
    #[error("unsupported chunk version {0}")]
    Version(u32),
    #[error("chunk header checksum mismatch")]
    HeaderCrc,
    #[error("chunk header is inconsistent: {0}")]
    Inconsistent(&'static str),
    #[error("chunk data checksum mismatch in block {0}")]
    DataCrc(u64),
}

/// CRC32C of each [`CRC_BLOCK`] block of `data`.
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(CRC_BLOCK as usize)
        .map(crc32c::crc32c)
        .collect()
}

/// One run of a chunk's data area for [`encode_head`]: its bytes and the
/// CRC32C of its leading whole [`CRC_BLOCK`] blocks when the caller
/// already holds them (little endian, 4 bytes a block; empty when it does
/// not). The caller vouches for them: they were computed over, or checked
/// against, exactly these bytes.
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    pub data: &'a [u8],
    pub block_crcs: &'a [u8],
}

impl<'a> Part<'a> {
    /// A part whose CRCs [`encode_head`] computes.
    pub fn plain(data: &'a [u8]) -> Part<'a> {
        Part {
            data,
            block_crcs: &[],
        }
    }

    /// How many of its leading blocks take the given CRCs in
    /// [`encode_head`] when the part lands `at` bytes into the data area:
    /// all it has CRCs for, if it lands on a block; else none.
    pub fn reused_blocks(&self, at: usize) -> usize {
        let block = CRC_BLOCK as usize;
        if at.is_multiple_of(block) {
            (self.data.len() / block).min(self.block_crcs.len() / 4)
        } else {
            0
        }
    }
}

/// Encode a chunk. `extents` with data index into `data`.
pub fn encode(h: &ChunkHeader, data: &[u8]) -> Vec<u8> {
    let mut out = encode_head(h, &[Part::plain(data)]);
    out.extend_from_slice(data);
    out
}

/// Length of the header [`encode_head`] writes for `h` and a data area of
/// `data_len` bytes.
fn header_len_of(h: &ChunkHeader, data_len: usize) -> usize {
    FIXED_LEN + EXTENT_LEN * h.extents.len() + 4 * data_len.div_ceil(CRC_BLOCK as usize) + 4
}

/// Length of the object for `h` and a data area of `data_len` bytes.
pub fn encoded_len(h: &ChunkHeader, data_len: usize) -> usize {
    header_len_of(h, data_len) + data_len
}

/// The header (through its CRC) of the chunk whose data area is `parts`
/// concatenated: the object is this followed by the parts, so the caller
/// can write the parts from where they are, never copying them into one
/// buffer. `h.block_crcs`, `h.data_len` and `h.header_len` are ignored
/// (computed). A block's CRC is taken from its part when the part begins
/// on a block of the data area and holds the whole block; every other
/// block's is computed over the parts (a block may span several).
pub fn encode_head(h: &ChunkHeader, parts: &[Part]) -> Vec<u8> {
    let data_len: usize = parts.iter().map(|p| p.data.len()).sum();
    let n_blocks = data_len.div_ceil(CRC_BLOCK as usize);
    let header_len = header_len_of(h, data_len);
    let mut head = Vec::with_capacity(header_len);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(header_len as u32).to_le_bytes());
    for v in [h.volume, h.epoch, h.chunk_seq, h.first_seq, h.last_seq] {
        head.extend_from_slice(&v.to_le_bytes());
    }
    head.extend_from_slice(&(h.extents.len() as u32).to_le_bytes());
    head.extend_from_slice(&(n_blocks as u32).to_le_bytes());
    head.extend_from_slice(&(data_len as u64).to_le_bytes());
    for e in &h.extents {
        head.extend_from_slice(&e.lba.to_le_bytes());
        head.extend_from_slice(&e.sectors.to_le_bytes());
        head.extend_from_slice(&e.data_off.unwrap_or(ZERO_OFF).to_le_bytes());
    }
    let table_at = head.len();
    head.resize(table_at + 4 * n_blocks, 0);
    let block = CRC_BLOCK as usize;
    let mut known = vec![false; n_blocks];
    let mut filled = 0usize;
    for part in parts {
        let whole = part.reused_blocks(filled);
        if whole > 0 {
            let first = filled / block;
            head[table_at + first * 4..table_at + (first + whole) * 4]
                .copy_from_slice(&part.block_crcs[..whole * 4]);
            known[first..first + whole].fill(true);
        }
        filled += part.data.len();
    }
    let mut cursor = PartCursor::new(parts);
    for (i, known) in known.iter().enumerate() {
        if !known {
            let from = i * block;
            let crc = cursor.crc(from, (from + block).min(data_len));
            head[table_at + i * 4..table_at + i * 4 + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(head.len(), header_len);
    head
}

/// Reads byte ranges of the concatenation of parts, moving forward only.
struct PartCursor<'p, 'a> {
    parts: &'p [Part<'a>],
    /// Index of the part holding `at`, and where that part starts.
    index: usize,
    start: usize,
}

impl<'p, 'a> PartCursor<'p, 'a> {
    fn new(parts: &'p [Part<'a>]) -> Self {
        PartCursor {
            parts,
            index: 0,
            start: 0,
        }
    }

    /// CRC32C of `[from, to)`; `from` never below that of an earlier call.
    fn crc(&mut self, from: usize, to: usize) -> u32 {
        let mut crc = 0u32;
        let mut at = from;
        while at < to {
            let p = self.parts[self.index].data;
            let end = self.start + p.len();
            if at >= end {
                self.index += 1;
                self.start = end;
                continue;
            }
            let take = to.min(end);
            crc = crc32c::crc32c_append(crc, &p[at - self.start..take - self.start]);
            at = take;
        }
        crc
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ChunkError> {
        let s = self
            .b
            .get(self.pos..self.pos + N)
            .ok_or(ChunkError::Truncated)?;
        self.pos += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, ChunkError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, ChunkError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

/// Decode and verify the header at the start of `b` (which may hold just
/// the header or the whole object). Does not check the data area.
pub fn decode_header(b: &[u8]) -> Result<ChunkHeader, ChunkError> {
    let mut r = Reader { b, pos: 0 };
    if &r.take::<8>()? != MAGIC {
        return Err(ChunkError::BadMagic);
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(ChunkError::Version(version));
    }
    let header_len = r.u32()? as usize;
    if header_len < FIXED_LEN + 4 || header_len > b.len() {
        return Err(ChunkError::Truncated);
    }
    let stored = u32::from_le_bytes(
        b[header_len - 4..header_len]
            .try_into()
            .map_err(|_| ChunkError::Truncated)?,
    );
    if crc32c::crc32c(&b[..header_len - 4]) != stored {
        return Err(ChunkError::HeaderCrc);
    }
    let volume = r.u64()?;
    let epoch = r.u64()?;
    let chunk_seq = r.u64()?;
    let first_seq = r.u64()?;
    let last_seq = r.u64()?;
    let n_ext = r.u32()? as usize;
    let n_blocks = r.u32()? as usize;
    let data_len = r.u64()?;
    if FIXED_LEN + EXTENT_LEN * n_ext + 4 * n_blocks + 4 != header_len {
        return Err(ChunkError::Inconsistent("header length"));
    }
    if data_len.div_ceil(CRC_BLOCK) != n_blocks as u64 {
        return Err(ChunkError::Inconsistent("block count"));
    }
    if first_seq > last_seq || last_seq >= super::limits::MAX_SEQ {
        return Err(ChunkError::Inconsistent("sequence range"));
    }
    if !super::limits::valid_chunk_id(chunk_seq) {
        return Err(ChunkError::Inconsistent("chunk number"));
    }
    if data_len > MAX_DATA_LEN {
        return Err(ChunkError::Inconsistent("data length"));
    }
    let mut extents = Vec::with_capacity(n_ext);
    for _ in 0..n_ext {
        let lba = r.u64()?;
        let sectors = r.u64()?;
        let off = r.u64()?;
        let data_off = (off != ZERO_OFF).then_some(off);
        if let Some(o) = data_off {
            let end = sectors
                .checked_mul(SECTOR)
                .and_then(|l| l.checked_add(o))
                .ok_or(ChunkError::Inconsistent("extent length"))?;
            if end > data_len {
                return Err(ChunkError::Inconsistent("extent past data"));
            }
        }
        if sectors == 0 || lba.checked_add(sectors).is_none() {
            return Err(ChunkError::Inconsistent("extent range"));
        }
        extents.push(ChunkExtent {
            lba,
            sectors,
            data_off,
        });
    }
    let mut block_crcs = Vec::with_capacity(n_blocks);
    for _ in 0..n_blocks {
        block_crcs.push(r.u32()?);
    }
    Ok(ChunkHeader {
        volume,
        epoch,
        chunk_seq,
        first_seq,
        last_seq,
        extents,
        block_crcs,
        data_len,
        header_len: header_len as u64,
    })
}

/// The block-aligned data-area range to fetch so `[off, off+len)` can be
/// verified: `(start, end)` with `end` clipped to `data_len`.
pub fn aligned_range(off: u64, len: u64, data_len: u64) -> (u64, u64) {
    let start = off - off % CRC_BLOCK;
    let end = (off + len).div_ceil(CRC_BLOCK) * CRC_BLOCK;
    (start, end.min(data_len))
}

/// CRC32C of a chunk's block-CRC table (its u32s little-endian, in
/// order): what checkpoints and [`crate::engine::checkpoint::ChunkInfo`] keep
/// instead of the table itself, to check a table read from the header.
pub fn table_crc(crcs: &[u32]) -> u32 {
    crcs.iter()
        .fold(0, |crc, x| crc32c::crc32c_append(crc, &x.to_le_bytes()))
}

/// Verify `data`, which starts at the block-aligned data-area offset `start`.
pub fn verify_blocks(crcs: &[u32], start: u64, data: &[u8]) -> Result<(), ChunkError> {
    let first = start / CRC_BLOCK;
    for (i, block) in data.chunks(CRC_BLOCK as usize).enumerate() {
        let idx = first + i as u64;
        match crcs.get(idx as usize) {
            Some(&c) if c == crc32c::crc32c(block) => {}
            _ => return Err(ChunkError::DataCrc(idx)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (ChunkHeader, Vec<u8>) {
        let mut data = vec![0u8; 9000 / 512 * 512];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        let h = ChunkHeader {
            volume: 3,
            epoch: 2,
            chunk_seq: 9,
            first_seq: 100,
            last_seq: 120,
            extents: vec![
                ChunkExtent {
                    lba: 0,
                    sectors: 8,
                    data_off: Some(0),
                },
                ChunkExtent {
                    lba: 50,
                    sectors: 3,
                    data_off: None,
                },
                ChunkExtent {
                    lba: 64,
                    sectors: 9,
                    data_off: Some(4096),
                },
            ],
            block_crcs: vec![],
            data_len: data.len() as u64,
            header_len: 0,
        };
        (h, data)
    }

    #[test]
    fn round_trip_and_partial_verify() {
        let (h, data) = sample();
        let obj = encode(&h, &data);
        let d = decode_header(&obj).unwrap();
        assert_eq!(d.extents, h.extents);
        assert_eq!(
            (d.chunk_seq, d.first_seq, d.last_seq, d.epoch),
            (9, 100, 120, 2)
        );
        assert_eq!(d.block_crcs.len(), 3);
        let body = &obj[d.header_len as usize..];
        assert_eq!(body, &data[..]);
        // Verify a sub-range that starts mid-block.
        let (s, e) = aligned_range(5000, 1024, d.data_len);
        assert_eq!((s, e), (4096, 8192));
        verify_blocks(&d.block_crcs, s, &body[s as usize..e as usize]).unwrap();
        let (s, e) = aligned_range(8192, 512, d.data_len);
        assert_eq!(e, d.data_len);
        verify_blocks(&d.block_crcs, s, &body[s as usize..e as usize]).unwrap();
        let mut bad = body[4096..8192].to_vec();
        bad[10] ^= 4;
        assert_eq!(
            verify_blocks(&d.block_crcs, 4096, &bad),
            Err(ChunkError::DataCrc(1))
        );
    }

    /// The object [`encode_head`] describes: its header, then the parts.
    fn encode_parts_whole(h: &ChunkHeader, parts: &[Part]) -> Vec<u8> {
        let mut obj = encode_head(h, parts);
        for p in parts {
            obj.extend_from_slice(p.data);
        }
        obj
    }

    #[test]
    fn encode_head_matches_encode_whatever_the_header_says() {
        let (h, data) = sample();
        let mut lied = h.clone();
        lied.data_len = 1;
        lied.block_crcs = vec![7];
        // Cuts inside blocks and at them: blocks spanning parts.
        for cuts in [vec![100], vec![4096], vec![1, 4095, 4097, 8200], vec![]] {
            let mut parts = Vec::new();
            let mut at = 0;
            for c in cuts.iter().copied().chain([data.len()]) {
                parts.push(Part::plain(&data[at..c]));
                at = c;
            }
            let obj = encode_parts_whole(&lied, &parts);
            assert_eq!(obj, encode(&h, &data), "cuts {cuts:?}");
            assert_eq!(decode_header(&obj).unwrap().data_len, data.len() as u64);
            assert_eq!(obj.len(), encoded_len(&h, data.len()));
        }
        let bare = ChunkHeader {
            extents: Vec::new(),
            ..h
        };
        let empty = encode_head(&bare, &[]);
        let d = decode_header(&empty).unwrap();
        assert_eq!((d.data_len, d.block_crcs.len()), (0, 0));
    }

    /// Little-endian CRC table of `data`'s blocks, as a WAL record holds it.
    fn table(data: &[u8]) -> Vec<u8> {
        block_crcs(data)
            .iter()
            .flat_map(|c| c.to_le_bytes())
            .collect()
    }

    #[test]
    fn given_block_crcs_are_used_only_for_whole_blocks_they_begin() {
        // 8704 bytes: blocks 0 and 1 whole, block 2 short.
        let (h, data) = sample();
        let want = encode(&h, &data);
        let encode_parts = |parts: &[Part]| encode_parts_whole(&h, parts);
        // Right CRCs, at block boundaries: the same object.
        let whole = table(&data);
        assert_eq!(
            encode_parts(&[Part {
                data: &data,
                block_crcs: &whole
            }]),
            want
        );
        let (a, b) = data.split_at(4096);
        let parts = [
            Part {
                data: a,
                block_crcs: &table(a),
            },
            Part {
                data: b,
                block_crcs: &table(b),
            },
        ];
        assert_eq!(encode_parts(&parts), want);
        // Fewer CRCs than whole blocks: the rest are computed.
        assert_eq!(
            encode_parts(&[Part {
                data: &data,
                block_crcs: &whole[..4]
            }]),
            want
        );
        // Wrong CRCs show where they are taken: block 0 only (begun and
        // held whole by the first part). The second part begins block 1
        // but does not hold it whole, the third begins inside block 1, and
        // the fourth holds the short block 2.
        let bogus = [0xeeu8; 12];
        let parts = [
            Part {
                data: &data[..4096],
                block_crcs: &bogus,
            },
            Part {
                data: &data[4096..4608],
                block_crcs: &bogus,
            },
            Part {
                data: &data[4608..8192],
                block_crcs: &bogus,
            },
            Part {
                data: &data[8192..],
                block_crcs: &bogus,
            },
        ];
        let obj = encode_parts(&parts);
        let d = decode_header(&obj).unwrap();
        let body = &obj[d.header_len as usize..];
        assert_eq!(body, &data[..]);
        let mut expected = block_crcs(&data);
        expected[0] = u32::from_le_bytes([0xee; 4]);
        assert_eq!(d.block_crcs, expected);
        assert_eq!(
            verify_blocks(&d.block_crcs, 0, &body[..4096]),
            Err(ChunkError::DataCrc(0))
        );
        assert!(verify_blocks(&d.block_crcs, 4096, &body[4096..]).is_ok());
    }

    #[test]
    fn corruption_is_detected() {
        let (h, data) = sample();
        let obj = encode(&h, &data);
        let hl = decode_header(&obj).unwrap().header_len as usize;
        for i in [0, 9, 13, 20, 80, hl - 1] {
            let mut bad = obj.clone();
            bad[i] ^= 0x10;
            assert!(decode_header(&bad).is_err(), "flip at {i}");
        }
        for cut in [0, 7, 40, hl - 1] {
            assert!(decode_header(&obj[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// Garbage and mutated headers give errors, never panics.
    #[test]
    fn decoder_survives_random_input() {
        let (h, data) = sample();
        let obj = encode(&h, &data);
        let mut x = 0x1234_5678_u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5000 {
            let mut m = obj.clone();
            for _ in 0..1 + rnd() % 4 {
                let i = (rnd() % 200) as usize % m.len();
                m[i] = rnd() as u8;
            }
            let cut = (rnd() as usize) % (m.len() + 1);
            let _ = decode_header(&m[..cut]);
            let junk: Vec<u8> = (0..rnd() % 300).map(|_| rnd() as u8).collect();
            let _ = decode_header(&junk);
        }
        // A header whose CRC matches but whose counts lie is rejected.
        let mut lie = obj[..decode_header(&obj).unwrap().header_len as usize].to_vec();
        lie[56..60].copy_from_slice(&1000u32.to_le_bytes());
        let n = lie.len();
        let crc = crc32c::crc32c(&lie[..n - 4]);
        lie[n - 4..].copy_from_slice(&crc.to_le_bytes());
        assert!(decode_header(&lie).is_err());
    }
}
