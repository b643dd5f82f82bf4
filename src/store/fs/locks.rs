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

/// An exclusive lock on one key: a one-byte OFD lock (`fcntl`
/// `F_OFD_SETLKW`) on the key's directory's counter file `.gen`, at an
/// offset derived from the key's last segment ([`lock_offset`]).
///
/// The counter file is created once per directory and never removed or
/// replaced, so every holder locks the same inode, and locking a key
/// creates and removes no file (a lock file per key cost an inode
/// allocation per chunk put and an unlink per delete: on an ext4 without
/// journal, ~7% of the server's CPU on 1 MiB writes, most of it
/// `find_inode_bit` skipping recently deleted inodes). OFD locks belong to
/// the open file, not the process, so they exclude threads of one process
/// as well as other processes; two keys whose offsets collide only wait
/// for each other. Released when dropped (the file is closed).
pub(super) struct KeyLock {
    _file: File,
}

impl KeyLock {
    pub(super) fn acquire(dir: &Path, name: &str) -> StoreResult<KeyLock> {
        let (file, path) = open_counter(dir)?;
        let range = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: lock_offset(name),
            l_len: 1,
            // Must be 0 for OFD locks.
            l_pid: 0,
        };
        loop {
            match nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_OFD_SETLKW(&range)) {
                Ok(_) => return Ok(KeyLock { _file: file }),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(errno) => {
                    return Err(io_err(
                        "cannot lock key in",
                        &path,
                        io::Error::from_raw_os_error(errno as i32),
                    ))
                }
            }
        }
    }
}

/// `dir`'s counter file `.gen`, created if missing (never removed).
fn open_counter(dir: &Path) -> StoreResult<(File, PathBuf)> {
    let path = dir.join(".gen");
    let file = crate::private::open_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err("cannot open generation counter", &path, e))?;
    Ok((file, path))
}

/// Where in its directory's counter file the lock of key segment `name`
/// lies: its 64-bit FNV-1a hash, cut to 62 bits (far from the offset
/// limit, and stable across releases and processes, unlike std's hasher).
fn lock_offset(name: &str) -> libc::off_t {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash >> 2) as libc::off_t
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
        let (file, path) = open_counter(dir)?;
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

    /// The offset is part of the store's format: processes of two builds
    /// must lock the same byte for a key.
    #[test]
    fn a_keys_lock_offset_is_fixed() {
        assert_eq!(lock_offset("manifest"), 2_917_687_305_448_401_657);
        assert_ne!(lock_offset("a"), lock_offset("b"));
    }

    /// A key's lock excludes another holder of the same key (here another
    /// thread, through its own open file) until it is dropped, and does
    /// not hold up other keys of the directory; no file is left per key.
    #[test]
    fn a_key_lock_excludes_its_key_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().to_path_buf();
        let held = KeyLock::acquire(&dir, "k").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let _other = KeyLock::acquire(&dir, "other").unwrap();
                tx.send("other").unwrap();
                let _k = KeyLock::acquire(&dir, "k").unwrap();
                tx.send("k").unwrap();
            })
        };
        assert_eq!(rx.recv().unwrap(), "other", "another key is free");
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "the held key is not granted twice"
        );
        drop(held);
        assert_eq!(rx.recv().unwrap(), "k", "granted once let go");
        waiter.join().unwrap();
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [".gen"], "locking leaves no file per key");
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
