//! `shale add|del|list|recover`
use std::path::Path;

use clap::Args;

#[derive(Args, Debug)]
pub struct AddArgs {
    /// Volume name.
    pub volume: String,
}
#[derive(Args, Debug)]
pub struct DelArgs {
    /// Volume name.
    pub volume: Option<String>,
}
#[derive(Args, Debug)]
pub struct ListArgs {}
#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// Volume name.
    pub volume: String,
}

pub fn add(_c: Option<&Path>, _a: AddArgs) -> anyhow::Result<()> {
    anyhow::bail!("ublk is not built yet")
}
pub fn del(_c: Option<&Path>, _a: DelArgs) -> anyhow::Result<()> {
    anyhow::bail!("ublk is not built yet")
}
pub fn list(_c: Option<&Path>, _a: ListArgs) -> anyhow::Result<()> {
    anyhow::bail!("ublk is not built yet")
}
pub fn recover(_c: Option<&Path>, _a: RecoverArgs) -> anyhow::Result<()> {
    anyhow::bail!("ublk is not built yet")
}
