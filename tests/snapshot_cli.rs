//! The real `shale` binary: snapshot create/list/delete/rollback and clone
//! against a local-directory store, with data written and checked through
//! the library on the same store and data directory.

#[path = "support/cli.rs"]
mod cli_support;

use std::sync::Arc;
use std::time::Duration;

use shale::catalog::lease::Lease;
use shale::catalog::Catalog;
use shale::clock::{DynClock, SystemClock};
use shale::engine::{BlockDevice, Volume, VolumeParams};

const SIZE: usize = 1 << 20;

use cli_support::CliEnv as Env;

impl Env {
    fn new() -> Env {
        Env::with_config("data_dir: data\nengine:\n  cache_size: 0\n")
    }

    /// Attach `name` through the library, apply `f`, close.
    async fn with_volume<T>(&self, name: &str, f: impl AsyncFnOnce(&Volume) -> T) -> T {
        let cfg = self.cfg();
        let store = shale::store::open(&cfg.store).await.expect("store");
        let rec = Catalog::new(store.clone()).get(name).await.expect("record");
        let clock: DynClock = Arc::new(SystemClock);
        let lease = Lease::acquire(
            store.clone(),
            rec.id,
            "cli-test",
            Duration::from_secs(60),
            clock.clone(),
        )
        .await
        .expect("lease");
        let params = VolumeParams {
            id: rec.id,
            size: rec.size,
            epoch: lease.epoch(),
            local_dir: cfg.volume_dir(rec.id),
        };
        let vol = Volume::open(store, params, cfg.engine.clone(), clock)
            .await
            .expect("open");
        let out = f(&vol).await;
        vol.close().await.expect("close");
        lease.release().await.expect("release");
        out
    }

    async fn write(&self, name: &str, byte: u8) {
        self.with_volume(name, async |v: &Volume| {
            v.write(0, &vec![byte; SIZE / 2], false)
                .await
                .expect("write")
        })
        .await
    }

    async fn read(&self, name: &str) -> Vec<u8> {
        self.with_volume(name, async |v: &Volume| {
            let mut buf = vec![0u8; SIZE];
            v.read(0, &mut buf).await.expect("read");
            buf
        })
        .await
    }
}

fn image(byte: u8) -> Vec<u8> {
    let mut v = vec![byte; SIZE / 2];
    v.resize(SIZE, 0);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_clone_rollback_delete() {
    let env = Env::new();
    env.ok(&["volume", "create", "vol", "--size", "1M"]);
    env.write("vol", 1).await;
    let out = env.ok(&["snapshot", "create", "vol@one"]);
    assert!(out.contains("created snapshot vol@one"), "{out}");
    env.fails(
        &["snapshot", "create", "vol@one"],
        "snapshot vol@one already exists",
    );
    env.fails(&["snapshot", "create", "vol"], "expected VOLUME@SNAPSHOT");
    env.fails(&["snapshot", "create", "nope@one"], "not found");
    env.write("vol", 2).await;
    env.ok(&["snapshot", "create", "vol@two"]);

    let out = env.ok(&["clone", "vol@one", "child"]);
    assert!(out.contains("clone of vol@one"), "{out}");
    assert_eq!(env.read("child").await, image(1));
    // Clone writes never reach the parent or its snapshot.
    env.write("child", 9).await;
    assert_eq!(env.read("child").await, image(9));
    assert_eq!(env.read("vol").await, image(2));

    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["snapshot", "list", "vol", "--json"])).expect("json");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["name"], "one");
    assert_eq!(listed[0]["clones"], serde_json::json!(["child"]));
    let table = env.ok(&["snapshot", "list"]);
    assert!(
        table.contains("vol@one") && table.contains("vol@two"),
        "{table}"
    );

    env.fails(&["snapshot", "delete", "vol@one"], "has clones (child)");
    env.ok(&["snapshot", "rollback", "vol@one"]);
    assert_eq!(env.read("vol").await, image(1));
    env.ok(&["snapshot", "rollback", "vol@two"]);
    assert_eq!(env.read("vol").await, image(2));

    env.ok(&["snapshot", "delete", "vol@two"]);
    env.fails(&["snapshot", "rollback", "vol@two"], "there is no snapshot");
    env.ok(&["volume", "delete", "child", "--yes"]);
    env.ok(&["snapshot", "delete", "vol@one"]);
    assert_eq!(env.read("vol").await, image(2));
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["snapshot", "list", "--json"])).expect("json");
    assert!(listed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_from_flatten_and_guarded_volume_delete() {
    let env = Env::new();
    env.ok(&["volume", "create", "base", "--size", "1M"]);
    env.write("base", 3).await;
    env.ok(&["snapshot", "create", "base@gold"]);

    let out = env.ok(&["volume", "create", "vm1", "--from", "base@gold"]);
    assert!(out.contains("clone of base@gold"), "{out}");
    env.ok(&[
        "volume",
        "create",
        "vm2",
        "--size",
        "1M",
        "--from",
        "base@gold",
    ]);
    env.fails(
        &[
            "volume",
            "create",
            "vm3",
            "--size",
            "2M",
            "--from",
            "base@gold",
        ],
        "must have the parent's size",
    );
    env.fails(
        &["volume", "create", "vm3", "--from", "base@nope"],
        "there is no snapshot",
    );
    env.fails(
        &["volume", "create", "vm3", "--from", "base"],
        "VOLUME@SNAPSHOT",
    );
    let usage = env.run(&["volume", "create", "vm3"]);
    assert_eq!(usage.status.code(), Some(2), "--size or --from is required");
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["volume", "list", "--json"])).expect("json");
    let vm1 = listed.iter().find(|v| v["name"] == "vm1").expect("vm1");
    assert_eq!(vm1["parent"], "base@gold");
    assert!(!listed.iter().any(|v| v["name"] == "vm3"));
    assert_eq!(env.read("vm1").await, image(3));

    // The parent volume cannot go while clones read through its snapshot.
    env.fails(
        &["volume", "delete", "base", "--yes"],
        "has snapshots with clones (vm1, vm2)",
    );
    assert_eq!(env.read("base").await, image(3));

    env.write("vm1", 7).await;
    env.fails(&["flatten", "base"], "is not a clone");
    env.ok(&["snapshot", "create", "vm1@mine"]);
    env.fails(&["flatten", "vm1"], "read through its parent (vm1@mine)");
    env.ok(&["snapshot", "delete", "vm1@mine"]);
    let out = env.ok(&["flatten", "vm1"]);
    assert!(
        out.contains("flattened volume vm1") && out.contains("base@gold"),
        "{out}"
    );
    env.fails(&["flatten", "vm1"], "is not a clone");
    env.ok(&["volume", "delete", "vm2", "--yes"]);
    env.ok(&["snapshot", "delete", "base@gold"]);
    env.ok(&["volume", "delete", "base", "--yes"]);
    assert_eq!(env.read("vm1").await, image(7));
}

/// On a terminal, flatten draws a progress line on stderr; without one,
/// stderr stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flatten_progress_only_on_a_terminal() {
    let env = Env::new();
    env.ok(&["volume", "create", "base", "--size", "1M"]);
    env.write("base", 5).await;
    env.ok(&["snapshot", "create", "base@s"]);
    env.ok(&["clone", "base@s", "plain"]);
    env.ok(&["clone", "base@s", "tty"]);
    let out = env.run(&["flatten", "plain"]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `script` runs the command on a pseudo-terminal.
    let cmd = format!(
        "{} --config {} flatten tty",
        env!("CARGO_BIN_EXE_shale"),
        env.config.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("SHALE_CONFIG")
        .stdin(std::process::Stdio::null())
        .output();
    let Ok(out) = out else {
        panic!("`script` (util-linux) is needed to run a command on a terminal");
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("flatten: 512.00 KiB / 512.00 KiB (100%)"),
        "no progress line in {text:?}"
    );
    assert!(text.contains("flattened volume tty"), "{text}");
    assert_eq!(env.read("tty").await, image(5));
    assert_eq!(env.read("plain").await, image(5));
}
