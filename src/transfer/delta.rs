//! The incremental export ("delta") file format: the changed ranges from a
//! base snapshot to a target snapshot, each as zeros or as data.
//!
//! Layout (integers little-endian):
//! ```text
//! header   "SHALEDL1" | version u32 | base_size u64 | target_size u64
//!          | base_len u16 | base name | target_len u16 | target name
//!          | header_crc u32                     (crc32c of the header before it)
//! record*  kind u8 (1 data, 2 zero) | 0u8 x3 | offset u64 | len u64
//!          | data_crc u32 (crc32c of the data; 0 for zero records)
//!          | base_crc u32 (crc32c of the base snapshot's bytes in the range)
//!          | record_crc u32                     (crc32c of the 28 bytes before it)
//!          | data (len bytes, data records only)
//! trailer  "SHALEDLE" | records u64 | data_bytes u64
//!          | body_crc u32                       (crc32c of every record byte)
//!          | trailer_crc u32                    (crc32c of the 28 bytes before it)
//! ```
//!
//! Invariants checked by [`DeltaReader`] (a file that breaks one is refused
//! with the byte position and what is wrong):
//! 1. Every CRC matches; the file ends right after the trailer (a truncated
//!    or extended file is refused).
//! 2. Records are sector aligned, non-empty, sorted and non-overlapping,
//!    inside `[0, target_size)`, and cover at most [`MAX_RECORD`] bytes.
//! 3. The trailer's record count and data byte count match the records.

use std::io::{Read, Write};

use crate::engine::SECTOR;

/// First bytes of every delta file.
pub const DELTA_MAGIC: &[u8; 8] = b"SHALEDL1";
const TRAILER_MAGIC: &[u8; 8] = b"SHALEDLE";
/// Format version written and accepted.
pub const DELTA_VERSION: u32 = 1;
/// Longest range of one record (longer changed ranges are split), so a
/// record's data and its base checksum cover a bounded range.
pub const MAX_RECORD: u64 = 1 << 20;
/// Longest snapshot name stored in the header.
const MAX_NAME: usize = 1024;
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const RECORD_HEADER: usize = 32;

/// What a delta changes, and between which snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaHeader {
    /// `VOL@SNAP` the delta starts from.
    pub base: String,
    /// `VOL@SNAP` the delta leads to.
    pub target: String,
    pub base_size: u64,
    pub target_size: u64,
}

/// What a record puts in its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The data (in the buffer given to [`DeltaReader::next_record`]).
    Data,
    Zero,
}

/// One record: `len` bytes at `offset` become data (CRC32C `data_crc`) or
/// zeros; before, in the base snapshot, they had CRC32C `base_crc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaRecord {
    pub kind: RecordKind,
    pub offset: u64,
    pub len: u64,
    /// 0 for zero records.
    pub data_crc: u32,
    pub base_crc: u32,
}

/// Totals of a whole delta file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeltaTotals {
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// A malformed, corrupt or unreadable delta file.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("not a shale delta file (bad magic)")]
    BadMagic,
    #[error(
        "delta format version {0} is not supported (this shale reads version {DELTA_VERSION})"
    )]
    Version(u32),
    #[error("delta file is truncated at byte {at} (while reading {what})")]
    Truncated { at: u64, what: &'static str },
    #[error("delta file is corrupt at byte {at}: {reason}")]
    Corrupt { at: u64, reason: String },
    #[error("cannot read the delta file")]
    Read(#[source] std::io::Error),
    #[error("cannot write the delta file")]
    Write(#[source] std::io::Error),
    #[error("invalid delta record: {0}")]
    InvalidRecord(String),
}

fn put_name(b: &mut Vec<u8>, name: &str) -> Result<(), DeltaError> {
    let len = u16::try_from(name.len())
        .ok()
        .filter(|&l| usize::from(l) <= MAX_NAME)
        .ok_or_else(|| DeltaError::InvalidRecord(format!("name {name:?} is too long")))?;
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(name.as_bytes());
    Ok(())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Writes a delta file: the header at creation, then records in ascending
/// order, then the trailer at [`DeltaWriter::finish`].
pub struct DeltaWriter<W: Write> {
    out: W,
    target_size: u64,
    end: u64,
    totals: DeltaTotals,
    body_crc: u32,
}

impl<W: Write> DeltaWriter<W> {
    /// Write the header to `out`.
    pub fn new(mut out: W, header: &DeltaHeader) -> Result<DeltaWriter<W>, DeltaError> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(DELTA_MAGIC);
        b.extend_from_slice(&DELTA_VERSION.to_le_bytes());
        b.extend_from_slice(&header.base_size.to_le_bytes());
        b.extend_from_slice(&header.target_size.to_le_bytes());
        put_name(&mut b, &header.base)?;
        put_name(&mut b, &header.target)?;
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        out.write_all(&b).map_err(DeltaError::Write)?;
        Ok(DeltaWriter {
            out,
            target_size: header.target_size,
            end: 0,
            totals: DeltaTotals::default(),
            body_crc: 0,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DeltaError> {
        let aligned = offset.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR);
        let inside = offset
            .checked_add(len)
            .is_some_and(|e| e <= self.target_size);
        if len == 0 || len > MAX_RECORD || !aligned || !inside || offset < self.end {
            return Err(DeltaError::InvalidRecord(format!(
                "range {offset}+{len} is empty, too long, unaligned, out of order or past {}",
                self.target_size
            )));
        }
        Ok(())
    }

    fn record(
        &mut self,
        kind: u8,
        offset: u64,
        len: u64,
        base_crc: u32,
        data: &[u8],
    ) -> Result<(), DeltaError> {
        let mut h = [0u8; RECORD_HEADER];
        h[0] = kind;
        h[4..12].copy_from_slice(&offset.to_le_bytes());
        h[12..20].copy_from_slice(&len.to_le_bytes());
        let data_crc = if kind == KIND_DATA {
            crc32c::crc32c(data)
        } else {
            0
        };
        h[20..24].copy_from_slice(&data_crc.to_le_bytes());
        h[24..28].copy_from_slice(&base_crc.to_le_bytes());
        let rec_crc = crc32c::crc32c(&h[..28]);
        h[28..32].copy_from_slice(&rec_crc.to_le_bytes());
        self.out.write_all(&h).map_err(DeltaError::Write)?;
        self.out.write_all(data).map_err(DeltaError::Write)?;
        self.body_crc = crc32c::crc32c_append(self.body_crc, &h);
        self.body_crc = crc32c::crc32c_append(self.body_crc, data);
        self.end = offset + len;
        self.totals.records += 1;
        Ok(())
    }

    /// `data` at `offset` (at most [`MAX_RECORD`] bytes), where the base
    /// held bytes with CRC32C `base_crc`.
    pub fn data(&mut self, offset: u64, data: &[u8], base_crc: u32) -> Result<(), DeltaError> {
        let len = data.len() as u64;
        self.check(offset, len)?;
        self.record(KIND_DATA, offset, len, base_crc, data)?;
        self.totals.data_bytes += len;
        Ok(())
    }

    /// `len` bytes of zeros at `offset` (at most [`MAX_RECORD`]), where the
    /// base held bytes with CRC32C `base_crc`.
    pub fn zero(&mut self, offset: u64, len: u64, base_crc: u32) -> Result<(), DeltaError> {
        self.check(offset, len)?;
        self.record(KIND_ZERO, offset, len, base_crc, &[])?;
        self.totals.zero_bytes += len;
        Ok(())
    }

    /// Write the trailer and flush; returns the totals and the writer.
    pub fn finish(mut self) -> Result<(DeltaTotals, W), DeltaError> {
        let mut t = Vec::with_capacity(32);
        t.extend_from_slice(TRAILER_MAGIC);
        t.extend_from_slice(&self.totals.records.to_le_bytes());
        t.extend_from_slice(&self.totals.data_bytes.to_le_bytes());
        t.extend_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&t);
        t.extend_from_slice(&crc.to_le_bytes());
        self.out.write_all(&t).map_err(DeltaError::Write)?;
        self.out.flush().map_err(DeltaError::Write)?;
        Ok((self.totals, self.out))
    }
}

/// Reads and checks a delta file record by record (see the module docs).
pub struct DeltaReader<R: Read> {
    input: R,
    header: DeltaHeader,
    pos: u64,
    end: u64,
    totals: DeltaTotals,
    body_crc: u32,
    done: bool,
}

impl<R: Read> DeltaReader<R> {
    /// Read and check the header.
    pub fn new(mut input: R) -> Result<DeltaReader<R>, DeltaError> {
        let mut pos = 0u64;
        let mut fixed = [0u8; 28];
        read_exact(&mut input, &mut fixed, &mut pos, "the header")?;
        if &fixed[..8] != DELTA_MAGIC {
            return Err(DeltaError::BadMagic);
        }
        let version = u32_at(&fixed, 8);
        if version != DELTA_VERSION {
            return Err(DeltaError::Version(version));
        }
        let mut all = fixed.to_vec();
        let base = read_name(&mut input, &mut all, &mut pos)?;
        let target = read_name(&mut input, &mut all, &mut pos)?;
        let mut crc = [0u8; 4];
        read_exact(&mut input, &mut crc, &mut pos, "the header")?;
        if u32::from_le_bytes(crc) != crc32c::crc32c(&all) {
            return Err(DeltaError::Corrupt {
                at: 0,
                reason: "header checksum mismatch".into(),
            });
        }
        let header = DeltaHeader {
            base,
            target,
            base_size: u64_at(&fixed, 12),
            target_size: u64_at(&fixed, 20),
        };
        Ok(DeltaReader {
            input,
            header,
            pos,
            end: 0,
            totals: DeltaTotals::default(),
            body_crc: 0,
            done: false,
        })
    }

    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    /// Totals of the records read so far (of the whole file once
    /// [`DeltaReader::next_record`] returned `None`).
    pub fn totals(&self) -> DeltaTotals {
        self.totals
    }

    fn corrupt(&self, at: u64, reason: String) -> DeltaError {
        DeltaError::Corrupt { at, reason }
    }

    /// The next record, its data (checked) in `buf`; `None` after a valid
    /// trailer at the very end of the file.
    pub fn next_record(&mut self, buf: &mut Vec<u8>) -> Result<Option<DeltaRecord>, DeltaError> {
        if self.done {
            return Ok(None);
        }
        let at = self.pos;
        let mut h = [0u8; RECORD_HEADER];
        read_exact(&mut self.input, &mut h[..8], &mut self.pos, "a record")?;
        if &h[..8] == TRAILER_MAGIC {
            self.read_trailer(at)?;
            return Ok(None);
        }
        read_exact(&mut self.input, &mut h[8..], &mut self.pos, "a record")?;
        if crc32c::crc32c(&h[..28]) != u32_at(&h, 28) {
            return Err(self.corrupt(at, "record header checksum mismatch".into()));
        }
        let (kind, offset, len) = (h[0], u64_at(&h, 4), u64_at(&h, 12));
        let aligned = offset.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR);
        let inside = offset
            .checked_add(len)
            .is_some_and(|e| e <= self.header.target_size);
        if len == 0 || len > MAX_RECORD || !aligned || !inside || offset < self.end {
            return Err(self.corrupt(
                at,
                format!(
                    "record {offset}+{len} is empty, too long, unaligned, out of order or \
                     past the target size {}",
                    self.header.target_size
                ),
            ));
        }
        self.body_crc = crc32c::crc32c_append(self.body_crc, &h);
        let kind = match kind {
            KIND_DATA => {
                buf.resize(len as usize, 0);
                read_exact(&mut self.input, buf, &mut self.pos, "record data")?;
                if crc32c::crc32c(buf) != u32_at(&h, 20) {
                    return Err(self.corrupt(at, format!("data checksum mismatch at {offset}")));
                }
                self.body_crc = crc32c::crc32c_append(self.body_crc, buf);
                self.totals.data_bytes += len;
                RecordKind::Data
            }
            KIND_ZERO => {
                self.totals.zero_bytes += len;
                RecordKind::Zero
            }
            other => return Err(self.corrupt(at, format!("unknown record kind {other}"))),
        };
        self.end = offset + len;
        self.totals.records += 1;
        Ok(Some(DeltaRecord {
            kind,
            offset,
            len,
            data_crc: u32_at(&h, 20),
            base_crc: u32_at(&h, 24),
        }))
    }

    fn read_trailer(&mut self, at: u64) -> Result<(), DeltaError> {
        let mut t = [0u8; 32];
        t[..8].copy_from_slice(TRAILER_MAGIC);
        read_exact(&mut self.input, &mut t[8..], &mut self.pos, "the trailer")?;
        if crc32c::crc32c(&t[..28]) != u32_at(&t, 28) {
            return Err(self.corrupt(at, "trailer checksum mismatch".into()));
        }
        let (records, data_bytes, body_crc) = (u64_at(&t, 8), u64_at(&t, 16), u32_at(&t, 24));
        if records != self.totals.records
            || data_bytes != self.totals.data_bytes
            || body_crc != self.body_crc
        {
            return Err(self.corrupt(
                at,
                format!(
                    "trailer expects {records} records with {data_bytes} data bytes, \
                     the file has {} with {} (or their checksum differs)",
                    self.totals.records, self.totals.data_bytes
                ),
            ));
        }
        let mut extra = [0u8; 1];
        match self.input.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => return Err(self.corrupt(self.pos, "bytes after the trailer".into())),
            Err(e) => return Err(DeltaError::Read(e)),
        }
        self.done = true;
        Ok(())
    }
}

fn read_exact<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    pos: &mut u64,
    what: &'static str,
) -> Result<(), DeltaError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(DeltaError::Truncated {
                    at: *pos + filled as u64,
                    what,
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DeltaError::Read(e)),
        }
    }
    *pos += buf.len() as u64;
    Ok(())
}

fn read_name<R: Read>(r: &mut R, all: &mut Vec<u8>, pos: &mut u64) -> Result<String, DeltaError> {
    let mut l = [0u8; 2];
    read_exact(r, &mut l, pos, "the header")?;
    all.extend_from_slice(&l);
    let len = usize::from(u16::from_le_bytes(l));
    if len > MAX_NAME {
        return Err(DeltaError::Corrupt {
            at: *pos - 2,
            reason: format!("name length {len}"),
        });
    }
    let mut name = vec![0u8; len];
    read_exact(r, &mut name, pos, "the header")?;
    all.extend_from_slice(&name);
    String::from_utf8(name).map_err(|_| DeltaError::Corrupt {
        at: *pos,
        reason: "name is not UTF-8".into(),
    })
}

/// Read and check a whole delta; returns its header and totals.
pub fn validate<R: Read>(input: R) -> Result<(DeltaHeader, DeltaTotals), DeltaError> {
    let mut reader = DeltaReader::new(input)?;
    let mut buf = Vec::new();
    while reader.next_record(&mut buf)?.is_some() {}
    Ok((reader.header.clone(), reader.totals))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> DeltaHeader {
        DeltaHeader {
            base: "vol@a".into(),
            target: "vol@b".into(),
            base_size: 1 << 20,
            target_size: 1 << 20,
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = DeltaWriter::new(Vec::new(), &header()).unwrap();
        w.zero(0, 4096, 11).unwrap();
        w.data(8192, &[7u8; 1024], 12).unwrap();
        w.data(9216, &[9u8; 512], 13).unwrap();
        w.zero(65536, 1 << 19, 14).unwrap();
        let (totals, out) = w.finish().unwrap();
        assert_eq!(
            totals,
            DeltaTotals {
                records: 4,
                data_bytes: 1536,
                zero_bytes: 4096 + (1 << 19)
            }
        );
        out
    }

    #[test]
    fn round_trip() {
        let file = sample();
        let mut r = DeltaReader::new(&file[..]).unwrap();
        assert_eq!(r.header(), &header());
        let mut buf = Vec::new();
        let mut recs = Vec::new();
        while let Some(rec) = r.next_record(&mut buf).unwrap() {
            if rec.kind == RecordKind::Data {
                assert_eq!(buf.len() as u64, rec.len);
                assert!(buf.iter().all(|&b| b == buf[0]));
            }
            recs.push((rec.kind, rec.offset, rec.len, rec.base_crc));
        }
        use RecordKind::{Data, Zero};
        assert_eq!(
            recs,
            vec![
                (Zero, 0, 4096, 11),
                (Data, 8192, 1024, 12),
                (Data, 9216, 512, 13),
                (Zero, 65536, 1 << 19, 14)
            ]
        );
        assert_eq!(validate(&file[..]).unwrap().1.records, 4);
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let file = sample();
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x20;
            assert!(validate(&bad[..]).is_err(), "flip at {i} accepted");
            assert!(validate(&file[..i]).is_err(), "truncation at {i} accepted");
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(
            validate(&longer[..]),
            Err(DeltaError::Corrupt { .. })
        ));
        assert!(matches!(
            validate(&b"plain raw image data......................"[..]),
            Err(DeltaError::BadMagic)
        ));
    }

    #[test]
    fn writer_refuses_bad_records() {
        let mut w = DeltaWriter::new(Vec::new(), &header()).unwrap();
        w.data(4096, &[1u8; 512], 0).unwrap();
        assert!(w.zero(0, 512, 0).is_err(), "out of order");
        assert!(w.zero(8192, 100, 0).is_err(), "unaligned");
        assert!(w.zero(8192, 0, 0).is_err(), "empty");
        assert!(w.zero(1 << 20, 512, 0).is_err(), "past the end");
        assert!(w.data(8192, &vec![1u8; 2 << 20], 0).is_err(), "too long");
        assert!(w.zero(8192, 2 << 20, 0).is_err(), "too long");
    }

    /// Random damage (several bytes changed, cut, garbage after a valid
    /// magic) never panics and is never accepted as the original.
    #[test]
    fn random_damage_is_refused_without_panics() {
        let file = sample();
        let mut x: u64 = 0x243f_6a88_85a3_08d3;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let mut bad = file.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % bad.len() as u64) as usize;
                bad[i] = bad[i].wrapping_add(1 + (next() % 255) as u8);
            }
            if next() % 3 == 0 {
                bad.truncate((next() % bad.len() as u64) as usize);
            }
            assert!(validate(&bad[..]).is_err());
            let mut garbage = DELTA_MAGIC.to_vec();
            garbage.extend((0..next() % 200).map(|_| next() as u8));
            assert!(validate(&garbage[..]).is_err());
        }
    }
}
