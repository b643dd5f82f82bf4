//! Decoding ublk I/O descriptors into block requests, and running them
//! against a [`BlockDevice`].
//!
//! Invariants:
//! 1. FLUSH is never bounds-checked: the kernel sends it with
//!    `start_sector = u64::MAX`.
//! 2. Every other request is checked against the device size and the I/O
//!    buffer size before it touches the device; a bad request changes nothing.
//! 3. The result returned to the kernel is the byte count for READ/WRITE,
//!    0 for the other successful ops, and `-errno` (from
//!    [`BlockError::errno`]) on failure.

use libublk::sys;

use crate::engine::{check_range, BlockDevice, SECTOR};
use crate::error::BlockError;

/// One decoded block request (byte offsets and lengths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64, fua: bool },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, fua: bool },
}

/// The fields of a `ublksrv_io_desc` that matter for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
}

impl From<&sys::ublksrv_io_desc> for Descriptor {
    fn from(d: &sys::ublksrv_io_desc) -> Self {
        Descriptor {
            op_flags: d.op_flags,
            nr_sectors: d.nr_sectors,
            start_sector: d.start_sector,
        }
    }
}

/// Decode and validate a descriptor for a device of `dev_size` bytes whose
/// per-tag buffer holds `buf_len` bytes.
pub fn decode(d: Descriptor, dev_size: u64, buf_len: u64) -> Result<Request, BlockError> {
    let op = d.op_flags & 0xff;
    let fua = d.op_flags & sys::UBLK_IO_F_FUA != 0;
    if op == sys::UBLK_IO_OP_FLUSH {
        return Ok(Request::Flush);
    }
    let len = u64::from(d.nr_sectors) * SECTOR;
    let offset = d
        .start_sector
        .checked_mul(SECTOR)
        .ok_or(BlockError::OutOfRange {
            offset: u64::MAX,
            len,
            size: dev_size,
        })?;
    let request = match op {
        sys::UBLK_IO_OP_READ => Request::Read { offset, len },
        sys::UBLK_IO_OP_WRITE => Request::Write { offset, len, fua },
        sys::UBLK_IO_OP_DISCARD => Request::Discard { offset, len },
        sys::UBLK_IO_OP_WRITE_ZEROES => Request::WriteZeroes { offset, len, fua },
        other => {
            return Err(BlockError::InvalidArgument(format!(
                "unsupported ublk op {other}"
            )))
        }
    };
    check_range(offset, len, dev_size)?;
    if matches!(request, Request::Read { .. } | Request::Write { .. }) && len > buf_len {
        return Err(BlockError::InvalidArgument(format!(
            "request of {len} bytes exceeds the {buf_len}-byte I/O buffer"
        )));
    }
    Ok(request)
}

/// Run a decoded request. `buf` is the tag's I/O buffer (data in for
/// WRITE, data out for READ).
pub async fn execute(
    dev: &dyn BlockDevice,
    request: Request,
    buf: &mut [u8],
) -> Result<u64, BlockError> {
    match request {
        Request::Read { offset, len } => {
            let dst = buf_prefix(buf, len)?;
            dev.read(offset, dst).await?;
            Ok(len)
        }
        Request::Write { offset, len, fua } => {
            let src = buf_prefix(buf, len)?;
            dev.write(offset, src, fua).await?;
            Ok(len)
        }
        Request::Flush => dev.flush().await.map(|()| 0),
        Request::Discard { offset, len } => dev.trim(offset, len).await.map(|()| 0),
        Request::WriteZeroes { offset, len, fua } => {
            dev.write_zeroes(offset, len, fua).await.map(|()| 0)
        }
    }
}

fn buf_prefix(buf: &mut [u8], len: u64) -> Result<&mut [u8], BlockError> {
    let n = usize::try_from(len)
        .map_err(|_| BlockError::InvalidArgument(format!("length {len} too large")))?;
    let available = buf.len();
    buf.get_mut(..n).ok_or_else(|| {
        BlockError::InvalidArgument(format!(
            "request of {n} bytes exceeds the {available}-byte I/O buffer"
        ))
    })
}

/// Decode, run and turn the outcome into the kernel's result code.
pub async fn handle(dev: &dyn BlockDevice, d: Descriptor, buf: &mut [u8]) -> i32 {
    let outcome = match decode(d, dev.size(), buf.len() as u64) {
        Ok(request) => execute(dev, request, buf).await,
        Err(e) => Err(e),
    };
    result_code(outcome)
}

/// Map an outcome to a ublk result: bytes done, or `-errno`.
pub fn result_code(outcome: Result<u64, BlockError>) -> i32 {
    match outcome {
        Ok(bytes) => i32::try_from(bytes).unwrap_or(-libc::EINVAL),
        Err(e) => {
            log::debug!("ublk request failed: {e}");
            -e.errno()
        }
    }
}
