//! A volume's local directory (WAL, read cache, control socket): whose it
//! is, and which process has it open.
//!
//! Invariants:
//! 1. Every store has an identity: the object [`STORE_ID_KEY`], a random id
//!    created once, create-only, by whoever first needs it, and never
//!    changed. Concurrent first users agree on one id (the create race has
//!    one winner, and the losers read the winner's).
//! 2. A volume's local directory records whose it is in [`IDENTITY_FILE`]:
//!    the store id, the volume id and a random id of the directory itself
//!    (used by leases to recognise "the same local directory", see
//!    `lease` rule 8). It is written (atomically) the first time the
//!    directory is used, and only read afterwards.
//! 3. A directory recorded for another store or volume is refused with
//!    [`LocalDirError::Mismatch`], naming both identities and the
//!    directory: its WAL is never replayed into the wrong volume.
//! 4. A process that opens a volume holds an exclusive `flock` on the
//!    directory's [`LOCK_FILE`] for as long as it has the volume open
//!    ([`LocalDirClaim`]); a second opener on this host gets
//!    [`LocalDirError::Busy`]. The kernel drops the lock when the process
//!    dies, so holding it also proves that no live local process has the
//!    directory open.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::engine::format::layout::STORE_ID_KEY;
use crate::host::MAX_ID_LEN;
use crate::store::{DynStore, PutMode, StoreError};

/// The file in a volume's local directory naming its store and volume.
pub const IDENTITY_FILE: &str = "identity.json";
/// The file in a volume's local directory its opener holds locked.
pub const LOCK_FILE: &str = "lock";
/// Largest identity object or file read.
const MAX_IDENTITY_BYTES: usize = 4096;

/// Failures of store identities and local directory claims.
#[derive(Debug, thiserror::Error)]
pub enum LocalDirError {
    #[error(
        "local directory {} is in use by another process on this host{}; \
         a volume can be opened by one process at a time",
        .path.display(),
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Busy { path: PathBuf, pid: Option<u32> },
    #[error(
        "local directory {} belongs to volume {found_volume:016x} of store {found_store}, \
         but this configuration opens volume {volume:016x} of store {store}: refusing to \
         mix their data (do two configurations share one data_dir?). Give each store its \
         own data_dir, or move the directory away if its data is not needed",
        .path.display()
    )]
    Mismatch {
        path: PathBuf,
        found_store: String,
        found_volume: u64,
        store: String,
        volume: u64,
    },
    #[error(
        "{} is unreadable ({reason}); move it away only if the directory's data is not needed",
        .path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot create local directory {}", .path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("local directory {}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store's identity object {STORE_ID_KEY} is unreadable: {0}")]
    StoreIdCorrupt(String),
    #[error("cannot read or create the store's identity object")]
    Store(#[source] StoreError),
}

/// A fresh random id: 32 hex digits.
pub fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.chars().all(|c| c.is_ascii_graphic())
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreIdObject {
    store_id: String,
}

fn parse_store_id(data: &[u8]) -> Result<String, LocalDirError> {
    if data.len() > MAX_IDENTITY_BYTES {
        return Err(LocalDirError::StoreIdCorrupt(format!(
            "{} bytes, more than {MAX_IDENTITY_BYTES}",
            data.len()
        )));
    }
    let obj: StoreIdObject =
        serde_json::from_slice(data).map_err(|e| LocalDirError::StoreIdCorrupt(e.to_string()))?;
    if !valid_id(&obj.store_id) {
        return Err(LocalDirError::StoreIdCorrupt(format!(
            "id must be 1 to {MAX_ID_LEN} printable characters"
        )));
    }
    Ok(obj.store_id)
}

/// The store's identity (invariant 1): read it, or create it as
/// `candidate` if the store has none yet.
pub async fn store_id(store: &DynStore, candidate: String) -> Result<String, LocalDirError> {
    for _ in 0..3 {
        match store.get(STORE_ID_KEY).await {
            Ok(obj) => return parse_store_id(&obj.data),
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(LocalDirError::Store(e)),
        }
        let body = serde_json::to_vec(&StoreIdObject {
            store_id: candidate.clone(),
        })
        .unwrap_or_default();
        match store
            .put(STORE_ID_KEY, Bytes::from(body), PutMode::Create)
            .await
        {
            Ok(_) => {
                log::info!("store identity created: {candidate}");
                return Ok(candidate);
            }
            // Someone else created it first: read theirs.
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(LocalDirError::Store(e)),
        }
    }
    Err(LocalDirError::StoreIdCorrupt(
        "it is created and deleted again under us".into(),
    ))
}

/// What [`IDENTITY_FILE`] holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalIdentity {
    pub store_id: String,
    pub volume_id: u64,
    /// Random id of this directory.
    pub dir_id: String,
}

/// An open claim on a volume's local directory: its identity matched, and
/// this process holds its lock (invariant 4) until the claim is dropped.
#[derive(Debug)]
pub struct LocalDirClaim {
    path: PathBuf,
    identity: LocalIdentity,
    _lock: Flock<File>,
}

impl LocalDirClaim {
    /// Lock the directory `path` of volume `volume_id` of store `store_id`
    /// (creating it if needed) and check or record its identity. A new
    /// directory gets the id `fresh_dir_id()`.
    pub fn claim(
        path: &Path,
        store_id: &str,
        volume_id: u64,
        fresh_dir_id: impl FnOnce() -> String,
    ) -> Result<LocalDirClaim, LocalDirError> {
        let io = |source| LocalDirError::Io {
            path: path.to_path_buf(),
            source,
        };
        crate::private::create_dir_all(path).map_err(|source| LocalDirError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        let lock_path = path.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = (&mut file).take(64).read_to_string(&mut text);
                return Err(LocalDirError::Busy {
                    path: path.to_path_buf(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        // Say who holds it, for the Busy message of the next opener.
        lock.set_len(0).map_err(io)?;
        writeln!(&mut *lock, "{}", std::process::id()).map_err(io)?;

        let identity = match read_identity(path)? {
            Some(found) => {
                if found.store_id != store_id || found.volume_id != volume_id {
                    return Err(LocalDirError::Mismatch {
                        path: path.to_path_buf(),
                        found_store: found.store_id,
                        found_volume: found.volume_id,
                        store: store_id.to_string(),
                        volume: volume_id,
                    });
                }
                found
            }
            None => {
                let identity = LocalIdentity {
                    store_id: store_id.to_string(),
                    volume_id,
                    dir_id: fresh_dir_id(),
                };
                if path.join("wal").exists() {
                    log::info!(
                        "local directory {} has no identity yet (made by an older version); \
                         recording it as volume {volume_id:016x} of store {store_id}",
                        path.display()
                    );
                }
                write_identity(path, &identity)?;
                identity
            }
        };
        Ok(LocalDirClaim {
            path: path.to_path_buf(),
            identity,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's own id (recorded in leases).
    pub fn dir_id(&self) -> &str {
        &self.identity.dir_id
    }

    pub fn identity(&self) -> &LocalIdentity {
        &self.identity
    }
}

/// [`store_id`] then [`LocalDirClaim::claim`], with random new ids.
pub async fn claim_volume_dir(
    store: &DynStore,
    path: &Path,
    volume_id: u64,
) -> Result<LocalDirClaim, LocalDirError> {
    let store_id = store_id(store, random_id()).await?;
    LocalDirClaim::claim(path, &store_id, volume_id, random_id)
}

/// The recorded identity of the directory `dir`, if it has one.
pub fn read_identity(dir: &Path) -> Result<Option<LocalIdentity>, LocalDirError> {
    let path = dir.join(IDENTITY_FILE);
    let corrupt = |reason: String| LocalDirError::Corrupt {
        path: path.clone(),
        reason,
    };
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LocalDirError::Io {
                path: path.clone(),
                source,
            })
        }
    };
    let mut data = Vec::new();
    (&mut file)
        .take(MAX_IDENTITY_BYTES as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|source| LocalDirError::Io {
            path: path.clone(),
            source,
        })?;
    if data.len() > MAX_IDENTITY_BYTES {
        return Err(corrupt(format!("more than {MAX_IDENTITY_BYTES} bytes")));
    }
    let identity: LocalIdentity =
        serde_json::from_slice(&data).map_err(|e| corrupt(e.to_string()))?;
    if !valid_id(&identity.store_id) || !valid_id(&identity.dir_id) {
        return Err(corrupt(format!(
            "ids must be 1 to {MAX_ID_LEN} printable characters"
        )));
    }
    Ok(Some(identity))
}

/// Write [`IDENTITY_FILE`] atomically and durably: a synced temporary file
/// renamed into place, then the directory synced.
fn write_identity(dir: &Path, identity: &LocalIdentity) -> Result<(), LocalDirError> {
    let path = dir.join(IDENTITY_FILE);
    let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
    let io = |source| LocalDirError::Io {
        path: path.clone(),
        source,
    };
    let body = serde_json::to_vec_pretty(identity).unwrap_or_default();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(&body).map_err(io)?;
    file.write_all(b"\n").map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn store_id_is_created_once_and_then_read() {
        let store: DynStore = Arc::new(MemoryStore::new());
        let first = store_id(&store, "aaaa".into()).await.expect("create");
        assert_eq!(first, "aaaa");
        let again = store_id(&store, "bbbb".into()).await.expect("read");
        assert_eq!(again, "aaaa", "an existing identity is never replaced");
        store
            .put(
                STORE_ID_KEY,
                Bytes::from_static(b"{\"x\":1}"),
                PutMode::Overwrite,
            )
            .await
            .expect("corrupt it");
        let err = store_id(&store, "cccc".into()).await.expect_err("corrupt");
        assert!(matches!(err, LocalDirError::StoreIdCorrupt(_)), "{err}");
    }

    #[test]
    fn a_directory_is_claimed_once_and_keeps_its_identity() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("volumes/0000000000000007");
        let claim = LocalDirClaim::claim(&dir, "store-a", 7, || "dir-1".into()).expect("claim");
        assert_eq!(claim.dir_id(), "dir-1");
        let busy =
            LocalDirClaim::claim(&dir, "store-a", 7, || "dir-2".into()).expect_err("second opener");
        match &busy {
            LocalDirError::Busy { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("expected Busy, got {other:?}"),
        }
        assert!(
            busy.to_string().contains(&dir.display().to_string()),
            "{busy}"
        );
        drop(claim);
        let again = LocalDirClaim::claim(&dir, "store-a", 7, || "dir-3".into()).expect("reclaim");
        assert_eq!(again.dir_id(), "dir-1", "the identity is written once");
        drop(again);

        let err =
            LocalDirClaim::claim(&dir, "store-b", 7, || "dir-4".into()).expect_err("another store");
        let msg = err.to_string();
        assert!(matches!(err, LocalDirError::Mismatch { .. }), "{msg}");
        for needle in ["store-a", "store-b", &dir.display().to_string()] {
            assert!(msg.contains(needle), "{msg} should name {needle}");
        }
        let err = LocalDirClaim::claim(&dir, "store-a", 8, || "dir-5".into())
            .expect_err("another volume");
        assert!(matches!(
            err,
            LocalDirError::Mismatch {
                found_volume: 7,
                volume: 8,
                ..
            }
        ));
    }

    #[test]
    fn a_corrupt_identity_file_is_refused_not_replaced() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("v");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(IDENTITY_FILE), b"{not json").expect("write");
        let err = LocalDirClaim::claim(&dir, "s", 1, || "d".into()).expect_err("corrupt");
        assert!(matches!(err, LocalDirError::Corrupt { .. }), "{err}");
        assert_eq!(
            std::fs::read(dir.join(IDENTITY_FILE)).expect("kept"),
            b"{not json"
        );
    }
}
