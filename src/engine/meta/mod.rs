//! A volume's metadata in the store: the manifest (its root), the
//! checkpoint chain the manifest names, and the task that writes them.
//!
//! - [`manifest`]: the one manifest store: read, create and
//!   compare-and-swap, each write checked first ([`invariants`]);
//! - [`prepare`]: every manifest the engine writes, built from the one it
//!   replaces;
//! - [`chain`]: reading the checkpoint chain a manifest names;
//! - [`orphans`]: deleting checkpoint objects no manifest names;
//! - `task`: the meta task, which does every manifest write of an open
//!   volume (it sits above the rest of `meta`: it drives commits and
//!   snapshots; see `tests/engine_layers.rs`).

pub mod chain;
pub mod invariants;
pub mod manifest;
pub mod orphans;
pub mod prepare;
pub(crate) mod task;
