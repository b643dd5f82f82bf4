//! NBD server frontend.
