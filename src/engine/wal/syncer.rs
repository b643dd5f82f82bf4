//! The syncer thread: runs a written batch's `fdatasync` while the writer
//! writes the next batch, then acknowledges the batch's FUA records and
//! flushes (invariant 2 of the [WAL](super)); flushes with nothing queued
//! come here straight from [`super::Wal::sync_directly`] (invariant 9). A
//! failed sync breaks the log (invariant 5).
//!
//! Before the newest segment its jobs wrote is synced, every earlier
//! segment still unsynced (left so by a roll) and every other job's
//! segment is synced, then the newest one's header gets its "prior
//! durable" flag if it lacks it; its own sync makes the flag durable with
//! its records ([`make_durable`], invariant 3).

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};

use futures::channel::oneshot;

use super::fs::SegFile;
use super::{durable, io_err, Registry, WalError};

/// The syncer's queue; `None` once the writer stopped.
pub(super) type SyncQueue = Arc<Mutex<Option<mpsc::Sender<SyncJob>>>>;

/// Who waits for a sync.
pub(super) enum Waiter {
    Append(oneshot::Sender<Result<u64, WalError>>, u64),
    Sync(oneshot::Sender<Result<(), WalError>>),
}

impl Waiter {
    pub(super) fn finish(self, res: &Result<(), WalError>) {
        match self {
            Waiter::Append(done, seq) => {
                let _ = done.send(res.clone().map(|_| seq));
            }
            Waiter::Sync(done) => {
                let _ = done.send(res.clone());
            }
        }
    }
}

/// A batch's `fdatasync`, handed to the syncer thread (invariant 2).
pub(super) struct SyncJob {
    /// The segment the batch was written to, and its file.
    pub(super) seg: u64,
    pub(super) file: SegFile,
    /// Every seq up to this one is in `file` or an older, synced segment.
    pub(super) upto: u64,
    /// Segment cuts made before the job was sent (its sync covers them).
    pub(super) cuts: u64,
    pub(super) waiters: Vec<Waiter>,
}

/// Hand `job` to the syncer; gives it back when the syncer is gone (the
/// writer stopped, or its thread ended).
pub(super) fn hand_over(queue: &SyncQueue, job: SyncJob) -> Result<(), SyncJob> {
    let queue = queue.lock().unwrap_or_else(|e| e.into_inner());
    match queue.as_ref() {
        Some(tx) => tx.send(job).map_err(|mpsc::SendError(job)| job),
        None => Err(job),
    }
}

pub(super) fn lock_broken(
    b: &Mutex<Option<WalError>>,
) -> std::sync::MutexGuard<'_, Option<WalError>> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

/// The syncer thread: takes every queued job, syncs their files once, then
/// acknowledges them all (so jobs queued during a sync share the next one).
pub(super) fn run_syncer(
    rx: mpsc::Receiver<SyncJob>,
    marks: Arc<durable::Marks>,
    broken: Arc<Mutex<Option<WalError>>>,
    registry: Arc<Mutex<Registry>>,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(j) = rx.try_recv() {
            jobs.push(j);
        }
        let upto = jobs.iter().map(|j| j.upto).max().unwrap_or(0);
        let cuts = jobs.iter().map(|j| j.cuts).max().unwrap_or(0);
        // (Not held during the sync: the writer checks it per batch.)
        let was_broken = lock_broken(&broken).clone();
        let res = match was_broken {
            Some(e) => Err(e),
            None => make_durable(&jobs, &registry).map_err(|e| io_err("sync WAL", e)),
        };
        match &res {
            Ok(()) => {
                marks.synced.fetch_max(upto, Ordering::AcqRel);
                marks.cuts_synced_upto(cuts);
            }
            Err(e) => {
                let mut b = lock_broken(&broken);
                if b.is_none() {
                    log::error!("WAL sync failed, log is now broken: {e}");
                    *b = Some(e.clone());
                }
            }
        }
        // Drop the jobs' files before anyone hears back, so a released
        // segment is not held here when its owner tries to recycle it.
        let waiters: Vec<Waiter> = jobs.into_iter().flat_map(|j| j.waiters).collect();
        for w in waiters {
            w.finish(&res);
        }
    }
}

/// Make every record the jobs cover durable, keeping invariant 3 of the
/// [WAL](super): first every segment before the newest job's that a roll
/// left unsynced, and every other job's segment; then the newest one's
/// "prior durable" flag where its header lacks it; then its sync.
fn make_durable(jobs: &[SyncJob], registry: &Mutex<Registry>) -> std::io::Result<()> {
    let Some(newest) = jobs.iter().max_by_key(|j| j.seg) else {
        return Ok(());
    };
    // `last_seq` tells whether the writer added records to the newest
    // segment after this snapshot, which its sync may have missed.
    let (older, flag, newest_last) = {
        let reg = registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut older: Vec<(u64, SegFile)> = reg
            .segs
            .range(..newest.seg)
            .filter(|(_, s)| s.unsynced)
            .map(|(&id, s)| (id, s.file.clone()))
            .collect();
        for j in jobs {
            if j.seg != newest.seg && !older.iter().any(|(id, _)| *id == j.seg) {
                older.push((j.seg, j.file.clone()));
            }
        }
        let seg = reg.segs.get(&newest.seg);
        (
            older,
            seg.and_then(|s| s.flag_header),
            seg.map(|s| s.last_seq),
        )
    };
    for (_, f) in &older {
        f.sync_data()?;
    }
    if let Some(header) = &flag {
        newest.file.overwrite_at(header, 0)?;
    }
    newest.file.sync_data()?;
    let mut reg = registry.lock().unwrap_or_else(|e| e.into_inner());
    for (id, _) in &older {
        if let Some(s) = reg.segs.get_mut(id) {
            s.unsynced = false;
        }
    }
    if let Some(s) = reg.segs.get_mut(&newest.seg) {
        if Some(s.last_seq) == newest_last {
            s.unsynced = false;
        }
        if flag.is_some() {
            s.flag_header = None;
        }
    }
    Ok(())
}
