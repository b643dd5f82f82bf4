//! `O_DIRECT` writes of cache windows: the bytes go from an aligned buffer
//! to the disk without a copy into the page cache, and (on ext4 and xfs)
//! without holding the file's inode lock for the length of a copy.
//!
//! Invariants:
//! 1. A direct write starts at a [`ALIGN`]-aligned file offset, from an
//!    [`ALIGN`]-aligned buffer, and its length is a multiple of [`ALIGN`]:
//!    the windows' bytes (one or more windows of consecutive slots, every
//!    one but the last a whole slot) followed by zeros up to the next
//!    boundary. Bytes already in aligned memory with an aligned length (a
//!    GET body received into a [`crate::store::aligned::PooledBuf`]) are
//!    written from where they are; others are copied into a per-thread
//!    aligned buffer first. Slots are [`super::SLOT`] bytes, a multiple of [`ALIGN`],
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
use crate::store::aligned::{write_padded, AlignedBuf, PAGE};

/// Alignment of direct writes (offset, buffer and length).
pub const ALIGN: usize = PAGE;
const _: () = assert!((SLOT as usize).is_multiple_of(ALIGN));

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

/// Write `data` at `at` (a multiple of [`ALIGN`]; at most [`MAX_WRITE`]
/// bytes) through `direct`, padded with zeros (invariant 1); through
/// `buffered` when the direct write is refused (invariant 2) or the
/// request does not fit it. Returns how many bytes of `data` were copied
/// into the aligned buffer first (0 when written from where they are, or
/// through the page cache).
pub fn write_at(direct: &File, buffered: &File, data: &[u8], at: u64) -> io::Result<usize> {
    let len = data.len();
    if len > MAX_WRITE || !at.is_multiple_of(ALIGN as u64) {
        return buffered.write_all_at(data, at).map(|()| 0);
    }
    let mut copied = 0;
    let res = if (data.as_ptr() as usize).is_multiple_of(ALIGN) && len.is_multiple_of(ALIGN) {
        direct.write_all_at(data, at)
    } else {
        copied = len;
        let padded = len.div_ceil(ALIGN) * ALIGN;
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.capacity() < padded {
                *buf = AlignedBuf::new(padded);
            }
            write_padded(direct, at, [data], &mut buf.bytes_mut()[..padded]).map(|_| ())
        })
    };
    match res {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            buffered.write_all_at(data, at).map(|()| copied)
        }
        other => other.map(|()| copied),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A new, empty file at `path`, opened for reading and writing
    /// through the page cache.
    fn scratch(path: &std::path::Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_short_window_is_written_whole_and_padded_inside_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let buffered = scratch(&path);
        buffered.set_len(3 * SLOT).unwrap();
        buffered.write_all_at(&[0xee; SLOT as usize], SLOT).unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        match open(&path) {
            Some(direct) => {
                let copied = write_at(&direct, &buffered, &data, SLOT).unwrap();
                assert_eq!(copied, data.len(), "a short window is copied to be padded");
            }
            None => eprintln!("no O_DIRECT here: testing the buffered fallback only"),
        }
        let fallback = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        write_at(&fallback, &buffered, &data, 2 * SLOT).unwrap();
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

    #[test]
    fn aligned_bytes_are_written_from_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let buffered = scratch(&path);
        buffered.set_len(4 * SLOT).unwrap();
        let mut src = AlignedBuf::new(3 * SLOT as usize);
        for (i, b) in src.bytes_mut().iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        let direct = open(&path);
        let file = direct.as_ref().unwrap_or(&buffered);
        // Two whole windows from aligned memory, then one from an
        // unaligned address (copied first).
        let copied = write_at(file, &buffered, &src.bytes()[..2 * SLOT as usize], SLOT).unwrap();
        assert_eq!(copied, 0, "aligned bytes are not copied");
        let copied = write_at(
            file,
            &buffered,
            &src.bytes()[1..SLOT as usize + 1],
            3 * SLOT,
        )
        .unwrap();
        if direct.is_some() {
            assert_eq!(copied, SLOT as usize, "unaligned bytes are copied first");
        }
        let mut got = vec![0u8; 3 * SLOT as usize];
        buffered.read_exact_at(&mut got, SLOT).unwrap();
        assert_eq!(&got[..2 * SLOT as usize], &src.bytes()[..2 * SLOT as usize]);
        assert_eq!(
            &got[2 * SLOT as usize..],
            &src.bytes()[1..SLOT as usize + 1]
        );
    }
}
