//! Running the model: the continuous-batching engine of one worker.
//!
//! Requests wait in a FIFO queue until the pool can hold their worst case (prompt plus
//! `max_tokens`, see [`KvPool::blocks_for`]); admission reserves those blocks, so a running
//! request never runs out of cache and nothing is ever preempted. A request that could not
//! fit even in an empty cache is rejected at submission.
//!
//! Every [`Engine::step`] runs one forward pass over a batch built under a token budget
//! (`step.rs`: plan → batch → forward → emit): first one token for every request that is
//! decoding (latency first), then prompt chunks for requests still prefilling, in arrival
//! order, until the budget is spent. Requests join and leave between steps. Each request has
//! its own [`sampler`], [`stop`] rules and stream decoder; kernels are batch-invariant, so a
//! request's tokens do not depend on what else was in its batches. [`logprobs`] reports what
//! the model thought of each token; [`device`] builds an engine on the CPU or a CUDA GPU.
//!
//! [`request`] holds what goes in (`Request`) and what comes out (`Event`, `AbortReason`).

pub mod device;
pub mod logprobs;
pub mod request;
pub mod sampler;
mod step;
pub mod stop;

use crate::kv_cache::{KvError, KvPool, SeqKv};
use crate::model::ModelError;
use crate::model::text::TextModel;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::vision::encoder::VisionModel;
use device::GpuBackend;
use request::{AbortReason, Event, Rejection, Request, RequestId};
use sampler::Sampler;
use std::collections::VecDeque;
use std::sync::Arc;
use stop::StopChecker;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Device(#[from] herd_kernels::device::DeviceError),
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
}

/// Engine limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Bytes of the KV cache pool.
    pub kv_cache_bytes: usize,
    /// Positions per KV block.
    pub block_tokens: usize,
    /// Most tokens (decode + prefill) in one step.
    pub max_step_tokens: usize,
    /// Most requests running at once.
    pub max_running: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_cache_bytes: 1 << 30,
            block_tokens: crate::kv_cache::DEFAULT_BLOCK_TOKENS,
            max_step_tokens: 512,
            max_running: 256,
        }
    }
}

/// Counts of one step, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepStats {
    pub decode_tokens: usize,
    pub prefill_tokens: usize,
    pub sequences: usize,
}

/// How busy an engine is: what heartbeats report and the API's gauges show.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Load {
    pub running: usize,
    pub waiting: usize,
    /// Share of the KV cache reserved by running requests, 0..=1.
    pub kv_usage: f64,
}

#[derive(Debug)]
struct Seq {
    req: Request,
    kv: SeqKv,
    /// Prompt tokens already run.
    prefilled: usize,
    /// The last sampled token, fed in the next step.
    last: Option<u32>,
    generated: usize,
    sampler: Sampler,
    stop: StopChecker,
    detok: StreamDecoder,
    reserved: usize,
    /// Per-position argmax of the prompt so far (with `prompt_logits`).
    prompt_argmax: Vec<u32>,
    /// `[patch tokens, hidden]` feature rows of the request's images, computed by the vision
    /// encoder just before the first prefill chunk (empty without images).
    image_rows: Vec<f32>,
    /// `<|patch|>` tokens among the prompt tokens already run.
    patches_run: usize,
}

impl Seq {
    fn decoding(&self) -> bool {
        self.prefilled == self.req.prompt.len()
    }
}

/// The vision tower and the prompt token its rows replace.
struct Vision {
    model: Arc<VisionModel>,
    patch_token: u32,
}

/// One worker's engine.
pub struct Engine {
    model: Arc<TextModel>,
    vision: Option<Vision>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    config: EngineConfig,
    pool: KvPool,
    /// The model on a CUDA device: the forward pass runs there, with the KV data on the device
    /// and `pool` keeping only its block tables.
    gpu: Option<GpuBackend>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    reserved: usize,
    events: Vec<Event>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .field("reserved_blocks", &self.reserved)
            .finish()
    }
}

impl Engine {
    pub fn new(
        model: Arc<TextModel>,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let pool = KvPool::new(&model.config().kv_layout(), config.kv_cache_bytes, config.block_tokens)?;
        Ok(Self::with_pool(model, tokenizer, eos, config, pool))
    }

    fn with_pool(
        model: Arc<TextModel>,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        config: EngineConfig,
        pool: KvPool,
    ) -> Self {
        Self {
            model,
            vision: None,
            tokenizer,
            eos,
            config,
            pool,
            gpu: None,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
            events: Vec::new(),
        }
    }

    /// An engine whose forward passes run on the GPU model `gpu` (uploaded from `model`, which
    /// still answers config and vocabulary questions). The KV cache of `config.kv_cache_bytes`
    /// is allocated on the device (it must fit in free device memory); the host pool keeps
    /// only the block tables.
    #[cfg(feature = "cuda")]
    pub fn on_gpu(
        model: Arc<TextModel>,
        gpu: Arc<crate::gpu::GpuTextModel>,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let kv = crate::gpu::model::GpuKv::new(gpu.gpu(), model.config(), config.kv_cache_bytes)?;
        let pool = kv.pool(model.config());
        let config = EngineConfig { block_tokens: pool.block_tokens(), ..config };
        let mut engine = Self::with_pool(model, tokenizer, eos, config, pool);
        engine.gpu = Some(GpuBackend { model: gpu, kv });
        Ok(engine)
    }

    pub fn model(&self) -> &TextModel {
        &self.model
    }

    /// Accept image requests: `vision` encodes their tiles on this worker, and its rows replace
    /// the embeddings of `patch_token` (config.json's `image_token_index`).
    pub fn enable_vision(&mut self, vision: Arc<VisionModel>, patch_token: u32) {
        self.vision = Some(Vision { model: vision, patch_token });
    }

    /// Check a request's images against the prompt's `<|patch|>` tokens.
    fn check_images(&self, req: &Request) -> Result<(), Rejection> {
        if req.images.is_empty() {
            return Ok(());
        }
        let vision = self.vision.as_ref().ok_or(Rejection::NoVision)?;
        let c = vision.model.config();
        let mut features = 0;
        for (index, pv) in req.images.iter().enumerate() {
            let tile_len = 3 * c.image_size * c.image_size;
            let tiles = pv.grid.0 * pv.grid.1 + usize::from(pv.has_global_tile());
            if pv.tile != c.image_size || pv.values.len() != tiles * tile_len {
                let message = format!(
                    "pixel values of {} elements for a {:?} grid of {} px tiles; the vision tower takes {} px tiles",
                    pv.values.len(),
                    pv.grid,
                    pv.tile,
                    c.image_size
                );
                return Err(Rejection::BadImage { index, message });
            }
            features += tiles * c.tokens_per_tile();
        }
        let patches = req.prompt.iter().filter(|&&t| t == vision.patch_token).count();
        if patches != features {
            return Err(Rejection::ImageTokens { patches, features });
        }
        Ok(())
    }

    /// Queue a request, or refuse it now if it can never run.
    pub fn submit(&mut self, req: Request) -> Result<(), Rejection> {
        req.params.validate()?;
        if req.prompt.is_empty() {
            return Err(Rejection::EmptyPrompt);
        }
        let vocab = self.model.config().vocab_size;
        if let Some(&id) = req.prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(Rejection::TokenOutOfRange { id, vocab });
        }
        if self.waiting.iter().chain(&self.running).any(|s| s.req.id == req.id) {
            return Err(Rejection::DuplicateId(req.id));
        }
        self.check_images(&req)?;
        let tokens = req.prompt.len() + req.params.max_tokens;
        let need = self.pool.blocks_for(tokens, self.config.max_step_tokens);
        let total = self.pool.total_blocks().unwrap_or(usize::MAX);
        if need > total {
            return Err(Rejection::TooLarge { need, total, tokens });
        }
        let seq = Seq {
            kv: self.pool.new_seq(),
            prefilled: 0,
            last: None,
            generated: 0,
            sampler: Sampler::new(&req.params, &req.prompt),
            stop: StopChecker::new(&req.params, &self.eos),
            detok: StreamDecoder::new(true),
            reserved: need,
            prompt_argmax: Vec::new(),
            image_rows: Vec::new(),
            patches_run: 0,
            req,
        };
        self.waiting.push_back(seq);
        Ok(())
    }

    /// Stop a request at the next step boundary; its `Aborted` event comes from that step.
    /// Returns false if the id is unknown (already finished).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(pos) = self.waiting.iter().position(|s| s.req.id == id) {
            self.waiting.remove(pos);
            self.events.push(Event::Aborted { id, reason: AbortReason::Cancelled });
            return true;
        }
        if let Some(pos) = self.running.iter().position(|s| s.req.id == id) {
            let mut seq = self.running.remove(pos);
            self.free(&mut seq);
            self.events.push(Event::Aborted { id, reason: AbortReason::Cancelled });
            return true;
        }
        false
    }

    /// Whether a step would do anything (requests waiting or running, or events to deliver).
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn load(&self) -> Load {
        Load { running: self.running(), waiting: self.waiting(), kv_usage: self.kv_usage() }
    }

    /// Share of the KV pool reserved by running requests.
    pub fn kv_usage(&self) -> f64 {
        self.reserved as f64 / self.pool.total_blocks().unwrap_or(1).max(1) as f64
    }

    /// Events produced outside a step (cancellations) and not yet taken.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// End every request with `reason` (after a fatal failure such as a lost peer).
    pub fn abort_all(&mut self, reason: &AbortReason) -> Vec<Event> {
        let mut events = self.take_events();
        let mut all: Vec<Seq> = self.waiting.drain(..).collect();
        all.append(&mut self.running);
        for mut seq in all {
            self.pool.release(&mut seq.kv);
            events.push(Event::Aborted { id: seq.req.id, reason: reason.clone() });
        }
        self.reserved = 0;
        events
    }

    fn free(&mut self, seq: &mut Seq) {
        self.pool.release(&mut seq.kv);
        self.reserved -= seq.reserved;
    }

    /// Move waiting requests into the running set, in order, while their reservation fits.
    fn admit(&mut self) {
        let total = self.pool.total_blocks().unwrap_or(usize::MAX);
        while let Some(next) = self.waiting.front() {
            if self.running.len() >= self.config.max_running || self.reserved + next.reserved > total {
                break;
            }
            let seq = self.waiting.pop_front().expect("front exists");
            self.reserved += seq.reserved;
            self.running.push(seq);
        }
    }
}
