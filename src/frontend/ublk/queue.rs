//! One ublk queue: its thread, io_uring and per-tag tasks.
//!
//! Each tag runs a task that fetches a request, runs it against the
//! [`BlockDevice`] and commits the result together with fetching the next
//! one. Tasks are polled by a [`QueueExecutor`]; the thread blocks only in
//! `io_uring_enter`, and the queue's eventfd (polled on the same ring) wakes
//! it when an engine future is completed by another thread.
//!
//! Invariants:
//! 1. Nothing on this thread blocks except waiting for the ring.
//! 2. The loop ends only when every tag task has finished (the kernel
//!    aborted the queue), so no request is left unanswered by this thread.

use std::rc::Rc;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::{ublk_reap_io_events_with_update_queue, ublk_wake_task};
use libublk::{BufDesc, UblkError, UblkUringData};

use super::executor::{QueueExecutor, WakeFd};
use super::request::{handle, Descriptor};
use crate::engine::BlockDevice;

/// user_data of the eventfd poll. Its slab-key bits (16..48) are all ones, a
/// key libublk's slab never hands out, and it carries the target-I/O bit so
/// it is not counted as a ublk command.
const WAKE_POLL_TOKEN: u64 = UblkUringData::Target as u64 | (0xffff_ffff_u64 << 16) | 0xffff;

/// Body of a queue thread: serve queue `qid` of `dev` until it is aborted.
pub fn run_queue(
    qid: u16,
    dev: &UblkDev,
    device: Arc<dyn BlockDevice>,
    runtime: Option<tokio::runtime::Handle>,
) {
    // Engine futures may use tokio types; give them a runtime context.
    let _guard = runtime.as_ref().map(|h| h.enter());
    if let Err(e) = serve(qid, dev, device) {
        log::error!("ublk queue {qid} stopped with an error: {e}");
    }
}

fn serve(qid: u16, dev: &UblkDev, device: Arc<dyn BlockDevice>) -> Result<(), UblkError> {
    let queue = Rc::new(UblkQueue::new(qid, dev)?);
    let wake_fd = Arc::new(WakeFd::new()?);
    let mut executor = QueueExecutor::new(wake_fd.clone());
    for tag in queue.tags() {
        let q = queue.clone();
        let device = device.clone();
        executor.spawn(async move {
            match tag_task(&q, tag, &*device).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => log::error!("ublk queue {qid} tag {tag}: {e}"),
            }
        });
    }
    arm_wake_poll(&wake_fd)?;
    executor.run_until_stalled();
    while executor.live_tasks() > 0 {
        wait_for_completion()?;
        let mut rearm = false;
        ublk_reap_io_events_with_update_queue(&queue, false, None, |cqe| {
            if cqe.user_data() == WAKE_POLL_TOKEN {
                rearm = true;
            } else {
                ublk_wake_task(cqe.user_data(), cqe);
            }
        })?;
        if rearm {
            wake_fd.drain();
            arm_wake_poll(&wake_fd)?;
        }
        executor.run_until_stalled();
    }
    Ok(())
}

/// Submit queued SQEs and sleep until at least one completion arrives.
/// An interrupted wait is retried; a busy ring (completion queue full)
/// returns so the caller reaps completions first.
fn wait_for_completion() -> Result<(), UblkError> {
    loop {
        match libublk::io::with_task_io_ring_mut(|r| r.submit_and_wait(1)) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Queue a one-shot poll for the eventfd on this thread's ring.
fn arm_wake_poll(wake_fd: &WakeFd) -> Result<(), UblkError> {
    let sqe = opcode::PollAdd::new(types::Fd(wake_fd.raw()), libc::POLLIN as u32)
        .build()
        .user_data(WAKE_POLL_TOKEN);
    libublk::io::with_task_io_ring_mut(|r| push_sqe(r, &sqe))
}

fn push_sqe(
    ring: &mut io_uring::IoUring<squeue::Entry>,
    sqe: &squeue::Entry,
) -> Result<(), UblkError> {
    loop {
        // SAFETY: a poll SQE references no memory; the eventfd outlives the
        // ring's use of it (it is dropped after the queue loop ends).
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

async fn tag_task(q: &UblkQueue<'_>, tag: u16, device: &dyn BlockDevice) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let desc = Descriptor::from(q.get_iod(tag));
        let res = handle(device, desc, buf.as_mut_slice()).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}
