//! `shale nbd ...`
use std::path::Path;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum NbdCmd {
    /// Serve volumes over NBD.
    Serve,
}

pub fn run(_config: Option<&Path>, _cmd: NbdCmd) -> anyhow::Result<()> {
    anyhow::bail!("nbd commands are not built yet")
}
