//! Writing an object file around the page cache (`O_DIRECT`), for bodies
//! marked streamed ([`crate::store::Body::streamed`]).
//!
//! Why: a chunk built from large sequential writes was copied into the
//! page cache and written back from there: on the local-directory store
//! that copy and its writeback were about a quarter of the server's CPU
//! per byte in 1 MiB write streams. Data streamed in large writes is
//! seldom read back soon (the same reasoning as a block cache's
//! sequential cutoff), so for it that copy buys nothing.
//!
//! Invariants:
//! 1. The file ends up holding exactly the given bytes: they are copied
//!    piece by piece into one page-aligned buffer of at most [`PIECE`]
//!    bytes, each piece written at its offset with `O_DIRECT`; the last
//!    piece is padded with zeros to a whole page, and the file is then
//!    cut to the exact length. (Durability is the caller's: it still
//!    fsyncs the file.)
//! 2. Where the file system refuses `O_DIRECT` (tmpfs), or refuses such a
//!    write as invalid, nothing written here stays in the file (it is cut
//!    to zero if a piece went in) and the caller writes it through the
//!    page cache instead, as any other object; that is logged once per
//!    process.
//! 3. The file's descriptor is left as it was found (without `O_DIRECT`),
//!    whether the write worked or not.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::Once;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::store::aligned::{write_padded, PooledBuf, PAGE};

/// Most bytes written at once (the bounce buffer's size).
pub const PIECE: usize = 4 << 20;

/// Write `head` then `parts`, concatenated, from offset 0 of `f` with
/// `O_DIRECT` (invariant 1), and cut `f` to their length. `Ok(false)`:
/// the file system refuses `O_DIRECT` (invariant 2).
pub fn write_around(f: &File, head: &[u8], parts: &[bytes::Bytes]) -> io::Result<bool> {
    let flags =
        OFlag::from_bits_retain(fcntl(f.as_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?);
    if let Err(e) = fcntl(f.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_DIRECT)) {
        refused(&io::Error::from(e));
        return Ok(false);
    }
    let written = write_pieces(f, head, parts);
    // Invariant 3, before any error of the write is returned.
    fcntl(f.as_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    match written {
        Ok(len) => {
            f.set_len(len)?;
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Invariant 2: whatever pieces went in are dropped.
            refused(&e);
            f.set_len(0)?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Log, once per process, that `O_DIRECT` is refused (invariant 2).
fn refused(e: &io::Error) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::info!(
            "the store's file system refuses O_DIRECT ({e}); streamed chunks go through the page cache"
        );
    });
}

/// The pieces of invariant 1; returns the bytes' length.
fn write_pieces(f: &File, head: &[u8], parts: &[bytes::Bytes]) -> io::Result<u64> {
    let total = head.len() + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut buf = PooledBuf::take(total.next_multiple_of(PAGE).clamp(PAGE, PIECE));
    let bytes = std::iter::once(head).chain(parts.iter().map(|p| &p[..]));
    write_padded(f, 0, bytes, buf.bytes_mut())?;
    Ok(total as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn pattern(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>()
            .into()
    }

    #[test]
    fn the_file_holds_exactly_the_bytes_and_none_are_cached() {
        // The data disk's file system (/var/tmp), not a tmpfs /tmp.
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let path = dir.path().join("o");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        // Longer first, then shorter over it (a spare rewritten): sizes
        // around a page and across pieces, odd part boundaries.
        let cases: [(usize, &[usize]); 4] = [
            (16, &[PIECE + 5000, 3, PAGE - 16]),
            (16, &[1]),
            (16, &[PAGE - 16]),
            (0, &[]),
        ];
        for (round, (head_len, lens)) in cases.iter().enumerate() {
            let head = pattern(*head_len, 200);
            let parts: Vec<Bytes> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| pattern(n, (round * 10 + i) as u8))
                .collect();
            match write_around(&f, &head, &parts).expect("write") {
                true => {}
                false => {
                    eprintln!("SKIP: /var/tmp refuses O_DIRECT here; nothing to test");
                    return;
                }
            }
            let want: Vec<u8> = std::iter::once(&head)
                .chain(&parts)
                .flat_map(|p| p.iter().copied())
                .collect();
            let got = std::fs::read(&path).expect("read back");
            assert_eq!(got.len(), want.len(), "round {round}: length");
            assert!(got == want, "round {round}: bytes differ");
        }
        // A fresh write leaves none of its pages in the page cache.
        let big = [pattern(3 * PAGE, 7)];
        let g = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("p"))
            .expect("open");
        assert!(write_around(&g, b"", &big).expect("write"));
        assert_eq!(
            crate::test_page_cache::resident_pages(&g, 3 * PAGE),
            0,
            "written around the cache"
        );
        let flags = fcntl(g.as_fd(), FcntlArg::F_GETFL).expect("flags");
        assert_eq!(
            flags & libc::O_DIRECT,
            0,
            "descriptor left without O_DIRECT"
        );
    }
}
