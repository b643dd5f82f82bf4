//! The newest bytes of the log, kept in memory after they were written.
//!
//! The destager (which builds each chunk from records written moments
//! before) and a read of a fresh record take them from here, with no
//! system call; with O_DIRECT writes (`engine.wal_direct_io`) the page
//! cache does not hold them either, and without this they would be read
//! back from the disk.
//!
//! Invariants:
//! 1. Every entry is an exact copy of a file range of one segment that was
//!    written in full: an entry is added only after its write returned.
//!    No byte it holds is written again with other content: a segment is
//!    only appended to (a batch refused with ENOSPC is cut back but was
//!    never added), and a recycled file takes a new segment id.
//! 2. Entries are kept in file order (segment id, then offset) and hold at
//!    most `budget` bytes together; the oldest go first, and entries whose
//!    records are all in the object store go as soon as the destager says
//!    so ([`Tail::forget_through`]).
//! 3. A read is served only when the entries hold every byte asked for;
//!    otherwise the caller reads the file. Callers check what they get
//!    with the record CRCs exactly as they check file bytes.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::fs::{SegFile, WalFile};

/// Consecutive bytes of one segment: `parts` concatenated, from `off`.
#[derive(Debug)]
pub struct Entry {
    pub seg: u64,
    pub off: u64,
    /// Highest sequence number among the records it holds.
    pub last_seq: u64,
    pub parts: Vec<Vec<u8>>,
}

/// Its buffers go back to the payload pool (they are mostly write
/// payloads, see [`crate::engine::payload_pool`]).
impl Drop for Entry {
    fn drop(&mut self) {
        for part in self.parts.drain(..) {
            crate::engine::payload_pool::give(part);
        }
    }
}

impl Entry {
    fn len(&self) -> u64 {
        self.parts.iter().map(|p| p.len() as u64).sum()
    }

    /// Copy `[at, at + dst.len())` (file offsets inside this entry) to `dst`.
    fn copy_to(&self, at: u64, dst: &mut [u8]) {
        let mut pos = self.off;
        let mut filled = 0usize;
        for part in &self.parts {
            let end = pos + part.len() as u64;
            let want = at + filled as u64;
            if filled < dst.len() && want < end {
                let from = (want - pos) as usize;
                let n = (part.len() - from).min(dst.len() - filled);
                dst[filled..filled + n].copy_from_slice(&part[from..from + n]);
                filled += n;
            }
            pos = end;
        }
    }
}

/// An entry as the tail keeps it: with the file offset each part starts
/// at, for a binary search.
#[derive(Debug)]
struct Kept {
    entry: Entry,
    /// `starts[i]`: file offset of `entry.parts[i]` (ascending).
    starts: Vec<u64>,
}

impl Kept {
    fn new(entry: Entry) -> Kept {
        let mut at = entry.off;
        let starts = entry
            .parts
            .iter()
            .map(|p| {
                let start = at;
                at += p.len() as u64;
                start
            })
            .collect();
        Kept { entry, starts }
    }
}

/// One part of a kept entry, as the owner of [`Bytes`] handed out without
/// a copy: the entry (and its buffers) lives until the last of them goes.
struct SharedPart {
    kept: Arc<Kept>,
    part: usize,
}

impl AsRef<[u8]> for SharedPart {
    fn as_ref(&self) -> &[u8] {
        &self.kept.entry.parts[self.part]
    }
}

#[derive(Debug, Default)]
struct Held {
    /// `(entry, its length)` in file order (invariant 2).
    entries: VecDeque<(Arc<Kept>, u64)>,
    bytes: u64,
}

/// The newest written log bytes (see the module docs).
#[derive(Debug)]
pub struct Tail {
    budget: u64,
    held: Mutex<Held>,
}

impl Tail {
    /// A tail holding at most `budget` bytes (0: holds nothing).
    pub fn new(budget: u64) -> Tail {
        Tail {
            budget,
            held: Mutex::default(),
        }
    }

    /// The most bytes it holds.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep `entry`, just written (invariant 1); it must follow every
    /// entry kept before in file order, else the tail starts over with it.
    pub fn push(&self, entry: Entry) {
        let len = entry.len();
        if len == 0 || len > self.budget {
            return;
        }
        let mut h = self.held();
        let follows = h
            .entries
            .back()
            .is_none_or(|(k, l)| (k.entry.seg, k.entry.off + l) <= (entry.seg, entry.off));
        if !follows {
            h.entries.clear();
            h.bytes = 0;
        }
        h.bytes += len;
        h.entries.push_back((Arc::new(Kept::new(entry)), len));
        while h.bytes > self.budget {
            match h.entries.pop_front() {
                Some((_, l)) => h.bytes -= l,
                None => break,
            }
        }
    }

    /// Drop the oldest entries whose records all have seqs `<= seq`.
    pub fn forget_through(&self, seq: u64) {
        let mut h = self.held();
        while let Some((k, l)) = h.entries.front() {
            if k.entry.last_seq > seq {
                break;
            }
            let l = *l;
            h.entries.pop_front();
            h.bytes -= l;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.held().bytes
    }

    /// Fill `dst` from `[off, off + dst.len())` of segment `seg` if the
    /// tail holds all of it (invariant 3); `false` leaves `dst` as it was
    /// or partly written.
    pub fn read(&self, seg: u64, off: u64, dst: &mut [u8]) -> bool {
        let Some(end) = off.checked_add(dst.len() as u64) else {
            return false;
        };
        if dst.is_empty() {
            return true;
        }
        // The entries covering the range, taken under the lock and copied
        // from after it, so a large read never holds up the writer.
        let mut covering = Vec::new();
        {
            let h = self.held();
            let first = h
                .entries
                .partition_point(|(k, l)| (k.entry.seg, k.entry.off + l) <= (seg, off));
            let mut at = off;
            for (k, l) in h.entries.range(first..) {
                let e = &k.entry;
                if e.seg != seg || e.off > at {
                    return false;
                }
                covering.push((k.clone(), *l));
                at = e.off + l;
                if at >= end {
                    break;
                }
            }
            if at < end {
                return false;
            }
        }
        let mut filled = 0usize;
        for (k, len) in covering {
            let at = off + filled as u64;
            let n = ((k.entry.off + len - at) as usize).min(dst.len() - filled);
            k.entry.copy_to(at, &mut dst[filled..filled + n]);
            filled += n;
        }
        filled == dst.len()
    }

    /// `[off, off + len)` of segment `seg` without a copy, if one buffer
    /// of the tail holds all of it (invariant 3); `None` otherwise. The
    /// bytes stay valid however long they are held, after the tail let
    /// them go too.
    pub fn shared(&self, seg: u64, off: u64, len: usize) -> Option<Bytes> {
        let end = off.checked_add(len as u64)?;
        let kept = {
            let h = self.held();
            let i = h
                .entries
                .partition_point(|(k, l)| (k.entry.seg, k.entry.off + l) <= (seg, off));
            let (k, l) = h.entries.get(i)?;
            if k.entry.seg != seg || k.entry.off > off || end > k.entry.off + l {
                return None;
            }
            k.clone()
        };
        // The last part starting at or before `off` (of parts starting at
        // one offset, only the last can hold bytes).
        let part = kept.starts.partition_point(|&s| s <= off).checked_sub(1)?;
        let start = kept.starts[part];
        let from = (off - start) as usize;
        if from + len > kept.entry.parts[part].len() {
            return None;
        }
        let bytes = Bytes::from_owner(SharedPart { kept, part });
        Some(bytes.slice(from..from + len))
    }
}

/// A segment file for readers: reads are served from the tail when it
/// holds them, from the file otherwise. Everything else goes to the file
/// (the writer never writes through this).
#[derive(Debug)]
pub struct TailFile {
    pub tail: Arc<Tail>,
    pub seg: u64,
    pub file: SegFile,
}

impl WalFile for TailFile {
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<usize> {
        self.file.write_vectored_at(iov, off)
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.tail.read(self.seg, off, buf) {
            return Ok(());
        }
        self.file.read_exact_at(buf, off)
    }

    fn read_range(&self, off: u64, len: usize) -> io::Result<bytes::Bytes> {
        let mut buf = crate::store::aligned::PooledBuf::take(len);
        if self.tail.read(self.seg, off, buf.bytes_mut()) {
            return Ok(buf.freeze());
        }
        drop(buf);
        self.file.read_range(off, len)
    }

    fn read_shared(&self, off: u64, len: usize) -> Option<Bytes> {
        self.tail.shared(self.seg, off, len)
    }

    fn read_cached_at(&self, buf: &mut [u8], off: u64) -> io::Result<bool> {
        if self.tail.read(self.seg, off, buf) {
            return Ok(true);
        }
        self.file.read_cached_at(buf, off)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.file.allocate(len)
    }

    fn write_durable_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        self.file.write_durable_at(iov, off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seg: u64, off: u64, last_seq: u64, parts: &[&[u8]]) -> Entry {
        Entry {
            seg,
            off,
            last_seq,
            parts: parts.iter().map(|p| p.to_vec()).collect(),
        }
    }

    #[test]
    fn reads_across_parts_and_entries_of_one_segment() {
        let t = Tail::new(1 << 20);
        t.push(entry(3, 100, 1, &[b"abc", b"", b"defg"]));
        t.push(entry(3, 107, 2, &[b"hij"]));
        let mut buf = [0u8; 8];
        assert!(t.read(3, 101, &mut buf));
        assert_eq!(&buf, b"bcdefghi");
        let mut one = [0u8; 1];
        assert!(t.read(3, 109, &mut one));
        assert_eq!(&one, b"j");
    }

    #[test]
    fn declines_what_it_does_not_hold_whole() {
        let t = Tail::new(1 << 20);
        t.push(entry(3, 100, 1, &[b"abcd"]));
        t.push(entry(4, 64, 2, &[b"wxyz"]));
        let mut buf = [0u8; 4];
        // Before, after, across the end, in another segment, across segments.
        assert!(!t.read(3, 96, &mut buf));
        assert!(!t.read(3, 104, &mut buf));
        assert!(!t.read(3, 102, &mut buf));
        assert!(!t.read(5, 64, &mut buf));
        let mut wide = [0u8; 8];
        assert!(!t.read(3, 100, &mut wide));
        assert!(t.read(4, 64, &mut buf));
        assert_eq!(&buf, b"wxyz");
        assert!(!t.read(3, u64::MAX - 1, &mut buf));
    }

    #[test]
    fn a_gap_between_entries_is_a_miss() {
        let t = Tail::new(1 << 20);
        t.push(entry(3, 100, 1, &[b"abcd"]));
        t.push(entry(3, 108, 2, &[b"ijkl"]));
        let mut buf = [0u8; 10];
        assert!(!t.read(3, 100, &mut buf));
        let mut four = [0u8; 4];
        assert!(t.read(3, 108, &mut four));
    }

    #[test]
    fn keeps_within_its_budget_dropping_the_oldest() {
        let t = Tail::new(10);
        t.push(entry(1, 0, 1, &[b"aaaa"]));
        t.push(entry(1, 4, 2, &[b"bbbb"]));
        t.push(entry(1, 8, 3, &[b"cccc"]));
        assert_eq!(t.bytes(), 8);
        let mut buf = [0u8; 4];
        assert!(!t.read(1, 0, &mut buf));
        assert!(t.read(1, 4, &mut buf));
        // Larger than the whole budget: not kept at all.
        t.push(entry(1, 12, 4, &[&[7u8; 11]]));
        assert!(t.read(1, 8, &mut buf));
        assert_eq!(Tail::new(0).bytes(), 0);
    }

    #[test]
    fn forgets_what_the_store_holds_and_never_serves_it_after() {
        let t = Tail::new(1 << 20);
        t.push(entry(1, 0, 5, &[b"aaaa"]));
        t.push(entry(1, 4, 9, &[b"bbbb"]));
        t.forget_through(8);
        let mut buf = [0u8; 4];
        assert!(!t.read(1, 0, &mut buf));
        assert!(t.read(1, 4, &mut buf));
        t.forget_through(9);
        assert_eq!(t.bytes(), 0);
        assert!(!t.read(1, 4, &mut buf));
    }

    #[test]
    fn shares_a_range_one_buffer_holds_and_keeps_it_after_forgetting() {
        let t = Tail::new(1 << 20);
        t.push(entry(3, 100, 1, &[b"hdr", b"", b"table", b"payload"]));
        t.push(entry(3, 115, 2, &[b"next"]));
        let got = |off, len| t.shared(3, off, len).map(|b| b.to_vec());
        assert_eq!(got(103, 5).as_deref(), Some(&b"table"[..]));
        assert_eq!(got(110, 3).as_deref(), Some(&b"ylo"[..]));
        assert_eq!(got(115, 4).as_deref(), Some(&b"next"[..]));
        // Across parts, across entries, outside, another segment: none.
        assert_eq!(got(101, 4), None);
        assert_eq!(got(113, 4), None);
        assert_eq!(got(96, 2), None);
        assert_eq!(got(118, 2), None);
        assert_eq!(t.shared(4, 103, 5), None);
        assert_eq!(t.shared(3, u64::MAX, 2), None);
        // Held bytes outlive the tail's own hold.
        let held = t.shared(3, 108, 7).unwrap();
        t.forget_through(2);
        assert_eq!(t.bytes(), 0);
        assert_eq!(got(108, 7), None);
        assert_eq!(&held[..], b"payload");
    }

    #[test]
    fn an_entry_out_of_order_starts_the_tail_over() {
        let t = Tail::new(1 << 20);
        t.push(entry(2, 100, 1, &[b"abcd"]));
        // Back to an offset it already holds: whatever it held goes.
        t.push(entry(2, 102, 2, &[b"XY"]));
        let mut buf = [0u8; 2];
        assert!(t.read(2, 102, &mut buf));
        assert_eq!(&buf, b"XY");
        let mut old = [0u8; 2];
        assert!(!t.read(2, 100, &mut old));
    }
}
