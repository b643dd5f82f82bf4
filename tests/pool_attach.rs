//! Pool capacity across volumes attached through the daemon's `attach`
//! (lease, engine, pool task) on a local-directory store: one volume's
//! published usage limits another; a thick volume's reservation is kept
//! from thin volumes and always admits its own writes.

use shale::catalog::Catalog;
use shale::config::{Config, Origin};
use shale::daemon::{attach, open_store};
use shale::engine::BlockDevice;
use shale::error::BlockError;

const KIB: u64 = 1024;

fn config(dir: &std::path::Path) -> Config {
    let text = format!(
        "data_dir: {}\nengine:\n  cache_size: 0\n  chunk_size: 64KiB\n  max_unstored_bytes: 128KiB\npool:\n  capacity: 1MiB\n",
        dir.display()
    );
    Config::parse(&text, Origin::Defaults, None).expect("config")
}

fn data(len: u64, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 253) as u8 ^ seed | 1).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_volumes_share_the_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let catalog = Catalog::new(open_store(&cfg).await.unwrap());
    catalog.create("thick", 256 * KIB, true, 0).await.unwrap();
    catalog.create("a", 4 << 20, false, 0).await.unwrap();
    catalog.create("b", 4 << 20, false, 0).await.unwrap();

    // a may use capacity − thick's reservation = 768 KiB.
    let a = attach(&cfg, "a").await.unwrap();
    a.volume.write(0, &data(512 * KIB, 1), false).await.unwrap();
    assert_eq!(
        a.volume
            .write(1 << 20, &data(512 * KIB, 2), false)
            .await
            .unwrap_err(),
        BlockError::NoSpace
    );
    a.close().await.unwrap();

    // b sees a's 512 KiB (published at close): 256 KiB left for it.
    let b = attach(&cfg, "b").await.unwrap();
    assert_eq!(
        b.volume
            .write(0, &data(260 * KIB, 3), false)
            .await
            .unwrap_err(),
        BlockError::NoSpace
    );
    b.volume.write(0, &data(256 * KIB, 3), false).await.unwrap();
    let mut back = vec![0u8; 256 * KIB as usize];
    b.volume.read(0, &mut back).await.unwrap();
    assert_eq!(back, data(256 * KIB, 3));

    // The pool is now full, yet the thick volume writes its whole size.
    let thick = attach(&cfg, "thick").await.unwrap();
    thick
        .volume
        .write(0, &data(256 * KIB, 4), false)
        .await
        .unwrap();
    thick.close().await.unwrap();
    b.close().await.unwrap();

    let st = shale::pool::status(&catalog, &cfg.pool).await.unwrap();
    assert_eq!(st.used, 1 << 20);
    assert_eq!(st.allocated, 1 << 20);
    assert_eq!(st.available(), Some(0));
    assert!(st.warning());
}
