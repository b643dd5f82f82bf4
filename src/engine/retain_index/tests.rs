use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::*;
use crate::engine::checkpoint::{Checkpoint, ChunkInfo};
use crate::engine::format::layout::snapshot_key;
use crate::engine::format::snapshot::SnapshotObject;
use crate::store::memory::MemoryStore;
use crate::store::{Object, ObjectMeta, ObjectStore, StoreResult};

/// A memory store that counts GETs of snapshot objects.
#[derive(Debug, Default)]
struct Counting {
    inner: MemoryStore,
    snapshot_gets: AtomicU64,
}

impl Counting {
    fn snapshot_gets(&self) -> u64 {
        self.snapshot_gets.load(Ordering::Relaxed)
    }
    fn note(&self, key: &str) {
        if key.contains("/snapshots/") {
            self.snapshot_gets.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl ObjectStore for Counting {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        self.note(key);
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.note(key);
        self.inner.get_range(key, range).await
    }
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        self.inner.put(key, data, mode).await
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key).await
    }
}

const VOL: u64 = 7;

/// Snapshot `id` of `VOL` naming chunks `(seq, 1)` for each seq.
fn snapshot(id: u64, seqs: &[u64]) -> SnapshotObject {
    let chunks = seqs
        .iter()
        .map(|&seq| ChunkInfo {
            seq,
            epoch: 1,
            data_start: crate::engine::format::chunk::MIN_HEADER_LEN,
            data_len: 0,
            table_crc: 0,
        })
        .collect();
    SnapshotObject {
        id,
        name: format!("s{id}"),
        volume: VOL,
        created_ms: 1,
        checkpoint: Checkpoint {
            chunk_seq: 100,
            chunks,
            ..Checkpoint::empty(VOL, 1, 100)
        },
        parent: None,
        deleting: false,
    }
}

async fn put_snapshot(store: &DynStore, id: u64, seqs: &[u64], mode: PutMode) {
    let data = Bytes::from(snapshot(id, seqs).encode());
    store
        .put(&snapshot_key(VOL, id), data, mode)
        .await
        .expect("put snapshot");
}

fn chunks(seqs: &[u64]) -> HashSet<(u64, u64)> {
    seqs.iter().map(|&s| (s, 1)).collect()
}

#[test]
fn index_round_trips_and_rejects_damage() {
    let mut idx = RetainIndex::default();
    idx.snapshots.insert(
        3,
        Entry {
            version: Version("\"etag-3\"".into()),
            chunks: vec![
                (1, 1),
                (2, 1),
                (5 | crate::engine::format::limits::COMPACTED_BIT, 2),
            ],
        },
    );
    idx.snapshots.insert(
        9,
        Entry {
            version: Version("17".into()),
            chunks: Vec::new(),
        },
    );
    let enc = idx.encode();
    assert_eq!(RetainIndex::decode(&enc).unwrap(), idx);
    let mut flipped = enc.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert_eq!(RetainIndex::decode(&flipped), Err(IndexDecodeError::Crc));
    assert_eq!(
        RetainIndex::decode(b"SHALERI"),
        Err(IndexDecodeError::BadMagic)
    );
    for cut in 12..enc.len() {
        assert!(
            RetainIndex::decode(&reseal(&enc[12..cut])).is_err(),
            "cut at {cut}"
        );
    }
}

/// `body` with a valid header, so decoding reaches its numbers.
fn reseal(body: &[u8]) -> Vec<u8> {
    seal(MAGIC, body)
}

#[test]
fn decode_checks_every_number() {
    let entry = |id: u64, vlen: u16, n: u32, chunks: &[(u64, u64)]| {
        let mut b = id.to_le_bytes().to_vec();
        b.extend_from_slice(&vlen.to_le_bytes());
        b.extend(std::iter::repeat_n(b'v', usize::from(vlen)));
        b.extend_from_slice(&n.to_le_bytes());
        for (s, e) in chunks {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&e.to_le_bytes());
        }
        b
    };
    let index = |count: u32, entries: &[Vec<u8>]| {
        let mut b = count.to_le_bytes().to_vec();
        for e in entries {
            b.extend_from_slice(e);
        }
        reseal(&b)
    };
    let ok = index(1, &[entry(1, 1, 1, &[(4, 1)])]);
    assert!(RetainIndex::decode(&ok).is_ok());
    let cases = [
        (
            "huge snapshot count",
            index(u32::MAX, &[entry(1, 1, 1, &[(4, 1)])]),
        ),
        (
            "huge chunk count",
            index(1, &[entry(1, 1, u32::MAX, &[(4, 1)])]),
        ),
        ("id zero", index(1, &[entry(0, 1, 0, &[])])),
        ("id out of range", index(1, &[entry(MAX_SEQ, 1, 0, &[])])),
        (
            "ids out of order",
            index(2, &[entry(5, 1, 0, &[]), entry(5, 1, 0, &[])]),
        ),
        ("version too long", index(1, &[entry(1, 2000, 0, &[])])),
        ("chunk id zero", index(1, &[entry(1, 1, 1, &[(0, 1)])])),
        (
            "epoch out of range",
            index(1, &[entry(1, 1, 1, &[(4, MAX_SEQ)])]),
        ),
        (
            "chunks out of order",
            index(1, &[entry(1, 1, 2, &[(4, 1), (4, 1)])]),
        ),
        ("trailing bytes", {
            let mut b = 1u32.to_le_bytes().to_vec();
            b.extend_from_slice(&entry(1, 1, 0, &[]));
            b.push(0);
            reseal(&b)
        }),
    ];
    for (what, bytes) in cases {
        assert!(
            matches!(
                RetainIndex::decode(&bytes),
                Err(IndexDecodeError::Malformed(_))
            ),
            "{what}: {:?}",
            RetainIndex::decode(&bytes)
        );
    }
}

#[tokio::test]
async fn second_load_reads_no_snapshot_and_changes_are_seen() {
    let counting = Arc::new(Counting::default());
    let store: DynStore = counting.clone();
    put_snapshot(&store, 1, &[1, 2], PutMode::Create).await;
    put_snapshot(&store, 2, &[2, 3], PutMode::Create).await;

    let first = retained_chunks(&store, VOL).await.unwrap();
    assert_eq!(first, chunks(&[1, 2, 3]));
    let reads_first = counting.snapshot_gets();
    assert!(reads_first >= 2, "the first load reads both snapshots");

    let second = retained_chunks(&store, VOL).await.unwrap();
    assert_eq!(second, first);
    assert_eq!(
        counting.snapshot_gets(),
        reads_first,
        "the second load is answered by the index"
    );

    // A new snapshot is read (only it); a deleted one stops retaining.
    put_snapshot(&store, 3, &[7], PutMode::Create).await;
    store.delete(&snapshot_key(VOL, 1)).await.unwrap();
    let before = counting.snapshot_gets();
    assert_eq!(
        retained_chunks(&store, VOL).await.unwrap(),
        chunks(&[2, 3, 7])
    );
    let read = counting.snapshot_gets() - before;
    assert!(
        (1..=2).contains(&read),
        "only the new snapshot is read ({read} GETs)"
    );

    // An id reused after a delete, with other chunks: the version differs,
    // so the index entry of the old snapshot is not trusted.
    store.delete(&snapshot_key(VOL, 3)).await.unwrap();
    put_snapshot(&store, 3, &[8, 9], PutMode::Create).await;
    assert_eq!(
        retained_chunks(&store, VOL).await.unwrap(),
        chunks(&[2, 3, 8, 9])
    );
    assert!(matches!(
        RetainSet::load(&store, VOL).await,
        RetainSet::Chunks(s) if s == chunks(&[2, 3, 8, 9])
    ));
}

#[tokio::test]
async fn a_corrupt_or_lying_index_costs_reads_not_chunks() {
    let store: DynStore = Arc::new(MemoryStore::new());
    put_snapshot(&store, 1, &[1, 2], PutMode::Create).await;
    retained_chunks(&store, VOL).await.unwrap();

    // Garbage in place of the index: the snapshots are read again.
    store
        .put(
            &retain_index_key(VOL),
            Bytes::from_static(b"junk"),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    assert_eq!(retained_chunks(&store, VOL).await.unwrap(), chunks(&[1, 2]));
    let rewritten = store.get(&retain_index_key(VOL)).await.unwrap();
    assert!(
        RetainIndex::decode(&rewritten.data).is_ok(),
        "the index was rewritten"
    );

    // An index that names snapshot 1 at a version it does not have now.
    let mut lying = RetainIndex::default();
    lying.snapshots.insert(
        1,
        Entry {
            version: Version("no-such-version".into()),
            chunks: Vec::new(),
        },
    );
    store
        .put(
            &retain_index_key(VOL),
            Bytes::from(lying.encode()),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    assert_eq!(retained_chunks(&store, VOL).await.unwrap(), chunks(&[1, 2]));
}

#[tokio::test]
async fn no_snapshots_write_no_index_and_a_bad_snapshot_fails() {
    let store: DynStore = Arc::new(MemoryStore::new());
    assert!(retained_chunks(&store, VOL).await.unwrap().is_empty());
    assert!(
        store.get(&retain_index_key(VOL)).await.is_err(),
        "no index written"
    );

    store
        .put(
            &snapshot_key(VOL, 4),
            Bytes::from_static(b"not a snapshot"),
            PutMode::Create,
        )
        .await
        .unwrap();
    assert!(retained_chunks(&store, VOL).await.is_err());
    assert_eq!(RetainSet::load(&store, VOL).await, RetainSet::All);
}

#[test]
fn retain_set_keeps() {
    let all = RetainSet::All;
    assert!(all.keeps(1, 1));
    let some = RetainSet::Chunks([(1, 2)].into_iter().collect());
    assert!(some.keeps(1, 2));
    assert!(!some.keeps(1, 3));
    assert!(!some.keeps(2, 2));
}
