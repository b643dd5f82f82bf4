//! Manifest and checkpoint objects.
//!
//! The manifest (`volumes/<id>/manifest`, JSON) is the volume's root: the
//! writer epoch and the newest checkpoint. It is created with
//! `PutMode::Create` and only ever replaced with `PutMode::IfMatch`, so a
//! writer that lost the volume to a newer epoch cannot commit.
//!
//! A checkpoint holds the store-side extent map exactly as it stands after
//! chunk `chunk_seq` (which ends at op sequence `last_seq`) plus the table of
//! chunks it references. Encoding: `"SHALECP1" | crc32c u32 | json`, the CRC
//! covering the JSON bytes.
//!
//! A clone's manifest names its parent snapshot ([`ParentRef`]); in a clone,
//! ranges trimmed or zeroed are kept in the map as [`Loc::Zero`] (the
//! checkpoint's `zeros`), because an unmapped range reads its parent.
//! Volumes without a parent never hold `Loc::Zero` in their stored map, so
//! their checkpoints carry no `zeros` and keep their old encoding.

use serde::{Deserialize, Serialize};

use super::chunk::{CRC_BLOCK, MAX_DATA_LEN, MIN_HEADER_LEN};
use super::error::EngineError;
use super::limits::{get_capped, valid_chunk_id, MAX_MANIFEST_BYTES, MAX_SEQ};
use super::map::{ExtentMap, Loc};
use super::snapshot::ParentRef;
use crate::store::{DynStore, Object};

const CP_MAGIC: &[u8; 8] = b"SHALECP1";

/// The volume's root object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub volume: u64,
    pub epoch: u64,
    /// Key of the newest checkpoint, if any.
    pub checkpoint: Option<String>,
    /// Last chunk covered by that checkpoint (0: none).
    pub checkpoint_chunk: u64,
    /// Last chunk known to be in the store when the manifest was written.
    pub last_chunk: u64,
    /// Last op sequence number in the store when the manifest was written.
    pub last_seq: u64,
    /// Epoch that owns the history after `last_chunk`: a chunk with a
    /// higher sequence number is valid only if its epoch is at least this
    /// (0 in manifests written before the field existed: no bound).
    #[serde(default)]
    pub history_epoch: u64,
    /// The snapshot a clone reads through to where its own map is unmapped
    /// (absent in volumes that are not clones, and after a flatten).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
}

pub fn manifest_key(volume: u64) -> String {
    format!("volumes/{volume:016x}/manifest")
}

/// Prefix of every checkpoint key of `volume`.
pub fn checkpoint_prefix(volume: u64) -> String {
    format!("volumes/{volume:016x}/checkpoints/")
}

pub fn checkpoint_key(volume: u64, chunk_seq: u64, epoch: u64) -> String {
    format!("{}{chunk_seq:016x}-{epoch:08x}", checkpoint_prefix(volume))
}

impl Manifest {
    /// Check that the numbers agree with each other and stay in bounds
    /// ([`MAX_SEQ`]): the manifest names `volume`, its checkpoint chunk is
    /// at most its last chunk, its history epoch at most its epoch, and its
    /// checkpoint is one of the volume's checkpoint keys.
    pub fn validate(&self, volume: u64) -> Result<(), String> {
        if self.volume != volume {
            return Err(format!("names volume {:x}", self.volume));
        }
        if self.last_chunk >= MAX_SEQ || self.last_seq >= MAX_SEQ {
            return Err(format!(
                "last chunk {} or last sequence number {} is out of range",
                self.last_chunk, self.last_seq
            ));
        }
        if self.checkpoint_chunk > self.last_chunk {
            return Err(format!(
                "checkpoint chunk {} lies after the last chunk {}",
                self.checkpoint_chunk, self.last_chunk
            ));
        }
        if self.history_epoch > self.epoch {
            return Err(format!(
                "history epoch {} is newer than the epoch {}",
                self.history_epoch, self.epoch
            ));
        }
        if let Some(k) = &self.checkpoint {
            if !k.starts_with(&checkpoint_prefix(volume)) {
                return Err(format!("checkpoint {k:?} is not one of this volume's"));
            }
        }
        Ok(())
    }

    /// Parse and [`validate`](Manifest::validate) the manifest of `volume`.
    pub fn parse(volume: u64, data: &[u8]) -> Result<Manifest, EngineError> {
        let err = |reason: String| EngineError::Manifest {
            key: manifest_key(volume),
            reason,
        };
        let m: Manifest =
            serde_json::from_slice(data).map_err(|e| err(format!("does not parse: {e}")))?;
        m.validate(volume).map_err(err)?;
        Ok(m)
    }
}

/// Read the manifest of `volume` (at most [`MAX_MANIFEST_BYTES`]) and
/// check it; returns it with the object (for its version).
pub async fn read_manifest(
    store: &DynStore,
    volume: u64,
) -> Result<(Manifest, Object), EngineError> {
    let o = get_capped(store, &manifest_key(volume), MAX_MANIFEST_BYTES, "manifest").await?;
    Ok((Manifest::parse(volume, &o.data)?, o))
}

/// What the engine knows about one stored chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    pub seq: u64,
    pub epoch: u64,
    /// Offset of the data area in the object.
    pub data_start: u64,
    pub data_len: u64,
    /// CRC32C per [`super::chunk::CRC_BLOCK`] of the data area.
    pub crcs: Vec<u32>,
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
}

impl ChunkInfo {
    /// Check the numbers against each other and the chunk format: a valid
    /// chunk id, a data area that starts after a header and ends within
    /// [`MAX_DATA_LEN`], one CRC per [`CRC_BLOCK`] of it.
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
        if self.crcs.len() as u64 != self.data_len.div_ceil(CRC_BLOCK) {
            return Err(format!(
                "chunk {:#x}: {} checksums for {} bytes of data",
                self.seq,
                self.crcs.len(),
                self.data_len
            ));
        }
        Ok(())
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
            if c.seq & super::chunk::COMPACTED_BIT == 0 && c.seq > self.chunk_seq {
                return bad(format!(
                    "chunk {} lies after the checkpoint's chunk {}",
                    c.seq, self.chunk_seq
                ));
            }
        }
        Ok(())
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
        let extents = map
            .iter()
            .filter_map(|(s, l, loc)| match loc {
                Loc::Chunk { chunk, off } => Some((s, l, chunk, off)),
                _ => None,
            })
            .collect();
        let zeros = map
            .iter()
            .filter_map(|(s, l, loc)| matches!(loc, Loc::Zero).then_some((s, l)))
            .collect();
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
        let mut map = ExtentMap::new();
        for &(s, l, c, off) in &self.extents {
            let info = self
                .chunks
                .iter()
                .find(|i| i.seq == c)
                .ok_or_else(|| CheckpointError::Inconsistent(format!("unknown chunk {c}")))?;
            let fits_data = l
                .checked_mul(super::SECTOR)
                .and_then(|b| b.checked_add(off))
                .is_some_and(|e| e <= info.data_len);
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
            map.insert(s, l, Loc::Chunk { chunk: c, off });
        }
        for &(s, l) in &self.zeros {
            if l == 0 || s.checked_add(l).is_none_or(|e| e > volume_sectors) {
                return Err(CheckpointError::Inconsistent(format!(
                    "zero range {s}+{l} is empty or lies past the volume size ({volume_sectors} sectors)"
                )));
            }
            if !map.insert(s, l, Loc::Zero).is_empty() {
                return Err(CheckpointError::Inconsistent(format!(
                    "zero range {s}+{l} overlaps another extent"
                )));
            }
        }
        Ok(map)
    }

    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut b = Vec::with_capacity(json.len() + 12);
        b.extend_from_slice(CP_MAGIC);
        b.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
        b.extend_from_slice(&json);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Checkpoint, CheckpointError> {
        if b.len() < 12 || &b[..8] != CP_MAGIC {
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
mod tests {
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
                crcs: vec![1u32],
            },
            ChunkInfo {
                seq: 2,
                epoch: 1,
                data_start: 100,
                data_len: 4096,
                crcs: vec![2u32],
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

    #[test]
    fn manifest_json_rejects_unknown_fields() {
        let m = Manifest {
            volume: 1,
            epoch: 2,
            checkpoint: None,
            checkpoint_chunk: 0,
            last_chunk: 0,
            last_seq: 0,
            history_epoch: 2,
            parent: None,
        };
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&j).unwrap(), m);
        let extra = j.replace("{", "{\"x\":1,");
        assert!(serde_json::from_str::<Manifest>(&extra).is_err());
        assert_eq!(manifest_key(0x10), "volumes/0000000000000010/manifest");
    }

    /// A clone's manifest names its parent; manifests without the field
    /// (every volume that is not a clone, and older ones) parse as before
    /// and are written without it.
    #[test]
    fn manifest_parent_is_optional() {
        let old = r#"{"volume":1,"epoch":2,"checkpoint":null,"checkpoint_chunk":0,"last_chunk":0,"last_seq":0,"history_epoch":2}"#;
        let m: Manifest = serde_json::from_str(old).unwrap();
        assert_eq!(m.parent, None);
        assert_eq!(serde_json::to_string(&m).unwrap(), old);
        let clone = Manifest {
            parent: Some(ParentRef {
                volume: 3,
                snapshot: 4,
            }),
            ..m
        };
        let j = serde_json::to_string(&clone).unwrap();
        assert!(j.contains(r#""parent":{"volume":3,"snapshot":4}"#), "{j}");
        assert_eq!(serde_json::from_str::<Manifest>(&j).unwrap(), clone);
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
            crcs: vec![1u32],
        }];
        let plain = Checkpoint::from_map(5, 1, 1, 4, &map, chunks.clone());
        assert!(plain.zeros.is_empty());
        let json = String::from_utf8_lossy(&plain.encode()[12..]).to_string();
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
        let mut map = ExtentMap::new();
        map.insert(0, 8, Loc::Chunk { chunk: 1, off: 0 });
        map.insert(8, 8, Loc::Zero);
        let chunks = vec![ChunkInfo {
            seq: 1,
            epoch: 1,
            data_start: 100,
            data_len: 4096,
            crcs: vec![1u32],
        }];
        let enc = Checkpoint::from_map(5, 1, 1, 4, &map, chunks).encode();
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
}
