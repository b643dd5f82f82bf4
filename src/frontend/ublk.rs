//! ublk frontend.
