//! Catalog: volume records, the snapshot/clone tree, leases and fencing.
//!
//! Volume records are JSON objects in the store:
//! - `catalog/volumes/<name>`: one [`VolumeRecord`] per volume.
//! - `catalog/next-id`: the next volume id to hand out ([`NextId`]).
//! - A volume's own data lives under [`volume_prefix`]`(id)`.
//!
//! Invariants:
//! 1. Names are unique: a record is written with [`PutMode::Create`], so of
//!    two concurrent creates of one name exactly one succeeds.
//! 2. Ids are unique and never reused: they come from a compare-and-swap
//!    counter, so a new volume's prefix never holds another volume's data.
//! 3. Deletion first marks the record [`VolumeState::Deleting`], then removes
//!    the volume's objects, then the record. A crash part-way leaves a record
//!    that cannot be opened and that `delete` finishes; it never leaves a
//!    usable-looking volume with half its data gone.
//! 4. A volume whose lease is live (a server has it open) is not deleted:
//!    delete marks the record first and then reads the lease, while an
//!    opener takes the lease first and then reads the record, so at least
//!    one of them sees the other and backs off.
//! 5. A volume whose snapshots have clones (records whose `parent` names
//!    `<volume>@...`) is not deleted: delete marks the record first and
//!    then lists the records, while a clone writes its record first and
//!    then re-reads its parent's (see `snapshot::clone`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub mod lease;
pub mod local_dir;
pub mod snapshot;

use crate::engine::format::layout::{
    catalog_record_key, parse_catalog_record_key, volume_prefix, CATALOG_VOLUMES_PREFIX,
    NEXT_ID_KEY,
};
use crate::store::{DynStore, PutMode, StoreError, Version};

/// Volume sizes are multiples of this.
pub const SIZE_ALIGN: u64 = 4096;
/// Largest volume size (1 PiB).
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;
/// Longest volume name.
pub const MAX_NAME_LEN: usize = 64;
/// Attempts at the id counter's compare-and-swap before giving up.
const ID_CAS_ATTEMPTS: u32 = 1000;

/// Lifecycle state of a volume record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Usable.
    #[default]
    Ready,
    /// A delete has started; the data may be partly gone. Never opened.
    Deleting,
}

/// One volume, as stored in `catalog/volumes/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Unique, never reused; names the store prefix [`volume_prefix`].
    pub id: u64,
    /// Unique name (see [`validate_name`]).
    pub name: String,
    /// Size in bytes: a positive multiple of [`SIZE_ALIGN`], at most [`MAX_VOLUME_SIZE`].
    pub size: u64,
    /// Thick volumes reserve their whole size in the pool's capacity.
    pub thick: bool,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// A clone's parent snapshot (`<volume>@<snapshot>`), which it reads
    /// through to; `None` for other volumes and after a flatten.
    #[serde(default)]
    pub parent: Option<String>,
    /// Lifecycle state.
    #[serde(default)]
    pub state: VolumeState,
}

/// Contents of `catalog/next-id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextId {
    pub next_id: u64,
}

/// What the objects under a volume's prefix add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub objects: u64,
    pub bytes: u64,
}

/// Catalog failures.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("volume {name:?} not found")]
    NotFound { name: String },
    #[error("volume {name:?} already exists")]
    AlreadyExists { name: String },
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid volume size {size}: {reason}")]
    InvalidSize { size: u64, reason: String },
    #[error("volume {name:?} is being deleted; run the delete again to finish it")]
    Deleting { name: String },
    #[error(
        "volume {name:?} is in use: its lease is held by {holder:?} until {expires_at_ms} ms \
         since the Unix epoch; stop the server using it first"
    )]
    InUse {
        name: String,
        holder: String,
        expires_at_ms: u64,
    },
    #[error("cannot read the lease of volume {name:?}")]
    Lease {
        name: String,
        source: lease::LeaseError,
    },
    #[error(
        "volume {name:?} has snapshots with clones ({}); delete or flatten them first",
        clones.join(", ")
    )]
    HasClones { name: String, clones: Vec<String> },
    #[error("catalog object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("catalog object {key} kept changing under concurrent updates; try again")]
    Contention { key: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Check a volume name: 1..=64 characters of `A-Z a-z 0-9 . _ -`, not
/// starting with `.` or `-`. (`@` is kept for `volume@snapshot`.)
pub fn validate_name(name: &str) -> Result<(), CatalogError> {
    let bad = |reason: &str| {
        Err(CatalogError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    const RULE: &str =
        "names are 1 to 64 characters of A-Z a-z 0-9 '.' '_' '-', not starting with '.' or '-'";
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return bad(RULE);
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad(RULE);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad(RULE);
    }
    Ok(())
}

/// Check a volume size: positive, a multiple of 4096, at most 1 PiB.
pub fn validate_size(size: u64) -> Result<(), CatalogError> {
    let bad = |reason: String| Err(CatalogError::InvalidSize { size, reason });
    if size == 0 {
        return bad("must be greater than zero".into());
    }
    if !size.is_multiple_of(SIZE_ALIGN) {
        return bad(format!("must be a multiple of {SIZE_ALIGN} bytes"));
    }
    if size > MAX_VOLUME_SIZE {
        return bad(format!("must be at most {MAX_VOLUME_SIZE} bytes (1 PiB)"));
    }
    Ok(())
}

/// Volume records in an object store.
#[derive(Debug, Clone)]
pub struct Catalog {
    store: DynStore,
}

impl Catalog {
    pub fn new(store: DynStore) -> Self {
        Catalog { store }
    }

    /// The store this catalog lives in.
    pub fn store(&self) -> &DynStore {
        &self.store
    }

    /// Create a volume record with a fresh id. Nothing is written for an
    /// invalid name or size, and an existing volume is never touched.
    pub async fn create(
        &self,
        name: &str,
        size: u64,
        thick: bool,
        now_ms: u64,
    ) -> Result<VolumeRecord, CatalogError> {
        validate_name(name)?;
        validate_size(size)?;
        let key = catalog_record_key(name);
        // Cheap early check so a duplicate name does not use up an id; the
        // create-only put below is what makes uniqueness hold under races.
        match self.store.head(&key).await {
            Ok(_) => {
                return Err(CatalogError::AlreadyExists {
                    name: name.to_string(),
                })
            }
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let record = VolumeRecord {
            id: self.allocate_id().await?,
            name: name.to_string(),
            size,
            thick,
            created_ms: now_ms,
            parent: None,
            state: VolumeState::Ready,
        };
        match self
            .store
            .put(&key, encode(&key, &record)?, PutMode::Create)
            .await
        {
            Ok(_) => Ok(record),
            Err(StoreError::AlreadyExists { .. }) => Err(CatalogError::AlreadyExists {
                name: name.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Look up a volume by name (in any state).
    pub async fn get(&self, name: &str) -> Result<VolumeRecord, CatalogError> {
        Ok(self.get_versioned(name).await?.0)
    }

    /// Every volume, sorted by name.
    pub async fn list(&self) -> Result<Vec<VolumeRecord>, CatalogError> {
        let mut out = Vec::new();
        for meta in self.store.list(CATALOG_VOLUMES_PREFIX).await? {
            // Listed under the prefix, so the name is there (an empty one
            // fails like any other invalid name).
            let name = parse_catalog_record_key(&meta.key).unwrap_or_default();
            match self.get_versioned(name).await {
                Ok((rec, _)) => out.push(rec),
                // Deleted between the listing and the read.
                Err(CatalogError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Objects and bytes stored under a volume's prefix.
    pub async fn usage(&self, record: &VolumeRecord) -> Result<Usage, CatalogError> {
        let objects = self.store.list(&volume_prefix(record.id)).await?;
        Ok(Usage {
            objects: objects.len() as u64,
            bytes: objects.iter().map(|o| o.size).sum(),
        })
    }

    /// Delete a volume: mark it deleting, make sure no server holds its
    /// lease at `now_ms` (otherwise put the mark back and refuse), remove
    /// every object under its prefix, then remove the record. Safe to repeat
    /// after a crash. Returns the record and what was removed.
    pub async fn delete(
        &self,
        name: &str,
        now_ms: u64,
    ) -> Result<(VolumeRecord, Usage), CatalogError> {
        validate_name(name)?;
        let key = catalog_record_key(name);
        let (mut record, was_ready) = self.mark_deleting(name).await?;
        let clones = self.clones_of_volume(name).await?;
        if !clones.is_empty() {
            if was_ready {
                self.set_state(name, VolumeState::Ready).await?;
            }
            return Err(CatalogError::HasClones {
                name: name.to_string(),
                clones,
            });
        }
        let lease = lease::read_lease(&self.store, record.id)
            .await
            .map_err(|source| CatalogError::Lease {
                name: name.to_string(),
                source,
            })?;
        if let Some((held, _)) = lease.filter(|(l, _)| l.is_live(now_ms)) {
            if was_ready {
                self.set_state(name, VolumeState::Ready).await?;
            }
            return Err(CatalogError::InUse {
                name: name.to_string(),
                holder: held.holder,
                expires_at_ms: held.expires_at_ms,
            });
        }
        let mut removed = Usage::default();
        for meta in self.store.list(&volume_prefix(record.id)).await? {
            self.store.delete(&meta.key).await?;
            removed.objects += 1;
            removed.bytes += meta.size;
        }
        self.store.delete(&key).await?;
        record.state = VolumeState::Deleting;
        Ok((record, removed))
    }

    /// Names of the volumes cloned from a snapshot of volume `name`.
    pub async fn clones_of_volume(&self, name: &str) -> Result<Vec<String>, CatalogError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|r| {
                r.parent
                    .as_deref()
                    .and_then(|p| p.split_once('@'))
                    .is_some_and(|(v, _)| v == name)
            })
            .map(|r| r.name)
            .collect())
    }

    /// Forget a flattened clone's parent (compare-and-swap on the record).
    pub async fn clear_parent(&self, name: &str) -> Result<VolumeRecord, CatalogError> {
        let key = catalog_record_key(name);
        for _ in 0..ID_CAS_ATTEMPTS {
            let (mut record, version) = self.get_versioned(name).await?;
            if record.parent.is_none() {
                return Ok(record);
            }
            record.parent = None;
            match self
                .store
                .put(&key, encode(&key, &record)?, PutMode::IfMatch(version))
                .await
            {
                Ok(_) => return Ok(record),
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CatalogError::Contention { key })
    }

    /// Set the record's state to deleting; returns it and whether it was
    /// ready before.
    async fn mark_deleting(&self, name: &str) -> Result<(VolumeRecord, bool), CatalogError> {
        let before = self.set_state(name, VolumeState::Deleting).await?;
        let mut record = before.clone();
        record.state = VolumeState::Deleting;
        Ok((record, before.state == VolumeState::Ready))
    }

    /// Set the record's state (compare-and-swap); returns the record as it
    /// was before.
    async fn set_state(
        &self,
        name: &str,
        state: VolumeState,
    ) -> Result<VolumeRecord, CatalogError> {
        let key = catalog_record_key(name);
        for _ in 0..ID_CAS_ATTEMPTS {
            let (before, version) = self.get_versioned(name).await?;
            if before.state == state {
                return Ok(before);
            }
            let mut record = before.clone();
            record.state = state;
            match self
                .store
                .put(&key, encode(&key, &record)?, PutMode::IfMatch(version))
                .await
            {
                Ok(_) => return Ok(before),
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CatalogError::Contention { key })
    }

    async fn get_versioned(&self, name: &str) -> Result<(VolumeRecord, Version), CatalogError> {
        validate_name(name)?;
        let key = catalog_record_key(name);
        let obj = match self.store.get(&key).await {
            Ok(obj) => obj,
            Err(StoreError::NotFound { .. }) => {
                return Err(CatalogError::NotFound {
                    name: name.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let record: VolumeRecord = decode(&key, &obj.data)?;
        if record.name != name {
            return Err(CatalogError::Corrupt {
                key,
                reason: format!("record names volume {:?}", record.name),
            });
        }
        Ok((record, obj.version))
    }

    /// Take the next id from the counter (compare-and-swap loop). Ids start at 1.
    async fn allocate_id(&self) -> Result<u64, CatalogError> {
        for _ in 0..ID_CAS_ATTEMPTS {
            let (id, mode) = match self.store.get(NEXT_ID_KEY).await {
                Ok(obj) => {
                    let next: NextId = decode(NEXT_ID_KEY, &obj.data)?;
                    (next.next_id, PutMode::IfMatch(obj.version))
                }
                Err(StoreError::NotFound { .. }) => (1, PutMode::Create),
                Err(e) => return Err(e.into()),
            };
            let Some(following) = id.checked_add(1) else {
                return Err(CatalogError::Corrupt {
                    key: NEXT_ID_KEY.into(),
                    reason: "volume ids exhausted".into(),
                });
            };
            let body = encode(NEXT_ID_KEY, &NextId { next_id: following })?;
            match self.store.put(NEXT_ID_KEY, body, mode).await {
                Ok(_) => return Ok(id),
                Err(StoreError::AlreadyExists { .. } | StoreError::PreconditionFailed { .. }) => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(CatalogError::Contention {
            key: NEXT_ID_KEY.into(),
        })
    }
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Bytes, CatalogError> {
    serde_json::to_vec_pretty(value)
        .map(Bytes::from)
        .map_err(|e| CatalogError::Corrupt {
            key: key.to_string(),
            reason: format!("cannot encode: {e}"),
        })
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, data: &[u8]) -> Result<T, CatalogError> {
    serde_json::from_slice(data).map_err(|e| CatalogError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
