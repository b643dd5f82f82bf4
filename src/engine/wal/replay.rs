//! Reading the WAL back at open.
//!
//! Invariants:
//! 1. Records are replayed in file order, only while their sequence numbers
//!    continue `after_seq + 1, after_seq + 2, ...` without a gap; records at or
//!    below `after_seq` (already in the store) are skipped.
//! 2. The first record that fails to decode (torn write, garbage, broken
//!    sequence) ends the replay: that segment is truncated
//!    there and every later segment is deleted, so the garbage can never be
//!    mistaken for data by a later recovery.
//! 3. Segments holding nothing newer than `after_seq` are deleted.
//! 4. A valid record of another volume fails the replay and changes
//!    nothing: the directory belongs to someone else.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

use super::record::{decode_at, RecordKind};
use super::{io_err, seg_path, sync_dir, Appended, Recovered, Segment, WalError};
use crate::engine::map::WalLoc;

fn parse_seg_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Replay the log in `dir` (created if missing) for records newer than
/// `after_seq`, calling `apply` for each in order.
pub fn replay(
    dir: &Path,
    volume: u64,
    after_seq: u64,
    mut apply: impl FnMut(Appended),
) -> Result<Recovered, WalError> {
    crate::private::create_dir_all(dir).map_err(|e| io_err("create WAL directory", e))?;
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err("list WAL directory", e))? {
        let entry = entry.map_err(|e| io_err("list WAL directory", e))?;
        if let Some(id) = entry.file_name().to_str().and_then(parse_seg_name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    let mut next_seq = after_seq + 1;
    let mut stopped = false;
    let mut kept = BTreeMap::new();
    for id in ids {
        let path = seg_path(dir, id);
        if stopped {
            log::warn!(
                "deleting WAL segment {} after a torn record",
                path.display()
            );
            std::fs::remove_file(&path).map_err(|e| io_err("delete WAL segment", e))?;
            continue;
        }
        let buf = std::fs::read(&path).map_err(|e| io_err("read WAL segment", e))?;
        let mut pos = 0usize;
        let mut last_seq = 0u64;
        let mut seen_seq = 0u64;
        while pos < buf.len() {
            let (h, data) = match decode_at(&buf, pos) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("WAL replay stops in {}: {e}", path.display());
                    stopped = true;
                    break;
                }
            };
            if h.volume != volume {
                // A whole, checksummed record of another volume is no torn
                // write: the directory is shared by mistake. Touch nothing.
                return Err(WalError::Io(format!(
                    "{} holds WAL records of volume {:x}, not {volume:x}",
                    path.display(),
                    h.volume
                )));
            }
            let in_order = h.seq > seen_seq && (h.seq <= after_seq || h.seq == next_seq);
            if !in_order {
                log::warn!(
                    "WAL replay stops in {} at offset {pos}: record seq {} volume {:x} out of place",
                    path.display(),
                    h.seq,
                    h.volume
                );
                stopped = true;
                break;
            }
            seen_seq = h.seq;
            if h.seq > after_seq {
                apply(Appended {
                    seq: h.seq,
                    kind: h.kind,
                    lba: h.lba,
                    sectors: h.sectors,
                    more: h.more,
                    loc: (h.kind == RecordKind::Write).then_some(WalLoc {
                        seq: h.seq,
                        seg: id,
                        data_off: data.start as u64,
                        rec_sectors: h.sectors,
                        crc: h.data_crc,
                        skip: 0,
                    }),
                });
                next_seq = h.seq + 1;
                last_seq = h.seq;
            }
            pos = data.end;
        }
        if last_seq == 0 {
            std::fs::remove_file(&path).map_err(|e| io_err("delete WAL segment", e))?;
            continue;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_err("open WAL segment", e))?;
        if stopped {
            file.set_len(pos as u64)
                .and_then(|_| file.sync_all())
                .map_err(|e| io_err("truncate WAL segment", e))?;
        }
        kept.insert(
            id,
            Segment {
                file: Arc::new(file),
                path,
                last_seq,
                len: pos as u64,
            },
        );
    }
    sync_dir(dir)?;
    Ok(Recovered {
        segs: kept,
        next_seq,
    })
}
