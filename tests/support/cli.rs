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
