//! One log line per damaged chunk object: reads that hit a chunk failing
//! its checksums (and `shale scrub`) report it here, so an operator sees
//! the key once instead of once per read.
//!
//! Invariant: each key is logged at most once per process while fewer than
//! [`REMEMBERED`] keys have been reported; past that, every report logs
//! (never silence damage because the set is full).

use std::collections::HashSet;
use std::fmt::Display;
use std::sync::Mutex;

/// Keys remembered for de-duplication.
const REMEMBERED: usize = 4096;

static REPORTED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Log that object `key` is damaged (`what` says how), unless it was
/// already reported. Returns true when it logged.
pub fn report(key: &str, what: &dyn Display) -> bool {
    let first = {
        let mut guard = REPORTED.lock().unwrap_or_else(|p| p.into_inner());
        let set = guard.get_or_insert_with(HashSet::new);
        if set.contains(key) {
            false
        } else {
            if set.len() < REMEMBERED {
                set.insert(key.to_string());
            }
            true
        }
    };
    if first {
        log::error!("damaged object {key}: {what}");
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_reported_once() {
        let key = "volumes/00000000000000aa/chunks/test-once";
        assert!(report(key, &"checksum mismatch"));
        assert!(!report(key, &"checksum mismatch"));
        assert!(report("volumes/00000000000000aa/chunks/other", &"missing"));
    }
}
