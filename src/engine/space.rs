//! Space accounting of one volume, and the admission check that fails a
//! write needing space the pool lacks with ENOSPC before anything is logged.
//!
//! Definitions (bytes, counted in whole sectors):
//! - *live data*: sectors of the live map mapped to data (`Wal` or `Chunk`).
//!   `Zero` and unmapped sectors take no space.
//! - *snapshot refs* `S`: the set of chunk locations `(chunk, offset)` that
//!   any snapshot of the volume references (a [`LocSet`]). A chunk location
//!   holds the data of exactly one sector, so two maps share a sector's
//!   space exactly when they reference the same location.
//! - *used* = live data + `|S|` − (live data whose location is in `S`):
//!   the size of the union of the locations the live map and the snapshots
//!   reference. Redirect-on-write makes this cheap: overwriting or trimming
//!   a sector a snapshot shares moves it from "live" to "held only by
//!   snapshots" and frees nothing; overwriting unshared data frees it.
//! - *snapshot unique* (per snapshot): bytes of its locations that neither
//!   the live map nor any other snapshot references ([`usage_of`]).
//!
//! Physical chunk objects may hold more bytes than `used` until garbage
//! collection deletes or rewrites them; `used` is the data the volume keeps.
//!
//! Invariants:
//! 1. `used` is exact after every map change: the stored [`ExtentMap`]
//!    keeps its data and shared counters itself, and the overlay of WAL
//!    ranges over it keeps the bytes it hides (see [`super::live`]), so
//!    the live view's counters are exact whatever code path mutates them.
//! 2. A write is admitted only if `used + inflight + growth <= allowance`,
//!    where `growth` = its non-zero bytes − the live data it displaces that
//!    no snapshot holds, and `allowance = max(limit, reserve)`. Otherwise it
//!    fails with [`BlockError::NoSpace`] and nothing is logged or changed.
//! 3. Trims and write_zeroes never grow `used` and are always admitted.
//! 4. Growth admitted for a write stays counted in `inflight` until the
//!    write returns, so concurrent writes cannot together exceed the
//!    allowance.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::checkpoint::Checkpoint;
use super::map::ExtentMap;
use super::snapshot::{list_snapshots, SnapshotObject};
use super::state::State;
use super::volume::{Shared, Volume};
use super::wal::NewRecord;
use super::SECTOR;
use crate::error::BlockError;
use crate::store::DynStore;

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

    /// The locations every extent of `checkpoints` references.
    pub fn from_checkpoints<'a>(checkpoints: impl IntoIterator<Item = &'a Checkpoint>) -> Self {
        let mut set = LocSet::new();
        for cp in checkpoints {
            set.add_checkpoint(cp);
        }
        set
    }

    /// Add every location `cp`'s extents reference.
    pub fn add_checkpoint(&mut self, cp: &Checkpoint) {
        for &(_, len, chunk, off) in &cp.extents {
            self.insert(chunk, off, len.saturating_mul(SECTOR));
        }
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

/// Space of a volume with its snapshots, computed from maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapUsage {
    /// Live data + data held only by snapshots.
    pub used: u64,
    /// Data the live map references.
    pub live: u64,
    /// Data only snapshots reference (`used - live`).
    pub snapshot_only: u64,
    /// Per snapshot, in the order given: bytes no other map references.
    pub snapshot_unique: Vec<u64>,
}

/// Space of `live` with snapshots `snaps` (their frozen checkpoints), by
/// one sweep over every chunk location the maps reference: O(E log E) for
/// E extents in all.
pub fn usage_of(live: &ExtentMap, snaps: &[&Checkpoint]) -> MapUsage {
    let live_idx = snaps.len();
    // (chunk, byte position, +1 / -1, map index): each extent opens and
    // closes an interval of chunk locations.
    let mut events: Vec<(u64, u64, i64, usize)> = Vec::new();
    let mut push = |chunk: u64, off: u64, bytes: u64, idx: usize| {
        events.push((chunk, off, 1, idx));
        events.push((chunk, off.saturating_add(bytes), -1, idx));
    };
    for (i, cp) in snaps.iter().enumerate() {
        for &(_, len, chunk, off) in &cp.extents {
            push(chunk, off, len.saturating_mul(SECTOR), i);
        }
    }
    for (_, len, loc) in live.iter() {
        if let super::map::Loc::Chunk { chunk, off } = loc {
            push(chunk, off, len * SECTOR, live_idx);
        }
    }
    events.sort_unstable();
    let mut snapshot_unique = vec![0u64; snaps.len()];
    let mut snapshot_only = 0u64;
    // Maps covering the current segment: how many, the sum of their
    // indices (the one index when exactly one covers it), and whether the
    // live map is among them.
    let (mut count, mut idx_sum, mut live_count) = (0i64, 0usize, 0i64);
    let mut prev: Option<(u64, u64)> = None;
    for (chunk, pos, delta, idx) in events {
        if let Some((pc, pp)) = prev {
            if pc == chunk && pos > pp && count > 0 && live_count == 0 {
                let len = pos - pp;
                snapshot_only += len;
                if count == 1 {
                    if let Some(u) = snapshot_unique.get_mut(idx_sum) {
                        *u += len;
                    }
                }
            }
        }
        count += delta;
        if delta > 0 {
            idx_sum += idx;
        } else {
            idx_sum = idx_sum.wrapping_sub(idx);
        }
        if idx == live_idx {
            live_count += delta;
        }
        prev = Some((chunk, pos));
    }
    let live_bytes = live.data_bytes();
    MapUsage {
        used: live_bytes + snapshot_only,
        live: live_bytes,
        snapshot_only,
        snapshot_unique,
    }
}

/// The pool's terms for one open volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpaceState {
    /// Bytes this volume may use (its own `used` included); `None`:
    /// unlimited. Set from the pool by the attaching daemon.
    pub limit: Option<u64>,
    /// Bytes reserved for this volume (a thick volume's size): a write
    /// keeping `used` within it is always admitted.
    pub reserve: u64,
    /// Growth admitted for writes still in progress (invariant 4).
    pub inflight: u64,
}

/// A volume's space, as [`Volume::space_usage`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpaceUsage {
    pub used: u64,
    pub live: u64,
    pub snapshot_only: u64,
    pub limit: Option<u64>,
    pub reserve: u64,
}

impl State {
    /// Live data plus data held only by snapshots (see the module docs).
    pub fn used_bytes(&self) -> u64 {
        let refs = self.tracked().map_or(0, |s| s.bytes());
        (self.view_data_bytes() + refs).saturating_sub(self.view_shared_bytes())
    }
}

/// Growth admitted for one write; given back when dropped.
pub(crate) struct Grant {
    shared: Arc<Shared>,
    bytes: u64,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut st = self.shared.lock();
            st.space.inflight = st.space.inflight.saturating_sub(self.bytes);
        }
    }
}

/// Admit a write of `recs` (covering `[offset, offset+len)` bytes) or fail
/// with [`BlockError::NoSpace`] (invariant 2).
pub(crate) fn admit(
    shared: &Arc<Shared>,
    offset: u64,
    len: u64,
    recs: &[NewRecord],
) -> Result<Grant, BlockError> {
    let mut st = shared.lock();
    let Some(limit) = st.space.limit else {
        return Ok(Grant {
            shared: shared.clone(),
            bytes: 0,
        });
    };
    let new_bytes: u64 = recs.iter().map(|r| r.data.len() as u64).sum();
    let (data, shared_bytes) = st.view_data_in(offset / SECTOR, len / SECTOR);
    let freed = data - shared_bytes;
    let growth = new_bytes.saturating_sub(freed);
    if growth > 0 {
        let allowance = limit.max(st.space.reserve);
        let after = st.used_bytes() + st.space.inflight + growth;
        if after > allowance {
            return Err(BlockError::NoSpace);
        }
        st.space.inflight += growth;
    }
    Ok(Grant {
        shared: shared.clone(),
        bytes: growth,
    })
}

/// The locations the snapshots of `volume` reference, or `None` (with a
/// warning) when they cannot be read: `used` then leaves out data held only
/// by snapshots.
pub(crate) async fn load_snapshot_refs(store: &DynStore, volume: u64) -> Option<Arc<LocSet>> {
    match list_snapshots(store, volume).await {
        Ok(snaps) => Some(Arc::new(refs_of(&snaps))),
        Err(e) => {
            log::warn!("volume {volume:x}: cannot read its snapshots for space accounting: {e}");
            None
        }
    }
}

fn refs_of(snaps: &[SnapshotObject]) -> LocSet {
    LocSet::from_checkpoints(snaps.iter().map(|s| &s.checkpoint))
}

impl Volume {
    /// The volume's space now (exact; see the module docs).
    pub fn space_usage(&self) -> SpaceUsage {
        let st = self.inner.shared.lock();
        let used = st.used_bytes();
        let live = st.view_data_bytes();
        SpaceUsage {
            used,
            live,
            snapshot_only: used.saturating_sub(live),
            limit: st.space.limit,
            reserve: st.space.reserve,
        }
    }

    /// Set how many bytes the volume may use (`None`: unlimited).
    pub fn set_space_limit(&self, limit: Option<u64>) {
        self.inner.shared.lock().space.limit = limit;
    }

    /// Set the bytes reserved for the volume (a thick volume's size).
    pub fn set_space_reserve(&self, bytes: u64) {
        self.inner.shared.lock().space.reserve = bytes;
    }

    /// Account against the snapshots in `snaps` from now on (call after a
    /// snapshot of this volume was created or deleted).
    pub fn set_snapshots(&self, snaps: &[SnapshotObject]) {
        let refs = Arc::new(refs_of(snaps));
        self.inner.shared.lock().track(Some(refs));
    }

    /// Re-read the volume's snapshots from the store and account against
    /// them (see [`Volume::set_snapshots`]).
    pub async fn reload_snapshots(&self) -> Result<(), super::snapshot::SnapshotError> {
        let snaps = list_snapshots(&self.inner.store, self.inner.id).await?;
        self.set_snapshots(&snaps);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
