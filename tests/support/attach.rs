//! Attaching a catalogued volume the way a server does: take its lease, then
//! open it at the lease's epoch in its directory under `data_dir`.

use std::path::Path;
use std::time::Duration;

use shale::catalog::lease::Lease;
use shale::catalog::VolumeRecord;
use shale::clock::DynClock;
use shale::engine::volume::VolumeParams;
use shale::store::DynStore;

/// The lease of `rec` (held for 60 s by `holder`) and the parameters that
/// open it at that lease's epoch in `<data_dir>/volumes/<id as 16 hex>`.
pub async fn lease_for(
    store: &DynStore,
    clock: &DynClock,
    data_dir: &Path,
    rec: &VolumeRecord,
    holder: &str,
) -> (Lease, VolumeParams) {
    let lease = Lease::acquire(
        store.clone(),
        rec.id,
        holder,
        Duration::from_secs(60),
        clock.clone(),
    )
    .await
    .expect("acquire the volume's lease");
    let params = VolumeParams {
        id: rec.id,
        size: rec.size,
        epoch: lease.epoch(),
        local_dir: data_dir.join("volumes").join(format!("{:016x}", rec.id)),
    };
    (lease, params)
}
