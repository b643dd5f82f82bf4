//! The control server over a real Unix socket and a real (in-memory) volume.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::*;
use crate::clock::SystemClock;
use crate::engine::config::EngineConfig;
use crate::engine::snapshot::list_snapshots;
use crate::engine::{BlockDevice, VolumeParams};
use crate::store::memory::MemoryStore;
use crate::store::DynStore;

const ID: u64 = 0x77;

async fn open(store: &DynStore, dir: &Path) -> Arc<Volume> {
    let params = VolumeParams {
        id: ID,
        size: 1 << 20,
        epoch: 1,
        local_dir: dir.join("vol"),
    };
    let cfg = EngineConfig {
        chunk_size: 64 << 10,
        ..EngineConfig::default()
    };
    Volume::open(store.clone(), params, cfg, Arc::new(SystemClock))
        .await
        .expect("open")
}

/// Send raw bytes, half-close, read the whole answer.
async fn raw(path: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).await.expect("connect");
    s.write_all(bytes).await.expect("send");
    s.shutdown().await.expect("shutdown");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

fn error_of(reply: &str) -> String {
    let r: Reply = serde_json::from_str(reply.trim_end()).expect("a JSON reply");
    assert!(!r.ok, "{reply}");
    r.error.expect("an error message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_create_over_the_socket_and_bad_requests() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let vol = open(&store, dir.path()).await;
    let path = socket_path(dir.path());
    // A stale socket file (a crashed server's) does not stop the next one.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ControlServer::start(path.clone(), &vol, ID).expect("start");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    vol.write(0, &[7u8; 4096], false).await.unwrap();
    let req = Request::SnapshotCreate {
        volume: ID,
        name: "s1".into(),
        created_ms: 42,
    };
    let reply = request(&path, &req).await.expect("reply");
    assert!(reply.ok, "{reply:?}");
    let got = reply.snapshot.expect("summary");
    assert_eq!((got.id, got.name.as_str(), got.created_ms), (1, "s1", 42));
    assert_eq!(got.chunks, 1);

    let again = request(&path, &req).await.expect("reply");
    assert!(
        again
            .error
            .as_deref()
            .unwrap_or("")
            .contains("already has a snapshot"),
        "{again:?}"
    );
    let other = Request::SnapshotCreate {
        volume: ID + 1,
        name: "s2".into(),
        created_ms: 1,
    };
    let e = request(&path, &other).await.unwrap().error.unwrap();
    assert!(e.contains("not 0000000000000078"), "{e}");
    let bad_name = Request::SnapshotCreate {
        volume: ID,
        name: "../x".into(),
        created_ms: 1,
    };
    assert!(!request(&path, &bad_name).await.unwrap().ok);

    assert!(error_of(&raw(&path, b"not json\n").await).contains("malformed request"));
    assert!(error_of(&raw(&path, b"{\"op\":\"format_disk\"}\n").await).contains("malformed"));
    let extra = br#"{"op":"snapshot_create","volume":119,"name":"x","created_ms":1,"force":true}"#;
    assert!(error_of(&raw(&path, extra).await).contains("malformed"));
    assert!(error_of(&raw(&path, b"").await).contains("malformed"));
    let long = vec![b'a'; (MAX_LINE + 10) as usize];
    assert!(error_of(&raw(&path, &long).await).contains("longer than"));
    assert!(error_of(&raw(&path, b"\xff\xfe\n").await).contains("UTF-8"));

    // Still serving after all that; exactly one snapshot exists.
    let s3 = Request::SnapshotCreate {
        volume: ID,
        name: "s3".into(),
        created_ms: 3,
    };
    assert!(request(&path, &s3).await.unwrap().ok);
    let names: Vec<_> = list_snapshots(&store, ID)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["s1", "s3"]);

    let del = Request::SnapshotDelete {
        volume: ID,
        name: "s1".into(),
    };
    let reply = request(&path, &del).await.unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.deleted_id, Some(1), "{reply:?}");
    let marked = list_snapshots(&store, ID).await.unwrap();
    assert!(marked[0].deleting && !marked[1].deleting, "{marked:?}");
    // The client, having found no clones, makes the delete final.
    crate::engine::snapshot::remove_snapshot(&store, ID, 1)
        .await
        .unwrap();
    let collect = Request::CollectGarbage { volume: ID };
    let reply = request(&path, &collect).await.unwrap();
    assert!(reply.ok, "{reply:?}");
    assert!(reply.freed_chunks.is_some(), "{reply:?}");
    let wrong = Request::CollectGarbage { volume: ID + 1 };
    assert!(!request(&path, &wrong).await.unwrap().ok);
    let again = request(&path, &del).await.unwrap();
    assert!(
        again
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no snapshot named"),
        "{again:?}"
    );
    let names: Vec<_> = list_snapshots(&store, ID)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["s3"]);

    drop(server);
    assert!(
        !path.exists(),
        "the socket is removed when the server stops"
    );
    let gone = request(&path, &s3).await;
    assert!(matches!(gone, Err(ControlError::Io { .. })), "{gone:?}");
    vol.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_volume_is_refused_and_a_replaced_socket_is_left_alone() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let vol = open(&store, dir.path()).await;
    let path = socket_path(dir.path());
    let first = ControlServer::start(path.clone(), &vol, ID).expect("start");
    vol.close().await.unwrap();
    let req = Request::SnapshotCreate {
        volume: ID,
        name: "late".into(),
        created_ms: 1,
    };
    let e = request(&path, &req).await.unwrap().error.unwrap();
    assert!(e.contains("closed"), "{e}");
    drop(vol);
    let e = request(&path, &req).await.unwrap().error.unwrap();
    assert!(e.contains("closed"), "{e}");
    // A newer server replaced the socket: the old one's drop keeps it.
    let vol2 = open(&store, dir.path()).await;
    let second = ControlServer::start(path.clone(), &vol2, ID).expect("restart");
    drop(first);
    assert!(path.exists());
    assert!(request(&path, &req).await.unwrap().ok);
    drop(second);
    assert!(!path.exists());
    vol2.close().await.unwrap();
}

/// `metrics` answers with the volume's report (counters of a real write
/// through the metered device), and without metrics with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_over_the_socket() {
    use crate::catalog::lease::Lease;
    use crate::metrics::requests::MeteredDevice;
    use crate::metrics::volume::VolumeMetrics;
    use crate::store::metered::StoreMetrics;

    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let vol = open(&store, dir.path()).await;
    let lease = Lease::acquire(
        store.clone(),
        ID,
        "test:1",
        std::time::Duration::from_secs(30),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let lease = Arc::new(lease);
    let metrics = Arc::new(VolumeMetrics::new(
        "vol",
        ID,
        &vol,
        Arc::new(StoreMetrics::default()),
        &lease,
        None,
        Arc::new(SystemClock),
    ));
    let dev = MeteredDevice::new(vol.clone(), metrics.frontend("nbd", "export vol"));
    dev.write(0, &[5u8; 8192], false).await.unwrap();

    let path = socket_path(dir.path());
    let server =
        ControlServer::start_with_metrics(path.clone(), &vol, ID, Some(metrics)).expect("start");
    let reply = request(&path, &Request::Metrics { volume: ID })
        .await
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    let r = reply.report.expect("a report");
    r.validate().unwrap();
    assert_eq!((r.volume.as_str(), r.id), ("vol", ID));
    assert_eq!(r.frontends[0].device, "export vol");
    assert_eq!(r.sum("requests", &[("op", "write")]), 1.0);
    assert_eq!(r.sum("request", &[("op", "write")]), 8192.0);
    assert_eq!(r.lease.epoch, lease.epoch());
    let wrong = request(&path, &Request::Metrics { volume: ID + 1 })
        .await
        .unwrap();
    assert!(!wrong.ok && wrong.report.is_none());
    drop(server);

    let plain = ControlServer::start(path.clone(), &vol, ID).expect("start");
    let reply = request(&path, &Request::Metrics { volume: ID })
        .await
        .unwrap();
    assert!(!reply.ok);
    assert!(reply.error.unwrap().contains("no metrics"));
    drop(plain);
    vol.close().await.unwrap();
}
