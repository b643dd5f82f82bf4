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
//! 4. A [`PooledBuf`] taken with a lead ([`PooledBuf::take_placed`]) starts
//!    `lead` bytes (less than a [`PAGE`]) into its aligned buffer: its byte
//!    `i` lies at an address `lead + i` past a page boundary. A body whose
//!    page-sized blocks begin at some offset `o` (a chunk's data area, after
//!    a header of any length) is received at the lead
//!    [`PooledBuf::lead_for`] gives, so those blocks land page-aligned and
//!    go to the read cache with `O_DIRECT` without a copy.
//! 5. A buffer of at least [`HUGE`] bytes is its own anonymous mapping,
//!    starting on a [`HUGE`] boundary, with its whole [`HUGE`] spans
//!    advised as transparent huge pages (`MADV_HUGEPAGE`; where the
//!    kernel ignores the advice it is an ordinary mapping). A 4 MiB
//!    chunk body then costs two page faults instead of a thousand, and
//!    the kernel pins two pages, not a thousand, for each `O_DIRECT`
//!    cache fill from it (`gup_fast_fallback` under the fill's `pwrite`
//!    was 4.6% of the server's CPU in a cold sequential read, `perf`). Its pages come
//!    zeroed from the kernel, so it needs no `memset` either.
//! 6. Such a mapping is a whole number of [`MAP_STEP`]s long, whatever
//!    length was asked for, so bodies a few KiB apart in length fit each
//!    other's buffers in the pool. Mapped at the exact length, a WAL span
//!    of 4 MiB and a few KiB rarely fitted the buffer of the span before
//!    it: while destaging 1 MiB writes to S3, fresh mappings and the
//!    kernel clearing their huge pages were about 10% of the server's CPU
//!    (`perf`), 35K page faults in 3 s; 2.3K once buffers were shared.
//!    The step is half a huge page, so a buffer long enough for a 4 MiB
//!    body has at least 4 MiB of huge pages: one made for a body of two
//!    and a bit (a 3 MiB mapping, one huge page and small ones) is too
//!    short to be handed out for it (a write from small pages reaches the
//!    disk as more, smaller requests).

use bytes::Bytes;
use std::ptr::NonNull;

use super::free_list::{Capacity, FreeList};

/// Alignment (and size unit) of aligned buffers.
pub const PAGE: usize = 4096;

/// One aligned page of a buffer.
#[repr(C, align(4096))]
struct Page([u8; PAGE]);

/// Size (and alignment) of a transparent huge page on x86-64 and arm64
/// with 4 KiB pages; buffers this large are mapped on their own
/// (invariant 5).
pub const HUGE: usize = 2 << 20;

/// Unit of a mapped buffer's length (invariant 6).
pub const MAP_STEP: usize = 1 << 20;
const _: () = assert!(HUGE.is_multiple_of(MAP_STEP) && MAP_STEP.is_multiple_of(PAGE));

/// A buffer of whole [`Page`]s (invariant 1).
pub struct AlignedBuf(Memory);

/// Where an [`AlignedBuf`]'s pages live.
enum Memory {
    /// From the allocator (buffers under [`HUGE`] bytes, or when a mapping
    /// failed).
    Heap(Box<[Page]>),
    /// A private anonymous mapping of `len` bytes (a multiple of [`PAGE`])
    /// at `ptr`, a [`HUGE`] boundary, owned by the buffer (invariant 5).
    Mapped { ptr: NonNull<u8>, len: usize },
}

// SAFETY: a `Mapped` buffer exclusively owns its mapping, like a `Box`
// owns its allocation; shared access gives only `&[u8]` and mutation
// needs `&mut self`, so moving it to or sharing it with another thread is
// as safe as for `Box<[u8]>`.
unsafe impl Send for Memory {}
// SAFETY: as above.
unsafe impl Sync for Memory {}

impl AlignedBuf {
    /// A zeroed buffer of at least `len` bytes (zeroed by the allocator or
    /// the kernel: large ones come as fresh zero pages, without a
    /// `memset`).
    pub fn new(len: usize) -> AlignedBuf {
        if len >= HUGE {
            if let Some(mem) = map_huge(len.next_multiple_of(MAP_STEP)) {
                return AlignedBuf(mem);
            }
        }
        let pages = Box::<[Page]>::new_zeroed_slice(len.div_ceil(PAGE));
        // SAFETY: a `Page` is a plain byte array, for which all-zero bytes
        // are a valid value, and `new_zeroed_slice` zeroed every one.
        AlignedBuf(Memory::Heap(unsafe { pages.assume_init() }))
    }

    /// A buffer of no bytes.
    fn empty() -> AlignedBuf {
        AlignedBuf(Memory::Heap(Box::new([])))
    }

    /// Its size in bytes (a multiple of [`PAGE`]).
    pub fn capacity(&self) -> usize {
        match &self.0 {
            Memory::Heap(pages) => pages.len() * PAGE,
            Memory::Mapped { len, .. } => *len,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.0 {
            // SAFETY: `Page` is `repr(C)` around a byte array whose size
            // equals its alignment, so the boxed slice is `capacity()`
            // contiguous, initialised bytes with no padding, owned by
            // `self` and borrowed shared here.
            Memory::Heap(pages) => unsafe {
                std::slice::from_raw_parts(pages.as_ptr().cast::<u8>(), pages.len() * PAGE)
            },
            // SAFETY: the mapping is `len` readable bytes owned by `self`
            // until it is dropped, initialised (zero pages from the kernel,
            // or bytes written through `bytes_mut`), borrowed shared here.
            Memory::Mapped { ptr, len } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            // SAFETY: as in `bytes`, borrowed mutably here.
            Memory::Heap(pages) => unsafe {
                std::slice::from_raw_parts_mut(pages.as_mut_ptr().cast::<u8>(), pages.len() * PAGE)
            },
            // SAFETY: as in `bytes` (the mapping is writable), borrowed
            // mutably here through `&mut self`.
            Memory::Mapped { ptr, len } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), *len)
            },
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Memory::Mapped { ptr, len } = *self {
            // SAFETY: the mapping was made by `map_huge` with exactly this
            // address and length, is owned by this buffer alone, and no
            // borrow of it outlives the buffer.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
        }
    }
}

/// A fresh anonymous mapping of `len` bytes (rounded up to whole pages)
/// starting on a [`HUGE`] boundary, its whole [`HUGE`] spans advised as
/// huge pages (invariant 5); `None` if the kernel refuses the mapping.
fn map_huge(len: usize) -> Option<Memory> {
    let len = len.div_ceil(PAGE) * PAGE;
    // Map a huge page more than needed, then give back what lies before
    // the first huge page boundary and after the buffer.
    let span = len.checked_add(HUGE)?;
    // SAFETY: a new private anonymous mapping at an address the kernel
    // chooses touches no memory anyone owns.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let head = (base as usize).next_multiple_of(HUGE) - base as usize;
    let tail = span - head - len;
    // SAFETY: `base` is the start of the `span` bytes just mapped; `head`
    // and `tail` (page multiples: `base`, `len` and `HUGE` are) are the
    // parts of it before and after the buffer, which nothing refers to.
    let start = unsafe {
        let start = base.cast::<u8>().add(head);
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap(start.add(len).cast(), tail);
        }
        start
    };
    // SAFETY: advice on whole huge pages of our own mapping: it changes
    // no contents, and a kernel without THP only refuses it.
    unsafe { libc::madvise(start.cast(), len / HUGE * HUGE, libc::MADV_HUGEPAGE) };
    Some(Memory::Mapped {
        ptr: NonNull::new(start)?,
        len,
    })
}

/// Free capacity the pool keeps at most (invariant 3).
pub const POOL_BYTES: usize = 32 << 20;

/// Free buffers, oldest first (invariant 3).
pub type Pool = FreeList<AlignedBuf>;

/// The process's pool of body buffers.
static POOL: Pool = new_pool();

/// A pool keeping buffers of any size up to [`POOL_BYTES`].
const fn new_pool() -> Pool {
    FreeList::new(1, POOL_BYTES, PAGE)
}

impl Capacity for AlignedBuf {
    fn capacity(&self) -> usize {
        AlignedBuf::capacity(self)
    }
}

/// An aligned buffer of `len` bytes from the pool, given back to it when
/// dropped (also as the owner of the [`Bytes`] made by [`PooledBuf::freeze`]).
pub struct PooledBuf {
    buf: AlignedBuf,
    /// Where the bytes start in `buf` (invariant 4; less than [`PAGE`]).
    lead: usize,
    len: usize,
    pool: &'static Pool,
}

impl PooledBuf {
    /// A buffer of `len` bytes (invariant 2): a free one that fits without
    /// wasting more than its length, else a new one.
    pub fn take(len: usize) -> PooledBuf {
        PooledBuf::take_from(&POOL, len, 0)
    }

    /// A buffer of `len` bytes whose first byte lies `lead % PAGE` bytes
    /// past a page boundary (invariant 4).
    pub fn take_placed(len: usize, lead: usize) -> PooledBuf {
        PooledBuf::take_from(&POOL, len, lead % PAGE)
    }

    /// The lead that puts object offset `page_at` on a page boundary, for
    /// a body that starts at object offset `start` (`page_at` may lie
    /// before or after it: offsets a whole number of pages apart share a
    /// lead).
    pub fn lead_for(start: u64, page_at: u64) -> usize {
        // PAGE divides 2^64, so the wrapped difference has the right residue.
        (start.wrapping_sub(page_at) % PAGE as u64) as usize
    }

    fn take_from(pool: &'static Pool, len: usize, lead: usize) -> PooledBuf {
        let need = lead + len;
        PooledBuf {
            buf: pool
                .take_fitting(need)
                .unwrap_or_else(|| AlignedBuf::new(need)),
            lead,
            len,
            pool,
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf.bytes_mut()[self.lead..self.lead + self.len]
    }

    /// The bytes, shared; the buffer returns to the pool when the last
    /// `Bytes` of it is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf.bytes()[self.lead..self.lead + self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::replace(&mut self.buf, AlignedBuf::empty());
        self.pool.give(buf);
    }
}

/// Write `parts`, concatenated, into `f` (opened with `O_DIRECT`) from
/// offset `at` (a multiple of [`PAGE`]), copied piece by piece through
/// `buf` (page-aligned and a whole number of pages long, such as the
/// bytes of an [`AlignedBuf`] or of a [`PooledBuf`] taken so). Every
/// write starts on a page of the file and is whole pages long: the last
/// piece is padded with zeros to a page, so the file may end up to a page
/// short of one longer than the bytes (its caller cuts it, or a record of
/// its own says where the bytes end). Returns the bytes' length.
pub fn write_padded<'a>(
    f: &std::fs::File,
    at: u64,
    parts: impl IntoIterator<Item = &'a [u8]>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    debug_assert!(at.is_multiple_of(PAGE as u64));
    debug_assert!((buf.as_ptr() as usize).is_multiple_of(PAGE) && buf.len().is_multiple_of(PAGE));
    let size = buf.len();
    let (mut filled, mut pos, mut total) = (0usize, at, 0usize);
    for mut src in parts {
        total += src.len();
        while !src.is_empty() {
            let n = src.len().min(size - filled);
            buf[filled..filled + n].copy_from_slice(&src[..n]);
            filled += n;
            src = &src[n..];
            if filled == size {
                f.write_all_at(buf, pos)?;
                pos += size as u64;
                filled = 0;
            }
        }
    }
    if filled > 0 {
        let padded = filled.next_multiple_of(PAGE);
        buf[filled..padded].fill(0);
        f.write_all_at(&buf[..padded], pos)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_pool() -> &'static Pool {
        Box::leak(Box::new(new_pool()))
    }

    #[test]
    fn buffers_are_aligned_exact_and_reused() {
        let pool = own_pool();
        let mut a = PooledBuf::take_from(pool, 3 * PAGE + 5, 0);
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
        let mut b = PooledBuf::take_from(pool, 2 * PAGE, 0);
        assert_eq!(b.bytes_mut().as_ptr(), ptr, "the freed buffer was reused");
        assert_eq!(b.bytes_mut().len(), 2 * PAGE);
        // Too large for what is asked: a new buffer.
        let mut c = PooledBuf::take_from(pool, 1, 0);
        assert!(c.bytes_mut().iter().all(|&x| x == 0));
    }

    #[test]
    fn a_placed_buffer_puts_the_chosen_byte_on_a_page_boundary() {
        let pool = own_pool();
        for at in [0u64, 1, 100, 4095, 4096, 4097, 12_345] {
            let lead = PooledBuf::lead_for(0, at);
            assert_eq!(lead, PooledBuf::lead_for(1 << 30, (1 << 30) + at));
            assert_eq!(lead, PooledBuf::lead_for(at + 3 * PAGE as u64, 2 * at));
            assert!(lead < PAGE, "{at}");
            let mut b = PooledBuf::take_from(pool, 3 * PAGE, lead);
            let bytes = b.bytes_mut();
            assert_eq!(bytes.len(), 3 * PAGE);
            for (i, x) in bytes.iter_mut().enumerate() {
                *x = (i % 251) as u8;
            }
            if (at as usize) < bytes.len() {
                let p = bytes[at as usize..].as_ptr() as usize;
                assert_eq!(p % PAGE, 0, "byte {at} of a body with lead {lead}");
            }
            let frozen = b.freeze();
            assert_eq!(frozen.len(), 3 * PAGE);
            assert!(frozen
                .iter()
                .enumerate()
                .all(|(i, &x)| x == (i % 251) as u8));
        }
    }

    #[test]
    fn a_large_buffer_is_its_own_mapping_on_a_huge_page_boundary() {
        for len in [HUGE, HUGE + 1, 4 * HUGE + 4100] {
            let mut buf = AlignedBuf::new(len);
            assert!(matches!(buf.0, Memory::Mapped { .. }), "{len}");
            assert_eq!(
                buf.capacity(),
                len.next_multiple_of(MAP_STEP),
                "invariant 6"
            );
            assert_eq!(buf.bytes().as_ptr() as usize % HUGE, 0, "{len}");
            assert!(buf.bytes().iter().all(|&b| b == 0), "fresh pages are zeros");
            let cap = buf.capacity();
            for (i, x) in buf.bytes_mut().iter_mut().enumerate() {
                *x = (i % 253) as u8;
            }
            assert!(buf
                .bytes()
                .iter()
                .enumerate()
                .all(|(i, &x)| x == (i % 253) as u8));
            assert_eq!(buf.bytes().len(), cap);
        }
        assert!(matches!(AlignedBuf::new(HUGE - 1).0, Memory::Heap(_)));
    }

    #[test]
    fn a_large_pooled_body_is_placed_reused_and_unchanged() {
        // A chunk GET's body: a header of odd length, then 4 MiB of data
        // that must land page-aligned, in a mapped buffer used again.
        let pool = own_pool();
        let header = 4100;
        let len = header + (4 << 20);
        let lead = PooledBuf::lead_for(0, header as u64);
        let mut a = PooledBuf::take_from(pool, len, lead);
        assert!(matches!(a.buf.0, Memory::Mapped { .. }));
        for (i, x) in a.bytes_mut().iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        assert_eq!(a.bytes_mut()[header..].as_ptr() as usize % PAGE, 0);
        let ptr = a.bytes_mut().as_ptr();
        let body = a.freeze();
        assert!(body.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
        drop(body);
        let mut b = PooledBuf::take_from(pool, len, lead);
        assert_eq!(b.bytes_mut().as_ptr(), ptr, "the mapping was reused");
    }

    /// WAL spans and chunk bodies a few KiB apart in length share
    /// buffers (invariant 6): a fresh mapping for each one costs the
    /// kernel a huge page to clear.
    #[test]
    fn large_bodies_of_nearby_lengths_share_a_buffer() {
        let pool = own_pool();
        let a = PooledBuf::take_from(pool, (4 << 20) + 8192, 0);
        let ptr = a.buf.bytes().as_ptr();
        drop(a);
        let b = PooledBuf::take_from(pool, (4 << 20) + 12_288, 0);
        assert_eq!(
            b.buf.bytes().as_ptr(),
            ptr,
            "a slightly longer body reuses it"
        );
        drop(b);
        let c = PooledBuf::take_from(pool, 4 << 20, 0);
        assert_eq!(
            c.buf.bytes().as_ptr(),
            ptr,
            "so does a slightly shorter one"
        );
        // One made for half a chunk never serves a whole one.
        let half = PooledBuf::take_from(pool, HUGE + 8192, 0);
        assert!(half.buf.capacity() < 4 << 20);
        drop(half);
        let d = PooledBuf::take_from(pool, 4 << 20, 0);
        assert!(d.buf.capacity() >= 4 << 20);
    }

    #[test]
    fn padded_writes_hold_the_bytes_in_whole_pages() {
        use std::os::unix::fs::OpenOptionsExt;
        // The data disk's file system (/var/tmp), not a tmpfs /tmp.
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let path = dir.path().join("f");
        let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        else {
            eprintln!("SKIP: /var/tmp refuses O_DIRECT here; nothing to test");
            return;
        };
        let a: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let b: Vec<u8> = (0..3 * PAGE as u32 + 7)
            .map(|i| (i % 13) as u8 + 1)
            .collect();
        let mut buf = AlignedBuf::new(2 * PAGE);
        // Pieces of two pages: parts cross them; the last one is padded.
        let n = write_padded(&f, PAGE as u64, [&a[..], &b[..], &[][..]], buf.bytes_mut())
            .expect("write");
        assert_eq!(n, a.len() + b.len());
        let got = std::fs::read(&path).expect("read");
        let end = PAGE + n;
        assert_eq!(got.len(), end.next_multiple_of(PAGE), "whole pages");
        assert!(got[..PAGE].iter().all(|&x| x == 0), "nothing before `at`");
        assert_eq!(&got[PAGE..PAGE + a.len()], &a[..]);
        assert_eq!(&got[PAGE + a.len()..end], &b[..]);
        assert!(got[end..].iter().all(|&x| x == 0), "zero padding");
    }

    #[test]
    fn the_pool_stays_within_its_bound() {
        let pool = own_pool();
        let bufs: Vec<PooledBuf> = (0..3 * POOL_BYTES / (1 << 20))
            .map(|_| PooledBuf::take_from(pool, 1 << 20, 0))
            .collect();
        drop(bufs);
        let held = pool.held();
        assert_eq!(held, POOL_BYTES);
    }
}
