//! The manifest store: every read and write of a volume's manifest
//! (`volumes/<id>/manifest`, the volume's root) goes through here.
//!
//! Invariants:
//! 1. A manifest is created only with `PutMode::Create` and replaced only
//!    by compare-and-swap (`PutMode::IfMatch` on the version last read or
//!    written), so a writer that lost the volume cannot commit.
//! 2. Every write is checked first ([`super::invariants`]); a manifest that
//!    fails the checks is never sent, and the caller gets
//!    [`WriteError::Refused`].
//! 3. What is read is capped ([`MAX_MANIFEST_BYTES`]) and validated before
//!    it is returned ([`Manifest::parse`]).

use super::invariants::{check_create, check_swap};
use crate::engine::capped::get_capped;
use crate::engine::error::EngineError;
use crate::engine::format::layout::manifest_key;
use crate::engine::format::limits::MAX_MANIFEST_BYTES;
use crate::engine::format::manifest::Manifest;
use crate::store::{DynStore, Object, PutMode, StoreError, Version};

/// The manifest as last committed, with its version.
pub(crate) struct Root {
    pub manifest: Manifest,
    pub version: Version,
}

/// How a create or a compare-and-swap ended, when the store answered.
#[derive(Debug)]
#[must_use]
pub enum Put {
    /// Written; the manifest's new version.
    Stored(Version),
    /// Not written: a manifest already exists (create), or the manifest
    /// changed since the version given (swap).
    Conflict,
}

/// A manifest write that failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The manifest failed the checks run before every write (invariant 2).
    #[error("manifest {key}: refusing to write it: {reason}")]
    Refused { key: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<WriteError> for EngineError {
    fn from(e: WriteError) -> EngineError {
        match e {
            WriteError::Refused { key, reason } => EngineError::Manifest {
                key,
                reason: format!("refusing to write it: {reason}"),
            },
            WriteError::Store(e) => EngineError::Store(e),
        }
    }
}

/// Read the manifest of `volume` (at most [`MAX_MANIFEST_BYTES`]) and
/// check it; returns it with the object (for its version).
pub async fn read_manifest(
    store: &DynStore,
    volume: u64,
) -> Result<(Manifest, Object), EngineError> {
    let o = get_capped(store, &manifest_key(volume), MAX_MANIFEST_BYTES, "manifest").await?;
    Ok((Manifest::parse(volume, &o.data)?, o))
}

/// Read the manifest of `volume` like [`read_manifest`]; `None` when the
/// volume has none (it was never opened).
pub async fn read_manifest_if_any(
    store: &DynStore,
    volume: u64,
) -> Result<Option<(Manifest, Object)>, EngineError> {
    match read_manifest(store, volume).await {
        Ok(found) => Ok(Some(found)),
        Err(EngineError::Store(StoreError::NotFound { .. })) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The error for a manifest of `volume` that is refused for `reason`.
pub fn invalid(volume: u64, reason: impl Into<String>) -> EngineError {
    EngineError::Manifest {
        key: manifest_key(volume),
        reason: reason.into(),
    }
}

/// Create `m` as the first manifest of `m.volume`.
pub async fn create(store: &DynStore, m: &Manifest) -> Result<Put, WriteError> {
    let key = manifest_key(m.volume);
    check_create(m.volume, m).map_err(|reason| WriteError::Refused {
        key: key.clone(),
        reason,
    })?;
    match store.put(&key, m.encode(), PutMode::Create).await {
        Ok(v) => Ok(Put::Stored(v)),
        Err(StoreError::AlreadyExists { .. }) => Ok(Put::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// Replace `old` (stored at `version`) with `new` by compare-and-swap.
pub async fn swap(
    store: &DynStore,
    old: &Manifest,
    version: Version,
    new: &Manifest,
) -> Result<Put, WriteError> {
    let key = manifest_key(old.volume);
    check_swap(old, new).map_err(|reason| WriteError::Refused {
        key: key.clone(),
        reason,
    })?;
    match store
        .put(&key, new.encode(), PutMode::IfMatch(version))
        .await
    {
        Ok(v) => Ok(Put::Stored(v)),
        Err(StoreError::PreconditionFailed { .. }) => Ok(Put::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// The open volume's writer (at `epoch`) replaces the manifest in `root`
/// with `m` by compare-and-swap; `check_not_fenced` runs before each
/// attempt. A lost swap is retried when the manifest found is still our
/// own (an earlier attempt of ours may have landed); another epoch's
/// manifest, or one that does not parse, means the volume was taken over:
/// [`EngineError::Fenced`].
pub(crate) async fn commit(
    store: &DynStore,
    epoch: u64,
    root: &mut Root,
    m: Manifest,
    check_not_fenced: impl Fn() -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    let volume = root.manifest.volume;
    let key = manifest_key(volume);
    check_swap(&root.manifest, &m).map_err(|reason| WriteError::Refused {
        key: key.clone(),
        reason,
    })?;
    let data = m.encode();
    for _ in 0..3 {
        check_not_fenced()?;
        match store
            .put(&key, data.clone(), PutMode::IfMatch(root.version.clone()))
            .await
        {
            Ok(v) => {
                root.version = v;
                root.manifest = m;
                return Ok(());
            }
            Err(StoreError::PreconditionFailed { .. }) => {
                // Our own earlier attempt may have landed; another
                // epoch's write, or anything the manifest store would
                // not write (too large, unparsable, failing the checks:
                // invariant 2), means we lost the volume. A store error
                // is returned as it is: the volume may still be ours.
                let (theirs, found) = match read_manifest(store, volume).await {
                    Ok(found) => found,
                    Err(EngineError::Store(e)) => return Err(EngineError::Store(e)),
                    Err(e) => {
                        return Err(EngineError::Fenced(format!(
                            "manifest replaced by something unreadable: {e}"
                        )))
                    }
                };
                if theirs.epoch != epoch {
                    return Err(EngineError::Fenced(format!(
                        "manifest taken over by epoch {}",
                        theirs.epoch
                    )));
                }
                root.version = found.version;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(EngineError::Fenced(
        "manifest keeps changing under us".into(),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::engine::meta::prepare::fresh;
    use crate::store::memory::MemoryStore;

    /// A store holding `m` as the manifest of its volume, and its root.
    async fn stored(m: &Manifest) -> (DynStore, Root) {
        let store: DynStore = Arc::new(MemoryStore::new());
        let Put::Stored(version) = create(&store, m).await.unwrap() else {
            panic!("a fresh store has no manifest");
        };
        let root = Root {
            manifest: m.clone(),
            version,
        };
        (store, root)
    }

    fn at_chunk(m: &Manifest, last_chunk: u64) -> Manifest {
        Manifest {
            last_chunk,
            last_seq: last_chunk * 10,
            ..m.clone()
        }
    }

    /// After a lost swap, a manifest of our own epoch that fails the
    /// checks (here: its checkpoint chunk lies after its last chunk) was
    /// not written by the manifest store: the commit is fenced and leaves
    /// it in place, rather than taking it for our own earlier attempt and
    /// writing over it.
    #[tokio::test]
    async fn a_competing_manifest_that_fails_the_checks_fences_the_commit() {
        let m = fresh(7, 3, None);
        let (store, mut root) = stored(&m).await;
        let bad = Manifest {
            checkpoint_chunk: 9,
            ..at_chunk(&m, 2)
        };
        let key = manifest_key(7);
        let cur = store.get(&key).await.unwrap();
        store
            .put(&key, bad.encode(), PutMode::IfMatch(cur.version))
            .await
            .unwrap();
        let e = commit(&store, 3, &mut root, at_chunk(&m, 4), || Ok(()))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, EngineError::Fenced(r) if r.contains("unreadable")),
            "{e}"
        );
        assert_eq!(store.get(&key).await.unwrap().data, bad.encode());
    }

    /// After a lost swap, a valid manifest of our own epoch is our earlier
    /// attempt: the commit retries on its version and lands; another
    /// epoch's manifest fences it.
    #[tokio::test]
    async fn a_lost_swap_retries_on_our_epoch_and_is_fenced_by_another() {
        let m = fresh(7, 3, None);
        let (store, mut root) = stored(&m).await;
        let key = manifest_key(7);
        let ours = at_chunk(&m, 2);
        let cur = store.get(&key).await.unwrap();
        store
            .put(&key, ours.encode(), PutMode::IfMatch(cur.version))
            .await
            .unwrap();
        commit(&store, 3, &mut root, at_chunk(&m, 4), || Ok(()))
            .await
            .unwrap();
        let (now, _) = read_manifest(&store, 7).await.unwrap();
        assert_eq!(now.last_chunk, 4);

        let theirs = Manifest {
            epoch: 5,
            ..at_chunk(&m, 4)
        };
        let cur = store.get(&key).await.unwrap();
        store
            .put(&key, theirs.encode(), PutMode::IfMatch(cur.version))
            .await
            .unwrap();
        let e = commit(&store, 3, &mut root, at_chunk(&m, 6), || Ok(()))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, EngineError::Fenced(r) if r.contains("epoch 5")),
            "{e}"
        );
    }
}
