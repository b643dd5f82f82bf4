//! The overlay: what reads see that the store-side map does not hold yet.
//!
//! The live view of a volume is `stored` with the overlay laid on top:
//! where the overlay has an entry it wins, elsewhere `stored` shows
//! through. The overlay is small: it holds only ranges whose newest change
//! is still in the WAL (a write: its WAL location; a trim or zeroing:
//! [`Loc::Zero`]), so the volume keeps one full map, not two.
//!
//! Invariants:
//! 1. Overlay entries are WAL locations, never chunk locations. A trim or
//!    zeroing is kept as a marker location naming its record's seq
//!    ([`zero_marker`]); it reads as [`Loc::Zero`] in a clone and as
//!    unmapped otherwise (so the view never shows `Loc::Zero` without
//!    `keep_zeros`, state invariant 5) and holds no data bytes.
//! 2. An entry is dropped once `stored` holds its change: when the chunk
//!    holding its record (seq at most the chunk's last) is applied. A
//!    newer record's entry stays, even over the chunk's zeros (a chunk
//!    between could still bring older data there).
//! 3. `shadow` is exactly the data bytes of `stored` under the overlay
//!    entries outside `uncounted` (and how many of them lie in `stored`'s
//!    tracked set); every change of the overlay or of `stored` under it
//!    goes through this module.
//! 4. `uncounted` covers only ranges the overlay maps: those laid since
//!    the last [`Overlay::settle`]. A write lays a range without looking
//!    `stored` up; the chunk holding it usually drops it again before
//!    anyone asks for the counters, and then it is never looked up at
//!    all. The counters settle (look each uncounted range up once) when
//!    asked for.

use super::map::{ExtentMap, Loc, Piece, WalLoc};
use super::SECTOR;

/// The WAL segment id a zero marker names (no real segment has it).
const ZERO_SEG: u64 = u64::MAX;

/// The overlay location of trim or zeroing record `seq` (invariant 1).
fn zero_marker(seq: u64) -> Loc {
    Loc::Wal(WalLoc {
        seq,
        seg: ZERO_SEG,
        data_off: 0,
        rec_sectors: 0,
        crc: 0,
        skip: 0,
        block_crcs: false,
    })
}

fn is_zero_marker(loc: &Option<Loc>) -> bool {
    matches!(loc, Some(Loc::Wal(w)) if w.seg == ZERO_SEG)
}

/// The mark of an uncounted range (`Zero`: it holds no data bytes, and
/// neighbouring marks merge).
const UNCOUNTED: Loc = Loc::Zero;

/// What an overlay location reads as.
fn shown(loc: Loc) -> Loc {
    match loc {
        Loc::Wal(w) if w.seg == ZERO_SEG => Loc::Zero,
        other => other,
    }
}

/// The overlay map and the `stored` bytes it hides (module docs).
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    map: ExtentMap,
    /// `(data, shared)` bytes of `stored` under overlay entries outside
    /// `uncounted` (invariant 3).
    shadow: (u64, u64),
    /// Overlay ranges not counted in `shadow` yet, mapped to
    /// [`UNCOUNTED`] (invariant 4).
    uncounted: ExtentMap,
    /// Bytes of zero markers (counted as data by `map`, but none).
    zero_bytes: u64,
}

fn add(acc: &mut (u64, u64), (d, s): (u64, u64)) {
    acc.0 += d;
    acc.1 += s;
}

fn sub(acc: &mut (u64, u64), (d, s): (u64, u64)) {
    // Exact by invariant 3; saturating only so a broken invariant can
    // never panic a request path.
    acc.0 = acc.0.saturating_sub(d);
    acc.1 = acc.1.saturating_sub(s);
}

impl Overlay {
    /// Number of overlay entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The overlay entries in ascending order (trims as `Loc::Zero`).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Loc)> + '_ {
        self.map.iter().map(|(s, l, loc)| (s, l, shown(loc)))
    }

    /// Lay WAL location `loc` over `[start, start+len)`.
    pub fn set_wal(&mut self, stored: &ExtentMap, start: u64, len: u64, loc: WalLoc) {
        self.set(stored, start, len, Loc::Wal(loc));
    }

    /// Make `[start, start+len)` read as zeros by trim or zeroing record
    /// `seq`.
    pub fn set_zero(&mut self, stored: &ExtentMap, start: u64, len: u64, seq: u64) {
        self.set(stored, start, len, zero_marker(seq));
        self.zero_bytes += len * SECTOR;
    }

    fn set(&mut self, stored: &ExtentMap, start: u64, len: u64, loc: Loc) {
        let displaced = self.map.insert(start, len, loc);
        self.forget(stored, &displaced);
        self.uncounted.insert(start, len, UNCOUNTED);
    }

    /// Account for `displaced`, pieces just taken out of the overlay: the
    /// counted parts leave `shadow`, the uncounted ones `uncounted`.
    fn forget(&mut self, stored: &ExtentMap, displaced: &[Piece]) {
        for p in displaced {
            for (s, l) in self.counted_parts(p.start, p.len) {
                sub(&mut self.shadow, stored.data_in(s, l));
            }
            self.uncounted.remove(p.start, p.len);
            if is_zero_marker(&p.loc) {
                self.zero_bytes = self.zero_bytes.saturating_sub(p.len * SECTOR);
            }
        }
    }

    /// The parts of `[start, start+len)` outside `uncounted`.
    fn counted_parts(&self, start: u64, len: u64) -> Vec<(u64, u64)> {
        if self.uncounted.is_empty() {
            return vec![(start, len)];
        }
        self.uncounted
            .lookup(start, len)
            .into_iter()
            .filter(|p| p.loc.is_none())
            .map(|p| (p.start, p.len))
            .collect()
    }

    /// Count every uncounted range in `shadow` (invariant 4): the
    /// counters are exact afterwards. O(uncounted ranges × log extents).
    pub fn settle(&mut self, stored: &ExtentMap) {
        if self.uncounted.is_empty() {
            return;
        }
        for (s, l) in self.uncounted.ranges() {
            add(&mut self.shadow, stored.data_in(s, l));
        }
        self.uncounted = ExtentMap::new();
    }

    /// Drop the entries over `[start, start+len)` of records up to
    /// `last_seq` (now held by `stored`, invariant 2).
    pub fn drop_through(&mut self, stored: &ExtentMap, start: u64, len: u64, last_seq: u64) {
        for p in self.map.lookup(start, len) {
            if matches!(p.loc, Some(Loc::Wal(w)) if w.seq <= last_seq) {
                let displaced = self.map.remove(p.start, p.len);
                self.forget(stored, &displaced);
            }
        }
    }

    /// The covered and counted parts of `[start, start+len)`: where
    /// `shadow` depends on `stored`.
    fn covered(&self, start: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for p in self.map.lookup(start, len) {
            if p.loc.is_some() {
                out.extend(self.counted_parts(p.start, p.len));
            }
        }
        out
    }

    /// Change `stored` through `change` (which may touch only
    /// `[start, start+len)`), keeping `shadow` exact.
    pub fn change_stored<T>(
        &mut self,
        stored: &mut ExtentMap,
        start: u64,
        len: u64,
        change: impl FnOnce(&mut ExtentMap) -> T,
    ) -> T {
        let covered = self.covered(start, len);
        for &(s, l) in &covered {
            sub(&mut self.shadow, stored.data_in(s, l));
        }
        let out = change(stored);
        for &(s, l) in &covered {
            add(&mut self.shadow, stored.data_in(s, l));
        }
        out
    }

    /// Recount `shadow` against `stored` (after `stored` changed wholesale,
    /// e.g. began tracking another set). O(overlay entries).
    pub fn recount(&mut self, stored: &ExtentMap) {
        let mut shadow = (0, 0);
        for (s, l) in self.map.ranges() {
            add(&mut shadow, stored.data_in(s, l));
        }
        self.shadow = shadow;
        self.uncounted = ExtentMap::new();
    }

    /// Data bytes of the view (`stored` under the overlay); settles first.
    pub fn data_bytes(&mut self, stored: &ExtentMap) -> u64 {
        self.settle(stored);
        let own = self.map.data_bytes().saturating_sub(self.zero_bytes);
        (stored.data_bytes() + own).saturating_sub(self.shadow.0)
    }

    /// Data bytes of the view in `stored`'s tracked set (the overlay holds
    /// no chunk locations, so only `stored`'s count outside it); settles
    /// first.
    pub fn shared_bytes(&mut self, stored: &ExtentMap) -> u64 {
        self.settle(stored);
        stored.shared_bytes().saturating_sub(self.shadow.1)
    }

    /// The view of `[start, start+len)`, at most `max` pieces (at least
    /// one), in order and covering a prefix of the range; neighbouring
    /// pieces that continue each other are joined.
    pub fn lookup_limited(
        &self,
        stored: &ExtentMap,
        keep_zeros: bool,
        start: u64,
        len: u64,
        max: usize,
    ) -> Vec<Piece> {
        let max = max.max(1);
        let mut out: Vec<Piece> = Vec::new();
        let push = |out: &mut Vec<Piece>, p: Piece| {
            if let Some(last) = out.last_mut() {
                if last.start + last.len == p.start && joins(last, &p) {
                    last.len += p.len;
                    return;
                }
            }
            out.push(p);
        };
        // The overlay is usually empty or sparse: its pieces, with holes
        // filled from `stored`.
        for p in self.map.lookup_limited(start, len, max) {
            match p.loc {
                Some(loc) if is_zero_marker(&p.loc) => {
                    let loc = keep_zeros.then_some(shown(loc));
                    push(&mut out, Piece { loc, ..p })
                }
                Some(_) => push(&mut out, p),
                None => {
                    let room = max.saturating_sub(out.len()).max(1);
                    let mut reached = p.start;
                    for q in stored.lookup_limited(p.start, p.len, room) {
                        reached = q.start + q.len;
                        push(&mut out, q);
                    }
                    if reached < p.start + p.len {
                        // `stored` stopped early: what we have is a prefix.
                        break;
                    }
                }
            }
            if out.len() >= max {
                break;
            }
        }
        out
    }

    /// Data bytes of the view in `[start, start+len)` and how many of them
    /// lie in `stored`'s tracked set.
    pub fn data_in(&self, stored: &ExtentMap, start: u64, len: u64) -> (u64, u64) {
        let mut acc = (0, 0);
        for p in self.map.lookup(start, len) {
            match p.loc {
                Some(_) if is_zero_marker(&p.loc) => {}
                Some(_) => add(&mut acc, (p.data_bytes(), 0)),
                None => add(&mut acc, stored.data_in(p.start, p.len)),
            }
        }
        acc
    }
}

/// Whether `b` (starting where `a` ends) continues `a`: both unmapped, or
/// both mapped with `b`'s location where `a`'s goes after `a.len`.
fn joins(a: &Piece, b: &Piece) -> bool {
    match (a.loc, b.loc) {
        (None, None) => true,
        (Some(x), Some(y)) => x.advance(a.len) == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use crate::test_rng::xorshift;
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::checkpoint::ChunkInfo;
    use super::super::format::chunk::ChunkExtent;
    use super::super::map::{Loc, LocSet, WalLoc};
    use super::super::state::State;
    use super::super::wal::record::RecordKind;
    use super::super::wal::Appended;
    use super::super::SECTOR;

    /// What a sector holds in the model: the write (seq, sector within it)
    /// or zeros.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Sector {
        Data(u64, u64),
        Zero,
    }

    /// A state fed writes and trims, destaged in chunks at chosen points.
    struct Harness {
        st: State,
        seq: u64,
        /// Records not yet in a chunk: (seq, lba, sectors, is_write).
        pending: Vec<(u64, u64, u64, bool)>,
        /// Per chunk: data runs `(data_off, sectors, seq)`.
        chunks: HashMap<u64, Vec<(u64, u64, u64)>>,
    }

    impl Harness {
        fn new(keep_zeros: bool) -> Harness {
            Harness {
                st: State {
                    keep_zeros,
                    ..State::default()
                },
                seq: 0,
                pending: Vec::new(),
                chunks: HashMap::new(),
            }
        }

        fn op(&mut self, lba: u64, sectors: u64, write: bool) {
            self.seq += 1;
            let seq = self.seq;
            let loc = write.then_some(WalLoc {
                seq,
                seg: 1,
                data_off: seq * 4096,
                rec_sectors: sectors,
                crc: 0,
                skip: 0,
                block_crcs: true,
            });
            let kind = if write {
                RecordKind::Write
            } else {
                RecordKind::Trim
            };
            self.st.apply_appended(
                &[Appended {
                    seq,
                    kind,
                    lba,
                    sectors,
                    more: false,
                    loc,
                }],
                Duration::ZERO,
            );
            self.pending.push((seq, lba, sectors, write));
        }

        /// Destage the first `n` pending records as one chunk.
        fn destage(&mut self, n: usize) {
            let n = n.min(self.pending.len());
            if n == 0 {
                return;
            }
            let recs: Vec<_> = self.pending.drain(..n).collect();
            let chunk = self.st.last_chunk + 1;
            let mut off = 0;
            let mut runs = Vec::new();
            let extents: Vec<ChunkExtent> = recs
                .iter()
                .map(|&(seq, lba, sectors, write)| {
                    let data_off = write.then(|| {
                        runs.push((off, sectors, seq));
                        off += sectors * SECTOR;
                        off - sectors * SECTOR
                    });
                    ChunkExtent {
                        lba,
                        sectors,
                        data_off,
                    }
                })
                .collect();
            let last_seq = recs.last().map_or(0, |r| r.0);
            let info = Arc::new(ChunkInfo {
                seq: chunk,
                epoch: 1,
                data_start: 4096,
                data_len: off,
                table_crc: 0,
            });
            self.chunks.insert(chunk, runs);
            self.st.apply_chunk_to_stored(info, &extents);
            self.st.apply_chunk_to_live(chunk, last_seq, &extents);
            self.st.pop_stored(last_seq);
            self.st.last_chunk = chunk;
        }

        /// What the view shows at each of the first `n` sectors.
        fn flat(&self, n: u64) -> Vec<Option<Sector>> {
            let mut out = Vec::new();
            for p in self.st.view_lookup(0, n) {
                for i in 0..p.len {
                    out.push(match p.loc {
                        None => None,
                        Some(Loc::Zero) => Some(Sector::Zero),
                        Some(Loc::Wal(w)) => Some(Sector::Data(w.seq, w.skip + i)),
                        Some(Loc::Chunk { chunk, off }) => {
                            let at = off + i * SECTOR;
                            let (o, _, seq) = self.chunks[&chunk]
                                .iter()
                                .copied()
                                .find(|&(o, l, _)| o <= at && at < o + l * SECTOR)
                                .expect("chunk offset written");
                            Some(Sector::Data(seq, (at - o) / SECTOR))
                        }
                    });
                }
            }
            out
        }
    }

    /// Random writes, trims and destages against a per-sector model. The
    /// counters are read every `count_every` steps: every step settles at
    /// once; a longer period leaves ranges uncounted across destages
    /// (invariant 4).
    fn random_run(keep_zeros: bool, seed: u64, count_every: u64) {
        let n = 2000u64;
        let mut h = Harness::new(keep_zeros);
        let mut set = LocSet::new();
        set.insert(1, 0, 64 * 1024);
        set.insert(3, 0, 64 * 1024);
        let set = Arc::new(set);
        h.st.track(Some(set.clone()));
        let mut model: Vec<Option<Sector>> = vec![None; n as usize];
        let mut x = seed;
        for step in 0..6000u64 {
            let r = xorshift(&mut x);
            let lba = r % n;
            let len = 1 + (r >> 20) % (n - lba).min(24);
            match (r >> 40) % 10 {
                0..=5 => {
                    h.op(lba, len, true);
                    for i in 0..len {
                        model[(lba + i) as usize] = Some(Sector::Data(h.seq, i));
                    }
                }
                6 | 7 => {
                    h.op(lba, len, false);
                    for i in 0..len {
                        model[(lba + i) as usize] = keep_zeros.then_some(Sector::Zero);
                    }
                }
                _ => h.destage(1 + ((r >> 50) % 40) as usize),
            }
            if step % count_every != 0 {
                continue;
            }
            let data = model
                .iter()
                .filter(|s| matches!(s, Some(Sector::Data(..))))
                .count() as u64;
            assert_eq!(h.st.view_data_bytes(), data * SECTOR, "step {step}");
            if step % 50 == 0 {
                assert_eq!(h.flat(n), model, "step {step}");
                let m = h.st.view_map();
                assert_eq!(m.data_bytes(), data * SECTOR);
                let mut tracked = m.clone();
                tracked.track(Some(set.clone()));
                assert_eq!(
                    h.st.view_shared_bytes(),
                    tracked.shared_bytes(),
                    "step {step}"
                );
                let (s, l) = (lba / 2, n / 3);
                assert_eq!(
                    h.st.view_data_in(s, l),
                    tracked.data_in(s, l),
                    "step {step}"
                );
                // A limited lookup is a prefix of the full one (its last
                // piece possibly shorter).
                let full = h.st.view_lookup(s, l);
                let cut = h.st.view_lookup_limited(s, l, 3);
                let k = cut.len() - 1;
                assert_eq!(cut[..k], full[..k]);
                assert_eq!((cut[k].start, cut[k].loc), (full[k].start, full[k].loc));
                assert!(cut[k].len <= full[k].len);
            }
        }
        h.destage(usize::MAX);
        assert_eq!(h.flat(n), model);
        assert!(h.st.overlay.is_empty(), "all destaged: no overlay left");
        let data = model
            .iter()
            .filter(|s| matches!(s, Some(Sector::Data(..))))
            .count() as u64;
        assert_eq!(h.st.view_data_bytes(), data * SECTOR);
        let mut tracked = h.st.view_map();
        tracked.track(Some(set));
        assert_eq!(h.st.view_shared_bytes(), tracked.shared_bytes());
    }

    #[test]
    fn view_matches_model_through_writes_trims_and_destage() {
        random_run(false, 0x1234_5678_9abc_def1, 1);
        random_run(true, 0x0fed_cba9_8765_4321, 1);
    }

    #[test]
    fn counters_exact_when_read_rarely() {
        random_run(false, 0x2468_ace0_1357_9bdf, 50);
        random_run(true, 0x1357_9bdf_2468_ace0, 50);
        random_run(false, 0x0bad_cafe_f00d_d00d, 250);
    }

    #[test]
    fn newer_trim_survives_older_chunk_zeros_and_data() {
        for keep_zeros in [false, true] {
            let mut h = Harness::new(keep_zeros);
            h.op(0, 8, false); // seq 1: trim
            h.op(0, 8, true); // seq 2: write
            h.op(0, 8, false); // seq 3: trim
            h.destage(1); // chunk with the first trim only
            h.destage(1); // chunk with the write
            let want = keep_zeros.then_some(Sector::Zero);
            assert_eq!(h.flat(8), vec![want; 8], "keep_zeros {keep_zeros}");
            assert_eq!(h.st.view_data_bytes(), 0);
            h.destage(1);
            assert_eq!(h.flat(8), vec![want; 8]);
            assert!(h.st.overlay.is_empty());
        }
    }

    #[test]
    fn overlay_holds_only_what_is_not_stored() {
        let mut h = Harness::new(false);
        for i in 0..100 {
            h.op(i * 16, 8, true);
        }
        assert_eq!(h.st.overlay.len(), 100);
        assert_eq!(h.st.stored.len(), 0);
        h.destage(60);
        assert_eq!(h.st.overlay.len(), 40);
        assert_eq!(h.st.stored.len(), 60);
        h.destage(40);
        assert_eq!(h.st.overlay.len(), 0);
        assert_eq!(h.st.extent_count(), 100);
        assert_eq!(h.st.view_data_bytes(), 100 * 8 * SECTOR);
    }
}
