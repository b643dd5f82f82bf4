//! The NBD server fed bad and hostile input over raw sockets: every case
//! either gets a protocol error reply on a connection that stays usable, or
//! closes only the offending connection. Also: concurrency (out-of-order
//! replies), graceful shutdown, and garbage that must never panic.

mod nbd_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nbd_support::*;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use shale::engine::BlockDevice;
use shale::frontend::nbd::codec::InfoRequest;
use shale::frontend::nbd::protocol::*;
use shale::frontend::nbd::ExportMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 1 << 20;

/// A healthy connection on `export` can still write and read back.
async fn assert_usable(addr: &str, export: &str) {
    let (mut c, size) = RawClient::connect(addr, export).await;
    assert_eq!(size, SIZE);
    let data = pattern(4096, 99);
    assert_eq!(c.write(1, 8192, &data).await, 0);
    assert_eq!(c.read(2, 8192, 4096).await, (0, data));
}

#[tokio::test]
async fn bad_request_magic_closes_only_that_connection() {
    let (srv, _) = TestServer::memory(&[("a", SIZE), ("b", SIZE)]);
    let (mut ok, _) = RawClient::connect(&srv.addr(), "a").await;
    let (mut bad, _) = RawClient::connect(&srv.addr(), "a").await;
    bad.stream.write_all(&[0xde; 28]).await.unwrap();
    assert!(bad.closed_by_server().await);
    assert_eq!(ok.write(1, 0, &[3u8; 512]).await, 0);
    assert_eq!(ok.read(2, 0, 512).await, (0, vec![3u8; 512]));
    assert_usable(&srv.addr(), "b").await;
}

#[tokio::test]
async fn huge_write_length_closes_connection_without_reading_payload() {
    let (srv, disks) = TestServer::memory(&[("a", SIZE)]);
    let (mut c, _) = RawClient::connect(&srv.addr(), "a").await;
    c.send(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 512).await;
    c.stream.write_all(&[9u8; 4096]).await.unwrap();
    assert!(c.closed_by_server().await);
    assert!(
        disks[0].snapshot().iter().all(|&b| b == 0),
        "nothing written"
    );
    assert_usable(&srv.addr(), "a").await;
}

#[tokio::test]
async fn rejected_requests_get_einval_and_the_connection_stays_usable() {
    let (srv, disks) = TestServer::memory(&[("a", SIZE)]);
    let (mut c, _) = RawClient::connect(&srv.addr(), "a").await;
    // Out of range, straddling the end, unaligned, overflowing.
    assert_eq!(c.read(1, SIZE, 512).await.0, NBD_EINVAL);
    assert_eq!(c.read(2, SIZE - 512, 1024).await.0, NBD_EINVAL);
    assert_eq!(c.read(3, 100, 512).await.0, NBD_EINVAL);
    assert_eq!(c.read(4, 0, 100).await.0, NBD_EINVAL);
    assert_eq!(c.read(5, u64::MAX - 511, 1024).await.0, NBD_EINVAL);
    assert_eq!(c.write(6, SIZE - 512, &[1u8; 1024]).await, NBD_EINVAL);
    assert_eq!(c.write(7, 0, &[1u8; 100]).await, NBD_EINVAL);
    // A read larger than the advertised maximum.
    assert_eq!(c.read(8, 0, MAX_PAYLOAD + 512).await.0, NBD_EINVAL);
    // Unknown command, and a write with an unsupported flag (its payload
    // must be skipped so the next header parses).
    c.send(42, 0, 9, 0, 512).await;
    assert_eq!(c.reply().await, (NBD_EINVAL, 9));
    c.send(CMD_WRITE, 1 << 7, 10, 0, 512).await;
    c.stream.write_all(&[0xee; 512]).await.unwrap();
    assert_eq!(c.reply().await, (NBD_EINVAL, 10));
    for (handle, cmd) in [(11, CMD_TRIM), (12, CMD_WRITE_ZEROES)] {
        c.send(cmd, 0, handle, SIZE, 4096).await;
        assert_eq!(c.reply().await, (NBD_EINVAL, handle));
    }
    assert!(
        disks[0].snapshot().iter().all(|&b| b == 0),
        "nothing changed"
    );
    // Still usable, and valid commands with flags work.
    assert_eq!(c.write(13, 0, &[7u8; 4096]).await, 0);
    c.send(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        14,
        0,
        512,
    )
    .await;
    assert_eq!(c.reply().await, (0, 14));
    c.send(CMD_TRIM, CMD_FLAG_FUA, 15, 512, 512).await;
    assert_eq!(c.reply().await, (0, 15));
    let (err, data) = c.read(16, 0, 4096).await;
    assert_eq!(err, 0);
    assert!(data[..1024].iter().all(|&b| b == 0));
    assert!(data[1024..].iter().all(|&b| b == 7));
    assert_eq!(c.flush(17).await, 0);
    // A clean disconnect.
    c.send(CMD_DISC, 0, 18, 0, 0).await;
    assert!(c.closed_by_server().await);
}

#[tokio::test]
async fn negotiation_errors_are_replies_and_negotiation_continues() {
    let (srv, _) = TestServer::memory(&[("a", SIZE), ("b", 2 * SIZE)]);
    let mut c = RawClient::greet(&srv.addr(), CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    // Unknown options, TLS (not configured), extended headers.
    for opt in [99, OPT_STARTTLS, 11] {
        c.send_option(opt, &[]).await;
        let (o, kind, _) = c.option_reply().await;
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP));
    }
    // Metadata contexts need structured replies first.
    c.send_option(OPT_SET_META_CONTEXT, &[]).await;
    assert_eq!(
        c.option_reply().await,
        (
            OPT_SET_META_CONTEXT,
            REP_ERR_INVALID,
            b"negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts".to_vec()
        )
    );
    // LIST with data is invalid; without data it lists both exports.
    c.send_option(OPT_LIST, b"x").await;
    assert_eq!(c.option_reply().await.1, REP_ERR_INVALID);
    c.send_option(OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (_, kind, data) = c.option_reply().await;
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_SERVER);
        let n = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["a", "b"]);
    // INFO/GO: malformed data, unknown export, the empty (default) name
    // with two exports, then INFO of a real one.
    c.send_option(OPT_GO, &[0, 0, 0, 9, b'a']).await;
    assert_eq!(c.option_reply().await.1, REP_ERR_INVALID);
    for name in ["zzz", ""] {
        let data = InfoRequest {
            name: name.as_bytes().to_vec(),
            requests: vec![],
        }
        .encode();
        c.send_option(OPT_GO, &data).await;
        let (_, kind, msg) = c.option_reply().await;
        assert_eq!(kind, REP_ERR_UNKNOWN, "{}", String::from_utf8_lossy(&msg));
    }
    let info = InfoRequest {
        name: b"b".to_vec(),
        requests: vec![INFO_NAME, INFO_BLOCK_SIZE],
    }
    .encode();
    c.send_option(OPT_INFO, &info).await;
    let mut seen = Vec::new();
    loop {
        let (o, kind, data) = c.option_reply().await;
        assert_eq!(o, OPT_INFO);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
        let t = u16::from_be_bytes([data[0], data[1]]);
        match t {
            INFO_EXPORT => {
                assert_eq!(&data[2..10], &(2 * SIZE).to_be_bytes());
                assert_eq!(&data[10..12], &EXPORT_FLAGS.to_be_bytes());
            }
            INFO_BLOCK_SIZE => {
                let v: Vec<u32> = data[2..]
                    .chunks(4)
                    .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(v, [512, 4096, 32 << 20]);
            }
            INFO_NAME => assert_eq!(&data[2..], b"b"),
            other => panic!("unexpected info {other}"),
        }
        seen.push(t);
    }
    seen.sort();
    assert_eq!(seen, [INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE]);
    // After all that, GO still works on the same connection.
    let go = InfoRequest {
        name: b"a".to_vec(),
        requests: vec![],
    }
    .encode();
    c.send_option(OPT_GO, &go).await;
    while c.option_reply().await.1 != REP_ACK {}
    assert_eq!(c.write(1, 0, &[5u8; 512]).await, 0);
    assert_eq!(c.read(2, 0, 512).await, (0, vec![5u8; 512]));
}

#[tokio::test]
async fn export_name_option_with_and_without_zero_padding() {
    let (srv, _) = TestServer::memory(&[("only", SIZE)]);
    for (flags, pad) in [
        (CLIENT_FIXED_NEWSTYLE, 124usize),
        (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES, 0),
    ] {
        let mut c = RawClient::greet(&srv.addr(), flags).await;
        // The empty name selects the only export.
        c.send_option(OPT_EXPORT_NAME, b"").await;
        let mut reply = vec![0u8; 10 + pad];
        c.stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[0..8], &SIZE.to_be_bytes());
        assert_eq!(&reply[8..10], &EXPORT_FLAGS.to_be_bytes());
        assert!(reply[10..].iter().all(|&b| b == 0));
        assert_eq!(c.write(1, 512, &[8u8; 512]).await, 0);
        assert_eq!(c.read(2, 512, 512).await, (0, vec![8u8; 512]));
    }
    let mut c = RawClient::greet(&srv.addr(), CLIENT_FIXED_NEWSTYLE).await;
    c.send_option(OPT_EXPORT_NAME, b"nope").await;
    assert!(c.closed_by_server().await, "unknown EXPORT_NAME closes");
}

#[tokio::test]
async fn hostile_negotiation_closes_only_that_connection() {
    let (srv, _) = TestServer::memory(&[("a", SIZE)]);
    let addr = srv.addr();
    // Unknown client flags; client without fixed newstyle.
    for flags in [1 << 5, 0] {
        let mut c = RawClient::greet(&addr, flags).await;
        assert!(c.closed_by_server().await, "client flags {flags:#x}");
    }
    // Bad option magic.
    let mut c = RawClient::greet(&addr, CLIENT_FIXED_NEWSTYLE).await;
    c.stream.write_all(&[0x41; 16]).await.unwrap();
    assert!(c.closed_by_server().await);
    // Option data far beyond any sane length.
    let mut c = RawClient::greet(&addr, CLIENT_FIXED_NEWSTYLE).await;
    let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&OPT_GO.to_be_bytes());
    hdr.extend_from_slice(&u32::MAX.to_be_bytes());
    c.stream.write_all(&hdr).await.unwrap();
    assert!(c.closed_by_server().await);
    // ABORT is acknowledged, then the server closes.
    let mut c = RawClient::greet(&addr, CLIENT_FIXED_NEWSTYLE).await;
    c.send_option(OPT_ABORT, &[]).await;
    assert_eq!(c.option_reply().await.1, REP_ACK);
    assert!(c.closed_by_server().await);
    // A client that vanishes mid-greeting.
    drop(tokio::net::TcpStream::connect(&addr).await.unwrap());
    assert_usable(&addr, "a").await;
}

#[tokio::test]
async fn replies_come_back_out_of_order_when_requests_finish_out_of_order() {
    let disk = Arc::new(GatedDisk::new(SIZE, vec![0]));
    let exports =
        ExportMap::new([("g".to_string(), disk.clone() as Arc<dyn BlockDevice>)]).unwrap();
    let srv = TestServer::start(exports);
    let _release = ReleaseOnDrop(disk.gate.clone());
    let (mut c, _) = RawClient::connect(&srv.addr(), "g").await;
    c.send(CMD_READ, 0, 1, 0, 4096).await; // held at the gate
                                           // Requests in flight are unordered, so the read is sent after the
                                           // write's reply; both overtake the held read.
    assert_eq!(c.write(2, 4096, &[6u8; 512]).await, 0);
    c.send(CMD_READ, 0, 3, 4096, 512).await;
    let (err, h) = c.reply().await;
    assert_eq!((err, h), (0, 3));
    let mut data = vec![0u8; 512];
    c.stream.read_exact(&mut data).await.unwrap();
    assert_eq!(data, vec![6u8; 512]);
    disk.gate.add_permits(1);
    assert_eq!(c.reply().await, (0, 1), "the held read answers last");
    let mut data = vec![0u8; 4096];
    c.stream.read_exact(&mut data).await.unwrap();
    assert!(data.iter().all(|&b| b == 0));
}

/// A flush is first polled on the connection's reading task (invariant 7
/// of the transmission): one the device answers at once gets its reply
/// from there, and one that must wait is handed to a task of its own and
/// still answered once the device lets it go, while other requests
/// overtake it.
#[tokio::test]
async fn a_flush_that_must_wait_is_answered_once_it_can() {
    let disk = Arc::new(GatedDisk::new(SIZE, vec![]));
    let exports =
        ExportMap::new([("g".to_string(), disk.clone() as Arc<dyn BlockDevice>)]).unwrap();
    let srv = TestServer::start(exports);
    let _release = ReleaseOnDrop(disk.gate.clone());
    let (mut c, _) = RawClient::connect(&srv.addr(), "g").await;
    assert_eq!(c.flush(1).await, 0, "a flush answered at once");
    disk.flush_gated
        .store(true, std::sync::atomic::Ordering::SeqCst);
    c.send(CMD_FLUSH, 0, 2, 0, 0).await;
    disk.entered.acquire().await.unwrap().forget();
    assert_eq!(c.write(3, 0, &[7u8; 512]).await, 0, "overtakes the flush");
    disk.gate.add_permits(1);
    assert_eq!(c.reply().await, (0, 2), "the held flush is answered");
    assert_eq!(disk.events(), ["flush", "write 0", "flush"]);
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_then_flushes() {
    let disk = Arc::new(GatedDisk::new(SIZE, vec![0]));
    let exports =
        ExportMap::new([("g".to_string(), disk.clone() as Arc<dyn BlockDevice>)]).unwrap();
    let mut srv = TestServer::start(exports);
    let _release = ReleaseOnDrop(disk.gate.clone());
    let (mut c, _) = RawClient::connect(&srv.addr(), "g").await;
    c.send(CMD_WRITE, 0, 1, 0, 512).await;
    c.stream.write_all(&[4u8; 512]).await.unwrap();
    // Wait until the write is inside the device, then ask for shutdown.
    disk.entered.acquire().await.unwrap().forget();
    srv.request_stop();
    // New connections are refused once the server stops accepting.
    let port = srv.port;
    let refused = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Err(_) => break true,
            Ok(mut s) => {
                // Connected before the stop took effect: the server closes
                // it, with or without a greeting. A handshake the kernel
                // completed just as the listener closed is dropped without
                // a reset, and a client that only reads would wait forever,
                // so the read is bounded; then retry.
                let mut b = [0u8; 18];
                let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await;
                tokio::task::yield_now().await;
            }
        }
    };
    assert!(refused);
    assert!(!srv.finished(), "serve waits for the write in flight");
    disk.gate.add_permits(1);
    assert_eq!(c.reply().await, (0, 1), "the write in flight is answered");
    assert!(c.closed_by_server().await);
    srv.stop().unwrap();
    assert_eq!(disk.events(), ["write 0", "flush"]);
    assert_eq!(disk.inner.snapshot()[..512], [4u8; 512]);
}

#[tokio::test]
async fn disconnect_mid_write_keeps_flushed_data_and_applies_nothing_partial() {
    let (srv, disks) = TestServer::memory(&[("a", SIZE)]);
    let flushed = pattern(64 << 10, 5);
    {
        let (mut c, _) = RawClient::connect(&srv.addr(), "a").await;
        assert_eq!(c.write(1, 0, &flushed).await, 0);
        assert_eq!(c.flush(2).await, 0);
        c.send(CMD_WRITE, 0, 3, 0, 64 << 10).await;
        c.stream.write_all(&[0xff; 1000]).await.unwrap();
        // Dropped here, mid-payload.
    }
    let (mut c, _) = RawClient::connect(&srv.addr(), "a").await;
    assert_eq!(c.read(1, 0, 64 << 10).await, (0, flushed.clone()));
    assert_eq!(disks[0].snapshot()[..64 << 10], flushed[..]);
}

#[tokio::test]
async fn pipelined_requests_beyond_the_in_flight_limits_all_complete() {
    let limits = shale::frontend::nbd::Limits {
        max_requests: 2,
        max_bytes: 0, // raised to the largest request internally
        ..Default::default()
    };
    let srv = TestServer::start_limited(limits, || async {
        let disk: Arc<dyn BlockDevice> = Arc::new(shale::engine::memdisk::MemDisk::new(64 << 20));
        let cleanup: Cleanup = Box::new(|| Box::pin(async {}));
        (ExportMap::new([("a".to_string(), disk)]).unwrap(), cleanup)
    });
    let (c, _) = RawClient::connect(&srv.addr(), "a").await;
    let (mut rd, mut wr) = c.stream.into_split();
    let n = 64u64;
    let req = |command, handle, offset| shale::frontend::nbd::codec::Request {
        flags: 0,
        command,
        handle,
        offset,
        length: 1 << 20,
    };
    // 64 MiB of writes sent without reading replies: the server must
    // throttle (two in flight) rather than buffer, and answer them all.
    let sender = tokio::spawn(async move {
        for i in 0..n {
            wr.write_all(&req(CMD_WRITE, i, i << 20).encode())
                .await
                .unwrap();
            wr.write_all(&pattern(1 << 20, i)).await.unwrap();
        }
        wr
    });
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..n {
        let mut h = [0u8; 16];
        rd.read_exact(&mut h).await.unwrap();
        let (err, handle) = shale::frontend::nbd::codec::decode_simple_reply(&h).unwrap();
        assert_eq!(err, 0, "handle {handle}");
        assert!(answered.insert(handle), "handle {handle} answered twice");
    }
    assert_eq!(answered, (0..n).collect());
    // Then 64 pipelined reads of what was written.
    let mut wr = sender.await.unwrap();
    let reader = tokio::spawn(async move {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..n {
            let mut h = [0u8; 16];
            rd.read_exact(&mut h).await.unwrap();
            let (err, handle) = shale::frontend::nbd::codec::decode_simple_reply(&h).unwrap();
            assert_eq!(err, 0);
            let mut data = vec![0u8; 1 << 20];
            rd.read_exact(&mut data).await.unwrap();
            let i = handle - 1000;
            assert!(data == pattern(1 << 20, i), "read {i} returned wrong data");
            seen.insert(i);
        }
        seen
    });
    for i in 0..n {
        wr.write_all(&req(CMD_READ, 1000 + i, i << 20).encode())
            .await
            .unwrap();
    }
    assert_eq!(reader.await.unwrap(), (0..n).collect());
}

/// Opens a gate when a test ends, even by panic, so the server's
/// shutdown (which waits for requests in flight) cannot hang the test.
struct ReleaseOnDrop(Arc<tokio::sync::Semaphore>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.add_permits(1 << 20);
    }
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[tokio::test]
async fn random_garbage_in_every_phase_never_panics_the_server() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        prev(info);
    }));
    let (srv, _) = TestServer::memory(&[("a", SIZE)]);
    let addr = srv.addr();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for round in 0..200 {
        let mut junk = vec![0u8; rng.random_range(1..600)];
        rng.fill_bytes(&mut junk);
        let mut s = match round % 3 {
            // Raw junk instead of client flags.
            0 => tokio::net::TcpStream::connect(&addr).await.unwrap(),
            // Junk where options are expected.
            1 => RawClient::greet(&addr, CLIENT_FIXED_NEWSTYLE).await.stream,
            // Junk after a valid request magic, in transmission.
            _ => {
                let (c, _) = RawClient::connect(&addr, "a").await;
                junk[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                c.stream
            }
        };
        let _ = s.write_all(&junk).await;
        let _ = s.shutdown().await;
        // Drain whatever the server says until it closes.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    }
    assert_usable(&addr, "a").await;
    srv.stop().unwrap();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic was reported");
}
