//! Time as an injected dependency: library code never reads the wall clock
//! directly, so tests of leases, timers and destage are deterministic.
//!
//! Two readings:
//! - [`Clock::now`]: wall-clock time since the Unix epoch. Comparable across
//!   hosts (as far as their clocks agree), but it may jump.
//! - [`Clock::monotonic`]: time since an arbitrary fixed origin of this
//!   host's boot. Never goes back, keeps counting through suspend, and only
//!   means something inside one host. Deadlines of this process (such as the
//!   lease's acknowledgement deadline) are measured with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Wall-clock time since the Unix epoch.
    fn now(&self) -> Duration;
    /// Monotonic time since a fixed, arbitrary origin: never decreases.
    fn monotonic(&self) -> Duration;
}

/// A shared clock handle.
pub type DynClock = Arc<dyn Clock>;

/// The real clocks: `CLOCK_REALTIME` and `CLOCK_BOOTTIME`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
    }

    /// `CLOCK_BOOTTIME` (unlike `CLOCK_MONOTONIC` and [`Instant`] it keeps
    /// counting while the host is suspended, so a deadline cannot look
    /// further away than it is after a resume).
    fn monotonic(&self) -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec that outlives the call;
        // clock_gettime only writes to it.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        if rc == 0 && ts.tv_sec >= 0 && (0..1_000_000_000).contains(&ts.tv_nsec) {
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        } else {
            // No CLOCK_BOOTTIME (not Linux): the process's own monotonic clock.
            static ORIGIN: OnceLock<Instant> = OnceLock::new();
            ORIGIN.get_or_init(Instant::now).elapsed()
        }
    }
}

/// Clocks that only move when told to (tests). [`ManualClock::advance`]
/// moves both readings; [`ManualClock::jump_wall`] moves only the wall
/// clock, as an operator or a bad NTP step would.
#[derive(Debug, Default)]
pub struct ManualClock {
    wall_nanos: AtomicU64,
    mono_nanos: AtomicU64,
}

impl ManualClock {
    /// Wall clock at `start`, monotonic clock at zero.
    pub fn new(start: Duration) -> Self {
        ManualClock {
            wall_nanos: AtomicU64::new(nanos(start)),
            mono_nanos: AtomicU64::new(0),
        }
    }

    /// Let time pass: both clocks move forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.wall_nanos.fetch_add(nanos(d), Ordering::SeqCst);
        self.mono_nanos.fetch_add(nanos(d), Ordering::SeqCst);
    }

    /// Step the wall clock by `forward` (or back, if `false`) by `d`; the
    /// monotonic clock does not move.
    pub fn jump_wall(&self, d: Duration, forward: bool) {
        let d = nanos(d);
        let _ = self
            .wall_nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                Some(if forward {
                    w.saturating_add(d)
                } else {
                    w.saturating_sub(d)
                })
            });
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.wall_nanos.load(Ordering::SeqCst))
    }

    fn monotonic(&self) -> Duration {
        Duration::from_nanos(self.mono_nanos.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Duration::from_secs(10));
        assert_eq!(c.now(), Duration::from_secs(10));
        assert_eq!(c.monotonic(), Duration::ZERO);
        c.advance(Duration::from_millis(5));
        assert_eq!(c.now(), Duration::from_millis(10_005));
        assert_eq!(c.monotonic(), Duration::from_millis(5));
        c.jump_wall(Duration::from_secs(3), false);
        assert_eq!(c.now(), Duration::from_millis(7_005));
        assert_eq!(c.monotonic(), Duration::from_millis(5), "a wall step");
        c.jump_wall(Duration::from_secs(60), true);
        assert_eq!(c.now(), Duration::from_millis(67_005));
        assert!(SystemClock.now() > Duration::from_secs(1_600_000_000));
    }

    #[test]
    fn system_monotonic_clock_never_goes_back() {
        let a = SystemClock.monotonic();
        std::thread::sleep(Duration::from_millis(2));
        let b = SystemClock.monotonic();
        assert!(b > a, "{a:?} then {b:?}");
    }
}
