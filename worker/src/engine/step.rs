//! One engine step, in four phases:
//!
//! ```text
//! plan     which running sequences advance, and by how many tokens (decodes first, then
//!          prefill chunks, under max_step_tokens)
//! batch    what each planned sequence feeds: its tokens, which logits it needs, and its
//!          prefill chunk's share of the request's image rows
//! forward  one TextModel (or GPU model) pass over the whole batch
//! emit     per sequence: prompt bookkeeping, sample, stop rules, detokenise → events;
//!          finished sequences free their blocks
//! ```

use super::logprobs::token_logprobs;
use super::request::Event;
use super::stop::StopReason;
use super::{Engine, EngineError, Seq, StepStats};
use crate::model::moe::ExpertExchange;
use crate::model::text::{ImageRows, LogitsFor, SeqStep};
use herd_kernels::cpu::activation::argmax;
use std::sync::Arc;

/// One planned sequence: its index among the running ones, and how many tokens it advances.
#[derive(Clone, Copy, Debug)]
struct Planned {
    seq: usize,
    tokens: usize,
}

/// What one planned sequence feeds into the forward pass.
#[derive(Debug)]
struct Input {
    tokens: Vec<u32>,
    logits: LogitsFor,
    /// `(first patch, patches)` of the request's image rows this prefill chunk replaces.
    images: Option<(usize, usize)>,
}

impl Engine {
    /// Run one step with every routed expert in this process, on a thread of the compute pool
    /// (see [`on_pool`](herd_kernels::cpu::parallel::on_pool): no step of local experts waits on
    /// a peer).
    pub fn step(&mut self) -> Result<(Vec<Event>, StepStats), EngineError> {
        herd_kernels::cpu::parallel::on_pool(|| self.run_step(None))
    }

    /// Run one step as a worker of an expert-parallel group, whose routed experts run through
    /// `exchange`. The exchange joins collectives, so every worker of the group calls this
    /// every step, with or without work.
    pub fn step_with(&mut self, exchange: &mut dyn ExpertExchange) -> Result<(Vec<Event>, StepStats), EngineError> {
        self.run_step(Some(exchange))
    }

    fn run_step(&mut self, exchange: Option<&mut dyn ExpertExchange>) -> Result<(Vec<Event>, StepStats), EngineError> {
        self.admit();
        let plan = self.plan();
        self.encode_images(&plan);
        let (inputs, stats) = self.batch(&plan);
        let logits = self.forward(&plan, &inputs, exchange)?;
        for (p, input) in plan.iter().zip(&inputs) {
            if let Some((_, k)) = input.images {
                self.running[p.seq].patches_run += k;
            }
        }
        self.emit(&plan, logits);
        Ok((self.take_events(), stats))
    }

    /// This step's sequences: one token for every decoding sequence (latency first), then
    /// prompt chunks in arrival order until the token budget is spent.
    fn plan(&self) -> Vec<Planned> {
        let mut budget = self.config.max_step_tokens;
        let mut plan = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if s.decoding() && budget > 0 {
                plan.push(Planned { seq: i, tokens: 1 });
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            if !s.decoding() && budget > 0 {
                let n = (s.req.prompt.len() - s.prefilled).min(budget);
                plan.push(Planned { seq: i, tokens: n });
                budget -= n;
            }
        }
        plan
    }

    /// Run the vision encoder for planned sequences that start prefilling with images. The
    /// encoder runs here, on the worker that owns the sequence, outside the lockstep forward.
    fn encode_images(&mut self, plan: &[Planned]) {
        let Some(vision) = self.vision.as_ref().map(|v| Arc::clone(&v.model)) else { return };
        for p in plan {
            let s = &mut self.running[p.seq];
            if s.req.images.is_empty() || !s.image_rows.is_empty() || s.decoding() {
                continue;
            }
            let pixels: Vec<half::bf16> = s.req.images.iter().flat_map(|pv| pv.values.iter().copied()).collect();
            s.image_rows = vision.forward(&pixels); // [patch tokens, hidden]
        }
    }

    /// What each planned sequence feeds and which logits it needs.
    fn batch(&self, plan: &[Planned]) -> (Vec<Input>, StepStats) {
        let mut stats = StepStats { sequences: plan.len(), ..StepStats::default() };
        let patch = self.vision.as_ref().map(|v| v.patch_token);
        let inputs = plan
            .iter()
            .map(|p| {
                let s = &self.running[p.seq];
                if s.decoding() {
                    stats.decode_tokens += 1;
                    return Input { tokens: vec![s.last.unwrap_or(0)], logits: LogitsFor::Last, images: None };
                }
                stats.prefill_tokens += p.tokens;
                let completes = s.prefilled + p.tokens == s.req.prompt.len();
                let logits = match (s.req.prompt_logits, completes) {
                    (true, _) => LogitsFor::All,
                    (false, true) => LogitsFor::Last,
                    (false, false) => LogitsFor::None,
                };
                let tokens = s.req.prompt[s.prefilled..s.prefilled + p.tokens].to_vec();
                // The chunk's share of the image rows: its own `<|patch|>` tokens.
                let images = patch.filter(|_| !s.image_rows.is_empty()).map(|patch| {
                    let k = tokens.iter().filter(|&&t| t == patch).count();
                    (s.patches_run, k)
                });
                Input { tokens, logits, images }
            })
            .collect();
        (inputs, stats)
    }

    /// The forward pass over the batch: each planned sequence's requested logits, `[rows, vocab]`.
    fn forward(
        &mut self,
        plan: &[Planned],
        inputs: &[Input],
        exchange: Option<&mut dyn ExpertExchange>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let patch = self.vision.as_ref().map(|v| v.patch_token);
        let hidden = self.model.config().hidden_size;
        let mut seqs: Vec<Option<&mut Seq>> = self.running.iter_mut().map(Some).collect();
        let mut steps: Vec<SeqStep<'_>> = plan
            .iter()
            .zip(inputs)
            .map(|(p, input)| {
                let s = seqs[p.seq].take().expect("plan names each sequence once");
                let images = match (input.images, patch) {
                    (Some((first, k)), Some(patch)) => {
                        Some(ImageRows { patch, rows: &s.image_rows[first * hidden..(first + k) * hidden] })
                    }
                    _ => None,
                };
                SeqStep { tokens: &input.tokens, kv: &mut s.kv, logits: input.logits, images }
            })
            .collect();
        Ok(match self.gpu.as_mut() {
            Some(g) => g.forward(&mut self.pool, &mut steps, exchange)?,
            None => self.model.forward_with(&mut self.pool, &mut steps, exchange)?,
        })
    }

    /// Turn each planned sequence's logits into its events: the prompt's argmax and last
    /// logits when asked for, then a sampled token with its text, and the end of finished
    /// requests (whose blocks are freed).
    fn emit(&mut self, plan: &[Planned], logits: Vec<Vec<f32>>) {
        let vocab = self.model.config().vocab_size;
        let mut finished = Vec::new();
        for (p, rows) in plan.iter().zip(logits) {
            let s = &mut self.running[p.seq];
            if !s.decoding() {
                if s.req.prompt_logits {
                    s.prompt_argmax.extend(rows.chunks_exact(vocab).map(|r| argmax(r) as u32));
                }
                s.prefilled += p.tokens;
                if !s.decoding() {
                    continue;
                }
                if s.req.prompt_logits {
                    let last = rows[rows.len() - vocab..].to_vec();
                    let argmax = std::mem::take(&mut s.prompt_argmax);
                    self.events.push(Event::PromptLogits { id: s.req.id, argmax, last_logits: last });
                }
            }
            let raw = &rows[rows.len() - vocab..];
            let mut last = raw.to_vec();
            let token = s.sampler.sample(&mut last);
            let logprobs = s.req.params.logprobs.map(|top| token_logprobs(raw, token, top as usize));
            s.sampler.accept(token);
            s.last = Some(token);
            s.generated += 1;
            let delta = s.detok.push(&self.tokenizer, token).unwrap_or_default();
            let (mut text, reason) = s.stop.push(token, &delta);
            if reason == Some(StopReason::MaxTokens) {
                // A length stop can cut a multi-byte character; show what was decoded.
                text.push_str(&s.detok.flush(&self.tokenizer).unwrap_or_default());
            }
            self.events.push(Event::Token { id: s.req.id, token, text, logprobs });
            if let Some(reason) = reason {
                self.events.push(Event::Finished {
                    id: s.req.id,
                    reason,
                    prompt_tokens: s.req.prompt.len(),
                    completion_tokens: s.generated,
                });
                finished.push(p.seq);
            }
        }
        // Highest index first, so each removal leaves the others' indices valid (a decoding
        // sequence can sit after one that finished its prompt in this step).
        finished.sort_unstable();
        for &i in finished.iter().rev() {
            let mut seq = self.running.remove(i);
            self.free(&mut seq);
        }
    }
}
