//! The real `shale` binary with its store on a real S3 server (moto on
//! 127.0.0.1, started by the test): the catalog and volume data in a bucket.
//! Skips with a printed reason when moto is missing; fails when CI=true.

#[path = "support/s3.rs"]
mod s3_support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn run(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shale"))
        .env_remove("SHALE_CONFIG")
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run shale")
}

fn ok(config: &Path, args: &[&str]) -> String {
    let out = run(config, args);
    assert!(
        out.status.success(),
        "shale {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn volumes_live_in_an_s3_bucket() {
    let Some(moto) = s3_support::moto() else {
        return;
    };
    let bucket = moto.unique_bucket("cli");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shale.yaml");
    std::fs::write(
        &config,
        format!(
            "data_dir: data\nstore:\n  type: s3\n  bucket: {bucket}\n  prefix: team-a/\n  endpoint: {}\n  force_path_style: true\nengine:\n  chunk_size: 1MiB\n",
            moto.endpoint
        ),
    )
    .unwrap();

    ok(&config, &["volume", "create", "s3vol", "--size", "8MiB"]);
    let err = run(&config, &["volume", "create", "s3vol", "--size", "8MiB"]);
    assert_eq!(err.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&err.stderr).contains("already exists"));

    let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
    let input = dir.path().join("in.raw");
    std::fs::write(&input, &data).unwrap();
    ok(
        &config,
        &["volume", "import", "s3vol", input.to_str().unwrap()],
    );

    // Lose the local state: the bucket alone must give the data back.
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    let output = dir.path().join("out.raw");
    ok(
        &config,
        &["volume", "export", "s3vol", output.to_str().unwrap()],
    );
    let back = std::fs::read(&output).unwrap();
    assert_eq!(back.len(), 8 << 20);
    assert!(
        back[..data.len()] == data[..],
        "data read back from S3 differs"
    );
    assert!(back[data.len()..].iter().all(|&b| b == 0));

    let info: serde_json::Value =
        serde_json::from_str(&ok(&config, &["volume", "info", "s3vol", "--json"])).unwrap();
    assert!(info["stored_bytes"].as_u64().unwrap() >= 2 << 20, "{info}");

    ok(&config, &["volume", "delete", "s3vol", "--yes"]);
    let list: serde_json::Value =
        serde_json::from_str(&ok(&config, &["volume", "list", "--json"])).unwrap();
    assert_eq!(list, serde_json::json!([]));
}
