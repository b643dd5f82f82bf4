//! Read buffers of one NBD connection, reused from reply to reply.
//!
//! A fresh zeroed buffer per read cost the server a `memset` of the whole
//! request and, for large requests, page faults on newly mapped memory
//! (about 5% of its CPU in a cold sequential read, `perf`). A buffer whose
//! reply was written goes back to the connection's pool instead.
//!
//! Invariants:
//! 1. A buffer only ever moves between requests of one connection (the
//!    pool belongs to the connection and is dropped with it), and only
//!    into a device read, which overwrites every byte of it that the
//!    reply sends on success ([`crate::engine::BlockDevice::read_parts`]:
//!    only the runs of the lent buffer it names are sent); a failed read's
//!    buffer is never sent. So no byte of one read is ever sent as part of
//!    another.
//! 2. The pool holds at most [`POOL_BYTES`] of capacity; buffers beyond it
//!    are freed.

use std::sync::Mutex;

/// Capacity the pool of one connection keeps at most.
pub const POOL_BYTES: usize = 8 << 20;

/// A connection's free read buffers.
#[derive(Debug, Default)]
pub struct ReadBuffers {
    free: Mutex<Vec<Vec<u8>>>,
}

impl ReadBuffers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of exactly `len` bytes, holding zeros or bytes of an
    /// earlier read of this connection (invariant 1).
    pub fn take(&self, len: usize) -> Vec<u8> {
        let found = {
            let mut free = self.lock();
            let at = free.iter().position(|b| b.capacity() >= len);
            at.map(|i| free.swap_remove(i))
        };
        match found {
            Some(mut buf) => {
                // Within capacity: zero-fills only what grows.
                buf.resize(len, 0);
                buf
            }
            None => vec![0u8; len],
        }
    }

    /// Return a buffer whose contents were sent (or are no longer needed).
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut free = self.lock();
        let held: usize = free.iter().map(|b| b.capacity()).sum();
        if held + buf.capacity() <= POOL_BYTES {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized_exactly() {
        let pool = ReadBuffers::default();
        let mut a = pool.take(1 << 20);
        assert_eq!(a.len(), 1 << 20);
        a.fill(7);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(4096);
        assert_eq!(b.len(), 4096);
        assert_eq!(b.as_ptr(), ptr, "the free buffer was reused");
        pool.give(b);
        // Grown again within its capacity: the grown part is zeros.
        let c = pool.take(8192);
        assert_eq!(c.as_ptr(), ptr);
        assert!(c[..4096].iter().all(|&x| x == 7));
        assert!(c[4096..].iter().all(|&x| x == 0));
        // Nothing free fits: a new zeroed buffer.
        let d = pool.take(2 << 20);
        assert!(d.iter().all(|&x| x == 0));
    }

    #[test]
    fn the_pool_keeps_at_most_its_bound() {
        let pool = ReadBuffers::default();
        for _ in 0..3 * POOL_BYTES / (1 << 20) {
            pool.give(vec![0u8; 1 << 20]);
        }
        let held: usize = pool.lock().iter().map(|b| b.capacity()).sum();
        assert!(held <= POOL_BYTES, "{held}");
        assert!(held >= POOL_BYTES - (1 << 20), "{held}");
    }
}
