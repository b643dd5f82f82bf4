use std::collections::BTreeMap;

use super::*;
use crate::engine::checkpoint::dirty::DirtySet;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SECTORS: u64 = 1 << 16;

fn info(seq: u64) -> ChunkInfo {
    ChunkInfo {
        seq,
        epoch: 1,
        data_start: 4096,
        data_len: 1 << 20,
        table_crc: seq as u32,
    }
}

/// A writer's view: the map, its table, and the changes since the last
/// checkpoint, kept the way the engine keeps them.
struct Writer {
    map: ExtentMap,
    table: BTreeMap<u64, ChunkInfo>,
    committed: BTreeMap<u64, ChunkInfo>,
    dirty: DirtySet,
    chunk_seq: u64,
    next_compacted: u64,
}

impl Writer {
    /// One random change: a new chunk with a few extents, a trim, zeros,
    /// or a compaction-like repoint of a chunk's ranges into a new object.
    fn step(&mut self, rng: &mut Rng) {
        match rng.below(4) {
            0 | 1 => {
                self.chunk_seq += 1;
                let seq = self.chunk_seq;
                self.table.insert(seq, info(seq));
                for i in 0..1 + rng.below(20) {
                    let s = rng.below(SECTORS - 64);
                    let l = 1 + rng.below(63);
                    self.dirty.insert(s, l);
                    self.map.insert(
                        s,
                        l,
                        Loc::Chunk {
                            chunk: seq,
                            off: i * 32 * 1024,
                        },
                    );
                }
            }
            2 => {
                let s = rng.below(SECTORS - 512);
                let l = 1 + rng.below(511);
                self.dirty.insert(s, l);
                if rng.below(2) == 0 {
                    self.map.remove(s, l);
                } else {
                    self.map.insert(s, l, Loc::Zero);
                }
            }
            _ => {
                // Repoint every range of the oldest chunk into a compacted one.
                let Some(&old) = self.table.keys().next() else {
                    return;
                };
                self.next_compacted += 1;
                let new = crate::engine::format::limits::COMPACTED_BIT | self.next_compacted;
                self.table.insert(new, info(new));
                let ranges: Vec<_> = self
                    .map
                    .iter()
                    .filter(|(_, _, l)| matches!(l, Loc::Chunk { chunk, .. } if *chunk == old))
                    .collect();
                for (s, l, loc) in ranges {
                    let Loc::Chunk { off, .. } = loc else {
                        continue;
                    };
                    self.dirty.insert(s, l);
                    self.map.insert(s, l, Loc::Chunk { chunk: new, off });
                }
            }
        }
        // Chunks no range uses leave the table (as checkpoints drop them).
        let used: std::collections::HashSet<u64> = self
            .map
            .iter()
            .filter_map(|(_, _, l)| match l {
                Loc::Chunk { chunk, .. } => Some(chunk),
                _ => None,
            })
            .collect();
        self.table.retain(|s, _| used.contains(s));
    }

    fn delta(&mut self, position: u64, prev_chunk_seq: u64, prev: &str) -> Delta {
        let added = self
            .table
            .values()
            .filter(|c| !self.committed.contains_key(&c.seq))
            .cloned()
            .collect();
        let removed = self
            .committed
            .keys()
            .filter(|s| !self.table.contains_key(s))
            .copied()
            .collect();
        let dirty = std::mem::take(&mut self.dirty);
        let d = Delta::capture(
            (7, 1, self.chunk_seq, self.chunk_seq * 10),
            (position, prev_chunk_seq, "base".into(), prev.into()),
            &self.map,
            dirty.iter(),
            added,
            removed,
        );
        self.committed = self.table.clone();
        d
    }
}

/// Random changes, each checkpoint a delta through the codec: the chain
/// rebuilt from the base and the decoded deltas equals the writer's map
/// and table after every step, and the deltas stay far smaller than the
/// map they describe.
#[test]
fn chain_rebuilds_the_map_exactly() {
    for seed in 1..=6u64 {
        let mut rng = Rng(seed * 0x9E37_79B9_7F4A_7C15);
        let mut w = Writer {
            map: ExtentMap::new(),
            table: BTreeMap::new(),
            committed: BTreeMap::new(),
            dirty: DirtySet::new(),
            chunk_seq: 0,
            next_compacted: 0,
        };
        for _ in 0..200 {
            w.step(&mut rng);
        }
        let chunks: Vec<ChunkInfo> = w.table.values().cloned().collect();
        let base = Checkpoint::from_map(7, 1, w.chunk_seq, w.chunk_seq * 10, &w.map, chunks);
        let base_bytes = base.encode();
        w.committed = w.table.clone();
        w.dirty = DirtySet::new();
        let mut chain =
            Chain::from_base(Checkpoint::decode(&base_bytes).unwrap(), SECTORS).unwrap();
        let mut prev = "base".to_string();
        for pos in 1..=20u64 {
            for _ in 0..rng.below(6) {
                w.step(&mut rng);
            }
            let d = w.delta(pos, chain.chunk_seq, &prev);
            let enc = d.encode();
            assert!(
                enc.len() < base_bytes.len(),
                "delta {} >= base {}",
                enc.len(),
                base_bytes.len()
            );
            let CheckpointObject::Delta(back) = CheckpointObject::decode(&enc).unwrap() else {
                panic!("decoded as a full checkpoint");
            };
            assert_eq!(back, d);
            // A delta alone is refused where a full checkpoint is expected.
            assert!(matches!(Checkpoint::decode(&enc), Err(CheckpointError::Delta(p)) if p == pos));
            chain.apply(&back).unwrap();
            prev = format!("d{pos}");
            assert_eq!(
                chain.map.iter().collect::<Vec<_>>(),
                w.map.iter().collect::<Vec<_>>(),
                "seed {seed} delta {pos}"
            );
            assert_eq!(
                chain.chunks.keys().collect::<Vec<_>>(),
                w.table.keys().collect::<Vec<_>>()
            );
        }
        let chain = chain.finish().unwrap();
        let full = chain.into_checkpoint();
        assert_eq!(
            full.to_map(SECTORS).unwrap().iter().collect::<Vec<_>>(),
            w.map.iter().collect::<Vec<_>>()
        );
    }
}

fn small_chain() -> (Chain, Delta) {
    let mut map = ExtentMap::new();
    map.insert(0, 8, Loc::Chunk { chunk: 1, off: 0 });
    map.insert(100, 8, Loc::Chunk { chunk: 2, off: 0 });
    let base = Checkpoint::from_map(7, 1, 2, 20, &map, vec![info(1), info(2)]);
    let chain = Chain::from_base(base, 1000).unwrap();
    map.insert(
        4,
        8,
        Loc::Chunk {
            chunk: 3,
            off: 4096,
        },
    );
    map.remove(100, 8);
    let d = Delta::capture(
        (7, 1, 3, 30),
        (1, 2, "b".into(), "b".into()),
        &map,
        [(4, 8), (100, 8)].into_iter(),
        vec![info(3)],
        vec![2],
    );
    (chain, d)
}

/// Every rule of `Chain::apply` refuses a delta breaking it, by name, and
/// leaves the chain unchanged; the untouched delta then applies.
#[test]
fn bad_deltas_are_refused() {
    let (mut chain, good) = small_chain();
    let before: Vec<_> = chain.map.iter().collect();
    type Mutation = Box<dyn Fn(&mut Delta)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("volume", Box::new(|d| d.body.volume = 8)),
        ("follows delta", Box::new(|d| d.pages.position = 2)),
        ("predecessor", Box::new(|d| d.pages.prev_chunk_seq = 1)),
        ("predecessor", Box::new(|d| d.body.last_seq = 5)),
        (
            "past the volume",
            Box::new(|d| d.pages.ranges[1] = (996, 8)),
        ),
        ("out of order", Box::new(|d| d.pages.ranges.swap(0, 1))),
        (
            "outside the delta's changed ranges",
            Box::new(|d| d.body.extents[0].0 = 3),
        ),
        ("already holds", Box::new(|d| d.body.chunks[0] = info(1))),
        ("outside chunks", Box::new(|d| d.body.chunks[0] = info(9))),
        ("does not hold", Box::new(|d| d.pages.removed = vec![5])),
        ("unknown chunk", Box::new(|d| d.body.extents[0].2 = 2)),
        (
            "outside the data",
            Box::new(|d| d.body.extents[0].3 = 1 << 20),
        ),
    ];
    for (want, mutate) in cases {
        let mut d = good.clone();
        mutate(&mut d);
        let e = chain.apply(&d).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
        assert_eq!(chain.map.iter().collect::<Vec<_>>(), before);
        assert_eq!(chain.applied, 0);
    }
    chain.apply(&good).unwrap();
    assert_eq!(
        chain.map.iter().collect::<Vec<_>>(),
        vec![
            (0, 4, Loc::Chunk { chunk: 1, off: 0 }),
            (
                4,
                8,
                Loc::Chunk {
                    chunk: 3,
                    off: 4096
                }
            )
        ]
    );
    assert!(chain.finish().is_ok());
}

/// A removed chunk still named by a range the delta did not change is
/// caught once the chain is complete.
#[test]
fn removed_chunk_still_in_use_is_refused() {
    let (mut chain, mut d) = small_chain();
    d.pages.removed = vec![1, 2];
    chain.apply(&d).unwrap();
    let e = chain.finish().unwrap_err().to_string();
    assert!(e.contains("which a delta removed"), "{e}");
}

/// Damaged delta bytes: every truncation and bit flip fails to decode
/// (CRCs), and resealed random damage never panics.
#[test]
fn damaged_deltas_fail_cleanly() {
    let (_, d) = small_chain();
    let enc = d.encode();
    for cut in 0..enc.len() {
        assert!(
            CheckpointObject::decode(&enc[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    for byte in 0..enc.len() {
        let mut m = enc.clone();
        m[byte] ^= 0x10;
        assert!(CheckpointObject::decode(&m).is_err(), "flip at {byte}");
    }
    let mut rng = Rng(99);
    for _ in 0..5000 {
        let mut m = enc.clone();
        let at = rng.below(m.len() as u64) as usize;
        m[at] = rng.next() as u8;
        reseal(&mut m);
        if let Ok(CheckpointObject::Delta(x)) = CheckpointObject::decode(&m) {
            let (mut chain, _) = small_chain();
            let _ = chain.apply(&x);
        }
    }
}

/// Recompute the header and page CRCs, so damage reaches the decoder's
/// later checks.
fn reseal(b: &mut [u8]) {
    use super::codec::HEADER_LEN;
    if b.len() < HEADER_LEN {
        return;
    }
    let c = crc32c::crc32c(&b[..HEADER_LEN - 4]);
    b[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&c.to_le_bytes());
    let mut at = HEADER_LEN;
    while at + 16 <= b.len() {
        let len = u32::from_le_bytes([b[at + 8], b[at + 9], b[at + 10], b[at + 11]]) as usize;
        let start = at + 16;
        let Some(end) = start.checked_add(len).filter(|&e| e <= b.len()) else {
            return;
        };
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[at..at + 12]), &b[start..end]);
        b[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}
