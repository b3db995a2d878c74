//! `herd bench`: prefill and decode throughput of one or more configurations, measured in
//! alternation (A B A B …) in one run so that they see the same machine load, with medians.
//!
//! `--workers 0,2` compares the in-process engine with two worker processes over TCP on
//! loopback; worker configurations also report their expert-parallel traffic per MoE layer.
//!
//! The report also places decode against the memory-bandwidth limit: the machine's read
//! bandwidth (measured in the same run, after the model runs so that its buffer does not
//! count in their peak RSS) over the weight bytes one decoded token reads.

use super::engine_flags::{ClusterFlags, EngineFlags};
use super::runner::Runner;
use super::{membw, model_arg, sys};
use anyhow::{Context, bail};
use herd_coordinator::api::Submission;
use herd_coordinator::blocking::BlockingClient;
use herd_worker::control::WorkerStats;
use herd_worker::engine::request::Event;
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Checkpoint directory, or a synth preset (tiny, scout-mini, maverick-mini).
    #[arg(long)]
    model: String,
    /// Worker counts to compare, comma-separated (0 = the engine in this process).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    workers: Vec<usize>,
    /// Concurrent sequences.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Measured runs per configuration (after one warm-up run each).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = "bf16")]
    dtype: ComputeDtype,
    /// Expert placement for worker configurations.
    #[arg(long, default_value = "round-robin")]
    placement: String,
    #[command(flatten)]
    engine: EngineFlags,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Directory where presets are synthesised (default ~/.cache/herd).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Serialize)]
struct RunTimes {
    prefill_s: f64,
    decode_s: f64,
}

#[derive(Debug, Serialize)]
struct LayerReport {
    layer: usize,
    /// Bytes a worker sends per engine step at this layer (dispatch + results), averaged over workers.
    bytes_out_per_step: f64,
    /// Mean time of one all-to-all collective, waiting for peers included.
    ms_per_collective: f64,
}

#[derive(Debug, Serialize)]
struct ConfigReport {
    workers: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    /// Median decode step time (every sequence advances one token).
    decode_step_ms: f64,
    peak_rss_bytes: u64,
    runs: Vec<RunTimes>,
    moe_layers: Vec<LayerReport>,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    model: String,
    dtype: String,
    batch: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    threads: usize,
    /// The first configuration's medians (the headline numbers).
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    peak_rss_bytes: u64,
    /// Best multi-threaded read pass over a 1 GiB buffer, bytes/s.
    bandwidth_bytes_per_s: f64,
    /// Weight bytes held by the whole model.
    weight_bytes: usize,
    /// Weight bytes one decoded token reads: attention, dense or shared MLP, router and
    /// top-k routed experts of every layer, lm_head, one embedding row.
    active_bytes_per_token: usize,
    /// `decode_tokens_per_s / (bandwidth_bytes_per_s / active_bytes_per_token)`.
    decode_limit_ratio: f64,
    configs: Vec<ConfigReport>,
    /// Decode step time of each configuration over the first one's.
    decode_step_ratio: Vec<f64>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    super::device::check(args.engine.device)?; // before any model is loaded
    anyhow::ensure!(args.batch > 0 && args.prompt_tokens > 0, "--batch and --prompt-tokens must be positive");
    anyhow::ensure!(args.gen_tokens >= 2, "--gen-tokens must be at least 2 (decode is timed after the first token)");
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let dir = model_arg::resolve(&args.model, args.cache_dir.as_deref())?;
    let frontend = Frontend::load(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let mut runners: Vec<(usize, Runner)> = Vec::new();
    for &workers in &args.workers {
        let flags = ClusterFlags { workers, placement: args.placement.clone(), step_timeout_ms: 600_000 };
        let runner = Runner::start(&dir, &frontend, args.dtype, &args.engine, &flags)
            .with_context(|| format!("starting the {workers}-worker configuration"))?;
        runners.push((workers, runner));
    }
    let vocab = frontend.config.text.vocab_size as u64;
    let mut next_id = 0u64;
    let mut times: Vec<Vec<RunTimes>> = vec![Vec::new(); runners.len()];
    for round in 0..=args.runs {
        for (i, (_, runner)) in runners.iter_mut().enumerate() {
            let t = measure(&mut runner.client, &args, vocab, &mut next_id)?;
            // Round 0 warms caches and pages in weights.
            if round > 0 {
                times[i].push(t);
            }
        }
    }
    let mut configs = Vec::new();
    for ((workers, runner), runs) in runners.into_iter().zip(times) {
        let stats = runner.close();
        configs.push(summarise(workers, runs, &stats, &args));
    }
    // Mapping the model again costs no memory for weights stored in the compute dtype (it
    // only maps them); it is done after the peak RSS was read in any case.
    let model = frontend.load_model(args.dtype, None).context("loading the model to count its bytes")?;
    let (weight_bytes, active_bytes_per_token) = (model.weight_bytes(), model.active_bytes_per_token());
    drop(model);
    // The limit is the memory the weights stream from: host RAM, or the GPU's HBM.
    let bandwidth_bytes_per_s = match args.engine.device {
        herd_kernels::device::Device::Cpu => membw::measure(),
        herd_kernels::device::Device::Cuda(ordinal) => super::gpu_engine::device_bandwidth(ordinal)?,
    };
    let base = configs[0].decode_step_ms;
    let (first_prefill, first_decode) = (configs[0].prefill_tokens_per_s, configs[0].decode_tokens_per_s);
    let limit_tokens_per_s = bandwidth_bytes_per_s / active_bytes_per_token.max(1) as f64;
    let report = BenchReport {
        model: args.model.clone(),
        dtype: args.dtype.to_string(),
        batch: args.batch,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        threads: rayon::current_num_threads(),
        prefill_tokens_per_s: first_prefill,
        decode_tokens_per_s: first_decode,
        peak_rss_bytes: configs[0].peak_rss_bytes,
        bandwidth_bytes_per_s,
        weight_bytes,
        active_bytes_per_token,
        decode_limit_ratio: first_decode / limit_tokens_per_s,
        decode_step_ratio: configs.iter().map(|c| c.decode_step_ms / base).collect(),
        configs,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One run: `batch` requests submitted together; prefill ends when every request has its
/// first token, decode when every request has finished.
fn measure(client: &mut BlockingClient, args: &BenchArgs, vocab: u64, next_id: &mut u64) -> anyhow::Result<RunTimes> {
    let params =
        SamplingParams { temperature: 0.0, max_tokens: args.gen_tokens, ignore_eos: true, ..Default::default() };
    let started = Instant::now();
    let mut first: HashMap<usize, Duration> = HashMap::new();
    for key in 0..args.batch {
        let id = *next_id;
        *next_id += 1;
        let prompt =
            (0..args.prompt_tokens as u64).map(|j| ((j * 7919 + id * 104729) % (vocab - 300) + 100) as u32).collect();
        client.submit(key, Submission { prompt, images: Vec::new(), params: params.clone(), prompt_logits: false })?;
    }
    let mut open = args.batch;
    while open > 0 {
        let Some((key, event)) = client.next_event()? else { bail!("the engine dropped {open} requests") };
        match event {
            Event::Token { .. } => {
                first.entry(key).or_insert_with(|| started.elapsed());
            }
            Event::Finished { .. } => open -= 1,
            Event::Aborted { reason, .. } => bail!("benchmark request failed: {reason}"),
            Event::PromptLogits { .. } => {}
        }
    }
    let total = started.elapsed();
    let prefill = first.values().max().copied().unwrap_or_default();
    Ok(RunTimes { prefill_s: prefill.as_secs_f64(), decode_s: (total - prefill).as_secs_f64() })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summarise(workers: usize, runs: Vec<RunTimes>, stats: &[WorkerStats], args: &BenchArgs) -> ConfigReport {
    let prefill_s = median(runs.iter().map(|r| r.prefill_s).collect());
    let decode_s = median(runs.iter().map(|r| r.decode_s).collect());
    let steps = (args.gen_tokens - 1) as f64;
    let peak_rss_bytes = if workers == 0 {
        sys::peak_rss_bytes().unwrap_or(0)
    } else {
        stats.iter().map(|s| s.peak_rss_bytes).max().unwrap_or(0)
    };
    // Per-layer traffic, averaged over workers and over all engine steps they ran.
    let mut layers: Vec<LayerReport> = Vec::new();
    if let Some(first) = stats.first() {
        for l in &first.layers {
            let per_worker: Vec<_> =
                stats.iter().filter_map(|s| s.layers.iter().find(|x| x.layer == l.layer).map(|x| (s, x))).collect();
            let n = per_worker.len().max(1) as f64;
            let bytes: f64 =
                per_worker.iter().map(|(s, x)| x.bytes_out as f64 / s.steps.max(1) as f64).sum::<f64>() / n;
            let ms: f64 = per_worker.iter().map(|(_, x)| x.exchange_ms / x.collectives.max(1) as f64).sum::<f64>() / n;
            layers.push(LayerReport { layer: l.layer, bytes_out_per_step: bytes, ms_per_collective: ms });
        }
    }
    ConfigReport {
        workers,
        prefill_tokens_per_s: (args.batch * args.prompt_tokens) as f64 / prefill_s.max(1e-9),
        decode_tokens_per_s: args.batch as f64 * steps / decode_s.max(1e-9),
        decode_step_ms: decode_s * 1e3 / steps,
        peak_rss_bytes,
        runs,
        moe_layers: layers,
    }
}

fn print_report(r: &BenchReport) {
    println!(
        "herd bench: {} ({}), batch {}, prompt {} tokens, {} generated, {} threads, medians of {} runs",
        r.model,
        r.dtype,
        r.batch,
        r.prompt_tokens,
        r.gen_tokens,
        r.threads,
        r.configs.first().map_or(0, |c| c.runs.len())
    );
    println!(
        "{:>10} {:>14} {:>14} {:>12} {:>10} {:>11}",
        "workers", "prefill tok/s", "decode tok/s", "step ms", "vs first", "peak RSS"
    );
    for (c, ratio) in r.configs.iter().zip(&r.decode_step_ratio) {
        let name = if c.workers == 0 { "in-proc".to_string() } else { format!("{} (tcp)", c.workers) };
        println!(
            "{:>10} {:>14.1} {:>14.2} {:>12.2} {:>9.3}x {:>11}",
            name,
            c.prefill_tokens_per_s,
            c.decode_tokens_per_s,
            c.decode_step_ms,
            ratio,
            sys::format_bytes(c.peak_rss_bytes)
        );
    }
    let limit = r.bandwidth_bytes_per_s / r.active_bytes_per_token.max(1) as f64;
    println!(
        "memory bandwidth {:.2} GB/s; weights {} ({} read per decoded token) → limit {:.1} tok/s; \
         decode at {:.1}% of it",
        r.bandwidth_bytes_per_s / 1e9,
        sys::format_bytes(r.weight_bytes as u64),
        sys::format_bytes(r.active_bytes_per_token as u64),
        limit,
        100.0 * r.decode_limit_ratio
    );
    for c in r.configs.iter().filter(|c| !c.moe_layers.is_empty()) {
        println!("all-to-all per MoE layer, {} workers (mean per worker, over all steps incl. prefill):", c.workers);
        for l in &c.moe_layers {
            println!(
                "  layer {:>2}: {:>10} out per step, {:.3} ms per collective",
                l.layer,
                sys::format_bytes(l.bytes_out_per_step as u64),
                l.ms_per_collective
            );
        }
    }
}
