//! `shale-bench --volume-extents N`: memory per extent of a volume's
//! in-memory maps (issue 11). Feeds a volume state N random 4 KiB writes
//! through the real map path (applied as the WAL writer applies them,
//! destaged every 4 MiB as the destage task applies a chunk), until the
//! store-side map holds N extents; reports the process RSS growth per
//! extent, the time the destage task spends applying one chunk to the maps
//! (held under the state lock) and the time of random 4 KiB lookups
//! through what reads see.
//! Chunk checksum tables are left empty (`--map-extents` reports them).

use std::time::Instant;

use anyhow::Result;

use shale::engine::bench_support::MapBench;

const SECTORS: u64 = 8;
/// Writes per chunk (4 MiB of 4 KiB blocks).
const PER_CHUNK: u64 = 1024;
const LOOKUPS: u64 = 1_000_000;
/// Chunks applied at steady state for the apply timing.
const APPLY_CHUNKS: u64 = 200;

pub fn run(extents: u64) -> Result<()> {
    // A volume 4x the written blocks, so most writes land apart.
    let blocks = extents * 4;
    let mut rng = 0x5eed_1234_abcd_0002u64;
    let before = crate::rss()?;
    let t = Instant::now();
    let mut vol = MapBench::new();
    let mut written = 0u64;
    while (vol.stored_extents() as u64) < extents {
        for _ in 0..PER_CHUNK {
            vol.write((crate::next_rand(&mut rng) % blocks) * SECTORS, SECTORS);
            written += 1;
        }
        vol.destage();
    }
    let build = t.elapsed();
    let after = crate::rss()?;
    let n = vol.stored_extents() as f64;
    let grown = after.saturating_sub(before) as f64;
    println!(
        "volume maps: {} stored extents (+{} other entries) from {written} random 4K writes in {:.2} s; RSS +{:.1} MiB = {:.1} bytes per extent",
        vol.stored_extents(),
        vol.live_entries(),
        build.as_secs_f64(),
        grown / (1 << 20) as f64,
        grown / n
    );
    // Steady state: what the destage task holds the state lock for, per
    // chunk of random 4K writes into the fragmented map.
    let mut applying = std::time::Duration::ZERO;
    for _ in 0..APPLY_CHUNKS {
        for _ in 0..PER_CHUNK {
            vol.write((crate::next_rand(&mut rng) % blocks) * SECTORS, SECTORS);
        }
        let t = Instant::now();
        vol.destage();
        applying += t.elapsed();
    }
    println!(
        "chunk apply: {:.0} us per chunk of {PER_CHUNK} random 4K writes ({:.2} us per extent)",
        applying.as_secs_f64() * 1e6 / APPLY_CHUNKS as f64,
        applying.as_secs_f64() * 1e6 / (APPLY_CHUNKS * PER_CHUNK) as f64
    );
    let t = Instant::now();
    let mut pieces = 0;
    for _ in 0..LOOKUPS {
        pieces += vol.lookup((crate::next_rand(&mut rng) % blocks) * SECTORS, SECTORS);
    }
    let ns = t.elapsed().as_nanos() as f64 / LOOKUPS as f64;
    println!("lookup: {ns:.0} ns per random 4K read lookup ({pieces} pieces)");
    Ok(())
}
