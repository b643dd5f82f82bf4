//! The NBD server over real shale volumes (WAL + chunk objects on the local
//! directory store), driven by real clients; data is checked again after
//! the volume is closed and reopened, and after a crash (volume dropped
//! without close) following a flush.

mod nbd_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use nbd_support::*;
use shale::engine::BlockDevice;
use shale::frontend::nbd::protocol::CMD_WRITE;
use shale::frontend::nbd::ExportMap;
use tokio::io::AsyncWriteExt;

const MIB: u64 = 1 << 20;

/// Serve volumes `(name, id, size)` from `root` at `epoch`. With `crash`,
/// the volumes are dropped without `close` after the server stops.
fn serve_volumes(
    root: PathBuf,
    vols: Vec<(&'static str, u64, u64)>,
    epoch: u64,
    crash: bool,
) -> TestServer {
    TestServer::start_with(move || async move {
        let mut opened = Vec::new();
        for (name, id, size) in vols {
            opened.push((name.to_string(), open_volume(&root, id, size, epoch).await));
        }
        let exports = ExportMap::new(
            opened
                .iter()
                .map(|(n, v)| (n.clone(), v.clone() as Arc<dyn BlockDevice>)),
        )
        .unwrap();
        let cleanup: Cleanup = Box::new(move || {
            Box::pin(async move {
                for (name, v) in opened {
                    if !crash {
                        v.close()
                            .await
                            .unwrap_or_else(|e| panic!("close {name}: {e}"));
                    }
                }
            })
        });
        (exports, cleanup)
    })
}

/// Reopen a volume on a fresh runtime and read it whole.
fn read_back(root: &Path, id: u64, size: u64, epoch: u64) -> Vec<u8> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let v = open_volume(root, id, size, epoch).await;
        let mut buf = vec![0u8; size as usize];
        v.read(0, &mut buf).await.unwrap();
        v.close().await.unwrap();
        buf
    })
}

#[test]
fn clients_on_a_real_volume_and_data_survives_close_and_reopen() {
    let have_img = have_tool("qemu-img", &["--version"]);
    let have_io = have_tool("qemu-io", &["--version"]);
    let have_fio = have_tool("fio", &["--enghelp=nbd"]);
    if !(have_img || have_io || have_fio) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let size = 32 * MIB;
    let srv = serve_volumes(
        root.clone(),
        vec![("img", 1, size), ("fio", 2, 64 * MIB)],
        1,
        false,
    );
    let mut expect = vec![0u8; size as usize];
    if have_img {
        let src = root.join("src.raw");
        expect = pattern(size as usize, 21);
        expect[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
        std::fs::write(&src, &expect).unwrap();
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                .arg(&src)
                .arg(srv.uri("img")),
        );
        let back = root.join("back.raw");
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(srv.uri("img"))
                .arg(&back),
        );
        run_ok(Command::new("cmp").arg(&src).arg(&back));
    }
    if have_io {
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "raw", &srv.uri("img")])
                .args([
                    "-c",
                    "write -P 0x3c 1M 256k",
                    "-c",
                    "discard 2M 128k",
                    "-c",
                    "write -z 3M 64k",
                    "-c",
                    "flush",
                    "-c",
                    "read -P 0x3c 1M 256k",
                    "-c",
                    "read -P 0 2M 128k",
                    "-c",
                    "read -P 0 3M 64k",
                ]),
        );
        expect[MIB as usize..(MIB + 256 * 1024) as usize].fill(0x3c);
        expect[(2 * MIB) as usize..(2 * MIB + 128 * 1024) as usize].fill(0);
        expect[(3 * MIB) as usize..(3 * MIB + 64 * 1024) as usize].fill(0);
    }
    if have_fio {
        let out = run_ok(
            Command::new("fio")
                .current_dir(&root)
                .args([
                    "--name=vol",
                    "--ioengine=nbd",
                    "--rw=randrw",
                    "--rwmixread=40",
                    "--bsrange=4k-128k",
                    "--iodepth=16",
                    "--size=48M",
                    "--io_size=96M",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                ])
                .arg(format!("--uri={}", srv.uri("fio"))),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("err= 0"), "{text}");
    }
    srv.stop().unwrap();
    let got = read_back(&root, 1, size, 2);
    assert!(got == expect, "volume content after reopen differs");
}

#[test]
fn flushed_data_survives_a_crash_after_a_client_vanishes_mid_write() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let size = 8 * MIB;
    let srv = serve_volumes(root.clone(), vec![("v", 7, size)], 1, true);
    let flushed = pattern(256 << 10, 3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut c, got_size) = RawClient::connect(&srv.addr(), "v").await;
        assert_eq!(got_size, size);
        assert_eq!(c.write(1, MIB, &flushed).await, 0);
        assert_eq!(c.flush(2).await, 0);
        c.send(CMD_WRITE, 0, 3, MIB, 128 << 10).await;
        c.stream.write_all(&[0xff; 5000]).await.unwrap();
        // The connection drops here, mid-payload.
    });
    srv.stop().unwrap();
    // The volume was dropped without close: a crash after the last flush.
    let got = read_back(&root, 7, size, 2);
    assert!(got[MIB as usize..MIB as usize + flushed.len()] == flushed[..]);
    assert!(got[..MIB as usize].iter().all(|&b| b == 0));
}
