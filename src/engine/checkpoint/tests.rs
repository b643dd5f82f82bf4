//! Checkpoint tests (both encodings).
use super::*;

#[test]
fn round_trip_and_corruption() {
    let mut map = ExtentMap::new();
    map.insert(0, 8, Loc::Chunk { chunk: 1, off: 0 });
    map.insert(100, 4, Loc::Chunk { chunk: 2, off: 512 });
    let chunks = vec![
        ChunkInfo {
            seq: 1,
            epoch: 1,
            data_start: 100,
            data_len: 4096,
            table_crc: 1,
        },
        ChunkInfo {
            seq: 2,
            epoch: 1,
            data_start: 100,
            data_len: 4096,
            table_crc: 2,
        },
    ];
    let cp = Checkpoint::from_map(5, 1, 2, 40, &map, chunks);
    let enc = cp.encode();
    let dec = Checkpoint::decode(&enc).unwrap();
    assert_eq!(dec, cp);
    let m2 = dec.to_map(1000).unwrap();
    assert_eq!(
        m2.iter().collect::<Vec<_>>(),
        map.iter().collect::<Vec<_>>()
    );
    let mut bad = enc.clone();
    let n = bad.len();
    bad[n - 3] ^= 1;
    assert!(
        matches!(
            Checkpoint::decode(&bad),
            Err(CheckpointError::Page { page: 1, .. })
        ),
        "{:?}",
        Checkpoint::decode(&bad)
    );
    // The JSON format still decodes, with its own checksum.
    let json = cp.encode_json();
    assert_eq!(Checkpoint::decode(&json).unwrap(), cp);
    let mut bad = json.clone();
    let n = bad.len();
    bad[n - 3] ^= 1;
    assert_eq!(Checkpoint::decode(&bad), Err(CheckpointError::Crc));
    assert_eq!(
        Checkpoint::decode(&enc[..5]),
        Err(CheckpointError::BadMagic)
    );
    // Extents past the volume or naming unknown chunks are rejected.
    assert!(dec.to_map(50).is_err());
    let mut odd = dec.clone();
    odd.extents.push((300, 1, 9, 0));
    assert!(odd.to_map(1000).is_err());
}

/// Zero ranges (clones) round-trip; a map without them encodes as
/// before; zero ranges past the volume or over data are rejected.
#[test]
fn zero_ranges_round_trip() {
    let mut map = ExtentMap::new();
    map.insert(0, 8, Loc::Chunk { chunk: 1, off: 0 });
    let chunks = vec![ChunkInfo {
        seq: 1,
        epoch: 1,
        data_start: 100,
        data_len: 4096,
        table_crc: 1,
    }];
    let plain = Checkpoint::from_map(5, 1, 1, 4, &map, chunks.clone());
    assert!(plain.zeros.is_empty());
    let json = String::from_utf8_lossy(&plain.encode_json()[12..]).to_string();
    assert!(!json.contains("zeros"), "{json}");
    map.insert(8, 4, Loc::Zero);
    map.insert(20, 2, Loc::Zero);
    let cp = Checkpoint::from_map(5, 1, 1, 4, &map, chunks);
    assert_eq!(cp.zeros, vec![(8, 4), (20, 2)]);
    let back = Checkpoint::decode(&cp.encode())
        .unwrap()
        .to_map(100)
        .unwrap();
    assert_eq!(
        back.iter().collect::<Vec<_>>(),
        map.iter().collect::<Vec<_>>()
    );
    assert!(cp.to_map(21).is_err());
    let mut overlap = cp.clone();
    overlap.zeros.push((4, 2));
    assert!(overlap.to_map(100).is_err());
    let mut empty = cp;
    empty.zeros.push((50, 0));
    assert!(empty.to_map(100).is_err());
}

/// Garbage and mutated checkpoints give errors, never panics.
#[test]
fn decoder_survives_random_input() {
    for json in [false, true] {
        survives_random_input(json);
    }
}

fn survives_random_input(json: bool) {
    let mut map = ExtentMap::new();
    map.insert(0, 8, Loc::Chunk { chunk: 1, off: 0 });
    map.insert(8, 8, Loc::Zero);
    let chunks = vec![ChunkInfo {
        seq: 1,
        epoch: 1,
        data_start: 100,
        data_len: 4096,
        table_crc: 1,
    }];
    let cp = Checkpoint::from_map(5, 1, 1, 4, &map, chunks);
    let enc = if json { cp.encode_json() } else { cp.encode() };
    let mut x = 99u64;
    for i in 0..3000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut m = enc.clone();
        let at = (x as usize) % m.len();
        m[at] = (x >> 32) as u8;
        let m = &m[..m.len() - i % 3];
        if let Ok(cp) = Checkpoint::decode(m) {
            let _ = cp.to_map(1 << 20);
        }
    }
}

#[test]
fn find_seq_finds_dense_and_sparse_numbers_and_nothing_else() {
    use super::find_seq;
    let dense: Vec<u64> = (5..15).collect();
    for (i, &s) in dense.iter().enumerate() {
        assert_eq!(find_seq(&dense, s), Some(i));
    }
    assert_eq!(find_seq(&dense, 4), None, "below the first");
    assert_eq!(find_seq(&dense, 15), None, "past the last");
    // Holes (deleted chunks) and a compaction id far above: the guess
    // misses, bisection finds them.
    let sparse = [1, 2, 7, 9, 1 << 62];
    for (i, &s) in sparse.iter().enumerate() {
        assert_eq!(find_seq(&sparse, s), Some(i));
    }
    for s in [0, 3, 8, 10, u64::MAX] {
        assert_eq!(find_seq(&sparse, s), None, "{s}");
    }
    assert_eq!(find_seq(&[], 1), None);
}

/// `to_map` merges the sorted extent and zero lists as it builds the map;
/// lists out of order take the sort path and give the same map; a bad
/// run anywhere (even after many good ones) fails it.
#[test]
fn to_map_merges_sorted_lists_and_checks_every_run() {
    let chunk = |seq| ChunkInfo {
        seq,
        epoch: 1,
        data_start: 100,
        data_len: 1 << 20,
        table_crc: 0,
    };
    let mut cp = Checkpoint {
        volume: 5,
        epoch: 1,
        chunk_seq: 9,
        last_seq: 40,
        chunks: vec![chunk(3), chunk(1), chunk(9)],
        extents: (0..600u64)
            .map(|i| (i * 16, 8, [1, 3, 9][i as usize % 3], (i % 64) * 4096))
            .collect(),
        zeros: (0..600u64).map(|i| (i * 16 + 8, 4)).collect(),
    };
    let sorted = cp.to_map(1 << 20).unwrap();
    assert_eq!(sorted.len(), 1200);
    let mut want = ExtentMap::new();
    for &(s, l, c, off) in &cp.extents {
        want.insert(s, l, Loc::Chunk { chunk: c, off });
    }
    for &(s, l) in &cp.zeros {
        want.insert(s, l, Loc::Zero);
    }
    assert_eq!(
        sorted.iter().collect::<Vec<_>>(),
        want.iter().collect::<Vec<_>>()
    );
    let mut shuffled = cp.clone();
    shuffled.extents.reverse();
    shuffled.zeros.swap(0, 599);
    let via_sort = shuffled.to_map(1 << 20).unwrap();
    assert_eq!(
        via_sort.iter().collect::<Vec<_>>(),
        want.iter().collect::<Vec<_>>()
    );
    // An unknown chunk, an extent past its chunk's data, a zero range past
    // the volume, an overlap: each near the end of its list.
    let good = cp.clone();
    cp.extents[598].2 = 2;
    assert!(cp
        .to_map(1 << 20)
        .unwrap_err()
        .to_string()
        .contains("unknown chunk 2"));
    cp = good.clone();
    cp.extents[599].3 = 1 << 20;
    assert!(cp
        .to_map(1 << 20)
        .unwrap_err()
        .to_string()
        .contains("outside the data"));
    cp = good.clone();
    cp.zeros[599] = (u64::MAX - 1, 4);
    assert!(cp
        .to_map(1 << 20)
        .unwrap_err()
        .to_string()
        .contains("zero range"));
    cp = good;
    cp.zeros[598].1 = 9;
    assert!(cp
        .to_map(1 << 20)
        .unwrap_err()
        .to_string()
        .contains("overlaps"));
}
