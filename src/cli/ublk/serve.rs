//! The server process behind `shale add --foreground` (and the detached
//! child of `shale add`): own mount namespace, signals, tokio runtime for
//! the engine, the ublk device, orderly shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};
use shale::frontend::ublk::runstate::{create_link, remove_link, DeviceRecord};
use shale::frontend::ublk::{Attach, ServerOptions, UblkServer};

use super::backing::{self, BackingSpec};
use super::notify;
use super::Paths;

/// Everything a server needs to start.
pub struct ServeRequest {
    pub options: ServerOptions,
    pub attach: Attach,
    pub backing: BackingSpec,
    /// stdout is the parent's readiness pipe; start a new session.
    pub detached: bool,
    pub paths: Paths,
    /// Configuration file (store, data directory, engine settings).
    pub config: Option<std::path::PathBuf>,
}

/// Run a server until it is stopped by a signal or by `shale del`.
pub fn serve(req: ServeRequest) -> anyhow::Result<()> {
    if req.detached {
        nix::unistd::setsid().context("start a new session")?;
    }
    super::super::logging::set_volume(&req.options.volume);
    private_mount_namespace()?;
    let signals = shutdown_signals();
    signals.thread_block().context("block shutdown signals")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("shale-engine")
        .enable_all()
        .build()
        .context("start the engine runtime")?;
    let handle = runtime.handle().clone();
    let volume = req.options.volume.clone();
    let opened = runtime.block_on(backing::open(
        &req.backing,
        &volume,
        req.config.as_deref(),
        handle.clone(),
    ))?;
    let device = opened.device.clone();

    let server = UblkServer::create(req.options, req.attach)?;
    let dev_id = server.dev_id();
    opened.set_device(&format!("/dev/ublkb{dev_id}"));
    let opts = server.options().clone();
    let record = DeviceRecord {
        volume: volume.clone(),
        dev_id,
        pid: std::process::id() as i32,
        queues: opts.queues,
        depth: opts.depth,
        backing: req.backing.to_args(),
    };
    // Written before the device goes live so udev's `shale list
    // --udev-name` already finds it.
    req.paths.run_dir.write(&record)?;

    let stopping = Arc::new(AtomicBool::new(false));
    let stopper = server.stopper();
    let flag = stopping.clone();
    std::thread::Builder::new()
        .name("shale-signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                log::info!("{sig:?}: stopping the device");
                flag.store(true, Ordering::SeqCst);
                notify::sd_notify(&[sd_notify::NotifyState::Stopping]);
                if let Err(e) = stopper.stop() {
                    log::error!("cannot stop the device: {e}");
                }
            }
        })
        .context("start the signal thread")?;

    let link_dir = req.paths.link_dir.clone();
    let link_volume = volume.clone();
    let detached = req.detached;
    let served = server.run(device.clone(), Some(handle.clone()), move |id| {
        if let Err(e) = create_link(&link_dir, &link_volume, id) {
            log::warn!("cannot create the device link: {e}");
        }
        notify::ready(id, detached);
    });

    // The kernel sends no more requests: make everything durable.
    let closed = runtime.block_on(opened.close());
    if let (Err(e), Attach::Recover(_)) = (&served, req.attach) {
        // A recovery that failed leaves the device quiesced (I/O waits) and
        // the record in place, so another `shale recover` can take over.
        anyhow::bail!(
            "recovery of /dev/ublkb{dev_id} failed ({e}); the device is kept for another attempt"
        );
    }
    let removed = server.remove();
    let _ = remove_link(&req.paths.link_dir, &volume, dev_id);
    let _ = req.paths.run_dir.remove(&volume);
    served?;
    closed.context("final flush and close")?;
    removed?;
    if !stopping.load(Ordering::SeqCst) {
        log::info!("device {dev_id} was stopped from outside");
    }
    Ok(())
}

fn shutdown_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// Serve from our own mount namespace, holding no ublk filesystem.
fn private_mount_namespace() -> anyhow::Result<()> {
    let detached = shale::frontend::ublk::mountns::enter_private_namespace()?;
    for path in detached {
        log::info!(
            "detached {} in the server's mount namespace",
            path.display()
        );
    }
    Ok(())
}
