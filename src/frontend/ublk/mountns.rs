//! The server's own mount namespace.
//!
//! A ublk server must not share a mount namespace with users of its device:
//! a filesystem on the device mounted in the server's namespace keeps the
//! device open, and unmounting it at the server's exit needs the server. So
//! the server unshares its mount namespace, makes it private, and detaches
//! every copied mount whose source is a ublk block device (a recovering
//! server starts while the user's filesystem is still mounted).
//!
//! Invariant: after [`enter_private_namespace`] returns `Ok`, no mount in
//! this process's namespace holds a ublk block device.

use std::path::{Path, PathBuf};

/// Errors while setting up the namespace.
#[derive(Debug, thiserror::Error)]
pub enum MountNsError {
    #[error("unshare the mount namespace: {0}")]
    Unshare(nix::Error),
    #[error("make / private: {0}")]
    Private(nix::Error),
    #[error("read /proc/self/mountinfo: {0}")]
    MountInfo(std::io::Error),
    #[error("detach {path}: {source}")]
    Detach {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// One line of /proc/self/mountinfo, the fields that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub major: u32,
    pub minor: u32,
    pub mount_point: PathBuf,
}

/// Parse mountinfo text; lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _id = fields.next()?;
            let _parent = fields.next()?;
            let (major, minor) = fields.next()?.split_once(':')?;
            let _root = fields.next()?;
            let mount_point = unescape(fields.next()?);
            Some(MountEntry {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                mount_point: PathBuf::from(mount_point),
            })
        })
        .collect()
}

/// Undo mountinfo's octal escapes (`\040` for space, etc.).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Kernel name (`ublkb0`, `sda1`, ...) of block device `major:minor`, from
/// `sys_root` (normally `/sys`).
pub fn block_name(sys_root: &Path, major: u32, minor: u32) -> Option<String> {
    let link = sys_root.join(format!("dev/block/{major}:{minor}"));
    let target = std::fs::read_link(link).ok()?;
    target.file_name()?.to_str().map(str::to_string)
}

/// Whether block device `major:minor` is a ublk disk or partition.
pub fn is_ublk_block(sys_root: &Path, major: u32, minor: u32) -> bool {
    block_name(sys_root, major, minor).is_some_and(|n| n.starts_with("ublkb"))
}

/// Whether kernel block name `name` is disk `ublkb<dev_id>` or one of its
/// partitions (`ublkb<dev_id>p<k>`).
pub fn is_disk_or_partition(name: &str, dev_id: u32) -> bool {
    let disk = format!("ublkb{dev_id}");
    match name.strip_prefix(&disk) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('p')
            .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// Mount points in this process's namespace that use `/dev/ublkb<dev_id>`
/// or one of its partitions.
pub fn mounts_of_device(dev_id: u32) -> Result<Vec<PathBuf>, MountNsError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountNsError::MountInfo)?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .filter(|e| {
            block_name(Path::new("/sys"), e.major, e.minor)
                .is_some_and(|n| is_disk_or_partition(&n, dev_id))
        })
        .map(|e| e.mount_point)
        .collect())
}

/// Unshare the mount namespace, make it private and detach ublk mounts.
/// Returns the mount points that were detached.
pub fn enter_private_namespace() -> Result<Vec<PathBuf>, MountNsError> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    unshare(CloneFlags::CLONE_NEWNS).map_err(MountNsError::Unshare)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(MountNsError::Private)?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountNsError::MountInfo)?;
    let mut detached = Vec::new();
    // Last mounted first, so stacked mounts come off top-down.
    for entry in parse_mountinfo(&text).into_iter().rev() {
        if !is_ublk_block(Path::new("/sys"), entry.major, entry.minor) {
            continue;
        }
        umount2(&entry.mount_point, MntFlags::MNT_DETACH).map_err(|source| {
            MountNsError::Detach {
                path: entry.mount_point.clone(),
                source,
            }
        })?;
        detached.push(entry.mount_point);
    }
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let text = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    90 27 259:3 / /mnt/my\\040data rw - ext4 /dev/ublkb0 rw\n\
                    garbage\n";
        let e = parse_mountinfo(text);
        assert_eq!(e.len(), 2);
        assert_eq!((e[1].major, e[1].minor), (259, 3));
        assert_eq!(e[1].mount_point, PathBuf::from("/mnt/my data"));
    }

    #[test]
    fn partitions_belong_to_their_disk_only() {
        assert!(is_disk_or_partition("ublkb1", 1));
        assert!(is_disk_or_partition("ublkb1p2", 1));
        assert!(!is_disk_or_partition("ublkb10", 1));
        assert!(!is_disk_or_partition("ublkb1p", 1));
        assert!(!is_disk_or_partition("ublkb1px", 1));
        assert!(!is_disk_or_partition("sda1", 1));
    }

    #[test]
    fn ublk_devices_are_recognised_by_sysfs_name() {
        let dir = tempfile::tempdir().unwrap();
        let block = dir.path().join("dev/block");
        std::fs::create_dir_all(&block).unwrap();
        std::os::unix::fs::symlink("../../devices/virtual/block/ublkb2", block.join("259:0"))
            .unwrap();
        std::os::unix::fs::symlink("../../devices/virtual/block/loop0", block.join("7:0")).unwrap();
        assert!(is_ublk_block(dir.path(), 259, 0));
        assert!(!is_ublk_block(dir.path(), 7, 0));
        assert!(!is_ublk_block(dir.path(), 8, 0));
    }
}
