//! The real `shale nbd serve` binary: serving RAM and scratch-volume
//! exports on a unix socket, clients against it, SIGTERM → exit 0, and
//! clear errors for bad arguments.

mod nbd_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nbd_support::*;

const SHALE: &str = env!("CARGO_BIN_EXE_shale");

/// Start the server; wait for its "listening on" lines.
fn start(dir: &Path, extra: &[&str]) -> (Child, Vec<String>) {
    let cfg = dir.join("shale.yaml");
    std::fs::write(&cfg, format!("data_dir: {}\n", dir.join("data").display())).unwrap();
    let mut child = Command::new(SHALE)
        .arg("--config")
        .arg(&cfg)
        .args(["nbd", "serve"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let expected = extra
        .iter()
        .filter(|a| **a == "--socket" || **a == "--listen")
        .count()
        .max(1);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut listening = Vec::new();
    while listening.len() < expected {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        listening.push(line);
    }
    (child, listening)
}

fn sigterm(child: &Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on a child we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
}

#[test]
fn serve_memory_and_scratch_exports_then_sigterm_exits_zero() {
    if !have_tool("qemu-io", &["--version"]) || !have_tool("nbdinfo", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let sock_s = sock.to_str().unwrap();
    let (mut child, listening) = start(
        dir.path(),
        &[
            "--socket",
            sock_s,
            "--memory",
            "ram:16M",
            "--scratch",
            "vol:64M",
        ],
    );
    assert_eq!(listening, [format!("listening on unix:{sock_s}")]);
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={sock_s}");
    for (name, size) in [("ram", 16u64 << 20), ("vol", 64 << 20)] {
        let out = run_ok(Command::new("nbdinfo").arg("--size").arg(uri(name)));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            size.to_string()
        );
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "raw", &uri(name)])
                .args(["-c", "write -P 0x42 0 2M", "-c", "flush"]),
        );
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "raw", &uri(name)])
                .args(["-c", "read -P 0x42 0 2M", "-c", "read -P 0 2M 1M"]),
        );
    }
    assert!(
        dir.path().join("data/volumes").read_dir().unwrap().count() == 1,
        "the scratch volume has a local directory while served"
    );
    if cfg!(target_env = "gnu") {
        let tasks = std::path::PathBuf::from(format!("/proc/{}/task", child.id()));
        let names: Vec<String> = tasks
            .read_dir()
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect();
        assert!(
            names.iter().any(|n| n == "shale-trim"),
            "a server gives freed memory back to the kernel: {names:?}"
        );
    }
    sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(!sock.exists(), "socket file removed on exit");
    assert_eq!(
        dir.path().join("data/volumes").read_dir().unwrap().count(),
        0,
        "scratch volume deleted after a clean shutdown"
    );
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let not_socket = dir.path().join("file");
    std::fs::write(&not_socket, b"keep me").unwrap();
    let cfg = dir.path().join("shale.yaml");
    std::fs::write(&cfg, format!("data_dir: {}\n", dir.path().display())).unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--listen", "127.0.0.1:0"], "no volumes to serve"),
        // The first scratch volume is opened, then the second spec fails:
        // the first must be closed and deleted on the way out.
        (
            &["--scratch", "a:1M", "--scratch", "b:100"],
            "multiple of 512",
        ),
        (&["--memory", "a:100"], "multiple of 512"),
        (&["--memory", "nocolon"], "NAME:SIZE"),
        (
            &[
                "--memory",
                "a:1M",
                "--memory",
                "a:1M",
                "--listen",
                "127.0.0.1:0",
            ],
            "given twice",
        ),
        (
            &["--memory", "a:1M", "--socket", not_socket.to_str().unwrap()],
            "not a socket",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(SHALE)
            .arg("--config")
            .arg(&cfg)
            .args(["nbd", "serve"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read(&not_socket).unwrap(), b"keep me");
    let leftovers = match std::fs::read_dir(dir.path().join("volumes")) {
        Ok(d) => d.count(),
        Err(_) => 0,
    };
    assert_eq!(leftovers, 0, "no scratch volume left behind");
}

#[test]
fn serve_catalog_volumes_and_data_persists_across_restarts() {
    if !have_tool("qemu-io", &["--version"]) || !have_tool("nbdinfo", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("shale.yaml");
    std::fs::write(
        &cfg,
        format!("data_dir: {}\n", dir.path().join("data").display()),
    )
    .unwrap();
    for (name, size) in [("v1", "64M"), ("v2", "32M")] {
        run_ok(
            Command::new(SHALE)
                .arg("--config")
                .arg(&cfg)
                .args(["volume", "create", name, "--size", size]),
        );
    }
    let sock = dir.path().join("nbd.sock");
    let sock_s = sock.to_str().unwrap();
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={sock_s}");

    // No names: every catalog volume is exported.
    let (child, _) = start(dir.path(), &["--socket", sock_s]);
    for (name, size) in [("v1", 64u64 << 20), ("v2", 32 << 20)] {
        let out = run_ok(Command::new("nbdinfo").arg("--size").arg(uri(name)));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            size.to_string()
        );
    }
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", &uri("v1")])
            .args([
                "-c",
                "write -P 0x61 0 4M",
                "-c",
                "write -P 0x62 60M 4M",
                "-c",
                "flush",
            ]),
    );
    sigterm(&child);
    let mut child = child;
    assert!(child.wait().unwrap().success());

    // Named: only that volume; the data is back after the restart.
    let (mut child, _) = start(dir.path(), &["--socket", sock_s, "v1"]);
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", &uri("v1")])
            .args([
                "-c",
                "read -P 0x61 0 4M",
                "-c",
                "read -P 0 4M 56M",
                "-c",
                "read -P 0x62 60M 4M",
            ]),
    );
    let v2 = Command::new("nbdinfo")
        .arg("--size")
        .arg(uri("v2"))
        .output()
        .unwrap();
    assert!(
        !v2.status.success(),
        "v2 is not exported when only v1 is named"
    );
    sigterm(&child);
    assert!(child.wait().unwrap().success());

    // An unknown name fails with a clear message and exit 1.
    let out = Command::new(SHALE)
        .arg("--config")
        .arg(&cfg)
        .args(["nbd", "serve", "--socket", sock_s, "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}
