//! Running the real `shale` binary from integration tests.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `shale [--config CONFIG] ARGS`, isolated from the caller's `SHALE_CONFIG`
/// and `RUST_LOG`, with no standard input.
pub fn run_shale(config: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shale"));
    cmd.env_remove("SHALE_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args).output().expect("run shale")
}

/// Require that `shale ARGS` succeeded; returns its standard output.
pub fn expect_success(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "shale {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// A temporary directory with a config file in it, and the binary run
/// against that config. Test files add their own helpers in `impl` blocks.
pub struct CliEnv {
    pub dir: tempfile::TempDir,
    pub config: std::path::PathBuf,
}

#[allow(dead_code)] // each test binary uses its own subset
impl CliEnv {
    /// A fresh directory holding `shale.yaml` with `config_text`.
    pub fn with_config(config_text: &str) -> CliEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("shale.yaml");
        std::fs::write(&config, config_text).expect("write config");
        CliEnv { dir, config }
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// `shale --config <config> ARGS`.
    pub fn run(&self, args: &[&str]) -> Output {
        run_shale(Some(&self.config), args)
    }

    /// `shale ARGS`, which must succeed; its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        expect_success(args, self.run(args))
    }

    /// `shale ARGS`, which must fail with status 1 and say `needle`.
    pub fn fails(&self, args: &[&str], needle: &str) {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "shale {args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{stderr:?} should contain {needle:?}"
        );
    }

    /// The config as the library loads it.
    pub fn cfg(&self) -> shale::config::Config {
        shale::config::Config::load(Some(&self.config)).expect("load config")
    }
}

/// A `shale nbd serve` child process. Dropping it kills the server (so a
/// failed test leaves no process behind); [`NbdServer::stop`] is the orderly
/// SIGTERM shutdown, which must exit 0.
pub struct NbdServer {
    child: Option<std::process::Child>,
}

#[allow(dead_code)] // each test binary uses its own subset
impl NbdServer {
    /// SIGTERM, then wait: the server must flush and exit with status 0.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running server");
        // SAFETY: kill(2) on a child we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let status = child.wait().expect("wait for shale nbd serve");
        assert!(status.success(), "shale nbd serve exited with {status}");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[allow(dead_code)] // each test binary uses its own subset
impl CliEnv {
    /// `shale nbd serve VOLUME --socket SOCK` with `RUST_LOG=log`, returned
    /// once it prints that it listens.
    pub fn serve_nbd(&self, volume: &str, sock: &Path, log: &str) -> NbdServer {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_shale"))
            .env_remove("SHALE_CONFIG")
            .env("RUST_LOG", log)
            .arg("--config")
            .arg(&self.config)
            .args(["nbd", "serve", volume, "--socket"])
            .arg(sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn shale nbd serve");
        let stdout = child.stdout.take().expect("stdout");
        let server = NbdServer { child: Some(child) };
        let line = std::io::BufReader::new(stdout)
            .lines()
            .next()
            .expect("server exited before listening")
            .expect("read server output");
        assert!(line.starts_with("listening on"), "{line}");
        server
    }
}
