//! Sets of chunk locations: which bytes of which chunks a group of maps
//! (a volume's snapshots) references. The map counts the data it shares
//! with a tracked set ([`super::ExtentMap::shared_bytes`]); space
//! accounting is built on that (see [`crate::engine::space`]).

use std::collections::{BTreeMap, HashMap};

/// A set of chunk locations, kept as disjoint byte intervals per chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocSet {
    /// chunk seq → interval start → interval end (exclusive); intervals of
    /// one chunk neither overlap nor touch.
    chunks: HashMap<u64, BTreeMap<u64, u64>>,
    bytes: u64,
}

impl LocSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Total bytes in the set.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Add `[off, off+len)` of `chunk`.
    pub fn insert(&mut self, chunk: u64, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let ivs = self.chunks.entry(chunk).or_default();
        let (mut start, mut end) = (off, off.saturating_add(len));
        if let Some((&s, &e)) = ivs.range(..=start).next_back() {
            if e >= start {
                ivs.remove(&s);
                self.bytes -= e - s;
                start = s;
                end = end.max(e);
            }
        }
        let following: Vec<(u64, u64)> = ivs.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in following {
            ivs.remove(&s);
            self.bytes -= e - s;
            end = end.max(e);
        }
        ivs.insert(start, end);
        self.bytes += end - start;
    }

    /// Bytes of `[off, off+len)` of `chunk` that lie in the set.
    pub fn overlap(&self, chunk: u64, off: u64, len: u64) -> u64 {
        let Some(ivs) = self.chunks.get(&chunk) else {
            return 0;
        };
        let end = off.saturating_add(len);
        let mut n = 0;
        if let Some((_, &e)) = ivs.range(..off).next_back() {
            if e > off {
                n += e.min(end) - off;
            }
        }
        for (&s, &e) in ivs.range(off..end) {
            n += e.min(end) - s;
        }
        n
    }
}
