//! Spare object files: a deleted object's file is kept in `<root>/spare`
//! and rewritten as a later object, instead of being unlinked and a new
//! file created. Rewriting a file overwrites blocks the file system has
//! already allocated and pages the page cache already holds, which a new
//! file must allocate afresh. Measured on this machine kind with 1 MiB
//! writes at QD8 through NBD (`tools/bench-nbd.sh`'s job), where destage
//! bounds the rate: 1,038-1,045 MB/s with spares against 896-962 MB/s
//! without, in alternating runs.
//!
//! Invariants:
//! 1. An object file's length never changes while it is an object, and
//!    moving it to the spares lengthens it by [`SPARE_MARK`] bytes (a
//!    hole, after the rename), so a handle opened earlier, which remembers
//!    the length ([`still_object`]), sees the object gone, as it sees
//!    `nlink == 0` after an unlink. (Nothing else is asked of the file:
//!    links made by others, say a backup's hard links, change nothing.)
//! 2. Readers hold a shared `flock` on every object file they have open
//!    and check, once they hold it, that the file is still the one at its
//!    path ([`open_shared`]); a spare is at no object's path. A spare is
//!    rewritten only under an exclusive `flock` taken without waiting
//!    ([`Spares::claim`]), so a file someone still reads is never
//!    rewritten: it is unlinked instead, and readers keep reading what it
//!    held. A reader that took its lock after a rewrite finds the file no
//!    longer at its path and opens afresh.
//! 3. At most [`MAX_SPARES`] spares of at most [`MAX_SPARE_BYTES`] in all
//!    per store instance; larger objects are unlinked as before. An
//!    instance removes its spares when it is dropped, and the spares of
//!    processes that no longer run are removed the first time an instance
//!    keeps one; removing a spare is always safe (a claim that loses the
//!    race opens a new file).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use nix::fcntl::{Flock, FlockArg};

/// Most spares one store instance keeps. Deletes come in bursts (the
/// chunks a checkpoint found dead) while puts come steadily, so the bound
/// is what one burst leaves for the puts until the next: with 16, 1 MiB
/// writes at QD8 ran out between bursts and created files again (ext4
/// inode allocation ~5% of the server's CPU); with 64, 933-1,097 MB/s
/// against 787-979 in alternating runs.
pub(super) const MAX_SPARES: usize = 64;
/// Most bytes of spares one store instance keeps (an object file larger
/// than this alone is never kept): about 64 default-sized chunk files.
pub(super) const MAX_SPARE_BYTES: u64 = 256 << 20;
/// Name of the spare directory under the root (not a key's name: those
/// end in `.o` or `.d`).
pub(super) const SPARE_DIR: &str = "spare";
/// Opens retried when the file at a path changes under a reader.
const OPEN_TRIES: usize = 64;

/// Distinguishes store instances of one process in spare names.
static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// An object file under a `flock`: shared for a reader, exclusive for a
/// claimed spare (invariant 2).
pub(super) type LockedFile = Flock<File>;

/// Bytes a file grows by as it becomes a spare (invariant 1).
pub(super) const SPARE_MARK: u64 = 4096;

/// Whether a file whose length was `len_at_open` when it was opened as
/// an object, now described by `meta`, still is that object: it has a
/// name and did not become a spare since (invariant 1).
pub(super) fn still_object(len_at_open: u64, meta: &fs::Metadata) -> bool {
    meta.nlink() > 0 && meta.len() == len_at_open
}

/// Open the object file at `path` for reading under a shared lock, once it
/// is the one there (invariant 2); `None` if there is none. `open` opens
/// the path (`Ok(None)`: it declined, and so does this). A file under an
/// exclusive lock (a spare being rewritten, or just put in place and not
/// yet closed by its writer) is waited for when `wait`, which takes at
/// most one put; without `wait` this declines instead.
pub(super) fn open_shared(
    path: &Path,
    open: &mut dyn FnMut(&Path) -> io::Result<Option<File>>,
    wait: bool,
) -> io::Result<Option<LockedFile>> {
    for _ in 0..OPEN_TRIES {
        let Some(file) = open(path)? else {
            return Ok(None);
        };
        let file = match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(f) => f,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) if wait => {
                Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| io::Error::from(e))?
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(e.into()),
        };
        let held = file.metadata()?;
        let at_path = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if held.dev() == at_path.dev() && held.ino() == at_path.ino() {
            return Ok(Some(file));
        }
    }
    Err(io::Error::other(
        "the object file kept changing while it was opened",
    ))
}

/// The spares of one store instance.
#[derive(Debug)]
pub(super) struct Spares {
    dir: PathBuf,
    prefix: String,
    kept: Mutex<Vec<Spare>>,
    next: AtomicU64,
    swept: Once,
}

/// One spare: its path in the spare directory and its size.
#[derive(Debug)]
struct Spare {
    path: PathBuf,
    size: u64,
}

impl Spares {
    /// Spares under `root` (nothing is created until one is kept).
    pub(super) fn new(root: &Path) -> Spares {
        Spares {
            dir: root.join(SPARE_DIR),
            prefix: format!(
                "{}.{}.",
                std::process::id(),
                INSTANCE.fetch_add(1, Ordering::Relaxed)
            ),
            kept: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
            swept: Once::new(),
        }
    }

    /// The spare directory (for its directory fsync).
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Spare>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Move the object file at `object` (`size` bytes, header included)
    /// into the spare directory instead of unlinking it; `Ok(false)` when
    /// there is no room for it (the caller unlinks it). The caller holds
    /// the key's lock and makes the removal durable (directory fsyncs).
    /// Runs under the list's lock, so concurrent deletes never keep more
    /// than the bounds (invariant 3); deletes are off the I/O path.
    pub(super) fn keep(&self, object: &Path, size: u64) -> io::Result<bool> {
        let mut kept = self.lock();
        let bytes: u64 = kept.iter().map(|s| s.size).sum();
        if kept.len() >= MAX_SPARES || bytes + size > MAX_SPARE_BYTES {
            return Ok(false);
        }
        self.swept.call_once(|| sweep_dead(&self.dir));
        crate::private::create_dir_all(&self.dir)?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}{n}", self.prefix));
        fs::rename(object, &path)?;
        // Invariant 1. Should this fail, the file is a spare no handle can
        // tell from its object: unlink it like any delete.
        let marked = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(size + SPARE_MARK));
        if let Err(e) = marked {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        kept.push(Spare { path, size });
        Ok(true)
    }

    /// A spare renamed to `temp`, open for writing under an exclusive lock
    /// (invariant 2), or `None` when no spare is free (each one a reader
    /// still holds is unlinked on the way). Its old bytes are still there:
    /// the caller overwrites them and sets the length.
    pub(super) fn claim(&self, temp: &Path) -> Option<LockedFile> {
        loop {
            let spare = self.lock().pop()?;
            match claim_one(&spare.path, temp) {
                Ok(Some(f)) => return Some(f),
                Ok(None) | Err(_) => {
                    let _ = fs::remove_file(&spare.path);
                }
            }
        }
    }
}

/// Claim one spare for `temp` (see [`Spares::claim`]); `Ok(None)` when a
/// reader holds it.
fn claim_one(spare: &Path, temp: &Path) -> io::Result<Option<LockedFile>> {
    let file = fs::OpenOptions::new().write(true).open(spare)?;
    let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(f) => f,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
        Err((_, e)) => return Err(e.into()),
    };
    fs::rename(spare, temp)?;
    Ok(Some(file))
}

impl Drop for Spares {
    fn drop(&mut self) {
        for s in self.lock().drain(..) {
            let _ = fs::remove_file(&s.path);
        }
    }
}

/// Remove the spares of processes that no longer run (invariant 3). Best
/// effort.
fn sweep_dead(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('.').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if gone {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use bytes::Bytes;

    use super::super::tests::store;
    use super::super::{FsStore, ObjectFile};
    use super::{MAX_SPARES, SPARE_DIR};
    use crate::store::{ObjectStore, PutMode};

    fn ino(s: &FsStore, file: &str) -> u64 {
        std::fs::metadata(s.root().join(file)).expect("stat").ino()
    }

    /// Names in the spare directory (none if it does not exist).
    fn spare_names(s: &FsStore) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(s.root().join(SPARE_DIR)) {
            Ok(rd) => rd
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_deleted_object_file_is_rewritten_as_the_next_one() {
        let (_d, s) = store();
        let big = Bytes::from(vec![7u8; 100 << 10]);
        s.put("c/a", big, PutMode::Create).await.expect("put a");
        let old = ino(&s, "c.d/a.o");
        s.delete("c/a").await.expect("delete a");
        assert_eq!(spare_names(&s).len(), 1);
        s.put("c/b", Bytes::from_static(b"short"), PutMode::Create)
            .await
            .expect("put b");
        assert_eq!(ino(&s, "c.d/b.o"), old, "b was written into a's old file");
        let got = s.get("c/b").await.expect("get b");
        assert_eq!(got.data, &b"short"[..], "exactly b's bytes, none of a's");
        assert_eq!(s.head("c/b").await.expect("head").size, 5);
        assert!(spare_names(&s).is_empty(), "the spare was used up");
        let err = s.get("c/a").await.expect_err("a is gone");
        assert!(err.to_string().contains("not found"), "{err}");
    }

    #[tokio::test]
    async fn a_file_someone_reads_is_never_rewritten() {
        let (_d, s) = store();
        s.put(
            "c/a",
            Bytes::from_static(b"the old object"),
            PutMode::Create,
        )
        .await
        .expect("put a");
        let path = s.root().join("c.d/a.o");
        let old = ino(&s, "c.d/a.o");
        let reader = ObjectFile::open(&path).expect("open").expect("exists");
        s.delete("c/a").await.expect("delete a");
        assert_eq!(
            reader.linked_size().expect("fstat"),
            None,
            "a handle opened before the delete sees the object gone"
        );
        s.put(
            "c/b",
            Bytes::from_static(b"a new object!!"),
            PutMode::Create,
        )
        .await
        .expect("put b");
        assert_ne!(
            ino(&s, "c.d/b.o"),
            old,
            "the file a reader holds is not reused"
        );
        assert_eq!(
            reader.read(&path, 0..reader.size).expect("read"),
            &b"the old object"[..],
            "the reader still reads what it opened"
        );
        assert!(spare_names(&s).is_empty(), "the held spare was unlinked");
        assert_eq!(
            s.get("c/b").await.expect("get b").data,
            &b"a new object!!"[..]
        );
    }

    #[tokio::test]
    async fn another_process_cache_sees_a_spared_object_gone() {
        let (_d, s) = store();
        let other = FsStore::new(s.root());
        s.put("c/a", Bytes::from_static(b"aaaa"), PutMode::Create)
            .await
            .expect("put a");
        let got = other.get_range("c/a", 0..4).await.expect("read a");
        assert_eq!(got, &b"aaaa"[..]);
        s.delete("c/a").await.expect("delete a");
        assert_eq!(spare_names(&s).len(), 1);
        let err = other
            .get_range("c/a", 0..4)
            .await
            .expect_err("its cached file is a spare now");
        assert!(err.to_string().contains("not found"), "{err}");
    }

    #[tokio::test]
    async fn spares_are_bounded_and_removed_with_the_store() {
        let (_d, s) = store();
        let root = s.root().to_path_buf();
        for i in 0..MAX_SPARES + 8 {
            let key = format!("c/{i}");
            s.put(&key, Bytes::from(vec![1u8; 1024]), PutMode::Create)
                .await
                .expect("put");
        }
        for i in 0..MAX_SPARES + 8 {
            s.delete(&format!("c/{i}")).await.expect("delete");
        }
        assert_eq!(spare_names(&s).len(), MAX_SPARES);
        let listed = s.list("").await.expect("list");
        assert!(listed.is_empty(), "spares are not objects: {listed:?}");
        drop(s);
        let s = FsStore::new(root);
        assert!(
            spare_names(&s).is_empty(),
            "dropping the store removed them"
        );
    }

    #[tokio::test]
    async fn spares_of_processes_that_ended_are_swept() {
        let (_d, s) = store();
        let dir = s.root().join(SPARE_DIR);
        crate::private::create_dir_all(&dir).expect("mkdir");
        // Above the largest pid Linux hands out: never a running process.
        let dead = "999999999.0.0";
        let live = format!("{}.999.0", std::process::id());
        for name in [dead, &live] {
            std::fs::write(dir.join(name), b"x").expect("plant");
        }
        s.put("k", Bytes::from_static(b"v"), PutMode::Create)
            .await
            .expect("put");
        s.delete("k").await.expect("delete");
        let names = spare_names(&s);
        assert!(!names.iter().any(|n| n == dead), "{names:?}");
        assert!(names.contains(&live), "a running process's spare stays");
    }
}

#[cfg(test)]
mod open_tests {
    use std::cell::Cell;
    use std::fs::File;
    use std::io::Read;

    use nix::fcntl::{Flock, FlockArg};

    use super::open_shared;

    #[test]
    fn a_reader_holding_a_file_no_longer_at_its_path_opens_afresh() {
        let d = tempfile::tempdir().expect("tempdir");
        let (path, stale) = (d.path().join("a.o"), d.path().join("stale"));
        std::fs::write(&path, b"current").expect("write");
        std::fs::write(&stale, b"rewritten").expect("write");
        let calls = Cell::new(0);
        let mut open = |p: &std::path::Path| {
            calls.set(calls.get() + 1);
            // The first open raced a rewrite: it got the file that left.
            let which = if calls.get() == 1 { stale.as_path() } else { p };
            File::open(which).map(Some)
        };
        let mut f = open_shared(&path, &mut open, true)
            .expect("open")
            .expect("exists");
        let mut got = String::new();
        f.read_to_string(&mut got).expect("read");
        assert_eq!(got, "current");
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn a_file_linked_elsewhere_is_still_its_object() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("a.o");
        std::fs::write(&path, b"x").expect("write");
        // Say, a backup's hard link.
        std::fs::hard_link(&path, d.path().join("backup")).expect("link");
        let mut open = |p: &std::path::Path| match File::open(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            r => r.map(Some),
        };
        assert!(open_shared(&path, &mut open, true).expect("open").is_some());
        let gone = d.path().join("missing.o");
        assert!(open_shared(&gone, &mut open, true).expect("open").is_none());
    }

    #[test]
    fn a_reader_waits_for_a_writer_to_let_go_of_a_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("a.o");
        std::fs::write(&path, b"x").expect("write");
        let writer = Flock::lock(File::open(&path).expect("open"), FlockArg::LockExclusive)
            .expect("exclusive");
        let mut open = |p: &std::path::Path| File::open(p).map(Some);
        assert!(
            open_shared(&path, &mut open, false)
                .expect("open")
                .is_none(),
            "without waiting it declines"
        );
        let reader = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut open = |p: &std::path::Path| File::open(p).map(Some);
                open_shared(&path, &mut open, true).map(|f| f.is_some())
            })
        };
        // Longer than any number of quick retries would last.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!reader.is_finished(), "the reader waits for the writer");
        drop(writer);
        assert!(reader.join().expect("reader").expect("opened"));
    }
}
