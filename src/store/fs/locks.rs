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

    /// Set the counter to `value` (not durable until synced).
    pub(super) fn write(&self, value: u64) -> StoreResult<()> {
        self.file
            .write_all_at(&value.to_le_bytes(), 0)
            .map_err(|e| io_err("cannot write generation counter", &self.path, e))
    }

    /// Make the counter of `dir` durably at least `generation` (what a
    /// delete needs before it unlinks an object of that generation).
    ///
    /// Skipped when a sync this process made already covers it (`synced`):
    /// the counter only grows, so once a value is durable every later
    /// state of the file is at least that. Otherwise the counter is raised
    /// under the directory lock and synced after the lock is dropped, so
    /// puts and deletes of other keys never wait for the disk behind it.
    pub(super) fn raise_durably(
        dir: &Path,
        generation: u64,
        synced: &SyncedCounters,
    ) -> StoreResult<()> {
        let id = dir_id(dir)?;
        if synced.covers(dir, id, generation) {
            return Ok(());
        }
        let (file, path, value) = {
            let counter = DirCounter::lock(dir)?;
            let value = counter.read()?.max(generation);
            counter.write(value)?;
            (counter.file, counter.path, value)
        };
        file.sync_data()
            .map_err(|e| io_err("cannot fsync generation counter", &path, e))?;
        synced.note(dir, id, value);
        Ok(())
    }
}

/// A directory's identity: (device, inode).
type DirId = (u64, u64);

/// Which directory `dir` names now.
fn dir_id(dir: &Path) -> StoreResult<DirId> {
    let m = fs::metadata(dir).map_err(|e| io_err("cannot stat directory", dir, e))?;
    Ok((m.dev(), m.ino()))
}

/// The highest generation counter value each directory is known to hold
/// durably, because this process synced it (see
/// [`DirCounter::raise_durably`]). Keyed by path and checked against the
/// directory's identity, so a directory replaced from outside is not
/// taken for the one that was synced.
#[derive(Debug, Default)]
pub(super) struct SyncedCounters {
    /// Per path: the directory synced and the value it holds durably.
    dirs: std::sync::Mutex<std::collections::HashMap<PathBuf, (DirId, u64)>>,
}

impl SyncedCounters {
    fn covers(&self, dir: &Path, id: DirId, generation: u64) -> bool {
        let dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        matches!(dirs.get(dir), Some(&(seen, value)) if seen == id && value >= generation)
    }

    fn note(&self, dir: &Path, id: DirId, value: u64) {
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        let entry = dirs.entry(dir.to_path_buf()).or_insert((id, value));
        if entry.0 != id || entry.1 < value {
            *entry = (id, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter_value(dir: &Path) -> u64 {
        DirCounter::lock(dir).unwrap().read().unwrap()
    }

    /// A delete's counter raise syncs once; later raises to generations
    /// that sync covers leave the file alone (here: a value put back by
    /// hand stays), higher ones write and sync again.
    #[test]
    fn a_synced_counter_covers_later_raises_up_to_its_value() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        let synced = SyncedCounters::default();
        DirCounter::raise_durably(dir, 7, &synced).unwrap();
        assert_eq!(counter_value(dir), 7);
        DirCounter::lock(dir).unwrap().write(3).unwrap();
        DirCounter::raise_durably(dir, 5, &synced).unwrap();
        assert_eq!(counter_value(dir), 3, "a covered raise does not write");
        DirCounter::raise_durably(dir, 9, &synced).unwrap();
        assert_eq!(counter_value(dir), 9);
    }

    /// A directory replaced under the same path is a new directory: what
    /// was synced in the old one covers nothing in it.
    #[test]
    fn a_replaced_directory_is_not_covered_by_the_old_ones_sync() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("d");
        fs::create_dir(&dir).unwrap();
        // Hold the old directory open so the new one cannot reuse its inode.
        let _old = File::open(&dir).unwrap();
        let synced = SyncedCounters::default();
        DirCounter::raise_durably(&dir, 7, &synced).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        fs::create_dir(&dir).unwrap();
        DirCounter::raise_durably(&dir, 5, &synced).unwrap();
        assert_eq!(counter_value(&dir), 5);
    }
}
