//! NBD structured replies and `NBD_CMD_BLOCK_STATUS` (`base:allocation`)
//! over real shale volumes: `nbdinfo --map` shows written, trimmed, zeroed
//! and never-written ranges (with the writes in the WAL and again from
//! chunks after a reopen), and a clone's inherited data as allocated;
//! `nbdcopy` and `qemu-img convert` copy a sparse volume exactly while
//! reading only its data; a raw-socket client gets error replies (never a
//! disconnect) for malformed negotiation and block status requests.

mod nbd_support;

#[path = "support/attach.rs"]
mod attach;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use nbd_support::*;
use shale::catalog::snapshot::Snapshots;
use shale::catalog::Catalog;
use shale::clock::{DynClock, SystemClock};
use shale::engine::config::EngineConfig;
use shale::engine::volume::Volume;
use shale::engine::BlockDevice;
use shale::error::BlockError;
use shale::frontend::nbd::codec::*;
use shale::frontend::nbd::protocol::*;
use shale::frontend::nbd::ExportMap;
use shale::store::fs::FsStore;
use shale::store::DynStore;
use tokio::io::AsyncWriteExt;

const K: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// `base:allocation` flags of a hole (unallocated, reads as zeros).
const HOLE: u32 = STATE_HOLE | STATE_ZERO;

/// A change applied through the engine before serving.
#[derive(Clone)]
enum Edit {
    Write(u64, Vec<u8>),
    Trim(u64, u64),
    Zero(u64, u64),
}

async fn apply(dev: &dyn BlockDevice, edits: &[Edit]) {
    for e in edits {
        match e {
            Edit::Write(off, data) => dev.write(*off, data, false).await.unwrap(),
            Edit::Trim(off, len) => dev.trim(*off, *len).await.unwrap(),
            Edit::Zero(off, len) => dev.write_zeroes(*off, *len, false).await.unwrap(),
        }
    }
}

/// The image `edits` make of a zeroed device of `size` bytes.
fn image(size: u64, edits: &[Edit]) -> Vec<u8> {
    let mut img = vec![0u8; size as usize];
    for e in edits {
        match e {
            Edit::Write(off, data) => {
                img[*off as usize..*off as usize + data.len()].copy_from_slice(data)
            }
            Edit::Trim(off, len) | Edit::Zero(off, len) => {
                img[*off as usize..(*off + *len) as usize].fill(0)
            }
        }
    }
    img
}

/// Counts the bytes read through a device; everything else, block status
/// included, goes to the volume.
struct CountReads(Arc<AtomicU64>);

#[async_trait]
impl DeviceHook for CountReads {
    async fn before(&self, op: DeviceOp) -> Result<(), BlockError> {
        if let DeviceOp::Read { len, .. } = op {
            self.0.fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Serve volumes `names` (ids 1, 2, ...) of `size` bytes from `root` at
/// `epoch`, after applying `edits` to the first one. Returns the server
/// and the count of bytes read from the first volume.
fn serve(
    root: PathBuf,
    names: &[&'static str],
    size: u64,
    epoch: u64,
    edits: Vec<Edit>,
) -> (TestServer, Arc<AtomicU64>) {
    let read = Arc::new(AtomicU64::new(0));
    let counter = read.clone();
    let names = names.to_vec();
    let srv = TestServer::start_with(move || async move {
        let mut vols = Vec::new();
        for (i, name) in names.iter().enumerate() {
            vols.push((*name, open_volume(&root, i as u64 + 1, size, epoch).await));
        }
        apply(vols[0].1.as_ref(), &edits).await;
        let devices = vols.iter().enumerate().map(|(i, (name, v))| {
            let dev: Arc<dyn BlockDevice> = if i == 0 {
                Arc::new(HookedDevice {
                    inner: v.clone(),
                    hook: CountReads(counter.clone()),
                })
            } else {
                v.clone()
            };
            (name.to_string(), dev)
        });
        let exports = ExportMap::new(devices).unwrap();
        let cleanup: Cleanup = Box::new(move || {
            Box::pin(async move {
                for (name, v) in vols {
                    v.close()
                        .await
                        .unwrap_or_else(|e| panic!("close {name}: {e}"));
                }
            })
        });
        (exports, cleanup)
    });
    (srv, read)
}

/// `nbdinfo --map` of `uri` as `(offset, length, flags)`, adjacent
/// entries with the same flags merged.
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run_ok(Command::new("nbdinfo").arg("--map").arg(uri));
    let mut map: Vec<(u64, u64, u32)> = Vec::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, flags) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        match map.last_mut() {
            Some(last) if last.2 == flags && last.0 + last.1 == off => last.1 += len,
            _ => map.push((off, len, flags)),
        }
    }
    map
}

#[test]
fn nbdinfo_map_shows_data_trimmed_zeroed_and_never_written_ranges() {
    if !have_tool("nbdinfo", &["--version"]) || !have_tool("qemu-io", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let (srv, _) = serve(dir.path().to_path_buf(), &["vol"], size, 1, vec![]);
    let uri = srv.uri("vol");
    assert_eq!(nbdinfo_map(&uri), [(0, size, HOLE)], "a new volume");
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri]).args([
        "-c",
        "write -P 0x55 0 1M",
        "-c",
        "write -P 0x66 2M 1M",
        "-c",
        "discard 2560k 512k",
        "-c",
        "write -P 0x77 8M 1M",
        "-c",
        "write -z 8M 1M",
        "-c",
        "write -P 0 12M 64k",
        "-c",
        "flush",
    ]));
    let want = [
        (0, MIB, 0),
        (MIB, MIB, HOLE),
        (2 * MIB, 512 * K, 0),
        (2 * MIB + 512 * K, size - 2 * MIB - 512 * K, HOLE),
    ];
    assert_eq!(nbdinfo_map(&uri), want, "with the writes in the WAL");
    srv.stop().unwrap();
    // Closed (everything destaged into chunks), then served again.
    let (srv, _) = serve(dir.path().to_path_buf(), &["vol"], size, 2, vec![]);
    assert_eq!(nbdinfo_map(&srv.uri("vol")), want, "from chunks");
    srv.stop().unwrap();
}

/// A parent `p` with data at [0, 1M) and [4M, 5M), snapshot `p@s` and its
/// clone `c` with a trim, a write and zeroes of its own; serves `c`.
/// Returns the server and `c`'s image.
fn serve_clone(root: PathBuf, size: u64) -> (TestServer, Vec<u8>) {
    let parent = vec![
        Edit::Write(0, pattern(MIB as usize, 1)),
        Edit::Write(4 * MIB, pattern(MIB as usize, 2)),
    ];
    let own = vec![
        Edit::Trim(4 * MIB, 512 * K),
        Edit::Write(10 * MIB, pattern(MIB as usize, 3)),
        Edit::Zero(0, 64 * K),
    ];
    let want = image(size, &[parent.clone(), own.clone()].concat());
    let srv = TestServer::start_with(move || async move {
        let store: DynStore = Arc::new(FsStore::new(root.join("store")));
        let clock: DynClock = Arc::new(SystemClock);
        let cfg = EngineConfig::default();
        let data_dir = root.join("data");
        let snaps = Snapshots::new(
            store.clone(),
            cfg.clone(),
            data_dir.clone(),
            clock.clone(),
            "block-status-test",
        );
        let catalog = Catalog::new(store.clone());
        let open = |name: &'static str| {
            let (store, clock, catalog, cfg) =
                (store.clone(), clock.clone(), catalog.clone(), cfg.clone());
            let data_dir = data_dir.clone();
            async move {
                let rec = catalog.get(name).await.unwrap();
                let (lease, params) =
                    attach::lease_for(&store, &clock, &data_dir, &rec, "block-status-test").await;
                let vol = Volume::open(store, params, cfg, clock).await.unwrap();
                (vol, lease)
            }
        };
        catalog.create("p", size, false, 0).await.unwrap();
        let (p, lease) = open("p").await;
        apply(p.as_ref(), &parent).await;
        p.close().await.unwrap();
        lease.release().await.unwrap();
        snaps.create("p@s", 0).await.unwrap();
        snaps.clone_volume("p@s", "c", 0).await.unwrap();
        let (c, lease) = open("c").await;
        assert!(c.parent().is_some());
        apply(c.as_ref(), &own).await;
        let exports = ExportMap::new([("c".to_string(), c.clone() as Arc<dyn BlockDevice>)]);
        let cleanup: Cleanup = Box::new(move || {
            Box::pin(async move {
                c.close().await.unwrap();
                lease.release().await.unwrap();
            })
        });
        (exports.unwrap(), cleanup)
    });
    (srv, want)
}

#[test]
fn nbdinfo_map_of_a_clone_shows_inherited_data_as_allocated() {
    if !have_tool("nbdinfo", &["--version"]) || !have_tool("nbdcopy", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let (srv, want) = serve_clone(dir.path().to_path_buf(), size);
    let uri = srv.uri("c");
    assert_eq!(
        nbdinfo_map(&uri),
        [
            (0, 64 * K, HOLE),
            (64 * K, MIB - 64 * K, 0),
            (MIB, 3 * MIB + 512 * K, HOLE),
            (4 * MIB + 512 * K, 512 * K, 0),
            (5 * MIB, 5 * MIB, HOLE),
            (10 * MIB, MIB, 0),
            (11 * MIB, 5 * MIB, HOLE),
        ]
    );
    // The holes really read as zeros: a copy that skips them is exact.
    let out = dir.path().join("c.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    assert!(file_bytes(&out) == want, "nbdcopy of the clone differs");
    srv.stop().unwrap();
}

/// 1 MiB of data in 16 pieces scattered over 64 MiB, plus a trimmed
/// piece and an all-zero write (both holes).
fn sparse_edits(size: u64) -> Vec<Edit> {
    let mut edits = Vec::new();
    for i in 0..16u64 {
        let off = i * (size / 16) + (i * 7 % 50) * 4 * K;
        edits.push(Edit::Write(off, pattern(64 * K as usize, 10 + i)));
    }
    edits.push(Edit::Trim(size / 16 + 32 * K, 16 * K));
    edits.push(Edit::Write(size / 2 + MIB, vec![0u8; 256 * K as usize]));
    edits
}

#[test]
fn nbdcopy_and_qemu_img_convert_copy_a_sparse_volume_reading_only_its_data() {
    if !have_tool("nbdcopy", &["--version"]) || !have_tool("qemu-img", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let edits = sparse_edits(size);
    let want = image(size, &edits);
    let (srv, read) = serve(dir.path().to_path_buf(), &["vol"], size, 1, edits);
    let data_bytes = 16 * 64 * K - 16 * K;

    let out = dir.path().join("nbdcopy.raw");
    run_ok(Command::new("nbdcopy").arg(srv.uri("vol")).arg(&out));
    assert!(file_bytes(&out) == want, "nbdcopy copy differs");
    // nbdcopy reads whole requests (256 KiB) that hold any data; without
    // block status it would read all 64 MiB.
    let n = read.swap(0, Ordering::Relaxed);
    assert!(
        (data_bytes..size / 8).contains(&n),
        "nbdcopy read {n} bytes of a {size}-byte volume holding {data_bytes}"
    );

    let out = dir.path().join("qemu-img.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(srv.uri("vol"))
            .arg(&out),
    );
    assert!(file_bytes(&out) == want, "qemu-img convert copy differs");
    let n = read.swap(0, Ordering::Relaxed);
    assert!(
        (data_bytes..size / 8).contains(&n),
        "qemu-img read {n} bytes of a {size}-byte volume holding {data_bytes}"
    );
    srv.stop().unwrap();
}

// ---- raw protocol -------------------------------------------------------

const SIZE: u64 = MIB;

fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    MetaContextRequest {
        name: export.as_bytes().to_vec(),
        queries: queries.iter().map(|q| q.as_bytes().to_vec()).collect(),
    }
    .encode()
}

async fn structured(c: &mut RawClient) {
    c.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(
        c.option_reply().await,
        (OPT_STRUCTURED_REPLY, REP_ACK, vec![])
    );
}

/// Send a metadata context option with raw `data`: the contexts `(id,
/// name)` it lists or selects, or the error reply type.
async fn meta(c: &mut RawClient, option: u32, data: &[u8]) -> Result<Vec<(u32, String)>, u32> {
    c.send_option(option, data).await;
    let mut contexts = Vec::new();
    loop {
        let (opt, kind, data) = c.option_reply().await;
        assert_eq!(opt, option);
        match kind {
            REP_ACK => return Ok(contexts),
            REP_META_CONTEXT => contexts.push((
                u32::from_be_bytes(data[0..4].try_into().unwrap()),
                String::from_utf8(data[4..].to_vec()).unwrap(),
            )),
            err => {
                assert!(err & REP_FLAG_ERROR != 0, "reply {err:#x}");
                return Err(err);
            }
        }
    }
}

/// `NBD_OPT_GO` to `export`; returns the transmission flags.
async fn go(c: &mut RawClient, export: &str) -> u16 {
    let data = InfoRequest {
        name: export.as_bytes().to_vec(),
        requests: vec![INFO_BLOCK_SIZE],
    }
    .encode();
    c.send_option(OPT_GO, &data).await;
    let mut flags = None;
    loop {
        let (_, kind, data) = c.option_reply().await;
        match kind {
            REP_INFO if data[0..2] == INFO_EXPORT.to_be_bytes() => {
                assert_eq!(&data[2..10], &SIZE.to_be_bytes());
                flags = Some(u16::from_be_bytes([data[10], data[11]]));
            }
            REP_INFO => {}
            REP_ACK => return flags.expect("no NBD_INFO_EXPORT"),
            other => panic!("GO failed with {other:#x}"),
        }
    }
}

/// A connection to `export` with structured replies and `base:allocation`
/// selected; returns it with the context id.
async fn allocation_client(addr: &str, export: &str) -> (RawClient, u32) {
    let mut c = RawClient::greet(addr, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    structured(&mut c).await;
    let ctx = meta(
        &mut c,
        OPT_SET_META_CONTEXT,
        &meta_data(export, &["base:allocation"]),
    )
    .await
    .unwrap();
    assert_eq!(ctx.len(), 1);
    assert_eq!(go(&mut c, export).await & TFLAG_SEND_DF, TFLAG_SEND_DF);
    (c, ctx[0].0)
}

/// A final chunk of `kind` for `handle`: its payload.
fn final_chunk(reply: AnyReply, handle: u64, kind: u16) -> Vec<u8> {
    match reply {
        AnyReply::Chunk(h, payload) => {
            assert_eq!((h.handle, h.flags, h.kind), (handle, REPLY_FLAG_DONE, kind));
            payload
        }
        other => panic!("expected a structured chunk, got {other:?}"),
    }
}

/// A block status request: `Ok((context, descriptors))` or the error.
async fn block_status(
    c: &mut RawClient,
    handle: u64,
    flags: u16,
    offset: u64,
    len: u32,
) -> Result<(u32, Vec<(u32, u32)>), u32> {
    c.send(CMD_BLOCK_STATUS, flags, handle, offset, len).await;
    match c.any_reply().await {
        AnyReply::Simple { error, handle: h } => {
            assert_eq!(h, handle);
            assert_ne!(error, 0, "a successful block status needs a chunk");
            Err(error)
        }
        AnyReply::Chunk(h, payload) if h.kind == REPLY_TYPE_ERROR => {
            assert_eq!((h.handle, h.flags), (handle, REPLY_FLAG_DONE));
            let (error, msg) = decode_error(&payload).unwrap();
            assert!(!msg.is_empty(), "errors carry a message");
            Err(error)
        }
        reply => {
            Ok(decode_block_status(&final_chunk(reply, handle, REPLY_TYPE_BLOCK_STATUS)).unwrap())
        }
    }
}

/// A structured read: `Ok(data)` or the error.
async fn read(
    c: &mut RawClient,
    handle: u64,
    flags: u16,
    offset: u64,
    len: u32,
) -> Result<Vec<u8>, u32> {
    c.send(CMD_READ, flags, handle, offset, len).await;
    match c.any_reply().await {
        AnyReply::Chunk(h, payload) if h.kind == REPLY_TYPE_ERROR => {
            assert_eq!((h.handle, h.flags), (handle, REPLY_FLAG_DONE));
            Err(decode_error(&payload).unwrap().0)
        }
        AnyReply::Chunk(h, _) if h.kind == REPLY_TYPE_NONE => {
            assert_eq!((h.handle, h.flags), (handle, REPLY_FLAG_DONE));
            Ok(Vec::new())
        }
        reply => {
            let payload = final_chunk(reply, handle, REPLY_TYPE_OFFSET_DATA);
            assert_eq!(&payload[..8], &offset.to_be_bytes());
            Ok(payload[8..].to_vec())
        }
    }
}

fn serve_raw(root: PathBuf) -> TestServer {
    let edits = vec![Edit::Write(0, pattern(64 * K as usize, 5))];
    serve(root, &["a", "b"], SIZE, 1, edits).0
}

#[tokio::test]
async fn block_status_and_structured_reads_over_a_raw_socket() {
    let dir = tempfile::tempdir().unwrap();
    let srv = serve_raw(dir.path().to_path_buf());
    let (mut c, ctx) = allocation_client(&srv.addr(), "a").await;
    let ok = |d: Vec<(u32, u32)>| Ok((ctx, d));
    let data = 64 * K as u32;
    let rest = (SIZE - 64 * K) as u32;
    assert_eq!(
        block_status(&mut c, 1, 0, 0, SIZE as u32).await,
        ok(vec![(data, 0), (rest, HOLE)])
    );
    assert_eq!(
        block_status(&mut c, 2, 0, 32 * K, 1000).await,
        ok(vec![(1024, 0)]),
        "a length that is not a whole block is rounded up"
    );
    // REQ_ONE: one extent, never longer than the request.
    assert_eq!(
        block_status(&mut c, 3, CMD_FLAG_REQ_ONE, 0, SIZE as u32).await,
        ok(vec![(data, 0)])
    );
    assert_eq!(
        block_status(&mut c, 4, CMD_FLAG_REQ_ONE | CMD_FLAG_FUA, 32 * K, 1000).await,
        ok(vec![(512, 0)])
    );
    assert_eq!(
        block_status(&mut c, 5, CMD_FLAG_REQ_ONE, 64 * K, 4096).await,
        ok(vec![(4096, HOLE)])
    );
    // Invalid requests get EINVAL error chunks; the connection stays up.
    for (handle, flags, offset, len) in [
        (10, 0, SIZE, 512),
        (11, 0, SIZE - 512, 1024),
        (12, 0, 100, 512),
        (13, 0, 0, 0),
        (14, 0, u64::MAX - 511, 1024),
        (15, CMD_FLAG_DF, 0, 512),
        (16, 1 << 9, 0, 512),
        (17, CMD_FLAG_REQ_ONE, 0, 100),
    ] {
        assert_eq!(
            block_status(&mut c, handle, flags, offset, len).await,
            Err(NBD_EINVAL),
            "handle {handle}"
        );
    }
    // Structured reads: one data chunk (also with DF), NONE for zero
    // bytes, error chunks for bad requests.
    let want = pattern(64 * K as usize, 5);
    assert_eq!(
        read(&mut c, 20, 0, 0, 8192).await,
        Ok(want[..8192].to_vec())
    );
    assert_eq!(
        read(&mut c, 21, CMD_FLAG_DF, 4096, 4096).await,
        Ok(want[4096..8192].to_vec())
    );
    assert_eq!(read(&mut c, 22, 0, 4096, 0).await, Ok(vec![]));
    assert_eq!(read(&mut c, 23, 0, SIZE, 512).await, Err(NBD_EINVAL));
    assert_eq!(
        read(&mut c, 24, 0, 0, MAX_PAYLOAD + 512).await,
        Err(NBD_EINVAL)
    );
    assert_eq!(
        read(&mut c, 25, CMD_FLAG_NO_HOLE, 0, 512).await,
        Err(NBD_EINVAL)
    );
    // Writes still get simple replies; their errors are error chunks.
    assert_eq!(c.write(30, 128 * K, &[9u8; 4096]).await, 0);
    c.send(CMD_WRITE, 0, 31, SIZE, 512).await;
    c.stream.write_all(&[9u8; 512]).await.unwrap();
    let payload = final_chunk(c.any_reply().await, 31, REPLY_TYPE_ERROR);
    assert_eq!(decode_error(&payload).unwrap().0, NBD_EINVAL);
    // Block status follows writes and trims.
    c.send(CMD_TRIM, 0, 32, 0, 32 * K as u32).await;
    assert_eq!(
        c.any_reply().await,
        AnyReply::Simple {
            error: 0,
            handle: 32
        }
    );
    assert_eq!(
        block_status(&mut c, 33, 0, 0, SIZE as u32).await,
        ok(vec![
            (32 * 1024, HOLE),
            (32 * 1024, 0),
            (64 * 1024, HOLE),
            (4096, 0),
            (rest - 64 * 1024 - 4096, HOLE)
        ])
    );
    c.send(CMD_DISC, 0, 34, 0, 0).await;
    assert!(c.closed_by_server().await);
    srv.stop().unwrap();
}

#[tokio::test]
async fn malformed_negotiation_gets_error_replies_and_block_status_einval() {
    let dir = tempfile::tempdir().unwrap();
    let srv = serve_raw(dir.path().to_path_buf());
    let addr = srv.addr();
    let base = (0, META_BASE_ALLOCATION.to_string());

    // Before structured replies: metadata options are invalid, and a plain
    // connection answers BLOCK_STATUS with a simple EINVAL reply.
    let mut c = RawClient::greet(&addr, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    for opt in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        let data = meta_data("a", &["base:allocation"]);
        assert_eq!(meta(&mut c, opt, &data).await, Err(REP_ERR_INVALID));
    }
    assert_eq!(
        go(&mut c, "a").await & TFLAG_SEND_DF,
        0,
        "no DF without structured replies"
    );
    assert_eq!(block_status(&mut c, 1, 0, 0, 4096).await, Err(NBD_EINVAL));
    let (err, data) = c.read(2, 0, 512).await;
    assert_eq!((err, &data[..]), (0, &pattern(512, 5)[..]));

    // Malformed and unknown: each an error reply, negotiation goes on.
    let mut c = RawClient::greet(&addr, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    c.send_option(OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(c.option_reply().await.1, REP_ERR_INVALID);
    structured(&mut c).await;
    let good = meta_data("a", &["base:allocation"]);
    let not_utf8 = MetaContextRequest {
        name: b"a".to_vec(),
        queries: vec![vec![0xff, b':', b'x']],
    }
    .encode();
    let mut too_long = good.clone();
    too_long.push(0);
    let mut huge_count = meta_data("a", &[]);
    let n = huge_count.len();
    huge_count[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
    for opt in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        for bad in [
            &good[..good.len() - 1],
            &too_long[..],
            &huge_count[..],
            &[0, 0, 0, 1][..],
            &meta_data("a", &["nocolon"])[..],
            &meta_data("a", &[":allocation"])[..],
            &meta_data("a", &["base:allocation", "nocolon"])[..],
            &not_utf8[..],
        ] {
            assert_eq!(
                meta(&mut c, opt, bad).await,
                Err(REP_ERR_INVALID),
                "{bad:?}"
            );
        }
        let unknown = meta_data("zzz", &["base:allocation"]);
        assert_eq!(meta(&mut c, opt, &unknown).await, Err(REP_ERR_UNKNOWN));
        // Other namespaces and unknown base: leaves select nothing.
        let other = meta_data("a", &["qemu:dirty-bitmap:x", "base:other", "x-y:z"]);
        assert_eq!(meta(&mut c, opt, &other).await, Ok(vec![]));
    }
    // Listing: no query or "base:" lists base:allocation (id 0).
    for q in [&[][..], &["base:"][..], &["base:allocation"][..]] {
        let data = meta_data("a", q);
        assert_eq!(
            meta(&mut c, OPT_LIST_META_CONTEXT, &data).await,
            Ok(vec![base.clone()])
        );
    }
    // Setting: "base:" and no query select nothing.
    for q in [&[][..], &["base:"][..]] {
        let data = meta_data("a", q);
        assert_eq!(meta(&mut c, OPT_SET_META_CONTEXT, &data).await, Ok(vec![]));
    }
    // A selection, then a failed SET: the failure clears it.
    let set = meta(&mut c, OPT_SET_META_CONTEXT, &good).await.unwrap();
    assert_eq!(set.len(), 1);
    assert_ne!(set[0].0, 0);
    assert_eq!(set[0].1, META_BASE_ALLOCATION);
    assert_eq!(
        meta(&mut c, OPT_SET_META_CONTEXT, &too_long).await,
        Err(REP_ERR_INVALID)
    );
    assert_eq!(go(&mut c, "a").await & TFLAG_SEND_DF, TFLAG_SEND_DF);
    assert_eq!(block_status(&mut c, 1, 0, 0, 4096).await, Err(NBD_EINVAL));
    assert_eq!(read(&mut c, 2, 0, 0, 512).await, Ok(pattern(512, 5)));

    // Selected for another export than the one chosen: no block status.
    let mut c = RawClient::greet(&addr, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
    structured(&mut c).await;
    let for_b = meta_data("b", &["base:allocation"]);
    assert_eq!(
        meta(&mut c, OPT_SET_META_CONTEXT, &for_b)
            .await
            .unwrap()
            .len(),
        1
    );
    go(&mut c, "a").await;
    assert_eq!(block_status(&mut c, 1, 0, 0, 4096).await, Err(NBD_EINVAL));
    assert_eq!(read(&mut c, 2, 0, 0, 512).await, Ok(pattern(512, 5)));

    // And the same export works on a fresh connection.
    let (mut c, ctx) = allocation_client(&addr, "b").await;
    assert_eq!(
        block_status(&mut c, 1, 0, 0, SIZE as u32).await,
        Ok((ctx, vec![(SIZE as u32, HOLE)]))
    );
    srv.stop().unwrap();
}
