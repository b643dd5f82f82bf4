//! `shale-bench --map-extents N`: memory and open time of a fragmented
//! extent map (issue 11). Builds the store-side map of a volume after N
//! random 4 KiB writes packed into 4 MiB chunks in write order (so no two
//! neighbouring sectors share a chunk run), reports the process RSS growth
//! per extent, then encodes the map as a checkpoint and times decoding it
//! back into a map (what opening a volume does), in the binary format
//! (`SHALECP2`) and in the older JSON one (`SHALECP1`) for comparison.
//! It also times the state-lock section of taking a checkpoint: the copy
//! taken now ([`Capture::take`]: shared, O(chunks)) against what was done under the lock
//! before (chunk infos deep-copied, the map split into two lists).

use std::time::Instant;

use anyhow::{Context, Result};
use std::sync::Arc;

use shale::engine::checkpoint::capture::Capture;
use shale::engine::checkpoint::{Checkpoint, ChunkInfo};
use shale::engine::map::{ExtentMap, Loc};

const BLOCK: u64 = 4096;
const SECTOR: u64 = 512;
/// Writes per chunk (4 MiB of 4 KiB blocks).
const PER_CHUNK: u64 = 1024;

/// Resident set size of this process in bytes.
/// Chunks 1..=`n` of [`PER_CHUNK`] blocks each, with random block
/// checksums (real ones look random; they matter to the encoded size).
pub fn fake_chunks(n: u64, rng: &mut u64) -> Vec<ChunkInfo> {
    let data_len = PER_CHUNK * BLOCK;
    (1..=n)
        .map(|seq| ChunkInfo {
            seq,
            epoch: 1,
            data_start: 4096,
            data_len,
            table_crc: crate::next_rand(rng) as u32,
        })
        .collect()
}

/// Put `checkpoint` (encoded, of volume `volume`, chunks up to `chunk_seq`,
/// ops up to `last_seq`) into `store` with a manifest naming it, as the
/// volume's epoch-1 writer would have left them: the volume then opens
/// from that checkpoint alone.
pub async fn seed_checkpoint(
    store: &dyn shale::store::ObjectStore,
    volume: u64,
    checkpoint: bytes::Bytes,
    chunk_seq: u64,
    last_seq: u64,
) -> Result<()> {
    use shale::engine::checkpoint::Manifest;
    use shale::engine::format::layout::{checkpoint_key, manifest_key};
    use shale::store::PutMode;
    let key = checkpoint_key(volume, chunk_seq, 1);
    store.put(&key, checkpoint, PutMode::Overwrite).await?;
    let m = Manifest {
        volume,
        epoch: 1,
        checkpoint: Some(key),
        checkpoint_base: None,
        checkpoint_chunk: chunk_seq,
        last_chunk: chunk_seq,
        last_seq,
        history_epoch: 1,
        parent: None,
    };
    store
        .put(
            &manifest_key(volume),
            bytes::Bytes::from(serde_json::to_vec(&m)?),
            PutMode::Create,
        )
        .await?;
    Ok(())
}

pub fn run(extents: u64) -> Result<()> {
    // A volume 4x the written blocks, so most writes land apart.
    let blocks = extents * 4;
    // Seeded, so runs compare.
    let mut rng = 0x5eed_1234_abcd_0001u64;
    let before = crate::rss()?;
    let t = Instant::now();
    let mut map = ExtentMap::new();
    let mut written = 0u64;
    while (map.len() as u64) < extents {
        let lba = (crate::next_rand(&mut rng) % blocks) * (BLOCK / SECTOR);
        let chunk = 1 + written / PER_CHUNK;
        let off = (written % PER_CHUNK) * BLOCK;
        map.insert(lba, BLOCK / SECTOR, Loc::Chunk { chunk, off });
        written += 1;
    }
    let build = t.elapsed();
    let after = crate::rss()?;
    let per_extent = after.saturating_sub(before) as f64 / map.len() as f64;
    println!(
        "map: {} extents from {written} random 4K writes in {:.2} s; RSS +{:.1} MiB = {per_extent:.1} bytes per extent",
        map.len(),
        build.as_secs_f64(),
        after.saturating_sub(before) as f64 / (1 << 20) as f64,
    );

    let n_chunks = written.div_ceil(PER_CHUNK);
    let chunks = fake_chunks(n_chunks, &mut rng);
    let chunks: Vec<Arc<ChunkInfo>> = chunks.into_iter().map(Arc::new).collect();
    let volume_sectors = blocks * (BLOCK / SECTOR);
    let map = Arc::new(map);

    // The lock section, before: every chunk info deep-copied (checksum
    // arrays included), then the map collected into two lists.
    let t = Instant::now();
    let copied: Vec<ChunkInfo> = chunks.iter().map(|c| (**c).clone()).collect();
    let old_extents: Vec<(u64, u64, u64, u64)> = map
        .iter()
        .filter_map(|(s, l, loc)| match loc {
            Loc::Chunk { chunk, off } => Some((s, l, chunk, off)),
            _ => None,
        })
        .collect();
    let zeros: Vec<(u64, u64)> = map
        .iter()
        .filter_map(|(s, l, loc)| matches!(loc, Loc::Zero).then_some((s, l)))
        .collect();
    let old_lock = t.elapsed();
    drop((copied, old_extents, zeros));
    // For comparison: a plain clone of the map.
    let t = Instant::now();
    let cloned = (*map).clone();
    let clone_time = t.elapsed();
    drop(cloned);
    // After: the map and chunk infos shared (the map is walked in `build`,
    // outside the lock).
    let t = Instant::now();
    let capture = Capture::take(1, 1, n_chunks, written, &map, chunks.clone());
    let new_lock = t.elapsed();
    println!(
        "lock held: before {:.1} ms, after {:.1} ms (a map clone would take {:.1} ms; the walk now done outside it is the build below)",
        old_lock.as_secs_f64() * 1e3,
        new_lock.as_secs_f64() * 1e3,
        clone_time.as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let cp = capture.build();
    let build = t.elapsed();
    drop(map);

    for json in [false, true] {
        let t = Instant::now();
        let bytes = if json { cp.encode_json() } else { cp.encode() };
        let encode = t.elapsed();
        let t = Instant::now();
        let decoded = Checkpoint::decode(&bytes).context("decode")?;
        let decode = t.elapsed();
        let t = Instant::now();
        let reopened = decoded
            .to_map(volume_sectors)
            .context("checkpoint to map")?;
        let to_map = t.elapsed();
        println!(
            "{}: {:.1} MiB ({:.2} bytes per extent, chunk table CRCs included); build {:.0} ms, encode {:.0} ms; open: decode {:.0} ms, map {:.0} ms ({} extents)",
            if json { "json SHALECP1" } else { "binary SHALECP2" },
            bytes.len() as f64 / (1 << 20) as f64,
            bytes.len() as f64 / extents as f64,
            build.as_secs_f64() * 1e3,
            encode.as_secs_f64() * 1e3,
            decode.as_secs_f64() * 1e3,
            to_map.as_secs_f64() * 1e3,
            reopened.len()
        );
    }
    // Only each chunk's table CRC: the tables stay in the chunk headers.
    let crc_bytes: usize = cp.chunks.len() * 4;
    println!(
        "of which chunk table CRCs: {:.1} MiB ({:.2} bytes per extent)",
        crc_bytes as f64 / (1 << 20) as f64,
        crc_bytes as f64 / extents as f64
    );
    Ok(())
}
