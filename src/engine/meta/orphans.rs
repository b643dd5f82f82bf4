//! Checkpoint objects no manifest names, deleted when a volume opens.
//!
//! A checkpoint object is written before the manifest names it (see
//! `commit.rs`), so a crash, a lost compare-and-swap or a
//! failed delete of a superseded chain leaves objects under
//! [`checkpoint_prefix`] that nothing will ever read. Without this
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

use crate::engine::error::EngineError;
use crate::engine::format::layout::{checkpoint_prefix, parse_checkpoint_key};
use crate::store::DynStore;

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
        let Some((_, e)) = parse_checkpoint_key(volume, &meta.key) else {
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
