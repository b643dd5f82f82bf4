//! What a ublk server serves: a catalog volume (the product), or one of two
//! hidden development backings used by the VM test until volumes can be
//! attached: `--memory SIZE` (RAM, lost with the process) and
//! `--backing-file PATH --size SIZE` (a plain file, survives a server crash).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_trait::async_trait;
use shale::catalog::lease::LeaseError;
use shale::config::Config;
use shale::daemon::{Attached, DaemonError};
use shale::engine::memdisk::MemDisk;
use shale::engine::{check_range, BlockDevice};
use shale::error::BlockError;
use shale::frontend::ublk::runstate::pid_alive;

/// Which data a server attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingSpec {
    /// A catalog volume, by name.
    Volume,
    /// RAM of this many bytes.
    Memory(u64),
    /// A file, created or sized to this many bytes.
    File(PathBuf, u64),
}

impl BackingSpec {
    /// Server arguments that reproduce this spec (stored for recovery).
    pub fn to_args(&self) -> Vec<String> {
        match self {
            BackingSpec::Volume => Vec::new(),
            BackingSpec::Memory(size) => vec!["--memory".into(), size.to_string()],
            BackingSpec::File(path, size) => vec![
                "--backing-file".into(),
                path.display().to_string(),
                "--size".into(),
                size.to_string(),
            ],
        }
    }
}

/// Parse a size: bytes, or a number with K, M, G or T (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with an optional K/M/G/T"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// The opened device and how to close it.
pub struct Opened {
    pub device: Arc<dyn BlockDevice>,
    /// Set for catalog volumes: the lease-holding attachment.
    attached: Option<Attached>,
}

impl Opened {
    /// Say where the volume's ublk device is (for its metrics and status).
    pub fn set_device(&self, device: &str) {
        if let Some(a) = &self.attached {
            a.metrics().set_device("ublk", device);
        }
    }

    /// Make every acknowledged write durable and release the data (for a
    /// volume: close it, then release its lease).
    pub async fn close(self) -> anyhow::Result<()> {
        self.device.flush().await.context("flush")?;
        if let Some(attached) = self.attached {
            attached.close().await.context("close the volume")?;
        }
        Ok(())
    }
}

/// Attach a catalog volume. A lease left by a crashed server of this host
/// and local directory is taken over at once (see `shale::daemon`). One
/// that does not name its directory (written by an older version) but whose
/// holder `<host>:<pid>` is a process of this host that is gone is waited
/// out: it expires within the lease TTL, and the kernel holds the device's
/// I/O meanwhile.
async fn attach_volume(config: Option<&Path>, name: &str) -> anyhow::Result<Attached> {
    let cfg = Config::load(config).context("load the configuration")?;
    let deadline = Instant::now() + cfg.lease.ttl() + Duration::from_secs(5);
    let mut told = false;
    loop {
        match shale::daemon::attach(&cfg, name).await {
            Ok(a) => {
                a.volume.start_warm_start(&cfg.warm_start);
                return Ok(a);
            }
            Err(DaemonError::Lease(LeaseError::Held { holder, .. }))
                if held_by_dead_local_process(&holder) && Instant::now() < deadline =>
            {
                if !told {
                    log::warn!(
                        "volume {name}: lease still held by crashed server {holder}; waiting for it to expire"
                    );
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("attach volume {name:?}")),
        }
    }
}

/// Whether lease holder `<host>:<pid>` is a process of this host that is gone.
fn held_by_dead_local_process(holder: &str) -> bool {
    let ours = shale::daemon::holder_name();
    let (Some((host, pid)), Some((our_host, _))) = (holder.rsplit_once(':'), ours.rsplit_once(':'))
    else {
        return false;
    };
    match pid.parse::<i32>() {
        Ok(pid) => host == our_host && pid != std::process::id() as i32 && !pid_alive(pid),
        Err(_) => false,
    }
}

/// Open the data behind `spec` (inside the server's tokio runtime).
pub async fn open(
    spec: &BackingSpec,
    volume: &str,
    config: Option<&Path>,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<Opened> {
    let device: Arc<dyn BlockDevice> = match spec {
        BackingSpec::Volume => {
            let attached = attach_volume(config, volume).await?;
            let device = attached.metered("ublk", "/dev/ublkb?");
            return Ok(Opened {
                device,
                attached: Some(attached),
            });
        }
        BackingSpec::Memory(size) => {
            check_size(*size)?;
            Arc::new(MemDisk::new(*size))
        }
        BackingSpec::File(path, size) => {
            check_size(*size)?;
            Arc::new(FileDisk::open(path, *size, runtime)?)
        }
    };
    Ok(Opened {
        device,
        attached: None,
    })
}

fn check_size(size: u64) -> anyhow::Result<()> {
    if size == 0 || !size.is_multiple_of(4096) {
        bail!("size {size} must be a non-zero multiple of 4096 bytes");
    }
    Ok(())
}

/// A file-backed device whose I/O runs on tokio's blocking pool, so queue
/// threads wait for other threads exactly as they do with a real volume.
pub struct FileDisk {
    file: Arc<File>,
    size: u64,
    runtime: tokio::runtime::Handle,
}

impl FileDisk {
    /// Open or create `path`; a new or empty file is sized to `size`, an
    /// existing one must already have exactly that size.
    pub fn open(
        path: &Path,
        size: u64,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<FileDisk> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("open backing file {}", path.display()))?;
        let len = file.metadata()?.len();
        if len == 0 {
            file.set_len(size)
                .with_context(|| format!("size backing file {}", path.display()))?;
        } else if len != size {
            bail!(
                "backing file {} has {len} bytes, not the requested {size}",
                path.display()
            );
        }
        Ok(FileDisk {
            file: Arc::new(file),
            size,
            runtime,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, BlockError> {
        let file = self.file.clone();
        match self.runtime.spawn_blocking(move || f(&file)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(BlockError::Io(e.to_string())),
            Err(e) => Err(BlockError::Io(format!("I/O task failed: {e}"))),
        }
    }
}

const ZERO_CHUNK: usize = 1 << 20;

#[async_trait]
impl BlockDevice for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.size)?;
        let len = buf.len();
        let data = self
            .blocking(move |f| {
                let mut v = vec![0u8; len];
                f.read_exact_at(&mut v, offset)?;
                Ok(v)
            })
            .await?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        check_range(offset, data.len() as u64, self.size)?;
        let data = data.to_vec();
        self.blocking(move |f| {
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.blocking(|f| f.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        check_range(offset, len, self.size)?;
        self.blocking(move |f| {
            let zeros = vec![0u8; ZERO_CHUNK];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(ZERO_CHUNK as u64) as usize;
                f.write_all_at(&zeros[..n], offset + done)?;
                done += n as u64;
            }
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_local_lease_holders_are_waited_out() {
        let ours = shale::daemon::holder_name();
        let (host, _) = ours.rsplit_once(':').unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        assert!(held_by_dead_local_process(&format!("{host}:{dead}")));
        assert!(
            !held_by_dead_local_process(&ours),
            "our own process is alive"
        );
        assert!(!held_by_dead_local_process(&format!("other-{host}:{dead}")));
        assert!(!held_by_dead_local_process("no-pid-here"));
        assert!(!held_by_dead_local_process(&format!("{host}:notanumber")));
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn file_disk_round_trip_and_size_guard() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let disk = FileDisk::open(&path, 1 << 20, rt.handle().clone()).unwrap();
        // Polled by a non-tokio executor, like a ublk queue thread.
        futures::executor::block_on(async {
            disk.write(4096, &[9u8; 8192], true).await.unwrap();
            let mut buf = vec![0u8; 8192];
            disk.read(4096, &mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == 9));
            disk.write_zeroes(4096, 4096, false).await.unwrap();
            disk.read(4096, &mut buf).await.unwrap();
            assert!(buf[..4096].iter().all(|&b| b == 0));
            assert!(buf[4096..].iter().all(|&b| b == 9));
            assert!(matches!(
                disk.read(1 << 20, &mut buf).await,
                Err(BlockError::OutOfRange { .. })
            ));
        });
        drop(disk);
        assert!(FileDisk::open(&path, 2 << 20, rt.handle().clone()).is_err());
        assert!(FileDisk::open(&path, 1 << 20, rt.handle().clone()).is_ok());
    }
}
