//! What the verifying writer puts in a block, and where each generation goes.
//!
//! Invariants:
//! 1. Generation `g` of a run always goes to block [`block_of`]`(seed, g)`:
//!    the plan is a pure function of the run's seed, so a checker that lost
//!    every line of the writer's log can still tell where a generation
//!    belongs.
//! 2. A stamped block names its run, its block number and its generation,
//!    and its last four bytes are the CRC32C of everything before them; the
//!    payload in between is derived from those three numbers, so a block
//!    decodes to exactly one generation or is reported as damaged.
//! 3. An all-zero block is generation 0 ("never written"): real generations
//!    start at 1.

/// Bytes before the payload: magic, seed, block, generation.
const HEADER: usize = 32;
/// Marks a stamped block (version 1 of this layout).
const MAGIC: &[u8; 8] = b"SHCRASH1";
/// The smallest block a stamp fits in (header, some payload, CRC).
pub const MIN_BLOCK: usize = 512;

/// SplitMix64: a small, well-mixed step for derived numbers.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The block that generation `gen` of run `seed` is written to.
pub fn block_of(seed: u64, gen: u64, blocks: u64) -> u64 {
    mix(seed ^ mix(gen)) % blocks
}

/// The full content of `block` at generation `gen` (`gen >= 1`).
pub fn encode(seed: u64, block: u64, gen: u64, out: &mut [u8]) {
    let len = out.len();
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seed.to_le_bytes());
    out[16..24].copy_from_slice(&block.to_le_bytes());
    out[24..32].copy_from_slice(&gen.to_le_bytes());
    let mut x = mix(seed ^ mix(block ^ mix(gen)));
    for chunk in out[HEADER..len - 4].chunks_mut(8) {
        x = mix(x);
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let crc = crc32c::crc32c(&out[..len - 4]);
    out[len - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// What a block read back holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Every byte zero: never written (generation 0).
    Zero,
    /// A whole, checksummed stamp of this run and this block.
    Gen(u64),
    /// Anything else, with what is wrong.
    Damaged(String),
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decode `data`, read from block `block` of run `seed`.
pub fn decode(seed: u64, block: u64, data: &[u8]) -> Found {
    let len = data.len();
    if data.iter().all(|&b| b == 0) {
        return Found::Zero;
    }
    if len < MIN_BLOCK {
        return Found::Damaged(format!("block of {len} bytes is too short"));
    }
    if &data[0..8] != MAGIC {
        return Found::Damaged("no stamp (garbage or foreign data)".into());
    }
    let mut tail = [0u8; 4];
    tail.copy_from_slice(&data[len - 4..]);
    let stored = u32::from_le_bytes(tail);
    let computed = crc32c::crc32c(&data[..len - 4]);
    if stored != computed {
        return Found::Damaged(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x}): torn or corrupt"
        ));
    }
    let (s, b, g) = (u64_at(data, 8), u64_at(data, 16), u64_at(data, 24));
    if s != seed {
        return Found::Damaged(format!("stamp of another run (seed {s:x})"));
    }
    if b != block {
        return Found::Damaged(format!("stamp of block {b} (generation {g}): misdirected"));
    }
    if g == 0 {
        return Found::Damaged("stamp with generation 0".into());
    }
    let mut expect = vec![0u8; len];
    encode(seed, block, g, &mut expect);
    if expect != data {
        return Found::Damaged(format!("generation {g} with a wrong payload"));
    }
    Found::Gen(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut b = vec![0u8; 4096];
        encode(7, 3, 42, &mut b);
        assert_eq!(decode(7, 3, &b), Found::Gen(42));
        assert!(matches!(decode(8, 3, &b), Found::Damaged(_)));
        assert!(matches!(decode(7, 4, &b), Found::Damaged(_)));
        let mut torn = b.clone();
        torn[2048..].fill(0);
        assert!(matches!(decode(7, 3, &torn), Found::Damaged(_)));
        assert_eq!(decode(7, 3, &[0u8; 4096]), Found::Zero);
    }

    #[test]
    fn plan_spreads_over_blocks() {
        let mut hit = [0u32; 16];
        for g in 1..=1600 {
            hit[block_of(99, g, 16) as usize] += 1;
        }
        assert!(hit.iter().all(|&n| n > 50), "{hit:?}");
    }
}
