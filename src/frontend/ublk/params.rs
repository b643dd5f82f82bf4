//! Device parameters announced to the kernel.
//!
//! Invariants: logical block 512, physical block 4096; the volatile-cache and
//! FUA attributes are set so the kernel sends FLUSH and FUA writes; discard
//! and write-zeroes are advertised with 4 KiB granularity.

use libublk::sys;

use crate::engine::SECTOR;

/// Largest discard or write-zeroes request, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Discard granularity in bytes.
pub const DISCARD_GRANULARITY: u32 = 4096;

/// Why parameters could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("device size {0} must be a non-zero multiple of {SECTOR} bytes")]
    BadSize(u64),
    #[error("I/O buffer size {0} must be a non-zero multiple of 4096 bytes")]
    BadBuffer(u32),
}

/// Parameters for a device of `size` bytes with `io_buf_bytes` per request.
pub fn device_params(size: u64, io_buf_bytes: u32) -> Result<sys::ublk_params, ParamError> {
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(ParamError::BadSize(size));
    }
    if io_buf_bytes == 0 || !io_buf_bytes.is_multiple_of(4096) {
        return Err(ParamError::BadBuffer(io_buf_bytes));
    }
    Ok(sys::ublk_params {
        len: std::mem::size_of::<sys::ublk_params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 9,
            max_sectors: io_buf_bytes >> 9,
            dev_sectors: size / SECTOR,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: DISCARD_GRANULARITY,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    })
}
