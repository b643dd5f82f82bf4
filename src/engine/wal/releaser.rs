//! Releasing segments whose records are all in the store: recycling them
//! into the spare pool (invariant 7 of [`super`]) or deleting them, either
//! on the caller's thread ([`Recycler::release_upto`]) or on the WAL's
//! releaser thread ([`Releaser`]), so the destager never waits for the
//! writes, `fdatasync`s, renames and directory syncs recycling costs.
//!
//! Invariants:
//! 1. The releaser thread handles requests in order of arrival, several
//!    queued at once as one (the highest seq), and each once; a request
//!    queued before [`Releaser::stop`] is handled before `stop` returns, and
//!    nothing is touched after it returned.
//! 2. A segment is recycled only once no reader holds its file (the
//!    registry's `Arc` is the only one); a held one waits in `retired` for a
//!    later release.

use std::io::IoSlice;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use super::fs::DynWalFs;
use super::{
    io_err, seg_path, segment, sync_dir, write_all_vectored, Registry, Segment, Spare, WalError,
    POOL_MAX,
};

/// What recycling needs: the directory, the segment size and the registry.
#[derive(Debug)]
pub(super) struct Recycler {
    pub(super) fs: DynWalFs,
    pub(super) dir: PathBuf,
    pub(super) volume: u64,
    pub(super) seg_limit: u64,
    pub(super) registry: Arc<Mutex<Registry>>,
}

impl Recycler {
    /// Release every segment except the current one whose records all have
    /// sequence numbers `<= seq`: once no reader holds its file, it is
    /// recycled into the pool or, when the pool is full, deleted.
    pub(super) fn release_upto(&self, seq: u64) {
        let ready: Vec<Segment> = {
            let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            let current = reg.current;
            let ids: Vec<u64> = reg
                .segs
                .iter()
                .filter(|(&id, s)| id != current && s.last_seq <= seq)
                .map(|(&id, _)| id)
                .collect();
            for id in ids {
                if let Some(s) = reg.segs.remove(&id) {
                    reg.retired.push(s);
                }
            }
            // A segment whose file only the registry holds can be reused:
            // readers take their clone under this lock.
            let (ready, held) = std::mem::take(&mut reg.retired)
                .into_iter()
                .partition(|s| Arc::strong_count(&s.file) == 1);
            reg.retired = held;
            ready
        };
        let mut renamed = Vec::new();
        for s in ready {
            match self.recycle(s) {
                Ok(Some(id)) => renamed.push(id),
                Ok(None) => {}
                Err(e) => log::warn!("recycling a WAL segment: {e}"),
            }
        }
        if renamed.is_empty() {
            return;
        }
        if let Err(e) = sync_dir(&self.fs, &self.dir) {
            log::warn!("WAL spares stay unused: {e}");
            return;
        }
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        for id in renamed {
            if let Some(sp) = reg.spares.get_mut(&id) {
                sp.durable = true;
            }
        }
    }

    /// Whether `s` is preallocated to the segment size already (so making
    /// it a spare changes no length).
    fn full_size(&self, s: &Segment) -> bool {
        s.file.size().is_ok_and(|n| n >= self.seg_limit)
    }

    /// Turn a released segment into a spare named after every segment and
    /// spare (its name not yet durable); `None` when it was deleted.
    fn recycle(&self, s: Segment) -> Result<Option<u64>, WalError> {
        let full = {
            let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            reg.spares.len() >= POOL_MAX
        };
        if full {
            self.fs
                .remove(&s.path)
                .map_err(|e| io_err("remove WAL segment", e))?;
            return Ok(None);
        }
        // Its old records must never be read as a segment's again: the
        // spare header is durable before the file takes a new name.
        let header = segment::encode_spare(self.volume);
        let made = if s.unsynced && self.full_size(&s) {
            // Never synced (invariant 3 of the WAL): its records need not
            // reach the disk, so only the header is made durable.
            s.file
                .overwrite_durably(&header, 0)
                .map_err(|e| io_err("write WAL spare header", e))
        } else {
            write_all_vectored(s.file.as_ref(), &mut [IoSlice::new(&header)], 0).and_then(|_| {
                s.file
                    .allocate(self.seg_limit)
                    .and_then(|_| s.file.sync_data())
                    .map_err(|e| io_err("preallocate WAL spare", e))
            })
        };
        // Clean after that sync: its old records leave the page cache (the
        // store holds them now). Only a hint, so a failure is no error.
        // (Not a file left dirty: dropping its pages would start their
        // writeback.)
        if made.is_ok() && !s.unsynced {
            if let Err(e) = s.file.drop_cached() {
                log::debug!("WAL spare {}: dropping cached pages: {e}", s.path.display());
            }
        }
        if let Err(e) = made {
            let _ = self.fs.remove(&s.path);
            return Err(e);
        }
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let id = reg
            .current
            .max(reg.spares.keys().next_back().copied().unwrap_or(0))
            + 1;
        let path = seg_path(&self.dir, id);
        self.fs
            .rename(&s.path, &path)
            .map_err(|e| io_err("rename WAL segment to a spare", e))?;
        reg.spares.insert(
            id,
            Spare {
                file: s.file,
                path,
                durable: false,
            },
        );
        Ok(Some(id))
    }
}

/// The releaser thread and the queue feeding it.
#[derive(Debug)]
pub(super) struct Releaser {
    tx: Mutex<Option<mpsc::Sender<u64>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Releaser {
    pub(super) fn start(recycler: Arc<Recycler>) -> Result<Releaser, WalError> {
        let (tx, rx) = mpsc::channel::<u64>();
        let thread = std::thread::Builder::new()
            .name(format!("shale-wrel-{:x}", recycler.volume))
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Requests queued meanwhile are one release (invariant 1).
                    let seq = rx.try_iter().fold(first, u64::max);
                    recycler.release_upto(seq);
                }
            })
            .map_err(|e| io_err("spawn WAL releaser", e))?;
        Ok(Releaser {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queue a release up to `seq`; returns at once. Ignored once stopped.
    pub(super) fn request(&self, seq: u64) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref() {
            let _ = tx.send(seq);
        }
    }

    /// Handle what is queued, then end the thread and wait for it.
    pub(super) fn stop(&self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}
