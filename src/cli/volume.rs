//! `shale volume ...`
use std::path::Path;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// List volumes.
    List,
}

pub fn run(_config: Option<&Path>, _cmd: VolumeCmd) -> anyhow::Result<()> {
    anyhow::bail!("volume commands are not built yet")
}
