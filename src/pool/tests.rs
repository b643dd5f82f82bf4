use std::sync::Arc;

use super::*;
use crate::clock::SystemClock;
use crate::engine::config::EngineConfig;
use crate::engine::usage::{publish, VolumeUsage};
use crate::engine::{BlockDevice, Volume, VolumeParams};
use crate::store::memory::MemoryStore;

const MIB: u64 = 1 << 20;

fn cfg(capacity: Option<u64>) -> PoolConfig {
    PoolConfig {
        capacity,
        warn_percent: 50,
    }
}

async fn setup() -> Catalog {
    let store: DynStore = Arc::new(MemoryStore::new());
    Catalog::new(store)
}

async fn published(catalog: &Catalog, id: u64, used: u64) {
    let u = VolumeUsage {
        volume: id,
        used,
        live: used,
        snapshot_only: 0,
        updated_ms: 5,
    };
    publish(catalog.store(), &u).await.unwrap();
}

#[tokio::test]
async fn figures_add_up_with_thin_and_thick_volumes() {
    let catalog = setup().await;
    let thin = catalog.create("thin", 100 * MIB, false, 0).await.unwrap();
    let thick = catalog.create("thick", 40 * MIB, true, 0).await.unwrap();
    let fresh = catalog.create("fresh", 8 * MIB, false, 0).await.unwrap();
    published(&catalog, thin.id, 30 * MIB).await;
    published(&catalog, thick.id, 10 * MIB).await;
    let st = status(&catalog, &cfg(Some(100 * MIB))).await.unwrap();
    assert_eq!(st.used, 40 * MIB);
    assert_eq!(st.reserved, 40 * MIB);
    assert_eq!(st.allocated, 70 * MIB, "thin 30 + thick max(10, 40)");
    assert_eq!(st.provisioned, 148 * MIB);
    assert_eq!(st.available(), Some(30 * MIB));
    assert_eq!(st.overprovisioning(), Some(1.48));
    assert!(st.warning(), "70% >= 50%");
    assert!(st.warning_message().unwrap().contains("70.0%"));
    let fresh_space = st.volumes.iter().find(|v| v.id == fresh.id).unwrap();
    assert_eq!((fresh_space.used, fresh_space.updated_ms), (0, None));
    assert_eq!(st.limit_for(thin.id), Some(60 * MIB));
    assert_eq!(st.limit_for(thick.id), Some(70 * MIB));
    st.check_thick(30 * MIB).unwrap();
    let e = st.check_thick(30 * MIB + 4096).unwrap_err().to_string();
    assert!(e.contains("available 30MiB"), "{e}");
    let unlimited = status(&catalog, &cfg(None)).await.unwrap();
    assert_eq!(unlimited.limit_for(thin.id), None);
    assert!(!unlimited.warning());
    unlimited.check_thick(1 << 50).unwrap();
}

#[tokio::test]
async fn unreadable_usage_charges_the_whole_size() {
    let catalog = setup().await;
    let v = catalog.create("v", 64 * MIB, false, 0).await.unwrap();
    catalog
        .store()
        .put(
            &crate::engine::format::layout::usage_key(v.id),
            bytes::Bytes::from_static(b"not json"),
            crate::store::PutMode::Overwrite,
        )
        .await
        .unwrap();
    let st = status(&catalog, &cfg(Some(MIB << 10))).await.unwrap();
    assert_eq!(st.allocated, 64 * MIB);
    assert!(st.volumes[0].error.as_deref().unwrap().contains("corrupt"));
}

/// A volume closed without publishing is measured from its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublished_volume_is_computed_from_the_store() {
    let catalog = setup().await;
    let rec = catalog.create("v", 4 * MIB, false, 0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let params = VolumeParams {
        id: rec.id,
        size: rec.size,
        epoch: 1,
        local_dir: dir.path().to_path_buf(),
    };
    let vol = Volume::open(
        catalog.store().clone(),
        params,
        EngineConfig::default(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    vol.write(0, &vec![7u8; 3 * 4096], false).await.unwrap();
    vol.write(MIB, &vec![9u8; 4096], false).await.unwrap();
    vol.close().await.unwrap();
    let st = status(&catalog, &cfg(Some(MIB << 10))).await.unwrap();
    assert_eq!(st.used, 4 * 4096);
    assert_eq!(st.volumes[0].updated_ms, None);
}
