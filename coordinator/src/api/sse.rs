//! Streaming responses as server-sent events, the way OpenAI sends them: one `data: {json}`
//! chunk per piece of text, a chunk with each choice's `finish_reason`, a usage chunk (empty
//! `choices`) when `stream_options.include_usage` is set, then `data: [DONE]`.
//!
//! A choice that fails after the headers are out (a worker died) ends the stream with an error
//! event in the OpenAI envelope, `data: {"error": {...}}`, then `[DONE]`, as vLLM does; the other
//! choices are cancelled. When the client goes away, axum drops the body and with it every
//! [`Choice`], which cancels the requests.

use super::errors::ApiError;
use super::generation::{Choice, Update, UsageCounter};
use super::logprobs::LogprobEntry;
use super::openai::Usage;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{BoxStream, SelectAll};
use futures::{Stream, StreamExt};
use herd_worker::engine::stop::FinishReason;
use serde::Serialize;
use std::collections::VecDeque;
use std::convert::Infallible;

/// How one endpoint spells its chunks.
pub(crate) trait ChunkFormat: Send + 'static {
    /// Sent for each choice before its text (chat: the assistant role; completions: the echo).
    fn opening(&self, choice: &Choice) -> Option<SseEvent>;
    /// New text of a choice, with its token's logprobs when they were asked for.
    fn text(&mut self, index: u32, text: String, logprobs: Option<LogprobEntry>) -> SseEvent;
    fn finish(&self, index: u32, reason: FinishReason) -> SseEvent;
    fn usage(&self, usage: Usage) -> SseEvent;
}

/// A `data:` event holding `value` as JSON.
pub(crate) fn json_event(value: &impl Serialize) -> SseEvent {
    match SseEvent::default().json_data(value) {
        Ok(event) => event,
        Err(e) => error_event(&ApiError::internal(format!("cannot serialize a chunk: {e}"))),
    }
}

fn error_event(error: &ApiError) -> SseEvent {
    // The envelope is plain strings; if even that fails, send a fixed one.
    SseEvent::default().json_data(error.body()).unwrap_or_else(|_| {
        SseEvent::default()
            .data(r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#)
    })
}

/// The SSE response for admitted `choices`.
pub(crate) fn response<F: ChunkFormat>(choices: Vec<Choice>, format: F, include_usage: bool) -> Response {
    let queue: VecDeque<SseEvent> = choices.iter().filter_map(|c| format.opening(c)).collect();
    let remaining = choices.len();
    let merged = futures::stream::select_all(choices.into_iter().map(|c| updates(c).boxed()));
    let state = Chunks { merged, format, queue, usage: UsageCounter::default(), remaining, include_usage, done: false };
    let stream = futures::stream::unfold(state, |mut state| async move {
        let event = state.next().await?;
        Some((Ok::<_, Infallible>(event), state))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

type Tagged = (u32, usize, Update);

fn updates(choice: Choice) -> impl Stream<Item = Tagged> + Send + 'static {
    futures::stream::unfold(choice, |mut choice| async move {
        let update = choice.next().await?;
        Some(((choice.index, choice.prompt, update), choice))
    })
}

struct Chunks<F> {
    merged: SelectAll<BoxStream<'static, Tagged>>,
    format: F,
    queue: VecDeque<SseEvent>,
    usage: UsageCounter,
    /// Choices not finished yet.
    remaining: usize,
    include_usage: bool,
    done: bool,
}

impl<F: ChunkFormat> Chunks<F> {
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            match self.merged.next().await {
                Some((index, _, Update::Text(text, logprobs))) => {
                    // A held-back token still reports its logprobs.
                    if !text.is_empty() || logprobs.is_some() {
                        let event = self.format.text(index, text, logprobs);
                        self.queue.push_back(event);
                    }
                }
                Some((index, prompt, Update::Finished { reason, prompt_tokens, completion_tokens })) => {
                    self.queue.push_back(self.format.finish(index, reason));
                    self.usage.add(prompt, prompt_tokens, completion_tokens);
                    self.remaining = self.remaining.saturating_sub(1);
                    if self.remaining == 0 {
                        if self.include_usage {
                            self.queue.push_back(self.format.usage(self.usage.total()));
                        }
                        self.end();
                    }
                }
                Some((_, _, Update::Failed(error))) => {
                    self.queue.push_back(error_event(&ApiError::aborted(&error)));
                    self.end();
                }
                None => {
                    // Every choice reports its end, so this is only reached if none was left.
                    self.end();
                }
            }
        }
    }

    fn end(&mut self) {
        self.queue.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
        // Cancels whatever is still running (after a failure).
        self.merged = SelectAll::new();
    }
}
