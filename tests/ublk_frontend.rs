//! ublk frontend tests that need no kernel: request decoding and execution,
//! device parameters, the queue executor's wake bridge, run-state records.
//! The kernel path itself runs in the VM test (tools/vm/run.sh).

use std::sync::Arc;

#[path = "support/hooked_device.rs"]
mod hooked_device;
use hooked_device::{DeviceHook, DeviceOp, HookedDevice};

use libublk::sys;
use shale::engine::memdisk::MemDisk;
use shale::engine::BlockDevice;
use shale::error::BlockError;
use shale::frontend::ublk::params::{device_params, ParamError, MAX_DISCARD_SECTORS};
use shale::frontend::ublk::request::{decode, handle, result_code, Descriptor, Request};
use shale::frontend::ublk::runstate::{
    check_volume_name, create_link, remove_link, DeviceRecord, RunDir,
};
use shale::frontend::ublk::server::{ctrl_flags, state_name, ServerOptions};

const MIB: u64 = 1 << 20;

fn desc(op: u32, start_sector: u64, nr_sectors: u32) -> Descriptor {
    Descriptor {
        op_flags: op,
        nr_sectors,
        start_sector,
    }
}

#[test]
fn flush_is_never_bounds_checked() {
    // The kernel sends FLUSH with start_sector all ones.
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_FLUSH, u64::MAX, 0), MIB, 4096),
        Ok(Request::Flush)
    );
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_FLUSH, u64::MAX, u32::MAX), 0, 0),
        Ok(Request::Flush)
    );
    let disk = MemDisk::new(MIB);
    let mut buf = vec![0u8; 4096];
    let res = futures::executor::block_on(handle(
        &disk,
        desc(sys::UBLK_IO_OP_FLUSH, u64::MAX, 0),
        &mut buf,
    ));
    assert_eq!(res, 0);
}

#[test]
fn ops_decode_with_fua() {
    let fua = sys::UBLK_IO_F_FUA;
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_READ, 8, 16), MIB, 65536),
        Ok(Request::Read {
            offset: 4096,
            len: 8192
        })
    );
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_WRITE | fua, 0, 1), MIB, 65536),
        Ok(Request::Write {
            offset: 0,
            len: 512,
            fua: true
        })
    );
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_WRITE, 0, 1), MIB, 65536),
        Ok(Request::Write {
            offset: 0,
            len: 512,
            fua: false
        })
    );
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_DISCARD, 2040, 8), MIB, 0),
        Ok(Request::Discard {
            offset: 2040 * 512,
            len: 4096
        })
    );
    assert_eq!(
        decode(desc(sys::UBLK_IO_OP_WRITE_ZEROES | fua, 0, 2048), MIB, 0),
        Ok(Request::WriteZeroes {
            offset: 0,
            len: MIB,
            fua: true
        })
    );
}

#[test]
fn bad_requests_are_refused() {
    // Past the end.
    assert!(matches!(
        decode(desc(sys::UBLK_IO_OP_READ, 2047, 2), MIB, 65536),
        Err(BlockError::OutOfRange { .. })
    ));
    // Sector number whose byte offset overflows.
    assert!(matches!(
        decode(desc(sys::UBLK_IO_OP_WRITE, u64::MAX / 256, 1), MIB, 65536),
        Err(BlockError::OutOfRange { .. })
    ));
    // Discard past the end.
    assert!(matches!(
        decode(desc(sys::UBLK_IO_OP_DISCARD, 2040, 16), MIB, 65536),
        Err(BlockError::OutOfRange { .. })
    ));
    // Larger than the tag's buffer.
    assert!(matches!(
        decode(desc(sys::UBLK_IO_OP_READ, 0, 256), MIB, 65536),
        Err(BlockError::InvalidArgument(_))
    ));
    // Unknown and zoned ops.
    for op in [
        sys::UBLK_IO_OP_WRITE_SAME,
        sys::UBLK_IO_OP_ZONE_APPEND,
        0x7f,
    ] {
        assert!(matches!(
            decode(desc(op, 0, 1), MIB, 65536),
            Err(BlockError::InvalidArgument(_))
        ));
    }
}

#[test]
fn handle_runs_requests_and_maps_errors() {
    futures::executor::block_on(async {
        let disk = MemDisk::new(MIB);
        let mut buf = vec![0xabu8; 65536];
        assert_eq!(
            handle(&disk, desc(sys::UBLK_IO_OP_WRITE, 16, 8), &mut buf).await,
            4096
        );
        let mut out = vec![0u8; 65536];
        assert_eq!(
            handle(&disk, desc(sys::UBLK_IO_OP_READ, 16, 8), &mut out).await,
            4096
        );
        assert!(out[..4096].iter().all(|&b| b == 0xab));
        assert_eq!(
            handle(&disk, desc(sys::UBLK_IO_OP_WRITE_ZEROES, 16, 4), &mut buf).await,
            0
        );
        assert_eq!(
            handle(&disk, desc(sys::UBLK_IO_OP_READ, 16, 8), &mut out).await,
            4096
        );
        assert!(out[..2048].iter().all(|&b| b == 0));
        assert!(out[2048..4096].iter().all(|&b| b == 0xab));
        assert_eq!(
            handle(&disk, desc(sys::UBLK_IO_OP_DISCARD, 20, 4), &mut buf).await,
            0
        );
        // Failed requests answer -errno and leave data alone.
        let before = disk.snapshot();
        assert_eq!(
            handle(&disk, desc(sys::UBLK_IO_OP_WRITE, 2047, 8), &mut buf).await,
            -libc::EINVAL
        );
        assert_eq!(disk.snapshot(), before);
    });
}

#[test]
fn engine_errors_become_negative_errno() {
    assert_eq!(result_code(Ok(4096)), 4096);
    assert_eq!(result_code(Err(BlockError::NoSpace)), -libc::ENOSPC);
    assert_eq!(result_code(Err(BlockError::ReadOnly)), -libc::EROFS);
    assert_eq!(result_code(Err(BlockError::Io("crc".into()))), -libc::EIO);
    assert_eq!(result_code(Err(BlockError::Closed)), -libc::EIO);
}

#[test]
fn device_params_announce_cache_fua_and_discard() {
    let p = device_params(256 * MIB, 512 << 10).unwrap();
    assert_eq!(
        p.types,
        sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
    );
    assert_eq!(p.basic.logical_bs_shift, 9);
    assert_eq!(p.basic.physical_bs_shift, 12);
    assert_ne!(p.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE, 0);
    assert_ne!(p.basic.attrs & sys::UBLK_ATTR_FUA, 0);
    assert_eq!(p.basic.attrs & sys::UBLK_ATTR_READ_ONLY, 0);
    assert_eq!(p.basic.dev_sectors, 256 * MIB / 512);
    assert_eq!(p.basic.max_sectors, 1024);
    assert_eq!(p.discard.discard_granularity, 4096);
    assert_eq!(p.discard.max_discard_sectors, MAX_DISCARD_SECTORS);
    assert_eq!(p.discard.max_write_zeroes_sectors, MAX_DISCARD_SECTORS);
    assert_eq!(p.discard.max_discard_segments, 1);
}

#[test]
fn device_params_reject_bad_sizes() {
    assert_eq!(device_params(0, 4096).err(), Some(ParamError::BadSize(0)));
    assert_eq!(
        device_params(1000, 4096).err(),
        Some(ParamError::BadSize(1000))
    );
    assert_eq!(device_params(MIB, 0).err(), Some(ParamError::BadBuffer(0)));
    assert_eq!(
        device_params(MIB, 1000).err(),
        Some(ParamError::BadBuffer(1000))
    );
}

#[test]
fn recovery_flags_follow_driver_features() {
    let rec = u64::from(sys::UBLK_F_USER_RECOVERY);
    let reissue = u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
    assert_eq!(ctrl_flags(None), rec);
    assert_eq!(ctrl_flags(Some(0)), rec);
    assert_eq!(ctrl_flags(Some(0x1fe)), rec | reissue);
    assert_eq!(state_name(sys::UBLK_S_DEV_QUIESCED as u16), "quiesced");
    assert_eq!(state_name(sys::UBLK_S_DEV_LIVE as u16), "live");
    assert_eq!(state_name(99), "unknown");
}

#[test]
fn server_options_are_validated() {
    let ok = ServerOptions {
        volume: "v".into(),
        queues: 2,
        depth: 64,
        io_buf_bytes: 512 << 10,
    };
    assert!(ok.validate().is_ok());
    for bad in [
        ServerOptions {
            queues: 0,
            ..ok.clone()
        },
        ServerOptions {
            depth: 0,
            ..ok.clone()
        },
        ServerOptions {
            depth: 60000,
            ..ok.clone()
        },
        ServerOptions {
            io_buf_bytes: 1000,
            ..ok.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?} must be refused");
    }
}

#[test]
fn volume_names_are_safe_file_names() {
    for good in ["vol1", "a.b_c-d", "X"] {
        assert!(check_volume_name(good).is_ok(), "{good}");
    }
    let long = "a".repeat(129);
    for bad in ["", ".hidden", "a/b", "..", "sp ace", "é", long.as_str()] {
        assert!(check_volume_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn run_records_round_trip_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path().join("run"));
    assert_eq!(run.read("vol1").unwrap(), None);
    assert!(run.list(|e| panic!("{e}")).is_empty());
    let rec = |volume: &str, dev_id| DeviceRecord {
        volume: volume.into(),
        dev_id,
        pid: 1234,
        queues: 1,
        depth: 64,
        backing: vec!["--memory".into(), "1048576".into()],
    };
    run.write(&rec("vol1", 3)).unwrap();
    run.write(&rec("vol0", 1)).unwrap();
    assert_eq!(run.read("vol1").unwrap(), Some(rec("vol1", 3)));
    let listed: Vec<u32> = run
        .list(|e| panic!("{e}"))
        .iter()
        .map(|r| r.dev_id)
        .collect();
    assert_eq!(listed, vec![1, 3]);
    assert_eq!(run.find_by_dev_id(3).map(|r| r.volume), Some("vol1".into()));
    assert!(run.find_by_dev_id(7).is_none());
    // A corrupt record is reported, not fatal, and not listed.
    std::fs::write(dir.path().join("run/bad.json"), b"{not json").unwrap();
    let mut bad = 0;
    assert_eq!(run.list(|_| bad += 1).len(), 2);
    assert_eq!(bad, 1);
    assert!(run.read("bad").is_err());
    run.remove("vol1").unwrap();
    run.remove("vol1").unwrap();
    assert_eq!(run.read("vol1").unwrap(), None);
    assert!(run.write(&rec("../escape", 1)).is_err());
}

#[test]
fn device_links_point_at_the_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let links = dir.path().join("shale");
    let link = create_link(&links, "vol1", 4).unwrap();
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        std::path::PathBuf::from("/dev/ublkb4")
    );
    // Replaced atomically when the volume moves to another device.
    create_link(&links, "vol1", 5).unwrap();
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        std::path::PathBuf::from("/dev/ublkb5")
    );
    // A stale remover (old device id) leaves the new link alone.
    remove_link(&links, "vol1", 4).unwrap();
    assert!(link.symlink_metadata().is_ok());
    remove_link(&links, "vol1", 5).unwrap();
    assert!(link.symlink_metadata().is_err());
    remove_link(&links, "vol1", 5).unwrap();
}

/// Makes reads complete on another thread, like the volume engine's
/// object-store side.
struct ReadsWokenElsewhere;

#[async_trait::async_trait]
impl DeviceHook for ReadsWokenElsewhere {
    async fn before(&self, op: DeviceOp) -> Result<(), BlockError> {
        if let DeviceOp::Read { .. } = op {
            let (tx, rx) = futures::channel::oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(());
            });
            rx.await.map_err(|_| BlockError::Closed)?;
        }
        Ok(())
    }
}

#[test]
fn engine_future_woken_from_another_thread_reaches_the_queue_executor() {
    use shale::frontend::ublk::executor::{QueueExecutor, WakeFd};
    let disk: Arc<dyn BlockDevice> = Arc::new(HookedDevice {
        inner: Arc::new(MemDisk::new(MIB)),
        hook: ReadsWokenElsewhere,
    });
    let fd = Arc::new(WakeFd::new().unwrap());
    let mut ex = QueueExecutor::new(fd.clone());
    let results = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    for tag in 0..4u64 {
        let disk = disk.clone();
        let results = results.clone();
        ex.spawn(async move {
            let mut buf = vec![0u8; 4096];
            let r = handle(&*disk, desc(sys::UBLK_IO_OP_READ, tag * 8, 8), &mut buf).await;
            results.borrow_mut().push(r);
        });
    }
    ex.run_until_stalled();
    // Block on the eventfd exactly as the queue's ring would: every
    // completion from the other thread must make it readable.
    while ex.live_tasks() > 0 {
        let mut pfd = libc::pollfd {
            fd: fd.raw(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        assert_eq!(n, 1);
        fd.drain();
        ex.run_until_stalled();
    }
    assert_eq!(*results.borrow(), vec![4096; 4]);
}

#[test]
fn kernel_path_needs_ublk_control() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        // On a host with ublk the control device must answer a feature
        // query; the full kernel path is covered by tools/vm/run.sh.
        assert!(libublk::ctrl::UblkCtrl::get_features().is_some());
        return;
    }
    println!(
        "SKIP: /dev/ublk-control missing (kernel without ublk_drv); the VM test tools/vm/run.sh covers the kernel path"
    );
}
