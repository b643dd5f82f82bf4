//! What the log knows is durable, shared by the writer thread, the syncer
//! thread and callers of [`super::Wal::sync`].
//!
//! Invariants:
//! 1. [`Marks::synced`] only grows, and every seq up to it is durable.
//! 2. [`Marks::all_durable`] is true only if every seq written so far is
//!    durable and every cut of a segment (after ENOSPC) was synced since:
//!    then a flush has nothing to do and is answered on the caller's
//!    thread, with no `fdatasync` and no hand-off to the writer.

use std::sync::atomic::{AtomicU64, Ordering};

/// Durability marks (see the module invariants).
#[derive(Debug)]
pub(super) struct Marks {
    /// Highest seq known durable.
    pub synced: AtomicU64,
    /// Segment cuts made (writer thread, after ENOSPC).
    cuts_made: AtomicU64,
    /// Cuts covered by a sync that returned.
    cuts_synced: AtomicU64,
}

impl Marks {
    /// Marks for a log whose records up to `synced` are durable.
    pub fn new(synced: u64) -> Marks {
        Marks {
            synced: AtomicU64::new(synced),
            cuts_made: AtomicU64::new(0),
            cuts_synced: AtomicU64::new(0),
        }
    }

    /// A segment was cut back; returns the cut's number, for
    /// [`Marks::cuts_synced_upto`] once a sync covers it.
    pub fn cut(&self) -> u64 {
        self.cuts_made.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Cuts made so far (a sync started now covers them).
    pub fn cuts(&self) -> u64 {
        self.cuts_made.load(Ordering::Acquire)
    }

    /// A sync started after cut `n` was made returned.
    pub fn cuts_synced_upto(&self, n: u64) {
        self.cuts_synced.fetch_max(n, Ordering::AcqRel);
    }

    /// True while some cut is not known durable.
    pub fn cut_pending(&self) -> bool {
        self.cuts_synced.load(Ordering::Acquire) < self.cuts_made.load(Ordering::Acquire)
    }

    /// Every seq up to `last_written` and every cut is durable.
    pub fn all_durable(&self, last_written: u64) -> bool {
        !self.cut_pending() && self.synced.load(Ordering::Acquire) >= last_written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_keeps_the_log_dirty_until_a_later_sync_returns() {
        let m = Marks::new(5);
        assert!(m.all_durable(5));
        assert!(!m.all_durable(6));
        let before = m.cuts();
        let n = m.cut();
        assert!(!m.all_durable(5));
        m.cuts_synced_upto(before);
        assert!(!m.all_durable(5), "a sync started before the cut");
        m.cuts_synced_upto(n);
        assert!(m.all_durable(5));
    }
}
