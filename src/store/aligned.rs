//! Page-aligned byte buffers, and a bounded pool of them for object bodies.
//!
//! A chunk GET's bytes end up in the read cache, written with `O_DIRECT`
//! ([`crate::engine::cache`]), which needs page-aligned memory. Received
//! into an ordinary allocation, every GET cost a fresh allocation (page
//! faults, the kernel zeroing pages) and then a second copy into an aligned
//! buffer for the cache write (together about 15% of the server's CPU in a
//! cold sequential read, `perf`). Received into a [`PooledBuf`] instead,
//! the bytes are written to the cache from where they landed, and the
//! buffer is used again for a later GET once every `Bytes` of it is gone.
//!
//! Invariants:
//! 1. An [`AlignedBuf`] starts at a [`PAGE`]-aligned address and holds a
//!    whole number of pages, all initialised (zeros when new).
//! 2. A [`PooledBuf`] handed out is `len` bytes long; its bytes are zeros or
//!    stale bytes of an earlier body, so its filler must overwrite all of
//!    them before it is frozen (the S3 store refuses a body shorter than
//!    asked for).
//! 3. The free pool holds at most [`POOL_BYTES`] of buffers (oldest
//!    dropped first), so it bounds the memory kept idle.

use std::sync::Mutex;

use bytes::Bytes;

/// Alignment (and size unit) of aligned buffers.
pub const PAGE: usize = 4096;

/// One aligned page of a buffer.
#[repr(C, align(4096))]
struct Page([u8; PAGE]);

/// A buffer of whole [`Page`]s (invariant 1).
pub struct AlignedBuf(Box<[Page]>);

impl AlignedBuf {
    /// A zeroed buffer of at least `len` bytes (zeroed by the allocator:
    /// large ones come as fresh zero pages, without a `memset`).
    pub fn new(len: usize) -> AlignedBuf {
        let pages = Box::<[Page]>::new_zeroed_slice(len.div_ceil(PAGE));
        // SAFETY: a `Page` is a plain byte array, for which all-zero bytes
        // are a valid value, and `new_zeroed_slice` zeroed every one.
        AlignedBuf(unsafe { pages.assume_init() })
    }

    /// Its size in bytes (a multiple of [`PAGE`]).
    pub fn capacity(&self) -> usize {
        self.0.len() * PAGE
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `Page` is `repr(C)` around a byte array whose size equals
        // its alignment, so the boxed slice is `capacity()` contiguous,
        // initialised bytes with no padding, owned by `self` and borrowed
        // shared here.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.capacity()) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.capacity();
        // SAFETY: as in `bytes`, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// Free capacity the pool keeps at most (invariant 3).
pub const POOL_BYTES: usize = 32 << 20;

/// Free buffers, oldest first.
pub struct Pool(Mutex<Vec<AlignedBuf>>);

/// The process's pool of body buffers.
static POOL: Pool = Pool::new();

impl Pool {
    const fn new() -> Pool {
        Pool(Mutex::new(Vec::new()))
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<AlignedBuf>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep `buf` for later, dropping the oldest free buffers to stay
    /// within [`POOL_BYTES`].
    fn give(&self, buf: AlignedBuf) {
        if buf.capacity() == 0 || buf.capacity() > POOL_BYTES {
            return;
        }
        let mut free = self.free();
        let mut held: usize = free.iter().map(AlignedBuf::capacity).sum();
        while held + buf.capacity() > POOL_BYTES && !free.is_empty() {
            held -= free.remove(0).capacity();
        }
        free.push(buf);
    }
}

/// An aligned buffer of `len` bytes from the pool, given back to it when
/// dropped (also as the owner of the [`Bytes`] made by [`PooledBuf::freeze`]).
pub struct PooledBuf {
    buf: AlignedBuf,
    len: usize,
    pool: &'static Pool,
}

impl PooledBuf {
    /// A buffer of `len` bytes (invariant 2): a free one that fits without
    /// wasting more than its length, else a new one.
    pub fn take(len: usize) -> PooledBuf {
        PooledBuf::take_from(&POOL, len)
    }

    fn take_from(pool: &'static Pool, len: usize) -> PooledBuf {
        let found = {
            let mut free = pool.free();
            let fits = |b: &AlignedBuf| b.capacity() >= len && b.capacity() <= 2 * len.max(PAGE);
            free.iter().position(fits).map(|i| free.remove(i))
        };
        PooledBuf {
            buf: found.unwrap_or_else(|| AlignedBuf::new(len)),
            len,
            pool,
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf.bytes_mut()[..self.len]
    }

    /// The bytes, shared; the buffer returns to the pool when the last
    /// `Bytes` of it is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf.bytes()[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::replace(&mut self.buf, AlignedBuf(Box::new([])));
        self.pool.give(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_pool() -> &'static Pool {
        Box::leak(Box::new(Pool::new()))
    }

    #[test]
    fn buffers_are_aligned_exact_and_reused() {
        let pool = own_pool();
        let mut a = PooledBuf::take_from(pool, 3 * PAGE + 5);
        assert_eq!(a.bytes_mut().len(), 3 * PAGE + 5);
        assert_eq!(a.bytes_mut().as_ptr() as usize % PAGE, 0);
        a.bytes_mut().fill(9);
        let ptr = a.bytes_mut().as_ptr();
        let bytes = a.freeze();
        assert_eq!(bytes.len(), 3 * PAGE + 5);
        assert!(bytes.iter().all(|&b| b == 9));
        let tail = bytes.slice(PAGE..);
        drop(bytes);
        assert_eq!(tail.len(), 2 * PAGE + 5, "a slice keeps the buffer alive");
        drop(tail);
        let mut b = PooledBuf::take_from(pool, 2 * PAGE);
        assert_eq!(b.bytes_mut().as_ptr(), ptr, "the freed buffer was reused");
        assert_eq!(b.bytes_mut().len(), 2 * PAGE);
        // Too large for what is asked: a new buffer.
        let mut c = PooledBuf::take_from(pool, 1);
        assert!(c.bytes_mut().iter().all(|&x| x == 0));
    }

    #[test]
    fn the_pool_stays_within_its_bound() {
        let pool = own_pool();
        let bufs: Vec<PooledBuf> = (0..3 * POOL_BYTES / (1 << 20))
            .map(|_| PooledBuf::take_from(pool, 1 << 20))
            .collect();
        drop(bufs);
        let held: usize = pool.free().iter().map(AlignedBuf::capacity).sum();
        assert_eq!(held, POOL_BYTES);
    }
}
