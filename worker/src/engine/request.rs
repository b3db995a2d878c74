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
    /// The request ended without finishing: cancelled, its group failed, or the engine failed.
    Aborted { id: RequestId, reason: AbortReason },
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

/// Why a request ended without finishing. Typed so that whoever routed it can tell a failure
/// worth retrying on another worker (the group or the worker went away) from one that would
/// happen again (a cancellation, an engine error).
#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum AbortReason {
    /// The client (or the submitter) cancelled it.
    #[error("cancelled")]
    Cancelled,
    /// The worker's group left for a newer placement epoch.
    #[error("the cluster moved to placement epoch {epoch}; retry the request")]
    EpochChanged { epoch: u64 },
    /// A peer of the worker's expert-parallel group failed: it closed its connection, sent
    /// something malformed, or fell out of step. `detail` is the data plane's account.
    #[error("{detail}")]
    PeerLost { rank: usize, detail: String },
    /// A collective of the worker's group missed its deadline, waiting for `rank`.
    #[error("{detail}")]
    Deadline { rank: usize, detail: String },
    /// The worker, or the service in front of the engine, is shutting down.
    #[error("{what} is shutting down")]
    ShuttingDown { what: String },
    /// Whoever routed the request lost the worker that held it (disconnected, declared dead).
    #[error("worker {worker} {why}")]
    WorkerLost { worker: String, why: String },
    /// The engine failed (a model or device error), or the request could not run anywhere.
    #[error("{message}")]
    Engine { message: String },
}

impl AbortReason {
    /// Whether the request may run again on another worker (if it has produced no token yet):
    /// true when its group or its worker went away, false for a cancellation or an engine
    /// error, which would only happen again.
    pub fn is_retryable(&self) -> bool {
        match self {
            AbortReason::EpochChanged { .. }
            | AbortReason::PeerLost { .. }
            | AbortReason::Deadline { .. }
            | AbortReason::ShuttingDown { .. }
            | AbortReason::WorkerLost { .. } => true,
            AbortReason::Cancelled | AbortReason::Engine { .. } => false,
        }
    }

    /// An engine failure with this message.
    pub fn engine(message: impl Into<String>) -> Self {
        AbortReason::Engine { message: message.into() }
    }
}

/// A failed exchange, as a request that was in the step sees it.
impl From<&crate::model::moe::ExchangeError> for AbortReason {
    fn from(e: &crate::model::moe::ExchangeError) -> Self {
        use crate::model::moe::Blame;
        let detail = e.detail.clone();
        match e.blame {
            Blame::Peer { rank } => AbortReason::PeerLost { rank, detail },
            Blame::Late { rank } => AbortReason::Deadline { rank, detail },
            Blame::Here => AbortReason::Engine { message: detail },
        }
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
