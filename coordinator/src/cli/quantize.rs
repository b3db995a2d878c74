//! `herd quantize`: convert a float checkpoint's routed experts (or all its linear layers) to FP8 or int4.
//!
//! The work is [`herd_worker::quantize::quantize_checkpoint`]; this module parses the
//! arguments, refuses a non-empty output directory unless `--force`, and prints a summary.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use herd_worker::model::quant_config::{QuantScope, WeightQuant};
use herd_worker::quantize;

/// The weight format of the routed experts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    /// FP8 e4m3 with one f32 scale per output channel (Meta's Maverick FP8 layout).
    Fp8,
    /// Symmetric int4 with one f32 scale per 128 inputs.
    Int4,
}

impl From<QuantFormat> for WeightQuant {
    fn from(f: QuantFormat) -> Self {
        match f {
            QuantFormat::Fp8 => WeightQuant::Fp8Channel,
            QuantFormat::Int4 => WeightQuant::Int4Group,
        }
    }
}

/// Which weights are quantized.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuantizeScope {
    /// Routed experts only (Meta's FP8 release; everything else stays in its float dtype).
    #[default]
    Experts,
    /// Every text nn.Linear but the router: attention, dense and shared MLPs, experts, lm_head.
    AllLinear,
}

impl From<QuantizeScope> for QuantScope {
    fn from(s: QuantizeScope) -> Self {
        match s {
            QuantizeScope::Experts => QuantScope::Experts,
            QuantizeScope::AllLinear => QuantScope::AllLinear,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// Target format of the quantized weights.
    #[arg(long, value_enum)]
    pub format: QuantFormat,
    /// Which weights to quantize (the rest is copied unchanged).
    #[arg(long, value_enum, default_value_t)]
    pub scope: QuantizeScope,
    /// Input checkpoint directory (f32, bf16 or f16 weights).
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Write into OUT even if it is not empty (files with the same names are replaced).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<()> {
    if !args.force && std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} is not empty; pass --force to write into it anyway", args.out.display());
    }
    // A missing --in must say so, not compare equal to a missing --out.
    let input = args.input.canonicalize().with_context(|| format!("--in {}", args.input.display()))?;
    if args.out.canonicalize().is_ok_and(|out| out == input) {
        bail!("--in and --out must be different directories");
    }
    let started = Instant::now();
    let s = quantize::quantize_checkpoint(&args.input, &args.out, args.format.into(), args.scope.into())
        .with_context(|| format!("quantizing {} into {}", args.input.display(), args.out.display()))?;
    println!(
        "wrote {} ({:?}, {:?}) in {:.1} s: {} matrices quantized, {} tensors copied, {:.1} MiB of weights (input {:.1} MiB)",
        args.out.display(),
        args.format,
        args.scope,
        started.elapsed().as_secs_f64(),
        s.quantized,
        s.copied,
        s.weight_bytes as f64 / (1 << 20) as f64,
        s.input_bytes as f64 / (1 << 20) as f64,
    );
    Ok(())
}
