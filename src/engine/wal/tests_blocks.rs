//! Records with a CRC per 4 KiB block: partial reads, damage, and replay
//! of the records older releases wrote (one CRC per record).

use std::io::IoSlice;
use std::path::Path;
use std::sync::Arc;

use super::fs::DynWalFs;
use super::power_loss::PowerLossFs;
use super::record::{RecordHeader, RecordKind, HEADER_LEN};
use super::tests::{data, replay_on, segments, start_on, STAMP};
use super::{read_record, read_record_cached, segment, Appended, WalError};
use crate::engine::map::WalLoc;

const DIR: &str = "/vol/wal";

/// Append one flushed write of `sectors` sectors at `lba`; returns what
/// the log handed to `apply` for it.
fn write(fs: &DynWalFs, after: u64, lba: u64, d: Vec<u8>) -> Appended {
    let (wal, seen, _) = start_on(fs, Path::new(DIR), after, 64 << 20).unwrap();
    let sectors = d.len() as u64 / 512;
    futures::executor::block_on(wal.append(RecordKind::Write, lba, sectors, d, true)).unwrap();
    drop(wal);
    let seen = seen.lock().unwrap();
    seen.last().copied().unwrap()
}

fn read(fs: &DynWalFs, loc: &WalLoc, skip: u64, len: usize) -> Result<Vec<u8>, WalError> {
    let path = Path::new(DIR).join(format!("{:016x}.wal", loc.seg));
    let f = fs.open(&path).unwrap();
    let mut b = vec![0u8; len];
    let loc = WalLoc { skip, ..*loc };
    read_record(f.as_ref(), &loc, loc.seg, &mut b).map(|_| b)
}

/// Flip one bit at `off` of segment `seg`.
fn flip(fs: &DynWalFs, seg: u64, off: u64) {
    let path = Path::new(DIR).join(format!("{seg:016x}.wal"));
    let f = fs.open(&path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 4;
    f.write_vectored_at(&[IoSlice::new(&b)], off).unwrap();
}

/// A request is one record; any sector range of it reads back, also one
/// that ends in the short last block of a size that is no multiple of 4 KiB.
#[test]
fn any_sector_range_of_a_big_record_reads_back() {
    let fs: DynWalFs = Arc::new(PowerLossFs::new());
    let sectors = 2048 + 3; // 1 MiB and 1.5 KiB
    let d = data(7, sectors);
    let a = write(&fs, 0, 10, d.clone());
    let loc = a.loc.unwrap();
    assert!(loc.block_crcs);
    assert_eq!((a.seq, a.sectors, a.more), (1, sectors as u64, false));
    for (skip, n) in [
        (0, 1),
        (7, 2),
        (8, 8),
        (1000, 33),
        (2040, 11),
        (2050, 1),
        (0, 2051),
    ] {
        let got = read(&fs, &loc, skip, n * 512).unwrap();
        let want = &d[skip as usize * 512..(skip as usize + n) * 512];
        assert!(got == want, "sectors {skip}+{n}");
    }
    // Past the record's end is an error, not data.
    assert!(read(&fs, &loc, 2050, 1024).is_err());
    // Replay finds the same record at the same place.
    let (_, replayed) = replay_on(&fs, Path::new(DIR), 0).unwrap();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].loc, Some(loc));
}

/// A bad block fails the reads that cover it and no others; replay then
/// treats the whole record as damaged, by the torn-record rules.
#[test]
fn a_bad_block_fails_its_reads_and_its_record_at_replay() {
    let fs: DynWalFs = Arc::new(PowerLossFs::new());
    let d = data(3, 2048);
    let a = write(&fs, 0, 0, d.clone());
    let loc = a.loc.unwrap();
    // Block 100 (sectors 800..808) goes bad.
    flip(&fs, loc.seg, loc.data_off + 100 * 4096 + 17);
    let err = read(&fs, &loc, 803, 512).unwrap_err();
    assert!(matches!(err, WalError::Corrupt { .. }), "{err:?}");
    assert!(read(&fs, &loc, 790, 20 * 512).is_err(), "a read across it");
    assert!(read(&fs, &loc, 792, 8 * 512).unwrap() == d[792 * 512..800 * 512]);
    assert!(read(&fs, &loc, 808, 8 * 512).unwrap() == d[808 * 512..816 * 512]);

    // In the newest segment the record counts as torn: cut, not replayed.
    let (rec, replayed) = replay_on(&fs, Path::new(DIR), 0).unwrap();
    assert!(replayed.is_empty());
    assert_eq!(rec.next_seq, 1);
    drop(rec);

    // In an older segment it is corruption: replay refuses, naming it.
    let a = write(&fs, 0, 0, d.clone());
    let loc = a.loc.unwrap();
    assert_eq!(a.seq, 1);
    write(&fs, 0, 4096, data(4, 8));
    let table_entry = loc.data_off - 256 * 4 + 5 * 4;
    flip(&fs, loc.seg, table_entry);
    assert!(read(&fs, &loc, 40, 8 * 512).is_err(), "bad table entry");
    assert!(read(&fs, &loc, 48, 8 * 512).is_ok());
    let err = replay_on(&fs, Path::new(DIR), 0).unwrap_err();
    match err {
        WalError::Damaged {
            offset, last_good, ..
        } => assert_eq!(
            (offset, last_good),
            (loc.data_off - 1024 - HEADER_LEN as u64, 0)
        ),
        other => panic!("expected Damaged, got {other:?}"),
    }
}

/// Bytes of an old (kind 1) record: one CRC over all its data.
fn old_record(seq: u64, kind: RecordKind, lba: u64, d: &[u8], sectors: u64, more: bool) -> Vec<u8> {
    let h = RecordHeader {
        kind,
        volume: 9,
        seq,
        lba,
        sectors,
        data_crc: crc32c::crc32c(d),
        more,
        block_crcs: false,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(d);
    v
}

/// A WAL written by the previous release (a 96 KiB request as three chained
/// 32 KiB records, a zero record) replays and reads back; the log then
/// appends new records after it, and both kinds replay together.
#[test]
fn records_of_the_previous_release_replay() {
    let fs: DynWalFs = Arc::new(PowerLossFs::new());
    let dir = Path::new(DIR);
    fs.create_dir_all(dir).unwrap();
    let d = data(9, 192);
    let mut seg = segment::encode_v1(9, STAMP).to_vec();
    for i in 0..3u64 {
        let piece = &d[(i * 32768) as usize..((i + 1) * 32768) as usize];
        seg.extend(old_record(
            1 + i,
            RecordKind::Write,
            100 + i * 64,
            piece,
            64,
            i < 2,
        ));
    }
    seg.extend(old_record(4, RecordKind::Zero, 500, &[], 16, false));
    let f = fs.create(&dir.join(format!("{:016x}.wal", 1))).unwrap();
    f.write_vectored_at(&[IoSlice::new(&seg)], 0).unwrap();
    f.sync_data().unwrap();
    fs.sync_dir(dir).unwrap();

    let (rec, replayed) = replay_on(&fs, dir, 0).unwrap();
    drop(rec);
    let kinds: Vec<_> = replayed
        .iter()
        .map(|a| (a.seq, a.kind, a.lba, a.more))
        .collect();
    assert_eq!(
        kinds,
        [
            (1, RecordKind::Write, 100, true),
            (2, RecordKind::Write, 164, true),
            (3, RecordKind::Write, 228, false),
            (4, RecordKind::Zero, 500, false),
        ]
    );
    for (i, a) in replayed[..3].iter().enumerate() {
        let loc = a.loc.unwrap();
        assert!(!loc.block_crcs);
        let base = i * 32768;
        assert!(read(&fs, &loc, 0, 32768).unwrap() == d[base..base + 32768]);
        assert!(read(&fs, &loc, 5, 1024).unwrap() == d[base + 2560..base + 3584]);
    }
    // A damaged old record still fails its reads.
    let loc = replayed[1].loc.unwrap();
    flip(&fs, 1, loc.data_off + 30000);
    assert!(read(&fs, &loc, 0, 512).is_err());
    flip(&fs, 1, loc.data_off + 30000);

    // The log goes on after the old records, in the new format.
    let a = write(&fs, 0, 900, data(1, 16));
    assert_eq!(a.seq, 5);
    assert!(a.loc.unwrap().block_crcs);
    let (_, replayed) = replay_on(&fs, dir, 0).unwrap();
    let seqs: Vec<(u64, bool)> = replayed
        .iter()
        .map(|a| (a.seq, a.loc.is_some_and(|l| l.block_crcs)))
        .collect();
    assert_eq!(
        seqs,
        [(1, false), (2, false), (3, false), (4, false), (5, true)]
    );
    assert_eq!(segments(&fs, dir).len(), 3);
}

/// The page-cache-only read gives the blocking read's bytes or declines,
/// never other bytes: a file system that cannot tell always declines, and
/// on a real one a record read once (so cached) is served, checked.
#[test]
fn a_cached_read_serves_cached_records_and_declines_otherwise() {
    let fake: DynWalFs = Arc::new(PowerLossFs::new());
    let d = data(5, 64);
    let loc = write(&fake, 0, 0, d.clone()).loc.unwrap();
    let path = Path::new(DIR).join(format!("{:016x}.wal", loc.seg));
    let f = fake.open(&path).unwrap();
    let mut b = vec![0u8; 4096];
    assert!(!read_record_cached(f.as_ref(), &loc, loc.seg, &mut b).unwrap());

    let dir = tempfile::tempdir().unwrap();
    let real = super::fs::real();
    let (wal, seen, _) = start_on(&real, dir.path(), 0, 64 << 20).unwrap();
    futures::executor::block_on(wal.append(RecordKind::Write, 8, 64, d.clone(), true)).unwrap();
    drop(wal);
    let loc = seen.lock().unwrap().last().unwrap().loc.unwrap();
    let f = real
        .open(&dir.path().join(format!("{:016x}.wal", loc.seg)))
        .unwrap();
    for (skip, n) in [(0u64, 64usize), (3, 5), (8, 8), (60, 4)] {
        let want = &d[skip as usize * 512..(skip as usize + n) * 512];
        let loc = WalLoc { skip, ..loc };
        let mut got = vec![0u8; n * 512];
        read_record(f.as_ref(), &loc, loc.seg, &mut got).unwrap();
        assert!(got == want, "blocking read of sectors {skip}+{n}");
        // Just read through the page cache: served from it.
        let mut cached = vec![0u8; n * 512];
        assert!(read_record_cached(f.as_ref(), &loc, loc.seg, &mut cached).unwrap());
        assert!(cached == want, "cached read of sectors {skip}+{n}");
    }
    // A damaged cached block is an error, never data.
    f.write_vectored_at(&[IoSlice::new(&[0xaa])], loc.data_off + 4096 + 9)
        .unwrap();
    let loc = WalLoc { skip: 8, ..loc };
    // Read it all back in through the page cache (the write bypassed it).
    let mut all = vec![0u8; (loc.data_off + 64 * 512) as usize];
    f.read_exact_at(&mut all, 0).unwrap();
    let mut got = vec![0u8; 4096];
    let err = read_record_cached(f.as_ref(), &loc, loc.seg, &mut got).unwrap_err();
    assert!(matches!(err, WalError::Corrupt { .. }), "{err:?}");
}
