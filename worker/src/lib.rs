//! herd-worker: the Llama 4 model and the engine that runs it on one device.
//!
//! Modules:
//! - [`model`]: checkpoint config ([`model::config`]), memory-mapped safetensors
//!   ([`model::checkpoint`]), typed weights ([`model::weights`]) and the text forward pass
//!   ([`model::text`], with the MoE block in [`model::moe`]).
//! - [`tokenizer`]: `tokenizer.json` through the `tokenizers` crate, incremental detokenising.
//! - [`agent`]: a worker's side of the coordinator tier (registration, heartbeats, placement
//!   epochs re-forming the lockstep group, requests in and events out).
//! - [`chat_template`]: the checkpoint's Jinja chat template rendered as transformers does.
//! - [`engine`]: the continuous-batching engine ([`engine`]) over a paged KV cache
//!   ([`engine::kv_cache`]), with sampling ([`engine::sampler`]) and stop rules; built on the
//!   CPU or a GPU by [`engine::device`].
//! - [`control`]: the messages between a worker and its driver (requests in, events out).
//! - [`lockstep`]: the loop that keeps an expert-parallel group stepping together.
//! - [`ep`]: expert parallelism — the MoE runner that ships routed tokens to the workers
//!   holding their experts over a [`transport`] and combines the results.
//! - `gpu` (feature `cuda`): the text model on one CUDA device with its weights resident
//!   there, driven by the same engine (the KV cache's data on the device, its block tables in a
//!   blocks-only [`kv_cache::KvPool`]); and a Maverick two-layer slice for benchmarks.
//! - [`frontend`]: a checkpoint's config, tokenizer, chat template and generation defaults
//!   (no weights), and loading the model from it.
//! - [`placement`]: which workers hold each routed expert (a serde value the coordinator owns).
//! - [`quantize`]: `herd quantize` — a float checkpoint's routed experts to FP8 or int4
//!   per-expert tensors that load memory-mapped ([`model::quant_config`] names the schemes).
//! - [`synth`]: random-weight checkpoints in the Hugging Face layout (presets tiny,
//!   scout-mini, maverick-mini) so that nothing needs a download.
//! - [`transport`]: the data plane's collectives (`all_to_all_v`, `barrier`): in-process and TCP (optional mTLS).
//! - [`vision`]: images in prompts — decoding with size limits, the Llama 4 image processor
//!   (tiles, torch-exact resize, bf16 normalisation), the image token block, and the vision
//!   encoder + projector whose rows replace the `<|patch|>` embeddings (early fusion).
//!
//! A request flows: text → [`chat_template`] → [`tokenizer`] ids →
//! [`engine::Engine::submit`]. Each engine step runs
//! [`model::text::TextModel::forward_with`] once over a batch of prefill chunks and decode
//! tokens on the paged [`engine::kv_cache`]; at every MoE layer an
//! [`model::moe::ExpertRunner`] runs the routed experts (in process, or [`ep::EpRunner`]
//! across workers over a [`transport`], kept in step by [`lockstep`]). Each request's
//! [`engine::sampler`] and [`engine::stop`] rules turn logits into tokens and text, which
//! leave as [`engine::request::Event`]s ([`control::Report`]s from a worker process).

pub mod chat_template;
pub mod control;
pub mod engine;
pub mod ep;
pub mod frontend;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kv_cache;
pub mod model;
pub mod placement;
pub mod quantize;
pub mod runtime;
pub mod synth;
pub mod tokenizer;
pub mod transport;
pub mod vision;
