//! Moving a WAL that does not extend the store's history out of the way.
//!
//! Every file of the WAL directory is renamed into a new directory beside
//! it; nothing is read, applied or deleted. The destination is synced
//! before the source, so a power loss in between leaves a file in both
//! places (the next open quarantines the source again), never in neither.

use std::path::Path;

use super::fs::DynWalFs;
use super::{io_err, sync_dir, WalError};

/// Move every file of `dir` into `to` (created); returns how many.
pub fn quarantine(fs: &DynWalFs, dir: &Path, to: &Path) -> Result<usize, WalError> {
    let names = fs.list(dir).map_err(|e| io_err("list WAL directory", e))?;
    fs.create_dir_all(to)
        .map_err(|e| io_err("create the quarantine directory", e))?;
    if let Some(parent) = to.parent() {
        sync_dir(fs, parent)?;
    }
    for name in &names {
        fs.rename(&dir.join(name), &to.join(name))
            .map_err(|e| io_err("move WAL segment to quarantine", e))?;
    }
    sync_dir(fs, to)?;
    sync_dir(fs, dir)?;
    Ok(names.len())
}
