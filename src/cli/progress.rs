//! Progress of long copies on a terminal: one line on stderr drawn by
//! `indicatif` (bytes done of total, percent, rate), hidden when stderr is
//! not a terminal, so scripts and logs see only the final summary. Also
//! carries Ctrl-C: the first asks the copy to stop cleanly, a second quits
//! at once.
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shale::transfer::Progress;

/// The line: `what: done / total (pct%), rate/s`.
const TEMPLATE: &str =
    "{msg}: {binary_bytes} / {binary_total_bytes} ({percent}%), {binary_bytes_per_sec}";

/// A [`Progress`] drawn on stderr when it is a terminal.
pub struct TermProgress {
    enabled: bool,
    bar: Mutex<Option<ProgressBar>>,
    cancel: Arc<AtomicBool>,
}

impl TermProgress {
    /// Draws only if stderr is a terminal.
    pub fn stderr() -> TermProgress {
        TermProgress {
            enabled: std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
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
}

/// A bar for `total` bytes labelled `what`, drawing to `target`.
fn new_bar(what: &str, total: u64, target: ProgressDrawTarget) -> ProgressBar {
    let style =
        ProgressStyle::with_template(TEMPLATE).unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::with_draw_target(Some(total), target).with_style(style);
    bar.set_message(what.to_string());
    bar
}

impl Progress for TermProgress {
    fn start(&self, what: &str, total: u64) {
        if !self.enabled {
            return;
        }
        if let Ok(mut b) = self.bar.lock() {
            *b = Some(new_bar(what, total, ProgressDrawTarget::stderr()));
        }
    }

    fn advance(&self, bytes: u64) {
        if let Ok(b) = self.bar.lock() {
            if let Some(bar) = b.as_ref() {
                bar.inc(bytes);
            }
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn finish(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(bar) = b.take() {
                bar.finish();
                // End the line, so what follows starts on its own.
                eprintln!();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::InMemoryTerm;

    #[test]
    fn line_shows_done_total_percent_and_rate() {
        let term = InMemoryTerm::new(4, 120);
        let bar = new_bar(
            "export",
            1 << 30,
            ProgressDrawTarget::term_like(Box::new(term.clone())),
        );
        bar.inc(512 << 20);
        bar.abandon();
        let screen = term.contents();
        assert!(
            screen.starts_with("export: 512.00 MiB / 1.00 GiB (50%), "),
            "{screen:?}"
        );
        assert!(screen.trim_end().ends_with("/s"), "{screen:?}");
    }
}
