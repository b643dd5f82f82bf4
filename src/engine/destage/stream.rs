//! Whether a chunk's data came from a stream of large writes, so the store
//! may write it around the page cache ([`crate::store::Body::mark_streamed`]).
//!
//! Invariant: a chunk is streamed when at least half of its records' write
//! bytes came in write requests of at least [`STREAM_WRITE`] bytes (a
//! request's records follow each other, every one but its last marked
//! `more`). Trims and zero writes carry no data and count for nothing.

use crate::engine::state::PendingRec;
use crate::engine::wal::record::RecordKind;
use crate::engine::SECTOR;

/// Write requests of at least this many bytes are taken as a stream.
/// Small and random writes (a file system's metadata, a database's
/// pages) stay below it and keep their chunks in the page cache, where
/// reads of them find them.
pub const STREAM_WRITE: u64 = 256 << 10;

/// See the module docs.
pub fn streamed(recs: &[PendingRec]) -> bool {
    let (mut all, mut large, mut request) = (0u64, 0u64, 0u64);
    for r in recs {
        if r.kind == RecordKind::Write {
            request += r.sectors * SECTOR;
        }
        if !r.more {
            all += request;
            if request >= STREAM_WRITE {
                large += request;
            }
            request = 0;
        }
    }
    all += request;
    all > 0 && large * 2 >= all
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(kind: RecordKind, sectors: u64, more: bool) -> PendingRec {
        PendingRec {
            seq: 0,
            kind,
            lba: 0,
            sectors,
            loc: None,
            more,
            at: Duration::ZERO,
        }
    }

    fn writes(sizes: &[u64]) -> Vec<PendingRec> {
        sizes
            .iter()
            .map(|&b| rec(RecordKind::Write, b / SECTOR, false))
            .collect()
    }

    #[test]
    fn large_writes_make_a_stream_and_small_ones_do_not() {
        assert!(streamed(&writes(&[1 << 20; 4])));
        assert!(streamed(&writes(&[STREAM_WRITE])));
        assert!(!streamed(&writes(&[4096; 1000])));
        assert!(!streamed(&writes(&[STREAM_WRITE - SECTOR])));
        // By bytes: one 1 MiB write outweighs 255 4 KiB ones, not 257.
        let mut mixed = writes(&[1 << 20]);
        mixed.extend(writes(&[4096; 255]));
        assert!(streamed(&mixed));
        mixed.extend(writes(&[4096; 2]));
        assert!(!streamed(&mixed));
        assert!(!streamed(&[]), "no data: nothing to stream");
        let trims = [rec(RecordKind::Trim, 1 << 20, false)];
        assert!(!streamed(&trims), "a trim carries no data");
    }

    #[test]
    fn a_request_in_several_records_counts_whole() {
        let quarter = STREAM_WRITE / 4 / SECTOR;
        let split: Vec<PendingRec> = (0..4)
            .map(|i| rec(RecordKind::Write, quarter, i < 3))
            .collect();
        assert!(streamed(&split));
        let separate: Vec<PendingRec> = (0..4)
            .map(|_| rec(RecordKind::Write, quarter, false))
            .collect();
        assert!(!streamed(&separate));
    }
}
