//! Reading the WAL back at open, after the caller decided (from the
//! segments' [`super::scan::Lineage`]) that it extends the store's history.
//!
//! Invariants:
//! 1. Records are replayed in file order; records at or below `after_seq`
//!    (already in the store) are skipped, later ones must continue
//!    `after_seq + 1, after_seq + 2, ...` without a gap.
//! 2. Only the newest segment may end in a torn or unreadable record (it is
//!    the only one that can hold unsynced data: a segment is synced before
//!    the next one is started). Replay stops there and cuts that segment.
//! 3. Damage or a sequence gap anywhere else is corruption: replay fails
//!    with [`WalError::Damaged`] naming the segment, the offset and what was
//!    expected, and changes nothing on disk. (Damage in a segment whose
//!    records are all in the store already, as the next segment's first
//!    sequence number proves, only drops that segment.)
//! 4. Segments holding nothing newer than `after_seq` are deleted.
//! 5. Before returning, every kept segment is `fdatasync`ed and the
//!    directory synced, so a power loss after the volume served its first
//!    request cannot take back what replay applied; then a new current
//!    segment stamped with the writer's [`Stamp`] is created and made
//!    durable, so the WAL names its new writer before that writer commits
//!    its epoch as the manifest's `history_epoch`.

use std::collections::BTreeMap;
use std::path::Path;

use super::fs::DynWalFs;
use super::record::RecordKind;
use super::scan::SegScan;
use super::segment::Stamp;
use super::{create_segment, io_err, sync_dir, Appended, Recovered, Segment, WalError};
use crate::engine::map::WalLoc;

/// What replay does with one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    /// Keep the first `n` bytes (a torn tail).
    Cut(u64),
    Delete,
}

/// Check the order of the records and the place of any damage
/// (invariants 1 to 4); returns each segment's fate.
fn judge(scans: &[SegScan], after_seq: u64) -> Result<Vec<Fate>, WalError> {
    let mut fates = Vec::with_capacity(scans.len());
    let mut prev = 0u64;
    let mut next = after_seq + 1;
    let newest = scans.len().saturating_sub(1);
    for (i, s) in scans.iter().enumerate() {
        let damaged = |off: u64, what: String, last_good: u64| WalError::Damaged {
            path: s.path.display().to_string(),
            offset: off,
            what,
            last_good,
        };
        for r in &s.records {
            if r.seq <= prev {
                return Err(damaged(
                    r.off,
                    format!("expected a seq above {prev}, found {}", r.seq),
                    prev,
                ));
            }
            if r.seq > after_seq && r.seq != next {
                return Err(damaged(
                    r.off,
                    format!("expected seq {next}, found {}", r.seq),
                    prev,
                ));
            }
            prev = r.seq;
            if r.seq > after_seq {
                next = r.seq + 1;
            }
        }
        let newer = s.records.iter().any(|r| r.seq > after_seq);
        let fate = match &s.damage {
            None if newer => Fate::Keep,
            None => Fate::Delete,
            Some(why) if i == newest => {
                log::warn!(
                    "WAL replay stops at offset {} of {} (torn write: {why}); the rest is discarded",
                    s.good_len,
                    s.path.display()
                );
                if newer {
                    Fate::Cut(s.good_len)
                } else {
                    Fate::Delete
                }
            }
            Some(why) => {
                let next_first = scans[i + 1..]
                    .iter()
                    .flat_map(|t| t.records.first())
                    .map(|r| r.seq)
                    .next();
                if next_first.is_some_and(|f| f <= after_seq + 1) {
                    log::warn!(
                        "WAL segment {} is damaged at offset {} ({why}); all its records are in the store already, so it is deleted",
                        s.path.display(),
                        s.good_len
                    );
                    Fate::Delete
                } else {
                    return Err(damaged(
                        s.good_len,
                        format!("expected the record after seq {prev}, found damage ({why})"),
                        prev,
                    ));
                }
            }
        };
        fates.push(fate);
    }
    Ok(fates)
}

/// Replay `scans` (the WAL of `dir`, oldest first) for records newer than
/// `after_seq`, calling `apply` for each in order, then start a new
/// segment stamped `stamp`.
pub fn replay(
    fs: &DynWalFs,
    dir: &Path,
    volume: u64,
    scans: Vec<SegScan>,
    after_seq: u64,
    stamp: Stamp,
    mut apply: impl FnMut(Appended),
) -> Result<Recovered, WalError> {
    let fates = judge(&scans, after_seq)?;
    fs.create_dir_all(dir)
        .map_err(|e| io_err("create WAL directory", e))?;
    let next_id = scans.last().map_or(1, |s| s.id + 1);
    let mut next_seq = after_seq + 1;
    let mut segs = BTreeMap::new();
    for (s, fate) in scans.into_iter().zip(fates) {
        let len = match fate {
            Fate::Delete => {
                fs.remove(&s.path)
                    .map_err(|e| io_err("delete WAL segment", e))?;
                continue;
            }
            Fate::Cut(n) => {
                s.file
                    .set_len(n)
                    .map_err(|e| io_err("truncate WAL segment", e))?;
                n
            }
            Fate::Keep => s.len,
        };
        s.file
            .sync_data()
            .map_err(|e| io_err("sync WAL segment", e))?;
        let mut last_seq = 0;
        for r in s.records.iter().filter(|r| r.seq > after_seq) {
            apply(Appended {
                seq: r.seq,
                kind: r.kind,
                lba: r.lba,
                sectors: r.sectors,
                more: r.more,
                loc: (r.kind == RecordKind::Write).then_some(WalLoc {
                    seq: r.seq,
                    seg: s.id,
                    data_off: r.data_off,
                    rec_sectors: r.sectors,
                    crc: r.data_crc,
                    skip: 0,
                    block_crcs: r.block_crcs,
                }),
            });
            last_seq = r.seq;
            next_seq = r.seq + 1;
        }
        segs.insert(
            s.id,
            Segment {
                file: s.file,
                path: s.path,
                last_seq,
                len,
            },
        );
    }
    sync_dir(fs, dir)?;
    let current = create_segment(fs, dir, next_id, volume, stamp)?;
    current
        .file
        .sync_data()
        .map_err(|e| io_err("sync WAL segment", e))?;
    sync_dir(fs, dir)?;
    segs.insert(next_id, current);
    Ok(Recovered {
        segs,
        current: next_id,
        next_seq,
        stamp,
    })
}
