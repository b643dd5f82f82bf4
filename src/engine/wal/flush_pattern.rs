//! Learns whether the client flushes after every write, so the writer can
//! make such a write durable as it writes it.
//!
//! A client that sends "write, flush, write, flush" (a database commit
//! loop, `fio --fsync=1`, a journal at queue depth one) otherwise costs
//! the log a write, then a hand-off to the syncer thread and an
//! `fdatasync`, then a hand-off back. Written with `RWF_DSYNC` instead
//! ([`super::fs::WalFile::write_durable_at`]), the write carries its own
//! cache flush, and the flush that follows finds nothing unsynced and is
//! answered on the caller's thread ([`super::durable`]). The device does
//! the same work either way; the thread hops and one system call go.
//!
//! Invariants:
//! 1. A prediction only ever makes a write durable sooner: it never
//!    delays or skips a sync that a flush or FUA write asks for, so a
//!    wrong guess costs time, never data.
//! 2. A write is predicted only when it is alone in its batch, no other
//!    write was sent since the last flush, and the last
//!    [`STREAK_TO_PREDICT`] flushes each covered exactly one write. One
//!    flush that covers more than one write ends the streak, so a client
//!    that stops flushing after every write pays for at most one
//!    needlessly durable write.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Flushes in a row that each covered exactly one write before writes
/// are predicted to be followed by a flush.
pub(super) const STREAK_TO_PREDICT: u32 = 2;

/// The flush pattern seen so far (see the module invariants).
#[derive(Debug, Default)]
pub(super) struct FlushPattern {
    /// Writes sent to the writer since the last flush.
    writes_since_flush: AtomicU64,
    /// Flushes in a row (up to [`STREAK_TO_PREDICT`]) that covered
    /// exactly one write.
    streak: AtomicU32,
    /// Bytes written since the last flush (for [`FlushPattern::flushed_lately`]).
    bytes_since_flush: AtomicU64,
}

/// Bytes written since the last flush up to which a flush is taken to be
/// likely soon, so the writer starts the writeback of what it writes
/// ([`FlushPattern::flushed_lately`]).
pub(super) const WRITE_BEHIND_WINDOW: u64 = 32 << 20;

impl FlushPattern {
    /// A flush was asked for.
    pub fn flushed(&self) {
        self.bytes_since_flush.store(0, Ordering::Release);
        match self.writes_since_flush.swap(0, Ordering::AcqRel) {
            // A repeated flush says nothing about writes.
            0 => {}
            1 => {
                let grow = |s: u32| Some((s + 1).min(STREAK_TO_PREDICT));
                let _ = self
                    .streak
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, grow);
            }
            _ => self.streak.store(0, Ordering::Release),
        }
    }

    /// The writer is about to write `bytes`: whether fewer than
    /// [`WRITE_BEHIND_WINDOW`] bytes were written since the last flush.
    /// A client that flushes every so often gets each write's writeback
    /// started as it is written, so its next flush waits for little; one
    /// that writes a stream without flushing does not, and its bytes
    /// reach the disk only in chunks (invariant 3 of [`super`]). Only a
    /// hint: it never changes what a flush makes durable.
    pub fn flushed_lately(&self, bytes: u64) -> bool {
        self.bytes_since_flush.fetch_add(bytes, Ordering::AcqRel) < WRITE_BEHIND_WINDOW
    }

    /// Whether a lone write sent now would be predicted: no write since
    /// the last flush, and the streak is long enough. Only a hint for
    /// a caller that would lead such a write ([`super::writer::Writer::lead`]);
    /// the writer decides with [`FlushPattern::expects_flush`].
    pub fn predicts_flush(&self) -> bool {
        self.writes_since_flush.load(Ordering::Acquire) == 0
            && self.streak.load(Ordering::Acquire) >= STREAK_TO_PREDICT
    }

    /// The writer is about to write a batch of `writes` records: whether
    /// to write it durably because a flush is expected to follow
    /// (invariant 2).
    pub fn expects_flush(&self, writes: u64) -> bool {
        if writes == 0 {
            return false;
        }
        let before = self.writes_since_flush.fetch_add(writes, Ordering::AcqRel);
        writes == 1 && before == 0 && self.streak.load(Ordering::Acquire) >= STREAK_TO_PREDICT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_loop(p: &FlushPattern, rounds: usize) -> Vec<bool> {
        (0..rounds)
            .map(|_| {
                let predicted = p.expects_flush(1);
                p.flushed();
                predicted
            })
            .collect()
    }

    #[test]
    fn write_behind_lasts_a_window_after_each_flush() {
        let p = FlushPattern::default();
        let step = WRITE_BEHIND_WINDOW / 4;
        let seen: Vec<bool> = (0..6).map(|_| p.flushed_lately(step)).collect();
        assert_eq!(seen, [true, true, true, true, false, false]);
        p.flushed();
        assert!(p.flushed_lately(step), "a flush opens the window again");
    }

    #[test]
    fn a_write_flush_loop_is_predicted_after_the_streak() {
        let p = FlushPattern::default();
        assert_eq!(commit_loop(&p, 4), [false, false, true, true]);
    }

    #[test]
    fn two_writes_before_a_flush_end_the_streak() {
        let p = FlushPattern::default();
        commit_loop(&p, 3);
        assert!(p.expects_flush(1), "the streak predicts the first write");
        assert!(!p.expects_flush(1), "a second write before a flush is not");
        p.flushed();
        assert!(!p.expects_flush(1), "the streak was reset");
        p.flushed();
        assert_eq!(commit_loop(&p, 2), [false, true]);
    }

    #[test]
    fn batches_of_several_writes_are_never_predicted() {
        let p = FlushPattern::default();
        commit_loop(&p, 3);
        assert!(!p.expects_flush(2));
        assert!(!p.expects_flush(0));
    }

    #[test]
    fn flushes_without_writes_keep_the_streak() {
        let p = FlushPattern::default();
        commit_loop(&p, 2);
        p.flushed();
        p.flushed();
        assert!(p.expects_flush(1));
    }
}
