//! A volume's local directory belongs to one volume of one store, and one
//! process at a time (issue 10, item 8).
//!
//! Two configurations share a data_dir but point at different stores, each
//! holding a volume with the same id: on main, opening store B's volume
//! replayed store A's WAL into it.

use std::path::Path;
use std::sync::Arc;

use shale::catalog::snapshot::Snapshots;
use shale::catalog::Catalog;
use shale::clock::SystemClock;
use shale::config::{Config, Origin};
use shale::daemon::{attach, open_store};
use shale::engine::BlockDevice;

const SIZE: u64 = 1 << 20;

/// A config with the shared `data_dir` and its own fs store; destage is
/// slow, so acknowledged writes stay in the WAL.
fn config(root: &Path, store: &str) -> Config {
    let text = format!(
        "data_dir: {}\nstore: {{type: fs, path: {}}}\nengine:\n  destage_interval_ms: 3600000\n  \
         chunk_size: 16MiB\n  max_unstored_bytes: 64MiB\n  cache_size: 0\n",
        root.join("data").display(),
        root.join(store).display()
    );
    Config::parse(&text, Origin::Defaults, None).expect("config")
}

/// The store's identity as stored (`catalog/store-id`).
async fn stored_identity(cfg: &Config) -> String {
    let store = open_store(cfg).await.expect("store");
    let obj = store.get("catalog/store-id").await.expect("store identity");
    let v: serde_json::Value = serde_json::from_slice(&obj.data).expect("json");
    v["store_id"].as_str().expect("store_id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_sharing_a_data_dir_never_mix_their_wal() {
    let root = tempfile::tempdir().expect("tempdir");
    let cfg_a = config(root.path(), "store-a");
    let cfg_b = config(root.path(), "store-b");
    let mut ids = Vec::new();
    for cfg in [&cfg_a, &cfg_b] {
        let catalog = Catalog::new(open_store(cfg).await.expect("store"));
        ids.push(
            catalog
                .create("v", SIZE, false, 0)
                .await
                .expect("create")
                .id,
        );
    }
    assert_eq!(ids[0], ids[1], "both stores gave their volume the same id");

    // Store A's server writes, flushes and crashes: its data is in the WAL.
    let a = attach(&cfg_a, "v").await.expect("attach A");
    a.volume
        .write(0, &[0xAA; 65536], false)
        .await
        .expect("write");
    a.volume.flush().await.expect("flush");
    a.volume.crash().await;
    a.lease().release().await.expect("release A's lease");
    drop(a);

    match attach(&cfg_b, "v").await {
        Ok(b) => {
            let mut buf = vec![0u8; 65536];
            b.volume.read(0, &mut buf).await.expect("read");
            let foreign = buf.iter().filter(|&&x| x == 0xAA).count();
            panic!(
                "store B's volume opened over store A's local directory; \
                 {foreign} of its first 65536 bytes are store A's data"
            );
        }
        Err(e) => {
            let msg = e.to_string();
            let dir = cfg_a.volume_dir(ids[0]);
            let id_a = stored_identity(&cfg_a).await;
            let id_b = stored_identity(&cfg_b).await;
            assert_ne!(id_a, id_b, "each store has its own identity");
            for needle in [&id_a, &id_b, &dir.display().to_string()] {
                assert!(msg.contains(needle.as_str()), "{msg} should name {needle}");
            }
        }
    }

    // Maintenance commands of store B are refused the same way.
    let snaps = Snapshots::new(
        open_store(&cfg_b).await.expect("store"),
        cfg_b.engine.clone(),
        cfg_b.data_dir.clone(),
        Arc::new(SystemClock),
        "snapshot-test",
    );
    let err = snaps.create("v@s", 0).await.expect_err("snapshot of B");
    assert!(err.to_string().contains("belongs to"), "{err}");

    // Store A's volume still has everything it acknowledged.
    let a = attach(&cfg_a, "v").await.expect("reattach A");
    let mut buf = vec![0u8; 65536];
    a.volume.read(0, &mut buf).await.expect("read");
    assert!(buf.iter().all(|&x| x == 0xAA));
    a.close().await.expect("close A");

    // Store B's volume is untouched, and opens from its own data_dir.
    let own = tempfile::tempdir().expect("tempdir");
    let mut cfg_b2 = cfg_b.clone();
    cfg_b2.data_dir = own.path().to_path_buf();
    let b = attach(&cfg_b2, "v").await.expect("B with its own data_dir");
    b.volume.read(0, &mut buf).await.expect("read");
    assert!(buf.iter().all(|&x| x == 0), "B never saw A's data");
    b.close().await.expect("close B");
}

/// Opening a volume twice on one host: the second opener is told the
/// local directory is in use (the lock is held while the volume is open)
/// and which process holds it; after a close, it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_opener_of_a_local_dir_is_refused_clearly() {
    let root = tempfile::tempdir().expect("tempdir");
    let cfg = config(root.path(), "store");
    let catalog = Catalog::new(open_store(&cfg).await.expect("store"));
    let rec = catalog.create("v", SIZE, false, 0).await.expect("create");
    let first = attach(&cfg, "v").await.expect("first");
    let err = attach(&cfg, "v").await.expect_err("second opener");
    let msg = err.to_string();
    assert!(msg.contains("in use by another process"), "{msg}");
    assert!(
        msg.contains(&cfg.volume_dir(rec.id).display().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    first.close().await.expect("close");
    attach(&cfg, "v")
        .await
        .expect("after close")
        .close()
        .await
        .expect("close");
}
