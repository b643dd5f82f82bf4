//! A file system in memory that can lose power, for crash tests of the WAL.
//!
//! Each file keeps two images: what readers see (the page cache) and what
//! was last made durable by [`WalFile::sync_data`]. Each directory keeps
//! two sets of entries: the current ones and those made durable by
//! [`WalFs::sync_dir`]. [`PowerLossFs::lose_power`] throws away everything
//! that was not durable, as a host losing power would: files whose entry
//! was never synced vanish, removed or renamed entries come back where the
//! directory was not synced, and every file holds its last synced bytes.
//!
//! Simplification: directories themselves (not their entries) are taken as
//! durable once created.
//!
//! [`PowerLossFs::padded`] also models the real file's O_DIRECT writes
//! (protocol rule 6 of [`super::fs`]): every write zeroes the rest of its
//! last 4 KiB block, up to the file's length. Preallocation
//! ([`WalFile::allocate`]) extends the file with zeros, durable at the
//! next sync like any length change.

use std::collections::BTreeMap;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::fs::{SegFile, WalFile, WalFs};

#[derive(Debug, Default)]
struct Node {
    data: Vec<u8>,
    synced: Vec<u8>,
    /// The byte range changed since the last sync (so a sync of a big
    /// preallocated file copies only what changed).
    dirty: Option<(usize, usize)>,
}

impl Node {
    fn touch(&mut self, lo: usize, hi: usize) {
        self.dirty = Some(match self.dirty {
            None => (lo, hi),
            Some((a, b)) => (a.min(lo), b.max(hi)),
        });
    }
}

type NodeRef = Arc<Mutex<Node>>;

fn lock(n: &NodeRef) -> MutexGuard<'_, Node> {
    n.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct Dir {
    now: BTreeMap<String, NodeRef>,
    durable: BTreeMap<String, NodeRef>,
}

/// See the module docs. Clones share the same files.
#[derive(Debug, Default, Clone)]
pub struct PowerLossFs {
    dirs: Arc<Mutex<BTreeMap<PathBuf, Dir>>>,
    padded: bool,
}

#[derive(Debug)]
struct MemFile(NodeRef, bool);

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        (Some(d), Some(n)) => Ok((d.to_path_buf(), n.to_string())),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad path {}", path.display()),
        )),
    }
}

impl PowerLossFs {
    pub fn new() -> PowerLossFs {
        PowerLossFs::default()
    }

    /// A file system whose writes pad their last block with zeros, as the
    /// real one does with O_DIRECT (see the module docs).
    pub fn padded() -> PowerLossFs {
        PowerLossFs {
            padded: true,
            ..PowerLossFs::default()
        }
    }

    fn dirs(&self) -> MutexGuard<'_, BTreeMap<PathBuf, Dir>> {
        self.dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drop every byte and directory entry that was not made durable.
    /// Files still open keep working on what is left.
    pub fn lose_power(&self) {
        let mut dirs = self.dirs();
        for d in dirs.values_mut() {
            d.now = d.durable.clone();
            for n in d.now.values() {
                let mut n = lock(n);
                n.data = n.synced.clone();
                n.dirty = None;
            }
        }
    }

    /// The bytes readers see in `path` now, if it exists.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let (dir, name) = split(path).ok()?;
        let dirs = self.dirs();
        let n = dirs.get(&dir)?.now.get(&name)?.clone();
        drop(dirs);
        let data = lock(&n).data.clone();
        Some(data)
    }

    /// Replace what readers see in `path` (not durable until synced), to
    /// damage a file on purpose.
    pub fn overwrite(&self, path: &Path, data: Vec<u8>) -> io::Result<()> {
        let f = self.open(path)?;
        f.set_len(0)?;
        let mut off = 0;
        while off < data.len() {
            off += f.write_vectored_at(&[IoSlice::new(&data[off..])], off as u64)?;
        }
        Ok(())
    }

    fn node(&self, path: &Path) -> io::Result<NodeRef> {
        let (dir, name) = split(path)?;
        let dirs = self.dirs();
        dirs.get(&dir)
            .and_then(|d| d.now.get(&name))
            .cloned()
            .ok_or_else(|| not_found(path))
    }
}

impl MemFile {
    /// Write `iov` at `off`, padding its last block with zeros when `pad`.
    fn put(&self, iov: &[IoSlice<'_>], off: u64, pad: bool) -> io::Result<usize> {
        let mut n = lock(&self.0);
        let mut pos = usize::try_from(off)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let start = pos;
        for s in iov {
            let end = pos + s.len();
            if n.data.len() < end {
                n.data.resize(end, 0);
            }
            n.data[pos..end].copy_from_slice(s);
            pos = end;
        }
        let mut hi = pos;
        if pad {
            let block = super::fs::DIRECT_BLOCK as usize;
            let pad_end = pos.div_ceil(block).saturating_mul(block).min(n.data.len());
            if pad_end > pos {
                n.data[pos..pad_end].fill(0);
                hi = pad_end;
            }
        }
        n.touch(start, hi);
        Ok(pos - start)
    }
}

impl WalFile for MemFile {
    fn write_vectored_at(&self, iov: &[IoSlice<'_>], off: u64) -> io::Result<usize> {
        self.put(iov, off, self.1)
    }
    fn overwrite_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.put(&[IoSlice::new(buf)], off, false).map(|_| ())
    }
    fn writes_through(&self) -> bool {
        self.1
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let n = lock(&self.0);
        let src = usize::try_from(off)
            .ok()
            .and_then(|o| n.data.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut n = lock(&self.0);
        let len = n.data.len();
        if let Some((lo, hi)) = n.dirty.take() {
            let Node { data, synced, .. } = &mut *n;
            synced.resize(len, 0);
            let (lo, hi) = (lo.min(len), hi.min(len));
            synced[lo..hi].copy_from_slice(&data[lo..hi]);
        }
        n.synced.truncate(len);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        let mut n = lock(&self.0);
        let old = n.data.len();
        n.data.resize(len, 0);
        n.touch(old.min(len), old.max(len));
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(lock(&self.0).data.len() as u64)
    }
}

impl WalFs for PowerLossFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut dirs = self.dirs();
        for d in dir.ancestors() {
            dirs.entry(d.to_path_buf()).or_default();
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(self
            .dirs()
            .get(dir)
            .map(|d| d.now.keys().cloned().collect())
            .unwrap_or_default())
    }

    fn create(&self, path: &Path) -> io::Result<SegFile> {
        let (dir, name) = split(path)?;
        let mut dirs = self.dirs();
        let d = dirs.get_mut(&dir).ok_or_else(|| not_found(&dir))?;
        let node = d.now.entry(name).or_default().clone();
        {
            let mut n = lock(&node);
            let old = n.data.len();
            n.data.clear();
            n.touch(0, old);
        }
        Ok(Arc::new(MemFile(node, self.padded)))
    }

    fn open(&self, path: &Path) -> io::Result<SegFile> {
        Ok(Arc::new(MemFile(self.node(path)?, self.padded)))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let (dir, name) = split(path)?;
        let mut dirs = self.dirs();
        dirs.get_mut(&dir)
            .and_then(|d| d.now.remove(&name))
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (fdir, fname) = split(from)?;
        let (tdir, tname) = split(to)?;
        let mut dirs = self.dirs();
        if !dirs.contains_key(&tdir) {
            return Err(not_found(&tdir));
        }
        let node = dirs
            .get_mut(&fdir)
            .and_then(|d| d.now.remove(&fname))
            .ok_or_else(|| not_found(from))?;
        if let Some(d) = dirs.get_mut(&tdir) {
            d.now.insert(tname, node);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut dirs = self.dirs();
        let d = dirs.get_mut(dir).ok_or_else(|| not_found(dir))?;
        d.durable = d.now.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(f: &SegFile, off: u64, b: &[u8]) {
        f.write_vectored_at(&[IoSlice::new(b)], off).unwrap();
    }

    #[test]
    fn only_synced_bytes_and_entries_survive() {
        let fs = PowerLossFs::new();
        let d = Path::new("/v/wal");
        fs.create_dir_all(d).unwrap();
        let a = fs.create(&d.join("a")).unwrap();
        write(&a, 0, b"hello");
        fs.sync_dir(d).unwrap();
        a.sync_data().unwrap();
        write(&a, 5, b" world");
        let b = fs.create(&d.join("b")).unwrap();
        write(&b, 0, b"lost");
        b.sync_data().unwrap(); // data synced, entry never: the file is lost
        assert_eq!(fs.contents(&d.join("a")).unwrap(), b"hello world");
        fs.lose_power();
        assert_eq!(fs.contents(&d.join("a")).unwrap(), b"hello");
        assert!(fs.contents(&d.join("b")).is_none());
        assert_eq!(fs.list(d).unwrap(), vec!["a".to_string()]);
    }

    #[test]
    fn unsynced_remove_and_rename_come_back() {
        let fs = PowerLossFs::new();
        let (d, q) = (Path::new("/v/wal"), Path::new("/v/q"));
        fs.create_dir_all(d).unwrap();
        fs.create_dir_all(q).unwrap();
        for n in ["a", "b"] {
            let f = fs.create(&d.join(n)).unwrap();
            write(&f, 0, n.as_bytes());
            f.sync_data().unwrap();
        }
        fs.sync_dir(d).unwrap();
        fs.remove(&d.join("a")).unwrap();
        fs.rename(&d.join("b"), &q.join("b")).unwrap();
        fs.sync_dir(q).unwrap(); // the source directory is not synced
        fs.lose_power();
        assert_eq!(fs.list(d).unwrap(), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(fs.contents(&q.join("b")).unwrap(), b"b");
        let f = fs.open(&d.join("a")).unwrap();
        f.set_len(0).unwrap();
        fs.lose_power();
        assert_eq!(fs.contents(&d.join("a")).unwrap(), b"a", "cut not synced");
    }
}
