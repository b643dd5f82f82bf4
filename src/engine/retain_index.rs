//! The retention index: which chunks each snapshot of a volume names, so
//! checkpoints, compaction and garbage collection learn what snapshots
//! retain without downloading every snapshot's map.
//!
//! Object `volumes/<v:016x>/retain-index`:
//! `"SHALERI1" | crc32c u32 (of the body) | body`, the body being
//! `count u32`, then per snapshot `id u64 | version length u16 | version |
//! chunk count u32 | (chunk seq u64, chunk epoch u64) * count`, all little
//! endian, snapshots by ascending id, chunks by ascending `(seq, epoch)`.
//!
//! Invariants:
//! 1. An entry holds exactly the chunk table of snapshot object `id` at
//!    store version `version`. A store version names one content of its key
//!    (checked for every backend by the store conformance tests), and
//!    snapshot objects change only by being replaced, so an entry whose
//!    `(id, version)` matches the current listing is exact; any other
//!    snapshot is read again. The index is therefore a cache: losing it,
//!    corrupting it or racing two writers of it costs reads, never a chunk.
//! 2. Whoever reads a snapshot the index lacks writes the index again (best
//!    effort; a failed write is logged). Writers need no fencing: every
//!    writer writes exact entries for the versions it read (invariant 1).

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;

use super::capped::get_capped;
use super::error::EngineError;
use super::format::layout::{retain_index_key, snapshot_prefix};
use super::format::limits::{valid_chunk_id, MAX_METADATA_BYTES, MAX_SEQ};
use super::format::sealed::{seal, unseal, SealError};
use super::snapshot::store::{read_snapshot_versioned, snapshot_id_of, SnapshotError};
use crate::store::{DynStore, PutMode, StoreError, Version};

const MAGIC: &[u8; 8] = b"SHALERI1";
/// Longest store version kept (S3 ETags are 34 bytes, quotes included).
const MAX_VERSION_LEN: usize = 1024;

/// One snapshot's entry: its store version and the chunks it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub version: Version,
    /// `(seq, epoch)`, sorted, without repeats.
    pub chunks: Vec<(u64, u64)>,
}

/// The decoded index: entries by snapshot id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetainIndex {
    pub snapshots: BTreeMap<u64, Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexDecodeError {
    #[error("not a retention index (bad magic or too short)")]
    BadMagic,
    #[error("retention index checksum mismatch")]
    Crc,
    #[error("retention index is malformed: {0}")]
    Malformed(String),
}

impl RetainIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(self.snapshots.len() as u32).to_le_bytes());
        for (id, e) in &self.snapshots {
            body.extend_from_slice(&id.to_le_bytes());
            let v = e.version.0.as_bytes();
            body.extend_from_slice(&(v.len() as u16).to_le_bytes());
            body.extend_from_slice(v);
            body.extend_from_slice(&(e.chunks.len() as u32).to_le_bytes());
            for (seq, epoch) in &e.chunks {
                body.extend_from_slice(&seq.to_le_bytes());
                body.extend_from_slice(&epoch.to_le_bytes());
            }
        }
        seal(MAGIC, &body)
    }

    /// Decode and check every number before it is used: counts fit in the
    /// bytes left, ids and chunk ids are in range and strictly ascending,
    /// versions are UTF-8 of bounded length.
    pub fn decode(b: &[u8]) -> Result<RetainIndex, IndexDecodeError> {
        let body = unseal(MAGIC, b).map_err(|e| match e {
            SealError::BadMagic => IndexDecodeError::BadMagic,
            SealError::Crc => IndexDecodeError::Crc,
        })?;
        let mut r = Reader { b: body, at: 0 };
        let count = r.u32()? as usize;
        // Each entry takes at least 14 bytes.
        if count > r.left() / 14 {
            return Err(malformed(format!("{count} snapshots do not fit")));
        }
        let mut snapshots = BTreeMap::new();
        let mut prev_id = 0u64;
        for _ in 0..count {
            let id = r.u64()?;
            if !(1..MAX_SEQ).contains(&id) || id <= prev_id {
                return Err(malformed(format!(
                    "snapshot id {id:#x} is out of range or out of order"
                )));
            }
            prev_id = id;
            let vlen = usize::from(r.u16()?);
            if vlen > MAX_VERSION_LEN {
                return Err(malformed(format!("version of {vlen} bytes")));
            }
            let version = std::str::from_utf8(r.bytes(vlen)?)
                .map_err(|_| malformed(format!("version of snapshot {id:#x} is not UTF-8")))?
                .to_string();
            let n = r.u32()? as usize;
            if n > r.left() / 16 {
                return Err(malformed(format!(
                    "{n} chunks of snapshot {id:#x} do not fit"
                )));
            }
            let mut chunks = Vec::with_capacity(n);
            for _ in 0..n {
                let c = (r.u64()?, r.u64()?);
                if !valid_chunk_id(c.0) || c.1 >= MAX_SEQ {
                    return Err(malformed(format!("chunk {c:?} is out of range")));
                }
                if chunks.last().is_some_and(|p| *p >= c) {
                    return Err(malformed(format!("chunk {c:?} is out of order")));
                }
                chunks.push(c);
            }
            snapshots.insert(
                id,
                Entry {
                    version: Version(version),
                    chunks,
                },
            );
        }
        if r.left() != 0 {
            return Err(malformed(format!(
                "{} bytes after the last entry",
                r.left()
            )));
        }
        Ok(RetainIndex { snapshots })
    }
}

fn malformed(m: String) -> IndexDecodeError {
    IndexDecodeError::Malformed(m)
}

/// Bounds-checked little-endian reader.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], IndexDecodeError> {
        if n > self.left() {
            return Err(malformed(format!(
                "ends inside a field at byte {}",
                self.at
            )));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, IndexDecodeError> {
        let s = self.bytes(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, IndexDecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.bytes(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, IndexDecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// The index as stored, or an empty one if it is absent, unreadable or
/// corrupt (it is only a cache; see invariant 1).
async fn read_index(store: &DynStore, volume: u64) -> RetainIndex {
    let key = retain_index_key(volume);
    match get_capped(store, &key, MAX_METADATA_BYTES, "retention index").await {
        Ok(o) => RetainIndex::decode(&o.data).unwrap_or_else(|e| {
            log::warn!("{key}: {e}; reading every snapshot instead");
            RetainIndex::default()
        }),
        Err(EngineError::Store(StoreError::NotFound { .. })) => RetainIndex::default(),
        Err(e) => {
            log::warn!("{key}: {e}; reading every snapshot instead");
            RetainIndex::default()
        }
    }
}

/// Every chunk `(seq, epoch)` some snapshot of `volume` names, from the
/// index where it is current and from the snapshot objects elsewhere;
/// refreshes the index when it was not current. Fails if the snapshots
/// cannot be listed or one of them cannot be read (the caller then keeps
/// every chunk).
pub async fn retained_chunks(
    store: &DynStore,
    volume: u64,
) -> Result<HashSet<(u64, u64)>, SnapshotError> {
    let prefix = snapshot_prefix(volume);
    let listing = store.list(&prefix).await?;
    let old = read_index(store, volume).await;
    let mut new = RetainIndex::default();
    for meta in listing {
        let id = snapshot_id_of(volume, &meta.key)?;
        if let Some(e) = old.snapshots.get(&id).filter(|e| e.version == meta.version) {
            new.snapshots.insert(id, e.clone());
            continue;
        }
        let (snap, version) = match read_snapshot_versioned(store, volume, id).await {
            Ok(r) => r,
            Err(SnapshotError::Engine(EngineError::Store(StoreError::NotFound { .. })))
            | Err(SnapshotError::Store(StoreError::NotFound { .. })) => continue,
            Err(e) => return Err(e),
        };
        let mut chunks: Vec<(u64, u64)> = snap
            .checkpoint
            .chunks
            .iter()
            .map(|c| (c.seq, c.epoch))
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        new.snapshots.insert(id, Entry { version, chunks });
    }
    let set = new
        .snapshots
        .values()
        .flat_map(|e| e.chunks.iter().copied())
        .collect();
    if new != old {
        let key = retain_index_key(volume);
        let data = new.encode();
        if data.len() as u64 <= MAX_METADATA_BYTES {
            if let Err(e) = store.put(&key, Bytes::from(data), PutMode::Overwrite).await {
                log::warn!("{key}: not updated ({e}); the next reader reads the snapshots again");
            }
        }
    }
    Ok(set)
}

/// Chunks `(seq, epoch)` the deleter must keep because snapshots name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetainSet {
    /// The snapshots could not all be read: keep every chunk.
    All,
    Chunks(HashSet<(u64, u64)>),
}

impl RetainSet {
    /// What the snapshots of `volume` name now (from the retention index
    /// where it is current, see [`retained_chunks`]). Never fails: on
    /// any error the answer is [`RetainSet::All`] (deleting nothing is
    /// always safe).
    pub async fn load(store: &DynStore, volume: u64) -> RetainSet {
        match retained_chunks(store, volume).await {
            Ok(set) => RetainSet::Chunks(set),
            Err(e) => {
                log::warn!(
                    "volume {volume:x}: cannot read its snapshots ({e}); deleting no chunks"
                );
                RetainSet::All
            }
        }
    }

    /// True if chunk `(seq, epoch)` must be kept.
    pub fn keeps(&self, seq: u64, epoch: u64) -> bool {
        match self {
            RetainSet::All => true,
            RetainSet::Chunks(set) => set.contains(&(seq, epoch)),
        }
    }
}

#[cfg(test)]
mod tests;
