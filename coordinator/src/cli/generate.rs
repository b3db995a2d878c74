//! `herd generate`: one prompt in, streamed text out, then a line of counts and speeds.

use super::engine_flags::RunFlags;
use super::runner::Runner;
use super::{model_arg, sys};
use anyhow::{Context, bail};
use herd_coordinator::api::Submission;
use herd_worker::engine::request::Event;
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use herd_worker::vision::{DecodeLimits, PixelValues, decode};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat"])))]
pub struct GenerateArgs {
    /// Checkpoint directory, or a synth preset (tiny, scout-mini, maverick-mini).
    #[arg(long)]
    model: String,
    /// Raw text to continue (tokenized with BOS, no chat template).
    #[arg(long)]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// A system message to put before --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// An image (PNG, JPEG, WebP or GIF) shown before the --chat text (repeatable, in order).
    #[arg(long, requires = "chat")]
    image: Vec<PathBuf>,
    #[command(flatten)]
    sampling: SamplingFlags,
    /// Compute precision of weights (activations and accumulation are always f32).
    #[arg(long, default_value = "bf16")]
    dtype: ComputeDtype,
    #[command(flatten)]
    run: RunFlags,
}

/// Sampling flags; unset ones fall back to the checkpoint's generation_config.json, then to
/// the OpenAI defaults.
#[derive(clap::Args, Debug)]
pub struct SamplingFlags {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long)]
    temperature: Option<f32>,
    /// 0 disables.
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    min_p: Option<f32>,
    /// Same seed, same tokens.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    presence_penalty: Option<f32>,
    #[arg(long)]
    frequency_penalty: Option<f32>,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Stop at this token id (repeatable), besides the model's EOS ids.
    #[arg(long)]
    stop_token_id: Vec<u32>,
    /// Do not stop at the model's EOS ids.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingFlags {
    fn params(&self, frontend: &Frontend) -> SamplingParams {
        let g = &frontend.generation;
        let d = SamplingParams::default();
        // generation_config.json's sampling values apply only when it asks to sample, as in
        // transformers; an explicit flag always wins.
        let sample = g.do_sample.unwrap_or(false);
        let from_config = |v: Option<f32>, default: f32| if sample { v.unwrap_or(default) } else { default };
        SamplingParams {
            temperature: self.temperature.unwrap_or(from_config(g.temperature, d.temperature)),
            top_k: self.top_k.unwrap_or(if sample { g.top_k.unwrap_or(d.top_k) } else { d.top_k }),
            top_p: self.top_p.unwrap_or(from_config(g.top_p, d.top_p)),
            min_p: self.min_p.unwrap_or(d.min_p),
            seed: self.seed,
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_id.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: None,
        }
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    super::device::check(args.run.engine.device)?; // before any model is loaded
    let dir = model_arg::resolve(&args.model, args.run.cache_dir.as_deref())?;
    let load_started = Instant::now();
    let frontend = Frontend::load(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let mut images: Vec<PixelValues> = Vec::new();
    let prompt = match (&args.prompt, &args.chat) {
        (Some(text), None) => frontend.tokenizer.encode(text, true)?,
        (None, Some(user)) => {
            let template = frontend
                .chat_template
                .as_ref()
                .context("this model has no chat template; use --prompt for raw text")?;
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(json!({"role": "system", "content": system}));
            }
            if args.image.is_empty() {
                messages.push(json!({"role": "user", "content": user}));
            } else {
                let mut parts: Vec<_> = args.image.iter().map(|_| json!({"type": "image"})).collect();
                parts.push(json!({"type": "text", "text": user}));
                messages.push(json!({"role": "user", "content": parts}));
            }
            let rendered = template.render(&messages, true, None).context("rendering the chat template")?;
            let ids = frontend.tokenizer.encode(&rendered, false)?;
            if args.image.is_empty() {
                ids
            } else {
                let vision = frontend.vision.as_ref().context("this model has no (usable) vision tower")?;
                let mut decoded = Vec::with_capacity(args.image.len());
                for path in &args.image {
                    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                    decoded.push(decode(&bytes, &DecodeLimits::default()).with_context(|| path.display().to_string())?);
                }
                let (ids, pixels) = vision.prepare(&ids, &decoded)?;
                images = pixels;
                ids
            }
        }
        _ => bail!("give exactly one of --prompt and --chat"),
    };
    let params = args.sampling.params(&frontend);
    params.validate().context("invalid sampling flags")?;
    let mut runner = Runner::start(&dir, &frontend, args.dtype, &args.run.engine, &args.run.cluster)?;
    let load_time = load_started.elapsed();

    let mut stdout = std::io::stdout().lock();
    let started = Instant::now();
    runner.client.submit(0, Submission { prompt: prompt.clone(), images, params, prompt_logits: false })?;
    let mut first_token = None;
    let mut generated = 0usize;
    let reason = loop {
        let Some((_, event)) = runner.client.next_event()? else { bail!("the engine dropped the request") };
        match event {
            Event::Token { text, .. } => {
                first_token.get_or_insert_with(|| started.elapsed());
                generated += 1;
                // A closed pipe (e.g. `| head`) must not abort generation with a panic.
                let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
            }
            Event::Finished { reason, .. } => break reason,
            Event::Aborted { reason, .. } => bail!("generation failed: {reason}"),
            Event::PromptLogits { .. } => {}
        }
    };
    runner.close();
    let prefill = first_token.unwrap_or_default();
    let decode = started.elapsed().saturating_sub(prefill);
    let rss = sys::peak_rss_bytes().map_or_else(|| "n/a".into(), sys::format_bytes);
    let workers = if args.run.cluster.workers == 0 {
        "in process".to_string()
    } else {
        format!("{} workers", args.run.cluster.workers)
    };
    let _ = writeln!(
        stdout,
        "\n[herd] {} prompt + {} generated tokens ({:?}) | {} | load {:.2} s | prefill {:.1} tok/s | decode {:.2} tok/s | {} | peak RSS {}",
        prompt.len(),
        generated,
        reason,
        workers,
        load_time.as_secs_f64(),
        prompt.len() as f64 / prefill.as_secs_f64().max(1e-9),
        generated.saturating_sub(1) as f64 / decode.as_secs_f64().max(1e-9),
        args.dtype,
        rss,
    );
    Ok(())
}
