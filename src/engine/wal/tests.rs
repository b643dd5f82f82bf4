//! WAL writer + replay tests on real files.

use std::sync::{Arc, Mutex};

use super::fs::real;
use super::record::RecordKind;
use super::replay::replay;
use super::{read_record, Appended, NewRecord, Wal};

fn data(seed: u8, sectors: usize) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| seed.wrapping_add(i as u8) | 1)
        .collect()
}

type Seen = Arc<Mutex<Vec<Appended>>>;

fn start(dir: &std::path::Path, after: u64, seg_limit: u64) -> (Wal, Seen, Vec<Appended>) {
    let mut replayed = Vec::new();
    let rec = replay(&real(), dir, 9, after, |a| replayed.push(a)).unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let wal = Wal::start(
        real(),
        dir,
        9,
        rec,
        seg_limit,
        Box::new(move |b: &[Appended]| s2.lock().unwrap().extend_from_slice(b)),
    )
    .unwrap();
    (wal, seen, replayed)
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
    let left = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(left, 1, "only the current segment stays");
}

#[test]
fn torn_tail_truncated_and_later_segments_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _, _) = start(dir.path(), 0, 1 << 20);
    let recs = (0..3u8)
        .map(|i| NewRecord {
            kind: RecordKind::Write,
            lba: u64::from(i),
            sectors: 2,
            data: data(i, 2),
        })
        .collect();
    for w in wal.submit_many(recs, true).unwrap() {
        futures::executor::block_on(w).unwrap();
    }
    drop(wal);
    let mut segs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let seg = segs.last().unwrap().clone();
    let len = std::fs::metadata(&seg).unwrap().len();
    // Cut the last record in half and put a bogus later segment after it.
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 300).unwrap();
    std::fs::write(dir.path().join("00000000000000ff.wal"), vec![7u8; 4096]).unwrap();
    let mut replayed = Vec::new();
    let rec = replay(&real(), dir.path(), 9, 0, |a| replayed.push(a)).unwrap();
    assert_eq!(replayed.len(), 2);
    assert!(replayed[0].more && replayed[1].more, "flags survive");
    assert_eq!(rec.next_seq, 3);
    assert!(!dir.path().join("00000000000000ff.wal").exists());
    let cut_len = std::fs::metadata(&seg).unwrap().len();
    assert!(cut_len < len - 300, "torn record removed");
    // A second replay sees exactly the same, with no error.
    let mut again = Vec::new();
    replay(&real(), dir.path(), 9, 0, |a| again.push(a)).unwrap();
    assert_eq!(again.len(), 2);
    // Another volume's WAL is refused and left alone.
    let before = std::fs::read(&seg).unwrap();
    let mut other = Vec::new();
    assert!(replay(&real(), dir.path(), 8, 0, |a| other.push(a)).is_err());
    assert!(other.is_empty());
    assert_eq!(std::fs::read(&seg).unwrap(), before);
}
