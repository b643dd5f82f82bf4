//! The real binaries: `shale snapshot create` on a volume that
//! `shale nbd serve` holds, through the server's control socket, with data
//! written by a real NBD client (qemu-io). The snapshot holds exactly what
//! was written before it, whatever comes after.

#[path = "support/cli.rs"]
mod cli_support;
mod nbd_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nbd_support::{have_tool, run_ok};

const MIB: usize = 1 << 20;

use cli_support::CliEnv as Env;

impl Env {
    fn new() -> Env {
        // A long destage timer: at snapshot time the writes are only in
        // the server's WAL, so the snapshot has to flush and destage them.
        Env::with_config("data_dir: data\nengine:\n  destage_interval_ms: 600000\n  max_unstored_seconds: 3600\n")
    }

    /// Export `volume` through the engine into a file and read it.
    fn export(&self, volume: &str) -> Vec<u8> {
        let file = self.dir.path().join(format!("{volume}.img"));
        self.ok(&["volume", "export", volume, file.to_str().unwrap()]);
        std::fs::read(&file).expect("read export")
    }

    fn local_dir(&self, volume: &str) -> PathBuf {
        let info: serde_json::Value =
            serde_json::from_str(&self.ok(&["volume", "info", volume, "--json"])).expect("json");
        let dir = info["local_dir"].as_str().expect("local_dir");
        let dir = Path::new(dir);
        if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            self.dir.path().join(dir)
        }
    }
}

fn qemu_io(sock: &Path, volume: &str, cmds: &[&str]) {
    let uri = format!("nbd+unix:///{volume}?socket={}", sock.display());
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run_ok(&mut cmd);
}

fn expect_bytes(image: &[u8], runs: &[(usize, usize, u8)], what: &str) {
    let mut want = vec![0u8; image.len()];
    for &(off, len, byte) in runs {
        want[off..off + len].fill(byte);
    }
    if let Some(i) = (0..image.len()).find(|&i| image[i] != want[i]) {
        panic!(
            "{what}: byte {i} is {:#x}, expected {:#x}",
            image[i], want[i]
        );
    }
}

#[test]
fn snapshot_of_a_volume_served_over_nbd() {
    if !have_tool("qemu-io", &["--version"]) {
        return;
    }
    let env = Env::new();
    env.ok(&["volume", "create", "vol", "--size", "16M"]);
    let local = env.local_dir("vol");
    let control = local.join("control.sock");
    // A stale control socket, as a crashed server leaves it.
    std::fs::create_dir_all(&local).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());

    let sock = env.dir.path().join("nbd.sock");
    let server = env.serve_nbd("vol", &sock, "info");
    let mode = std::fs::metadata(&control)
        .expect("control socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode");

    qemu_io(&sock, "vol", &["write -P 0x5a 0 3M", "write -P 0x33 8M 1M"]);
    let out = env.ok(&["snapshot", "create", "vol@live"]);
    assert!(out.contains("created snapshot vol@live"), "{out}");
    // Written after the snapshot: in the volume, never in the snapshot.
    qemu_io(
        &sock,
        "vol",
        &["write -P 0x77 0 1M", "write -z 8M 512K", "flush"],
    );
    qemu_io(&sock, "vol", &["read -P 0x77 0 1M", "read -P 0x5a 1M 2M"]);

    env.fails(
        &["snapshot", "create", "vol@live"],
        "snapshot vol@live already exists",
    );
    env.fails(
        &["snapshot", "create", "vol@bad/name"],
        "invalid snapshot name",
    );
    env.fails(&["snapshot", "rollback", "vol@live"], "is attached");
    let list = env.ok(&["snapshot", "list", "vol"]);
    assert!(list.contains("vol@live"), "{list}");

    // The snapshot's content, through a clone of it, while still attached.
    env.ok(&["clone", "vol@live", "copy"]);
    let snapshot_runs = [(0, 3 * MIB, 0x5a), (8 * MIB, MIB, 0x33)];
    expect_bytes(&env.export("copy"), &snapshot_runs, "clone of vol@live");
    let image = env.dir.path().join("live.img");
    env.ok(&["export", "vol@live", image.to_str().unwrap()]);
    let exported = std::fs::read(&image).expect("read the export");
    expect_bytes(&exported, &snapshot_runs, "shale export vol@live");

    // A second snapshot while attached sees the later writes.
    env.ok(&["snapshot", "create", "vol@later"]);
    // Deletes while attached: refused while a clone depends on it, else
    // done by the server.
    env.fails(&["snapshot", "delete", "vol@live"], "has clones (copy)");
    env.ok(&["snapshot", "create", "vol@tmp"]);
    let out = env.ok(&["snapshot", "delete", "vol@tmp"]);
    assert!(out.contains("deleted snapshot vol@tmp"), "{out}");
    env.fails(&["snapshot", "delete", "vol@tmp"], "there is no snapshot");
    server.stop();
    assert!(!control.exists(), "control socket removed on exit");

    let now_runs = [
        (0, MIB, 0x77),
        (MIB, 2 * MIB, 0x5a),
        (8 * MIB + MIB / 2, MIB / 2, 0x33),
    ];
    expect_bytes(&env.export("vol"), &now_runs, "the volume");
    env.ok(&["clone", "vol@later", "copy2"]);
    expect_bytes(&env.export("copy2"), &now_runs, "clone of vol@later");
    env.ok(&["clone", "vol@live", "copy3"]);
    expect_bytes(
        &env.export("copy3"),
        &snapshot_runs,
        "vol@live after the server stopped",
    );
}
