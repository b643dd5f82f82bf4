//! Newest-wins resolution of the ranges a chunk's records wrote: which
//! record each sector of the chunk comes from.
//!
//! Invariant: the pieces returned are disjoint, sorted by LBA, cover
//! exactly the union of the input ranges, and each sector comes from the
//! last (newest) range that holds it.

use std::collections::BTreeMap;

/// Sectors `[lba, lba + sectors)` come from range `rec` of the input,
/// starting `off` sectors into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    pub lba: u64,
    pub sectors: u64,
    pub rec: usize,
    pub off: u64,
}

/// Resolve `ranges` (`(lba, sectors)`, oldest first). A range whose end
/// would overflow is clipped at `u64::MAX`; empty ranges yield nothing.
pub(super) fn resolve(ranges: &[(u64, u64)]) -> Vec<Piece> {
    // Disjoint, non-adjacent covered ranges: start -> end.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut pieces = Vec::new();
    for (rec, &(a, len)) in ranges.iter().enumerate().rev() {
        let b = a.saturating_add(len);
        if a >= b {
            continue;
        }
        // Covered ranges touching [a, b): overlapping or adjacent.
        let mut touching: Vec<(u64, u64)> = Vec::new();
        if let Some((&s, &e)) = covered.range(..a).next_back() {
            if e >= a {
                touching.push((s, e));
            }
        }
        touching.extend(covered.range(a..=b).map(|(&s, &e)| (s, e)));
        let mut cur = a;
        for &(s, e) in &touching {
            if s > cur && cur < b {
                let end = s.min(b);
                pieces.push(Piece {
                    lba: cur,
                    sectors: end - cur,
                    rec,
                    off: cur - a,
                });
            }
            cur = cur.max(e);
        }
        if cur < b {
            pieces.push(Piece {
                lba: cur,
                sectors: b - cur,
                rec,
                off: cur - a,
            });
        }
        let mut start = a;
        let mut end = b;
        for (s, e) in touching {
            covered.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        covered.insert(start, end);
    }
    pieces.sort_unstable_by_key(|p| p.lba);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The newest range holding each sector of `0..n`, by brute force.
    fn model(ranges: &[(u64, u64)], n: u64) -> Vec<Option<(usize, u64)>> {
        (0..n)
            .map(|x| {
                ranges
                    .iter()
                    .enumerate()
                    .rev()
                    .find(|(_, &(a, l))| a <= x && x < a + l)
                    .map(|(i, &(a, _))| (i, x - a))
            })
            .collect()
    }

    fn expand(pieces: &[Piece], n: u64) -> Vec<Option<(usize, u64)>> {
        let mut out = vec![None; n as usize];
        let mut last_end = 0;
        for p in pieces {
            assert!(p.lba >= last_end, "sorted and disjoint: {pieces:?}");
            assert!(p.sectors > 0);
            last_end = p.lba + p.sectors;
            for i in 0..p.sectors {
                out[(p.lba + i) as usize] = Some((p.rec, p.off + i));
            }
        }
        out
    }

    #[test]
    fn matches_brute_force_on_random_ranges() {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rnd = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for round in 0..500 {
            let n = 1 + rnd(20);
            let span = 8 + round % 64;
            let ranges: Vec<(u64, u64)> = (0..n).map(|_| (rnd(span), rnd(12))).collect();
            let pieces = resolve(&ranges);
            assert_eq!(
                expand(&pieces, span + 12),
                model(&ranges, span + 12),
                "{ranges:?}"
            );
        }
    }

    #[test]
    fn overlaps_adjacency_and_the_end_of_the_space() {
        let r = resolve(&[(0, 10), (10, 5), (3, 2), (u64::MAX - 2, 8)]);
        assert_eq!(
            r,
            vec![
                Piece {
                    lba: 0,
                    sectors: 3,
                    rec: 0,
                    off: 0
                },
                Piece {
                    lba: 3,
                    sectors: 2,
                    rec: 2,
                    off: 0
                },
                Piece {
                    lba: 5,
                    sectors: 5,
                    rec: 0,
                    off: 5
                },
                Piece {
                    lba: 10,
                    sectors: 5,
                    rec: 1,
                    off: 0
                },
                Piece {
                    lba: u64::MAX - 2,
                    sectors: 2,
                    rec: 3,
                    off: 0
                },
            ]
        );
        assert!(resolve(&[(4, 0)]).is_empty());
    }
}
