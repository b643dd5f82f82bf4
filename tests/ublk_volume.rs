//! The real volume engine driven the way a ublk queue thread drives it: on
//! a plain thread with the queue's executor, sleeping on the wake eventfd
//! (as the queue sleeps on its io_uring) while the engine's tokio runtime
//! completes the work on other threads. No kernel needed.

use std::sync::Arc;

use libublk::sys;
use shale::clock::SystemClock;
use shale::engine::config::EngineConfig;
use shale::engine::volume::{Volume, VolumeParams};
use shale::engine::BlockDevice;
use shale::frontend::ublk::executor::{QueueExecutor, WakeFd};
use shale::frontend::ublk::request::{handle, Descriptor};
use shale::store::memory::MemoryStore;

const SIZE: u64 = 64 << 20;

fn desc(op: u32, start_sector: u64, nr_sectors: u32) -> Descriptor {
    Descriptor {
        op_flags: op,
        nr_sectors,
        start_sector,
    }
}

/// Run `tasks` to completion on a queue executor, blocking on its eventfd.
fn run_like_a_queue(
    runtime: &tokio::runtime::Runtime,
    tasks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
) {
    let handle = runtime.handle().clone();
    std::thread::spawn(move || {
        let _guard = handle.enter();
        let fd = Arc::new(WakeFd::new().unwrap());
        let mut ex = QueueExecutor::new(fd.clone());
        for t in tasks {
            ex.spawn(t);
        }
        ex.run_until_stalled();
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
    })
    .join()
    .unwrap();
}

#[test]
fn volume_serves_concurrent_tags_from_a_queue_executor() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: shale::store::DynStore = Arc::new(MemoryStore::new());
    let params = VolumeParams {
        id: 1,
        size: SIZE,
        epoch: 1,
        local_dir: dir.path().join("vol"),
    };
    let volume = runtime
        .block_on(Volume::open(
            store.clone(),
            params.clone(),
            EngineConfig::default(),
            Arc::new(SystemClock),
        ))
        .unwrap();
    let dev: Arc<dyn BlockDevice> = volume.clone();

    // 32 "tags": each writes its own 64 KiB pattern (some FUA), flushes
    // (with the kernel's all-ones start sector), reads it back.
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> =
        Vec::new();
    for tag in 0..32u64 {
        let dev = dev.clone();
        let results = results.clone();
        tasks.push(Box::pin(async move {
            let sector = tag * 128 + 7; // unaligned to 4 KiB on purpose
            let mut buf = vec![tag as u8 + 1; 64 << 10];
            let fua = if tag % 3 == 0 { sys::UBLK_IO_F_FUA } else { 0 };
            let w = handle(
                &*dev,
                desc(sys::UBLK_IO_OP_WRITE | fua, sector, 128),
                &mut buf,
            )
            .await;
            let f = handle(&*dev, desc(sys::UBLK_IO_OP_FLUSH, u64::MAX, 0), &mut buf).await;
            let mut out = vec![0u8; 64 << 10];
            let r = handle(&*dev, desc(sys::UBLK_IO_OP_READ, sector, 128), &mut out).await;
            let same = out.iter().all(|&b| b == tag as u8 + 1);
            results.lock().unwrap().push((w, f, r, same));
        }));
    }
    run_like_a_queue(&runtime, tasks);
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 32);
    for (w, f, r, same) in results.iter() {
        assert_eq!((*w, *f, *r, *same), (65536, 0, 65536, true));
    }
    drop(results);

    // Discard and write-zeroes through the same path read back as zeros;
    // a request past the end is refused with EINVAL.
    let dev2 = dev.clone();
    let checks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let c = checks.clone();
    run_like_a_queue(
        &runtime,
        vec![Box::pin(async move {
            let mut buf = vec![0u8; 64 << 10];
            let mut got = Vec::new();
            got.push(handle(&*dev2, desc(sys::UBLK_IO_OP_DISCARD, 7, 128), &mut buf).await);
            got.push(
                handle(
                    &*dev2,
                    desc(sys::UBLK_IO_OP_WRITE_ZEROES, 135, 64),
                    &mut buf,
                )
                .await,
            );
            got.push(handle(&*dev2, desc(sys::UBLK_IO_OP_READ, 7, 128), &mut buf).await);
            got.push(i32::from(buf.iter().all(|&b| b == 0)));
            got.push(handle(&*dev2, desc(sys::UBLK_IO_OP_READ, 135, 128), &mut buf).await);
            got.push(i32::from(
                buf[..32 << 10].iter().all(|&b| b == 0) && buf[32 << 10..].iter().all(|&b| b == 2),
            ));
            let last = SIZE / 512 - 1;
            got.push(handle(&*dev2, desc(sys::UBLK_IO_OP_WRITE, last, 2), &mut buf).await);
            *c.lock().unwrap() = got;
        })],
    );
    assert_eq!(
        *checks.lock().unwrap(),
        vec![0, 0, 65536, 1, 65536, 1, -libc::EINVAL]
    );

    // Everything acknowledged after a flush is there after close + reopen.
    runtime.block_on(volume.close()).unwrap();
    let reopened = runtime
        .block_on(Volume::open(
            store,
            VolumeParams { epoch: 2, ..params },
            EngineConfig::default(),
            Arc::new(SystemClock),
        ))
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    runtime
        .block_on(reopened.read((31 * 128 + 7) * 512, &mut buf))
        .unwrap();
    assert!(buf.iter().all(|&b| b == 32));
    runtime.block_on(reopened.close()).unwrap();
}
