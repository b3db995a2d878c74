//! The Llama 4 text model (`Llama4TextModel` + lm_head): embeddings, decoder layers, final
//! norm, lm_head.
//!
//! One [`TextModel::forward`] call runs a batch of sequences, each contributing a run of new
//! tokens (a whole prompt, a prefill chunk, or one decode token) on top of its own KV cache.
//! All tokens of the batch share every matmul; attention runs per sequence over its own
//! history. Per decoder layer (`Llama4TextDecoderLayer`, pre-norm):
//! ```text
//! h += Attention(RMSNorm(h))     (model/attention.rs)
//! h += FFN(RMSNorm(h))           (MoE: model/moe.rs, or dense SwiGLU: model/mlp.rs)
//! ```

use super::ModelError;
use super::attention::{self, Attention, Positions};
use super::checkpoint::Checkpoint;
use super::config::{LayerSpec, ModelConfig, TextConfig};
use super::mlp::Mlp;
use super::moe::{ExpertExchange, ExpertSubset, MoeBlock};
use super::weights::{ComputeDtype, Weight, WeightLoader};
use crate::kv_cache::{DEFAULT_BLOCK_TOKENS, KvPool, SeqKv};
use herd_kernels::cpu::{matmul, norm, rope};
use std::collections::BTreeMap;
use std::path::Path;

/// Which positions of a sequence's new tokens need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    None,
    Last,
    All,
}

/// One sequence's part of a forward batch.
#[derive(Debug)]
pub struct SeqStep<'a> {
    /// New tokens; their positions continue from `kv.len()`.
    pub tokens: &'a [u32],
    /// The sequence's block tables in the pool passed to `forward`.
    pub kv: &'a mut SeqKv,
    pub logits: LogitsFor,
    /// Image feature rows that replace the embeddings of this step's image tokens.
    pub images: Option<ImageRows<'a>>,
}

/// Early fusion: the `k`-th `patch` token of a step takes row `k` of `rows` instead of its
/// embedding.
#[derive(Clone, Copy, Debug)]
pub struct ImageRows<'a> {
    pub patch: u32,
    /// `[patch tokens of the step, hidden]`
    pub rows: &'a [f32],
}

#[derive(Debug)]
enum FeedForward {
    Dense(Mlp),
    Moe(MoeBlock),
}

/// One decoder layer: attention and a feed-forward, each behind its RMSNorm.
#[derive(Debug)]
struct DecoderLayer {
    index: usize,
    spec: LayerSpec,
    input_norm: Vec<f32>,
    attn: Attention,
    post_norm: Vec<f32>,
    ffn: FeedForward,
    eps: f32,
}

impl DecoderLayer {
    /// Load the `layers.{index}` module `w` is scoped to; a MoE layer loads only the routed
    /// experts of `experts`.
    fn load(
        w: &WeightLoader<'_>,
        config: &TextConfig,
        index: usize,
        experts: ExpertSubset<'_>,
    ) -> Result<Self, ModelError> {
        let h = config.hidden_size;
        let spec = config.layers[index];
        let ffn = w.pp("feed_forward");
        let ffn = if spec.moe {
            FeedForward::Moe(MoeBlock::load(
                &ffn,
                h,
                config.intermediate_size,
                config.num_local_experts,
                config.num_experts_per_tok,
                experts,
            )?)
        } else {
            FeedForward::Dense(Mlp::load(&ffn, h, config.intermediate_size_mlp)?)
        };
        Ok(Self {
            index,
            spec,
            input_norm: w.vector_f32("input_layernorm.weight", h)?,
            attn: Attention::load(&w.pp("self_attn"), config, spec)?,
            post_norm: w.vector_f32("post_attention_layernorm.weight", h)?,
            ffn,
            eps: config.rms_norm_eps,
        })
    }

    /// `x`: `[tokens, hidden]`, the residual stream of every token of `batch`, updated in place.
    fn forward(
        &self,
        x: &mut [f32],
        pos: &Positions,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        exchange: Option<&mut dyn ExpertExchange>,
    ) -> Result<(), ModelError> {
        let h = self.input_norm.len();
        let mut a = vec![0.0f32; x.len()]; // [tokens, hidden]
        let mut o = vec![0.0f32; x.len()]; // [tokens, hidden]
        norm::rms_norm(x, h, Some(&self.input_norm), self.eps, &mut a);
        self.attn.forward(self.index, &a, pos, pool, batch, &mut o)?;
        add_into(x, &o);
        norm::rms_norm(x, h, Some(&self.post_norm), self.eps, &mut a);
        match &self.ffn {
            FeedForward::Dense(mlp) => mlp.forward(&a, &mut o),
            FeedForward::Moe(moe) => {
                moe.forward(self.index, &a, &mut o, exchange)?;
            }
        }
        add_into(x, &o);
        Ok(())
    }

    fn bytes(&self, moe_bytes: fn(&MoeBlock) -> usize) -> usize {
        let a = &self.attn;
        let ffn = match &self.ffn {
            FeedForward::Dense(m) => m.bytes(),
            FeedForward::Moe(m) => moe_bytes(m),
        };
        a.q.bytes() + a.k.bytes() + a.v.bytes() + a.o.bytes() + ffn
    }
}

/// The loaded text model.
#[derive(Debug)]
pub struct TextModel {
    config: TextConfig,
    compute: ComputeDtype,
    embed: Weight, // [vocab, hidden]
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    /// `None` when tied to the embedding.
    lm_head: Option<Weight>, // [vocab, hidden]
    rope: rope::RopeFreqs,
}

/// One decoder layer's weights, borrowed (for a backend that uploads them: the GPU engine).
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<'a> {
    pub spec: LayerSpec,
    pub input_norm: &'a [f32],
    pub post_norm: &'a [f32],
    pub q: &'a Weight,
    pub k: &'a Weight,
    pub v: &'a Weight,
    pub o: &'a Weight,
    pub ffn: FfnWeights<'a>,
}

#[derive(Clone, Copy, Debug)]
pub enum FfnWeights<'a> {
    Dense(&'a Mlp),
    Moe(&'a MoeBlock),
}

/// Where the text weights live for each architecture (transformers renamed the
/// multimodal prefix between versions, so every known spelling is tried).
const TEXT_SCOPES: [&str; 4] = ["language_model.model", "model.language_model", "model", ""];
const LM_HEAD_SCOPES: [&str; 2] = ["language_model.lm_head", "lm_head"];

impl TextModel {
    /// Load config and weights from a checkpoint directory.
    pub fn load(dir: &Path, compute: ComputeDtype) -> Result<Self, ModelError> {
        let config = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(&ckpt, &config.text, compute, None)
    }

    /// Build the model from a checkpoint. `local_experts` (MoE layer → experts) restricts the
    /// routed experts loaded, for an expert-parallel worker; `None` loads all of them.
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        config: &TextConfig,
        compute: ComputeDtype,
        local_experts: Option<&BTreeMap<usize, Vec<usize>>>,
    ) -> Result<Self, ModelError> {
        let root = WeightLoader::new(ckpt, compute);
        let w = TEXT_SCOPES.iter().map(|scope| root.pp(scope)).find(|w| w.contains("embed_tokens.weight")).ok_or_else(
            || ModelError::MissingTensor {
                name: "model.embed_tokens.weight (or language_model.model.embed_tokens.weight)".into(),
                dir: ckpt.dir().to_path_buf(),
            },
        )?;
        let (h, v) = (config.hidden_size, config.vocab_size);
        let embed = w.weight("embed_tokens.weight", &[v, h])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let experts = match local_experts {
                    None => ExpertSubset::All,
                    Some(map) => ExpertSubset::Only(map.get(&i).map_or(&[][..], Vec::as_slice)),
                };
                DecoderLayer::load(&w.pp("layers").pp(i), config, i, experts)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let norm = w.vector_f32("norm.weight", h)?;
        let lm_head = match LM_HEAD_SCOPES.iter().find(|n| root.pp(n).contains("weight")) {
            Some(name) => Some(root.linear(name, v, h)?),
            None if config.tie_word_embeddings => None,
            None => {
                return Err(ModelError::MissingTensor { name: "lm_head.weight".into(), dir: ckpt.dir().to_path_buf() });
            }
        };
        let rope = rope::RopeFreqs::new(config.head_dim, config.rope_theta, config.rope_scaling.as_ref());
        Ok(Self { config: config.clone(), compute, embed, layers, norm, lm_head, rope })
    }

    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    pub fn compute_dtype(&self) -> ComputeDtype {
        self.compute
    }

    /// The MoE block of `layer`, if that layer is a MoE layer.
    pub fn moe_block(&self, layer: usize) -> Option<&MoeBlock> {
        match &self.layers.get(layer)?.ffn {
            FeedForward::Moe(m) => Some(m),
            FeedForward::Dense(_) => None,
        }
    }

    /// Layer `i`'s weights.
    pub fn layer_weights(&self, i: usize) -> LayerWeights<'_> {
        let l = &self.layers[i];
        LayerWeights {
            spec: l.spec,
            input_norm: &l.input_norm,
            post_norm: &l.post_norm,
            q: &l.attn.q,
            k: &l.attn.k,
            v: &l.attn.v,
            o: &l.attn.o,
            ffn: match &l.ffn {
                FeedForward::Dense(m) => FfnWeights::Dense(m),
                FeedForward::Moe(m) => FfnWeights::Moe(m),
            },
        }
    }

    /// `(embedding [vocab, hidden], final norm [hidden], lm_head [vocab, hidden] or None when
    /// tied to the embedding)`.
    pub fn outer_weights(&self) -> (&Weight, &[f32], Option<&Weight>) {
        (&self.embed, &self.norm, self.lm_head.as_ref())
    }

    /// RoPE cos/sin tables for `positions`, `[tokens, head_dim / 2]` each.
    pub fn rope_table(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        self.rope.table(positions)
    }

    /// Query scale of NoPE layers with temperature tuning at position `p`.
    pub fn attn_temperature_at(&self, p: usize) -> f32 {
        attention::temperature(self.config.floor_scale, self.config.attn_scale, p)
    }

    /// A KV pool that grows on demand (tools and tests; the engine uses a budgeted pool).
    pub fn new_pool(&self) -> KvPool {
        KvPool::unbounded(&self.config.kv_layout(), DEFAULT_BLOCK_TOKENS)
    }

    /// Run new tokens of every sequence in `batch` with every expert in this process; returns
    /// each sequence's requested logits as `[rows, vocab]` (rows = 0, 1 or its token count,
    /// per [`LogitsFor`]).
    pub fn forward(&self, pool: &mut KvPool, batch: &mut [SeqStep<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        // Local experts never wait on a peer, so the step may hold a compute-pool thread.
        herd_kernels::cpu::parallel::on_pool(|| self.forward_with(pool, batch, None))
    }

    /// [`forward`](Self::forward), with the routed experts run through `exchange` when the
    /// model is one worker of an expert-parallel group (`None`: every expert is here). Every
    /// worker of a lockstep group calls this every step, with an empty batch if it has no work,
    /// so that the exchanges' collectives line up.
    pub fn forward_with(
        &self,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        mut exchange: Option<&mut dyn ExpertExchange>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let cfg = &self.config;
        let h = cfg.hidden_size;
        for step in batch.iter() {
            if let Some(&id) = step.tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                return Err(ModelError::TokenOutOfRange { id, vocab: cfg.vocab_size });
            }
        }
        let pos = Positions::of(batch, &self.rope);
        let total = pos.positions.len();

        let mut x = vec![0.0f32; total * h]; // [tokens, hidden]
        let embed = self.embed.matrix();
        let mut rows = x.chunks_exact_mut(h);
        for step in batch.iter() {
            let mut images = step.images.map(|im| (im.patch, im.rows.chunks_exact(h)));
            if let Some(im) = &step.images {
                let k = step.tokens.iter().filter(|&&t| t == im.patch).count();
                if im.rows.len() != k * h {
                    return Err(ModelError::ImageRows { patches: k, rows: im.rows.len() / h });
                }
            }
            for (&id, row) in step.tokens.iter().zip(&mut rows) {
                match &mut images {
                    Some((patch, feats)) if id == *patch => row.copy_from_slice(feats.next().expect("counted above")),
                    _ => embed.rows_range(id as usize, 1).elems.to_f32_into(row),
                }
            }
        }
        for layer in &self.layers {
            layer.forward(&mut x, &pos, pool, batch, exchange.as_mut().map(|e| &mut **e as _))?;
        }
        for step in batch.iter_mut() {
            step.kv.commit(step.tokens.len());
        }
        Ok(self.logits(&x, batch))
    }

    fn logits(&self, x: &[f32], batch: &[SeqStep<'_>]) -> Vec<Vec<f32>> {
        let cfg = &self.config;
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).matrix();
        let mut start = 0;
        let mut out = Vec::with_capacity(batch.len());
        for step in batch {
            let n = step.tokens.len();
            let rows = match step.logits {
                LogitsFor::None => start..start,
                LogitsFor::Last if n > 0 => start + n - 1..start + n,
                LogitsFor::Last => start..start,
                LogitsFor::All => start..start + n,
            };
            let mut normed = vec![0.0f32; rows.len() * h]; // [rows, hidden]
            norm::rms_norm(&x[rows.start * h..rows.end * h], h, Some(&self.norm), cfg.rms_norm_eps, &mut normed);
            let mut logits = vec![0.0f32; rows.len() * vocab]; // [rows, vocab]
            matmul::matmul_t(&normed, head, &mut logits);
            out.push(logits);
            start += n;
        }
        out
    }

    /// Bytes of all weights as held (mapped or owned).
    pub fn weight_bytes(&self) -> usize {
        self.layer_bytes(MoeBlock::bytes) + self.embed.bytes() + self.lm_head.as_ref().map_or(0, Weight::bytes)
    }

    /// Weight bytes one decoded token reads (attention, dense or shared + top-k experts,
    /// lm_head; the embedding contributes one row). This is the memory-bandwidth cost of a
    /// batch-1 decode step.
    pub fn active_bytes_per_token(&self) -> usize {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).bytes();
        self.layer_bytes(MoeBlock::active_bytes) + head + self.embed.bytes() / self.config.vocab_size
    }

    /// Decoder-layer weight bytes, counting each MoE block as `moe_bytes` says.
    fn layer_bytes(&self, moe_bytes: fn(&MoeBlock) -> usize) -> usize {
        self.layers.iter().map(|l| l.bytes(moe_bytes)).sum()
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
