//! herd-worker: the Llama 4 model and the engine that runs it on one device.
//!
//! Modules:
//! - [`model`]: checkpoint config ([`model::config`]), memory-mapped safetensors
//!   ([`model::checkpoint`]), typed weights ([`model::weights`]) and the text forward pass
//!   ([`model::text`], with the MoE block in [`model::moe`]).
//! - [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate, incremental detokenising.
//! - [`chat_template`]: the checkpoint's Jinja chat template rendered as transformers does.
//! - [`engine`]: KV cache ([`engine::kv_cache`]), sampling ([`engine::sampler`]) and the
//!   generation loop ([`engine::generate`]).
//! - [`loaded`]: a checkpoint's model, tokenizer, chat template and generation defaults
//!   loaded together.
//! - [`synth`]: random-weight checkpoints in the Hugging Face layout (presets tiny,
//!   scout-mini, maverick-mini) so that nothing needs a download.
//!
//! A request flows: text → [`chat_template`] → [`tokenizer`] ids → [`engine::generate`], which
//! calls [`model::text::TextModel::forward`] once for the prompt and once per new token
//! (reading and extending the [`engine::kv_cache`]) and picks each token with
//! [`engine::sampler`] → [`tokenizer`] decodes the stream back to text.

pub mod chat_template;
pub mod engine;
pub mod loaded;
pub mod model;
pub mod synth;
pub mod tokenizer;
