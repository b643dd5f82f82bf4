//! Reads that never wait for the disk: served from the page cache or not
//! at all (`preadv2` with `RWF_NOWAIT`).
//!
//! The read path tries these first on the frontend's own thread; whatever
//! they cannot serve is read on the blocking pool (see `read.rs`), so a
//! frontend thread never sleeps on a disk read.
//!
//! Invariant: `Ok(true)` means every byte of `buf` was filled from `off`;
//! `Ok(false)` means nothing can be assumed about `buf` (part of it may
//! have been written) and the caller must read again, blocking.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The kernel's `struct open_how` (first version: three `u64`s).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Open `path` read-only if every component of it is in the kernel's
/// lookup cache (`openat2` with `RESOLVE_CACHED`), so the open needs no
/// disk read; `None` otherwise (not cached, missing, or a kernel without
/// `openat2`): the caller opens it the blocking way, which reports errors.
pub fn open_cached(path: &Path) -> Option<File> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_CACHED,
    };
    // SAFETY: `c` is a NUL-terminated path and `how` a valid `open_how`
    // (the kernel's layout, version 0), both alive for the call; the size
    // passed is `how`'s own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return None;
    }
    let fd = i32::try_from(fd).ok()?;
    // SAFETY: `fd` was just opened by this call and is owned by nobody else.
    Some(unsafe { File::from_raw_fd(fd) })
}

/// Fill `buf` from `off` if the page cache holds all of it; `Ok(false)`
/// when it does not (or the file system cannot tell without waiting).
pub fn read_cached_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<bool> {
    if buf.is_empty() {
        return Ok(true);
    }
    let at = libc::off_t::try_from(off)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    let vec = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: `vec` points into `buf`, an exclusive borrow of
        // `buf.len()` bytes that outlives the call; the descriptor is owned
        // by `file`, which is borrowed for the call.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &vec, 1, at, libc::RWF_NOWAIT) };
        if n >= 0 {
            // A short read means the rest is not cached (or the file
            // ends): the blocking read finishes or reports it.
            return Ok(n as usize == buf.len());
        }
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Not cached, or this file system cannot say without waiting.
            // (EINVAL: a kernel without RWF_NOWAIT; the blocking read
            // reports a real EINVAL.)
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL) => Ok(false),
            _ => Err(e),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cached_bytes_are_read_and_bytes_past_the_end_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..16384u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let file = File::open(&path).unwrap();
        // Just written through the page cache: cached (or, on a file
        // system without RWF_NOWAIT, refused; never wrong bytes).
        let mut buf = vec![0u8; 4096];
        if read_cached_at(&file, &mut buf, 4096).unwrap() {
            assert_eq!(buf, &data[4096..8192]);
        }
        // Past the end of the file: never claimed as read.
        let mut past = vec![0u8; 4096];
        assert!(!read_cached_at(&file, &mut past, 16384).unwrap());
        // Straddling the end: never claimed as read either.
        let mut straddle = vec![0u8; 8192];
        assert!(!read_cached_at(&file, &mut straddle, 12288).unwrap());
        // Empty reads are trivially complete.
        assert!(read_cached_at(&file, &mut [], 0).unwrap());
    }

    #[test]
    fn open_cached_opens_a_cached_file_and_never_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        std::fs::metadata(&path).unwrap();
        // Just created, so cached (unless the kernel lacks openat2).
        if let Some(f) = open_cached(&path) {
            let mut buf = [0u8; 3];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0).unwrap();
            assert_eq!(&buf, b"abc");
        }
        assert!(open_cached(&dir.path().join("missing")).is_none());
    }
}
