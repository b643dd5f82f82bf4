//! `shale-crashcheck`: a verifying writer and checker for crash and
//! power-loss tests of a block device (a /dev/ublkbN, a file) or an NBD
//! export.
//!
//! `write` stamps blocks with generations (see `stamp`: generation `g` of
//! a run always goes to the same block, derived from the seed), one request
//! at a time, issues FLUSH at random points, and prints a ledger line
//! (`ledger`) after each acknowledged FLUSH. `scan` reads every block back
//! and prints what each holds; `verify` judges a ledger holding scans (a
//! file, or a whole VM console log); `check` is scan + verify on a ledger
//! file. The ledger must be kept where the crash cannot reach it: in a VM,
//! the serial console captured by the host.
//!
//! Exit status: 0 pass, 1 a block failed its check, 2 usage or ledger
//! error, 3 the target failed while writing (the ledger says after which
//! generation).

mod ledger;
mod nbd;
mod stamp;
mod target;
mod verify;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use ledger::Event;
use stamp::{block_of, decode, encode, mix, Found, MIN_BLOCK};
use target::{AlignedBuf, Target};

#[derive(Parser, Debug)]
#[command(
    name = "shale-crashcheck",
    about = "Verifying writer and checker for crash and power-loss tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write generations `--from ..` to their blocks, with random FLUSHes.
    Write(WriteArgs),
    /// Read every block and print what it holds (ledger SCAN lines).
    Scan(ScanArgs),
    /// Scan the target, append the scan to the ledger file, then verify it.
    Check(CheckArgs),
    /// Verify every scan in a ledger file or console log.
    Verify(VerifyArgs),
    /// Print one ledger line for an event, e.g. `line PLAN 1 500`.
    Line {
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        words: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct TargetArgs {
    /// A block device or file (opened O_DIRECT), `nbd://HOST:PORT/EXPORT`
    /// or `nbd+unix:///EXPORT?socket=PATH`.
    #[arg(long)]
    target: String,
    /// Open a path without O_DIRECT (files on tmpfs).
    #[arg(long)]
    buffered: bool,
    /// Also append every ledger line to this file.
    #[arg(long)]
    journal: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The run's seed (which block each generation goes to).
    #[arg(long)]
    seed: u64,
    /// Number of blocks used, from offset 0.
    #[arg(long)]
    blocks: u64,
    /// Block size in bytes (a multiple of 512).
    #[arg(long, default_value_t = 4096)]
    block_size: usize,
}

#[derive(Args, Debug)]
struct WriteArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    run: RunArgs,
    /// First generation to write (at least 1).
    #[arg(long)]
    from: u64,
    /// How many generations to write.
    #[arg(long)]
    count: u64,
    /// Chance of a FLUSH after each write (0: never, 1: after every write).
    #[arg(long, default_value_t = 0.1)]
    flush_prob: f64,
    /// Print an ACKED line after every acknowledged write.
    #[arg(long)]
    log_acks: bool,
}

#[derive(Args, Debug)]
struct ScanArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    run: RunArgs,
    /// FLUSH after the scan and say so (what was read becomes the floor).
    #[arg(long)]
    flush: bool,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The target (see `write`).
    #[arg(long)]
    target: String,
    #[arg(long)]
    buffered: bool,
    /// The ledger file: read for the run, appended with the scan.
    #[arg(long)]
    journal: PathBuf,
    /// Acknowledged writes must survive too (process crashes only).
    #[arg(long)]
    durable_on_ack: bool,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// A ledger file or a console log holding ledger lines.
    #[arg(long)]
    journal: PathBuf,
    /// Acknowledged writes must survive too (process crashes only).
    #[arg(long)]
    durable_on_ack: bool,
}

/// Prints ledger lines to stdout and, if asked, appends them to a file.
struct Out {
    file: Option<std::fs::File>,
}

impl Out {
    fn new(journal: Option<&Path>) -> Result<Out> {
        let file = journal
            .map(|p| {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("open ledger {}", p.display()))
            })
            .transpose()?;
        Ok(Out { file })
    }

    fn emit(&mut self, e: &Event) -> Result<()> {
        let line = e.line();
        println!("{line}");
        if let Some(f) = &mut self.file {
            writeln!(f, "{line}").context("append to the ledger")?;
        }
        Ok(())
    }
}

fn check_run(run: &RunArgs) -> Result<()> {
    if run.blocks == 0 {
        bail!("--blocks must be at least 1");
    }
    if run.block_size < MIN_BLOCK || !run.block_size.is_multiple_of(512) || run.block_size > 1 << 20
    {
        bail!("--block-size must be a multiple of 512 from {MIN_BLOCK} to 1 MiB");
    }
    Ok(())
}

/// Outcome of a command other than "it worked".
enum Failed {
    Blocks,
    Target,
}

fn write(a: &WriteArgs) -> Result<Option<Failed>> {
    check_run(&a.run)?;
    if a.from == 0 || a.count == 0 {
        bail!("--from must be at least 1 and --count at least 1");
    }
    if !(0.0..=1.0).contains(&a.flush_prob) {
        bail!("--flush-prob must be between 0 and 1");
    }
    let to = a
        .from
        .checked_add(a.count - 1)
        .context("--from + --count overflows")?;
    let mut out = Out::new(a.target.journal.as_deref())?;
    let mut t = Target::open(&a.target.target, a.target.buffered)?;
    t.check_fits(a.run.blocks, a.run.block_size)?;
    let mut buf = AlignedBuf::new(a.run.block_size);
    let mut rng = mix(a.run.seed ^ mix(a.from) ^ 0x0046_6c75_7368);
    let bs = a.run.block_size as u64;
    out.emit(&Event::Writer { from: a.from, to })?;
    let mut last = 0;
    for gen in a.from..=to {
        let block = block_of(a.run.seed, gen, a.run.blocks);
        encode(a.run.seed, block, gen, buf.get_mut());
        let step = t.write_at(block * bs, &buf).and_then(|()| {
            rng = mix(rng);
            let roll = (rng >> 11) as f64 / (1u64 << 53) as f64;
            if roll < a.flush_prob {
                t.flush().map(|()| true)
            } else {
                Ok(false)
            }
        });
        match step {
            Ok(flushed) => {
                last = gen;
                if flushed {
                    out.emit(&Event::Flushed { gen })?;
                } else if a.log_acks {
                    out.emit(&Event::Acked { gen })?;
                }
            }
            Err(e) => {
                out.emit(&Event::Broken { last })?;
                eprintln!("shale-crashcheck: writing generation {gen} to block {block}: {e:#}");
                return Ok(Some(Failed::Target));
            }
        }
    }
    out.emit(&Event::Acked { gen: to })?;
    t.close();
    Ok(None)
}

/// Scan every block; returns the events printed.
fn scan(
    target: &str,
    buffered: bool,
    run: &RunArgs,
    flush: bool,
    out: &mut Out,
) -> Result<Vec<Event>> {
    check_run(run)?;
    let mut t = Target::open(target, buffered)?;
    t.check_fits(run.blocks, run.block_size)?;
    let mut buf = AlignedBuf::new(run.block_size);
    let mut events = Vec::new();
    let mut line = Vec::new();
    let mut first = 0;
    let mut bad = Vec::new();
    for block in 0..run.blocks {
        // A read error is a failed block (the data is not there), not a
        // reason to stop looking at the others.
        let found = match t.read_at(block * run.block_size as u64, &mut buf) {
            Ok(()) => decode(run.seed, block, buf.get()),
            Err(e) => Found::Damaged(format!("read failed: {e:#}")),
        };
        let seen = match found {
            Found::Zero => Some(0),
            Found::Gen(g) => Some(g),
            Found::Damaged(why) => {
                bad.push(Event::Bad { block, why });
                None
            }
        };
        line.push(seen);
        if line.len() == 32 || block + 1 == run.blocks {
            events.push(Event::Scan {
                first,
                gens: std::mem::take(&mut line),
            });
            first = block + 1;
        }
    }
    events.append(&mut bad);
    events.push(Event::Scanned { blocks: run.blocks });
    for e in &events {
        out.emit(e)?;
    }
    if flush {
        t.flush()?;
        out.emit(&Event::ScanFlushed)?;
        events.push(Event::ScanFlushed);
    }
    t.close();
    Ok(events)
}

fn report(outcome: &verify::Outcome, damaged: usize) -> Option<Failed> {
    for e in &outcome.ledger_errors {
        eprintln!("shale-crashcheck: ledger error: {e}");
    }
    if damaged > 0 {
        eprintln!("shale-crashcheck: {damaged} damaged ledger line(s) skipped");
    }
    match &outcome.failure {
        Some(f) => {
            print!("FAIL {}", verify::describe(f, 40));
            Some(Failed::Blocks)
        }
        None => {
            println!(
                "PASS {} scan(s) verified ({} writes planned, {} flushes acknowledged)",
                outcome.scans, outcome.writes_planned, outcome.flushes
            );
            None
        }
    }
}

fn read_ledger(path: &Path) -> Result<ledger::Read> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    Ok(ledger::read(&String::from_utf8_lossy(&bytes)))
}

fn verify_cmd(a: &VerifyArgs) -> Result<Option<Failed>> {
    let r = read_ledger(&a.journal)?;
    let outcome = verify::verify(&r.events, a.durable_on_ack);
    let failed = report(&outcome, r.damaged.len());
    if failed.is_none() && (outcome.scans == 0 || !outcome.ledger_errors.is_empty()) {
        bail!(
            "{}: nothing verified ({} scans, {} ledger errors)",
            a.journal.display(),
            outcome.scans,
            outcome.ledger_errors.len()
        );
    }
    Ok(failed)
}

fn check(a: &CheckArgs) -> Result<Option<Failed>> {
    let r = read_ledger(&a.journal)?;
    let run = r
        .events
        .iter()
        .find_map(|e| match e {
            Event::Run {
                seed,
                blocks,
                block_size,
            } => Some(RunArgs {
                seed: *seed,
                blocks: *blocks,
                block_size: *block_size,
            }),
            _ => None,
        })
        .with_context(|| format!("{} has no RUN line", a.journal.display()))?;
    let mut out = Out::new(Some(&a.journal))?;
    scan(&a.target, a.buffered, &run, true, &mut out)?;
    verify_cmd(&VerifyArgs {
        journal: a.journal.clone(),
        durable_on_ack: a.durable_on_ack,
    })
}

fn line(words: &[String]) -> Result<Option<Failed>> {
    let event = Event::parse(&words.join(" "))?;
    println!("{}", event.line());
    Ok(None)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Write(a) => write(a),
        Cmd::Scan(a) => Out::new(a.target.journal.as_deref()).and_then(|mut out| {
            scan(
                &a.target.target,
                a.target.buffered,
                &a.run,
                a.flush,
                &mut out,
            )
            .map(|_| None)
        }),
        Cmd::Check(a) => check(a),
        Cmd::Verify(a) => verify_cmd(a),
        Cmd::Line { words } => line(words),
    };
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(Failed::Blocks)) => ExitCode::from(1),
        Ok(Some(Failed::Target)) => ExitCode::from(3),
        Err(e) => {
            eprintln!("shale-crashcheck: {e:#}");
            ExitCode::from(2)
        }
    }
}
