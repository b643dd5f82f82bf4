//! Group-committed directory fsyncs: callers that need the same directory
//! synced at about the same time share one `fsync`.
//!
//! Invariant: [`DirSyncs::sync`] returns `Ok` only after an `fsync` of the
//! directory that *started after the call began* has succeeded. Callers
//! join a round that has not started yet; a round runs only when the
//! previous one of the same directory has finished, and whoever finds no
//! round running starts the waiting one (so a sync already running never
//! covers a later caller: its entries may predate the caller's rename).
//! Each caller gets the result of exactly the round it joined.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The sync function (an `fsync` of the directory; a stand-in in tests).
pub(super) type SyncFn = dyn Fn(&Path) -> io::Result<()> + Send + Sync;

/// One round: the callers that joined it share its result.
#[derive(Default)]
struct Round {
    /// `None` until the round's sync finished.
    result: Mutex<Option<Result<(), String>>>,
}

#[derive(Default)]
struct DirState {
    /// A round's sync is running.
    running: bool,
    /// The round callers join now (not started yet).
    next: Option<Arc<Round>>,
    /// Callers waiting, for tests.
    waiting: usize,
}

/// The rounds of one directory.
#[derive(Default)]
struct Dir {
    state: Mutex<DirState>,
    done: Condvar,
}

/// Group commit of directory fsyncs, per directory.
pub(super) struct DirSyncs {
    dirs: Mutex<HashMap<PathBuf, Arc<Dir>>>,
    sync_fn: Box<SyncFn>,
}

impl std::fmt::Debug for DirSyncs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirSyncs").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `fsync` of the directory `dir`.
pub(super) fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

impl DirSyncs {
    /// Directory syncs done with `fsync`.
    pub(super) fn new() -> Self {
        Self::with_sync_fn(Box::new(fsync_dir))
    }

    /// Directory syncs done with `sync_fn`.
    pub(super) fn with_sync_fn(sync_fn: Box<SyncFn>) -> Self {
        DirSyncs {
            dirs: Mutex::new(HashMap::new()),
            sync_fn,
        }
    }

    fn dir(&self, path: &Path) -> Arc<Dir> {
        lock(&self.dirs)
            .entry(path.to_path_buf())
            .or_default()
            .clone()
    }

    /// Forget `path`'s entry when nobody else uses it.
    fn prune(&self, path: &Path, dir: Arc<Dir>) {
        let mut dirs = lock(&self.dirs);
        // Ours and the map's: nobody else can join a round here.
        if Arc::strong_count(&dir) == 2 {
            dirs.remove(path);
        }
    }

    /// Make every entry change in `dir` made before this call durable
    /// (see the module invariant). The error names the directory.
    pub(super) fn sync(&self, path: &Path) -> io::Result<()> {
        let dir = self.dir(path);
        let res = self.sync_in(path, &dir);
        self.prune(path, dir);
        res.map_err(io::Error::other)
    }

    fn sync_in(&self, path: &Path, dir: &Dir) -> Result<(), String> {
        let mut st = lock(&dir.state);
        let round = st.next.get_or_insert_with(Default::default).clone();
        loop {
            if let Some(res) = lock(&round.result).clone() {
                return res;
            }
            if !st.running {
                // Our round is the waiting one (it has no result and only
                // a waiting round lacks one while nothing runs): run it.
                let Some(mine) = st.next.take() else {
                    return Err("directory sync round lost".into());
                };
                st.running = true;
                drop(st);
                let res = (self.sync_fn)(path).map_err(|e| e.to_string());
                *lock(&mine.result) = Some(res);
                st = lock(&dir.state);
                st.running = false;
                dir.done.notify_all();
                continue;
            }
            st.waiting += 1;
            st = dir.done.wait(st).unwrap_or_else(|e| e.into_inner());
            st.waiting -= 1;
        }
    }

    /// Callers waiting for `path`'s sync (tests).
    #[cfg(test)]
    fn waiting(&self, path: &Path) -> usize {
        lock(&self.dirs)
            .get(path)
            .map_or(0, |d| lock(&d.state).waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::mpsc;

    /// A sync function that reports each start and blocks until released.
    struct Gate {
        started: Mutex<mpsc::Sender<usize>>,
        release: Mutex<mpsc::Receiver<()>>,
        calls: AtomicUsize,
    }

    fn gated() -> (
        Arc<DirSyncs>,
        Arc<Gate>,
        mpsc::Receiver<usize>,
        mpsc::Sender<()>,
    ) {
        let (stx, srx) = mpsc::channel();
        let (rtx, rrx) = mpsc::channel();
        let gate = Arc::new(Gate {
            started: Mutex::new(stx),
            release: Mutex::new(rrx),
            calls: AtomicUsize::new(0),
        });
        let g = gate.clone();
        let syncs = DirSyncs::with_sync_fn(Box::new(move |_| {
            let n = g.calls.fetch_add(1, SeqCst) + 1;
            let _ = lock(&g.started).send(n);
            let _ = lock(&g.release).recv();
            Ok(())
        }));
        (Arc::new(syncs), gate, srx, rtx)
    }

    fn wait_for_waiters(s: &DirSyncs, path: &Path, n: usize) {
        while s.waiting(path) < n {
            std::thread::yield_now();
        }
    }

    /// A caller that arrives while a sync runs is not covered by it: it
    /// returns only after a second sync, which it may share with others
    /// that arrived meanwhile.
    #[test]
    fn a_running_sync_never_covers_a_later_caller() {
        let (s, gate, started, release) = gated();
        let dir = Path::new("/d");
        let first = {
            let s = s.clone();
            std::thread::spawn(move || s.sync(dir))
        };
        assert_eq!(started.recv().unwrap(), 1, "the first sync runs");
        // Two callers arrive during sync 1.
        let later: Vec<_> = (0..2)
            .map(|_| {
                let s = s.clone();
                let g = gate.clone();
                std::thread::spawn(move || s.sync(dir).map(|()| g.calls.load(SeqCst)))
            })
            .collect();
        wait_for_waiters(&s, dir, 2);
        // Let sync 1 finish, and any sync after it.
        release.send(()).unwrap();
        release.send(()).unwrap();
        first.join().unwrap().unwrap();
        for t in later {
            assert_eq!(t.join().unwrap().unwrap(), 2, "returned after sync 2");
        }
        assert_eq!(
            gate.calls.load(SeqCst),
            2,
            "the later callers shared sync 2"
        );
        assert_eq!(s.waiting(dir), 0);
        assert!(lock(&s.dirs).is_empty(), "idle directories are forgotten");
    }

    #[test]
    fn each_caller_gets_its_rounds_result() {
        let fail = Arc::new(AtomicUsize::new(1));
        let f = fail.clone();
        let s = DirSyncs::with_sync_fn(Box::new(move |_| {
            if f.fetch_sub(1, SeqCst) == 1 {
                Err(io::Error::other("disk on fire"))
            } else {
                Ok(())
            }
        }));
        let err = s.sync(Path::new("/d")).unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        s.sync(Path::new("/d")).unwrap();
    }

    #[test]
    fn real_directories_sync() {
        let d = tempfile::tempdir().unwrap();
        let s = DirSyncs::new();
        s.sync(d.path()).unwrap();
        assert!(s.sync(&d.path().join("missing")).is_err());
    }
}
