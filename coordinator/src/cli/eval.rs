//! `herd eval`: logits and greedy continuations for a list of prompts, in the JSON format the
//! golden tools compare against transformers (`tools/golden/compare.py`).
//!
//! Input: `{"max_new_tokens": N, "prompts": [{"name", "input_ids" | "messages" | "text"}]}`.
//! Messages may hold image parts (`{"type": "image", "path": FILE}` relative to the input
//! file, or `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`); their
//! `<|image|>` placeholders are expanded into the image token block as the processor does.
//! Output: `{"dtype", "prompts": [{"name", "input_ids", "last_logits", "argmax",
//! "greedy_new_ids"}]}`. All prompts are prefilled in one batch and decoded in lockstep, so
//! eval also checks that batching does not change any sequence's numbers.

use super::engine_flags::RunFlags;
use super::model_arg;
use super::runner::Runner;
use anyhow::{Context, bail};
use herd_coordinator::api::Submission;
use herd_coordinator::blocking::BlockingClient;
use herd_worker::engine::request::Event;
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use herd_worker::vision::content::{ImageSource, extract_images};
use herd_worker::vision::{DecodeLimits, PixelValues, decode};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory, or a synth preset (tiny, scout-mini, maverick-mini).
    #[arg(long)]
    model: String,
    /// Prompts to evaluate (JSON).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the results (JSON).
    #[arg(long)]
    output: PathBuf,
    /// Compute precision. f32 by default: eval exists to compare against a reference.
    #[arg(long, default_value = "f32")]
    dtype: ComputeDtype,
    #[command(flatten)]
    run: RunFlags,
}

#[derive(Serialize)]
struct EvalOutput {
    dtype: String,
    prompts: Vec<PromptResult>,
}

#[derive(Serialize)]
struct PromptResult {
    name: String,
    input_ids: Vec<u32>,
    /// `[vocab]` logits at the last prompt position.
    last_logits: Vec<f32>,
    /// Argmax at every prompt position.
    argmax: Vec<u32>,
    greedy_new_ids: Vec<u32>,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    super::device::check(args.run.engine.device)?; // before any model is loaded
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let input: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", args.input.display()))?;
    let dir = model_arg::resolve(&args.model, args.run.cache_dir.as_deref())?;
    let frontend = Frontend::load(&dir).with_context(|| format!("loading {}", dir.display()))?;
    let base = args.input.parent().unwrap_or(Path::new("."));
    let (max_new, prompts) =
        parse_input(&input, &frontend, base).with_context(|| format!("in {}", args.input.display()))?;
    let mut runner = Runner::start(&dir, &frontend, args.dtype, &args.run.engine, &args.run.cluster)?;
    let results = evaluate(&mut runner.client, prompts, max_new)?;
    runner.close();
    let out = EvalOutput { dtype: args.dtype.to_string(), prompts: results };
    let json = serde_json::to_string(&out).context("serialising results")?;
    std::fs::write(&args.output, json).with_context(|| format!("writing {}", args.output.display()))?;
    Ok(())
}

/// One prompt, tokenized.
struct Prompt {
    name: String,
    ids: Vec<u32>,
    images: Vec<PixelValues>,
}

/// `(max_new_tokens, prompts)`, with every prompt tokenized as its kind says.
fn parse_input(input: &Value, frontend: &Frontend, base: &Path) -> anyhow::Result<(usize, Vec<Prompt>)> {
    let max_new = match input.get("max_new_tokens") {
        None => 0,
        Some(v) => v.as_u64().context("max_new_tokens must be a non-negative integer")? as usize,
    };
    let list = input.get("prompts").and_then(Value::as_array).context("expected a \"prompts\" array")?;
    let vocab = frontend.config.text.vocab_size;
    let mut prompts = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let name = p.get("name").and_then(Value::as_str).map_or_else(|| format!("#{i}"), str::to_owned);
        let kinds: Vec<&str> = ["input_ids", "messages", "text"].into_iter().filter(|k| p.get(k).is_some()).collect();
        let mut images = Vec::new();
        let ids = match kinds.as_slice() {
            ["input_ids"] => serde_json::from_value::<Vec<u32>>(p["input_ids"].clone())
                .with_context(|| format!("prompt {name}: input_ids must be a list of token ids"))?,
            ["messages"] => {
                let mut messages = p["messages"]
                    .as_array()
                    .with_context(|| format!("prompt {name}: messages must be a list"))?
                    .clone();
                let sources = extract_images(&mut messages).with_context(|| format!("prompt {name}"))?;
                let template = frontend.chat_template.as_ref().with_context(|| {
                    format!("prompt {name}: the model has no chat template; give input_ids or text")
                })?;
                let rendered = template
                    .render(&messages, true, p.get("tools"))
                    .with_context(|| format!("prompt {name}: rendering the chat template"))?;
                // The template writes BOS itself; encoding must not add a second.
                let ids = frontend.tokenizer.encode(&rendered, false).with_context(|| format!("prompt {name}"))?;
                if sources.is_empty() {
                    ids
                } else {
                    let (ids, pixels) = with_images(frontend, &ids, &sources, base)
                        .with_context(|| format!("prompt {name}: images"))?;
                    images = pixels;
                    ids
                }
            }
            ["text"] => {
                let text = p["text"].as_str().with_context(|| format!("prompt {name}: text must be a string"))?;
                frontend.tokenizer.encode(text, true).with_context(|| format!("prompt {name}"))?
            }
            _ => bail!("prompt {name}: needs exactly one of input_ids, messages, text"),
        };
        if ids.is_empty() {
            bail!("prompt {name}: no tokens");
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("prompt {name}: token id {bad} is outside the vocabulary of {vocab} ids");
        }
        prompts.push(Prompt { name, ids, images });
    }
    Ok((max_new, prompts))
}

/// Decode and preprocess a prompt's images and expand its `<|image|>` placeholders.
fn with_images(
    frontend: &Frontend,
    ids: &[u32],
    sources: &[ImageSource],
    base: &Path,
) -> anyhow::Result<(Vec<u32>, Vec<PixelValues>)> {
    let vision = frontend.vision.as_ref().context("this model has no (usable) vision tower")?;
    let mut decoded = Vec::with_capacity(sources.len());
    for (i, source) in sources.iter().enumerate() {
        let bytes = match source {
            ImageSource::Path(p) => {
                let path = base.join(p);
                std::fs::read(&path).with_context(|| format!("image {i}: reading {}", path.display()))?
            }
            ImageSource::Bytes(b) => b.clone(),
            ImageSource::Remote(url) => bail!("image {i}: remote URLs are not fetched ({url})"),
        };
        decoded.push(decode(&bytes, &DecodeLimits::default()).with_context(|| format!("image {i}"))?);
    }
    Ok(vision.prepare(ids, &decoded)?)
}

/// Run every prompt greedily (not stopping at EOS) with its per-position argmax and last
/// logits; all prompts are in flight at once, so they share batches.
fn evaluate(client: &mut BlockingClient, prompts: Vec<Prompt>, max_new: usize) -> anyhow::Result<Vec<PromptResult>> {
    // The engine always samples at least one token; with max_new_tokens 0 it is dropped.
    let params =
        SamplingParams { temperature: 0.0, max_tokens: max_new.max(1), ignore_eos: true, ..Default::default() };
    let mut results: BTreeMap<usize, PromptResult> = BTreeMap::new();
    for (i, p) in prompts.into_iter().enumerate() {
        let submission =
            Submission { prompt: p.ids.clone(), images: p.images, params: params.clone(), prompt_logits: true };
        client.submit(i, submission)?;
        let result = PromptResult {
            name: p.name,
            input_ids: p.ids,
            last_logits: Vec::new(),
            argmax: Vec::new(),
            greedy_new_ids: Vec::new(),
        };
        results.insert(i, result);
    }
    let mut open = results.len();
    while open > 0 {
        let Some((i, event)) = client.next_event()? else { bail!("the engine dropped {open} prompts") };
        let r = results.get_mut(&i).context("event for an unknown request")?;
        match event {
            Event::PromptLogits { argmax, last_logits, .. } => {
                r.argmax = argmax;
                r.last_logits = last_logits;
            }
            Event::Token { token, .. } => r.greedy_new_ids.push(token),
            Event::Finished { .. } => open -= 1,
            Event::Aborted { reason, .. } => bail!("prompt {}: {reason}", r.name),
        }
    }
    let mut results: Vec<PromptResult> = results.into_values().collect();
    for r in &mut results {
        r.greedy_new_ids.truncate(max_new);
    }
    Ok(results)
}
