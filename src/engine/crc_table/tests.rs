//! CRC table cache: verified fills, the byte budget, one GET per miss.

use super::*;
use crate::engine::format::chunk::{self, ChunkHeader};
use crate::store::faulty::{FaultPoint, FaultyStore};
use crate::store::memory::MemoryStore;
use crate::store::{ObjectStore, PutMode};

const VOLUME: u64 = 3;

/// Put chunk `seq` holding `data` and return what the map would know of it.
async fn put_chunk(store: &dyn ObjectStore, seq: u64, data: &[u8]) -> ChunkInfo {
    let h = ChunkHeader {
        volume: VOLUME,
        epoch: 1,
        chunk_seq: seq,
        first_seq: seq,
        last_seq: seq,
        extents: Vec::new(),
        block_crcs: Vec::new(),
        data_len: 0,
        header_len: 0,
    };
    let obj = chunk::encode(&h, data);
    let back = decode_header(&obj).unwrap();
    store
        .put(&chunk_key(VOLUME, seq, 1), obj.into(), PutMode::Create)
        .await
        .unwrap();
    ChunkInfo {
        seq,
        epoch: 1,
        data_start: back.header_len,
        data_len: back.data_len,
        table_crc: table_crc(&back.block_crcs),
    }
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Many concurrent misses of one cold chunk send one header GET; later
/// reads are served from memory; the table is the header's.
#[test]
fn concurrent_misses_of_one_chunk_cost_one_header_get() {
    rt().block_on(async {
        let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 1));
        let bytes = data(7, 40_000);
        let info = put_chunk(faulty.as_ref(), 5, &bytes).await;
        let store: DynStore = faulty.clone();
        let tables = Arc::new(CrcTables::new(1 << 20));
        let hold = faulty.hold(FaultPoint::GetRange, "");
        let gets = futures::future::join_all((0..16).map(|_| tables.get(&store, VOLUME, &info)));
        let (got, ()) = tokio::join!(gets, async {
            hold.reached().await;
            hold.release();
        });
        for t in got {
            assert_eq!(&*t.unwrap(), &chunk::block_crcs(&bytes)[..]);
        }
        assert_eq!(tables.header_gets(), 1);
        for _ in 0..5 {
            tables.get(&store, VOLUME, &info).await.unwrap();
        }
        assert_eq!(tables.header_gets(), 1, "warm reads sent a GET");
    });
}

/// A header whose table does not hash to the map's table CRC is refused,
/// with the chunk's key in the error; nothing is cached.
#[test]
fn a_corrupt_header_table_is_refused_with_its_key() {
    rt().block_on(async {
        let mem = Arc::new(MemoryStore::new());
        let mut info = put_chunk(mem.as_ref(), 9, &data(3, 9000)).await;
        let store: DynStore = mem;
        info.table_crc ^= 1;
        let tables = Arc::new(CrcTables::new(1 << 20));
        let e = tables.get(&store, VOLUME, &info).await.unwrap_err();
        let key = chunk_key(VOLUME, 9, 1);
        assert!(matches!(e, TableError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains(&key), "{e}");
        assert_eq!(tables.bytes(), 0);
        assert!(tables.cached(VOLUME, &info).is_none());
        // A missing object is a store error (not found), not corruption.
        info.seq = 10;
        let e = tables.get(&store, VOLUME, &info).await.unwrap_err();
        assert!(
            matches!(e.store_error(), Some(StoreError::NotFound { .. })),
            "{e}"
        );
    });
}

/// The budget bounds the bytes held; the least recently used table
/// leaves first, and an evicted table is read again from its header.
#[test]
fn the_budget_bounds_memory_and_evicts_the_least_recently_used() {
    rt().block_on(async {
        let mem = Arc::new(MemoryStore::new());
        let mut infos = Vec::new();
        for seq in 1..=6 {
            infos.push(put_chunk(mem.as_ref(), seq, &data(seq as u8, 16 * 4096)).await);
        }
        let store: DynStore = mem;
        let budget = 3 * entry_bytes(16);
        let tables = Arc::new(CrcTables::new(budget));
        for i in [0, 1, 2] {
            tables.get(&store, VOLUME, &infos[i]).await.unwrap();
        }
        assert_eq!(tables.header_gets(), 3);
        // Use 0, so 1 is the least recently used.
        assert!(tables.cached(VOLUME, &infos[0]).is_some());
        tables.get(&store, VOLUME, &infos[3]).await.unwrap();
        assert!(tables.bytes() <= budget);
        assert!(tables.cached(VOLUME, &infos[1]).is_none(), "1 kept");
        assert!(tables.cached(VOLUME, &infos[0]).is_some(), "0 evicted");
        tables.get(&store, VOLUME, &infos[1]).await.unwrap();
        assert_eq!(tables.header_gets(), 5, "1 read again");
        for i in infos.iter().chain(infos.iter()) {
            tables.get(&store, VOLUME, i).await.unwrap();
            assert!(tables.bytes() <= budget);
        }
        // A table that does not hash to the table CRC is not kept.
        assert!(!tables.insert(VOLUME, &infos[4], vec![1, 2, 3].into()));
        // A table over the whole budget is served but not kept.
        let tiny = Arc::new(CrcTables::new(10));
        tiny.get(&store, VOLUME, &infos[0]).await.unwrap();
        assert_eq!(tiny.bytes(), 0);
    });
}

/// The read path's fetch ([`crate::engine::read::fetch_within`]) across
/// many chunks with a budget of two tables: tables are evicted and read
/// again, and every read returns exactly the bytes written; a chunk whose
/// table CRC does not match is refused naming its key.
#[test]
fn reads_across_many_chunks_with_a_tiny_budget_get_exact_bytes() {
    use crate::engine::read::{fetch_within, StoreOrCrc};
    rt().block_on(async {
        let mem = Arc::new(MemoryStore::new());
        let mut chunks = Vec::new();
        for seq in 1..=12u64 {
            let bytes = data(seq as u8 | 1, 8 * 4096 + 1000 * seq as usize);
            let info = put_chunk(mem.as_ref(), seq, &bytes).await;
            chunks.push((Arc::new(info), bytes));
        }
        let store: DynStore = mem;
        let budget = 2 * entry_bytes(12);
        let tables = Arc::new(CrcTables::new(budget));
        let mut rng = 12345u64;
        for _ in 0..200 {
            let x = crate::test_rng::xorshift(&mut rng);
            let (info, bytes) = &chunks[(x % 12) as usize];
            let blocks = info.data_len.div_ceil(CRC_BLOCK);
            let first = (x >> 8) % blocks;
            let n = 1 + (x >> 16) % (blocks - first);
            let start = first * CRC_BLOCK;
            let end = ((first + n) * CRC_BLOCK).min(info.data_len);
            let key = chunk_key(VOLUME, info.seq, info.epoch);
            let budget_t = std::time::Duration::from_secs(10);
            let Ok((got, table)) = fetch_within(
                budget_t,
                store.clone(),
                &tables,
                VOLUME,
                key,
                info.clone(),
                start,
                end,
            )
            .await
            else {
                panic!("fetch of chunk {} failed", info.seq);
            };
            assert_eq!(&got[..], &bytes[start as usize..end as usize]);
            assert_eq!(&*table, &chunk::block_crcs(bytes)[..]);
            assert!(tables.bytes() <= budget);
        }
        assert!(
            tables.header_gets() > 12,
            "no table was evicted and read again"
        );
        // A table CRC the header does not match: refused, naming the key.
        let mut bad = (*chunks[3].0).clone();
        bad.table_crc ^= 0x100;
        let key = chunk_key(VOLUME, bad.seq, bad.epoch);
        let res = fetch_within(
            std::time::Duration::from_secs(10),
            store.clone(),
            &tables,
            VOLUME,
            key.clone(),
            Arc::new(bad),
            0,
            4096,
        )
        .await;
        match res {
            Err(StoreOrCrc::Crc(e)) => assert!(e.contains(&key), "{e}"),
            Err(StoreOrCrc::Store(e)) => panic!("a store error: {e}"),
            Ok(_) => panic!("a corrupt chunk was served"),
        }
    });
}

/// A cold chunk read from its data start gets the header and the data in
/// one GET; the table is kept, so the next call reads nothing and returns
/// no data; concurrent plain `get`s join that GET.
#[test]
fn the_header_and_the_first_data_come_in_one_get() {
    rt().block_on(async {
        let faulty = Arc::new(FaultyStore::new(MemoryStore::new(), 1));
        let bytes = data(9, 64 << 10);
        let info = put_chunk(faulty.as_ref(), 6, &bytes).await;
        let store: DynStore = faulty.clone();
        let tables = Arc::new(CrcTables::new(1 << 20));
        let hold = faulty.hold(FaultPoint::GetRange, "");
        let first = tables.get_with_data(&store, VOLUME, &info, 16 << 10);
        let joined = futures::future::join_all((0..4).map(|_| tables.get(&store, VOLUME, &info)));
        let (res, joined, ()) = tokio::join!(first, joined, async {
            hold.reached().await;
            hold.release();
        });
        let (t, got) = res.unwrap();
        assert_eq!(&*t, &chunk::block_crcs(&bytes)[..]);
        assert_eq!(got.as_deref(), Some(&bytes[..16 << 10]));
        for j in joined {
            assert_eq!(&*j.unwrap(), &chunk::block_crcs(&bytes)[..]);
        }
        assert_eq!(
            tables.header_gets(),
            1,
            "one GET for header, data and joiners"
        );
        let (_, again) = tables
            .get_with_data(&store, VOLUME, &info, 16 << 10)
            .await
            .unwrap();
        assert!(again.is_none(), "a cached table came with data");
        assert_eq!(tables.header_gets(), 1, "a warm table sent a GET");
    });
}

/// A table read while among the newest quarter keeps its place (no tree
/// changes); one read from further back moves to the front, so the next
/// eviction takes the least recently used other table.
#[test]
fn hot_tables_stay_in_place_and_old_ones_move_on_use() {
    rt().block_on(async {
        let mem = Arc::new(MemoryStore::new());
        let mut infos = Vec::new();
        for seq in 1..=9 {
            infos.push(put_chunk(mem.as_ref(), seq, &data(seq as u8, 4 * 4096)).await);
        }
        let store: DynStore = mem;
        let tables = Arc::new(CrcTables::new(8 * entry_bytes(4)));
        for info in &infos[..8] {
            tables.get(&store, VOLUME, info).await.unwrap();
        }
        let tick = lock(&tables.lru).tick;
        // The newest two of eight: read in place.
        assert!(tables.cached(VOLUME, &infos[7]).is_some());
        assert!(tables.cached(VOLUME, &infos[6]).is_some());
        assert_eq!(lock(&tables.lru).tick, tick, "newest quarter moved");
        // The oldest: moved to the front.
        assert!(tables.cached(VOLUME, &infos[0]).is_some());
        assert_eq!(lock(&tables.lru).tick, tick + 1);
        tables.get(&store, VOLUME, &infos[8]).await.unwrap();
        assert!(tables.cached(VOLUME, &infos[0]).is_some(), "0 evicted");
        assert!(tables.cached(VOLUME, &infos[1]).is_none(), "1 kept");
    });
}
