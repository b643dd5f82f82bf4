//! `shale volume import|export`: copy a raw image file into or out of a
//! volume through the engine (the same path frontends use).
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::Context;
use shale::config::Config;
use shale::engine::BlockDevice;
use shale::engine::SECTOR;
use shale::error::Bytes;
use shale::transfer::Progress;

use super::progress::TermProgress;

/// Copy unit: large enough to keep the engine busy, small enough for memory.
const BLOCK: usize = 1 << 20;

/// Write `file` to the start of volume `name`, then flush and close it.
/// All-zero blocks become `write_zeroes` (stored as unmapped). A final
/// partial sector is padded with zeros. Files larger than the volume are
/// refused before anything is written.
pub async fn import(cfg: &Config, name: &str, path: &Path) -> anyhow::Result<()> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    let attached = shale::daemon::attach(cfg, name).await?;
    let (volume, record) = (attached.volume.clone(), attached.record.clone());
    if len > record.size {
        attached.close().await?;
        anyhow::bail!(
            "{} is {} bytes, larger than volume {name:?} ({} bytes)",
            path.display(),
            len,
            record.size
        );
    }
    let progress = TermProgress::stderr();
    progress.start("import", len);
    let result = async {
        let mut buf = vec![0u8; BLOCK];
        let mut offset = 0u64;
        while offset < len {
            let want = BLOCK.min((len - offset) as usize);
            file.read_exact(&mut buf[..want])
                .with_context(|| format!("cannot read {}", path.display()))?;
            // Pad a final partial sector with zeros.
            let padded = (want as u64).div_ceil(SECTOR) * SECTOR;
            buf[want..padded as usize].fill(0);
            let chunk = &buf[..padded as usize];
            let written = if chunk.iter().all(|&b| b == 0) {
                volume.write_zeroes(offset, padded, false).await
            } else {
                volume.write(offset, chunk, false).await
            };
            written.with_context(|| {
                format!(
                    "import stopped at byte {offset} of {}: the volume holds the bytes before it",
                    path.display()
                )
            })?;
            offset += want as u64;
            progress.advance(want as u64);
        }
        volume.flush().await?;
        anyhow::Ok(())
    }
    .await;
    progress.finish();
    drop(volume);
    let closed = attached.close().await;
    result?;
    closed.context("cannot close the volume")?;
    println!("imported {} ({len} bytes) into volume {name}", Bytes(len));
    Ok(())
}

/// Write the whole volume to `path` (created or truncated), sparse where
/// the volume reads as zeros, and fsync it.
pub async fn export(cfg: &Config, name: &str, path: &Path) -> anyhow::Result<()> {
    let attached = shale::daemon::attach(cfg, name).await?;
    let (volume, record) = (attached.volume.clone(), attached.record.clone());
    let progress = TermProgress::stderr();
    progress.start("export", record.size);
    let result = async {
        let mut file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut buf = vec![0u8; BLOCK];
        let mut offset = 0u64;
        while offset < record.size {
            let n = BLOCK.min((record.size - offset) as usize);
            volume.read(offset, &mut buf[..n]).await?;
            if buf[..n].iter().any(|&b| b != 0) {
                file.seek(SeekFrom::Start(offset))?;
                file.write_all(&buf[..n])
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            offset += n as u64;
            progress.advance(n as u64);
        }
        file.set_len(record.size)?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", path.display()))?;
        anyhow::Ok(())
    }
    .await;
    progress.finish();
    drop(volume);
    let closed = attached.close().await;
    result?;
    closed.context("cannot close the volume")?;
    println!(
        "exported volume {name} ({}) to {}",
        Bytes(record.size),
        path.display()
    );
    Ok(())
}
