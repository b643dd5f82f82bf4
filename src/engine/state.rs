//! The volume's mutable state, guarded by one mutex that is never held
//! across I/O.
//!
//! Invariants:
//! 1. The view (`overlay` over `stored`, see [`super::live`]) is what
//!    reads see: every acknowledged write, pointing at the WAL until its
//!    chunk is stored, then at the chunk. `overlay` holds only what
//!    `stored` does not yet: callers read the view through the `view_*`
//!    methods and never change `overlay` or `stored` except through
//!    `State` methods (which keep the overlay's counters exact).
//! 2. `stored` is exactly the map recovery would build from the store alone
//!    (checkpoint + chunks `..=last_chunk`); it holds only chunk locations.
//!    It is shared copy-on-write: a checkpoint takes an `Arc` clone under
//!    the lock (O(1)) and drops it once encoded; mutations go through
//!    [`State::stored_mut`], which copies the map only if such a clone is
//!    still alive (a checkpoint of the meta task encoding or uploading
//!    while the destage task applies a chunk, or compaction re-points
//!    ranges: the first change copies the map's leaf index, O(leaves), and
//!    each changed leaf).
//!    Every change goes through [`State::stored_insert`] or
//!    [`State::stored_remove`], which mark the range in `dirty`: `dirty`
//!    covers every range where `stored` may differ from the committed
//!    checkpoint chain (what the next delta carries).
//! 3. `pending` holds, in sequence order, every WAL record with
//!    `seq > stored_seq`; its first record's seq is `stored_seq + 1`.
//! 4. `chunks[c].live_sectors` counts the sectors of `stored` pointing at `c`.
//! 5. With `keep_zeros` (a clone: unmapped ranges read its parent), trims,
//!    zeroing and all-zero data leave [`Loc::Zero`] in `live` and `stored`;
//!    without it they unmap: `stored` never holds `Loc::Zero` and the
//!    view never shows it (the overlay's `Zero` entries read as unmapped).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;

use super::checkpoint::ChunkInfo;
use super::format::chunk::ChunkExtent;
use super::live::Overlay;
use super::map::LocSet;
use super::map::{ExtentMap, Loc, Piece, WalLoc};
use super::wal::record::RecordKind;
use super::wal::Appended;
use super::SECTOR;

/// A WAL record not yet in the store.
#[derive(Debug, Clone, Copy)]
pub struct PendingRec {
    pub seq: u64,
    pub kind: RecordKind,
    pub lba: u64,
    pub sectors: u64,
    pub loc: Option<WalLoc>,
    /// The next record continues the same write request: a chunk must not
    /// end here.
    pub more: bool,
    /// When it was appended (injected clock).
    pub at: Duration,
}

impl PendingRec {
    /// Bytes it counts against the unstored bound (trims count one sector).
    pub fn cost(&self) -> u64 {
        match self.kind {
            RecordKind::Write => self.sectors * SECTOR,
            _ => SECTOR,
        }
    }
}

/// A stored chunk and how much of `stored` still uses it.
#[derive(Debug, Clone)]
pub struct ChunkEntry {
    pub info: Arc<ChunkInfo>,
    pub live_sectors: u64,
}

#[derive(Debug, Default)]
pub struct State {
    /// Ranges whose newest change is still in the WAL (invariant 1).
    pub overlay: Overlay,
    pub stored: Arc<ExtentMap>,
    pub chunks: HashMap<u64, ChunkEntry>,
    pub pending: VecDeque<PendingRec>,
    pub pending_bytes: u64,
    /// Room under the unstored bound held by requests admitted and not
    /// yet in `pending` (`volume::Room`): the bound is checked against
    /// `pending_bytes + admitted_bytes`.
    pub admitted_bytes: u64,
    /// Last op sequence number durable in the store.
    pub stored_seq: u64,
    /// Last chunk durable in the store (and applied).
    pub last_chunk: u64,
    /// Sequence number of the next chunk to build.
    pub next_chunk: u64,
    /// Last op seq taken into a built chunk (applied or in flight).
    pub taken_seq: u64,
    /// Cost of the pending records taken into chunks not yet applied.
    pub taken_bytes: u64,
    /// Last op sequence number a manifest commit covers.
    pub committed_seq: u64,
    /// Highest op seq a `durability: store` flush waits for.
    pub store_target: u64,
    /// Chunk covered by the newest committed checkpoint.
    pub checkpoint_chunk: u64,
    pub checkpoint_key: Option<String>,
    /// Ranges of `stored` changed since the committed checkpoint.
    pub dirty: super::checkpoint::dirty::DirtySet,
    /// The committed chain's chunk table: seq -> epoch.
    pub cp_table: HashMap<u64, u64>,
    /// Where the committed chain stands (base, deltas, their sizes).
    pub chain: super::meta::chain::ChainPos,
    /// Tasks waiting for destage progress (backpressure, store flushes).
    pub waiters: Vec<oneshot::Sender<()>>,
    pub fenced: Option<String>,
    pub closing: bool,
    /// Consecutive failed destage attempts.
    pub destage_failures: u32,
    /// A snapshot create, delete or GC of the open volume is running (one
    /// at a time, see `live_snapshot.rs`; its requests go to the destage
    /// task on a channel, not through this state).
    pub snapshot_busy: bool,
    /// A snapshot is being taken: new writes, trims and zeroes wait.
    pub writes_paused: bool,
    /// The pool's terms for this volume (see [`super::space`]).
    pub space: super::space::SpaceState,
    /// The volume has a parent: zeroed ranges stay mapped (invariant 5).
    pub keep_zeros: bool,
    /// Next compaction object id (without its high bit; see
    /// [`super::compact`]): above every one the store holds.
    pub next_compacted: u64,
}

impl State {
    /// Change `[start, start+len)` of the stored map (invariant 2: the
    /// map is copied first, O(leaves), only if a checkpoint still holds
    /// it), marking it dirty and keeping the overlay's counters exact.
    fn stored_change(
        &mut self,
        start: u64,
        len: u64,
        change: impl FnOnce(&mut ExtentMap) -> Vec<Piece>,
    ) -> Vec<Piece> {
        self.dirty.insert(start, len);
        let stored = Arc::make_mut(&mut self.stored);
        self.overlay.change_stored(stored, start, len, change)
    }

    /// Map `[start, start+len)` of `stored` to `loc`, marking it dirty.
    pub fn stored_insert(&mut self, start: u64, len: u64, loc: Loc) -> Vec<Piece> {
        self.stored_change(start, len, |m| m.insert(start, len, loc))
    }

    /// Unmap `[start, start+len)` of `stored`, marking it dirty.
    pub fn stored_remove(&mut self, start: u64, len: u64) -> Vec<Piece> {
        self.stored_change(start, len, |m| m.remove(start, len))
    }

    /// What reads see over `[start, start+len)`: pieces in order, holes as
    /// `loc: None` (invariant 1).
    pub fn view_lookup(&self, start: u64, len: u64) -> Vec<Piece> {
        self.view_lookup_limited(start, len, usize::MAX)
    }

    /// [`State::view_lookup`], stopping after `max` pieces (at least one):
    /// they then cover a prefix of the range.
    pub fn view_lookup_limited(&self, start: u64, len: u64, max: usize) -> Vec<Piece> {
        if self.overlay.is_empty() {
            // Everything is stored (the common case between bursts).
            return self.stored.lookup_limited(start, len, max);
        }
        self.overlay
            .lookup_limited(&self.stored, self.keep_zeros, start, len, max)
    }

    /// Data bytes the view maps (WAL or chunk locations).
    pub fn view_data_bytes(&mut self) -> u64 {
        self.overlay.data_bytes(&self.stored)
    }

    /// Data bytes of the view whose chunk location lies in the tracked
    /// set (see [`super::space`]).
    pub fn view_shared_bytes(&mut self) -> u64 {
        self.overlay.shared_bytes(&self.stored)
    }

    /// Data bytes of the view in `[start, start+len)`, and how many of
    /// them lie in the tracked set.
    pub fn view_data_in(&self, start: u64, len: u64) -> (u64, u64) {
        self.overlay.data_in(&self.stored, start, len)
    }

    /// The tracked location set (snapshot references), if any.
    pub fn tracked(&self) -> Option<&Arc<LocSet>> {
        self.stored.tracked()
    }

    /// Count shared bytes against `set` from now on (`None`: stop).
    pub fn track(&mut self, set: Option<Arc<LocSet>>) {
        if set.is_none() && self.stored.tracked().is_none() {
            // Nothing tracked before or after: no count changes (and no
            // pass over the maps, which open would pay per extent).
            return;
        }
        Arc::make_mut(&mut self.stored).track(set);
        self.overlay.recount(&self.stored);
    }

    /// Every mapped run of the view in ascending order (holes left out;
    /// `Zero` runs only in a clone). O(extents): for tests.
    #[cfg(test)]
    pub fn view_extents(&self) -> Vec<(u64, u64, Loc)> {
        let mut out = Vec::new();
        let mut pos = 0u64;
        loop {
            let pieces = self.view_lookup_limited(pos, u64::MAX - pos, 4096);
            let Some(last) = pieces.last() else { break };
            pos = last.start + last.len;
            out.extend(
                pieces
                    .into_iter()
                    .filter_map(|p| p.loc.map(|loc| (p.start, p.len, loc))),
            );
            if pos == u64::MAX {
                break;
            }
        }
        out
    }

    /// The view as one map (tests; O(extents)).
    #[cfg(test)]
    pub fn view_map(&self) -> ExtentMap {
        let mut m = ExtentMap::new();
        for (s, l, loc) in self.view_extents() {
            m.insert(s, l, loc);
        }
        m
    }

    /// Mapped runs of the view (what one merged map of it would hold):
    /// `stored`'s entries, corrected over each run of overlay entries.
    /// O(overlay entries × log extents).
    pub fn extent_count(&self) -> usize {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (s, l, _) in self.overlay.iter() {
            match runs.last_mut() {
                Some((rs, rl)) if *rs + *rl == s => *rl += l,
                _ => runs.push((s, l)),
            }
        }
        let mapped = |ps: Vec<Piece>| ps.iter().filter(|p| p.loc.is_some()).count();
        // One mapped piece over `[at-1, at+1)`: an entry crosses `at`.
        let crosses = |at: u64| {
            let ps = self.stored.lookup(at.saturating_sub(1), 2);
            at > 0 && ps.len() == 1 && ps[0].loc.is_some()
        };
        let mut n = self.stored.len() as i64;
        for (a, l) in runs {
            let b = a + l;
            n += mapped(self.view_lookup(a, l)) as i64;
            n -= mapped(self.stored.lookup(a, l)) as i64;
            n += i64::from(crosses(a)) + i64::from(crosses(b));
        }
        usize::try_from(n).unwrap_or(0)
    }

    /// Wake every waiter; each re-checks its own condition.
    pub fn wake_all(&mut self) {
        for w in self.waiters.drain(..) {
            let _ = w.send(());
        }
    }

    /// Point the live map at freshly logged records and queue them for destage.
    pub fn apply_appended(&mut self, recs: &[Appended], now: Duration) {
        for a in recs {
            match (a.kind, a.loc) {
                (RecordKind::Write, Some(loc)) => {
                    self.overlay.set_wal(&self.stored, a.lba, a.sectors, loc);
                }
                _ => self.overlay.set_zero(&self.stored, a.lba, a.sectors, a.seq),
            }
            let p = PendingRec {
                seq: a.seq,
                kind: a.kind,
                lba: a.lba,
                sectors: a.sectors,
                loc: a.loc,
                more: a.more,
                at: now,
            };
            self.pending_bytes += p.cost();
            self.pending.push_back(p);
        }
    }

    fn uncount(&mut self, removed: Vec<Piece>) {
        for p in removed {
            if let Some(Loc::Chunk { chunk, .. }) = p.loc {
                if let Some(e) = self.chunks.get_mut(&chunk) {
                    e.live_sectors = e.live_sectors.saturating_sub(p.len);
                }
            }
        }
    }

    /// Apply a stored chunk to the store-side map (recovery and destage).
    pub fn apply_chunk_to_stored(&mut self, info: Arc<ChunkInfo>, extents: &[ChunkExtent]) {
        let seq = info.seq;
        self.chunks.insert(
            seq,
            ChunkEntry {
                info,
                live_sectors: 0,
            },
        );
        for e in extents {
            let removed = match e.data_off {
                Some(off) => {
                    let r = self.stored_insert(e.lba, e.sectors, Loc::Chunk { chunk: seq, off });
                    if let Some(c) = self.chunks.get_mut(&seq) {
                        c.live_sectors += e.sectors;
                    }
                    r
                }
                None if self.keep_zeros => self.stored_insert(e.lba, e.sectors, Loc::Zero),
                None => self.stored_remove(e.lba, e.sectors),
            };
            self.uncount(removed);
        }
    }

    /// Drop the overlay where chunk `_chunk` (already applied to `stored`,
    /// holding WAL records `..= last_seq`) now holds the newest change:
    /// ranges still at those records (overlay invariant 2).
    pub fn apply_chunk_to_live(&mut self, _chunk: u64, last_seq: u64, extents: &[ChunkExtent]) {
        for e in extents {
            self.overlay
                .drop_through(&self.stored, e.lba, e.sectors, last_seq);
        }
    }

    /// Drop pending records now in the store.
    pub fn pop_stored(&mut self, last_seq: u64) {
        while let Some(p) = self.pending.front() {
            if p.seq > last_seq {
                break;
            }
            self.pending_bytes -= p.cost();
            self.pending.pop_front();
        }
        self.stored_seq = self.stored_seq.max(last_seq);
    }
}
