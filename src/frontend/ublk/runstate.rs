//! Run-state records: one small JSON file per attached volume in a run
//! directory (default `/run/shale`), so `shale list`, `del` and `recover`
//! can find the device and the server of a volume.
//!
//! Invariants:
//! 1. A record is written atomically (temporary file + rename).
//! 2. Volume names are checked before they become file names: only
//!    `[A-Za-z0-9._-]`, at most 128 bytes, not starting with `.`.
//! 3. A record is a hint: callers confirm it against the kernel and /proc.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default directory of run-state records.
pub const DEFAULT_RUN_DIR: &str = "/run/shale";

/// Errors of the run-state store.
#[derive(Debug, thiserror::Error)]
pub enum RunStateError {
    #[error("invalid volume name {0:?}: use letters, digits, '.', '_' and '-' (not leading '.'), at most 128 bytes")]
    BadName(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt run-state record: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What is known about one attached volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    pub volume: String,
    pub dev_id: u32,
    pub pid: i32,
    pub queues: u16,
    pub depth: u16,
    /// Extra server arguments needed to serve the same data again (recovery).
    #[serde(default)]
    pub backing: Vec<String>,
}

/// Largest run-state record accepted (real ones are a few hundred bytes).
pub const MAX_RECORD_BYTES: u64 = 64 << 10;

/// Check a volume name for use as a file name and a /dev/shale link.
pub fn check_volume_name(name: &str) -> Result<(), RunStateError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(RunStateError::BadName(name.to_string()))
    }
}

/// The directory of records.
#[derive(Debug, Clone)]
pub struct RunDir {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunStateError + '_ {
    move |source| RunStateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl RunDir {
    pub fn new(dir: impl Into<PathBuf>) -> RunDir {
        RunDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, volume: &str) -> Result<PathBuf, RunStateError> {
        check_volume_name(volume)?;
        Ok(self.dir.join(format!("{volume}.json")))
    }

    /// Log file of a volume's detached server.
    pub fn log_path(&self, volume: &str) -> Result<PathBuf, RunStateError> {
        check_volume_name(volume)?;
        Ok(self.dir.join(format!("{volume}.log")))
    }

    /// Store (replace) the record of `rec.volume`.
    pub fn write(&self, rec: &DeviceRecord) -> Result<(), RunStateError> {
        let path = self.record_path(&rec.volume)?;
        crate::private::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let tmp = self.dir.join(format!(".{}.json.tmp", rec.volume));
        let body = serde_json::to_vec_pretty(rec).map_err(|source| RunStateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = crate::private::open_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(&body).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(())
    }

    /// The record of `volume`, if any. At most [`MAX_RECORD_BYTES`] are
    /// read: a larger file is corrupt, not a reason to allocate without end.
    pub fn read(&self, volume: &str) -> Result<Option<DeviceRecord>, RunStateError> {
        let path = self.record_path(volume)?;
        let read = fs::File::open(&path).and_then(|f| {
            use std::io::Read;
            let mut bytes = Vec::new();
            f.take(MAX_RECORD_BYTES + 1).read_to_end(&mut bytes)?;
            if bytes.len() as u64 > MAX_RECORD_BYTES {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("run-state record larger than {MAX_RECORD_BYTES} bytes"),
                ));
            }
            Ok(bytes)
        });
        match read {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| RunStateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RunStateError::Io { path, source }),
        }
    }

    /// Remove the record of `volume` (absent is fine).
    pub fn remove(&self, volume: &str) -> Result<(), RunStateError> {
        let path = self.record_path(volume)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RunStateError::Io { path, source }),
        }
    }

    /// Every readable record, sorted by device id. Unreadable or corrupt
    /// files are reported through `on_bad` and skipped.
    pub fn list(&self, mut on_bad: impl FnMut(RunStateError)) -> Vec<DeviceRecord> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(source) => {
                on_bad(RunStateError::Io {
                    path: self.dir.clone(),
                    source,
                });
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(volume) = name.strip_suffix(".json") else {
                continue;
            };
            if check_volume_name(volume).is_err() {
                continue;
            }
            match self.read(volume) {
                Ok(Some(rec)) => out.push(rec),
                Ok(None) => {}
                Err(e) => on_bad(e),
            }
        }
        out.sort_by_key(|r| r.dev_id);
        out
    }

    /// The record whose device id is `dev_id`.
    pub fn find_by_dev_id(&self, dev_id: u32) -> Option<DeviceRecord> {
        self.list(|_| {}).into_iter().find(|r| r.dev_id == dev_id)
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    // An exited child nobody reaped yet still answers signal 0.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat_is_zombie(&stat),
        Err(_) => true,
    }
}

/// Whether a /proc/PID/stat line shows state Z (zombie) or X (dead).
fn stat_is_zombie(stat: &str) -> bool {
    // The command name is in parentheses and may contain spaces or ')'.
    match stat.rfind(')') {
        Some(i) => matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
        None => false,
    }
}

/// Directory of the stable device links.
pub const LINK_DIR: &str = "/dev/shale";

/// Point `<link_dir>/<volume>` at `/dev/ublkb<dev_id>` (atomically replaced).
pub fn create_link(link_dir: &Path, volume: &str, dev_id: u32) -> Result<PathBuf, RunStateError> {
    check_volume_name(volume)?;
    fs::create_dir_all(link_dir).map_err(io_err(link_dir))?;
    let link = link_dir.join(volume);
    let tmp = link_dir.join(format!(".{volume}.tmp"));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("/dev/ublkb{dev_id}"), &tmp).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &link).map_err(io_err(&link))?;
    Ok(link)
}

/// Remove `<link_dir>/<volume>` if it still points at `/dev/ublkb<dev_id>`.
pub fn remove_link(link_dir: &Path, volume: &str, dev_id: u32) -> Result<(), RunStateError> {
    check_volume_name(volume)?;
    let link = link_dir.join(volume);
    match fs::read_link(&link) {
        Ok(target) if target == Path::new(&format!("/dev/ublkb{dev_id}")) => {
            fs::remove_file(&link).map_err(io_err(&link))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RunStateError::Io { path: link, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombie_state_is_parsed_after_the_command_name() {
        assert!(stat_is_zombie("42 (shale) Z 1 42"));
        assert!(stat_is_zombie("42 (a) b) X 1"));
        assert!(!stat_is_zombie("42 (Z) S 1 42"));
        assert!(!stat_is_zombie("garbage"));
    }

    #[test]
    fn own_pid_is_alive_and_nonsense_pids_are_not() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_alive(-5));
    }
}
