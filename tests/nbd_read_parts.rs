//! Read replies sent from parts ([`BlockDevice::read_parts`]): a device
//! that answers a read as many runs of the lent buffer and shared bytes
//! (more than one vectored write takes) yields exactly the device's bytes
//! to a raw client (simple and structured replies) and to nbdcopy, and
//! none of the lent buffer's bytes outside the runs it names.

mod nbd_support;

use std::process::Command;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use nbd_support::*;
use shale::engine::memdisk::MemDisk;
use shale::engine::{BlockDevice, ReadParts};
use shale::error::BlockError;
use shale::frontend::nbd::codec::InfoRequest;
use shale::frontend::nbd::protocol::*;
use shale::frontend::nbd::ExportMap;

const MIB: u64 = 1 << 20;

/// Bytes the lent buffer holds where the device shares bytes instead: a
/// reply showing them sent the wrong run.
const STALE: u8 = 0xee;

/// A RAM disk whose reads come back in parts of varying lengths (odd
/// ones too), every other one shared, the rest copied into the lent
/// buffer.
struct Scattered {
    inner: MemDisk,
}

#[async_trait]
impl BlockDevice for Scattered {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.inner.read(offset, buf).await
    }
    async fn read_parts(&self, offset: u64, mut buf: Vec<u8>) -> Result<ReadParts, BlockError> {
        let mut data = vec![0u8; buf.len()];
        self.inner.read(offset, &mut data).await?;
        let lens = [512usize, 1, 1535, 4096, 7, 2048, 999];
        let mut shared = Vec::new();
        let (mut at, mut i) = (0, 0);
        while at < data.len() {
            let n = lens[i % lens.len()].min(data.len() - at);
            if i % 2 == 0 {
                shared.push((at, Bytes::copy_from_slice(&data[at..at + n])));
                buf[at..at + n].fill(STALE);
            } else {
                buf[at..at + n].copy_from_slice(&data[at..at + n]);
            }
            at += n;
            i += 1;
        }
        Ok(ReadParts::with_shared(buf, shared).expect("parts in order"))
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len, fua).await
    }
}

/// A server exporting `Scattered` as "s", holding `data`.
fn serve(data: &[u8]) -> TestServer {
    let disk = Scattered {
        inner: MemDisk::new(data.len() as u64),
    };
    futures::executor::block_on(disk.inner.write(0, data, false)).unwrap();
    let exports = ExportMap::new([("s".to_string(), Arc::new(disk) as Arc<dyn BlockDevice>)]);
    TestServer::start(exports.unwrap())
}

#[test]
fn simple_and_structured_read_replies_carry_every_part() {
    let size = 8 * MIB;
    let data = pattern(size as usize, 5);
    let srv = serve(&data);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Simple replies: a small read, and 4 MiB in about 2000 parts
        // (more than one vectored write passes).
        let (mut c, got_size) = RawClient::connect(&srv.addr(), "s").await;
        assert_eq!(got_size, size);
        for (handle, (at, len)) in [(4096u64, 8192u32), (MIB, 4 << 20), (0, 512)]
            .into_iter()
            .enumerate()
        {
            let (err, got) = c.read(handle as u64, at, len).await;
            assert_eq!(err, 0);
            assert!(
                got == data[at as usize..][..len as usize],
                "simple reply of {len} bytes at {at} differs"
            );
        }
        // Structured replies: one OFFSET_DATA chunk with the same bytes.
        let mut c = RawClient::greet(&srv.addr(), CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
        c.send_option(OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(
            c.option_reply().await,
            (OPT_STRUCTURED_REPLY, REP_ACK, vec![])
        );
        c.send_option(OPT_GO, &go_data("s")).await;
        loop {
            let (_, kind, _) = c.option_reply().await;
            match kind {
                REP_INFO => {}
                REP_ACK => break,
                other => panic!("GO failed with {other:#x}"),
            }
        }
        let (at, len) = (3 * MIB + 512, (2 << 20) + 1024);
        c.send(CMD_READ, 0, 77, at, len).await;
        match c.any_reply().await {
            AnyReply::Chunk(h, payload) => {
                assert_eq!(h.handle, 77);
                assert_eq!(h.kind, REPLY_TYPE_OFFSET_DATA);
                assert_eq!(h.flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
                assert_eq!(&payload[..8], &at.to_be_bytes());
                assert!(
                    payload[8..] == data[at as usize..][..len as usize],
                    "structured reply differs"
                );
            }
            other => panic!("expected an OFFSET_DATA chunk, got {other:?}"),
        }
    });
    srv.stop().unwrap();
}

/// `NBD_OPT_GO` data for `export`.
fn go_data(export: &str) -> Vec<u8> {
    InfoRequest {
        name: export.as_bytes().to_vec(),
        requests: vec![INFO_BLOCK_SIZE],
    }
    .encode()
}

#[test]
fn nbdcopy_reads_the_device_bytes_from_parts() {
    if !have_tool("nbdcopy", &["--version"]) {
        return;
    }
    let size = 16 * MIB;
    let data = pattern(size as usize, 9);
    let srv = serve(&data);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=2")
            .arg(srv.uri("s"))
            .arg(&out),
    );
    assert!(file_bytes(&out) == data, "nbdcopy read other bytes");
    srv.stop().unwrap();
}
