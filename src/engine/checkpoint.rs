//! Checkpoint objects. (The manifest, the volume's root, is in
//! [`super::format::manifest`]; it is re-exported here.)
//!
//! A checkpoint holds the store-side extent map exactly as it stands after
//! chunk `chunk_seq` (which ends at op sequence `last_seq`) plus the table of
//! chunks it references. [`Checkpoint::encode`] writes the binary format
//! (`"SHALECP2"`, pages of at most 64 KiB each with its own CRC; see
//! [`codec`]; chunks carry their CRC table's CRC, not the table, which
//! stays in the chunk header: [`super::crc_table`]); [`Checkpoint::decode`] also reads the older JSON format
//! (`"SHALECP1" | crc32c u32 | json`, the CRC covering the JSON bytes), so
//! stores written before the binary format still open; their next
//! checkpoint is binary.
//!
//! Checkpoints form a chain ([`delta`], [`super::meta::chain`]; docs/checkpoints.md): a
//! full checkpoint (the base) and up to `checkpoint_max_deltas` deltas,
//! each holding only what changed since its predecessor. The manifest's
//! `checkpoint` names the newest object of the chain and, when that is a
//! delta, `checkpoint_base` names the base. [`Checkpoint::decode`] refuses
//! a delta ([`CheckpointError::Delta`]); chains are read through
//! [`super::meta::chain::load`].
//!
//! A clone's manifest names its parent snapshot ([`ParentRef`]); in a clone,
//! ranges trimmed or zeroed are kept in the map as [`Loc::Zero`] (the
//! checkpoint's `zeros`), because an unmapped range reads its parent.
//! Volumes without a parent never hold `Loc::Zero` in their stored map, so
//! their checkpoints carry no `zeros` and keep their old encoding.

use serde::{Deserialize, Serialize};

use super::format::chunk::{CRC_BLOCK, MAX_DATA_LEN, MIN_HEADER_LEN};
use super::format::limits::{valid_chunk_id, MAX_SEQ};
use super::map::{ExtentMap, Loc, LocSet};

pub use super::format::manifest::{Manifest, ManifestError, ParentRef};

pub mod capture;
pub mod codec;
pub mod delta;
pub mod dirty;

/// Magic of the older JSON format (still decoded, no longer written).
const CP_MAGIC_JSON: &[u8; 8] = b"SHALECP1";

/// What the engine knows about one stored chunk. The chunk's block-CRC
/// table (one CRC32C per [`CRC_BLOCK`] of the data area) stays in the
/// chunk object's header; only its CRC is kept here, and readers get the
/// table through [`super::crc_table::CrcTables`], which checks it against
/// `table_crc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ChunkInfoJson", into = "ChunkInfoJson")]
pub struct ChunkInfo {
    pub seq: u64,
    pub epoch: u64,
    /// Offset of the data area in the object.
    pub data_start: u64,
    pub data_len: u64,
    /// [`super::format::chunk::table_crc`] of the chunk's block-CRC table.
    pub table_crc: u32,
}

/// A chunk as the JSON format (`SHALECP1`) spells it: older objects list
/// the CRCs (`crcs`), newer ones only their table's CRC (`table_crc`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunkInfoJson {
    seq: u64,
    epoch: u64,
    data_start: u64,
    data_len: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crcs: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table_crc: Option<u32>,
}

impl TryFrom<ChunkInfoJson> for ChunkInfo {
    type Error = String;

    /// A listed table must have one CRC per [`CRC_BLOCK`] of the data
    /// (and agree with `table_crc` if both are given); one of them is
    /// required.
    fn try_from(j: ChunkInfoJson) -> Result<Self, String> {
        let table_crc = match (&j.crcs, j.table_crc) {
            (Some(crcs), t) => {
                if crcs.len() as u64 != j.data_len.div_ceil(CRC_BLOCK) {
                    return Err(format!(
                        "chunk {:#x}: {} checksums for {} bytes of data",
                        j.seq,
                        crcs.len(),
                        j.data_len
                    ));
                }
                let c = super::format::chunk::table_crc(crcs);
                if t.is_some_and(|t| t != c) {
                    return Err(format!("chunk {:#x}: table CRC disagrees", j.seq));
                }
                c
            }
            (None, Some(t)) => t,
            (None, None) => return Err(format!("chunk {:#x}: no checksums", j.seq)),
        };
        Ok(ChunkInfo {
            seq: j.seq,
            epoch: j.epoch,
            data_start: j.data_start,
            data_len: j.data_len,
            table_crc,
        })
    }
}

impl From<ChunkInfo> for ChunkInfoJson {
    fn from(c: ChunkInfo) -> Self {
        ChunkInfoJson {
            seq: c.seq,
            epoch: c.epoch,
            data_start: c.data_start,
            data_len: c.data_len,
            crcs: None,
            table_crc: Some(c.table_crc),
        }
    }
}

/// A serialized store-side map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub volume: u64,
    pub epoch: u64,
    pub chunk_seq: u64,
    pub last_seq: u64,
    pub chunks: Vec<ChunkInfo>,
    /// `(start sector, sectors, chunk seq, data offset)`.
    pub extents: Vec<(u64, u64, u64, u64)>,
    /// `(start sector, sectors)` explicitly zero ([`Loc::Zero`]); only
    /// clones have any (see the module docs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zeros: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("not a checkpoint (bad magic or too short)")]
    BadMagic,
    #[error("checkpoint checksum mismatch")]
    Crc,
    #[error("checkpoint does not parse: {0}")]
    Parse(String),
    #[error("checkpoint is inconsistent: {0}")]
    Inconsistent(String),
    #[error("is missing from the store ({0})")]
    Missing(String),
    #[error("is delta {0} of a chain, not a full checkpoint (read it through its chain)")]
    Delta(u64),
    #[error("checkpoint page {page} (at byte {offset}): {reason}")]
    Page {
        page: usize,
        offset: usize,
        reason: String,
    },
}

impl ChunkInfo {
    /// Check the numbers against each other and the chunk format: a valid
    /// chunk id, a data area that starts after a header and ends within
    /// [`MAX_DATA_LEN`] (the CRC table itself is checked against
    /// `table_crc` when it is read from the chunk header).
    pub fn validate(&self) -> Result<(), String> {
        if !valid_chunk_id(self.seq) {
            return Err(format!("chunk id {:#x} is out of range", self.seq));
        }
        if self.data_start < MIN_HEADER_LEN || self.data_start > u64::from(u32::MAX) {
            return Err(format!(
                "chunk {:#x}: data start {} is not a header length",
                self.seq, self.data_start
            ));
        }
        if self.data_len > MAX_DATA_LEN {
            return Err(format!(
                "chunk {:#x}: data length {} is out of range",
                self.seq, self.data_len
            ));
        }
        Ok(())
    }
}

/// The index of `seq` in `seqs` (ascending, unique). Chunk numbers are
/// mostly dense, so the guess `seq - seqs[0]` is tried first (one load);
/// otherwise bisection. Per extent of a fragmented map, the chunk is
/// random: the guess saves the cache misses of a search.
pub(crate) fn find_seq(seqs: &[u64], seq: u64) -> Option<usize> {
    find_seq_by(seqs, seq, |&s| s)
}

/// [`find_seq`] over entries whose seq is `key(entry)`.
pub(crate) fn find_seq_by<T>(entries: &[T], seq: u64, key: impl Fn(&T) -> u64) -> Option<usize> {
    let guess = seq.checked_sub(key(entries.first()?))?;
    let guess = usize::try_from(guess).ok();
    match guess.and_then(|g| entries.get(g)) {
        Some(e) if key(e) == seq => guess,
        _ => entries.binary_search_by_key(&seq, key).ok(),
    }
}

impl Checkpoint {
    /// Check every number before any is used: sequence numbers in range
    /// ([`MAX_SEQ`]), each chunk valid ([`ChunkInfo::validate`]) and listed
    /// once, normal chunks at or before `chunk_seq`.
    pub fn validate(&self) -> Result<(), CheckpointError> {
        let bad = |m: String| Err(CheckpointError::Inconsistent(m));
        if self.chunk_seq >= MAX_SEQ || self.last_seq >= MAX_SEQ {
            return bad(format!(
                "chunk {} or sequence number {} is out of range",
                self.chunk_seq, self.last_seq
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(self.chunks.len());
        for c in &self.chunks {
            c.validate().map_err(CheckpointError::Inconsistent)?;
            if !seen.insert(c.seq) {
                return bad(format!("chunk {:#x} is listed twice", c.seq));
            }
            if c.seq & super::format::limits::COMPACTED_BIT == 0 && c.seq > self.chunk_seq {
                return bad(format!(
                    "chunk {} lies after the checkpoint's chunk {}",
                    c.seq, self.chunk_seq
                ));
            }
        }
        Ok(())
    }

    /// Add every chunk location this checkpoint's extents reference to
    /// `set`.
    pub fn add_locations(&self, set: &mut LocSet) {
        for &(_, len, chunk, off) in &self.extents {
            set.insert(chunk, off, len.saturating_mul(super::SECTOR));
        }
    }

    /// Capture `map` (which must hold only chunk and zero locations).
    pub fn from_map(
        volume: u64,
        epoch: u64,
        chunk_seq: u64,
        last_seq: u64,
        map: &ExtentMap,
        chunks: Vec<ChunkInfo>,
    ) -> Checkpoint {
        let (extents, zeros) = capture::split(map);
        Checkpoint {
            volume,
            epoch,
            chunk_seq,
            last_seq,
            chunks,
            extents,
            zeros,
        }
    }

    /// An empty map at the very start of a volume's history.
    pub fn empty(volume: u64, epoch: u64, last_seq: u64) -> Checkpoint {
        Checkpoint {
            volume,
            epoch,
            chunk_seq: 0,
            last_seq,
            chunks: Vec::new(),
            extents: Vec::new(),
            zeros: Vec::new(),
        }
    }

    /// Rebuild the map, checking every number first ([`Checkpoint::validate`])
    /// and that every extent names a listed chunk and stays inside its data
    /// area and the volume.
    pub fn to_map(&self, volume_sectors: u64) -> Result<ExtentMap, CheckpointError> {
        self.validate()?;
        // `(seq, data_len)` by seq (seqs are unique: validated), searched
        // by bisection: a hash lookup per extent (SipHash, a random chunk
        // each time) was most of an open of a fragmented volume.
        let mut data_lens: Vec<(u64, u64)> =
            self.chunks.iter().map(|c| (c.seq, c.data_len)).collect();
        data_lens.sort_unstable();
        let extent = |&(s, l, c, off): &(u64, u64, u64, u64)| {
            // Seq and length side by side: one cache miss, not two.
            let data_len = find_seq_by(&data_lens, c, |&(seq, _)| seq)
                .map(|i| data_lens[i].1)
                .ok_or_else(|| CheckpointError::Inconsistent(format!("unknown chunk {c}")))?;
            let fits_data = l
                .checked_mul(super::SECTOR)
                .and_then(|b| b.checked_add(off))
                .is_some_and(|e| e <= data_len);
            let fits_volume = s.checked_add(l).is_some_and(|e| e <= volume_sectors);
            if !fits_volume {
                return Err(CheckpointError::Inconsistent(format!(
                    "extent {s}+{l} lies past the volume size ({volume_sectors} sectors; opened with a smaller size?)"
                )));
            }
            if l == 0 || !fits_data {
                return Err(CheckpointError::Inconsistent(format!(
                    "extent {s}+{l} lies outside the data of chunk {c}"
                )));
            }
            Ok((s, l, Loc::Chunk { chunk: c, off }))
        };
        let zero = |&(s, l): &(u64, u64)| {
            if l == 0 || s.checked_add(l).is_none_or(|e| e > volume_sectors) {
                return Err(CheckpointError::Inconsistent(format!(
                    "zero range {s}+{l} is empty or lies past the volume size ({volume_sectors} sectors)"
                )));
            }
            Ok((s, l, Loc::Zero))
        };
        let overlap = |(s, l)| {
            CheckpointError::Inconsistent(format!("range {s}+{l} overlaps another extent"))
        };
        let sorted = self.extents.is_sorted_by_key(|e| e.0) && self.zeros.is_sorted_by_key(|z| z.0);
        if !sorted {
            // Not what an encoder writes: check every run, sort, build.
            let mut runs = Vec::with_capacity(self.extents.len() + self.zeros.len());
            for e in &self.extents {
                runs.push(extent(e)?);
            }
            for z in &self.zeros {
                runs.push(zero(z)?);
            }
            // Stable: at equal starts the extent comes first (as below).
            runs.sort_by_key(|r| r.0);
            return ExtentMap::from_sorted(runs).map_err(overlap);
        }
        // Both lists in order: merge them as the map is built, so no list
        // of all runs is held (at 10^8 extents that list was 8 GB).
        let (mut ei, mut zi) = (0, 0);
        let mut bad = None;
        let runs = std::iter::from_fn(|| {
            let take_zero = match (self.extents.get(ei), self.zeros.get(zi)) {
                (Some(e), Some(z)) => z.0 < e.0,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (None, None) => return None,
            };
            let run = if take_zero {
                zi += 1;
                zero(&self.zeros[zi - 1])
            } else {
                ei += 1;
                extent(&self.extents[ei - 1])
            };
            run.map_err(|e| bad = Some(e)).ok()
        });
        let map = ExtentMap::from_sorted(runs);
        match bad {
            Some(e) => Err(e),
            None => map.map_err(overlap),
        }
    }

    /// The binary encoding ([`codec`]).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// The older JSON encoding (`SHALECP1`): no longer written by the
    /// engine; kept for tests, fuzz seeds and old-store fixtures.
    pub fn encode_json(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut b = Vec::with_capacity(json.len() + 12);
        b.extend_from_slice(CP_MAGIC_JSON);
        b.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
        b.extend_from_slice(&json);
        b
    }

    /// Decode either format (chosen by the magic). Numbers are checked by
    /// [`Checkpoint::validate`] and [`Checkpoint::to_map`], not here.
    pub fn decode(b: &[u8]) -> Result<Checkpoint, CheckpointError> {
        if b.len() >= 8 && &b[..8] == codec::MAGIC {
            return codec::decode(b);
        }
        if b.len() < 12 || &b[..8] != CP_MAGIC_JSON {
            return Err(CheckpointError::BadMagic);
        }
        let crc = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if crc32c::crc32c(&b[12..]) != crc {
            return Err(CheckpointError::Crc);
        }
        serde_json::from_slice(&b[12..]).map_err(|e| CheckpointError::Parse(e.to_string()))
    }
}

#[cfg(test)]
mod tests;
