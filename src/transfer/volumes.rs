//! Imports as catalog operations: a raw image becomes a new volume, a delta
//! is applied to an existing detached volume.
//!
//! Invariants:
//! 1. A raw import checks the file against the volume size before creating
//!    anything, and deletes the volume it created if any later step fails
//!    (if even that fails, the error says so and names the volume).
//! 2. A delta's header is checked before the volume is attached; then,
//!    under the volume's lease (so it must be detached), the whole delta is
//!    checked against the volume (see [`check_delta`]) before anything is
//!    written.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::delta::{DeltaReader, DeltaTotals, DELTA_MAGIC};
use super::import::{apply_delta, check_delta, write_raw, DeltaCheck, RawImportStats};
use super::{Progress, TransferError};
use crate::catalog::{Catalog, VolumeRecord, MAX_VOLUME_SIZE, SIZE_ALIGN};
use crate::config::Config;
use crate::daemon::{attach, open_store};
use crate::error::Bytes;

fn file_err(path: &Path) -> impl Fn(std::io::Error) -> TransferError + '_ {
    move |source| TransferError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// True when the file at `path` starts with the delta magic.
pub fn is_delta(path: &Path) -> Result<bool, TransferError> {
    let mut f = File::open(path).map_err(file_err(path))?;
    let mut magic = [0u8; 8];
    let mut got = 0;
    while got < magic.len() {
        match f.read(&mut magic[got..]).map_err(file_err(path))? {
            0 => return Ok(false),
            n => got += n,
        }
    }
    Ok(&magic == DELTA_MAGIC)
}

/// The size of a volume holding an image of `len` bytes: `size` if given
/// (it must hold the image), else `len` rounded up to [`SIZE_ALIGN`].
pub fn import_size(path: &Path, len: u64, size: Option<u64>) -> Result<u64, TransferError> {
    if len > MAX_VOLUME_SIZE {
        return Err(TransferError::Invalid(format!(
            "{} is {len} bytes ({}); the largest volume is {MAX_VOLUME_SIZE} bytes (1 PiB)",
            path.display(),
            Bytes(len)
        )));
    }
    match size {
        Some(s) if len > s => Err(TransferError::Invalid(format!(
            "{} is {len} bytes ({}), larger than the requested size {s} bytes ({})",
            path.display(),
            Bytes(len),
            Bytes(s)
        ))),
        Some(s) => Ok(s),
        None if len == 0 => Err(TransferError::Invalid(format!(
            "{} is empty; give the volume a size with --size",
            path.display()
        ))),
        None => Ok(len.div_ceil(SIZE_ALIGN) * SIZE_ALIGN),
    }
}

/// Create volume `name` from the raw image at `path` (see [`import_size`]
/// for its size) and write the image's non-zero blocks into it.
pub async fn import_raw(
    cfg: &Config,
    path: &Path,
    name: &str,
    size: Option<u64>,
    now_ms: u64,
    progress: &dyn Progress,
) -> Result<(VolumeRecord, RawImportStats), TransferError> {
    let mut file = File::open(path).map_err(file_err(path))?;
    let len = file.seek(SeekFrom::End(0)).map_err(file_err(path))?;
    let size = import_size(path, len, size)?;
    let store = open_store(cfg).await?;
    let catalog = Catalog::new(store);
    let record = catalog.create(name, size, false, now_ms).await?;
    let result = async {
        let attached = attach(cfg, name).await?;
        let volume = attached.volume.clone();
        let written = write_raw(volume.as_ref(), &file, path, len, progress).await;
        drop(volume);
        let closed = attached.close().await;
        let stats = written?;
        closed?;
        Ok(stats)
    }
    .await;
    match result {
        Ok(stats) => Ok((record, stats)),
        Err(e) => match catalog.delete(name, now_ms).await {
            Ok(_) => Err(e),
            Err(del) => Err(TransferError::Invalid(format!(
                "{e}; the partly imported volume {name:?} could not be deleted ({del}): \
                 delete it with `shale volume delete {name}`"
            ))),
        },
    }
}

/// A reader that reports what it reads to a [`Progress`].
struct Counting<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

/// Check the whole delta at `path` against the detached volume `name`
/// (CRCs, size, and the base's or already the target's bytes in every
/// changed range, see [`check_delta`]), then apply it. Nothing is written
/// unless every check passed. Returns what the check found and what was
/// applied.
pub async fn import_delta(
    cfg: &Config,
    path: &Path,
    name: &str,
    progress: &dyn Progress,
) -> Result<(DeltaCheck, DeltaTotals), TransferError> {
    let delta_err = |source| TransferError::Delta {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(file_err(path))?;
    let file_len = file.metadata().map_err(file_err(path))?.len();
    // A header that does not parse is refused before the volume is touched.
    DeltaReader::new(std::io::BufReader::new(&file)).map_err(delta_err)?;
    let attached = attach(cfg, name).await?;
    let volume = attached.volume.clone();
    let applied = async {
        file.seek(SeekFrom::Start(0)).map_err(file_err(path))?;
        progress.start("check", file_len);
        let counting = Counting {
            inner: std::io::BufReader::new(&file),
            progress,
        };
        let checked = match DeltaReader::new(counting) {
            Ok(reader) => check_delta(volume.as_ref(), reader, path, progress).await,
            Err(e) => Err(delta_err(e)),
        };
        progress.finish();
        let check = checked?;
        file.seek(SeekFrom::Start(0)).map_err(file_err(path))?;
        let reader = DeltaReader::new(std::io::BufReader::new(&file)).map_err(delta_err)?;
        let total = check.totals.data_bytes + check.totals.zero_bytes;
        let applied = apply_delta(volume.as_ref(), reader, path, total, progress).await?;
        Ok::<_, TransferError>((check, applied))
    }
    .await;
    drop(volume);
    let closed = attached.close().await;
    let applied = applied?;
    closed?;
    Ok(applied)
}
