//! Local read cache of chunk data, kept across restarts: a data file cut
//! into fixed slots and an index file with one record per slot (see
//! [`record`]), in a private directory (0700, files 0600). Eviction is
//! S3-FIFO (see [`policy`]), so one large sequential read cannot flush the
//! windows that are read again and again.
//!
//! Invariants:
//! 1. A slot holds [`SLOT`] bytes (the last window of a chunk may be
//!    shorter) of one chunk's data area, starting at a `SLOT`-aligned
//!    offset, named by a [`WindowId`]: the chunk `(volume, seq, epoch)`,
//!    the window index and a tag hashing the chunk's data-area position,
//!    its block-CRC table's CRC and the window index. A chunk object key names one object for
//!    the life of the store (create-only puts; epochs never repeat; a seq
//!    is never reused within an epoch), so an entry can only ever match the
//!    chunk it was read from; the tag is a second guard that makes an
//!    entry of any other object a miss even if that ever failed. A deleted
//!    chunk is never named by a map again, so its entries are never looked
//!    up; they age out.
//! 2. A slot is filled in two steps: [`Cache::reserve`] takes it for a
//!    window (pending: lookups miss but count their use; it cannot be
//!    evicted), then [`Cache::fill`] writes it (see [`direct`]) or
//!    [`Cache::abandon`] frees it. Filling a slot writes, in this order: a zero record (the slot is
//!    free on disk), the data, the record. So after a crash of the process
//!    (the page cache survives) a record always describes the data beside
//!    it; after a power loss it may not, which invariant 3 covers.
//! 3. The cache never vouches for data: each entry keeps its window's
//!    block CRCs (in its index record, under the record's CRC, copied
//!    from a chunk CRC table checked against the chunk's table CRC, so
//!    they need no store access after a restart); callers verify what
//!    they read against them ([`Hit::crcs`]) and treat a mismatch as a miss,
//!    calling [`Cache::discard`] so the window is refetched (a slot may
//!    also be reused while it is being read; `discard` then does nothing).
//! 4. Opening never fails because of what the files hold: an unreadable,
//!    foreign or damaged index header starts the cache cold (with a
//!    warning); a damaged record frees its slot. Opening reads only the
//!    index file, never the data.
//! 5. Index memory is bounded: a fixed number of bytes per slot
//!    ([`Cache::index_bytes`]).
//! 6. [`Cache::close`] ends this cache's use of the directory: it waits
//!    for reservations to be filled or abandoned (at most [`FILL_WAIT`])
//!    and for file accesses in progress, releases the directory lock, and
//!    from then on every `get` misses and every `put` / `reserve` /
//!    `discard` does nothing. So a
//!    volume reopened right after its close finds the cache free even while
//!    the closed volume is still referenced (a request in flight, a
//!    background task ending, a readahead GET still running).
//! 7. Lock order: the directory guard (the read lock `Cache::files`
//!    takes) before the index mutex, on every path. `close` takes the
//!    write lock, and while it waits no new reader gets the guard: a path
//!    holding the index while it asked for the guard would wait for
//!    `close`, which waits for a reader that may be waiting for the index.

mod direct;
mod policy;
mod record;

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use policy::Policy;
pub use record::WindowId;
use record::{crcs_for, Crcs, Decoded, Record, RECORD};

/// The cache directory or one of its files could not be created, opened
/// or sized.
#[derive(Debug, thiserror::Error)]
#[error("read cache {}: {source}", dir.display())]
pub struct OpenError {
    pub dir: PathBuf,
    pub source: std::io::Error,
}

/// Bytes per cache slot (a multiple of the chunk CRC block).
pub const SLOT: u64 = 64 << 10;
/// Granularity of the reuse bitmap: one bit per sector of a slot.
const SEEN_UNIT: u64 = 512;
const _: () = assert!(SLOT / SEEN_UNIT == 128);

/// The data file, in the cache directory.
pub const DATA_FILE: &str = "data";
/// The index file, in the cache directory.
pub const INDEX_FILE: &str = "index";
/// Names the volume directory the cache belongs to (see [`Cache::open`]).
pub const OWNER_FILE: &str = "owner";
/// Held locked (`flock`) by the process using the cache.
pub const LOCK_FILE: &str = "lock";
/// Longest owner file read.
const MAX_OWNER: u64 = 4096;

/// A chunk object: `(volume, chunk seq, epoch)`.
pub type ChunkId = (u64, u64, u64);

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: WindowId,
    len: u32,
    /// The window's block CRCs (checked against its chunk's table CRC
    /// before the entry was reserved): what served bytes are checked
    /// against.
    crcs: Crcs,
    /// Sectors of the window some read has used (reuse detection), as two
    /// words (a `u128` would pad the entry to 16-byte alignment).
    seen: [u64; 2],
    /// Reserved ([`Cache::reserve`]) and its data not yet written: every
    /// `get` misses, but still records which sectors it wanted.
    pending: bool,
    /// A `get` reused sectors while the entry was pending; applied to the
    /// eviction policy when the fill lands.
    reused_pending: bool,
}

/// A slot handed out by [`Cache::reserve`] for one window, to be given
/// back to [`Cache::fill`] or [`Cache::abandon`] exactly once.
#[derive(Debug)]
#[must_use = "a reservation must be filled or abandoned"]
pub struct Reservation {
    id: WindowId,
    crcs: Crcs,
    slot: u32,
    gen: u32,
    stamp: u64,
}

/// A `u64` key that already is a hash.
#[derive(Debug, Default, Clone, Copy)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[derive(Debug)]
struct Index {
    /// `hash(id)` -> slot; the slot's entry holds the full id, compared on
    /// every lookup. Two ids with one hash cannot be cached together (the
    /// later one is not cached).
    map: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    slots: Vec<Option<Entry>>,
    policy: Policy,
    /// Stamp of the next entry (entries restored at open keep their order).
    stamp: u64,
}

/// Whether [`Cache::read_hit`] may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Read, waiting for the disk if needed.
    Block,
    /// Read only what the page cache holds.
    Never,
}

/// What [`Cache::read_hit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Every byte was read (still to be checked by the caller).
    Read,
    /// Not read: it needs the disk, and the caller said not to wait.
    WouldBlock,
    /// Not read: the entry is gone or unreadable (a miss).
    Failed,
}

/// A cache hit: which slot served it, to [`Cache::discard`] it if the
/// data fails its check.
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    slot: u32,
    gen: u32,
    crcs: Crcs,
}

impl Hit {
    /// The block CRCs of the window that served the hit, the first for
    /// the window's first byte: check served bytes against these.
    pub fn crcs(&self) -> &[u32] {
        self.crcs.as_slice()
    }
}

#[derive(Debug)]
pub struct Cache {
    /// The directory lock (`flock`); `None` once [`Cache::close`]d. Every
    /// access to the files holds a read guard and checks it (invariant 6).
    dir_lock: RwLock<Option<nix::fcntl::Flock<File>>>,
    data: File,
    /// The data file opened again with `O_DIRECT` for fills, so filling
    /// neither copies into the page cache nor holds the file's inode lock
    /// while copying; `None` where the file system refuses `O_DIRECT`.
    direct: Option<File>,
    index_file: File,
    index: Mutex<Index>,
    /// Reservations not yet filled or abandoned; [`Cache::close`] waits
    /// for them (a read's data is cached before its volume's close ends).
    pending: Mutex<u64>,
    pending_done: Condvar,
    /// Windows evicted to make room for others.
    evictions: AtomicU64,
    /// Bytes copied into an aligned buffer before their direct write
    /// ([`direct::write_at`]): fills from memory that was not
    /// page-aligned.
    fill_copied: AtomicU64,
    /// Entries found on disk at open.
    restored: u64,
}

/// The sectors of a slot that `used` (byte offsets inside it) touches.
fn mask(used: &Range<u64>) -> u128 {
    if used.end <= used.start {
        return 0;
    }
    let a = used.start.min(SLOT) / SEEN_UNIT;
    let b = used.end.min(SLOT).div_ceil(SEEN_UNIT);
    if b <= a {
        return 0;
    }
    let ones = if b - a >= 128 {
        u128::MAX
    } else {
        (1u128 << (b - a)) - 1
    };
    ones << a
}

fn split(m: u128) -> [u64; 2] {
    [m as u64, (m >> 64) as u64]
}

fn hash(id: &WindowId) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
}

impl Cache {
    /// Open the cache of `size` bytes in `dir`, keeping the entries a
    /// previous open left there (invariant 4) if the cache belongs to
    /// `owner` (bytes naming the volume's local directory: its identity
    /// file, which names the store, the volume and the directory). A cache
    /// recorded for another owner starts cold. `None` when `size` is
    /// smaller than one slot (cache disabled) or another process holds the
    /// directory (logged; the volume runs without a cache).
    pub fn open(dir: &Path, size: u64, owner: &[u8]) -> Result<Option<Cache>, OpenError> {
        let n = (size / SLOT).min(u32::MAX as u64) as usize;
        if n == 0 {
            return Ok(None);
        }
        let err = |source: std::io::Error| OpenError {
            dir: dir.to_path_buf(),
            source,
        };
        crate::private::create_dir_all(dir).map_err(err)?;
        let open = |name: &str| {
            crate::private::open_options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
                .map_err(err)
        };
        let lock = match nix::fcntl::Flock::lock(
            open(LOCK_FILE)?,
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        ) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                log::warn!(
                    "read cache {} is in use by another process; running without a read cache",
                    dir.display()
                );
                return Ok(None);
            }
            Err((_, errno)) => return Err(err(std::io::Error::from(errno))),
        };
        let data = open(DATA_FILE)?;
        let index_file = open(INDEX_FILE)?;
        let data_len = data.metadata().map_err(err)?.len();
        let owner_file = open(OWNER_FILE)?;
        let mut recorded = Vec::new();
        (&owner_file)
            .take(MAX_OWNER)
            .read_to_end(&mut recorded)
            .map_err(err)?;
        let loaded = if recorded == owner {
            load(&index_file, n, data_len)
        } else if recorded.is_empty() {
            Ok(Found::default())
        } else {
            Err("it was recorded for another volume directory".to_string())
        };
        let found = match loaded {
            Ok(found) => found,
            Err(why) => {
                log::warn!(
                    "read cache {}: {why}; starting with an empty cache",
                    dir.display()
                );
                Found::default()
            }
        };
        if found.records.is_empty() {
            // Whatever the files held is unknown: drop it.
            index_file.set_len(0).map_err(err)?;
            data.set_len(0).map_err(err)?;
        }
        if recorded != owner {
            owner_file.set_len(0).map_err(err)?;
            owner_file.write_all_at(owner, 0).map_err(err)?;
        }
        if found.dropped > 0 {
            log::warn!(
                "read cache {}: {} damaged or duplicate index records dropped",
                dir.display(),
                found.dropped
            );
        }
        index_file
            .set_len((n as u64 + 1) * RECORD as u64)
            .map_err(err)?;
        data.set_len(n as u64 * SLOT).map_err(err)?;
        // Reads take exact windows: kernel readahead around them would read
        // (and, in the sparse file, zero-fill) neighbouring slots for nothing.
        if let Err(e) = nix::fcntl::posix_fadvise(
            &data,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
        ) {
            log::debug!("read cache {}: fadvise(RANDOM): {e}", dir.display());
        }
        index_file
            .write_all_at(&record::encode_file_header(SLOT as u32, n as u64), 0)
            .map_err(err)?;
        for &s in &found.clear {
            index_file
                .write_all_at(&[0u8; RECORD], record_offset(s))
                .map_err(err)?;
        }
        let mut index = Index {
            map: HashMap::with_capacity_and_hasher(n, Default::default()),
            slots: vec![None; n],
            policy: Policy::new(n),
            stamp: 1,
        };
        let mut restored: Vec<(u32, Record)> = found.records.into_iter().collect();
        restored.sort_by_key(|(_, r)| r.stamp);
        let mut clear = Vec::new();
        restored.retain(|&(s, r)| {
            let fresh = !index.map.contains_key(&hash(&r.id));
            if fresh {
                index.map.insert(hash(&r.id), s);
            } else {
                clear.push(s);
            }
            fresh
        });
        for &s in &clear {
            index_file
                .write_all_at(&[0u8; RECORD], record_offset(s))
                .map_err(err)?;
        }
        for &(s, r) in &restored {
            index.slots[s as usize] = Some(Entry {
                id: r.id,
                len: r.len,
                crcs: r.crcs,
                seen: [0; 2],
                pending: false,
                reused_pending: false,
            });
            index.policy.restore(s, hash(&r.id));
            index.stamp = index.stamp.max(r.stamp + 1);
        }
        if !restored.is_empty() {
            log::info!(
                "read cache {}: {} cached windows kept from the last run",
                dir.display(),
                restored.len()
            );
        }
        let direct = direct::open(&dir.join(DATA_FILE));
        Ok(Some(Cache {
            dir_lock: RwLock::new(Some(lock)),
            data,
            direct,
            index_file,
            index: Mutex::new(index),
            pending: Mutex::new(0),
            pending_done: Condvar::new(),
            evictions: AtomicU64::new(0),
            fill_copied: AtomicU64::new(0),
            restored: restored.len() as u64,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A guard under which the files may be used; `None` once closed.
    fn files(&self) -> Option<RwLockReadGuard<'_, Option<nix::fcntl::Flock<File>>>> {
        let g = self.dir_lock.read().unwrap_or_else(|e| e.into_inner());
        g.is_some().then_some(g)
    }

    /// Stop using the cache directory (invariant 6): wait for file accesses
    /// in progress, then release the directory lock. Later calls do
    /// nothing; what the files hold stays for the next open.
    pub fn close(&self) {
        self.wait_for_fills();
        let mut g = self.dir_lock.write().unwrap_or_else(|e| e.into_inner());
        *g = None;
    }

    /// Windows evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Bytes of fills copied into an aligned buffer before being written
    /// (0 for bytes that arrived page-aligned, and without `O_DIRECT`).
    pub fn fill_copied_bytes(&self) -> u64 {
        self.fill_copied.load(Ordering::Relaxed)
    }

    /// Windows found on disk at open.
    pub fn restored(&self) -> u64 {
        self.restored
    }

    /// Bytes the cache holds when full.
    pub fn capacity(&self) -> u64 {
        self.lock().slots.len() as u64 * SLOT
    }

    /// Bytes of RAM the index takes (map, slot table, eviction queues and
    /// ghost), independent of how full the cache is.
    pub fn index_bytes(&self) -> usize {
        let idx = self.lock();
        idx.map.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
            + idx.slots.len() * std::mem::size_of::<Option<Entry>>()
            + idx.policy.index_bytes()
    }

    /// Whether window `id` is cached or being filled (without counting a
    /// use).
    pub fn contains(&self, id: &WindowId) -> bool {
        let idx = self.lock();
        idx.map
            .get(&hash(id))
            .and_then(|&s| idx.slots[s as usize].as_ref())
            .is_some_and(|e| e.id == *id)
    }

    /// Read `dst.len()` bytes at `offset` within window `id` if it is
    /// cached; `used` is the part of the window the caller's request needs
    /// (for reuse detection). `None` on a miss.
    pub fn get(&self, id: &WindowId, offset: u64, dst: &mut [u8], used: Range<u64>) -> Option<Hit> {
        let end = offset.checked_add(dst.len() as u64)?;
        let hit = self.lookup(id, end, used)?;
        match self.read_hit(hit, offset, dst, Wait::Block) {
            Served::Read => Some(hit),
            Served::WouldBlock | Served::Failed => None,
        }
    }

    /// Find window `id` holding at least `end` bytes and count the use of
    /// `used` (the part of the window the caller's request needs, for
    /// reuse detection); `None` on a miss. Reads nothing: the caller reads
    /// the entry with [`Cache::read_hit`].
    pub fn lookup(&self, id: &WindowId, end: u64, used: Range<u64>) -> Option<Hit> {
        let _files = self.files()?;
        let mut idx = self.lock();
        let slot = *idx.map.get(&hash(id))?;
        let e = idx.slots[slot as usize].as_mut()?;
        if e.id != *id || end > e.len as u64 {
            return None;
        }
        let m = mask(&used);
        let seen = u128::from(e.seen[0]) | u128::from(e.seen[1]) << 64;
        let reused = seen & m != 0;
        e.seen = split(seen | m);
        let crcs = e.crcs;
        if e.pending {
            // Not written yet: a miss, but the use counts.
            e.reused_pending |= reused;
            return None;
        }
        if reused {
            idx.policy.reused(slot);
        }
        Some(Hit {
            slot,
            gen: idx.policy.gen(slot),
            crcs,
        })
    }

    /// Read `dst.len()` bytes at `offset` of the entry [`Cache::lookup`]
    /// found. With [`Wait::Never`] only from the page cache
    /// ([`Served::WouldBlock`] otherwise, the entry kept). A failed read
    /// drops the entry. The slot may have been reused since the lookup:
    /// the caller checks the bytes (invariant 3) and [`Cache::discard`]s
    /// the hit if they are wrong.
    pub fn read_hit(&self, hit: Hit, offset: u64, dst: &mut [u8], wait: Wait) -> Served {
        let Some(_files) = self.files() else {
            return Served::Failed;
        };
        let at = hit.slot as u64 * SLOT + offset;
        let res = match wait {
            Wait::Block => self.data.read_exact_at(dst, at).map(|()| true),
            Wait::Never => crate::nowait::read_cached_at(&self.data, dst, at),
        };
        match res {
            Ok(true) => Served::Read,
            Ok(false) => Served::WouldBlock,
            Err(e) => {
                log::warn!("read cache: reading slot {}: {e}", hit.slot);
                self.drop_entry(hit);
                Served::Failed
            }
        }
    }

    /// Drop the entry that served `hit` (its data failed the caller's
    /// check). Returns false if the slot was reused meanwhile (nothing
    /// dropped).
    pub fn discard(&self, hit: Hit) -> bool {
        let Some(_files) = self.files() else {
            return false;
        };
        self.drop_entry(hit)
    }

    /// [`Cache::discard`], with the files' guard held by the caller.
    fn drop_entry(&self, hit: Hit) -> bool {
        let mut idx = self.lock();
        if idx.policy.gen(hit.slot) != hit.gen {
            return false;
        }
        let Some(e) = idx.slots[hit.slot as usize].take() else {
            return false;
        };
        idx.map.remove(&hash(&e.id));
        idx.policy.release(hit.slot);
        // Under the lock, so a later fill of the slot cannot be undone.
        let _ = self
            .index_file
            .write_all_at(&[0u8; RECORD], record_offset(hit.slot));
        true
    }

    /// Store verified window `id` (at most [`SLOT`] bytes) with its block
    /// CRCs `crcs`; `used` is the part of it the caller's request needed.
    pub fn put(&self, id: &WindowId, crcs: &[u32], data: &[u8], used: Range<u64>) {
        if let Some(r) = self.reserve(id, crcs, data.len() as u64, used) {
            self.fill(r, data);
        }
    }

    /// Hand out a slot for window `id` of `len` bytes (at most [`SLOT`])
    /// whose block CRCs are `crcs` (one per started [`CRC_BLOCK`] of
    /// `len`, taken from a table checked against its chunk's table CRC);
    /// `used` is the part of it the caller's request needed. Until
    /// [`Cache::fill`] the entry is pending: `get` misses (recording its
    /// use), `contains` is true, and no other window can take the slot.
    /// `None` when the window is cached or pending already, every slot is
    /// being filled, [`MAX_PENDING`] windows are pending (the disk is
    /// slower than the store: the window is served but not cached),
    /// `crcs` does not fit `len`, or the cache is closed.
    pub fn reserve(
        &self,
        id: &WindowId,
        crcs: &[u32],
        len: u64,
        used: Range<u64>,
    ) -> Option<Reservation> {
        if len == 0 || len > SLOT || *self.pending_count() >= MAX_PENDING {
            return None;
        }
        if crcs.len() != crcs_for(len) {
            return None;
        }
        let crcs = Crcs::new(crcs)?;
        let _files = self.files()?;
        let mut idx = self.lock();
        if idx.map.contains_key(&hash(id)) {
            return None;
        }
        let (slot, evicted) = idx.policy.victim()?;
        if let Some(old) = idx.slots[slot as usize].take() {
            idx.map.remove(&hash(&old.id));
        }
        if evicted {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        let stamp = idx.stamp;
        idx.stamp += 1;
        idx.slots[slot as usize] = Some(Entry {
            id: *id,
            len: len as u32,
            crcs,
            seen: split(mask(&used)),
            pending: true,
            reused_pending: false,
        });
        idx.map.insert(hash(id), slot);
        let gen = idx.policy.gen(slot);
        drop(idx);
        *self.pending_count() += 1;
        Some(Reservation {
            id: *id,
            crcs,
            slot,
            gen,
            stamp,
        })
    }

    /// Write the data of reserved window `r` (exactly the length given to
    /// [`Cache::reserve`]) and make the entry servable. On a write error,
    /// or a wrong length, the slot is freed and the window stays uncached.
    pub fn fill(&self, r: Reservation, data: &[u8]) {
        self.fill_run(data, vec![(r, 0..data.len())]);
    }

    /// [`Cache::fill`] of several windows, the bytes of each a range of
    /// `data`; windows in consecutive slots whose bytes follow each other
    /// in `data` (every one but the last a whole [`SLOT`]) are written with
    /// one write, straight from `data` when it is page-aligned
    /// ([`direct::write_at`]).
    pub fn fill_run(&self, data: &[u8], windows: Vec<(Reservation, Range<usize>)>) {
        let Some(files) = self.files() else {
            windows.into_iter().for_each(|(r, _)| self.abandon(r));
            return;
        };
        let mut ok: Vec<(Reservation, Range<usize>)> = Vec::with_capacity(windows.len());
        let mut bad = Vec::new();
        {
            let idx = self.lock();
            for (r, range) in windows {
                let fits = range.end <= data.len()
                    && range.start <= range.end
                    && idx.slots[r.slot as usize].as_ref().is_some_and(|e| {
                        e.id == r.id && e.pending && e.len as usize == range.len()
                    });
                if fits {
                    ok.push((r, range));
                } else {
                    log::debug!("read cache: a fill does not match its reservation");
                    bad.push(r);
                }
            }
        }
        let mut rest = ok.as_slice();
        let mut written = Vec::with_capacity(ok.len());
        while !rest.is_empty() {
            let mut n = 1;
            while n < rest.len()
                && rest[n].0.slot == rest[n - 1].0.slot + 1
                && rest[n - 1].1.len() as u64 == SLOT
                && rest[n].1.start == rest[n - 1].1.end
                && (n + 1) * SLOT as usize <= direct::MAX_WRITE
            {
                n += 1;
            }
            let bytes = &data[rest[0].1.start..rest[n - 1].1.end];
            let res = self.write_slots(bytes, &rest[..n]);
            if let Err(e) = &res {
                log::debug!("read cache: filling slots from {}: {e}", rest[0].0.slot);
            }
            written.extend(std::iter::repeat_n(res.is_ok(), n));
            rest = &rest[n..];
        }
        // `abandon` takes the files' guard itself.
        drop(files);
        bad.into_iter().for_each(|r| self.abandon(r));
        for ((r, _), good) in ok.into_iter().zip(written) {
            if good {
                self.mark_filled(r);
            } else {
                self.abandon(r);
            }
        }
    }

    /// The entry of filled reservation `r` becomes servable and enters the
    /// eviction policy (with the reuse seen while it was pending).
    fn mark_filled(&self, r: Reservation) {
        {
            let mut idx = self.lock();
            if idx.policy.gen(r.slot) == r.gen {
                let h = hash(&r.id);
                let reused = match idx.slots[r.slot as usize].as_mut() {
                    Some(e) if e.id == r.id => {
                        e.pending = false;
                        Some(e.reused_pending)
                    }
                    _ => None,
                };
                if let Some(reused) = reused {
                    idx.policy.insert(r.slot, h);
                    if reused {
                        idx.policy.reused(r.slot);
                    }
                }
            }
        }
        self.fill_ended();
    }

    /// Give reserved slot `r` back without filling it.
    pub fn abandon(&self, r: Reservation) {
        {
            // Invariant 7: the guard first (`None` once closed).
            let files = self.files();
            let mut idx = self.lock();
            if idx.policy.gen(r.slot) == r.gen {
                if let Some(e) = idx.slots[r.slot as usize].take() {
                    idx.map.remove(&hash(&e.id));
                }
                idx.policy.release(r.slot);
                if files.is_some() {
                    // Under the lock, so a later fill of the slot cannot be undone.
                    let _ = self
                        .index_file
                        .write_all_at(&[0u8; RECORD], record_offset(r.slot));
                }
            }
        }
        self.fill_ended();
    }

    /// Invariant 2's writes for reserved windows in consecutive slots:
    /// zero records, data, records.
    fn write_slots(
        &self,
        bytes: &[u8],
        run: &[(Reservation, Range<usize>)],
    ) -> std::io::Result<()> {
        // The run's slots are consecutive, so are their records: one
        // write of zero records, then the data, then one of the records.
        let first = record_offset(run[0].0.slot);
        self.index_file
            .write_all_at(&vec![0u8; RECORD * run.len()], first)?;
        let at = run[0].0.slot as u64 * SLOT;
        match &self.direct {
            Some(f) => {
                let copied = direct::write_at(f, &self.data, bytes, at)?;
                self.fill_copied.fetch_add(copied as u64, Ordering::Relaxed);
            }
            None => self.data.write_all_at(bytes, at)?,
        }
        let mut records = Vec::with_capacity(RECORD * run.len());
        for (r, range) in run {
            let rec = Record {
                id: r.id,
                len: range.len() as u32,
                stamp: r.stamp,
                crcs: r.crcs,
            };
            records.extend_from_slice(&record::encode_record(&rec));
        }
        self.index_file.write_all_at(&records, first)
    }

    fn pending_count(&self) -> std::sync::MutexGuard<'_, u64> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fill_ended(&self) {
        let mut n = self.pending_count();
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.pending_done.notify_all();
        }
    }

    /// Wait (at most [`FILL_WAIT`]) until no reservation is outstanding.
    fn wait_for_fills(&self) {
        let n = self.pending_count();
        let (n, timeout) = self
            .pending_done
            .wait_timeout_while(n, FILL_WAIT, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() {
            log::warn!("read cache: closing with {} window fills unfinished", *n);
        }
    }
}

/// Most windows reserved and not yet filled: bounds the memory of
/// windows waiting for their cache write (64 MiB).
pub const MAX_PENDING: u64 = 1024;

/// Longest [`Cache::close`] waits for fills in progress.
const FILL_WAIT: Duration = Duration::from_secs(30);

fn record_offset(slot: u32) -> u64 {
    (slot as u64 + 1) * RECORD as u64
}

/// What the index file holds for the first `n` slots.
#[derive(Debug, Default)]
struct Found {
    records: HashMap<u32, Record>,
    /// Slots whose records must be zeroed (damaged or duplicate).
    clear: Vec<u32>,
    dropped: usize,
}

/// Read the index file (invariant 4). `Err` = start cold, with the reason.
fn load(file: &File, n: usize, data_len: u64) -> Result<Found, String> {
    let len = file
        .metadata()
        .map_err(|e| format!("index unreadable: {e}"))?
        .len();
    if len == 0 {
        return Ok(Found::default());
    }
    let mut head = [0u8; RECORD];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| format!("index header unreadable ({len} bytes): {e}"))?;
    let Some((slot_size, slots)) = record::decode_file_header(&head) else {
        return Err("index header damaged".into());
    };
    if slot_size as u64 != SLOT {
        return Err(format!("index made for {slot_size}-byte slots"));
    }
    let on_file = (len / RECORD as u64).saturating_sub(1);
    if on_file < slots {
        log::warn!("read cache index truncated: {on_file} of {slots} records");
    }
    let count = slots.min(on_file).min(n as u64) as usize;
    let mut buf = vec![0u8; count * RECORD];
    file.read_exact_at(&mut buf, RECORD as u64)
        .map_err(|e| format!("index unreadable: {e}"))?;
    let mut found = Found::default();
    let mut by_id: HashMap<WindowId, u32> = HashMap::new();
    for (s, b) in buf.chunks(RECORD).enumerate() {
        let s = s as u32;
        let r = match record::decode_record(b, SLOT as u32) {
            Decoded::Free => continue,
            Decoded::Entry(r) if s as u64 * SLOT + r.len as u64 <= data_len => r,
            Decoded::Entry(_) | Decoded::Damaged => {
                found.clear.push(s);
                found.dropped += 1;
                continue;
            }
        };
        if let Some(&other) = by_id.get(&r.id) {
            // Keep the newer of two records of one window.
            let keep_new = found.records[&other].stamp < r.stamp;
            let drop = if keep_new { other } else { s };
            found.records.remove(&drop);
            found.clear.push(drop);
            found.dropped += 1;
            if !keep_new {
                continue;
            }
        }
        by_id.insert(r.id, s);
        found.records.insert(s, r);
    }
    Ok(found)
}

#[cfg(test)]
mod tests;
