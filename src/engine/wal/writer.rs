//! The writer thread: gathers queued requests into batches, gives their
//! records sequence numbers in file order (invariant 1 of the [WAL](super)),
//! writes each batch with one `pwritev` or one durable write, answers what
//! needs no sync and hands the rest to the [syncer](super::syncer)
//! (invariant 2), uncounting appends before answering any (invariant 9),
//! starts the next segment from the pool, leaving the old one unsynced
//! when written through the page cache (invariants 3 and 7), breaks the
//! log on an I/O error or gives a refused batch's seqs back on a full
//! file system (invariant 5), and moves written bytes to the tail
//! (invariant 8).
//!
//! The writer is shared behind a mutex: the thread locks it per batch, and
//! a caller may take it to write its own lone record ([`Writer::lead`],
//! invariant 11). Whoever holds the lock is the only one writing the log.
//! Answers are decided under the lock and sent after it is dropped
//! ([`Answers`]).

use std::io::IoSlice;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use futures::channel::oneshot;

use super::flush_pattern::FlushPattern;
use super::fs::{DynWalFs, SegFile, WalFile};
use super::record::{RecordHeader, RecordKind, HEADER_LEN};
use super::syncer::{hand_over, lock_broken, SyncJob, SyncQueue, Waiter};
use super::{
    begin_segment, create_segment, durable, io_err, segment, sync_dir, tail, write_all_vectored,
    write_err, Appended, ApplyFn, Registry, Req, WalError,
};
use crate::engine::map::WalLoc;

/// State owned by the writer thread.
pub(super) struct Writer {
    pub(super) fs: DynWalFs,
    pub(super) dir: PathBuf,
    pub(super) volume: u64,
    pub(super) stamp: segment::Stamp,
    pub(super) registry: Arc<Mutex<Registry>>,
    pub(super) next_seq: u64,
    pub(super) last_seq: Arc<AtomicU64>,
    /// What is durable (written by the syncer and read by flushers too).
    pub(super) marks: Arc<durable::Marks>,
    pub(super) seg_limit: u64,
    /// Set once an I/O error broke the log (invariant 5), by either thread.
    pub(super) broken: Arc<Mutex<Option<WalError>>>,
    pub(super) sync_tx: SyncQueue,
    /// Appends sent and not yet answered ([`super::Wal::sync_directly`]).
    pub(super) queued: Arc<AtomicU64>,
    /// Written bytes kept for readers ([`tail`]).
    pub(super) tail: Arc<tail::Tail>,
    pub(super) apply: ApplyFn,
    /// Whether writes are each followed by a flush (invariant 10).
    pub(super) pattern: Arc<FlushPattern>,
    /// Set by the thread as it ends: nothing writes the log after.
    pub(super) stopped: bool,
}

/// The writer, shared by its thread and callers that lead (invariant 11).
pub(super) type SharedWriter = Arc<Mutex<Writer>>;

fn lock(writer: &SharedWriter) -> std::sync::MutexGuard<'_, Writer> {
    writer.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most requests gathered into one write.
const MAX_BATCH: usize = 256;
/// Most data bytes gathered into one write.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Body of the writer thread: gathers what callers send into batches and
/// writes each under the writer's lock (so a leading caller waits, or
/// finds the lock taken and queues), until a stop; then marks the writer
/// stopped, lets the `syncer` answer what it holds and ends it.
pub(super) fn run(writer: SharedWriter, rx: mpsc::Receiver<Req>, syncer: JoinHandle<()>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let mut bytes = 0usize;
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    if let Req::Append { data, .. } = &r {
                        bytes += data.len();
                    }
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let stop = batch.iter().any(|r| matches!(r, Req::Stop));
        let answers = lock(&writer).process(batch);
        answers.deliver();
        if stop {
            break;
        }
    }
    // Under one lock: no caller leads after this.
    let queue = {
        let mut w = lock(&writer);
        w.stopped = true;
        w.sync_tx.clone()
    };
    // Let the syncer answer what it holds, then end it.
    queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    let _ = syncer.join();
}

/// One answer decided under the writer's lock.
enum Answer {
    Append(
        oneshot::Sender<Result<u64, WalError>>,
        Result<u64, WalError>,
    ),
    Sync(oneshot::Sender<Result<(), WalError>>, Result<(), WalError>),
}

/// What a processed batch owes its callers. Delivered after the writer's
/// lock is dropped, so a caller woken by its answer finds the lock free
/// and may lead its next write (invariant 11) instead of racing the
/// writer thread for it. Appends were uncounted before, so a flush sent
/// after an answer still finds nothing queued (invariant 9).
#[must_use]
pub(super) struct Answers {
    now: Vec<Answer>,
    /// The batch's sync, for the syncer (invariant 2).
    job: Option<SyncJob>,
    sync_tx: SyncQueue,
}

impl Answers {
    /// Answer what needs no sync and hand the rest to the syncer.
    pub(super) fn deliver(self) {
        for a in self.now {
            match a {
                Answer::Append(done, res) => {
                    let _ = done.send(res);
                }
                Answer::Sync(done, res) => {
                    let _ = done.send(res);
                }
            }
        }
        let Some(job) = self.job else { return };
        if let Err(job) = hand_over(&self.sync_tx, job) {
            for w in job.waiters {
                w.finish(&Err(WalError::Stopped));
            }
        }
    }
}

impl Writer {
    /// Write `req`, an append alone, on the caller's thread if the writer
    /// is free and still running (invariant 11); else give it back. The
    /// caller counted it as queued; once this returns `Ok` it was answered.
    pub(super) fn lead(writer: &SharedWriter, req: Req) -> Result<(), Req> {
        let mut w = match writer.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(req),
        };
        if w.stopped || !w.may_lead(&req) {
            return Err(req);
        }
        let answers = w.process(vec![req]);
        drop(w);
        answers.deliver();
        Ok(())
    }

    /// Whether the caller may write `req` itself (invariant 11): when it
    /// is to be durable anyway (FUA, or a flush is predicted), or when the
    /// current segment is written through the page cache. With O_DIRECT
    /// the caller would wait out the device for each lone write, where
    /// the writer thread waits once per batch: 4K random writes at QD32
    /// fell from about 29K to 11K IOPS.
    fn may_lead(&self, req: &Req) -> bool {
        let durable =
            matches!(req, Req::Append { sync: true, .. }) || self.pattern.predicts_flush();
        durable || !self.current().1.writes_through()
    }

    /// The current segment: `(id, file, length, incarnation, flagged)`,
    /// `flagged` when its header says every earlier segment is durable
    /// (invariant 3; once true it stays true, so a stale answer only
    /// ever says `false`).
    fn current(&self) -> (u64, SegFile, u64, u32, bool) {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let seg = &reg.segs[&reg.current];
        let flagged = seg.flag_header.is_none();
        (
            reg.current,
            seg.file.clone(),
            seg.len,
            seg.incarnation,
            flagged,
        )
    }

    /// Whether segment `id`'s header says every earlier segment is
    /// durable (invariant 3).
    fn flagged(&self, id: u64) -> bool {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        reg.segs.get(&id).is_some_and(|s| s.flag_header.is_none())
    }

    /// Start the next segment: the spare named `current + 1` if the pool
    /// has it, else a new file (invariant 7). The current one is synced
    /// first only if its writes went through to the disk already;
    /// otherwise it is left unsynced, unless all of it is durable
    /// (invariant 3).
    fn roll(&mut self, old: &dyn WalFile, old_id: u64) -> Result<(), WalError> {
        let cuts = self.marks.cuts();
        let written = self.next_seq - 1;
        if old.writes_through() {
            old.sync_data().map_err(|e| io_err("sync WAL segment", e))?;
            self.marks.synced.fetch_max(written, Ordering::AcqRel);
            self.marks.cuts_synced_upto(cuts);
        }
        // Durable through its last record (and flagged, so every segment
        // before it is durable too): the next one starts flagged.
        let prior_durable = self.marks.all_durable(written) && self.flagged(old_id);
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if !prior_durable {
            if let Some(s) = reg.segs.get_mut(&old_id) {
                s.unsynced = true;
            }
        }
        let id = reg.current + 1;
        let seg = match reg.spares.remove(&id) {
            Some(sp) => {
                if !sp.durable {
                    // Its rename is not durable yet: the pool was empty.
                    sync_dir(&self.fs, &self.dir)?;
                }
                begin_segment(
                    sp.file,
                    sp.path,
                    self.volume,
                    self.stamp,
                    self.next_seq,
                    prior_durable,
                )?
            }
            None => {
                let seg = create_segment(
                    &self.fs,
                    &self.dir,
                    id,
                    self.volume,
                    self.stamp,
                    self.next_seq,
                    prior_durable,
                )?;
                if let Err(e) = seg.file.allocate(self.seg_limit) {
                    log::warn!("preallocating WAL segment {}: {e}", seg.path.display());
                }
                sync_dir(&self.fs, &self.dir)?;
                seg
            }
        };
        reg.segs.insert(id, seg);
        reg.current = id;
        Ok(())
    }

    /// Write `batch` and decide every answer under the lock; the caller
    /// delivers them after dropping it ([`Answers`]).
    fn process(&mut self, mut batch: Vec<Req>) -> Answers {
        let result = self.write_batch(&mut batch);
        match &result {
            Err(e @ WalError::NoSpace(_)) => {
                log::error!("WAL write failed, the requests fail with ENOSPC: {e}");
            }
            Err(e) => {
                log::error!("WAL write failed, log is now broken: {e}");
                let mut b = lock_broken(&self.broken);
                if b.is_none() {
                    *b = Some(e.clone());
                }
            }
            Ok(_) => {}
        }
        let durable = matches!(&result, Ok((_, true)));
        // Answered from here on (before any answer goes out, so a flush
        // sent after an acknowledged write finds nothing queued).
        let appends = batch
            .iter()
            .filter(|r| matches!(r, Req::Append { .. }))
            .count();
        self.queued.fetch_sub(appends as u64, Ordering::AcqRel);
        let written = self.next_seq - 1;
        let mut seqs = result.as_ref().ok().map(|(s, _)| s.iter());
        let mut answers = Answers {
            now: Vec::new(),
            job: None,
            sync_tx: self.sync_tx.clone(),
        };
        let mut waiters = Vec::new();
        let clean = |w: &Writer| w.marks.all_durable(written);
        for r in batch {
            match r {
                Req::Append { done, sync, .. } => match seqs.as_mut().and_then(|s| s.next()) {
                    Some(&seq) if sync && !durable => waiters.push(Waiter::Append(done, seq)),
                    Some(&seq) => answers.now.push(Answer::Append(done, Ok(seq))),
                    None => {
                        let e = result.as_ref().err().cloned().unwrap_or(WalError::Stopped);
                        answers.now.push(Answer::Append(done, Err(e)));
                    }
                },
                Req::Sync { done } => match &result {
                    // The batch's records were refused, but what the log
                    // already holds can still be made durable.
                    Err(WalError::NoSpace(_)) | Ok(_) if durable || clean(self) => {
                        answers.now.push(Answer::Sync(done, Ok(())));
                    }
                    Err(WalError::NoSpace(_)) | Ok(_) => waiters.push(Waiter::Sync(done)),
                    Err(e) => answers.now.push(Answer::Sync(done, Err(e.clone()))),
                },
                Req::Stop => {}
            }
        }
        if !waiters.is_empty() {
            let (seg, file, _, _, _) = self.current();
            answers.job = Some(SyncJob {
                seg,
                file,
                upto: written,
                cuts: self.marks.cuts(),
                waiters,
            });
        }
        answers
    }

    /// Write every append of the batch with one `pwritev`; returns their
    /// seqs and whether the write itself made them durable. Once written,
    /// the records' bytes move to the tail (their data is not needed
    /// after the write).
    fn write_batch(&mut self, batch: &mut [Req]) -> Result<(Vec<u64>, bool), WalError> {
        let was_broken = lock_broken(&self.broken).clone();
        if let Some(e) = was_broken {
            return Err(e);
        }
        let mut need_sync = false;
        let mut total = 0u64;
        let mut appends = 0u64;
        for r in batch.iter() {
            match r {
                Req::Append {
                    table, data, sync, ..
                } => {
                    total += (HEADER_LEN + table.len() + data.len()) as u64;
                    need_sync |= *sync;
                    appends += 1;
                }
                Req::Sync { .. } => need_sync = true,
                Req::Stop => {}
            }
        }
        // Invariant 10: a flush is expected right after this write.
        need_sync |= self.pattern.expects_flush(appends);
        let (mut seg_id, mut file, mut off, mut incarnation, mut flagged) = self.current();
        if off > 0 && off + total > self.seg_limit {
            self.roll(file.as_ref(), seg_id)?;
            (seg_id, file, off, incarnation, flagged) = self.current();
        }
        // Write-behind only where a flush is asked for, or may soon be
        // (invariant 3: what no flush covers need not reach the disk).
        file.set_write_behind(need_sync || self.pattern.flushed_lately(total));
        let mut headers = Vec::new();
        let mut appended = Vec::new();
        let mut durable = false;
        let mut pos = off;
        let first_seq = self.next_seq;
        for r in batch.iter() {
            if let Req::Append {
                kind,
                lba,
                sectors,
                crc,
                table,
                data,
                more,
                ..
            } = r
            {
                let seq = self.next_seq;
                self.next_seq += 1;
                let h = RecordHeader {
                    kind: *kind,
                    volume: self.volume,
                    seq,
                    lba: *lba,
                    sectors: *sectors,
                    data_crc: *crc,
                    more: *more,
                    block_crcs: *kind == RecordKind::Write,
                };
                headers.push(h.encode_for(incarnation));
                let data_off = pos + (HEADER_LEN + table.len()) as u64;
                pos = data_off + data.len() as u64;
                appended.push(Appended {
                    seq,
                    kind: *kind,
                    lba: *lba,
                    sectors: *sectors,
                    more: *more,
                    loc: (*kind == RecordKind::Write).then_some(WalLoc {
                        seq,
                        seg: seg_id,
                        data_off,
                        rec_sectors: *sectors,
                        crc: *crc,
                        skip: 0,
                        block_crcs: true,
                    }),
                });
            }
        }
        if !appended.is_empty() {
            let mut iov = Vec::with_capacity(headers.len() * 3);
            let mut hi = headers.iter();
            for r in batch.iter() {
                if let Req::Append { table, data, .. } = r {
                    if let Some(h) = hi.next() {
                        iov.push(IoSlice::new(h));
                    }
                    if !table.is_empty() {
                        iov.push(IoSlice::new(table));
                    }
                    if !data.is_empty() {
                        iov.push(IoSlice::new(data));
                    }
                }
            }
            // Nothing unsynced before this batch: one durable (FUA) write
            // replaces write + fdatasync (invariant 2).
            durable = need_sync
                && !self.marks.cut_pending()
                && self.marks.synced.load(Ordering::Acquire) >= first_seq - 1
                && flagged;
            let res = if durable {
                file.write_durable_at(&iov, off)
                    .map_err(|e| write_err("write WAL", e))
            } else {
                write_all_vectored(file.as_ref(), &mut iov, off)
            };
            if let Err(e) = res {
                if let WalError::NoSpace(_) = e {
                    // Invariant 5: give the sequence numbers back and cut
                    // off whatever part of the batch reached the file, so
                    // the next batch continues the log exactly here.
                    self.next_seq = first_seq;
                    self.marks.cut();
                    file.set_len(off)
                        .map_err(|c| io_err("cut WAL segment after ENOSPC", c))?;
                }
                return Err(e);
            }
        }
        if let Some(last) = appended.last() {
            self.keep_in_tail(batch, headers, seg_id, off, last.seq);
            {
                let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(s) = reg.segs.get_mut(&seg_id) {
                    s.len = pos;
                    s.last_seq = last.seq;
                }
            }
            self.last_seq.store(last.seq, Ordering::Release);
            if durable {
                self.marks.synced.fetch_max(last.seq, Ordering::AcqRel);
            }
            (self.apply)(&appended);
        }
        Ok((appended.iter().map(|a| a.seq).collect(), durable))
    }
}

impl Writer {
    /// Move the bytes of a batch written at `off` of `seg` (its record
    /// `headers` in order, then each record's table and data) to the
    /// tail, before readers learn where the records are.
    fn keep_in_tail(
        &self,
        batch: &mut [Req],
        headers: Vec<[u8; HEADER_LEN]>,
        seg: u64,
        off: u64,
        last_seq: u64,
    ) {
        if self.tail.budget() == 0 {
            return;
        }
        let mut parts = Vec::with_capacity(headers.len() * 3);
        let mut hi = headers.into_iter();
        for r in batch.iter_mut() {
            if let Req::Append { table, data, .. } = r {
                if let Some(h) = hi.next() {
                    parts.push(h.to_vec());
                }
                for part in [std::mem::take(table), std::mem::take(data)] {
                    if !part.is_empty() {
                        parts.push(part);
                    }
                }
            }
        }
        self.tail.push(tail::Entry {
            seg,
            off,
            last_seq,
            parts,
        });
    }
}
