//! The operator's way out of a damaged WAL: drop every record after a
//! chosen sequence number (`shale volume discard-wal`).
//!
//! [`plan`] reads the WAL and says exactly what would go (segments,
//! records, bytes, sequence range, unreadable bytes) without touching it;
//! [`DiscardPlan::apply`] first copies every segment it changes into a
//! side directory (so nothing is destroyed by mistake), then cuts them. A
//! segment's header is kept even when all its records go, so the WAL still
//! names the writers whose history it extends. A version 2 segment (see
//! [`super::segment`]) ends where its run of records ends, so only that
//! much counts as its bytes; a kept version 2 header whose `first_seq`
//! lies past the cut is restamped to start right after it, so the next
//! open finds no records missing between segments.

use std::io::IoSlice;
use std::path::{Path, PathBuf};

use super::fs::{read_all, DynWalFs};
use super::scan::{scan, SegScan};
use super::segment::{self, SEG_HEADER_LEN};
use super::{io_err, sync_dir, write_all_vectored, WalError};

/// One segment the discard changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub path: PathBuf,
    /// Bytes kept at its start (0: the file is removed).
    pub keep: u64,
    /// Its length now (a version 2 segment: the end of its records).
    pub len: u64,
    /// Rewrite the (version 2) header's `first_seq` to this.
    pub restamp: Option<u64>,
}

/// What discarding the records after `after` throws away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscardPlan {
    pub after: u64,
    pub cuts: Vec<Cut>,
    /// Readable records thrown away.
    pub records: u64,
    /// Lowest and highest sequence number among them.
    pub seqs: Option<(u64, u64)>,
    /// Bytes thrown away in all.
    pub bytes: u64,
    /// Of those, bytes that could not be read as records.
    pub unreadable: u64,
}

impl DiscardPlan {
    pub fn is_empty(&self) -> bool {
        self.cuts.is_empty()
    }

    /// Copy every segment it changes into `aside` (created), then cut
    /// them and sync, so the next open sees the WAL end at `after`.
    pub fn apply(&self, fs: &DynWalFs, dir: &Path, aside: &Path) -> Result<(), WalError> {
        fs.create_dir_all(aside)
            .map_err(|e| io_err("create the discard directory", e))?;
        if let Some(parent) = aside.parent() {
            sync_dir(fs, parent)?;
        }
        for c in &self.cuts {
            let name = c.path.file_name().unwrap_or_default();
            let src = fs
                .open(&c.path)
                .map_err(|e| io_err("open WAL segment", e))?;
            let data = read_all(src.as_ref()).map_err(|e| io_err("read WAL segment", e))?;
            let copy = fs
                .create(&aside.join(name))
                .map_err(|e| io_err("copy WAL segment", e))?;
            write_all_vectored(copy.as_ref(), &mut [IoSlice::new(&data)], 0)?;
            copy.sync_data()
                .map_err(|e| io_err("sync copied WAL segment", e))?;
        }
        sync_dir(fs, aside)?;
        for c in &self.cuts {
            if c.keep == 0 {
                fs.remove(&c.path)
                    .map_err(|e| io_err("delete WAL segment", e))?;
            } else {
                let f = fs
                    .open(&c.path)
                    .map_err(|e| io_err("open WAL segment", e))?;
                if let Some(first) = c.restamp {
                    let mut h = [0u8; SEG_HEADER_LEN];
                    f.read_exact_at(&mut h, 0)
                        .map_err(|e| io_err("read WAL segment header", e))?;
                    let h = segment::restamp(&h, first).ok_or_else(|| {
                        WalError::Io(format!("{} changed during the discard", c.path.display()))
                    })?;
                    write_all_vectored(f.as_ref(), &mut [IoSlice::new(&h)], 0)?;
                }
                f.set_len(c.keep)
                    .and_then(|_| f.sync_data())
                    .map_err(|e| io_err("truncate WAL segment", e))?;
            }
        }
        sync_dir(fs, dir)
    }
}

impl std::fmt::Display for DiscardPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return write!(f, "nothing to discard after seq {}", self.after);
        }
        match self.seqs {
            Some((lo, hi)) => write!(f, "{} records (seq {lo} to {hi})", self.records)?,
            None => write!(f, "no readable record")?,
        }
        write!(
            f,
            ", {} bytes in {} segment{}",
            self.bytes,
            self.cuts.len(),
            if self.cuts.len() == 1 { "" } else { "s" }
        )?;
        if self.unreadable > 0 {
            write!(f, " ({} of them unreadable)", self.unreadable)?;
        }
        Ok(())
    }
}

/// What discarding every record after seq `after` of the WAL in `dir`
/// would throw away. Refused when a damaged segment that is not the newest
/// hides records that `after` asks to keep.
pub fn plan(fs: &DynWalFs, dir: &Path, volume: u64, after: u64) -> Result<DiscardPlan, WalError> {
    let scans = scan(fs, dir, volume)?;
    let mut out = DiscardPlan {
        after,
        cuts: Vec::new(),
        records: 0,
        seqs: None,
        bytes: 0,
        unreadable: 0,
    };
    let scans: Vec<SegScan> = scans.into_iter().filter(|s| !s.spare).collect();
    let newest = scans.len().saturating_sub(1);
    let mut cut_at: Option<(usize, u64)> = None;
    let mut last_readable = 0;
    let mut run_end = 0u64;
    for (i, s) in scans.iter().enumerate() {
        if let Some(r) = s.records.iter().find(|r| r.seq > after) {
            cut_at = Some((i, r.off));
            break;
        }
        last_readable = s.records.last().map_or(last_readable, |r| r.seq);
        run_end = run_end.max(last_readable);
        if let Some(f) = s.first_seq {
            run_end = run_end.max(f.saturating_sub(1));
        }
        // A version 2 segment whose run ends before the next segment's
        // first_seq lost records there (replay invariant 6): damage.
        let short = scans
            .get(i + 1)
            .and_then(|t| t.first_seq)
            .filter(|&f| s.first_seq.is_some() && f > run_end + 1)
            .map(|f| {
                format!("its records end at seq {run_end}, the next segment starts at seq {f}")
            });
        if let Some(why) = s.damage.clone().or(short) {
            if after > last_readable && i != newest {
                return Err(WalError::Io(format!(
                    "records after seq {last_readable} cannot be read ({} is damaged at offset {}: {why}); \
                     choose --after {last_readable} or lower",
                    s.path.display(),
                    s.good_len
                )));
            }
            cut_at = Some((i, s.good_len));
            break;
        }
    }
    let Some((first, off)) = cut_at else {
        return Ok(out);
    };
    for (i, s) in scans.iter().enumerate().skip(first) {
        let keep = if i == first {
            off
        } else {
            s.header_len().min(s.good_len)
        };
        add_cut(&mut out, s, keep, after);
    }
    Ok(out)
}

/// Offset just past the last byte of `s` that is not zero.
fn written_end(s: &SegScan) -> u64 {
    match read_all(s.file.as_ref()) {
        Ok(b) => b.iter().rposition(|&x| x != 0).map_or(0, |p| p as u64 + 1),
        Err(_) => s.len,
    }
}

fn add_cut(out: &mut DiscardPlan, s: &SegScan, keep: u64, after: u64) {
    let restamp = s
        .first_seq
        .filter(|&f| f > after + 1 && keep >= SEG_HEADER_LEN as u64)
        .map(|_| after + 1);
    let len = if s.first_seq.is_some() {
        // Past its run: the unreadable rest of what was written there
        // (up to the last byte that is not zero), not the preallocation.
        s.good_len.max(written_end(s))
    } else {
        s.len
    };
    if keep >= len && restamp.is_none() {
        return;
    }
    for r in s.records.iter().filter(|r| r.off >= keep) {
        out.records += 1;
        out.seqs = Some(match out.seqs {
            None => (r.seq, r.seq),
            Some((lo, hi)) => (lo.min(r.seq), hi.max(r.seq)),
        });
    }
    out.bytes += len.saturating_sub(keep);
    out.unreadable += len.saturating_sub(s.good_len.max(keep));
    out.cuts.push(Cut {
        path: s.path.clone(),
        keep,
        len,
        restamp,
    });
}
