//! The Llama 4 text model: embeddings, decoder layers, final norm, lm_head.
//!
//! One [`TextModel::forward`] call runs a batch of sequences, each contributing a run of new
//! tokens (a whole prompt, a prefill chunk, or one decode token) on top of its own KV cache.
//! All tokens of the batch share every matmul; attention runs per sequence over its own
//! history. Per layer (pre-norm):
//! ```text
//! a = RMSNorm(h);  q,k,v = a·Wq, a·Wk, a·Wv
//! RoPE layers: rotate q,k (interleaved pairs), then QK-norm if configured
//! NoPE layers: q ·= 1 + attn_scale·log1p(floor((p+1)/floor_scale)) if temperature tuning
//! h += Wo · attention(q, cache ∪ {k,v})       (chunked mask on RoPE layers, causal on NoPE)
//! h += FFN(RMSNorm(h))                         (MoE or dense SwiGLU)
//! ```

use super::ModelError;
use super::checkpoint::Checkpoint;
use super::config::{LayerAttention, LayerSpec, ModelConfig, TextConfig};
use super::mlp::Mlp;
use super::moe::{ExpertExchange, ExpertSubset, MoeBlock};
use super::weights::{ComputeDtype, Weight, WeightLoader};
use crate::kv_cache::{DEFAULT_BLOCK_TOKENS, KvPool, SeqKv};
use herd_kernels::cpu::attention::{self, AttnHeads, AttnMask};
use herd_kernels::cpu::{matmul, norm, rope};
use rayon::prelude::*;
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

#[derive(Debug)]
struct DecoderLayer {
    spec: LayerSpec,
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    q: Weight, // [q_heads · head_dim, hidden]
    k: Weight, // [kv_heads · head_dim, hidden]
    v: Weight, // [kv_heads · head_dim, hidden]
    o: Weight, // [hidden, q_heads · head_dim]
    ffn: FeedForward,
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
const TEXT_PREFIXES: [&str; 4] = ["language_model.model.", "model.language_model.", "model.", ""];
const LM_HEAD_PREFIXES: [&str; 2] = ["language_model.lm_head", "lm_head"];

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
        let w = WeightLoader::new(ckpt, compute);
        let prefix =
            TEXT_PREFIXES.iter().find(|p| ckpt.contains(&format!("{p}embed_tokens.weight"))).ok_or_else(|| {
                ModelError::MissingTensor {
                    name: "model.embed_tokens.weight (or language_model.model.embed_tokens.weight)".into(),
                    dir: ckpt.dir().to_path_buf(),
                }
            })?;
        let (h, v) = (config.hidden_size, config.vocab_size);
        let (qd, kvd) = (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim);
        let embed = w.weight(&format!("{prefix}embed_tokens.weight"), &[v, h])?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for (i, spec) in config.layers.iter().enumerate() {
            let p = format!("{prefix}layers.{i}");
            let ffn = if spec.moe {
                let subset = match local_experts {
                    None => ExpertSubset::All,
                    Some(map) => ExpertSubset::Only(map.get(&i).map_or(&[][..], Vec::as_slice)),
                };
                FeedForward::Moe(MoeBlock::load(
                    &w,
                    &format!("{p}.feed_forward"),
                    h,
                    config.intermediate_size,
                    config.num_local_experts,
                    config.num_experts_per_tok,
                    subset,
                )?)
            } else {
                FeedForward::Dense(Mlp::load(&w, &format!("{p}.feed_forward"), h, config.intermediate_size_mlp)?)
            };
            layers.push(DecoderLayer {
                spec: *spec,
                input_norm: w.vector_f32(&format!("{p}.input_layernorm.weight"), h)?,
                post_norm: w.vector_f32(&format!("{p}.post_attention_layernorm.weight"), h)?,
                q: w.linear(&format!("{p}.self_attn.q_proj"), qd, h)?,
                k: w.linear(&format!("{p}.self_attn.k_proj"), kvd, h)?,
                v: w.linear(&format!("{p}.self_attn.v_proj"), kvd, h)?,
                o: w.linear(&format!("{p}.self_attn.o_proj"), h, qd)?,
                ffn,
            });
        }
        let norm = w.vector_f32(&format!("{prefix}norm.weight"), h)?;
        let lm_head = match LM_HEAD_PREFIXES.iter().find(|n| ckpt.contains(&format!("{n}.weight"))) {
            Some(name) => Some(w.linear(name, v, h)?),
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
            q: &l.q,
            k: &l.k,
            v: &l.v,
            o: &l.o,
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
        self.attn_temperature(p)
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
        let positions: Vec<usize> = batch.iter().flat_map(|s| s.kv.len()..s.kv.len() + s.tokens.len()).collect();
        let total = positions.len();

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
        let (cos, sin) = self.rope.table(&positions);
        for (li, layer) in self.layers.iter().enumerate() {
            self.layer_forward(
                li,
                layer,
                &mut x,
                &positions,
                &cos,
                &sin,
                pool,
                batch,
                exchange.as_mut().map(|e| &mut **e as _),
            )?;
        }
        for step in batch.iter_mut() {
            step.kv.commit(step.tokens.len());
        }
        Ok(self.logits(&x, batch))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        li: usize,
        layer: &DecoderLayer,
        x: &mut [f32],
        positions: &[usize],
        cos: &[f32],
        sin: &[f32],
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        exchange: Option<&mut dyn ExpertExchange>,
    ) -> Result<(), ModelError> {
        let cfg = &self.config;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let total = positions.len();
        let eps = cfg.rms_norm_eps;

        let mut a = vec![0.0f32; total * h]; // [tokens, hidden]
        norm::rms_norm(x, h, Some(&layer.input_norm), eps, &mut a);
        let mut q = vec![0.0f32; total * nq * d]; // [tokens, q_heads, head_dim]
        let mut k = vec![0.0f32; total * nkv * d]; // [tokens, kv_heads, head_dim]
        let mut v = vec![0.0f32; total * nkv * d];
        matmul::matmul_t_many(
            &a,
            &mut [(layer.q.matrix(), &mut q), (layer.k.matrix(), &mut k), (layer.v.matrix(), &mut v)],
        );
        let spec = layer.spec;
        if spec.uses_rope {
            rope::apply_rope(&mut q, nq, d, cos, sin);
            rope::apply_rope(&mut k, nkv, d, cos, sin);
        }
        if spec.qk_norm {
            norm::rms_norm_in_place(&mut q, d, eps);
            norm::rms_norm_in_place(&mut k, d, eps);
        }
        if spec.temperature_tuning {
            for (qt, &p) in q.chunks_exact_mut(nq * d).zip(positions) {
                let tau = self.attn_temperature(p);
                qt.iter_mut().for_each(|v| *v *= tau);
            }
        }
        let mask = match (spec.attention, cfg.attention_chunk_size) {
            (LayerAttention::Chunked, Some(chunk)) => AttnMask::Chunked { chunk },
            _ => AttnMask::Causal,
        };
        let heads = AttnHeads { q_heads: nq, kv_heads: nkv, head_dim: d };
        let scale = (d as f64).powf(-0.5) as f32;
        let kv_row = nkv * d;
        let mut start = 0;
        for step in batch.iter_mut() {
            let n = step.tokens.len();
            let keep_from = mask.first_key(step.kv.len());
            let (k, v) = (&k[start * kv_row..(start + n) * kv_row], &v[start * kv_row..(start + n) * kv_row]);
            pool.append(step.kv, li, k, v, keep_from).map_err(ModelError::KvCache)?;
            start += n;
        }
        // Attention runs per sequence; sequences are independent, so a decode batch spreads
        // over cores by sequence (each one alone has too little work to split).
        let mut attn = vec![0.0f32; total * nq * d]; // [tokens, q_heads, head_dim]
        let pool: &KvPool = pool;
        let mut jobs = Vec::with_capacity(batch.len());
        let (mut rest, mut start) = (attn.as_mut_slice(), 0);
        for step in batch.iter() {
            let n = step.tokens.len();
            let (out, tail) = rest.split_at_mut(n * nq * d);
            rest = tail;
            jobs.push((start, n, pool.history(step.kv, li, n), out));
            start += n;
        }
        let run = |(start, n, history, out): (usize, usize, _, &mut [f32])| {
            if n > 0 {
                let q = &q[start * nq * d..(start + n) * nq * d];
                attention::attention(q, &positions[start..start + n], history, heads, scale, mask, out);
            }
        };
        if jobs.len() > 1 {
            jobs.into_par_iter().for_each(run)
        } else {
            jobs.into_iter().for_each(run)
        }
        let mut o = vec![0.0f32; total * h]; // [tokens, hidden]
        matmul::matmul_t(&attn, layer.o.matrix(), &mut o);
        add_into(x, &o);

        norm::rms_norm(x, h, Some(&layer.post_norm), eps, &mut a);
        match &layer.ffn {
            FeedForward::Dense(mlp) => mlp.forward(&a, &mut o),
            FeedForward::Moe(moe) => {
                moe.forward(li, &a, &mut o, exchange)?;
            }
        }
        add_into(x, &o);
        Ok(())
    }

    /// Query scale of NoPE layers at absolute position `p`, in f32 as transformers computes it.
    fn attn_temperature(&self, p: usize) -> f32 {
        let cfg = &self.config;
        ((p as f32 + 1.0) / cfg.floor_scale).floor().ln_1p() * cfg.attn_scale + 1.0
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
        let ffn = |f: &FeedForward| match f {
            FeedForward::Dense(m) => m.bytes(),
            FeedForward::Moe(m) => moe_bytes(m),
        };
        self.layers.iter().map(|l| l.q.bytes() + l.k.bytes() + l.v.bytes() + l.o.bytes() + ffn(&l.ffn)).sum()
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
