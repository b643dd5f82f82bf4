//! Engine settings shared by tests that keep writes in the local WAL.

use shale::engine::config::{Durability, EngineConfig};

/// Destage only on close (or when a snapshot needs it): writes stay in the
/// WAL until then. Chunks of `chunk_size` bytes.
pub fn destage_on_close(chunk_size: u64) -> EngineConfig {
    EngineConfig {
        chunk_size,
        destage_interval_ms: 3_600_000,
        max_unstored_bytes: 64 << 20,
        max_unstored_seconds: 3600,
        durability: Durability::Local,
        checkpoint_every_chunks: 100,
        checkpoint_max_deltas: 64,
        cache_size: 1 << 20,
        cache_dir: None,
        store_read_timeout_ms: 60_000,
        compact_below_percent: 25,
        readahead_max: 32 << 20,
        prefetch_max_in_flight: 64 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    }
}
