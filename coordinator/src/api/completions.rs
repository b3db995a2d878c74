//! `POST /v1/completions`: validate (tokenize each prompt with BOS, or take its token ids), run
//! `n` choices per prompt (choice index `prompt * n + j`), answer with one `text_completion` or
//! a stream of them; `echo` puts the prompt's text before the generated text.

use super::ApiState;
use super::errors::{ApiError, Json};
use super::generation::{self, Choice};
use super::logprobs::{self, LogprobEntry};
use super::openai::{Completion, CompletionChoice, GenerationRequest, Usage};
use super::sse::{self, ChunkFormat, json_event};
use super::validation::validate_completion;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use herd_worker::engine::stop::FinishReason;
use std::collections::HashMap;
use std::time::Instant;

const OBJECT: &str = "text_completion";

pub(crate) async fn handle(
    State(state): State<ApiState>,
    Json(request): Json<GenerationRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let valid = state.validate(move |config, frontend| validate_completion(config, frontend, request)).await?;
    let choices = generation::launch(&state, &valid, arrived).await?;
    let id = state.response_id("cmpl");
    let created = super::unix_time();
    let model = state.config().served_model_name.clone();
    if valid.stream {
        let format =
            CompletionChunks { id, created, model, include_usage: valid.include_usage, offsets: HashMap::new() };
        return Ok(sse::response(choices, format, valid.include_usage));
    }
    let (collected, usage) = generation::collect(choices).await?;
    let choices = collected
        .into_iter()
        .map(|c| CompletionChoice {
            index: c.index,
            logprobs: (!c.logprobs.is_empty()).then(|| logprobs::completion(&c.logprobs, 0)),
            text: c.text,
            finish_reason: Some(c.finish_reason.as_str()),
        })
        .collect();
    let body = Completion { id, object: OBJECT, created, model, choices, usage: Some(Some(usage)) };
    Ok(axum::Json(body).into_response())
}

struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// Per choice, the characters of logprob tokens sent so far (for `text_offset`).
    offsets: HashMap<u32, usize>,
}

impl CompletionChunks {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> SseEvent {
        json_event(&Completion {
            id: self.id.clone(),
            object: OBJECT,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }

    fn choice(&self, index: u32, text: String, finish_reason: Option<&'static str>) -> SseEvent {
        self.chunk(vec![CompletionChoice { index, text, logprobs: None, finish_reason }], None)
    }
}

impl ChunkFormat for CompletionChunks {
    fn opening(&self, choice: &Choice) -> Option<SseEvent> {
        let echo = choice.echo.as_ref().filter(|text| !text.is_empty())?;
        Some(self.choice(choice.index, echo.clone(), None))
    }

    fn text(&mut self, index: u32, text: String, entry: Option<LogprobEntry>) -> SseEvent {
        let Some(entry) = entry else { return self.choice(index, text, None) };
        let offset = self.offsets.entry(index).or_insert(0);
        let logprobs = logprobs::completion(std::slice::from_ref(&entry), *offset);
        *offset += entry.token.chars().count();
        self.chunk(vec![CompletionChoice { index, text, logprobs: Some(logprobs), finish_reason: None }], None)
    }

    fn finish(&self, index: u32, reason: FinishReason) -> SseEvent {
        self.choice(index, String::new(), Some(reason.as_str()))
    }

    fn usage(&self, usage: Usage) -> SseEvent {
        self.chunk(Vec::new(), Some(usage))
    }
}
