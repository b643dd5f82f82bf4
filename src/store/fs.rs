//! Local-directory store: the embedded default backend.
//!
//! # Layout
//! Key `a/b/c` is the file `<root>/a.d/b.d/c.o`. Directory names end in `.d`
//! and object files in `.o`, so the mapping is one-to-one and keys `a/b` and
//! `a/b/c` can coexist as on S3. Beside each object file, while it is being
//! replaced, is `c.o.tmp`; each directory holds its generation counter
//! `.gen`, whose bytes also carry the key locks; listing ignores everything
//! that does not end in `.o` or `.d` (`c.lock` files that older releases
//! left are removed with their objects). Deleted objects' files wait in
//! `<root>/spare` to be rewritten as new objects ([`spares`]).
//!
//! # Object file
//! A 16-byte header (magic `SHALEOB1`, generation as u64 little-endian), then
//! the object's bytes. The object's [`Version`] is its generation in decimal.
//!
//! # Invariants
//! 1. Every `put` and `delete` of a key holds the key's exclusive lock (a
//!    byte-range lock on its directory's `.gen`, [`locks::KeyLock`]) while
//!    it checks the precondition and replaces the object, so Create and
//!    IfMatch are atomic across threads and processes. Reads take no key
//!    lock: they rely on rule 3 (and hold a shared `flock` on the object
//!    file itself, so it is not rewritten as a spare under them). Locking
//!    creates no file, so deleted keys leave nothing behind but their
//!    directories. Processes of a release that locked `c.lock` files
//!    instead must not share the store with this one.
//! 2. Generations of a key strictly increase over its whole life, including
//!    across delete and re-create: each directory's counter file `.gen`
//!    records at least the highest generation handed out in it; a write takes
//!    `max(counter, current object's) + 1`, and `delete` makes the counter
//!    durably at least the object's generation before unlinking it (see
//!    `locks::DirCounter::raise_durably`; a sync already made covers later
//!    deletes of older objects, so deletes need not each fsync).
//! 3. Objects are replaced whole: the new bytes go to a temporary file in the
//!    same directory (a new file, or a deleted object's file kept as a spare
//!    and rewritten, see [`spares`]), which is fsynced, renamed over the
//!    object, and then the directory is fsynced. A delete unlinks the
//!    object's file or moves it to the spares. A put or delete returns only
//!    after a directory fsync that started after its rename or unlink;
//!    concurrent ones share such fsyncs (group commit, [`dirsync`]). A
//!    reader opens the file once and reads header and data through that one
//!    descriptor, so it sees exactly one version.
//! 4. All file I/O runs on tokio's blocking pool, never on the reactor,
//!    except a ranged read that needs no disk (path, header and data in
//!    the caches), which is served on the caller's thread.
//! 5. Ranged reads ([`ObjectStore::get_range_placed`]) go through files
//!    kept open ([`open_files`]), each checked to still have its name
//!    before it is read; whole reads, heads and listings open afresh.
//! 6. A body marked streamed ([`Body::streamed`]) is written to its
//!    temporary file around the page cache ([`around`]) where the file
//!    system allows; every other object goes through the page cache, which
//!    then serves reads of it.

use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use self::dirsync::DirSyncs;
use self::locks::{DirCounter, KeyLock, SyncedCounters};
use self::open_files::{OpenFiles, OpenObject};
use self::spares::{LockedFile, Spares};
use super::aligned::PooledBuf;
use super::{
    check_range, validate_key, validate_prefix, Body, Object, ObjectMeta, ObjectStore, PutMode,
    StoreError, StoreResult, Version,
};

mod around;
mod dirsync;
mod locks;
mod open_files;
mod spares;

const MAGIC: &[u8; 8] = b"SHALEOB1";
const HEADER_LEN: u64 = 16;
const OBJECT_SUFFIX: &str = ".o";
const DIR_SUFFIX: &str = ".d";

/// Distinguishes the probe files of concurrent `ensure_root` calls.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Objects as files under a root directory (created on first write).
#[derive(Debug, Clone)]
pub struct FsStore {
    root: Arc<PathBuf>,
    syncs: Arc<DirSyncs>,
    synced_counters: Arc<SyncedCounters>,
    open: Arc<OpenFiles>,
    spares: Arc<Spares>,
}

impl FsStore {
    /// A store rooted at `root`. Touches nothing until the first operation.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        FsStore {
            spares: Arc::new(Spares::new(&root)),
            root: Arc::new(root),
            syncs: Arc::new(DirSyncs::new()),
            synced_counters: Arc::default(),
            open: Arc::new(OpenFiles::new(OpenFiles::default_cap())),
        }
    }

    /// A store keeping at most `cap` files open for ranged reads.
    #[cfg(test)]
    fn with_open_cap(root: impl Into<PathBuf>, cap: usize) -> Self {
        FsStore {
            open: Arc::new(OpenFiles::new(cap)),
            ..FsStore::new(root)
        }
    }

    /// The open file of `key` for a ranged read, with its current object
    /// size: from the cache if its file is still linked, else opened with
    /// `open` (`Ok(None)`: `open` declined) and cached.
    fn open_for_read(
        &self,
        key: &str,
        open: impl FnOnce(&Path) -> StoreResult<Option<ObjectFile>>,
    ) -> StoreResult<Option<(Arc<OpenObject>, u64)>> {
        if let Some(obj) = self.open.get(key) {
            match obj.file.linked_size() {
                Ok(Some(size)) => return Ok(Some((obj, size))),
                // Replaced, deleted or unreadable: open afresh.
                _ => self.open.forget_stale(key, &obj),
            }
        }
        let p = key_paths(&self.root, key)?;
        let Some(file) = open(&p.object)? else {
            return Ok(None);
        };
        let size = file.size;
        let obj = Arc::new(OpenObject {
            file,
            path: p.object,
        });
        self.open.insert(key, Arc::clone(&obj));
        Ok(Some((obj, size)))
    }

    /// Bytes `range` of object `key` if they can be read without waiting
    /// for the disk (path, header and data all cached); `None` otherwise,
    /// also on any error, which the blocking read then reports.
    fn cached_range(&self, key: &str, range: &Range<u64>, page_at: u64) -> Option<Bytes> {
        let (obj, size) = self
            .open_for_read(key, |path| Ok(ObjectFile::open_cached(path)))
            .ok()??;
        check_range(key, range, size).ok()?;
        obj.file.read_cached(range.clone(), page_at)
    }

    /// The directory holding the objects.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Create the root directory if missing and check that it is a writable
    /// directory, so configuration mistakes surface at startup.
    pub async fn ensure_root(&self) -> StoreResult<()> {
        self.blocking(|root| {
            crate::private::create_dir_all(root)
                .map_err(|e| io_err("cannot create store directory", root, e))?;
            let probe = root.join(format!(
                "probe.{}.{}.tmp",
                std::process::id(),
                TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            crate::private::open_options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&probe)
                .map_err(|e| io_err("store directory is not writable", root, e))?;
            fs::remove_file(&probe).map_err(|e| io_err("cannot remove", &probe, e))
        })
        .await
    }

    async fn blocking<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> StoreResult<T> + Send + 'static,
    {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || f(&root))
            .await
            .map_err(|e| StoreError::Permanent(format!("fs store worker failed: {e}")))?
    }
}

fn io_err(what: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError::Permanent(format!("{what} {}: {e}", path.display()))
}

fn not_found(key: &str) -> StoreError {
    StoreError::NotFound {
        key: key.to_string(),
    }
}

/// Where one key's files live.
struct KeyPaths {
    dir: PathBuf,
    object: PathBuf,
    /// The lock file of releases before [`KeyLock`] (removed on delete).
    legacy_lock: PathBuf,
    last: String,
}

fn key_paths(root: &Path, key: &str) -> StoreResult<KeyPaths> {
    validate_key(key)?;
    let mut segments: Vec<&str> = key.split('/').collect();
    let last = segments.pop().ok_or_else(|| StoreError::InvalidKey {
        key: key.to_string(),
        reason: "empty".to_string(),
    })?;
    let mut dir = root.to_path_buf();
    for s in segments {
        dir.push(format!("{s}{DIR_SUFFIX}"));
    }
    Ok(KeyPaths {
        object: dir.join(format!("{last}{OBJECT_SUFFIX}")),
        legacy_lock: dir.join(format!("{last}.lock")),
        last: last.to_string(),
        dir,
    })
}

/// An open object file with its header decoded, under a shared lock
/// (invariant 2 of [`spares`]).
struct ObjectFile {
    file: LockedFile,
    generation: u64,
    size: u64,
}

impl ObjectFile {
    /// Open the object at `path`; `None` if it does not exist.
    fn open(path: &Path) -> StoreResult<Option<ObjectFile>> {
        let mut open = |path: &Path| match File::open(path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        let file = match spares::open_shared(path, &mut open, true) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(e) => return Err(io_err("cannot open", path, e)),
        };
        let mut blocking = |f: &File, buf: &mut [u8]| f.read_exact_at(buf, 0).map(|()| true);
        ObjectFile::with_header(file, path, &mut blocking)
    }

    /// [`ObjectFile::open`] only if neither the path lookup nor the header
    /// read needs the disk; `None` otherwise, or on any error (the
    /// blocking open then reports it).
    fn open_cached(path: &Path) -> Option<ObjectFile> {
        let mut open = |p: &Path| Ok(crate::nowait::open_cached(p));
        let file = spares::open_shared(path, &mut open, false).ok()??;
        let mut cached = |f: &File, buf: &mut [u8]| crate::nowait::read_cached_at(f, buf, 0);
        ObjectFile::with_header(file, path, &mut cached)
            .ok()
            .flatten()
    }

    /// Check the header of the object open as `file`, read with
    /// `read_header` (`Ok(false)`: it declined, and so does this with
    /// `None`).
    fn with_header(
        file: LockedFile,
        path: &Path,
        read_header: &mut dyn FnMut(&File, &mut [u8]) -> io::Result<bool>,
    ) -> StoreResult<Option<ObjectFile>> {
        let len = file
            .metadata()
            .map_err(|e| io_err("cannot stat", path, e))?
            .len();
        let mut header = [0u8; HEADER_LEN as usize];
        if len < HEADER_LEN {
            return Err(corrupt(path, "shorter than its header"));
        }
        if !read_header(&file, &mut header).map_err(|e| io_err("cannot read", path, e))? {
            return Ok(None);
        }
        if &header[..8] != MAGIC {
            return Err(corrupt(path, "bad magic"));
        }
        let mut generation = [0u8; 8];
        generation.copy_from_slice(&header[8..]);
        Ok(Some(ObjectFile {
            file,
            generation: u64::from_le_bytes(generation),
            size: len - HEADER_LEN,
        }))
    }

    /// The object's size, or `None` once its file is no longer the object
    /// it was opened as (it was replaced or deleted since: no name left,
    /// or moved to the spares, invariant 1 of [`spares`]).
    fn linked_size(&self) -> io::Result<Option<u64>> {
        let meta = self.file.metadata()?;
        Ok(spares::still_object(HEADER_LEN + self.size, &meta).then_some(self.size))
    }

    fn version(&self) -> Version {
        Version(self.generation.to_string())
    }

    fn read(&self, path: &Path, range: Range<u64>) -> StoreResult<Bytes> {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.file
            .read_exact_at(&mut buf, HEADER_LEN + range.start)
            .map_err(|e| io_err("cannot read", path, e))?;
        Ok(Bytes::from(buf))
    }

    /// [`ObjectFile::read`] into a pooled page-aligned buffer with object
    /// offset `page_at` on a page boundary (see
    /// [`ObjectStore::get_range_placed`]).
    fn read_placed(&self, path: &Path, range: Range<u64>, page_at: u64) -> StoreResult<Bytes> {
        let mut buf = placed(&range, page_at);
        self.file
            .read_exact_at(buf.bytes_mut(), HEADER_LEN + range.start)
            .map_err(|e| io_err("cannot read", path, e))?;
        Ok(buf.freeze())
    }

    /// [`ObjectFile::read_placed`] only if the page cache holds every byte.
    fn read_cached(&self, range: Range<u64>, page_at: u64) -> Option<Bytes> {
        let mut buf = placed(&range, page_at);
        match crate::nowait::read_cached_at(&self.file, buf.bytes_mut(), HEADER_LEN + range.start) {
            Ok(true) => Some(buf.freeze()),
            _ => None,
        }
    }
}

/// A pooled buffer for the bytes of `range`, placed so that object offset
/// `page_at` lies on a page boundary (filled whole by its reader before it
/// is frozen: [`PooledBuf`] invariant 2).
fn placed(range: &Range<u64>, page_at: u64) -> PooledBuf {
    let len = (range.end - range.start) as usize;
    PooledBuf::take_placed(len, PooledBuf::lead_for(range.start, page_at))
}

fn corrupt(path: &Path, why: &str) -> StoreError {
    StoreError::Permanent(format!("corrupt object file {}: {why}", path.display()))
}

fn fsync_dir(syncs: &DirSyncs, dir: &Path) -> StoreResult<()> {
    syncs
        .sync(dir)
        .map_err(|e| io_err("cannot fsync directory", dir, e))
}

/// Create `dir` and its missing ancestors below `root` (and `root` itself),
/// fsyncing each parent that gained an entry so the new path is durable.
fn make_dirs(syncs: &DirSyncs, root: &Path, dir: &Path) -> StoreResult<()> {
    if dir.is_dir() {
        return Ok(());
    }
    crate::private::create_dir_all(root)
        .map_err(|e| io_err("cannot create store directory", root, e))?;
    let rel = dir
        .strip_prefix(root)
        .map_err(|_| StoreError::Permanent(format!("{} is outside the store", dir.display())))?;
    let mut current = root.to_path_buf();
    for component in rel.components() {
        let parent = current.clone();
        current.push(component);
        match crate::private::create_new_dir(&current) {
            Ok(()) => fsync_dir(syncs, &parent)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("cannot create directory", &current, e)),
        }
    }
    Ok(())
}

fn check_precondition(key: &str, mode: &PutMode, current: Option<&ObjectFile>) -> StoreResult<()> {
    match (mode, current) {
        (PutMode::Create, Some(_)) => Err(StoreError::AlreadyExists {
            key: key.to_string(),
        }),
        (PutMode::IfMatch(want), cur) if cur.map(ObjectFile::version).as_ref() != Some(want) => {
            Err(StoreError::PreconditionFailed {
                key: key.to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// Write `data` with `generation` to the key's temporary file, fsync it and
/// rename it over the object, then fsync the directory. The caller holds the
/// key lock, so no live writer uses the temporary file: one left by a crashed
/// writer is simply truncated and reused.
fn replace_object(
    syncs: &DirSyncs,
    spares: &Spares,
    p: &KeyPaths,
    generation: u64,
    data: &Body,
) -> StoreResult<()> {
    let temp = p.dir.join(format!("{}{OBJECT_SUFFIX}.tmp", p.last));
    let write = || -> io::Result<()> {
        // A spare keeps its exclusive lock until it is in place and closed
        // (invariant 2 of `spares`); it still holds its old bytes, so its
        // length is set once the new ones are written.
        let spare = spares.claim(&temp);
        let fresh;
        let f: &File = match &spare {
            Some(f) => f,
            None => {
                fresh = crate::private::open_options()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&temp)?;
                &fresh
            }
        };
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&generation.to_le_bytes());
        if !(data.streamed() && around::write_around(f, &header, data.parts())?) {
            f.write_all_at(&header, 0)?;
            // In pieces: one big write to a new file is slow on some VMs
            // (see `crate::pieces`); gathered from the body's parts.
            crate::pieces::write_parts_at(f, data.parts(), HEADER_LEN)?;
            if spare.is_some() {
                f.set_len(HEADER_LEN + data.len() as u64)?;
            }
        }
        f.sync_all()?;
        fs::rename(&temp, &p.object)
    };
    if let Err(e) = write() {
        // Best effort: a leftover temp file is ignored by list and get.
        let _ = fs::remove_file(&temp);
        return Err(io_err("cannot write object", &p.object, e));
    }
    fsync_dir(syncs, &p.dir)
}

fn put_blocking(
    syncs: &DirSyncs,
    spares: &Spares,
    root: &Path,
    key: &str,
    data: Body,
    mode: PutMode,
) -> StoreResult<Version> {
    let p = key_paths(root, key)?;
    make_dirs(syncs, root, &p.dir)?;
    let lock = KeyLock::acquire(&p.dir, &p.last)?;
    let current = ObjectFile::open(&p.object)?;
    check_precondition(key, &mode, current.as_ref())?;
    let generation = {
        let counter = DirCounter::lock(&p.dir)?;
        let highest = counter.read()?.max(current.map_or(0, |c| c.generation));
        let next = highest
            .checked_add(1)
            .ok_or_else(|| StoreError::Permanent(format!("generation overflow on {key}")))?;
        counter.write(next)?;
        next
    };
    replace_object(syncs, spares, &p, generation, &data)?;
    drop(lock);
    Ok(Version(generation.to_string()))
}

fn delete_blocking(
    syncs: &DirSyncs,
    spares: &Spares,
    synced: &SyncedCounters,
    root: &Path,
    key: &str,
) -> StoreResult<()> {
    let p = key_paths(root, key)?;
    if !p.object.exists() {
        return Ok(());
    }
    let lock = KeyLock::acquire(&p.dir, &p.last)?;
    if let Some(current) = ObjectFile::open(&p.object)? {
        DirCounter::raise_durably(&p.dir, current.generation, synced)?;
        // Kept as a spare where there is room (and the move works), else
        // unlinked; either way its name is gone once the directory syncs.
        let kept = spares
            .keep(&p.object, HEADER_LEN + current.size)
            .unwrap_or_else(|e| {
                log::debug!("keeping {} as a spare: {e}", p.object.display());
                false
            });
        if kept {
            fsync_dir(syncs, spares.dir())?;
        } else {
            match fs::remove_file(&p.object) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot delete", &p.object, e)),
            }
        }
    }
    match fs::remove_file(&p.legacy_lock) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot remove lock file", &p.legacy_lock, e)),
    }
    drop(lock);
    fsync_dir(syncs, &p.dir)
}

/// Collect objects under `dir` (whose keys start with `key_prefix`) whose
/// first segment starts with `partial`.
fn walk(dir: &Path, key_prefix: &str, partial: &str, out: &mut Vec<ObjectMeta>) -> StoreResult<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cannot list", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err("cannot list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(segment) = name.strip_suffix(OBJECT_SUFFIX) {
            if !segment.starts_with(partial) {
                continue;
            }
            let path = entry.path();
            // Deleted since readdir: not part of the listing.
            if let Some(obj) = ObjectFile::open(&path)? {
                out.push(ObjectMeta {
                    key: format!("{key_prefix}{segment}"),
                    size: obj.size,
                    version: obj.version(),
                });
            }
        } else if let Some(segment) = name.strip_suffix(DIR_SUFFIX) {
            if segment.starts_with(partial) {
                walk(&entry.path(), &format!("{key_prefix}{segment}/"), "", out)?;
            }
        }
    }
    Ok(())
}

fn list_blocking(root: &Path, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
    validate_prefix(prefix)?;
    let (dir_part, partial) = match prefix.rfind('/') {
        Some(i) => (&prefix[..i], &prefix[i + 1..]),
        None => ("", prefix),
    };
    let mut dir = root.to_path_buf();
    let mut key_prefix = String::new();
    if !dir_part.is_empty() {
        for s in dir_part.split('/') {
            dir.push(format!("{s}{DIR_SUFFIX}"));
        }
        key_prefix = format!("{dir_part}/");
    }
    let mut out = Vec::new();
    walk(&dir, &key_prefix, partial, &mut out)?;
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

fn open_existing(root: &Path, key: &str) -> StoreResult<(ObjectFile, PathBuf)> {
    let p = key_paths(root, key)?;
    let obj = ObjectFile::open(&p.object)?.ok_or_else(|| not_found(key))?;
    Ok((obj, p.object))
}

/// [`ObjectStore::puts_in_flight`] of a local directory: every put is a
/// file written and synced on the same disk, so more in flight only queue
/// there while each holds a whole chunk in memory. Measured with 1 MiB
/// writes at QD8 (`tools/bench-nbd.sh`'s job, the WAL writing through the
/// page cache): 4 puts in flight ran at 0.95x the rate of 8 with a peak
/// RSS of 121 MiB instead of 149 MiB.
pub const PUTS_IN_FLIGHT: usize = 4;

#[async_trait]
impl ObjectStore for FsStore {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        let key = key.to_string();
        self.blocking(move |root| {
            let (obj, path) = open_existing(root, &key)?;
            Ok(Object {
                data: obj.read(&path, 0..obj.size)?,
                version: obj.version(),
            })
        })
        .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let page_at = range.start;
        self.get_range_placed(key, range, page_at).await
    }

    async fn get_range_placed(
        &self,
        key: &str,
        range: Range<u64>,
        page_at: u64,
    ) -> StoreResult<Bytes> {
        // Served on this thread when nothing needs the disk (no handoff to
        // the blocking pool); otherwise read there.
        if let Some(data) = self.cached_range(key, &range, page_at) {
            return Ok(data);
        }
        let key = key.to_string();
        let store = self.clone();
        self.blocking(move |_| {
            let (obj, size) = store
                .open_for_read(&key, ObjectFile::open)?
                .ok_or_else(|| not_found(&key))?;
            check_range(&key, &range, size)?;
            obj.file.read_placed(&obj.path, range, page_at)
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        self.put_body(key, Body::from(data), mode).await
    }

    /// The parts are written from where they are (no joining copy).
    async fn put_body(&self, key: &str, body: Body, mode: PutMode) -> StoreResult<Version> {
        let key = key.to_string();
        let (syncs, spares) = (self.syncs.clone(), self.spares.clone());
        let open = Arc::clone(&self.open);
        self.blocking(move |root| {
            let put = put_blocking(&syncs, &spares, root, &key, body, mode);
            // Whatever happened, a cached file of the key may be the old one.
            open.forget(&key);
            put
        })
        .await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let key = key.to_string();
        self.blocking(move |root| {
            let (obj, _) = open_existing(root, &key)?;
            Ok(ObjectMeta {
                size: obj.size,
                version: obj.version(),
                key,
            })
        })
        .await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        let prefix = prefix.to_string();
        self.blocking(move |root| list_blocking(root, &prefix))
            .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let key = key.to_string();
        let (syncs, synced) = (self.syncs.clone(), self.synced_counters.clone());
        let (open, spares) = (Arc::clone(&self.open), self.spares.clone());
        self.blocking(move |root| {
            let deleted = delete_blocking(&syncs, &spares, &synced, root, &key);
            // Close it now: an open file keeps a deleted object's space.
            open.forget(&key);
            deleted
        })
        .await
    }

    fn puts_in_flight(&self) -> usize {
        PUTS_IN_FLIGHT
    }

    fn writes_parts(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn store() -> (tempfile::TempDir, FsStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FsStore::new(dir.path().join("objects"));
        (dir, s)
    }

    #[tokio::test]
    async fn key_and_its_children_coexist() {
        let (_d, s) = store();
        s.put("a/b", Bytes::from_static(b"parent"), PutMode::Create)
            .await
            .expect("put a/b");
        s.put("a/b/c", Bytes::from_static(b"child"), PutMode::Create)
            .await
            .expect("put a/b/c");
        assert_eq!(s.get("a/b").await.expect("get").data, &b"parent"[..]);
        assert_eq!(s.get("a/b/c").await.expect("get").data, &b"child"[..]);
        let keys: Vec<String> = s
            .list("a/")
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["a/b", "a/b/c"]);
    }

    #[tokio::test]
    async fn segments_that_look_like_internal_names_are_plain_keys() {
        let (_d, s) = store();
        let keys = [
            ".gen", "a", "a.d", "a.lock", "a.o", "a.o.tmp", "a/.gen", "a/b", "a.d/b",
        ];
        for k in keys {
            s.put(k, Bytes::copy_from_slice(k.as_bytes()), PutMode::Create)
                .await
                .unwrap_or_else(|e| panic!("put {k}: {e}"));
        }
        for k in keys {
            assert_eq!(s.get(k).await.expect("get").data, k.as_bytes());
        }
        let listed: Vec<String> = s
            .list("")
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.key)
            .collect();
        let mut sorted = keys.map(String::from).to_vec();
        sorted.sort();
        assert_eq!(listed, sorted);
        for k in keys {
            s.delete(k).await.expect("delete");
        }
        assert!(s.list("").await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn generation_survives_delete_and_recreate() {
        let (_d, s) = store();
        let v1 = s
            .put("k", Bytes::from_static(b"1"), PutMode::Create)
            .await
            .expect("put");
        s.delete("k").await.expect("delete");
        let v2 = s
            .put("k", Bytes::from_static(b"1"), PutMode::Create)
            .await
            .expect("re-create");
        assert_ne!(v1, v2);
        let stale = s
            .put("k", Bytes::from_static(b"2"), PutMode::IfMatch(v1))
            .await;
        assert!(
            matches!(stale, Err(StoreError::PreconditionFailed { .. })),
            "{stale:?}"
        );
    }

    #[tokio::test]
    async fn deleted_keys_leave_no_files_behind() {
        let (_d, s) = store();
        for i in 0..20 {
            let key = format!("chunks/c{i}");
            s.put(&key, Bytes::from_static(b"x"), PutMode::Create)
                .await
                .expect("put");
            s.delete(&key).await.expect("delete");
        }
        let err = s
            .put(
                "chunks/never",
                Bytes::from_static(b"x"),
                PutMode::IfMatch(Version("1".into())),
            )
            .await
            .expect_err("missing key");
        assert!(
            matches!(err, StoreError::PreconditionFailed { .. }),
            "{err:?}"
        );
        let mut names: Vec<String> = std::fs::read_dir(s.root().join("chunks.d"))
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".gen"], "only the directory's counter remains");
    }

    #[tokio::test]
    async fn leftover_temp_and_lock_files_are_not_listed() {
        let (_d, s) = store();
        s.put("x/y", Bytes::from_static(b"data"), PutMode::Overwrite)
            .await
            .expect("put");
        std::fs::write(s.root().join("x.d").join("z.o.tmp"), b"junk").expect("junk");
        let listed = s.list("").await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, "x/y");
        assert_eq!(listed[0].size, 4);
    }

    /// A store written by an older release holds `<key>.lock` files: they
    /// hold up nothing (this release locks in `.gen`) and go with their
    /// objects.
    #[tokio::test]
    async fn an_older_releases_lock_file_goes_with_its_object() {
        let (_d, s) = store();
        s.put("x/k", Bytes::from_static(b"old"), PutMode::Create)
            .await
            .expect("put");
        let legacy = s.root().join("x.d").join("k.lock");
        std::fs::write(&legacy, b"").expect("plant");
        let v = s.get("x/k").await.expect("get").version;
        s.put("x/k", Bytes::from_static(b"new"), PutMode::IfMatch(v))
            .await
            .expect("put beside an old lock file");
        s.delete("x/k").await.expect("delete");
        assert!(!legacy.exists(), "the old lock file went with its object");
        assert!(s.list("").await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn temp_file_left_by_a_crashed_writer_is_reused() {
        let (_d, s) = store();
        s.put("k", Bytes::from_static(b"old"), PutMode::Create)
            .await
            .expect("put");
        let temp = s.root().join("k.o.tmp");
        std::fs::write(&temp, b"half-written garbage from a crash").expect("plant");
        let v = s.get("k").await.expect("get").version;
        s.put("k", Bytes::from_static(b"new"), PutMode::IfMatch(v))
            .await
            .expect("put over a stale temp file");
        assert_eq!(s.get("k").await.expect("get").data, &b"new"[..]);
        assert!(!temp.exists(), "the temp file was renamed into place");
    }

    #[tokio::test]
    async fn corrupt_object_file_is_a_clear_error() {
        let (_d, s) = store();
        s.put("k", Bytes::from_static(b"data"), PutMode::Overwrite)
            .await
            .expect("put");
        std::fs::write(s.root().join("k.o"), b"garbage-garbage-garbage").expect("overwrite");
        let err = s
            .get("k")
            .await
            .expect_err("corrupt file must not read back");
        assert!(err.to_string().contains("bad magic"), "{err}");
    }

    #[tokio::test]
    async fn ensure_root_reports_unusable_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"").expect("file");
        let err = FsStore::new(&file)
            .ensure_root()
            .await
            .expect_err("must fail");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
        FsStore::new(dir.path().join("new"))
            .ensure_root()
            .await
            .expect("creates root");
    }
}
