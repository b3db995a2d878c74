//! Generation for a single sequence: prefill the prompt, then decode token by token until a
//! stop condition, streaming text as it becomes final.
//!
//! This is the loop behind `herd generate`; the batching engine runs the same steps for many
//! sequences at once.

use super::sampler::{Sampler, SamplingError, SamplingParams};
use super::stop::{StopChecker, StopReason};
use crate::model::ModelError;
use crate::model::text::{LogitsFor, SeqStep, TextModel};
use crate::tokenizer::{Tokenizer, TokenizerError};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("invalid sampling parameter: {0}")]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// The result of one generation.
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Generated ids, including a final EOS or stop token.
    pub token_ids: Vec<u32>,
    /// Emitted text (stop tokens and stop strings removed).
    pub text: String,
    pub stop: StopReason,
    /// Time to process the prompt and pick the first token.
    pub prefill: Duration,
    /// Time for the remaining tokens.
    pub decode: Duration,
}

impl Generation {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.token_ids.len().saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Generate from `prompt` ids; `on_text` receives each piece of text as soon as it is final.
pub fn generate(
    model: &TextModel,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    eos_ids: &[u32],
    mut on_text: impl FnMut(&str),
) -> Result<Generation, GenerateError> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let started = Instant::now();
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(params, prompt);
    let mut stop = StopChecker::new(params, eos_ids);
    let mut detok = tokenizer.stream_decoder(true);
    let mut text = String::new();
    let mut token_ids = Vec::new();

    let mut logits =
        model.forward(&mut [SeqStep { tokens: prompt, cache: &mut cache, logits: LogitsFor::Last }])?.remove(0); // [vocab]
    let mut prefill = None;
    let reason = loop {
        let token = sampler.sample(&mut logits);
        prefill.get_or_insert_with(|| started.elapsed());
        sampler.accept(token);
        token_ids.push(token);
        let delta = detok.push(token)?;
        let (emit, reason) = stop.push(token, &delta);
        if !emit.is_empty() {
            on_text(&emit);
            text.push_str(&emit);
        }
        if let Some(reason) = reason {
            break reason;
        }
        logits =
            model.forward(&mut [SeqStep { tokens: &[token], cache: &mut cache, logits: LogitsFor::Last }])?.remove(0);
    };
    if reason == StopReason::MaxTokens {
        // A length stop can cut a multi-byte character in half; show what was decoded.
        let rest = detok.flush()?;
        on_text(&rest);
        text.push_str(&rest);
    }
    let prefill = prefill.unwrap_or_default();
    Ok(Generation {
        prompt_tokens: prompt.len(),
        token_ids,
        text,
        stop: reason,
        prefill,
        decode: started.elapsed().saturating_sub(prefill),
    })
}
