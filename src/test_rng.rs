//! A seeded xorshift64 generator for unit tests: the same seed gives the
//! same sequence, so a failing random test reproduces.

/// Advance `x` (never 0) one xorshift64 step and return the new value.
pub(crate) fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}
