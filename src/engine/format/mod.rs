//! The bottom layer of the engine: what stored objects look like and the
//! bounds their numbers must keep, with no I/O and no import from any
//! other engine module (see `tests/engine_layers.rs`), except the
//! snapshot codec, which holds a checkpoint.
//!
//! - [`limits`]: the chunk id space ([`limits::COMPACTED_BIT`],
//!   [`limits::MAX_SEQ`]) and the size caps of objects read back;
//! - [`layout`]: every object key, spelled and parsed in one place;
//! - [`chunk`]: the chunk object codec;
//! - [`manifest`]: the manifest object (a volume's root) codec;
//! - `sealed`: the framing of small binary metadata objects;
//! - [`snapshot`]: the snapshot object codec (above the rest of `format`:
//!   it holds a checkpoint).

pub mod chunk;
pub mod layout;
pub mod limits;
pub mod manifest;
pub(crate) mod sealed;
pub mod snapshot;
