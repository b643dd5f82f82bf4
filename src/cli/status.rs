//! `shale status [VOL] [--json]` and `shale top`: the volumes attached on
//! this host, from their servers' control sockets (see
//! [`shale::metrics::exporter::collect`]); no store request is made.
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use shale::config::Config;
use shale::metrics::exporter::collect;
use shale::metrics::report::VolumeReport;
use shale::metrics::status::VolumeStatus;
use shale::size::format_size;

use super::volume::render_table;

/// Longest sampling interval accepted, in milliseconds.
const MAX_SAMPLE_MS: u64 = 60_000;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Show only this volume (it must be attached on this host).
    #[arg(value_name = "VOLUME")]
    volume: Option<String>,
    /// Print JSON (one object per volume, with a `cost` section).
    #[arg(long)]
    json: bool,
    /// Rates and latency are measured over this many milliseconds
    /// (0: no rates, answer at once). At most 60000.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    sample_ms: u64,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Seconds between refreshes (1 to 3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 2)]
    interval: u64,
    /// Stop after this many refreshes (default: until q, Esc or Ctrl-C).
    #[arg(long, value_name = "N")]
    iterations: Option<u64>,
}

#[derive(Serialize)]
struct StatusJson {
    volumes: Vec<VolumeStatus>,
    /// Volumes whose server did not answer properly.
    errors: Vec<String>,
}

/// The statuses now, with rates since `prev` (reports by volume id).
fn statuses(
    prev: &HashMap<u64, VolumeReport>,
    cur: &[VolumeReport],
    only: Option<&str>,
) -> Vec<VolumeStatus> {
    cur.iter()
        .filter(|r| only.is_none_or(|v| r.volume == v))
        .map(|r| VolumeStatus::new(prev.get(&r.id), r))
        .collect()
}

fn by_id(reports: Vec<VolumeReport>) -> HashMap<u64, VolumeReport> {
    reports.into_iter().map(|r| (r.id, r)).collect()
}

pub fn status(config: Option<&Path>, a: StatusArgs) -> anyhow::Result<()> {
    if a.sample_ms > MAX_SAMPLE_MS {
        bail!(
            "--sample-ms {} is above the maximum of {MAX_SAMPLE_MS}",
            a.sample_ms
        );
    }
    let cfg = Config::load(config).context("loading configuration")?;
    let rt = super::runtime(false)?;
    let (first, cur, errors) = rt.block_on(async {
        let mut first = HashMap::new();
        if a.sample_ms > 0 {
            first = by_id(collect(&cfg.data_dir).await.0);
            tokio::time::sleep(Duration::from_millis(a.sample_ms)).await;
        }
        let (cur, errors) = collect(&cfg.data_dir).await;
        (first, cur, errors)
    });
    let list = statuses(&first, &cur, a.volume.as_deref());
    if let Some(v) = &a.volume {
        if list.is_empty() {
            bail!(
                "volume {v} is not attached on this host (no server answers on its control socket)"
            );
        }
    }
    if a.json {
        let out = StatusJson {
            volumes: list,
            errors,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for e in &errors {
        eprintln!("shale: {e}");
    }
    if list.is_empty() {
        println!("no volume is attached on this host");
        return Ok(());
    }
    print!("{}", table(&list));
    Ok(())
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".to_string())
}

/// `12.3` for a millisecond figure.
fn ms(v: Option<f64>) -> String {
    or_dash(v.map(|v| format!("{v:.2}")))
}

/// The status table (header row first).
fn table(list: &[VolumeStatus]) -> String {
    let mut rows = vec![[
        "VOLUME",
        "FRONTEND",
        "LEASE",
        "UNSTORED",
        "CACHE HIT",
        "READ IOPS",
        "WRITE IOPS",
        "P50 MS",
        "P99 MS",
    ]
    .map(String::from)];
    for s in list {
        let frontends: Vec<String> = s
            .frontends
            .iter()
            .map(|f| format!("{} {}", f.kind, f.device))
            .collect();
        let lease = match &s.lease.fenced {
            Some(_) => format!("FENCED (epoch {})", s.lease.epoch),
            None => format!(
                "epoch {}, expires in {:.0}s",
                s.lease.epoch, s.lease.expires_in_seconds
            ),
        };
        let unstored = if s.unstored_bytes == 0 {
            "0".to_string()
        } else {
            format!(
                "{}, {:.1}s old",
                format_size(s.unstored_bytes),
                s.unstored_age_seconds
            )
        };
        rows.push([
            s.volume.clone(),
            if frontends.is_empty() {
                "-".into()
            } else {
                frontends.join(", ")
            },
            lease,
            unstored,
            or_dash(s.cache_hit_ratio.map(|r| format!("{:.1}%", r * 100.0))),
            format!("{:.0}", s.recent.read_iops),
            format!("{:.0}", s.recent.write_iops),
            ms(s.recent.latency_p50_ms),
            ms(s.recent.latency_p99_ms),
        ]);
    }
    render_table(&rows)
}

/// Restores the terminal when dropped (also on errors and panics).
struct Screen;

impl Screen {
    fn enter() -> anyhow::Result<Screen> {
        crossterm::terminal::enable_raw_mode().context("cannot switch the terminal to raw mode")?;
        let screen = Screen;
        crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = crossterm::execute!(
            std::io::stdout(),
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// Whether a key asking to quit arrives within `wait`.
fn quit_within(wait: Duration) -> anyhow::Result<bool> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    let deadline = std::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || !event::poll(left)? {
            return Ok(false);
        }
        if let Event::Key(k) = event::read()? {
            let ctrl_c =
                k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
            if k.kind == KeyEventKind::Press
                && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
            {
                return Ok(true);
            }
        }
    }
}

/// One screen of `shale top`.
fn frame(list: &[VolumeStatus], errors: &[String], interval: u64) -> String {
    let now = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%SZ");
    let mut out = format!(
        "shale top - {now} - {} attached volume(s) - every {interval}s, q quits\n\n",
        list.len()
    );
    if list.is_empty() {
        out.push_str("no volume is attached on this host\n");
    } else {
        out.push_str(&table(list));
    }
    for e in errors {
        out.push_str(&format!("error: {e}\n"));
    }
    out
}

pub fn top(config: Option<&Path>, a: TopArgs) -> anyhow::Result<()> {
    if !(1..=3600).contains(&a.interval) {
        bail!("--interval {} must be 1 to 3600 seconds", a.interval);
    }
    let cfg = Config::load(config).context("loading configuration")?;
    let rt = super::runtime(false)?;
    let interactive = std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    let _screen = if interactive {
        Some(Screen::enter()?)
    } else {
        None
    };
    let mut prev = HashMap::new();
    let mut shown = 0u64;
    loop {
        let (cur, errors) = rt.block_on(collect(&cfg.data_dir));
        let text = frame(&statuses(&prev, &cur, None), &errors, a.interval);
        let mut out = std::io::stdout().lock();
        if interactive {
            crossterm::queue!(
                out,
                crossterm::cursor::MoveTo(0, 0),
                crossterm::terminal::Clear(crossterm::terminal::ClearType::All)
            )?;
            // Raw mode: lines need a carriage return.
            out.write_all(text.replace('\n', "\r\n").as_bytes())?;
        } else {
            writeln!(out, "{text}")?;
        }
        out.flush()?;
        drop(out);
        prev = by_id(cur);
        shown += 1;
        if a.iterations.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        let wait = Duration::from_secs(a.interval);
        if interactive {
            if quit_within(wait)? {
                return Ok(());
            }
        } else {
            std::thread::sleep(wait);
        }
    }
}
