//! shale: block volumes on object storage.
//!
//! Layers (arrows only point down): `frontend` → `engine` → `catalog` → `store`.
//! `daemon` and `pool` (capacity across volumes) wire `catalog` and `engine` together.
pub mod catalog;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod frontend;
pub mod host;
pub mod metrics;
mod nowait;
mod pieces;
pub mod pool;
pub mod private;
pub mod size;
pub mod store;
#[cfg(test)]
mod test_page_cache;
#[cfg(test)]
mod test_rng;
pub mod transfer;
