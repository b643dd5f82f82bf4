//! `shale config show|example`
use std::path::Path;

use clap::Subcommand;
use shale::config::{Config, EXAMPLE_CONFIG};

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the effective configuration (file plus defaults) as YAML.
    Show,
    /// Print a commented reference configuration with every field.
    Example,
}

pub fn run(config: Option<&Path>, cmd: ConfigCmd) -> anyhow::Result<()> {
    match cmd {
        ConfigCmd::Show => print!("{}", Config::load(config)?.to_yaml()),
        ConfigCmd::Example => print!("{EXAMPLE_CONFIG}"),
    }
    Ok(())
}
