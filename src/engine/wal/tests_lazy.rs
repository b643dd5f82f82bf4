//! Tests of rolls that leave the old segment unsynced (invariant 3 of the
//! WAL) and of what replay makes of them after a power cut (invariant 8 of
//! [`super::replay`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fs::DynWalFs;
use super::power_loss::PowerLossFs;
use super::record::RecordKind;
use super::scan::scan;
use super::tests::{data, replay_on, start_on};
use super::{NewRecord, Wal, WalError};

const DIR: &str = "/vol/wal";
/// 8 KiB segments hold seven 1 KiB records.
const SEG_LIMIT: u64 = 8 << 10;

/// Append `n` 2-sector writes at lba `first..`, one per batch (so each
/// is acknowledged before the next), none of them flushed.
fn write_unflushed(wal: &Wal, first: u64, n: u64) -> Vec<u64> {
    (first..first + n)
        .map(|i| {
            let w = wal.submit_many(
                vec![NewRecord {
                    kind: RecordKind::Write,
                    lba: i,
                    sectors: 2,
                    data: data(i as u8, 2),
                }],
                false,
            );
            let w = w.unwrap().pop().unwrap();
            futures::executor::block_on(w).unwrap()
        })
        .collect()
}

/// The segments of the WAL with records, oldest first: path, first seq,
/// last seq, prior durable.
fn runs(fs: &DynWalFs) -> Vec<(PathBuf, u64, u64, bool)> {
    scan(fs, Path::new(DIR), 9)
        .unwrap()
        .into_iter()
        .filter(|s| !s.spare && !s.records.is_empty())
        .map(|s| {
            let (a, b) = (s.records[0].seq, s.records[s.records.len() - 1].seq);
            (s.path, a, b, s.prior_durable)
        })
        .collect()
}

fn power_loss() -> (PowerLossFs, DynWalFs) {
    let pfs = PowerLossFs::new();
    let fs: DynWalFs = Arc::new(pfs.clone());
    (pfs, fs)
}

/// Writes no flush covers are not synced when the log moves to the next
/// segment: a power cut takes all of them, and replay finds no damage in
/// what is left. (Before, each roll synced the segment it left, so every
/// full segment survived the cut: the disk took each byte twice.)
#[test]
fn a_roll_leaves_unflushed_writes_unsynced() {
    let (pfs, fs) = power_loss();
    let (wal, _, _) = start_on(&fs, Path::new(DIR), 0, SEG_LIMIT).unwrap();
    let seqs = write_unflushed(&wal, 0, 30);
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    let before = runs(&fs);
    assert!(
        before.len() >= 4,
        "the small limit rolls segments: {before:?}"
    );
    assert!(
        before[1..].iter().all(|r| !r.3),
        "no segment after the first is prior durable: {before:?}"
    );
    drop(wal);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, Path::new(DIR), 0).unwrap();
    assert!(replayed.is_empty(), "nothing was flushed: {replayed:?}");
}

/// A flush after several unsynced rolls syncs every segment before the
/// current one, then flags the current one: everything it covers
/// survives the cut, and the flag is on the disk.
#[test]
fn a_flush_after_rolls_makes_every_earlier_segment_durable() {
    let (pfs, fs) = power_loss();
    let (wal, _, _) = start_on(&fs, Path::new(DIR), 0, SEG_LIMIT).unwrap();
    write_unflushed(&wal, 0, 30);
    futures::executor::block_on(wal.sync()).unwrap();
    // Written after the flush: may be lost, and nothing else with them.
    write_unflushed(&wal, 100, 3);
    drop(wal);
    pfs.lose_power();
    let after = runs(&fs);
    assert!(after.last().is_some_and(|r| r.3), "flagged: {after:?}");
    let (_, replayed) = replay_on(&fs, Path::new(DIR), 0).unwrap();
    let seqs: Vec<u64> = replayed.iter().map(|a| a.seq).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
}

/// The kernel may write a later segment back before an earlier one: after
/// the cut the earlier one lacks records the later one follows. No flush
/// covered them, so replay ends the log there (not "damaged"), drops the
/// later segments, and the next writer goes on from there; its flushed
/// writes survive a second cut.
#[test]
fn a_later_segment_written_back_first_ends_the_log_without_damage() {
    let (pfs, fs) = power_loss();
    let (wal, _, _) = start_on(&fs, Path::new(DIR), 0, SEG_LIMIT).unwrap();
    futures::executor::block_on(wal.sync()).unwrap();
    write_unflushed(&wal, 0, 30);
    let before = runs(&fs);
    assert!(before.len() >= 4, "{before:?}");
    // The third segment reaches the disk, the two before it do not.
    let (third, third_first) = (before[2].0.clone(), before[2].1);
    fs.open(&third).unwrap().sync_data().unwrap();
    drop(wal);
    pfs.lose_power();
    assert_eq!(
        runs(&fs).len(),
        1,
        "only the written-back segment holds records"
    );
    let (wal, _, replayed) = start_on(&fs, Path::new(DIR), 0, SEG_LIMIT).unwrap();
    assert!(replayed.is_empty(), "{replayed:?}");
    assert!(
        fs.open(&third).is_err(),
        "the segment after the loss is deleted"
    );
    let seqs = write_unflushed(&wal, 200, 10);
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<_>>(),
        "seqs go on after the loss"
    );
    assert!(third_first > 1);
    futures::executor::block_on(wal.sync()).unwrap();
    drop(wal);
    pfs.lose_power();
    let (_, replayed) = replay_on(&fs, Path::new(DIR), 0).unwrap();
    let seqs: Vec<u64> = replayed.iter().map(|a| a.seq).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    assert!(
        replayed.iter().all(|a| a.lba >= 200),
        "only the new writer's records"
    );
}

/// Once a later segment is flagged prior durable, records missing from an
/// earlier one are damage, as before: a flush covered them.
#[test]
fn records_missing_before_a_flagged_segment_are_damage() {
    let (pfs, fs) = power_loss();
    let (wal, _, _) = start_on(&fs, Path::new(DIR), 0, SEG_LIMIT).unwrap();
    write_unflushed(&wal, 0, 30);
    futures::executor::block_on(wal.sync()).unwrap();
    drop(wal);
    let segs = runs(&fs);
    assert!(segs.len() >= 4 && segs.last().unwrap().3, "{segs:?}");
    // Damage the second segment's last record, durably.
    let (path, _, last, _) = segs[1].clone();
    let mut bytes = pfs.contents(&path).unwrap();
    let rec = scan(&fs, Path::new(DIR), 9)
        .unwrap()
        .into_iter()
        .flat_map(|s| s.records)
        .find(|r| r.seq == last)
        .unwrap();
    bytes[rec.data_off as usize] ^= 0x40;
    pfs.overwrite(&path, bytes).unwrap();
    fs.open(&path).unwrap().sync_data().unwrap();
    pfs.lose_power();
    match replay_on(&fs, Path::new(DIR), 0) {
        Err(WalError::Damaged { path: p, .. }) => {
            assert_eq!(p, path.display().to_string());
        }
        other => panic!("expected damage, got {:?}", other.map(|r| r.1.len())),
    }
}

/// Segments released (their records in the store) are never synced, and
/// a flush does not sync them either: only the header of the spare each
/// becomes is made durable.
#[test]
fn released_unsynced_segments_become_spares_without_their_records() {
    let (pfs, fs) = power_loss();
    let (wal, _, _) = start_on(&fs, Path::new(DIR), 0, SEG_LIMIT).unwrap();
    write_unflushed(&wal, 0, 30);
    let segs = runs(&fs);
    let released = segs[segs.len() - 2].2;
    wal.release_upto(released);
    futures::executor::block_on(wal.sync()).unwrap();
    drop(wal);
    pfs.lose_power();
    // Replay as a store holding everything up to `released` would.
    let (_, replayed) = replay_on(&fs, Path::new(DIR), released).unwrap();
    let seqs: Vec<u64> = replayed.iter().map(|a| a.seq).collect();
    assert_eq!(seqs, (released + 1..=30).collect::<Vec<_>>());
    let spares = scan(&fs, Path::new(DIR), 9)
        .unwrap()
        .into_iter()
        .filter(|s| s.spare)
        .count();
    assert!(spares > 0, "released segments became spares");
}
