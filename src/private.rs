//! Private local files: every directory shale creates is mode 0700 and
//! every file 0600, whatever the process umask is.
//!
//! Invariants:
//! 1. [`create_dir_all`] gives each directory it creates exactly mode 0700
//!    (it sets the mode after creating, so a permissive umask such as 0 or
//!    an unusual one cannot widen or narrow it). Directories that already
//!    existed are left as they are.
//! 2. [`open_options`] creates files with mode 0600; the umask can only take
//!    bits away, so a created file is never readable by others.
//! 3. The `shale` binary also sets its umask to 0077 at start
//!    ([`restrict_umask`]), which covers files created by code that does not
//!    go through this module.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every directory shale creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file shale creates.
pub const FILE_MODE: u32 = 0o600;

/// Create `path` and its missing ancestors, each with mode 0700.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir_all(parent)?;
        }
    }
    create_dir(path)
}

/// Create one directory with mode 0700; an existing directory is fine and
/// keeps its mode.
pub fn create_dir(path: &Path) -> io::Result<()> {
    match create_new_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        r => r,
    }
}

/// Create one directory with mode 0700, failing with `AlreadyExists` if
/// the path exists (like [`std::fs::create_dir`]).
pub fn create_new_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)?;
    std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE))
}

/// `OpenOptions` whose `create` makes a 0600 file.
pub fn open_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Set the process umask to 0077 so that whatever the process creates is
/// private to its user. Returns the previous umask.
pub fn restrict_umask() -> u32 {
    // SAFETY: umask(2) only swaps the process's file mode creation mask; it
    // cannot fail and touches no memory.
    unsafe { libc::umask(0o077) as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn modes_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        create_dir_all(&nested).unwrap();
        for p in ["a", "a/b", "a/b/c"] {
            let mode = std::fs::metadata(dir.path().join(p)).unwrap().mode() & 0o7777;
            assert_eq!(mode, DIR_MODE, "{p}");
        }
        let file = nested.join("f");
        let mut f = open_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&file)
            .unwrap();
        f.write_all(b"x").unwrap();
        let mode = std::fs::metadata(&file).unwrap().mode() & 0o777;
        assert_eq!(mode & !FILE_MODE, 0, "file mode {mode:o} wider than 0600");
        // An existing directory is accepted and not changed.
        std::fs::set_permissions(dir.path().join("a"), Permissions::from_mode(0o755)).unwrap();
        create_dir_all(&nested).unwrap();
        let mode = std::fs::metadata(dir.path().join("a")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        // A file in the way is an error.
        assert!(create_dir_all(&file.join("x")).is_err());
    }
}
