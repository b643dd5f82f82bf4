//! Space accounting of one volume: how much it uses with its snapshots.
//! The admission check that fails a write needing space the pool lacks
//! with ENOSPC is in `space_admission.rs`.
//!
//! Definitions (bytes, counted in whole sectors):
//! - *live data*: sectors of the live map mapped to data (`Wal` or `Chunk`).
//!   `Zero` and unmapped sectors take no space.
//! - *snapshot refs* `S`: the set of chunk locations `(chunk, offset)` that
//!   any snapshot of the volume references (a
//!   [`LocSet`](super::map::LocSet)). A chunk location
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
//! Invariant: `used` is exact after every map change: the stored
//! [`ExtentMap`] keeps its data and shared counters itself, and the overlay
//! of WAL ranges over it keeps the bytes it hides (see [`super::live`]), so
//! the live view's counters are exact whatever code path mutates them.

use super::checkpoint::Checkpoint;
use super::map::{ExtentMap, Loc};
use super::SECTOR;

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
        if let Loc::Chunk { chunk, off } = loc {
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
    /// Growth admitted for writes still in progress (see
    /// `space_admission.rs`, invariant 3).
    pub inflight: u64,
}

/// A volume's space, as [`super::volume::Volume::space_usage`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpaceUsage {
    pub used: u64,
    pub live: u64,
    pub snapshot_only: u64,
    pub limit: Option<u64>,
    pub reserve: u64,
}

#[cfg(test)]
mod tests;
