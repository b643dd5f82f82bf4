//! A plain in-memory disk: the reference model for engine tests and a
//! stand-in device for frontend tests. Not durable; `flush` does nothing.

use std::sync::Mutex;

use async_trait::async_trait;

use super::{check_range, BlockDevice};
use crate::error::BlockError;

/// A RAM-backed [`BlockDevice`].
#[derive(Debug)]
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes (rounded down to a sector).
    pub fn new(size: u64) -> Self {
        let size = size - size % super::SECTOR;
        MemDisk {
            data: Mutex::new(vec![0; size as usize]),
        }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

#[async_trait]
impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let data = self.data.lock().unwrap();
        check_range(offset, buf.len() as u64, data.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&data[o..o + buf.len()]);
        Ok(())
    }

    async fn write(&self, offset: u64, src: &[u8], _fua: bool) -> Result<(), BlockError> {
        let mut data = self.data.lock().unwrap();
        check_range(offset, src.len() as u64, data.len() as u64)?;
        let o = offset as usize;
        data[o..o + src.len()].copy_from_slice(src);
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), BlockError> {
        let mut data = self.data.lock().unwrap();
        check_range(offset, len, data.len() as u64)?;
        let o = offset as usize;
        data[o..o + len as usize].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_zero() {
        futures::executor::block_on(async {
            let d = MemDisk::new(8192);
            d.write(512, &[7u8; 1024], false).await.unwrap();
            let mut b = vec![0u8; 2048];
            d.read(0, &mut b).await.unwrap();
            assert_eq!(&b[..512], &[0u8; 512][..]);
            assert_eq!(&b[512..1536], &[7u8; 1024][..]);
            d.trim(512, 512).await.unwrap();
            d.read(0, &mut b).await.unwrap();
            assert_eq!(&b[512..1024], &[0u8; 512][..]);
            assert!(d.write(8192, &[1u8; 512], false).await.is_err());
        });
    }
}
