//! Local read cache of chunk data: one file under `<local_dir>/cache/`, cut
//! into fixed slots, CLOCK eviction.
//!
//! Invariants:
//! 1. The cache is discarded at open (the file is recreated), so an entry
//!    can only describe a chunk of the current history.
//! 2. A slot holds [`SLOT`] bytes of one chunk's data area starting at a
//!    `SLOT`-aligned offset (the last window of a chunk may be short).
//!    Chunks are named by [`ChunkId`] (volume, seq, epoch), so a clone's
//!    cache holds its parents' chunks beside its own.
//! 3. The cache never vouches for data: callers verify what they read
//!    against the chunk's block CRCs and treat a mismatch as a miss (a slot
//!    may be reused while it is being read).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::error::EngineError;

/// Bytes per cache slot (a multiple of the chunk CRC block).
pub const SLOT: u64 = 64 << 10;

/// A chunk object: `(volume, chunk seq, epoch)`.
pub type ChunkId = (u64, u64, u64);

/// `(chunk, window index)`.
type Key = (ChunkId, u64);

#[derive(Debug)]
struct Index {
    map: HashMap<Key, usize>,
    /// Per slot: its key (None while free or being filled) and CLOCK bit.
    slots: Vec<(Option<Key>, bool)>,
    hand: usize,
}

#[derive(Debug)]
pub struct Cache {
    file: File,
    index: Mutex<Index>,
    /// Windows evicted to make room for others.
    evictions: AtomicU64,
}

impl Cache {
    /// Create a fresh cache of `size` bytes in `dir`; `None` when `size` is
    /// smaller than one slot (cache disabled).
    pub fn open(dir: &Path, size: u64) -> Result<Option<Cache>, EngineError> {
        let slots = (size / SLOT) as usize;
        if slots == 0 {
            return Ok(None);
        }
        let err =
            |e: std::io::Error| EngineError::LocalIo(format!("read cache {}: {e}", dir.display()));
        crate::private::create_dir_all(dir).map_err(err)?;
        let file = crate::private::open_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("data"))
            .map_err(err)?;
        file.set_len(slots as u64 * SLOT).map_err(err)?;
        Ok(Some(Cache {
            file,
            index: Mutex::new(Index {
                map: HashMap::new(),
                slots: vec![(None, false); slots],
                hand: 0,
            }),
            evictions: AtomicU64::new(0),
        }))
    }

    /// Windows evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Bytes the cache holds when full.
    pub fn capacity(&self) -> u64 {
        self.index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .slots
            .len() as u64
            * SLOT
    }

    /// Read `dst.len()` bytes at `offset` within window `window` of `chunk`
    /// if that window is cached. Returns false on a miss.
    pub fn get(&self, chunk: ChunkId, window: u64, offset: u64, dst: &mut [u8]) -> bool {
        if offset + dst.len() as u64 > SLOT {
            return false;
        }
        let slot = {
            let mut idx = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let Some(&slot) = idx.map.get(&(chunk, window)) else {
                return false;
            };
            idx.slots[slot].1 = true;
            slot
        };
        self.file
            .read_exact_at(dst, slot as u64 * SLOT + offset)
            .is_ok()
    }

    /// Store a verified window (at most [`SLOT`] bytes).
    pub fn put(&self, chunk: ChunkId, window: u64, data: &[u8]) {
        if data.len() as u64 > SLOT {
            return;
        }
        let slot = {
            let mut idx = self.index.lock().unwrap_or_else(|e| e.into_inner());
            if idx.map.contains_key(&(chunk, window)) {
                return;
            }
            let n = idx.slots.len();
            let slot = loop {
                let h = idx.hand;
                idx.hand = (h + 1) % n;
                if idx.slots[h].1 {
                    idx.slots[h].1 = false;
                } else {
                    break h;
                }
            };
            if let Some(old) = idx.slots[slot].0.take() {
                idx.map.remove(&old);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
            slot
        };
        if self.file.write_all_at(data, slot as u64 * SLOT).is_err() {
            return;
        }
        let mut idx = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if idx.slots[slot].0.is_none() && !idx.map.contains_key(&(chunk, window)) {
            idx.slots[slot] = (Some((chunk, window)), true);
            idx.map.insert((chunk, window), slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_miss_and_eviction() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Cache::open(dir.path(), SLOT - 1).unwrap().is_none());
        let c = Cache::open(dir.path(), 2 * SLOT).unwrap().unwrap();
        let a = vec![1u8; SLOT as usize];
        let b = vec![2u8; 1000];
        let mut buf = vec![0u8; SLOT as usize];
        assert!(!c.get((7, 1, 1), 0, 0, &mut buf));
        c.put((7, 1, 1), 0, &a);
        c.put((7, 2, 1), 5, &b);
        assert!(c.get((7, 1, 1), 0, 0, &mut buf));
        let mut part = vec![0u8; 4096];
        assert!(c.get((7, 1, 1), 0, 8192, &mut part));
        assert!(!c.get((7, 1, 1), 0, SLOT - 100, &mut part));
        assert_eq!(buf, a);
        let mut small = vec![0u8; 1000];
        assert!(c.get((7, 2, 1), 5, 0, &mut small));
        assert_eq!(small, b);
        // A third window evicts one of the two.
        c.put((7, 3, 1), 0, &a);
        let hits = [(1, 0), (2, 5), (3, 0)]
            .iter()
            .filter(|&&(ch, w)| c.get((7, ch, 1), w, 0, &mut [0u8; 10]))
            .count();
        assert_eq!(hits, 2);
        // Another volume's (a clone's parent's) chunk with the same seq, or
        // another epoch's, is another chunk.
        let c = Cache::open(dir.path(), 2 * SLOT).unwrap().unwrap();
        c.put((7, 3, 1), 0, &b);
        let mut other = vec![0u8; 1000];
        assert!(!c.get((8, 3, 1), 0, 0, &mut other));
        assert!(!c.get((7, 3, 2), 0, 0, &mut other));
        assert!(c.get((7, 3, 1), 0, 0, &mut other));
        assert_eq!(other, b);
    }

    /// A read inside a window returns the bytes at that offset, not the
    /// window's first bytes.
    #[test]
    fn reads_inside_a_window_honour_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 4 * SLOT).unwrap().unwrap();
        let mut d = vec![0u8; SLOT as usize];
        for (i, b) in d.iter_mut().enumerate() {
            *b = (i / 4096) as u8;
        }
        c.put((7, 4, 1), 2, &d);
        for block in [0u64, 3, 15] {
            let mut inside = vec![0xffu8; 4096];
            assert!(c.get((7, 4, 1), 2, block * 4096, &mut inside));
            assert_eq!(inside, vec![block as u8; 4096]);
        }
    }
}
