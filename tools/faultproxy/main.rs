//! `shale-faultproxy`: the fault-injecting S3 proxy of tools/faultproxy/proxy.rs
//! as a program, for the soak (tools/soak.sh) and manual runs.
//!
//! ```text
//! shale-faultproxy --upstream 127.0.0.1:PORT [--listen 127.0.0.1:0] [--seed N]
//!                  [--schedule 'SECS:PHASE,...'] [--stall-ms MS] [--latency-ms MS]
//! ```
//!
//! The schedule repeats until the proxy is stopped. A phase is `clean`,
//! `mixed=SHARE` (that share of requests gets one of every kind of fault),
//! `FAULT=SHARE` for one kind (`latency`, `reset`, `lost-response`,
//! `503-slowdown`, `500-internal`, `stall-body`), or an outage: `down`
//! (connections refused), `blackhole` (never answers), `unavailable`
//! (every request 503 SlowDown). Without a schedule it forwards cleanly.
//!
//! Prints `listening on ADDR` first, then a line per phase change and
//! `stats ...` every `--report-secs` and on SIGTERM/SIGINT.

#[allow(dead_code)]
mod proxy;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use proxy::{FaultProxy, Faults, Outage, WireFault};

#[derive(Parser, Debug)]
#[command(
    name = "shale-faultproxy",
    about = "Fault-injecting proxy for S3 traffic"
)]
struct Args {
    /// The S3 server to forward to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Seed of the fault choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Repeating schedule `SECS:PHASE,...` (see the module docs).
    #[arg(long)]
    schedule: Option<String>,
    /// How long a stalled response body stalls before the reset.
    #[arg(long, default_value_t = 30_000)]
    stall_ms: u64,
    /// Upper end of injected latency (uniform in half of it to all of it).
    #[arg(long, default_value_t = 500)]
    latency_ms: u64,
    /// Print stats this often.
    #[arg(long, default_value_t = 10)]
    report_secs: u64,
}

#[derive(Debug, Clone)]
enum Phase {
    Faults(Faults),
    Outage(Outage),
}

fn parse_schedule(text: &str, base: &Faults) -> Result<Vec<(Duration, String, Phase)>> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (secs, phase) = item
            .split_once(':')
            .with_context(|| format!("schedule item {item:?} is not SECS:PHASE"))?;
        let secs: f64 = secs
            .parse()
            .with_context(|| format!("schedule item {item:?}: bad seconds"))?;
        let p = match phase.split_once('=') {
            None if phase == "clean" => Phase::Faults(Faults {
                share: 0.0,
                ..base.clone()
            }),
            None => match Outage::parse(phase) {
                Some(o) => Phase::Outage(o),
                None => bail!("schedule item {item:?}: unknown phase {phase:?}"),
            },
            Some((kind, share)) => {
                let share: f64 = share
                    .parse()
                    .with_context(|| format!("schedule item {item:?}: bad share"))?;
                let kinds = if kind == "mixed" {
                    WireFault::ALL.to_vec()
                } else {
                    vec![WireFault::parse(kind)
                        .with_context(|| format!("schedule item {item:?}: unknown fault"))?]
                };
                Phase::Faults(Faults {
                    share,
                    kinds,
                    ..base.clone()
                })
            }
        };
        out.push((Duration::from_secs_f64(secs), phase.to_string(), p));
    }
    if out.is_empty() {
        bail!("empty schedule");
    }
    Ok(out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let base = Faults {
        latency: Duration::from_millis(args.latency_ms),
        stall: Duration::from_millis(args.stall_ms),
        ..Faults::none()
    };
    let schedule = match &args.schedule {
        Some(s) => Some(parse_schedule(s, &base)?),
        None => None,
    };
    let proxy = FaultProxy::start(args.listen, args.upstream, args.seed)
        .await
        .context("starting the proxy")?;
    println!("listening on {}", proxy.addr());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let report = Duration::from_secs(args.report_secs.max(1));
    let mut next_report = tokio::time::Instant::now() + report;
    let mut step = 0usize;
    let mut phase_end = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        if let Some(s) = &schedule {
            if now >= phase_end {
                let (len, name, phase) = &s[step % s.len()];
                match phase {
                    Phase::Faults(f) => {
                        proxy.set_outage(Outage::None);
                        proxy.set_faults(f.clone());
                    }
                    Phase::Outage(o) => {
                        proxy.set_faults(Faults::none());
                        proxy.set_outage(*o);
                    }
                }
                println!("phase {name} for {}s", len.as_secs_f64());
                phase_end = now + *len;
                step += 1;
            }
        }
        if now >= next_report {
            println!("stats {}", proxy.stats().summary());
            next_report = now + report;
        }
        let wake = if schedule.is_some() {
            phase_end.min(next_report)
        } else {
            next_report
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    println!("stats {}", proxy.stats().summary());
    let faults = proxy.stats().faults_total();
    let requests = proxy.stats().requests.load(Ordering::Relaxed);
    println!("final requests={requests} faults={faults}");
    Ok(())
}
