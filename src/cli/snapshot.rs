//! `shale snapshot create|list|delete|rollback`, `shale clone`, `shale
//! flatten` and `shale volume create --from`.
use std::path::Path;

use clap::{Args, Subcommand};
use shale::catalog::snapshot::Snapshots;
use shale::clock::{Clock, SystemClock};
use shale::config::Config;

use super::progress::TermProgress;
use super::volume::{format_utc_ms, render_table};
use shale::transfer::Progress;

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot: VOLUME@SNAPSHOT. Of an attached volume, through its
    /// server on this host, at a flush point.
    Create {
        /// VOLUME@SNAPSHOT
        spec: String,
    },
    /// List snapshots (of one volume, or of all).
    List {
        /// Only this volume's snapshots.
        volume: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (refused while clones of it exist).
    Delete {
        /// VOLUME@SNAPSHOT
        spec: String,
    },
    /// Make a detached volume's content that of one of its snapshots again.
    /// Writes made after the snapshot are lost.
    Rollback {
        /// VOLUME@SNAPSHOT
        spec: String,
    },
}

/// `shale clone VOLUME@SNAPSHOT NEWVOLUME`
#[derive(Args, Debug)]
pub struct CloneArgs {
    /// The parent snapshot: VOLUME@SNAPSHOT
    pub spec: String,
    /// Name of the new volume.
    pub name: String,
}

/// `shale flatten VOLUME`
#[derive(Args, Debug)]
pub struct FlattenArgs {
    /// The clone to make independent of its parent snapshot.
    pub name: String,
}

fn with_snapshots<T>(
    config: Option<&Path>,
    f: impl AsyncFnOnce(&Snapshots) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let cfg = Config::load(config)?;
    super::runtime(true)?.block_on(async move {
        let snaps = super::open_snapshots(&cfg, "shale-snapshot").await?;
        f(&snaps).await
    })
}

fn now_ms() -> u64 {
    SystemClock.now().as_millis() as u64
}

pub fn run(config: Option<&Path>, cmd: SnapshotCmd) -> anyhow::Result<()> {
    with_snapshots(config, async move |s: &Snapshots| match cmd {
        SnapshotCmd::Create { spec } => {
            let snap = s.create(&spec, now_ms()).await?;
            println!(
                "created snapshot {spec} (id {}, {} chunks)",
                snap.id,
                snap.checkpoint.chunks.len()
            );
            Ok(())
        }
        SnapshotCmd::List { volume, json } => {
            let entries = s.list(volume.as_deref()).await?;
            if json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "volume": e.volume,
                            "name": e.snapshot.name,
                            "id": e.snapshot.id,
                            "created_ms": e.snapshot.created_ms,
                            "chunks": e.snapshot.checkpoint.chunks.len(),
                            "clones": e.clones,
                            "deleting": e.snapshot.deleting,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let mut rows = vec![["SNAPSHOT", "ID", "CREATED", "CLONES"].map(String::from)];
            for e in entries {
                rows.push([
                    format!(
                        "{}@{}{}",
                        e.volume,
                        e.snapshot.name,
                        if e.snapshot.deleting {
                            " (deleting)"
                        } else {
                            ""
                        }
                    ),
                    e.snapshot.id.to_string(),
                    format_utc_ms(e.snapshot.created_ms),
                    e.clones.join(","),
                ]);
            }
            print!("{}", render_table(&rows));
            Ok(())
        }
        SnapshotCmd::Delete { spec } => {
            let freed = s.delete(&spec).await?;
            println!("deleted snapshot {spec} ({freed} chunks freed)");
            Ok(())
        }
        SnapshotCmd::Rollback { spec } => {
            s.rollback(&spec).await?;
            println!("rolled back to {spec}");
            Ok(())
        }
    })
}

pub fn clone(config: Option<&Path>, a: CloneArgs) -> anyhow::Result<()> {
    with_snapshots(config, async move |s: &Snapshots| {
        let rec = s.clone_volume(&a.spec, &a.name, now_ms()).await?;
        println!(
            "created volume {} (id {}) as a clone of {}",
            rec.name, rec.id, a.spec
        );
        Ok(())
    })
}

/// `shale volume create NAME [--size S] --from VOL@SNAP`.
pub fn create_from(
    config: Option<&Path>,
    spec: &str,
    name: &str,
    size: Option<u64>,
) -> anyhow::Result<()> {
    with_snapshots(config, async move |s: &Snapshots| {
        let rec = s.create_from(spec, name, size, now_ms()).await?;
        println!(
            "created volume {} (id {}, size {}, thin) as a clone of {spec}",
            rec.name,
            rec.id,
            shale::size::format_size(rec.size)
        );
        Ok(())
    })
}

pub fn flatten(config: Option<&Path>, a: FlattenArgs) -> anyhow::Result<()> {
    with_snapshots(config, async move |s: &Snapshots| {
        let progress = TermProgress::stderr();
        let mut reported: Option<u64> = None;
        let res = s
            .flatten(&a.name, |done, total| {
                let prev = *reported.get_or_insert_with(|| {
                    progress.start("flatten", total);
                    0
                });
                progress.advance(done.saturating_sub(prev));
                reported = Some(done);
            })
            .await;
        progress.finish();
        let report = res?;
        println!(
            "flattened volume {}: it no longer reads through {} ({} read from the parent, {} of it data copied)",
            report.record.name,
            report.parent.as_deref().unwrap_or("a parent"),
            shale::error::Bytes(report.copy.read_through),
            shale::error::Bytes(report.copy.copied),
        );
        Ok(())
    })
}
