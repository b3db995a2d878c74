//! `herd eval`: logits and greedy continuations for a list of prompts, in the JSON format the
//! golden tools compare against transformers (`tools/golden/compare.py`).
//!
//! Input: `{"max_new_tokens": N, "prompts": [{"name", "input_ids" | "messages" | "text"}]}`.
//! Output: `{"dtype", "prompts": [{"name", "input_ids", "last_logits", "argmax",
//! "greedy_new_ids"}]}`. All prompts are prefilled in one batch and decoded in lockstep, so
//! eval also checks that batching does not change any sequence's numbers.

use super::model_arg;
use anyhow::{Context, bail};
use herd_kernels::cpu::activation::argmax;
use herd_worker::loaded::LoadedModel;
use herd_worker::model::text::{LogitsFor, SeqStep};
use herd_worker::model::weights::ComputeDtype;
use serde::Serialize;
use serde_json::Value;
use std::path::PathBuf;

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
    /// Directory where presets are synthesised (default ~/.cache/herd).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
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
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let input: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", args.input.display()))?;
    let dir = model_arg::resolve(&args.model, args.cache_dir.as_deref())?;
    let loaded = LoadedModel::load(&dir, args.dtype).with_context(|| format!("loading {}", dir.display()))?;
    let (max_new, prompts) = parse_input(&input, &loaded).with_context(|| format!("in {}", args.input.display()))?;
    let results = evaluate(&loaded, prompts, max_new)?;
    let out = EvalOutput { dtype: args.dtype.to_string(), prompts: results };
    let json = serde_json::to_string(&out).context("serialising results")?;
    std::fs::write(&args.output, json).with_context(|| format!("writing {}", args.output.display()))?;
    Ok(())
}

/// One prompt, tokenized.
struct Prompt {
    name: String,
    ids: Vec<u32>,
}

/// `(max_new_tokens, prompts)`, with every prompt tokenized as its kind says.
fn parse_input(input: &Value, loaded: &LoadedModel) -> anyhow::Result<(usize, Vec<Prompt>)> {
    let max_new = match input.get("max_new_tokens") {
        None => 0,
        Some(v) => v.as_u64().context("max_new_tokens must be a non-negative integer")? as usize,
    };
    let list = input.get("prompts").and_then(Value::as_array).context("expected a \"prompts\" array")?;
    let vocab = loaded.config.text.vocab_size;
    let mut prompts = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let name = p.get("name").and_then(Value::as_str).map_or_else(|| format!("#{i}"), str::to_owned);
        let kinds: Vec<&str> = ["input_ids", "messages", "text"].into_iter().filter(|k| p.get(k).is_some()).collect();
        let ids = match kinds.as_slice() {
            ["input_ids"] => serde_json::from_value::<Vec<u32>>(p["input_ids"].clone())
                .with_context(|| format!("prompt {name}: input_ids must be a list of token ids"))?,
            ["messages"] => {
                let messages =
                    p["messages"].as_array().with_context(|| format!("prompt {name}: messages must be a list"))?;
                let template = loaded.chat_template.as_ref().with_context(|| {
                    format!("prompt {name}: the model has no chat template; give input_ids or text")
                })?;
                let rendered = template
                    .render(messages, true, p.get("tools"))
                    .with_context(|| format!("prompt {name}: rendering the chat template"))?;
                // The template writes BOS itself; encoding must not add a second.
                loaded.tokenizer.encode(&rendered, false).with_context(|| format!("prompt {name}"))?
            }
            ["text"] => {
                let text = p["text"].as_str().with_context(|| format!("prompt {name}: text must be a string"))?;
                loaded.tokenizer.encode(text, true).with_context(|| format!("prompt {name}"))?
            }
            _ => bail!("prompt {name}: needs exactly one of input_ids, messages, text"),
        };
        if ids.is_empty() {
            bail!("prompt {name}: no tokens");
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("prompt {name}: token id {bad} is outside the vocabulary of {vocab} ids");
        }
        prompts.push(Prompt { name, ids });
    }
    Ok((max_new, prompts))
}

fn evaluate(loaded: &LoadedModel, prompts: Vec<Prompt>, max_new: usize) -> anyhow::Result<Vec<PromptResult>> {
    let model = &loaded.model;
    let vocab = model.config().vocab_size;
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut steps: Vec<SeqStep<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| SeqStep { tokens: &p.ids, cache, logits: LogitsFor::All })
        .collect();
    let logits = model.forward(&mut steps)?;
    drop(steps);

    let mut results: Vec<PromptResult> = prompts
        .into_iter()
        .zip(logits)
        .map(|(Prompt { name, ids: input_ids }, l)| {
            let argmax: Vec<u32> = l.chunks_exact(vocab).map(|row| argmax(row) as u32).collect();
            let last_logits = l[l.len() - vocab..].to_vec();
            PromptResult { name, input_ids, last_logits, argmax, greedy_new_ids: Vec::new() }
        })
        .collect();

    // Greedy decoding in lockstep: every sequence feeds its previous pick.
    let mut next: Vec<u32> = results.iter().map(|r| *r.argmax.last().unwrap_or(&0)).collect();
    for step in 0..max_new {
        for (r, &t) in results.iter_mut().zip(&next) {
            r.greedy_new_ids.push(t);
        }
        if step + 1 == max_new {
            break;
        }
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut steps: Vec<SeqStep<'_>> = tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| SeqStep { tokens: t, cache, logits: LogitsFor::Last })
            .collect();
        let logits = model.forward(&mut steps)?;
        next = logits.iter().map(|l| argmax(l) as u32).collect();
    }
    Ok(results)
}
