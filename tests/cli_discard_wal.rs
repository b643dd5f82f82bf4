//! A damaged WAL segment that is not the newest fails the open loudly and
//! changes nothing; `shale volume discard-wal` says what it drops, drops
//! it, and the volume opens again (issue 10, item 1).

#[path = "support/cli.rs"]
mod cli_support;

#[path = "support/engine.rs"]
mod engine_support;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cli_support::CliEnv;
use shale::catalog::lease::Lease;
use shale::catalog::Catalog;
use shale::clock::SystemClock;
use shale::engine::config::EngineConfig;
use shale::engine::{BlockDevice, EngineError, Volume, VolumeParams};
use shale::store::DynStore;

const BLOCK: usize = 4096;

fn engine_cfg() -> EngineConfig {
    engine_support::destage_on_close(4 << 20)
}

fn block(i: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|j| (i as u8).wrapping_mul(37) ^ (j as u8) | 1)
        .collect()
}

/// Every file under `dir` with its bytes.
fn snapshot_dir(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.insert(p.clone(), std::fs::read(&p).unwrap());
    }
    out
}

/// Open the volume with a fresh lease, as a server on this host would.
async fn open(store: &DynStore, id: u64, dir: &Path) -> (Lease, Result<Arc<Volume>, EngineError>) {
    let lease = Lease::acquire(
        store.clone(),
        id,
        "test",
        Duration::from_secs(30),
        Arc::new(SystemClock),
    )
    .await
    .expect("lease");
    let p = VolumeParams {
        id,
        size: 4 << 20,
        epoch: lease.epoch(),
        local_dir: dir.to_path_buf(),
    };
    let v = Volume::open(store.clone(), p, engine_cfg(), Arc::new(SystemClock)).await;
    (lease, v)
}

/// Write blocks `range` (flushed) in a new open, then crash and free the lease.
async fn write_and_crash(store: &DynStore, id: u64, dir: &Path, range: std::ops::Range<u64>) {
    let (lease, v) = open(store, id, dir).await;
    let v = v.expect("open");
    for i in range {
        v.write(i * BLOCK as u64, &block(i), false).await.unwrap();
    }
    v.flush().await.unwrap();
    v.crash().await;
    lease.release().await.unwrap();
}

#[test]
fn damaged_older_segment_fails_open_until_discard_wal() {
    // data_dir is resolved against the config file's directory.
    let env = CliEnv::with_config("data_dir: data\n");
    env.ok(&["volume", "create", "v", "--size", "4MiB"]);
    let cfg = env.cfg();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(shale::store::open(&cfg.store)).unwrap();
    let id = rt
        .block_on(Catalog::new(store.clone()).get("v"))
        .unwrap()
        .id;
    let local = cfg.volume_dir(id);
    let wal = local.join("wal");

    // Two opens, each killed: seqs 1..=8 in the first segment (kept and
    // synced by the second open's replay), 9..=16 in the newest.
    rt.block_on(write_and_crash(&store, id, &local, 0..8));
    rt.block_on(write_and_crash(&store, id, &local, 8..16));
    let mut segs: Vec<PathBuf> = snapshot_dir(&wal).into_keys().collect();
    segs.sort();
    // Two segments, then the spares of the pool (preallocated files the
    // log recycles), which hold no records.
    assert_eq!(segs.len(), 4, "{segs:?}");

    // Flip one data byte of the 5th record of the older segment.
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let rec_len = 48 + 4 + BLOCK; // header, one block CRC, data
    let fifth = 48 + 4 * rec_len; // segment header, then 4 records
    bytes[fifth + 48 + 4 + 100] ^= 0x40;
    std::fs::write(&segs[0], &bytes).unwrap();
    let before = snapshot_dir(&wal);

    // The open fails, naming the segment, the offset and what it expected.
    let (lease, res) = rt.block_on(open(&store, id, &local));
    let err = res
        .expect_err("open must fail on a damaged older segment")
        .to_string();
    rt.block_on(lease.release()).unwrap();
    for needle in [
        segs[0].display().to_string(),
        format!("offset {fifth}"),
        "expected the record after seq 4".to_string(),
        "discard-wal".to_string(),
        "--after 4".to_string(),
    ] {
        assert!(err.contains(&needle), "{err:?} should name {needle:?}");
    }
    assert_eq!(
        snapshot_dir(&wal),
        before,
        "the failed open changed the WAL"
    );
    // So does every command that opens it.
    let image = env.path("out.img");
    let image_arg = image.to_str().unwrap();
    env.fails(&["volume", "export", "v", image_arg], "discard-wal");
    assert_eq!(snapshot_dir(&wal), before);

    // Without a terminal the command needs --yes, and does nothing then.
    env.fails(
        &["volume", "discard-wal", "v", "--after", "4"],
        "without --yes",
    );
    assert_eq!(snapshot_dir(&wal), before);
    // Keeping a record that cannot be read is refused.
    env.fails(
        &["volume", "discard-wal", "v", "--after", "6", "--yes"],
        "choose --after 4 or lower",
    );
    assert_eq!(snapshot_dir(&wal), before);

    let out = env.ok(&["volume", "discard-wal", "v", "--after", "4", "--yes"]);
    assert!(
        out.contains("8 records (seq 9 to 16)") && out.contains("2 segments"),
        "{out}"
    );
    assert!(out.contains("unreadable"), "the damaged records: {out}");
    let aside: Vec<PathBuf> = std::fs::read_dir(&local)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("wal.discarded-"))
        .collect();
    assert_eq!(aside.len(), 1, "{out}");
    assert_eq!(
        snapshot_dir(&aside[0]).into_values().collect::<Vec<_>>(),
        before.values().take(2).cloned().collect::<Vec<_>>(),
        "the original segments are copied aside (not the spares)"
    );

    // Now it opens: the records up to seq 4 are there, the rest is gone.
    env.ok(&["volume", "export", "v", image_arg]);
    let img = std::fs::read(&image).unwrap();
    for i in 0..16u64 {
        let got = &img[i as usize * BLOCK..(i as usize + 1) * BLOCK];
        if i < 4 {
            assert_eq!(got, &block(i)[..], "kept block {i}");
        } else {
            assert!(got.iter().all(|&b| b == 0), "discarded block {i}");
        }
    }
    // Nothing is left to discard.
    let out = env.ok(&["volume", "discard-wal", "v", "--after", "4", "--yes"]);
    assert!(out.contains("nothing discarded"), "{out}");
}
