//! `herd synth`: write a random-weight Llama 4 checkpoint (Hugging Face layout).
//!
//! The work is [`herd_worker::synth::write_checkpoint`]; this module parses the arguments,
//! refuses to write into a non-empty directory unless `--force` is given, and prints a
//! summary.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use herd_worker::synth::{self, Preset, SynthDtype, SynthFormat, SynthOptions};

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Model shape: tiny, scout-mini or maverick-mini.
    #[arg(long)]
    pub preset: Preset,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights; the same seed writes byte-identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weight dtype: bf16 or f32.
    #[arg(long, default_value_t = SynthDtype::Bf16)]
    pub dtype: SynthDtype,
    /// Expert layout: hf (fused experts in DTYPE) or fp8 (Meta's FP8 release: per-expert
    /// F8_E4M3 weights with per-channel scales; the other tensors in DTYPE).
    #[arg(long, default_value_t = SynthFormat::Hf)]
    pub format: SynthFormat,
    /// Write into OUT even if it is not empty (files with the same names are replaced).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    if !args.force && is_non_empty_dir(&args.out)? {
        bail!("{} is not empty; pass --force to write into it anyway", args.out.display());
    }
    let opts = SynthOptions { preset: args.preset, seed: args.seed, dtype: args.dtype, format: args.format };
    let started = Instant::now();
    let summary = synth::write_checkpoint(&opts, &args.out)
        .with_context(|| format!("writing the {} checkpoint to {}", args.preset, args.out.display()))?;
    println!(
        "wrote {} ({}, {} experts, seed {}) to {}: {} parameters, {} tensors, {} in {:.1} s",
        args.preset,
        args.dtype,
        args.format,
        args.seed,
        args.out.display(),
        format_count(summary.parameters),
        summary.tensors,
        format_bytes(summary.bytes),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Whether `path` exists and has entries (a path that is not a directory counts as non-empty).
fn is_non_empty_dir(path: &Path) -> anyhow::Result<bool> {
    match fs::read_dir(path) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(_) if path.exists() && !path.is_dir() => {
            bail!("{} exists and is not a directory", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `717_520_000` → `717.52 M`.
fn format_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// `1_435_000_000` → `1.34 GiB`.
fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    if value < 1024.0 {
        return format!("{n} B");
    }
    let mut unit = "B";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    format!("{value:.2} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes() {
        assert_eq!(format_count(717_520_000), "717.52 M");
        assert_eq!(format_count(12), "12");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 * 1024 * 1024), "3.00 MiB");
    }

    #[test]
    fn refuses_a_non_empty_directory_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("x"), b"x").expect("write");
        let args = SynthArgs {
            preset: Preset::Tiny,
            out: dir.path().to_path_buf(),
            seed: 0,
            dtype: SynthDtype::Bf16,
            format: SynthFormat::Hf,
            force: false,
        };
        let err = run(args).expect_err("must refuse");
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(!dir.path().join("model.safetensors").exists());
    }

    #[test]
    fn writes_tiny_into_a_missing_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("tiny");
        let args = SynthArgs {
            preset: Preset::Tiny,
            out: out.clone(),
            seed: 0,
            dtype: SynthDtype::Bf16,
            format: SynthFormat::Hf,
            force: false,
        };
        run(args).expect("synth");
        assert!(out.join("model.safetensors").is_file());
        assert!(out.join("config.json").is_file());
    }
}
