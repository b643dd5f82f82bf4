//! A bounded list of free buffers, oldest first: what the body pool
//! ([`super::aligned`]) and the engine's write payload pool keep between
//! uses.
//!
//! Invariants:
//! 1. The buffers kept hold at most `max_bytes` of capacity together; a
//!    buffer given beyond that pushes out the oldest ones first, and one
//!    larger than `max_bytes` (or smaller than `min_keep`) is not kept.
//! 2. [`FreeList::take_fitting`] hands out a buffer at most once, and only
//!    one at least as large as asked but not more than twice that (or
//!    twice `floor`, for tiny requests), so a small request never pins a
//!    big buffer.

use std::sync::{Mutex, MutexGuard};

/// A buffer that can be kept: what it can hold.
pub trait Capacity {
    fn capacity(&self) -> usize;
}

impl Capacity for Vec<u8> {
    fn capacity(&self) -> usize {
        Vec::capacity(self)
    }
}

/// Free buffers, oldest first (see the module invariants).
pub struct FreeList<B> {
    free: Mutex<Vec<B>>,
    min_keep: usize,
    max_bytes: usize,
    floor: usize,
}

impl<B: Capacity> FreeList<B> {
    /// Keeps buffers of `min_keep..=max_bytes` capacity, at most
    /// `max_bytes` together; fits requests against `need.max(floor)`.
    pub const fn new(min_keep: usize, max_bytes: usize, floor: usize) -> FreeList<B> {
        FreeList {
            free: Mutex::new(Vec::new()),
            min_keep,
            max_bytes,
            floor,
        }
    }

    fn free(&self) -> MutexGuard<'_, Vec<B>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept buffer of at least `need` bytes that does not waste more
    /// than its size (invariant 2).
    pub fn take_fitting(&self, need: usize) -> Option<B> {
        let most = 2 * need.max(self.floor);
        let mut free = self.free();
        let at = free
            .iter()
            .position(|b| b.capacity() >= need && b.capacity() <= most)?;
        Some(free.remove(at))
    }

    /// Keep `buf` for later, pushing out the oldest to stay within the
    /// bound (invariant 1).
    pub fn give(&self, buf: B) {
        let cap = buf.capacity();
        if cap < self.min_keep || cap > self.max_bytes {
            return;
        }
        let mut free = self.free();
        let mut held: usize = free.iter().map(Capacity::capacity).sum();
        while held + cap > self.max_bytes && !free.is_empty() {
            held -= free.remove(0).capacity();
        }
        free.push(buf);
    }

    /// Capacity kept in all.
    pub fn held(&self) -> usize {
        self.free().iter().map(Capacity::capacity).sum()
    }
}
