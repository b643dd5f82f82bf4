//! Taking over the local WAL at open: replay it only if it extends exactly
//! the history the manifest names; otherwise quarantine it.
//!
//! Invariants:
//! 1. The decision uses the manifest as read at open (before this writer
//!    commits its own epoch as `history_epoch`).
//! 2. A stamped WAL extends the history iff the manifest's `history_epoch`
//!    is one of its segments' `epoch` or `base_epoch` (see
//!    [`wal::scan::Lineage`]).
//! 3. A legacy WAL (no segment headers: written by an older shale) extends
//!    the history only if that can be shown from the store: the store holds
//!    no write yet and the WAL starts at seq 1, or the WAL holds the
//!    store's last write (seq `stored_seq`) and the store's map holds
//!    exactly that record's data at its blocks.
//! 4. Any other WAL is quarantined: its files are moved to
//!    `<local_dir>/wal.quarantine-e<epoch>-<seconds>/`, the reason is logged
//!    as an error, and nothing of it is applied or deleted.
//! 5. The new segment stamped with this writer's epoch is durable before
//!    this function returns (so before the caller commits the epoch).

use std::time::Duration;

use super::error::EngineError;
use super::format::layout::chunk_key;
use super::map::Loc;
use super::state::State;
use super::volume_core::VolumeParams;
use super::wal::fs::DynWalFs;
use super::wal::record::RecordKind;
use super::wal::scan::{record_span, scan, Lineage, SegScan};
use super::wal::segment::Stamp;
use super::wal::{self, io_err, quarantine, replay};
use super::SECTOR;
use crate::store::DynStore;

/// Replay or quarantine the WAL of `p`, given the manifest's
/// `history_epoch` as read at open; records are applied through `state`.
pub(crate) async fn open_wal(
    store: &DynStore,
    p: &VolumeParams,
    history_epoch: u64,
    state: &mut State,
    now: Duration,
    fs: &DynWalFs,
) -> Result<wal::Recovered, EngineError> {
    let dir = p.local_dir.join("wal");
    fs.create_dir_all(&dir)
        .map_err(|e| io_err("create WAL directory", e))?;
    let mut scans = scan(fs, &dir, p.id)?;
    let verdict = match Lineage::of(&scans) {
        Lineage::Empty => Ok(()),
        Lineage::Stamped(epochs) if epochs.contains(&history_epoch) => Ok(()),
        Lineage::Stamped(epochs) => Err(format!(
            "its segments were written by or over epochs {epochs:?}, but the store's history \
             was last taken over at epoch {history_epoch} (another writer or a rollback \
             changed it since)"
        )),
        Lineage::Legacy => legacy_extends(store, p, state, &scans).await,
    };
    if let Err(why) = verdict {
        let (n, lo, hi) = record_span(&scans);
        let to = p
            .local_dir
            .join(format!("wal.quarantine-e{}-{}", p.epoch, now.as_secs()));
        log::error!(
            "volume {:016x}: its local WAL ({n} records, seq {lo} to {hi}) does not extend the \
             store's history and is never applied: {why}; it is moved to {}",
            p.id,
            to.display()
        );
        scans.clear();
        quarantine::quarantine(fs, &dir, &to)?;
    }
    let stamp = Stamp {
        epoch: p.epoch,
        base_epoch: history_epoch,
    };
    let after = state.stored_seq;
    Ok(replay::replay(fs, &dir, p.id, scans, after, stamp, |a| {
        state.apply_appended(&[a], now)
    })?)
}

/// Invariant 3: `Ok` if a WAL without headers provably continues the
/// store's history, else why not.
async fn legacy_extends(
    store: &DynStore,
    p: &VolumeParams,
    state: &State,
    scans: &[SegScan],
) -> Result<(), String> {
    let stored = state.stored_seq;
    let mut recs = scans
        .iter()
        .flat_map(|s| s.records.iter().map(move |r| (s, r)));
    if stored == 0 {
        return match recs.next() {
            Some((_, r)) if r.seq == 1 => Ok(()),
            Some((_, r)) => Err(format!(
                "it was written without writer epochs and starts at seq {}, but the store holds no write yet",
                r.seq
            )),
            None => Ok(()),
        };
    }
    let Some((seg, r)) = recs.find(|(_, r)| r.seq == stored) else {
        return Err(format!(
            "it was written without writer epochs and does not hold seq {stored}, the last write \
             in the store, so it cannot be shown to continue the store's history"
        ));
    };
    let mismatch = || {
        format!(
            "it was written without writer epochs and its seq {stored} differs from the store's \
             seq {stored} (another writer's history)"
        )
    };
    if r.kind != RecordKind::Write {
        // A trim or zeroing: the store must hold no data there.
        let holds_data = state
            .stored
            .lookup(r.lba, r.sectors)
            .iter()
            .any(|piece| matches!(piece.loc, Some(Loc::Chunk { .. } | Loc::Wal(_))));
        return if holds_data { Err(mismatch()) } else { Ok(()) };
    }
    // A write record's length was checked against the file when decoded.
    let mut data = vec![0u8; (r.end - r.data_off) as usize];
    seg.file
        .read_exact_at(&mut data, r.data_off)
        .map_err(|e| format!("cannot read {}: {e}", seg.path.display()))?;
    for piece in state.stored.lookup(r.lba, r.sectors) {
        let b0 = ((piece.start - r.lba) * SECTOR) as usize;
        let want = &data[b0..b0 + (piece.len * SECTOR) as usize];
        match piece.loc {
            Some(Loc::Chunk { chunk, off }) => {
                let info = state.chunks.get(&chunk).ok_or_else(mismatch)?.info.clone();
                let start = info.data_start + off;
                let got = store
                    .get_range(
                        &chunk_key(p.id, info.seq, info.epoch),
                        start..start + want.len() as u64,
                    )
                    .await
                    .map_err(|e| format!("cannot read the store to compare: {e}"))?;
                if got.as_ref() != want {
                    return Err(mismatch());
                }
            }
            Some(Loc::Wal(_)) => return Err(mismatch()),
            None | Some(Loc::Zero) => {
                if want.iter().any(|&b| b != 0) {
                    return Err(mismatch());
                }
            }
        }
    }
    Ok(())
}
