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
//! 5. [`WalFile::allocate`] makes the file at least `len` bytes long (new
//!    bytes read as zeros); like a length change it is durable only after
//!    [`WalFile::sync_data`].
//! 6. A write may also zero the bytes after it up to the next 4 KiB
//!    boundary (the real file pads O_DIRECT writes to whole blocks): a
//!    writer only ever writes at the end of what it wrote before, so that
//!    padding covers nothing anyone wrote. It never extends the file's
//!    length past the end of the write.
//! 8. [`WalFile::overwrite_at`] writes exactly its bytes and no padding
//!    (a segment's header, rewritten while records follow it in the same
//!    block); [`WalFile::overwrite_durably`] returns once those bytes are
//!    durable, which may leave other written bytes of the file unsynced.
//! 7. [`WalFile::write_durable_at`] returns only once the written bytes,
//!    and everything written to the file before, are durable (writers use
//!    it only when nothing was unsynced before).
//!
//! The real implementation writes in one of two ways ([`WalIo`]):
//! - **Buffered with write-behind** (the default): `pwritev` into the page
//!   cache, padded with zeros to the end of its last page where the file
//!   is that long already (rule 6; a partial page the cache lacks would be
//!   read from the disk first), then `sync_file_range(SYNC_FILE_RANGE_WRITE)`
//!   over the pages just completed, which starts their writeback and
//!   returns without waiting. The writer goes on to its next batch while
//!   the disk writes this one, so several batches are in flight on the
//!   device; an `fdatasync` later only waits for what is still under way. A spare's
//!   pages are dropped from the page cache when it is recycled
//!   ([`WalFile::drop_cached`]).
//! - **Direct** (`engine.wal_direct_io`): O_DIRECT from 4 KiB-aligned
//!   buffers (a partial last block is padded with zeros and rewritten from
//!   an in-memory copy by the next write), reads through a second, buffered
//!   descriptor, except [`WalFile::read_range`] (destage's span reads),
//!   which reads with O_DIRECT into a page-aligned pooled buffer. Where the
//!   file system refuses O_DIRECT (tmpfs: EINVAL) it falls back to the
//!   buffered way and logs that once.
//!
//! On this machine's disk the buffered way was faster for every write job
//! of `tools/bench-nbd.sh` (4K random writes at QD32 +30%, 1 MiB writes at
//! QD8 +35%, 4K write + FLUSH at QD1 equal): with O_DIRECT the writer
//! waits out the device's latency once per batch, one batch at a time.
//! The hot path pays one dynamic call per batch.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::pieces::MAX_SLICES;
use crate::store::aligned::PooledBuf;

/// An open file of the WAL (read and write).
pub trait WalFile: Send + Sync + std::fmt::Debug {
    /// Write the slices at `off`, in order; returns the bytes written
    /// (possibly fewer than asked, like `pwritev`).
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<usize>;
    /// Fill `buf` from `off`; fails if the file ends before.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// `[off, off + len)` as shared bytes in a page-aligned pooled buffer
    /// (never zeroed first: every byte handed out was read). The real file
    /// reads with O_DIRECT when it writes that way, so the bytes come
    /// straight from the disk into the buffer, with no page-cache copy;
    /// the default reads with [`WalFile::read_exact_at`]. Fails if the
    /// file ends before.
    fn read_range(&self, off: u64, len: usize) -> io::Result<Bytes> {
        read_pooled(len, |buf| self.read_exact_at(buf, off))
    }
    /// `[off, off + len)` without a copy or a system call, when one
    /// buffer in memory holds it (the tail of the newest records,
    /// [`super::tail`]); `None` otherwise, the default.
    fn read_shared(&self, _off: u64, _len: usize) -> Option<Bytes> {
        None
    }
    /// [`WalFile::read_exact_at`] only if it needs no disk read (the page
    /// cache holds every byte); `Ok(false)` otherwise, and then `buf` may
    /// hold anything. The default cannot tell and always says `false`.
    fn read_cached_at(&self, _buf: &mut [u8], _off: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Make the file's data (and length) durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Let go of the file's bytes in the page cache, where it holds them
    /// (a recycled spare: what it held is in the store). Only ever drops
    /// clean pages, so nothing written is lost; the default does nothing.
    fn drop_cached(&self) -> io::Result<()> {
        Ok(())
    }
    /// Cut or extend the file to `len` bytes (not durable until synced).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Make the file at least `len` bytes long, reserving the space
    /// (`fallocate`; not durable until synced). Never shrinks it.
    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.size()? < len {
            self.set_len(len)?;
        }
        Ok(())
    }
    /// Write exactly `buf` at `off`, within the file's length, padding
    /// nothing (protocol rule 8); not durable until synced. Only for a
    /// file written through the page cache ([`WalFile::writes_through`]
    /// is false).
    fn overwrite_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        write_all_at(self, &[IoSlice::new(buf)], off)
    }
    /// [`WalFile::overwrite_at`], returning once those bytes are durable
    /// (protocol rule 8); the default syncs the whole file.
    fn overwrite_durably(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.overwrite_at(buf, off)?;
        self.sync_data()
    }
    /// Whether a write reaches the disk as it is made (O_DIRECT), so that
    /// a later sync costs no more writing.
    fn writes_through(&self) -> bool {
        false
    }
    /// Whether to start writing back each write's pages as it is made
    /// (write-behind, see the module docs; on at open). Only a hint.
    fn set_write_behind(&self, _on: bool) {}
    /// Write all of `iov` at `off` and return once it is durable (protocol
    /// rule 7): `RWF_DSYNC` (a FUA write on devices that have it) where the
    /// file supports it, else a write then [`WalFile::sync_data`].
    fn write_durable_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        write_all_at(self, iov, off)?;
        self.sync_data()
    }
}

/// `write_vectored_at` until every byte of `iov` is written.
pub fn write_all_at<F: WalFile + ?Sized>(
    file: &F,
    iov: &[IoSlice<'_>],
    off: u64,
) -> io::Result<()> {
    let mut owned: Vec<IoSlice<'_>> = iov.to_vec();
    let mut slices: &mut [IoSlice<'_>] = &mut owned;
    let mut off = off;
    while !slices.is_empty() {
        let n = slices.len().min(MAX_SLICES);
        let written = file.write_vectored_at(&slices[..n], off)?;
        if written == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes"));
        }
        off += written as u64;
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

/// `len` bytes filled by `read` in a buffer of the aligned pool (not
/// zeroed first: `read` must fill all of it or fail).
fn read_pooled(len: usize, read: impl FnOnce(&mut [u8]) -> io::Result<()>) -> io::Result<Bytes> {
    let mut buf = PooledBuf::take(len);
    read(buf.bytes_mut())?;
    Ok(buf.freeze())
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

/// How the real file system writes segments (see the module docs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum WalIo {
    /// Through the page cache, each write's writeback started at once.
    #[default]
    Buffered,
    /// O_DIRECT from aligned buffers, buffered where the file system
    /// refuses O_DIRECT.
    Direct,
}

impl WalIo {
    /// [`WalIo::Direct`] when `direct`, else the default.
    pub fn direct_if(direct: bool) -> WalIo {
        if direct {
            WalIo::Direct
        } else {
            WalIo::Buffered
        }
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs {
    pub io: WalIo,
}

/// The real file system as a [`DynWalFs`], writing the default way.
pub fn real() -> DynWalFs {
    real_with(WalIo::default())
}

/// The real file system as a [`DynWalFs`], writing the `io` way.
pub fn real_with(io: WalIo) -> DynWalFs {
    Arc::new(RealFs { io })
}

/// Alignment (and granularity) of O_DIRECT writes.
pub const DIRECT_BLOCK: u64 = 4096;

/// An open segment: `write` is opened with O_DIRECT when asked and the
/// file system allows it, `read` is buffered.
#[derive(Debug)]
struct RealFile {
    write: File,
    read: File,
    /// `Some` when `write` has O_DIRECT: the bytes of the last partial
    /// block written, `(block offset, bytes from it)`, so the next write
    /// can rewrite that block without reading it back.
    tail: Option<std::sync::Mutex<(u64, Vec<u8>)>>,
    /// The file's length as this handle last saw it, or [`LEN_UNKNOWN`]
    /// (at open, and after this handle changed the length). A direct
    /// write, or a buffered one padded to its page's end, that ends within
    /// it asks the kernel for no length: on
    /// kernels with fine-grained timestamps a `statx` before each write
    /// makes that write dirty the inode, which an `O_DSYNC` write then
    /// writes too (measured here: 20% fewer `O_DSYNC` writes per second
    /// with an `fstat` after each). Only the writer changes a segment's
    /// length while it writes it (module docs, rule 6), through this
    /// handle.
    len_seen: std::sync::atomic::AtomicU64,
    /// Start the writeback of each buffered write's pages
    /// ([`WalFile::set_write_behind`]).
    write_behind: std::sync::atomic::AtomicBool,
}

/// [`RealFile::len_seen`] when the length is not known.
const LEN_UNKNOWN: u64 = u64::MAX;

/// Log once that O_DIRECT was refused.
fn note_no_direct(path: &Path, e: &io::Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::info!(
            "the WAL's file system refuses O_DIRECT ({}: {e}); WAL writes go through the page cache",
            path.display()
        )
    });
}

impl RealFile {
    fn open(path: &Path, create: bool, io: WalIo) -> io::Result<RealFile> {
        let mut o = if create {
            let mut o = crate::private::open_options();
            o.create(true).truncate(true);
            o
        } else {
            OpenOptions::new()
        };
        o.read(true).write(true);
        let read = o.open(path)?;
        use std::os::unix::fs::OpenOptionsExt;
        let mut d = OpenOptions::new();
        d.read(true).write(true).custom_flags(libc::O_DIRECT);
        let (write, tail) = match (io == WalIo::Direct).then(|| d.open(path)) {
            Some(Ok(f)) => (f, Some(std::sync::Mutex::new((0, Vec::new())))),
            None => (read.try_clone()?, None),
            Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                note_no_direct(path, &e);
                (read.try_clone()?, None)
            }
            Some(Err(e)) => return Err(e),
        };
        Ok(RealFile {
            write,
            read,
            tail,
            len_seen: std::sync::atomic::AtomicU64::new(LEN_UNKNOWN),
            write_behind: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// One aligned O_DIRECT write of `iov` at `off` (see the module docs,
    /// rule 6); `flags` go to `pwritev2`.
    fn write_direct(
        &self,
        tail: &std::sync::Mutex<(u64, Vec<u8>)>,
        iov: &[IoSlice<'_>],
        off: u64,
        flags: libc::c_int,
    ) -> io::Result<usize> {
        SCRATCH.with(|raw| self.write_direct_with(tail, iov, off, flags, &mut raw.borrow_mut()))
    }

    /// [`RealFile::write_direct`] through the buffer `raw` (grown as
    /// needed, up to [`MAX_DIRECT_WRITE`] and a block; every byte written
    /// is set here). Writes at most up to the block boundary
    /// [`MAX_DIRECT_WRITE`] bytes past the block `off` lies in, and says
    /// so by a short count (callers loop), so the buffer stays small.
    fn write_direct_with(
        &self,
        tail: &std::sync::Mutex<(u64, Vec<u8>)>,
        iov: &[IoSlice<'_>],
        off: u64,
        flags: libc::c_int,
        raw: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let bs = DIRECT_BLOCK;
        let start = off - off % bs;
        let pre = (off - start) as usize;
        let asked: usize = iov.iter().map(|s| s.len()).sum();
        // `start` and the cap are whole blocks, so a cut write ends on a
        // block boundary and the next one starts on it.
        let len = asked.min(MAX_DIRECT_WRITE - pre);
        let end = off + len as u64;
        let padded = end.div_ceil(bs) * bs;
        let total = (padded - start) as usize;
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        if raw.len() < total + bs as usize {
            raw.resize(total + bs as usize, 0);
        }
        let a = raw.as_ptr().align_offset(bs as usize);
        let buf = &mut raw[a..a + total];
        if pre > 0 {
            if t.0 == start && t.1.len() >= pre {
                buf[..pre].copy_from_slice(&t.1[..pre]);
            } else {
                FileExt::read_exact_at(&self.read, &mut buf[..pre], start)?;
            }
        }
        let mut at = pre;
        for s in iov {
            let n = s.len().min(pre + len - at);
            buf[at..at + n].copy_from_slice(&s[..n]);
            at += n;
        }
        // Padding up to the block boundary (the buffer is reused).
        buf[at..].fill(0);
        // The length before this write, when the padded write may pass it.
        let seen = self.len_seen.load(Ordering::Relaxed);
        let size = if seen == LEN_UNKNOWN || padded > seen {
            Some(self.read.metadata()?.len())
        } else {
            None
        };
        let off_t = libc::off_t::try_from(start)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let vec = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: total,
        };
        // SAFETY: `vec` points at `total` initialized bytes of `buf`, which
        // outlives the call; the descriptor is open for writing.
        let n = unsafe { libc::pwritev2(self.write.as_raw_fd(), &vec, 1, off_t, flags) };
        if n < 0 {
            *t = (0, Vec::new());
            return Err(io::Error::last_os_error());
        }
        if (n as usize) < total {
            // A short direct write: nothing to trust about the tail block.
            *t = (0, Vec::new());
            let done = (n as usize).saturating_sub(pre);
            return Ok(done.min(len));
        }
        let last = end - end % bs;
        *t = (
            last,
            buf[(last - start) as usize..(end - start) as usize].to_vec(),
        );
        if let Some(size) = size {
            if padded > size {
                // The padding must not make the file longer than what was
                // written (rule 6).
                self.read.set_len(size.max(end))?;
            }
            self.len_seen.store(size.max(end), Ordering::Relaxed);
        }
        Ok(len)
    }

    /// One `pwritev` of `iov` (at most [`crate::pieces::PIECE`] bytes of
    /// it: a short count says how much) at `off` through the page cache,
    /// padded with zeros to the end of its last 4 KiB page when the file
    /// is already that long (module docs, rule 6), then the writeback of every page
    /// it completed started ([`start_writeback`]). The padding makes the
    /// last page whole: a partial write into a page the cache does not
    /// hold makes the kernel read that block first (of a recycled spare:
    /// a disk read per batch, measured as most of the writer's time). The
    /// last, partial page is left dirty: the next batch rewrites it, and
    /// starts its writeback then.
    fn write_buffered(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<usize> {
        let bs = DIRECT_BLOCK;
        // At most a piece per call (a big buffered write is slow on some
        // VMs, see `crate::pieces`), cut on a page boundary so that only
        // a batch's last page is ever partial; callers loop.
        let limit = crate::pieces::PIECE - (off % bs) as usize;
        let whole: usize = iov.iter().map(|s| s.len()).sum();
        let cut;
        let (iov, asked) = if whole > limit {
            cut = crate::pieces::first_piece(iov, limit);
            (&cut[..], limit)
        } else {
            (iov, whole)
        };
        let end = off + asked as u64;
        let padded = end.div_ceil(bs) * bs;
        let mut seen = self.len_seen.load(Ordering::Relaxed);
        if padded > end && (seen == LEN_UNKNOWN || padded > seen) {
            seen = self.read.metadata()?.len();
            self.len_seen.store(seen, Ordering::Relaxed);
        }
        let pad = if padded > end && padded <= seen && iov.len() < MAX_SLICES {
            (padded - end) as usize
        } else {
            0
        };
        let at = libc::off_t::try_from(off)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let n = if pad > 0 {
            let mut padded_iov = Vec::with_capacity(iov.len() + 1);
            padded_iov.extend_from_slice(iov);
            padded_iov.push(IoSlice::new(&ZERO_PAGE[..pad]));
            nix::sys::uio::pwritev(&self.write, &padded_iov, at)
        } else {
            nix::sys::uio::pwritev(&self.write, iov, at)
        }
        .map_err(io::Error::from)?;
        let n = n.min(asked);
        let done = off + n as u64;
        if seen != LEN_UNKNOWN && done > seen {
            self.len_seen.store(done, Ordering::Relaxed);
        }
        if self.write_behind.load(Ordering::Relaxed) {
            start_writeback(&self.write, off - off % bs, done - done % bs);
        }
        Ok(n)
    }
}

/// Zeros padding a buffered write to the end of its page.
static ZERO_PAGE: [u8; DIRECT_BLOCK as usize] = [0; DIRECT_BLOCK as usize];

use std::os::fd::AsRawFd;

/// Start the writeback of the bytes `[from, to)` just written through
/// the page cache, without waiting for it (write-behind; see the module
/// docs). Only a hint: durability still comes from `fdatasync`, which
/// also reports any error of this writeback, so an error here is ignored.
fn start_writeback(file: &File, from: u64, to: u64) {
    let (Ok(off), Ok(len)) = (
        libc::off64_t::try_from(from),
        libc::off64_t::try_from(to.saturating_sub(from)),
    ) else {
        return;
    };
    if len == 0 {
        return;
    }
    // SAFETY: a plain system call on an open descriptor; it reads no
    // memory of this process.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

thread_local! {
    /// The writer thread's buffer for direct writes, reused across
    /// batches (a fresh allocation per batch grew the heap).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most bytes one direct write covers, from the block its offset lies in
/// (a multiple of [`DIRECT_BLOCK`]): a batch of many megabytes is written
/// in pieces of this size, so the writer's buffer never grows past it
/// (a buffer the size of the batch was regrown and zeroed per batch).
const MAX_DIRECT_WRITE: usize = 1 << 20;

impl WalFile for RealFile {
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<usize> {
        if let Some(tail) = &self.tail {
            return self.write_direct(tail, iov, off, 0);
        }
        self.write_buffered(iov, off)
    }

    fn write_durable_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        let Some(tail) = &self.tail else {
            write_all_at(self, iov, off)?;
            return self.sync_data();
        };
        let len: usize = iov.iter().map(|s| s.len()).sum();
        let n = self.write_direct(tail, iov, off, libc::RWF_DSYNC)?;
        if n == len {
            return Ok(());
        }
        // Short: finish plainly, then sync.
        let mut owned: Vec<IoSlice<'_>> = iov.to_vec();
        let mut slices: &mut [IoSlice<'_>] = &mut owned;
        IoSlice::advance_slices(&mut slices, n);
        write_all_at(self, slices, off + n as u64)?;
        self.sync_data()
    }

    fn overwrite_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.tail.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an O_DIRECT WAL file is never overwritten in place",
            ));
        }
        FileExt::write_all_at(&self.write, buf, off)
    }

    fn overwrite_durably(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.tail.is_some() {
            return self.overwrite_at(buf, off);
        }
        let at = libc::off_t::try_from(off)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let mut done = 0usize;
        while done < buf.len() {
            let iov = libc::iovec {
                iov_base: buf[done..].as_ptr() as *mut libc::c_void,
                iov_len: buf.len() - done,
            };
            // SAFETY: `iov` points into `buf`, which outlives the call, and
            // the kernel only reads from it; the descriptor is open.
            let n = unsafe {
                libc::pwritev2(
                    self.write.as_raw_fd(),
                    &iov,
                    1,
                    at + done as libc::off_t,
                    libc::RWF_DSYNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    // No per-write sync here: write, then sync it all.
                    FileExt::write_all_at(&self.write, &buf[done..], off + done as u64)?;
                    return self.sync_data();
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote nothing"));
            }
            done += n as usize;
        }
        Ok(())
    }

    fn writes_through(&self) -> bool {
        self.tail.is_some()
    }

    fn set_write_behind(&self, on: bool) {
        self.write_behind.store(on, Ordering::Relaxed);
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.read, buf, off)
    }

    fn read_range(&self, off: u64, len: usize) -> io::Result<Bytes> {
        if self.tail.is_none() {
            return read_pooled(len, |buf| FileExt::read_exact_at(&self.read, buf, off));
        }
        let bs = DIRECT_BLOCK;
        let start = off - off % bs;
        let pre = (off - start) as usize;
        let end = off
            .checked_add(len as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range too large"))?;
        let mut buf = PooledBuf::take((end.div_ceil(bs) * bs - start) as usize);
        // O_DIRECT: whole blocks from a block boundary into the aligned
        // buffer; a read may stop at the end of the file, past what is
        // asked (after that `got` is no longer a block multiple).
        let mut got = 0usize;
        while got < pre + len && (got as u64).is_multiple_of(bs) {
            match self
                .write
                .read_at(&mut buf.bytes_mut()[got..], start + got as u64)
            {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if got < pre + len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file ends before the range read",
            ));
        }
        Ok(buf.freeze().slice(pre..pre + len))
    }

    fn read_cached_at(&self, buf: &mut [u8], off: u64) -> io::Result<bool> {
        crate::nowait::read_cached_at(&self.read, buf, off)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.write.sync_data()
    }

    fn drop_cached(&self) -> io::Result<()> {
        nix::fcntl::posix_fadvise(
            &self.read,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .map_err(io::Error::from)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if let Some(t) = &self.tail {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            if t.0 + t.1.len() as u64 > len {
                *t = (0, Vec::new());
            }
        }
        self.len_seen.store(LEN_UNKNOWN, Ordering::Relaxed);
        self.read.set_len(len)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.read.metadata()?.len())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.size()? >= len {
            return Ok(());
        }
        let l = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        match nix::fcntl::fallocate(&self.write, nix::fcntl::FallocateFlags::empty(), 0, l) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => self.read.set_len(len),
            Err(e) => Err(e.into()),
        }
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
        Ok(Arc::new(RealFile::open(path, true, self.io)?))
    }

    fn open(&self, path: &Path) -> io::Result<SegFile> {
        Ok(Arc::new(RealFile::open(path, false, self.io)?))
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
    let mut buf = Vec::new();
    read_all_into(file, &mut buf)?;
    Ok(buf)
}

/// [`read_all`] into `buf`, whose allocation is reused: it is resized to
/// the file's length (only new bytes are zeroed) and then overwritten.
pub fn read_all_into(file: &dyn WalFile, buf: &mut Vec<u8>) -> io::Result<()> {
    let len = usize::try_from(file.size()?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
    buf.resize(len, 0);
    file.read_exact_at(buf, 0)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Bytes that differ at every offset (so a misplaced read shows).
    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ salt).collect()
    }

    /// Both ways of writing (each test runs its body on both).
    const BOTH: [WalIo; 2] = [WalIo::Buffered, WalIo::Direct];

    #[test]
    fn read_range_returns_exactly_the_written_bytes_at_any_alignment() {
        BOTH.into_iter().for_each(read_range_is_exact);
    }

    fn read_range_is_exact(io: WalIo) {
        let dir = tempfile::tempdir().unwrap();
        let f = real_with(io).create(&dir.path().join("seg")).unwrap();
        // Appends of odd sizes, as the log makes them: the file ends
        // inside a block, and every later write rewrites that block.
        let mut written = Vec::new();
        for (i, len) in [100usize, 4096, 7000, 1, 12_345].into_iter().enumerate() {
            let part = pattern(len, i as u8);
            write_all_at(f.as_ref(), &[IoSlice::new(&part)], written.len() as u64).unwrap();
            written.extend_from_slice(&part);
        }
        assert_eq!(f.size().unwrap(), written.len() as u64);
        let end = written.len();
        for (off, len) in [
            (0, end),
            (0, 1),
            (99, 2),
            (4095, 4098),
            (4196, 7000),
            (end - 1, 1),
            (end - 5000, 5000),
            (5000, 0),
        ] {
            let got = f.read_range(off as u64, len).unwrap();
            assert_eq!(
                &got[..],
                &written[off..off + len],
                "{io:?}: range {off}+{len}"
            );
        }
        // Past the end of the file: an error, not short or stale bytes.
        let past = f.read_range((end - 10) as u64, 11).unwrap_err();
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof);
        assert!(f.read_range(end as u64 + 4096, 1).is_err());
    }

    #[test]
    fn a_write_of_many_megabytes_goes_in_capped_pieces_and_reads_back_whole() {
        BOTH.into_iter().for_each(many_megabytes_read_back_whole);
    }

    fn many_megabytes_read_back_whole(io: WalIo) {
        let dir = tempfile::tempdir().unwrap();
        let f = real_with(io).create(&dir.path().join("seg")).unwrap();
        let head = pattern(777, 1);
        write_all_at(f.as_ref(), &[IoSlice::new(&head)], 0).unwrap();
        // Three slices, 3.5 MiB in all, from an offset inside a block.
        let parts = [pattern(5 << 19, 2), pattern(1 << 20, 3), pattern(4097, 4)];
        let iov: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let one = f.write_vectored_at(&iov, head.len() as u64).unwrap();
        let cap = match io {
            WalIo::Direct => MAX_DIRECT_WRITE,
            WalIo::Buffered => crate::pieces::PIECE,
        };
        assert!(one > 0 && one <= cap, "{io:?}: one write of {one} bytes");
        if io == WalIo::Buffered {
            // Cut on a page boundary: only a batch's last page is partial.
            assert_eq!((head.len() + one) % DIRECT_BLOCK as usize, 0);
        }
        write_all_at(f.as_ref(), &iov, head.len() as u64).unwrap();
        let mut written = head.clone();
        parts.iter().for_each(|p| written.extend_from_slice(p));
        // A durable write of several pieces after it.
        let more = pattern(3 << 20, 5);
        f.write_durable_at(&[IoSlice::new(&more)], written.len() as u64)
            .unwrap();
        written.extend_from_slice(&more);
        assert_eq!(f.size().unwrap(), written.len() as u64);
        let got = f.read_range(0, written.len()).unwrap();
        assert!(got[..] == written[..], "{io:?}: the bytes read back differ");
        SCRATCH.with(|raw| {
            let cap = MAX_DIRECT_WRITE + 2 * DIRECT_BLOCK as usize;
            assert!(
                raw.borrow().len() <= cap,
                "the direct-write buffer grew past its cap"
            );
        });
    }

    #[test]
    fn the_length_stays_exact_when_writes_follow_a_cut_back() {
        BOTH.into_iter().for_each(length_exact_after_cut_back);
    }

    fn length_exact_after_cut_back(io: WalIo) {
        let dir = tempfile::tempdir().unwrap();
        let f = real_with(io).create(&dir.path().join("seg")).unwrap();
        let mut want = pattern(10_000, 1);
        write_all_at(f.as_ref(), &[IoSlice::new(&want)], 0).unwrap();
        // Appends inside a preallocated length leave it as it is.
        f.allocate(65_536).unwrap();
        for salt in [2, 3] {
            let part = pattern(100, salt);
            write_all_at(f.as_ref(), &[IoSlice::new(&part)], want.len() as u64).unwrap();
            want.extend_from_slice(&part);
            assert_eq!(f.size().unwrap(), 65_536);
        }
        // A cut back, then an append whose padded block passes the new
        // end: the file ends exactly where that append does (rule 6).
        want.truncate(10_150);
        f.set_len(10_150).unwrap();
        let part = pattern(100, 4);
        write_all_at(f.as_ref(), &[IoSlice::new(&part)], 10_150).unwrap();
        want.extend_from_slice(&part);
        assert_eq!(f.size().unwrap(), 10_250);
        assert!(f.read_range(0, 10_250).unwrap()[..] == want[..]);
    }

    /// A buffered write that ends inside a page is padded with zeros to
    /// the page's end where the file is that long (so the kernel need not
    /// read the old block in), never past the file's end (rule 6); the
    /// next write continues right after the data.
    #[test]
    fn a_buffered_write_is_padded_to_its_page_end_only_inside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = real().create(&dir.path().join("seg")).unwrap();
        let old = vec![0xffu8; 16_384];
        write_all_at(f.as_ref(), &[IoSlice::new(&old)], 0).unwrap();
        let read = |off: u64, len: usize| {
            let mut b = vec![0u8; len];
            f.read_exact_at(&mut b, off).unwrap();
            b
        };
        let a = pattern(100, 1);
        write_all_at(f.as_ref(), &[IoSlice::new(&a)], 0).unwrap();
        assert_eq!(read(0, 100), a);
        assert!(
            read(100, 3996).iter().all(|b| *b == 0),
            "padded to the page end"
        );
        assert!(
            read(4096, 4096).iter().all(|b| *b == 0xff),
            "the next page kept"
        );
        let b = pattern(50, 2);
        write_all_at(f.as_ref(), &[IoSlice::new(&b)], 100).unwrap();
        assert_eq!(read(100, 50), b);
        assert!(read(150, 3946).iter().all(|b| *b == 0));
        assert_eq!(f.size().unwrap(), 16_384);
        // At the end of the file: no padding, the length ends at the data.
        f.set_len(20_000).unwrap();
        write_all_at(f.as_ref(), &[IoSlice::new(&a)], 20_000).unwrap();
        assert_eq!(f.size().unwrap(), 20_100);
        assert_eq!(read(20_000, 100), a);
    }

    /// Whether a page-cache test must skip: `cached` pages after buffered
    /// writes is 0 where a file system (or memory pressure) keeps nothing
    /// cached, so there is nothing to drop and nothing to check. Never a
    /// silent pass in CI.
    pub(in crate::engine::wal) fn nothing_cached(cached: usize) -> bool {
        if cached > 0 {
            return false;
        }
        assert!(
            std::env::var("CI").is_err(),
            "nothing cached after buffered writes"
        );
        eprintln!("skipped: the page cache kept none of the written pages");
        true
    }

    /// Written through the page cache, a segment's pages stay cached
    /// (reads of fresh records need no disk); once synced, dropping them
    /// leaves the page cache without them and the file's bytes intact.
    #[test]
    fn a_synced_buffered_segment_leaves_the_page_cache_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let f = real().create(&path).unwrap();
        let want = pattern(1 << 20, 7);
        write_all_at(f.as_ref(), &[IoSlice::new(&want)], 0).unwrap();
        f.sync_data().unwrap();
        let probe = File::open(&path).unwrap();
        let cached = crate::test_page_cache::resident_pages(&probe, want.len());
        if nothing_cached(cached) {
            return;
        }
        f.drop_cached().unwrap();
        let left = crate::test_page_cache::resident_pages(&probe, want.len());
        assert!(left < cached / 8, "{left} of {cached} pages left cached");
        assert!(f.read_range(0, want.len()).unwrap()[..] == want[..]);
    }
}
