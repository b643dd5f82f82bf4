//! Checkpoint objects no manifest names, deleted when a volume opens.
//!
//! A checkpoint object is written before the manifest names it (see
//! [`crate::engine::commit`]), so a crash, a lost compare-and-swap or a
//! failed delete of a superseded chain leaves objects under
//! [`super::checkpoint_prefix`] that nothing will ever read. Without this
//! sweep they stay in the store for good.
//!
//! Invariants:
//! 1. Only objects of the opening writer's epoch or older are judged: a
//!    newer epoch's objects belong to a writer that fenced us.
//! 2. Every object of the chain the committed manifest names is kept (the
//!    caller passes those keys); so is every key this module cannot parse.
//! 3. The sweep runs after the opening writer has taken the manifest at its
//!    epoch, so an older writer can no longer commit a checkpoint it
//!    uploaded (its compare-and-swap fails): its object is an orphan too.

use std::collections::HashSet;

use super::checkpoint_prefix;
use crate::engine::chunk::parse_chunk_name;
use crate::engine::error::EngineError;
use crate::store::DynStore;

/// The chunk sequence and writer epoch in a checkpoint key's name (the part
/// after [`checkpoint_prefix`]): `{seq:016x}-{epoch:x}` for a base,
/// followed by `-delta-{position:x}` for a delta or `-base-{n:x}` for a
/// base whose natural key the committed chain held. `None` if it is none
/// of these.
pub fn parse_checkpoint_name(name: &str) -> Option<(u64, u64)> {
    let base = match name
        .rsplit_once("-delta-")
        .or_else(|| name.rsplit_once("-base-"))
    {
        Some((base, n)) if !n.is_empty() && u64::from_str_radix(n, 16).is_ok() => base,
        Some(_) => return None,
        None => name,
    };
    parse_chunk_name(base)
}

/// Delete the checkpoint objects of `volume` at epoch `<= epoch` that are
/// not in `keep` (the committed chain); returns how many went.
pub(crate) async fn delete_orphan_checkpoints(
    store: &DynStore,
    volume: u64,
    epoch: u64,
    keep: &HashSet<String>,
) -> Result<u64, EngineError> {
    let prefix = checkpoint_prefix(volume);
    let mut deleted = 0;
    for meta in store.list(&prefix).await? {
        if keep.contains(&meta.key) {
            continue;
        }
        let Some((_, e)) = parse_checkpoint_name(&meta.key[prefix.len()..]) else {
            log::warn!("ignoring unexpected object {}", meta.key);
            continue;
        };
        if e > epoch {
            continue;
        }
        log::warn!(
            "deleting checkpoint object {} (no manifest names it)",
            meta.key
        );
        store.delete(&meta.key).await?;
        deleted += 1;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::checkpoint::{checkpoint_key, delta_key};

    #[test]
    fn names_of_bases_and_deltas_parse_back() {
        let p = checkpoint_prefix(7);
        let base = checkpoint_key(7, 0x1234, 9);
        let delta = delta_key(7, 0x1235, 0x1_0000_0001, 3);
        let renamed = format!("{base}-base-0002");
        assert_eq!(
            parse_checkpoint_name(&renamed[p.len()..]),
            Some((0x1234, 9))
        );
        assert_eq!(parse_checkpoint_name(&base[p.len()..]), Some((0x1234, 9)));
        assert_eq!(
            parse_checkpoint_name(&delta[p.len()..]),
            Some((0x1235, 0x1_0000_0001))
        );
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
    }
}
