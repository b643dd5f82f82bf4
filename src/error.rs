//! The small, stable error kind seen at the edge (frontends, CLI), and the one
//! place where errors become errno values.
//!
//! Modules keep their own precise `thiserror` enums; they convert into
//! [`BlockError`] when a request crosses into a frontend.

use std::fmt;

/// What went wrong with a block request, as a frontend needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// Misaligned offset or length, or otherwise malformed request.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The request reaches past the end of the volume.
    #[error("out of range: offset {offset} length {len} exceeds volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The pool has no space for the write; existing data is intact.
    #[error(
        "no space left in the pool (pool.capacity): this write was refused and changed nothing"
    )]
    NoSpace,
    /// The local disk holding the WAL is full; this write was not logged
    /// (nothing changed) and writes succeed again once space is freed.
    #[error(
        "no space left on the local disk: {0}; this write was refused and changed nothing, \
         writes succeed again once space is freed"
    )]
    LocalNoSpace(String),
    /// This server lost its lease; it must not write.
    #[error("volume is fenced: {0}")]
    Fenced(String),
    /// The volume is read-only (a snapshot view, or opened read-only).
    #[error("volume is read-only")]
    ReadOnly,
    /// Data could not be read or written (including checksum mismatch).
    #[error("I/O error: {0}")]
    Io(String),
    /// The volume is shutting down.
    #[error("volume is closed")]
    Closed,
}

impl BlockError {
    /// The errno a kernel or NBD client should see. The only errno mapping.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::InvalidArgument(_) | BlockError::OutOfRange { .. } => libc::EINVAL,
            BlockError::NoSpace | BlockError::LocalNoSpace(_) => libc::ENOSPC,
            BlockError::ReadOnly => libc::EROFS,
            BlockError::Fenced(_) | BlockError::Io(_) | BlockError::Closed => libc::EIO,
        }
    }
}

/// Render any error chain on one line (`a: b: c`) for CLI output.
pub fn one_line(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        out.push_str(": ");
        out.push_str(&e.to_string());
        src = e.source();
    }
    out
}

/// Marker for displaying byte sizes with binary units.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut v = self.0 as f64;
        let mut i = 0;
        while v >= 1024.0 && i + 1 < UNITS.len() {
            v /= 1024.0;
            i += 1;
        }
        if i == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[i])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(BlockError::NoSpace.errno(), libc::ENOSPC);
        assert_eq!(BlockError::LocalNoSpace("x".into()).errno(), libc::ENOSPC);
        assert_eq!(BlockError::Io("x".into()).errno(), libc::EIO);
        assert_eq!(
            BlockError::OutOfRange {
                offset: 0,
                len: 1,
                size: 0
            }
            .errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn byte_display() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(4 << 20).to_string(), "4.0 MiB");
    }
}
