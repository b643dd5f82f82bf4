//! Subcommand implementations (binary-only; `anyhow` is allowed here).
pub mod config;
pub mod image;
pub mod nbd;
pub mod pool;
pub mod snapshot;
pub mod ublk;
pub mod volume;
