//! Engine internals driven directly by `shale-bench` (not a stable API).
//!
//! [`MapBench`] runs the volume state's map path without I/O: writes are
//! applied as the WAL writer applies them (a WAL location per write) and
//! destaged in chunks as the destage task applies a stored chunk, so the
//! benchmark measures exactly the maps a volume holds in memory.

use std::sync::Arc;
use std::time::Duration;

use super::checkpoint::dirty::DirtySet;
use super::checkpoint::ChunkInfo;
use super::format::chunk::ChunkExtent;
use super::map::WalLoc;
use super::state::State;
use super::wal::record::RecordKind;
use super::wal::Appended;
use super::SECTOR;

/// A volume's in-memory state, fed synthetic writes and chunks.
#[derive(Debug, Default)]
pub struct MapBench {
    st: State,
    seq: u64,
    wal_off: u64,
    /// Writes logged since the last destage: `(lba, sectors)`.
    batch: Vec<(u64, u64)>,
}

impl MapBench {
    pub fn new() -> Self {
        Self::default()
    }

    /// Log one write of `sectors` at `lba`, as the WAL writer applies it.
    pub fn write(&mut self, lba: u64, sectors: u64) {
        self.seq += 1;
        let loc = WalLoc {
            seq: self.seq,
            seg: 1,
            data_off: self.wal_off,
            rec_sectors: sectors,
            crc: 0,
            skip: 0,
            block_crcs: true,
        };
        self.wal_off += sectors * SECTOR + 64;
        let a = Appended {
            seq: self.seq,
            kind: RecordKind::Write,
            lba,
            sectors,
            more: false,
            loc: Some(loc),
        };
        self.st.apply_appended(&[a], Duration::ZERO);
        self.batch.push((lba, sectors));
    }

    /// Store every logged write in one chunk (in LBA order) and
    /// apply it as the destage task does; then forget the dirty ranges, as
    /// a committed checkpoint does.
    pub fn destage(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let seq = self.st.last_chunk + 1;
        // As a real chunk holds them: in LBA order, the newest write of a
        // range only (the batch's writes are all of one size).
        let mut batch = std::mem::take(&mut self.batch);
        batch.reverse();
        batch.sort_by_key(|&(lba, _)| lba);
        batch.dedup_by_key(|&mut (lba, _)| lba);
        assert!(
            batch.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
            "MapBench: the writes of one chunk must not overlap unless equal"
        );
        let mut off = 0;
        let extents: Vec<ChunkExtent> = batch
            .into_iter()
            .map(|(lba, sectors)| {
                let e = ChunkExtent {
                    lba,
                    sectors,
                    data_off: Some(off),
                };
                off += sectors * SECTOR;
                e
            })
            .collect();
        let info = Arc::new(ChunkInfo {
            seq,
            epoch: 1,
            data_start: 4096,
            data_len: off,
            table_crc: 0,
        });
        self.st.apply_chunk_to_stored(info, &extents);
        self.st.apply_chunk_to_live(seq, self.seq, &extents);
        self.st.pop_stored(self.seq);
        self.st.last_chunk = seq;
        self.st.dirty = DirtySet::new();
    }

    /// Entries of the store-side map.
    pub fn stored_extents(&self) -> usize {
        self.st.stored.len()
    }

    /// Entries held for what reads see beyond the store-side map (the
    /// overlay of ranges still in the WAL).
    pub fn live_entries(&self) -> usize {
        self.st.overlay.len()
    }

    /// Pieces a read of `[lba, lba+sectors)` resolves to.
    pub fn lookup(&self, lba: u64, sectors: u64) -> usize {
        self.st.view_lookup(lba, sectors).len()
    }
}
