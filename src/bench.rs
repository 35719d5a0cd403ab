//! `duet bench`: placeholder until the load generator lands.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("duet bench is not built yet")
}
