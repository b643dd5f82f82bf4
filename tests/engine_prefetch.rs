//! Readahead and shared GETs (issue 13 item 3).
//!
//! - Concurrent reads of one cold cache window send one store GET.
//! - A sequential stream is fetched ahead in large GETs (far fewer GETs
//!   than reads); reads at spread-out offsets prefetch nothing.
//! - A cold chunk costs no extra round trip for its block-CRC table: a
//!   read from the chunk's start gets header and data in one GET, any
//!   other read sends its data GET while the header GET runs; a cold
//!   sequential read costs about one GET per chunk.
//! - Model: random writes, sequential and random reads and restarts while
//!   readahead GETs are in flight (slowed by the store) never return data of
//!   a newer or older write than the map says: every read equals an
//!   in-memory reference disk (reads through `read` and `read_parts` alike).
//! - `read_parts` of a range of WAL data, a hole and cold chunk data
//!   equals `read`, and hands over the fetched chunk bytes uncopied.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use shale::clock::SystemClock;
use shale::engine::config::{Durability, EngineConfig};
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::fs::FsStore;
use shale::store::memory::MemoryStore;
use shale::store::{DynStore, Object, ObjectMeta, ObjectStore, PutMode, StoreResult, Version};

const CHUNK: u64 = 256 << 10;

/// Counts ranged GETs of chunk data, and apart from them the GETs of chunk
/// headers (ranges from offset 0: a chunk's block-CRC table, read once per
/// chunk); while `hold` is set they wait until it is cleared; `delay`
/// slows each of them.
#[derive(Debug, Default)]
struct GateStore {
    inner: MemoryStore,
    range_gets: AtomicU64,
    header_gets: AtomicU64,
    waiting: AtomicU64,
    hold: AtomicBool,
    /// Like `hold`, for header GETs only.
    hold_headers: AtomicBool,
    delay_us: AtomicU64,
}

#[async_trait]
impl ObjectStore for GateStore {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> StoreResult<Bytes> {
        if range.start == 0 {
            self.header_gets.fetch_add(1, Ordering::SeqCst);
        } else {
            self.range_gets.fetch_add(1, Ordering::SeqCst);
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while self.hold.load(Ordering::SeqCst)
            || (range.start == 0 && self.hold_headers.load(Ordering::SeqCst))
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let d = self.delay_us.load(Ordering::Relaxed);
        if d > 0 {
            tokio::time::sleep(Duration::from_micros(d)).await;
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
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

fn cfg(cache_dir: &Path, readahead: u64, cache_size: u64) -> EngineConfig {
    EngineConfig {
        chunk_size: CHUNK,
        destage_interval_ms: 20,
        max_unstored_bytes: 4 << 20,
        max_unstored_seconds: 3600,
        durability: Durability::Local,
        checkpoint_every_chunks: 8,
        checkpoint_max_deltas: 64,
        cache_size,
        cache_dir: Some(cache_dir.to_path_buf()),
        store_read_timeout_ms: 60_000,
        compact_below_percent: 25,
        readahead_max: readahead,
        prefetch_max_in_flight: 2 << 20,
        wal_memory: 32 << 20,
        wal_direct_io: false,
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Fixture {
    store: Arc<GateStore>,
    local: tempfile::TempDir,
    cache: tempfile::TempDir,
    epoch: u64,
    size: u64,
    cache_size: u64,
}

impl Fixture {
    fn new(size: u64) -> Self {
        Fixture {
            store: Arc::new(GateStore::default()),
            local: tempfile::tempdir().unwrap(),
            cache: tempfile::tempdir().unwrap(),
            epoch: 0,
            size,
            cache_size: 64 << 20,
        }
    }

    async fn open(&mut self, readahead: u64) -> Arc<Volume> {
        self.epoch += 1;
        let params = VolumeParams {
            id: 0x9f,
            size: self.size,
            epoch: self.epoch,
            local_dir: self.local.path().to_path_buf(),
        };
        let store: DynStore = self.store.clone();
        Volume::open(
            store,
            params,
            cfg(self.cache.path(), readahead, self.cache_size),
            Arc::new(SystemClock),
        )
        .await
        .unwrap()
    }

    /// Empty the read cache (the volume must be closed).
    fn drop_cache(&self) {
        for e in std::fs::read_dir(self.cache.path()).unwrap() {
            std::fs::remove_dir_all(e.unwrap().path()).unwrap();
        }
    }
}

async fn wait_destaged(v: &Volume) {
    v.flush().await.unwrap();
    for _ in 0..1000 {
        if v.stats().unstored_bytes == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("destage did not finish: {:?}", v.stats());
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

/// A volume of `size` bytes of `pattern(7)`, all in the store, reopened
/// with an empty cache.
async fn cold_volume(fx: &mut Fixture, readahead: u64) -> (Arc<Volume>, Vec<u8>) {
    let data = pattern(7, fx.size as usize);
    let v = fx.open(readahead).await;
    v.write(0, &data, false).await.unwrap();
    wait_destaged(&v).await;
    v.close().await.unwrap();
    fx.drop_cache();
    (fx.open(readahead).await, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_a_cold_window_send_one_get() {
    let mut fx = Fixture::new(4 << 20);
    let (v, data) = cold_volume(&mut fx, 0).await;
    fx.store.hold.store(true, Ordering::SeqCst);
    let before = fx.store.range_gets.load(Ordering::SeqCst);
    let headers_before = fx.store.header_gets.load(Ordering::SeqCst);
    let shared_before = v.stats().fetch_shared;
    // Eight readers of different 4 KiB blocks of one 64 KiB window.
    let base = 3 * CHUNK + (64 << 10);
    let mut reads = Vec::new();
    for i in 0..8u64 {
        let v = v.clone();
        reads.push(tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            v.read(base + i * 8192, &mut b).await.unwrap();
            (i, b)
        }));
    }
    // All readers are in: one GET waits, the other seven joined it.
    for _ in 0..10_000 {
        if v.stats().fetch_shared - shared_before >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let joined = v.stats().fetch_shared - shared_before;
    fx.store.hold.store(false, Ordering::SeqCst);
    for r in reads {
        let (i, b) = r.await.unwrap();
        let at = (base + i * 8192) as usize;
        assert!(b == data[at..at + 4096], "reader {i} got wrong data");
    }
    let gets = fx.store.range_gets.load(Ordering::SeqCst) - before;
    assert_eq!(joined, 7, "seven readers joined the first one's GET");
    assert_eq!(
        gets, 1,
        "eight concurrent readers of one window sent {gets} GETs"
    );
    let headers = fx.store.header_gets.load(Ordering::SeqCst) - headers_before;
    assert!(headers <= 1, "one chunk's header read {headers} times");
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_are_fetched_ahead_and_random_reads_are_not() {
    let size = 8 << 20;
    let mut fx = Fixture::new(size);
    let (v, data) = cold_volume(&mut fx, 1 << 20).await;
    // Reads 1 MiB apart (further than any read's length): no stream.
    let before = fx.store.range_gets.load(Ordering::SeqCst);
    let headers_before = fx.store.header_gets.load(Ordering::SeqCst);
    for i in [5u64, 1, 7, 3, 0, 6, 2, 4] {
        let at = i * (1 << 20) + 4096 * i;
        let mut b = vec![0u8; 4096];
        v.read(at, &mut b).await.unwrap();
        assert!(b == data[at as usize..at as usize + 4096]);
    }
    assert_eq!(v.stats().prefetch_bytes, 0, "random reads prefetched");
    assert_eq!(fx.store.range_gets.load(Ordering::SeqCst) - before, 8);
    // Each read is in another chunk: at most one header GET each.
    assert!(fx.store.header_gets.load(Ordering::SeqCst) - headers_before <= 8);
    v.close().await.unwrap();
    fx.drop_cache();
    let v = fx.open(1 << 20).await;
    // A sequential stream of 64 KiB reads, one at a time.
    let before = fx.store.range_gets.load(Ordering::SeqCst);
    let piece = 64usize << 10;
    let reads = size as usize / piece;
    for i in 0..reads {
        let mut b = vec![0u8; piece];
        v.read((i * piece) as u64, &mut b).await.unwrap();
        assert!(b == data[i * piece..(i + 1) * piece], "read {i}");
    }
    let gets = fx.store.range_gets.load(Ordering::SeqCst) - before;
    let s = v.stats();
    assert!(s.prefetch_bytes > size / 2, "little prefetched: {s:?}");
    // 128 reads; the readahead GETs cover up to a whole 256 KiB chunk.
    assert!(
        gets <= 2 * size / CHUNK,
        "{gets} GETs for {reads} sequential reads of {} chunks",
        size / CHUNK
    );
    assert!(s.cache_hits > reads as u64 / 2, "{s:?}");
    assert_eq!(s.prefetch_errors, 0);
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_windows_are_read_from_memory_and_abandoned_streams_give_room() {
    // Readahead holds prefetched windows in memory until they are read,
    // counted against prefetch_max_in_flight (2 MiB here). Six streams are
    // each read for 1 MiB and abandoned with readahead left unread; if
    // unread windows kept their budget, later streams would prefetch
    // nothing.
    let size = 16 << 20;
    let mut fx = Fixture::new(size);
    let (v, data) = cold_volume(&mut fx, 1 << 20).await;
    let piece = 64usize << 10;
    for stream in 0..6usize {
        let base = stream * (size as usize / 6) / piece * piece;
        let before = v.stats();
        for i in 0..16 {
            let at = base + i * piece;
            let mut b = vec![0u8; piece];
            v.read(at as u64, &mut b).await.unwrap();
            assert!(b == data[at..at + piece], "stream {stream} read {i}");
        }
        // Let its readahead GETs land (staged, unread).
        for _ in 0..1000 {
            if fx.store.waiting.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let after = v.stats();
        assert!(
            after.prefetch_bytes > before.prefetch_bytes,
            "stream {stream} prefetched nothing: {after:?}"
        );
        assert!(
            after.prefetch_hit_bytes > before.prefetch_hit_bytes,
            "stream {stream} took nothing from memory: {after:?}"
        );
    }
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_sequential_read_costs_one_get_per_chunk() {
    // Every GET counts, headers included: the chunk's header and its data
    // come in one GET when a chunk is read from its start, and readahead
    // fetches the rest of the chunk a batch ends in with that batch, so
    // no chunk is split between two GETs. (Before: a header GET and then
    // a data GET per chunk, 64 or more here.)
    let size = 8 << 20;
    let mut fx = Fixture::new(size);
    // Written a chunk's worth at a time: chunks of CHUNK bytes.
    let data = pattern(7, size as usize);
    let v = fx.open(1 << 20).await;
    for at in (0..size as usize).step_by(CHUNK as usize) {
        v.write(at as u64, &data[at..at + CHUNK as usize], false)
            .await
            .unwrap();
    }
    wait_destaged(&v).await;
    let chunks = v.stats().chunks_written;
    assert!(chunks >= size / CHUNK / 2, "{:?}", v.stats());
    v.close().await.unwrap();
    fx.drop_cache();
    let v = fx.open(1 << 20).await;
    let gets =
        || fx.store.range_gets.load(Ordering::SeqCst) + fx.store.header_gets.load(Ordering::SeqCst);
    let before = gets();
    let piece = 64usize << 10;
    for i in 0..size as usize / piece {
        let mut b = vec![0u8; piece];
        v.read((i * piece) as u64, &mut b).await.unwrap();
        assert!(b == data[i * piece..(i + 1) * piece], "read {i}");
    }
    let sent = gets() - before;
    let s = v.stats();
    assert_eq!(s.prefetch_errors, 0);
    // The first reads come before the stream is seen (one GET each).
    assert!(
        sent <= chunks + 3,
        "{sent} GETs for a cold sequential read of {chunks} chunks: {s:?}"
    );
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_read_inside_a_chunk_does_not_wait_for_the_header_first() {
    // Header GETs are held: the data GET of a read that does not start at
    // the chunk's data start must still be sent (before, it waited for the
    // header, so no data GET arrived until the header was released).
    let mut fx = Fixture::new(4 << 20);
    let (v, data) = cold_volume(&mut fx, 0).await;
    fx.store.hold_headers.store(true, Ordering::SeqCst);
    let before = fx.store.range_gets.load(Ordering::SeqCst);
    let headers_before = fx.store.header_gets.load(Ordering::SeqCst);
    let at = 5 * CHUNK + (128 << 10);
    let reader = {
        let v = v.clone();
        tokio::spawn(async move {
            let mut b = vec![0u8; 8192];
            v.read(at, &mut b).await.unwrap();
            b
        })
    };
    let mut sent = 0;
    for _ in 0..10_000 {
        sent = fx.store.range_gets.load(Ordering::SeqCst) - before;
        if sent > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let headers = fx.store.header_gets.load(Ordering::SeqCst) - headers_before;
    fx.store.hold_headers.store(false, Ordering::SeqCst);
    let b = reader.await.unwrap();
    assert_eq!(headers, 1, "the chunk's header is read once");
    assert_eq!(sent, 1, "the data GET waited for the header GET");
    assert!(b == data[at as usize..at as usize + 8192], "wrong data");
    v.close().await.unwrap();
}

/// Whether files in `dir` can be opened with `O_DIRECT` (not on tmpfs).
fn direct_io_works(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("direct-probe");
    std::fs::write(&path, [0u8; 4096]).unwrap();
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .is_ok();
    std::fs::remove_file(&path).unwrap();
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_read_fills_the_cache_from_where_the_get_put_the_bytes() {
    // On the local-directory store, a cold sequential read (a header GET
    // with the chunk's data, then readahead GETs) fills the read cache
    // with `O_DIRECT` straight from the GET buffers: no byte is copied
    // into an aligned buffer first. (Before: the data after a header of
    // any length, and every body read into an ordinary allocation, were
    // copied: about as many bytes as were cached.)
    let local = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    if !direct_io_works(cache.path()) {
        eprintln!(
            "no O_DIRECT in {}: nothing to check",
            cache.path().display()
        );
        return;
    }
    let store: DynStore = Arc::new(FsStore::new(local.path().join("store")));
    let size: u64 = 8 << 20;
    let data = pattern(11, size as usize);
    let open = |epoch: u64| {
        let params = VolumeParams {
            id: 0x51,
            size,
            epoch,
            local_dir: local.path().join("vol"),
        };
        Volume::open(
            store.clone(),
            params,
            cfg(cache.path(), 1 << 20, 64 << 20),
            Arc::new(SystemClock),
        )
    };
    let v = open(1).await.unwrap();
    for at in (0..size as usize).step_by(CHUNK as usize) {
        v.write(at as u64, &data[at..at + CHUNK as usize], false)
            .await
            .unwrap();
    }
    wait_destaged(&v).await;
    v.close().await.unwrap();
    for e in std::fs::read_dir(cache.path()).unwrap() {
        std::fs::remove_dir_all(e.unwrap().path()).unwrap();
    }
    let v = open(2).await.unwrap();
    let piece = 128usize << 10;
    for i in 0..size as usize / piece {
        let mut b = vec![0u8; piece];
        v.read((i * piece) as u64, &mut b).await.unwrap();
        assert!(b == data[i * piece..(i + 1) * piece], "read {i}");
    }
    v.close().await.unwrap();
    let s = v.stats();
    assert!(s.store_reads > 0, "the read was not cold: {s:?}");
    assert_eq!(
        s.cache_fill_copied_bytes, 0,
        "cache fills copied through the aligned buffer: {s:?}"
    );
    // The fills did land: the next open finds them.
    let v = open(3).await.unwrap();
    let s = v.stats();
    assert!(
        s.cache_restored >= size / (64 << 10) / 2,
        "few windows were cached: {s:?}"
    );
    let mut b = vec![0u8; piece];
    v.read(size / 2, &mut b).await.unwrap();
    assert!(b == data[size as usize / 2..size as usize / 2 + piece]);
    v.close().await.unwrap();
}

/// Calls of [`check`] so far: every other one reads through
/// `read_parts` (shared, uncopied bytes) instead of `read`.
static CHECKS: AtomicU64 = AtomicU64::new(0);

/// Reference disk and volume agree on `[at, at+len)`.
async fn check(v: &Volume, model: &[u8], at: u64, len: usize, what: &str) {
    let b = if CHECKS.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
        let mut b = vec![0u8; len];
        v.read(at, &mut b).await.unwrap();
        b
    } else {
        // A lent buffer of stale bytes: none of them may show.
        let parts = v.read_parts(at, vec![0xa5; len]).await.unwrap();
        assert_eq!(parts.len(), len, "{what}");
        parts.to_vec()
    };
    if b != model[at as usize..at as usize + len] {
        let first = (0..len)
            .find(|&i| b[i] != model[at as usize + i])
            .unwrap_or(0);
        panic!(
            "{what}: read of {len} bytes at {at} differs from the model at byte {}",
            at + first as u64
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_never_returns_other_writes_than_the_map_says() {
    let size: u64 = 4 << 20;
    for seed in 1..=3u64 {
        let mut fx = Fixture::new(size);
        // Smaller than the volume: windows are evicted and fetched again.
        fx.cache_size = 3 << 20;
        // Readahead GETs take a while, so writes and restarts land while
        // they are in flight.
        fx.store.delay_us.store(300, Ordering::Relaxed);
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut model = vec![0u8; size as usize];
        let mut v = fx.open(1 << 20).await;
        let mut gen = 0u64;
        let mut prefetched = 0u64;
        for step in 0..400 {
            let what = format!("seed {seed} step {step}");
            match rng.below(100) {
                // Write 4..128 KiB somewhere.
                0..=29 => {
                    gen += 1;
                    let len = (1 + rng.below(32)) * 4096;
                    let at = rng.below((size - len) / 4096) * 4096;
                    let d = pattern(seed << 32 | gen, len as usize);
                    v.write(at, &d, false).await.unwrap();
                    model[at as usize..(at + len) as usize].copy_from_slice(&d);
                }
                // A sequential run of reads (starts a readahead stream),
                // with a write inside the range read ahead now and then.
                30..=64 => {
                    let piece = 64u64 << 10;
                    let start = rng.below(size / piece - 8) * piece;
                    for i in 0..8 {
                        let at = start + i * piece;
                        check(&v, &model, at, piece as usize, &what).await;
                        if rng.below(8) == 0 {
                            gen += 1;
                            let w = at + piece + rng.below(4) * piece;
                            let len = 4096 * (1 + rng.below(8));
                            let w = w.min(size - len);
                            let d = pattern(seed << 32 | gen, len as usize);
                            v.write(w, &d, false).await.unwrap();
                            model[w as usize..(w + len) as usize].copy_from_slice(&d);
                        }
                    }
                }
                // A random read.
                65..=84 => {
                    let len = (1 + rng.below(16)) * 4096;
                    let at = rng.below((size - len) / 4096) * 4096;
                    check(&v, &model, at, len as usize, &what).await;
                }
                // Let destage move the WAL to chunks (reads then come from
                // chunks, through the cache and readahead).
                85..=92 => wait_destaged(&v).await,
                // Restart, with readahead GETs possibly in flight; now and
                // then with an empty cache.
                _ => {
                    prefetched += v.stats().prefetch_bytes;
                    v.close().await.unwrap();
                    if rng.below(2) == 0 {
                        fx.drop_cache();
                    }
                    v = fx.open(1 << 20).await;
                }
            }
        }
        // Everything, in the store, through a cold cache.
        wait_destaged(&v).await;
        prefetched += v.stats().prefetch_bytes;
        v.close().await.unwrap();
        fx.drop_cache();
        let v = fx.open(1 << 20).await;
        for at in (0..size).step_by(256 << 10) {
            check(&v, &model, at, 256 << 10, &format!("seed {seed} final")).await;
        }
        let s = v.stats();
        prefetched += s.prefetch_bytes;
        assert!(prefetched > 0, "readahead never ran (seed {seed})");
        assert_eq!(s.prefetch_errors, 0, "{s:?}");
        v.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_parts_of_wal_hole_and_chunk_data_equals_read() {
    let size: u64 = 4 << 20;
    let mut fx = Fixture::new(size);
    let (v, mut model) = cold_volume(&mut fx, 0).await;
    // Volume bytes [1 MiB, 1 MiB + 64 KiB) in the WAL, the next 64 KiB a
    // hole, the rest of the range cold chunk data (not read since the open).
    let wal_at = 1u64 << 20;
    let d = pattern(99, 64 << 10);
    v.write(wal_at, &d, false).await.unwrap();
    model[wal_at as usize..][..d.len()].copy_from_slice(&d);
    let hole = wal_at + (64 << 10);
    v.trim(hole, 64 << 10).await.unwrap();
    model[hole as usize..][..64 << 10].fill(0);
    let (at, len) = (wal_at, 512usize << 10);
    let want = &model[at as usize..at as usize + len];
    let gets = fx.store.range_gets.load(Ordering::SeqCst);
    // A lent buffer of stale bytes: every byte sent must be the volume's.
    let parts = v.read_parts(at, vec![0xa5; len]).await.unwrap();
    assert!(
        fx.store.range_gets.load(Ordering::SeqCst) > gets,
        "the chunk data was cold"
    );
    assert_eq!(parts.len(), len);
    assert!(parts.to_vec() == want, "read_parts differs from the model");
    assert!(parts.count() > 1, "WAL, hole and chunk bytes in one part");
    // The fetched chunk bytes were handed over, not copied: the lent
    // buffer still holds its stale bytes there.
    let lent = parts.into_buf();
    let chunk_from = (hole + (64 << 10) - at) as usize;
    assert!(
        lent[chunk_from..].iter().all(|&b| b == 0xa5),
        "fetched chunk bytes were copied into the lent buffer"
    );
    // `read` of the same range, now partly cached, agrees.
    let mut b = vec![0u8; len];
    v.read(at, &mut b).await.unwrap();
    assert!(b == want, "read differs from the model");
    // And so does read_parts served from the cache.
    let again = v.read_parts(at, vec![0x5a; len]).await.unwrap();
    assert!(again.to_vec() == want, "cached read_parts differs");
    // Out of range and misaligned: the same errors as read.
    let mut one = vec![0u8; 4096];
    let e1 = v.read(size, &mut one).await.unwrap_err();
    let e2 = v.read_parts(size, vec![0; 4096]).await.unwrap_err();
    assert_eq!(e1, e2);
    let e1 = v.read(1, &mut one).await.unwrap_err();
    let e2 = v.read_parts(1, vec![0; 4096]).await.unwrap_err();
    assert_eq!(e1, e2);
    v.close().await.unwrap();
}
