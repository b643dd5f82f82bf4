//! Bounds on what the engine reads back from the store: numbers in decoded
//! objects and the size of metadata objects read whole.
//!
//! Everything read from the store is untrusted input. A number outside
//! these bounds cannot come from real use (at ten million operations a
//! second, sequence numbers reach [`MAX_SEQ`] after more than ten thousand
//! years), so it is corruption or an attack: the object is refused with an
//! error naming it, before any arithmetic could wrap and before anything is
//! deleted because of it.

use super::chunk::COMPACTED_BIT;
use super::error::EngineError;
use crate::store::{DynStore, Object};

/// Op sequence numbers, chunk numbers and the low bits of compaction ids
/// are below this, so `n + 1` (and sums of a few of them) never wrap.
pub const MAX_SEQ: u64 = 1 << 62;

/// Largest manifest read (a real one is a few hundred bytes).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 10;

/// Largest checkpoint or snapshot object read whole, whatever the volume.
pub const MAX_METADATA_BYTES: u64 = 1 << 30;

/// Largest chunk object read whole at recovery (chunks are at most
/// `chunk_size`, itself at most 256 MiB, plus one request and a header).
pub const MAX_CHUNK_OBJECT_BYTES: u64 = 1 << 30;

/// Largest checkpoint (or snapshot object) of a volume of `volume_bytes`:
/// 16 MiB plus 64 bytes per sector (about one encoded extent per sector,
/// the most a map can hold), at most [`MAX_METADATA_BYTES`].
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

/// Read `key` whole if it is at most `cap` bytes; `what` names the kind of
/// object in the error. The size is checked before the read (by `head`) and
/// again after it (the object may have been replaced in between).
pub async fn get_capped(
    store: &DynStore,
    key: &str,
    cap: u64,
    what: &'static str,
) -> Result<Object, EngineError> {
    let too_large = |size: u64| EngineError::Oversized {
        what,
        key: key.to_string(),
        size,
        cap,
    };
    let meta = store.head(key).await?;
    if meta.size > cap {
        return Err(too_large(meta.size));
    }
    let obj = store.get(key).await?;
    if obj.data.len() as u64 > cap {
        return Err(too_large(obj.data.len() as u64));
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::PutMode;

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

    #[tokio::test]
    async fn oversized_objects_are_refused_by_name() {
        let store: DynStore = Arc::new(MemoryStore::new());
        store
            .put("a/b", Bytes::from(vec![1u8; 100]), PutMode::Create)
            .await
            .unwrap();
        assert_eq!(
            get_capped(&store, "a/b", 100, "x")
                .await
                .unwrap()
                .data
                .len(),
            100
        );
        let e = get_capped(&store, "a/b", 99, "manifest").await.unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("a/b") && msg.contains("larger"), "{msg}");
        assert!(get_capped(&store, "a/c", 99, "x").await.is_err());
    }
}
