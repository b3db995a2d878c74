//! The engine of one worker: continuous batching over a paged KV cache.
//!
//! Requests wait in a FIFO queue until the pool can hold their worst case (prompt plus
//! `max_tokens`, see [`KvPool::blocks_for`]); admission reserves those blocks, so a running
//! request never runs out of cache and nothing is ever preempted. A request that could not
//! fit even in an empty cache is rejected at submission.
//!
//! Every [`Engine::step`] runs one forward pass over a batch built under a token budget:
//! first one token for every request that is decoding (latency first), then prompt chunks
//! for requests still prefilling, in arrival order, until the budget is spent. Requests join
//! and leave between steps. Each request has its own sampler, stop rules and stream
//! decoder; kernels are batch-invariant, so a request's tokens do not depend on what else
//! was in its batches.

use super::logprobs::token_logprobs;
use super::request::{AbortReason, Event, Rejection, Request, RequestId};
use super::sampler::Sampler;
use super::stop::{StopChecker, StopReason};
use crate::kv_cache::{KvError, KvPool, SeqKv};
use crate::model::ModelError;
use crate::model::moe::ExpertExchange;
use crate::model::text::{ImageRows, LogitsFor, SeqStep, TextModel};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::vision::encoder::VisionModel;
use herd_kernels::cpu::activation::argmax;
use std::collections::VecDeque;
use std::sync::Arc;

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

#[cfg(feature = "cuda")]
struct GpuBackend {
    model: Arc<crate::gpu::GpuTextModel>,
    kv: crate::gpu::model::GpuKv,
}

#[cfg(feature = "cuda")]
impl GpuBackend {
    fn forward(
        &mut self,
        pool: &mut KvPool,
        steps: &mut [SeqStep<'_>],
        exchange: Option<&mut dyn ExpertExchange>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        Ok(self.model.forward(&mut self.kv, pool, steps, exchange)?)
    }
}

/// Without the `cuda` feature there is no GPU backend: an uninhabited type keeps the engine's
/// code the same in both builds.
#[cfg(not(feature = "cuda"))]
enum GpuBackend {}

#[cfg(not(feature = "cuda"))]
impl GpuBackend {
    fn forward(
        &mut self,
        _: &mut KvPool,
        _: &mut [SeqStep<'_>],
        _: Option<&mut dyn ExpertExchange>,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        match *self {}
    }
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

    /// Share of the KV pool reserved by running requests.
    pub fn kv_usage(&self) -> f64 {
        self.reserved as f64 / self.pool.total_blocks().unwrap_or(1).max(1) as f64
    }

    /// Events produced outside a step (cancellations) and not yet taken.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Run one step with local experts, on a thread of the compute pool (see
    /// [`on_pool`](herd_kernels::cpu::parallel::on_pool): no step of local experts waits on a peer).
    pub fn step(&mut self) -> Result<(Vec<Event>, StepStats), EngineError> {
        herd_kernels::cpu::parallel::on_pool(|| self.step_inner(None))
    }

    /// Run one step as a worker of an expert-parallel group, whose routed experts run through
    /// `exchange`. The exchange joins collectives, so every worker of the group calls this
    /// every step, with or without work.
    pub fn step_with(&mut self, exchange: &mut dyn ExpertExchange) -> Result<(Vec<Event>, StepStats), EngineError> {
        self.step_inner(Some(exchange))
    }

    fn step_inner(
        &mut self,
        exchange: Option<&mut dyn ExpertExchange>,
    ) -> Result<(Vec<Event>, StepStats), EngineError> {
        self.admit();
        let plan = self.plan();
        self.encode_images(&plan);
        let mut stats = StepStats { sequences: plan.len(), ..StepStats::default() };
        // What each planned sequence feeds and which logits it needs.
        let inputs: Vec<(Vec<u32>, LogitsFor)> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                if s.decoding() {
                    stats.decode_tokens += 1;
                    (vec![s.last.unwrap_or(0)], LogitsFor::Last)
                } else {
                    stats.prefill_tokens += n;
                    let completes = s.prefilled + n == s.req.prompt.len();
                    let logits = match (s.req.prompt_logits, completes) {
                        (true, _) => LogitsFor::All,
                        (false, true) => LogitsFor::Last,
                        (false, false) => LogitsFor::None,
                    };
                    (s.req.prompt[s.prefilled..s.prefilled + n].to_vec(), logits)
                }
            })
            .collect();
        let patch_token = self.vision.as_ref().map(|v| v.patch_token);
        let hidden = self.model.config().hidden_size;
        // Each prefill chunk's share of its sequence's image rows: its own `<|patch|>` tokens.
        let image_spans: Vec<Option<(usize, usize)>> = plan
            .iter()
            .zip(&inputs)
            .map(|(&(i, _), (tokens, _))| {
                let s = &self.running[i];
                let patch = patch_token.filter(|_| !s.decoding() && !s.image_rows.is_empty())?;
                let k = tokens.iter().filter(|&&t| t == patch).count();
                Some((s.patches_run, k))
            })
            .collect();
        let logits = {
            let mut seqs: Vec<Option<&mut Seq>> = self.running.iter_mut().map(Some).collect();
            let mut steps: Vec<SeqStep<'_>> = plan
                .iter()
                .zip(&inputs)
                .zip(&image_spans)
                .map(|((&(i, _), (tokens, logits)), span)| {
                    let s = seqs[i].take().expect("plan names each sequence once");
                    let images = match (span, patch_token) {
                        (Some((first, k)), Some(patch)) => {
                            Some(ImageRows { patch, rows: &s.image_rows[first * hidden..(first + k) * hidden] })
                        }
                        _ => None,
                    };
                    SeqStep { tokens, kv: &mut s.kv, logits: *logits, images }
                })
                .collect();
            match self.gpu.as_mut() {
                Some(g) => g.forward(&mut self.pool, &mut steps, exchange)?,
                None => self.model.forward_with(&mut self.pool, &mut steps, exchange)?,
            }
        };
        for (&(i, _), span) in plan.iter().zip(&image_spans) {
            if let Some((_, k)) = span {
                self.running[i].patches_run += k;
            }
        }
        let vocab = self.model.config().vocab_size;
        let mut finished = Vec::new();
        for (&(i, n), rows) in plan.iter().zip(logits) {
            let s = &mut self.running[i];
            let was_decoding = s.decoding();
            if !was_decoding {
                if s.req.prompt_logits {
                    s.prompt_argmax.extend(rows.chunks_exact(vocab).map(|r| argmax(r) as u32));
                }
                s.prefilled += n;
                if !s.decoding() {
                    continue;
                }
                if s.req.prompt_logits {
                    let last = rows[rows.len() - vocab..].to_vec();
                    let argmax = std::mem::take(&mut s.prompt_argmax);
                    self.events.push(Event::PromptLogits { id: s.req.id, argmax, last_logits: last });
                }
            }
            let raw = &rows[rows.len() - vocab..];
            let mut last = raw.to_vec();
            let token = s.sampler.sample(&mut last);
            let logprobs = s.req.params.logprobs.map(|top| token_logprobs(raw, token, top as usize));
            s.sampler.accept(token);
            s.last = Some(token);
            s.generated += 1;
            let delta = s.detok.push(&self.tokenizer, token).unwrap_or_default();
            let (mut text, reason) = s.stop.push(token, &delta);
            if reason == Some(StopReason::MaxTokens) {
                // A length stop can cut a multi-byte character; show what was decoded.
                text.push_str(&s.detok.flush(&self.tokenizer).unwrap_or_default());
            }
            self.events.push(Event::Token { id: s.req.id, token, text, logprobs });
            if let Some(reason) = reason {
                self.events.push(Event::Finished {
                    id: s.req.id,
                    reason,
                    prompt_tokens: s.req.prompt.len(),
                    completion_tokens: s.generated,
                });
                finished.push(i);
            }
        }
        for &i in finished.iter().rev() {
            let mut seq = self.running.remove(i);
            self.free(&mut seq);
        }
        Ok((self.take_events(), stats))
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

    /// Run the vision encoder for planned sequences that start prefilling with images. The
    /// encoder runs here, on the worker that owns the sequence, outside the lockstep forward.
    fn encode_images(&mut self, plan: &[(usize, usize)]) {
        let Some(vision) = self.vision.as_ref().map(|v| Arc::clone(&v.model)) else { return };
        for &(i, _) in plan {
            let s = &mut self.running[i];
            if s.req.images.is_empty() || !s.image_rows.is_empty() || s.decoding() {
                continue;
            }
            let pixels: Vec<half::bf16> = s.req.images.iter().flat_map(|pv| pv.values.iter().copied()).collect();
            s.image_rows = vision.forward(&pixels); // [patch tokens, hidden]
        }
    }

    /// `(running index, tokens)` for this step: decodes first, then prefill chunks.
    fn plan(&self) -> Vec<(usize, usize)> {
        let mut budget = self.config.max_step_tokens;
        let mut plan = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if s.decoding() && budget > 0 {
                plan.push((i, 1));
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            if !s.decoding() && budget > 0 {
                let n = (s.req.prompt.len() - s.prefilled).min(budget);
                plan.push((i, n));
                budget -= n;
            }
        }
        plan
    }
}
