//! The space admission of an open volume: a write needing space the pool
//! lacks fails with ENOSPC before anything is logged. The volume's space
//! API is in `volume/space.rs`. What `used` counts is defined in
//! [`super::space`].
//!
//! Invariants:
//! 1. A write is admitted only if `used + inflight + growth <= allowance`,
//!    where `growth` = its non-zero bytes − the live data it displaces that
//!    no snapshot holds, and `allowance = max(limit, reserve)`. Otherwise it
//!    fails with [`BlockError::NoSpace`] and nothing is logged or changed.
//! 2. Trims and write_zeroes never grow `used` and are always admitted.
//! 3. Growth admitted for a write stays counted in `inflight` until the
//!    write returns, so concurrent writes cannot together exceed the
//!    allowance.

use std::sync::Arc;

use super::format::snapshot::SnapshotObject;
use super::map::LocSet;
use super::snapshot::store::list_snapshots;
use super::state::State;
use super::volume_core::Shared;
use super::wal::NewRecord;
use super::SECTOR;
use crate::error::BlockError;
use crate::store::DynStore;

impl State {
    /// Live data plus data held only by snapshots (see [`super::space`]).
    pub fn used_bytes(&mut self) -> u64 {
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
/// with [`BlockError::NoSpace`] (invariant 1).
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

/// The chunk locations the checkpoints of `snaps` reference.
pub(crate) fn refs_of(snaps: &[SnapshotObject]) -> LocSet {
    let mut set = LocSet::new();
    for s in snaps {
        s.checkpoint.add_locations(&mut set);
    }
    set
}
