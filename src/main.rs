//! The `shale` command-line tool. Thin: parse, load config, dispatch.
//! Usage errors exit 2 (clap); other failures print one line and exit 1.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "shale",
    version,
    about = "Block volumes on object storage (ublk and NBD)"
)]
struct Cli {
    /// Configuration file (YAML). Default: /etc/shale/shale.yaml if present.
    #[arg(long, global = true, env = "SHALE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the effective configuration or a reference one.
    #[command(subcommand)]
    Config(cli::config::ConfigCmd),
    /// Create, list, inspect and delete volumes.
    #[command(subcommand)]
    Volume(cli::volume::VolumeCmd),
    /// Create, list, delete and roll back to snapshots (VOLUME@SNAPSHOT).
    #[command(subcommand)]
    Snapshot(cli::snapshot::SnapshotCmd),
    /// Create a volume from a snapshot: shale clone VOLUME@SNAPSHOT NEWVOLUME.
    Clone(cli::snapshot::CloneArgs),
    /// Changed byte ranges between two snapshots (VOL@A VOL@B).
    ///
    /// Computed from the snapshots' maps alone; no data is read. One line
    /// per range: offset, length, and `data` or `zero` for what the newer
    /// snapshot holds there. Every byte outside the ranges is equal in both.
    /// Snapshots of unrelated volumes share no data, so for them every range
    /// holding data is reported.
    Diff(cli::transfer::DiffArgs),
    /// Export a snapshot to a raw image, or with --from to a delta file.
    ///
    /// The raw image is sparse (ranges reading as zeros stay holes). With
    /// --from VOL@BASE only the changes since BASE are written, as a delta
    /// file that `shale import` applies to a volume holding BASE.
    Export(cli::transfer::ExportArgs),
    /// Import a raw image as a new volume, or apply a delta file to one.
    ///
    /// A raw image becomes a new thin volume. A delta file (from `shale
    /// export --from`, recognised by its first bytes) is applied to an
    /// existing detached volume, which must hold the delta's base snapshot
    /// in every range it changes (checked before anything is written).
    Import(cli::transfer::ImportArgs),
    /// Read every chunk a volume or snapshot references and verify every
    /// checksum: shale scrub VOLUME[@SNAPSHOT].
    ///
    /// Damage is listed by object key and the volume byte ranges it hits;
    /// the exit status is 0 when every checksum matches, 3 when damage was
    /// found and 1 when the scrub could not run. --rate limits the read
    /// rate; a live volume can be scrubbed while it is served.
    Scrub(cli::scrub::ScrubArgs),
    /// Pool capacity and space: shale pool status.
    #[command(subcommand)]
    Pool(cli::pool::PoolCmd),
    /// Copy what a clone reads from its parent snapshot into it, so it
    /// stands alone: shale flatten VOLUME.
    Flatten(cli::snapshot::FlattenArgs),
    /// Serve volumes over NBD.
    #[command(subcommand)]
    Nbd(cli::nbd::NbdCmd),
    /// Attach a volume as /dev/ublkbN.
    Add(cli::ublk::AddArgs),
    /// Flush and remove ublk devices.
    Del(cli::ublk::DelArgs),
    /// List attached ublk devices.
    List(cli::ublk::ListArgs),
    /// Reattach a volume to its existing ublk device after a server crash.
    Recover(cli::ublk::RecoverArgs),
    /// The volumes attached on this host: frontend, lease, unstored data,
    /// cache, recent IOPS and latency, cost.
    Status(cli::status::StatusArgs),
    /// `shale status` refreshed live on the terminal (q quits).
    Top(cli::status::TopArgs),
    /// Serve the metrics of every volume attached on this host at
    /// GET /metrics (Prometheus text format).
    Exporter(cli::exporter::ExporterArgs),
    /// Print a shell completion script: shale completions bash|zsh|fish|elvish|powershell.
    Completions(cli::docs::CompletionsArgs),
    /// Write man pages for shale and every subcommand into a directory.
    Manpages(cli::docs::ManpagesArgs),
}

/// Short-lived commands that print should end quietly when their output pipe
/// closes (`shale volume list | head`), as other Unix tools do, instead of
/// panicking in `println!`. Servers keep Rust's default (SIGPIPE ignored) so a
/// vanished client cannot kill them.
fn restore_default_sigpipe() {
    // SAFETY: called at start-up before any other thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE and no handler code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Most glibc malloc arenas. glibc gives busy threads arenas of their own
/// (up to 8 per core) and keeps their freed memory; with the server's
/// threads moving 1 MiB buffers that held about 60 MiB of resident memory
/// in `tools/bench-nbd.sh` (peak RSS 195 MiB with the default, 134 MiB with
/// 2, throughput within the run's noise). `MALLOC_ARENA_MAX` in the
/// environment still wins.
const MALLOC_ARENAS: i32 = 2;

fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called
        // first thing in main, before any other thread exists, and its
        // return value (0 on failure) only means the default stays.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// How often a server hands the allocator's free memory back to the
/// kernel ([`start_memory_trimmer`]).
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A server's thread that calls glibc's `malloc_trim` every [`TRIM_EVERY`]:
/// glibc returns freed memory to the kernel only from the top of an arena,
/// so the buffers of a burst of writes (payloads, chunk builds,
/// checkpoints) stayed resident long after it. Measured with
/// `tools/bench-nbd.sh`'s jobs on one server: idle RSS after them 155 MiB
/// without, 78 MiB with; peak 160 against 146 MiB; throughput the same.
/// Named `shale-trim`. Short-lived commands exit instead.
///
/// The thread starts with every signal blocked and keeps them so: a
/// server that blocks its shutdown signals to wait for them itself (`shale
/// add` in the foreground) must not have them delivered to this thread,
/// whose default action would kill the process.
fn start_memory_trimmer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::sys::signal::{SigSet, SigmaskHow};
        let Ok(before) = SigSet::all().thread_swap_mask(SigmaskHow::SIG_BLOCK) else {
            // Without it the server only keeps more memory.
            return;
        };
        let trimmer = std::thread::Builder::new()
            .name("shale-trim".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_EVERY);
                // SAFETY: malloc_trim takes the allocator's own locks and
                // only gives free pages back; no memory in use is touched,
                // so it is safe from any thread at any time.
                unsafe { libc::malloc_trim(0) };
            });
        drop(trimmer);
        if before.thread_set_mask().is_err() {
            eprintln!("shale: cannot restore the signal mask after starting the memory trimmer");
        }
    }
}

fn main() -> ExitCode {
    // Whatever shale creates (WAL, cache, store objects, sockets, exports)
    // is private to the user it runs as.
    shale::private::restrict_umask();
    limit_malloc_arenas();
    cli::logging::init();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Config(_)
            | Command::Volume(_)
            | Command::Snapshot(_)
            | Command::Clone(_)
            | Command::Diff(_)
            | Command::Export(_)
            | Command::Import(_)
            | Command::Pool(_)
            | Command::Scrub(_)
            | Command::Flatten(_)
            | Command::Status(_)
            | Command::List(_)
            | Command::Completions(_)
            | Command::Manpages(_)
    ) {
        restore_default_sigpipe();
    } else {
        start_memory_trimmer();
    }
    let result = match cli.command {
        Command::Config(cmd) => cli::config::run(cli.config.as_deref(), cmd),
        Command::Volume(cmd) => cli::volume::run(cli.config.as_deref(), cmd),
        Command::Snapshot(cmd) => cli::snapshot::run(cli.config.as_deref(), cmd),
        Command::Clone(a) => cli::snapshot::clone(cli.config.as_deref(), a),
        Command::Diff(a) => cli::transfer::diff(cli.config.as_deref(), a),
        Command::Export(a) => cli::transfer::export(cli.config.as_deref(), a),
        Command::Import(a) => cli::transfer::import(cli.config.as_deref(), a),
        Command::Pool(cmd) => cli::pool::run(cli.config.as_deref(), cmd),
        Command::Scrub(a) => cli::scrub::run(cli.config.as_deref(), a),
        Command::Flatten(a) => cli::snapshot::flatten(cli.config.as_deref(), a),
        Command::Nbd(cmd) => cli::nbd::run(cli.config.as_deref(), cmd),
        Command::Add(a) => cli::ublk::add(cli.config.as_deref(), a),
        Command::Del(a) => cli::ublk::del(cli.config.as_deref(), a),
        Command::List(a) => cli::ublk::list(cli.config.as_deref(), a),
        Command::Recover(a) => cli::ublk::recover(cli.config.as_deref(), a),
        Command::Status(a) => cli::status::status(cli.config.as_deref(), a),
        Command::Top(a) => cli::status::top(cli.config.as_deref(), a),
        Command::Exporter(a) => cli::exporter::run(cli.config.as_deref(), a),
        Command::Completions(a) => cli::docs::completions::<Cli>(a),
        Command::Manpages(a) => cli::docs::manpages::<Cli>(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<cli::scrub::DamageFound>() {
                Some(_) => cli::scrub::DAMAGE_EXIT,
                None => 1,
            };
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("shale: {}", chain.join(": "));
            ExitCode::from(code)
        }
    }
}
