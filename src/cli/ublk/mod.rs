//! `shale add|del|list|recover`: attach volumes as /dev/ublkbN, in the style
//! of ublk servers (rublk, ublksrv).
//!
//! `add` starts a detached server (this binary with `--foreground`), waits
//! for its readiness line and prints the device path. The server keeps a
//! run-state record in `$SHALE_RUN_DIR` (default /run/shale) and the link
//! `$SHALE_LINK_DIR/<volume>` (default /dev/shale).

mod backing;
mod notify;
mod serve;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{ArgGroup, Args};
use shale::frontend::ublk::mountns::mounts_of_device;
use shale::frontend::ublk::runstate::{
    check_volume_name, pid_alive, remove_link, DeviceRecord, RunDir, DEFAULT_RUN_DIR, LINK_DIR,
};
use shale::frontend::ublk::server::{
    delete_device, device_status, driver_present, state_name, DeviceStatus, DEFAULT_IO_BUF_BYTES,
};
use shale::frontend::ublk::{Attach, ServerOptions, UblkFrontendError};

use backing::{parse_size, BackingSpec};

#[derive(Args, Debug)]
pub struct AddArgs {
    /// Volume name.
    pub volume: String,
    /// Number of hardware queues (one thread and io_uring each).
    #[arg(long, short = 'q', default_value_t = 1)]
    pub queues: u16,
    /// Requests in flight per queue.
    #[arg(long, short = 'd', default_value_t = 64)]
    pub depth: u16,
    /// Serve in this process instead of starting a detached server
    /// (for systemd: readiness goes to $NOTIFY_SOCKET).
    #[arg(long)]
    pub foreground: bool,
    /// Development backing instead of a catalog volume: RAM of this size.
    #[arg(long, hide = true, value_parser = parse_size, conflicts_with = "backing_file")]
    pub memory: Option<u64>,
    /// Development backing instead of a catalog volume: this file (with --size).
    #[arg(long, hide = true, requires = "size")]
    pub backing_file: Option<PathBuf>,
    /// Size of --backing-file.
    #[arg(long, hide = true, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Internal: take over this quiesced device (set by recover).
    #[arg(long, hide = true)]
    pub recover_dev: Option<u32>,
    /// Internal: stdout is the readiness pipe of a waiting `shale add`.
    #[arg(long, hide = true)]
    pub detached: bool,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("which").required(true).args(["volume", "number", "all"])))]
pub struct DelArgs {
    /// Volume name.
    pub volume: Option<String>,
    /// Device id N of /dev/ublkbN.
    #[arg(long, short = 'n')]
    pub number: Option<u32>,
    /// Every device started by shale.
    #[arg(long, short = 'a')]
    pub all: bool,
    /// Seconds to wait for a server to flush and exit.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Remove the device even if a filesystem on it is mounted (its
    /// further I/O then fails).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// For udev: print the volume name of kernel device NAME (ublkbN).
    #[arg(long, hide = true, value_name = "NAME")]
    pub udev_name: Option<String>,
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// Volume name.
    pub volume: String,
    /// Serve in this process instead of a detached server.
    #[arg(long)]
    pub foreground: bool,
}

/// Where run-state records and device links live.
#[derive(Debug, Clone)]
pub struct Paths {
    pub run_dir: RunDir,
    pub link_dir: PathBuf,
}

impl Paths {
    fn from_env() -> Paths {
        let run = std::env::var_os("SHALE_RUN_DIR").unwrap_or_else(|| DEFAULT_RUN_DIR.into());
        let link = std::env::var_os("SHALE_LINK_DIR").unwrap_or_else(|| LINK_DIR.into());
        Paths {
            run_dir: RunDir::new(run),
            link_dir: PathBuf::from(link),
        }
    }
}

fn require_driver() -> anyhow::Result<()> {
    if driver_present() {
        Ok(())
    } else {
        Err(UblkFrontendError::NoDriver.into())
    }
}

fn backing_of(a: &AddArgs) -> BackingSpec {
    match (&a.memory, &a.backing_file, a.size) {
        (Some(size), _, _) => BackingSpec::Memory(*size),
        (None, Some(path), Some(size)) => BackingSpec::File(path.clone(), size),
        _ => BackingSpec::Volume,
    }
}

/// What the record and the kernel say about a volume's attachment.
enum Attachment {
    None,
    Live(DeviceRecord),
    /// Server gone, device quiesced: recoverable.
    Orphaned(DeviceRecord),
    /// Record without a device (or a device in another state).
    Stale(DeviceRecord, Option<DeviceStatus>),
}

fn attachment(paths: &Paths, volume: &str) -> anyhow::Result<Attachment> {
    let Some(rec) = paths.run_dir.read(volume)? else {
        return Ok(Attachment::None);
    };
    let status = device_status(rec.dev_id);
    Ok(match status {
        Some(_) if pid_alive(rec.pid) => Attachment::Live(rec),
        Some(s) if u32::from(s.state) == libublk::sys::UBLK_S_DEV_QUIESCED => {
            Attachment::Orphaned(rec)
        }
        other => Attachment::Stale(rec, other),
    })
}

pub fn add(config: Option<&Path>, a: AddArgs) -> anyhow::Result<()> {
    check_volume_name(&a.volume)?;
    let paths = Paths::from_env();
    let options = ServerOptions {
        volume: a.volume.clone(),
        queues: a.queues,
        depth: a.depth,
        io_buf_bytes: DEFAULT_IO_BUF_BYTES,
    };
    options.validate()?;
    require_driver()?;
    if a.foreground || a.detached {
        let attach = match a.recover_dev {
            Some(id) => Attach::Recover(id),
            None => match attachment(&paths, &a.volume)? {
                Attachment::Live(rec) => bail!(
                    "volume {} is already attached as /dev/ublkb{} (server pid {})",
                    rec.volume,
                    rec.dev_id,
                    rec.pid
                ),
                Attachment::Orphaned(rec) => Attach::Recover(rec.dev_id),
                Attachment::None | Attachment::Stale(..) => Attach::New,
            },
        };
        return serve::serve(serve::ServeRequest {
            options,
            attach,
            backing: backing_of(&a),
            detached: a.detached,
            paths,
            config: config.map(Path::to_path_buf),
        });
    }
    match attachment(&paths, &a.volume)? {
        Attachment::Live(rec) => bail!(
            "volume {} is already attached as /dev/ublkb{} (server pid {})",
            rec.volume,
            rec.dev_id,
            rec.pid
        ),
        Attachment::Orphaned(rec) => {
            eprintln!(
                "shale: server of {} died; recovering /dev/ublkb{}",
                rec.volume, rec.dev_id
            );
            let dev = spawn_server(config, &paths, &rec.volume, &server_args_for_recovery(&rec))?;
            println!("/dev/ublkb{dev}");
            Ok(())
        }
        Attachment::Stale(rec, status) => {
            // A server that died before its device went live leaves a dead
            // device behind; nobody serves it, so it is removed.
            if let Some(s) = status {
                if !pid_alive(s.server_pid) && u32::from(s.state) == libublk::sys::UBLK_S_DEV_DEAD {
                    eprintln!(
                        "shale: removing /dev/ublkb{} left behind by a failed start",
                        rec.dev_id
                    );
                    delete_device(rec.dev_id)?;
                }
            }
            paths.run_dir.remove(&rec.volume)?;
            let _ = remove_link(&paths.link_dir, &rec.volume, rec.dev_id);
            add_new(config, &paths, &a)
        }
        Attachment::None => add_new(config, &paths, &a),
    }
}

fn add_new(config: Option<&Path>, paths: &Paths, a: &AddArgs) -> anyhow::Result<()> {
    let mut args = vec![
        "--queues".to_string(),
        a.queues.to_string(),
        "--depth".to_string(),
        a.depth.to_string(),
    ];
    args.extend(backing_of(a).to_args());
    let dev = spawn_server(config, paths, &a.volume, &args)?;
    println!("/dev/ublkb{dev}");
    Ok(())
}

fn server_args_for_recovery(rec: &DeviceRecord) -> Vec<String> {
    let mut args = vec![
        "--queues".to_string(),
        rec.queues.to_string(),
        "--depth".to_string(),
        rec.depth.to_string(),
        "--recover-dev".to_string(),
        rec.dev_id.to_string(),
    ];
    args.extend(rec.backing.iter().cloned());
    args
}

/// Start a detached server and wait for its readiness line; returns the
/// device id. The server's log goes to `<run dir>/<volume>.log`.
fn spawn_server(
    config: Option<&Path>,
    paths: &Paths,
    volume: &str,
    extra: &[String],
) -> anyhow::Result<u32> {
    let exe = std::env::current_exe().context("find the shale binary")?;
    shale::private::create_dir_all(paths.run_dir.path())
        .with_context(|| format!("create {}", paths.run_dir.path().display()))?;
    let log_path = paths.run_dir.log_path(volume)?;
    let log = shale::private::open_options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("add")
        .arg(volume)
        .arg("--detached")
        .args(extra)
        .env("SHALE_RUN_DIR", paths.run_dir.path())
        .env("SHALE_LINK_DIR", &paths.link_dir)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    let mut child = cmd.spawn().context("start the ublk server")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("server stdout missing"))?;
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .context("read server readiness")?;
        if n == 0 {
            let status = child.wait().ok();
            let tail = log_tail(&log_path);
            bail!(
                "the ublk server exited before the device was live ({}); log {}:\n{}",
                status.map_or_else(|| "unknown status".to_string(), |s| s.to_string()),
                log_path.display(),
                tail
            );
        }
        if let Some(id) = line.trim().strip_prefix(notify::READY_PREFIX) {
            let id: u32 = id.parse().context("bad readiness line")?;
            // The server lives on in its own session; don't leave a zombie
            // behind if we are long-lived (we exit right away in practice).
            std::thread::spawn(move || {
                let _ = child.wait();
            });
            return Ok(id);
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

pub fn recover(config: Option<&Path>, a: RecoverArgs) -> anyhow::Result<()> {
    check_volume_name(&a.volume)?;
    require_driver()?;
    let paths = Paths::from_env();
    match attachment(&paths, &a.volume)? {
        Attachment::None => bail!("volume {} has no device to recover", a.volume),
        Attachment::Live(rec) => bail!(
            "volume {} is live on /dev/ublkb{} (server pid {}); nothing to recover",
            rec.volume,
            rec.dev_id,
            rec.pid
        ),
        Attachment::Stale(rec, status) => bail!(
            "device /dev/ublkb{} of volume {} is {}; it cannot be recovered (use shale add)",
            rec.dev_id,
            rec.volume,
            status.map_or("gone", |s| state_name(s.state))
        ),
        Attachment::Orphaned(rec) => {
            if a.foreground {
                let add = AddArgs {
                    volume: rec.volume.clone(),
                    queues: rec.queues,
                    depth: rec.depth,
                    foreground: true,
                    memory: None,
                    backing_file: None,
                    size: None,
                    recover_dev: Some(rec.dev_id),
                    detached: false,
                };
                let add = apply_backing(add, &rec.backing)?;
                return self::add(config, add);
            }
            let dev = spawn_server(config, &paths, &rec.volume, &server_args_for_recovery(&rec))?;
            println!("/dev/ublkb{dev}");
            Ok(())
        }
    }
}

/// Re-apply backing arguments stored in a record.
fn apply_backing(mut a: AddArgs, backing: &[String]) -> anyhow::Result<AddArgs> {
    let mut it = backing.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| anyhow!("run-state backing {backing:?} is malformed"))?;
        match flag.as_str() {
            "--memory" => a.memory = Some(parse_size(value).map_err(|e| anyhow!(e))?),
            "--backing-file" => a.backing_file = Some(PathBuf::from(value)),
            "--size" => a.size = Some(parse_size(value).map_err(|e| anyhow!(e))?),
            other => bail!("run-state backing has unknown argument {other:?}"),
        }
    }
    Ok(a)
}

pub fn del(_config: Option<&Path>, a: DelArgs) -> anyhow::Result<()> {
    let paths = Paths::from_env();
    let timeout = Duration::from_secs(a.timeout);
    if a.all {
        let mut failures = 0;
        for rec in paths.run_dir.list(|e| eprintln!("shale: {e}")) {
            if let Err(e) = del_record(&paths, &rec, timeout, a.force) {
                eprintln!("shale: {}: {e:#}", rec.volume);
                failures += 1;
            }
        }
        if failures > 0 {
            bail!("{failures} device(s) could not be removed");
        }
        return Ok(());
    }
    if let Some(volume) = &a.volume {
        check_volume_name(volume)?;
        let rec = paths
            .run_dir
            .read(volume)?
            .ok_or_else(|| anyhow!("volume {volume} is not attached"))?;
        return del_record(&paths, &rec, timeout, a.force);
    }
    if let Some(id) = a.number {
        if let Some(rec) = paths.run_dir.find_by_dev_id(id) {
            return del_record(&paths, &rec, timeout, a.force);
        }
        if device_status(id).is_none() {
            bail!("/dev/ublkb{id} does not exist");
        }
        if !a.force {
            refuse_if_mounted(id)?;
        }
        delete_device(id)?;
        return Ok(());
    }
    bail!("name a volume, -n ID or --all")
}

/// Stop a volume's server (it flushes and removes the device), or remove
/// the device directly if the server is gone.
fn del_record(
    paths: &Paths,
    rec: &DeviceRecord,
    timeout: Duration,
    force: bool,
) -> anyhow::Result<()> {
    if !force {
        refuse_if_mounted(rec.dev_id)?;
    }
    if pid_alive(rec.pid) {
        let pid = nix::unistd::Pid::from_raw(rec.pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("signal server pid {}", rec.pid))?;
        let deadline = Instant::now() + timeout;
        while pid_alive(rec.pid) {
            if Instant::now() > deadline {
                bail!(
                    "server pid {} of {} did not exit within {}s",
                    rec.pid,
                    rec.volume,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if device_status(rec.dev_id).is_some() {
        delete_device(rec.dev_id)?;
    }
    let _ = remove_link(&paths.link_dir, &rec.volume, rec.dev_id);
    paths.run_dir.remove(&rec.volume)?;
    Ok(())
}

/// Removing a device under a mounted filesystem fails its I/O: refuse.
fn refuse_if_mounted(dev_id: u32) -> anyhow::Result<()> {
    let mounts = mounts_of_device(dev_id)?;
    if let Some(first) = mounts.first() {
        bail!(
            "/dev/ublkb{dev_id} is mounted at {}{}; unmount it first (or use --force)",
            first.display(),
            if mounts.len() > 1 {
                " and elsewhere"
            } else {
                ""
            }
        );
    }
    Ok(())
}

pub fn list(_config: Option<&Path>, a: ListArgs) -> anyhow::Result<()> {
    let paths = Paths::from_env();
    if let Some(name) = a.udev_name {
        let id: u32 = name
            .strip_prefix("ublkb")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("{name:?} is not a ublk block device name"))?;
        let rec = paths
            .run_dir
            .find_by_dev_id(id)
            .ok_or_else(|| anyhow!("/dev/{name} is not a shale device"))?;
        println!("{}", rec.volume);
        return Ok(());
    }
    println!("{:<24} {:<14} {:>8}  STATE", "VOLUME", "DEVICE", "PID");
    for rec in paths.run_dir.list(|e| eprintln!("shale: {e}")) {
        let alive = pid_alive(rec.pid);
        let state = match device_status(rec.dev_id) {
            None if Path::new(&format!("/sys/class/ublk-char/ublkc{}", rec.dev_id)).exists() => {
                "unknown (cannot query /dev/ublk-control)".to_string()
            }
            None => "gone (stale record)".to_string(),
            Some(s) if alive => state_name(s.state).to_string(),
            Some(s) if u32::from(s.state) == libublk::sys::UBLK_S_DEV_QUIESCED => {
                "quiesced, server dead (shale recover)".to_string()
            }
            Some(s) => format!("{}, server dead", state_name(s.state)),
        };
        let pid = if alive {
            rec.pid.to_string()
        } else {
            "-".to_string()
        };
        println!(
            "{:<24} {:<14} {:>8}  {}",
            rec.volume,
            format!("/dev/ublkb{}", rec.dev_id),
            pid,
            state
        );
    }
    Ok(())
}
