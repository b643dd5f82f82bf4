//! The snapshot object codec: `volumes/<v:016x>/snapshots/<id:016x>`
//! ([`SnapshotObject`]) is `"SHALESN2" | crc32c u32 | json length u32 |
//! json | checkpoint`, the CRC covering the length and the JSON (every
//! field but the map), the checkpoint in its binary format (with its own
//! checksums; [`crate::engine::checkpoint::codec`]). Objects written
//! before that format, `"SHALESN1" | crc32c u32 | json` (the map inside the
//! JSON), still decode. Pure encode and decode, no store I/O (that is
//! [`crate::engine::snapshot`]).
//!
//! It sits above the rest of `format`: the map it holds is a
//! [`Checkpoint`] (see `tests/engine_layers.rs`).

use serde::{Deserialize, Serialize};

use super::manifest::ParentRef;
use crate::engine::checkpoint::Checkpoint;
use crate::engine::format::limits::MAX_SEQ;

/// Magic of the older all-JSON format (still decoded, no longer written).
const SNAP_MAGIC_JSON: &[u8; 8] = b"SHALESN1";
const SNAP_MAGIC: &[u8; 8] = b"SHALESN2";

/// Every [`SnapshotObject`] field but the map: the JSON part of `SHALESN2`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotMeta {
    id: u64,
    name: String,
    volume: u64,
    created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<ParentRef>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleting: bool,
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotObject {
    /// Stable id, unique within the volume (never reused while it exists).
    pub id: u64,
    /// Name, unique within the volume.
    pub name: String,
    pub volume: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The frozen map (its `chunk_seq` is the volume's chunk at that time).
    pub checkpoint: Checkpoint,
    /// Where the volume read through to when the snapshot was taken (a
    /// clone's parent); unmapped ranges of `checkpoint` read from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// A delete of the snapshot began (invariant 1): it still holds its
    /// chunks but gets no new clones. Absent (false) in every object
    /// written before the mark existed and in every unmarked one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

/// Snapshot object decoding failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotDecodeError {
    #[error("not a snapshot (bad magic or too short)")]
    BadMagic,
    #[error("snapshot checksum mismatch")]
    Crc,
    #[error("snapshot does not parse: {0}")]
    Parse(String),
    #[error("snapshot is inconsistent: {0}")]
    Invalid(String),
}

impl SnapshotObject {
    /// The current encoding (`SHALESN2`, the map in binary).
    pub fn encode(&self) -> Vec<u8> {
        let meta = SnapshotMeta {
            id: self.id,
            name: self.name.clone(),
            volume: self.volume,
            created_ms: self.created_ms,
            parent: self.parent,
            deleting: self.deleting,
        };
        let json = serde_json::to_vec(&meta).unwrap_or_default();
        let cp = self.checkpoint.encode();
        let mut b = Vec::with_capacity(16 + json.len() + cp.len());
        b.extend_from_slice(SNAP_MAGIC);
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&(json.len() as u32).to_le_bytes());
        b.extend_from_slice(&json);
        let crc = crc32c::crc32c(&b[12..]);
        b[8..12].copy_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(&cp);
        b
    }

    /// The older all-JSON encoding (`SHALESN1`): no longer written; kept
    /// for tests and fuzz seeds.
    pub fn encode_json(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut b = Vec::with_capacity(json.len() + 12);
        b.extend_from_slice(SNAP_MAGIC_JSON);
        b.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
        b.extend_from_slice(&json);
        b
    }

    /// Decode either format (chosen by the magic).
    pub fn decode(b: &[u8]) -> Result<SnapshotObject, SnapshotDecodeError> {
        if b.len() < 12 {
            return Err(SnapshotDecodeError::BadMagic);
        }
        let crc = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if &b[..8] == SNAP_MAGIC_JSON {
            if crc32c::crc32c(&b[12..]) != crc {
                return Err(SnapshotDecodeError::Crc);
            }
            return serde_json::from_slice(&b[12..])
                .map_err(|e| SnapshotDecodeError::Parse(e.to_string()));
        }
        if &b[..8] != SNAP_MAGIC || b.len() < 16 {
            return Err(SnapshotDecodeError::BadMagic);
        }
        let len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as usize;
        let Some(json) = b.get(16..16 + len) else {
            return Err(SnapshotDecodeError::Parse(format!(
                "its {len} bytes of JSON run past the end"
            )));
        };
        if crc32c::crc32c(&b[12..16 + len]) != crc {
            return Err(SnapshotDecodeError::Crc);
        }
        let m: SnapshotMeta =
            serde_json::from_slice(json).map_err(|e| SnapshotDecodeError::Parse(e.to_string()))?;
        let checkpoint = Checkpoint::decode(&b[16 + len..])
            .map_err(|e| SnapshotDecodeError::Parse(format!("its map: {e}")))?;
        Ok(SnapshotObject {
            id: m.id,
            name: m.name,
            volume: m.volume,
            created_ms: m.created_ms,
            checkpoint,
            parent: m.parent,
            deleting: m.deleting,
        })
    }

    /// Check the numbers of a snapshot read from key `snapshot_key(volume,
    /// id)`: it names that volume and id, the id is in range (so the next
    /// id never wraps), and its checkpoint is valid
    /// ([`Checkpoint::validate`]).
    pub fn validate(&self, volume: u64, id: u64) -> Result<(), SnapshotDecodeError> {
        let bad = |m: String| Err(SnapshotDecodeError::Invalid(m));
        if self.volume != volume || self.id != id {
            return bad(format!(
                "holds snapshot {:016x} of volume {:016x}",
                self.id, self.volume
            ));
        }
        if !(1..MAX_SEQ).contains(&self.id) {
            return bad(format!("snapshot id {:#x} is out of range", self.id));
        }
        if self.checkpoint.volume != volume {
            return bad(format!(
                "its map is of volume {:016x}",
                self.checkpoint.volume
            ));
        }
        self.checkpoint
            .validate()
            .map_err(|e| SnapshotDecodeError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clone's snapshot object with the given zero ranges.
    fn sample(zeros: Vec<(u64, u64)>) -> SnapshotObject {
        SnapshotObject {
            id: 3,
            name: "s".into(),
            volume: 7,
            created_ms: 1,
            checkpoint: Checkpoint {
                chunk_seq: 4,
                zeros,
                ..Checkpoint::empty(7, 2, 9)
            },
            parent: Some(ParentRef {
                volume: 1,
                snapshot: 2,
            }),
            deleting: false,
        }
    }

    #[test]
    fn snapshot_object_round_trip_and_corruption() {
        let snap = sample(Vec::new());
        let enc = snap.encode();
        assert_eq!(SnapshotObject::decode(&enc).unwrap(), snap);
        assert_eq!(&enc[..8], b"SHALESN2");
        // The map is binary (its own magic), after the JSON part.
        assert!(enc.windows(8).any(|w| w == b"SHALECP2"));
        let mut bad = enc.clone();
        bad[20] ^= 1;
        assert_eq!(SnapshotObject::decode(&bad), Err(SnapshotDecodeError::Crc));
        let mut bad = enc.clone();
        let n = bad.len();
        bad[n - 2] ^= 1;
        let e = SnapshotObject::decode(&bad).unwrap_err().to_string();
        assert!(e.contains("its map"), "{e}");
        for cut in 0..enc.len() {
            assert!(SnapshotObject::decode(&enc[..cut]).is_err(), "cut {cut}");
        }
        // Objects written before the binary format still decode.
        let old = snap.encode_json();
        assert_eq!(&old[..8], b"SHALESN1");
        assert_eq!(SnapshotObject::decode(&old).unwrap(), snap);
        let mut bad = old.clone();
        let n = bad.len();
        bad[n - 2] ^= 1;
        assert_eq!(SnapshotObject::decode(&bad), Err(SnapshotDecodeError::Crc));
        assert_eq!(
            SnapshotObject::decode(b"SHALECP1xxxx{}"),
            Err(SnapshotDecodeError::BadMagic)
        );
    }

    /// Garbage and mutated snapshot objects (a clone's, with a parent and
    /// zero ranges) give errors or objects, never panics.
    #[test]
    fn decoder_survives_random_input() {
        let snap = sample(vec![(0, 8), (100, 4)]);
        let old = snap.encode_json();
        let mut x = 7u64;
        for i in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut m = old.clone();
            let at = 12 + (x as usize) % (m.len() - 12);
            m[at] = (x >> 32) as u8;
            // Keep the CRC right so the JSON parser sees the mutation.
            let crc = crc32c::crc32c(&m[12..]).to_le_bytes();
            m[8..12].copy_from_slice(&crc);
            let m = &m[..m.len() - i % 3];
            if let Ok(s) = SnapshotObject::decode(m) {
                let _ = s.checkpoint.to_map(1 << 20);
            }
        }
        // The binary form: mutate the JSON part (CRC kept right) or the
        // length field; the map's own pages are the codec's tests.
        let enc = snap.encode();
        let json_end = 16 + u32::from_le_bytes([enc[12], enc[13], enc[14], enc[15]]) as usize;
        for i in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut m = enc.clone();
            let at = 12 + (x as usize) % (json_end - 12);
            m[at] = (x >> 32) as u8;
            let end = (16 + u32::from_le_bytes([m[12], m[13], m[14], m[15]]) as usize).min(m.len());
            let crc = crc32c::crc32c(&m[12..end]).to_le_bytes();
            m[8..12].copy_from_slice(&crc);
            let m = &m[..m.len() - i % 3];
            if let Ok(s) = SnapshotObject::decode(m) {
                let _ = s.checkpoint.to_map(1 << 20);
            }
        }
    }

    /// The deleting mark round-trips; unmarked objects are written without
    /// it (as before the mark existed); ids and volumes are checked.
    #[test]
    fn deleting_mark_and_validation() {
        let snap = sample(Vec::new());
        let json = String::from_utf8_lossy(&snap.encode()[16..]).to_string();
        assert!(!json.contains("deleting"), "{json}");
        let marked = SnapshotObject {
            deleting: true,
            ..snap.clone()
        };
        assert_eq!(SnapshotObject::decode(&marked.encode()).unwrap(), marked);
        assert!(snap.validate(7, 3).is_ok());
        assert!(snap.validate(7, 4).is_err());
        assert!(snap.validate(8, 3).is_err());
        let huge = SnapshotObject {
            id: MAX_SEQ,
            ..snap
        };
        assert!(huge.validate(7, MAX_SEQ).is_err());
    }
}
