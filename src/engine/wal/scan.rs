//! Reading a WAL directory without changing it: every segment's header,
//! its readable records, and where (and why) reading stopped.
//!
//! A scan never trusts the files: a record of another volume fails the scan
//! (the directory belongs to someone else), anything unreadable is reported
//! as damage at an offset, and nothing on disk is touched.
//!
//! A version 2 segment ([`super::segment`]) is read as the run of records
//! `first_seq, first_seq + 1, ...` from its header on; the first thing
//! that does not continue the run (zeros of the preallocation, padding, a
//! torn record, a stale record of the file's earlier life) ends it. That
//! end is not damage by itself: [`super::replay`] decides from the next
//! segment's `first_seq` whether records are missing. In a version 3
//! segment a record checks only with the segment's incarnation, so no
//! record of an earlier life of the file continues the run. Spares (pool files)
//! hold no records.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use super::fs::{read_all_into, DynWalFs, SegFile};
use super::record::{decode_in, RecordKind};
use super::segment::{self, Head, Stamp, SEG_HEADER_LEN};
use super::{io_err, seg_path, WalError};

/// A record as found on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecMeta {
    pub seq: u64,
    pub kind: RecordKind,
    pub lba: u64,
    pub sectors: u64,
    pub more: bool,
    pub data_crc: u32,
    /// A write record with a CRC per block (its table ends at `data_off`).
    pub block_crcs: bool,
    /// Offset of the record header in the segment.
    pub off: u64,
    /// Offset of its data.
    pub data_off: u64,
    /// Offset just past it.
    pub end: u64,
}

/// One segment file as read.
#[derive(Debug)]
pub struct SegScan {
    pub id: u64,
    pub path: PathBuf,
    pub file: SegFile,
    /// The header, if the segment has a whole one.
    pub stamp: Option<Stamp>,
    pub records: Vec<RecMeta>,
    /// Bytes up to the end of the last readable record (or the header).
    pub good_len: u64,
    /// The file's length.
    pub len: u64,
    /// Why reading stopped before `len`, if it did (version 1 and legacy
    /// segments: their files end where their records end).
    pub damage: Option<String>,
    /// Version 2: the seq the run starts at.
    pub first_seq: Option<u64>,
    /// Version 2: why the run ended before `len` (not damage by itself).
    pub run_end: Option<String>,
    /// A spare of the pool: no records, not a segment.
    pub spare: bool,
    /// Every earlier segment was durable by the time this one's header was
    /// ([`super::segment`], version 4's flag; always for older versions
    /// and damaged headers, never for an empty file).
    pub prior_durable: bool,
}

impl SegScan {
    /// Bytes a segment of this format holds before its first record.
    pub fn header_len(&self) -> u64 {
        if self.stamp.is_some() {
            SEG_HEADER_LEN as u64
        } else {
            0
        }
    }
}

/// Parse a segment file name (`<id:016x>.wal`).
pub fn parse_seg_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Read every segment of `dir` (none if it is missing), oldest first.
///
/// Reading and checking overlap: a helper thread reads the next segment
/// (opens it and reads it whole) while this one decodes the last, and at
/// most [`READ_AHEAD`] read segments wait, so memory stays a few segments
/// whatever the WAL's size. The helper only reads; every decision is taken
/// here, in segment order, exactly as if read one by one.
pub fn scan(fs: &DynWalFs, dir: &Path, volume: u64) -> Result<Vec<SegScan>, WalError> {
    let mut ids: Vec<u64> = fs
        .list(dir)
        .map_err(|e| io_err("list WAL directory", e))?
        .iter()
        .filter_map(|n| parse_seg_name(n))
        .collect();
    ids.sort_unstable();
    let mut out = Vec::with_capacity(ids.len());
    std::thread::scope(|sc| {
        // Buffers go round: empty ones to the reader, read ones back.
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        let (read_tx, read_rx) = mpsc::sync_channel::<Read>(READ_AHEAD);
        for _ in 0..=READ_AHEAD {
            let _ = free_tx.send(Vec::new());
        }
        let ids = &ids;
        std::thread::Builder::new()
            .name("wal-scan-read".into())
            .spawn_scoped(sc, move || {
                for &id in ids {
                    // Either end gone: the scan stopped early.
                    let Ok(mut buf) = free_rx.recv() else { return };
                    let read = read_segment(fs, dir, id, &mut buf).map(|file| (file, buf));
                    if read_tx.send((id, read)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| io_err("start the WAL scan reader", e))?;
        for _ in 0..ids.len() {
            let (id, read) = read_rx
                .recv()
                .map_err(|_| io_err("WAL scan reader", "stopped before the last segment"))?;
            let (file, buf) = read?;
            out.push(scan_segment(dir, id, volume, file, &buf)?);
            let _ = free_tx.send(buf);
        }
        Ok::<(), WalError>(())
    })?;
    Ok(out)
}

/// Segments read ahead of the one being decoded.
const READ_AHEAD: usize = 1;

/// A segment as the reader hands it over: its id, and its open file and
/// whole contents (or why they could not be read).
type Read = (u64, Result<(SegFile, Vec<u8>), WalError>);

/// Open segment `id` of `dir` and read all of it into `buf` (reusing its
/// allocation: bytes are only zeroed where `buf` grows).
fn read_segment(
    fs: &DynWalFs,
    dir: &Path,
    id: u64,
    buf: &mut Vec<u8>,
) -> Result<SegFile, WalError> {
    let path = seg_path(dir, id);
    let file = fs
        .open(&path)
        .map_err(|e| io_err(&format!("open WAL segment {}", path.display()), e))?;
    read_all_into(file.as_ref(), buf)
        .map_err(|e| io_err(&format!("read WAL segment {}", path.display()), e))?;
    Ok(file)
}

fn foreign(path: &Path, found: u64, volume: u64) -> WalError {
    WalError::Io(format!(
        "{} holds WAL records of volume {found:x}, not {volume:x}",
        path.display()
    ))
}

/// Decode segment `id`, whose file is `file` and whole contents `buf`.
fn scan_segment(
    dir: &Path,
    id: u64,
    volume: u64,
    file: SegFile,
    buf: &[u8],
) -> Result<SegScan, WalError> {
    let path = seg_path(dir, id);
    let mut seg = SegScan {
        id,
        path,
        file,
        stamp: None,
        records: Vec::new(),
        good_len: 0,
        len: buf.len() as u64,
        damage: None,
        first_seq: None,
        run_end: None,
        spare: false,
        prior_durable: true,
    };
    let mut incarnation = 0;
    let mut pos = match segment::decode(buf) {
        // An empty file vouches for nothing (invariant 8 of replay).
        Head::Empty => {
            seg.prior_durable = false;
            return Ok(seg);
        }
        Head::Legacy => 0,
        Head::Stamped {
            volume: v,
            stamp,
            first_seq,
            incarnation: inc,
            prior_durable,
        } => {
            if v != volume {
                return Err(foreign(&seg.path, v, volume));
            }
            seg.stamp = Some(stamp);
            seg.first_seq = first_seq;
            seg.prior_durable = prior_durable;
            incarnation = inc;
            SEG_HEADER_LEN
        }
        Head::Spare { volume: v } => {
            if v != volume {
                return Err(foreign(&seg.path, v, volume));
            }
            seg.spare = true;
            return Ok(seg);
        }
        Head::Damaged(why) => {
            seg.damage = Some(why);
            return Ok(seg);
        }
    };
    seg.good_len = pos as u64;
    let mut expect = seg.first_seq;
    while pos < buf.len() {
        let (h, data) = match decode_in(buf, pos, incarnation) {
            Ok(r) => r,
            Err(e) if expect.is_some() => {
                seg.run_end = Some(e.to_string());
                break;
            }
            Err(e) => {
                seg.damage = Some(e.to_string());
                break;
            }
        };
        if let Some(want) = expect {
            if h.seq != want {
                seg.run_end = Some(format!(
                    "a record of seq {} where seq {want} would be",
                    h.seq
                ));
                break;
            }
            expect = Some(want + 1);
        }
        if h.volume != volume {
            // A whole, checksummed record of another volume is no torn
            // write: the directory is shared by mistake. Touch nothing.
            return Err(foreign(&seg.path, h.volume, volume));
        }
        seg.records.push(RecMeta {
            seq: h.seq,
            kind: h.kind,
            lba: h.lba,
            sectors: h.sectors,
            more: h.more,
            data_crc: h.data_crc,
            block_crcs: h.block_crcs,
            off: pos as u64,
            data_off: data.start as u64,
            end: data.end as u64,
        });
        pos = data.end;
        seg.good_len = pos as u64;
    }
    Ok(seg)
}

/// What a WAL directory says about the history it extends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lineage {
    /// No record at all: nothing to decide.
    Empty,
    /// Records, but no segment header: written before headers existed.
    Legacy,
    /// Every `epoch` and `base_epoch` of its segment headers. The WAL
    /// extends the manifest's history iff its `history_epoch` is in here:
    /// `history_epoch` is set only to a new writer's own (fresh, higher)
    /// epoch, so it equals a writer's `base_epoch` only while no writer
    /// committed since that one opened, and a writer's `epoch` only while
    /// that writer was the last to commit.
    Stamped(BTreeSet<u64>),
}

impl Lineage {
    pub fn of(scans: &[SegScan]) -> Lineage {
        let epochs: BTreeSet<u64> = scans
            .iter()
            .filter_map(|s| s.stamp)
            .flat_map(|s| [s.epoch, s.base_epoch])
            .collect();
        if !epochs.is_empty() {
            Lineage::Stamped(epochs)
        } else if scans.iter().any(|s| !s.records.is_empty()) {
            Lineage::Legacy
        } else {
            Lineage::Empty
        }
    }
}

/// `(records, lowest seq, highest seq)` over the scans.
pub fn record_span(scans: &[SegScan]) -> (usize, u64, u64) {
    let mut n = 0;
    let (mut lo, mut hi) = (u64::MAX, 0);
    for r in scans.iter().flat_map(|s| &s.records) {
        n += 1;
        lo = lo.min(r.seq);
        hi = hi.max(r.seq);
    }
    (n, if n == 0 { 0 } else { lo }, hi)
}
