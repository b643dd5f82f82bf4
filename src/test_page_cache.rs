//! Test support: what the page cache holds of a file.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Pages of `f`'s first `len` bytes the page cache holds (`mincore` of a
/// mapping; mapping a file does not read it in).
pub fn resident_pages(f: &File, len: usize) -> usize {
    let page = 4096;
    let pages = len.div_ceil(page);
    // SAFETY: a fresh shared read-only mapping of `len` bytes of an open
    // file, used only for `mincore` and unmapped before return; `vec` has
    // one byte per page of it.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED, "mmap");
        let mut vec = vec![0u8; pages];
        let r = libc::mincore(map, len, vec.as_mut_ptr());
        libc::munmap(map, len);
        assert_eq!(r, 0, "mincore");
        vec.iter().filter(|b| *b & 1 == 1).count()
    }
}
