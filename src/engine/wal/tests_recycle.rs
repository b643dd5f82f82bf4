//! Tests of preallocated, recycled segments, padded (O_DIRECT-like) tails
//! and batches in flight.

use std::io::IoSlice;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};

use super::fs::{real_with, DynWalFs, SegFile, WalFile, WalIo};
use super::power_loss::PowerLossFs;
use super::record::RecordKind;
use super::scan::scan;
use super::tests::{data, replay_on, seg_files, segments, start_on, WrapFs};
use super::{read_record, NewRecord, Wal};

const DIR: &str = "/vol/wal";

/// Append `n` flushed 2-sector writes at lba `first..`; returns their seqs.
fn write_flushed(wal: &Wal, first: u64, n: u64) -> Vec<u64> {
    let recs = (first..first + n)
        .map(|i| NewRecord {
            kind: RecordKind::Write,
            lba: i,
            sectors: 2,
            data: data(i as u8, 2),
        })
        .collect();
    wal.submit_many(recs, true)
        .unwrap()
        .into_iter()
        .map(|w| futures::executor::block_on(w).unwrap())
        .collect()
}

/// Segments are filled, released into the pool and reused: the newest
/// segment is a recycled file whose stale records of its earlier life sit
/// right after its tail (same record size, so one starts exactly there).
/// Replay takes exactly the current records, never a stale one.
/// `stale_at_tail`: writes are not padded, so a stale record starts
/// exactly at some segment's tail.
fn recycled_segments_replay_only_current_records(fs: &DynWalFs, dir: &Path, stale_at_tail: bool) {
    let seg_limit = 8 << 10;
    let (wal, _, _) = start_on(fs, dir, 0, seg_limit).unwrap();
    // One record per batch (a batch never spans segments).
    let first: Vec<u64> = (0..40).flat_map(|i| write_flushed(&wal, i, 1)).collect();
    assert_eq!(first, (1..=40).collect::<Vec<_>>());
    let before: Vec<_> = segments(fs, dir);
    assert!(before.len() > 4, "the small limit rolls segments");
    // Everything up to seq 40 is in the store: segments become spares.
    wal.release_upto(40);
    let seqs: Vec<u64> = (0..15)
        .flat_map(|i| write_flushed(&wal, 100 + i, 1))
        .collect();
    assert_eq!(seqs, (41..=55).collect::<Vec<_>>());
    drop(wal);
    let scans = scan(fs, dir, 9).unwrap();
    // Some recycled segment ends its run at a stale record: written in
    // the file's earlier incarnation, its header checksum fails now.
    let stale = scans.iter().any(|s| {
        s.run_end
            .as_deref()
            .is_some_and(|w| w.contains("header checksum"))
    });
    assert!(
        stale || !stale_at_tail,
        "a stale record follows a tail: {:?}",
        scans.iter().map(|s| &s.run_end).collect::<Vec<_>>()
    );
    let (rec, replayed) = replay_on(fs, dir, 40).unwrap();
    assert_eq!(
        replayed.iter().map(|a| a.seq).collect::<Vec<_>>(),
        (41..=55).collect::<Vec<_>>()
    );
    assert_eq!(rec.next_seq, 56);
    // The data is the current records' data.
    for a in &replayed {
        let loc = a.loc.unwrap();
        let f = rec.segs[&loc.seg].file.clone();
        let mut b = vec![0u8; 1024];
        read_record(f.as_ref(), &loc, loc.seg, &mut b).unwrap();
        assert_eq!(b, data(a.lba as u8, 2));
    }
    drop(rec);
    // And again after that replay started yet another segment.
    let (_, again) = replay_on(fs, dir, 40).unwrap();
    assert_eq!(again.len(), 15);
}

#[test]
fn recycled_segment_with_stale_records_replays_exactly_the_current_ones() {
    let pfs: DynWalFs = Arc::new(PowerLossFs::new());
    recycled_segments_replay_only_current_records(&pfs, Path::new(DIR), true);
    let padded: DynWalFs = Arc::new(PowerLossFs::padded());
    recycled_segments_replay_only_current_records(&padded, Path::new(DIR), false);
    // The real file system, both ways of writing.
    for io in [WalIo::Buffered, WalIo::Direct] {
        let dir = tempfile::tempdir().unwrap();
        recycled_segments_replay_only_current_records(&real_with(io), dir.path(), false);
    }
}

/// Written through the page cache, a released segment's records leave it
/// as the file becomes a spare (they are in the store): a host with many
/// volumes does not keep every volume's destaged log cached.
#[test]
fn a_recycled_segment_leaves_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let fs = real_with(WalIo::Buffered);
    let (wal, _, _) = start_on(&fs, dir.path(), 0, 64 << 10).unwrap();
    // 1 KiB records, flushed in batches of 8: several 64 KiB segments.
    for i in 0..30 {
        write_flushed(&wal, i * 8, 8);
    }
    let sealed = segments(&fs, dir.path());
    assert!(sealed.len() > 2, "the small limit rolls segments");
    let probe = |p: &Path| {
        let f = std::fs::File::open(p).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        crate::test_page_cache::resident_pages(&f, len)
    };
    let cached: usize = sealed.iter().map(|p| probe(p)).sum();
    if super::fs::tests::nothing_cached(cached) {
        return;
    }
    wal.release_upto(wal.last_seq());
    // Every file but the current segment (read without a scan, whose
    // reads would bring pages back in).
    let current = sealed.last().unwrap();
    let spares: Vec<_> = seg_files(&fs, dir.path())
        .into_iter()
        .filter(|p| p != current)
        .collect();
    assert!(!spares.is_empty(), "released segments became spares");
    let left: usize = spares.iter().map(|p| probe(p)).sum();
    assert!(
        left * 8 < cached,
        "{left} pages of {} spares still cached (the segments held {cached})",
        spares.len()
    );
}

/// Where the machine has a tmpfs (/dev/shm), O_DIRECT may be refused and
/// the log falls back to buffered writes: the same rules hold.
#[test]
fn recycling_works_without_o_direct() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        assert!(std::env::var("CI").is_err(), "/dev/shm is missing");
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    recycled_segments_replay_only_current_records(&real_with(WalIo::Direct), dir.path(), false);
}

/// A batch that ends inside a 4 KiB block is padded with zeros; the next
/// batch rewrites that block. If the device keeps the next batch's later
/// blocks but not its first one (blocks reach the disk in any order), the
/// log ends at the first batch: the padding is no record, the later blocks
/// are unreachable, and the next writer continues without a gap.
#[test]
fn torn_padded_tail_ends_the_log_at_the_last_whole_batch() {
    let pfs = PowerLossFs::padded();
    let fs: DynWalFs = Arc::new(pfs.clone());
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    assert_eq!(write_flushed(&wal, 0, 1), [1]);
    let seg = segments(&fs, dir).pop().unwrap();
    let after_a = pfs.contents(&seg).unwrap();
    let tail = 48 + 48 + 4 + 1024;
    assert!(
        after_a[tail..4096].iter().all(|&b| b == 0),
        "the rest of the block is padding"
    );
    // Batch B: four records, spanning into the next blocks.
    assert_eq!(write_flushed(&wal, 10, 4), [2, 3, 4, 5]);
    drop(wal);
    let mut torn = pfs.contents(&seg).unwrap();
    torn[..4096].copy_from_slice(&after_a[..4096]);
    pfs.overwrite(&seg, torn).unwrap();
    let (rec, replayed) = replay_on(&fs, dir, 0).unwrap();
    assert_eq!(replayed.iter().map(|a| a.seq).collect::<Vec<_>>(), [1]);
    assert_eq!(rec.next_seq, 2);
    drop(rec);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    assert_eq!(write_flushed(&wal, 20, 2), [2, 3]);
    drop(wal);
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    let got: Vec<_> = replayed.iter().map(|a| (a.seq, a.lba)).collect();
    assert_eq!(got, [(1, 0), (2, 20), (3, 21)]);
}

/// A file system whose `fdatasync` can be held.
#[derive(Debug, Default)]
struct SyncGate {
    held: Mutex<bool>,
    cv: Condvar,
    waiting: AtomicU64,
}

#[derive(Debug)]
struct GatedSyncFile(SegFile, Arc<SyncGate>);

impl WalFile for GatedSyncFile {
    fn overwrite_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.0.overwrite_at(buf, off)
    }
    fn writes_through(&self) -> bool {
        self.0.writes_through()
    }
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> std::io::Result<usize> {
        self.0.write_vectored_at(iov, off)
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, off)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let mut held = self.1.held.lock().unwrap();
        self.1.waiting.fetch_add(1, SeqCst);
        while *held {
            held = self.1.cv.wait(held).unwrap();
        }
        self.1.waiting.fetch_sub(1, SeqCst);
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
}

/// `pfs` with every file's `fdatasync` held while `gate` is held.
fn gated_sync(pfs: &PowerLossFs, gate: &Arc<SyncGate>) -> DynWalFs {
    let g = gate.clone();
    Arc::new(WrapFs {
        inner: Arc::new(pfs.clone()),
        wrap: Box::new(move |f| Arc::new(GatedSyncFile(f, g.clone()))),
    })
}

/// While batch B's `fdatasync` runs, batch C is written and acknowledged
/// (two batches in flight); power is lost before B's sync returns. Every
/// write acknowledged as durable (A) survives, and what replay returns is
/// a prefix of the log.
#[test]
fn power_loss_with_batches_in_flight_keeps_every_acknowledged_flush() {
    let pfs = PowerLossFs::padded();
    let gate = Arc::new(SyncGate::default());
    let fs: DynWalFs = gated_sync(&pfs, &gate);
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    // A: durable and acknowledged.
    assert_eq!(write_flushed(&wal, 0, 3), [1, 2, 3]);
    // B: a flush held in its fdatasync (after a write without flush, so
    // it cannot be a single durable write).
    let c0 = futures::executor::block_on(wal.append(RecordKind::Write, 50, 1, data(50, 1), false));
    assert_eq!(c0, Ok(4));
    *gate.held.lock().unwrap() = true;
    let b_done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let b = s.spawn(|| {
            let r = futures::executor::block_on(wal.append(
                RecordKind::Write,
                60,
                2,
                data(60, 2),
                true,
            ));
            b_done.store(true, SeqCst);
            r
        });
        while gate.waiting.load(SeqCst) == 0 {
            std::thread::yield_now();
        }
        // C is written and acknowledged while B's sync is in flight.
        let c =
            futures::executor::block_on(wal.append(RecordKind::Write, 70, 1, data(70, 1), false));
        assert_eq!(c, Ok(6));
        assert!(!b_done.load(SeqCst), "B is still waiting for its sync");
        pfs.lose_power();
        *gate.held.lock().unwrap() = false;
        gate.cv.notify_all();
        // B's acknowledgement comes after the power loss: not counted.
        let _ = b.join().unwrap();
    });
    drop(wal);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    let seqs: Vec<u64> = replayed.iter().map(|a| a.seq).collect();
    assert!(seqs.len() >= 3, "acknowledged flushes lost: {seqs:?}");
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

/// A flush with nothing unsynced costs no `fdatasync`; a flush after a
/// write does.
#[test]
fn a_flush_syncs_only_when_something_is_unsynced() {
    let pfs = PowerLossFs::new();
    let gate = Arc::new(SyncGate::default());
    let fs: DynWalFs = gated_sync(&pfs, &gate);
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    futures::executor::block_on(wal.sync()).unwrap();
    *gate.held.lock().unwrap() = true;
    // Nothing was written: this flush must not wait at the gate.
    futures::executor::block_on(wal.sync()).unwrap();
    assert_eq!(gate.waiting.load(SeqCst), 0);
    *gate.held.lock().unwrap() = false;
    gate.cv.notify_all();
    futures::executor::block_on(wal.append(RecordKind::Write, 1, 1, data(1, 1), false)).unwrap();
    futures::executor::block_on(wal.sync()).unwrap();
    drop(wal);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    assert_eq!(replayed.len(), 1, "the flush made the write durable");
}

/// A power cut after a roll into a recycled file: the file's first 4 KiB
/// block (its new header and first records) never reached the disk, so
/// it still reads as a spare, but the batch's later blocks did (a device
/// writes blocks in any order). Replay rightly ends the log before them.
/// The next writer reuses their seqs, in that file, at the same offsets;
/// replay after that must take its records only, never a record of the
/// lost writer that happens to continue its run.
#[test]
fn a_lost_writers_records_never_continue_a_later_writers_run() {
    let pfs = PowerLossFs::new();
    let fs: DynWalFs = Arc::new(pfs.clone());
    let dir = Path::new(DIR);
    // 8 KiB segments hold seven 1 KiB records.
    let (wal, _, _) = start_on(&fs, dir, 0, 8 << 10).unwrap();
    let seqs: Vec<u64> = (0..13).flat_map(|i| write_flushed(&wal, i, 1)).collect();
    assert_eq!(seqs, (1..=13).collect::<Vec<_>>());
    drop(wal);
    let scans = scan(&fs, dir, 9).unwrap();
    let last = scans
        .iter()
        .rfind(|s| !s.records.is_empty())
        .expect("a segment with records");
    let (path, recs) = (last.path.clone(), last.records.clone());
    drop(scans);
    let block = 4096;
    let lost = recs.iter().filter(|r| r.off < block).count();
    assert!(recs.len() > lost, "records past the first block: {recs:?}");
    // On the disk: the spare's first block, the rest as written.
    let mut bytes = pfs.contents(&path).unwrap();
    let spare = super::segment::encode_spare(9);
    bytes[..spare.len()].copy_from_slice(&spare);
    bytes[spare.len()..block as usize].fill(0);
    pfs.overwrite(&path, bytes).unwrap();
    fs.open(&path).unwrap().sync_data().unwrap();
    pfs.lose_power();
    let first_lost = recs[0].seq;
    // The next writer ends its log before the lost file's records, then
    // writes as many records of the same size as the lost block held.
    let (wal, _, replayed) = start_on(&fs, dir, 0, 8 << 10).unwrap();
    assert_eq!(replayed.last().map(|a| a.seq), Some(first_lost - 1));
    let new: Vec<u64> = (0..lost as u64)
        .flat_map(|i| write_flushed(&wal, 100 + i, 1))
        .collect();
    assert_eq!(new.first(), Some(&first_lost));
    drop(wal);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    let got: Vec<(u64, u64)> = replayed.iter().map(|a| (a.seq, a.lba)).collect();
    let mut want: Vec<(u64, u64)> = (1..first_lost).map(|s| (s, s - 1)).collect();
    want.extend(new.iter().zip(100..).map(|(&s, lba)| (s, lba)));
    assert_eq!(got, want, "a lost writer's record was replayed");
}
