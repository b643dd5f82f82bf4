//! `O_DIRECT` writes of cache windows: the bytes go from an aligned buffer
//! to the disk without a copy into the page cache, and (on ext4 and xfs)
//! without holding the file's inode lock for the length of a copy.
//!
//! Invariants:
//! 1. A direct write starts at a [`ALIGN`]-aligned file offset, from an
//!    [`ALIGN`]-aligned buffer, and its length is a multiple of [`ALIGN`]:
//!    the windows' bytes (one or more windows of consecutive slots, every
//!    one but the last a whole slot) followed by zeros up to the next
//!    boundary. Slots are [`super::SLOT`] bytes, a multiple of [`ALIGN`],
//!    so the padding stays inside the last window's own slot (and the
//!    index record's length says where the window's bytes end).
//! 2. Where the file system refuses a direct write (`EINVAL`), the window
//!    is written through the page cache instead; nothing is lost.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::SLOT;

/// Alignment of direct writes (offset, buffer and length).
pub const ALIGN: usize = 4096;
const _: () = assert!((SLOT as usize).is_multiple_of(ALIGN));

/// One aligned page of a buffer.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

/// A zeroed buffer of whole [`Page`]s.
struct AlignedBuf(Box<[Page]>);

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        AlignedBuf(vec![Page([0; ALIGN]); len.div_ceil(ALIGN)].into_boxed_slice())
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.0.len() * ALIGN;
        // SAFETY: `Page` is `repr(C)` around a byte array whose size equals
        // its alignment, so the boxed slice is `len` contiguous, initialised
        // bytes with no padding, owned by `self` and borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }
}

thread_local! {
    /// A buffer per thread that fills the cache, grown to the largest
    /// write it made (at most [`MAX_WRITE`]).
    static BUF: RefCell<AlignedBuf> = RefCell::new(AlignedBuf::new(SLOT as usize));
}

/// Largest direct write (longer runs of windows are written in parts).
pub const MAX_WRITE: usize = 1 << 20;
const _: () = assert!(MAX_WRITE.is_multiple_of(SLOT as usize));

/// Open `path` (which exists) for direct writes; `None` where the file
/// system refuses `O_DIRECT` (tmpfs, for one), logged once per open.
pub fn open(path: &Path) -> Option<File> {
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            log::info!(
                "read cache {}: no O_DIRECT ({e}); filling through the page cache",
                path.display()
            );
            None
        }
    }
}

/// Write `parts` back to back at `at` (a multiple of [`ALIGN`]; together
/// at most [`MAX_WRITE`] bytes) through `direct`, padded with zeros
/// (invariant 1); through `buffered` when the direct write is refused
/// (invariant 2) or the request does not fit it.
pub fn write_at(direct: &File, buffered: &File, parts: &[&[u8]], at: u64) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let buffered_write = || {
        let mut off = at;
        for p in parts {
            buffered.write_all_at(p, off)?;
            off += p.len() as u64;
        }
        Ok(())
    };
    if len > MAX_WRITE || !at.is_multiple_of(ALIGN as u64) {
        return buffered_write();
    }
    let padded = len.div_ceil(ALIGN) * ALIGN;
    let res = BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.0.len() * ALIGN < padded {
            *buf = AlignedBuf::new(padded);
        }
        let bytes = &mut buf.bytes_mut()[..padded];
        let mut n = 0;
        for p in parts {
            bytes[n..n + p.len()].copy_from_slice(p);
            n += p.len();
        }
        bytes[n..].fill(0);
        direct.write_all_at(bytes, at)
    });
    match res {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => buffered_write(),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_short_window_is_written_whole_and_padded_inside_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let buffered = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        buffered.set_len(3 * SLOT).unwrap();
        buffered.write_all_at(&[0xee; SLOT as usize], SLOT).unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        match open(&path) {
            Some(direct) => write_at(&direct, &buffered, &[&data], SLOT).unwrap(),
            None => eprintln!("no O_DIRECT here: testing the buffered fallback only"),
        }
        let fallback = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        write_at(
            &fallback,
            &buffered,
            &[&data[..100], &data[100..]],
            2 * SLOT,
        )
        .unwrap();
        for slot in [1, 2] {
            let mut got = vec![0u8; SLOT as usize];
            buffered.read_exact_at(&mut got, slot * SLOT).unwrap();
            assert_eq!(&got[..data.len()], &data[..], "slot {slot}");
            if slot == 1 && open(&path).is_some() {
                assert!(
                    got[data.len()..8192].iter().all(|&b| b == 0),
                    "padding is zeros"
                );
                assert!(
                    got[8192..].iter().all(|&b| b == 0xee),
                    "nothing past the padding"
                );
            }
        }
        let mut first = vec![1u8; SLOT as usize];
        buffered.read_exact_at(&mut first, 0).unwrap();
        assert!(
            first.iter().all(|&b| b == 0),
            "the slot before is untouched"
        );
    }
}
