//! Tests of the extent map: contents, merging, counters and side tables
//! against per-sector models, and the short insert path against the
//! general one.

use super::*;

/// A WAL location at the start of record `seq` (CRC fixed at 9).
fn wal_loc(seq: u64, seg: u64, data_off: u64, rec_sectors: u64, block_crcs: bool) -> WalLoc {
    WalLoc {
        seq,
        seg,
        data_off,
        rec_sectors,
        crc: 9,
        skip: 0,
        block_crcs,
    }
}

fn chunk(c: u64, off: u64) -> Loc {
    Loc::Chunk { chunk: c, off }
}

/// Expand the map into one location per sector for easy comparison.
fn flat(m: &ExtentMap, n: u64) -> Vec<Option<Loc>> {
    let mut v = vec![None; n as usize];
    for (s, l, loc) in m.iter() {
        for i in 0..l {
            v[(s + i) as usize] = Some(loc.advance(i));
        }
    }
    v
}

#[test]
fn split_in_middle_and_edges() {
    let mut m = ExtentMap::new();
    m.insert(0, 100, chunk(1, 0));
    let removed = m.insert(10, 5, chunk(2, 0));
    assert_eq!(
        removed,
        vec![Piece {
            start: 10,
            len: 5,
            loc: Some(chunk(1, 10 * 512))
        }]
    );
    assert_eq!(m.len(), 3);
    let f = flat(&m, 100);
    assert_eq!(f[9], Some(chunk(1, 9 * 512)));
    assert_eq!(f[10], Some(chunk(2, 0)));
    assert_eq!(f[15], Some(chunk(1, 15 * 512)));
    // Overwrite spanning several entries, cutting both ends.
    let removed = m.insert(5, 20, chunk(3, 0));
    let total: u64 = removed.iter().map(|p| p.len).sum();
    assert_eq!(total, 20);
    assert_eq!(m.len(), 3);
    assert_eq!(flat(&m, 100)[24], Some(chunk(3, 19 * 512)));
    assert_eq!(flat(&m, 100)[25], Some(chunk(1, 25 * 512)));
}

#[test]
fn merge_contiguous_and_remove() {
    let mut m = ExtentMap::new();
    for i in 0..10 {
        m.insert(i * 8, 8, chunk(7, i * 8 * 512));
    }
    assert_eq!(m.len(), 1, "sequential chunk extents merge");
    m.insert(100, 4, Loc::Zero);
    m.insert(96, 4, Loc::Zero);
    assert_eq!(m.len(), 2);
    let removed = m.remove(70, 40);
    assert_eq!(removed.iter().map(|p| p.len).sum::<u64>(), 10 + 8);
    assert_eq!(m.len(), 1);
    assert!(m.remove(500, 10).is_empty());
    // Filling a hole between continuing pieces merges all three.
    let mut m = ExtentMap::new();
    m.insert(0, 4, chunk(1, 0));
    m.insert(8, 4, chunk(1, 8 * 512));
    m.insert(4, 4, chunk(1, 4 * 512));
    assert_eq!(m.len(), 1);
}

#[test]
fn lookup_holes_and_partial() {
    let mut m = ExtentMap::new();
    m.insert(10, 10, chunk(1, 0));
    m.insert(30, 5, Loc::Zero);
    let p = m.lookup(5, 40);
    assert_eq!(
        p,
        vec![
            Piece {
                start: 5,
                len: 5,
                loc: None
            },
            Piece {
                start: 10,
                len: 10,
                loc: Some(chunk(1, 0))
            },
            Piece {
                start: 20,
                len: 10,
                loc: None
            },
            Piece {
                start: 30,
                len: 5,
                loc: Some(Loc::Zero)
            },
            Piece {
                start: 35,
                len: 10,
                loc: None
            },
        ]
    );
    let p = m.lookup(12, 3);
    assert_eq!(
        p,
        vec![Piece {
            start: 12,
            len: 3,
            loc: Some(chunk(1, 1024))
        }]
    );
    assert_eq!(m.lookup(0, 0), vec![]);
    // A limited lookup returns the first pieces of the full one.
    let full = m.lookup(5, 40);
    for max in 1..=full.len() + 1 {
        let limited = m.lookup_limited(5, 40, max);
        assert_eq!(limited, full[..max.min(full.len())], "max {max}");
    }
    assert_eq!(m.lookup_limited(5, 40, 0), full[..1]);
}

#[test]
fn wal_locations_split_keep_skip() {
    let w = wal_loc(5, 1, 48, 16, true);
    let mut m = ExtentMap::new();
    m.insert(0, 16, Loc::Wal(w));
    m.remove(4, 4);
    let p = m.lookup(8, 2);
    assert_eq!(p[0].loc, Some(Loc::Wal(WalLoc { skip: 8, ..w })));
    // Re-inserting the same record's sectors merges back.
    m.insert(4, 4, Loc::Wal(WalLoc { skip: 4, ..w }));
    assert_eq!(m.len(), 1);
}

#[test]
fn entries_are_sixteen_bytes() {
    assert_eq!(std::mem::size_of::<Slot>(), 16);
}

#[test]
fn ranges_longer_than_an_entry_are_stored_in_pieces() {
    let mut m = ExtentMap::new();
    let n = 2 * MAX_ENTRY_SECTORS + 7;
    m.insert(3, n, Loc::Zero);
    assert_eq!(m.len(), 3);
    let p = m.lookup(0, n + 10);
    assert_eq!(p.first().unwrap().loc, None);
    let zero: u64 = p
        .iter()
        .filter(|p| p.loc == Some(Loc::Zero))
        .map(|p| p.len)
        .sum();
    assert_eq!(zero, n);
    // A chunk run past one entry keeps its offsets across the pieces.
    let mut m = ExtentMap::new();
    m.insert(0, MAX_ENTRY_SECTORS + 2, chunk(4, 0));
    let at = MAX_ENTRY_SECTORS + 1;
    assert_eq!(m.lookup(at, 1)[0].loc, Some(chunk(4, at * 512)));
    assert_eq!(m.data_bytes(), (MAX_ENTRY_SECTORS + 2) * 512);
}

#[test]
fn wal_records_are_kept_while_named_and_dropped_after() {
    let w = wal_loc(9, 2, 4096, 64, false);
    let mut m = ExtentMap::new();
    m.insert(100, 64, Loc::Wal(w));
    m.insert(110, 4, chunk(1, 0)); // splits the record's entry in two
    assert_eq!(m.records.len(), 1);
    assert_eq!(m.records[&9].1, 2);
    assert_eq!(
        m.lookup(120, 1)[0].loc,
        Some(Loc::Wal(WalLoc { skip: 20, ..w }))
    );
    m.insert(100, 64, chunk(2, 0));
    assert!(m.records.is_empty(), "no entry names the record any more");
    assert!(m.wide.is_empty());
}

#[test]
fn locations_a_slot_cannot_hold_are_kept_exactly() {
    let odd = chunk(3, 100); // not a whole sector into the chunk
    let far = chunk(3, (u64::from(u32::MAX) + 1) * 512);
    let mut m = ExtentMap::new();
    m.insert(0, 8, odd);
    m.insert(8, 8, far);
    assert_eq!(m.lookup(2, 1)[0].loc, Some(odd.advance(2)));
    assert_eq!(m.lookup(9, 1)[0].loc, Some(far.advance(1)));
    assert_eq!(m.wide.len(), 2);
    m.remove(0, 16);
    assert!(m.wide.is_empty());
}

#[test]
fn from_sorted_equals_inserting_and_refuses_overlaps() {
    let runs = vec![
        (0, 8, chunk(1, 0)),
        (8, 8, chunk(1, 8 * 512)), // continues the first: one entry
        (20, 4, Loc::Zero),
        (30, 2, chunk(2, 512)),
    ];
    let bulk = ExtentMap::from_sorted(runs.clone()).unwrap();
    let mut one_by_one = ExtentMap::new();
    for (s, l, loc) in runs {
        one_by_one.insert(s, l, loc);
    }
    assert_eq!(
        bulk.iter().collect::<Vec<_>>(),
        one_by_one.iter().collect::<Vec<_>>()
    );
    assert_eq!(bulk.len(), 3);
    assert_eq!(bulk.data_bytes(), one_by_one.data_bytes());
    assert_eq!(
        ExtentMap::from_sorted(vec![(0, 8, Loc::Zero), (4, 8, Loc::Zero)]).unwrap_err(),
        (4, 8)
    );
    assert!(ExtentMap::from_sorted(vec![(5, 0, Loc::Zero)]).is_err());
    assert!(ExtentMap::from_sorted(vec![(u64::MAX, 2, Loc::Zero)]).is_err());
}

/// Random operations against a per-sector model.
#[test]
fn random_against_flat_model() {
    let n = 300u64;
    let mut m = ExtentMap::new();
    let mut model: Vec<Option<Loc>> = vec![None; n as usize];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = || crate::test_rng::xorshift(&mut x);
    for i in 0..3000u64 {
        let s = next() % n;
        let l = 1 + next() % (n - s).min(40);
        if next() % 4 == 0 {
            let removed = m.remove(s, l);
            let mapped = (s..s + l).filter(|&k| model[k as usize].is_some()).count() as u64;
            assert_eq!(removed.iter().map(|p| p.len).sum::<u64>(), mapped);
            for k in s..s + l {
                model[k as usize] = None;
            }
        } else {
            let loc = chunk(i % 3, next() % 1000 * 512);
            m.insert(s, l, loc);
            for k in s..s + l {
                model[k as usize] = Some(loc.advance(k - s));
            }
        }
        assert_eq!(flat(&m, n), model, "step {i}");
    }
    let pieces = m.lookup(0, n);
    assert_eq!(pieces.iter().map(|p| p.len).sum::<u64>(), n);
}

/// Random operations over several leaves against a per-sector model:
/// contents, merging across leaf boundaries (every run of continuing
/// sectors is one entry unless split by the entry cap) and both
/// counters exact after every call.
#[test]
fn paged_random_against_model_with_exact_counters() {
    let n = 40_000u64;
    let mut set = LocSet::new();
    set.insert(1, 0, 2000 * 512);
    let set = Arc::new(set);
    let mut m = ExtentMap::new();
    m.track(Some(set.clone()));
    let mut model: Vec<Option<Loc>> = vec![None; n as usize];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = || crate::test_rng::xorshift(&mut x);
    let data = |l: &Option<Loc>| matches!(l, Some(Loc::Chunk { .. }) | Some(Loc::Wal(_)));
    for i in 0..20_000u64 {
        let s = next() % n;
        let l = 1 + next() % (n - s).min(if i % 50 == 0 { 3000 } else { 8 });
        match next() % 6 {
            0 => {
                m.remove(s, l);
                for k in s..s + l {
                    model[k as usize] = None;
                }
            }
            1 => {
                m.insert(s, l, Loc::Zero);
                for k in s..s + l {
                    model[k as usize] = Some(Loc::Zero);
                }
            }
            _ => {
                // Chunk offsets follow the sector, so neighbours often
                // continue each other and must merge.
                let loc = chunk(1 + next() % 2, s * 512);
                m.insert(s, l, loc);
                for k in s..s + l {
                    model[k as usize] = Some(loc.advance(k - s));
                }
            }
        }
        let want_data = model.iter().filter(|l| data(l)).count() as u64 * 512;
        assert_eq!(m.data_bytes(), want_data, "step {i}");
        if i % 200 == 0 {
            let want_shared: u64 = model
                .iter()
                .map(|l| match l {
                    Some(Loc::Chunk { chunk, off }) => set.overlap(*chunk, *off, 512),
                    _ => 0,
                })
                .sum();
            assert_eq!(m.shared_bytes(), want_shared, "step {i}");
            assert_eq!(flat(&m, n), model, "step {i}");
            m.entries.check();
            // Fully merged: no entry is continued by the next one.
            let all: Vec<_> = m.iter().collect();
            for w in all.windows(2) {
                let (s0, l0, loc0) = w[0];
                assert!(
                    !(s0 + l0 == w[1].0 && loc0.continued_by(l0, &w[1].2)),
                    "step {i}: unmerged {w:?}"
                );
            }
        }
    }
    assert!(m.leaf_count() > 4, "the test spans several leaves");
}

/// The short path of `insert` makes exactly what the general one does:
/// the same entries, displaced pieces, counters and side tables, over
/// random small writes of every location kind (some continuing their
/// neighbours, some too wide for a slot) into a map of several leaves;
/// and it is taken for each of its three shapes.
#[test]
fn short_insert_path_equals_the_general_one() {
    let n = 20_000u64;
    let mut set = LocSet::new();
    set.insert(1, 0, 4000 * 512);
    let set = Arc::new(set);
    let (mut short, mut general) = (ExtentMap::new(), ExtentMap::new());
    short.track(Some(set.clone()));
    general.track(Some(set));
    let (mut exact, mut hole, mut inside) = (0, 0, 0);
    let mut x: u64 = 0x51ed_2701_9e37_79b9;
    let mut next = || crate::test_rng::xorshift(&mut x);
    // Every other 64-sector block filled first, so later writes land
    // inside big entries and in holes.
    for m in [&mut short, &mut general] {
        for b in (0..n / 64).step_by(2) {
            m.insert(b * 64, 64, chunk(1, b * 64 * 512));
        }
    }
    for i in 0..40_000u64 {
        let s = next() % (n - 16) / 8 * 8;
        let l = if next() % 8 == 0 { 1 + next() % 16 } else { 8 };
        let loc = match next() % 8 {
            0 => Loc::Zero,
            1 => Loc::Wal(WalLoc {
                skip: next() % 4,
                ..wal_loc(next() % 50, 1, 4096 * (next() % 50), 32, true)
            }),
            // Continues the fill's location: merges with neighbours.
            2 => chunk(1, s * 512),
            3 => chunk(9, (u64::from(u32::MAX) + 1 + next() % 8) * 512),
            _ => chunk(2 + i / 1000, next() % 4096 * 512),
        };
        let before = short.len();
        let removed = match short.insert_within_one(s, l, loc) {
            Some(r) => {
                match (short.len() - before, r.is_empty()) {
                    (0, _) => exact += 1,
                    (_, true) => hole += 1,
                    _ => inside += 1,
                }
                r
            }
            None => short.insert_general(s, l, loc),
        };
        assert_eq!(removed, general.insert_general(s, l, loc), "step {i}");
        assert_eq!(short.data_bytes(), general.data_bytes(), "step {i}");
        assert_eq!(short.shared_bytes(), general.shared_bytes(), "step {i}");
        if i % 500 == 0 {
            assert!(short.iter().eq(general.iter()), "step {i}");
            assert_eq!(short.records, general.records, "step {i}");
            assert_eq!(short.wide.len(), general.wide.len(), "step {i}");
            short.entries.check();
        }
    }
    assert!(short.iter().eq(general.iter()));
    assert!(
        exact > 500 && hole > 500 && inside > 500,
        "exact {exact}, hole {hole}, inside {inside}"
    );
}

#[test]
fn merge_across_a_leaf_boundary() {
    // Every other block mapped: many entries over several leaves.
    let mut m = ExtentMap::new();
    let blocks = 4 * LEAF_ENTRIES as u64;
    for b in 0..blocks {
        m.insert(b * 16, 8, chunk(1, b * 16 * 512));
    }
    assert_eq!(m.len() as u64, blocks);
    assert!(m.leaf_count() >= 4);
    // Fill the holes: all of it continues, so it collapses to one entry
    // (entries merge with neighbours in other leaves too).
    for b in 0..blocks {
        m.insert(b * 16 + 8, 8, chunk(1, (b * 16 + 8) * 512));
        m.entries.check();
    }
    assert_eq!(m.len(), 1);
    assert_eq!(m.leaf_count(), 1);
    assert_eq!(m.data_bytes(), blocks * 16 * 512);
}

#[test]
fn clone_is_a_snapshot() {
    let mut m = ExtentMap::new();
    for b in 0..3000u64 {
        m.insert(b * 16, 8, chunk(b, 0));
    }
    let snap = m.clone();
    let before: Vec<_> = snap.iter().collect();
    m.insert(0, 16 * 3000, chunk(9, 0));
    assert_eq!(m.len(), 1);
    assert_eq!(snap.iter().collect::<Vec<_>>(), before);
    assert_eq!(snap.data_bytes(), 3000 * 8 * 512);
}

#[test]
fn random_fragmented_map_stays_under_32_bytes_an_entry() {
    let mut m = ExtentMap::new();
    let mut x: u64 = 12345;
    let blocks = 400_000u64;
    let mut written = 0;
    while m.len() < 100_000 {
        crate::test_rng::xorshift(&mut x);
        m.insert(
            (x % blocks) * 8,
            8,
            chunk(1 + written / 1024, written % 1024 * 4096),
        );
        written += 1;
    }
    let per = m.entry_heap_bytes() as f64 / m.len() as f64;
    assert!(per <= 32.0, "{per:.1} bytes per entry");
}
