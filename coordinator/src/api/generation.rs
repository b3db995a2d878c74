//! Running a [`ValidRequest`]: submit every choice (`n` per prompt) to the service, wait for
//! their admission, then read them, either to completion ([`collect`]) or as a stream
//! ([`super::sse`]). Dropping a [`Choice`] drops its [`EventStream`], which cancels the request.

use super::ApiState;
use super::errors::ApiError;
use super::logprobs::LogprobEntry;
use super::metrics::RequestTracker;
use super::openai::Usage;
use super::service::{EventStream, Submission};
use super::validation::ValidRequest;
use futures::StreamExt;
use herd_worker::engine::request::Event;
use herd_worker::engine::stop::FinishReason;
use herd_worker::frontend::Frontend;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// One generated sequence of a request.
#[derive(Debug)]
pub(crate) struct Choice {
    /// The response's choice index: `prompt * n + j`.
    pub index: u32,
    /// Which prompt it continues (completions may have several).
    pub prompt: usize,
    /// Completions' `echo` text, sent before the generated text.
    pub echo: Option<String>,
    events: EventStream,
    tracker: RequestTracker,
    ended: bool,
    /// Names the tokens of logprobs.
    frontend: Arc<Frontend>,
}

/// What happened next to a choice.
#[derive(Debug, PartialEq)]
pub(crate) enum Update {
    /// New text (possibly empty: a token whose text is held back), and the token's logprobs
    /// when the request asked for them.
    Text(String, Option<LogprobEntry>),
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request ended without finishing (a worker failed); the message says why.
    Failed(String),
}

impl Choice {
    /// The next update, None after the last one.
    pub async fn next(&mut self) -> Option<Update> {
        if self.ended {
            return None;
        }
        loop {
            let Some(event) = self.events.next().await else {
                self.ended = true;
                self.tracker.aborted();
                return Some(Update::Failed("the inference service dropped the request".into()));
            };
            match event {
                Event::Token { text, token, logprobs, .. } => {
                    self.tracker.token();
                    let entry = logprobs.map(|lp| LogprobEntry::new(&self.frontend, token, &lp));
                    return Some(Update::Text(text, entry));
                }
                Event::Finished { reason, prompt_tokens, completion_tokens, .. } => {
                    let reason = reason.finish_reason();
                    self.tracker.finished(reason, prompt_tokens, completion_tokens);
                    self.ended = true;
                    return Some(Update::Finished { reason, prompt_tokens, completion_tokens });
                }
                Event::Aborted { reason, .. } => {
                    self.tracker.aborted();
                    self.ended = true;
                    return Some(Update::Failed(reason.to_string()));
                }
                Event::PromptLogits { .. } => {}
            }
        }
    }
}

/// Submit every choice and wait until the service has admitted all of them. On any refusal the
/// choices already submitted are dropped, which cancels them.
pub(crate) async fn launch(state: &ApiState, valid: &ValidRequest, arrived: Instant) -> Result<Vec<Choice>, ApiError> {
    let mut pending = Vec::with_capacity(valid.prompts.len() * valid.n);
    for (p, prompt) in valid.prompts.iter().enumerate() {
        for j in 0..valid.n {
            let mut params = prompt.params.clone();
            // vLLM's rule for parallel sampling: choice j of a seeded request uses seed + j, so
            // the choices differ but the whole response is reproducible.
            params.seed = params.seed.map(|s| s.wrapping_add(j as u64));
            let submission =
                Submission { prompt: prompt.ids.clone(), images: prompt.images.clone(), params, prompt_logits: false };
            let events = state.service().submit(submission)?;
            let index = u32::try_from(p * valid.n + j).unwrap_or(u32::MAX);
            pending.push((index, p, prompt.echo.clone(), events));
        }
    }
    let mut choices = Vec::with_capacity(pending.len());
    for (_, _, _, events) in &mut pending {
        events.admitted().await?;
    }
    for (index, prompt, echo, events) in pending {
        let tracker = state.metrics().tracker(arrived);
        let frontend = Arc::clone(state.frontend());
        choices.push(Choice { index, prompt, echo, events, tracker, ended: false, frontend });
    }
    Ok(choices)
}

/// A finished choice.
#[derive(Debug)]
pub(crate) struct Collected {
    pub index: u32,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Empty unless the request asked for logprobs.
    pub logprobs: Vec<LogprobEntry>,
}

/// Read every choice to its end; the first failure drops (cancels) the others.
pub(crate) async fn collect(choices: Vec<Choice>) -> Result<(Vec<Collected>, Usage), ApiError> {
    let results = futures::future::try_join_all(choices.into_iter().map(collect_one)).await?;
    let mut usage = UsageCounter::default();
    let collected = results
        .into_iter()
        .map(|(collected, prompt, prompt_tokens, completion_tokens)| {
            usage.add(prompt, prompt_tokens, completion_tokens);
            collected
        })
        .collect();
    Ok((collected, usage.total()))
}

async fn collect_one(mut choice: Choice) -> Result<(Collected, usize, usize, usize), ApiError> {
    let mut text = choice.echo.take().unwrap_or_default();
    let mut logprobs = Vec::new();
    while let Some(update) = choice.next().await {
        match update {
            Update::Text(delta, entry) => {
                text.push_str(&delta);
                logprobs.extend(entry);
            }
            Update::Finished { reason, prompt_tokens, completion_tokens } => {
                let collected = Collected { index: choice.index, text, finish_reason: reason, logprobs };
                return Ok((collected, choice.prompt, prompt_tokens, completion_tokens));
            }
            Update::Failed(error) => return Err(ApiError::aborted(&error)),
        }
    }
    Err(ApiError::aborted("the request ended without a result"))
}

/// Usage over choices: each prompt's tokens count once, however many choices continue it.
#[derive(Debug, Default)]
pub(crate) struct UsageCounter {
    prompts: BTreeMap<usize, usize>,
    completion: usize,
}

impl UsageCounter {
    pub fn add(&mut self, prompt: usize, prompt_tokens: usize, completion_tokens: usize) {
        self.prompts.insert(prompt, prompt_tokens);
        self.completion += completion_tokens;
    }

    pub fn total(&self) -> Usage {
        Usage::new(self.prompts.values().sum(), self.completion)
    }
}
