//! Buffered writes in pieces of at most [`PIECE`] bytes.
//!
//! The page cache sizes the folios a buffered write allocates after the
//! write: one 4 MiB `write` to a new file takes 2 MiB folios (order 9).
//! On a virtual machine whose balloon reports free memory to the host
//! (virtio-balloon free page reporting, at order 9 here), a free 2 MiB
//! block is usually one the host has taken back, so each such folio costs
//! the host a fault and a 2 MiB clear. Measured on this machine kind
//! (`tools/bench-write-pieces.sh`): a 4 MiB object written and
//! `fdatasync`ed in one `write` took 30-35 ms; the same in 256 KiB
//! writes, 3.6-4.2 ms. On the server, chunk files written whole took 34%
//! of its CPU under 4K random writes (`perf`). Smaller writes cost a few
//! more system calls and nothing else, so the big buffered writers go
//! through here: the local-directory store's object files and the WAL's
//! buffered batches. (The WAL's single durable write, `RWF_DSYNC`, stays
//! one call: splitting it would need a sync per piece.)
//!
//! Invariant: no single call writes more than [`PIECE`] bytes; together
//! the calls write exactly the bytes asked for, in order, or fail.

use std::fs::File;
use std::io::{self, IoSlice};

/// Most bytes one buffered write call carries (a quarter of a MiB: well
/// under the 2 MiB folios whose allocation is slow, see the module docs).
pub const PIECE: usize = 256 << 10;

/// Most slices one vectored write takes (Linux's `IOV_MAX`).
pub const MAX_SLICES: usize = 1024;

/// Write `parts` concatenated at `off`, gathered straight from where they
/// are: vectored writes of at most [`PIECE`] bytes and [`MAX_SLICES`]
/// slices each.
pub fn write_parts_at<P: AsRef<[u8]>>(file: &File, parts: &[P], off: u64) -> io::Result<()> {
    write_parts_with(parts, off, |iov, at| {
        let at = libc::off_t::try_from(at)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        loop {
            match nix::sys::uio::pwritev(file, iov, at) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    })
}

/// [`write_parts_at`] through `write` (one vectored write at an offset,
/// returning how much it wrote).
fn write_parts_with<P: AsRef<[u8]>>(
    parts: &[P],
    off: u64,
    mut write: impl FnMut(&[IoSlice<'_>], u64) -> io::Result<usize>,
) -> io::Result<()> {
    let mut owned: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p.as_ref())).collect();
    let mut rest: &mut [IoSlice<'_>] = &mut owned;
    let mut off = off;
    while !rest.is_empty() {
        let n = rest.len().min(MAX_SLICES);
        let written = write(&first_piece(&rest[..n], PIECE), off)?;
        if written == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes"));
        }
        off += written as u64;
        IoSlice::advance_slices(&mut rest, written);
    }
    Ok(())
}

/// The first at most `max` bytes of `slices` as slices of their own (the
/// last one cut short if need be), for one vectored write.
pub fn first_piece<'a>(slices: &'a [IoSlice<'_>], max: usize) -> Vec<IoSlice<'a>> {
    let mut out = Vec::with_capacity(slices.len());
    let mut room = max;
    for s in slices {
        if room == 0 {
            break;
        }
        let take = s.len().min(room);
        out.push(IoSlice::new(&s[..take]));
        room -= take;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn writes_everything_in_calls_of_at_most_a_piece() {
        let data: Vec<u8> = (0..(PIECE * 3 + 12345)).map(|i| (i % 251) as u8).collect();
        let parts = [&data[..10], &data[10..PIECE + 3], &data[PIECE + 3..]];
        let (mut got, mut calls) = (vec![0u8; 7], Vec::new());
        write_parts_with(&parts, 7, |iov, off| {
            let asked: usize = iov.iter().map(|s| s.len()).sum();
            calls.push((asked, iov.len()));
            // Writes at most 100 KiB per call, so the caller must loop.
            let mut n = 0;
            for s in iov {
                let take = s.len().min((100 << 10) - n);
                assert_eq!(got.len() as u64, off + n as u64, "written in order");
                got.extend_from_slice(&s[..take]);
                n += take;
            }
            Ok(n)
        })
        .unwrap();
        assert_eq!(&got[7..], &data[..]);
        assert!(calls.iter().all(|&(n, s)| n <= PIECE && s <= MAX_SLICES));
        assert!(calls.len() > 4, "split into pieces");
    }

    #[test]
    fn parts_are_written_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        // More slices than one call takes, and more bytes than a piece.
        let mut parts: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![i as u8; 1 + (i % 7) as usize])
            .collect();
        parts.push(vec![0xab; PIECE + 4097]);
        parts.push(Vec::new());
        parts.push(vec![0xcd; 3]);
        write_parts_at(&file, &parts, 5).unwrap();
        let want: Vec<u8> = parts.concat();
        let mut got = vec![0u8; want.len()];
        file.read_exact_at(&mut got, 5).unwrap();
        assert!(got == want);
        assert_eq!(file.metadata().unwrap().len(), 5 + want.len() as u64);
    }

    #[test]
    fn first_piece_cuts_at_the_limit() {
        let a = vec![1u8; PIECE - 10];
        let b = vec![2u8; 100];
        let c = vec![3u8; 5];
        let slices = [IoSlice::new(&a), IoSlice::new(&b), IoSlice::new(&c)];
        let p = first_piece(&slices, PIECE);
        let lens: Vec<usize> = p.iter().map(|s| s.len()).collect();
        assert_eq!(lens, vec![PIECE - 10, 10]);
        assert_eq!(p[1][0], 2);
        let p = first_piece(&slices[1..], PIECE);
        assert_eq!(p.iter().map(|s| s.len()).sum::<usize>(), 105);
        assert_eq!(
            first_piece(&slices, 3)
                .iter()
                .map(|s| s.len())
                .sum::<usize>(),
            3
        );
        assert!(first_piece(&[], PIECE).is_empty());
    }
}
