//! `shale diff`, `shale export` and `shale import`: snapshots as files.
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use shale::catalog::snapshot::{parse_spec, Snapshots};
use shale::clock::{Clock, SystemClock};
use shale::config::Config;
use shale::engine::diff::{diff_views, DiffKind};
use shale::engine::view::SnapshotView;
use shale::engine::BlockDevice;
use shale::error::Bytes;
use shale::transfer::delta::DeltaReader;
use shale::transfer::export::{export_delta, export_full, OutputFile};
use shale::transfer::sparse::RawSink;
use shale::transfer::volumes::{import_delta, import_raw, is_delta};
use shale::transfer::TransferError;

use super::progress::TermProgress;

/// `shale diff OLD NEW`
#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The older snapshot: VOLUME@SNAPSHOT
    pub old: String,
    /// The newer snapshot: VOLUME@SNAPSHOT
    pub new: String,
    /// Print JSON instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// `shale export VOL@SNAP FILE [--from VOL@BASE]`
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The snapshot to export: VOLUME@SNAPSHOT
    pub spec: String,
    /// Output file, or `-` for standard output.
    pub file: PathBuf,
    /// Write only the changes since this snapshot (VOLUME@SNAPSHOT), as a
    /// delta file for `shale import`.
    #[arg(long, value_name = "VOLUME@SNAPSHOT")]
    pub from: Option<String>,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
}

/// `shale import FILE VOL`
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A raw image, or a delta file written by `shale export --from`.
    pub file: PathBuf,
    /// The volume: created from a raw image; a delta is applied to it.
    pub volume: String,
    /// Size of the new volume (raw images only); default: the file's size
    /// rounded up to 4 KiB.
    #[arg(long, value_parser = parse_size_arg)]
    pub size: Option<u64>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    shale::size::parse_size(s).map_err(|e| e.to_string())
}

async fn snapshots(cfg: &Config) -> anyhow::Result<Snapshots> {
    super::open_snapshots(cfg, "shale-transfer").await
}

/// The view of `spec` and its canonical `VOL@SNAP` name.
async fn view(snaps: &Snapshots, spec: &str) -> anyhow::Result<(SnapshotView, String)> {
    let (vol, name) = parse_spec(spec)?;
    Ok((snaps.view(spec).await?, format!("{vol}@{name}")))
}

pub fn diff(config: Option<&Path>, a: DiffArgs) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    super::runtime(true)?.block_on(async {
        let snaps = snapshots(&cfg).await?;
        let (old, old_name) = view(&snaps, &a.old).await?;
        let (new, new_name) = view(&snaps, &a.new).await?;
        let d = diff_views(&old, &new);
        let mut out = std::io::stdout().lock();
        if a.json {
            let v = serde_json::json!({
                "old": old_name,
                "new": new_name,
                "old_size": d.old_size,
                "new_size": d.new_size,
                "ranges": d.ranges.iter().map(|r| serde_json::json!({
                    "offset": r.offset,
                    "length": r.len,
                    "kind": r.kind,
                })).collect::<Vec<_>>(),
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            return Ok(());
        }
        for r in &d.ranges {
            let kind = match r.kind {
                DiffKind::Data => "data",
                DiffKind::Zero => "zero",
            };
            writeln!(out, "{:<16} {:<16} {kind}", r.offset, r.len)?;
        }
        if d.old_size != d.new_size {
            eprintln!(
                "note: {old_name} is {} bytes and {new_name} {} bytes; ranges were compared \
                 over the first {} bytes{}",
                d.old_size,
                d.new_size,
                d.old_size.min(d.new_size),
                if d.new_size > d.old_size {
                    ", and the newer snapshot's tail is listed whole"
                } else {
                    ""
                }
            );
        }
        Ok(())
    })
}

pub fn export(config: Option<&Path>, a: ExportArgs) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    let to_stdout = a.file.as_os_str() == "-";
    if to_stdout && std::io::stdout().is_terminal() {
        anyhow::bail!(
            "standard output is a terminal; redirect it (`> FILE`, `| ...`) or give a FILE"
        );
    }
    super::runtime(true)?.block_on(async {
        let snaps = snapshots(&cfg).await?;
        let (target, target_name) = view(&snaps, &a.spec).await?;
        let base = match &a.from {
            Some(spec) => Some(view(&snaps, spec).await?),
            None => None,
        };
        let progress = TermProgress::stderr();
        progress.stop_on_ctrl_c();
        let output = if to_stdout {
            None
        } else {
            Some(OutputFile::create(&a.file, a.force)?)
        };
        let summary = match base {
            None => {
                let sink = match &output {
                    Some(o) => RawSink::sparse(o.handle()?, target.size())
                        .with_context(|| format!("cannot size {}", a.file.display()))?,
                    None => RawSink::stream(Box::new(std::io::stdout())),
                };
                let stats = export_full(&target, sink, &progress).await?;
                format!(
                    "exported {target_name} ({}, {} of data) to {}",
                    Bytes(stats.size),
                    Bytes(stats.data_bytes),
                    a.file.display()
                )
            }
            Some((base, base_name)) => {
                let names = (base_name.as_str(), target_name.as_str());
                let (diff, totals) = match &output {
                    Some(o) => {
                        let w = std::io::BufWriter::new(o.handle()?);
                        export_delta(&base, &target, names, w, &progress).await?
                    }
                    None => {
                        let w = std::io::BufWriter::new(std::io::stdout());
                        export_delta(&base, &target, names, w, &progress).await?
                    }
                };
                format!(
                    "exported the changes from {base_name} to {target_name} to {}: \
                     {} ranges, {} of data, {} of zeros",
                    a.file.display(),
                    diff.ranges.len(),
                    Bytes(totals.data_bytes),
                    Bytes(totals.zero_bytes)
                )
            }
        };
        if let Some(o) = output {
            o.commit()?;
            println!("{summary}");
        } else {
            eprintln!("{summary}");
        }
        Ok(())
    })
}

pub fn import(config: Option<&Path>, a: ImportArgs) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    let now_ms = SystemClock.now().as_millis() as u64;
    let delta = is_delta(&a.file)?;
    if delta && a.size.is_some() {
        anyhow::bail!(
            "{} is a delta file; --size applies only to raw images",
            a.file.display()
        );
    }
    super::runtime(true)?.block_on(async {
        let progress = TermProgress::stderr();
        progress.stop_on_ctrl_c();
        if delta {
            let file = std::fs::File::open(&a.file)
                .with_context(|| format!("cannot open {}", a.file.display()))?;
            let header = DeltaReader::new(std::io::BufReader::new(file))
                .with_context(|| a.file.display().to_string())?
                .header()
                .clone();
            println!(
                "applying the changes from {} to {} to volume {} (it must hold {})",
                header.base, header.target, a.volume, header.base
            );
            let (check, t) = match import_delta(&cfg, &a.file, &a.volume, &progress).await {
                Err(TransferError::Interrupted) => anyhow::bail!(
                    "interrupted; the volume may hold part of the changes: run the same \
                     import again to finish (a delta applies again where it stopped)"
                ),
                other => other?,
            };
            if check.applied > 0 {
                println!(
                    "{} of {} ranges already held {}'s bytes (an earlier apply got that far)",
                    check.applied, check.totals.records, check.header.target
                );
            }
            println!(
                "applied the changes from {} to {} to volume {}: {} of data, {} of zeros",
                check.header.base,
                check.header.target,
                a.volume,
                Bytes(t.data_bytes),
                Bytes(t.zero_bytes)
            );
        } else {
            let (rec, stats) =
                import_raw(&cfg, &a.file, &a.volume, a.size, now_ms, &progress).await?;
            println!(
                "created volume {} (id {}, {}) from {}: {} of data written",
                rec.name,
                rec.id,
                Bytes(rec.size),
                a.file.display(),
                Bytes(stats.written_bytes)
            );
        }
        Ok(())
    })
}
