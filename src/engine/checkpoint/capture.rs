//! Taking a checkpoint in two steps: what is taken while the state lock is
//! held ([`Capture::take`]: the stored map's `Arc`, which the state shares
//! copy-on-write, and the chunk table as shared [`Arc`]s: O(chunks), no
//! map entry or checksum array copied), and the work done after it is
//! released ([`Capture::build`], [`Capture::encode`]: walking the map,
//! copying the chunk table, encoding).
//!
//! Invariant: a [`Capture`] describes the map and chunk table as they stood
//! in the one lock section that took it (a later change to the state's map
//! copies it first, see `state.rs` invariant 2), and it releases the map
//! as soon as it is encoded.

use std::sync::Arc;

use super::{Checkpoint, ChunkInfo};
use crate::engine::map::{ExtentMap, Loc};

/// Maps with more entries than this are encoded on a blocking thread, not
/// on the async runtime ([`Capture::encode`]).
pub const BLOCKING_ENCODE_ENTRIES: usize = 64 << 10;

/// A copy of what a checkpoint holds, taken under the state lock.
#[derive(Debug)]
pub struct Capture {
    pub volume: u64,
    pub epoch: u64,
    pub chunk_seq: u64,
    pub last_seq: u64,
    map: Arc<ExtentMap>,
    chunks: Vec<Arc<ChunkInfo>>,
}

/// Extents `(start, len, chunk, off)` and zero ranges `(start, len)`.
pub type Split = (Vec<(u64, u64, u64, u64)>, Vec<(u64, u64)>);

/// The extents and zero ranges of `map`, in order (other locations are
/// skipped: a stored map holds none).
pub fn split(map: &ExtentMap) -> Split {
    let mut extents = Vec::with_capacity(map.len());
    let mut zeros = Vec::new();
    for (s, l, loc) in map.iter() {
        match loc {
            Loc::Chunk { chunk, off } => extents.push((s, l, chunk, off)),
            Loc::Zero => zeros.push((s, l)),
            Loc::Wal(_) => {}
        }
    }
    (extents, zeros)
}

impl Capture {
    /// Take `map` (shared, not copied) and the chunk table `chunks`.
    pub fn take(
        volume: u64,
        epoch: u64,
        chunk_seq: u64,
        last_seq: u64,
        map: &Arc<ExtentMap>,
        chunks: Vec<Arc<ChunkInfo>>,
    ) -> Capture {
        Capture {
            volume,
            epoch,
            chunk_seq,
            last_seq,
            map: map.clone(),
            chunks,
        }
    }

    /// The captured map.
    pub fn map(&self) -> &ExtentMap {
        &self.map
    }

    /// Build the full checkpoint (not encoded), a large map on a blocking
    /// thread.
    pub async fn encode_full(self) -> Result<Checkpoint, tokio::task::JoinError> {
        if self.entries() > BLOCKING_ENCODE_ENTRIES {
            tokio::task::spawn_blocking(move || self.build()).await
        } else {
            Ok(self.build())
        }
    }

    /// Entries in the map.
    pub fn entries(&self) -> usize {
        self.map.len()
    }

    /// The checkpoint (releasing the map): extents and zero ranges split
    /// out in order, the chunk table copied and sorted by sequence number.
    pub fn build(self) -> Checkpoint {
        let (extents, zeros) = split(&self.map);
        drop(self.map);
        let mut chunks: Vec<ChunkInfo> = self.chunks.iter().map(|c| (**c).clone()).collect();
        chunks.sort_by_key(|c| c.seq);
        Checkpoint {
            volume: self.volume,
            epoch: self.epoch,
            chunk_seq: self.chunk_seq,
            last_seq: self.last_seq,
            chunks,
            extents,
            zeros,
        }
    }

    /// Build and encode; a large map ([`BLOCKING_ENCODE_ENTRIES`]) on a
    /// blocking thread so the async runtime keeps serving I/O meanwhile.
    pub async fn encode(self) -> Result<(Checkpoint, Vec<u8>), tokio::task::JoinError> {
        let big = self.entries() > BLOCKING_ENCODE_ENTRIES;
        let work = move || {
            let cp = self.build();
            let bytes = cp.encode();
            (cp, bytes)
        };
        if big {
            tokio::task::spawn_blocking(work).await
        } else {
            Ok(work())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map large enough to be encoded on a blocking thread comes back
    /// exactly, zero ranges and shared chunk infos included; the capture
    /// does not see changes made to the map after it was taken.
    #[tokio::test]
    async fn large_capture_encodes_off_the_runtime() {
        let mut map = ExtentMap::new();
        let n = BLOCKING_ENCODE_ENTRIES as u64 + 1000;
        for i in 0..n {
            let loc = if i % 7 == 0 {
                Loc::Zero
            } else {
                Loc::Chunk {
                    chunk: 1 + i % 3,
                    off: (i % 100) * 4096,
                }
            };
            map.insert(i * 16, 8, loc);
        }
        let chunks: Vec<Arc<ChunkInfo>> = (1..=3)
            .rev()
            .map(|seq| {
                Arc::new(ChunkInfo {
                    seq,
                    epoch: 1,
                    data_start: 4096,
                    data_len: 1 << 20,
                    table_crc: seq as u32,
                })
            })
            .collect();
        let mut map = Arc::new(map);
        let capture = Capture::take(9, 2, 3, 77, &map, chunks);
        assert_eq!(capture.entries(), n as usize);
        let before: Vec<_> = map.iter().collect();
        // A change after the capture copies the map (copy-on-write).
        Arc::make_mut(&mut map).insert(0, n * 16, Loc::Zero);
        assert_eq!(map.len(), 1);
        let (cp, bytes) = capture.encode().await.unwrap();
        assert_eq!(
            cp.chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(cp.zeros.len() as u64, n.div_ceil(7));
        let dec = Checkpoint::decode(&bytes).unwrap();
        assert_eq!(dec, cp);
        let back = dec.to_map(n * 16).unwrap();
        assert_eq!(back.iter().collect::<Vec<_>>(), before);
        // Encoding released the capture's share: no copy on the next change.
        let p = Arc::as_ptr(&map);
        Arc::make_mut(&mut map).insert(0, 8, Loc::Zero);
        assert_eq!(Arc::as_ptr(&map), p);
    }
}
