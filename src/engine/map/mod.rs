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
mod tests {
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
}
