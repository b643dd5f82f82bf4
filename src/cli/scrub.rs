//! `shale scrub VOLUME[@SNAPSHOT]`: read every chunk object the volume or
//! snapshot references and verify every checksum. Exit 0 when all match,
//! [`DAMAGE_EXIT`] when damage was found, 1 when the scrub could not run.
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap::Args;
use shale::catalog::snapshot::parse_spec;
use shale::catalog::Catalog;
use shale::config::Config;
use shale::engine::scrub::{scrub, ScrubPlan, ScrubReport};
use shale::engine::snapshot::find_snapshot;
use shale::error::Bytes;
use shale::transfer::Progress;

use super::progress::TermProgress;

/// Exit status of a scrub that found damage.
pub const DAMAGE_EXIT: u8 = 3;

/// `shale scrub VOLUME[@SNAPSHOT] [--rate BYTES]`
#[derive(Args, Debug)]
pub struct ScrubArgs {
    /// A volume (its newest stored state) or VOLUME@SNAPSHOT.
    pub spec: String,
    /// Read at most this many bytes per second (for example 50MiB);
    /// default: as fast as the store answers.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    match shale::size::parse_size(s).map_err(|e| e.to_string())? {
        0 => Err("the rate must be above zero".into()),
        n => Ok(n),
    }
}

/// The scrub found damage (main exits with [`DAMAGE_EXIT`]).
#[derive(Debug, thiserror::Error)]
#[error("{0} damaged object(s) found")]
pub struct DamageFound(pub usize);

pub fn run(config: Option<&Path>, a: ScrubArgs) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    super::runtime(true)?.block_on(async {
        let store = super::open_store(&cfg).await?;
        let (volume, snapshot) = match a.spec.split_once('@') {
            Some(_) => {
                let (v, s) = parse_spec(&a.spec)?;
                (v, Some(s))
            }
            None => (a.spec.clone(), None),
        };
        let rec = Catalog::new(store.clone())
            .get(&volume)
            .await
            .with_context(|| format!("cannot scrub {}", a.spec))?;
        let plan = match &snapshot {
            Some(name) => {
                let snap = find_snapshot(&store, rec.id, name)
                    .await
                    .with_context(|| format!("cannot scrub {}", a.spec))?;
                ScrubPlan::of_snapshot(&store, &snap, rec.size).await?
            }
            None => ScrubPlan::of_volume(&store, rec.id, rec.size).await?,
        };
        let progress = TermProgress::stderr();
        progress.start(&format!("scrub {}", a.spec), plan.data_bytes());
        let report = scrub(&store, &plan, a.rate, &|n| progress.advance(n)).await;
        progress.finish();
        let report = report.with_context(|| format!("scrub of {} failed", a.spec))?;
        print_report(&a, &report)?;
        if report.is_clean() {
            Ok(())
        } else {
            Err(DamageFound(report.damage.len()).into())
        }
    })
}

fn print_report(a: &ScrubArgs, r: &ScrubReport) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({
            "spec": a.spec,
            "chunks_checked": r.chunks_checked,
            "bytes_checked": r.bytes_checked,
            "vanished": r.vanished,
            "damage": r.damage.iter().map(|d| serde_json::json!({
                "key": d.key,
                "fault": d.fault.to_string(),
                "ranges": d.ranges.iter().map(|(o, l)| serde_json::json!({
                    "offset": o, "length": l,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    for d in &r.damage {
        writeln!(out, "damaged {}: {}", d.key, d.fault)?;
        if d.ranges.is_empty() {
            writeln!(out, "  (no range the volume reads is affected)")?;
        }
        for (o, l) in &d.ranges {
            writeln!(out, "  volume bytes {o}..{} ({})", o + l, Bytes(*l))?;
        }
    }
    let vanished = if r.vanished > 0 {
        format!(
            ", {} removed by the running server while scrubbing",
            r.vanished
        )
    } else {
        String::new()
    };
    writeln!(
        out,
        "scrub {}: {} chunks, {} checked, {} damaged{vanished}",
        a.spec,
        r.chunks_checked,
        Bytes(r.bytes_checked),
        r.damage.len()
    )?;
    Ok(())
}
