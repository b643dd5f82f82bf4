//! Tests of how flushes are answered: a flush with nothing unsynced on the
//! caller's thread, and writes made durable when a flush is expected to
//! follow them ([`super::durable`]).

use std::io::IoSlice;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use super::fs::{DynWalFs, SegFile, WalFile};
use super::power_loss::PowerLossFs;
use super::record::RecordKind;
use super::tests::{data, replay_on, start_on, WrapFs};
use super::WalError;

const DIR: &str = "/vol/wal";

/// Counts of what reached the files.
#[derive(Debug, Default)]
struct Counts {
    /// `fdatasync` calls.
    syncs: AtomicU64,
    /// Durable (`RWF_DSYNC`-like) writes.
    durable_writes: AtomicU64,
    /// Plain writes.
    plain_writes: AtomicU64,
    /// While set, plain writes fail with ENOSPC.
    full: AtomicBool,
}

#[derive(Debug)]
struct CountingFile(SegFile, Arc<Counts>);

impl WalFile for CountingFile {
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> std::io::Result<usize> {
        if self.1.full.load(SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.1.plain_writes.fetch_add(1, SeqCst);
        self.0.write_vectored_at(iov, off)
    }
    fn write_durable_at(&self, iov: &[IoSlice<'_>], off: u64) -> std::io::Result<()> {
        self.1.durable_writes.fetch_add(1, SeqCst);
        self.0.write_durable_at(iov, off)
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, off)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.1.syncs.fetch_add(1, SeqCst);
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
}

fn counting() -> (PowerLossFs, Arc<Counts>, DynWalFs) {
    let pfs = PowerLossFs::padded();
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    let fs: DynWalFs = Arc::new(WrapFs {
        inner: Arc::new(pfs.clone()),
        wrap: Box::new(move |f| Arc::new(CountingFile(f, c.clone()))),
    });
    (pfs, counts, fs)
}

/// (syncs, durable writes, plain writes) so far.
fn snapshot(c: &Counts) -> (u64, u64, u64) {
    (
        c.syncs.load(SeqCst),
        c.durable_writes.load(SeqCst),
        c.plain_writes.load(SeqCst),
    )
}

fn write(wal: &super::Wal, lba: u64) -> Result<u64, WalError> {
    futures::executor::block_on(wal.append(RecordKind::Write, lba, 1, data(lba as u8, 1), false))
}

/// At queue depth 1, a write then a flush, ten times: after two rounds the
/// writes are made durable themselves and the flushes cost no
/// `fdatasync`. After a power cut every flushed write is there.
#[test]
fn flushes_after_every_write_turn_the_writes_durable() {
    let (pfs, counts, fs) = counting();
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    let (syncs0, durable0, plain0) = snapshot(&counts);
    for i in 0..10 {
        assert_eq!(write(&wal, i), Ok(i + 1));
        futures::executor::block_on(wal.sync()).unwrap();
    }
    let (syncs, durable, plain) = snapshot(&counts);
    assert_eq!(
        (syncs - syncs0, durable - durable0, plain - plain0),
        (2, 8, 2),
        "(fdatasyncs, durable writes, plain writes) for ten write+flush rounds"
    );
    drop(wal);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    let seqs: Vec<u64> = replayed.iter().map(|a| a.seq).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
}

/// Writes with no flush between them are never made durable on a guess,
/// and a flush after them syncs once.
#[test]
fn writes_without_flushes_stay_plain() {
    let (pfs, counts, fs) = counting();
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    let (syncs0, durable0, _) = snapshot(&counts);
    // A streak first: the hint is on when the write-only stream starts.
    for i in 0..4 {
        write(&wal, i).unwrap();
        futures::executor::block_on(wal.sync()).unwrap();
    }
    let (syncs1, durable1, _) = snapshot(&counts);
    assert_eq!((syncs1 - syncs0, durable1 - durable0), (2, 2));
    for i in 4..24 {
        write(&wal, i).unwrap();
    }
    let (syncs2, durable2, _) = snapshot(&counts);
    assert_eq!(
        (syncs2 - syncs1, durable2 - durable1),
        (0, 1),
        "only the first write after the streak is guessed durable"
    );
    futures::executor::block_on(wal.sync()).unwrap();
    assert_eq!(counts.syncs.load(SeqCst) - syncs2, 1);
    drop(wal);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    assert_eq!(replayed.len(), 24);
}

/// After a batch was refused with ENOSPC (its segment cut back), a flush
/// is not answered on the caller's thread even though every seq is
/// durable: the cut must be synced first.
#[test]
fn a_flush_after_a_refused_batch_syncs_the_cut() {
    let (_pfs, counts, fs) = counting();
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    write(&wal, 1).unwrap();
    futures::executor::block_on(wal.sync()).unwrap();
    counts.full.store(true, SeqCst);
    assert!(matches!(write(&wal, 2), Err(WalError::NoSpace(_))));
    counts.full.store(false, SeqCst);
    let before = counts.syncs.load(SeqCst);
    futures::executor::block_on(wal.sync()).unwrap();
    assert_eq!(counts.syncs.load(SeqCst) - before, 1, "the cut is synced");
    // Now nothing is pending: the next flush is free.
    futures::executor::block_on(wal.sync()).unwrap();
    assert_eq!(counts.syncs.load(SeqCst) - before, 1);
    // The refused seq is reused.
    assert_eq!(write(&wal, 3), Ok(2));
}
