//! Readahead for sequential reads of data held in the store.
//!
//! Each volume watches its reads for sequential *streams* (up to
//! [`MAX_STREAMS`] at once, least recently used replaced). A read that
//! continues a stream (starts at or a little before where the stream's last
//! read ended: a queue of requests may arrive slightly out of order) grows
//! the stream's readahead window, doubling up to `engine.readahead_max`; a
//! read that skips ahead inside the window halves it; a read far from every
//! stream starts a new one with no readahead, so random reads prefetch
//! nothing. When a continuing read leaves an eighth of its window or more
//! not yet fetched ahead of it, that volume range is resolved through the
//! map and the chunk windows in it that are neither cached nor already
//! being fetched are fetched with large GETs (runs of whole cache windows,
//! up to a whole chunk), through the shared in-flight table
//! ([`super::inflight`]), so a read that catches up with a prefetch waits
//! for that GET instead of sending its own. So the GETs in flight stay near
//! a whole window (refilled in eighths), not between half a window and a
//! window. The chunk the range ends in is fetched on to its end (by at most
//! one refill step, and only over volume bytes that continue it), so a
//! chunk is one GET, not two split between refills; with the CRC table read
//! in the same GET ([`super::crc_table::CrcTables::get_with_data`]), a cold
//! chunk read sequentially costs one request.
//!
//! Invariants:
//! 1. Prefetched data goes only into the read cache, keyed by immutable
//!    chunk identity plus a tag over the window's block CRCs, and into
//!    memory until read (staged in the in-flight table under the same chunk
//!    identity, [`super::inflight`] invariant 5). A read always
//!    resolves its range through the map first and takes from the cache
//!    only windows of the chunks the map names, so prefetched data can
//!    never be newer or older than the map says: if the range was written
//!    (or discarded, or compacted) after the prefetch resolved it, the map
//!    names another source and the prefetched windows are simply unused.
//! 2. Prefetch never blocks or fails a foreground read: it takes no lock a
//!    read waits on for longer than a table update, sends its GETs without
//!    awaiting them, and its errors are counted
//!    (`shale_prefetch_errors_total`) and logged, never returned.
//! 3. Prefetch is bounded in bytes in flight: a
//!    stream asks for no more than the room left under
//!    `engine.prefetch_max_in_flight`, and no GET is sent while the bound
//!    is reached (the read that needs the data later fetches it itself),
//!    so at most the bound plus one GET ([`super::inflight::MAX_RUN`]) is
//!    in flight (a GET counts until its windows are read, or dropped from
//!    memory: when a stream needs room the oldest staged run goes).
//! 4. Prefetch needs the read cache (its only destination): with
//!    `cache_size: 0` or `readahead_max: 0` nothing is prefetched. A
//!    stream's window is also capped at a twentieth of the cache (half its
//!    small FIFO), so readahead cannot evict itself before it is read or
//!    push the cache's hot set out, and at half `prefetch_max_in_flight`.

use std::sync::atomic::Ordering;

use super::cache::SLOT;
use super::read::ChunkPiece;
use super::read_state::{Mode, Prefetch, Stream, Streams};
use super::volume_core::Inner;

/// Sequential streams tracked at once, per volume.
pub const MAX_STREAMS: usize = 8;
/// Readahead of a stream's first continuing read (then doubled).
pub const FIRST_WINDOW: u64 = 512 << 10;

/// What a read means for the streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// No stream continues here: a new stream starts, nothing to fetch.
    New,
    /// A stream continues but enough is already fetched ahead.
    Ahead,
    /// A stream skipped forward: its window shrank, nothing to fetch.
    Skip,
    /// Fetch volume bytes `[from, to)` ahead of the read.
    Fetch { from: u64, to: u64 },
}

/// The least a stream with readahead `window` asks for at once: an eighth
/// of the window (at least a cache window).
fn refill(window: u64) -> u64 {
    (window / 8).max(SLOT)
}

impl Streams {
    /// Account a read of `[off, off+len)` of a volume of `size` bytes, with
    /// windows bounded by `max`.
    /// At most `room` bytes are asked for (the prefetcher's free in-flight
    /// budget), so what a stream records as fetched ahead was sent.
    pub fn observe(&mut self, off: u64, len: u64, size: u64, max: u64, room: u64) -> Seen {
        self.tick += 1;
        let end = off.saturating_add(len).min(size);
        let tick = self.tick;
        let found = self.streams.iter_mut().find(|s| {
            let tolerance = s.window.max(len);
            off.saturating_add(tolerance) >= s.next && off <= s.next.saturating_add(tolerance)
        });
        let Some(s) = found else {
            let new = Stream {
                next: end,
                window: 0,
                issued: end,
                tick,
            };
            if self.streams.len() < MAX_STREAMS {
                self.streams.push(new);
            } else if let Some(old) = self.streams.iter_mut().min_by_key(|s| s.tick) {
                *old = new;
            }
            return Seen::New;
        };
        s.tick = tick;
        if off > s.next {
            // Skipped ahead: less confidence in the pattern.
            s.window /= 2;
            s.next = end;
            s.issued = s.issued.max(end);
            return Seen::Skip;
        }
        s.window = if s.window == 0 {
            FIRST_WINDOW.max(2 * len)
        } else {
            s.window.saturating_mul(2)
        }
        .min(max);
        s.next = s.next.max(end);
        let from = s.issued.max(s.next);
        // Refill as soon as an eighth of the window is free, so the GETs
        // in flight stay near a whole window's worth instead of swinging
        // between half a window and a window.
        if s.window == 0 || from >= size || s.next + s.window < from + refill(s.window) {
            return Seen::Ahead;
        }
        let to = s
            .next
            .saturating_add(s.window)
            .min(size)
            .min(from.saturating_add(room / SLOT * SLOT));
        if to <= from {
            return Seen::Ahead;
        }
        s.issued = to;
        Seen::Fetch { from, to }
    }

    /// The stream whose readahead was sent up to `to` had it sent up to
    /// `more` (the fetch went on to the end of a chunk), so its next
    /// refill starts there.
    pub fn issued_more(&mut self, to: u64, more: u64) {
        if let Some(s) = self.streams.iter_mut().find(|s| s.issued == to) {
            s.issued = more;
        }
    }

    /// The current window of the stream whose furthest read ended at
    /// `next`, for tests.
    #[cfg(test)]
    pub fn window_at(&self, next: u64) -> Option<u64> {
        self.streams
            .iter()
            .find(|s| s.next == next)
            .map(|s| s.window)
    }
}

impl Prefetch {
    /// Called by every read of `[off, off+len)` before it resolves its own
    /// pieces: may send readahead GETs (never waits for them).
    pub fn on_read(&self, inner: &Inner, off: u64, len: u64) {
        let Some(cache) = &inner.cache else {
            return;
        };
        // Prefetched windows wait in the cache's small FIFO (a tenth of
        // it) until read; a window evicted unread is a wasted GET and
        // leaves a ghost entry that would send it to the main FIFO when
        // read later. So a window stays within half of small. It also
        // stays within half the prefetch budget, so one stream's unread
        // readahead (at most a window and a GET) never has to be dropped
        // from memory to make room for its own next half window.
        let limit = inner.cfg.prefetch_max_in_flight;
        let max = inner
            .cfg
            .readahead_max
            .min(cache.capacity() / 20)
            .min(limit / 2)
            / SLOT
            * SLOT;
        if max < SLOT {
            return;
        }
        let room = || limit.saturating_sub(self.in_flight.load(Ordering::Relaxed));
        // Several streams: staged windows nobody read yet (the oldest
        // first) make room for the next half window; they are still in
        // the cache.
        while room() < max / 2 && inner.fetches.evict_staged() {}
        let room = room();
        let seen = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(off, len, inner.size, max, room);
        let Seen::Fetch { from, to } = seen else {
            return;
        };
        log::debug!("readahead after {off}+{len}: [{from}, {to})");
        let mut pieces = super::read::chunk_pieces(inner, from, to - from);
        let grown = finish_chunk(inner, &mut pieces, to, refill(max));
        if grown > 0 {
            self.streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .issued_more(to, to + grown);
        }
        for p in pieces {
            let (w0, w1) = super::read::windows(p.off, p.len, p.info.data_len);
            let (volume, info) = (p.volume, p.info);
            let (_, sent) = inner.fetches.fetch(
                inner,
                volume,
                &info,
                w0..w1,
                Mode::Prefetch {
                    in_flight: &self.in_flight,
                    limit,
                    errors: &self.errors,
                },
            );
            self.bytes.fetch_add(sent, Ordering::Relaxed);
            log::debug!(
                "readahead: chunk {} windows {w0}..{w1}: sent {sent}",
                info.seq
            );
        }
    }
}

/// Grow the last of the `pieces` of a readahead range that ends at volume
/// byte `to` over the volume bytes after `to` that continue it in the same
/// chunk (up to the chunk's end): the rest of that chunk is what the stream
/// reads next, and fetched now it is one GET with the rest, instead of a
/// second GET of the chunk's tail in the next batch (which finds these
/// windows in flight and skips them). It grows by at most `cap` bytes (a
/// refill step: the stream's readahead in memory stays within its window
/// plus one step, so it never crowds out its own staged windows).
/// Returns the bytes it grew by.
fn finish_chunk(inner: &Inner, pieces: &mut [ChunkPiece], to: u64, cap: u64) -> u64 {
    let Some(last) = pieces.last_mut() else {
        return 0;
    };
    let rest = last
        .info
        .data_len
        .saturating_sub(last.off + last.len)
        .min(cap);
    if last.at + last.len != to || rest == 0 {
        return 0;
    }
    let len = last.len;
    for next in super::read::chunk_pieces(inner, to, rest) {
        let continues = next.at == last.at + last.len
            && next.volume == last.volume
            && next.info.seq == last.info.seq
            && next.info.epoch == last.info.epoch
            && next.off == last.off + last.len;
        if !continues {
            break;
        }
        last.len += next.len;
    }
    last.len - len
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;
    const SIZE: u64 = 1 << 40;

    #[test]
    fn sequential_stream_grows_its_window_up_to_the_max() {
        let mut s = Streams::default();
        assert_eq!(s.observe(0, M, SIZE, 32 * M, u64::MAX), Seen::New);
        let mut windows = Vec::new();
        let mut fetched_to = M;
        for i in 1..40 {
            match s.observe(i * M, M, SIZE, 32 * M, u64::MAX) {
                Seen::Fetch { from, to } => {
                    assert!(from >= fetched_to, "refetched {from} < {fetched_to}");
                    assert!(from >= (i + 1) * M, "fetch starts inside the read");
                    fetched_to = to;
                }
                Seen::Ahead => {}
                other => panic!("read {i}: {other:?}"),
            }
            assert!(fetched_to > (i + 1) * M, "read {i}: nothing fetched ahead");
            windows.push(s.window_at((i + 1) * M).unwrap());
        }
        assert_eq!(windows[0], 2 * M);
        assert!(windows.windows(2).all(|w| w[0] <= w[1]), "{windows:?}");
        assert_eq!(*windows.last().unwrap(), 32 * M);
    }

    #[test]
    fn a_stream_at_full_window_keeps_nearly_a_window_fetched_ahead() {
        // Once the window is at its max, every read leaves at least seven
        // eighths of it (less the read) fetched ahead: readahead refills
        // in small steps instead of waiting until half the window is
        // read (before, what was fetched ahead fell to half the window).
        let max = 32 * M;
        let mut s = Streams::default();
        let mut fetched_to = 0;
        for i in 0..200u64 {
            if let Seen::Fetch { from, to } = s.observe(i * M, M, SIZE, max, u64::MAX) {
                assert!(from >= fetched_to.max((i + 1) * M), "read {i} refetched");
                assert!(to - from >= refill(max).min(to - from), "read {i}");
                fetched_to = to;
            }
            if i >= 8 {
                let ahead = fetched_to - (i + 1) * M;
                assert!(
                    ahead >= max - refill(max) - M,
                    "read {i}: only {ahead} bytes fetched ahead"
                );
            }
        }
    }

    #[test]
    fn random_reads_prefetch_nothing() {
        // Reads further apart than their length never start readahead.
        let mut s = Streams::default();
        for i in 0..100u64 {
            let off = (i * 7919 % 1000) * 64 * M;
            assert_eq!(
                s.observe(off, M, SIZE, 32 * M, u64::MAX),
                Seen::New,
                "read {i}"
            );
        }
    }

    #[test]
    fn several_streams_at_once_and_skips_shrink() {
        let mut s = Streams::default();
        let bases = [0, 100 * M, 200 * M, 300 * M];
        for &b in &bases {
            assert_eq!(s.observe(b, M, SIZE, 32 * M, u64::MAX), Seen::New);
        }
        for i in 1..6 {
            for &b in &bases {
                let seen = s.observe(b + i * M, M, SIZE, 32 * M, u64::MAX);
                assert!(matches!(seen, Seen::Fetch { .. } | Seen::Ahead), "{seen:?}");
            }
        }
        for &b in &bases {
            assert_eq!(s.window_at(b + 6 * M), Some(32 * M));
        }
        // A skip inside the window halves it.
        assert_eq!(s.observe(8 * M, M, SIZE, 32 * M, u64::MAX), Seen::Skip);
        assert_eq!(s.window_at(9 * M), Some(16 * M));
    }

    #[test]
    fn readahead_stops_at_the_end_of_the_volume() {
        let mut s = Streams::default();
        let size = 4 * M;
        s.observe(0, M, size, 32 * M, u64::MAX);
        match s.observe(M, M, size, 32 * M, u64::MAX) {
            Seen::Fetch { from, to } => assert_eq!((from, to), (2 * M, size)),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.observe(2 * M, M, size, 32 * M, u64::MAX), Seen::Ahead);
        assert_eq!(s.observe(3 * M, M, size, 32 * M, u64::MAX), Seen::Ahead);
    }
}
