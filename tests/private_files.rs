//! Everything shale creates locally is private: directories 0700, files
//! and control sockets 0600, even when started with umask 000. Checked on
//! the real binary (create, import, serve with the control socket live)
//! and on the library opened in-process with umask 000.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SHALE: &str = env!("CARGO_BIN_EXE_shale");

fn shale_umask0(config: &Path) -> Command {
    let mut cmd = Command::new(SHALE);
    cmd.env_remove("SHALE_CONFIG")
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(config);
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    cmd
}

fn ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every path under `root` with a mode other than the private one for its
/// type (directories 0700, files and sockets 0600).
fn not_private(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut bad = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.mode() & 0o7777;
        let ft = meta.file_type();
        let want = if ft.is_dir() { 0o700 } else { 0o600 };
        if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        if (ft.is_dir() || ft.is_file() || ft.is_socket()) && mode != want {
            bad.push((p, mode));
        }
    }
    bad
}

#[test]
fn the_binary_creates_only_private_files_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("shale.yaml");
    std::fs::write(&config, format!("data_dir: {}\n", data.display())).unwrap();
    let image = dir.path().join("image.raw");
    std::fs::write(&image, vec![0x5au8; 1 << 20]).unwrap();

    ok(shale_umask0(&config).args(["volume", "create", "v", "--size", "8M"]));
    ok(shale_umask0(&config)
        .args(["volume", "import", "v"])
        .arg(&image));
    // Serving: WAL, cache and the control socket exist while it runs.
    let sock = dir.path().join("nbd.sock");
    let mut server = shale_umask0(&config)
        .args(["nbd", "serve", "v", "--socket"])
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("listening on"), "{line:?}");
    let sockets: Vec<_> = walk_sockets(&data);
    assert!(
        sockets.iter().any(|p| p.ends_with("control.sock")),
        "the control socket is live: {sockets:?}"
    );
    let bad = not_private(&data);
    // SAFETY: kill(2) on a child we spawned and have not reaped yet.
    unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGTERM) };
    let status = server.wait().unwrap();
    assert!(status.success(), "shale nbd serve exited with {status}");
    assert!(bad.is_empty(), "not private while serving: {bad:?}");
    let bad = not_private(&data);
    assert!(bad.is_empty(), "not private after serving: {bad:?}");
    // The WAL and the store's objects were really there to check.
    let count = count_files(&data);
    assert!(count > 5, "only {count} files under {}", data.display());
}

fn walk_sockets(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if meta.file_type().is_socket() {
            out.push(p);
        }
    }
    out
}

fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            n += 1;
        }
    }
    n
}

/// The library itself (not only the binary's umask) creates private
/// files: open a volume in-process under umask 000 and write to it.
#[test]
fn the_library_creates_private_files_under_umask_000() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("shale.yaml");
    std::fs::write(&config, format!("data_dir: {}\n", data.display())).unwrap();
    ok(shale_umask0(&config).args(["volume", "create", "v", "--size", "8M"]));
    // This test binary has only these two tests and the other one does not
    // depend on this process's umask (it runs children with their own).
    // SAFETY: umask(2) touches no memory.
    let old = unsafe { libc::umask(0) };
    let cfg = shale::config::Config::load(Some(&config)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let vol = shale::daemon::attach(&cfg, "v").await.unwrap();
        use shale::engine::BlockDevice;
        vol.volume.write(0, &[1u8; 4096], true).await.unwrap();
        vol.volume.flush().await.unwrap();
        let bad = not_private(&data);
        vol.close().await.unwrap();
        assert!(bad.is_empty(), "not private: {bad:?}");
    });
    // SAFETY: as above.
    unsafe { libc::umask(old) };
}
