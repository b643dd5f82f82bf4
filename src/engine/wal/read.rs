//! Reading a record's data back from a segment file, verifying its CRCs:
//! a mismatch is [`WalError::Corrupt`], never data. `loc` is where the
//! writer put the record, known only once it was written (invariant 2 of
//! the [WAL](super)); a file from [`super::Wal::segment_file`] serves the
//! newest bytes from the tail (invariant 8).

use super::fs::WalFile;
use super::{io_err, record, WalError};
use crate::engine::map::WalLoc;
use crate::engine::SECTOR;

/// Read `dst.len()` bytes of a record's data, verifying its CRCs.
/// `dst` receives sectors `[loc.skip, loc.skip + dst.len()/512)` of the record.
/// A record with block CRCs is read and checked only in the blocks `dst`
/// covers (their table entries and data); an old record is read whole.
/// A mismatch is [`WalError::Corrupt`], never data.
pub fn read_record(
    file: &dyn WalFile,
    loc: &WalLoc,
    seg: u64,
    dst: &mut [u8],
) -> Result<(), WalError> {
    let mut blocking = |buf: &mut [u8], off: u64| file.read_exact_at(buf, off).map(|()| true);
    read_record_via(&mut blocking, loc, seg, dst).map(drop)
}

/// [`read_record`] only if the page cache holds every byte it needs (no
/// disk read, so it never blocks): `Ok(false)` when it does not, and then
/// `dst` holds anything and nothing was checked.
pub fn read_record_cached(
    file: &dyn WalFile,
    loc: &WalLoc,
    seg: u64,
    dst: &mut [u8],
) -> Result<bool, WalError> {
    let mut cached = |buf: &mut [u8], off: u64| file.read_cached_at(buf, off);
    read_record_via(&mut cached, loc, seg, dst)
}

/// Reads `(buf, offset)` of a segment file: `Ok(false)` when it declined
/// (would have blocked), without an error.
type ReadAt<'a> = dyn FnMut(&mut [u8], u64) -> std::io::Result<bool> + 'a;

/// [`read_record`] through `read`; `Ok(false)` as soon as `read` declines.
fn read_record_via(
    read: &mut ReadAt<'_>,
    loc: &WalLoc,
    seg: u64,
    dst: &mut [u8],
) -> Result<bool, WalError> {
    if loc.block_crcs {
        return read_blocks(read, loc, seg, dst);
    }
    let rec_len = (loc.rec_sectors * SECTOR) as usize;
    let mut buf = vec![0u8; rec_len];
    if !read(&mut buf, loc.data_off).map_err(|e| io_err("read WAL", e))? {
        return Ok(false);
    }
    if crc32c::crc32c(&buf) != loc.crc {
        return Err(WalError::Corrupt {
            seg,
            off: loc.data_off,
        });
    }
    let start = (loc.skip * SECTOR) as usize;
    let src = buf.get(start..start + dst.len()).ok_or(WalError::Corrupt {
        seg,
        off: loc.data_off,
    })?;
    dst.copy_from_slice(src);
    Ok(true)
}

/// [`read_record_via`] of a record with a CRC per block.
fn read_blocks(
    read: &mut ReadAt<'_>,
    loc: &WalLoc,
    seg: u64,
    dst: &mut [u8],
) -> Result<bool, WalError> {
    let corrupt = |off: u64| WalError::Corrupt { seg, off };
    let block = record::BLOCK as u64;
    let rec_len = loc.rec_sectors * SECTOR;
    let start = loc.skip * SECTOR;
    let end = start + dst.len() as u64;
    if dst.is_empty() {
        return Ok(true);
    }
    if end > rec_len {
        return Err(corrupt(loc.data_off));
    }
    let table_off = loc
        .data_off
        .checked_sub(record::blocks_of(rec_len) * 4)
        .ok_or(corrupt(loc.data_off))?;
    let (b0, b1) = (start / block, end.div_ceil(block));
    let mut table = vec![0u8; ((b1 - b0) * 4) as usize];
    if !read(&mut table, table_off + b0 * 4).map_err(|e| io_err("read WAL", e))? {
        return Ok(false);
    }
    let (r0, r1) = (b0 * block, (b1 * block).min(rec_len));
    let check = |data: &[u8]| {
        record::check_blocks(data, &table)
            .map_err(|i| corrupt(loc.data_off + r0 + i as u64 * block))
    };
    if (r0, r1) == (start, end) {
        // Whole blocks: straight into `dst`, no copy.
        if !read(dst, loc.data_off + r0).map_err(|e| io_err("read WAL", e))? {
            return Ok(false);
        }
        return check(dst).map(|()| true);
    }
    let mut buf = vec![0u8; (r1 - r0) as usize];
    if !read(&mut buf, loc.data_off + r0).map_err(|e| io_err("read WAL", e))? {
        return Ok(false);
    }
    check(&buf)?;
    let at = (start - r0) as usize;
    dst.copy_from_slice(&buf[at..at + dst.len()]);
    Ok(true)
}
