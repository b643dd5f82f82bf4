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

use futures::stream::{self, StreamExt};

use super::delta::{DeltaError, DeltaHeader, DeltaTotals, DeltaWriter, MAX_RECORD};
use super::sparse::{nonzero_runs, RawSink, HOLE_GRANULE};
use super::{Progress, TransferError, COPY_BLOCK};
use crate::engine::diff::{diff_views, Diff, DiffKind};
use crate::engine::view::SnapshotView;
use crate::engine::BlockDevice;

/// Reads in flight at once during an export.
pub const READ_AHEAD: usize = 8;

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

/// Cut `spans` into pieces `(offset, len, tag)` of at most `max` bytes.
fn pieces<T: Copy>(spans: &[(u64, u64, T)], max: u64) -> Vec<(u64, u64, T)> {
    let mut out = Vec::new();
    for &(start, len, tag) in spans {
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(max);
            out.push((off, n, tag));
            off += n;
        }
    }
    out
}

/// Write the whole of `view` to `sink` as a raw image. Blocks of
/// [`HOLE_GRANULE`] bytes that read as zeros are not written (holes in a
/// sparse file, zeros on a stream). Up to [`READ_AHEAD`] blocks are read
/// at once (store latency overlaps); they are written in order.
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
        let spans: Vec<_> = data_spans(view)
            .into_iter()
            .map(|(s, l)| (s, l, ()))
            .collect();
        let mut reads = stream::iter(pieces(&spans, COPY_BLOCK))
            .map(|(off, n, ())| async move {
                let mut buf = vec![0u8; n as usize];
                view.read(off, &mut buf).await.map(|()| (off, buf))
            })
            .buffered(READ_AHEAD);
        let mut done = 0u64;
        while let Some(read) = reads.next().await {
            if progress.cancelled() {
                return Err(TransferError::Interrupted);
            }
            let (off, buf) = read?;
            stats.read_bytes += buf.len() as u64;
            for (s, e) in nonzero_runs(&buf, off, HOLE_GRANULE) {
                sink.write_at(off + s as u64, &buf[s..e])
                    .map_err(TransferError::Output)?;
                stats.data_bytes += (e - s) as u64;
            }
            let end = off + buf.len() as u64;
            progress.advance(end - done);
            done = end;
        }
        progress.advance(size - done);
        if progress.cancelled() {
            return Err(TransferError::Interrupted);
        }
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
/// count as zeros.
async fn base_crc(base: &SnapshotView, off: u64, len: u64) -> Result<u32, TransferError> {
    let mut buf = vec![0u8; len as usize];
    let inside = base.size().saturating_sub(off).min(len) as usize;
    base.read(off, &mut buf[..inside]).await?;
    Ok(crc32c::crc32c(&buf))
}

/// Write the changes from `base` to `target` as a delta file to `out`.
/// Changed ranges are cut into records of at most [`MAX_RECORD`] bytes;
/// data is read from `target` (a piece that reads as zeros becomes a zero
/// record), and each record carries the CRC32C of `base`'s bytes in its
/// range, so an import can check the volume holds the base there. Up to
/// [`READ_AHEAD`] records are read at once. Returns the diff and the
/// delta's totals.
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
        let spans: Vec<_> = diff
            .ranges
            .iter()
            .map(|r| (r.offset, r.len, r.kind))
            .collect();
        let mut reads = stream::iter(pieces(&spans, MAX_RECORD))
            .map(|(off, n, kind)| async move {
                let crc = base_crc(base, off, n).await?;
                let data = match kind {
                    DiffKind::Zero => None,
                    DiffKind::Data => {
                        let mut buf = vec![0u8; n as usize];
                        target.read(off, &mut buf).await?;
                        Some(buf).filter(|b| b.iter().any(|&x| x != 0))
                    }
                };
                Ok::<_, TransferError>((off, n, crc, data))
            })
            .buffered(READ_AHEAD);
        while let Some(read) = reads.next().await {
            if progress.cancelled() {
                return Err(TransferError::Interrupted);
            }
            let (off, n, crc, data) = read?;
            match data {
                Some(data) => w.data(off, &data, crc),
                None => w.zero(off, n, crc),
            }
            .map_err(delta_out)?;
            progress.advance(n);
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
            .map_err(|e| {
                file_err(std::io::Error::new(
                    e.kind(),
                    format!("cannot create the temporary file {}: {e}", tmp.display()),
                ))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn output_file_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.img");
        let out = OutputFile::create(&path, false).unwrap();
        out.handle().unwrap().write_all(b"partial").unwrap();
        drop(out);
        assert!(names(dir.path()).is_empty(), "an abandoned file is removed");

        let out = OutputFile::create(&path, false).unwrap();
        out.handle().unwrap().write_all(b"one").unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert!(matches!(
            OutputFile::create(&path, false),
            Err(TransferError::Exists(_))
        ));
        let out = OutputFile::create(&path, true).unwrap();
        out.handle().unwrap().write_all(b"two").unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"one",
            "old file kept until commit"
        );
        out.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(names(dir.path()), vec!["out.img".to_string()]);

        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            OutputFile::create(&sub, true),
            Err(TransferError::Invalid(_))
        ));
        let missing = dir.path().join("no/such/dir/out.img");
        let err = OutputFile::create(&missing, false).unwrap_err();
        assert!(err.to_string().contains("out.img"), "{err}");
    }
}
