//! The manifest object (`volumes/<id>/manifest`, JSON): the volume's
//! root. It names the writer epoch, the newest checkpoint (and its
//! chain's base), how far the store's history goes and, for a clone, its
//! parent snapshot. Reading and writing it is [`crate::engine::meta::manifest`]'s
//! job (created once, then replaced only by compare-and-swap); this module
//! is its codec: [`Manifest::encode`], [`Manifest::parse`] (decode and
//! [`Manifest::validate`]).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::layout::{checkpoint_prefix, manifest_key};
use super::limits::MAX_SEQ;

/// The volume's root object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub volume: u64,
    pub epoch: u64,
    /// Key of the newest checkpoint, if any: a full checkpoint, or the
    /// newest delta of a chain (see [`crate::engine::checkpoint::delta`]).
    pub checkpoint: Option<String>,
    /// When `checkpoint` is a delta: the key of its chain's base (absent
    /// otherwise, and in manifests written before deltas existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_base: Option<String>,
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

impl Manifest {
    /// The manifest as stored (JSON).
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

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
        for k in self.checkpoint.iter().chain(&self.checkpoint_base) {
            if !k.starts_with(&checkpoint_prefix(volume)) {
                return Err(format!("checkpoint {k:?} is not one of this volume's"));
            }
        }
        if self.checkpoint_base.is_some() && self.checkpoint.is_none() {
            return Err("names a checkpoint base but no checkpoint".into());
        }
        Ok(())
    }

    /// Parse and [`validate`](Manifest::validate) the manifest of `volume`.
    pub fn parse(volume: u64, data: &[u8]) -> Result<Manifest, ManifestError> {
        let err = |reason: String| ManifestError {
            key: manifest_key(volume),
            reason,
        };
        let m: Manifest =
            serde_json::from_slice(data).map_err(|e| err(format!("does not parse: {e}")))?;
        m.validate(volume).map_err(err)?;
        Ok(m)
    }
}

/// A manifest that does not parse or whose numbers disagree
/// ([`Manifest::validate`]).
#[derive(Debug, thiserror::Error)]
#[error("manifest {key}: {reason}")]
pub struct ManifestError {
    pub key: String,
    pub reason: String,
}

/// The snapshot a clone reads through to: snapshot id `snapshot` of volume
/// id `volume` (ids, never names: names may be reused after a delete).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    pub volume: u64,
    pub snapshot: u64,
}

impl std::fmt::Display for ParentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "snapshot {:016x} of volume {:016x}",
            self.snapshot, self.volume
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_json_rejects_unknown_fields() {
        let m = Manifest {
            volume: 1,
            epoch: 2,
            checkpoint: None,
            checkpoint_base: None,
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
}
