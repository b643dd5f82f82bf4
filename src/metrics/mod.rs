//! Metrics of attached volumes.
//!
//! Each server measures its volumes in process ([`requests`] for block
//! requests, [`crate::store::metered`] for store requests, the engine's
//! counters, the lease) and answers a `metrics` request on each volume's
//! control socket with a [`report::VolumeReport`]. One exporter per host
//! ([`exporter`]) collects the reports of every attached volume and serves
//! them in the Prometheus text format ([`exposition`]); `shale status` and
//! `shale top` read the same reports.
pub mod cost;
pub mod exporter;
pub mod exposition;
pub mod histogram;
pub mod report;
pub mod requests;
pub mod status;
pub mod volume;
