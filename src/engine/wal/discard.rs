//! The operator's way out of a damaged WAL: drop every record after a
//! chosen sequence number (`shale volume discard-wal`).
//!
//! [`plan`] reads the WAL and says exactly what would go (segments,
//! records, bytes, sequence range, unreadable bytes) without touching it;
//! [`DiscardPlan::apply`] first copies every segment it changes into a
//! side directory (so nothing is destroyed by mistake), then cuts them. A
//! segment's header is kept even when all its records go, so the WAL still
//! names the writers whose history it extends.

use std::io::IoSlice;
use std::path::{Path, PathBuf};

use super::fs::{read_all, DynWalFs};
use super::scan::{scan, SegScan};
use super::{io_err, sync_dir, write_all_vectored, WalError};

/// One segment the discard changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub path: PathBuf,
    /// Bytes kept at its start (0: the file is removed).
    pub keep: u64,
    /// Its length now.
    pub len: u64,
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
    let newest = scans.len().saturating_sub(1);
    let mut cut_at: Option<(usize, u64)> = None;
    let mut last_readable = 0;
    for (i, s) in scans.iter().enumerate() {
        if let Some(r) = s.records.iter().find(|r| r.seq > after) {
            cut_at = Some((i, r.off));
            break;
        }
        last_readable = s.records.last().map_or(last_readable, |r| r.seq);
        if let Some(why) = &s.damage {
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
        add_cut(&mut out, s, keep);
    }
    Ok(out)
}

fn add_cut(out: &mut DiscardPlan, s: &SegScan, keep: u64) {
    if keep >= s.len {
        return;
    }
    for r in s.records.iter().filter(|r| r.off >= keep) {
        out.records += 1;
        out.seqs = Some(match out.seqs {
            None => (r.seq, r.seq),
            Some((lo, hi)) => (lo.min(r.seq), hi.max(r.seq)),
        });
    }
    out.bytes += s.len - keep;
    out.unreadable += s.len - s.good_len.max(keep);
    out.cuts.push(Cut {
        path: s.path.clone(),
        keep,
        len: s.len,
    });
}
