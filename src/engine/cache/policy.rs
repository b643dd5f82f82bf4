//! S3-FIFO eviction over a fixed set of slots (Yang et al., "FIFO queues
//! are all you need for cache eviction", SOSP 2023), written for block
//! workloads.
//!
//! Three FIFO queues: *small* (about a tenth of the slots) where every new
//! entry starts, *main* for entries that proved themselves, and *ghost*
//! (key hashes only, no data) remembering what small evicted recently.
//!
//! Invariants:
//! 1. Every slot is in exactly one state: free, filling (handed out by
//!    [`Policy::victim`], not yet [`Policy::insert`]ed), in small or in
//!    main. `small_len` / `main_len` count the live entries of each queue;
//!    the deques may also hold stale `(slot, gen)` pairs of slots released
//!    or moved since, which are skipped when popped (a slot's `gen` changes
//!    whenever it leaves a queue other than by a pop).
//! 2. Only [`Policy::reused`] raises an entry's frequency (capped at 3).
//!    The cache calls it when a read touches sectors of a window that an
//!    earlier read already touched, so a sequential scan reading each
//!    sector once never raises a frequency: its windows pass through small
//!    into the ghost and never displace main (scan resistance).
//! 3. Eviction takes from small while it holds at least its target share
//!    (or main is empty): its oldest entry moves to main if it was reused,
//!    else it is evicted and its hash remembered in the ghost. Otherwise
//!    main's oldest entry is evicted if its frequency is 0, else it is
//!    re-queued with its frequency lowered by one. Each entry is requeued
//!    at most 3 times per pass, so eviction always ends.
//! 4. An entry inserted while its hash is in the ghost goes straight to
//!    main. The ghost holds at most as many hashes as main has slots.
//! 5. Memory: [`Policy::index_bytes`] per slot is a fixed size, so the
//!    policy's RAM is proportional to the cache size.

use std::collections::{HashSet, VecDeque};

/// Highest frequency an entry reaches.
const MAX_FREQ: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Free,
    Filling,
    Small,
    Main,
}

#[derive(Debug, Clone, Copy)]
struct SlotState {
    gen: u32,
    queue: Queue,
    freq: u8,
    hash: u64,
}

/// The eviction state of `n` slots.
#[derive(Debug)]
pub struct Policy {
    slots: Vec<SlotState>,
    free: Vec<u32>,
    small: VecDeque<(u32, u32)>,
    main: VecDeque<(u32, u32)>,
    small_len: usize,
    main_len: usize,
    small_target: usize,
    ghost: VecDeque<u64>,
    ghost_set: HashSet<u64>,
    ghost_cap: usize,
}

impl Policy {
    /// `n` free slots (`n >= 1`).
    pub fn new(n: usize) -> Policy {
        let small_target = (n / 10).max(1);
        let ghost_cap = n.saturating_sub(small_target).max(1);
        Policy {
            slots: vec![
                SlotState {
                    gen: 0,
                    queue: Queue::Free,
                    freq: 0,
                    hash: 0,
                };
                n
            ],
            free: (0..n as u32).rev().collect(),
            small: VecDeque::with_capacity(small_target + 1),
            main: VecDeque::with_capacity(n),
            small_len: 0,
            main_len: 0,
            small_target,
            ghost: VecDeque::with_capacity(ghost_cap),
            ghost_set: HashSet::with_capacity(ghost_cap),
            ghost_cap,
        }
    }

    /// A slot to fill: a free one, else one evicted. Returns the slot and
    /// whether it was evicted (its previous entry must leave the index);
    /// `None` when every slot is being filled. The slot is `Filling` until
    /// [`Policy::insert`] or [`Policy::release`].
    pub fn victim(&mut self) -> Option<(u32, bool)> {
        // The free list may name slots restored since (see `restore`).
        while let Some(s) = self.free.pop() {
            if self.slots[s as usize].queue == Queue::Free {
                self.set_filling(s);
                return Some((s, false));
            }
        }
        loop {
            let s = if self.small_len >= self.small_target || self.main_len == 0 {
                let (s, g) = self.small.pop_front()?;
                let st = &mut self.slots[s as usize];
                if st.gen != g || st.queue != Queue::Small {
                    continue;
                }
                self.small_len -= 1;
                if st.freq > 0 {
                    st.freq = 0;
                    st.queue = Queue::Main;
                    self.main.push_back((s, g));
                    self.main_len += 1;
                    continue;
                }
                let hash = st.hash;
                self.remember(hash);
                s
            } else {
                let (s, g) = self.main.pop_front()?;
                let st = &mut self.slots[s as usize];
                if st.gen != g || st.queue != Queue::Main {
                    continue;
                }
                if st.freq > 0 {
                    st.freq -= 1;
                    self.main.push_back((s, g));
                    continue;
                }
                self.main_len -= 1;
                s
            };
            self.set_filling(s);
            return Some((s, true));
        }
    }

    /// Put the filled slot `s` (from [`Policy::victim`]) into its queue:
    /// main if `hash` is in the ghost, else small.
    pub fn insert(&mut self, s: u32, hash: u64) {
        let to_main = self.ghost_set.remove(&hash);
        self.place(s, hash, to_main);
    }

    /// Put free slot `s` straight into main (entries found on disk at
    /// open). It stays named in the free list, which skips it.
    pub fn restore(&mut self, s: u32, hash: u64) {
        if self.slots[s as usize].queue != Queue::Free {
            return;
        }
        self.set_filling(s);
        self.place(s, hash, true);
    }

    fn place(&mut self, s: u32, hash: u64, to_main: bool) {
        let st = &mut self.slots[s as usize];
        debug_assert_eq!(st.queue, Queue::Filling);
        st.hash = hash;
        st.freq = 0;
        let g = st.gen;
        if to_main {
            st.queue = Queue::Main;
            self.main.push_back((s, g));
            self.main_len += 1;
        } else {
            st.queue = Queue::Small;
            self.small.push_back((s, g));
            self.small_len += 1;
        }
    }

    /// Slot `s`'s generation: changes whenever the slot is handed out or
    /// released.
    pub fn gen(&self, s: u32) -> u32 {
        self.slots[s as usize].gen
    }

    /// The entry in slot `s` was read again (invariant 2).
    pub fn reused(&mut self, s: u32) {
        let st = &mut self.slots[s as usize];
        if matches!(st.queue, Queue::Small | Queue::Main) {
            st.freq = (st.freq + 1).min(MAX_FREQ);
        }
    }

    /// Free slot `s` (its entry was dropped, or filling it failed).
    pub fn release(&mut self, s: u32) {
        let st = &mut self.slots[s as usize];
        match st.queue {
            Queue::Free => return,
            Queue::Small => self.small_len -= 1,
            Queue::Main => self.main_len -= 1,
            Queue::Filling => {}
        }
        st.queue = Queue::Free;
        st.gen = st.gen.wrapping_add(1);
        self.free.push(s);
        // Drop stale pairs once they outnumber the live ones.
        if self.small.len() > 2 * self.small_len + 16 {
            let slots = &self.slots;
            self.small.retain(|&(s, g)| {
                slots[s as usize].gen == g && slots[s as usize].queue == Queue::Small
            });
        }
        if self.main.len() > 2 * self.main_len + 16 {
            let slots = &self.slots;
            self.main.retain(|&(s, g)| {
                slots[s as usize].gen == g && slots[s as usize].queue == Queue::Main
            });
        }
    }

    fn set_filling(&mut self, s: u32) {
        let st = &mut self.slots[s as usize];
        st.queue = Queue::Filling;
        st.freq = 0;
        st.gen = st.gen.wrapping_add(1);
    }

    fn remember(&mut self, hash: u64) {
        if self.ghost_set.contains(&hash) {
            return;
        }
        while self.ghost.len() >= self.ghost_cap {
            match self.ghost.pop_front() {
                Some(old) => {
                    self.ghost_set.remove(&old);
                }
                None => break,
            }
        }
        self.ghost.push_back(hash);
        self.ghost_set.insert(hash);
    }

    /// Bytes of RAM the policy holds at most (all queues and the ghost
    /// full), from the sizes of its parts.
    pub fn index_bytes(&self) -> usize {
        let n = self.slots.len();
        let pair = std::mem::size_of::<(u32, u32)>();
        n * std::mem::size_of::<SlotState>()
            + n * std::mem::size_of::<u32>()
            // small and main together hold at most n live pairs, plus as
            // many stale ones before they are dropped.
            + 2 * n * pair
            // ghost deque + hash set (8-byte key, 1 control byte, 7/8 load).
            + self.ghost_cap * (8 + (8 + 1) * 8 / 7)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fill all slots with hashes `0..n`, then read each of `hot` again.
    fn fill(p: &mut Policy, n: u64) -> Vec<u32> {
        (0..n)
            .map(|h| {
                let (s, evicted) = p.victim().unwrap();
                assert!(!evicted);
                p.insert(s, h);
                s
            })
            .collect()
    }

    #[test]
    fn a_scan_does_not_evict_reused_entries() {
        let mut p = Policy::new(100);
        let slots = fill(&mut p, 100);
        // Entries 0..50 are hot: read again.
        for &s in &slots[..50] {
            p.reused(s);
        }
        let hot: HashSet<u32> = slots[..50].iter().copied().collect();
        // A scan three times the cache size, nothing read twice.
        for h in 1000..1300u64 {
            let (s, evicted) = p.victim().unwrap();
            assert!(evicted);
            assert!(!hot.contains(&s), "scan entry {h} evicted a hot slot");
            p.insert(s, h);
        }
    }

    #[test]
    fn ghost_hits_go_to_main_and_everything_is_evictable() {
        let mut p = Policy::new(10);
        fill(&mut p, 10);
        // Evict hash 0 (oldest in small, never reused) into the ghost.
        let (s, _) = p.victim().unwrap();
        p.insert(s, 0);
        assert_eq!(p.slots[s as usize].queue, Queue::Main);
        // Reused entries still leave main after enough pressure.
        for s in 0..10 {
            p.reused(s);
            p.reused(s);
            p.reused(s);
            p.reused(s);
        }
        // One-hit entries never reach main, so they cannot push it out...
        for h in 100..200 {
            let (s, _) = p.victim().unwrap();
            p.insert(s, h);
        }
        let main_hashes: HashSet<u64> = p
            .slots
            .iter()
            .filter(|s| s.queue == Queue::Main)
            .map(|s| s.hash)
            .collect();
        assert!(main_hashes.contains(&0), "{main_hashes:?}");
        // ...but entries read again are promoted and push main's old
        // entries out once their frequency has run down.
        for h in 200..300 {
            let (s, _) = p.victim().unwrap();
            p.insert(s, h);
            p.reused(s);
        }
        let hashes: HashSet<u64> = p.slots.iter().map(|s| s.hash).collect();
        assert!(hashes.iter().all(|&h| h >= 200), "{hashes:?}");
    }

    #[test]
    fn released_and_filling_slots_are_not_handed_out_twice() {
        let mut p = Policy::new(4);
        let a = fill(&mut p, 4);
        p.release(a[1]);
        let (s, evicted) = p.victim().unwrap();
        assert_eq!((s, evicted), (a[1], false));
        // s is filling: the other three get evicted first, then nothing.
        let mut got = HashSet::new();
        while let Some((v, _)) = p.victim() {
            assert_ne!(v, s);
            assert!(got.insert(v), "slot {v} handed out twice");
        }
        assert_eq!(got.len(), 3);
        p.release(s);
        assert_eq!(p.victim(), Some((s, false)));
        // Restored entries land in main.
        let mut p = Policy::new(3);
        p.restore(2, 7);
        assert_eq!(p.slots[2].queue, Queue::Main);
        assert_eq!(p.victim().map(|v| v.1), Some(false));
        assert_eq!(p.victim().map(|v| v.1), Some(false));
        assert_eq!(p.victim(), Some((2, true)));
    }
}
