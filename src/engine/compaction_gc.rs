//! Deleting the compaction objects (see `compact.rs`) that neither a
//! volume's map nor its snapshots name: the garbage collection that a
//! snapshot delete of a detached volume ([`super::snapshot`]) and of an
//! open one (its meta task, `live_snapshot.rs`) share.

use std::collections::HashSet;

use super::error::EngineError;
use super::fenced_delete::FencedDeleter;
use super::format::layout::{compacted_prefix, parse_chunk_name};
use super::retain_index::RetainSet;
use crate::store::DynStore;

/// Delete the compaction objects of `deleter`'s volume that `named` (the
/// chunks the volume's committed or in-memory map names) and `retain` (its
/// snapshots) both leave out, of the deleter's epoch or older only, with
/// fencing re-checked as it goes ([`FencedDeleter`]). Only for a caller
/// that writes the volume and runs no compaction meanwhile (a detached
/// volume under its lease, or the meta task itself). Returns how many
/// were deleted.
pub(crate) async fn delete_unnamed(
    deleter: &mut FencedDeleter<'_>,
    store: &DynStore,
    volume: u64,
    named: &HashSet<(u64, u64)>,
    retain: &RetainSet,
) -> Result<u64, EngineError> {
    let prefix = compacted_prefix(volume);
    let mut deleted = 0;
    for meta in store.list(&prefix).await? {
        let Some((seq, epoch)) = parse_chunk_name(&meta.key[prefix.len()..]) else {
            continue;
        };
        if named.contains(&(seq, epoch)) || retain.keeps(seq, epoch) {
            continue;
        }
        if deleter.delete(&meta.key, epoch).await? {
            deleted += 1;
        }
    }
    Ok(deleted)
}
