//! Sparse files: finding the non-zero parts of a buffer, the data segments
//! of a file (so holes are never read), and writing raw images that keep
//! zeros as holes (or as real zeros on a stream).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Granule of hole detection: the usual filesystem block size.
pub const HOLE_GRANULE: u64 = 4096;

/// Byte ranges `[s, e)` of `buf` holding a non-zero byte, at `granule`
/// boundaries counted from absolute position `base` (so runs line up with
/// file system blocks); adjacent non-zero granules are merged.
pub fn nonzero_runs(buf: &[u8], base: u64, granule: u64) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut s = 0usize;
    while s < buf.len() {
        let abs = base + s as u64;
        let next = (abs / granule + 1) * granule;
        let e = ((next - base) as usize).min(buf.len());
        if buf[s..e].iter().any(|&b| b != 0) {
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        s = e;
    }
    out
}

/// The data segments `[start, end)` of the first `len` bytes of `file`
/// (`SEEK_DATA`/`SEEK_HOLE`); everything else reads as zeros. Where the
/// file system cannot tell, the whole range is one segment.
pub fn data_segments(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a file descriptor we own (borrowed from `file`,
        // alive for the call); it only moves the file offset.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                // No data after `pos`.
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if out.is_empty() && pos == 0 => {
                    Ok(vec![(0, len)])
                }
                _ => Err(err),
            };
        }
        let data = data as u64;
        if data >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = (hole as u64).min(len);
        out.push((data, end));
        pos = end;
    }
    Ok(out)
}

/// Where a raw image goes.
pub enum RawSink {
    /// A regular file of the image's size: only non-zero data is written,
    /// the rest stays holes.
    Sparse(File),
    /// A stream (standard output): zeros are written out in order.
    Stream {
        out: Box<dyn Write + Send>,
        pos: u64,
    },
}

static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];

impl RawSink {
    /// A sparse file sized `size` (truncated to it first).
    pub fn sparse(file: File, size: u64) -> std::io::Result<RawSink> {
        file.set_len(0)?;
        file.set_len(size)?;
        Ok(RawSink::Sparse(file))
    }

    /// A stream starting at image offset 0.
    pub fn stream(out: Box<dyn Write + Send>) -> RawSink {
        RawSink::Stream { out, pos: 0 }
    }

    /// Write `data` at image `offset` (offsets only grow on a stream).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match self {
            RawSink::Sparse(f) => f.write_all_at(data, offset),
            RawSink::Stream { .. } => {
                self.zeros_to(offset)?;
                let RawSink::Stream { out, pos } = self else {
                    return Ok(());
                };
                out.write_all(data)?;
                *pos += data.len() as u64;
                Ok(())
            }
        }
    }

    /// Fill a stream with zeros up to `offset` (nothing on a sparse file).
    fn zeros_to(&mut self, offset: u64) -> std::io::Result<()> {
        if let RawSink::Stream { out, pos } = self {
            if offset < *pos {
                return Err(std::io::Error::other(format!(
                    "stream went back from {pos} to {offset}"
                )));
            }
            while *pos < offset {
                let n = (offset - *pos).min(ZEROS.len() as u64) as usize;
                out.write_all(&ZEROS[..n])?;
                *pos += n as u64;
            }
        }
        Ok(())
    }

    /// Complete an image of `size` bytes: trailing zeros on a stream, then
    /// flush (and fsync a file).
    pub fn finish(mut self, size: u64) -> std::io::Result<()> {
        self.zeros_to(size)?;
        match self {
            RawSink::Sparse(f) => f.sync_all(),
            RawSink::Stream { mut out, .. } => out.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn runs_line_up_with_granules() {
        let mut buf = vec![0u8; 16384];
        buf[100] = 1;
        buf[4096] = 1;
        buf[12300] = 1;
        assert_eq!(nonzero_runs(&buf, 0, 4096), vec![(0, 8192), (12288, 16384)]);
        // A buffer starting mid-granule: the first run ends at the granule
        // boundary of the absolute position.
        assert_eq!(nonzero_runs(&buf[..200], 4000, 4096), vec![(96, 200)]);
        assert_eq!(nonzero_runs(&buf[90..200], 4000, 4096), vec![(0, 96)]);
        assert_eq!(nonzero_runs(&[1u8; 200], 4000, 4096), vec![(0, 200)]);
        assert_eq!(nonzero_runs(&vec![0u8; 8192], 0, 4096), vec![]);
    }

    #[test]
    fn data_segments_skip_holes_and_streams_write_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut sink = RawSink::sparse(File::create(&path).unwrap(), 8 << 20).unwrap();
        sink.write_at(1 << 20, &[5u8; 4096]).unwrap();
        sink.write_at(6 << 20, &[6u8; 4096]).unwrap();
        sink.finish(8 << 20).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 8 << 20);
        let segs = data_segments(&f, 8 << 20).unwrap();
        let covered: u64 = segs.iter().map(|(s, e)| e - s).sum();
        assert!(segs
            .iter()
            .any(|&(s, e)| s <= 1 << 20 && e >= (1 << 20) + 4096));
        assert!(segs
            .iter()
            .any(|&(s, e)| s <= 6 << 20 && e >= (6 << 20) + 4096));
        // A file system without hole reporting gives one segment; any with
        // it gives far less than the whole file.
        assert!(covered == 8 << 20 || covered < 4 << 20, "{segs:?}");

        let out = dir.path().join("stream");
        let file = File::create(&out).unwrap();
        let mut sink = RawSink::stream(Box::new(file));
        sink.write_at(1024, &[3u8; 512]).unwrap();
        assert!(sink.write_at(0, &[1u8; 512]).is_err());
        sink.finish(4096).unwrap();
        let mut got = Vec::new();
        File::open(&out).unwrap().read_to_end(&mut got).unwrap();
        let mut want = vec![0u8; 4096];
        want[1024..1536].fill(3);
        assert_eq!(got, want);
    }
}
