//! Creating, recovering, serving and removing one ublk device.
//!
//! Invariants:
//! 1. Devices are created with `UBLK_F_USER_RECOVERY` (+`_REISSUE` when the
//!    driver offers it): if the server dies, the device stays (quiesced) and
//!    a new server can take it over with [`Attach::Recover`].
//! 2. [`UblkServer::run`] returns only after every queue thread ended, i.e.
//!    after the kernel stopped sending requests.
//! 3. A device is removed only by [`UblkServer::remove`] or by the
//!    creating server's orderly exit, never by a crash.

use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};

use super::params::{device_params, ParamError};
use super::queue::run_queue;
use crate::engine::BlockDevice;

/// Default per-request buffer (and max request size): 512 KiB.
pub const DEFAULT_IO_BUF_BYTES: u32 = 512 << 10;
/// Path of the ublk control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Errors of the ublk frontend.
#[derive(Debug, thiserror::Error)]
pub enum UblkFrontendError {
    #[error("{CONTROL_PATH} is missing: load the ublk_drv kernel module (modprobe ublk_drv)")]
    NoDriver,
    #[error("{what}: {source}")]
    Ublk {
        what: String,
        #[source]
        source: UblkError,
    },
    #[error("invalid device parameters: {0}")]
    Params(#[from] ParamError),
    #[error("device {dev_id} cannot be recovered: it is {state} (only a device whose server died can be)")]
    NotRecoverable { dev_id: u32, state: &'static str },
    #[error("invalid options: {0}")]
    Options(String),
}

fn ublk(what: impl Into<String>) -> impl FnOnce(UblkError) -> UblkFrontendError {
    let what = what.into();
    move |source| UblkFrontendError::Ublk { what, source }
}

/// How the server gets its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Create a new device (the kernel picks the id).
    New,
    /// Take over device `id` whose server died.
    Recover(u32),
}

/// Shape of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Volume name, stored in the device's exported JSON.
    pub volume: String,
    pub queues: u16,
    pub depth: u16,
    pub io_buf_bytes: u32,
}

impl ServerOptions {
    /// Check the numbers before talking to the kernel.
    pub fn validate(&self) -> Result<(), UblkFrontendError> {
        if self.queues == 0 || u32::from(self.queues) > sys::UBLK_MAX_NR_QUEUES {
            return Err(UblkFrontendError::Options(format!(
                "queues must be between 1 and {}, got {}",
                sys::UBLK_MAX_NR_QUEUES,
                self.queues
            )));
        }
        if self.depth == 0 || u32::from(self.depth) > sys::UBLK_MAX_QUEUE_DEPTH {
            return Err(UblkFrontendError::Options(format!(
                "depth must be between 1 and {}, got {}",
                sys::UBLK_MAX_QUEUE_DEPTH,
                self.depth
            )));
        }
        if self.io_buf_bytes == 0 || !self.io_buf_bytes.is_multiple_of(4096) {
            return Err(UblkFrontendError::Options(format!(
                "I/O buffer size must be a non-zero multiple of 4096, got {}",
                self.io_buf_bytes
            )));
        }
        Ok(())
    }
}

/// Kernel state of a device, by name.
pub fn state_name(state: u16) -> &'static str {
    match u32::from(state) {
        sys::UBLK_S_DEV_DEAD => "dead",
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        sys::UBLK_S_DEV_FAIL_IO => "fail-io",
        _ => "unknown",
    }
}

/// Control flags for a new device given the driver's feature mask.
pub fn ctrl_flags(driver_features: Option<u64>) -> u64 {
    let reissue = u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
    let mut flags = u64::from(sys::UBLK_F_USER_RECOVERY);
    if driver_features.is_some_and(|f| f & reissue != 0) {
        flags |= reissue;
    }
    flags
}

/// Whether the ublk driver is loaded.
pub fn driver_present() -> bool {
    std::path::Path::new(CONTROL_PATH).exists()
}

/// Kernel view of an existing device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub dev_id: u32,
    pub state: u16,
    pub server_pid: i32,
    pub queues: u16,
    pub depth: u16,
}

/// Read a device's kernel state; `None` if it does not exist.
pub fn device_status(dev_id: u32) -> Option<DeviceStatus> {
    let id = i32::try_from(dev_id).ok()?;
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{dev_id}")).exists() {
        return None;
    }
    let ctrl = UblkCtrl::new_simple(id).ok()?;
    let info = ctrl.dev_info();
    Some(DeviceStatus {
        dev_id,
        state: info.state,
        server_pid: info.ublksrv_pid,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
    })
}

/// Delete a device whose server is gone (or stop a live one: its server
/// then sees its queues end).
pub fn delete_device(dev_id: u32) -> Result<(), UblkFrontendError> {
    let id = i32::try_from(dev_id)
        .map_err(|_| UblkFrontendError::Options(format!("device id {dev_id} out of range")))?;
    let ctrl = UblkCtrl::new_simple(id).map_err(ublk(format!("open device {dev_id}")))?;
    ctrl.del_dev()
        .map_err(ublk(format!("delete device {dev_id}")))?;
    Ok(())
}

/// One device and the control handle that owns it.
pub struct UblkServer {
    ctrl: Arc<UblkCtrl>,
    options: ServerOptions,
}

/// Ends a running server from another thread (e.g. a signal handler thread).
///
/// libublk's control ring is per thread, so the stopper opens its own
/// control handle on the calling thread instead of sharing the server's.
#[derive(Clone, Copy, Debug)]
pub struct Stopper {
    dev_id: u32,
}

impl Stopper {
    /// Ask the kernel to stop the device; queues then end and `run` returns.
    pub fn stop(&self) -> Result<(), UblkFrontendError> {
        let id = i32::try_from(self.dev_id).map_err(|_| {
            UblkFrontendError::Options(format!("device id {} out of range", self.dev_id))
        })?;
        let ctrl = UblkCtrl::new_simple(id).map_err(ublk(format!("open device {id}")))?;
        ctrl.kill_dev().map_err(ublk(format!("stop device {id}")))?;
        Ok(())
    }
}

impl UblkServer {
    /// Create or take over a device.
    pub fn create(options: ServerOptions, attach: Attach) -> Result<UblkServer, UblkFrontendError> {
        options.validate()?;
        if !driver_present() {
            return Err(UblkFrontendError::NoDriver);
        }
        let (id, queues, depth, dev_flags) = match attach {
            Attach::New => (
                -1,
                options.queues,
                options.depth,
                UblkFlags::UBLK_DEV_F_ADD_DEV,
            ),
            Attach::Recover(dev_id) => {
                let status = device_status(dev_id).ok_or(UblkFrontendError::NotRecoverable {
                    dev_id,
                    state: "missing",
                })?;
                if u32::from(status.state) != sys::UBLK_S_DEV_QUIESCED {
                    return Err(UblkFrontendError::NotRecoverable {
                        dev_id,
                        state: state_name(status.state),
                    });
                }
                let simple = UblkCtrl::new_simple(dev_id as i32)
                    .map_err(ublk(format!("open device {dev_id}")))?;
                simple
                    .start_user_recover()
                    .map_err(ublk(format!("start recovery of device {dev_id}")))?;
                (
                    dev_id as i32,
                    status.queues,
                    status.depth,
                    UblkFlags::UBLK_DEV_F_RECOVER_DEV,
                )
            }
        };
        let ctrl = UblkCtrlBuilder::default()
            .name("shale")
            .id(id)
            .nr_queues(queues)
            .depth(depth)
            .io_buf_bytes(options.io_buf_bytes)
            .ctrl_flags(ctrl_flags(UblkCtrl::get_features()))
            .dev_flags(dev_flags)
            .build()
            .map_err(ublk("create ublk device"))?;
        let options = ServerOptions {
            queues,
            depth,
            ..options
        };
        Ok(UblkServer {
            ctrl: Arc::new(ctrl),
            options,
        })
    }

    /// Kernel device id (N in /dev/ublkbN).
    pub fn dev_id(&self) -> u32 {
        self.ctrl.dev_info().dev_id
    }

    /// Options after recovery adjusted them to the existing device.
    pub fn options(&self) -> &ServerOptions {
        &self.options
    }

    /// Handle to stop the device from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            dev_id: self.dev_id(),
        }
    }

    /// Serve `device` until the device is stopped. `on_live` runs once the
    /// block device is live (after START or END_USER_RECOVERY).
    pub fn run<L>(
        &self,
        device: Arc<dyn BlockDevice>,
        runtime: Option<tokio::runtime::Handle>,
        on_live: L,
    ) -> Result<(), UblkFrontendError>
    where
        L: FnOnce(u32) + Send + Sync + 'static,
    {
        let params = device_params(device.size(), self.options.io_buf_bytes)?;
        let size = device.size();
        let volume = self.options.volume.clone();
        let ring_depth = self.options.depth.saturating_mul(2).max(16);
        let tgt_init = move |dev: &mut UblkDev| {
            dev.tgt.dev_size = size;
            dev.tgt.params = params;
            dev.tgt.sq_depth = ring_depth;
            dev.tgt.cq_depth = ring_depth;
            dev.set_target_json(serde_json::json!({ "volume": volume }));
            Ok(())
        };
        let queue_fn = move |qid: u16, dev: &UblkDev| {
            run_queue(qid, dev, device.clone(), runtime.clone());
        };
        let live_fn = move |ctrl: &UblkCtrl| on_live(ctrl.dev_info().dev_id);
        self.ctrl
            .run_target(tgt_init, queue_fn, live_fn)
            .map_err(ublk("serve ublk device"))?;
        Ok(())
    }

    /// Delete the device (after `run` returned).
    pub fn remove(&self) -> Result<(), UblkFrontendError> {
        match self.ctrl.del_dev() {
            Ok(_) => Ok(()),
            Err(UblkError::OtherError(e)) if e == -libc::ENOENT => Ok(()),
            Err(e) => Err(ublk("delete ublk device")(e)),
        }
    }
}
