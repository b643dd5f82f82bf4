//! A pass-through block device with a hook: tests that count, hold, log or
//! delay requests wrap a real device in [`HookedDevice`] and write only
//! [`DeviceHook::before`]; every request then goes to the inner device
//! unchanged (block status too, without the hook).

#![allow(dead_code)]

use std::sync::Arc;

use async_trait::async_trait;
use shale::engine::{BlockDevice, Extent, ReadParts};
use shale::error::BlockError;

/// A request on its way to the inner device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceOp {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64 },
    Flush,
    Trim { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

/// What a test adds to a device's requests.
#[async_trait]
pub trait DeviceHook: Send + Sync + 'static {
    /// Runs before `op` reaches the inner device; an error fails the
    /// request without reaching it.
    async fn before(&self, op: DeviceOp) -> Result<(), BlockError>;
}

/// `inner` with `hook` run before each of its requests.
pub struct HookedDevice<D: ?Sized, H> {
    pub inner: Arc<D>,
    pub hook: H,
}

impl<D: ?Sized, H> std::ops::Deref for HookedDevice<D, H> {
    type Target = H;

    /// The hook's fields and methods read as the device's own.
    fn deref(&self) -> &H {
        &self.hook
    }
}

#[async_trait]
impl<D: BlockDevice + ?Sized + 'static, H: DeviceHook> BlockDevice for HookedDevice<D, H> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        self.hook.before(DeviceOp::Read { offset, len }).await?;
        self.inner.read(offset, buf).await
    }

    async fn read_parts(&self, offset: u64, buf: Vec<u8>) -> Result<ReadParts, BlockError> {
        let len = buf.len() as u64;
        self.hook.before(DeviceOp::Read { offset, len }).await?;
        self.inner.read_parts(offset, buf).await
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        let len = data.len() as u64;
        self.hook.before(DeviceOp::Write { offset, len }).await?;
        self.inner.write(offset, data, fua).await
    }

    async fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        let len = data.len() as u64;
        self.hook.before(DeviceOp::Write { offset, len }).await?;
        self.inner.write_owned(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.hook.before(DeviceOp::Flush).await?;
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.hook.before(DeviceOp::Trim { offset, len }).await?;
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.hook.before(DeviceOp::Zero { offset, len }).await?;
        self.inner.write_zeroes(offset, len, fua).await
    }

    fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        self.inner.allocation(offset, len, max_runs)
    }
}
