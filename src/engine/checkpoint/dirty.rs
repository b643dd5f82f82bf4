//! The ranges of the stored map changed since the last committed
//! checkpoint: what the next delta checkpoint must carry.
//!
//! Invariant: the set holds disjoint, non-adjacent ranges (`start -> end`,
//! end exclusive, never empty); inserting merges with every range it
//! touches, so the set never holds more ranges than changes made and its
//! walks are in ascending order.

use std::collections::BTreeMap;

/// A set of sector ranges, merged on insert.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirtySet {
    ranges: BTreeMap<u64, u64>,
}

impl DirtySet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Mark `[start, start+len)` (nothing if `len` is 0).
    pub fn insert(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut s = start;
        let mut e = start.saturating_add(len);
        // A range starting before `s` that reaches it merges.
        if let Some((&ps, &pe)) = self.ranges.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        // Ranges starting inside `[s, e]` merge.
        let inside: Vec<(u64, u64)> = self.ranges.range(s..=e).map(|(&a, &b)| (a, b)).collect();
        for (a, b) in inside {
            self.ranges.remove(&a);
            e = e.max(b);
        }
        self.ranges.insert(s, e);
    }

    /// Add every range of `other`.
    pub fn merge(&mut self, other: DirtySet) {
        for (s, e) in other.ranges {
            self.insert(s, e - s);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// `(start, sectors)` in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e - s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inserts merge overlapping and adjacent ranges and keep others apart;
    /// the result covers exactly the union (checked sector by sector).
    #[test]
    fn merges_to_the_union() {
        let mut d = DirtySet::new();
        let mut want = vec![false; 300];
        let mut x = 12345u64;
        for _ in 0..500 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let s = x % 280;
            let l = x / 280 % 12;
            d.insert(s, l);
            for w in &mut want[s as usize..(s + l) as usize] {
                *w = true;
            }
            let mut got = vec![false; 300];
            let mut prev_end = None;
            for (s, l) in d.iter() {
                assert!(l > 0);
                if let Some(pe) = prev_end {
                    assert!(s > pe, "ranges touch or overlap");
                }
                prev_end = Some(s + l);
                for g in &mut got[s as usize..(s + l) as usize] {
                    *g = true;
                }
            }
            assert_eq!(got, want);
        }
        let mut e = DirtySet::new();
        e.insert(1000, 5);
        d.merge(e);
        assert!(d.iter().any(|r| r == (1000, 5)));
    }
}
