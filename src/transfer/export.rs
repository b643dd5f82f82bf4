//! Exports of snapshots: a full raw image (sparse), or a delta file holding
//! only what changed since a base snapshot.
//!
//! Invariants:
//! 1. Only ranges whose source is data are read; zero and unmapped ranges
//!    cost no store I/O. An incremental export reads only the diff's ranges:
//!    the target's data there, and the base's bytes there for the records'
//!    base checksums.
//! 2. An output file appears under its name only when complete: it is
//!    written to a temporary file beside it, synced, then renamed
//!    ([`OutputFile`]); a failed export leaves no file behind.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::delta::{DeltaError, DeltaHeader, DeltaTotals, DeltaWriter, MAX_RECORD};
use super::sparse::{nonzero_runs, RawSink, HOLE_GRANULE};
use super::{Progress, TransferError, COPY_BLOCK};
use crate::engine::diff::{diff_views, Diff, DiffKind};
use crate::engine::view::SnapshotView;
use crate::engine::BlockDevice;

/// What a full export did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportStats {
    /// Size of the image.
    pub size: u64,
    /// Bytes read from the snapshot's chunks.
    pub read_bytes: u64,
    /// Bytes written as data (the rest are holes or zeros).
    pub data_bytes: u64,
}

/// Byte ranges `(offset, len)` of `view` whose source is data, adjacent
/// ones merged.
fn data_spans(view: &SnapshotView) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for r in view.sources().iter().filter(|r| !r.source.is_zero()) {
        match spans.last_mut() {
            Some(last) if last.0 + last.1 == r.offset => last.1 += r.len,
            _ => spans.push((r.offset, r.len)),
        }
    }
    spans
}

/// Write the whole of `view` to `sink` as a raw image. Blocks of
/// [`HOLE_GRANULE`] bytes that read as zeros are not written (holes in a
/// sparse file, zeros on a stream).
pub async fn export_full(
    view: &SnapshotView,
    mut sink: RawSink,
    progress: &dyn Progress,
) -> Result<ExportStats, TransferError> {
    let size = view.size();
    let mut stats = ExportStats {
        size,
        ..ExportStats::default()
    };
    progress.start("export", size);
    let result = async {
        let mut buf = vec![0u8; COPY_BLOCK as usize];
        let mut done = 0u64;
        for (start, len) in data_spans(view) {
            progress.advance(start - done);
            let mut off = start;
            while off < start + len {
                let n = (start + len - off).min(COPY_BLOCK) as usize;
                view.read(off, &mut buf[..n]).await?;
                stats.read_bytes += n as u64;
                for (s, e) in nonzero_runs(&buf[..n], off, HOLE_GRANULE) {
                    sink.write_at(off + s as u64, &buf[s..e])
                        .map_err(TransferError::Output)?;
                    stats.data_bytes += (e - s) as u64;
                }
                off += n as u64;
                progress.advance(n as u64);
            }
            done = start + len;
        }
        progress.advance(size - done);
        sink.finish(size).map_err(TransferError::Output)
    }
    .await;
    progress.finish();
    result.map(|()| stats)
}

fn delta_out(e: DeltaError) -> TransferError {
    match e {
        DeltaError::Write(io) => TransferError::Output(io),
        other => TransferError::Invalid(format!("internal error writing the delta: {other}")),
    }
}

/// CRC32C of `base`'s bytes at `[off, off + len)`; bytes past its end
/// count as zeros. `buf` is scratch space of at least `len` bytes.
async fn base_crc(
    base: &SnapshotView,
    off: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<u32, TransferError> {
    let buf = &mut buf[..len as usize];
    let inside = base.size().saturating_sub(off).min(len) as usize;
    base.read(off, &mut buf[..inside]).await?;
    buf[inside..].fill(0);
    Ok(crc32c::crc32c(buf))
}

/// Write the changes from `base` to `target` as a delta file to `out`.
/// Changed ranges are cut into records of at most [`MAX_RECORD`] bytes;
/// data is read from `target` (a piece that reads as zeros becomes a zero
/// record), and each record carries the CRC32C of `base`'s bytes in its
/// range, so an import can check the volume holds the base there. Returns
/// the diff and the delta's totals.
pub async fn export_delta<W: Write>(
    base: &SnapshotView,
    target: &SnapshotView,
    names: (&str, &str),
    out: W,
    progress: &dyn Progress,
) -> Result<(Diff, DeltaTotals), TransferError> {
    let diff = diff_views(base, target);
    let header = DeltaHeader {
        base: names.0.to_string(),
        target: names.1.to_string(),
        base_size: base.size(),
        target_size: target.size(),
    };
    let total = diff.bytes(DiffKind::Data) + diff.bytes(DiffKind::Zero);
    progress.start("export", total);
    let result = async {
        let mut w = DeltaWriter::new(out, &header).map_err(delta_out)?;
        let mut buf = vec![0u8; MAX_RECORD as usize];
        let mut before = vec![0u8; MAX_RECORD as usize];
        for r in &diff.ranges {
            let mut off = r.offset;
            while off < r.offset + r.len {
                let n = (r.offset + r.len - off).min(MAX_RECORD);
                let crc = base_crc(base, off, n, &mut before).await?;
                let data = &mut buf[..n as usize];
                let zero = match r.kind {
                    DiffKind::Zero => true,
                    DiffKind::Data => {
                        target.read(off, data).await?;
                        data.iter().all(|&b| b == 0)
                    }
                };
                if zero {
                    w.zero(off, n, crc).map_err(delta_out)?;
                } else {
                    w.data(off, data, crc).map_err(delta_out)?;
                }
                off += n;
                progress.advance(n);
            }
        }
        let (totals, _) = w.finish().map_err(delta_out)?;
        Ok(totals)
    }
    .await;
    progress.finish();
    result.map(|totals| (diff, totals))
}

/// A file being written under a temporary name beside its final path;
/// [`OutputFile::commit`] syncs it and renames it into place. Dropped
/// without a commit, the temporary file is removed.
#[derive(Debug)]
pub struct OutputFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

impl OutputFile {
    /// Create the temporary file for `path`. Fails if `path` exists and
    /// `force` is false, or if it exists and is not a regular file.
    pub fn create(path: &Path, force: bool) -> Result<OutputFile, TransferError> {
        let file_err = |source| TransferError::File {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(_) if !force => return Err(TransferError::Exists(path.to_path_buf())),
            Ok(m) if !m.is_file() => {
                return Err(TransferError::Invalid(format!(
                    "{} exists and is not a regular file; refusing to replace it",
                    path.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err(e)),
        }
        let name = path
            .file_name()
            .ok_or_else(|| TransferError::Invalid(format!("{} names no file", path.display())))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".shale-partial-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|source| TransferError::File {
                path: tmp.clone(),
                source,
            })?;
        Ok(OutputFile {
            path: path.to_path_buf(),
            tmp,
            file: Some(file),
        })
    }

    /// A second handle on the temporary file (for writing).
    pub fn handle(&self) -> Result<File, TransferError> {
        self.file
            .as_ref()
            .ok_or_else(|| TransferError::Invalid("output file already committed".into()))?
            .try_clone()
            .map_err(|source| TransferError::File {
                path: self.tmp.clone(),
                source,
            })
    }

    /// Sync the data and rename the file to its final name.
    pub fn commit(mut self) -> Result<(), TransferError> {
        let err = |path: &Path, source| TransferError::File {
            path: path.to_path_buf(),
            source,
        };
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(|e| err(&self.tmp, e))?;
        }
        std::fs::rename(&self.tmp, &self.path).map_err(|e| err(&self.path, e))?;
        // The rename is durable once the directory is synced.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
