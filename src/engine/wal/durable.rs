//! What the log knows is durable, shared by the writer thread, the syncer
//! thread and callers of [`super::Wal::sync`]; and the guess of whether a
//! flush will follow a write.
//!
//! Invariants:
//! 1. [`Marks::synced`] only grows, and every seq up to it is durable.
//! 2. [`Marks::all_durable`] is true only if every seq written so far is
//!    durable and every cut of a segment (after ENOSPC) was synced since:
//!    then a flush has nothing to do and is answered on the caller's
//!    thread, with no `fdatasync` and no hand-off to the writer.
//! 3. Every flush requested is counted in [`Marks::flushes`] before it is
//!    answered, whichever way it is answered.
//! 4. [`FlushHint`] only ever makes a write more durable than asked: a
//!    wrong guess costs time, never data.

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
    /// Flushes requested so far.
    pub flushes: AtomicU64,
}

impl Marks {
    /// Marks for a log whose records up to `synced` are durable.
    pub fn new(synced: u64) -> Marks {
        Marks {
            synced: AtomicU64::new(synced),
            cuts_made: AtomicU64::new(0),
            cuts_synced: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
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

/// Plain write batches in a row that were each followed by a flush before
/// the hint turns on.
pub(super) const STREAK: u32 = 2;

/// Guesses whether the batch about to be written will be followed by a
/// flush before the next write (a journal, a database at queue depth 1).
/// When it will, writing the batch durably (`RWF_DSYNC`, one device
/// operation) spares the flush its `fdatasync` and its trip through the
/// writer and syncer threads (invariant 4).
#[derive(Debug, Default)]
pub(super) struct FlushHint {
    /// Plain batches in a row each followed by a flush (at most [`STREAK`]).
    streak: u32,
    /// The flush count right after the last plain batch was written, while
    /// it is still unknown what followed it.
    pending: Option<u64>,
}

impl FlushHint {
    /// Before a batch of appends is written, `flushes` requested so far:
    /// learn what followed the previous plain batch, then say whether to
    /// write this one durably.
    pub fn before_writes(&mut self, flushes: u64) -> bool {
        if let Some(at) = self.pending.take() {
            self.streak = if flushes > at {
                (self.streak + 1).min(STREAK)
            } else {
                0
            };
        }
        self.streak >= STREAK
    }

    /// A batch with no durable request was written; `flushes` is read
    /// after its write and before any of it is acknowledged.
    pub fn after_plain(&mut self, flushes: u64) {
        self.pending = Some(flushes);
    }

    /// A batch that asked for durability itself: nothing to learn from it.
    pub fn after_durable_request(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_turns_on_after_a_streak_of_flushed_writes_and_off_at_once() {
        let mut h = FlushHint::default();
        let mut flushes = 0;
        let mut guesses = Vec::new();
        // write, flush, write, flush, write, flush, write
        for _ in 0..4 {
            guesses.push(h.before_writes(flushes));
            h.after_plain(flushes);
            flushes += 1;
        }
        assert_eq!(guesses, [false, false, true, true]);
        // Two writes with no flush between: off at the second.
        assert!(h.before_writes(flushes));
        h.after_plain(flushes);
        assert!(!h.before_writes(flushes));
        h.after_plain(flushes);
        assert!(!h.before_writes(flushes + 1), "one flush is not a streak");
    }

    #[test]
    fn writes_without_flushes_never_turn_the_hint_on() {
        let mut h = FlushHint::default();
        for _ in 0..100 {
            assert!(!h.before_writes(7));
            h.after_plain(7);
        }
    }

    #[test]
    fn a_durable_request_teaches_nothing() {
        let mut h = FlushHint::default();
        for f in 0..2 {
            h.before_writes(f);
            h.after_plain(f);
        }
        assert!(h.before_writes(2));
        h.after_durable_request();
        // No flush came after the FUA batch, and the streak stands.
        assert!(h.before_writes(2));
    }

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
