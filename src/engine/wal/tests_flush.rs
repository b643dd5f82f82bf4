//! Tests of how flushes are answered: a flush with nothing unsynced on the
//! caller's thread ([`super::durable`]); one with nothing queued straight
//! by the syncer (invariant 9 of [`super`]).

use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use futures::FutureExt;

use super::fs::DynWalFs;
use super::power_loss::PowerLossFs;
use super::record::RecordKind;
use super::tests::{data, gated, replay_on, start_on, Gate};
use super::WalError;

const DIR: &str = "/vol/wal";

/// A power-loss file system whose files sit behind a fresh [`Gate`].
fn gated_pfs() -> (PowerLossFs, Arc<Gate>, DynWalFs) {
    gate_pfs(PowerLossFs::padded())
}

/// `pfs` behind a gate.
fn gate_pfs(pfs: PowerLossFs) -> (PowerLossFs, Arc<Gate>, DynWalFs) {
    let gate = Arc::new(Gate::default());
    let fs = gated(Arc::new(pfs.clone()), &gate);
    (pfs, gate, fs)
}

fn write(wal: &super::Wal, lba: u64) -> Result<u64, WalError> {
    futures::executor::block_on(wal.append(RecordKind::Write, lba, 1, data(lba as u8, 1), false))
}

/// A WAL on `pfs` (gated), shared so tokio tasks
/// can write to it; no write recorded by the gate yet.
fn shared_wal(pfs: PowerLossFs) -> (PowerLossFs, Arc<Gate>, DynWalFs, Arc<super::Wal>) {
    let (pfs, gate, fs) = gate_pfs(pfs);
    let (wal, _, _) = start_on(&fs, Path::new(DIR), 0, 1 << 20).unwrap();
    gate.writer_threads.lock().unwrap().clear();
    (pfs, gate, fs, Arc::new(wal))
}

/// Stop `wal` (its last holder), cut the power, and replay: the seqs of
/// the records that survived.
fn seqs_after_power_cut(pfs: &PowerLossFs, fs: &DynWalFs, wal: Arc<super::Wal>) -> Vec<u64> {
    drop(Arc::into_inner(wal));
    pfs.lose_power();
    let (_, replayed) = replay_on(fs, Path::new(DIR), 0).unwrap();
    replayed.iter().map(|a| a.seq).collect()
}

/// A runtime of one worker thread, named `test-worker`, for writes sent
/// from a tokio task (invariant 11).
fn task_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("test-worker")
        .build()
        .unwrap()
}

/// Write blocks `lbas` from a task of `rt`, one at a time, each followed
/// by a flush when `flush_each`.
fn write_in_task(
    rt: &tokio::runtime::Runtime,
    wal: &Arc<super::Wal>,
    lbas: std::ops::Range<u64>,
    flush_each: bool,
) {
    let wal = wal.clone();
    rt.block_on(rt.spawn(async move {
        for lba in lbas {
            wal.append(RecordKind::Write, lba, 1, data(lba as u8, 1), false)
                .await
                .unwrap();
            if flush_each {
                wal.sync().await.unwrap();
            }
        }
    }))
    .unwrap();
}

/// Write blocks `0..rounds`, each followed by a flush.
fn commit_loop(wal: &super::Wal, rounds: u64) {
    for lba in 0..rounds {
        write(wal, lba).unwrap();
        futures::executor::block_on(wal.sync()).unwrap();
    }
}

/// A flush while the writer thread is stuck writing a record nobody was
/// told about yet is answered at once, on the caller's thread: every
/// acknowledged write is durable, and the stuck one was not acknowledged.
/// Before, the flush queued behind the stuck write.
#[test]
fn a_flush_with_nothing_unsynced_does_not_wait_for_the_writer() {
    let (pfs, gate, fs) = gated_pfs();
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    write(&wal, 1).unwrap();
    futures::executor::block_on(wal.sync()).unwrap();
    *gate.held.lock().unwrap() = true;
    std::thread::scope(|s| {
        let stuck = s.spawn(|| write(&wal, 2));
        while gate.waiting.load(SeqCst) == 0 {
            std::thread::yield_now();
        }
        let syncs = gate.syncs.load(SeqCst);
        let answered = wal.sync().now_or_never();
        let synced = gate.syncs.load(SeqCst) - syncs;
        // Let the writer go before asserting, so a failure cannot hang.
        *gate.held.lock().unwrap() = false;
        gate.cv.notify_all();
        assert_eq!(stuck.join().unwrap(), Ok(2));
        assert_eq!(
            answered,
            Some(Ok(())),
            "the flush waited for the writer thread"
        );
        assert_eq!(synced, 0, "no fdatasync");
    });
    // Now the second write is unsynced: the next flush syncs it.
    let syncs = gate.syncs.load(SeqCst);
    futures::executor::block_on(wal.sync()).unwrap();
    assert_eq!(gate.syncs.load(SeqCst) - syncs, 1);
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
    let (_pfs, gate, fs) = gated_pfs();
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    write(&wal, 1).unwrap();
    futures::executor::block_on(wal.sync()).unwrap();
    gate.full.store(true, SeqCst);
    assert!(matches!(write(&wal, 2), Err(WalError::NoSpace(_))));
    gate.full.store(false, SeqCst);
    let before = gate.syncs.load(SeqCst);
    futures::executor::block_on(wal.sync()).unwrap();
    assert_eq!(gate.syncs.load(SeqCst) - before, 1, "the cut is synced");
    // Now nothing is pending: the next flush is free.
    futures::executor::block_on(wal.sync()).unwrap();
    assert_eq!(gate.syncs.load(SeqCst) - before, 1);
    // The refused seq is reused.
    assert_eq!(write(&wal, 3), Ok(2));
}

/// A flush after acknowledged writes, with nothing queued, goes straight
/// to the syncer without the writer thread relaying it (invariant 9), and
/// still makes every acknowledged write survive a power cut, also when
/// the writer rolled to new segments between the writes. Before, every
/// flush went through the writer thread (`direct_syncs` stayed 0).
#[test]
fn flushes_of_acknowledged_writes_go_straight_to_the_syncer_and_survive_power_loss() {
    let (pfs, gate, fs) = gated_pfs();
    let dir = Path::new(DIR);
    // Small segments: 40 one-sector records need several rolls.
    let (wal, _, _) = start_on(&fs, dir, 0, 8 << 10).unwrap();
    let syncs = gate.syncs.load(SeqCst);
    // Two writes per flush: a flush after every single write would make
    // the writes durable as written instead (invariant 10).
    for lba in (0..40u64).step_by(2) {
        assert_eq!(write(&wal, lba), Ok(lba + 1));
        assert_eq!(write(&wal, lba + 1), Ok(lba + 2));
        futures::executor::block_on(wal.sync()).unwrap();
    }
    assert_eq!(wal.direct_syncs(), 20, "every flush went straight");
    assert!(
        gate.syncs.load(SeqCst) - syncs >= 20,
        "every flush synced something"
    );
    // One more write, acknowledged but never flushed: it may be lost.
    write(&wal, 40).unwrap();
    drop(wal);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    let seqs: Vec<u64> = replayed.iter().map(|a| a.seq).collect();
    assert!(seqs.len() >= 40, "flushed writes lost: {seqs:?}");
    assert_eq!(seqs[..40], (1..=40).collect::<Vec<_>>()[..]);
}

/// A flush sent while an append is still queued is ordered by the writer
/// (invariant 9): it is not answered before that append is written.
#[test]
fn a_flush_with_an_append_queued_waits_for_the_writer() {
    let (_pfs, gate, fs) = gated_pfs();
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    write(&wal, 1).unwrap();
    *gate.held.lock().unwrap() = true;
    std::thread::scope(|s| {
        let stuck = s.spawn(|| write(&wal, 2));
        while gate.waiting.load(SeqCst) == 0 {
            std::thread::yield_now();
        }
        // Record 1 is unsynced, record 2 queued: the writer must order it.
        let mut flush = Box::pin(wal.sync());
        let early = (&mut flush).now_or_never();
        *gate.held.lock().unwrap() = false;
        gate.cv.notify_all();
        assert_eq!(stuck.join().unwrap(), Ok(2));
        assert!(early.is_none(), "the flush overtook a queued append");
        futures::executor::block_on(flush).unwrap();
    });
    assert_eq!(wal.direct_syncs(), 0);
}

/// A client that flushes after every write has its next write made
/// durable as it is written (invariant 10), so the flush that follows
/// costs no `fdatasync` of its own. Before, every such flush was a hand-off
/// to the syncer thread and an `fdatasync` after a plain write.
#[test]
fn a_write_in_a_commit_loop_is_durable_as_written() {
    let (pfs, gate, fs) = gated_pfs();
    let dir = Path::new(DIR);
    let (wal, _, _) = start_on(&fs, dir, 0, 1 << 20).unwrap();
    commit_loop(&wal, 3);
    let syncs = gate.syncs.load(SeqCst);
    write(&wal, 3).unwrap();
    assert_eq!(
        gate.syncs.load(SeqCst) - syncs,
        1,
        "the write itself was made durable"
    );
    assert_eq!(wal.sync().now_or_never(), Some(Ok(())));
    assert_eq!(
        gate.syncs.load(SeqCst) - syncs,
        1,
        "the flush synced nothing"
    );
    drop(wal);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    assert_eq!(
        replayed.iter().map(|a| a.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
}

/// Writes that are not each followed by a flush are written plainly; the
/// flush after them syncs once.
#[test]
fn writes_without_a_flush_each_are_not_made_durable() {
    let (_pfs, gate, fs) = gated_pfs();
    let (wal, _, _) = start_on(&fs, Path::new(DIR), 0, 1 << 20).unwrap();
    commit_loop(&wal, 3);
    let syncs = gate.syncs.load(SeqCst);
    for lba in 3..8 {
        write(&wal, lba).unwrap();
    }
    assert_eq!(
        gate.syncs.load(SeqCst) - syncs,
        1,
        "only the first write of the run was predicted"
    );
    futures::executor::block_on(wal.sync()).unwrap();
    assert_eq!(gate.syncs.load(SeqCst) - syncs, 2);
    for lba in 8..12 {
        write(&wal, lba).unwrap();
    }
    assert_eq!(
        gate.syncs.load(SeqCst) - syncs,
        2,
        "the streak ended: no write was made durable"
    );
}

/// In a commit loop run by a tokio task on O_DIRECT segments, the
/// predicted write is written by the task's own thread (invariant 11): no
/// hand-off to the writer thread and back. It is still durable as
/// written. The same loop run outside a tokio task (as a ublk queue
/// thread is) keeps the hand-off. A lone FUA write from a task is also
/// written by its caller. Before invariant 11, every write was written by
/// the writer thread.
#[test]
fn a_predicted_write_from_a_tokio_task_is_written_by_its_caller() {
    let (pfs, gate, fs, wal) = shared_wal(PowerLossFs::padded());
    let rt = task_runtime();
    write_in_task(&rt, &wal, 0..4, true);
    let threads = std::mem::take(&mut *gate.writer_threads.lock().unwrap());
    let wal_thread = "shale-wal-9";
    // O_DIRECT segments (padded): until the pattern is learnt, a write
    // is not to be durable, so it goes to the writer thread.
    assert_eq!(threads[..2], [wal_thread, wal_thread], "{threads:?}");
    assert_eq!(threads[2..], ["test-worker", "test-worker"], "{threads:?}");
    // Outside a tokio task the writer thread writes, predicted or not.
    commit_loop(&wal, 2);
    let threads = std::mem::take(&mut *gate.writer_threads.lock().unwrap());
    assert_eq!(threads, [wal_thread, wal_thread], "{threads:?}");
    let syncs = gate.syncs.load(SeqCst);
    assert_eq!(wal.sync().now_or_never(), Some(Ok(())));
    assert_eq!(gate.syncs.load(SeqCst), syncs, "nothing was left unsynced");
    // End the streak (two writes in one flush), so the next write is
    // not predicted: a FUA write from a task is written by its caller.
    write(&wal, 7).unwrap();
    write(&wal, 8).unwrap();
    futures::executor::block_on(wal.sync()).unwrap();
    gate.writer_threads.lock().unwrap().clear();
    let in_task = wal.clone();
    rt.block_on(rt.spawn(async move {
        let fua = in_task.append(RecordKind::Write, 9, 1, data(9, 1), true);
        fua.await.unwrap();
    }))
    .unwrap();
    let threads = gate.writer_threads.lock().unwrap().clone();
    assert_eq!(threads, ["test-worker"], "{threads:?}");
    drop(rt);
    assert_eq!(
        seqs_after_power_cut(&pfs, &fs, wal),
        (1..=9).collect::<Vec<_>>()
    );
}

/// A client that never flushes (4 KiB random writes at queue depth 32
/// over NBD) has its lone writes from a tokio task written by the task's
/// own thread too when the WAL writes through the page cache: nothing is
/// synced until a flush asks, and then everything written is durable.
/// With O_DIRECT segments (the padded file system models them) the
/// writer thread still writes them, in batches. Before, only a write that
/// was FUA or predicted to be flushed was written by its caller.
#[test]
fn a_lone_write_that_no_flush_follows_is_written_by_its_caller() {
    let (pfs, gate, fs, wal) = shared_wal(PowerLossFs::new());
    let syncs = gate.syncs.load(SeqCst);
    let rt = task_runtime();
    write_in_task(&rt, &wal, 0..3, false);
    let threads = gate.writer_threads.lock().unwrap().clone();
    assert_eq!(threads, ["test-worker"; 3], "{threads:?}");
    assert_eq!(gate.syncs.load(SeqCst), syncs, "no write was synced");
    futures::executor::block_on(wal.sync()).unwrap();
    assert!(gate.syncs.load(SeqCst) > syncs, "the flush synced them");
    assert_eq!(seqs_after_power_cut(&pfs, &fs, wal), [1, 2, 3]);

    let (_pfs, gate, _fs, wal) = shared_wal(PowerLossFs::padded());
    write_in_task(&rt, &wal, 0..3, false);
    let threads = gate.writer_threads.lock().unwrap().clone();
    assert_eq!(threads, ["shale-wal-9"; 3], "{threads:?}");
}
