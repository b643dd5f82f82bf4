//! Protocol adapters over [`crate::engine::BlockDevice`].
pub mod nbd;
pub mod ublk;
