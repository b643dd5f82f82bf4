//! The pool: every volume in one store, measured against `pool.capacity`.
//!
//! Definitions (bytes):
//! - a volume's *used*: its live data plus data only its snapshots hold
//!   ([`crate::engine::space`]), as last published in its usage object
//!   ([`crate::engine::usage`]), or computed from the store when it has none;
//! - its *charge* against the capacity: `used` for a thin volume,
//!   `max(used, size)` for a thick one (a thick volume reserves its size);
//! - pool *used* = Σ used; *reserved* = Σ sizes of thick volumes;
//!   *allocated* = Σ charges (what counts against the capacity);
//!   *available* = capacity − allocated; *provisioned* = Σ sizes, and the
//!   *over-provisioning ratio* = provisioned / capacity.
//! - A volume's *limit* = capacity − the other volumes' charges: the most
//!   it may use. A thin volume's write growing `used` beyond it fails with
//!   ENOSPC; a thick volume may always use up to its size.
//!
//! Invariants:
//! 1. A volume whose usage cannot be read or computed is charged its whole
//!    size (never less than it might use), and the error is reported.
//! 2. Thin volumes may be provisioned beyond the capacity; a thick volume
//!    is created only if its size fits in what is available.

use serde::Serialize;

use crate::catalog::{Catalog, CatalogError, VolumeRecord};
use crate::config::PoolConfig;
use crate::engine::usage::{compute_detached, read, UsageError};
use crate::size::format_size;
use crate::store::DynStore;

pub mod watch;

/// One volume's part of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeSpace {
    pub name: String,
    pub id: u64,
    pub size: u64,
    pub thick: bool,
    /// Bytes used (0 when `error` is set).
    pub used: u64,
    /// What counts against the capacity (see the module docs).
    pub allocated: u64,
    /// When the usage was published (ms since the Unix epoch); `None`
    /// when it was computed from the store just now.
    pub updated_ms: Option<u64>,
    /// Why the usage is unknown (the volume is then charged its size).
    pub error: Option<String>,
}

/// The pool's space (see the module docs for each figure).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolStatus {
    /// `None`: unlimited.
    pub capacity: Option<u64>,
    pub warn_percent: u8,
    pub used: u64,
    pub reserved: u64,
    pub allocated: u64,
    pub provisioned: u64,
    pub volumes: Vec<VolumeSpace>,
}

/// Pool failures.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(
        "the pool cannot reserve {} for a thick volume: capacity {}, allocated {}, available {}",
        format_size(*size), format_size(*capacity), format_size(*allocated),
        format_size(capacity.saturating_sub(*allocated))
    )]
    NoRoom {
        size: u64,
        capacity: u64,
        allocated: u64,
    },
}

impl PoolStatus {
    /// Capacity minus allocated (`None`: unlimited).
    pub fn available(&self) -> Option<u64> {
        self.capacity.map(|c| c.saturating_sub(self.allocated))
    }

    /// Allocated as a percentage of the capacity.
    pub fn percent(&self) -> Option<f64> {
        self.capacity
            .map(|c| self.allocated as f64 * 100.0 / c.max(1) as f64)
    }

    /// Provisioned / capacity.
    pub fn overprovisioning(&self) -> Option<f64> {
        self.capacity
            .map(|c| self.provisioned as f64 / c.max(1) as f64)
    }

    /// True when allocated has reached `warn_percent` of the capacity.
    pub fn warning(&self) -> bool {
        self.capacity.is_some_and(|c| {
            u128::from(self.allocated) * 100 >= u128::from(c) * u128::from(self.warn_percent)
        })
    }

    /// One line describing a reached warning threshold, if reached.
    pub fn warning_message(&self) -> Option<String> {
        let c = self.capacity.filter(|_| self.warning())?;
        Some(format!(
            "pool is {:.1}% allocated ({} of {}), at or above the warning threshold of {}%",
            self.percent().unwrap_or(0.0),
            format_size(self.allocated),
            format_size(c),
            self.warn_percent
        ))
    }

    /// The most volume `id` may use: the capacity minus every other
    /// volume's charge (`None`: unlimited).
    pub fn limit_for(&self, id: u64) -> Option<u64> {
        let others: u64 = self
            .volumes
            .iter()
            .filter(|v| v.id != id)
            .map(|v| v.allocated)
            .sum();
        self.capacity.map(|c| c.saturating_sub(others))
    }

    /// Refuse a thick volume of `size` that does not fit (invariant 2).
    pub fn check_thick(&self, size: u64) -> Result<(), PoolError> {
        match self.capacity {
            Some(capacity) if self.allocated.saturating_add(size) > capacity => {
                Err(PoolError::NoRoom {
                    size,
                    capacity,
                    allocated: self.allocated,
                })
            }
            _ => Ok(()),
        }
    }
}

/// The space of one volume: its published usage, else computed from the
/// store; on any error, charged its size (invariant 1).
pub async fn volume_space(store: &DynStore, rec: &VolumeRecord) -> VolumeSpace {
    let found: Result<(u64, Option<u64>), UsageError> = async {
        if let Some(u) = read(store, rec.id).await? {
            return Ok((u.used, Some(u.updated_ms)));
        }
        let d = compute_detached(store, rec.id, rec.size).await?;
        Ok((d.usage.used, None))
    }
    .await;
    let (used, updated_ms, error) = match found {
        Ok((used, at)) => (used, at, None),
        Err(e) => (0, None, Some(e.to_string())),
    };
    let charged = match (&error, rec.thick) {
        (Some(_), _) => rec.size.max(used),
        (None, true) => rec.size.max(used),
        (None, false) => used,
    };
    VolumeSpace {
        name: rec.name.clone(),
        id: rec.id,
        size: rec.size,
        thick: rec.thick,
        used,
        allocated: charged,
        updated_ms,
        error,
    }
}

/// Add up every volume of the catalog.
pub async fn status(catalog: &Catalog, cfg: &PoolConfig) -> Result<PoolStatus, PoolError> {
    let mut volumes = Vec::new();
    for rec in catalog.list().await? {
        volumes.push(volume_space(catalog.store(), &rec).await);
    }
    Ok(PoolStatus {
        capacity: cfg.capacity,
        warn_percent: cfg.warn_percent,
        used: volumes.iter().map(|v| v.used).sum(),
        reserved: volumes.iter().filter(|v| v.thick).map(|v| v.size).sum(),
        allocated: volumes.iter().map(|v| v.allocated).sum(),
        provisioned: volumes.iter().map(|v| v.size).sum(),
        volumes,
    })
}

#[cfg(test)]
mod tests;
