//! ublk frontend: serves a [`crate::engine::BlockDevice`] as `/dev/ublkbN`
//! through the kernel's ublk driver (libublk), one thread and io_uring per
//! queue, one async task per tag.
//!
//! - [`request`]: descriptor decoding and execution (no kernel needed).
//! - [`params`]: the device parameters announced to the kernel.
//! - [`executor`]: the per-queue executor and its eventfd wake bridge.
//! - [`queue`]: the queue thread loop.
//! - [`server`]: create / recover / serve / remove a device.
//! - [`mountns`]: the server's private mount namespace.
//! - [`runstate`]: run-state records and `/dev/shale/<volume>` links.

pub mod executor;
pub mod mountns;
pub mod params;
pub mod queue;
pub mod request;
pub mod runstate;
pub mod server;

pub use server::{Attach, ServerOptions, Stopper, UblkFrontendError, UblkServer};
