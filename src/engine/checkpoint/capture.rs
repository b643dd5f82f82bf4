//! Taking a checkpoint in two steps: a copy made while the state lock is
//! held ([`Capture::take`]: one pass over the map into a flat vector, the
//! chunk table as shared [`Arc`]s, no checksum array copied), and the work
//! done after it is released ([`Capture::build`], [`Capture::encode`]:
//! splitting, copying the chunk table, encoding).
//!
//! Invariant: a [`Capture`] describes the map and chunk table as they stood
//! in the one lock section that took it; nothing in it refers back to the
//! state, so the state may change while it is built and encoded.

use std::sync::Arc;

use super::{Checkpoint, ChunkInfo};
use crate::engine::map::{ExtentMap, Loc};

/// Maps with more entries than this are encoded on a blocking thread, not
/// on the async runtime ([`Capture::encode`]).
pub const BLOCKING_ENCODE_ENTRIES: usize = 64 << 10;

/// One map entry as copied: `chunk == 0` marks a zero range (no chunk has
/// id 0, see `limits::valid_chunk_id`).
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    len: u64,
    chunk: u64,
    off: u64,
}

/// A copy of what a checkpoint holds, taken under the state lock.
#[derive(Debug)]
pub struct Capture {
    pub volume: u64,
    pub epoch: u64,
    pub chunk_seq: u64,
    pub last_seq: u64,
    runs: Vec<Run>,
    chunks: Vec<Arc<ChunkInfo>>,
}

impl Capture {
    /// Copy `map` (only chunk and zero locations are kept; the stored map
    /// holds no others) and the chunk table `chunks`. O(entries) with one
    /// allocation for the map; the chunk infos are shared, not copied.
    pub fn take(
        volume: u64,
        epoch: u64,
        chunk_seq: u64,
        last_seq: u64,
        map: &ExtentMap,
        chunks: Vec<Arc<ChunkInfo>>,
    ) -> Capture {
        let mut runs = Vec::with_capacity(map.len());
        for (start, len, loc) in map.iter() {
            let (chunk, off) = match loc {
                Loc::Chunk { chunk, off } => (chunk, off),
                Loc::Zero => (0, 0),
                Loc::Wal(_) => continue,
            };
            runs.push(Run {
                start,
                len,
                chunk,
                off,
            });
        }
        Capture {
            volume,
            epoch,
            chunk_seq,
            last_seq,
            runs,
            chunks,
        }
    }

    /// Entries in the copied map.
    pub fn entries(&self) -> usize {
        self.runs.len()
    }

    /// The checkpoint: extents and zero ranges split out in order, the
    /// chunk table copied and sorted by sequence number.
    pub fn build(self) -> Checkpoint {
        let zeros_n = self.runs.iter().filter(|r| r.chunk == 0).count();
        let mut extents = Vec::with_capacity(self.runs.len() - zeros_n);
        let mut zeros = Vec::with_capacity(zeros_n);
        for r in &self.runs {
            if r.chunk == 0 {
                zeros.push((r.start, r.len));
            } else {
                extents.push((r.start, r.len, r.chunk, r.off));
            }
        }
        drop(self.runs);
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
        let big = self.runs.len() > BLOCKING_ENCODE_ENTRIES;
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
                    crcs: vec![seq as u32; 256],
                })
            })
            .collect();
        let capture = Capture::take(9, 2, 3, 77, &map, chunks);
        assert_eq!(capture.entries(), n as usize);
        let before: Vec<_> = map.iter().collect();
        map.insert(0, 1 << 20, Loc::Zero);
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
    }
}
