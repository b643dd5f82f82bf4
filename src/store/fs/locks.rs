//! The fs store's per-key locks and per-directory generation counters.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::io_err;
use crate::store::StoreResult;

fn flock<T: nix::fcntl::Flockable>(what: T, path: &Path) -> StoreResult<Flock<T>> {
    Flock::lock(what, FlockArg::LockExclusive).map_err(|(_, errno)| {
        io_err(
            "cannot lock",
            path,
            io::Error::from_raw_os_error(errno as i32),
        )
    })
}

/// An exclusive `flock` on a key's lock file (`<segment>.lock`).
///
/// The lock file is removed when its object is deleted, so after locking,
/// `acquire` checks that the path still names the inode it locked; if not
/// (another holder removed or replaced it meanwhile), it starts over. Hence
/// two holders can never lock different inodes for the same key.
pub(super) struct KeyLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl KeyLock {
    pub(super) fn acquire(path: &Path) -> StoreResult<KeyLock> {
        loop {
            let file = crate::private::open_options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| io_err("cannot open lock file", path, e))?;
            let file = flock(file, path)?;
            let held = file
                .metadata()
                .map_err(|e| io_err("cannot stat lock file", path, e))?;
            match fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(KeyLock {
                        _file: file,
                        path: path.to_path_buf(),
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot stat lock file", path, e)),
            }
        }
    }

    /// Remove the lock file while still holding the lock; waiters notice and
    /// retry on a fresh file.
    pub(super) fn remove(self) -> StoreResult<()> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("cannot remove lock file", &self.path, e)),
        }
    }
}

/// The generation counter of one directory (file `.gen`), held under an
/// exclusive `flock` on the directory itself for a short read-modify-write.
///
/// It records at least the highest generation handed out to any key of the
/// directory. Puts raise it without fsync; deletes raise it to the deleted
/// object's generation and fsync it, so a key deleted and re-created never
/// gets a generation it had before, even across a crash.
pub(super) struct DirCounter {
    _dir: Flock<File>,
    file: File,
    path: PathBuf,
}

impl DirCounter {
    pub(super) fn lock(dir: &Path) -> StoreResult<DirCounter> {
        let handle = File::open(dir).map_err(|e| io_err("cannot open directory", dir, e))?;
        let locked = flock(handle, dir)?;
        let path = dir.join(".gen");
        let file = crate::private::open_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err("cannot open generation counter", &path, e))?;
        Ok(DirCounter {
            _dir: locked,
            file,
            path,
        })
    }

    pub(super) fn read(&self) -> StoreResult<u64> {
        let mut buf = [0u8; 8];
        match self.file.read_exact_at(&mut buf, 0) {
            Ok(()) => Ok(u64::from_le_bytes(buf)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            Err(e) => Err(io_err("cannot read generation counter", &self.path, e)),
        }
    }

    pub(super) fn write(&self, value: u64, durable: bool) -> StoreResult<()> {
        self.file
            .write_all_at(&value.to_le_bytes(), 0)
            .map_err(|e| io_err("cannot write generation counter", &self.path, e))?;
        if durable {
            self.file
                .sync_data()
                .map_err(|e| io_err("cannot fsync generation counter", &self.path, e))?;
        }
        Ok(())
    }
}
