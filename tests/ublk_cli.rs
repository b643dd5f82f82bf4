//! `shale add|del|list|recover` behaviour that needs no kernel: argument
//! and name checks, clear errors, nothing left behind. The kernel path is
//! covered by tools/vm/run.sh.

use std::path::Path;
use std::process::{Command, Output};

fn shale(run_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shale"))
        .args(args)
        .env("SHALE_RUN_DIR", run_dir)
        .env("SHALE_LINK_DIR", run_dir.join("links"))
        .env_remove("SHALE_CONFIG")
        .output()
        .expect("run shale")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn has_ublk() -> bool {
    Path::new("/dev/ublk-control").exists()
}

#[test]
fn list_with_no_devices_prints_only_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let out = shale(dir.path(), &["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("VOLUME"));
}

#[test]
fn bad_volume_names_are_refused_before_anything_happens() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["../etc", ".x", "a b"] {
        for cmd in [
            vec!["add", name, "--memory", "64M"],
            vec!["del", name],
            vec!["recover", name],
        ] {
            let out = shale(dir.path(), &cmd);
            assert_eq!(out.status.code(), Some(1), "{cmd:?}");
            assert!(
                stderr(&out).contains("invalid volume name"),
                "{cmd:?}: {}",
                stderr(&out)
            );
        }
    }
    assert!(!dir.path().join("links").exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn del_of_an_unattached_volume_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = shale(dir.path(), &["del", "nothere"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not attached"), "{}", stderr(&out));
    // del needs exactly one of VOLUME, -n, --all (usage error, exit 2).
    let out = shale(dir.path(), &["del"]);
    assert_eq!(out.status.code(), Some(2));
    let out = shale(dir.path(), &["del", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn udev_name_lookup_uses_run_records() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("vol7.json"),
        br#"{"volume":"vol7","dev_id":7,"pid":1,"queues":1,"depth":64,"backing":[]}"#,
    )
    .unwrap();
    let out = shale(dir.path(), &["list", "--udev-name", "ublkb7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "vol7\n");
    for other in ["ublkb8", "sda", "ublkbX"] {
        let out = shale(dir.path(), &["list", "--udev-name", other]);
        assert_eq!(out.status.code(), Some(1), "{other}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn bad_queue_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        ["add", "v", "--queues", "0"],
        ["add", "v", "--depth", "0"],
        ["add", "v", "--depth", "9999"],
    ] {
        let out = shale(dir.path(), &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains("must be between"), "{}", stderr(&out));
    }
}

#[test]
fn add_without_the_driver_says_how_to_get_it() {
    if has_ublk() {
        println!("SKIP: this kernel has ublk; the missing-driver message is not reachable");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["add", "v", "--memory", "64M"],
        vec!["add", "v", "--memory", "64M", "--foreground"],
        vec!["recover", "v"],
    ] {
        let out = shale(dir.path(), &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("/dev/ublk-control") && err.contains("ublk_drv"),
            "{err}"
        );
    }
    // Nothing was recorded or linked.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
