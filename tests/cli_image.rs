//! The real `shale` binary moving data through the engine: import a raw
//! image into a volume, export it back, and the lease rules around that.

#[path = "support/cli.rs"]
mod cli_support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cli_support::CliEnv as Env;

impl Env {
    fn new() -> Env {
        Env::with_config("data_dir: data\nengine:\n  chunk_size: 1MiB\n  cache_size: 8MiB\n")
    }

    fn store(&self) -> shale::store::DynStore {
        Arc::new(shale::store::fs::FsStore::new(self.path("data/store")))
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Deterministic, non-repeating bytes with an all-zero MiB in the middle.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    v[1 << 20..2 << 20].fill(0);
    v
}

#[test]
fn import_then_export_round_trips_and_releases_the_lease() {
    let env = Env::new();
    env.ok(&["volume", "create", "img", "--size", "16MiB"]);
    // Not a multiple of 512: the tail of the last sector must read as zeros.
    let data = pattern((3 << 20) + 100);
    let input = env.path("in.raw");
    std::fs::write(&input, &data).unwrap();
    let out = env.ok(&["volume", "import", "img", s(&input)]);
    assert!(out.contains("imported"), "{out}");

    // The close destaged the data into the store.
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["volume", "info", "img", "--json"])).unwrap();
    assert!(info["stored_bytes"].as_u64().unwrap() >= 2 << 20, "{info}");

    // Export twice: the second open works only if the first released the lease.
    for round in 0..2 {
        let output = env.path(&format!("out{round}.raw"));
        env.ok(&["volume", "export", "img", s(&output)]);
        let back = std::fs::read(&output).unwrap();
        assert_eq!(back.len(), 16 << 20);
        assert!(
            back[..data.len()] == data[..],
            "round {round}: data differs"
        );
        assert!(back[data.len()..].iter().all(|&b| b == 0), "round {round}");
    }

    // With the local WAL and cache gone, the store alone has everything.
    std::fs::remove_dir_all(env.path("data/volumes")).unwrap();
    let output = env.path("from-store.raw");
    env.ok(&["volume", "export", "img", s(&output)]);
    let back = std::fs::read(&output).unwrap();
    assert!(back[..data.len()] == data[..], "store copy differs");
}

#[test]
fn import_of_a_file_larger_than_the_volume_is_refused() {
    let env = Env::new();
    env.ok(&["volume", "create", "small", "--size", "1MiB"]);
    let input = env.path("big.raw");
    std::fs::write(&input, vec![1u8; (1 << 20) + 512]).unwrap();
    let out = env.run(&["volume", "import", "small", s(&input)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("larger than volume"), "{err}");
    // Nothing was written: the volume still reads as zeros.
    let output = env.path("out.raw");
    env.ok(&["volume", "export", "small", s(&output)]);
    assert!(std::fs::read(&output).unwrap().iter().all(|&b| b == 0));

    let out = env.run(&["volume", "import", "small", s(&env.path("absent.raw"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.raw"));
}

#[test]
fn a_volume_in_use_is_neither_opened_nor_deleted() {
    let env = Env::new();
    env.ok(&["volume", "create", "busy", "--size", "4MiB"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lease = rt.block_on(async {
        shale::catalog::lease::Lease::acquire(
            env.store(),
            1,
            "other-host:7",
            Duration::from_secs(600),
            Arc::new(shale::clock::SystemClock),
        )
        .await
        .unwrap()
    });

    let output = env.path("out.raw");
    let out = env.run(&["volume", "export", "busy", s(&output)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") && err.contains("other-host:7"),
        "{err}"
    );

    let out = env.run(&["volume", "delete", "busy", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") && err.contains("other-host:7"),
        "{err}"
    );
    let list = env.ok(&["volume", "list"]);
    assert!(list.contains("busy") && list.contains("ready"), "{list}");

    rt.block_on(lease.release()).unwrap();
    env.ok(&["volume", "export", "busy", s(&output)]);
    env.ok(&["volume", "delete", "busy", "--yes"]);
    assert!(!env.ok(&["volume", "list"]).contains("busy"));
}
