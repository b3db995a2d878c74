//! `--model DIR|PRESET`: a checkpoint directory, or the name of a `herd synth` preset that is
//! synthesised once into the cache directory.

use anyhow::{Context, bail};
use herd_worker::synth::{self, Preset, SynthDtype, SynthOptions};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where presets are synthesised: `--cache-dir`, else `~/.cache/herd`.
pub fn cache_dir(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir.to_path_buf());
    }
    let home = std::env::home_dir().context("no home directory for the preset cache; pass --cache-dir")?;
    Ok(home.join(".cache").join("herd"))
}

/// Resolve `--model` to a checkpoint directory, synthesising a preset on first use.
pub fn resolve(model: &str, cache: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        if !path.is_dir() {
            bail!("--model {model}: not a directory (give the checkpoint directory that holds config.json)");
        }
        return Ok(path.to_path_buf());
    }
    let Ok(preset) = Preset::from_str(model) else {
        let names: Vec<&str> = Preset::all().iter().map(|p| p.name()).collect();
        bail!("--model {model}: no such directory, and not a preset ({})", names.join(", "));
    };
    let dir = cache_dir(cache)?.join("synth").join(format!("{}-seed0", preset.name()));
    if dir.join("config.json").is_file() && dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    // Synthesise into a private directory and rename it into place, so an interrupted run
    // never leaves a half-written checkpoint that a later run would trust.
    let parent = dir.parent().context("preset cache path has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{}-seed0.tmp-{}", preset.name(), std::process::id()));
    eprintln!("[herd] synthesising preset {} into {} (first use only)", preset.name(), dir.display());
    let opts = SynthOptions { preset, seed: 0, dtype: SynthDtype::Bf16, format: Default::default() };
    synth::write_checkpoint(&opts, &tmp)
        .with_context(|| format!("synthesising {} into {}", preset.name(), tmp.display()))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process won the race; use its copy.
        Err(_) if dir.join("model.safetensors").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e).with_context(|| format!("moving {} to {}", tmp.display(), dir.display())),
    }
}
