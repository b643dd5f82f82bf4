//! Bounds on what the engine reads back from the store: numbers in decoded
//! objects and the size of metadata objects read whole.
//!
//! Everything read from the store is untrusted input. A number outside
//! these bounds cannot come from real use (at ten million operations a
//! second, sequence numbers reach [`MAX_SEQ`] after more than ten thousand
//! years), so it is corruption or an attack: the object is refused with an
//! error naming it, before any arithmetic could wrap and before anything is
//! deleted because of it. Objects are read under these caps by
//! [`crate::engine::capped::get_capped`].

/// Chunk ids with this bit set name compaction objects (see
/// `engine/compact.rs`): they live under
/// [`super::layout::compacted_prefix`], outside the normal chunk sequence
/// that recovery replays, so they never form or break its chain.
pub const COMPACTED_BIT: u64 = 1 << 63;

/// Op sequence numbers, chunk numbers and the low bits of compaction ids
/// are below this, so `n + 1` (and sums of a few of them) never wrap.
pub const MAX_SEQ: u64 = 1 << 62;

/// Largest manifest read (a real one is a few hundred bytes).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 10;

/// Largest checkpoint or snapshot object read whole, whatever the volume:
/// 64 GiB, room for the full checkpoint of a volume of 16 TiB written
/// all over by 4 KiB random writes (about 13 bytes per extent). A larger
/// volume that fragmented would not fit a map in memory anyway (28 bytes
/// per extent). Checkpoints are read with the tighter, size-dependent
/// [`checkpoint_cap`].
pub const MAX_METADATA_BYTES: u64 = 64 << 30;

/// Largest chunk object read whole at recovery (chunks are at most
/// `chunk_size`, itself at most 256 MiB, plus one request and a header).
pub const MAX_CHUNK_OBJECT_BYTES: u64 = 1 << 30;

/// Largest checkpoint (or snapshot object) of a volume of `volume_bytes`:
/// 16 MiB plus 64 bytes per sector (about one encoded extent per sector,
/// the most a map can hold), at most [`MAX_METADATA_BYTES`] (which binds
/// only above 512 GiB: a fully fragmented volume of up to 16 TiB fits).
pub fn checkpoint_cap(volume_bytes: u64) -> u64 {
    (16u64 << 20)
        .saturating_add(volume_bytes / 8)
        .min(MAX_METADATA_BYTES)
}

/// True if `id` is a chunk number the engine can have written: a normal
/// chunk `1..MAX_SEQ`, or a compaction id ([`COMPACTED_BIT`] set) whose low
/// bits are in that range.
pub fn valid_chunk_id(id: u64) -> bool {
    let n = id & !COMPACTED_BIT;
    (1..MAX_SEQ).contains(&n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids() {
        assert!(valid_chunk_id(1));
        assert!(valid_chunk_id(MAX_SEQ - 1));
        assert!(valid_chunk_id(COMPACTED_BIT | 1));
        for bad in [0, MAX_SEQ, u64::MAX, COMPACTED_BIT, COMPACTED_BIT | MAX_SEQ] {
            assert!(!valid_chunk_id(bad), "{bad:x}");
        }
        assert_eq!(checkpoint_cap(1 << 20), (16 << 20) + (128 << 10));
        assert_eq!(checkpoint_cap(u64::MAX), MAX_METADATA_BYTES);
    }

    /// Encoded bytes per extent of a full checkpoint of a volume written
    /// by 4 KiB random writes: every extent apart from its neighbours and
    /// in another chunk run, one CRC per 4 KiB of chunk data.
    fn fragmented_checkpoint_bytes_per_extent() -> f64 {
        use crate::engine::checkpoint::{Checkpoint, ChunkInfo};
        use crate::engine::map::{ExtentMap, Loc};
        const N: u64 = 100_000;
        const PER_CHUNK: u64 = 1024;
        let mut rng = 7u64;
        // Extent i is block 2i (never adjacent to another) and was the
        // (i * 7919 mod N)-th write, so neighbours never share a chunk run.
        let runs = (0..N).map(|i| {
            let w = i * 7919 % N;
            let loc = Loc::Chunk {
                chunk: 1 + w / PER_CHUNK,
                off: (w % PER_CHUNK) * 4096,
            };
            (2 * i * 8, 8, loc)
        });
        let map = ExtentMap::from_sorted(runs).unwrap();
        assert_eq!(map.len() as u64, N, "the seed merged");
        let n_chunks = N.div_ceil(PER_CHUNK);
        let chunks = (1..=n_chunks)
            .map(|seq| ChunkInfo {
                seq,
                epoch: 1,
                data_start: 4096,
                data_len: PER_CHUNK * 4096,
                table_crc: crate::test_rng::xorshift(&mut rng) as u32,
            })
            .collect();
        let cp = Checkpoint::from_map(1, 1, n_chunks, N, &map, chunks);
        cp.encode().len() as f64 / N as f64
    }

    /// Regression: the cap was at most 1 GiB whatever the volume, so a
    /// volume fragmented into more than about 99 million 4 KiB extents
    /// (a 400 GiB volume written at random) wrote a checkpoint its next
    /// open refused: the volume could not be opened again.
    #[test]
    fn a_fully_fragmented_volume_checkpoint_fits_its_cap() {
        let per_extent = fragmented_checkpoint_bytes_per_extent();
        // Room for twice as many CRCs (dead data before compaction).
        let worst = per_extent + 4.0;
        for size in [1u64 << 30, 100 << 30, 1 << 40, 16 << 40] {
            let needed = (size / 4096) as f64 * worst;
            let cap = checkpoint_cap(size) as f64;
            assert!(
                cap >= needed,
                "a {} GiB volume in 4 KiB extents needs {:.0} MiB of checkpoint, cap {:.0} MiB",
                size >> 30,
                needed / (1 << 20) as f64,
                cap / (1 << 20) as f64
            );
        }
    }
}
