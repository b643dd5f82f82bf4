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

use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;

/// Most bytes one buffered write call carries (a quarter of a MiB: well
/// under the 2 MiB folios whose allocation is slow, see the module docs).
pub const PIECE: usize = 256 << 10;

/// Write all of `data` at `off` in calls of at most [`PIECE`] bytes.
pub fn write_all_at(file: &impl FileExt, data: &[u8], off: u64) -> io::Result<()> {
    let mut done = 0usize;
    for piece in data.chunks(PIECE) {
        file.write_all_at(piece, off + done as u64)?;
        done += piece.len();
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
    use std::cell::RefCell;

    /// A file that records each write call's length.
    #[derive(Default)]
    struct Recorder {
        bytes: RefCell<Vec<u8>>,
        calls: RefCell<Vec<usize>>,
    }

    impl FileExt for Recorder {
        fn read_at(&self, _buf: &mut [u8], _off: u64) -> io::Result<usize> {
            unreachable!("only written")
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<usize> {
            // Writes at most 100 KiB per call, so write_all_at must loop.
            let n = buf.len().min(100 << 10);
            let mut b = self.bytes.borrow_mut();
            let end = off as usize + n;
            if b.len() < end {
                b.resize(end, 0);
            }
            b[off as usize..end].copy_from_slice(&buf[..n]);
            self.calls.borrow_mut().push(buf.len());
            Ok(n)
        }
    }

    #[test]
    fn writes_everything_in_calls_of_at_most_a_piece() {
        let data: Vec<u8> = (0..(PIECE * 3 + 12345)).map(|i| (i % 251) as u8).collect();
        let f = Recorder::default();
        write_all_at(&f, &data, 7).unwrap();
        assert_eq!(&f.bytes.borrow()[7..], &data[..]);
        assert!(f.calls.borrow().iter().all(|&n| n <= PIECE));
        assert!(f.calls.borrow().len() > 4, "split into pieces");
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
