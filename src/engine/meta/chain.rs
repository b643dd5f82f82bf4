//! Reading a volume's checkpoint chain from the store (see
//! [`crate::engine::checkpoint::delta`]).
//!
//! [`walk`] follows the links from the newest object the manifest names
//! back to the base, checking at each step that the delta names the base
//! the manifest (or the newer delta) expects, the predecessor key it was
//! reached from, and the position one below; [`load`] then reads the base
//! and applies the deltas oldest first. A missing or damaged object is an
//! error naming its key, never skipped: a chain with a hole cannot be
//! rebuilt.

use crate::engine::capped::get_capped;
use crate::engine::checkpoint::codec::MAGIC;
use crate::engine::checkpoint::delta::{Chain, CheckpointObject, Delta};
use crate::engine::checkpoint::{Checkpoint, CheckpointError};
use crate::engine::error::EngineError;
use crate::engine::format::layout::manifest_key;
use crate::engine::format::manifest::Manifest;
use crate::store::{DynStore, StoreError};

/// The deltas of a chain, oldest first, with the base's key.
#[derive(Debug)]
pub struct Walk {
    pub base_key: String,
    /// The base itself if the manifest names it directly (no deltas).
    pub base: Option<(Checkpoint, u64)>,
    /// `(key, delta, encoded bytes)`, oldest first.
    pub deltas: Vec<(String, Delta, u64)>,
}

/// A chain rebuilt: the map and table, and what the writer needs to
/// continue it.
#[derive(Debug)]
pub struct Loaded {
    pub chain: Chain,
    pub base_key: String,
    pub base_bytes: u64,
    /// Keys of the deltas after the base, oldest first.
    pub delta_keys: Vec<String>,
    pub delta_bytes: u64,
    /// The base is in the older JSON format (`SHALECP1`): it is not
    /// extended, the next checkpoint is a full binary one.
    pub base_json: bool,
}

fn cp_err(key: &str, source: CheckpointError) -> EngineError {
    EngineError::Checkpoint {
        key: key.to_string(),
        source,
    }
}

/// Read and decode one object; its size is returned with the top bit set
/// if it is in the older JSON format ([`JSON_FLAG`]).
async fn read(
    store: &DynStore,
    key: &str,
    cap: u64,
    named_by: &str,
) -> Result<(CheckpointObject, u64), EngineError> {
    let o = match get_capped(store, key, cap, "checkpoint").await {
        Ok(o) => o,
        Err(EngineError::Store(StoreError::NotFound { .. })) => {
            return Err(cp_err(
                key,
                CheckpointError::Missing(format!("named by {named_by}")),
            ))
        }
        Err(e) => return Err(e),
    };
    let obj = CheckpointObject::decode(&o.data).map_err(|e| cp_err(key, e))?;
    let json = !o.data.starts_with(MAGIC);
    Ok((obj, o.data.len() as u64 | if json { JSON_FLAG } else { 0 }))
}

/// Marks the size of a base in the older JSON format (see [`read`]).
const JSON_FLAG: u64 = 1 << 63;

/// Follow the chain manifest `m` names (it must name a checkpoint) back to
/// its base; the base is read only if the manifest names it directly.
pub async fn walk(store: &DynStore, m: &Manifest, cap: u64) -> Result<Walk, EngineError> {
    let Some(newest) = m.checkpoint.clone() else {
        return Err(EngineError::Manifest {
            key: manifest_key(m.volume),
            reason: "names no checkpoint".into(),
        });
    };
    let manifest = manifest_key(m.volume);
    let (obj, bytes) = read(store, &newest, cap, &manifest).await?;
    let d = match obj {
        CheckpointObject::Full(cp) => {
            if let Some(b) = &m.checkpoint_base {
                return Err(cp_err(
                    &newest,
                    CheckpointError::Inconsistent(format!(
                        "is a full checkpoint, but the manifest names it as a delta of {b}"
                    )),
                ));
            }
            return Ok(Walk {
                base_key: newest,
                base: Some((cp, bytes)),
                deltas: Vec::new(),
            });
        }
        CheckpointObject::Delta(d) => d,
    };
    let base_key = d.pages.base.clone();
    if m.checkpoint_base.as_deref() != Some(base_key.as_str()) {
        return Err(cp_err(
            &newest,
            CheckpointError::Inconsistent(format!(
                "is a delta of {base_key}, but the manifest names base {:?}",
                m.checkpoint_base
            )),
        ));
    }
    let mut deltas = vec![(newest.clone(), d, bytes)];
    loop {
        let (key, d, _) = deltas.last().expect("one delta at least");
        let (pos, prev) = (d.pages.position, d.pages.prev.clone());
        let key = key.clone();
        if pos == 1 {
            if prev != base_key {
                return Err(cp_err(
                    &key,
                    CheckpointError::Inconsistent(format!(
                        "is the first delta but follows {prev}, not the base {base_key}"
                    )),
                ));
            }
            break;
        }
        if prev == base_key || prev == key {
            return Err(cp_err(
                &key,
                CheckpointError::Inconsistent(format!(
                    "is delta {pos} but names {prev} as its predecessor"
                )),
            ));
        }
        let (obj, bytes) = read(store, &prev, cap, &key).await?;
        let CheckpointObject::Delta(pd) = obj else {
            return Err(cp_err(
                &prev,
                CheckpointError::Inconsistent(format!(
                    "is a full checkpoint, but {key} names it as delta {}",
                    pos - 1
                )),
            ));
        };
        if pd.pages.position != pos - 1 || pd.pages.base != base_key {
            return Err(cp_err(
                &prev,
                CheckpointError::Inconsistent(format!(
                    "is delta {} of {}, but {key} expects delta {} of {base_key}",
                    pd.pages.position,
                    pd.pages.base,
                    pos - 1
                )),
            ));
        }
        deltas.push((prev, pd, bytes));
    }
    deltas.reverse();
    Ok(Walk {
        base_key,
        base: None,
        deltas,
    })
}

/// Every key of the chain manifest `m` names (the base first), for
/// deleting a superseded chain; empty if it names no checkpoint.
pub async fn keys(store: &DynStore, m: &Manifest, cap: u64) -> Result<Vec<String>, EngineError> {
    if m.checkpoint.is_none() {
        return Ok(Vec::new());
    }
    let w = walk(store, m, cap).await?;
    let mut out = vec![w.base_key];
    out.extend(w.deltas.into_iter().map(|(k, _, _)| k));
    Ok(out)
}

/// Rebuild the chain manifest `m` names (it must name one) for a volume of
/// `volume_sectors`, checking it ends at the manifest's checkpoint chunk.
pub async fn load(
    store: &DynStore,
    m: &Manifest,
    volume_sectors: u64,
    cap: u64,
) -> Result<Loaded, EngineError> {
    let w = walk(store, m, cap).await?;
    let (base, base_bytes) = match w.base {
        Some(b) => b,
        None => {
            let named_by = w.deltas.first().map_or("", |(k, _, _)| k.as_str());
            match read(store, &w.base_key, cap, named_by).await? {
                (CheckpointObject::Full(cp), bytes) => (cp, bytes),
                (CheckpointObject::Delta(_), _) => {
                    return Err(cp_err(
                        &w.base_key,
                        CheckpointError::Inconsistent(
                            "is named as a base but is itself a delta".into(),
                        ),
                    ))
                }
            }
        }
    };
    let base_json = base_bytes & JSON_FLAG != 0;
    let base_bytes = base_bytes & !JSON_FLAG;
    let mut chain = Chain::from_base(base, volume_sectors).map_err(|e| cp_err(&w.base_key, e))?;
    let mut delta_keys = Vec::with_capacity(w.deltas.len());
    let mut delta_bytes = 0;
    for (key, d, bytes) in &w.deltas {
        chain.apply(d).map_err(|e| cp_err(key, e))?;
        delta_keys.push(key.clone());
        delta_bytes += bytes;
    }
    let newest = m.checkpoint.clone().unwrap_or_default();
    let chain = chain.finish().map_err(|e| cp_err(&newest, e))?;
    if chain.volume != m.volume || chain.chunk_seq != m.checkpoint_chunk {
        return Err(EngineError::Manifest {
            key: manifest_key(m.volume),
            reason: format!(
                "checkpoint {newest} (volume {:x}, chunk {}) does not match",
                chain.volume, chain.chunk_seq
            ),
        });
    }
    Ok(Loaded {
        chain,
        base_key: w.base_key,
        base_bytes,
        delta_keys,
        delta_bytes: delta_bytes & !JSON_FLAG,
        base_json,
    })
}

/// Where a writer's committed chain stands: what it needs to decide
/// between a delta and a new base, and what to delete after a new base.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChainPos {
    /// Key of the base (`None`: no checkpoint yet).
    pub base: Option<String>,
    pub base_bytes: u64,
    /// Keys of the deltas after the base, oldest first.
    pub deltas: Vec<String>,
    /// Their encoded bytes, summed.
    pub delta_bytes: u64,
    /// `chunk_seq` of the newest object.
    pub chunk_seq: u64,
    /// The base may be extended by deltas (false for a base in the older
    /// JSON format: the next checkpoint rewrites it in the binary one).
    pub extendable: bool,
}

impl ChainPos {
    /// Every key of the chain, base first.
    pub fn keys(&self) -> Vec<String> {
        self.base.iter().chain(&self.deltas).cloned().collect()
    }
}
