//! The extent map: which location holds each sector of a volume.
//!
//! Invariants:
//! 1. Entries never overlap; each covers `len >= 1` sectors starting at its key.
//! 2. A sector with no entry reads as zeros (unmapped).
//! 3. Inserting or removing a range splits the entries it cuts and returns the
//!    pieces it displaced, so callers can keep live-byte counts exact.
//! 4. Adjacent entries whose locations continue each other are merged, so a
//!    sequential stream of writes stays one entry per chunk, not per block.
//! 5. Space counters are exact after every call: [`ExtentMap::data_bytes`]
//!    counts sectors mapped to data (`Wal` or `Chunk`; `Zero` and unmapped
//!    take no space) and, when a [`LocSet`] is tracked,
//!    [`ExtentMap::shared_bytes`] counts the data bytes whose chunk location
//!    lies in that set (see [`super::space`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use super::SECTOR;

mod locset;
mod pages;

pub use locset::LocSet;
use pages::Pages;
pub use pages::CAP as LEAF_ENTRIES;

/// Where a WAL record's data lives in the local log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalLoc {
    /// Sequence number of the record.
    pub seq: u64,
    /// WAL segment id holding the record.
    pub seg: u64,
    /// File offset of the record's first data byte.
    pub data_off: u64,
    /// Length of the whole record's data in sectors.
    pub rec_sectors: u64,
    /// CRC32C of the whole record's data (`block_crcs` false), or of its
    /// block CRC table (`block_crcs` true).
    pub crc: u32,
    /// Sectors of the record before the first sector this location names.
    pub skip: u64,
    /// The record has a CRC per 4 KiB block, in a table just before
    /// `data_off` (see [`super::wal::record`]); otherwise one CRC covers
    /// all of its data and a read must read all of it.
    pub block_crcs: bool,
}

/// Where a range of sectors lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// Explicitly zero (used where "trimmed" must differ from "untouched").
    Zero,
    /// In the local WAL.
    Wal(WalLoc),
    /// In a chunk object: `off` is the byte offset in the chunk's data area.
    Chunk { chunk: u64, off: u64 },
}

impl Loc {
    /// The location of the sector `sectors` further on.
    pub fn advance(&self, sectors: u64) -> Loc {
        match *self {
            Loc::Zero => Loc::Zero,
            Loc::Wal(w) => Loc::Wal(WalLoc {
                skip: w.skip + sectors,
                ..w
            }),
            Loc::Chunk { chunk, off } => Loc::Chunk {
                chunk,
                off: off + sectors * SECTOR,
            },
        }
    }

    /// True when `next` is exactly where `self` goes after `len` sectors.
    fn continued_by(&self, len: u64, next: &Loc) -> bool {
        match (self, next) {
            (Loc::Zero, Loc::Zero) => true,
            (Loc::Wal(a), Loc::Wal(b)) => {
                a.seq == b.seq && a.seg == b.seg && a.skip + len == b.skip
            }
            (Loc::Chunk { chunk: c1, off: o1 }, Loc::Chunk { chunk: c2, off: o2 }) => {
                c1 == c2 && o1 + len * SECTOR == *o2
            }
            _ => false,
        }
    }
}

/// A run of sectors and where it lives (`None`: unmapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub len: u64,
    pub loc: Option<Loc>,
}

impl Piece {
    /// Bytes of data this piece holds (zero for `Zero` and unmapped).
    pub fn data_bytes(&self) -> u64 {
        match self.loc {
            Some(Loc::Wal(_) | Loc::Chunk { .. }) => self.len * SECTOR,
            _ => 0,
        }
    }

    /// Bytes of this piece whose chunk location lies in `set`.
    pub fn bytes_in(&self, set: &LocSet) -> u64 {
        match self.loc {
            Some(Loc::Chunk { chunk, off }) => set.overlap(chunk, off, self.len * SECTOR),
            _ => 0,
        }
    }
}

/// The WAL record fields shared by every entry that points into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WalRecord {
    seg: u64,
    data_off: u64,
    rec_sectors: u64,
    crc: u32,
    block_crcs: bool,
}

/// Kinds of [`Slot`] (the top two bits of `len_kind`).
const KIND_ZERO: u32 = 0;
const KIND_CHUNK: u32 = 1;
const KIND_WAL: u32 = 2;
const KIND_WIDE: u32 = 3;
const KIND_SHIFT: u32 = 30;
/// Longest entry in sectors (512 GiB); longer ranges take several entries.
pub const MAX_ENTRY_SECTORS: u64 = (1 << KIND_SHIFT) - 1;

/// One map entry as stored: 16 bytes (invariant 6).
/// - zero: nothing else;
/// - chunk: `id` = chunk id, `off` = data-area offset in sectors;
/// - wal: `id` = record sequence number (its other fields in
///   `ExtentMap::records`), `off` = sectors skipped into the record;
/// - wide: `id` keys a full [`Loc`] in `ExtentMap::wide` (a location the
///   compact forms cannot hold: never produced by the engine, kept so no
///   input is ever stored wrongly).
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    off: u32,
    len_kind: u32,
}

impl Slot {
    /// Filler for unused leaf positions.
    const EMPTY: Slot = Slot {
        id: 0,
        off: 0,
        len_kind: 0,
    };

    fn len(&self) -> u64 {
        u64::from(self.len_kind) & MAX_ENTRY_SECTORS
    }

    fn kind(&self) -> u32 {
        self.len_kind >> KIND_SHIFT
    }

    /// False when the slot's location can neither continue nor be
    /// continued by `loc` ([`Loc::continued_by`] is false either way):
    /// another kind, chunk or WAL record. Needs no side-table lookup.
    fn may_continue(&self, loc: &Loc) -> bool {
        match (self.kind(), loc) {
            (KIND_ZERO, Loc::Zero) => true,
            (KIND_CHUNK, Loc::Chunk { chunk, .. }) => self.id == *chunk,
            (KIND_WAL, Loc::Wal(w)) => self.id == w.seq,
            // A wide slot may hold any location: decode it to decide.
            (KIND_WIDE, _) => true,
            _ => false,
        }
    }
}

/// Hashes the `u64` keys of the map's side tables (record sequence
/// numbers and wide ids, both handed out by the engine in order, never
/// chosen by a client) with one multiplication: the low bits of the
/// product (the bucket) are a bijection of the key's low bits, so a run
/// of consecutive keys fills distinct buckets, and the high bits (the
/// tag) depend on every key bit. Replay inserts one record per WAL
/// record, so SipHash (the std default) was a fifth of its time.
#[derive(Debug, Clone, Copy, Default)]
struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by the side tables; any other input is
        // still hashed (byte by byte), never ignored.
        for &b in bytes {
            self.write_u64(u64::from(b) ^ self.0.rotate_left(8));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type SeqMap<V> = HashMap<u64, V, BuildHasherDefault<SeqHasher>>;

/// Sector ranges → locations. See the module docs for invariants; also:
/// 6. Each entry is a 16-byte [`Slot`] of at most [`MAX_ENTRY_SECTORS`];
///    a WAL record's location fields are stored once in `records`, with the
///    number of entries naming it; a record with no entries is dropped.
/// 7. Entries live in copy-on-write leaves of up to [`LEAF_ENTRIES`]
///    (see [`pages`]): 24 bytes an entry, leaves kept dense; a clone
///    copies one pointer per leaf and shares the leaves until either side
///    changes one.
#[derive(Debug, Clone, Default)]
pub struct ExtentMap {
    entries: Pages,
    /// WAL records named by entries, and how many entries name each.
    records: SeqMap<(WalRecord, u32)>,
    /// Locations too wide for a slot, by the id their slot holds.
    wide: SeqMap<Loc>,
    next_wide: u64,
    /// Bytes mapped to data (invariant 5).
    data_bytes: u64,
    /// The tracked location set and how many data bytes lie in it.
    tracked: Option<(Arc<LocSet>, u64)>,
}

impl ExtentMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries (not sectors).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.len() == 0
    }

    /// Number of leaves holding the entries.
    pub fn leaf_count(&self) -> usize {
        self.entries.leaf_count()
    }

    /// Heap bytes of the entries' leaves and their index (allocator
    /// overhead and the WAL record side table not included).
    pub fn entry_heap_bytes(&self) -> usize {
        self.entries.heap_bytes()
    }

    /// A map of `runs` `(start, len, loc)`, which must be in ascending
    /// order, non-empty and non-overlapping (the first offending run is
    /// returned otherwise). Built in one pass: O(n), streaming (runs are
    /// merged and packed as they come, straight into full leaves, so
    /// nothing but the map itself is held), and it takes less memory than
    /// inserting one by one.
    pub fn from_sorted(
        runs: impl IntoIterator<Item = (u64, u64, Loc)>,
    ) -> Result<ExtentMap, (u64, u64)> {
        let mut map = ExtentMap::new();
        let mut pages = pages::Builder::default();
        // The run being merged (invariant 4), not yet packed.
        let mut open: Option<(u64, u64, Loc)> = None;
        let mut end = 0u64;
        for (s, l, loc) in runs {
            let e = s.checked_add(l).filter(|_| l > 0 && s >= end);
            let Some(e) = e else {
                return Err((s, l));
            };
            end = e;
            map.data_bytes += Piece {
                start: s,
                len: l,
                loc: Some(loc),
            }
            .data_bytes();
            match &mut open {
                Some((ps, pl, ploc))
                    if *ps + *pl == s
                        && *pl + l <= MAX_ENTRY_SECTORS
                        && ploc.continued_by(*pl, &loc) =>
                {
                    *pl += l
                }
                _ => {
                    if let Some(run) = open.replace((s, l, loc)) {
                        map.pack_run(&mut pages, run);
                    }
                }
            }
        }
        if let Some(run) = open {
            map.pack_run(&mut pages, run);
        }
        map.entries = pages.finish();
        Ok(map)
    }

    /// Pack run `(s, l, loc)` into `pages` as entries of at most
    /// [`MAX_ENTRY_SECTORS`].
    fn pack_run(&mut self, pages: &mut pages::Builder, (s, l, loc): (u64, u64, Loc)) {
        let mut done = 0;
        while done < l {
            let n = (l - done).min(MAX_ENTRY_SECTORS);
            let slot = self.pack(n, loc.advance(done));
            pages.push(s + done, slot);
            done += n;
        }
    }

    /// The location a slot names.
    fn loc_of(&self, slot: &Slot) -> Loc {
        match slot.kind() {
            KIND_ZERO => Loc::Zero,
            KIND_CHUNK => Loc::Chunk {
                chunk: slot.id,
                off: u64::from(slot.off) * SECTOR,
            },
            KIND_WAL => match self.records.get(&slot.id) {
                Some((r, _)) => Loc::Wal(WalLoc {
                    seq: slot.id,
                    seg: r.seg,
                    data_off: r.data_off,
                    rec_sectors: r.rec_sectors,
                    crc: r.crc,
                    skip: u64::from(slot.off),
                    block_crcs: r.block_crcs,
                }),
                // Unreachable by invariant 6; zeros would be wrong data, so
                // name a record that cannot verify (its CRC check fails).
                None => Loc::Wal(WalLoc {
                    seq: slot.id,
                    seg: u64::MAX,
                    data_off: u64::MAX,
                    rec_sectors: 0,
                    crc: 0,
                    skip: u64::from(slot.off),
                    block_crcs: false,
                }),
            },
            _ => self.wide.get(&slot.id).copied().unwrap_or(Loc::Zero),
        }
    }

    /// Store `[start, start+len)` → `loc` as one entry (`len` at most
    /// [`MAX_ENTRY_SECTORS`]), replacing any entry keyed at `start`.
    fn put(&mut self, start: u64, len: u64, loc: Loc) {
        debug_assert!((1..=MAX_ENTRY_SECTORS).contains(&len));
        let slot = self.pack(len, loc);
        if let Some(old) = self.entries.insert(start, slot) {
            self.release(&old);
        }
    }

    /// Remove the entry keyed at `start`: its length and location.
    fn take(&mut self, start: u64) -> Option<(u64, Loc)> {
        let slot = self.entries.remove(start)?;
        let loc = self.loc_of(&slot);
        self.release(&slot);
        Some((slot.len(), loc))
    }

    fn pack(&mut self, len: u64, loc: Loc) -> Slot {
        let with = |kind: u32, id: u64, off: u32| Slot {
            id,
            off,
            len_kind: (kind << KIND_SHIFT) | len as u32,
        };
        match loc {
            Loc::Zero => return with(KIND_ZERO, 0, 0),
            Loc::Chunk { chunk, off } if off % SECTOR == 0 => {
                if let Ok(o) = u32::try_from(off / SECTOR) {
                    return with(KIND_CHUNK, chunk, o);
                }
            }
            Loc::Wal(w) => {
                let rec = WalRecord {
                    seg: w.seg,
                    data_off: w.data_off,
                    rec_sectors: w.rec_sectors,
                    crc: w.crc,
                    block_crcs: w.block_crcs,
                };
                if let Ok(skip) = u32::try_from(w.skip) {
                    let entry = self.records.entry(w.seq).or_insert((rec, 0));
                    if entry.0 == rec {
                        entry.1 += 1;
                        return with(KIND_WAL, w.seq, skip);
                    }
                }
            }
            Loc::Chunk { .. } => {}
        }
        let id = self.next_wide;
        self.next_wide += 1;
        self.wide.insert(id, loc);
        with(KIND_WIDE, id, 0)
    }

    /// Drop what `slot` held in the side tables.
    fn release(&mut self, slot: &Slot) {
        match slot.kind() {
            KIND_WAL => {
                if let Some((_, refs)) = self.records.get_mut(&slot.id) {
                    *refs -= 1;
                    if *refs == 0 {
                        self.records.remove(&slot.id);
                    }
                }
            }
            KIND_WIDE => {
                self.wide.remove(&slot.id);
            }
            _ => {}
        }
    }

    /// The entry starting before `start` that reaches into it, if any.
    fn covering(&self, start: u64) -> Option<(u64, u64, Loc)> {
        self.entries
            .pred(start)
            .filter(|(s, slot)| s + slot.len() > start)
            .map(|(s, slot)| (s, slot.len(), self.loc_of(&slot)))
    }

    /// Bytes mapped to data (`Wal` or `Chunk` locations).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Data bytes whose location lies in the tracked set (0 if none).
    pub fn shared_bytes(&self) -> u64 {
        self.tracked.as_ref().map_or(0, |(_, n)| *n)
    }

    /// The tracked location set, if any.
    pub fn tracked(&self) -> Option<&Arc<LocSet>> {
        self.tracked.as_ref().map(|(set, _)| set)
    }

    /// Track `set` from now on (replacing any earlier one), counting the
    /// data bytes already mapped into it; `None` stops tracking.
    pub fn track(&mut self, set: Option<Arc<LocSet>>) {
        self.tracked = set.map(|set| {
            let n = self
                .iter()
                .map(|(start, len, loc)| {
                    Piece {
                        start,
                        len,
                        loc: Some(loc),
                    }
                    .bytes_in(&set)
                })
                .sum();
            (set, n)
        });
    }

    /// Bytes of `[start, start+len)` mapped to data, and how many of them
    /// lie in the tracked set.
    pub fn data_in(&self, start: u64, len: u64) -> (u64, u64) {
        let mut data = 0;
        let mut shared = 0;
        for p in self.lookup(start, len) {
            data += p.data_bytes();
            if let Some((set, _)) = &self.tracked {
                shared += p.bytes_in(set);
            }
        }
        (data, shared)
    }

    fn count_removed(&mut self, removed: &[Piece]) {
        for p in removed {
            // Exact by invariant 5; saturating only so a broken invariant
            // can never panic a request path.
            self.data_bytes = self.data_bytes.saturating_sub(p.data_bytes());
            if let Some((set, n)) = &mut self.tracked {
                *n = n.saturating_sub(p.bytes_in(set));
            }
        }
    }

    fn count_added(&mut self, p: Piece) {
        self.data_bytes += p.data_bytes();
        if let Some((set, n)) = &mut self.tracked {
            *n += p.bytes_in(set);
        }
    }

    /// Every entry in ascending order as `(start, len)`, without decoding
    /// locations (no side-table lookups).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.entries.iter().map(|(s, slot)| (s, slot.len()))
    }

    /// Every entry in ascending order as `(start, len, loc)`.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Loc)> + '_ {
        self.entries
            .iter()
            .map(|(s, slot)| (s, slot.len(), self.loc_of(&slot)))
    }

    /// Unmap `[start, start+len)`; returns the mapped pieces it displaced.
    pub fn remove(&mut self, start: u64, len: u64) -> Vec<Piece> {
        let mut removed = Vec::new();
        if len == 0 {
            return removed;
        }
        let end = start + len;
        // An entry beginning before `start` may reach into the range.
        if let Some((s, l, loc)) = self.covering(start) {
            self.put(s, start - s, loc);
            let cut_end = end.min(s + l);
            removed.push(Piece {
                start,
                len: cut_end - start,
                loc: Some(loc.advance(start - s)),
            });
            if s + l > end {
                self.put(end, s + l - end, loc.advance(end - s));
            }
        }
        let inside: Vec<u64> = self
            .entries
            .range_from(start)
            .map(|(s, _)| s)
            .take_while(|&s| s < end)
            .collect();
        for s in inside {
            let Some((l, loc)) = self.take(s) else {
                continue;
            };
            let cut_end = end.min(s + l);
            removed.push(Piece {
                start: s,
                len: cut_end - s,
                loc: Some(loc),
            });
            if s + l > end {
                self.put(end, s + l - end, loc.advance(end - s));
            }
        }
        self.count_removed(&removed);
        removed
    }

    /// Map `[start, start+len)` to `loc`; returns the mapped pieces it displaced.
    pub fn insert(&mut self, start: u64, len: u64, loc: Loc) -> Vec<Piece> {
        if let Some(removed) = self.insert_within_one(start, len, loc) {
            return removed;
        }
        self.insert_general(start, len, loc)
    }

    /// [`ExtentMap::insert`] for the three shapes of most small writes, in
    /// two to four searches instead of five to seven: `[start, start+len)`
    /// is exactly one entry, lies in a hole, or lies inside one entry that
    /// began before it.
    /// Taken only when no neighbour of the new entry may continue `loc`,
    /// so nothing merges and the result is exactly what
    /// [`ExtentMap::insert_general`] makes; `None` (nothing changed) for
    /// every other case.
    fn insert_within_one(&mut self, start: u64, len: u64, loc: Loc) -> Option<Vec<Piece>> {
        if len == 0 || len > MAX_ENTRY_SECTORS {
            return None;
        }
        let end = start + len;
        // One search: the last entry below `start`, then the two from it on.
        let (pred, first, second) = {
            let mut it = self.entries.pred_and_after(start);
            let mut first = it.next();
            let pred = match first {
                Some((k, slot)) if k < start => {
                    first = it.next();
                    Some((k, slot))
                }
                _ => None,
            };
            (pred, first, it.next())
        };
        let continues_at = |entry: Option<(u64, Slot)>, at: u64| {
            entry.is_some_and(|(k, slot)| k == at && slot.may_continue(&loc))
        };
        // The entry before may merge with the new one (shapes 1 and 3).
        let pred_continues =
            pred.is_some_and(|(pk, ps)| pk + ps.len() == start && ps.may_continue(&loc));
        let removed = match first {
            // Exactly one entry: replaced in place.
            Some((k, old)) if k == start && old.len() == len => {
                if pred_continues || continues_at(second, end) {
                    return None;
                }
                vec![Piece {
                    start,
                    len,
                    loc: Some(self.loc_of(&old)),
                }]
            }
            // In a hole: nothing displaced.
            _ if pred.is_none_or(|(pk, ps)| pk + ps.len() <= start)
                && first.is_none_or(|(k, _)| k >= end) =>
            {
                if pred_continues || continues_at(first, end) {
                    return None;
                }
                Vec::new()
            }
            _ => {
                // Inside the entry before it: that entry keeps its head
                // (and its tail past `end`) around the new one.
                let (s, old) = pred?;
                let l = old.len();
                if s + l < end
                    || old.may_continue(&loc)
                    || (s + l == end && continues_at(first, end))
                {
                    return None;
                }
                let old_loc = self.loc_of(&old);
                self.put(s, start - s, old_loc);
                if s + l > end {
                    self.put(end, s + l - end, old_loc.advance(end - s));
                }
                vec![Piece {
                    start,
                    len,
                    loc: Some(old_loc.advance(start - s)),
                }]
            }
        };
        self.put(start, len, loc);
        self.count_removed(&removed);
        self.count_added(Piece {
            start,
            len,
            loc: Some(loc),
        });
        Some(removed)
    }

    /// [`ExtentMap::insert`] for any range: remove, then put, merging with
    /// the neighbours that continue `loc`.
    fn insert_general(&mut self, start: u64, len: u64, loc: Loc) -> Vec<Piece> {
        let removed = self.remove(start, len);
        if len == 0 {
            return removed;
        }
        self.count_added(Piece {
            start,
            len,
            loc: Some(loc),
        });
        // Ranges longer than one entry can hold are stored in pieces.
        let mut done = 0;
        while len - done > MAX_ENTRY_SECTORS {
            self.put(start + done, MAX_ENTRY_SECTORS, loc.advance(done));
            done += MAX_ENTRY_SECTORS;
        }
        let (mut start, mut len, loc) = (start + done, len - done, loc.advance(done));
        let mut loc_start = loc;
        // `may_continue` first: decoding a WAL slot's location is a
        // side-table lookup, and most neighbours are of other records.
        if let Some((ps, pslot)) = self.entries.pred(start) {
            let pl = pslot.len();
            if ps + pl == start && pl + len <= MAX_ENTRY_SECTORS && pslot.may_continue(&loc) {
                let ploc = self.loc_of(&pslot);
                if ploc.continued_by(pl, &loc) {
                    self.take(ps);
                    start = ps;
                    len += pl;
                    loc_start = ploc;
                }
            }
        }
        if let Some(nslot) = self.entries.get(start + len) {
            let nl = nslot.len();
            if len + nl <= MAX_ENTRY_SECTORS
                && nslot.may_continue(&loc_start)
                && loc_start.continued_by(len, &self.loc_of(&nslot))
            {
                self.take(start + len);
                len += nl;
            }
        }
        self.put(start, len, loc_start);
        removed
    }

    /// Cover `[start, start+len)` with pieces in order, holes as `loc: None`.
    pub fn lookup(&self, start: u64, len: u64) -> Vec<Piece> {
        self.lookup_limited(start, len, usize::MAX)
    }

    /// [`ExtentMap::lookup`], but stop after `max` pieces (at least one):
    /// the pieces then cover only a prefix of the range, in order. Bounds
    /// the work done (and time a lock is held) for a huge range.
    pub fn lookup_limited(&self, start: u64, len: u64, max: usize) -> Vec<Piece> {
        let end = start + len;
        let max = max.max(1);
        let mut out = Vec::new();
        let mut pos = start;
        // One search: the entry before `start` (kept if it reaches into the
        // range), then those starting inside it.
        let entries = self
            .entries
            .pred_and_after(start)
            .take_while(|&(s, _)| s < end)
            .filter(|(s, slot)| s + slot.len() > start)
            .map(|(s, slot)| (s, slot.len(), self.loc_of(&slot)));
        for (s, l, loc) in entries {
            if out.len() >= max {
                return out;
            }
            if s > pos {
                out.push(Piece {
                    start: pos,
                    len: s - pos,
                    loc: None,
                });
                pos = s;
                if out.len() >= max {
                    return out;
                }
            }
            let piece_end = end.min(s + l);
            out.push(Piece {
                start: pos,
                len: piece_end - pos,
                loc: Some(loc.advance(pos - s)),
            });
            pos = piece_end;
        }
        if pos < end && out.len() < max {
            out.push(Piece {
                start: pos,
                len: end - pos,
                loc: None,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests;
