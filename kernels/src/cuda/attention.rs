//! Launchers of `attention.cu`: the KV cache write, attention over the paged KV cache (prefill and
//! decode alike) and Llama 4's attention temperature.
//!
//! KV cache, per layer: keys and values each f32 `[num_blocks, kv_heads, BLOCK_TOKENS, head_dim]`.
//! Position `p` of a sequence lives in block `table[p / BLOCK_TOKENS]` at row `p % BLOCK_TOKENS`;
//! its slot is `block * BLOCK_TOKENS + row`. Every layer of a sequence uses the same table.

use super::compile::ATTENTION;
use super::{CudaSlice, Gpu, LaunchConfig, driver_err};
use crate::cpu::attention::AttnHeads;
use crate::device::DeviceError;
use cudarc::driver::PushKernelArg;

/// Rows of one KV cache block (`BLOCK_TOKENS` in `attention.cu`).
pub const BLOCK_TOKENS: usize = 16;

/// Query heads per kv head and head sizes that `paged_attention` supports.
const MAX_GROUP: usize = 8;
const MAX_HEAD_DIM: usize = 256;
/// `ATTN_THREADS` in `attention.cu`.
const ATTN_THREADS: u32 = 128;

fn invalid(kernel: &'static str, reason: String) -> DeviceError {
    DeviceError::Invalid { kernel, reason }
}

/// Grid of a grid-stride elementwise kernel over `n` items, 256 threads a block.
fn elementwise_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Writes the new tokens' keys and values into the cache. `k`, `v`: `[tokens, kv_heads,
/// head_dim]`; `slots`: `[tokens]`, `block_id * BLOCK_TOKENS + row`. A negative slot (padding)
/// writes nothing; so does a slot past the cache, which the kernel cannot report.
#[allow(clippy::too_many_arguments)] // the cache write's operands, as the kernel takes them
pub fn kv_write(
    gpu: &Gpu,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    slots: &CudaSlice<i32>,
    key_cache: &mut CudaSlice<f32>,
    value_cache: &mut CudaSlice<f32>,
    kv_heads: usize,
    head_dim: usize,
) -> Result<(), DeviceError> {
    let row = kv_heads * head_dim;
    let tokens = slots.len();
    let block = BLOCK_TOKENS * row;
    if row == 0
        || !head_dim.is_multiple_of(4)
        || k.len() != tokens * row
        || v.len() != k.len()
        || key_cache.len() != value_cache.len()
        || !key_cache.len().is_multiple_of(block.max(1))
    {
        return Err(invalid(
            "kv_write",
            format!(
                "k {} / v {} elements for {tokens} slots × {kv_heads} × {head_dim} (head_dim a multiple of 4); \
                 caches {} / {} elements (a multiple of {block})",
                k.len(),
                v.len(),
                key_cache.len(),
                value_cache.len()
            ),
        ));
    }
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function(&ATTENTION, "kv_write")?;
    let (t, h, d) = (tokens as i32, kv_heads as i32, head_dim as i32);
    let cache_slots = (key_cache.len() / row) as i64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(k).arg(v).arg(slots).arg(key_cache).arg(value_cache).arg(&t).arg(&h).arg(&d).arg(&cache_slots);
    // SAFETY: argument list matches the kernel's signature; sizes checked above.
    unsafe { b.launch(elementwise_cfg(tokens * row / 4)) }.map(drop).map_err(driver_err("launching kv_write"))
}

/// Which query tokens of a batch belong to which sequence, where they sit and where each
/// sequence's keys and values are: the device half of a batch's attention metadata.
#[derive(Debug)]
pub struct AttnBatch {
    /// `[seqs + 1]`: cumulative query-token offsets (`q_start[s]..q_start[s + 1]` are sequence
    /// `s`'s tokens in `q` and `out`).
    pub q_start: CudaSlice<i32>,
    /// `[seqs]`: absolute position of each sequence's first new query token.
    pub q_pos0: CudaSlice<i32>,
    /// `[seqs, max_blocks]`: each sequence's block ids in position order, padded with 0.
    pub block_tables: CudaSlice<i32>,
    pub max_blocks: usize,
    pub seqs: usize,
    pub tokens: usize,
    /// Longest query run of one sequence.
    pub max_q: usize,
}

impl AttnBatch {
    /// Uploads a batch: sequence `s` has `q_lens[s]` new tokens at positions
    /// `q_pos0[s]..q_pos0[s] + q_lens[s]` and its history in the blocks `tables[s]`, which must
    /// cover every position up to its last query.
    pub fn upload(gpu: &Gpu, q_lens: &[usize], q_pos0: &[usize], tables: &[Vec<u32>]) -> Result<Self, DeviceError> {
        let seqs = q_lens.len();
        if q_pos0.len() != seqs || tables.len() != seqs {
            return Err(invalid(
                "paged_attention",
                format!("{seqs} q_lens, {} q_pos0, {} block tables", q_pos0.len(), tables.len()),
            ));
        }
        let max_blocks = tables.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut q_start = Vec::with_capacity(seqs + 1);
        q_start.push(0i32);
        let mut tokens = 0usize;
        for (s, ((&n, &p0), table)) in q_lens.iter().zip(q_pos0).zip(tables).enumerate() {
            let end = p0 + n;
            if n > 0 && table.len() * BLOCK_TOKENS < end {
                return Err(invalid(
                    "paged_attention",
                    format!("sequence {s}: {} blocks do not hold positions up to {}", table.len(), end - 1),
                ));
            }
            if end > i32::MAX as usize || table.iter().any(|&b| b > i32::MAX as u32) {
                return Err(invalid("paged_attention", format!("sequence {s}: position or block id past i32")));
            }
            tokens += n;
            q_start.push(i32::try_from(tokens).map_err(|_| invalid("paged_attention", "too many tokens".into()))?);
        }
        let pos0: Vec<i32> = q_pos0.iter().map(|&p| p as i32).collect();
        let mut flat = vec![0i32; seqs.max(1) * max_blocks];
        for (row, table) in flat.chunks_exact_mut(max_blocks).zip(tables) {
            for (dst, &b) in row.iter_mut().zip(table) {
                *dst = b as i32;
            }
        }
        Ok(AttnBatch {
            q_start: gpu.upload(&q_start)?,
            q_pos0: gpu.upload(if pos0.is_empty() { &[0] } else { &pos0[..] })?,
            block_tables: gpu.upload(&flat)?,
            max_blocks,
            seqs,
            tokens,
            max_q: q_lens.iter().copied().max().unwrap_or(0),
        })
    }
}

/// `out[t, h] = softmax(q[t, h] · Kᵀ · scale + mask) · V` over the paged cache, for every query
/// token of `batch`; the mask is causal (`chunk: None`) or Llama 4's chunked local attention.
/// `q`, `out`: `[tokens, q_heads, head_dim]`. The batch's new tokens must already be in the
/// cache ([`kv_write`]). Block ids in the tables must be below the cache's `num_blocks`.
/// Matches [`crate::cpu::attention::attention`] to f32 rounding (online softmax).
#[allow(clippy::too_many_arguments)] // attention's operands, as the kernel takes them
pub fn attention(
    gpu: &Gpu,
    q: &CudaSlice<f32>,
    batch: &AttnBatch,
    key_cache: &CudaSlice<f32>,
    value_cache: &CudaSlice<f32>,
    heads: AttnHeads,
    scale: f32,
    chunk: Option<usize>,
    out: &mut CudaSlice<f32>,
) -> Result<(), DeviceError> {
    let AttnHeads { q_heads, kv_heads, head_dim } = heads;
    let group = q_heads.checked_div(kv_heads).unwrap_or(0);
    let block = kv_heads * BLOCK_TOKENS * head_dim;
    let bad_heads = group == 0
        || group * kv_heads != q_heads
        || group > MAX_GROUP
        || head_dim == 0
        || !head_dim.is_multiple_of(16)
        || head_dim > MAX_HEAD_DIM;
    let q_len = batch.tokens * q_heads * head_dim;
    if bad_heads
        || q.len() != q_len
        || out.len() != q_len
        || key_cache.len() != value_cache.len()
        || !key_cache.len().is_multiple_of(block.max(1))
        || chunk == Some(0)
        || chunk.is_some_and(|c| c > i32::MAX as usize)
        || batch.q_start.len() != batch.seqs + 1
        || batch.q_pos0.len() < batch.seqs
        || batch.block_tables.len() < batch.seqs * batch.max_blocks
        || (batch.seqs > 0 && batch.max_blocks == 0)
    {
        return Err(invalid(
            "paged_attention",
            format!(
                "{q_heads} q heads / {kv_heads} kv heads × {head_dim} (group ≤ {MAX_GROUP}, head_dim a multiple of 16 \
                 ≤ {MAX_HEAD_DIM}); q {} / out {} elements for {} tokens; caches {} / {} elements; chunk {chunk:?}; \
                 batch of {} seqs with {} q_start, {} q_pos0, {} table entries",
                q.len(),
                out.len(),
                batch.tokens,
                key_cache.len(),
                value_cache.len(),
                batch.seqs,
                batch.q_start.len(),
                batch.q_pos0.len(),
                batch.block_tables.len()
            ),
        ));
    }
    if batch.tokens == 0 {
        return Ok(());
    }
    let f = gpu.function(&ATTENTION, "paged_attention")?;
    // k_s, v_s [16][d + 1], q_s [group][d], p_s [group][16], alpha_s and l_s [8]: ≤ 41,664 B, under
    // the 48 KiB that needs no opt-in.
    let smem_floats = 2 * BLOCK_TOKENS * (head_dim + 1) + group * head_dim + group * BLOCK_TOKENS + 2 * MAX_GROUP;
    let (mb, seqs, qh, kvh, d) =
        (batch.max_blocks as i32, batch.seqs as i32, q_heads as i32, kv_heads as i32, head_dim as i32);
    let chunk_i = chunk.unwrap_or(0) as i32;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(q).arg(&batch.q_start).arg(&batch.q_pos0).arg(&batch.block_tables).arg(&mb);
    b.arg(key_cache).arg(value_cache).arg(out);
    b.arg(&seqs).arg(&qh).arg(&kvh).arg(&d).arg(&scale).arg(&chunk_i);
    let cfg = LaunchConfig {
        grid_dim: (batch.tokens as u32, kv_heads as u32, 1),
        block_dim: (ATTN_THREADS, 1, 1),
        shared_mem_bytes: (smem_floats * 4) as u32,
    };
    // SAFETY: argument list matches the kernel's signature; sizes checked above and in
    // `AttnBatch::upload` (tables cover every query position).
    unsafe { b.launch(cfg) }.map(drop).map_err(driver_err("launching paged_attention"))
}

/// Scales `q` (`[tokens, q_heads, head_dim]`) in place by Llama 4's attention temperature of
/// NoPE layers, `1 + attn_scale · ln(1 + floor((positions[t] + 1) / floor_scale))`, in f32 as the
/// host computes it. `positions`: `[tokens]`.
#[allow(clippy::too_many_arguments)] // the scaling's operands, as the kernel takes them
pub fn attn_temperature(
    gpu: &Gpu,
    q: &mut CudaSlice<f32>,
    positions: &CudaSlice<i32>,
    tokens: usize,
    q_heads: usize,
    head_dim: usize,
    attn_scale: f32,
    floor_scale: f32,
) -> Result<(), DeviceError> {
    let row = q_heads * head_dim;
    if row == 0 || q.len() != tokens * row || positions.len() != tokens || row > i32::MAX as usize {
        return Err(invalid(
            "attn_temperature",
            format!("q {} elements, {} positions for {tokens}×{q_heads}×{head_dim}", q.len(), positions.len()),
        ));
    }
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function(&ATTENTION, "attn_temperature")?;
    let (t, r) = (tokens as i32, row as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(q).arg(positions).arg(&t).arg(&r).arg(&attn_scale).arg(&floor_scale);
    // SAFETY: argument list matches the kernel's signature; sizes checked above.
    unsafe { b.launch(elementwise_cfg(tokens * row)) }.map(drop).map_err(driver_err("launching attn_temperature"))
}
