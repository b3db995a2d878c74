//! `POST /v1/chat/completions`: validate (render the chat template with the generation prompt,
//! tokenize without a second BOS), run `n` choices, answer with one `chat.completion` or a
//! stream of `chat.completion.chunk`s.

use super::ApiState;
use super::errors::{ApiError, Json};
use super::generation::{self, Choice};
use super::logprobs::{self, LogprobEntry};
use super::openai::{ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatMessage, GenerationRequest};
use super::openai::{Delta, Usage};
use super::sse::{self, ChunkFormat, json_event};
use super::validation::validate_chat;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use herd_worker::engine::stop::FinishReason;
use std::time::Instant;

const ASSISTANT: &str = "assistant";

pub(crate) async fn handle(
    State(state): State<ApiState>,
    Json(request): Json<GenerationRequest>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let valid = state.validate(move |config, frontend| validate_chat(config, frontend, request)).await?;
    let choices = generation::launch(&state, &valid, arrived).await?;
    let id = state.response_id("chatcmpl");
    let created = super::unix_time();
    let model = state.config().served_model_name.clone();
    if valid.stream {
        let format = ChatChunks { id, created, model, include_usage: valid.include_usage };
        return Ok(sse::response(choices, format, valid.include_usage));
    }
    let (collected, usage) = generation::collect(choices).await?;
    let choices = collected
        .into_iter()
        .map(|c| ChatChoice {
            index: c.index,
            message: ChatMessage { role: ASSISTANT, content: c.text },
            logprobs: (!c.logprobs.is_empty()).then(|| logprobs::chat(&c.logprobs)),
            finish_reason: c.finish_reason.as_str(),
        })
        .collect();
    let body = ChatCompletion { id, object: "chat.completion", created, model, choices, usage };
    Ok(axum::Json(body).into_response())
}

struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> SseEvent {
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }

    fn delta(&self, index: u32, delta: Delta, finish_reason: Option<&'static str>) -> SseEvent {
        self.chunk(vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason }], None)
    }
}

impl ChunkFormat for ChatChunks {
    fn opening(&self, choice: &Choice) -> Option<SseEvent> {
        let delta = Delta { role: Some(ASSISTANT), content: Some(String::new()) };
        Some(self.delta(choice.index, delta, None))
    }

    fn text(&mut self, index: u32, text: String, entry: Option<LogprobEntry>) -> SseEvent {
        let delta = Delta { role: None, content: Some(text) };
        let logprobs = entry.map(|e| logprobs::chat(std::slice::from_ref(&e)));
        self.chunk(vec![ChatChunkChoice { index, delta, logprobs, finish_reason: None }], None)
    }

    fn finish(&self, index: u32, reason: FinishReason) -> SseEvent {
        self.delta(index, Delta::default(), Some(reason.as_str()))
    }

    fn usage(&self, usage: Usage) -> SseEvent {
        self.chunk(Vec::new(), Some(usage))
    }
}
