//! Allocation queries: which ranges of a device hold data and which read as
//! zeros while taking no space, answered from the extent maps alone (no
//! data is read). NBD's `base:allocation` block status is built on this.
//!
//! Invariants:
//! 1. A run reported as [`Allocation::Zero`] reads as zeros: it is unmapped
//!    in every layer (never written, or trimmed) or an explicit zero entry
//!    (zeroed, or all-zero data, in a clone). Everything else is
//!    [`Allocation::Data`]: written data in the WAL or in a chunk, of this
//!    volume or, in a clone, inherited from a parent.
//! 2. A volume's state lock is held only to copy at most [`BATCH`] map
//!    pieces at a time; parent views are immutable and are walked after it
//!    is released.
//! 3. Runs come out merged (adjacent runs differ), at most `max_runs` of
//!    them, covering a prefix of the range that is never empty when the
//!    range is not. At most [`MAX_PIECES`] map pieces are looked at per
//!    query, so a huge fragmented range costs bounded work (the answer then
//!    covers less of it).

use super::SECTOR;

/// How a run of bytes is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Bytes are stored (they may still happen to be zeros). Always a safe
    /// answer: a device that cannot tell reports this.
    Data,
    /// Nothing is stored: the run reads as zeros and takes no space.
    Zero,
}

/// A run of `len` bytes (a non-zero multiple of the sector size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub state: Allocation,
}

impl Extent {
    /// One run of `len` bytes, or none when `len` is 0.
    pub fn whole(len: u64, state: Allocation) -> Vec<Extent> {
        if len == 0 {
            Vec::new()
        } else {
            vec![Extent { len, state }]
        }
    }
}

/// Map pieces copied under one hold of a lock (invariant 2).
pub(crate) const BATCH: usize = 1024;
/// Map pieces one query looks at, over all layers (invariant 3).
pub(crate) const MAX_PIECES: usize = 64 * BATCH;

/// Collects merged runs, at most `max` of them, from at most
/// [`MAX_PIECES`] map pieces (invariant 3).
#[derive(Debug)]
pub(crate) struct Runs {
    out: Vec<Extent>,
    max: usize,
    pieces_left: usize,
}

impl Runs {
    /// An empty collection of at most `max` runs (at least one).
    pub fn new(max: usize) -> Runs {
        Runs {
            out: Vec::new(),
            max: max.max(1),
            pieces_left: MAX_PIECES,
        }
    }

    /// Append a map piece of `sectors` in `state`. Returns false, adding
    /// nothing, when that needs a new run and there are `max` runs
    /// already, or when [`MAX_PIECES`] pieces were taken (the first piece
    /// is always taken).
    pub fn push(&mut self, sectors: u64, state: Allocation) -> bool {
        let len = sectors * SECTOR;
        let full = self.out.len() >= self.max;
        match self.out.last_mut() {
            _ if self.pieces_left == 0 => return false,
            Some(last) if last.state == state => last.len += len,
            _ if full => return false,
            _ => self.out.push(Extent { len, state }),
        }
        self.pieces_left -= 1;
        true
    }

    pub fn into_vec(self) -> Vec<Extent> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_stop_at_the_limit() {
        let mut r = Runs::new(2);
        assert!(r.push(1, Allocation::Data));
        assert!(r.push(2, Allocation::Data));
        assert!(r.push(1, Allocation::Zero));
        assert!(r.push(3, Allocation::Zero), "merging needs no new run");
        assert!(!r.push(1, Allocation::Data), "a third run is refused");
        assert_eq!(
            r.into_vec(),
            vec![
                Extent {
                    len: 3 * SECTOR,
                    state: Allocation::Data
                },
                Extent {
                    len: 4 * SECTOR,
                    state: Allocation::Zero
                },
            ]
        );
        let mut r = Runs::new(0);
        assert!(r.push(1, Allocation::Zero), "at least one run");
        assert!(!r.push(1, Allocation::Data));
        assert_eq!(Extent::whole(0, Allocation::Data), vec![]);
        // The piece budget stops even merging pushes.
        let mut r = Runs::new(1);
        for _ in 0..MAX_PIECES {
            assert!(r.push(1, Allocation::Data));
        }
        assert!(!r.push(1, Allocation::Data));
        assert_eq!(r.into_vec()[0].len, MAX_PIECES as u64 * SECTOR);
    }
}
