//! Limits against exhaustion, each tried with a misbehaving raw-socket
//! client: the connection cap, the handshake timeout, a request that never
//! finishes arriving, an idle connection, a client that never reads its
//! replies (it is closed and frees the global byte budget for others), and
//! the shutdown deadline that drops connections stuck that way.
//!
//! Every wait is bounded by a generous guard (`GUARD`) so a regression
//! fails instead of hanging; no assertion depends on how long anything took.

#[path = "support/cli.rs"]
mod cli_support;
mod nbd_support;

use std::sync::Arc;
use std::time::Duration;

use nbd_support::*;
use shale::engine::memdisk::MemDisk;
use shale::engine::BlockDevice;
use shale::frontend::nbd::protocol::*;
use shale::frontend::nbd::{ExportMap, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GUARD: Duration = Duration::from_secs(60);
const SIZE: u64 = 64 << 20;

fn server(limits: Limits) -> TestServer {
    TestServer::start_limited(limits, || async {
        let disk: Arc<dyn BlockDevice> = Arc::new(MemDisk::new(SIZE));
        let cleanup: Cleanup = Box::new(|| Box::pin(async {}));
        (ExportMap::new([("a".to_string(), disk)]).unwrap(), cleanup)
    })
}

fn short(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Read until EOF (or an error); returns how many bytes came first.
async fn until_closed(s: &mut TcpStream) -> usize {
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match tokio::time::timeout(GUARD, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return total,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the server did not close the connection"),
        }
    }
}

async fn usable(addr: &str) {
    let (mut c, size) = RawClient::connect(addr, "a").await;
    assert_eq!(size, SIZE);
    assert_eq!(c.flush(1).await, 0);
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let srv = server(Limits {
        max_connections: 2,
        ..Limits::default()
    });
    let addr = srv.addr();
    let first = RawClient::greet(&addr, CLIENT_FIXED_NEWSTYLE).await;
    let _second = RawClient::greet(&addr, CLIENT_FIXED_NEWSTYLE).await;
    let mut third = TcpStream::connect(&addr).await.unwrap();
    assert_eq!(
        until_closed(&mut third).await,
        0,
        "no greeting past the cap"
    );
    drop(first);
    // The slot comes back once the server notices the close.
    let mut admitted = false;
    for _ in 0..200 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let mut g = [0u8; 8];
        if tokio::time::timeout(GUARD, s.read_exact(&mut g))
            .await
            .unwrap()
            .is_ok()
        {
            assert_eq!(&g, b"NBDMAGIC");
            admitted = true;
            break;
        }
        tokio::time::sleep(short(20)).await;
    }
    assert!(admitted, "a closed connection frees its slot");
    srv.stop().unwrap();
}

#[tokio::test]
async fn a_client_that_stalls_in_the_handshake_is_closed() {
    let srv = server(Limits {
        handshake_timeout: short(300),
        ..Limits::default()
    });
    // Greeted, then silent: never sends its flags.
    let mut s = TcpStream::connect(srv.addr()).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(until_closed(&mut s).await, 0);
    // Sends its flags and half an option header, then stalls.
    let mut c = RawClient::greet(&srv.addr(), CLIENT_FIXED_NEWSTYLE).await;
    c.stream.write_all(b"IHAVEOPT\0\0").await.unwrap();
    assert_eq!(until_closed(&mut c.stream).await, 0);
    usable(&srv.addr()).await;
    srv.stop().unwrap();
}

#[tokio::test]
async fn a_request_that_never_finishes_arriving_closes_its_connection() {
    let srv = server(Limits {
        request_timeout: short(300),
        ..Limits::default()
    });
    // Half a request header.
    let (mut c, _) = RawClient::connect(&srv.addr(), "a").await;
    c.stream
        .write_all(&REQUEST_MAGIC.to_be_bytes())
        .await
        .unwrap();
    c.stream.write_all(&[0u8; 6]).await.unwrap();
    assert_eq!(until_closed(&mut c.stream).await, 0);
    // A write announcing 1 MiB that sends only 4 KiB of it.
    let (mut c, _) = RawClient::connect(&srv.addr(), "a").await;
    c.send(CMD_WRITE, 0, 1, 0, 1 << 20).await;
    c.stream.write_all(&[7u8; 4096]).await.unwrap();
    assert_eq!(until_closed(&mut c.stream).await, 0);
    usable(&srv.addr()).await;
    srv.stop().unwrap();
}

#[tokio::test]
async fn idle_connections_are_closed_when_an_idle_timeout_is_set() {
    let srv = server(Limits {
        idle_timeout: Some(short(300)),
        ..Limits::default()
    });
    let (mut c, _) = RawClient::connect(&srv.addr(), "a").await;
    assert_eq!(c.flush(1).await, 0, "working before going idle");
    assert_eq!(until_closed(&mut c.stream).await, 0);
    srv.stop().unwrap();
}

#[tokio::test]
async fn a_client_that_never_reads_replies_stops_only_itself() {
    // The whole server may hold 32 MiB of request bytes: one connection's
    // worth. A reads 32 MiB and never reads the reply, holding all of it.
    let srv = server(Limits {
        max_bytes: 32 << 20,
        max_buffered_bytes: 32 << 20,
        request_timeout: short(500),
        ..Limits::default()
    });
    let (mut hog, _) = RawClient::connect(&srv.addr(), "a").await;
    for h in 0..4 {
        hog.send(CMD_READ, 0, h, 0, 32 << 20).await;
    }
    // B needs 4 KiB of the global budget: it is served once the server
    // has closed A for not reading.
    let (mut b, _) = RawClient::connect(&srv.addr(), "a").await;
    let (err, data) = tokio::time::timeout(GUARD, b.read(9, 0, 4096))
        .await
        .expect("B must be served");
    assert_eq!(err, 0);
    assert_eq!(data, vec![0u8; 4096]);
    // A was closed by the server: what it can still read ends in EOF, well
    // short of the 128 MiB it asked for.
    let got = until_closed(&mut hog.stream).await;
    assert!(got < 4 * (32 << 20), "A received {got} bytes");
    usable(&srv.addr()).await;
    srv.stop().unwrap();
}

#[tokio::test]
async fn shutdown_drops_connections_stuck_past_the_deadline() {
    // Without a deadline this client would hold shutdown for an hour.
    let srv = server(Limits {
        request_timeout: Duration::from_secs(3600),
        shutdown_timeout: short(300),
        ..Limits::default()
    });
    let (mut stuck, _) = RawClient::connect(&srv.addr(), "a").await;
    for h in 0..4 {
        stuck.send(CMD_READ, 0, h, 0, 32 << 20).await;
    }
    // The first reply has started: the server is blocked writing to us.
    let mut head = [0u8; SIMPLE_REPLY_LEN_BYTES];
    stuck.stream.read_exact(&mut head).await.unwrap();
    let stopped = tokio::task::spawn_blocking(move || srv.stop());
    let result = tokio::time::timeout(GUARD, stopped)
        .await
        .expect("shutdown must not wait for a client that does not read")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

const SIMPLE_REPLY_LEN_BYTES: usize = shale::frontend::nbd::codec::SIMPLE_REPLY_LEN;

/// The real server with a real volume: a client that wrote (unflushed) and
/// then stopped reading its replies cannot hold up SIGTERM. Past
/// `nbd.shutdown_timeout_ms` the connection is dropped, the volume flushed
/// (the unflushed write is in the store afterwards) and its lease released
/// (`expires_at_ms` 0), and the server exits 0.
#[tokio::test]
async fn sigterm_flushes_releases_and_exits_despite_a_stuck_client() {
    use shale::catalog::lease::read_lease;
    use shale::catalog::Catalog;
    use shale::store::fs::FsStore;
    use shale::store::DynStore;
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let env = cli_support::CliEnv::with_config(
        "data_dir: data\nnbd:\n  shutdown_timeout_ms: 300\n  request_timeout_ms: 3600000\n",
    );
    env.ok(&["volume", "create", "v", "--size", "64MiB"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_shale"))
        .env_remove("SHALE_CONFIG")
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(&env.config)
        .args(["nbd", "serve", "v", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn shale nbd serve");
    let line = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .expect("server exited before listening")
        .unwrap();
    let addr = line
        .strip_prefix("listening on tcp:")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();

    let (mut stuck, size) = RawClient::connect(&addr, "v").await;
    assert_eq!(size, 64 << 20);
    let data = pattern(64 << 10, 5);
    assert_eq!(stuck.write(1, 0, &data).await, 0, "write acknowledged");
    for h in 0..4 {
        stuck.send(CMD_READ, 0, 10 + h, 0, 16 << 20).await;
    }
    let mut head = [0u8; SIMPLE_REPLY_LEN_BYTES];
    stuck.stream.read_exact(&mut head).await.unwrap();

    // SAFETY: kill(2) on a child we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = tokio::time::timeout(
        GUARD,
        tokio::task::spawn_blocking(move || child.wait().unwrap()),
    )
    .await
    .expect("the server must exit despite the stuck client")
    .unwrap();
    assert!(status.success(), "shale nbd serve exited with {status}");
    drop(stuck);

    let store: DynStore = Arc::new(FsStore::new(env.path("data/store")));
    let id = Catalog::new(store.clone()).get("v").await.unwrap().id;
    let (lease, _) = read_lease(&store, id).await.unwrap().expect("lease record");
    assert_eq!(lease.expires_at_ms, 0, "the lease was released: {lease:?}");
    let out = env.path("v.img");
    env.ok(&["volume", "export", "v", out.to_str().unwrap()]);
    assert!(
        file_bytes(&out)[..data.len()] == data[..],
        "the unflushed write was flushed at shutdown"
    );
}
