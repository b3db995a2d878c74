//! What goes into the engine (requests) and what comes out (events), as plain serde values
//! so the same types cross process boundaries on the control channel.

use super::logprobs::TokenLogprobs;
use super::sampler::{SamplingError, SamplingParams};
use super::stop::StopReason;
use crate::vision::PixelValues;
use serde::{Deserialize, Serialize};

/// Request ids are chosen by the submitter and unique within one engine.
pub type RequestId = u64;

/// A tokenized request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: RequestId,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Also report the argmax at every prompt position and the logits of the last one
    /// (what `herd eval` compares against transformers).
    #[serde(default)]
    pub prompt_logits: bool,
    /// The prompt's images in order; their feature rows replace the prompt's `<|patch|>`
    /// embeddings (the prompt already holds each image's expanded token block).
    // Always serialized: the control channel's bincode is positional, so a skipped field
    // would shift every field after it (`default` only helps self-describing formats).
    #[serde(default)]
    pub images: Vec<PixelValues>,
}

/// Something that happened to a request during a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Only for requests with `prompt_logits`, once the whole prompt has run.
    PromptLogits { id: RequestId, argmax: Vec<u32>, last_logits: Vec<f32> },
    /// One generated token and the text that became final with it (possibly empty: text of
    /// an unfinished character or of a possible stop string is held back).
    Token {
        id: RequestId,
        token: u32,
        text: String,
        /// Only for requests with `params.logprobs`.
        logprobs: Option<TokenLogprobs>,
    },
    /// The request ended normally; its blocks are free.
    Finished { id: RequestId, reason: StopReason, prompt_tokens: usize, completion_tokens: usize },
    /// The request ended without finishing: cancelled, or the engine failed.
    Aborted { id: RequestId, error: String },
}

impl Event {
    pub fn id(&self) -> RequestId {
        match self {
            Event::PromptLogits { id, .. }
            | Event::Token { id, .. }
            | Event::Finished { id, .. }
            | Event::Aborted { id, .. } => *id,
        }
    }

    /// Whether this is the request's last event.
    pub fn is_final(&self) -> bool {
        matches!(self, Event::Finished { .. } | Event::Aborted { .. })
    }
}

/// Why a request was refused at submission (it never ran).
#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejection {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary of {vocab} ids")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("invalid sampling parameter `{field}`: {message}")]
    InvalidParams { field: String, message: String },
    #[error(
        "the request needs {need} KV cache blocks ({tokens} tokens of prompt and output) but the cache has {total}; \
         shorten the prompt or max_tokens, or give the worker more KV cache memory"
    )]
    TooLarge { need: usize, total: usize, tokens: usize },
    #[error("request id {0} is already in use")]
    DuplicateId(RequestId),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("this worker is not serving (its group is forming or re-forming)")]
    NotServing,
    #[error(
        "the request has images but this engine runs no vision tower (the model has none, or the engine runs on a GPU, \
         which serves text prompts only for now)"
    )]
    NoVision,
    #[error("the images give {features} feature rows but the prompt has {patches} <|patch|> tokens")]
    ImageTokens { patches: usize, features: usize },
    #[error("image {index}: {message}")]
    BadImage { index: usize, message: String },
}

impl From<SamplingError> for Rejection {
    fn from(e: SamplingError) -> Self {
        Rejection::InvalidParams { field: e.field().to_owned(), message: e.to_string() }
    }
}
