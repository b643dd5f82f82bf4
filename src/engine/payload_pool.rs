//! Write payload buffers, used again once the WAL's memory tail lets go of
//! them.
//!
//! A large write's payload is read into a `Vec` by the frontend, moved into
//! the WAL, then kept in the WAL's tail ([`super::wal::tail`]) until its
//! records are stored. It is allocated on whichever runtime thread read the
//! request and freed on the thread that drops the tail entry; the C
//! allocator gives each thread its own arena, and every arena grew to hold
//! the whole tail at its own peak (measured with 1 MiB writes at QD8: about
//! 90 MiB of arenas for about 40 MiB of payloads). Taken from here
//! instead, the same buffers go round whichever thread takes them.
//!
//! Invariants:
//! 1. [`take`] returns an empty `Vec` (length 0) whose capacity is at
//!    least the length asked for: a caller sees no byte of an earlier
//!    payload unless it wrote it.
//! 2. Only buffers of at least [`MIN_POOLED`] bytes are kept, and the free
//!    buffers together hold at most [`POOL_BYTES`] (the oldest go first),
//!    which bounds the memory kept idle.

use crate::store::free_list::FreeList;

/// Smallest capacity worth keeping: smaller buffers come and go through
/// the allocator's own free lists without growing it.
pub const MIN_POOLED: usize = 64 << 10;
/// Free capacity the pool keeps at most (invariant 2).
pub const POOL_BYTES: usize = 8 << 20;

/// Free buffers, oldest first.
type Pool = FreeList<Vec<u8>>;

static POOL: Pool = new_pool();

const fn new_pool() -> Pool {
    FreeList::new(MIN_POOLED, POOL_BYTES, MIN_POOLED)
}

fn take_from(pool: &Pool, len: usize) -> Vec<u8> {
    if len >= MIN_POOLED {
        if let Some(mut v) = pool.take_fitting(len) {
            v.clear();
            return v;
        }
    }
    Vec::with_capacity(len)
}

/// An empty buffer with room for `len` bytes (invariant 1).
pub fn take(len: usize) -> Vec<u8> {
    take_from(&POOL, len)
}

/// Keep `buf` for a later [`take`] (or free it, invariant 2).
pub fn give(buf: Vec<u8>) {
    POOL.give(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        new_pool()
    }

    #[test]
    fn a_given_buffer_comes_back_empty_for_a_fitting_length_only() {
        let p = pool();
        let mut v = take_from(&p, 1 << 20);
        v.extend_from_slice(&[7u8; 1 << 20]);
        let at = v.as_ptr();
        p.give(v);
        // Too small a request for it: a new buffer.
        let small = take_from(&p, 100 << 10);
        assert_ne!(small.as_ptr(), at);
        let again = take_from(&p, (1 << 20) - 512);
        assert_eq!((again.as_ptr(), again.len()), (at, 0));
        assert!(again.capacity() >= 1 << 20);
        // Taken: not handed out twice.
        let other = take_from(&p, 1 << 20);
        assert_ne!(other.as_ptr(), at);
    }

    #[test]
    fn small_buffers_are_not_kept_and_the_free_bytes_stay_bounded() {
        let p = pool();
        p.give(Vec::with_capacity(MIN_POOLED - 1));
        assert_eq!(p.held(), 0);
        for _ in 0..(POOL_BYTES / (1 << 20)) + 5 {
            p.give(Vec::with_capacity(1 << 20));
        }
        let held = p.held();
        assert!(held <= POOL_BYTES, "{held}");
        assert!(held > POOL_BYTES - (1 << 20), "{held}");
    }
}
