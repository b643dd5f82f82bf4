//! The store layout: the one place that spells and parses object keys.
//!
//! Every key the store holds is built by a function here, and every key
//! the engine or the catalog takes apart is parsed here; no other module
//! formats a key by hand. The stored format is fixed: old stores must keep
//! opening, so a change to any spelling here is a format change.
//!
//! | key | written by |
//! |-----|------------|
//! | `catalog/store-id` | [`crate::catalog::local_dir`] (the store's identity) |
//! | `catalog/next-id` | [`crate::catalog`] (the volume id counter) |
//! | `catalog/volumes/<name>` | [`crate::catalog`] (one record per volume) |
//! | `volumes/<id:016x>/manifest` | [`crate::engine::checkpoint`], [`crate::engine::commit`] (the volume's root) |
//! | `volumes/<id:016x>/lease` | [`crate::catalog::lease`] (the writer's lease) |
//! | `volumes/<id:016x>/chunks/<seq:016x>-<epoch:08x>` | destage (chunk objects) |
//! | `volumes/<id:016x>/compacted/<id:016x>-<epoch:08x>` | compaction (ids with [`COMPACTED_BIT`]) |
//! | `volumes/<id:016x>/checkpoints/<chunk:016x>-<epoch:08x>` | checkpoint commit (a base) |
//! | `…/checkpoints/<chunk:016x>-<epoch:08x>-base-<n:04x>` | checkpoint commit (a base whose natural key the committed chain holds) |
//! | `…/checkpoints/<chunk:016x>-<epoch:08x>-delta-<pos:04x>` | checkpoint commit (a delta) |
//! | `volumes/<id:016x>/snapshots/<snap:016x>` | [`crate::engine::snapshot`] |
//! | `volumes/<id:016x>/retain-index` | [`crate::engine::retain_index`] |
//! | `volumes/<id:016x>/warm-start` | [`crate::engine::warm_start`] |
//! | `volumes/<id:016x>/usage` | [`crate::engine::usage`] |
//!
//! Invariants:
//! 1. Numbers are lowercase hex with a minimum width (`016x`, `08x`,
//!    `04x`): a number wider than its minimum is written whole (an epoch
//!    past `u32::MAX` has more than 8 digits). Volume, chunk and snapshot
//!    ids are always exactly 16 digits, so within one prefix keys sort by
//!    sequence number, chunk by chunk, and a listing comes back in order.
//! 2. Everything a volume owns lives under [`volume_prefix`], so listing
//!    that prefix finds it all; nothing else does.
//! 3. The parsers accept exactly what the formatters write:
//!    `parse(format(x)) == x` for every `x`, and a name that is not the
//!    canonical spelling of its numbers (wrong prefix, width, case or
//!    characters, a sign, trailing text) gives `None`, never a panic.

use super::limits::COMPACTED_BIT;

/// Prefix of every catalog object.
pub const CATALOG_PREFIX: &str = "catalog/";
/// Prefix of the catalog's volume records ([`catalog_record_key`]).
pub const CATALOG_VOLUMES_PREFIX: &str = "catalog/volumes/";
/// The catalog's volume id counter.
pub const NEXT_ID_KEY: &str = "catalog/next-id";
/// The store's identity object.
pub const STORE_ID_KEY: &str = "catalog/store-id";

/// Key of the catalog record of the volume named `name`.
pub fn catalog_record_key(name: &str) -> String {
    format!("{CATALOG_VOLUMES_PREFIX}{name}")
}

/// The volume name a catalog record key names (`None` outside
/// [`CATALOG_VOLUMES_PREFIX`] or for an empty name).
pub fn parse_catalog_record_key(key: &str) -> Option<&str> {
    key.strip_prefix(CATALOG_VOLUMES_PREFIX)
        .filter(|name| !name.is_empty())
}

/// First segment of every volume's keys.
const VOLUMES_DIR: &str = "volumes/";
/// Segment of chunk objects under a volume's prefix.
const CHUNKS_DIR: &str = "chunks/";
/// Segment of compaction objects under a volume's prefix.
const COMPACTED_DIR: &str = "compacted/";

/// The store prefix holding all of one volume's objects: `volumes/<id:016x>/`.
pub fn volume_prefix(id: u64) -> String {
    format!("{VOLUMES_DIR}{id:016x}/")
}

/// Key of the manifest of `volume` (its root, compare-and-swap only).
pub fn manifest_key(volume: u64) -> String {
    format!("{}manifest", volume_prefix(volume))
}

/// Key of the lease of `volume`.
pub fn lease_key(volume: u64) -> String {
    format!("{}lease", volume_prefix(volume))
}

/// Key of the retention index of `volume`.
pub fn retain_index_key(volume: u64) -> String {
    format!("{}retain-index", volume_prefix(volume))
}

/// Key of the warm start object of `volume`.
pub fn warm_start_key(volume: u64) -> String {
    format!("{}warm-start", volume_prefix(volume))
}

/// Key of the usage object of `volume`.
pub fn usage_key(volume: u64) -> String {
    format!("{}usage", volume_prefix(volume))
}

/// Prefix under which every chunk of `volume` lives.
pub fn chunk_prefix(volume: u64) -> String {
    format!("{}{CHUNKS_DIR}", volume_prefix(volume))
}

/// Prefix under which every compaction object of `volume` lives.
pub fn compacted_prefix(volume: u64) -> String {
    format!("{}{COMPACTED_DIR}", volume_prefix(volume))
}

/// Key of chunk `seq` written in `epoch`: under [`compacted_prefix`] when
/// `seq` has [`COMPACTED_BIT`] (a compaction object), else under
/// [`chunk_prefix`]. Built without `format!`: every read from the store
/// names its chunk, and formatting machinery was 3% of a 4K random read's
/// CPU.
pub fn chunk_key(volume: u64, seq: u64, epoch: u64) -> String {
    let dir = if seq & COMPACTED_BIT != 0 {
        COMPACTED_DIR
    } else {
        CHUNKS_DIR
    };
    let mut key = String::with_capacity(64);
    key.push_str(VOLUMES_DIR);
    push_hex(&mut key, volume, 16);
    key.push('/');
    key.push_str(dir);
    push_chunk_name(&mut key, seq, epoch);
    key
}

/// Append `v` in lower-case hex, zero-padded to at least `min_digits`
/// (what `{v:0min_digits$x}` prints).
fn push_hex(out: &mut String, v: u64, min_digits: u32) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let significant = (u64::BITS - v.leading_zeros()).div_ceil(4).max(1);
    for i in (0..significant.max(min_digits)).rev() {
        let nibble = (v >> (i * 4)) & 0xf;
        out.push(char::from(DIGITS[nibble as usize]));
    }
}

/// The last segment of a chunk key: `<seq:016x>-<epoch:08x>`.
fn chunk_name(seq: u64, epoch: u64) -> String {
    let mut name = String::with_capacity(26);
    push_chunk_name(&mut name, seq, epoch);
    name
}

/// Append [`chunk_name`]`(seq, epoch)` to `out`.
fn push_chunk_name(out: &mut String, seq: u64, epoch: u64) {
    push_hex(out, seq, 16);
    out.push('-');
    push_hex(out, epoch, 8);
}

/// `(seq, epoch)` from a chunk key's last segment (the part after
/// [`chunk_prefix`] or [`compacted_prefix`]).
pub fn parse_chunk_name(name: &str) -> Option<(u64, u64)> {
    let (s, e) = name.split_once('-')?;
    Some((parse_hex(s, 16)?, parse_hex(e, 8)?))
}

/// `(seq, epoch)` of a key under [`chunk_prefix`] or [`compacted_prefix`]
/// of `volume`. Whether the number agrees with the prefix
/// ([`COMPACTED_BIT`]) is left to the caller, which judges numbers
/// anyway.
pub fn parse_chunk_key(volume: u64, key: &str) -> Option<(u64, u64)> {
    let name = key
        .strip_prefix(&chunk_prefix(volume))
        .or_else(|| key.strip_prefix(&compacted_prefix(volume)))?;
    parse_chunk_name(name)
}

/// Prefix of every checkpoint object of `volume`.
pub fn checkpoint_prefix(volume: u64) -> String {
    format!("{}checkpoints/", volume_prefix(volume))
}

/// Key of the full checkpoint (base) taken after chunk `chunk_seq` by the
/// writer of `epoch`.
pub fn checkpoint_key(volume: u64, chunk_seq: u64, epoch: u64) -> String {
    format!(
        "{}{}",
        checkpoint_prefix(volume),
        chunk_name(chunk_seq, epoch)
    )
}

/// Key of a base whose natural key ([`checkpoint_key`]) the committed
/// chain still holds: renamed with `-base-<n:04x>`, `n >= 1`, so a new
/// base never overwrites an object the manifest names.
pub fn checkpoint_base_key(volume: u64, chunk_seq: u64, epoch: u64, n: u64) -> String {
    format!("{}-base-{n:04x}", checkpoint_key(volume, chunk_seq, epoch))
}

/// Key of delta `position` of a chain, ending at chunk `chunk_seq`: never
/// the key of a base, nor of another delta of the same chain.
pub fn delta_key(volume: u64, chunk_seq: u64, epoch: u64, position: u64) -> String {
    format!(
        "{}-delta-{position:04x}",
        checkpoint_key(volume, chunk_seq, epoch)
    )
}

/// The chunk sequence and writer epoch in a checkpoint key's name (the part
/// after [`checkpoint_prefix`]): `<seq:016x>-<epoch:08x>` for a base,
/// followed by `-delta-<position:04x>` for a delta or `-base-<n:04x>` for
/// a renamed base. `None` if it is none of these.
pub fn parse_checkpoint_name(name: &str) -> Option<(u64, u64)> {
    let base = match name
        .rsplit_once("-delta-")
        .or_else(|| name.rsplit_once("-base-"))
    {
        Some((base, n)) => {
            parse_hex(n, 4)?;
            base
        }
        None => name,
    };
    parse_chunk_name(base)
}

/// `(chunk_seq, epoch)` of a key under [`checkpoint_prefix`] of `volume`.
pub fn parse_checkpoint_key(volume: u64, key: &str) -> Option<(u64, u64)> {
    parse_checkpoint_name(key.strip_prefix(&checkpoint_prefix(volume))?)
}

/// Prefix of every snapshot object of `volume`.
pub fn snapshot_prefix(volume: u64) -> String {
    format!("{}snapshots/", volume_prefix(volume))
}

/// Key of snapshot `snap` of `volume`.
pub fn snapshot_key(volume: u64, snap: u64) -> String {
    format!("{}{snap:016x}", snapshot_prefix(volume))
}

/// The snapshot id of a key under [`snapshot_prefix`] of `volume`.
pub fn parse_snapshot_key(volume: u64, key: &str) -> Option<u64> {
    let name = key.strip_prefix(&snapshot_prefix(volume))?;
    if name.len() != 16 {
        return None;
    }
    parse_hex(name, 16)
}

/// The number `s` spells as lowercase hex padded to `min_width` digits:
/// `None` unless `s` is exactly `format!("{n:0min_width$x}")` of some `n`
/// (no sign, no uppercase, no extra leading zeros, at most 16 digits).
fn parse_hex(s: &str, min_width: usize) -> Option<u64> {
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if s.len() < min_width || s.len() > 16 || !s.bytes().all(lower_hex) {
        return None;
    }
    let n = u64::from_str_radix(s, 16).ok()?;
    (format!("{n:0min_width$x}") == s).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each key as today's stores hold it, written out literally.
    #[test]
    fn keys_are_spelled_as_stored() {
        assert_eq!(CATALOG_PREFIX, "catalog/");
        assert_eq!(NEXT_ID_KEY, "catalog/next-id");
        assert_eq!(STORE_ID_KEY, "catalog/store-id");
        assert_eq!(catalog_record_key("db-1"), "catalog/volumes/db-1");
        assert_eq!(volume_prefix(0x10), "volumes/0000000000000010/");
        assert_eq!(volume_prefix(u64::MAX), "volumes/ffffffffffffffff/");
        assert_eq!(manifest_key(0x10), "volumes/0000000000000010/manifest");
        assert_eq!(lease_key(7), "volumes/0000000000000007/lease");
        assert_eq!(
            retain_index_key(0xab),
            "volumes/00000000000000ab/retain-index"
        );
        assert_eq!(warm_start_key(0xab), "volumes/00000000000000ab/warm-start");
        assert_eq!(usage_key(3), "volumes/0000000000000003/usage");
        assert_eq!(chunk_prefix(0xab), "volumes/00000000000000ab/chunks/");
        assert_eq!(
            compacted_prefix(0xab),
            "volumes/00000000000000ab/compacted/"
        );
        assert_eq!(
            chunk_key(0xab, 17, 3),
            "volumes/00000000000000ab/chunks/0000000000000011-00000003"
        );
        assert_eq!(
            chunk_key(0xab, COMPACTED_BIT | 5, 3),
            "volumes/00000000000000ab/compacted/8000000000000005-00000003"
        );
        assert_eq!(
            chunk_key(1, 2, 0x1_0000_0001),
            "volumes/0000000000000001/chunks/0000000000000002-100000001"
        );
        assert_eq!(
            checkpoint_prefix(7),
            "volumes/0000000000000007/checkpoints/"
        );
        assert_eq!(
            checkpoint_key(7, 0x1234, 9),
            "volumes/0000000000000007/checkpoints/0000000000001234-00000009"
        );
        assert_eq!(
            checkpoint_base_key(7, 0x1234, 9, 2),
            "volumes/0000000000000007/checkpoints/0000000000001234-00000009-base-0002"
        );
        assert_eq!(
            delta_key(7, 0x1235, 0x1_0000_0001, 3),
            "volumes/0000000000000007/checkpoints/0000000000001235-100000001-delta-0003"
        );
        assert_eq!(snapshot_prefix(0x10), "volumes/0000000000000010/snapshots/");
        assert_eq!(
            snapshot_key(0x10, 2),
            "volumes/0000000000000010/snapshots/0000000000000002"
        );
    }

    const NUMBERS: [u64; 6] = [0, 1, 0x11, 0xffff_ffff, 0x1_0000_0000, u64::MAX];

    #[test]
    fn keys_parse_back() {
        for v in [0, 7, u64::MAX] {
            for a in NUMBERS {
                for b in NUMBERS {
                    assert_eq!(parse_chunk_key(v, &chunk_key(v, a, b)), Some((a, b)));
                    let ck = checkpoint_key(v, a, b);
                    assert_eq!(parse_checkpoint_key(v, &ck), Some((a, b)));
                    for n in [1, 0x10, 0xffff, 0x1_0000] {
                        let d = delta_key(v, a, b, n);
                        assert_eq!(parse_checkpoint_key(v, &d), Some((a, b)), "{d}");
                        let r = checkpoint_base_key(v, a, b, n);
                        assert_eq!(parse_checkpoint_key(v, &r), Some((a, b)), "{r}");
                    }
                }
                assert_eq!(parse_snapshot_key(v, &snapshot_key(v, a)), Some(a));
            }
        }
        for name in ["db", "a@b", "x-1"] {
            let k = catalog_record_key(name);
            assert_eq!(parse_catalog_record_key(&k), Some(name));
        }
    }

    #[test]
    fn parsers_refuse_what_formatters_never_write() {
        let good = chunk_key(7, 0x11, 3);
        for bad in [
            "",
            "volumes/0000000000000007/chunks/",
            "volumes/0000000000000008/chunks/0000000000000011-00000003",
            "volumes/0000000000000007/checkpoints/0000000000000011-00000003",
            "volumes/0000000000000007/chunks/0000000000000011",
            "volumes/0000000000000007/chunks/0000000000000011-",
            "volumes/0000000000000007/chunks/0000000000000011-3",
            "volumes/0000000000000007/chunks/0000000000000011-000000003",
            "volumes/0000000000000007/chunks/0000000000000011-0000000A",
            "volumes/0000000000000007/chunks/0000000000000011-+0000003",
            "volumes/0000000000000007/chunks/0000000000000011-00000003x",
            "volumes/0000000000000007/chunks/0000000000000011-00000003-1",
            "volumes/0000000000000007/chunks/000000000000011-00000003",
            "volumes/0000000000000007/chunks/00000000000000011-00000003",
            "volumes/0000000000000007/chunks/000000000000001G-00000003",
            "volumes/0000000000000007/chunks/+000000000000011-00000003",
            "volumes/0000000000000007/chunks/0000000000000011-10000000000000000",
            "volumes/0000000000000007/chunks/zz-1",
            "volumes/0000000000000007/chunks/é000000000000011-00000003",
        ] {
            assert_ne!(bad, good);
            assert_eq!(parse_chunk_key(7, bad), None, "{bad:?}");
        }
        let base = checkpoint_key(7, 0x1234, 9);
        for suffix in [
            "-",
            "-other-0001",
            "-delta-",
            "-delta-1",
            "-delta-q000",
            "-delta-0001x",
            "-delta-0001-delta-0001",
            "-base-",
            "-base-00001",
            "-base-000A",
        ] {
            let bad = format!("{base}{suffix}");
            assert_eq!(parse_checkpoint_key(7, &bad), None, "{bad:?}");
        }
        assert_eq!(parse_checkpoint_key(8, &base), None);
        for bad in [
            "",
            "00000000000012",
            "0000000000001234-",
            "0000000000001234-zz",
            "0000000000001234-00000009-other-1",
            "0000000000001234-00000009-delta-",
            "0000000000001234-00000009-delta-q",
            "0000000000001234-00000009-base-",
            "12-00000009",
        ] {
            assert_eq!(parse_checkpoint_name(bad), None, "{bad:?}");
        }
        let snap = snapshot_key(7, 2);
        for bad in [
            format!("{snap}0"),
            snap[..snap.len() - 1].to_string(),
            format!("{snap}/x"),
            snap.replace("0000000000000002", "000000000000000G"),
            snap.replace("0000000000000002", "+000000000000002"),
            snap.replace("volumes/0000000000000007", "volumes/0000000000000008"),
            snapshot_prefix(7),
        ] {
            assert_eq!(parse_snapshot_key(7, &bad), None, "{bad:?}");
        }
        assert_eq!(parse_catalog_record_key(CATALOG_VOLUMES_PREFIX), None);
        assert_eq!(parse_catalog_record_key("catalog/next-id"), None);
        assert_eq!(parse_catalog_record_key(&manifest_key(1)), None);
    }

    #[test]
    fn hex_matches_format() {
        for v in [
            0u64,
            1,
            0xf,
            0x10,
            0xabc,
            0xffff_ffff,
            0x1_0000_0000,
            u64::MAX,
        ] {
            for min in [0u32, 1, 8, 16] {
                let mut out = String::new();
                push_hex(&mut out, v, min);
                assert_eq!(out, format!("{v:0w$x}", w = min as usize), "{v:#x} {min}");
            }
        }
    }
}
