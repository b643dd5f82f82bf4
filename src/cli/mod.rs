//! Subcommand implementations (binary-only; `anyhow` is allowed here).
pub mod config;
pub mod image;
pub mod nbd;
pub mod pool;
pub mod progress;
pub mod snapshot;
pub mod transfer;
pub mod ublk;
pub mod volume;
