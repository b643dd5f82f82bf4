//! One WAL record per write request, checked per 4 KiB block (issue 12,
//! item 1): a big write is one record and one map extent, a small read
//! inside it reads and checks only the blocks it covers, and a bad block
//! fails just the reads that cover it.

#[path = "support/engine.rs"]
mod engine_support;
use std::io::{self, IoSlice};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use shale::clock::SystemClock;
use shale::engine::wal::fs::{real, DynWalFs, SegFile, WalFile, WalFs};
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const SIZE: u64 = 16 << 20;
const MIB: usize = 1 << 20;

/// The real file system, counting the bytes read from WAL files.
#[derive(Debug, Default)]
struct CountingFs {
    read: Arc<AtomicU64>,
}

#[derive(Debug)]
struct CountingFile(SegFile, Arc<AtomicU64>);

impl WalFile for CountingFile {
    fn overwrite_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.0.overwrite_at(buf, off)
    }
    fn writes_through(&self) -> bool {
        self.0.writes_through()
    }
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<usize> {
        self.0.write_vectored_at(iov, off)
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.1.fetch_add(buf.len() as u64, Ordering::SeqCst);
        self.0.read_exact_at(buf, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        self.0.size()
    }
}

impl WalFs for CountingFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        real().create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        real().list(dir)
    }
    fn create(&self, path: &Path) -> io::Result<SegFile> {
        Ok(Arc::new(CountingFile(
            real().create(path)?,
            self.read.clone(),
        )))
    }
    fn open(&self, path: &Path) -> io::Result<SegFile> {
        Ok(Arc::new(CountingFile(
            real().open(path)?,
            self.read.clone(),
        )))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        real().remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        real().rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        real().sync_dir(dir)
    }
}

/// A volume whose WAL reads all go to the files (`engine.wal_memory: 0`):
/// these tests count and damage what is read from them.
async fn open(store: &DynStore, dir: &Path, epoch: u64, fs: DynWalFs) -> Arc<Volume> {
    open_keeping(store, dir, epoch, fs, 0, 4 << 20).await
}

/// A volume keeping `wal_memory` bytes of its newest records in memory.
async fn open_keeping(
    store: &DynStore,
    dir: &Path,
    epoch: u64,
    fs: DynWalFs,
    wal_memory: u64,
    chunk_size: u64,
) -> Arc<Volume> {
    let params = VolumeParams {
        id: 0x12,
        size: SIZE,
        epoch,
        local_dir: dir.to_path_buf(),
    };
    let mut cfg = engine_support::destage_on_close(chunk_size);
    cfg.wal_memory = wal_memory;
    Volume::open_with_fs(store.clone(), params, cfg, Arc::new(SystemClock), fs)
        .await
        .unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(7) ^ (i >> 9) as u8 | 1)
        .collect()
}

/// The WAL segment holding `needle`, its bytes and where `needle` starts.
fn find(dir: &Path, needle: &[u8]) -> (std::path::PathBuf, Vec<u8>, usize) {
    for e in std::fs::read_dir(dir.join("wal")).unwrap() {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            return (path, bytes, at);
        }
    }
    panic!("no WAL segment holds the bytes");
}

/// A 1 MiB write is one WAL record and one map extent (before: 32 records
/// of 32 KiB, 32 extents); a 4 KiB read inside it reads 4 KiB and one
/// 4-byte CRC from the WAL (before: the whole 32 KiB record around it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_write_is_one_record_and_a_small_read_reads_little() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(CountingFs::default());
    let read = fs.read.clone();
    let v = open(&store, dir.path(), 1, fs).await;
    let before = v.stats();
    let d = pattern(5, MIB);
    v.write(2 * MIB as u64, &d, false).await.unwrap();
    let after = v.stats();
    assert_eq!(after.last_seq - before.last_seq, 1, "WAL records of 1 MiB");
    assert_eq!(after.map_extents, 1, "map extents of 1 MiB");

    read.store(0, Ordering::SeqCst);
    let mut b = vec![0u8; 4096];
    v.read(2 * MIB as u64 + 512 * 1024, &mut b).await.unwrap();
    assert!(b == d[512 * 1024..516 * 1024]);
    assert_eq!(
        read.load(Ordering::SeqCst),
        4096 + 4,
        "bytes read for 4 KiB"
    );

    // One sector read is one block; a read across a block edge two.
    read.store(0, Ordering::SeqCst);
    let mut b = vec![0u8; 512];
    v.read(2 * MIB as u64 + 4096 * 3 + 1024, &mut b)
        .await
        .unwrap();
    assert!(b == d[4096 * 3 + 1024..4096 * 3 + 1536]);
    assert_eq!(read.load(Ordering::SeqCst), 4096 + 4);
    read.store(0, Ordering::SeqCst);
    let mut b = vec![0u8; 1024];
    v.read(2 * MIB as u64 + 4096 * 8 - 512, &mut b)
        .await
        .unwrap();
    assert!(b == d[4096 * 8 - 512..4096 * 8 + 512]);
    assert_eq!(read.load(Ordering::SeqCst), 2 * (4096 + 4));
    v.close().await.unwrap();
}

/// Sector ranges of the two writes of [`sector_granular_records_and_a_bad_block`].
async fn check_ranges(v: &Volume, at: u64, d: &[u8], small: &[u8]) {
    let len = d.len();
    for (off, n) in [
        (0, 512),
        (512, 4096),
        (len - 2048, 2048),
        (4096 * 5 + 512, 9 * 512),
    ] {
        let mut b = vec![0u8; n];
        v.read(at + off as u64, &mut b).await.unwrap();
        assert!(b == d[off..off + n], "range {off}+{n}");
    }
    let mut b = vec![0u8; 2048];
    v.read(0, &mut b).await.unwrap();
    assert!(b[..512] == [0u8; 512] && b[512..] == small[..]);
}

/// Writes of any sector multiple (the last CRC block short) read back in
/// any sector range, before and after replay; a bad block fails only the
/// reads that cover it, with an I/O error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sector_granular_records_and_a_bad_block() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let v = open(&store, dir.path(), 1, real()).await;
    let len = MIB + 3 * 512;
    let at = 3 * MIB as u64 + 7 * 512;
    let d = pattern(9, len);
    v.write(at, &d, false).await.unwrap();
    let small = pattern(11, 1536);
    v.write(512, &small, false).await.unwrap();
    v.flush().await.unwrap();
    assert_eq!(v.stats().last_seq, 2);
    check_ranges(&v, at, &d, &small).await;
    // Replay (after a crash) rebuilds the same map from the records.
    v.crash().await;
    drop(v);
    let v = open(&store, dir.path(), 2, real()).await;
    check_ranges(&v, at, &d, &small).await;
    assert_eq!(v.stats().map_extents, 2);

    // Damage one block of the big record (its 101st block of data).
    let (seg, bytes, start) = find(dir.path(), &d[..4096]);
    let bad = start + 100 * 4096 + 33;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[bytes[bad] ^ 0x40], bad as u64).unwrap();
    // Block 100 of the record holds volume bytes at + 100*4096 ...
    let mut b = vec![0u8; 4096];
    let err = v.read(at + 100 * 4096, &mut b).await.unwrap_err();
    assert!(err.to_string().to_lowercase().contains("checksum"), "{err}");
    let mut b = vec![0u8; 512];
    assert!(v.read(at + 100 * 4096 + 7 * 512, &mut b).await.is_err());
    // ... its neighbours still read.
    let mut b = vec![0u8; 4096];
    v.read(at + 99 * 4096, &mut b).await.unwrap();
    assert!(b == d[99 * 4096..100 * 4096]);
    v.read(at + 101 * 4096, &mut b).await.unwrap();
    assert!(b == d[101 * 4096..102 * 4096]);
    v.crash().await;
}

/// Writes a mix of 1 MiB and 4 KiB requests, reads them back, closes
/// (destaging everything) and reads the volume again from the store
/// alone; returns the bytes read from WAL files meanwhile. Chunks are
/// larger than all the writes, so nothing is destaged before the close
/// (a read racing a destage may find its records gone from memory and
/// read the file: right bytes, but a count that varies).
async fn write_read_destage(wal_memory: u64) -> u64 {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(CountingFs::default());
    let read = fs.read.clone();
    let v = open_keeping(&store, dir.path(), 1, fs, wal_memory, SIZE).await;
    let mut want = vec![0u8; SIZE as usize];
    for i in 0..10usize {
        let d = pattern(i as u8, MIB);
        let at = i * MIB + (i % 3) * 4096;
        v.write(at as u64, &d, false).await.unwrap();
        want[at..at + MIB].copy_from_slice(&d);
        let small = pattern(100 + i as u8, 4096);
        let at = (i * 7 + 3) * 65536;
        v.write(at as u64, &small, i % 4 == 0).await.unwrap();
        want[at..at + 4096].copy_from_slice(&small);
    }
    let mut got = vec![0u8; SIZE as usize];
    v.read(0, &mut got).await.unwrap();
    assert!(got == want, "read back before destage");
    v.close().await.unwrap();
    assert!(v.stats().chunks_written >= 1, "{:?}", v.stats());
    drop(v);
    // The store alone (an empty local directory) holds the same bytes.
    let other = tempfile::tempdir().unwrap();
    let v = open(&store, other.path(), 2, real()).await;
    let mut got = vec![0u8; SIZE as usize];
    v.read(0, &mut got).await.unwrap();
    assert!(got == want, "read back from the store alone");
    v.close().await.unwrap();
    read.load(Ordering::SeqCst)
}

/// With `engine.wal_memory`, fresh records are read back and built into
/// chunks from memory: nothing is read from the WAL files, and the store
/// ends up with the same bytes. Without it the same work reads every
/// record back from the files (what every chunk build did before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_records_are_read_and_destaged_from_memory() {
    let from_files = write_read_destage(0).await;
    // Read back once, built into a chunk once.
    assert!(
        from_files >= 20 * MIB as u64,
        "{from_files} bytes read without it"
    );
    assert_eq!(
        write_read_destage(32 << 20).await,
        0,
        "bytes read from WAL files"
    );
}

/// A tail smaller than what was written serves what it still holds and
/// leaves the rest to the files: every byte still reads back right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_wal_memory_serves_the_newest_and_reads_the_rest_from_files() {
    let from_files = write_read_destage(2 << 20).await;
    assert!(from_files > 0, "the oldest records came from the files");
    assert!(from_files < write_read_destage(0).await);
}
