//! Reading the WAL back at open, after the caller decided (from the
//! segments' [`super::scan::Lineage`]) that it extends the store's history.
//!
//! Invariants:
//! 1. Records are replayed in file order; records at or below `after_seq`
//!    (already in the store) are skipped, later ones must continue
//!    `after_seq + 1, after_seq + 2, ...` without a gap.
//! 2. Only the newest segment may end in a torn or unreadable record (of
//!    the formats that can tear inside a record: versions 1 and legacy,
//!    whose writers synced a segment before starting the next; the run of
//!    a later version ends at the first record it lacks, see invariant
//!    6). Replay stops there and cuts that segment
//!    (a version 2 segment is not cut: its run already ends there, and the
//!    next segment's `first_seq` says so).
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
//! 6. A version 2 segment's run ends at the first thing that does not
//!    continue it ([`super::scan`]). Records are missing there only if the
//!    next segment's `first_seq` lies beyond the end of every run before
//!    it (and beyond `after_seq + 1`): that is damage like any other
//!    (invariant 3), named at the end of the previous segment's run.
//! 7. Spares (pool files) are no segments: a spare named just after the
//!    last segment becomes the new current segment, spares named right
//!    after that stay in the pool, any other spare is deleted.
//! 8. Records missing as in invariant 6 are no damage where no segment
//!    from there on is prior durable ([`super::segment`], version 4): the
//!    log ends at the missing records, and every later segment is
//!    deleted. A buffered log starts a segment before the one it leaves
//!    is synced (invariant 3 of [`super`]), so a power cut
//!    can keep a later segment's bytes (written back by the kernel) and
//!    lose an earlier one's; but no record past the loss was ever
//!    acknowledged as durable, since a flush syncs every earlier segment
//!    and then marks its own prior durable before it answers.

use std::collections::BTreeMap;
use std::path::Path;

use super::fs::DynWalFs;
use super::record::RecordKind;
use super::scan::SegScan;
use super::segment::Stamp;
use super::{
    begin_segment, create_segment, io_err, seg_path, sync_dir, Appended, Recovered, Segment, Spare,
    WalError,
};
use crate::engine::map::WalLoc;

/// What replay does with one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    /// Keep the first `n` bytes (a torn tail).
    Cut(u64),
    Delete,
    /// A spare of the pool.
    Spare,
}

/// Check the order of the records and the place of any damage
/// (invariants 1 to 4); returns each segment's fate.
fn judge(scans: &[SegScan], after_seq: u64) -> Result<Vec<Fate>, WalError> {
    let mut fates = Vec::with_capacity(scans.len());
    let mut prev = 0u64;
    let mut next = after_seq + 1;
    let newest = scans.iter().rposition(|s| !s.spare).unwrap_or(0);
    // The end of every run so far (invariant 6) and the last segment.
    let mut run_end = 0u64;
    let mut last_seg: Option<&SegScan> = None;
    for (i, s) in scans.iter().enumerate() {
        let damaged = |off: u64, what: String, last_good: u64| WalError::Damaged {
            path: s.path.display().to_string(),
            offset: off,
            what,
            last_good,
        };
        if s.spare {
            fates.push(Fate::Spare);
            continue;
        }
        if let (Some(f), Some(before)) = (s.first_seq, last_seg) {
            if f > run_end + 1 && f > after_seq + 1 {
                // Invariant 8: lost with the power unless a later
                // segment vouches for everything before it.
                if !scans[i..].iter().any(|t| !t.spare && t.prior_durable) {
                    log::warn!(
                        "WAL replay stops after seq {run_end} at offset {} of {}: the records up to \
                         seq {} never became durable (a power cut before any flush covered them); \
                         the {} later segment(s) are discarded",
                        before.good_len,
                        before.path.display(),
                        f - 1,
                        scans[i..].iter().filter(|t| !t.spare).count()
                    );
                    fates.extend(scans[i..].iter().map(|t| {
                        if t.spare {
                            Fate::Spare
                        } else {
                            Fate::Delete
                        }
                    }));
                    return Ok(fates);
                }
                return Err(WalError::Damaged {
                    path: before.path.display().to_string(),
                    offset: before.good_len,
                    what: format!(
                        "expected the record after seq {run_end}, found the end of the segment's \
                         records, but the next segment starts at seq {f}"
                    ),
                    last_good: prev,
                });
            }
        }
        last_seg = Some(s);
        if let Some(f) = s.first_seq {
            run_end = run_end.max(f.saturating_sub(1));
        }
        if let Some(r) = s.records.last() {
            run_end = run_end.max(r.seq);
        }
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
                    .filter(|t| !t.spare)
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
    let next_id = scans
        .iter()
        .rfind(|s| !s.spare)
        .map_or_else(|| scans.first().map_or(1, |s| s.id), |s| s.id + 1);
    let mut next_seq = after_seq + 1;
    let mut segs = BTreeMap::new();
    let mut spares = BTreeMap::new();
    for (s, fate) in scans.into_iter().zip(fates) {
        let len = match fate {
            Fate::Spare => {
                // Invariant 7: only the run of names right after the
                // segments stays in the pool.
                let expect = next_id + spares.len() as u64;
                let expect = if spares.is_empty() || spares.contains_key(&next_id) {
                    expect
                } else {
                    expect + 1
                };
                if s.id == expect || (spares.is_empty() && s.id == next_id + 1) {
                    spares.insert(
                        s.id,
                        Spare {
                            file: s.file,
                            path: s.path,
                            durable: true,
                        },
                    );
                } else {
                    fs.remove(&s.path)
                        .map_err(|e| io_err("delete WAL spare", e))?;
                }
                continue;
            }
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
            Fate::Keep if s.first_seq.is_some() => s.good_len,
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
                // Never written again.
                incarnation: 0,
                unsynced: false,
                flag_header: None,
            },
        );
    }
    sync_dir(fs, dir)?;
    let current = match spares.remove(&next_id) {
        // A spare of the pool becomes the new current segment.
        // Every kept segment is synced: the new one is prior durable.
        Some(sp) => begin_segment(sp.file, sp.path, volume, stamp, next_seq, true)?,
        None => create_segment(fs, dir, next_id, volume, stamp, next_seq, true)?,
    };
    debug_assert_eq!(current.path, seg_path(dir, next_id));
    current
        .file
        .sync_data()
        .map_err(|e| io_err("sync WAL segment", e))?;
    sync_dir(fs, dir)?;
    segs.insert(next_id, current);
    Ok(Recovered {
        segs,
        spares,
        current: next_id,
        next_seq,
        stamp,
    })
}
