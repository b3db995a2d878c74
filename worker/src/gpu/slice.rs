//! A Maverick slice on one GPU: two decoder layers with Llama 4 Maverick's real dimensions
//! (hidden 5120, 40 query / 8 KV heads of 128, one dense layer with a 16384-wide SwiGLU, one
//! MoE layer with 128 routed experts of width 8192, top-1, and the shared expert), FP8 weights
//! with random codes, for timing decode steps (issue 6's decode goal).
//!
//! The routed experts (16 GiB) are filled on the device; the other weights are generated on the
//! host with the same code distribution. Each decode step starts from random hidden states at a
//! given KV depth: the history blocks are reserved and hold random keys and values, which is
//! all a decode step reads of them.

use super::GpuError;
use super::model::{GpuFfn, GpuKv, GpuLayer, GpuTextModel};
use super::moe::{GpuMlp, GpuMoe, RoutedExperts, scratch};
use crate::model::config::{LayerAttention, LayerSpec, TextConfig};
use herd_kernels::cpu::rope::RopeFreqs;
use herd_kernels::cuda::elementwise as ew;
use herd_kernels::cuda::linear::LinearWeight;
use herd_kernels::cuda::{Gpu, moe as gmoe};
use std::sync::Arc;

/// Maverick's text dimensions with `layers` = [dense, MoE].
pub fn maverick_slice_config() -> TextConfig {
    let layer = |moe| LayerSpec {
        uses_rope: true,
        attention: LayerAttention::Chunked,
        moe,
        qk_norm: false,
        temperature_tuning: false,
    };
    TextConfig {
        vocab_size: 202_048,
        hidden_size: 5120,
        intermediate_size: 8192,
        intermediate_size_mlp: 16384,
        num_hidden_layers: 2,
        num_attention_heads: 40,
        num_key_value_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: None,
        attention_chunk_size: Some(8192),
        floor_scale: 8192.0,
        attn_scale: 0.1,
        num_local_experts: 128,
        num_experts_per_tok: 1,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        pad_token_id: None,
        max_position_embeddings: 1 << 20,
        layers: vec![layer(false), layer(true)],
    }
}

/// SplitMix64: fast, and good enough for benchmark weights.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Random finite e4m3 codes (|value| in 2⁻⁷..2¹, either sign), as `fill_random_e4m3` makes.
fn fp8_linear(gpu: &Gpu, rng: &mut Mix, n: usize, k: usize) -> Result<LinearWeight, GpuError> {
    let mut codes = Vec::with_capacity(n * k);
    while codes.len() < n * k {
        let r = rng.next();
        for b in r.to_le_bytes() {
            codes.push((b & 0x80) | (0x20 + (b & 0x7f) % 0x28));
        }
    }
    codes.truncate(n * k);
    // Scales keep each output O(1) for O(1) inputs.
    let scale = vec![1.0 / (k as f32).sqrt(); n];
    Ok(LinearWeight::fp8(gpu, &codes, &scale, n, k)?)
}

fn fp8_mlp(gpu: &Gpu, rng: &mut Mix, hidden: usize, width: usize) -> Result<GpuMlp, GpuError> {
    Ok(GpuMlp { gate_up: fp8_linear(gpu, rng, 2 * width, hidden)?, down: fp8_linear(gpu, rng, hidden, width)?, width })
}

fn fp8_experts(gpu: &Gpu, experts: usize, n: usize, k: usize, seed: u32) -> Result<gmoe::Fp8Experts, GpuError> {
    let mut w = gpu.zeros::<u8>(experts * n * k)?;
    ew::fill_random_e4m3(gpu, &mut w, seed)?;
    let scale = gpu.upload(&vec![1.0 / (k as f32).sqrt(); experts * n])?;
    Ok(gmoe::Fp8Experts { w, scale, experts, n, k })
}

/// The slice: layer 0 dense, layer 1 MoE, every linear FP8 (the router f32).
pub fn maverick_slice(gpu: Arc<Gpu>, seed: u64) -> Result<GpuTextModel, GpuError> {
    let config = maverick_slice_config();
    let (h, d) = (config.hidden_size, config.head_dim);
    let (qd, kvd) = (config.num_attention_heads * d, config.num_key_value_heads * d);
    let mut rng = Mix(seed);
    let ones = gpu.upload(&vec![1.0f32; h])?;
    let mut layers = Vec::new();
    for (li, spec) in config.layers.iter().enumerate() {
        let ffn = if spec.moe {
            let e = config.num_local_experts;
            let router: Vec<f32> =
                (0..e * h).map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 0.2 - 0.1).collect();
            GpuFfn::Moe(Box::new(GpuMoe {
                router: LinearWeight::f32(&gpu, &router, e, h)?,
                shared: fp8_mlp(&gpu, &mut rng, h, config.intermediate_size)?,
                routed: RoutedExperts::Fp8 {
                    gate_up: Box::new(fp8_experts(&gpu, e, 2 * config.intermediate_size, h, 11 + li as u32)?),
                    down: Box::new(fp8_experts(&gpu, e, h, config.intermediate_size, 23 + li as u32)?),
                },
                experts: e,
                held: (0..e).map(Some).collect(),
                top_k: config.num_experts_per_tok,
                hidden: h,
                width: config.intermediate_size,
            }))
        } else {
            GpuFfn::Dense(Box::new(fp8_mlp(&gpu, &mut rng, h, config.intermediate_size_mlp)?))
        };
        layers.push(GpuLayer {
            spec: *spec,
            input_norm: gpu.upload(&vec![1.0f32; h])?,
            post_norm: gpu.upload(&vec![1.0f32; h])?,
            q: fp8_linear(&gpu, &mut rng, qd, h)?,
            k: fp8_linear(&gpu, &mut rng, kvd, h)?,
            v: fp8_linear(&gpu, &mut rng, kvd, h)?,
            o: fp8_linear(&gpu, &mut rng, h, qd)?,
            ffn,
        });
    }
    let rope = RopeFreqs::new(d, config.rope_theta, None);
    Ok(GpuTextModel { gpu, config, embed: None, layers, norm: ones, lm_head: None, rope })
}

/// Weight bytes a batch-1 decode step of the slice must read: both layers' attention, the
/// dense MLP, the router, the shared expert and `top_k` routed experts.
pub fn active_weight_bytes(model: &GpuTextModel) -> usize {
    model
        .layers
        .iter()
        .map(|l| {
            let attn = l.q.bytes() + l.k.bytes() + l.v.bytes() + l.o.bytes();
            attn + match &l.ffn {
                GpuFfn::Dense(m) => m.bytes(),
                GpuFfn::Moe(m) => m.active_bytes(),
            }
        })
        .sum()
}

/// One timed configuration.
#[derive(Debug, Clone)]
pub struct SliceTiming {
    pub batch: usize,
    pub depth: usize,
    /// Median milliseconds of one decode step (both layers), over `steps` steps.
    pub median_ms: f64,
    pub min_ms: f64,
    pub steps: usize,
}

/// Decode steps of `batch` sequences at KV depth `depth`: `warmup` untimed, then `steps` timed
/// one by one with CUDA events.
pub fn time_decode(
    model: &GpuTextModel,
    batch: usize,
    depth: usize,
    warmup: usize,
    steps: usize,
) -> Result<SliceTiming, GpuError> {
    let gpu = &*model.gpu;
    let cfg = &model.config;
    let h = cfg.hidden_size;
    let bt = herd_kernels::cuda::attention::BLOCK_TOKENS;
    // Every layer keeps its own blocks: room for depth + all steps, plus alignment slack.
    let per_seq = (depth + warmup + steps).div_ceil(bt) + 1;
    let bytes = per_seq * batch * cfg.num_hidden_layers * GpuKv::block_bytes(cfg);
    let mut kv = GpuKv::new(gpu, cfg, bytes)?;
    ew::fill_random_f32(gpu, &mut kv.keys, 5, 1.0)?;
    ew::fill_random_f32(gpu, &mut kv.values, 6, 1.0)?;
    let mut pool = kv.pool(cfg);
    let mut seqs: Vec<_> = (0..batch).map(|_| pool.new_seq()).collect();
    for s in &mut seqs {
        for li in 0..cfg.num_hidden_layers {
            pool.reserve(s, li, depth, 0)?;
        }
        s.commit(depth);
    }
    let flags = Some(herd_kernels::cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (gpu.context().new_event(flags)?, gpu.context().new_event(flags)?);
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let mut x = scratch(gpu, batch * h)?; // [batch, hidden], written by the fill
        ew::fill_random_f32(gpu, &mut x, 100 + i as u32, 1.0)?;
        let mut step: Vec<_> = seqs.iter_mut().map(|s| (1usize, s)).collect();
        start.record(gpu.stream())?;
        model.run_layers(&mut kv, &mut pool, &mut step, &mut x, None)?;
        end.record(gpu.stream())?;
        end.synchronize()?;
        if i >= warmup {
            times.push(f64::from(start.elapsed_ms(&end)?));
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(SliceTiming { batch, depth, median_ms: times[times.len() / 2], min_ms: times[0], steps })
}

/// Device-to-device copy bandwidth in GB/s (bytes read + written), over a 1 GiB buffer.
pub fn copy_bandwidth(gpu: &Gpu) -> Result<f64, GpuError> {
    let n = 1usize << 30;
    let mut src = gpu.zeros::<u8>(n)?;
    ew::fill_random_e4m3(gpu, &mut src, 1)?;
    let mut dst = gpu.zeros::<u8>(n)?;
    let flags = Some(herd_kernels::cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (gpu.context().new_event(flags)?, gpu.context().new_event(flags)?);
    for _ in 0..3 {
        gpu.stream().memcpy_dtod(&src, &mut dst)?;
    }
    let iters = 10;
    start.record(gpu.stream())?;
    for _ in 0..iters {
        gpu.stream().memcpy_dtod(&src, &mut dst)?;
    }
    end.record(gpu.stream())?;
    end.synchronize()?;
    let ms = f64::from(start.elapsed_ms(&end)?) / iters as f64;
    Ok(2.0 * n as f64 / (ms * 1e-3) / 1e9)
}
