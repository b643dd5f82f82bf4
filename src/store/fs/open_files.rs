//! Object files kept open for ranged reads, so a read of a known object is
//! one `fstat` and one `pread` instead of a path walk, an open, a `statx`,
//! a header read and a close.
//!
//! Invariants:
//! 1. An entry is handed out only while its file still has a name: a
//!    reader checks [`ObjectFile::linked_size`] (an `fstat` of the open
//!    descriptor) before it reads. The store replaces an object by
//!    renaming a new file over it and deletes it by unlinking it or
//!    moving it to the spares (invariant 3 of the [store](super)), so
//!    either leaves the old inode with no link or lengthened as a spare
//!    ([`super::spares`] invariant 1), whichever process did it: a read
//!    through the cache sees what a fresh open would have found at that
//!    moment. A cached file is never rewritten as a spare: the cache holds
//!    its shared lock ([`super::spares`] invariant 2).
//! 2. At most `cap` files are open in one cache, and at most
//!    [`OpenFiles::default_cap`] in all caches of the process together
//!    ([`OPEN_IN_PROCESS`]); inserting into a full cache closes its least
//!    recently used file (a scan: inserts follow a miss, which costs an
//!    open anyway), and a file that would exceed the process's bound is
//!    not kept.
//! 3. Entries not used between two sweeps (at least [`SWEEP_EVERY`]
//!    apart) are closed at the second, and this process's own deletes
//!    close theirs at once ([`OpenFiles::forget`]), so an open descriptor
//!    does not keep a deleted object's disk space for long.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::ObjectFile;

/// Least time between two sweeps for idle entries (invariant 3).
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Files held open by all caches of this process (invariant 2).
static OPEN_IN_PROCESS: AtomicUsize = AtomicUsize::new(0);

/// A lookup checks whether a sweep is due once in this many.
const SWEEP_CHECK_PERIOD: u64 = 256;

/// An open object with the path it was opened at (for error messages).
pub(super) struct OpenObject {
    pub(super) file: ObjectFile,
    pub(super) path: PathBuf,
}

struct Entry {
    obj: Arc<OpenObject>,
    /// Value of the use counter at the last lookup that found it.
    used: u64,
}

struct Inner {
    map: HashMap<String, Entry>,
    /// Counts lookups and inserts: the recency of entries.
    uses: u64,
    /// When the last sweep ran, and the use counter then.
    swept_at: Instant,
    swept_uses: u64,
}

/// A bounded map from object key to its open file.
pub(super) struct OpenFiles {
    inner: Mutex<Inner>,
    cap: usize,
}

impl std::fmt::Debug for OpenFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFiles")
            .field("cap", &self.cap)
            .field("open", &self.lock().map.len())
            .finish()
    }
}

impl OpenFiles {
    /// A cache holding at most `cap` open files (0 disables it).
    pub(super) fn new(cap: usize) -> OpenFiles {
        OpenFiles {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                uses: 0,
                swept_at: Instant::now(),
                swept_uses: 0,
            }),
            cap,
        }
    }

    /// The files this process can afford to keep open, in all caches
    /// together: a quarter of its soft limit on open files (as it was at
    /// the first call), between 16 and 1024.
    pub(super) fn default_cap() -> usize {
        static CAP: OnceLock<usize> = OnceLock::new();
        *CAP.get_or_init(Self::cap_from_limit)
    }

    fn cap_from_limit() -> usize {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable `rlimit` for the call.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
        } else {
            1024
        };
        (soft / 4).clamp(16, 1024)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open file of `key`, if cached. The caller checks that it is
    /// still linked before reading (invariant 1).
    pub(super) fn get(&self, key: &str) -> Option<Arc<OpenObject>> {
        if self.cap == 0 {
            return None;
        }
        let mut inner = self.lock();
        inner.uses += 1;
        let uses = inner.uses;
        if uses.is_multiple_of(SWEEP_CHECK_PERIOD) {
            inner.sweep_if_due();
        }
        let entry = inner.map.get_mut(key)?;
        entry.used = uses;
        Some(Arc::clone(&entry.obj))
    }

    /// Keep `obj` as the open file of `key` (replacing any other).
    pub(super) fn insert(&self, key: &str, obj: Arc<OpenObject>) {
        if self.cap == 0 {
            return;
        }
        let mut inner = self.lock();
        inner.uses += 1;
        let used = inner.uses;
        inner.sweep_if_due();
        if let Some(e) = inner.map.get_mut(key) {
            *e = Entry { obj, used };
            return;
        }
        if inner.map.len() >= self.cap
            || OPEN_IN_PROCESS.load(Ordering::Relaxed) >= Self::default_cap()
        {
            inner.evict_one();
        }
        // Reserve a place in the process's bound, or keep nothing.
        let reserved = OPEN_IN_PROCESS.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < Self::default_cap()).then_some(n + 1)
        });
        if reserved.is_ok() {
            inner.map.insert(key.to_string(), Entry { obj, used });
        }
    }

    /// Drop `key`'s entry if it still holds `obj` (found unlinked).
    pub(super) fn forget_stale(&self, key: &str, obj: &Arc<OpenObject>) {
        let mut inner = self.lock();
        if inner.map.get(key).is_some_and(|e| Arc::ptr_eq(&e.obj, obj)) {
            inner.remove(key);
        }
    }

    /// Drop `key`'s entry (its object is being replaced or deleted).
    pub(super) fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Files held open now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Run a sweep now, as if one were due (tests).
    #[cfg(test)]
    pub(super) fn sweep_now(&self) {
        let mut inner = self.lock();
        inner.swept_at = Instant::now() - SWEEP_EVERY;
        inner.sweep_if_due();
    }
}

impl Inner {
    /// Close the entries not used since the last sweep, if that was at
    /// least [`SWEEP_EVERY`] ago (invariant 3).
    fn sweep_if_due(&mut self) {
        if self.swept_at.elapsed() < SWEEP_EVERY {
            return;
        }
        let since = self.swept_uses;
        let before = self.map.len();
        self.map.retain(|_, e| e.used > since);
        OPEN_IN_PROCESS.fetch_sub(before - self.map.len(), Ordering::AcqRel);
        self.swept_at = Instant::now();
        self.swept_uses = self.uses;
    }

    /// Close the least recently used entry (invariant 2).
    fn evict_one(&mut self) {
        let victim = self
            .map
            .iter()
            .min_by_key(|(_, e)| e.used)
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            self.remove(&k);
        }
    }

    fn remove(&mut self, key: &str) {
        if self.map.remove(key).is_some() {
            OPEN_IN_PROCESS.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for OpenFiles {
    fn drop(&mut self) {
        let n = self.lock().map.len();
        OPEN_IN_PROCESS.fetch_sub(n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::FsStore;
    use crate::store::{ObjectStore, PutMode, StoreError};

    async fn put(s: &FsStore, key: &str, data: &'static [u8]) {
        s.put(key, Bytes::from_static(data), PutMode::Overwrite)
            .await
            .expect("put");
    }

    async fn read(s: &FsStore, key: &str) -> Result<Bytes, StoreError> {
        s.get_range(key, 0..4).await
    }

    fn cached(s: &FsStore, key: &str) -> bool {
        s.open.lock().map.contains_key(key)
    }

    #[tokio::test]
    async fn an_object_replaced_by_another_process_is_read_afresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reader = FsStore::new(dir.path());
        let other = FsStore::new(dir.path());
        put(&reader, "v/chunks/a", b"old!").await;
        assert_eq!(read(&reader, "v/chunks/a").await.expect("read"), "old!");
        assert!(cached(&reader, "v/chunks/a"));
        put(&other, "v/chunks/a", b"new!").await;
        assert_eq!(read(&reader, "v/chunks/a").await.expect("read"), "new!");
    }

    #[tokio::test]
    async fn an_object_deleted_by_another_process_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reader = FsStore::new(dir.path());
        let other = FsStore::new(dir.path());
        put(&reader, "k", b"data").await;
        read(&reader, "k").await.expect("read");
        other.delete("k").await.expect("delete");
        let err = read(&reader, "k").await.expect_err("deleted");
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        assert!(!cached(&reader, "k"), "the unlinked file stays open");
    }

    #[tokio::test]
    async fn a_delete_closes_the_cached_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStore::new(dir.path());
        put(&s, "k", b"data").await;
        read(&s, "k").await.expect("read");
        assert_eq!(s.open.len(), 1);
        s.delete("k").await.expect("delete");
        assert_eq!(s.open.len(), 0);
    }

    #[tokio::test]
    async fn a_grown_object_is_read_at_its_new_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStore::new(dir.path());
        put(&s, "k", b"data").await;
        read(&s, "k").await.expect("read");
        // Replaced in place by hand (not through the store): same inode.
        let path = dir.path().join("k.o");
        let mut bytes = std::fs::read(&path).expect("read file");
        bytes.extend_from_slice(b"more");
        std::fs::write(&path, &bytes).expect("write file");
        assert_eq!(s.get_range("k", 4..8).await.expect("read"), "more");
        let err = s.get_range("k", 4..9).await.expect_err("past the end");
        assert!(!matches!(err, StoreError::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_least_recently_used_file_is_closed_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStore::with_open_cap(dir.path(), 2);
        for k in ["a", "b", "c"] {
            put(&s, k, b"data").await;
        }
        read(&s, "a").await.expect("read");
        read(&s, "b").await.expect("read");
        read(&s, "a").await.expect("read");
        read(&s, "c").await.expect("read");
        assert_eq!(s.open.len(), 2);
        assert!(cached(&s, "a") && cached(&s, "c") && !cached(&s, "b"));
        // A closed file is opened again on its next read.
        assert_eq!(read(&s, "b").await.expect("read"), "data");
    }

    #[tokio::test]
    async fn files_idle_for_a_whole_sweep_are_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStore::new(dir.path());
        put(&s, "idle", b"data").await;
        put(&s, "busy", b"data").await;
        read(&s, "idle").await.expect("read");
        read(&s, "busy").await.expect("read");
        // Both were used since the last sweep: both stay.
        s.open.sweep_now();
        assert_eq!(s.open.len(), 2);
        read(&s, "busy").await.expect("read");
        s.open.sweep_now();
        assert!(cached(&s, "busy") && !cached(&s, "idle"));
    }

    #[tokio::test]
    async fn a_cache_of_size_zero_keeps_nothing_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStore::with_open_cap(dir.path(), 0);
        put(&s, "k", b"data").await;
        assert_eq!(read(&s, "k").await.expect("read"), "data");
        assert_eq!(s.open.len(), 0);
    }
}
