//! Reading a whole object from the store under a size cap (the caps are
//! in [`super::format::limits`]): a corrupt or hostile object can make the engine
//! refuse it, never allocate without bound.

use super::error::EngineError;
use crate::store::{DynStore, Object};

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
