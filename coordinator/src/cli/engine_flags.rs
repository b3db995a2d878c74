//! Engine flags shared by every command that runs a model (`generate`, `eval`, `bench`, `serve`,
//! `worker`).

use herd_worker::engine::EngineConfig;
use herd_worker::kv_cache::DEFAULT_BLOCK_TOKENS;

#[derive(clap::Args, Debug, Clone)]
pub struct EngineFlags {
    /// KV cache size, e.g. `2G`, `512M` or a byte count (default: --kv-cache-fraction of free memory).
    #[arg(long, value_parser = parse_bytes)]
    pub kv_cache_bytes: Option<usize>,
    /// Share of the memory available at start-up given to the KV cache when --kv-cache-bytes is not set.
    #[arg(long, default_value_t = 0.2)]
    pub kv_cache_fraction: f64,
    /// Most tokens (decode + prefill chunks) in one engine step.
    #[arg(long, default_value_t = 512)]
    pub max_step_tokens: usize,
    /// Most requests running at once.
    #[arg(long, default_value_t = 256)]
    pub max_running: usize,
    /// Where the model runs: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: herd_kernels::device::Device,
}

impl EngineFlags {
    pub fn config(&self) -> anyhow::Result<EngineConfig> {
        super::device::check(self.device)?;
        anyhow::ensure!(self.max_step_tokens > 0, "--max-step-tokens must be at least 1");
        anyhow::ensure!(self.max_running > 0, "--max-running must be at least 1");
        let kv_cache_bytes = match self.kv_cache_bytes {
            Some(b) => b,
            None => {
                anyhow::ensure!(
                    self.kv_cache_fraction > 0.0 && self.kv_cache_fraction <= 0.9,
                    "--kv-cache-fraction must be in (0, 0.9]"
                );
                let avail = available_memory().unwrap_or(4 << 30);
                (avail as f64 * self.kv_cache_fraction) as usize
            }
        };
        Ok(EngineConfig {
            kv_cache_bytes,
            block_tokens: DEFAULT_BLOCK_TOKENS,
            max_step_tokens: self.max_step_tokens,
            max_running: self.max_running,
        })
    }

    /// Where the engine runs and how a GPU engine sizes its KV cache: without
    /// `--kv-cache-bytes`, `--kv-cache-fraction` of the device memory left free once the weights
    /// are up. Compiled kernels are cached in `~/.cache/herd/kernels`.
    pub fn device_options(&self) -> herd_worker::engine::device::DeviceOptions {
        herd_worker::engine::device::DeviceOptions {
            device: self.device,
            gpu_kv_fraction: self.kv_cache_bytes.is_none().then_some(self.kv_cache_fraction),
            kernel_cache: super::model_arg::cache_dir(None).ok().map(|d| d.join("kernels")),
        }
    }

    /// The same flags as command-line arguments (to start worker processes with), except
    /// `--device`: each worker gets its own ([`super::device::worker_devices`]).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--kv-cache-fraction".into(),
            self.kv_cache_fraction.to_string(),
            "--max-step-tokens".into(),
            self.max_step_tokens.to_string(),
            "--max-running".into(),
            self.max_running.to_string(),
        ];
        if let Some(b) = self.kv_cache_bytes {
            args.extend(["--kv-cache-bytes".into(), b.to_string()]);
        }
        args
    }
}

/// `MemAvailable` from /proc/meminfo.
fn available_memory() -> Option<usize> {
    herd_worker::runtime::host::available_memory_bytes().map(|b| b as usize)
}

/// `2G`, `512M`, `64K`, `1.5G` or a plain byte count (binary units).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], s[i..].to_ascii_uppercase()),
        None => (s, String::new()),
    };
    let scale: f64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 1.0,
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        "T" => 1024.0f64.powi(4),
        _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("{s:?} is not a size"));
    }
    Ok((v * scale) as usize)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5k"), Ok(1536));
        assert!(parse_bytes("12Q").is_err());
        assert!(parse_bytes("-1").is_err());
    }
}

/// `--workers N` and what a worker group needs.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterFlags {
    /// Run through N worker processes on loopback (expert-parallel); 0 runs in this process.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Expert placement for --workers: round-robin, skewed, replicated, or a JSON/TOML file.
    #[arg(long, default_value = "round-robin")]
    pub placement: String,
    /// Deadline of each data-plane collective between workers.
    #[arg(long, default_value_t = 60_000)]
    pub step_timeout_ms: u64,
}

/// Where a command that runs requests (`generate`, `eval`) runs its model: the engine flags,
/// `--workers`, and the preset cache.
#[derive(clap::Args, Debug, Clone)]
pub struct RunFlags {
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(flatten)]
    pub cluster: ClusterFlags,
    /// Directory where presets are synthesised (default ~/.cache/herd).
    #[arg(long)]
    pub cache_dir: Option<std::path::PathBuf>,
}
