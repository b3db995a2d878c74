//! `herd synth` (being written).
#[derive(clap::Args, Debug)]
pub struct SynthArgs {}
pub fn run(_args: SynthArgs) -> anyhow::Result<()> {
    anyhow::bail!("herd synth is not built yet")
}
