//! Delta checkpoints and the chain they form (issue 11).
//!
//! A volume's committed map is a *chain*: one full checkpoint (the base,
//! [`Checkpoint`]) followed by up to a bound of deltas, each holding only
//! what changed since its predecessor:
//! - the changed ranges of the stored map ([`DeltaPages::ranges`]) with
//!   their new contents (the delta's `extents` and `zeros`; whatever of a
//!   changed range they do not cover is unmapped);
//! - the chunk-table entries added (the delta's `chunks`) and the chunk
//!   ids removed ([`DeltaPages::removed`]);
//! - a link naming the base's key, the predecessor's key and `chunk_seq`,
//!   and the delta's position in the chain.
//!
//! The manifest names the newest object (base or delta) and, for a delta,
//! the base (`checkpoint_base`); open walks the links back to the base and
//! applies the deltas oldest first ([`Chain`]).
//!
//! Invariants checked by [`Chain::apply`] before a delta changes anything:
//! it belongs to the same volume, continues its predecessor (`chunk_seq`
//! and `last_seq` never go back, `prev_chunk_seq` is the predecessor's),
//! its ranges are ascending, disjoint, non-empty and inside the volume,
//! its extents and zero ranges lie inside its ranges in order, an added
//! chunk is valid and not already in the table (a normal one numbered
//! after the predecessor's chunk and at most the delta's), and a removed
//! chunk is in the table. [`Chain::finish`] then checks that every extent
//! of the resulting map names a chunk of the table and stays inside its
//! data.

use std::collections::BTreeMap;

use super::codec::{self, DeltaPages};
use super::{Checkpoint, CheckpointError, ChunkInfo};
use crate::engine::format::limits::COMPACTED_BIT;
use crate::engine::format::limits::MAX_SEQ;
use crate::engine::map::{ExtentMap, Loc};
use crate::engine::SECTOR;

/// One delta checkpoint: its header fields and added chunks, extents and
/// zero ranges in `body`, the rest in `pages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub body: Checkpoint,
    pub pages: DeltaPages,
}

/// A decoded checkpoint object of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointObject {
    Full(Checkpoint),
    Delta(Delta),
}

impl CheckpointObject {
    /// Decode either kind (the older JSON format is always full).
    pub fn decode(b: &[u8]) -> Result<CheckpointObject, CheckpointError> {
        if b.len() >= 8 && &b[..8] == codec::MAGIC {
            return Ok(match codec::decode_any(b)? {
                (cp, None) => CheckpointObject::Full(cp),
                (body, Some(pages)) => CheckpointObject::Delta(Delta { body, pages }),
            });
        }
        Checkpoint::decode(b).map(CheckpointObject::Full)
    }
}

impl Delta {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_with(&self.body, Some(&self.pages))
    }

    /// The delta describing `map` (the stored map as of `chunk_seq`) over
    /// its predecessor: `changed` are the ranges changed since then (from
    /// the dirty set), `added` the chunk infos new to the table, `removed`
    /// the ids that left it. Work is proportional to the changed ranges'
    /// entries, not the map.
    #[allow(clippy::too_many_arguments)]
    pub fn capture(
        head: (u64, u64, u64, u64),
        link: (u64, u64, String, String),
        map: &ExtentMap,
        changed: impl Iterator<Item = (u64, u64)>,
        mut added: Vec<ChunkInfo>,
        mut removed: Vec<u64>,
    ) -> Delta {
        let (volume, epoch, chunk_seq, last_seq) = head;
        let (position, prev_chunk_seq, base, prev) = link;
        let mut ranges = Vec::new();
        let mut extents = Vec::new();
        let mut zeros = Vec::new();
        for (s, l) in changed {
            ranges.push((s, l));
            for p in map.lookup(s, l) {
                match p.loc {
                    Some(Loc::Chunk { chunk, off }) => extents.push((p.start, p.len, chunk, off)),
                    Some(Loc::Zero) => zeros.push((p.start, p.len)),
                    _ => {}
                }
            }
        }
        added.sort_by_key(|c| c.seq);
        removed.sort_unstable();
        Delta {
            body: Checkpoint {
                volume,
                epoch,
                chunk_seq,
                last_seq,
                chunks: added,
                extents,
                zeros,
            },
            pages: DeltaPages {
                position,
                prev_chunk_seq,
                base,
                prev,
                ranges,
                removed,
            },
        }
    }
}

/// A map and chunk table being rebuilt from a base and its deltas.
#[derive(Debug)]
pub struct Chain {
    pub volume: u64,
    pub epoch: u64,
    pub chunk_seq: u64,
    pub last_seq: u64,
    pub map: ExtentMap,
    pub chunks: BTreeMap<u64, ChunkInfo>,
    /// Deltas applied so far.
    pub applied: u64,
    volume_sectors: u64,
}

fn bad<T>(m: String) -> Result<T, CheckpointError> {
    Err(CheckpointError::Inconsistent(m))
}

impl Chain {
    /// Start from a full checkpoint (checked by [`Checkpoint::to_map`]).
    pub fn from_base(cp: Checkpoint, volume_sectors: u64) -> Result<Chain, CheckpointError> {
        let map = cp.to_map(volume_sectors)?;
        Ok(Chain {
            volume: cp.volume,
            epoch: cp.epoch,
            chunk_seq: cp.chunk_seq,
            last_seq: cp.last_seq,
            map,
            chunks: cp.chunks.into_iter().map(|c| (c.seq, c)).collect(),
            applied: 0,
            volume_sectors,
        })
    }

    /// Apply the next delta (see the module invariants; nothing changes
    /// on error).
    pub fn apply(&mut self, d: &Delta) -> Result<(), CheckpointError> {
        let (b, p) = (&d.body, &d.pages);
        if b.volume != self.volume {
            return bad(format!(
                "names volume {:x}, not {:x}",
                b.volume, self.volume
            ));
        }
        if b.chunk_seq >= MAX_SEQ || b.last_seq >= MAX_SEQ {
            return bad(format!(
                "chunk {} or sequence number {} is out of range",
                b.chunk_seq, b.last_seq
            ));
        }
        if p.position != self.applied + 1 {
            return bad(format!(
                "is delta {} but follows delta {}",
                p.position, self.applied
            ));
        }
        if p.prev_chunk_seq != self.chunk_seq
            || b.chunk_seq < self.chunk_seq
            || b.last_seq < self.last_seq
        {
            return bad(format!(
                "continues chunk {} up to chunk {} (sequence {}), but its predecessor ends at chunk {} (sequence {})",
                p.prev_chunk_seq, b.chunk_seq, b.last_seq, self.chunk_seq, self.last_seq
            ));
        }
        // Ranges: ascending, disjoint, non-empty, inside the volume.
        let mut end = 0u64;
        for &(s, l) in &p.ranges {
            let e = s.checked_add(l);
            if l == 0 || s < end || e.is_none_or(|e| e > self.volume_sectors) {
                return bad(format!(
                    "changed range {s}+{l} is empty, out of order or past the volume size ({} sectors)",
                    self.volume_sectors
                ));
            }
            end = e.unwrap_or(u64::MAX);
        }
        within(
            &p.ranges,
            b.extents.iter().map(|&(s, l, _, _)| (s, l)),
            "extent",
        )?;
        within(&p.ranges, b.zeros.iter().copied(), "zero range")?;
        // Chunk table changes.
        let mut seen = std::collections::HashSet::new();
        for c in &b.chunks {
            c.validate().map_err(CheckpointError::Inconsistent)?;
            if !seen.insert(c.seq) || self.chunks.contains_key(&c.seq) {
                return bad(format!(
                    "adds chunk {:#x}, which the table already holds",
                    c.seq
                ));
            }
            let normal = c.seq & COMPACTED_BIT == 0;
            if normal && (c.seq <= self.chunk_seq || c.seq > b.chunk_seq) {
                return bad(format!(
                    "adds chunk {} outside chunks {}..={}",
                    c.seq,
                    self.chunk_seq + 1,
                    b.chunk_seq
                ));
            }
        }
        let added: std::collections::HashMap<u64, &ChunkInfo> =
            b.chunks.iter().map(|c| (c.seq, c)).collect();
        let gone: std::collections::HashSet<u64> = p.removed.iter().copied().collect();
        let mut last = None;
        for &r in &p.removed {
            if last.is_some_and(|l| r <= l) || !self.chunks.contains_key(&r) || seen.contains(&r) {
                return bad(format!(
                    "removes chunk {r:#x}, which the table does not hold (or twice)"
                ));
            }
            last = Some(r);
        }
        // Extents name a chunk of the new table and fit its data.
        for &(s, l, c, off) in &b.extents {
            let info = added
                .get(&c)
                .copied()
                .or_else(|| self.chunks.get(&c).filter(|_| !gone.contains(&c)));
            let Some(info) = info else {
                return bad(format!("extent {s}+{l} names unknown chunk {c:#x}"));
            };
            let fits = l
                .checked_mul(SECTOR)
                .and_then(|x| x.checked_add(off))
                .is_some_and(|e| e <= info.data_len);
            if !fits {
                return bad(format!(
                    "extent {s}+{l} lies outside the data of chunk {c:#x}"
                ));
            }
        }
        // Everything checked: apply.
        for &r in &p.removed {
            self.chunks.remove(&r);
        }
        for c in &b.chunks {
            self.chunks.insert(c.seq, c.clone());
        }
        for &(s, l) in &p.ranges {
            self.map.remove(s, l);
        }
        for &(s, l, c, off) in &b.extents {
            self.map.insert(s, l, Loc::Chunk { chunk: c, off });
        }
        for &(s, l) in &b.zeros {
            self.map.insert(s, l, Loc::Zero);
        }
        self.epoch = b.epoch;
        self.chunk_seq = b.chunk_seq;
        self.last_seq = b.last_seq;
        self.applied += 1;
        Ok(())
    }

    /// After the last delta: every extent names a chunk of the table (a
    /// removed chunk no range still uses), checked once over the map.
    pub fn finish(self) -> Result<Chain, CheckpointError> {
        if self.applied > 0 {
            for (s, l, loc) in self.map.iter() {
                if let Loc::Chunk { chunk, .. } = loc {
                    if !self.chunks.contains_key(&chunk) {
                        return bad(format!(
                            "extent {s}+{l} names chunk {chunk:#x}, which a delta removed"
                        ));
                    }
                }
            }
        }
        Ok(self)
    }

    /// The chain as one full checkpoint.
    pub fn into_checkpoint(self) -> Checkpoint {
        let chunks = self.chunks.into_values().collect();
        Checkpoint::from_map(
            self.volume,
            self.epoch,
            self.chunk_seq,
            self.last_seq,
            &self.map,
            chunks,
        )
    }
}

/// Check that `items` (ascending, non-empty, non-overlapping) lie inside
/// `ranges` (ascending).
fn within(
    ranges: &[(u64, u64)],
    items: impl Iterator<Item = (u64, u64)>,
    what: &str,
) -> Result<(), CheckpointError> {
    let mut r = 0usize;
    let mut end = 0u64;
    for (s, l) in items {
        let e = s.checked_add(l);
        if l == 0 || s < end || e.is_none() {
            return bad(format!(
                "{what} {s}+{l} is empty, overflows or out of order"
            ));
        }
        let e = e.unwrap_or(u64::MAX);
        while r < ranges.len() && ranges[r].0 + ranges[r].1 <= s {
            r += 1;
        }
        let inside = ranges
            .get(r)
            .is_some_and(|&(rs, rl)| rs <= s && e <= rs + rl);
        if !inside {
            return bad(format!(
                "{what} {s}+{l} lies outside the delta's changed ranges"
            ));
        }
        end = e;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
