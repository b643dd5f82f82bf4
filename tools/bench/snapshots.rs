//! `--snapshots N`: 4K random write throughput of a volume with N snapshots
//! against one with none (same preparation writes, same store and disk).
//! Redirect-on-write means snapshots should cost nothing on the write path.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use shale::clock::SystemClock;
use shale::engine::config::EngineConfig;
use shale::engine::snapshot::take_snapshot;
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::fs::FsStore;
use shale::store::DynStore;

use super::{engine_pattern, Measure, Pattern};

async fn open(
    store: &DynStore,
    root: &Path,
    id: u64,
    size: u64,
    epoch: u64,
) -> Result<Arc<Volume>> {
    let params = VolumeParams {
        id,
        size,
        epoch,
        local_dir: root.join(format!("local-{id}")),
    };
    let cfg = EngineConfig {
        cache_size: 64 << 20,
        ..EngineConfig::default()
    };
    Ok(Volume::open(store.clone(), params, cfg, Arc::new(SystemClock)).await?)
}

/// Prepare volume `id` with `rounds` rounds of writes, taking a snapshot
/// after each when `snapshot`, then measure 4K random writes.
async fn measure(
    store: &DynStore,
    root: &Path,
    id: u64,
    size: u64,
    rounds: u64,
    snapshot: bool,
    secs: u64,
) -> Result<Measure> {
    let buf = vec![0xa5u8; 1 << 20];
    for r in 0..rounds {
        let v = open(store, root, id, size, r + 1).await?;
        // 8 MiB spread over the volume per round.
        for i in 0..8u64 {
            let off = (r * 8 + i) * (1 << 20) % size;
            v.write(off, &buf, false).await?;
        }
        v.close().await?;
        if snapshot {
            take_snapshot(store, id, &format!("s{r}"), 0).await?;
        }
    }
    let v = open(store, root, id, size, rounds + 1).await?;
    let m = engine_pattern(v.clone(), Pattern::RandWrite4k, size, secs).await?;
    v.close().await?;
    Ok(m)
}

/// Measures both volumes twice, in both orders (none, with, with, none), so
/// that whatever the disk does over time (page cache filling, store growing)
/// weighs on both sides alike.
pub async fn run(root: &Path, size: u64, secs: u64, snapshots: u64) -> Result<()> {
    let store: DynStore = Arc::new(FsStore::new(root.join("objects")));
    let none_1 = measure(&store, root, 10, size, snapshots, false, secs).await?;
    let with_1 = measure(&store, root, 11, size, snapshots, true, secs).await?;
    let with_2 = measure(&store, root, 12, size, snapshots, true, secs).await?;
    let none_2 = measure(&store, root, 13, size, snapshots, false, secs).await?;
    let none = none_1.iops() + none_2.iops();
    let with = with_1.iops() + with_2.iops();
    println!(
        "4K random write: no snapshots {:.0} + {:.0} IOPS, {snapshots} snapshots {:.0} + {:.0} IOPS (order none, with, with, none), ratio {:.3}",
        none_1.iops(),
        none_2.iops(),
        with_1.iops(),
        with_2.iops(),
        with / none
    );
    Ok(())
}
