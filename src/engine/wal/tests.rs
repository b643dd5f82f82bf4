//! WAL writer + replay tests on real files.

use std::sync::{Arc, Mutex};

use super::fs::{real, DynWalFs};
use super::power_loss::PowerLossFs;
use super::record::RecordKind;
use super::replay::replay;
use super::scan::scan;
use super::segment::Stamp;
use super::{read_record, Appended, NewRecord, Wal, WalError};

pub(super) const STAMP: Stamp = Stamp {
    epoch: 2,
    base_epoch: 1,
};

pub(super) fn data(seed: u8, sectors: usize) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| seed.wrapping_add(i as u8) | 1)
        .collect()
}

pub(super) type Seen = Arc<Mutex<Vec<Appended>>>;

/// Replay `dir` (its WAL must extend the history) and start the log.
fn start(dir: &std::path::Path, after: u64, seg_limit: u64) -> (Wal, Seen, Vec<Appended>) {
    start_on(&real(), dir, after, seg_limit).unwrap()
}

pub(super) fn replay_on(
    fs: &DynWalFs,
    dir: &std::path::Path,
    after: u64,
) -> Result<(super::Recovered, Vec<Appended>), WalError> {
    let mut replayed = Vec::new();
    let scans = scan(fs, dir, 9)?;
    let rec = replay(fs, dir, 9, scans, after, STAMP, |a| replayed.push(a))?;
    Ok((rec, replayed))
}

pub(super) fn start_on(
    fs: &DynWalFs,
    dir: &std::path::Path,
    after: u64,
    seg_limit: u64,
) -> Result<(Wal, Seen, Vec<Appended>), WalError> {
    let (rec, replayed) = replay_on(fs, dir, after)?;
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let wal = Wal::start(
        fs.clone(),
        dir,
        9,
        rec,
        seg_limit,
        0,
        Box::new(move |b: &[Appended]| s2.lock().unwrap().extend_from_slice(b)),
    )?;
    Ok((wal, seen, replayed))
}

#[test]
fn concurrent_appends_replay_and_release() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, seen, replayed) = start(dir.path(), 0, 64 << 10);
    assert!(replayed.is_empty());
    let wal = Arc::new(wal);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                for i in 0..25u8 {
                    let d = data(t * 50 + i, 1 + (i as usize % 8));
                    let sectors = d.len() as u64 / 512;
                    let lba = u64::from(t) * 1000 + u64::from(i) * 8;
                    futures::executor::block_on(wal.append(
                        RecordKind::Write,
                        lba,
                        sectors,
                        d,
                        i % 10 == 0,
                    ))
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    futures::executor::block_on(wal.sync()).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 100);
    let seqs: Vec<u64> = seen.iter().map(|a| a.seq).collect();
    assert_eq!(
        seqs,
        (1..=100).collect::<Vec<_>>(),
        "applied in sequence order"
    );
    // Every record reads back through its location.
    for a in &seen {
        let loc = a.loc.unwrap();
        let f = wal.segment_file(loc.seg).unwrap();
        let mut b = vec![0u8; (a.sectors * 512) as usize];
        read_record(f.as_ref(), &loc, loc.seg, &mut b).unwrap();
        let (t, i) = ((a.lba / 1000) as u8, ((a.lba % 1000) / 8) as u8);
        assert_eq!(b, data(t * 50 + i, a.sectors as usize));
    }
    let segs_before = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(segs_before > 1, "small segment limit rolls segments");
    drop(wal);
    // Replay sees the same records; skipping those already stored.
    let (wal, _, replayed) = start(dir.path(), 40, 64 << 10);
    assert_eq!(
        replayed.iter().map(|a| a.seq).collect::<Vec<_>>(),
        (41..=100).collect::<Vec<_>>()
    );
    assert_eq!(
        futures::executor::block_on(wal.append(RecordKind::Trim, 0, 8, Vec::new(), true)).unwrap(),
        101
    );
    wal.release_upto(100);
    let left = segments(&real(), dir.path()).len();
    assert_eq!(left, 1, "only the current segment stays");
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(
        files <= 1 + super::POOL_MAX,
        "released segments are recycled into a bounded pool: {files} files"
    );
}

/// Append `n` flushed 2-sector writes starting at lba `first`.
fn write_flushed(wal: &Wal, first: u64, n: u64) {
    let recs = (first..first + n)
        .map(|i| NewRecord {
            kind: RecordKind::Write,
            lba: i,
            sectors: 2,
            data: data(i as u8, 2),
        })
        .collect();
    for w in wal.submit_many(recs, true).unwrap() {
        futures::executor::block_on(w).unwrap();
    }
}

/// The segments of `dir` (not the spares of the pool), oldest first.
pub(super) fn segments(fs: &DynWalFs, dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    scan(fs, dir, 9)
        .unwrap()
        .into_iter()
        .filter(|s| !s.spare)
        .map(|s| s.path)
        .collect()
}

pub(super) fn seg_files(fs: &DynWalFs, dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs.list(dir).unwrap().iter().map(|n| dir.join(n)).collect();
    v.sort();
    v
}

/// Every file of `dir` with its bytes.
fn contents(fs: &DynWalFs, dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    seg_files(fs, dir)
        .into_iter()
        .map(|p| {
            let f = fs.open(&p).unwrap();
            let b = super::fs::read_all(f.as_ref()).unwrap();
            (p, b)
        })
        .collect()
}

/// A torn last record ends the newest segment's run: replay keeps the
/// records before it, and the next segment starts right after them.
#[test]
fn torn_tail_of_the_newest_segment_ends_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, _) = start(dir.path(), 0, 1 << 20);
    write_flushed(&wal, 0, 3);
    drop(wal);
    let newest = scan(&real(), dir.path(), 9)
        .unwrap()
        .into_iter()
        .rfind(|s| !s.spare)
        .unwrap();
    let end = newest.records.last().unwrap().end;
    // Tear the last record: its last 300 bytes never reached the disk.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest.path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 300], end - 300).unwrap();
    drop(f);
    let (rec, replayed) = replay_on(&real(), dir.path(), 0).unwrap();
    assert_eq!(replayed.len(), 2);
    assert!(replayed[0].more && replayed[1].more, "flags survive");
    assert_eq!(rec.next_seq, 3);
    drop(rec);
    // A second replay sees exactly the same, with no error.
    let (rec, again) = replay_on(&real(), dir.path(), 0).unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(rec.next_seq, 3);
}

#[test]
fn damage_in_an_older_segment_is_corruption_and_changes_nothing() {
    let fs: DynWalFs = Arc::new(PowerLossFs::new());
    let dir = std::path::Path::new("/vol/wal");
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    write_flushed(&wal, 0, 4);
    drop(wal);
    // A second writer keeps that segment and writes to a new one.
    let (wal, _, replayed) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    assert_eq!(replayed.len(), 4);
    write_flushed(&wal, 10, 3);
    drop(wal);
    let segs = segments(&fs, dir);
    assert_eq!(segs.len(), 2);

    // A bit flip in the third record of the oldest segment (each: header,
    // one 4-byte block CRC, two sectors).
    let rec_len = 48 + 4 + 1024;
    let third = 48 + 2 * rec_len;
    let mut b = contents(&fs, dir)[0].1.clone();
    b[third + 60] ^= 1;
    let f = fs.open(&segs[0]).unwrap();
    f.write_vectored_at(&[std::io::IoSlice::new(&b)], 0)
        .unwrap();
    let before = contents(&fs, dir);
    let err = replay_on(&fs, dir, 0).unwrap_err();
    match &err {
        WalError::Damaged {
            path,
            offset,
            last_good,
            ..
        } => {
            assert_eq!(path, &segs[0].display().to_string());
            assert_eq!((*offset, *last_good), (third as u64, 2));
        }
        other => panic!("expected Damaged, got {other:?}"),
    }
    assert!(err.to_string().contains("--after 2"), "{err}");
    assert_eq!(contents(&fs, dir), before, "nothing changed on disk");
    // Stored records do not matter: with seq 1..=4 in the store the damaged
    // segment only held stored records and is dropped.
    let (rec, replayed) = replay_on(&fs, dir, 4).unwrap();
    assert_eq!(
        replayed.iter().map(|a| a.seq).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    assert_eq!(rec.next_seq, 8);
}

#[test]
fn a_sequence_gap_names_the_expected_seq() {
    let fs: DynWalFs = Arc::new(PowerLossFs::new());
    let dir = std::path::Path::new("/vol/wal");
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    write_flushed(&wal, 0, 2);
    drop(wal);
    // Seq 1 and 2 in the first segment, 3 in the second; the first is
    // lost while the store holds nothing: the gap is named.
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    write_flushed(&wal, 5, 1);
    drop(wal);
    let first = seg_files(&fs, dir)[0].clone();
    fs.remove(&first).unwrap();
    let err = replay_on(&fs, dir, 0).unwrap_err();
    assert!(err.to_string().contains("expected seq 1, found 3"), "{err}");
}

#[test]
fn another_volumes_wal_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, _) = start(dir.path(), 0, 1 << 20);
    write_flushed(&wal, 0, 2);
    drop(wal);
    let before = contents(&real(), dir.path());
    let scans = scan(&real(), dir.path(), 8);
    assert!(scans.is_err());
    assert_eq!(contents(&real(), dir.path()), before);
}

/// What replay keeps is durable before the log serves: after a power cut
/// every replayed record is still there.
#[test]
fn replay_makes_what_it_keeps_durable() {
    let pfs = PowerLossFs::new();
    let fs: DynWalFs = Arc::new(pfs.clone());
    let dir = std::path::Path::new("/vol/wal");
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    let recs = (0..5)
        .map(|i| NewRecord {
            kind: RecordKind::Write,
            lba: i,
            sectors: 1,
            data: data(i as u8, 1),
        })
        .collect();
    for w in wal.submit_many(recs, false).unwrap() {
        futures::executor::block_on(w).unwrap();
    }
    drop(wal); // never synced: only in the page cache
    let (rec, replayed) = replay_on(&fs, dir, 0).unwrap();
    assert_eq!(replayed.len(), 5);
    drop(rec);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    assert_eq!(replayed.len(), 5, "replayed records survive the power cut");
}

/// Files whose writes can be held at a gate, and fail with ENOSPC while
/// `full` is set; `fdatasync` calls are counted.
#[derive(Debug, Default)]
pub(super) struct Gate {
    pub full: std::sync::atomic::AtomicBool,
    pub held: Mutex<bool>,
    pub cv: std::sync::Condvar,
    /// Writes waiting at the gate.
    pub waiting: std::sync::atomic::AtomicU64,
    /// `fdatasync` calls.
    pub syncs: std::sync::atomic::AtomicU64,
    /// The name of the thread of each write, in order.
    pub writer_threads: Mutex<Vec<String>>,
}

/// `inner` with every file behind `gate`.
pub(super) fn gated(inner: DynWalFs, gate: &Arc<Gate>) -> DynWalFs {
    let g = gate.clone();
    Arc::new(WrapFs {
        inner,
        wrap: Box::new(move |f| Arc::new(GatedFile(f, g.clone()))),
    })
}

#[derive(Debug)]
struct GatedFile(super::fs::SegFile, Arc<Gate>);

impl super::fs::WalFile for GatedFile {
    fn overwrite_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.0.overwrite_at(buf, off)
    }
    fn writes_through(&self) -> bool {
        self.0.writes_through()
    }
    fn write_vectored_at(&self, iov: &[std::io::IoSlice<'_>], off: u64) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering::SeqCst;
        let mut held = self.1.held.lock().unwrap();
        self.1.waiting.fetch_add(1, SeqCst);
        while *held {
            held = self.1.cv.wait(held).unwrap();
        }
        self.1.waiting.fetch_sub(1, SeqCst);
        drop(held);
        let thread = std::thread::current().name().unwrap_or("").to_string();
        self.1.writer_threads.lock().unwrap().push(thread);
        if self.1.full.load(SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.0.write_vectored_at(iov, off)
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, off)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.1
            .syncs
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
}

/// A full file system refuses a batch's records with `NoSpace` but not a
/// flush in the same batch; the refused sequence numbers are reused, and
/// replay sees no gap.
#[test]
fn enospc_refuses_the_records_but_not_a_flush_in_the_same_batch() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let fs: DynWalFs = gated(real(), &gate);
    let (wal, _, _) = start_on(&fs, dir.path(), 0, 1 << 20).unwrap();
    let one = futures::executor::block_on(wal.append(RecordKind::Write, 0, 1, data(1, 1), false));
    assert_eq!(one, Ok(1));
    *gate.held.lock().unwrap() = true;
    std::thread::scope(|s| {
        // A alone in a batch, held at the gate...
        let a = s.spawn(|| {
            futures::executor::block_on(wal.append(RecordKind::Write, 8, 1, data(2, 1), false))
        });
        while gate.waiting.load(SeqCst) == 0 {
            std::thread::yield_now();
        }
        // ...while B and a flush queue up behind it: the next batch.
        let b = wal
            .submit_many(
                vec![NewRecord {
                    kind: RecordKind::Write,
                    lba: 16,
                    sectors: 1,
                    data: data(3, 1),
                }],
                false,
            )
            .unwrap();
        let (done, flushed) = futures::channel::oneshot::channel();
        wal.send(super::Req::Sync { done }).unwrap();
        gate.full.store(true, SeqCst);
        *gate.held.lock().unwrap() = false;
        gate.cv.notify_all();
        let a = a.join().unwrap();
        assert!(matches!(a, Err(WalError::NoSpace(_))), "{a:?}");
        for w in b {
            let r = futures::executor::block_on(w);
            assert!(matches!(r, Err(WalError::NoSpace(_))), "{r:?}");
        }
        let f = futures::executor::block_on(flushed).unwrap();
        assert_eq!(f, Ok(()), "the flush in the refused batch");
    });
    gate.full.store(false, SeqCst);
    let next = futures::executor::block_on(wal.append(RecordKind::Write, 24, 1, data(4, 1), true));
    assert_eq!(next, Ok(2), "the refused sequence numbers are reused");
    drop(wal);
    let (_, replayed) = replay_on(&fs, dir.path(), 0).unwrap();
    let seqs: Vec<u64> = replayed.iter().map(|a| a.seq).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(replayed[1].lba, 24);
}

/// The scan reads ahead on a helper thread: over many segments it still
/// returns them oldest first with every record, and a segment it cannot
/// read midway fails the scan (naming it) instead of hanging or skipping.
#[test]
fn scan_reads_many_segments_in_order_and_fails_on_an_unreadable_one() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, _) = start(dir.path(), 0, 16 << 10);
    for i in 0..40 {
        write_flushed(&wal, i * 10, 10);
    }
    drop(wal);
    let scans = scan(&real(), dir.path(), 9).unwrap();
    let segs: Vec<&super::scan::SegScan> = scans.iter().filter(|s| !s.spare).collect();
    assert!(segs.len() >= 6, "{} segments", segs.len());
    assert!(scans.windows(2).all(|w| w[0].id < w[1].id));
    let seqs: Vec<u64> = segs
        .iter()
        .flat_map(|s| &s.records)
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
    let middle = segs[segs.len() / 2].path.clone();
    std::fs::remove_file(&middle).unwrap();
    std::fs::create_dir(&middle).unwrap();
    let e = scan(&real(), dir.path(), 9).unwrap_err();
    assert!(e.to_string().contains(&middle.display().to_string()), "{e}");
}

/// A file system that forwards everything to `inner` and hands out every
/// file it creates or opens through `wrap` (tests put counters or gates
/// on the files this way).
pub(super) struct WrapFs {
    pub inner: super::fs::DynWalFs,
    pub wrap: Box<dyn Fn(super::fs::SegFile) -> super::fs::SegFile + Send + Sync>,
}

impl std::fmt::Debug for WrapFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrapFs")
            .field("inner", &self.inner)
            .finish()
    }
}

impl super::fs::WalFs for WrapFs {
    fn create_dir_all(&self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &std::path::Path) -> std::io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn create(&self, path: &std::path::Path) -> std::io::Result<super::fs::SegFile> {
        Ok((self.wrap)(self.inner.create(path)?))
    }
    fn open(&self, path: &std::path::Path) -> std::io::Result<super::fs::SegFile> {
        Ok((self.wrap)(self.inner.open(path)?))
    }
    fn remove(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.inner.remove(path)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.sync_dir(dir)
    }
}
