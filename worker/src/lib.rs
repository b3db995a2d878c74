//! herd-worker: the Llama 4 model, the engine that runs it on one device, and the runtime that
//! keeps a worker's engine in step with its expert-parallel group.
//!
//! Modules, from the bottom up:
//! - [`kv_cache`]: the paged KV pool under a memory budget; it knows only a `KvLayout`, so both
//!   the model (which appends and reads) and the engine (which reserves and releases) sit above.
//! - [`model`]: checkpoint config ([`model::config`]), memory-mapped safetensors
//!   ([`model::checkpoint`]), scoped weight loading ([`model::weights`]), and the forward pass
//!   as the Hugging Face modeling file has it: [`model::text`] (decoder layers),
//!   [`model::attention`], [`model::mlp`], [`model::moe`] (which also defines the
//!   `ExpertExchange` seam the expert-parallel data plane implements).
//! - [`tokenizer`], [`chat_template`]: `tokenizer.json` and the checkpoint's Jinja template,
//!   as transformers renders them.
//! - [`vision`]: images in prompts (decoding with limits, the Llama 4 image processor, the
//!   vision encoder and projector whose rows replace the `<|patch|>` embeddings).
//! - [`engine`]: the continuous-batching [`engine::Engine`] (plan → batch → forward → emit per
//!   step), with per-request sampling and stop rules; built on the CPU or a GPU by
//!   [`engine::device`]. `gpu` (feature `cuda`): the text model on one CUDA device.
//! - [`placement`]: which workers hold each routed expert (a serde value the coordinator owns).
//! - [`transport`]: the data plane's collectives (`all_to_all_v`, `barrier`): in-process, TCP
//!   (optional mTLS), NCCL. [`ep`]: the `ExpertExchange` over a transport.
//! - [`control`]: the one control vocabulary (`ToWorker` down, `FromWorker` up), for QUIC
//!   channels to coordinators and for a static group's stdin/stdout alike.
//! - [`runtime`]: a worker's agent (its side of the control channel), the group of each
//!   placement epoch, and the lockstep loop; both modes of `herd worker` run it.
//! - [`frontend`]: a checkpoint's config, tokenizer, chat template and generation defaults
//!   (no weights), and loading the model from it.
//! - [`quantize`], [`synth`]: `herd quantize` and random-weight checkpoints.
//!
//! A request on a worker: `ToWorker::Submit` → [`runtime::agent`] → the group's
//! [`runtime::lockstep`] loop hands it to the [`engine::Engine`] between steps → each step runs
//! [`model::text::TextModel::forward_with`] once over the batch on the paged [`kv_cache`]; at
//! every MoE layer the routed rows go through the group's [`ep::EpRunner`] over a
//! [`transport`] → each request's sampler and stop rules turn logits into tokens and text →
//! `FromWorker::Event`s go back up the link of the coordinator that sent the request.

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
