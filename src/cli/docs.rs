//! `shale completions SHELL` and `shale manpages DIR`: shell completion
//! scripts (clap_complete) and man pages (clap_mangen) generated from the
//! command definitions themselves.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory};

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write a completion script for.
    shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManpagesArgs {
    /// Directory to write the pages to (created if missing): shale.1 and
    /// one page per subcommand (shale-volume-create.1, ...).
    dir: PathBuf,
}

pub fn completions<C: CommandFactory>(a: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = C::command();
    let name = cmd.get_name().to_string();
    clap_complete::generate(a.shell, &mut cmd, name, &mut std::io::stdout());
    Ok(())
}

pub fn manpages<C: CommandFactory>(a: ManpagesArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    clap_mangen::generate_to(C::command(), &a.dir)
        .with_context(|| format!("writing man pages to {}", a.dir.display()))?;
    println!("man pages written to {}", a.dir.display());
    Ok(())
}
