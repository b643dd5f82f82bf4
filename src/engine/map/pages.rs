//! Paged sorted storage for the extent map: `start sector → Slot`.
//!
//! The entries live in leaves of up to [`CAP`] entries, each a fixed
//! array pair (keys, slots: 24 bytes an entry, no per-entry allocation),
//! held in an [`Arc`]. A top-level vector keeps every leaf's first key for
//! a binary search. Cloning [`Pages`] copies one pointer and one key per
//! leaf; a change then copies only the leaf it touches (copy-on-write), so
//! a snapshot of the map (a checkpoint being encoded) costs O(leaves) and
//! stays immutable while the original keeps changing.
//!
//! Invariants:
//! 1. No leaf is empty; `firsts[i]` is the first key of `leaves[i]`.
//! 2. Keys ascend strictly within a leaf and across leaves.
//! 3. `len` is the total number of entries.
//! 4. Leaves stay dense: a full leaf first lends entries to a neighbour
//!    with room and splits only when both neighbours are full; a leaf
//!    under a quarter full is merged into a neighbour when the two fit in
//!    three quarters of a leaf.

use std::sync::Arc;

use super::Slot;

/// Entries per leaf.
pub const CAP: usize = 256;

/// One page of entries: `keys[..n]` ascending, `slots[i]` belongs to
/// `keys[i]`.
#[derive(Clone)]
struct Leaf {
    n: usize,
    keys: [u64; CAP],
    slots: [Slot; CAP],
}

impl Leaf {
    fn new() -> Leaf {
        Leaf {
            n: 0,
            keys: [0; CAP],
            slots: [Slot::EMPTY; CAP],
        }
    }

    fn keys(&self) -> &[u64] {
        &self.keys[..self.n]
    }

    fn find(&self, key: u64) -> Result<usize, usize> {
        self.keys().binary_search(&key)
    }

    fn insert_at(&mut self, pos: usize, key: u64, slot: Slot) {
        debug_assert!(self.n < CAP && pos <= self.n);
        self.keys.copy_within(pos..self.n, pos + 1);
        self.slots.copy_within(pos..self.n, pos + 1);
        self.keys[pos] = key;
        self.slots[pos] = slot;
        self.n += 1;
    }

    fn remove_at(&mut self, pos: usize) -> Slot {
        let slot = self.slots[pos];
        self.keys.copy_within(pos + 1..self.n, pos);
        self.slots.copy_within(pos + 1..self.n, pos);
        self.n -= 1;
        slot
    }

    /// Append `other[from..to]` after this leaf's entries.
    fn append(&mut self, other: &Leaf, from: usize, to: usize) {
        let m = to - from;
        debug_assert!(self.n + m <= CAP);
        self.keys[self.n..self.n + m].copy_from_slice(&other.keys[from..to]);
        self.slots[self.n..self.n + m].copy_from_slice(&other.slots[from..to]);
        self.n += m;
    }

    /// Put `other[from..to]` before this leaf's entries.
    fn prepend(&mut self, other: &Leaf, from: usize, to: usize) {
        let m = to - from;
        debug_assert!(self.n + m <= CAP);
        self.keys.copy_within(0..self.n, m);
        self.slots.copy_within(0..self.n, m);
        self.keys[..m].copy_from_slice(&other.keys[from..to]);
        self.slots[..m].copy_from_slice(&other.slots[from..to]);
        self.n += m;
    }

    /// Drop the first `m` entries.
    fn drop_front(&mut self, m: usize) {
        self.keys.copy_within(m..self.n, 0);
        self.slots.copy_within(m..self.n, 0);
        self.n -= m;
    }
}

/// Sorted `u64 → Slot` map in copy-on-write leaves (see module docs).
#[derive(Clone, Default)]
pub(super) struct Pages {
    firsts: Vec<u64>,
    leaves: Vec<Arc<Leaf>>,
    len: usize,
}

/// Builds [`Pages`] from entries pushed in strictly ascending key order
/// (the caller's duty), in full leaves, without holding them twice.
#[derive(Default)]
pub(super) struct Builder {
    pages: Pages,
    leaf: Option<Box<Leaf>>,
}

impl Builder {
    pub fn push(&mut self, key: u64, slot: Slot) {
        let leaf = self.leaf.get_or_insert_with(|| Box::new(Leaf::new()));
        leaf.keys[leaf.n] = key;
        leaf.slots[leaf.n] = slot;
        leaf.n += 1;
        if leaf.n == CAP {
            self.seal();
        }
    }

    /// Move the leaf being filled (if it holds anything) into the pages.
    fn seal(&mut self) {
        if let Some(leaf) = self.leaf.take().filter(|l| l.n > 0) {
            self.pages.firsts.push(leaf.keys[0]);
            self.pages.len += leaf.n;
            self.pages.leaves.push(Arc::from(leaf));
        }
    }

    pub fn finish(mut self) -> Pages {
        self.seal();
        self.pages
    }
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages")
            .field("len", &self.len)
            .field("leaves", &self.leaves.len())
            .finish()
    }
}

/// Insert `key` at position `pos` of the run `front` then `back`, where a
/// split left `cut` entries in `front` (a key at `pos <= cut` stays in
/// front, so the front leaf's first key never changes here).
fn insert_across(front: &mut Leaf, back: &mut Leaf, cut: usize, pos: usize, key: u64, slot: Slot) {
    if pos <= cut {
        front.insert_at(pos, key, slot);
    } else {
        back.insert_at(pos - cut, key, slot);
    }
}

impl Pages {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Number of leaves (for tests and the memory benchmark).
    pub fn leaf_count(&self) -> usize {
        self.leaves.len()
    }

    /// Bytes held by the leaves and the top level (allocations counted at
    /// their capacity; allocator overhead not included).
    pub fn heap_bytes(&self) -> usize {
        self.leaves.len() * (std::mem::size_of::<Leaf>() + 2 * std::mem::size_of::<usize>())
            + self.firsts.capacity() * 8
            + self.leaves.capacity() * std::mem::size_of::<Arc<Leaf>>()
    }

    /// Build from entries in strictly ascending key order, in full leaves
    /// (tests; the map streams through [`Builder`]).
    #[cfg(test)]
    pub fn from_sorted(items: &[(u64, Slot)]) -> Pages {
        let mut b = Builder::default();
        for &(k, s) in items {
            b.push(k, s);
        }
        b.finish()
    }

    /// The leaf whose key range would hold `key`: the last one starting at
    /// or before it (`None` before the first leaf or when empty).
    fn leaf_for(&self, key: u64) -> Option<usize> {
        self.firsts.partition_point(|&f| f <= key).checked_sub(1)
    }

    pub fn get(&self, key: u64) -> Option<Slot> {
        let leaf = &self.leaves[self.leaf_for(key)?];
        leaf.find(key).ok().map(|p| leaf.slots[p])
    }

    /// The last entry with a key below `key`.
    pub fn pred(&self, key: u64) -> Option<(u64, Slot)> {
        let i = self.firsts.partition_point(|&f| f < key).checked_sub(1)?;
        let leaf = &self.leaves[i];
        // `leaf.keys[0] < key` (invariant 1), so `p >= 1`.
        let p = leaf.keys().partition_point(|&k| k < key);
        Some((leaf.keys[p - 1], leaf.slots[p - 1]))
    }

    /// Entries with keys `>= key`, ascending.
    pub fn range_from(&self, key: u64) -> Iter<'_> {
        let (leaf, pos) = match self.leaf_for(key) {
            None => (0, 0),
            Some(i) => (i, self.leaves[i].keys().partition_point(|&k| k < key)),
        };
        Iter {
            pages: self,
            leaf,
            pos,
        }
    }

    /// The last entry with a key below `key` (if any), then every entry
    /// from `key` on, ascending: one search for a range lookup.
    pub fn pred_and_after(&self, key: u64) -> Iter<'_> {
        let (leaf, pos) = match self.firsts.partition_point(|&f| f < key).checked_sub(1) {
            None => (0, 0),
            // `keys[0] < key` (invariant 1), so the count is at least one.
            Some(i) => (i, self.leaves[i].keys().partition_point(|&k| k < key) - 1),
        };
        Iter {
            pages: self,
            leaf,
            pos,
        }
    }

    /// Every entry, ascending.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            pages: self,
            leaf: 0,
            pos: 0,
        }
    }

    /// Store `slot` at `key`; returns the slot it replaced.
    pub fn insert(&mut self, key: u64, slot: Slot) -> Option<Slot> {
        if self.leaves.is_empty() {
            let mut leaf = Leaf::new();
            leaf.insert_at(0, key, slot);
            self.firsts.push(key);
            self.leaves.push(Arc::new(leaf));
            self.len = 1;
            return None;
        }
        // Before every leaf: the first leaf takes it.
        let i = self.leaf_for(key).unwrap_or(0);
        let pos = match self.leaves[i].find(key) {
            Ok(p) => {
                let leaf = Arc::make_mut(&mut self.leaves[i]);
                return Some(std::mem::replace(&mut leaf.slots[p], slot));
            }
            Err(p) => p,
        };
        self.len += 1;
        if self.leaves[i].n == CAP {
            self.make_room(i, pos, key, slot);
            return None;
        }
        Arc::make_mut(&mut self.leaves[i]).insert_at(pos, key, slot);
        if pos == 0 {
            self.firsts[i] = key;
        }
        None
    }

    /// Insert into full leaf `i` at `pos`: lend entries to a neighbour with
    /// room, else split (invariant 4).
    fn make_room(&mut self, i: usize, pos: usize, key: u64, slot: Slot) {
        if i > 0 && self.leaves[i - 1].n < CAP {
            // Move the front of `i` (at least up to `pos`) to the left.
            let room = CAP - self.leaves[i - 1].n;
            let m = room.div_ceil(2).min(CAP);
            let (left, right) = self.leaves.split_at_mut(i);
            let src = Arc::make_mut(&mut right[0]);
            let dst = Arc::make_mut(&mut left[i - 1]);
            dst.append(src, 0, m);
            src.drop_front(m);
            // `pos >= 1` here (only the first leaf takes a key before its
            // first), so `pos < m` implies `room >= 2` and `dst` has room.
            if pos < m {
                // The new key sits among the moved entries.
                let at = dst.n - (m - pos);
                dst.insert_at(at, key, slot);
            } else {
                src.insert_at(pos - m, key, slot);
            }
            self.firsts[i] = src.keys[0];
            return;
        }
        if i + 1 < self.leaves.len() && self.leaves[i + 1].n < CAP {
            if pos == CAP {
                // Above every key here and below the next leaf's: its front.
                Arc::make_mut(&mut self.leaves[i + 1]).insert_at(0, key, slot);
                self.firsts[i + 1] = key;
                return;
            }
            let room = CAP - self.leaves[i + 1].n;
            let m = room.div_ceil(2).min(CAP);
            let (left, right) = self.leaves.split_at_mut(i + 1);
            let src = Arc::make_mut(&mut left[i]);
            let dst = Arc::make_mut(&mut right[0]);
            let keep = CAP - m;
            dst.prepend(src, keep, CAP);
            src.n = keep;
            // `pos < CAP`, so landing in `dst` (`pos > keep`) needs
            // `m >= 2`, hence `room >= 3 > m`: `dst` has room.
            insert_across(src, dst, keep, pos, key, slot);
            self.firsts[i] = src.keys[0];
            self.firsts[i + 1] = dst.keys[0];
            return;
        }
        // Split. Appending past the end (a sequential stream) starts a new
        // leaf holding just the new key, so the full one stays full.
        let mut new = Leaf::new();
        let src = Arc::make_mut(&mut self.leaves[i]);
        if pos == CAP {
            new.insert_at(0, key, slot);
        } else {
            let half = CAP / 2;
            new.append(src, half, CAP);
            src.n = half;
            insert_across(src, &mut new, half, pos, key, slot);
        }
        self.firsts[i] = src.keys[0];
        self.firsts.insert(i + 1, new.keys[0]);
        self.leaves.insert(i + 1, Arc::new(new));
    }

    /// Remove the entry at `key`.
    pub fn remove(&mut self, key: u64) -> Option<Slot> {
        let i = self.leaf_for(key)?;
        let pos = self.leaves[i].find(key).ok()?;
        let leaf = Arc::make_mut(&mut self.leaves[i]);
        let slot = leaf.remove_at(pos);
        self.len -= 1;
        if leaf.n == 0 {
            self.firsts.remove(i);
            self.leaves.remove(i);
            return Some(slot);
        }
        self.firsts[i] = leaf.keys[0];
        if leaf.n < CAP / 4 {
            self.merge_around(i);
        }
        Some(slot)
    }

    /// Merge sparse leaf `i` with a neighbour if both fit in three
    /// quarters of a leaf (invariant 4).
    fn merge_around(&mut self, i: usize) {
        let fits = |a: usize, b: usize| a + b <= CAP - CAP / 4;
        let n = self.leaves[i].n;
        let left = if i > 0 && fits(self.leaves[i - 1].n, n) {
            Some(i - 1)
        } else if i + 1 < self.leaves.len() && fits(self.leaves[i + 1].n, n) {
            Some(i)
        } else {
            None
        };
        let Some(l) = left else { return };
        let right = self.leaves.remove(l + 1);
        self.firsts.remove(l + 1);
        Arc::make_mut(&mut self.leaves[l]).append(&right, 0, right.n);
    }

    /// Check invariants 1-3 (tests).
    #[cfg(test)]
    pub fn check(&self) {
        assert_eq!(self.firsts.len(), self.leaves.len());
        let mut total = 0;
        let mut last: Option<u64> = None;
        for (f, leaf) in self.firsts.iter().zip(&self.leaves) {
            assert!(leaf.n > 0, "empty leaf");
            assert_eq!(*f, leaf.keys[0], "first key");
            for &k in leaf.keys() {
                assert!(last.is_none_or(|l| l < k), "keys ascend");
                last = Some(k);
            }
            total += leaf.n;
        }
        assert_eq!(total, self.len);
    }

    /// Whether our leaf `i` is `other`'s leaf `j` (tests of sharing).
    #[cfg(test)]
    pub fn shares_leaf(&self, i: usize, other: &Pages, j: usize) -> bool {
        Arc::ptr_eq(&self.leaves[i], &other.leaves[j])
    }
}

/// Ascending iterator over [`Pages`] entries.
pub(super) struct Iter<'a> {
    pages: &'a Pages,
    leaf: usize,
    pos: usize,
}

impl Iterator for Iter<'_> {
    type Item = (u64, Slot);

    fn next(&mut self) -> Option<(u64, Slot)> {
        loop {
            let leaf = self.pages.leaves.get(self.leaf)?;
            if self.pos < leaf.n {
                let item = (leaf.keys[self.pos], leaf.slots[self.pos]);
                self.pos += 1;
                return Some(item);
            }
            self.leaf += 1;
            self.pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn slot(v: u64) -> Slot {
        Slot {
            id: v,
            off: 0,
            len_kind: 1,
        }
    }

    fn contents(p: &Pages) -> Vec<(u64, u64)> {
        p.iter().map(|(k, s)| (k, s.id)).collect()
    }

    #[test]
    fn ascending_stream_fills_leaves() {
        let mut p = Pages::default();
        let n = 10 * CAP as u64 + 3;
        for k in 0..n {
            p.insert(k * 8, slot(k));
        }
        p.check();
        assert_eq!(p.len(), n as usize);
        assert_eq!(p.leaf_count(), 11, "full leaves, not half ones");
    }

    #[test]
    fn full_leaf_lends_to_neighbour_before_splitting() {
        // Two full leaves, then the right one loses entries: an insert into
        // the full left one moves entries right instead of splitting.
        let items: Vec<(u64, Slot)> = (0..2 * CAP as u64).map(|k| (k * 10, slot(k))).collect();
        let mut p = Pages::from_sorted(&items);
        assert_eq!(p.leaf_count(), 2);
        for k in 0..10u64 {
            p.remove((CAP as u64 + 100 + k) * 10);
        }
        p.insert(5, slot(999));
        p.check();
        assert_eq!(p.leaf_count(), 2, "redistributed, not split");
        assert_eq!(p.get(5).map(|s| s.id), Some(999));
        // Both full now: the next insert splits.
        for k in 0..9u64 {
            p.insert(15 + k * 10, slot(1000 + k));
        }
        p.check();
        assert_eq!(p.leaf_count(), 2);
        p.insert(1, slot(7));
        p.check();
        assert_eq!(p.leaf_count(), 3);
    }

    #[test]
    fn sparse_leaves_merge() {
        let items: Vec<(u64, Slot)> = (0..3 * CAP as u64).map(|k| (k, slot(k))).collect();
        let mut p = Pages::from_sorted(&items);
        for k in CAP as u64..3 * CAP as u64 - 10 {
            p.remove(k);
        }
        p.check();
        assert_eq!(p.len(), CAP + 10);
        assert!(p.leaf_count() <= 2);
        for k in 0..CAP as u64 - 5 {
            p.remove(k);
        }
        p.check();
        assert_eq!(p.leaf_count(), 1, "{} leaves", p.leaf_count());
    }

    #[test]
    fn clones_share_leaves_until_changed() {
        let items: Vec<(u64, Slot)> = (0..4 * CAP as u64).map(|k| (k * 2, slot(k))).collect();
        let mut p = Pages::from_sorted(&items);
        let snap = p.clone();
        p.insert(3, slot(42));
        p.check();
        // The full first leaf split in two: fresh copies; the others are
        // the snapshot's own.
        assert_eq!(p.leaf_count(), 5);
        assert!(!p.shares_leaf(0, &snap, 0));
        for j in 1..4 {
            assert!(p.shares_leaf(j + 1, &snap, j), "untouched leaf {j} shared");
        }
        assert_eq!(snap.get(3).map(|s| s.id), None, "snapshot unchanged");
        assert_eq!(contents(&snap).len(), 4 * CAP);
    }

    /// Random inserts and removes against a `BTreeMap`.
    #[test]
    fn random_against_btreemap() {
        let mut p = Pages::default();
        let mut model = BTreeMap::new();
        let mut x: u64 = 0x2545f4914f6cdd1d;
        let mut next = || crate::test_rng::xorshift(&mut x);
        for i in 0..60_000u64 {
            let k = next() % 5000;
            if next() % 3 == 0 {
                assert_eq!(p.remove(k).map(|s| s.id), model.remove(&k), "remove {k}");
            } else {
                assert_eq!(
                    p.insert(k, slot(i)).map(|s| s.id),
                    model.insert(k, i),
                    "insert {k}"
                );
            }
            if i % 997 == 0 {
                p.check();
                let q = next() % 5100;
                assert_eq!(
                    p.pred(q).map(|(k, s)| (k, s.id)),
                    model.range(..q).next_back().map(|(&k, &v)| (k, v))
                );
                let from: Vec<_> = p.range_from(q).take(300).map(|(k, s)| (k, s.id)).collect();
                let want: Vec<_> = model.range(q..).take(300).map(|(&k, &v)| (k, v)).collect();
                assert_eq!(from, want);
            }
        }
        p.check();
        assert_eq!(
            contents(&p),
            model.iter().map(|(&k, &v)| (k, v)).collect::<Vec<_>>()
        );
    }
}
