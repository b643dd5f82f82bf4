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
    /// Create, list, inspect and delete volumes.
    #[command(subcommand)]
    Volume(cli::volume::VolumeCmd),
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
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Volume(cmd) => cli::volume::run(cli.config.as_deref(), cmd),
        Command::Nbd(cmd) => cli::nbd::run(cli.config.as_deref(), cmd),
        Command::Add(a) => cli::ublk::add(cli.config.as_deref(), a),
        Command::Del(a) => cli::ublk::del(cli.config.as_deref(), a),
        Command::List(a) => cli::ublk::list(cli.config.as_deref(), a),
        Command::Recover(a) => cli::ublk::recover(cli.config.as_deref(), a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("shale: {}", chain.join(": "));
            ExitCode::from(1)
        }
    }
}
