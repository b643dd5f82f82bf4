//! FsStore's Create and IfMatch are atomic across processes, not only
//! threads: 8 processes (this test binary re-run as children) race on one key.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use shale::store::fs::FsStore;
use shale::store::{ObjectStore, PutMode, StoreError, Version};

const PROCESSES: usize = 8;
const ROUNDS: usize = 3;

/// Not a test of its own: the body of each racing child process. Without the
/// environment set by the parent it returns at once.
#[tokio::test]
async fn child_racer() {
    let Ok(dir) = std::env::var("SHALE_RACE_DIR") else {
        return;
    };
    let key = std::env::var("SHALE_RACE_KEY").expect("key");
    let id = std::env::var("SHALE_RACE_ID").expect("id");
    let mode = match std::env::var("SHALE_RACE_VERSION") {
        Ok(v) => PutMode::IfMatch(Version(v)),
        Err(_) => PutMode::Create,
    };
    let go = Path::new(&dir).join("go");
    while !go.exists() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let store = FsStore::new(Path::new(&dir).join("store"));
    let outcome = match store
        .put(&key, Bytes::from(format!("writer {id}")), mode)
        .await
    {
        Ok(_) => "win".to_string(),
        Err(StoreError::AlreadyExists { .. } | StoreError::PreconditionFailed { .. }) => {
            "lose".to_string()
        }
        Err(e) => format!("error {e}"),
    };
    println!("RESULT:{id}:{outcome}");
}

fn spawn_racer(dir: &Path, key: &str, id: usize, version: Option<&Version>) -> Child {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "child_racer", "--nocapture", "--test-threads=1"])
        .env("SHALE_RACE_DIR", dir)
        .env("SHALE_RACE_KEY", key)
        .env("SHALE_RACE_ID", id.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(v) = version {
        cmd.env("SHALE_RACE_VERSION", &v.0);
    }
    cmd.spawn().expect("spawn racer")
}

/// Start 8 children, release them together, return the winners' ids.
fn race(dir: &Path, key: &str, version: Option<&Version>) -> Vec<usize> {
    let go = dir.join("go");
    let _ = std::fs::remove_file(&go);
    let children: Vec<Child> = (0..PROCESSES)
        .map(|id| spawn_racer(dir, key, id, version))
        .collect();
    std::fs::write(&go, b"").expect("release racers");
    let mut winners = Vec::new();
    let mut losers = 0;
    for child in children {
        let out = child.wait_with_output().expect("racer output");
        assert!(out.status.success(), "racer failed: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("RESULT:").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no result from racer: {stdout}"));
        let (id, outcome) = line.split_once(':').expect("id:outcome");
        match outcome {
            "win" => winners.push(id.parse().expect("id")),
            "lose" => losers += 1,
            other => panic!("racer {id}: {other}"),
        }
    }
    assert_eq!(winners.len() + losers, PROCESSES);
    winners
}

#[tokio::test]
async fn create_and_cas_races_across_processes_have_one_winner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsStore::new(dir.path().join("store"));
    for round in 0..ROUNDS {
        let key = format!("race/create-{round}");
        let winners = race(dir.path(), &key, None);
        assert_eq!(
            winners.len(),
            1,
            "create round {round}: winners {winners:?}"
        );
        let got = store.get(&key).await.expect("get");
        assert_eq!(got.data, Bytes::from(format!("writer {}", winners[0])));
    }
    let key = "race/cas";
    let mut version = store
        .put(key, Bytes::from_static(b"start"), PutMode::Create)
        .await
        .expect("create");
    for round in 0..ROUNDS {
        let winners = race(dir.path(), key, Some(&version));
        assert_eq!(winners.len(), 1, "cas round {round}: winners {winners:?}");
        let got = store.get(key).await.expect("get");
        assert_eq!(got.data, Bytes::from(format!("writer {}", winners[0])));
        assert_ne!(got.version, version);
        version = got.version;
    }
}
