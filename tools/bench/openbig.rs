//! `shale-bench --open-extents N`: open time and memory of a volume whose
//! checkpoint holds N fragmented 4 KiB extents, for N up to 10^8
//! (issue 11).
//!
//! `--checkpoint-cost` seeds its volume by inserting N random extents one
//! by one, which takes minutes at 10^7 and far longer at 10^8. Here the
//! same shape is built in one pass: extent `i` is block `4i + r` (r random
//! in 0..4, so the volume is 4N blocks and extents rarely touch), and the
//! blocks are written in a random order (a shuffled permutation), packed
//! 1024 to a 4 MiB chunk, so no two neighbouring extents share a chunk
//! run and the map cannot merge them. The map is built sorted
//! ([`ExtentMap::from_sorted`]), encoded as a full checkpoint into an
//! in-memory store with a manifest naming it, and dropped; then the
//! volume is opened (timed: manifest, checkpoint decode, map build,
//! empty WAL), the process RSS growth is reported, and the open volume's
//! extent count and last seq are checked against the seed. A checkpoint
//! over the engine's cap on metadata objects (`checkpoint_cap`) cannot
//! open: then the decode and map build an open would do
//! are timed in process instead, and the output says so.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use shale::clock::SystemClock;
use shale::engine::checkpoint::Checkpoint;
use shale::engine::config::EngineConfig;
use shale::engine::format::limits::checkpoint_cap;
use shale::engine::map::{ExtentMap, Loc};
use shale::engine::{Volume, VolumeParams};
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const BLOCK: u64 = 4096;
const SECTOR: u64 = 512;
const PER_CHUNK: u64 = 1024;
const VOLUME: u64 = 1;

/// Extent `i` (block `4i + pick`), given the write order `order` (a
/// permutation of the extents).
fn extent(i: u64, pick: u64, order: &[u32]) -> (u64, u64, Loc) {
    let lba = (4 * i + pick) * (BLOCK / SECTOR);
    let w = u64::from(order[i as usize]);
    let loc = Loc::Chunk {
        chunk: 1 + w / PER_CHUNK,
        off: (w % PER_CHUNK) * BLOCK,
    };
    (lba, BLOCK / SECTOR, loc)
}

/// Peak resident set size (VmHWM) of this process in bytes.
fn peak_rss() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kib * 1024)
}

pub async fn run(root: &Path, extents: u64) -> Result<()> {
    ensure!(
        extents > 0 && extents <= u64::from(u32::MAX),
        "--open-extents must be in 1..=2^32-1"
    );
    let rss0 = crate::rss()?;
    let t = Instant::now();
    let mut rng = 0x5eed_1234_abcd_0002u64;
    // Write order: a Fisher-Yates shuffle of 0..N.
    let mut order: Vec<u32> = (0..extents as u32).collect();
    for i in (1..order.len()).rev() {
        let j = (crate::next_rand(&mut rng) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let picks_seed = crate::next_rand(&mut rng);
    let pick = |i: u64| {
        let mut x = (i ^ picks_seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        crate::next_rand(&mut x) % 4
    };
    let map = ExtentMap::from_sorted((0..extents).map(|i| extent(i, pick(i), &order)))
        .map_err(|(s, l)| anyhow::anyhow!("seed run {s}+{l} out of order"))?;
    ensure!(
        map.len() as u64 >= extents * 9 / 10,
        "the seed merged into {} extents",
        map.len()
    );
    let n_chunks = extents.div_ceil(PER_CHUNK);
    let chunks = crate::map::fake_chunks(n_chunks, &mut rng);
    let cp = Checkpoint::from_map(VOLUME, 1, n_chunks, extents, &map, chunks);
    let map_len = map.len();
    drop(map);
    let bytes = Bytes::from(cp.encode());
    drop(cp);
    let size = extents * 4 * BLOCK;
    let store = Arc::new(MemoryStore::new());
    crate::map::seed_checkpoint(store.as_ref(), VOLUME, bytes.clone(), n_chunks, extents).await?;
    println!(
        "seed: {map_len} extents in a {} GiB volume, {n_chunks} chunks, checkpoint {:.1} MiB \
         (built in {:.1} s; RSS {} MiB with the seed's write order and checkpoint)",
        size >> 30,
        bytes.len() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64(),
        crate::rss()? >> 20
    );
    let cap = checkpoint_cap(size);
    if bytes.len() as u64 > cap {
        // The engine refuses to read a checkpoint this large (limits),
        // so the volume cannot open: time what its open would do with
        // the checkpoint (decode, then build the map), in process.
        let before = crate::rss()?;
        std::fs::write("/proc/self/clear_refs", "5").context("reset VmHWM")?;
        let t = Instant::now();
        let cp = Checkpoint::decode(&bytes).context("decode")?;
        let decode_s = t.elapsed().as_secs_f64();
        drop(bytes);
        let t = Instant::now();
        let map = cp.to_map(size / SECTOR).context("checkpoint to map")?;
        let map_s = t.elapsed().as_secs_f64();
        drop(cp);
        println!(
            "open: REFUSED, the checkpoint is over the {} MiB cap on metadata objects; what it \
             would do: decode {decode_s:.2} s + map {map_s:.2} s = {:.2} s; map {} extents, RSS \
             +{} MiB (peak +{} MiB)",
            cap >> 20,
            decode_s + map_s,
            map.len(),
            crate::rss()?.saturating_sub(before) >> 20,
            peak_rss()?.saturating_sub(before) >> 20,
        );
        ensure!(map.len() == map_len, "the map lost extents");
        return Ok(());
    }
    drop(bytes);
    let cfg = EngineConfig {
        cache_size: 0,
        readahead_max: 0,
        compact_below_percent: 0,
        ..EngineConfig::default()
    };
    let params = VolumeParams {
        id: VOLUME,
        size,
        epoch: 2,
        local_dir: root.join("open"),
    };
    let before = crate::rss()?;
    // Reset the peak RSS (VmHWM) to now, so it shows the open's peak.
    std::fs::write("/proc/self/clear_refs", "5").context("reset VmHWM")?;
    let dyn_store: DynStore = store.clone();
    let t = Instant::now();
    let v = Volume::open(dyn_store, params, cfg, Arc::new(SystemClock))
        .await
        .context("open the seeded volume")?;
    let open_s = t.elapsed().as_secs_f64();
    let after = crate::rss()?;
    let peak = peak_rss()?;
    // The volume's map holds every seeded extent, at the seeded position.
    let st = v.stats();
    ensure!(
        st.map_extents == map_len as u64 && st.stored_seq == extents,
        "the open volume has {} extents at seq {}, the seed {map_len} at seq {extents}",
        st.map_extents,
        st.stored_seq
    );
    println!(
        "open: {open_s:.2} s; RSS +{} MiB ({:.1} B/extent, chunk table CRCs included, tables in chunk headers; peak \
         during the open +{} MiB; {} MiB before, {} MiB at start); {} extents in its map",
        after.saturating_sub(before) >> 20,
        after.saturating_sub(before) as f64 / extents as f64,
        peak.saturating_sub(before) >> 20,
        before >> 20,
        rss0 >> 20,
        st.map_extents,
    );
    v.crash().await;
    Ok(())
}
