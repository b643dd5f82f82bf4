//! Opening a volume: manifest, checkpoint, later chunks, then the WAL.
//!
//! Invariants:
//! 1. The manifest's epoch is raised to ours (compare-and-swap) before
//!    anything else is written, so an older writer can no longer commit; a
//!    manifest with a higher epoch means we are fenced and open fails.
//! 2. Chunks after the checkpoint are applied in sequence order while each
//!    one continues the previous one's op sequence range, with epochs never
//!    decreasing and never above ours. Listings may lag behind writes (some
//!    S3-compatible stores), so a chunk number the listing lacks is read
//!    directly (at every epoch it could have) before the chain ends there.
//!    A committed chunk (at or before the manifest's `last_chunk`) that is
//!    really missing fails the open. Chunks past the end of the chain are
//!    never deleted in the same pass (a later open, which finds them fenced
//!    by invariant 3, deletes them); only chunks that can never be history
//!    (fenced by invariant 3, or duplicates of a chunk in the chain) are.
//! 3. Fencing of late chunks: before open returns (before serving), the
//!    recovered store position (`last_chunk`, `last_seq`) is committed
//!    with `history_epoch` = our epoch. A chunk after the manifest's
//!    `last_chunk` is accepted only if its epoch is >= `history_epoch`, so
//!    a chunk an older writer uploads after we recovered (its request was
//!    in flight when it lost the lease) never enters the history of any
//!    later recovery; it is deleted as stray. Every later commit by this
//!    epoch keeps `history_epoch` = its epoch.
//! 4. A chunk or checkpoint that fails its checksum fails the open: it is
//!    bit rot the operator must see, never silently skipped. So does one
//!    whose numbers are out of range or contradict each other (see
//!    [`super::format::limits`]), or a metadata object too large to be real;
//!    the error names the object, and nothing is deleted or replayed.
//! 5. A clone (its manifest names a parent) opens only with its whole
//!    parent chain readable; its maps keep zeroed ranges as `Loc::Zero`.
//! 6. The local WAL is replayed only if it extends the history of the
//!    manifest as read (before invariant 3's commit), else quarantined;
//!    what replay keeps is durable, and a new segment stamped with our
//!    epoch exists, before that commit (see [`super::wal_open`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};

use super::capped::get_capped;
use super::checkpoint::ChunkInfo;
use super::error::EngineError;
use super::format::chunk::decode_header;
use super::format::layout::{chunk_key, chunk_prefix, parse_chunk_name};
use super::format::limits::{checkpoint_cap, valid_chunk_id, MAX_CHUNK_OBJECT_BYTES};
use super::format::manifest::Manifest;
use super::meta::manifest::{read_manifest, Put};
use super::meta::{self, prepare};
use super::state::State;
use super::view::SnapshotView;
use super::volume_core::VolumeParams;
use super::wal;
use super::wal_open;
use super::SECTOR;
use crate::store::delete_many::{delete_many, DELETES_IN_FLIGHT};
use crate::store::{DynStore, StoreError, Version};

/// What recovery hands to the running volume.
pub struct Recovered {
    pub state: State,
    pub manifest: Manifest,
    pub manifest_version: Version,
    pub wal: wal::Recovered,
    /// What unmapped ranges read through to (clones only).
    pub parent: Option<Arc<SnapshotView>>,
    /// Block-CRC tables, holding those of the chunks read during recovery.
    pub tables: Arc<super::crc_table::CrcTables>,
}

/// Read (or create) the manifest and raise its epoch to ours.
async fn take_manifest(
    store: &DynStore,
    p: &VolumeParams,
) -> Result<(Manifest, Version), EngineError> {
    // A lower-epoch writer may still land one last update while we open
    // (its crash left a request in flight): re-read and try again then.
    for _ in 0..5 {
        let (m, ver) = match read_manifest(store, p.id).await {
            Ok((m, o)) => (m, o.version),
            Err(EngineError::Store(StoreError::NotFound { .. })) => {
                let m = prepare::fresh(p.id, p.epoch, None);
                match meta::manifest::create(store, &m).await? {
                    Put::Stored(v) => return Ok((m, v)),
                    Put::Conflict => continue,
                }
            }
            Err(e) => return Err(e),
        };
        if m.epoch > p.epoch {
            return Err(EngineError::Fenced(format!(
                "manifest epoch {} is newer than ours ({})",
                m.epoch, p.epoch
            )));
        }
        if m.epoch == p.epoch {
            return Ok((m, ver));
        }
        let ours = prepare::taken_over(&m, p.epoch);
        match meta::manifest::swap(store, &m, ver, &ours).await? {
            Put::Stored(v) => return Ok((ours, v)),
            Put::Conflict => continue,
        }
    }
    Err(EngineError::Fenced(
        "manifest keeps changing while opening (another writer?)".into(),
    ))
}

/// Run recovery for `p`. Applies WAL records through `state`.
pub async fn recover(
    store: &DynStore,
    p: &VolumeParams,
    now: Duration,
    fs: &wal::fs::DynWalFs,
) -> Result<Recovered, EngineError> {
    let (mut manifest, mut manifest_version) = take_manifest(store, p).await?;
    let volume_sectors = p.size / SECTOR;
    let parent = match manifest.parent {
        Some(r) => Some(Arc::new(
            SnapshotView::of_parent(store.clone(), r, p.size).await?,
        )),
        None => None,
    };
    let mut state = State {
        keep_zeros: parent.is_some(),
        ..State::default()
    };
    let prev_epoch = match &manifest.checkpoint {
        Some(key) => load_checkpoint(store, p, &manifest, key, &mut state).await?,
        None => 0,
    };
    let bound = HistoryBound {
        after_chunk: manifest.last_chunk,
        min_epoch: manifest.history_epoch,
    };
    let tables = Arc::new(super::crc_table::CrcTables::default());
    apply_later_chunks(
        store,
        p,
        &mut state,
        &tables,
        prev_epoch,
        bound,
        volume_sectors,
    )
    .await?;
    state.next_compacted = super::compact::clean_orphans(store, p.id, p.epoch, &state).await?;
    let chain_keys = state
        .chain
        .keys()
        .into_iter()
        .chain(manifest.checkpoint.clone());
    super::meta::orphans::delete_orphan_checkpoints(store, p.id, p.epoch, &chain_keys.collect())
        .await?;
    state.committed_seq = state.stored_seq;
    state.taken_seq = state.stored_seq;
    state.next_chunk = state.last_chunk + 1;
    // The view starts as `stored` alone; WAL replay lays the overlay.

    // Invariant 6: the WAL is judged against the manifest as read, and its
    // new segment names our epoch before we commit it.
    let history_epoch = manifest.history_epoch;
    let wal = wal_open::open_wal(store, p, history_epoch, &mut state, now, fs).await?;
    (manifest, manifest_version) =
        commit_history(store, p, manifest, manifest_version, &state).await?;
    // A request cut short by the crash was never acknowledged: what exists
    // of it may be destaged on its own.
    if let Some(last) = state.pending.back_mut() {
        last.more = false;
    }
    Ok(Recovered {
        state,
        manifest,
        manifest_version,
        wal,
        parent,
        tables,
    })
}

/// Load the checkpoint chain `manifest` names (its newest object is
/// `key`: a full checkpoint, or a delta applied over its base and earlier
/// deltas, see [`super::meta::chain`]) into `state`, checking every
/// number first; returns the epoch of its last chunk.
async fn load_checkpoint(
    store: &DynStore,
    p: &VolumeParams,
    manifest: &Manifest,
    key: &str,
    state: &mut State,
) -> Result<u64, EngineError> {
    let cp_err = |source| EngineError::Checkpoint {
        key: key.to_string(),
        source,
    };
    let loaded =
        super::meta::chain::load(store, manifest, p.size / SECTOR, checkpoint_cap(p.size)).await?;
    let chain = loaded.chain;
    if chain.volume != p.id || chain.chunk_seq != manifest.checkpoint_chunk {
        return Err(meta::manifest::invalid(
            p.id,
            format!("checkpoint {key} does not match"),
        ));
    }
    if let Some(c) = chain.chunks.values().find(|c| c.epoch > p.epoch) {
        return Err(cp_err(super::checkpoint::CheckpointError::Inconsistent(
            format!(
                "chunk {:#x} has epoch {}, newer than ours ({})",
                c.seq, c.epoch, p.epoch
            ),
        )));
    }
    let prev_epoch = chain.chunks.get(&chain.chunk_seq).map_or(0, |c| c.epoch);
    // Live sectors per chunk, counted against the chunk list in seq order
    // (one hash lookup per extent was a tenth of the open).
    let seqs: Vec<u64> = chain.chunks.keys().copied().collect();
    let mut live = vec![0u64; seqs.len()];
    for (_, l, loc) in chain.map.iter() {
        if let super::map::Loc::Chunk { chunk, .. } = loc {
            if let Some(i) = super::checkpoint::find_seq(&seqs, chunk) {
                live[i] += l;
            }
        }
    }
    for ((seq, info), live_sectors) in chain.chunks.into_iter().zip(live) {
        state.cp_table.insert(seq, info.epoch);
        state.chunks.insert(
            seq,
            super::state::ChunkEntry {
                info: Arc::new(info),
                live_sectors,
            },
        );
    }
    state.stored = std::sync::Arc::new(chain.map);
    state.stored_seq = chain.last_seq;
    state.last_chunk = chain.chunk_seq;
    state.checkpoint_chunk = chain.chunk_seq;
    state.checkpoint_key = Some(key.to_string());
    state.chain = super::meta::chain::ChainPos {
        base: Some(loaded.base_key),
        base_bytes: loaded.base_bytes,
        deltas: loaded.delta_keys,
        delta_bytes: loaded.delta_bytes,
        chunk_seq: chain.chunk_seq,
        extendable: !loaded.base_json,
    };
    Ok(prev_epoch)
}

/// Chunks after `after_chunk` need an epoch of at least `min_epoch`.
#[derive(Clone, Copy)]
struct HistoryBound {
    after_chunk: u64,
    min_epoch: u64,
}

impl HistoryBound {
    fn admits(&self, seq: u64, epoch: u64) -> bool {
        seq <= self.after_chunk || epoch >= self.min_epoch
    }
}

/// Commit the recovered store position as ours (invariant 3), by
/// compare-and-swap on the manifest `take_manifest` returned.
async fn commit_history(
    store: &DynStore,
    p: &VolumeParams,
    manifest: Manifest,
    version: Version,
    state: &State,
) -> Result<(Manifest, Version), EngineError> {
    let m = prepare::at_position(&manifest, p.epoch, state.last_chunk, state.stored_seq);
    if m == manifest {
        return Ok((m, version));
    }
    match meta::manifest::swap(store, &manifest, version, &m).await? {
        Put::Stored(v) => Ok((m, v)),
        Put::Conflict => Err(EngineError::Fenced(
            "manifest changed while recovering (another writer took over)".into(),
        )),
    }
}

/// The chain of chunks after the checkpoint (invariants 2 and 3).
async fn apply_later_chunks(
    store: &DynStore,
    p: &VolumeParams,
    state: &mut State,
    tables: &super::crc_table::CrcTables,
    mut prev_epoch: u64,
    bound: HistoryBound,
    volume_sectors: u64,
) -> Result<(), EngineError> {
    // seq -> epochs listed.
    let mut found: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let prefix = chunk_prefix(p.id);
    let retain = super::retain_index::RetainSet::load(store, p.id).await;
    let mut orphans = Vec::new();
    for meta in store.list(&prefix).await? {
        let name = &meta.key[prefix.len()..];
        match parse_chunk_name(name) {
            Some((seq, _))
                if !valid_chunk_id(seq) || seq & super::format::limits::COMPACTED_BIT != 0 =>
            {
                log::warn!(
                    "ignoring chunk object {} with an out-of-range number",
                    meta.key
                )
            }
            Some((seq, epoch)) if seq > state.last_chunk => {
                found.entry(seq).or_default().push(epoch)
            }
            Some((seq, epoch)) => {
                let known = state
                    .chunks
                    .get(&seq)
                    .is_some_and(|c| c.info.epoch == epoch);
                if !known && epoch <= p.epoch && !retain.keeps(seq, epoch) {
                    orphans.push(meta.key);
                }
            }
            None => log::warn!("ignoring unexpected object {}", meta.key),
        }
    }
    delete_orphans(store, orphans).await?;
    let listed_epochs: Vec<u64> = found.values().flatten().copied().collect();
    // seq -> the epoch the chain took there.
    let mut used: BTreeMap<u64, u64> = BTreeMap::new();
    // Whether chunk `seq` at epoch `e` may follow a chain at `prev_epoch`.
    let admits =
        |seq: u64, prev_epoch: u64, e: u64| e <= p.epoch && e >= prev_epoch && bound.admits(seq, e);
    let pick = |seq: u64, prev_epoch: u64| {
        found.get(&seq).and_then(|es| {
            es.iter()
                .copied()
                .filter(|&e| admits(seq, prev_epoch, e))
                .max()
        })
    };
    // The listed run of chunks after the checkpoint, read ahead several
    // at once and taken in order while the chain follows it (epochs only
    // rise along the chain, so a later pick differs only where the chain
    // leaves the run; reads ahead are then dropped).
    let run: Vec<(u64, u64)> = (state.last_chunk + 1..)
        .map_while(|seq| pick(seq, prev_epoch).map(|e| (seq, e)))
        .collect();
    let mut ahead = Box::pin(
        stream::iter(run)
            .map(|(seq, epoch)| async move {
                let key = chunk_key(p.id, seq, epoch);
                let got = get_capped(store, &key, MAX_CHUNK_OBJECT_BYTES, "chunk").await;
                (seq, epoch, key, got)
            })
            .buffered(CHAIN_READS_IN_FLIGHT),
    );
    let mut ahead_follows = true;
    loop {
        let seq = state.last_chunk + 1;
        let admissible = |e: u64| admits(seq, prev_epoch, e);
        let listed = pick(seq, prev_epoch);
        let next = match listed {
            Some(epoch) => {
                let mut read_ahead = None;
                if ahead_follows {
                    match ahead.next().await {
                        Some((s, e, key, got)) if s == seq && e == epoch => {
                            read_ahead = Some((key, got?))
                        }
                        _ => ahead_follows = false,
                    }
                }
                let (key, o) = match read_ahead {
                    Some(read) => read,
                    None => {
                        let key = chunk_key(p.id, seq, epoch);
                        let o = get_capped(store, &key, MAX_CHUNK_OBJECT_BYTES, "chunk").await?;
                        (key, o)
                    }
                };
                Some((epoch, key, o))
            }
            None => {
                let hints =
                    listed_epochs
                        .iter()
                        .copied()
                        .chain([prev_epoch, bound.min_epoch, p.epoch]);
                probe(
                    store,
                    p.id,
                    seq,
                    probe_epochs(hints, prev_epoch, bound.min_epoch, admissible),
                )
                .await?
            }
        };
        let Some((epoch, key, o)) = next else { break };
        let h = decode_header(&o.data).map_err(|source| EngineError::Chunk {
            key: key.clone(),
            source,
        })?;
        let consistent = h.volume == p.id
            && h.chunk_seq == seq
            && h.epoch == epoch
            && h.first_seq == state.stored_seq + 1
            && h.header_len.checked_add(h.data_len) == Some(o.data.len() as u64);
        if h.extents.iter().any(|e| e.lba + e.sectors > volume_sectors) {
            return Err(EngineError::InvalidParams(format!(
                "chunk {key} holds data past the volume size {} (opened with a smaller size?)",
                p.size
            )));
        }
        if !consistent {
            log::warn!("chunk {key} does not continue the history; recovery stops before it");
            break;
        }
        let info = Arc::new(ChunkInfo {
            seq,
            epoch,
            data_start: h.header_len,
            data_len: h.data_len,
            table_crc: super::format::chunk::table_crc(&h.block_crcs),
        });
        tables.insert(p.id, &info, h.block_crcs.clone().into());
        state.apply_chunk_to_stored(info, &h.extents);
        state.stored_seq = h.last_seq;
        state.last_chunk = seq;
        prev_epoch = epoch;
        used.insert(seq, epoch);
    }
    if state.last_chunk < bound.after_chunk {
        return Err(meta::manifest::invalid(
            p.id,
            format!(
                "chunks up to {} are committed, but chunk {} (prefix {prefix}) is missing \
                 from the store or does not continue the history; nothing was deleted",
                bound.after_chunk,
                state.last_chunk + 1
            ),
        ));
    }
    let end = state.last_chunk;
    for (&seq, epochs) in &found {
        for &e in epochs {
            if e > p.epoch || used.get(&seq) == Some(&e) {
                continue;
            }
            let key = chunk_key(p.id, seq, e);
            if seq <= end {
                log::warn!("deleting chunk {key}: the history holds another chunk {seq}");
            } else if !bound.admits(seq, e) {
                log::warn!("deleting chunk {key}: written by a writer fenced before it landed");
            } else {
                log::warn!(
                    "keeping chunk {key} past the end of the recovered history (chunk {end}); \
                     a later open deletes it"
                );
                continue;
            }
            store.delete(&key).await?;
        }
    }
    Ok(())
}

/// Delete the chunks a crash left behind that no history names (dead
/// chunks whose checkpoint committed but whose delete never ran), many at
/// once: a crash during a large checkpoint's deletes can leave hundreds,
/// and the volume does not serve until they are gone. The first failure
/// fails the open, as a failed listing does.
async fn delete_orphans(store: &DynStore, keys: Vec<String>) -> Result<(), EngineError> {
    if keys.is_empty() {
        return Ok(());
    }
    log::warn!(
        "deleting {} orphan chunks, from {} to {}",
        keys.len(),
        keys[0],
        keys[keys.len() - 1]
    );
    let failed = delete_many(&**store, keys, DELETES_IN_FLIGHT).await;
    match failed.into_iter().next() {
        Some((_, e)) => Err(e.into()),
        None => Ok(()),
    }
}

/// Chunks of the chain after the checkpoint read at once during open.
const CHAIN_READS_IN_FLIGHT: usize = 8;

/// Most epochs tried for one missing chunk number besides the hints.
const PROBE_SPAN: u64 = 64;

/// The epochs a chunk missing from the listing could have, newest first:
/// `hints` (epochs seen in the listing, the chain's and the history's)
/// and, if the span is small, every epoch from `from` to `history`, kept
/// only where `admissible`.
fn probe_epochs(
    hints: impl Iterator<Item = u64>,
    from: u64,
    history: u64,
    admissible: impl Fn(u64) -> bool,
) -> Vec<u64> {
    let mut set: std::collections::BTreeSet<u64> = hints.collect();
    if history >= from && history - from <= PROBE_SPAN {
        set.extend(from..=history);
    }
    set.into_iter().rev().filter(|&e| admissible(e)).collect()
}

/// Read chunk `seq` directly at each of `epochs` in turn; the first that
/// exists, with its key and object.
async fn probe(
    store: &DynStore,
    volume: u64,
    seq: u64,
    epochs: Vec<u64>,
) -> Result<Option<(u64, String, crate::store::Object)>, EngineError> {
    for epoch in epochs {
        let key = chunk_key(volume, seq, epoch);
        match get_capped(store, &key, MAX_CHUNK_OBJECT_BYTES, "chunk").await {
            Ok(o) => {
                log::warn!("chunk {key} is missing from the store's listing; read it directly");
                return Ok(Some((epoch, key, o)));
            }
            Err(EngineError::Store(StoreError::NotFound { .. })) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}
