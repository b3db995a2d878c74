//! Running the model: the continuous-batching engine and its parts.
//!
//! [`scheduler::Engine`] admits [`request::Request`]s under the [`crate::kv_cache`] budget, runs one
//! batched forward pass per step, and turns logits into tokens with each request's
//! [`sampler`] and [`stop`] rules; [`logprobs`] reports what the model thought of each token.
//! [`device`] builds an engine on the CPU or a CUDA GPU.

pub mod device;
pub mod logprobs;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod stop;
