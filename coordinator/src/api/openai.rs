//! OpenAI's request and response bodies, as serde types.
//!
//! Requests keep polymorphic fields (`messages`, `prompt`, `stop`, ...) as JSON values so that
//! [`super::validation`] can say exactly what is wrong with them; unknown fields are ignored.
//! Responses follow the shapes the official clients parse: `null` where OpenAI sends `null`
//! (`logprobs`, a streaming `finish_reason`), absent where OpenAI omits a field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The body of both generation endpoints: chat (`messages`) and completions (`prompt`).
///
/// One flat type, so that a field means the same on both endpoints and a type error names its
/// field (serde loses the path inside `#[serde(flatten)]`). Fields of the other endpoint are
/// ignored like any unknown field; [`super::validation`] requires `messages` or `prompt`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct GenerationRequest {
    pub model: Option<String>,
    /// Chat: OpenAI message objects; `content` is a string, null, or a list of parts.
    pub messages: Option<Vec<Value>>,
    /// Chat: tool schemas, passed to the chat template.
    pub tools: Option<Value>,
    /// Completions: a string, a list of strings, a list of token ids, or a list of id lists.
    pub prompt: Option<Value>,
    /// Completions: put the prompt's text before the generated text.
    pub echo: Option<bool>,
    /// Chat: a bool; completions: an integer. Anything but null or false asks for logprobs.
    pub logprobs: Option<Value>,
    /// Chat.
    pub top_logprobs: Option<i64>,
    pub max_tokens: Option<i64>,
    /// Chat's newer name for `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM extension; -1 or 0 disables.
    pub top_k: Option<i64>,
    /// vLLM extension.
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    /// A string or a list of strings.
    pub stop: Option<Value>,
    /// vLLM extension.
    pub stop_token_ids: Option<Vec<u32>>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// vLLM extension.
    pub repetition_penalty: Option<f32>,
    /// vLLM extension.
    pub ignore_eos: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// A non-streaming chat response (`object: "chat.completion"`).
#[derive(Clone, Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessage,
    /// Null unless the request asked for logprobs.
    pub logprobs: Option<Value>,
    pub finish_reason: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage {
    pub role: &'static str,
    pub content: String,
}

/// One streamed chat chunk (`object: "chat.completion.chunk"`).
#[derive(Clone, Debug, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Absent without `include_usage`; null on every chunk but the last with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A completions response or streamed chunk (`object: "text_completion"` for both, as OpenAI
/// does).
#[derive(Clone, Debug, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Always present when not streaming; when streaming, as for chat chunks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
}

/// `GET /v1/models`.
#[derive(Clone, Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// vLLM's extension: prompt plus completion tokens one request may use.
    pub max_model_len: usize,
}

/// The error envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}
