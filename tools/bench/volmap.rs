//! `shale-bench --volume-extents N`: memory per extent of a volume's
//! in-memory maps (issue 11). Feeds a volume state N random 4 KiB writes
//! through the real map path (applied as the WAL writer applies them,
//! destaged every 4 MiB as the destage task applies a chunk), until the
//! store-side map holds N extents; reports the process RSS growth per
//! extent and the time of random 4 KiB lookups through what reads see.
//! Chunk checksum tables are left empty (`--map-extents` reports them).

use std::time::Instant;

use anyhow::Result;

use shale::engine::bench_support::MapBench;

const SECTORS: u64 = 8;
/// Writes per chunk (4 MiB of 4 KiB blocks).
const PER_CHUNK: u64 = 1024;
const LOOKUPS: u64 = 1_000_000;

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
    let t = Instant::now();
    let mut pieces = 0;
    for _ in 0..LOOKUPS {
        pieces += vol.lookup((crate::next_rand(&mut rng) % blocks) * SECTORS, SECTORS);
    }
    let ns = t.elapsed().as_nanos() as f64 / LOOKUPS as f64;
    println!("lookup: {ns:.0} ns per random 4K read lookup ({pieces} pieces)");
    Ok(())
}
