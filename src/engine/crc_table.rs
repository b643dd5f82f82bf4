//! A bounded cache of chunk block-CRC tables.
//!
//! A chunk's table (one CRC32C per [`CRC_BLOCK`] of its data area) lives in
//! the chunk object's header; the map and checkpoints keep only its CRC
//! ([`ChunkInfo::table_crc`]). Readers get the table here: from memory,
//! or by a ranged GET of the header when the chunk is first read (a reader
//! of the data area's start takes its data in the same GET, since header
//! and data lie back to back: [`CrcTables::get_with_data`]).
//!
//! Invariants:
//! 1. A table is handed out only if it hashes to the `table_crc` the caller
//!    holds ([`table_crc`]); a header whose table does not is a corrupt
//!    chunk ([`TableError::Corrupt`], naming the key) and nothing is
//!    cached or served from it.
//! 2. Memory is bounded: the tables held (counted as [`entry_bytes`])
//!    never exceed the byte budget; the least recently used leave first,
//!    where a use of a table among the newest quarter (by last move)
//!    leaves it in place: such a table is not near eviction, and hot
//!    reads skip two tree changes each.
//!    A table larger than the whole budget is served but not kept.
//! 3. Concurrent misses of one chunk share one header GET.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};

use super::checkpoint::ChunkInfo;
use super::format::chunk::{decode_header, table_crc, CRC_BLOCK};
use super::format::layout::chunk_key;
use crate::store::{DynStore, StoreError};

/// Default byte budget (16 MiB: the tables of 16 GiB of chunk data).
pub const DEFAULT_BUDGET: usize = 16 << 20;

/// A chunk object: `(volume, seq, epoch)`.
type ChunkId = (u64, u64, u64);

/// A verified block-CRC table.
pub type Table = Arc<[u32]>;

/// Bytes a cached table is counted for: its CRCs plus bookkeeping.
pub fn entry_bytes(crcs: usize) -> usize {
    crcs * 4 + 96
}

/// Why a table could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The header GET failed (`transient`: worth retrying; `not_found`:
    /// the object is gone).
    #[error("reading the header of {key}: {reason}")]
    Store {
        key: String,
        reason: String,
        transient: bool,
        not_found: bool,
    },
    /// The header does not decode, names another chunk, or its table does
    /// not hash to the table CRC the map holds.
    #[error("chunk {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

impl TableError {
    /// The store error this stands for (`None` for a corrupt chunk).
    pub fn store_error(&self) -> Option<StoreError> {
        match self {
            TableError::Store { key, not_found, .. } if *not_found => {
                Some(StoreError::NotFound { key: key.clone() })
            }
            TableError::Store {
                transient, reason, ..
            } => Some(if *transient {
                StoreError::Transient(reason.clone())
            } else {
                StoreError::Permanent(reason.clone())
            }),
            TableError::Corrupt { .. } => None,
        }
    }
}

type Flight = Shared<BoxFuture<'static, Result<Table, TableError>>>;

#[derive(Default)]
struct Lru {
    /// Chunk -> (table CRC, table, last-use tick).
    tables: HashMap<ChunkId, (u32, Table, u64)>,
    /// Last-use tick -> chunk (oldest first).
    order: BTreeMap<u64, ChunkId>,
    tick: u64,
    bytes: usize,
}

/// The cache (see the module docs).
pub struct CrcTables {
    budget: usize,
    lru: Mutex<Lru>,
    flights: Mutex<HashMap<ChunkId, Flight>>,
    header_gets: AtomicU64,
}

impl std::fmt::Debug for CrcTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrcTables")
            .field("budget", &self.budget)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl Default for CrcTables {
    fn default() -> Self {
        CrcTables::new(DEFAULT_BUDGET)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CrcTables {
    /// An empty cache holding at most `budget` bytes of tables.
    pub fn new(budget: usize) -> CrcTables {
        CrcTables {
            budget,
            lru: Mutex::new(Lru::default()),
            flights: Mutex::new(HashMap::new()),
            header_gets: AtomicU64::new(0),
        }
    }

    /// Header GETs sent so far.
    pub fn header_gets(&self) -> u64 {
        self.header_gets.load(Ordering::Relaxed)
    }

    /// Bytes of tables held (at most the budget: invariant 2).
    pub fn bytes(&self) -> usize {
        lock(&self.lru).bytes
    }

    /// The table of chunk `info` of `volume` if held and matching its
    /// table CRC (counted as a use).
    pub fn cached(&self, volume: u64, info: &ChunkInfo) -> Option<Table> {
        let mut lru = lock(&self.lru);
        let id = (volume, info.seq, info.epoch);
        let tick = lru.tick;
        let newest_quarter = (lru.tables.len() / 4) as u64;
        let (crc, table, at) = lru.tables.get_mut(&id)?;
        if *crc != info.table_crc {
            return None;
        }
        let table = table.clone();
        if tick - *at > newest_quarter {
            // Invariant 2: only a table outside the newest quarter moves
            // (two tree changes); one inside is far from eviction anyway.
            let old = std::mem::replace(at, tick);
            lru.order.remove(&old);
            lru.order.insert(tick, id);
            lru.tick += 1;
        }
        Some(table)
    }

    /// Keep `crcs` as the table of chunk `info` of `volume` if it hashes
    /// to `info.table_crc` (invariant 1; otherwise nothing is kept and
    /// false is returned).
    pub fn insert(&self, volume: u64, info: &ChunkInfo, crcs: Table) -> bool {
        if table_crc(&crcs) != info.table_crc {
            return false;
        }
        let cost = entry_bytes(crcs.len());
        if cost > self.budget {
            return true;
        }
        let mut lru = lock(&self.lru);
        let id = (volume, info.seq, info.epoch);
        let tick = lru.tick;
        lru.tick += 1;
        if let Some((_, old, at)) = lru.tables.insert(id, (info.table_crc, crcs, tick)) {
            lru.bytes -= entry_bytes(old.len());
            lru.order.remove(&at);
        }
        lru.order.insert(tick, id);
        lru.bytes += cost;
        while lru.bytes > self.budget {
            let Some((_, victim)) = lru.order.pop_first() else {
                break;
            };
            if let Some((_, t, _)) = lru.tables.remove(&victim) {
                lru.bytes -= entry_bytes(t.len());
            }
        }
        true
    }

    /// The verified table of chunk `info` of `volume`: from memory, or
    /// read from the chunk header in `store` (one GET however many callers
    /// miss at once: invariant 3).
    pub async fn get(
        self: &Arc<Self>,
        store: &DynStore,
        volume: u64,
        info: &ChunkInfo,
    ) -> Result<Table, TableError> {
        Ok(self.get_with_data(store, volume, info, 0).await?.0)
    }

    /// Like [`CrcTables::get`], but when this call is the one that reads
    /// the header, its GET also takes the first `data_end` bytes of the
    /// chunk's data area (the header and the data lie back to back in the
    /// object, so a cold chunk read from its start costs one request, not
    /// a header GET and then a data GET), returned unverified as the
    /// second element (the caller checks them against the table). `None`
    /// when the table came from memory or from another caller's GET (or
    /// `data_end` is 0).
    pub async fn get_with_data(
        self: &Arc<Self>,
        store: &DynStore,
        volume: u64,
        info: &ChunkInfo,
        data_end: u64,
    ) -> Result<(Table, Option<Bytes>), TableError> {
        if let Some(t) = self.cached(volume, info) {
            return Ok((t, None));
        }
        let id = (volume, info.seq, info.epoch);
        let data_end = data_end.min(info.data_len);
        let (flight, data) = {
            let mut flights = lock(&self.flights);
            match flights.get(&id) {
                Some(f) => (f.clone(), None),
                None => {
                    let (this, store, info) = (Arc::clone(self), store.clone(), info.clone());
                    let (tx, rx) = futures::channel::oneshot::channel();
                    let f = async move {
                        let res = this.read_header(&store, volume, &info, data_end).await;
                        let res = res.map(|(t, data)| {
                            this.insert(volume, &info, t.clone());
                            let _ = tx.send(data);
                            t
                        });
                        lock(&this.flights).remove(&(volume, info.seq, info.epoch));
                        res
                    }
                    .boxed()
                    .shared();
                    flights.insert(id, f.clone());
                    (f, Some(rx))
                }
            }
        };
        let t = flight.await?;
        // The flight sent its data before it ended (when it succeeded).
        let data = match data {
            Some(mut rx) => rx.try_recv().ok().flatten().filter(|d| !d.is_empty()),
            None => None,
        };
        // A flight for an older table CRC (a reused name: never in a real
        // store) is not this chunk's table.
        if table_crc(&t) != info.table_crc {
            return Err(corrupt(volume, info, "its CRC table changed".into()));
        }
        Ok((t, data))
    }

    /// Read and check the header of chunk `info` (invariant 1), with the
    /// first `data_end` bytes of its data area (unchecked) in the same GET.
    async fn read_header(
        &self,
        store: &DynStore,
        volume: u64,
        info: &ChunkInfo,
        data_end: u64,
    ) -> Result<(Table, Bytes), TableError> {
        let key = chunk_key(volume, info.seq, info.epoch);
        self.header_gets.fetch_add(1, Ordering::Relaxed);
        // Placed so the data area starts on a page boundary: the read
        // cache writes its windows with `O_DIRECT` from where they landed
        // instead of copying them into an aligned buffer first.
        let got = store
            .get_range_placed(&key, 0..info.data_start + data_end, info.data_start)
            .await
            .map_err(|e| TableError::Store {
                key: key.clone(),
                transient: e.is_transient(),
                not_found: matches!(e, StoreError::NotFound { .. }),
                reason: e.to_string(),
            })?;
        let split = usize::try_from(info.data_start).unwrap_or(usize::MAX);
        let Some(head) = got.get(..split) else {
            return Err(corrupt(volume, info, "its header is short".into()));
        };
        let h = decode_header(head).map_err(|e| corrupt(volume, info, e.to_string()))?;
        let why = if h.chunk_seq != info.seq || h.epoch != info.epoch {
            Some("its header names another chunk".to_string())
        } else if h.header_len != info.data_start || h.data_len != info.data_len {
            Some("its header's lengths differ from the map's".to_string())
        } else if h.block_crcs.len() as u64 != info.data_len.div_ceil(CRC_BLOCK) {
            Some("its header lists the wrong number of block CRCs".to_string())
        } else if table_crc(&h.block_crcs) != info.table_crc {
            Some(format!(
                "its block-CRC table does not match the table CRC {:#010x} the map holds",
                info.table_crc
            ))
        } else {
            None
        };
        if let Some(why) = why {
            // Once per key however many reads hit it (the read path
            // reports the same key again: also deduplicated).
            super::damage::report(&key, &why);
            return Err(corrupt(volume, info, why));
        }
        Ok((h.block_crcs.into(), got.slice(split..)))
    }
}

fn corrupt(volume: u64, info: &ChunkInfo, reason: String) -> TableError {
    TableError::Corrupt {
        key: chunk_key(volume, info.seq, info.epoch),
        reason,
    }
}

#[cfg(test)]
mod tests;
