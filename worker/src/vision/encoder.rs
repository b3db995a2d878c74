//! The Llama 4 vision encoder, its pixel-shuffle adapter and the multimodal projector: tiles of
//! pixel values in, text-space feature rows (one per `<|patch|>` token) out.
//!
//! Per tile (grid g = image_size / patch_size, n = g² patches):
//! ```text
//! unfold P×P patches (channel-major) · W_patch        → [n, hidden]
//! append the class token LAST, add positional_embedding_vlm, layernorm_pre → [n+1, hidden]
//! layers: x += o(attn(rope2d(q), rope2d(k), v)(LN1 x));  x += fc2(gelu(fc1(LN2 x)))
//!         (bidirectional, biases everywhere, exact-erf GELU)
//! layernorm_post, drop the class token                  → [n, hidden]
//! pixel shuffle 0.5                                     → [n/4, 4·hidden]
//! adapter: gelu(fc2(gelu(fc1 x)))                        → [n/4, projector]
//! multi_modal_projector.linear_1                        → [n/4, text hidden]
//! ```
//! 2D RoPE rotates interleaved pairs: the first half of a head's pairs by (col + 1)·ω, the
//! second half by (row + 1)·ω, ω_m = θ^(−2m / (head_dim / 2)); the class token is not rotated.

use super::config::VisionConfig;
use crate::model::ModelError;
use crate::model::checkpoint::Checkpoint;
use crate::model::weights::{ComputeDtype, Weight, WeightLoader};
use half::bf16;
use herd_kernels::cpu::attention::{self, AttnHeads, AttnMask, KvHistory};
use herd_kernels::cpu::matmul;

const TOWER: &str = "vision_model";
const PROJECTOR: &str = "multi_modal_projector.linear_1.weight";

#[derive(Debug)]
struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl LayerNorm {
    fn load(w: &WeightLoader<'_>, dim: usize) -> Result<Self, ModelError> {
        Ok(Self { weight: w.vector_f32("weight", dim)?, bias: w.vector_f32("bias", dim)? })
    }

    /// nn.LayerNorm over rows of `x`, biased variance, into `out`.
    fn forward(&self, x: &[f32], eps: f32, out: &mut [f32]) {
        let dim = self.weight.len();
        for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / dim as f64;
            let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (var + f64::from(eps)).sqrt();
            for ((o, &v), (&g, &b)) in o.iter_mut().zip(row).zip(self.weight.iter().zip(&self.bias)) {
                *o = ((f64::from(v) - mean) * inv) as f32 * g + b;
            }
        }
    }
}

/// An nn.Linear: weight `[out, in]`, optional bias `[out]`.
#[derive(Debug)]
struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn load(w: &WeightLoader<'_>, out: usize, inp: usize, bias: bool) -> Result<Self, ModelError> {
        let weight = w.weight("weight", &[out, inp])?;
        let bias = if bias { Some(w.vector_f32("bias", out)?) } else { None };
        Ok(Self { weight, bias })
    }

    fn out_dim(&self) -> usize {
        self.weight.shape()[0]
    }

    /// `x [rows, in]` → `[rows, out]`.
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let n = self.out_dim();
        let rows = x.len() / self.weight.shape()[1];
        let mut out = vec![0.0f32; rows * n]; // [rows, out]
        matmul::matmul_t(x, self.weight.matrix(), &mut out);
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(n) {
                row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
        }
        out
    }
}

#[derive(Debug)]
struct EncoderLayer {
    input_norm: LayerNorm,
    post_norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// The loaded vision tower and projector.
#[derive(Debug)]
pub struct VisionModel {
    config: VisionConfig,
    patch: Weight,       // [hidden, 3·P·P]
    class: Vec<f32>,     // [hidden]
    position: Vec<f32>,  // [n+1, hidden]
    pre_norm: LayerNorm, // layernorm_pre
    post_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    adapter_fc1: Linear, // [projector, 4·hidden]
    adapter_fc2: Linear, // [projector, projector]
    projector: Linear,   // [text hidden, projector]
    cos: Vec<f32>,       // [n+1, head_dim/2]
    sin: Vec<f32>,       // [n+1, head_dim/2]
}

impl VisionModel {
    /// Load `vision_model.*` and `multi_modal_projector.*` from a checkpoint.
    pub fn load(ckpt: &Checkpoint, config: &VisionConfig, compute: ComputeDtype) -> Result<Self, ModelError> {
        let root = WeightLoader::new(ckpt, compute);
        let w = root.pp(TOWER);
        let c = config;
        let (h, p) = (c.hidden_size, c.patch_size);
        let n = c.grid() * c.grid();
        let patch = w.weight("patch_embedding.linear.weight", &[h, c.num_channels * p * p])?;
        let pos = w.weight("positional_embedding_vlm", &[n + 1, h])?;
        let mut position = vec![0.0f32; (n + 1) * h];
        pos.matrix().elems.to_f32_into(&mut position);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = w.pp("model.layers").pp(i);
            let (attn, mlp) = (l.pp("self_attn"), l.pp("mlp"));
            layers.push(EncoderLayer {
                input_norm: LayerNorm::load(&l.pp("input_layernorm"), h)?,
                post_norm: LayerNorm::load(&l.pp("post_attention_layernorm"), h)?,
                q: Linear::load(&attn.pp("q_proj"), h, h, true)?,
                k: Linear::load(&attn.pp("k_proj"), h, h, true)?,
                v: Linear::load(&attn.pp("v_proj"), h, h, true)?,
                o: Linear::load(&attn.pp("o_proj"), h, h, true)?,
                fc1: Linear::load(&mlp.pp("fc1"), c.intermediate_size, h, true)?,
                fc2: Linear::load(&mlp.pp("fc2"), h, c.intermediate_size, true)?,
            });
        }
        let adapter = w.pp("vision_adapter.mlp");
        let (cos, sin) = rope_table(c);
        Ok(Self {
            config: c.clone(),
            patch,
            class: w.vector_f32("class_embedding", h)?,
            position,
            pre_norm: LayerNorm::load(&w.pp("layernorm_pre"), h)?,
            post_norm: LayerNorm::load(&w.pp("layernorm_post"), h)?,
            layers,
            adapter_fc1: Linear::load(&adapter.pp("fc1"), c.projector_input_dim, 4 * h, false)?,
            adapter_fc2: Linear::load(&adapter.pp("fc2"), c.projector_output_dim, c.projector_input_dim, false)?,
            projector: Linear {
                weight: root.weight(PROJECTOR, &[c.text_hidden_size, c.vision_output_dim])?,
                bias: None,
            },
            cos,
            sin,
        })
    }

    /// Whether `ckpt` holds a vision tower.
    pub fn present(ckpt: &Checkpoint) -> bool {
        ckpt.contains(&format!("{TOWER}.patch_embedding.linear.weight")) && ckpt.contains(PROJECTOR)
    }

    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// `pixels [tiles, 3, S, S]` → `[tiles · tokens_per_tile, text hidden]` feature rows, in tile
    /// order (the order of the `<|patch|>` tokens of the image's block).
    pub fn forward(&self, pixels: &[bf16]) -> Vec<f32> {
        let c = &self.config;
        let (h, s) = (c.hidden_size, c.image_size);
        let tile_len = 3 * s * s;
        assert!(pixels.len().is_multiple_of(tile_len), "pixel values are not whole {s}x{s} tiles");
        let mut out = Vec::with_capacity(pixels.len() / tile_len * c.tokens_per_tile() * c.text_hidden_size);
        for tile in pixels.chunks_exact(tile_len) {
            let x = self.encode_tile(tile); // [n, hidden]
            let shuffled = pixel_shuffle(&x, c.grid(), h); // [n/4, 4·hidden]
            let a = gelu_vec(self.adapter_fc1.forward(&shuffled)); // [n/4, projector]
            let a = gelu_vec(self.adapter_fc2.forward(&a)); // [n/4, projector]
            out.extend(self.projector.forward(&a)); // [n/4, text hidden]
        }
        out
    }

    /// One tile through patch embedding and the encoder; returns `[n, hidden]` (class token dropped).
    fn encode_tile(&self, tile: &[bf16]) -> Vec<f32> {
        let c = &self.config;
        let (h, p, g, s) = (c.hidden_size, c.patch_size, c.grid(), c.image_size);
        let n = g * g;
        let pp = 3 * p * p;
        // Unfold: patch (row, col) flattened channel-major (c·P² + ky·P + kx).
        let mut patches = vec![0.0f32; n * pp]; // [n, 3·P·P]
        for (idx, row) in patches.chunks_exact_mut(pp).enumerate() {
            let (pr, pc) = (idx / g, idx % g);
            for ch in 0..3 {
                for ky in 0..p {
                    for kx in 0..p {
                        row[ch * p * p + ky * p + kx] = tile[ch * s * s + (pr * p + ky) * s + pc * p + kx].to_f32();
                    }
                }
            }
        }
        let mut x = vec![0.0f32; (n + 1) * h]; // [n+1, hidden]
        matmul::matmul_t(&patches, self.patch.matrix(), &mut x[..n * h]);
        x[n * h..].copy_from_slice(&self.class);
        x.iter_mut().zip(&self.position).for_each(|(a, b)| *a += b);
        let mut normed = vec![0.0f32; x.len()];
        self.pre_norm.forward(&x, c.norm_eps, &mut normed);
        let mut x = normed;
        for layer in &self.layers {
            self.layer_forward(layer, &mut x);
        }
        let mut out = vec![0.0f32; x.len()];
        self.post_norm.forward(&x, c.norm_eps, &mut out);
        out.truncate(n * h);
        out
    }

    fn layer_forward(&self, layer: &EncoderLayer, x: &mut [f32]) {
        let c = &self.config;
        let (h, heads, d) = (c.hidden_size, c.num_attention_heads, c.head_dim());
        let tokens = x.len() / h;
        let mut a = vec![0.0f32; x.len()]; // [tokens, hidden]
        layer.input_norm.forward(x, c.norm_eps, &mut a);
        let mut q = layer.q.forward(&a); // [tokens, heads, head_dim]
        let mut k = layer.k.forward(&a);
        let v = layer.v.forward(&a);
        self.rotate(&mut q, heads, d);
        self.rotate(&mut k, heads, d);
        // Bidirectional: every query is placed at the last position, so the causal kernel lets
        // it see every key (positions only decide visibility; RoPE was applied above).
        let positions = vec![tokens - 1; tokens];
        let kv = KvHistory::contiguous(&k, &v, h, 0);
        let mut attn = vec![0.0f32; tokens * h]; // [tokens, heads, head_dim]
        let shape = AttnHeads { q_heads: heads, kv_heads: heads, head_dim: d };
        let scale = (d as f64).powf(-0.5) as f32;
        attention::attention(&q, &positions, kv, shape, scale, AttnMask::Causal, &mut attn);
        let o = layer.o.forward(&attn);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        layer.post_norm.forward(x, c.norm_eps, &mut a);
        let f = gelu_vec(layer.fc1.forward(&a)); // [tokens, intermediate]
        let f = layer.fc2.forward(&f); // [tokens, hidden]
        x.iter_mut().zip(&f).for_each(|(a, b)| *a += b);
    }

    /// Complex-multiply each interleaved pair of `x [tokens, heads, head_dim]` by its angle.
    fn rotate(&self, x: &mut [f32], heads: usize, d: usize) {
        let half = d / 2;
        for (t, row) in x.chunks_exact_mut(heads * d).enumerate() {
            let (cos, sin) = (&self.cos[t * half..(t + 1) * half], &self.sin[t * half..(t + 1) * half]);
            for head in row.chunks_exact_mut(d) {
                for (j, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (re, im) = (pair[0], pair[1]);
                    pair[0] = re * cos[j] - im * sin[j];
                    pair[1] = re * sin[j] + im * cos[j];
                }
            }
        }
    }
}

/// cos/sin `[n+1, head_dim/2]` of the 2D RoPE angles, in f32 as transformers computes them.
fn rope_table(c: &VisionConfig) -> (Vec<f32>, Vec<f32>) {
    let g = c.grid();
    let half = c.head_dim() / 2; // pairs per head
    let quarter = half / 2; // frequencies per axis
    let freq_dim = half as f32;
    let omega: Vec<f32> = (0..quarter).map(|m| 1.0 / c.rope_theta.powf((2 * m) as f32 / freq_dim)).collect();
    let (mut cos, mut sin) = (Vec::with_capacity((g * g + 1) * half), Vec::with_capacity((g * g + 1) * half));
    for idx in 0..=g * g {
        for j in 0..half {
            let angle = if idx == g * g {
                0.0 // the class token
            } else if j < quarter {
                (idx % g + 1) as f32 * omega[j]
            } else {
                (idx / g + 1) as f32 * omega[j - quarter]
            };
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// Pixel shuffle with ratio 0.5: `x [g·g, hidden]` → `[(g/2)², 4·hidden]`, where output
/// (r', c') concatenates grid cells (2r', 2c'), (2r', 2c'+1), (2r'+1, 2c'), (2r'+1, 2c'+1).
fn pixel_shuffle(x: &[f32], g: usize, h: usize) -> Vec<f32> {
    let half = g / 2;
    let mut out = vec![0.0f32; x.len()];
    for (i, row) in out.chunks_exact_mut(4 * h).enumerate() {
        let (r, c) = (i / half, i % half);
        for (k, dst) in row.chunks_exact_mut(h).enumerate() {
            let (dr, dc) = (k / 2, k % 2);
            let src = (2 * r + dr) * g + 2 * c + dc;
            dst.copy_from_slice(&x[src * h..(src + 1) * h]);
        }
    }
    out
}

/// nn.GELU (exact erf form).
fn gelu(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
}

fn gelu_vec(mut v: Vec<f32>) -> Vec<f32> {
    v.iter_mut().for_each(|x| *x = gelu(*x));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_shuffle_matches_the_reference_index_map() {
        // Channel index of output (r', c') = (r % 2)·2h + (c % 2)·h + ch (reference notes §4.4).
        let (g, h) = (4, 3);
        let x: Vec<f32> = (0..g * g * h).map(|v| v as f32).collect();
        let y = pixel_shuffle(&x, g, h);
        for r in 0..g {
            for c in 0..g {
                for ch in 0..h {
                    let out_row = (r / 2) * (g / 2) + c / 2;
                    let out_ch = (r % 2) * 2 * h + (c % 2) * h + ch;
                    assert_eq!(y[out_row * 4 * h + out_ch], x[(r * g + c) * h + ch]);
                }
            }
        }
    }

    #[test]
    fn gelu_values() {
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-3.0) + 0.004_049_694).abs() < 1e-8);
    }
}
