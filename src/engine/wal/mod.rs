//! The write-ahead log: segment files under `<local_dir>/wal/`, one writer
//! thread doing group commit.
//!
//! Invariants:
//! 1. Sequence numbers are assigned by the writer thread, strictly increasing
//!    by one, in file order; a segment holds a contiguous run of them.
//! 2. A record's completion is sent only after its bytes were written (and,
//!    for FUA records and flushes, after they are durable), and after the
//!    `apply` callback saw it, so an acknowledged write is visible to
//!    readers. Two batches can be in flight: the writer thread writes
//!    batch N+1 while a syncer thread runs batch N's `fdatasync`; the
//!    syncer acknowledges N's FUA records and flushes afterwards. A batch
//!    that needs durability while nothing before it is unsynced is written
//!    with [`fs::WalFile::write_durable_at`] (`RWF_DSYNC`, a FUA write)
//!    and acknowledged at once; a flush with nothing unsynced costs no
//!    `fdatasync` at all, and is answered on the caller's thread
//!    ([`durable`]).
//! 3. A log written through the page cache starts a new segment without
//!    syncing the one it leaves, unless everything in it is durable
//!    already: that one stays `unsynced` until a sync covers it or the
//!    store holds all its records (then it is released, never synced).
//!    So a stream of writes that no flush covers reaches the disk once,
//!    in its chunks, instead of twice. A segment started while an earlier
//!    one is unsynced gets no "prior durable" flag ([`segment`], version
//!    4); before any record in it is acknowledged as durable, the syncer
//!    syncs every earlier unsynced segment, then writes the flag into its
//!    header, then syncs it ([`syncer`]); a durable write straight from
//!    the writer (invariant 2) needs a flagged segment. So a durable flag
//!    proves every earlier segment durable, and a power cut that loses
//!    part of an unsynced segment loses only records no flush covered
//!    ([`replay`], invariant 8). A log written with O_DIRECT syncs a
//!    segment before starting the next (its bytes are on the disk
//!    already), and every segment it starts is flagged.
//! 4. A segment file is deleted only through [`Wal::release_upto`] (or
//!    [`Wal::release_upto_later`]), which the engine calls once every
//!    record in it is durable in the object store.
//! 5. Once an I/O error happens the log is broken: every later request fails.
//!    Except a full file system (ENOSPC, EDQUOT) while writing records or
//!    starting a segment: the batch fails with [`WalError::NoSpace`], its
//!    sequence numbers are given back and the segment is cut back to where
//!    the batch began (so no part of it can be replayed), and the log goes
//!    on; later batches succeed once there is space again (a flush in the
//!    refused batch still syncs what the log holds). A failed
//!    `fdatasync` always breaks the log (the page cache can no longer be
//!    trusted to hold what was written).
//! 6. Every segment starts with a header naming the writer's epoch and the
//!    history it extends ([`segment`]); replay applies a WAL only over that
//!    history ([`crate::engine::wal_open`]).
//! 7. Segments are preallocated to the segment size and recycled: a
//!    released segment file (once no reader holds it) gets a spare header
//!    ([`segment`]), is preallocated and synced, then renamed to the next
//!    unused segment name and the directory synced, all on the caller of
//!    [`Wal::release_upto`] or on the releaser thread
//!    ([`Wal::release_upto_later`], what the destager uses), never on the
//!    writer thread.
//!    A roll takes the spare named `current + 1` whose name is durable and
//!    writes a version 2 header (`first_seq`) into it; only when the pool
//!    is empty does it create a file and sync the directory. So in steady
//!    state `fdatasync` never commits a size change and the write path
//!    never syncs the directory. A recycled file holds stale records past
//!    its tail; replay never takes them: each time a file becomes a
//!    segment it gets a fresh incarnation, and a record checks only in the
//!    incarnation it was written for ([`segment`]). (Their seqs alone would
//!    not tell: after a power cut the next writer reuses the seqs of
//!    records that reached a file whose new header did not.)
//! 8. Once a batch is written, its bytes move to the [`tail`] (at most
//!    `tail_bytes` of the newest, until the store holds their records);
//!    [`Wal::segment_file`] hands out files whose reads take from it what
//!    it holds, so the destager and readers of fresh records need no disk
//!    read. The tail only ever holds bytes the file holds too.
//! 9. A flush sent while the writer holds no append (every append sent
//!    was answered) goes straight to the syncer ([`Wal::sync_directly`]):
//!    the writes it must cover were acknowledged, so they are written, and
//!    their seqs are at most the `last_seq` it read before the current
//!    segment, and the syncer syncs any older unsynced segment first
//!    (invariant 3). Appends are counted as queued before they are sent and
//!    uncounted before any of them is answered.
//! 10. A write alone in its batch is written durably, like a FUA write,
//!     when the client has been flushing after every write
//!     ([`flush_pattern`]): the flush that follows is then answered on the
//!     caller's thread. This only ever makes a write durable sooner.
//! 11. A write alone in its request, of at most [`LEAD_MAX_BYTES`], sent
//!     from a tokio task while nothing else is queued, is written by its
//!     caller ([`writer::Writer::lead`]): it takes the writer's lock, which
//!     the writer thread holds while it writes a batch, so the log still
//!     has one writer at a time and invariants 1-10 hold unchanged (such a
//!     write is a batch of one, durable when it is FUA or predicted,
//!     through the page cache otherwise). With O_DIRECT segments only a
//!     write that is to be durable anyway leads: any other would wait out
//!     the device alone instead of in a batch. The lock is dropped before any
//!     answer goes out, so a caller woken by its answer finds it free. The
//!     caller blocks for one write instead of waking the writer thread and
//!     being woken back: at queue depth one that hand-off is most of a
//!     commit's latency, and at queue depth 32 (4 KiB random writes over
//!     NBD) it was a context switch per batch of about five writes, with
//!     the writer thread's own wake-up. Never on a ublk
//!     queue thread (not a tokio task): that thread must not block.
//!
//! All file access goes through the [`fs::WalFs`] seam.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use futures::channel::oneshot;

use super::map::WalLoc;
use fs::{DynWalFs, SegFile, WalFile};
use record::RecordKind;

pub mod discard;
mod durable;
mod flush_pattern;
pub mod fs;
pub mod power_loss;
pub mod quarantine;
mod read;
pub mod record;
mod releaser;
pub mod replay;
pub mod scan;
pub mod segment;
pub mod span;
mod syncer;
pub mod tail;
mod writer;

pub use read::{read_record, read_record_cached};
use syncer::{hand_over, lock_broken, run_syncer, SyncJob, SyncQueue, Waiter};
use writer::{SharedWriter, Writer};

/// WAL failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    #[error("WAL I/O error: {0}")]
    Io(String),
    #[error("WAL is stopped")]
    Stopped,
    #[error("WAL data checksum mismatch in segment {seg} at offset {off}")]
    Corrupt { seg: u64, off: u64 },
    #[error("WAL segment {0} is gone")]
    SegmentGone(u64),
    /// The WAL's file system is full: the batch was not written (invariant 5).
    #[error("no space left for the WAL: {0}")]
    NoSpace(String),
    /// Damage or a sequence gap where no torn write can be (not at the
    /// tail of the newest segment): corruption the operator must resolve.
    #[error(
        "WAL segment {path} is damaged at offset {offset}: {what}. It was synced before the \
         next segment began, so this is corruption, not a torn write, and the volume is not \
         opened. Records after seq {last_good} cannot be replayed; to open the volume without \
         them run `shale volume discard-wal <volume> --after {last_good}`"
    )]
    Damaged {
        path: String,
        offset: u64,
        what: String,
        /// The last record that can be read before the damage (0: none).
        last_good: u64,
    },
}

pub(crate) fn io_err(what: &str, e: impl std::fmt::Display) -> WalError {
    WalError::Io(format!("{what}: {e}"))
}

/// [`io_err`], but a full file system is [`WalError::NoSpace`].
fn write_err(what: &str, e: std::io::Error) -> WalError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => WalError::NoSpace(format!("{what}: {e}")),
        _ => io_err(what, e),
    }
}

/// A record once it is in the log, as handed to the `apply` callback.
#[derive(Debug, Clone, Copy)]
pub struct Appended {
    pub seq: u64,
    pub kind: RecordKind,
    pub lba: u64,
    pub sectors: u64,
    /// The next record continues the same write request.
    pub more: bool,
    /// Where the data is (`Write` records only).
    pub loc: Option<WalLoc>,
}

/// A record to append.
#[derive(Debug)]
pub struct NewRecord {
    pub kind: RecordKind,
    pub lba: u64,
    pub sectors: u64,
    pub data: Vec<u8>,
}

/// Called by the writer thread with each written batch, in sequence order,
/// before any of the batch's writers is told it completed.
pub type ApplyFn = Box<dyn Fn(&[Appended]) + Send>;

#[derive(Debug)]
struct Segment {
    file: SegFile,
    path: PathBuf,
    /// Highest sequence number in the segment; 0 when empty.
    last_seq: u64,
    len: u64,
    /// What its record headers are written for ([`segment`]); only the
    /// current segment is written.
    incarnation: u32,
    /// Left by a roll without a sync, and no sync covered it since
    /// (invariant 3).
    unsynced: bool,
    /// Its header with the "prior durable" flag, while the header it
    /// has lacks it (invariant 3).
    flag_header: Option<[u8; segment::SEG_HEADER_LEN]>,
}

/// A preallocated file waiting to become a segment (invariant 7).
#[derive(Debug)]
struct Spare {
    file: SegFile,
    path: PathBuf,
    /// Its name was made durable (directory synced since the rename).
    durable: bool,
}

/// Open segments, shared by the writer, readers and the destager.
#[derive(Debug, Default)]
struct Registry {
    segs: BTreeMap<u64, Segment>,
    current: u64,
    /// The pool, named `current + 1, current + 2, ...`.
    spares: BTreeMap<u64, Spare>,
    /// Released segments not yet recycled (a reader may still hold them).
    retired: Vec<Segment>,
}

/// Spares created at start.
const POOL_MIN: usize = 2;
/// Most spares kept; released segments beyond that are deleted.
const POOL_MAX: usize = 4;

enum Req {
    Append {
        kind: RecordKind,
        lba: u64,
        sectors: u64,
        crc: u32,
        /// The block CRC table (empty for trim and zero records).
        table: Vec<u8>,
        data: Vec<u8>,
        sync: bool,
        more: bool,
        done: oneshot::Sender<Result<u64, WalError>>,
    },
    Sync {
        done: oneshot::Sender<Result<(), WalError>>,
    },
    Stop,
}

/// Handle to the log. Dropping it stops the writer thread.
pub struct Wal {
    recycler: Arc<releaser::Recycler>,
    releaser: releaser::Releaser,
    tx: Mutex<Option<mpsc::Sender<Req>>>,
    /// Shared with the writer thread; a caller may lead (invariant 11).
    writer: SharedWriter,
    thread: Mutex<Option<JoinHandle<()>>>,
    registry: Arc<Mutex<Registry>>,
    last_seq: Arc<AtomicU64>,
    marks: Arc<durable::Marks>,
    broken: Arc<Mutex<Option<WalError>>>,
    tail: Arc<tail::Tail>,
    /// The syncer's queue, shared with the writer (which closes it when it
    /// stops): a flush with nothing queued goes straight to the syncer.
    sync_tx: SyncQueue,
    /// Appends sent to the writer and not yet answered (invariant 9).
    queued: Arc<AtomicU64>,
    /// Flushes handed straight to the syncer (invariant 9).
    direct_syncs: AtomicU64,
    /// Whether writes are each followed by a flush (invariant 10).
    pattern: Arc<flush_pattern::FlushPattern>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").finish_non_exhaustive()
    }
}

/// Segments and position recovered from disk by [`replay::replay`].
#[derive(Debug)]
pub struct Recovered {
    segs: BTreeMap<u64, Segment>,
    /// Spares found after the segments (invariant 7).
    spares: BTreeMap<u64, Spare>,
    /// The new, empty segment to append to (in `segs`).
    current: u64,
    /// The next sequence number to assign.
    pub next_seq: u64,
    /// The stamp of every segment this writer starts.
    stamp: segment::Stamp,
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.wal"))
}

fn sync_dir(fs: &DynWalFs, dir: &Path) -> Result<(), WalError> {
    fs.sync_dir(dir)
        .map_err(|e| io_err("sync WAL directory", e))
}

/// Create segment `id` holding only its header, of a fresh incarnation
/// (the data is not synced; the first flush into it syncs both).
fn create_segment(
    fs: &DynWalFs,
    dir: &Path,
    id: u64,
    volume: u64,
    stamp: segment::Stamp,
    first_seq: u64,
    prior_durable: bool,
) -> Result<Segment, WalError> {
    let path = seg_path(dir, id);
    let file = fs
        .create(&path)
        .map_err(|e| write_err("create WAL segment", e))?;
    begin_segment(file, path.clone(), volume, stamp, first_seq, prior_durable).inspect_err(|_| {
        // Not in the registry yet: leave no half-made segment behind.
        let _ = fs.remove(&path);
    })
}

/// Make `file` (new, or a spare of the pool) segment `first_seq` on, of a
/// fresh incarnation, by writing its header (not synced; the first flush
/// into it syncs it), flagged when every earlier segment is durable
/// (`prior_durable`, invariant 3).
fn begin_segment(
    file: SegFile,
    path: PathBuf,
    volume: u64,
    stamp: segment::Stamp,
    first_seq: u64,
    prior_durable: bool,
) -> Result<Segment, WalError> {
    let incarnation = segment::new_incarnation();
    let header = segment::encode(volume, stamp, first_seq, incarnation, prior_durable);
    write_all_vectored(file.as_ref(), &mut [IoSlice::new(&header)], 0)?;
    Ok(Segment {
        file,
        path,
        last_seq: 0,
        len: segment::SEG_HEADER_LEN as u64,
        incarnation,
        unsynced: false,
        flag_header: (!prior_durable)
            .then(|| segment::encode(volume, stamp, first_seq, incarnation, true)),
    })
}

/// At start: preallocate the current segment and create spares up to
/// [`POOL_MIN`], then sync the directory once (invariant 7). A failure
/// only leaves the pool smaller (rolls then create files).
fn fill_pool(fs: &DynWalFs, dir: &Path, volume: u64, seg_limit: u64, reg: &mut Registry) {
    if let Some(cur) = reg.segs.get(&reg.current) {
        if let Err(e) = cur
            .file
            .allocate(seg_limit)
            .and_then(|_| cur.file.sync_data())
        {
            log::warn!("preallocating the WAL segment {}: {e}", cur.path.display());
        }
    }
    let mut created = false;
    while reg.spares.len() < POOL_MIN {
        let id = reg
            .current
            .max(reg.spares.keys().next_back().copied().unwrap_or(0))
            + 1;
        let path = seg_path(dir, id);
        let made = fs.create(&path).and_then(|file| {
            let header = segment::encode_spare(volume);
            fs::write_all_at(file.as_ref(), &[IoSlice::new(&header)], 0)?;
            file.allocate(seg_limit)?;
            file.sync_data()?;
            Ok(file)
        });
        match made {
            Ok(file) => {
                created = true;
                reg.spares.insert(
                    id,
                    Spare {
                        file,
                        path,
                        durable: false,
                    },
                );
            }
            Err(e) => {
                log::warn!("creating a WAL spare {}: {e}", path.display());
                let _ = fs.remove(&path);
                break;
            }
        }
    }
    if created {
        match sync_dir(fs, dir) {
            Ok(()) => reg.spares.values_mut().for_each(|s| s.durable = true),
            Err(e) => log::warn!("WAL spares stay unused: {e}"),
        }
    }
}

impl Wal {
    /// Start the log in `dir` after recovery, appending to the fresh
    /// segment replay created.
    /// `seg_limit` is the size at which a new segment is started;
    /// `tail_bytes` bounds the newest written bytes kept in memory for
    /// readers ([`tail`]; 0 keeps none).
    pub fn start(
        fs: DynWalFs,
        dir: &Path,
        volume: u64,
        recovered: Recovered,
        seg_limit: u64,
        tail_bytes: u64,
        apply: ApplyFn,
    ) -> Result<Wal, WalError> {
        let tail = Arc::new(tail::Tail::new(tail_bytes));
        let mut registry = Registry {
            segs: recovered.segs,
            current: recovered.current,
            spares: recovered.spares,
            retired: Vec::new(),
        };
        fill_pool(&fs, dir, volume, seg_limit, &mut registry);
        let registry = Arc::new(Mutex::new(registry));
        let last_seq = Arc::new(AtomicU64::new(recovered.next_seq - 1));
        // Replay synced everything it kept.
        let marks = Arc::new(durable::Marks::new(recovered.next_seq - 1));
        let broken: Arc<Mutex<Option<WalError>>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        let (sync_tx, sync_rx) = mpsc::channel();
        let sync_tx: SyncQueue = Arc::new(Mutex::new(Some(sync_tx)));
        let queued = Arc::new(AtomicU64::new(0));
        let pattern = Arc::new(flush_pattern::FlushPattern::default());
        let (s2, b2) = (marks.clone(), broken.clone());
        let r2 = registry.clone();
        let syncer = std::thread::Builder::new()
            .name(format!("shale-wsync-{volume:x}"))
            .spawn(move || run_syncer(sync_rx, s2, b2, r2))
            .map_err(|e| io_err("spawn WAL syncer", e))?;
        let writer = Writer {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            volume,
            stamp: recovered.stamp,
            registry: registry.clone(),
            next_seq: recovered.next_seq,
            last_seq: last_seq.clone(),
            marks: marks.clone(),
            seg_limit,
            broken: broken.clone(),
            sync_tx: sync_tx.clone(),
            queued: queued.clone(),
            tail: tail.clone(),
            apply,
            pattern: pattern.clone(),
            stopped: false,
        };
        let writer = Arc::new(Mutex::new(writer));
        let thread_writer = writer.clone();
        let thread = std::thread::Builder::new()
            .name(format!("shale-wal-{volume:x}"))
            .spawn(move || writer::run(thread_writer, rx, syncer))
            .map_err(|e| io_err("spawn WAL writer", e))?;
        let recycler = Arc::new(releaser::Recycler {
            fs,
            dir: dir.to_path_buf(),
            volume,
            seg_limit,
            registry: registry.clone(),
        });
        let releaser = releaser::Releaser::start(recycler.clone())?;
        Ok(Wal {
            recycler,
            releaser,
            tx: Mutex::new(Some(tx)),
            writer,
            thread: Mutex::new(Some(thread)),
            registry,
            last_seq,
            marks,
            broken,
            tail,
            sync_tx,
            queued,
            direct_syncs: AtomicU64::new(0),
            pattern,
        })
    }

    fn send(&self, req: Req) -> Result<(), WalError> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        match tx.as_ref() {
            Some(tx) => tx.send(req).map_err(|_| WalError::Stopped),
            None => Err(WalError::Stopped),
        }
    }

    /// Append a record; resolves with its sequence number once written
    /// (and synced when `sync`). `data` is empty for trim/zero records.
    pub async fn append(
        &self,
        kind: RecordKind,
        lba: u64,
        sectors: u64,
        data: Vec<u8>,
        sync: bool,
    ) -> Result<u64, WalError> {
        let mut w = self.submit_many(
            vec![NewRecord {
                kind,
                lba,
                sectors,
                data,
            }],
            sync,
        )?;
        w.pop().ok_or(WalError::Stopped)?.await
    }

    /// Queue the records of one request so they get consecutive sequence
    /// numbers (every record but the last is flagged `more`); the last one
    /// is synced when `sync`. Returns one future per record. Write records
    /// are written with a CRC per 4 KiB block (kind 4, see [`record`]);
    /// their CRCs are computed here, on the caller's thread.
    pub fn submit_many(
        &self,
        recs: Vec<NewRecord>,
        sync: bool,
    ) -> Result<Vec<impl std::future::Future<Output = Result<u64, WalError>>>, WalError> {
        let n = recs.len();
        let may_lead = n == 1 && recs[0].data.len() <= LEAD_MAX_BYTES && on_runtime_task();
        let mut waits = Vec::with_capacity(n);
        // Counted before they are sent, so a flush never overtakes them.
        let before = self.queued.fetch_add(n as u64, Ordering::AcqRel);
        // Invariant 11: only with nothing else queued.
        let lead = may_lead && before == 0;
        for (i, r) in recs.into_iter().enumerate() {
            let (done, rx) = oneshot::channel();
            let last = i + 1 == n;
            let table = if r.kind == RecordKind::Write {
                record::block_table(&r.data)
            } else {
                Vec::new()
            };
            let req = Req::Append {
                kind: r.kind,
                lba: r.lba,
                sectors: r.sectors,
                crc: crc32c::crc32c(&table),
                table,
                data: r.data,
                sync: sync && last,
                more: !last,
                done,
            };
            let req = if lead {
                Writer::lead(&self.writer, req).err()
            } else {
                Some(req)
            };
            if let Some(req) = req {
                self.send(req).map_err(|_| {
                    // The writer is gone: what was not sent is not queued.
                    self.queued.fetch_sub((n - i) as u64, Ordering::AcqRel);
                    WalError::Stopped
                })?;
            }
            waits.push(async move { rx.await.unwrap_or(Err(WalError::Stopped)) });
        }
        Ok(waits)
    }

    /// Make every record written so far durable. When nothing is
    /// unsynced this returns at once, on the caller's thread (durable
    /// invariant 2).
    pub async fn sync(&self) -> Result<(), WalError> {
        if let Some(e) = lock_broken(&self.broken).clone() {
            return Err(e);
        }
        self.pattern.flushed();
        if self
            .marks
            .all_durable(self.last_seq.load(Ordering::Acquire))
        {
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        let done = match self.sync_directly(done) {
            Ok(()) => return rx.await.unwrap_or(Err(WalError::Stopped)),
            Err(done) => done,
        };
        self.send(Req::Sync { done })?;
        rx.await.unwrap_or(Err(WalError::Stopped))
    }

    /// Hand a flush straight to the syncer when the writer holds no
    /// append (invariant 9): the records it must cover are all written,
    /// so the writer thread need not relay it. Gives `done` back when the
    /// writer must order it (appends queued or a cut not yet synced); with
    /// the syncer gone (the writer stopped) `done` gets `Stopped`.
    fn sync_directly(
        &self,
        done: oneshot::Sender<Result<(), WalError>>,
    ) -> Result<(), oneshot::Sender<Result<(), WalError>>> {
        if self.queued.load(Ordering::Acquire) != 0 {
            return Err(done);
        }
        // Read before the file: every record up to `upto` is in the
        // segment current after this load, or in an older one, which was
        // synced before the writer moved on (invariant 3).
        let upto = self.last_seq.load(Ordering::Acquire);
        let cuts = self.marks.cuts();
        if self.marks.cut_pending() {
            return Err(done);
        }
        let (seg, file) = {
            let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            match reg.segs.get(&reg.current) {
                Some(seg) => (reg.current, seg.file.clone()),
                None => return Err(done),
            }
        };
        let job = SyncJob {
            seg,
            file,
            upto,
            cuts,
            waiters: vec![Waiter::Sync(done)],
        };
        match hand_over(&self.sync_tx, job) {
            Ok(()) => {
                self.direct_syncs.fetch_add(1, Ordering::Relaxed);
            }
            // The syncer is gone, so the writer stopped.
            Err(job) => {
                for w in job.waiters {
                    w.finish(&Err(WalError::Stopped));
                }
            }
        }
        Ok(())
    }

    /// Flushes that went straight to the syncer so far (invariant 9).
    pub fn direct_syncs(&self) -> u64 {
        self.direct_syncs.load(Ordering::Relaxed)
    }

    /// Highest sequence number written so far.
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// Total bytes in live segment files.
    pub fn bytes(&self) -> u64 {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        reg.segs.values().map(|s| s.len).sum()
    }

    /// The open file of segment `seg` (kept alive by the `Arc` even if the
    /// segment is released meanwhile), for reading: what the tail holds
    /// is read from memory ([`tail::TailFile`]).
    pub fn segment_file(&self, seg: u64) -> Option<SegFile> {
        let file = {
            let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            reg.segs.get(&seg).map(|s| s.file.clone())?
        };
        Some(Arc::new(tail::TailFile {
            tail: self.tail.clone(),
            seg,
            file,
        }))
    }

    /// Bytes of the newest records held in memory ([`tail`]).
    pub fn tail_bytes(&self) -> u64 {
        self.tail.bytes()
    }

    /// Release every segment except the current one whose records all have
    /// sequence numbers `<= seq` (they are durable in the store): once no
    /// reader holds its file, it is recycled into the pool or, when the
    /// pool is full, deleted (invariant 7). Runs on the caller's thread.
    pub fn release_upto(&self, seq: u64) {
        self.tail.forget_through(seq);
        self.recycler.release_upto(seq);
    }

    /// [`Wal::release_upto`] on the WAL's releaser thread: returns at once
    /// (see [`releaser`]); [`Wal::stop`] waits for what was queued.
    pub fn release_upto_later(&self, seq: u64) {
        self.tail.forget_through(seq);
        self.releaser.request(seq);
    }

    /// Stop the writer thread after the requests already queued; later
    /// requests fail with [`WalError::Stopped`]. Waits for the thread, and
    /// for the releases already queued; nothing touches the log after.
    pub fn stop(&self) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(Req::Stop);
        }
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        self.releaser.stop();
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Largest record a caller writes itself (invariant 11): the hand-off
/// matters little next to a bigger write, and each leading thread keeps a
/// direct-write buffer the size of what it wrote.
const LEAD_MAX_BYTES: usize = 64 << 10;

/// Whether the caller runs inside a tokio task (a runtime worker, where
/// blocking for one write delays only that task), not on a ublk queue
/// thread or another thread that must not block (invariant 11).
fn on_runtime_task() -> bool {
    tokio::task::try_id().is_some()
}

/// `pwritev` until every slice is written.
fn write_all_vectored(
    file: &dyn WalFile,
    iov: &mut [IoSlice<'_>],
    mut off: u64,
) -> Result<(), WalError> {
    let mut slices: &mut [IoSlice<'_>] = iov;
    // Linux accepts at most IOV_MAX (1024) slices per call.
    while !slices.is_empty() {
        let n = slices.len().min(1024);
        let written = file
            .write_vectored_at(&slices[..n], off)
            .map_err(|e| write_err("write WAL", e))?;
        if written == 0 {
            return Err(io_err("write WAL", "wrote 0 bytes"));
        }
        off += written as u64;
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_blocks;
#[cfg(test)]
mod tests_flush;
#[cfg(test)]
mod tests_lazy;
#[cfg(test)]
mod tests_recycle;
