//! Tests of how flushes are answered: a flush with nothing unsynced on the
//! caller's thread ([`super::durable`]).

use std::io::IoSlice;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use futures::FutureExt;

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
    /// While set, plain writes fail with ENOSPC.
    full: AtomicBool,
    /// While set, plain writes wait (counted in `held`).
    hold: AtomicBool,
    held: AtomicU64,
}

#[derive(Debug)]
struct CountingFile(SegFile, Arc<Counts>);

impl WalFile for CountingFile {
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> std::io::Result<usize> {
        if self.1.hold.load(SeqCst) {
            self.1.held.fetch_add(1, SeqCst);
            while self.1.hold.load(SeqCst) {
                std::thread::yield_now();
            }
        }
        if self.1.full.load(SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.0.write_vectored_at(iov, off)
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

fn write(wal: &super::Wal, lba: u64) -> Result<u64, WalError> {
    futures::executor::block_on(wal.append(RecordKind::Write, lba, 1, data(lba as u8, 1), false))
}

/// A flush while the writer thread is stuck writing a record nobody was
/// told about yet is answered at once, on the caller's thread: every
/// acknowledged write is durable, and the stuck one was not acknowledged.
/// Before, the flush queued behind the stuck write.
#[test]
fn a_flush_with_nothing_unsynced_does_not_wait_for_the_writer() {
    let (pfs, counts, fs) = counting();
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    write(&wal, 1).unwrap();
    futures::executor::block_on(wal.sync()).unwrap();
    counts.hold.store(true, SeqCst);
    std::thread::scope(|s| {
        let stuck = s.spawn(|| write(&wal, 2));
        while counts.held.load(SeqCst) == 0 {
            std::thread::yield_now();
        }
        let syncs = counts.syncs.load(SeqCst);
        let answered = wal.sync().now_or_never();
        let synced = counts.syncs.load(SeqCst) - syncs;
        // Let the writer go before asserting, so a failure cannot hang.
        counts.hold.store(false, SeqCst);
        assert_eq!(stuck.join().unwrap(), Ok(2));
        assert_eq!(
            answered,
            Some(Ok(())),
            "the flush waited for the writer thread"
        );
        assert_eq!(synced, 0, "no fdatasync");
    });
    // Now the second write is unsynced: the next flush syncs it.
    let syncs = counts.syncs.load(SeqCst);
    futures::executor::block_on(wal.sync()).unwrap();
    assert_eq!(counts.syncs.load(SeqCst) - syncs, 1);
    drop(wal);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    assert_eq!(replayed.iter().map(|a| a.seq).collect::<Vec<_>>(), [1, 2]);
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
