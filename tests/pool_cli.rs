//! The real `shale` binary and the pool: `pool status` numbers, thick
//! volumes refused when the pool cannot reserve them, per-snapshot unique
//! space in `volume info`, and ENOSPC seen by a real NBD client (qemu-io
//! over `shale nbd serve`) with every earlier byte still readable.

#[path = "support/cli.rs"]
mod cli_support;
mod nbd_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nbd_support::{have_tool, run_ok};
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

use cli_support::CliEnv as Env;

impl Env {
    /// A local store whose pool holds 1 MiB and warns at 50%.
    fn new() -> Env {
        Env::with_config("data_dir: data\nengine:\n  cache_size: 0\n  chunk_size: 64KiB\n  max_unstored_bytes: 128KiB\npool:\n  capacity: 1MiB\n  warn_percent: 50\n")
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("json output")
    }

    /// A file of `len` non-zero bytes (`seed` varies the content).
    fn image(&self, name: &str, len: usize, seed: u8) -> PathBuf {
        let p = self.dir.path().join(name);
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed | 1).collect();
        std::fs::write(&p, data).expect("image");
        p
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn pool_status_numbers_and_thick_refusal() {
    let env = Env::new();
    let empty = env.json(&["pool", "status", "--json"]);
    assert_eq!(empty["capacity"], MIB);
    assert_eq!(empty["allocated"], 0);
    assert_eq!(empty["available"], MIB);

    let thin = env.run(&["volume", "create", "a", "--size", "4MiB"]);
    assert!(thin.status.success(), "{}", stderr(&thin));
    assert!(
        stderr(&thin).contains("over-provisioned"),
        "a thin volume beyond capacity is created with a warning: {}",
        stderr(&thin)
    );
    env.ok(&["volume", "create", "t", "--size", "256KiB", "--thick"]);
    // 256 KiB reserved; 768 KiB left: a 800 KiB thick volume does not fit.
    let refused = env.run(&["volume", "create", "big", "--size", "800KiB", "--thick"]);
    assert!(!refused.status.success());
    let msg = stderr(&refused);
    assert!(
        msg.contains("cannot reserve 800KiB") && msg.contains("available 768KiB"),
        "{msg}"
    );
    let list = env.json(&["volume", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "nothing created");

    // 300000 bytes of data: 586 sectors (the last one zero-padded).
    let img = env.image("img", 300_000, 3);
    env.ok(&["volume", "import", "a", img.to_str().unwrap()]);
    let used = 586 * 512;
    let st = env.run(&["pool", "status", "--json"]);
    assert!(st.status.success());
    let v: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["used"], used);
    assert_eq!(v["reserved"], 256 * KIB);
    assert_eq!(v["allocated"], used + 256 * KIB);
    assert_eq!(v["available"], MIB - used - 256 * KIB);
    assert_eq!(v["provisioned"], 4 * MIB + 256 * KIB);
    assert_eq!(v["overprovisioning_ratio"], 4.25);
    assert!(v["warning"]
        .as_str()
        .unwrap()
        .contains("warning threshold of 50%"));
    assert!(stderr(&st).contains("warning"), "{}", stderr(&st));
    let text = env.ok(&["pool", "status"]);
    assert!(text.contains("over-provisioning ratio 4.25"), "{text}");
    assert!(text.contains("WARNING"), "{text}");
}

#[test]
fn volume_info_shows_unique_space_per_snapshot() {
    let env = Env::new();
    env.ok(&["volume", "create", "v", "--size", "1MiB"]);
    let img = env.image("one", 256 * KIB as usize, 1);
    env.ok(&["volume", "import", "v", img.to_str().unwrap()]);
    env.ok(&["snapshot", "create", "v@s1"]);
    // Overwrite the first 64 KiB: the snapshot alone keeps the old 64 KiB.
    let img2 = env.image("two", 64 * KIB as usize, 2);
    env.ok(&["volume", "import", "v", img2.to_str().unwrap()]);
    env.ok(&["snapshot", "create", "v@s2"]);
    let info = env.json(&["volume", "info", "v", "--json"]);
    let space = &info["space"];
    assert_eq!(space["live"], 256 * KIB);
    assert_eq!(space["snapshot_only"], 64 * KIB);
    assert_eq!(space["used"], 320 * KIB);
    let snaps = space["snapshots"].as_array().unwrap();
    assert_eq!(snaps[0]["name"], "s1");
    assert_eq!(snaps[0]["unique"], 64 * KIB);
    assert_eq!(snaps[1]["name"], "s2");
    assert_eq!(
        snaps[1]["unique"], 0,
        "s2 shares everything with the volume"
    );
    let text = env.ok(&["volume", "info", "v"]);
    assert!(text.contains("held only by snapshots 64.0 KiB"), "{text}");
    // Deleting s1 gives its unique space back.
    env.ok(&["snapshot", "delete", "v@s1"]);
    let st = env.json(&["pool", "status", "--json"]);
    assert_eq!(st["used"], 256 * KIB);
}

fn qemu_io(sock: &Path, volume: &str, cmds: &[&str]) -> Output {
    let uri = format!("nbd+unix:///{volume}?socket={}", sock.display());
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.output().expect("run qemu-io")
}

#[test]
fn enospc_reaches_an_nbd_client_and_data_stays_readable() {
    if !have_tool("qemu-io", &["--version"]) {
        return;
    }
    let env = Env::new();
    env.ok(&["volume", "create", "n", "--size", "4MiB"]);
    let sock = env.path("nbd.sock");
    let server = env.serve_nbd("n", &sock, "warn");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &format!("nbd+unix:///n?socket={}", sock.display()),
        "-c",
        "write -P 0x11 0 768k",
    ]));
    let full = qemu_io(&sock, "n", &["write -P 0x22 1M 512k"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&full.stdout),
        String::from_utf8_lossy(&full.stderr)
    );
    assert!(out.contains("No space left on device"), "{out}");
    let reads = qemu_io(&sock, "n", &["read -P 0x11 0 768k", "read -P 0 768k 3328k"]);
    assert!(
        reads.status.success() && !String::from_utf8_lossy(&reads.stdout).contains("fail"),
        "{}",
        String::from_utf8_lossy(&reads.stdout)
    );
    // Trim gives space back; then the write fits.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &format!("nbd+unix:///n?socket={}", sock.display()),
        "-c",
        "discard 0 512k",
        "-c",
        "write -P 0x22 1M 512k",
        "-c",
        "read -P 0x22 1M 512k",
        "-c",
        "read -P 0x11 512k 256k",
    ]));
    server.stop();
    let st = env.json(&["pool", "status", "--json"]);
    assert_eq!(st["used"], 768 * KIB, "published at close");
}
