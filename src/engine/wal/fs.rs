//! The file-system seam under the WAL: the few operations the log, its
//! replay and its repair use, so tests can run them on a file system that
//! loses power ([`super::power_loss::PowerLossFs`]).
//!
//! Protocol (what callers may rely on, and what implementations must keep):
//! 1. Bytes written to a file are durable only after [`WalFile::sync_data`]
//!    on that file returned; a length change ([`WalFile::set_len`]) likewise.
//! 2. A created, removed or renamed directory entry is durable only after
//!    [`WalFs::sync_dir`] of the directory holding it (for a rename: of both
//!    directories) returned.
//! 3. Reads see every write made before them, durable or not (a page cache).
//! 4. An open [`WalFile`] stays usable after its name is removed.
//!
//! The real implementation is plain `std::fs` with `pwritev`; the hot path
//! pays one dynamic call per batch.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// An open file of the WAL (read and write).
pub trait WalFile: Send + Sync + std::fmt::Debug {
    /// Write the slices at `off`, in order; returns the bytes written
    /// (possibly fewer than asked, like `pwritev`).
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<usize>;
    /// Fill `buf` from `off`; fails if the file ends before.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Make the file's data (and length) durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Cut or extend the file to `len` bytes (not durable until synced).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
}

/// A shared open WAL file.
pub type SegFile = Arc<dyn WalFile>;

/// Directory operations of the WAL.
pub trait WalFs: Send + Sync + std::fmt::Debug {
    /// Create `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the files in `dir` (an empty list if `dir` is missing).
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Create `path` (emptying it if it exists), open for read and write.
    fn create(&self, path: &Path) -> io::Result<SegFile>;
    /// Open the existing file `path` for read and write.
    fn open(&self, path: &Path) -> io::Result<SegFile>;
    /// Remove the file `path`.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Move the file `from` to `to` (same file system).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Make the entries of `dir` durable (`fsync` of the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The file system seam handed to a volume.
pub type DynWalFs = Arc<dyn WalFs>;

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

/// The real file system as a [`DynWalFs`].
pub fn real() -> DynWalFs {
    Arc::new(RealFs)
}

#[derive(Debug)]
struct RealFile(File);

impl WalFile for RealFile {
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<usize> {
        let off = libc::off_t::try_from(off)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        nix::sys::uio::pwritev(&self.0, iov, off).map_err(io::Error::from)
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.0, buf, off)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl WalFs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        crate::private::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        for entry in entries {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    fn create(&self, path: &Path) -> io::Result<SegFile> {
        let f = crate::private::open_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Arc::new(RealFile(f)))
    }

    fn open(&self, path: &Path) -> io::Result<SegFile> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(RealFile(f)))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Read a whole file.
pub fn read_all(file: &dyn WalFile) -> io::Result<Vec<u8>> {
    let len = usize::try_from(file.size()?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}
