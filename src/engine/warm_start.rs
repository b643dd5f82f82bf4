//! Warm start: the ranges a served volume reads in its first seconds are
//! recorded and stored (`volumes/<id>/warm-start`), and read again in the
//! background at the volume's next attach, on this host or another, so a
//! restart or a move starts with those ranges in the read cache.
//!
//! Object: `"SHALEWS1" | crc32c u32 (of the body) | body`, the body being
//! `count u32` then `count` ranges `(offset u64, length u64)` in bytes,
//! little endian, ascending and disjoint.
//!
//! Invariants:
//! 1. Playback reads through the volume's normal read path, so it can only
//!    put into the cache what a read would: it never serves or caches data
//!    older or newer than the map says.
//! 2. Both sides are bounded: recording keeps at most [`MAX_RANGES`]
//!    ranges and `max_bytes` bytes; playback reads at most `max_bytes`, at
//!    most `rate` bytes per second, one read at a time, and stops when the
//!    volume closes, is fenced or is dropped.
//! 3. The object is advice: absent, corrupt or out of range, it is logged
//!    and ignored; it never fails an open or a read. Only user reads are
//!    recorded (playback is not), and an empty recording is not stored.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::capped::get_capped;
use super::error::EngineError;
use super::format::layout::warm_start_key;
use super::format::sealed::{seal, unseal, SealError};
use super::volume_core::Inner;
use crate::store::{PutMode, StoreError};

const MAGIC: &[u8; 8] = b"SHALEWS1";
/// Most ranges one recording keeps (16 bytes each).
pub const MAX_RANGES: usize = 1 << 16;
/// Largest read playback issues at once.
const PIECE: u64 = 1 << 20;

/// Warm start settings (the `warm_start` section of the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmStartConfig {
    /// Record the ranges read during this many seconds after an attach,
    /// and read the last recording back at the next attach; 0 disables
    /// both. Default 60; 0..=3600.
    pub seconds: u64,
    /// Most bytes recorded and read back. Default 256 MiB; at most 64 GiB.
    #[serde(with = "crate::size::serde_bytes")]
    pub max_bytes: u64,
    /// Most bytes read back per second. Default 64 MiB; at least 1 MiB.
    #[serde(with = "crate::size::serde_bytes")]
    pub rate: u64,
}

impl Default for WarmStartConfig {
    fn default() -> Self {
        WarmStartConfig {
            seconds: 60,
            max_bytes: 256 << 20,
            rate: 64 << 20,
        }
    }
}

/// A warm start setting outside its documented bounds.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("warm_start.{field}: {reason}")]
pub struct WarmStartConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl WarmStartConfig {
    pub fn validate(&self) -> Result<(), WarmStartConfigError> {
        let err = |field, reason: String| Err(WarmStartConfigError { field, reason });
        if self.seconds > 3600 {
            return err("seconds", format!("{} must be in 0..=3600", self.seconds));
        }
        if self.max_bytes > 64 << 30 {
            return err(
                "max_bytes",
                format!("{} must be at most 64 GiB", self.max_bytes),
            );
        }
        if self.rate < 1 << 20 {
            return err("rate", format!("{} must be at least 1 MiB", self.rate));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WarmDecodeError {
    #[error("not a warm start object (bad magic or too short)")]
    BadMagic,
    #[error("warm start object checksum mismatch")]
    Crc,
    #[error("warm start object is malformed: {0}")]
    Malformed(String),
}

/// Encode byte ranges (ascending, disjoint).
pub fn encode(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + ranges.len() * 16);
    body.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for (off, len) in ranges {
        body.extend_from_slice(&off.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
    }
    seal(MAGIC, &body)
}

/// Decode and check ranges against a volume of `size` bytes: the count
/// matches the bytes, every range is non-empty, inside the volume, and
/// after the previous one.
pub fn decode(b: &[u8], size: u64) -> Result<Vec<(u64, u64)>, WarmDecodeError> {
    let body = unseal(MAGIC, b).map_err(|e| match e {
        SealError::BadMagic => WarmDecodeError::BadMagic,
        SealError::Crc => WarmDecodeError::Crc,
    })?;
    if body.len() < 4 {
        return Err(WarmDecodeError::Malformed("no range count".into()));
    }
    let count = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
    let rest = &body[4..];
    if count > MAX_RANGES || rest.len() != count * 16 {
        return Err(WarmDecodeError::Malformed(format!(
            "{count} ranges in {} bytes",
            rest.len()
        )));
    }
    let mut out = Vec::with_capacity(count);
    let mut prev_end = 0u64;
    for r in rest.chunks_exact(16) {
        let mut a = [0u8; 8];
        a.copy_from_slice(&r[..8]);
        let off = u64::from_le_bytes(a);
        a.copy_from_slice(&r[8..]);
        let len = u64::from_le_bytes(a);
        let end = off.checked_add(len).filter(|&e| e <= size && len > 0);
        let Some(end) = end.filter(|_| off >= prev_end) else {
            return Err(WarmDecodeError::Malformed(format!(
                "range {off}+{len} is empty, out of order or outside {size} bytes"
            )));
        };
        out.push((off, len));
        prev_end = end;
    }
    Ok(out)
}

/// Sort and merge overlapping or touching ranges.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (off, len) in ranges {
        match out.last_mut() {
            Some((o, l)) if off <= *o + *l => *l = (*l).max(off + len - *o),
            _ => out.push((off, len)),
        }
    }
    out
}

/// Records the user reads of the first seconds after an attach.
#[derive(Debug)]
pub struct Recorder {
    /// Monotonic time after which nothing more is recorded.
    deadline: Duration,
    max_bytes: u64,
    active: AtomicBool,
    bytes: AtomicU64,
    ranges: Mutex<Vec<(u64, u64)>>,
}

impl Recorder {
    pub fn new(now: Duration, cfg: &WarmStartConfig) -> Recorder {
        Recorder {
            deadline: now + Duration::from_secs(cfg.seconds),
            max_bytes: cfg.max_bytes,
            active: AtomicBool::new(cfg.seconds > 0),
            bytes: AtomicU64::new(0),
            ranges: Mutex::new(Vec::new()),
        }
    }

    /// Note a user read of `len` bytes at `offset` made at `now`.
    pub fn note(&self, now: Duration, offset: u64, len: u64) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = self.bytes.load(Ordering::Relaxed) + len;
        if now >= self.deadline || ranges.len() >= MAX_RANGES || bytes > self.max_bytes {
            self.active.store(false, Ordering::Relaxed);
            return;
        }
        self.bytes.store(bytes, Ordering::Relaxed);
        ranges.push((offset, len));
    }

    /// Stop recording; the ranges read, merged.
    pub fn finish(&self) -> Vec<(u64, u64)> {
        self.active.store(false, Ordering::Relaxed);
        let ranges = std::mem::take(&mut *self.ranges.lock().unwrap_or_else(|e| e.into_inner()));
        merge(ranges)
    }
}

/// How far playback got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes the stored recording asks for (after the byte bound).
    pub total: u64,
    /// Bytes read back so far.
    pub done: u64,
    /// Playback ended (all read, nothing to read, or stopped).
    pub finished: bool,
}

/// Shared playback progress.
#[derive(Debug, Default)]
pub struct Playback {
    total: AtomicU64,
    done: AtomicU64,
    finished: AtomicBool,
}

impl Playback {
    pub fn progress(&self) -> Progress {
        Progress {
            total: self.total.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Acquire),
        }
    }
}

/// Store the recording (if it holds anything). Errors are logged.
pub(crate) async fn store_recording(inner: &Inner, recorder: &Recorder) {
    let ranges = recorder.finish();
    if ranges.is_empty() || inner.shared.lock().fenced.is_some() {
        return;
    }
    let key = warm_start_key(inner.id);
    let bytes: u64 = ranges.iter().map(|r| r.1).sum();
    match inner
        .store
        .put(&key, Bytes::from(encode(&ranges)), PutMode::Overwrite)
        .await
    {
        Ok(_) => log::info!(
            "volume {:x}: warm start recorded {} ranges, {} MiB",
            inner.id,
            ranges.len(),
            bytes >> 20
        ),
        Err(e) => log::warn!("{key}: warm start recording not stored: {e}"),
    }
}

/// The stored recording of the previous attach, cut to `max_bytes`
/// (empty when there is none or it is unusable; see invariant 3).
async fn load_recording(inner: &Inner, max_bytes: u64) -> Vec<(u64, u64)> {
    let key = warm_start_key(inner.id);
    let cap = 16 + 16 * MAX_RANGES as u64;
    let data = match get_capped(&inner.store, &key, cap, "warm start object").await {
        Ok(o) => o.data,
        Err(EngineError::Store(StoreError::NotFound { .. })) => return Vec::new(),
        Err(e) => {
            log::warn!("{key}: not read ({e}); no warm start");
            return Vec::new();
        }
    };
    let mut ranges = match decode(&data, inner.size) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("{key}: {e}; no warm start");
            return Vec::new();
        }
    };
    let mut left = max_bytes;
    ranges.retain_mut(|(_, len)| {
        *len = (*len).min(left);
        left -= *len;
        *len > 0
    });
    ranges
}

/// Read the previous recording back through the read path, at most
/// `cfg.rate` bytes per second, until done or the volume stops.
pub(crate) async fn play(inner: Arc<Inner>, cfg: WarmStartConfig, playback: Arc<Playback>) {
    let ranges = load_recording(&inner, cfg.max_bytes).await;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    playback.total.store(total, Ordering::Relaxed);
    let started = tokio::time::Instant::now();
    let mut buf = vec![0u8; PIECE as usize];
    let mut done = 0u64;
    'ranges: for (off, len) in ranges {
        let mut at = off;
        while at < off + len {
            {
                let st = inner.shared.lock();
                if st.closing || st.fenced.is_some() {
                    break 'ranges;
                }
            }
            let n = PIECE.min(off + len - at);
            if let Err(e) = super::read::read(&inner, at, &mut buf[..n as usize]).await {
                log::warn!("volume {:x}: warm start read at {at} failed: {e}", inner.id);
            }
            at += n;
            done += n;
            playback.done.store(done, Ordering::Relaxed);
            // Stay at or under the rate: byte `done` is due at done / rate.
            let due = Duration::from_secs_f64(done as f64 / cfg.rate as f64);
            tokio::time::sleep_until(started + due).await;
        }
    }
    if total > 0 {
        log::info!(
            "volume {:x}: warm start read {} of {} MiB back in {:.1} s",
            inner.id,
            done >> 20,
            total >> 20,
            started.elapsed().as_secs_f64()
        );
    }
    playback.finished.store(true, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sorts_and_joins() {
        let m = merge(vec![(100, 10), (0, 10), (10, 5), (105, 20), (200, 1)]);
        assert_eq!(m, vec![(0, 15), (100, 25), (200, 1)]);
    }

    #[test]
    fn round_trip_and_every_number_checked() {
        let r = vec![(0, 4096), (8192, 1 << 20)];
        assert_eq!(decode(&encode(&r), 2 << 20).unwrap(), r);
        let mut bad = encode(&r);
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert_eq!(decode(&bad, 2 << 20), Err(WarmDecodeError::Crc));
        assert_eq!(decode(b"SHALEWS1", 1), Err(WarmDecodeError::BadMagic));
        for (what, ranges, size) in [
            ("outside the volume", vec![(0, 8192)], 4096),
            ("empty range", vec![(0, 0)], 4096),
            ("overlap", vec![(0, 4096), (100, 4096)], 1 << 20),
            ("wraps", vec![(u64::MAX - 1, 4096)], u64::MAX),
        ] {
            assert!(
                matches!(
                    decode(&encode(&ranges), size),
                    Err(WarmDecodeError::Malformed(_))
                ),
                "{what}"
            );
        }
        // A count that does not match the bytes.
        let mut body = 5u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 16]);
        let b = seal(MAGIC, &body);
        assert!(matches!(
            decode(&b, 1 << 20),
            Err(WarmDecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(&seal(MAGIC, &[1, 2]), 1 << 20),
            Err(WarmDecodeError::Malformed(_))
        ));
    }

    #[test]
    fn recorder_keeps_to_its_window_and_bounds() {
        let cfg = WarmStartConfig {
            seconds: 10,
            max_bytes: 10_000,
            rate: 1 << 20,
        };
        let t0 = Duration::from_secs(100);
        let r = Recorder::new(t0, &cfg);
        r.note(t0, 0, 4096);
        r.note(t0 + Duration::from_secs(9), 4096, 4096);
        r.note(t0 + Duration::from_secs(9), 65536, 4096); // over max_bytes: stops
        r.note(t0 + Duration::from_secs(9), 131072, 512);
        assert_eq!(r.finish(), vec![(0, 8192)]);

        let r = Recorder::new(t0, &cfg);
        r.note(t0 + Duration::from_secs(10), 0, 512); // after the window
        assert!(r.finish().is_empty());

        let off = WarmStartConfig {
            seconds: 0,
            ..cfg.clone()
        };
        let r = Recorder::new(t0, &off);
        r.note(t0, 0, 512);
        assert!(r.finish().is_empty(), "seconds: 0 records nothing");
    }

    #[test]
    fn config_bounds() {
        assert!(WarmStartConfig::default().validate().is_ok());
        let bad = [
            WarmStartConfig {
                seconds: 3601,
                ..Default::default()
            },
            WarmStartConfig {
                max_bytes: (64 << 30) + 1,
                ..Default::default()
            },
            WarmStartConfig {
                rate: 1000,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
