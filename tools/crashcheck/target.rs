//! Where the blocks go: a block device or file (O_DIRECT unless asked
//! otherwise, FLUSH by `fdatasync`) or an NBD export (FLUSH by
//! `NBD_CMD_FLUSH`).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use anyhow::{bail, Context, Result};

use crate::nbd::{NbdAddr, NbdClient};

/// Alignment O_DIRECT needs for buffers (enough for any logical block size).
const ALIGN: usize = 4096;

/// A buffer of `len` bytes at a 4 KiB-aligned address, without `unsafe`:
/// a larger vector and the aligned window inside it.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        AlignedBuf { raw, start, len }
    }
    pub fn get(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    pub fn get_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// An open target.
pub enum Target {
    Device { file: File, path: String },
    Nbd(NbdClient),
}

impl Target {
    /// Open `spec`: an `nbd://` / `nbd+unix://` URI or a path. Paths are
    /// opened with O_DIRECT unless `buffered`.
    pub fn open(spec: &str, buffered: bool) -> Result<Target> {
        if let Some(addr) = NbdAddr::parse(spec) {
            return Ok(Target::Nbd(NbdClient::connect(&addr)?));
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if !buffered {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(spec).with_context(|| format!("open {spec}"))?;
        Ok(Target::Device {
            file,
            path: spec.to_string(),
        })
    }

    /// Size in bytes.
    pub fn size(&mut self) -> Result<u64> {
        match self {
            Target::Device { file, path } => file
                .seek(SeekFrom::End(0))
                .with_context(|| format!("size of {path}")),
            Target::Nbd(c) => Ok(c.size()),
        }
    }

    /// Fail unless `blocks` blocks of `block_size` bytes fit.
    pub fn check_fits(&mut self, blocks: u64, block_size: usize) -> Result<()> {
        let need = blocks
            .checked_mul(block_size as u64)
            .context("blocks × block size overflows")?;
        let size = self.size()?;
        if need > size {
            bail!("{blocks} blocks of {block_size} bytes need {need} bytes; the target has {size}");
        }
        Ok(())
    }

    pub fn write_at(&mut self, offset: u64, buf: &AlignedBuf) -> Result<()> {
        match self {
            Target::Device { file, path } => file
                .write_all_at(buf.get(), offset)
                .with_context(|| format!("write {path} at {offset}")),
            Target::Nbd(c) => c.write_at(offset, buf.get()),
        }
    }

    pub fn read_at(&mut self, offset: u64, buf: &mut AlignedBuf) -> Result<()> {
        match self {
            Target::Device { file, path } => file
                .read_exact_at(buf.get_mut(), offset)
                .with_context(|| format!("read {path} at {offset}")),
            Target::Nbd(c) => c.read_at(offset, buf.get_mut()),
        }
    }

    /// Make every completed write durable (a FLUSH to the device).
    pub fn flush(&mut self) -> Result<()> {
        match self {
            // fdatasync on a block device sends the device a FLUSH.
            Target::Device { file, path } => file
                .sync_data()
                .with_context(|| format!("fdatasync {path}")),
            Target::Nbd(c) => c.flush(),
        }
    }

    /// Close (an NBD session is ended with a disconnect request).
    pub fn close(self) {
        if let Target::Nbd(c) = self {
            c.disconnect();
        }
    }
}
