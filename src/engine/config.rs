//! Engine tuning, as plain serde data. Every field documents its default and
//! bounds; [`EngineConfig::validate`] enforces them.

use serde::{Deserialize, Serialize};

/// When FLUSH/FUA complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// FLUSH waits for the local WAL (fdatasync). Default.
    #[default]
    Local,
    /// FLUSH waits until the data is in the object store.
    Store,
}

/// Engine settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Target chunk object size in bytes. Default 4 MiB; 64 KiB..=256 MiB.
    #[serde(with = "crate::size::serde_bytes")]
    pub chunk_size: u64,
    /// Destage whatever the WAL holds after this many milliseconds even if
    /// less than a chunk has gathered. Default 2000; 10..=3_600_000.
    pub destage_interval_ms: u64,
    /// Bound on bytes acknowledged but not yet in the store; writes slow down
    /// (never fail) at the bound. Default 256 MiB; >= 2 * chunk_size.
    #[serde(with = "crate::size::serde_bytes")]
    pub max_unstored_bytes: u64,
    /// Bound on the age of the oldest acknowledged write not yet in the
    /// store, in seconds; writes slow down at the bound. Default 30; 1..=86400.
    pub max_unstored_seconds: u64,
    /// When FLUSH completes. Default `local`.
    pub durability: Durability,
    /// Write a checkpoint of the map after this many chunks. Default 64; 1..=100_000.
    pub checkpoint_every_chunks: u64,
    /// Most delta checkpoints after a full one before the next full one
    /// (a new full one is also written once the deltas add up to more
    /// than it). 0 writes every checkpoint in full. Default 64; 0..=1000.
    pub checkpoint_max_deltas: u64,
    /// Local read cache size in bytes, per volume; 0 disables it. Kept
    /// across restarts. Default 1 GiB.
    #[serde(with = "crate::size::serde_bytes")]
    pub cache_size: u64,
    /// Directory for the read caches (each volume's in a subdirectory
    /// named by its id as 16 hex digits), e.g. a faster or larger disk.
    /// Default `null`: `<data_dir>/volumes/<id>/cache`. Must not be empty.
    pub cache_dir: Option<std::path::PathBuf>,
    /// How long a read of data held only in the store keeps retrying
    /// transient store errors before it fails with EIO, in milliseconds.
    /// Default 60000; 100..=3_600_000.
    pub store_read_timeout_ms: u64,
    /// At each checkpoint, rewrite the live data of chunks whose live share
    /// fell below this percentage into a new object, so the sparse chunks
    /// can be deleted. 0 disables compaction. Default 25; 0..=90.
    pub compact_below_percent: u64,
    /// Largest readahead window of a sequential read stream, in bytes:
    /// data of the store ahead of the stream is fetched into the read
    /// cache. 0 disables readahead (so does `cache_size: 0`). Default
    /// 32 MiB; at most 1 GiB.
    #[serde(with = "crate::size::serde_bytes")]
    pub readahead_max: u64,
    /// Bound on the bytes of readahead GETs in flight per volume (a GET
    /// that would exceed it is not sent). Default 64 MiB; at least 64 KiB,
    /// at most 4 GiB.
    #[serde(with = "crate::size::serde_bytes")]
    pub prefetch_max_in_flight: u64,
    /// Bytes of the newest WAL records kept in memory after they are
    /// written: destage builds chunks and reads of fresh data are served
    /// from memory, with no system call (and with `wal_direct_io`, which
    /// keeps them out of the page cache, without reading the disk back).
    /// Records leave once they are in the store. 0 keeps none. Default
    /// 32 MiB; at most 4 GiB.
    #[serde(with = "crate::size::serde_bytes")]
    pub wal_memory: u64,
    /// Write the WAL with O_DIRECT from aligned buffers instead of through
    /// the page cache with write-behind (see [`super::wal::fs`]). Default
    /// `false`: on the disks measured the page cache way was faster.
    pub wal_direct_io: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            chunk_size: 4 << 20,
            destage_interval_ms: 2000,
            max_unstored_bytes: 256 << 20,
            max_unstored_seconds: 30,
            durability: Durability::Local,
            checkpoint_every_chunks: 64,
            checkpoint_max_deltas: 64,
            cache_size: 1 << 30,
            cache_dir: None,
            store_read_timeout_ms: 60_000,
            compact_below_percent: 25,
            readahead_max: 32 << 20,
            prefetch_max_in_flight: 64 << 20,
            wal_memory: 32 << 20,
            wal_direct_io: false,
        }
    }
}

/// A configuration value outside its documented bounds.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("engine.{field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl EngineConfig {
    /// Check every bound documented on the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: String| Err(ConfigError { field, reason });
        if !(64 << 10..=256 << 20).contains(&self.chunk_size)
            || !self.chunk_size.is_multiple_of(512)
        {
            return err(
                "chunk_size",
                format!(
                    "{} must be a multiple of 512 in 64 KiB..=256 MiB",
                    self.chunk_size
                ),
            );
        }
        if !(10..=3_600_000).contains(&self.destage_interval_ms) {
            return err(
                "destage_interval_ms",
                format!("{} must be in 10..=3600000", self.destage_interval_ms),
            );
        }
        if self.max_unstored_bytes < 2 * self.chunk_size {
            return err(
                "max_unstored_bytes",
                format!(
                    "{} must be at least 2 * chunk_size",
                    self.max_unstored_bytes
                ),
            );
        }
        if !(1..=86_400).contains(&self.max_unstored_seconds) {
            return err(
                "max_unstored_seconds",
                format!("{} must be in 1..=86400", self.max_unstored_seconds),
            );
        }
        if !(1..=100_000).contains(&self.checkpoint_every_chunks) {
            return err(
                "checkpoint_every_chunks",
                format!("{} must be in 1..=100000", self.checkpoint_every_chunks),
            );
        }
        if self.checkpoint_max_deltas > 1000 {
            return err(
                "checkpoint_max_deltas",
                format!("{} must be in 0..=1000", self.checkpoint_max_deltas),
            );
        }
        if !(100..=3_600_000).contains(&self.store_read_timeout_ms) {
            return err(
                "store_read_timeout_ms",
                format!("{} must be in 100..=3600000", self.store_read_timeout_ms),
            );
        }
        if self
            .cache_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return err(
                "cache_dir",
                "must not be empty (null for the default)".into(),
            );
        }
        if self.compact_below_percent > 90 {
            return err(
                "compact_below_percent",
                format!("{} must be in 0..=90", self.compact_below_percent),
            );
        }
        if self.readahead_max > 1 << 30 {
            return err(
                "readahead_max",
                format!("{} must be at most 1 GiB", self.readahead_max),
            );
        }
        if !(64 << 10..=4 << 30).contains(&self.prefetch_max_in_flight) {
            return err(
                "prefetch_max_in_flight",
                format!("{} must be in 64 KiB..=4 GiB", self.prefetch_max_in_flight),
            );
        }
        if self.wal_memory > 4 << 30 {
            return err(
                "wal_memory",
                format!("{} must be at most 4 GiB", self.wal_memory),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bounds_enforced() {
        assert!(EngineConfig::default().validate().is_ok());
        let c = EngineConfig {
            chunk_size: 1000,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "chunk_size");
        let c = EngineConfig {
            max_unstored_bytes: 1 << 20,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "max_unstored_bytes");
        let c = EngineConfig {
            store_read_timeout_ms: 99,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "store_read_timeout_ms");
    }
}
