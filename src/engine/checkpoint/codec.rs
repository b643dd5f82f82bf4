//! The binary checkpoint format (`SHALECP2`).
//!
//! Layout (all fixed-width integers little-endian):
//!
//! ```text
//! header  "SHALECP2" | version u32 (4: full, 5: delta; 2 and 3 are the
//!         older full and delta) | volume u64 | epoch u64
//!         | chunk_seq u64 | last_seq u64 | chunks u64 | crcs u64 (0 from 4 on)
//!         | extents u64 | zeros u64 | crc32c u32 (of the bytes before it)
//! page*   kind u8 | 0u8 x3 | records u32 | bytes u32 | crc32c u32 | payload
//! ```
//!
//! A page's CRC covers its first 12 header bytes and its payload; a payload
//! is at most [`MAX_PAGE_BYTES`]. Pages come in kind order, each kind's
//! records in table order:
//! - [`PAGE_CHUNKS`]: per chunk `seq, epoch, data_start, data_len`
//!   (varints), then (versions 4 and 5) `table_crc` as a raw u32 LE: the
//!   CRC32C of the chunk's block-CRC table, which stays in the chunk
//!   object's header ([`crate::engine::format::chunk::table_crc`]);
//! - [`PAGE_CRCS`] (versions 2 and 3 only, still decoded): the chunks' CRC
//!   arrays concatenated in chunk order, raw u32 LE (chunk `i` has
//!   `data_len.div_ceil(CRC_BLOCK)` of them); the decoder keeps only each
//!   chunk's table CRC, computed as the array streams by;
//! - [`PAGE_EXTENTS`]: per extent `gap, len, chunk, off`: `gap` = start
//!   minus the previous extent's end (0 for a page's first extent, so every
//!   page decodes on its own), `chunk` = zigzag of the wrapping difference
//!   from the previous extent's chunk (0 first), `off` = `sectors << 1` if
//!   sector aligned, else `1` followed by the byte offset;
//! - [`PAGE_ZEROS`]: per zero range `gap, len` (like extents).
//!
//!
//! A *delta* checkpoint (see [`super::delta`]) has the same header, with
//! version 5 (3 in the older format) (so neither a truncated delta nor an older reader takes it
//! for a full map), and pages (its chunks are the chunks it adds, its extents and zero ranges
//! the new contents of the ranges it changes) plus three more kinds, which
//! a full checkpoint never holds:
//! - [`PAGE_LINK`] (exactly one record, required in a delta): `position`
//!   in the chain (1 for the first delta after the base), the
//!   predecessor's `chunk_seq`, the number of changed ranges and of
//!   removed chunks (so a delta cut after a page boundary is refused),
//!   then the base's key and the predecessor's key, each as `len` + UTF-8
//!   bytes (at most [`MAX_KEY_BYTES`]);
//! - [`PAGE_RANGES`]: per changed range `gap, len` (like zero ranges):
//!   everything in them not covered by the delta's extents or zero ranges
//!   is unmapped;
//! - [`PAGE_REMOVED`]: per chunk removed from the table, the difference
//!   from the previous removed id (ascending; the first against 0).
//!
//! Readers from before deltas existed reject versions 3 and 5 ("unknown format
//! version"), so they never misread a delta as a full map; kinds above
//! [`PAGE_REMOVED`] are rejected by name.
//!
//! Invariants of [`decode`]: every number is checked before it is used
//! (counts against the bytes left, sums with `checked_add`), nothing is
//! allocated beyond what the input's length can justify, and every failure
//! is an error naming the page, never a panic. Semantic checks (chunk ids,
//! lengths against chunk data) stay in [`Checkpoint::validate`] and
//! [`Checkpoint::to_map`].

use super::{Checkpoint, CheckpointError, ChunkInfo};
use crate::engine::format::chunk::CRC_BLOCK;

pub const MAGIC: &[u8; 8] = b"SHALECP2";
const VERSION: u32 = 4;
/// Header version of a delta (which must hold a [`PAGE_LINK`] page).
const DELTA_VERSION: u32 = 5;
/// The older full and delta versions: CRC tables listed in [`PAGE_CRCS`].
const OLD_VERSION: u32 = 2;
const OLD_DELTA_VERSION: u32 = 3;
/// Header bytes, its CRC included.
pub const HEADER_LEN: usize = 8 + 4 + 8 * 8 + 4;
const PAGE_HEADER_LEN: usize = 16;
/// Largest page payload.
pub const MAX_PAGE_BYTES: usize = 64 << 10;

pub const PAGE_CHUNKS: u8 = 1;
pub const PAGE_CRCS: u8 = 2;
pub const PAGE_EXTENTS: u8 = 3;
pub const PAGE_ZEROS: u8 = 4;
pub const PAGE_LINK: u8 = 5;
pub const PAGE_RANGES: u8 = 6;
pub const PAGE_REMOVED: u8 = 7;
/// Longest key a link record may name.
pub const MAX_KEY_BYTES: usize = 1024;
/// Highest chain position a link may hold.
pub const MAX_POSITION: u64 = 1 << 16;

/// The pages only a delta holds (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaPages {
    /// 1 for the first delta after the base.
    pub position: u64,
    /// `chunk_seq` of the predecessor (the base, or the previous delta).
    pub prev_chunk_seq: u64,
    pub base: String,
    pub prev: String,
    /// Changed ranges `(start, sectors)`, ascending and disjoint.
    pub ranges: Vec<(u64, u64)>,
    /// Chunk ids removed from the table, ascending.
    pub removed: Vec<u64>,
}

/// Smallest encoded record of each kind (bytes), for bounding counts.
const MIN_CHUNK: u64 = 4;
const MIN_CRC: u64 = 4;
const MIN_EXTENT: u64 = 4;
const MIN_ZERO: u64 = 2;

fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

fn zigzag(v: u64) -> u64 {
    let s = v as i64;
    ((s << 1) ^ (s >> 63)) as u64
}

fn unzigzag(v: u64) -> u64 {
    ((v >> 1) as i64 ^ -((v & 1) as i64)) as u64
}

/// Pages of one kind, cut at [`MAX_PAGE_BYTES`].
struct PageWriter<'a> {
    out: &'a mut Vec<u8>,
    kind: u8,
    page: Vec<u8>,
    records: u32,
}

impl<'a> PageWriter<'a> {
    fn new(out: &'a mut Vec<u8>, kind: u8) -> Self {
        PageWriter {
            out,
            kind,
            page: Vec::with_capacity(MAX_PAGE_BYTES),
            records: 0,
        }
    }

    /// True if a record of up to `len` bytes no longer fits: the caller
    /// flushes and restarts its per-page delta state.
    fn full(&self, len: usize) -> bool {
        self.page.len() + len > MAX_PAGE_BYTES
    }

    fn flush(&mut self) {
        if self.records == 0 {
            return;
        }
        let start = self.out.len();
        self.out.push(self.kind);
        self.out.extend_from_slice(&[0; 3]);
        self.out.extend_from_slice(&self.records.to_le_bytes());
        self.out
            .extend_from_slice(&(self.page.len() as u32).to_le_bytes());
        let mut crc = crc32c::crc32c(&self.out[start..]);
        crc = crc32c::crc32c_append(crc, &self.page);
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.out.extend_from_slice(&self.page);
        self.page.clear();
        self.records = 0;
    }
}

/// Longest varint.
const VARINT_MAX: usize = 10;

/// Encode `cp` in the binary format.
pub fn encode(cp: &Checkpoint) -> Vec<u8> {
    encode_with(cp, None)
}

/// Encode `cp`, with the delta pages `delta` if given.
pub fn encode_with(cp: &Checkpoint, delta: Option<&DeltaPages>) -> Vec<u8> {
    encode_any(cp, delta, None)
}

/// Encode `cp` in the older versions (2 full, 3 delta) that list every
/// chunk's CRC table (`tables[i]` is chunk `i`'s): no longer written by the
/// engine; kept for compatibility tests, fuzz seeds and fixtures.
pub fn encode_old(cp: &Checkpoint, delta: Option<&DeltaPages>, tables: &[Vec<u32>]) -> Vec<u8> {
    encode_any(cp, delta, Some(tables))
}

fn encode_any(cp: &Checkpoint, delta: Option<&DeltaPages>, tables: Option<&[Vec<u32>]>) -> Vec<u8> {
    let crcs: u64 = tables.map_or(0, |t| t.iter().map(|c| c.len() as u64).sum());
    let mut out = Vec::with_capacity(
        HEADER_LEN + cp.chunks.len() * 24 + crcs as usize * 4 + cp.extents.len() * 10,
    );
    out.extend_from_slice(MAGIC);
    let version = match (delta.is_some(), tables.is_some()) {
        (true, false) => DELTA_VERSION,
        (false, false) => VERSION,
        (true, true) => OLD_DELTA_VERSION,
        (false, true) => OLD_VERSION,
    };
    out.extend_from_slice(&version.to_le_bytes());
    for v in [
        cp.volume,
        cp.epoch,
        cp.chunk_seq,
        cp.last_seq,
        cp.chunks.len() as u64,
        crcs,
        cp.extents.len() as u64,
        cp.zeros.len() as u64,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());

    let mut w = PageWriter::new(&mut out, PAGE_CHUNKS);
    for c in &cp.chunks {
        if w.full(4 * VARINT_MAX + 4) {
            w.flush();
        }
        for v in [c.seq, c.epoch, c.data_start, c.data_len] {
            put_varint(&mut w.page, v);
        }
        if tables.is_none() {
            w.page.extend_from_slice(&c.table_crc.to_le_bytes());
        }
        w.records += 1;
    }
    w.flush();

    let mut w = PageWriter::new(&mut out, PAGE_CRCS);
    for x in tables.unwrap_or_default().iter().flatten() {
        if w.full(4) {
            w.flush();
        }
        w.page.extend_from_slice(&x.to_le_bytes());
        w.records += 1;
    }
    w.flush();

    let mut w = PageWriter::new(&mut out, PAGE_EXTENTS);
    let (mut end, mut chunk) = (0u64, 0u64);
    for &(s, l, c, off) in &cp.extents {
        if w.full(5 * VARINT_MAX) {
            w.flush();
            (end, chunk) = (0, 0);
        }
        put_varint(&mut w.page, s.wrapping_sub(end));
        put_varint(&mut w.page, l);
        put_varint(&mut w.page, zigzag(c.wrapping_sub(chunk)));
        if off % crate::engine::SECTOR == 0 && off / crate::engine::SECTOR < 1 << 62 {
            put_varint(&mut w.page, (off / crate::engine::SECTOR) << 1);
        } else {
            put_varint(&mut w.page, 1);
            put_varint(&mut w.page, off);
        }
        w.records += 1;
        (end, chunk) = (s.wrapping_add(l), c);
    }
    w.flush();

    put_ranges(&mut out, PAGE_ZEROS, &cp.zeros);
    if let Some(d) = delta {
        encode_delta_pages(&mut out, d);
    }
    out
}

/// Pages of `kind` holding `(start, len)` ranges as (gap from the previous
/// end, length) varint pairs; the gap restarts from 0 on each page, so a
/// page decodes on its own (see [`Reader::ranges`]).
fn put_ranges(out: &mut Vec<u8>, kind: u8, ranges: &[(u64, u64)]) {
    let mut w = PageWriter::new(out, kind);
    let mut end = 0u64;
    for &(s, l) in ranges {
        if w.full(2 * VARINT_MAX) {
            w.flush();
            end = 0;
        }
        put_varint(&mut w.page, s.wrapping_sub(end));
        put_varint(&mut w.page, l);
        w.records += 1;
        end = s.wrapping_add(l);
    }
    w.flush();
}

fn encode_delta_pages(out: &mut Vec<u8>, d: &DeltaPages) {
    let mut w = PageWriter::new(out, PAGE_LINK);
    put_varint(&mut w.page, d.position);
    put_varint(&mut w.page, d.prev_chunk_seq);
    put_varint(&mut w.page, d.ranges.len() as u64);
    put_varint(&mut w.page, d.removed.len() as u64);
    for k in [&d.base, &d.prev] {
        put_varint(&mut w.page, k.len() as u64);
        w.page.extend_from_slice(k.as_bytes());
    }
    w.records = 1;
    w.flush();

    put_ranges(out, PAGE_RANGES, &d.ranges);

    let mut w = PageWriter::new(out, PAGE_REMOVED);
    let mut last = 0u64;
    for &c in &d.removed {
        if w.full(VARINT_MAX) {
            w.flush();
            last = 0;
        }
        put_varint(&mut w.page, c.wrapping_sub(last));
        w.records += 1;
        last = c;
    }
    w.flush();
}

/// Reads varints and fixed words from one page's payload.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..VARINT_MAX {
            let Some(&byte) = self.b.get(self.at) else {
                return Err(format!("record cut short at payload byte {}", self.at));
            };
            self.at += 1;
            if i == VARINT_MAX - 1 && byte > 1 {
                return Err(format!("varint overflows at payload byte {}", self.at));
            }
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint too long at payload byte {}", self.at))
    }

    /// `records` ranges stored as (gap from the previous end, length)
    /// varint pairs, appended to `out` as `(start, len)`; `what` names
    /// them in errors. Every add is overflow-checked.
    fn ranges(
        &mut self,
        records: u64,
        what: &str,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<(), String> {
        let mut end = 0u64;
        for _ in 0..records {
            let gap = self.varint()?;
            let l = self.varint()?;
            let s = end
                .checked_add(gap)
                .ok_or_else(|| format!("{what} start {end}+{gap} overflows"))?;
            end = s
                .checked_add(l)
                .ok_or_else(|| format!("{what} {s}+{l} overflows"))?;
            out.push((s, l));
        }
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, String> {
        let w = self
            .b
            .get(self.at..self.at + 4)
            .ok_or_else(|| format!("record cut short at payload byte {}", self.at))?;
        self.at += 4;
        Ok(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
    }
}

fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn word32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decode a full binary checkpoint (the caller has seen [`MAGIC`]); a
/// delta is refused ([`CheckpointError::Delta`]): it means nothing without
/// its chain (see [`super::delta`]).
pub fn decode(b: &[u8]) -> Result<Checkpoint, CheckpointError> {
    match decode_any(b)? {
        (cp, None) => Ok(cp),
        (_, Some(d)) => Err(CheckpointError::Delta(d.position)),
    }
}

/// Decode a full or delta checkpoint; a delta comes back with its
/// [`DeltaPages`].
pub fn decode_any(b: &[u8]) -> Result<(Checkpoint, Option<DeltaPages>), CheckpointError> {
    let bad_header = |m: String| CheckpointError::Parse(format!("header: {m}"));
    if b.len() < HEADER_LEN || &b[..8] != MAGIC {
        return Err(CheckpointError::BadMagic);
    }
    let crc = word32(b, HEADER_LEN - 4);
    if crc32c::crc32c(&b[..HEADER_LEN - 4]) != crc {
        return Err(CheckpointError::Crc);
    }
    let version = word32(b, 8);
    if ![VERSION, DELTA_VERSION, OLD_VERSION, OLD_DELTA_VERSION].contains(&version) {
        return Err(bad_header(format!("unknown format version {version}")));
    }
    let old = version == OLD_VERSION || version == OLD_DELTA_VERSION;
    let is_delta = version == DELTA_VERSION || version == OLD_DELTA_VERSION;
    let h: Vec<u64> = (0..8).map(|i| word(b, 12 + 8 * i)).collect();
    let (n_chunks, n_crcs, n_extents, n_zeros) = (h[4], h[5], h[6], h[7]);
    if !old && n_crcs != 0 {
        return Err(bad_header(format!(
            "version {version} lists {n_crcs} checksums (it keeps none)"
        )));
    }
    let min_chunk = if old { MIN_CHUNK } else { MIN_CHUNK + 4 };
    // Every record takes at least a few bytes: counts the input cannot
    // hold are refused before anything is allocated for them.
    let body = (b.len() - HEADER_LEN) as u64;
    let need = [
        (n_chunks, min_chunk),
        (n_crcs, MIN_CRC),
        (n_extents, MIN_EXTENT),
        (n_zeros, MIN_ZERO),
    ]
    .iter()
    .try_fold(0u64, |acc, &(n, min)| {
        n.checked_mul(min).and_then(|x| acc.checked_add(x))
    });
    if need.is_none_or(|need| need > body) {
        return Err(bad_header(format!(
            "counts ({n_chunks} chunks, {n_crcs} checksums, {n_extents} extents, {n_zeros} zero ranges) exceed the {body} bytes that follow"
        )));
    }
    let mut cp = Checkpoint {
        volume: h[0],
        epoch: h[1],
        chunk_seq: h[2],
        last_seq: h[3],
        chunks: Vec::with_capacity(n_chunks as usize),
        extents: Vec::with_capacity(n_extents as usize),
        zeros: Vec::with_capacity(n_zeros as usize),
    };
    // Old versions: CRC arrays stream by in chunk order; each chunk keeps
    // only the CRC of its array.
    let mut crc_fill = CrcFill::default();
    let mut delta: Option<DeltaPages> = None;
    // Ranges and removed chunks the link announces.
    let (mut n_ranges, mut n_removed) = (0u64, 0u64);
    let mut crcs_seen = 0u64;
    let mut last_kind = 0u8;
    let mut at = HEADER_LEN;
    let mut page = 0usize;
    while at < b.len() {
        let err = |reason: String| CheckpointError::Page {
            page,
            offset: at,
            reason,
        };
        let Some(ph) = b.get(at..at + PAGE_HEADER_LEN) else {
            return Err(err("page header cut short".into()));
        };
        let kind = ph[0];
        let records = u64::from(word32(ph, 4));
        let len = word32(ph, 8) as usize;
        let crc = word32(ph, 12);
        if ph[1..4] != [0, 0, 0] {
            return Err(err("reserved header bytes are not zero".into()));
        }
        if len > MAX_PAGE_BYTES {
            return Err(err(format!(
                "payload of {len} bytes exceeds the page limit"
            )));
        }
        let start = at + PAGE_HEADER_LEN;
        let Some(payload) = b.get(start..start + len) else {
            return Err(err(format!("payload of {len} bytes runs past the end")));
        };
        let want = crc32c::crc32c_append(crc32c::crc32c(&ph[..12]), payload);
        if want != crc {
            return Err(err("checksum mismatch".into()));
        }
        if !(PAGE_CHUNKS..=PAGE_REMOVED).contains(&kind) {
            return Err(err(format!(
                "unknown page kind {kind} (written by a newer version?)"
            )));
        }
        if kind < last_kind {
            return Err(err(format!("page kind {kind} after kind {last_kind}")));
        }
        if records == 0 {
            return Err(err("empty page".into()));
        }
        if kind > PAGE_LINK && delta.is_none() {
            return Err(err(format!("page kind {kind} without a delta link page")));
        }
        // Every record of these kinds takes at least one byte per field:
        // a count the payload cannot hold is refused before decoding.
        if kind >= PAGE_LINK && records > len as u64 {
            return Err(err(format!("{records} records cannot fit {len} bytes")));
        }
        last_kind = kind;
        let mut r = Reader { b: payload, at: 0 };
        let over = |what: &str, have: usize, n: u64| {
            err(format!(
                "more {what} than the header's {n}; {have} before this page"
            ))
        };
        match kind {
            PAGE_CHUNKS => {
                if records > n_chunks - cp.chunks.len() as u64 {
                    return Err(over("chunks", cp.chunks.len(), n_chunks));
                }
                for _ in 0..records {
                    let mut f = [0u64; 4];
                    for x in &mut f {
                        *x = r.varint().map_err(err)?;
                    }
                    let [seq, epoch, data_start, data_len] = f;
                    let table_crc = if old {
                        let n = data_len.div_ceil(CRC_BLOCK);
                        if n > n_crcs {
                            return Err(err(format!(
                                "chunk {seq:#x}: {data_len} data bytes need more checksums than the header's {n_crcs}"
                            )));
                        }
                        0
                    } else {
                        r.u32().map_err(err)?
                    };
                    cp.chunks.push(ChunkInfo {
                        seq,
                        epoch,
                        data_start,
                        data_len,
                        table_crc,
                    });
                }
            }
            PAGE_CRCS => {
                if !old {
                    return Err(err(format!("version {version} holds no checksum pages")));
                }
                if cp.chunks.len() as u64 != n_chunks {
                    return Err(err(format!(
                        "checksums after {} of {n_chunks} chunks",
                        cp.chunks.len()
                    )));
                }
                if records > n_crcs - crcs_seen {
                    return Err(over("checksums", crcs_seen as usize, n_crcs));
                }
                crcs_seen += records;
                for _ in 0..records {
                    let x = r.u32().map_err(err)?;
                    crc_fill.push(&mut cp.chunks, x).map_err(err)?;
                }
            }
            PAGE_EXTENTS => {
                if records > n_extents - cp.extents.len() as u64 {
                    return Err(over("extents", cp.extents.len(), n_extents));
                }
                let (mut end, mut chunk) = (0u64, 0u64);
                for _ in 0..records {
                    let gap = r.varint().map_err(err)?;
                    let l = r.varint().map_err(err)?;
                    let c = chunk.wrapping_add(unzigzag(r.varint().map_err(err)?));
                    let o = r.varint().map_err(err)?;
                    let off = match o {
                        1 => r.varint().map_err(err)?,
                        o if o & 1 == 0 => (o >> 1) * crate::engine::SECTOR,
                        o => return Err(err(format!("bad offset code {o}"))),
                    };
                    let s = end
                        .checked_add(gap)
                        .ok_or_else(|| err(format!("extent start {end}+{gap} overflows")))?;
                    end = s
                        .checked_add(l)
                        .ok_or_else(|| err(format!("extent {s}+{l} overflows")))?;
                    chunk = c;
                    cp.extents.push((s, l, c, off));
                }
            }
            PAGE_LINK => {
                if records != 1 || delta.is_some() {
                    return Err(err("a delta has exactly one link record".into()));
                }
                let position = r.varint().map_err(err)?;
                let prev_chunk_seq = r.varint().map_err(err)?;
                n_ranges = r.varint().map_err(err)?;
                n_removed = r.varint().map_err(err)?;
                let left = (b.len() - start - len) as u64;
                if n_ranges
                    .checked_mul(2)
                    .and_then(|x| x.checked_add(n_removed))
                    .is_none_or(|need| need > left)
                {
                    return Err(err(format!(
                        "link announces {n_ranges} ranges and {n_removed} removed chunks, more than the {left} bytes that follow"
                    )));
                }
                if position == 0 || position > MAX_POSITION {
                    return Err(err(format!("chain position {position} is out of range")));
                }
                let mut keys = Vec::with_capacity(2);
                for what in ["base", "predecessor"] {
                    let n = r.varint().map_err(err)?;
                    if n == 0 || n > MAX_KEY_BYTES as u64 {
                        return Err(err(format!("{what} key of {n} bytes")));
                    }
                    let n = n as usize;
                    let raw = payload
                        .get(r.at..r.at + n)
                        .ok_or_else(|| err(format!("{what} key cut short")))?;
                    r.at += n;
                    let k = std::str::from_utf8(raw)
                        .map_err(|_| err(format!("{what} key is not UTF-8")))?;
                    keys.push(k.to_string());
                }
                let prev = keys.pop().unwrap_or_default();
                let base = keys.pop().unwrap_or_default();
                delta = Some(DeltaPages {
                    position,
                    prev_chunk_seq,
                    base,
                    prev,
                    ranges: Vec::new(),
                    removed: Vec::new(),
                });
            }
            PAGE_RANGES => {
                let Some(d) = delta.as_mut() else {
                    return Err(err("ranges without a link".into()));
                };
                if records > n_ranges - d.ranges.len() as u64 {
                    return Err(over("ranges", d.ranges.len(), n_ranges));
                }
                r.ranges(records, "range", &mut d.ranges).map_err(err)?;
            }
            PAGE_REMOVED => {
                let Some(d) = delta.as_mut() else {
                    return Err(err("removed chunks without a link".into()));
                };
                if records > n_removed - d.removed.len() as u64 {
                    return Err(over("removed chunks", d.removed.len(), n_removed));
                }
                let mut last = 0u64;
                for _ in 0..records {
                    let gap = r.varint().map_err(err)?;
                    last = last
                        .checked_add(gap)
                        .ok_or_else(|| err(format!("removed chunk id {last}+{gap} overflows")))?;
                    d.removed.push(last);
                }
            }
            _ => {
                if records > n_zeros - cp.zeros.len() as u64 {
                    return Err(over("zero ranges", cp.zeros.len(), n_zeros));
                }
                r.ranges(records, "zero range", &mut cp.zeros)
                    .map_err(err)?;
            }
        }
        if r.at != payload.len() {
            return Err(err(format!(
                "{} bytes left after {records} records",
                payload.len() - r.at
            )));
        }
        at = start + len;
        page += 1;
    }
    let short = |what: &str, have: u64, n: u64| {
        CheckpointError::Parse(format!(
            "ends after {have} of the header's {n} {what} (truncated?)"
        ))
    };
    if cp.chunks.len() as u64 != n_chunks {
        return Err(short("chunks", cp.chunks.len() as u64, n_chunks));
    }
    if crcs_seen != n_crcs {
        return Err(short("checksums", crcs_seen, n_crcs));
    }
    if cp.extents.len() as u64 != n_extents {
        return Err(short("extents", cp.extents.len() as u64, n_extents));
    }
    if cp.zeros.len() as u64 != n_zeros {
        return Err(short("zero ranges", cp.zeros.len() as u64, n_zeros));
    }
    if old {
        crc_fill
            .finish(&mut cp.chunks)
            .map_err(CheckpointError::Parse)?;
    }
    if is_delta != delta.is_some() {
        return Err(CheckpointError::Parse(if delta.is_some() {
            "a full checkpoint holds a delta link page".into()
        } else {
            "a delta ends before its link page (truncated?)".into()
        }));
    }
    if let Some(d) = &delta {
        if d.ranges.len() as u64 != n_ranges {
            return Err(short("changed ranges", d.ranges.len() as u64, n_ranges));
        }
        if d.removed.len() as u64 != n_removed {
            return Err(short("removed chunks", d.removed.len() as u64, n_removed));
        }
    }
    Ok((cp, delta))
}

/// The old versions' CRC arrays as they stream by: the chunk being
/// filled, the CRCs it still needs, and the CRC of its array so far.
#[derive(Default)]
struct CrcFill {
    i: usize,
    started: bool,
    due: u64,
    crc: u32,
}

impl CrcFill {
    /// Start chunk `c` if not started; true if it needs no more CRCs (its
    /// table CRC is then set).
    fn start(&mut self, c: &mut ChunkInfo) -> bool {
        if !self.started {
            (self.started, self.due, self.crc) = (true, c.data_len.div_ceil(CRC_BLOCK), 0);
        }
        if self.due == 0 {
            c.table_crc = self.crc;
            (self.i, self.started) = (self.i + 1, false);
            return true;
        }
        false
    }

    /// The next CRC of the stream.
    fn push(&mut self, chunks: &mut [ChunkInfo], x: u32) -> Result<(), String> {
        loop {
            let Some(c) = chunks.get_mut(self.i) else {
                return Err("more checksums than the chunks' data needs".into());
            };
            if self.start(c) {
                continue;
            }
            self.crc = crc32c::crc32c_append(self.crc, &x.to_le_bytes());
            self.due -= 1;
            self.start(c);
            return Ok(());
        }
    }

    /// After the last CRC: every chunk got all it needs.
    fn finish(&mut self, chunks: &mut [ChunkInfo]) -> Result<(), String> {
        while let Some(c) = chunks.get_mut(self.i) {
            if !self.start(c) {
                return Err(format!(
                    "chunk {:#x}: fewer checksums than its {} bytes of data need",
                    c.seq, c.data_len
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
