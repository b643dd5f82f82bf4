//! Imports into a writable device: a raw image's non-zero blocks, or the
//! records of a delta file.
//!
//! Invariants:
//! 1. A raw import reads only the file's data segments (holes are skipped
//!    without reading) and writes only non-zero blocks: the device must
//!    read as zeros before (a new volume).
//! 2. A delta is applied only after [`check_delta`] read the whole file,
//!    checked every CRC and found the device holding, in every range the
//!    delta changes, the base's bytes or already the target's; applying
//!    re-checks every CRC while it writes. Applying is idempotent, so an
//!    interrupted apply is finished by running it again.
//! 3. Both end with a flush: when they return `Ok`, everything is durable.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::delta::{DeltaHeader, DeltaReader, DeltaTotals, RecordKind};
use super::sparse::{data_segments, nonzero_runs, HOLE_GRANULE};
use super::{Progress, TransferError, COPY_BLOCK};
use crate::engine::{BlockDevice, SECTOR};

/// What a raw import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawImportStats {
    /// Bytes of the file that were read (its data segments).
    pub read_bytes: u64,
    /// Bytes written to the device (non-zero blocks).
    pub written_bytes: u64,
}

/// Fill `buf` from `file` at `offset`; past the end of the file the rest is
/// zeros.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Write the first `len` bytes of `file` (opened from `path`) to the start of `dev`, which
/// reads as zeros beforehand; a final partial sector is padded with zeros.
/// `dev` must hold at least `len` bytes rounded up to a sector.
pub async fn write_raw(
    dev: &dyn BlockDevice,
    file: &File,
    path: &Path,
    len: u64,
    progress: &dyn Progress,
) -> Result<RawImportStats, TransferError> {
    let padded = len.div_ceil(SECTOR) * SECTOR;
    if padded > dev.size() {
        return Err(TransferError::Invalid(format!(
            "the image ({len} bytes) does not fit the volume ({} bytes)",
            dev.size()
        )));
    }
    let file_err = |source| TransferError::File {
        path: path.to_path_buf(),
        source,
    };
    let segments = data_segments(file, len).map_err(file_err)?;
    let mut stats = RawImportStats::default();
    progress.start("import", len);
    let result = async {
        let mut buf = vec![0u8; COPY_BLOCK as usize];
        let mut done = 0u64;
        for (s, e) in segments {
            // Sector-align the segment (file systems report block bounds).
            let (s, e) = ((s / SECTOR) * SECTOR, e.div_ceil(SECTOR) * SECTOR);
            let mut off = s.max(done);
            progress.advance(off.min(len) - done.min(len));
            while off < e {
                if progress.cancelled() {
                    return Err(TransferError::Interrupted);
                }
                let n = (e - off).min(COPY_BLOCK) as usize;
                // Never past `len` (the file may grow meanwhile): the
                // padding of a final partial sector stays zeros.
                let want = (len.saturating_sub(off) as usize).min(n);
                read_full_at(file, &mut buf[..want], off).map_err(file_err)?;
                buf[want..n].fill(0);
                stats.read_bytes += n as u64;
                for (a, b) in nonzero_runs(&buf[..n], off, HOLE_GRANULE) {
                    dev.write(off + a as u64, &buf[a..b], false).await?;
                    stats.written_bytes += (b - a) as u64;
                }
                progress.advance((off + n as u64).min(len) - off.min(len));
                off += n as u64;
            }
            done = done.max(e);
        }
        progress.advance(len - done.min(len));
        dev.flush().await?;
        Ok(stats)
    }
    .await;
    progress.finish();
    result
}

/// Apply a delta (read from `path`) to `dev`, whose size must be the
/// delta's target size: data records are written, zero records zeroed,
/// then `dev` is flushed. `total` is the progress total (the delta's bytes).
pub async fn apply_delta<R: Read>(
    dev: &dyn BlockDevice,
    mut reader: DeltaReader<R>,
    path: &Path,
    total: u64,
    progress: &dyn Progress,
) -> Result<DeltaTotals, TransferError> {
    let size = reader.header().target_size;
    if dev.size() != size {
        return Err(TransferError::Invalid(format!(
            "the volume is {} bytes but the delta leads to a snapshot of {size} bytes",
            dev.size()
        )));
    }
    let delta_err = |source| TransferError::Delta {
        path: path.to_path_buf(),
        source,
    };
    progress.start("apply", total);
    let result = async {
        let mut buf = Vec::new();
        while let Some(rec) = reader.next_record(&mut buf).map_err(delta_err)? {
            if progress.cancelled() {
                return Err(TransferError::Interrupted);
            }
            match rec.kind {
                RecordKind::Data => dev.write(rec.offset, &buf, false).await?,
                RecordKind::Zero => dev.write_zeroes(rec.offset, rec.len, false).await?,
            }
            progress.advance(rec.len);
        }
        dev.flush().await?;
        Ok(reader.totals())
    }
    .await;
    progress.finish();
    result
}

/// What [`check_delta`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaCheck {
    pub header: DeltaHeader,
    pub totals: DeltaTotals,
    /// Records whose range already holds the target's bytes (an earlier
    /// apply of this delta got that far); the others hold the base's.
    pub applied: u64,
}

/// Read the whole delta, checking its CRCs, and check that in every range
/// the delta changes `dev` holds the base snapshot's bytes (the record's
/// base CRC) or already the target's (the record's data CRC, or zeros), so
/// an apply that was interrupted can be run again to finish. Writes
/// nothing.
pub async fn check_delta<R: Read>(
    dev: &dyn BlockDevice,
    mut reader: DeltaReader<R>,
    path: &Path,
    progress: &dyn Progress,
) -> Result<DeltaCheck, TransferError> {
    let delta_err = |source| TransferError::Delta {
        path: path.to_path_buf(),
        source,
    };
    let header = reader.header().clone();
    if dev.size() != header.target_size {
        return Err(TransferError::Invalid(format!(
            "the volume is {} bytes; this delta applies to a volume of {} bytes holding {} \
             (it leads to {})",
            dev.size(),
            header.target_size,
            header.base,
            header.target
        )));
    }
    let mut data = Vec::new();
    let mut held = Vec::new();
    let mut applied = 0;
    while let Some(rec) = reader.next_record(&mut data).map_err(delta_err)? {
        if progress.cancelled() {
            return Err(TransferError::Interrupted);
        }
        held.resize(rec.len as usize, 0);
        dev.read(rec.offset, &mut held).await?;
        let crc = crc32c::crc32c(&held);
        if crc == rec.base_crc {
            continue;
        }
        let done = match rec.kind {
            RecordKind::Data => crc == rec.data_crc,
            RecordKind::Zero => held.iter().all(|&b| b == 0),
        };
        if !done {
            return Err(TransferError::NotBase {
                base: header.base.clone(),
                target: header.target.clone(),
                offset: rec.offset,
                len: rec.len,
            });
        }
        applied += 1;
    }
    Ok(DeltaCheck {
        header,
        totals: reader.totals(),
        applied,
    })
}
