//! How many chunks the destage task keeps on their way to the store at
//! once: a store that asks for more than a local directory
//! ([`crate::store::ObjectStore::puts_in_flight`] above
//! [`DEFAULT_PUTS_IN_FLIGHT`]) starts at [`START_WINDOW`] (enough chunks
//! queued at the store to cover the destage task's own pauses, such as a
//! checkpoint) and grows towards its wish while the measured throughput
//! grows with it; a failed chunk halves the window, never below
//! [`DEFAULT_PUTS_IN_FLIGHT`] (the fixed window destage had before).
//!
//! Invariants:
//! 1. The limit stays in `floor..=max` ([`limits`]); above the floor it
//!    never exceeds the chunks the unstored bound holds, so the objects
//!    held by the chunks on their way stay within
//!    `engine.max_unstored_bytes` (plus a chunk) of memory.
//! 2. Only periods in which the window was the bottleneck count: a period
//!    in which the task ran out of due chunks ([`Window::starved`]) or a
//!    chunk failed ([`Window::failed`]) is thrown away, so a writer slower
//!    than the store never grows the window.
//! 3. A step up is kept only if the period after it moved at least
//!    [`GAIN_PERCENT`] more bytes per second than the period before it;
//!    otherwise the window steps back and stays there for [`HOLD_PERIODS`]
//!    periods before it probes again.
//! 4. Pure bookkeeping: the caller passes the time, so tests drive it with
//!    made-up throughput curves.

use std::time::Duration;

use crate::store::DEFAULT_PUTS_IN_FLIGHT;

/// Where the window of a store asking for more than
/// [`DEFAULT_PUTS_IN_FLIGHT`] starts (measured against moto on 2 cores:
/// 16 covered the pauses that left the server idle at 8).
pub(super) const START_WINDOW: usize = 16;
/// Largest window whatever the store asks for.
pub(super) const MAX_WINDOW: usize = 256;
/// Least growth, in percent, for which a step up is kept.
pub(super) const GAIN_PERCENT: u64 = 10;
/// Periods a window stays at a level after a step up did not pay.
pub(super) const HOLD_PERIODS: u32 = 16;

/// Bounds of a window, see [`limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Never below: the fixed window of old (or the hint, if smaller).
    pub floor: usize,
    /// Where it starts.
    pub start: usize,
    /// Never above.
    pub max: usize,
}

/// The window's bounds for a store that asks for `hint` puts in flight:
/// the floor is [`DEFAULT_PUTS_IN_FLIGHT`] (or the hint, if smaller), the
/// maximum the hint capped by the chunks `max_unstored` holds but never
/// below the floor (invariant 1), the start [`START_WINDOW`] within them.
pub(crate) fn limits(hint: usize, max_unstored: u64, chunk_size: u64) -> Limits {
    let hint = hint.clamp(1, MAX_WINDOW);
    let floor = DEFAULT_PUTS_IN_FLIGHT.min(hint);
    let fit = usize::try_from(max_unstored / chunk_size.max(1)).unwrap_or(usize::MAX);
    let max = hint.min(fit).max(floor);
    Limits {
        floor,
        start: START_WINDOW.clamp(floor, max),
        max,
    }
}

/// The unstored bytes at which writes wait: the configured bound
/// `max_unstored`, or less when that is more than destage can put to use:
/// a full window of chunks plus two (one gathering, one due), or the WAL's
/// memory tail (`wal_memory`), whichever is larger. A backlog beyond both
/// only waits its turn, and destage then reads it back from the disk
/// instead of from the tail: measured with 1 MiB writes on the local
/// store (window 8, 4 MiB chunks), the 256 MiB default bound gave 390 MB/s
/// with the disk saturated by that read-back, a 40 MiB one 525 MB/s.
/// Never more than `max_unstored`, never less than three chunks.
pub(crate) fn backlog_bound(l: Limits, chunk_size: u64, wal_memory: u64, max_unstored: u64) -> u64 {
    let window = (l.max as u64).saturating_add(2).saturating_mul(chunk_size);
    max_unstored.min(window.max(wal_memory))
}

/// Bytes stored since `start`, and whether the period still counts.
#[derive(Debug, Clone, Copy)]
struct Period {
    start: Duration,
    bytes: u64,
    chunks: usize,
    spoiled: bool,
}

/// The adaptive bound on chunks in flight (module docs).
#[derive(Debug)]
pub(super) struct Window {
    floor: usize,
    max: usize,
    limit: usize,
    /// The period being measured; `None` until a chunk lands (its landing
    /// starts the clock).
    period: Option<Period>,
    /// After a step up: the level below and its throughput (bytes/s).
    below: Option<(usize, f64)>,
    /// Periods left before the next probe up.
    hold: u32,
}

impl Window {
    pub(super) fn new(l: Limits) -> Window {
        let floor = l.floor.max(1);
        let max = l.max.max(floor);
        Window {
            floor,
            max,
            limit: l.start.clamp(floor, max),
            period: None,
            below: None,
            hold: 0,
        }
    }

    /// Chunks that may be on their way at once now.
    pub(super) fn limit(&self) -> usize {
        self.limit
    }

    /// The task had room for another chunk but none was due: this period
    /// measures the writer, not the store.
    pub(super) fn starved(&mut self) {
        if let Some(p) = &mut self.period {
            p.spoiled = true;
        }
    }

    /// A chunk's build or put failed: this period measures retries, and
    /// the window halves (not below the floor): a link too slow for the
    /// uploads sharing it times them out.
    pub(super) fn failed(&mut self) {
        self.starved();
        let half = (self.limit / 2).max(self.floor);
        if half < self.limit {
            log::debug!("destage window {} -> {half} after a failure", self.limit);
            self.limit = half;
            self.below = None;
        }
    }

    /// A chunk of `bytes` landed at `now`; may move the limit at the end of
    /// a period (twice the limit in chunks: every chunk of a full window
    /// has its put timed at least once).
    pub(super) fn stored(&mut self, now: Duration, bytes: u64) {
        let fresh = Period {
            start: now,
            bytes: 0,
            chunks: 0,
            spoiled: false,
        };
        let Some(p) = &mut self.period else {
            self.period = Some(fresh);
            return;
        };
        p.bytes += bytes;
        p.chunks += 1;
        if p.chunks < 2 * self.limit {
            return;
        }
        let p = std::mem::replace(p, fresh);
        let took = now.saturating_sub(p.start).as_secs_f64();
        if p.spoiled || took <= 0.0 {
            return;
        }
        self.judge(p.bytes as f64 / took);
    }

    /// Move the limit after a whole period at `rate` bytes/s (invariant 3).
    fn judge(&mut self, rate: f64) {
        if let Some((level, before)) = self.below.take() {
            let gain = 1.0 + GAIN_PERCENT as f64 / 100.0;
            if rate < before * gain {
                log::debug!(
                    "destage window back to {level}: {rate:.0} B/s at {} against {before:.0} B/s",
                    self.limit
                );
                self.limit = level;
                self.hold = HOLD_PERIODS;
                return;
            }
        }
        if self.hold > 0 {
            self.hold -= 1;
            return;
        }
        if self.limit < self.max {
            let next = (self.limit + self.limit.div_ceil(2)).min(self.max);
            log::debug!("destage window {} -> {next} at {rate:.0} B/s", self.limit);
            self.below = Some((self.limit, rate));
            self.limit = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_bound_covers_the_window_or_the_tail_within_the_configured_bound() {
        let mib = 1u64 << 20;
        // Local directory store: 8 chunks of 4 MiB in flight, 32 MiB tail.
        let local = limits(DEFAULT_PUTS_IN_FLIGHT, 256 * mib, 4 * mib);
        assert_eq!(backlog_bound(local, 4 * mib, 32 * mib, 256 * mib), 40 * mib);
        // A larger tail is used whole.
        assert_eq!(
            backlog_bound(local, 4 * mib, 100 * mib, 256 * mib),
            100 * mib
        );
        // A store asking for 32 puts: 34 chunks.
        let s3 = limits(32, 256 * mib, 4 * mib);
        assert_eq!(backlog_bound(s3, 4 * mib, 32 * mib, 256 * mib), 136 * mib);
        // Never above the configured bound.
        let small = limits(32, 16 * mib, 4 * mib);
        assert_eq!(backlog_bound(small, 4 * mib, 32 * mib, 16 * mib), 16 * mib);
        assert_eq!(backlog_bound(local, 4 * mib, 0, 12 * mib), 12 * mib);
    }

    const CHUNK: u64 = 4 << 20;

    /// Drive `w` through `periods` periods of a store that moves
    /// `rate(limit)` bytes/s with `limit` chunks in flight; `starve` spoils
    /// every period. Returns the limit after each period.
    fn drive(
        w: &mut Window,
        periods: usize,
        starve: bool,
        rate: impl Fn(usize) -> f64,
    ) -> Vec<usize> {
        let mut now = Duration::from_secs(1);
        w.stored(now, CHUNK);
        let mut seen = Vec::new();
        for _ in 0..periods {
            let limit = w.limit();
            for i in 0..2 * limit {
                if starve && i == limit {
                    w.starved();
                }
                now += Duration::from_secs_f64(CHUNK as f64 / rate(w.limit()));
                w.stored(now, CHUNK);
            }
            seen.push(w.limit());
        }
        seen
    }

    #[test]
    fn limits_keep_the_local_window_and_fit_the_unstored_bound() {
        let mib = 1u64 << 20;
        // A local directory: today's fixed window.
        let l = |floor, start, max| Limits { floor, start, max };
        assert_eq!(
            limits(DEFAULT_PUTS_IN_FLIGHT, 256 * mib, 4 * mib),
            l(8, 8, 8)
        );
        // S3 with the default bound (64 chunks): up to the hint.
        assert_eq!(limits(32, 256 * mib, 4 * mib), l(8, 16, 32));
        // A bound of 12 chunks caps the growth and the start.
        assert_eq!(limits(32, 48 * mib, 4 * mib), l(8, 12, 12));
        // A bound of 2 chunks never shrinks below the local window.
        assert_eq!(limits(32, 8 * mib, 4 * mib), l(8, 8, 8));
        // A store asking for fewer than the local window gets that.
        assert_eq!(limits(2, 256 * mib, 4 * mib), l(2, 2, 2));
        assert_eq!(limits(0, 256 * mib, 4 * mib), l(1, 1, 1));
        assert_eq!(limits(usize::MAX, u64::MAX, 64 << 10), l(8, 16, MAX_WINDOW));
    }

    #[test]
    fn grows_to_the_knee_of_the_curve_and_stays_near_it() {
        // Throughput grows with the window up to 20 in flight, then flat.
        let rate = |l: usize| l.min(20) as f64 * 10e6;
        let mut w = Window::new(limits(64, 1 << 30, CHUNK));
        assert_eq!(w.limit(), 16);
        w.failed();
        assert_eq!(w.limit(), 8);
        let seen = drive(&mut w, 200, false, rate);
        // 8 -> 12 -> 18 -> 27 (each step paid), 27 -> 41 did not: back.
        assert_eq!(&seen[..4], &[12, 18, 27, 41]);
        assert_eq!(seen[4], 27);
        assert!(seen[4..].iter().all(|&l| l == 27 || l == 41), "{seen:?}");
        assert!(seen.iter().filter(|&&l| l == 27).count() > 150, "{seen:?}");
    }

    #[test]
    fn a_flat_curve_keeps_the_window_at_its_start() {
        let mut w = Window::new(limits(32, 256 << 20, CHUNK));
        let seen = drive(&mut w, 200, false, |_| 150e6);
        assert!(seen.iter().all(|&l| l == 16 || l == 24), "{seen:?}");
        assert!(seen.iter().filter(|&&l| l == 16).count() > 150, "{seen:?}");
    }

    #[test]
    fn growth_stops_at_the_maximum() {
        let mut w = Window::new(limits(32, 256 << 20, CHUNK));
        let seen = drive(&mut w, 50, false, |l| l as f64 * 10e6);
        assert_eq!(*seen.last().unwrap(), 32);
        assert!(seen.iter().all(|&l| l <= 32), "{seen:?}");
    }

    #[test]
    fn starved_periods_never_grow_the_window_and_failures_halve_it() {
        let mut w = Window::new(limits(32, 256 << 20, CHUNK));
        let seen = drive(&mut w, 50, true, |l| l as f64 * 10e6);
        assert!(seen.iter().all(|&l| l == 16), "{seen:?}");

        // A failure halves the window (not below the floor) and spoils the
        // period it falls in, like starvation.
        let mut w = Window::new(limits(32, 256 << 20, CHUNK));
        let mut now = Duration::from_secs(1);
        w.stored(now, CHUNK);
        for i in 0..16 {
            if i == 3 {
                w.failed();
                assert_eq!(w.limit(), 8);
                w.failed();
                assert_eq!(w.limit(), 8);
            }
            now += Duration::from_millis(10);
            w.stored(now, CHUNK);
        }
        assert_eq!(w.limit(), 8);
        // The next whole period counts.
        for _ in 0..16 {
            now += Duration::from_millis(10);
            w.stored(now, CHUNK);
        }
        assert_eq!(w.limit(), 12);
    }

    #[test]
    fn a_local_directory_window_never_moves() {
        let mut w = Window::new(limits(DEFAULT_PUTS_IN_FLIGHT, 256 << 20, CHUNK));
        let seen = drive(&mut w, 50, false, |l| l as f64 * 10e6);
        assert!(seen.iter().all(|&l| l == 8), "{seen:?}");
    }
}
