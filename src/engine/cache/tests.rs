use super::*;

const OWNER: &[u8] = b"volume dir A";

impl Cache {
    fn open_test(dir: &Path, size: u64) -> Result<Option<Cache>, OpenError> {
        Cache::open(dir, size, OWNER)
    }
}

fn id(seq: u64, window: u64) -> WindowId {
    WindowId {
        volume: 7,
        seq,
        epoch: 1,
        window,
        tag: 0,
    }
}

/// Block CRCs for a window of `len` bytes (the cache only stores them).
fn zero_crcs(len: u64) -> Vec<u32> {
    vec![0; record::crcs_for(len)]
}

fn full() -> Range<u64> {
    0..SLOT
}

#[test]
fn hit_miss_and_eviction() {
    let dir = tempfile::tempdir().unwrap();
    assert!(Cache::open_test(dir.path(), SLOT - 1).unwrap().is_none());
    let c = Cache::open_test(dir.path(), 2 * SLOT).unwrap().unwrap();
    let a = vec![1u8; SLOT as usize];
    let b = vec![2u8; 1000];
    let mut buf = vec![0u8; SLOT as usize];
    assert!(c.get(&id(1, 0), 0, &mut buf, full()).is_none());
    c.put(
        &id(1, 0),
        &crate::engine::format::chunk::block_crcs(&a),
        &a,
        full(),
    );
    c.put(
        &id(2, 5),
        &crate::engine::format::chunk::block_crcs(&b),
        &b,
        0..1000,
    );
    assert!(c.get(&id(1, 0), 0, &mut buf, full()).is_some());
    let mut part = vec![0u8; 4096];
    assert!(c.get(&id(1, 0), 8192, &mut part, 8192..12288).is_some());
    assert!(c.get(&id(1, 0), SLOT - 100, &mut part, 0..0).is_none());
    assert_eq!(buf, a);
    let mut small = vec![0u8; 1000];
    assert!(c.get(&id(2, 5), 0, &mut small, 0..1000).is_some());
    assert_eq!(small, b);
    // Past the stored length of a short window: a miss.
    assert!(c.get(&id(2, 5), 0, &mut part, 0..0).is_none());
    // A third window evicts one of the two.
    c.put(
        &id(3, 0),
        &crate::engine::format::chunk::block_crcs(&a),
        &a,
        full(),
    );
    let hits = [(1, 0), (2, 5), (3, 0)]
        .iter()
        .filter(|&&(ch, w)| c.get(&id(ch, w), 0, &mut [0u8; 10], 0..0).is_some())
        .count();
    assert_eq!(hits, 2);
    assert_eq!(c.evictions(), 1);
    // Another volume's (a clone's parent's) chunk with the same seq, another
    // epoch's, or another object under the same name (another tag) is
    // another window.
    let dir = tempfile::tempdir().unwrap();
    let c = Cache::open_test(dir.path(), 2 * SLOT).unwrap().unwrap();
    c.put(
        &id(3, 0),
        &crate::engine::format::chunk::block_crcs(&b),
        &b,
        0..0,
    );
    let mut other = vec![0u8; 1000];
    for o in [
        WindowId {
            volume: 8,
            ..id(3, 0)
        },
        WindowId {
            epoch: 2,
            ..id(3, 0)
        },
        WindowId { tag: 1, ..id(3, 0) },
    ] {
        assert!(c.get(&o, 0, &mut other, 0..0).is_none(), "{o:?}");
    }
    assert!(c.get(&id(3, 0), 0, &mut other, 0..0).is_some());
    assert_eq!(other, b);
}

/// A read inside a window returns the bytes at that offset, not the
/// window's first bytes.
#[test]
fn reads_inside_a_window_honour_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap();
    let mut d = vec![0u8; SLOT as usize];
    for (i, b) in d.iter_mut().enumerate() {
        *b = (i / 4096) as u8;
    }
    c.put(
        &id(4, 2),
        &crate::engine::format::chunk::block_crcs(&d),
        &d,
        full(),
    );
    for block in [0u64, 3, 15] {
        let mut inside = vec![0xffu8; 4096];
        assert!(c.get(&id(4, 2), block * 4096, &mut inside, 0..0).is_some());
        assert_eq!(inside, vec![block as u8; 4096]);
    }
}

fn pattern(seed: u64) -> Vec<u8> {
    (0..SLOT).map(|i| (i * 7 + seed * 13) as u8).collect()
}

/// Entries survive a reopen (the files are kept, the index is rebuilt
/// from the index file), and a discarded entry does not come back.
#[test]
fn entries_survive_reopen_and_discard_is_persistent() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = Cache::open_test(dir.path(), 8 * SLOT).unwrap().unwrap();
        for s in 0..6 {
            c.put(
                &id(s, 0),
                &crate::engine::format::chunk::block_crcs(&pattern(s)),
                &pattern(s),
                full(),
            );
        }
        let mut buf = vec![0u8; 16];
        let hit = c.get(&id(5, 0), 0, &mut buf, 0..16).unwrap();
        assert!(c.discard(hit));
        // A stale hit (the slot was discarded already) drops nothing.
        assert!(!c.discard(hit));
    }
    let c = Cache::open_test(dir.path(), 8 * SLOT).unwrap().unwrap();
    assert_eq!(c.restored(), 5);
    for s in 0..5 {
        let mut buf = vec![0u8; SLOT as usize];
        assert!(
            c.get(&id(s, 0), 0, &mut buf, full()).is_some(),
            "window {s}"
        );
        assert!(buf == pattern(s), "window {s} holds other bytes");
    }
    assert!(c.get(&id(5, 0), 0, &mut [0u8; 16], 0..0).is_none());
    // Shrinking keeps what fits.
    drop(c);
    let c = Cache::open_test(dir.path(), 2 * SLOT).unwrap().unwrap();
    assert!(c.restored() <= 2);
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&dir.path().join(DATA_FILE)), 0o600);
    assert_eq!(mode(&dir.path().join(INDEX_FILE)), 0o600);
}

/// A damaged index never fails the open and never names wrong data: a
/// bad header starts cold, a bad record frees its slot.
#[test]
fn damaged_index_starts_cold_or_drops_records() {
    let dir = tempfile::tempdir().unwrap();
    let fill = || {
        let c = Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap();
        for s in 0..4 {
            c.put(
                &id(s, 0),
                &crate::engine::format::chunk::block_crcs(&pattern(s)),
                &pattern(s),
                full(),
            );
        }
    };
    let index = dir.path().join(INDEX_FILE);
    fill();
    // One flipped bit in record 2.
    let mut bytes = std::fs::read(&index).unwrap();
    bytes[3 * RECORD + 20] ^= 4;
    std::fs::write(&index, &bytes).unwrap();
    let c = Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap();
    assert_eq!(c.restored(), 3);
    drop(c);
    // Garbage header, truncated file, empty file: all cold.
    for damage in [
        |b: &mut Vec<u8>| b[5] ^= 1,
        |b: &mut Vec<u8>| b.truncate(30),
        |b: &mut Vec<u8>| b.clear(),
    ] {
        fill();
        let mut bytes = std::fs::read(&index).unwrap();
        damage(&mut bytes);
        std::fs::write(&index, &bytes).unwrap();
        let c = Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap();
        assert_eq!(c.restored(), 0);
        for s in 0..4 {
            assert!(c.get(&id(s, 0), 0, &mut [0u8; 8], 0..0).is_none());
        }
        // And it works.
        c.put(
            &id(9, 0),
            &crate::engine::format::chunk::block_crcs(&pattern(9)),
            &pattern(9),
            full(),
        );
        let mut buf = vec![0u8; SLOT as usize];
        assert!(c.get(&id(9, 0), 0, &mut buf, full()).is_some());
        assert!(buf == pattern(9));
    }
    // A truncated data file: records past its end are dropped.
    fill();
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(DATA_FILE))
        .unwrap();
    data.set_len(2 * SLOT).unwrap();
    let c = Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap();
    assert_eq!(c.restored(), 2);
}

/// Reads that touch new sectors of a window (a sequential scan) are not
/// reuse; reading the same sectors again is.
#[test]
fn sequential_reads_inside_a_window_are_not_reuse() {
    assert_eq!(mask(&(0..512)), 1);
    assert_eq!(mask(&(512..1024)), 2);
    assert_eq!(mask(&(0..SLOT)), u128::MAX);
    assert_eq!(mask(&(100..100)), 0);
    assert_eq!(mask(&(SLOT - 1..SLOT)), 1 << 127);
    let dir = tempfile::tempdir().unwrap();
    // 20 slots: 2 small, 18 main.
    let c = Cache::open_test(dir.path(), 20 * SLOT).unwrap().unwrap();
    // Window 0 is read 4 KiB at a time, front to back (as a scan does):
    // never reused, so a later flood pushes it out.
    c.put(
        &id(0, 0),
        &crate::engine::format::chunk::block_crcs(&pattern(0)),
        &pattern(0),
        0..4096,
    );
    let mut b = vec![0u8; 4096];
    for k in 1..16 {
        assert!(c
            .get(&id(0, 0), k * 4096, &mut b, k * 4096..(k + 1) * 4096)
            .is_some());
    }
    // Window 1 is read twice at the same place: hot.
    c.put(
        &id(1, 0),
        &crate::engine::format::chunk::block_crcs(&pattern(1)),
        &pattern(1),
        0..4096,
    );
    assert!(c.get(&id(1, 0), 0, &mut b, 0..4096).is_some());
    for s in 100..200 {
        c.put(
            &id(s, 0),
            &crate::engine::format::chunk::block_crcs(&pattern(s)),
            &pattern(s),
            full(),
        );
    }
    assert!(c.get(&id(0, 0), 0, &mut b, 0..0).is_none());
    assert!(c.get(&id(1, 0), 0, &mut b, 0..0).is_some());
}

/// Index RAM per cached GiB stays small (reported in the docs).
#[test]
fn index_memory_per_gib_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cache::open_test(dir.path(), 256 << 20).unwrap().unwrap();
    let per_gib = c.index_bytes() * 4;
    println!("read cache index: {per_gib} bytes per cached GiB");
    assert!(per_gib < 8 << 20, "{per_gib}");
}

/// A cache recorded for another volume directory starts cold; a second
/// process cannot use a cache directory in use.
#[test]
fn another_owner_starts_cold_and_a_busy_directory_is_not_shared() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap();
    c.put(
        &id(1, 0),
        &crate::engine::format::chunk::block_crcs(&pattern(1)),
        &pattern(1),
        full(),
    );
    assert!(Cache::open(dir.path(), 4 * SLOT, OWNER).unwrap().is_none());
    drop(c);
    let c = Cache::open(dir.path(), 4 * SLOT, b"volume dir B")
        .unwrap()
        .unwrap();
    assert_eq!(c.restored(), 0);
    assert!(c.get(&id(1, 0), 0, &mut [0u8; 8], 0..0).is_none());
    drop(c);
    let c = Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap();
    assert_eq!(c.restored(), 0);
}

/// Invariant 6: after `close`, the directory can be opened again while the
/// closed cache is still referenced, and the closed cache neither serves
/// nor stores anything more (a late put from a readahead GET cannot touch
/// the files the new open owns).
#[test]
fn close_releases_the_directory_and_stops_all_file_access() {
    let dir = tempfile::tempdir().unwrap();
    let a = std::sync::Arc::new(Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap());
    let held = a.clone();
    a.put(
        &id(1, 0),
        &crate::engine::format::chunk::block_crcs(&[1u8; 4096]),
        &[1u8; 4096],
        0..4096,
    );
    // Still open: a second open of the directory runs without a cache.
    assert!(Cache::open_test(dir.path(), 4 * SLOT).unwrap().is_none());
    a.close();
    a.close();
    let mut buf = [0u8; 16];
    assert!(held.get(&id(1, 0), 0, &mut buf, 0..16).is_none());
    held.put(
        &id(2, 0),
        &crate::engine::format::chunk::block_crcs(&[2u8; 4096]),
        &[2u8; 4096],
        0..4096,
    );
    let b = Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap();
    assert_eq!(b.restored(), 1, "the late put was stored");
    assert!(b.get(&id(1, 0), 0, &mut buf, 0..16).is_some());
    assert_eq!(buf, [1u8; 16]);
    assert!(b.get(&id(2, 0), 0, &mut buf, 0..16).is_none());
}

fn pattern_of(seed: u8) -> Vec<u8> {
    (0..SLOT as usize)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn a_pending_window_misses_counts_its_use_and_cannot_be_reserved_twice() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap();
    let data = pattern_of(1);
    let r = c
        .reserve(&id(1, 0), &zero_crcs(SLOT), SLOT, 0..4096)
        .unwrap();
    assert!(c.contains(&id(1, 0)), "a pending window counts as cached");
    assert!(
        c.reserve(&id(1, 0), &zero_crcs(SLOT), SLOT, 0..0).is_none(),
        "reserved twice"
    );
    let mut buf = vec![0u8; 4096];
    // The same sectors again while pending: a miss, remembered as reuse.
    assert!(c.get(&id(1, 0), 0, &mut buf, 0..4096).is_none());
    c.fill(r, &data);
    assert!(c.get(&id(1, 0), 0, &mut buf, 0..4096).is_some());
    assert_eq!(buf, data[..4096]);
    // A wrong length is refused and frees the slot.
    let r = c.reserve(&id(2, 0), &zero_crcs(SLOT), SLOT, 0..0).unwrap();
    c.fill(r, &data[..100]);
    assert!(!c.contains(&id(2, 0)));
    // An abandoned reservation frees its slot.
    let r = c.reserve(&id(3, 0), &zero_crcs(SLOT), SLOT, 0..0).unwrap();
    c.abandon(r);
    assert!(!c.contains(&id(3, 0)));
    assert!(c.get(&id(3, 0), 0, &mut buf, 0..0).is_none());
}

#[test]
fn a_run_of_windows_is_filled_together_and_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cache::open_test(dir.path(), 8 * SLOT).unwrap().unwrap();
    let wins: Vec<Vec<u8>> = (0..5u8)
        .map(|w| {
            let mut d = pattern_of(w);
            if w == 4 {
                d.truncate(5000); // the short last window of a chunk
            }
            d
        })
        .collect();
    let reserved: Vec<Reservation> = (0..5)
        .map(|w| {
            c.reserve(
                &id(9, w),
                &zero_crcs(wins[w as usize].len() as u64),
                wins[w as usize].len() as u64,
                0..0,
            )
            .unwrap()
        })
        .collect();
    let data: Vec<u8> = wins.concat();
    let mut at = 0;
    let ranges = wins.iter().map(|d| {
        at += d.len();
        at - d.len()..at
    });
    c.fill_run(&data, reserved.into_iter().zip(ranges).collect());
    for (w, d) in wins.iter().enumerate() {
        let mut got = vec![0u8; d.len()];
        assert!(
            c.get(&id(9, w as u64), 0, &mut got, 0..0).is_some(),
            "window {w}"
        );
        assert!(got == *d, "window {w} reads back other bytes");
    }
    // They survive a reopen with their lengths.
    c.close();
    drop(c);
    let c = Cache::open_test(dir.path(), 8 * SLOT).unwrap().unwrap();
    assert_eq!(c.restored(), 5);
    let mut got = vec![0u8; 5000];
    assert!(c.get(&id(9, 4), 0, &mut got, 0..0).is_some());
    assert!(got == wins[4]);
}

#[test]
fn close_waits_for_a_pending_fill() {
    let dir = tempfile::tempdir().unwrap();
    let c = std::sync::Arc::new(Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap());
    let r = c.reserve(&id(1, 0), &zero_crcs(SLOT), SLOT, 0..0).unwrap();
    let filler = {
        let c = c.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.fill(r, &pattern_of(1));
        })
    };
    c.close();
    filler.join().unwrap();
    drop(c);
    let c = Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap();
    assert_eq!(c.restored(), 1, "the fill landed before the close ended");
}

/// Whether thread `tid` of this process is asleep (state `S`: in these
/// tests, blocked on a lock).
fn asleep(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .is_some_and(|i| stat[i + 1..].trim_start().starts_with('S'))
    })
}

/// Wait until thread `tid` blocks.
fn until_asleep(tid: i32) {
    while !asleep(tid) {
        std::thread::yield_now();
    }
}

/// Invariant 7: a reader holding the files' guard (a lookup about to take
/// the index), `close` waiting behind it for the write lock, and a GET
/// giving its reservation back: the abandon must wait for the guard
/// without holding the index, or the reader can never get it. Before,
/// `abandon` took the index first and then queued for the guard behind
/// the waiting `close`: the three threads hung for good (here the index
/// was found held).
#[test]
fn an_abandon_during_close_leaves_the_index_to_the_reader_that_blocks_close() {
    let dir = tempfile::tempdir().unwrap();
    let c = std::sync::Arc::new(Cache::open_test(dir.path(), 4 * SLOT).unwrap().unwrap());
    let r = c.reserve(&id(1, 0), &zero_crcs(SLOT), SLOT, 0..0).unwrap();
    let reader = c.files().expect("open");
    let (tids, tid) = std::sync::mpsc::channel();
    // `close` past its wait for fills (the reservation came just after),
    // taking the write lock.
    let closer = {
        let (c, tids) = (c.clone(), tids.clone());
        std::thread::spawn(move || {
            tids.send(nix::unistd::gettid().as_raw()).unwrap();
            *c.dir_lock.write().unwrap_or_else(|e| e.into_inner()) = None;
        })
    };
    until_asleep(tid.recv().unwrap());
    let abandoner = {
        let c = c.clone();
        std::thread::spawn(move || {
            tids.send(nix::unistd::gettid().as_raw()).unwrap();
            c.abandon(r);
        })
    };
    until_asleep(tid.recv().unwrap());
    let index_free = c.index.try_lock().is_ok();
    drop(reader);
    closer.join().unwrap();
    abandoner.join().unwrap();
    assert!(
        index_free,
        "abandon held the index while it waited for the files' guard"
    );
    assert_eq!(*c.pending_count(), 0, "the reservation was given back");
    assert!(!c.contains(&id(1, 0)), "its slot is free");
}
