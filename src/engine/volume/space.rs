//! The space API of an open volume (over [`crate::engine::space_admission`],
//! which admits writes against it).

use std::sync::Arc;

use super::Volume;
use crate::engine::format::snapshot::SnapshotObject;
use crate::engine::snapshot::store::{list_snapshots, SnapshotError};
use crate::engine::space::SpaceUsage;
use crate::engine::space_admission::refs_of;

impl Volume {
    /// The volume's space now (exact; what it counts is defined in
    /// [`crate::engine::space`]).
    pub fn space_usage(&self) -> SpaceUsage {
        let mut st = self.inner.shared.lock();
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
    pub async fn reload_snapshots(&self) -> Result<(), SnapshotError> {
        let snaps = list_snapshots(&self.inner.store, self.inner.id).await?;
        self.set_snapshots(&snaps);
        Ok(())
    }
}
