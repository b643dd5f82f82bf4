//! Scrub: read every chunk object a volume or snapshot references and
//! verify every checksum, reporting damage by volume offset and object key.
//!
//! Invariants:
//! 1. Every byte of every planned chunk's data area is fetched and checked
//!    against the CRCs the map holds for it (the checkpoint's copy for
//!    checkpointed chunks; the chunk's own header for newer ones), and the
//!    header is decoded and checked against what the map expects.
//! 2. A chunk missing from the store is damage unless the volume's
//!    manifest moved on while the scrub ran (a live server compacted it
//!    away): then it is counted as `vanished`, never as damage.
//! 3. Nothing is written; fetches are paced so that the bytes read never
//!    run ahead of `rate` bytes per second (when a rate is set).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use super::checkpoint::ChunkInfo;
use super::error::EngineError;
use super::format::chunk::{decode_header, CRC_BLOCK};
use super::format::layout::{chunk_key, chunk_prefix, parse_chunk_key};
use super::format::manifest::Manifest;
use super::format::snapshot::SnapshotObject;
use super::meta::manifest::read_manifest;
use super::snapshot::store::SnapshotError;
use super::view::{Resolved, SnapshotView};
use super::SECTOR;
use crate::store::{DynStore, StoreError};

/// Largest piece of a data area fetched in one request.
const PIECE: u64 = 4 << 20;
/// Chunks checked at once.
const PARALLEL: usize = 4;

/// One chunk object to check.
#[derive(Debug, Clone)]
struct PlannedChunk {
    volume: u64,
    seq: u64,
    epoch: u64,
    /// What the map knows of it (`None`: newer than the checkpoint, so
    /// its own header is the reference).
    info: Option<Arc<ChunkInfo>>,
    /// `(volume byte offset, data-area offset, length)` of the ranges the
    /// view reads from this chunk.
    ranges: Vec<(u64, u64, u64)>,
}

impl PlannedChunk {
    fn key(&self) -> String {
        chunk_key(self.volume, self.seq, self.epoch)
    }
}

/// What a scrub reads: the chunks of one volume or snapshot.
#[derive(Debug)]
pub struct ScrubPlan {
    /// The volume whose manifest shows whether a missing chunk was
    /// compacted away (None for snapshots: their chunks are retained).
    live_volume: Option<(u64, Manifest)>,
    chunks: Vec<PlannedChunk>,
}

impl ScrubPlan {
    /// The chunks snapshot `snap` of a volume of `size` bytes reads,
    /// through its parent chain.
    pub async fn of_snapshot(
        store: &DynStore,
        snap: &SnapshotObject,
        size: u64,
    ) -> Result<ScrubPlan, SnapshotError> {
        let view = SnapshotView::of_snapshot(store.clone(), snap, size).await?;
        let chunks = plan_view(&view, size)?;
        Ok(ScrubPlan {
            live_volume: None,
            chunks: chunks.into_values().collect(),
        })
    }

    /// The chunks volume `volume` (of `size` bytes) reads now: its newest
    /// checkpoint, the chunks stored after it, and its parent chain.
    pub async fn of_volume(
        store: &DynStore,
        volume: u64,
        size: u64,
    ) -> Result<ScrubPlan, SnapshotError> {
        let (manifest, view) = SnapshotView::of_volume(store.clone(), volume, size).await?;
        let mut chunks = plan_view(&view, size)?;
        for p in newer_chunks(store, &manifest).await? {
            chunks.entry((p.volume, p.seq, p.epoch)).or_insert(p);
        }
        Ok(ScrubPlan {
            live_volume: Some((volume, manifest)),
            chunks: chunks.into_values().collect(),
        })
    }

    /// Number of chunk objects to check.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Bytes of data area to fetch (chunks newer than the checkpoint
    /// count by the ranges the view reads from them).
    pub fn data_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .map(|c| match &c.info {
                Some(i) => i.data_len,
                None => c.ranges.iter().map(|r| r.2).sum(),
            })
            .sum()
    }
}

type ChunkId = (u64, u64, u64);

/// Every chunk `view` reads from, with the ranges it reads.
fn plan_view(
    view: &SnapshotView,
    size: u64,
) -> Result<BTreeMap<ChunkId, PlannedChunk>, EngineError> {
    let mut out: BTreeMap<ChunkId, PlannedChunk> = BTreeMap::new();
    let runs = view
        .resolve(0, size / SECTOR)
        .map_err(|e| EngineError::InvalidParams(e.to_string()))?;
    for (start, len, source) in runs {
        if let Resolved::Chunk { volume, info, off } = source {
            let id = (volume, info.seq, info.epoch);
            let entry = out.entry(id).or_insert_with(|| PlannedChunk {
                volume,
                seq: info.seq,
                epoch: info.epoch,
                info: Some(info.clone()),
                ranges: Vec::new(),
            });
            entry.ranges.push((start * SECTOR, off, len * SECTOR));
        }
    }
    Ok(out)
}

/// Chunks stored after the manifest's checkpoint: for each sequence
/// number past it, the newest epoch the manifest's writer could have
/// written. Their ranges come from their own headers when fetched.
async fn newer_chunks(store: &DynStore, m: &Manifest) -> Result<Vec<PlannedChunk>, SnapshotError> {
    let listed = store.list(&chunk_prefix(m.volume)).await?;
    let mut newest: BTreeMap<u64, u64> = BTreeMap::new();
    for o in listed {
        let Some((seq, epoch)) = parse_chunk_key(m.volume, &o.key) else {
            continue;
        };
        if seq <= m.checkpoint_chunk || epoch > m.epoch {
            continue;
        }
        let e = newest.entry(seq).or_insert(epoch);
        *e = (*e).max(epoch);
    }
    Ok(newest
        .into_iter()
        .map(|(seq, epoch)| PlannedChunk {
            volume: m.volume,
            seq,
            epoch,
            info: None,
            ranges: Vec::new(),
        })
        .collect())
}

/// What was wrong with one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The object is not in the store.
    Missing,
    /// The object ends before its data area does.
    Truncated { size: u64, expected: u64 },
    /// The header does not decode, or disagrees with the map.
    Header(String),
    /// Data-area blocks whose CRC does not match (block indexes).
    Blocks(Vec<u64>),
    /// The store failed to return it (not proof of damage, but unverified).
    Unreadable(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Missing => write!(f, "object missing"),
            Fault::Truncated { size, expected } => {
                write!(
                    f,
                    "object is {size} bytes, its data area ends at {expected}"
                )
            }
            Fault::Header(why) => write!(f, "bad header: {why}"),
            Fault::Blocks(b) => write!(f, "{} block(s) fail their checksum", b.len()),
            Fault::Unreadable(why) => write!(f, "could not be read: {why}"),
        }
    }
}

/// Damage found in one chunk and the volume ranges it affects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub key: String,
    pub fault: Fault,
    /// `(volume byte offset, length)` of the affected ranges the volume
    /// reads (empty when only bytes no longer read were hit).
    pub ranges: Vec<(u64, u64)>,
}

/// Outcome of a scrub.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Chunks that disappeared while scrubbing a live volume because its
    /// manifest moved on (compaction or GC); not damage.
    pub vanished: u64,
    pub damage: Vec<Damage>,
}

impl ScrubReport {
    /// True when every checked chunk was whole.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Pace reads to `rate` bytes per second (invariant 3).
struct Pacer {
    rate: Option<u64>,
    start: Instant,
    bytes: AtomicU64,
}

impl Pacer {
    async fn take(&self, n: u64) {
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return;
        };
        let before = self.bytes.fetch_add(n, Ordering::SeqCst);
        let due = Duration::from_secs_f64(before as f64 / rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// Check every chunk of `plan`, at most `rate` bytes per second, calling
/// `progress` with the data bytes checked as they go.
pub async fn scrub(
    store: &DynStore,
    plan: &ScrubPlan,
    rate: Option<u64>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ScrubReport, SnapshotError> {
    let pacer = Pacer {
        rate,
        start: Instant::now(),
        bytes: AtomicU64::new(0),
    };
    let pacer = &pacer;
    let results: Vec<(PlannedChunk, Result<u64, Fault>)> = stream::iter(plan.chunks.iter())
        .map(|c| async move {
            let mut c = c.clone();
            let r = check_chunk(store, &mut c, pacer, progress).await;
            (c, r)
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut report = ScrubReport::default();
    for (c, r) in results {
        match r {
            Ok(bytes) => {
                report.chunks_checked += 1;
                report.bytes_checked += bytes;
            }
            Err(Fault::Missing) if vanished(store, plan).await? => report.vanished += 1,
            Err(fault) => {
                let ranges = affected(&c, &fault);
                if !matches!(fault, Fault::Unreadable(_)) {
                    super::damage::report(&c.key(), &fault);
                }
                report.damage.push(Damage {
                    key: c.key(),
                    fault,
                    ranges,
                });
            }
        }
    }
    report.damage.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(report)
}

/// True when a live volume's manifest changed since planning (a chunk
/// missing now may have been compacted away, invariant 2).
async fn vanished(store: &DynStore, plan: &ScrubPlan) -> Result<bool, SnapshotError> {
    let Some((volume, planned)) = &plan.live_volume else {
        return Ok(false);
    };
    let (now, _) = read_manifest(store, *volume).await?;
    Ok(now.checkpoint != planned.checkpoint || now.epoch != planned.epoch)
}

/// The volume ranges of `c` that `fault` affects.
fn affected(c: &PlannedChunk, fault: &Fault) -> Vec<(u64, u64)> {
    match fault {
        Fault::Blocks(blocks) => {
            let mut out = Vec::new();
            for &b in blocks {
                let (bs, be) = (b * CRC_BLOCK, (b + 1) * CRC_BLOCK);
                for &(vol_off, data_off, len) in &c.ranges {
                    let (s, e) = (bs.max(data_off), be.min(data_off + len));
                    if s < e {
                        out.push((vol_off + (s - data_off), e - s));
                    }
                }
            }
            merge(out)
        }
        _ => merge(c.ranges.iter().map(|&(o, _, l)| (o, l)).collect()),
    }
}

/// Sort and join touching ranges.
fn merge(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (o, l) in r {
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= o => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    out
}

fn store_fault(e: StoreError) -> Fault {
    match e {
        StoreError::NotFound { .. } => Fault::Missing,
        other => Fault::Unreadable(other.to_string()),
    }
}

/// Fetch and verify one chunk; the data bytes checked, or what is wrong.
/// Fills `c.ranges` from the header for chunks newer than the checkpoint.
async fn check_chunk(
    store: &DynStore,
    c: &mut PlannedChunk,
    pacer: &Pacer,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, Fault> {
    let key = c.key();
    let size = store.head(&key).await.map_err(store_fault)?.size;
    let (data_start, data_len, crcs) = match c.info.clone() {
        Some(info) => {
            let end = info.data_start.min(size);
            pacer.take(end).await;
            let head = store.get_range(&key, 0..end).await.map_err(store_fault)?;
            let h = decode_header(&head).map_err(|e| Fault::Header(e.to_string()))?;
            let mismatch = if h.volume != c.volume || h.chunk_seq != c.seq || h.epoch != c.epoch {
                Some("it names another chunk")
            } else if h.header_len != info.data_start || h.data_len != info.data_len {
                Some("its lengths differ from the checkpoint's")
            } else if super::format::chunk::table_crc(&h.block_crcs) != info.table_crc {
                Some("its checksums differ from the checkpoint's")
            } else {
                None
            };
            if let Some(why) = mismatch {
                return Err(Fault::Header(why.to_string()));
            }
            (info.data_start, info.data_len, h.block_crcs)
        }
        None => {
            // Newer than the checkpoint: the header is the only reference.
            let probe = size.min(1 << 20);
            pacer.take(probe).await;
            let mut head = store.get_range(&key, 0..probe).await.map_err(store_fault)?;
            let mut h = decode_header(&head);
            if matches!(h, Err(super::format::chunk::ChunkError::Truncated)) && probe < size {
                pacer.take(size - probe).await;
                head = store.get(&key).await.map_err(store_fault)?.data;
                h = decode_header(&head);
            }
            let h = h.map_err(|e| Fault::Header(e.to_string()))?;
            if h.volume != c.volume || h.chunk_seq != c.seq || h.epoch != c.epoch {
                return Err(Fault::Header("it names another chunk".into()));
            }
            c.ranges = h
                .extents
                .iter()
                .filter_map(|e| e.data_off.map(|d| (e.lba * SECTOR, d, e.sectors * SECTOR)))
                .collect();
            (h.header_len, h.data_len, h.block_crcs)
        }
    };
    let expected = data_start + data_len;
    if size < expected {
        return Err(Fault::Truncated { size, expected });
    }
    let mut bad = Vec::new();
    let mut pos = 0;
    while pos < data_len {
        let n = PIECE.min(data_len - pos);
        pacer.take(n).await;
        let data = store
            .get_range(&key, data_start + pos..data_start + pos + n)
            .await
            .map_err(store_fault)?;
        if data.len() as u64 != n {
            return Err(Fault::Truncated {
                size: data_start + pos + data.len() as u64,
                expected,
            });
        }
        for (i, block) in data.chunks(CRC_BLOCK as usize).enumerate() {
            let idx = pos / CRC_BLOCK + i as u64;
            if crcs.get(idx as usize) != Some(&crc32c::crc32c(block)) {
                bad.push(idx);
            }
        }
        progress(n);
        pos += n;
    }
    if bad.is_empty() {
        Ok(data_len)
    } else {
        Err(Fault::Blocks(bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(ranges: Vec<(u64, u64, u64)>) -> PlannedChunk {
        PlannedChunk {
            volume: 1,
            seq: 2,
            epoch: 3,
            info: None,
            ranges,
        }
    }

    #[test]
    fn bad_blocks_map_to_the_volume_ranges_that_read_them() {
        // Data bytes 0..8K read at volume 1 MiB; 8K..16K at volume 0.
        let c = planned(vec![(1 << 20, 0, 8192), (0, 8192, 8192)]);
        assert_eq!(
            affected(&c, &Fault::Blocks(vec![1])),
            vec![((1 << 20) + 4096, 4096)]
        );
        assert_eq!(affected(&c, &Fault::Blocks(vec![2, 3])), vec![(0, 8192)]);
        // A block no range reads affects nothing the volume sees.
        assert!(affected(&c, &Fault::Blocks(vec![9])).is_empty());
        // A missing object affects every range.
        assert_eq!(
            affected(&c, &Fault::Missing),
            vec![(0, 8192), (1 << 20, 8192)]
        );
    }

    #[test]
    fn merge_joins_touching_ranges() {
        assert_eq!(merge(vec![(8, 4), (0, 8), (20, 1)]), vec![(0, 12), (20, 1)]);
    }
}
