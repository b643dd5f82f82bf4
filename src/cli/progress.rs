//! Progress of long copies on a terminal: one line on stderr, redrawn in
//! place (bytes done of total, percent, rate). Silent when stderr is not a
//! terminal, so scripts and logs see only the final summary. Also carries
//! Ctrl-C: the first asks the copy to stop cleanly, a second quits at once.
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shale::error::Bytes;
use shale::transfer::Progress;

/// Least time between two redraws.
const REDRAW: Duration = Duration::from_millis(200);

struct State {
    what: String,
    total: u64,
    done: u64,
    started: Instant,
    last_draw: Option<Instant>,
}

/// A [`Progress`] drawn on stderr when it is a terminal.
pub struct TermProgress {
    enabled: bool,
    state: Mutex<Option<State>>,
    cancel: Arc<AtomicBool>,
}

impl TermProgress {
    /// Draws only if stderr is a terminal.
    pub fn stderr() -> TermProgress {
        TermProgress {
            enabled: std::io::stderr().is_terminal(),
            state: Mutex::new(None),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// From now on (inside a tokio runtime), the first Ctrl-C makes
    /// [`Progress::cancelled`] true, so the copy stops and cleans up; a
    /// second one exits at once with status 130.
    pub fn stop_on_ctrl_c(&self) {
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            cancel.store(true, Ordering::SeqCst);
            eprintln!("\nstopping (Ctrl-C again quits at once)");
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    }

    fn draw(st: &State, now: Instant) {
        let line = progress_line(&st.what, st.done, st.total, now - st.started);
        let mut err = std::io::stderr().lock();
        // Carriage return, the line, then clear what an older, longer line left.
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
    }
}

/// `what: done / total (pct%), rate/s`.
pub fn progress_line(what: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let pct = if total == 0 {
        100
    } else {
        (done.min(total) as u128 * 100 / total as u128) as u64
    };
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        (done as f64 / secs) as u64
    } else {
        0
    };
    format!(
        "{what}: {} / {} ({pct}%), {}/s",
        Bytes(done),
        Bytes(total),
        Bytes(rate)
    )
}

impl Progress for TermProgress {
    fn start(&self, what: &str, total: u64) {
        if !self.enabled {
            return;
        }
        if let Ok(mut s) = self.state.lock() {
            *s = Some(State {
                what: what.to_string(),
                total,
                done: 0,
                started: Instant::now(),
                last_draw: None,
            });
        }
    }

    fn advance(&self, bytes: u64) {
        if !self.enabled {
            return;
        }
        let Ok(mut guard) = self.state.lock() else {
            return;
        };
        let Some(st) = guard.as_mut() else {
            return;
        };
        st.done = st.done.saturating_add(bytes);
        let now = Instant::now();
        if st.last_draw.is_none_or(|t| now - t >= REDRAW) {
            st.last_draw = Some(now);
            Self::draw(st, now);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn finish(&self) {
        if !self.enabled {
            return;
        }
        if let Ok(mut guard) = self.state.lock() {
            if let Some(st) = guard.take() {
                Self::draw(&st, Instant::now());
                eprintln!();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_done_total_percent_and_rate() {
        let l = progress_line("export", 512 << 20, 1 << 30, Duration::from_secs(2));
        assert_eq!(l, "export: 512.0 MiB / 1.0 GiB (50%), 256.0 MiB/s");
        assert_eq!(
            progress_line("check", 0, 0, Duration::ZERO),
            "check: 0 B / 0 B (100%), 0 B/s"
        );
    }
}
