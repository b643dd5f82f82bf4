//! A single-thread executor for one ublk queue thread.
//!
//! libublk's queue thread sleeps in `io_uring_enter` and only wakes on a
//! completion of its own ring. Engine futures may be completed by other
//! threads (tokio workers, blocking pools). To wake the queue thread in that
//! case every task waker, when fired from a thread other than the owner,
//! writes to an eventfd that the queue's ring polls.
//!
//! Invariants:
//! 1. A task is polled only on the owner thread, inside [`QueueExecutor::run_until_stalled`].
//! 2. A wake from any thread puts the task on the ready list exactly once
//!    until it is polled again; a wake from a foreign thread also makes the
//!    eventfd readable, so a thread blocked on the ring returns.
//! 3. A task that finished is dropped and never polled again.

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::ThreadId;

/// Eventfd owned by one queue; readable after a cross-thread wake.
#[derive(Debug)]
pub struct WakeFd {
    fd: OwnedFd,
}

impl WakeFd {
    /// Create a non-blocking, close-on-exec eventfd.
    pub fn new() -> std::io::Result<WakeFd> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        Ok(WakeFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Raw descriptor, for registering a poll on an io_uring.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Make the eventfd readable (adds 1 to its counter).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid local u64 to an owned fd.
        // EAGAIN (counter saturated) still leaves it readable, so it is ignored.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast::<libc::c_void>(),
                8,
            )
        };
    }

    /// Reset the counter; returns how many signals were pending (0 if none).
    pub fn drain(&self) -> u64 {
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid local u64 from an owned fd.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast::<libc::c_void>(),
                8,
            )
        };
        if n == 8 {
            count
        } else {
            0
        }
    }
}

/// State shared between the executor and the wakers of its tasks.
struct Shared {
    ready: Mutex<VecDeque<usize>>,
    wake_fd: Arc<WakeFd>,
    owner: ThreadId,
}

struct TaskWaker {
    index: usize,
    queued: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        match self.shared.ready.lock() {
            Ok(mut q) => q.push_back(self.index),
            Err(poisoned) => poisoned.into_inner().push_back(self.index),
        }
        if std::thread::current().id() != self.shared.owner {
            self.shared.wake_fd.signal();
        }
    }
}

struct Task<'a> {
    future: Pin<Box<dyn Future<Output = ()> + 'a>>,
    waker: Arc<TaskWaker>,
}

/// Runs the futures of one queue thread; see the module docs.
pub struct QueueExecutor<'a> {
    tasks: Vec<Option<Task<'a>>>,
    shared: Arc<Shared>,
    live: usize,
}

impl<'a> QueueExecutor<'a> {
    /// An executor owned by the calling thread, signalling `wake_fd`.
    pub fn new(wake_fd: Arc<WakeFd>) -> QueueExecutor<'a> {
        QueueExecutor {
            tasks: Vec::new(),
            shared: Arc::new(Shared {
                ready: Mutex::new(VecDeque::new()),
                wake_fd,
                owner: std::thread::current().id(),
            }),
            live: 0,
        }
    }

    /// Add a task; it is polled on the next [`Self::run_until_stalled`].
    pub fn spawn(&mut self, future: impl Future<Output = ()> + 'a) {
        let index = self.tasks.len();
        let waker = Arc::new(TaskWaker {
            index,
            queued: AtomicBool::new(false),
            shared: self.shared.clone(),
        });
        self.tasks.push(Some(Task {
            future: Box::pin(future),
            waker: waker.clone(),
        }));
        self.live += 1;
        waker.wake_by_ref();
    }

    /// Number of tasks not finished yet.
    pub fn live_tasks(&self) -> usize {
        self.live
    }

    fn pop_ready(&self) -> Option<usize> {
        match self.shared.ready.lock() {
            Ok(mut q) => q.pop_front(),
            Err(poisoned) => poisoned.into_inner().pop_front(),
        }
    }

    /// Poll every ready task until none is ready. Returns how many polls ran.
    pub fn run_until_stalled(&mut self) -> usize {
        let mut polls = 0;
        while let Some(index) = self.pop_ready() {
            let Some(slot) = self.tasks.get_mut(index) else {
                continue;
            };
            let Some(task) = slot.as_mut() else {
                continue;
            };
            task.waker.queued.store(false, Ordering::Release);
            let waker = Waker::from(task.waker.clone());
            let mut cx = Context::from_waker(&waker);
            polls += 1;
            if let Poll::Ready(()) = task.future.as_mut().poll(&mut cx) {
                *slot = None;
                self.live -= 1;
            }
        }
        polls
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn runs_ready_tasks_and_drops_finished_ones() {
        let hits = std::cell::Cell::new(0);
        let fd = Arc::new(WakeFd::new().unwrap());
        let mut ex = QueueExecutor::new(fd.clone());
        for _ in 0..3 {
            ex.spawn(async { hits.set(hits.get() + 1) });
        }
        assert_eq!(ex.live_tasks(), 3);
        assert_eq!(ex.run_until_stalled(), 3);
        assert_eq!(hits.get(), 3);
        assert_eq!(ex.live_tasks(), 0);
        assert_eq!(ex.run_until_stalled(), 0);
        // Same-thread wakes never touch the eventfd.
        assert_eq!(fd.drain(), 0);
    }

    #[test]
    fn foreign_thread_wake_signals_the_eventfd() {
        let fd = Arc::new(WakeFd::new().unwrap());
        let mut ex = QueueExecutor::new(fd.clone());
        let (tx, rx) = futures::channel::oneshot::channel::<u32>();
        let got = std::rc::Rc::new(std::cell::Cell::new(0));
        let g = got.clone();
        ex.spawn(async move {
            g.set(rx.await.unwrap_or(0));
        });
        ex.run_until_stalled();
        assert_eq!(ex.live_tasks(), 1, "task waits for the channel");
        assert_eq!(fd.drain(), 0);

        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            tx.send(42).unwrap();
            done_tx.send(()).unwrap();
        });
        done_rx.recv().unwrap();
        assert!(fd.drain() >= 1, "a foreign wake must signal the eventfd");
        ex.run_until_stalled();
        assert_eq!(got.get(), 42);
        assert_eq!(ex.live_tasks(), 0);
    }

    #[test]
    fn repeated_wakes_queue_a_task_once() {
        let fd = Arc::new(WakeFd::new().unwrap());
        let mut ex = QueueExecutor::new(fd);
        let polls = std::rc::Rc::new(std::cell::Cell::new(0));
        let p = polls.clone();
        let mut first = true;
        ex.spawn(std::future::poll_fn(move |cx| {
            p.set(p.get() + 1);
            if first {
                first = false;
                cx.waker().wake_by_ref();
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(())
        }));
        assert_eq!(ex.run_until_stalled(), 2);
        assert_eq!(polls.get(), 2);
        assert_eq!(ex.live_tasks(), 0);
    }
}
