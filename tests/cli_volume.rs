//! The real `shale` binary against a temporary config with a local-directory
//! store: volume create/list/info/delete, config errors and exit codes.

#[path = "support/cli.rs"]
mod cli_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Env {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Env {
    /// A config file whose data_dir (and so the fs store) is in a temp dir.
    fn new() -> Env {
        Env::with_config("data_dir: data\nengine:\n  cache_size: 16MiB\n")
    }

    fn with_config(text: &str) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("shale.yaml");
        std::fs::write(&config, text).expect("write config");
        Env { dir, config }
    }

    fn run(&self, args: &[&str]) -> Output {
        shale(Some(&self.config), args)
    }

    /// Run and require success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        cli_support::expect_success(args, self.run(args))
    }

    fn list_json(&self) -> Vec<serde_json::Value> {
        let text = self.ok(&["volume", "list", "--json"]);
        serde_json::from_str(&text).expect("list --json is JSON")
    }
}

fn shale(config: Option<&Path>, args: &[&str]) -> Output {
    cli_support::run_shale(config, args)
}

/// Assert a failure with `code` and a single stderr line containing `needle`.
fn assert_fails(out: &Output, code: i32, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(
        stderr.contains(needle),
        "{stderr:?} should contain {needle:?}"
    );
    stderr
}

fn assert_one_line(stderr: &str) {
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
}

#[test]
fn create_list_info_delete() {
    let env = Env::new();
    assert!(env.list_json().is_empty());
    let out = env.ok(&["volume", "create", "db", "--size", "1G"]);
    assert!(
        out.contains("created volume db (id 1, size 1GiB, thin)"),
        "{out}"
    );
    env.ok(&["volume", "create", "logs", "--size", "8192", "--thick"]);

    let vols = env.list_json();
    assert_eq!(vols.len(), 2);
    assert_eq!(vols[0]["name"], "db");
    assert_eq!(vols[0]["size"], 1u64 << 30);
    assert_eq!(vols[0]["thick"], false);
    assert_eq!(vols[1]["name"], "logs");
    assert_eq!(vols[1]["id"], 2);
    assert_eq!(vols[1]["thick"], true);

    let table = env.ok(&["volume", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(
        lines[1].starts_with("db ") && lines[1].contains("1GiB"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("logs") && lines[2].contains("yes"),
        "{table}"
    );

    let info = env.ok(&["volume", "info", "db"]);
    assert!(info.contains("id:             1"), "{info}");
    assert!(info.contains("1073741824 bytes"), "{info}");
    assert!(info.contains("volumes/0000000000000001/"), "{info}");
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["volume", "info", "logs", "--json"])).unwrap();
    assert_eq!(info["record"]["id"], 2);
    assert_eq!(info["stored_bytes"], 0);

    let out = env.ok(&["volume", "delete", "db", "--yes"]);
    assert!(out.contains("deleted volume db"), "{out}");
    let vols = env.list_json();
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0]["name"], "logs");
    let out = env.run(&["volume", "info", "db"]);
    let err = assert_fails(&out, 1, "volume \"db\" not found");
    assert_one_line(&err);
}

#[test]
fn info_counts_bytes_stored_under_the_volume_prefix() {
    let env = Env::new();
    env.ok(&["volume", "create", "v", "--size", "64MiB"]);
    let store = shale::store::fs::FsStore::new(env.dir.path().join("data/store"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use shale::store::{ObjectStore, PutMode};
        for (key, len) in [
            ("volumes/0000000000000001/a", 1000usize),
            ("volumes/0000000000000001/b", 24),
            ("volumes/0000000000000002/other", 5),
        ] {
            store
                .put(key, bytes::Bytes::from(vec![7u8; len]), PutMode::Overwrite)
                .await
                .unwrap();
        }
    });
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["volume", "info", "v", "--json"])).unwrap();
    assert_eq!(info["stored_objects"], 2);
    assert_eq!(info["stored_bytes"], 1024);
    // Local state of the volume (normally its WAL and cache) goes too.
    let local = env.dir.path().join("data/volumes/0000000000000001");
    std::fs::create_dir_all(local.join("wal")).unwrap();
    std::fs::write(local.join("wal/seg"), b"x").unwrap();
    let out = env.ok(&["volume", "delete", "v", "--yes"]);
    assert!(out.contains("removed 2 objects"), "{out}");
    assert!(!local.exists());
    rt.block_on(async {
        use shale::store::ObjectStore;
        let left = store.list("volumes/").await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].key, "volumes/0000000000000002/other");
    });
}

#[test]
fn duplicate_names_are_refused() {
    let env = Env::new();
    env.ok(&["volume", "create", "a", "--size", "4MiB"]);
    let out = env.run(&["volume", "create", "a", "--size", "8MiB"]);
    let err = assert_fails(&out, 1, "volume \"a\" already exists");
    assert_one_line(&err);
    let vols = env.list_json();
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0]["size"], 4u64 << 20);
}

#[test]
fn bad_sizes_and_names_are_clear_errors_and_create_nothing() {
    let env = Env::new();
    let err = assert_fails(
        &env.run(&["volume", "create", "a", "--size", "1000"]),
        1,
        "multiple of 4096",
    );
    assert_one_line(&err);
    assert_fails(
        &env.run(&["volume", "create", "a", "--size", "0"]),
        1,
        "greater than zero",
    );
    assert_fails(
        &env.run(&["volume", "create", "a", "--size", "2PiB"]),
        1,
        "at most",
    );
    // Not a size at all: a usage error.
    assert_fails(
        &env.run(&["volume", "create", "a", "--size", "lots"]),
        2,
        "invalid size",
    );
    for name in [".x", "a b", "a@b", "-", "é"] {
        let err = assert_fails(
            &env.run(&["volume", "create", "--size", "1G", "--", name]),
            1,
            "invalid volume name",
        );
        assert!(err.contains("1 to 64 characters"), "{err}");
    }
    assert!(env.list_json().is_empty());
}

#[test]
fn delete_needs_yes_without_a_terminal() {
    let env = Env::new();
    env.ok(&["volume", "create", "keep", "--size", "1G"]);
    let err = assert_fails(&env.run(&["volume", "delete", "keep"]), 1, "--yes");
    assert_one_line(&err);
    assert_eq!(env.list_json().len(), 1);
    assert_fails(
        &env.run(&["volume", "delete", "missing", "--yes"]),
        1,
        "not found",
    );
}

#[test]
fn unknown_config_key_is_named() {
    let env = Env::with_config("data_dir: data\nengine:\n  chunk_sise: 4MiB\n");
    let err = assert_fails(&env.run(&["volume", "list"]), 1, "chunk_sise");
    assert!(err.contains("shale.yaml"), "{err}");
    let env = Env::with_config("data_dir: data\nstorage: {}\n");
    assert_fails(&env.run(&["volume", "list"]), 1, "storage");
}

#[test]
fn out_of_bounds_config_value_is_named() {
    let env = Env::with_config("data_dir: data\npool:\n  warn_percent: 0\n");
    let err = assert_fails(&env.run(&["config", "show"]), 1, "pool.warn_percent");
    assert_one_line(&err);
}

#[test]
fn missing_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.yaml");
    let err = assert_fails(
        &shale(Some(&missing), &["volume", "list"]),
        1,
        "absent.yaml",
    );
    assert!(err.contains("does not exist"), "{err}");
    assert_one_line(&err);
}

#[test]
fn shale_config_env_var_is_used() {
    let env = Env::new();
    let out = Command::new(env!("CARGO_BIN_EXE_shale"))
        .env("SHALE_CONFIG", &env.config)
        .args(["volume", "create", "viaenv", "--size", "1M"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.list_json()[0]["name"], "viaenv");
}

#[test]
fn bad_usage_exits_2() {
    let env = Env::new();
    for args in [
        &["volume", "frobnicate"][..],
        &["volume", "create", "x"],
        &["volume"],
        &["--no-such-flag"],
        &[],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn config_show_and_example() {
    let env = Env::new();
    let shown = env.ok(&["config", "show"]);
    let data = env.dir.path().join("data");
    assert!(
        shown.contains(&format!("data_dir: {}", data.display())),
        "{shown}"
    );
    assert!(shown.contains("cache_size: 16MiB"), "{shown}");
    // What `show` prints is itself a valid config with the same meaning.
    let again = Env::with_config(&shown);
    assert_eq!(again.ok(&["config", "show"]), shown);

    let example = env.ok(&["config", "example"]);
    assert!(example.contains("max_unstored_bytes"), "{example}");
    let from_example = Env::with_config(&example);
    assert!(from_example
        .ok(&["config", "show"])
        .contains("warn_percent: 80"));
}

#[test]
fn names_that_look_like_store_file_suffixes_are_distinct_volumes() {
    let env = Env::new();
    let names = ["a", "a.d", "a.o", "a.lock", "a.tmp", "A", "a_", "0.9-x"];
    for name in names {
        env.ok(&["volume", "create", name, "--size", "4KiB"]);
    }
    let vols = env.list_json();
    let mut listed: Vec<&str> = vols.iter().map(|v| v["name"].as_str().unwrap()).collect();
    let mut expected = names.to_vec();
    expected.sort();
    listed.sort();
    assert_eq!(listed, expected);
    env.ok(&["volume", "delete", "a.d", "--yes"]);
    assert_eq!(env.list_json().len(), names.len() - 1);
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["volume", "info", "a", "--json"])).unwrap();
    assert_eq!(info["record"]["name"], "a");
}
