//! Llama 4 self-attention (`Llama4TextAttention`): q/k/v projections, RoPE or NoPE, QK-norm,
//! temperature tuning, the paged KV cache, grouped-query attention under a chunked or causal
//! mask, and the output projection.
//!
//! ```text
//! q, k, v = a·Wqᵀ, a·Wkᵀ, a·Wvᵀ
//! RoPE layer:  rotate q, k on interleaved pairs; then weightless RMS QK-norm if configured
//! NoPE layer:  q *= 1 + attn_scale · log1p(floor((pos+1)/floor_scale))   (temperature tuning)
//! append k, v to the layer's cache; attend (chunked mask on chunked layers, causal on full)
//! out = attn · Woᵀ
//! ```
//! Keys are cached after RoPE and QK-norm; temperature tuning touches only queries.

use super::ModelError;
use super::config::{LayerAttention, LayerSpec, TextConfig};
use super::text::SeqStep;
use super::weights::{Weight, WeightLoader};
use crate::kv_cache::KvPool;
use herd_kernels::cpu::attention::{self, AttnHeads, AttnMask};
use herd_kernels::cpu::{matmul, norm, rope};
use rayon::prelude::*;

/// What every decoder layer of one forward pass shares: each token's absolute position, in
/// batch order, and its RoPE tables.
#[derive(Debug)]
pub struct Positions {
    pub positions: Vec<usize>,
    pub cos: Vec<f32>, // [tokens, head_dim / 2]
    pub sin: Vec<f32>, // [tokens, head_dim / 2]
}

impl Positions {
    /// The positions of `batch`'s new tokens (each sequence continues from its cache length).
    pub fn of(batch: &[SeqStep<'_>], rope: &rope::RopeFreqs) -> Self {
        let positions: Vec<usize> = batch.iter().flat_map(|s| s.kv.len()..s.kv.len() + s.tokens.len()).collect();
        let (cos, sin) = rope.table(&positions);
        Self { positions, cos, sin }
    }
}

/// One decoder layer's attention.
#[derive(Debug)]
pub struct Attention {
    pub(crate) q: Weight, // [q_heads · head_dim, hidden]
    pub(crate) k: Weight, // [kv_heads · head_dim, hidden]
    pub(crate) v: Weight, // [kv_heads · head_dim, hidden]
    pub(crate) o: Weight, // [hidden, q_heads · head_dim]
    spec: LayerSpec,
    heads: AttnHeads,
    mask: AttnMask,
    eps: f32,
    floor_scale: f32,
    attn_scale: f32,
}

impl Attention {
    /// Load the `self_attn` module `w` is scoped to.
    pub fn load(w: &WeightLoader<'_>, config: &TextConfig, spec: LayerSpec) -> Result<Self, ModelError> {
        let h = config.hidden_size;
        let heads = AttnHeads {
            q_heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
        };
        let (qd, kvd) = (heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
        let mask = match (spec.attention, config.attention_chunk_size) {
            (LayerAttention::Chunked, Some(chunk)) => AttnMask::Chunked { chunk },
            _ => AttnMask::Causal,
        };
        Ok(Self {
            q: w.linear("q_proj", qd, h)?,
            k: w.linear("k_proj", kvd, h)?,
            v: w.linear("v_proj", kvd, h)?,
            o: w.linear("o_proj", h, qd)?,
            spec,
            heads,
            mask,
            eps: config.rms_norm_eps,
            floor_scale: config.floor_scale,
            attn_scale: config.attn_scale,
        })
    }

    /// `a`: `[tokens, hidden]`, the normed rows of every sequence of `batch` in order → `out`
    /// `[tokens, hidden]`. Appends each sequence's new keys and values to layer `layer` of its
    /// cache, then attends over that history.
    pub fn forward(
        &self,
        layer: usize,
        a: &[f32],
        pos: &Positions,
        pool: &mut KvPool,
        batch: &mut [SeqStep<'_>],
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let AttnHeads { q_heads: nq, kv_heads: nkv, head_dim: d } = self.heads;
        let total = pos.positions.len();
        let mut q = vec![0.0f32; total * nq * d]; // [tokens, q_heads, head_dim]
        let mut k = vec![0.0f32; total * nkv * d]; // [tokens, kv_heads, head_dim]
        let mut v = vec![0.0f32; total * nkv * d];
        matmul::matmul_t_many(
            a,
            &mut [(self.q.matrix(), &mut q), (self.k.matrix(), &mut k), (self.v.matrix(), &mut v)],
        );
        if self.spec.uses_rope {
            rope::apply_rope(&mut q, nq, d, &pos.cos, &pos.sin);
            rope::apply_rope(&mut k, nkv, d, &pos.cos, &pos.sin);
        }
        if self.spec.qk_norm {
            norm::rms_norm_in_place(&mut q, d, self.eps);
            norm::rms_norm_in_place(&mut k, d, self.eps);
        }
        if self.spec.temperature_tuning {
            for (qt, &p) in q.chunks_exact_mut(nq * d).zip(&pos.positions) {
                let tau = self.temperature(p);
                qt.iter_mut().for_each(|v| *v *= tau);
            }
        }
        let kv_row = nkv * d;
        let mut start = 0;
        for step in batch.iter_mut() {
            let n = step.tokens.len();
            let keep_from = self.mask.first_key(step.kv.len());
            let (k, v) = (&k[start * kv_row..(start + n) * kv_row], &v[start * kv_row..(start + n) * kv_row]);
            pool.append(step.kv, layer, k, v, keep_from).map_err(ModelError::KvCache)?;
            start += n;
        }
        let attn = self.attend(layer, &q, pos, pool, batch);
        matmul::matmul_t(&attn, self.o.matrix(), out);
        Ok(())
    }

    /// Attention per sequence over its cached history: `[tokens, q_heads, head_dim]`.
    /// Sequences are independent, so a decode batch spreads over cores by sequence (each one
    /// alone has too little work to split).
    fn attend(&self, layer: usize, q: &[f32], pos: &Positions, pool: &KvPool, batch: &[SeqStep<'_>]) -> Vec<f32> {
        let AttnHeads { q_heads: nq, head_dim: d, .. } = self.heads;
        let scale = (d as f64).powf(-0.5) as f32;
        let mut attn = vec![0.0f32; pos.positions.len() * nq * d]; // [tokens, q_heads, head_dim]
        let mut jobs = Vec::with_capacity(batch.len());
        let (mut rest, mut start) = (attn.as_mut_slice(), 0);
        for step in batch {
            let n = step.tokens.len();
            let (out, tail) = rest.split_at_mut(n * nq * d);
            rest = tail;
            jobs.push((start, n, pool.history(step.kv, layer, n), out));
            start += n;
        }
        let run = |(start, n, history, out): (usize, usize, _, &mut [f32])| {
            if n > 0 {
                let q = &q[start * nq * d..(start + n) * nq * d];
                attention::attention(q, &pos.positions[start..start + n], history, self.heads, scale, self.mask, out);
            }
        };
        if jobs.len() > 1 {
            jobs.into_par_iter().for_each(run)
        } else {
            jobs.into_iter().for_each(run)
        }
        attn
    }

    /// Query scale of a NoPE layer with temperature tuning at absolute position `p`, in f32 as
    /// transformers computes it.
    pub fn temperature(&self, p: usize) -> f32 {
        temperature(self.floor_scale, self.attn_scale, p)
    }
}

/// `1 + attn_scale · log1p(floor((p + 1) / floor_scale))`.
pub fn temperature(floor_scale: f32, attn_scale: f32, p: usize) -> f32 {
    ((p as f32 + 1.0) / floor_scale).floor().ln_1p() * attn_scale + 1.0
}
