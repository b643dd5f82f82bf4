//! Local disk trouble (issue 16, item 3).
//!
//! - The WAL's file system is full: writes fail with ENOSPC (nothing they
//!   carried is acknowledged or half-applied), every acknowledged write
//!   survives, and writes succeed again as soon as space is freed, without
//!   a restart. In-process on a WAL file system that runs out of space on
//!   command (partial writes included), and end to end with `shale nbd
//!   serve` on a size-limited tmpfs (needs root to mount; skips otherwise).
//! - A read error from the WAL file is an I/O error for that request only;
//!   a damaged read-cache file is a refetch from the store. Never wrong
//!   data, never a crash.

#[path = "support/cli.rs"]
mod cli_support;
#[path = "../tools/crashcheck/nbd.rs"]
#[allow(dead_code)]
mod nbd_client;

use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use shale::clock::SystemClock;
use shale::engine::config::EngineConfig;
use shale::engine::wal::fs::{DynWalFs, RealFs, SegFile, WalFile, WalFs};
use shale::engine::{BlockDevice, Volume, VolumeParams};
use shale::error::BlockError;
use shale::store::memory::MemoryStore;
use shale::store::DynStore;

const SIZE: u64 = 8 << 20;
const BLOCK: usize = 4096;

/// Switches shared by every file of a [`TroubleFs`].
#[derive(Debug, Default)]
struct Trouble {
    /// Reads fail with EIO while set.
    fail_reads: AtomicBool,
    /// Bytes that may still be written; writes past it fail with ENOSPC
    /// (a write that crosses it is cut short, as on a real file system).
    space: AtomicU64,
}

impl Trouble {
    fn unlimited() -> Arc<Trouble> {
        let t = Trouble::default();
        t.space.store(u64::MAX, Ordering::SeqCst);
        Arc::new(t)
    }
}

/// The real file system with [`Trouble`] injected into WAL file I/O.
#[derive(Debug)]
struct TroubleFs(Arc<Trouble>);

#[derive(Debug)]
struct TroubleFile(SegFile, Arc<Trouble>);

impl WalFile for TroubleFile {
    fn overwrite_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.0.overwrite_at(buf, off)
    }
    fn writes_through(&self) -> bool {
        self.0.writes_through()
    }
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<usize> {
        let want: usize = iov.iter().map(|s| s.len()).sum();
        let space = self.1.space.load(Ordering::SeqCst);
        if space == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if (want as u64) <= space {
            let n = self.0.write_vectored_at(iov, off)?;
            if space != u64::MAX {
                self.1.space.fetch_sub(n as u64, Ordering::SeqCst);
            }
            return Ok(n);
        }
        // Write only what fits: a prefix of the slices.
        let mut left = space as usize;
        let mut cut: Vec<IoSlice<'_>> = Vec::new();
        for s in iov {
            if left == 0 {
                break;
            }
            let n = s.len().min(left);
            cut.push(IoSlice::new(&s[..n]));
            left -= n;
        }
        let n = self.0.write_vectored_at(&cut, off)?;
        self.1.space.fetch_sub(n as u64, Ordering::SeqCst);
        Ok(n)
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.1.fail_reads.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
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

impl WalFs for TroubleFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        RealFs::default().create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        RealFs::default().list(dir)
    }
    fn create(&self, path: &Path) -> io::Result<SegFile> {
        Ok(Arc::new(TroubleFile(
            RealFs::default().create(path)?,
            self.0.clone(),
        )))
    }
    fn open(&self, path: &Path) -> io::Result<SegFile> {
        Ok(Arc::new(TroubleFile(
            RealFs::default().open(path)?,
            self.0.clone(),
        )))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        RealFs::default().remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealFs::default().rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        RealFs::default().sync_dir(dir)
    }
}

/// Every WAL read goes to the files (`wal_memory: 0`): these tests make
/// them fail.
fn cfg(destage_interval_ms: u64) -> EngineConfig {
    EngineConfig {
        chunk_size: 64 << 10,
        destage_interval_ms,
        max_unstored_bytes: 64 << 20,
        max_unstored_seconds: 3600,
        cache_size: 1 << 20,
        wal_memory: 0,
        wal_direct_io: false,
        ..EngineConfig::default()
    }
}

async fn open(
    store: &DynStore,
    dir: &Path,
    epoch: u64,
    trouble: &Arc<Trouble>,
    destage_interval_ms: u64,
) -> Arc<Volume> {
    let fs: DynWalFs = Arc::new(TroubleFs(trouble.clone()));
    Volume::open_with_fs(
        store.clone(),
        VolumeParams {
            id: 0x16,
            size: SIZE,
            epoch,
            local_dir: dir.to_path_buf(),
        },
        cfg(destage_interval_ms),
        Arc::new(SystemClock),
        fs,
    )
    .await
    .expect("open the volume")
}

fn block(i: u64, gen: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|j| (i as u8).wrapping_mul(31) ^ (gen as u8).wrapping_mul(7) ^ (j as u8) | 1)
        .collect()
}

async fn read_block(v: &Volume, i: u64) -> Result<Vec<u8>, BlockError> {
    let mut b = vec![0u8; BLOCK];
    v.read(i * BLOCK as u64, &mut b).await?;
    Ok(b)
}

/// The WAL's file system fills up in the middle of a run of writes: the
/// writes that do not fit fail with ENOSPC (not EIO), the log is not
/// broken, writes succeed again once space is freed, and every
/// acknowledged write is read back, also after a crash and replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_wal_file_system_fails_writes_with_enospc_then_recovers() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let trouble = Trouble::unlimited();
    // No destage: everything stays in the WAL.
    let v = open(&store, dir.path(), 1, &trouble, 3_600_000).await;
    let mut acked: Vec<Option<u64>> = vec![None; 64];
    for i in 0..16u64 {
        v.write(i * BLOCK as u64, &block(i, 1), false)
            .await
            .unwrap();
        acked[i as usize] = Some(1);
    }
    // Room for about two and a half more records (header + 4 KiB each).
    trouble.space.store(10_500, Ordering::SeqCst);
    let mut nospace = 0;
    for i in 16..32u64 {
        match v.write(i * BLOCK as u64, &block(i, 2), false).await {
            Ok(()) => acked[i as usize] = Some(2),
            Err(e) => {
                assert_eq!(e.errno(), libc::ENOSPC, "a full disk must be ENOSPC: {e}");
                nospace += 1;
            }
        }
    }
    assert!(nospace > 0, "no write met the full file system");
    // Flushes of what was acknowledged still work on a full disk.
    v.flush().await.expect("flush on a full file system");
    // Space is freed: writes work again, without a restart.
    trouble.space.store(u64::MAX, Ordering::SeqCst);
    for i in 32..48u64 {
        v.write(i * BLOCK as u64, &block(i, 3), false)
            .await
            .unwrap_or_else(|e| panic!("write {i} after space was freed: {e}"));
        acked[i as usize] = Some(3);
    }
    v.flush().await.unwrap();
    for (i, g) in acked.iter().enumerate() {
        if let Some(g) = g {
            let got = read_block(&v, i as u64).await.unwrap();
            assert!(got == block(i as u64, *g), "block {i} read back wrong");
        }
    }
    // kill -9 and replay: every acknowledged write is there.
    v.crash().await;
    drop(v);
    let v = open(&store, dir.path(), 2, &trouble, 3_600_000).await;
    for (i, g) in acked.iter().enumerate() {
        if let Some(g) = g {
            let got = read_block(&v, i as u64).await.unwrap();
            assert!(got == block(i as u64, *g), "block {i} lost by replay");
        }
    }
    v.close().await.expect("close");
}

/// A failing WAL read fails that read with EIO and nothing else: writes go
/// on, destage waits and retries, and once the file reads again every byte
/// is right and the volume closes cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_read_errors_fail_only_that_read() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let trouble = Trouble::unlimited();
    let v = open(&store, dir.path(), 1, &trouble, 3_600_000).await;
    for i in 0..8u64 {
        v.write(i * BLOCK as u64, &block(i, 1), false)
            .await
            .unwrap();
    }
    trouble.fail_reads.store(true, Ordering::SeqCst);
    let e = read_block(&v, 3)
        .await
        .expect_err("a WAL read error must fail the read");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    // Writes only append; they still work.
    v.write(20 * BLOCK as u64, &block(20, 1), false)
        .await
        .unwrap();
    v.flush().await.unwrap();
    trouble.fail_reads.store(false, Ordering::SeqCst);
    for i in (0..8u64).chain([20]) {
        assert!(read_block(&v, i).await.unwrap() == block(i, 1), "block {i}");
    }
    // Destage (which reads the WAL) runs into the errors at close and
    // retries until they stop.
    trouble.fail_reads.store(true, Ordering::SeqCst);
    let t2 = trouble.clone();
    let healer = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        t2.fail_reads.store(false, Ordering::SeqCst);
    });
    v.close().await.expect("close once the WAL reads again");
    healer.await.unwrap();
    // Everything reached the store: read it back without the local dir.
    let other = tempfile::tempdir().unwrap();
    let v = open(&store, other.path(), 2, &Trouble::unlimited(), 3_600_000).await;
    for i in (0..8u64).chain([20]) {
        assert!(read_block(&v, i).await.unwrap() == block(i, 1), "block {i}");
    }
    v.close().await.unwrap();
}

/// A damaged or unreadable read-cache file is a miss: the data is fetched
/// from the store again, never returned wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_read_cache_is_refetched_from_the_store() {
    let store: DynStore = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let trouble = Trouble::unlimited();
    // Destage at once, so reads come from chunks (and fill the cache).
    let v = open(&store, dir.path(), 1, &trouble, 10).await;
    for i in 0..64u64 {
        v.write(i * BLOCK as u64, &block(i, 1), false)
            .await
            .unwrap();
    }
    v.close().await.unwrap();
    let v = open(&store, dir.path(), 2, &trouble, 10).await;
    for i in 0..64u64 {
        assert!(read_block(&v, i).await.unwrap() == block(i, 1));
    }
    let before = v.stats();
    assert!(before.store_reads > 0, "reads did not go to the store");
    let cache = dir.path().join("cache/data");
    let len = std::fs::metadata(&cache).unwrap().len();
    // Garbage over the whole cache, then cut it short: CRC mismatches and
    // short reads.
    std::fs::write(&cache, vec![0xA5u8; (len / 2) as usize]).unwrap();
    for i in 0..64u64 {
        assert!(
            read_block(&v, i).await.unwrap() == block(i, 1),
            "block {i} wrong after the cache was damaged"
        );
    }
    let after = v.stats();
    assert!(
        after.store_reads > before.store_reads,
        "damaged cache entries were not refetched"
    );
    v.close().await.unwrap();
}

// ---- end to end: `shale nbd serve` with its data_dir on a full tmpfs ----

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after printing SKIP) when not root (the in-process test
    /// above covers the same logic without privileges) or when mounting
    /// fails as root, which panics instead when CI=true.
    fn mount(size: &str) -> Option<Tmpfs> {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let dir = tempfile::tempdir().unwrap();
        if euid() != 0 {
            eprintln!(
                "SKIP: full WAL file system end to end: not root (mounting a tmpfs needs it)"
            );
            return None;
        }
        let why = {
            let out = std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0700"),
                    "tmpfs",
                ])
                .arg(dir.path())
                .output();
            match out {
                Ok(o) if o.status.success() => return Some(Tmpfs { dir }),
                Ok(o) => format!("mount failed: {}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => format!("mount not runnable: {e}"),
            }
        };
        assert!(!ci, "CI=true and the tmpfs test cannot run: {why}");
        eprintln!("SKIP: full WAL file system end to end: {why}");
        None
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Fill `path` with a file until the file system is full; returns its path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5Au8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

#[test]
fn nbd_writes_on_a_full_tmpfs_get_enospc_and_recover_when_space_is_freed() {
    use nbd_client::{NbdAddr, NbdClient};
    let Some(tmpfs) = Tmpfs::mount("48M") else {
        return;
    };
    let data = tmpfs.path().join("data");
    let store_dir = tempfile::tempdir().unwrap();
    // Destage does not run while the disk fills (every 60 s, or once a
    // 32 MiB chunk gathered: more than the tmpfs holds), so the WAL grows;
    // its bound is far above what the tmpfs holds. (With 4 MiB chunks a
    // destage that keeps up recycles the preallocated segments, and the
    // WAL never needs more space.)
    let env = cli_support::CliEnv::with_config(&format!(
        "data_dir: {}\nstore:\n  type: fs\n  path: {}\nengine:\n  destage_interval_ms: 60000\n  chunk_size: 32MiB\n  max_unstored_seconds: 600\n  cache_size: 0\n",
        data.display(),
        store_dir.path().display()
    ));
    env.ok(&["volume", "create", "full", "--size", "64MiB"]);
    let sock = env.path("nbd.sock");
    let server = env.serve_nbd("full", &sock, "error");
    let addr = NbdAddr::Unix {
        socket: sock.to_str().unwrap().to_string(),
        export: "full".to_string(),
    };
    let mut c = NbdClient::connect(&addr).unwrap();
    const B: usize = 64 << 10;
    let blk =
        |i: u64, g: u8| -> Vec<u8> { (0..B).map(|j| (j as u8) ^ (i as u8) ^ g | 1).collect() };
    let mut acked = Vec::new();
    for i in 0..16u64 {
        c.write_at(i * B as u64, &blk(i, 1)).unwrap();
        acked.push(i);
    }
    // Fill the disk, then write until a write fails; every acknowledged
    // block is recorded. The WAL's preallocated segments (the current one
    // and its spares) take writes on a full disk, so this writes past
    // them (up to four times the volume, wrapping around it) until a
    // segment has to grow.
    let filler = fill(&tmpfs.path());
    let mut first_error = None;
    let blocks = 64u64 * (1 << 20) / B as u64;
    for n in 16..4 * blocks {
        let i = n % blocks;
        match c.write_at(i * B as u64, &blk(i, 1)) {
            Ok(()) => acked.push(i),
            Err(e) => {
                first_error = Some(format!("{e:#}"));
                break;
            }
        }
    }
    let err = first_error.expect("the full tmpfs never failed a write");
    eprintln!(
        "ENOSPC: {} blocks of 64 KiB acknowledged before: {err}",
        acked.len()
    );
    assert!(err.contains("error 28"), "expected ENOSPC (28): {err}");
    // Reads and flushes still work.
    c.flush().expect("flush on a full disk");
    let mut buf = vec![0u8; B];
    for &i in &acked {
        c.read_at(i * B as u64, &mut buf).unwrap();
        assert!(buf == blk(i, 1), "block {i}");
    }
    // Free the space: the same connection writes again.
    std::fs::remove_file(&filler).unwrap();
    for i in 512..528u64 {
        c.write_at(i * B as u64, &blk(i, 2))
            .unwrap_or_else(|e| panic!("write after space was freed: {e:#}"));
    }
    c.flush().unwrap();
    c.disconnect();
    server.stop();
    // Restart: every acknowledged write is there.
    let server = env.serve_nbd("full", &sock, "error");
    let mut c = NbdClient::connect(&addr).unwrap();
    // Blocks 512..528 were written again after the space was freed.
    for &i in acked.iter().filter(|&&i| !(512..528).contains(&i)) {
        c.read_at(i * B as u64, &mut buf).unwrap();
        assert!(buf == blk(i, 1), "block {i} lost");
    }
    for i in 512..528u64 {
        c.read_at(i * B as u64, &mut buf).unwrap();
        assert!(buf == blk(i, 2), "block {i} lost");
    }
    c.disconnect();
    server.stop();
}
