//! GPU attention kernels (paged KV cache write, prefill/decode attention, attention temperature)
//! against the CPU reference. Needs a CUDA device: on a machine without one every test prints
//! `SKIPPED <name>: <why>` and returns, so a pass here means nothing was checked.
//!
//! Inputs are fresh random values each run (the seed is printed); outputs are poisoned with NaN
//! before each launch so that an element the kernel forgot to write fails the check. Cache rows
//! that no sequence holds are NaN too, so a kernel that reads past a sequence's last position (a
//! partial last block) or into a foreign block turns its output into NaN.
#![cfg(feature = "cuda")]

use herd_kernels::cpu::attention::{AttnHeads, AttnMask, KvHistory, attention as cpu_attention};
use herd_kernels::cuda::Gpu;
use herd_kernels::cuda::attention::{AttnBatch, BLOCK_TOKENS, attention, attn_temperature, kv_write};
use rand::Rng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

mod support;
use support::{assert_close, gpu_or_skip, randn, rng};

const MAVERICK: AttnHeads = AttnHeads { q_heads: 40, kv_heads: 8, head_dim: 128 };
const TINY: AttnHeads = AttnHeads { q_heads: 4, kv_heads: 2, head_dim: 64 };
/// The golden test models' shape (testdata/golden/*: 4 query heads, 2 kv heads of 16).
const GOLDEN: AttnHeads = AttnHeads { q_heads: 4, kv_heads: 2, head_dim: 16 };
/// The kernel's limits: group 8 at the smallest and the largest head_dim.
const GROUP8_D32: AttnHeads = AttnHeads { q_heads: 8, kv_heads: 1, head_dim: 32 };
const GROUP8_D256: AttnHeads = AttnHeads { q_heads: 16, kv_heads: 2, head_dim: 256 };

/// Element offset of kv head `g` at `slot` in a head-major cache.
fn cache_offset(slot: usize, g: usize, heads: AttnHeads) -> usize {
    let (block, row) = (slot / BLOCK_TOKENS, slot % BLOCK_TOKENS);
    ((block * heads.kv_heads + g) * BLOCK_TOKENS + row) * heads.head_dim
}

#[test]
fn gpu_kv_write_fills_the_slots() {
    let Some(gpu) = gpu_or_skip("gpu_kv_write_fills_the_slots") else { return };
    let mut r = rng("gpu_kv_write");
    for heads in [MAVERICK, TINY, GOLDEN] {
        let (kvh, d) = (heads.kv_heads, heads.head_dim);
        let num_blocks = 7;
        let cache_len = num_blocks * kvh * BLOCK_TOKENS * d;
        // Scattered distinct slots, and one padding token (-1) that must write nothing.
        let mut all: Vec<i32> = (0..(num_blocks * BLOCK_TOKENS) as i32).collect();
        all.shuffle(&mut r);
        let mut slots: Vec<i32> = all[..29].to_vec();
        slots[11] = -1;
        let tokens = slots.len();
        let (k, v) = (randn(&mut r, tokens * kvh * d, 2.0), randn(&mut r, tokens * kvh * d, 2.0));
        let init = randn(&mut r, cache_len, 9.0);
        let (mut want_k, mut want_v) = (init.clone(), init.clone());
        for (t, &slot) in slots.iter().enumerate() {
            let Ok(slot) = usize::try_from(slot) else { continue };
            for g in 0..kvh {
                let (src, dst) = ((t * kvh + g) * d, cache_offset(slot, g, heads));
                want_k[dst..dst + d].copy_from_slice(&k[src..src + d]);
                want_v[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
        let (dk, dv, ds) =
            (gpu.upload(&k).expect("cuda"), gpu.upload(&v).expect("cuda"), gpu.upload(&slots).expect("cuda"));
        let (mut kc, mut vc) = (gpu.upload(&init).expect("cuda"), gpu.upload(&init).expect("cuda"));
        kv_write(&gpu, &dk, &dv, &ds, &mut kc, &mut vc, kvh, d).expect("cuda");
        let (got_k, got_v) = (gpu.download(&kc).expect("cuda"), gpu.download(&vc).expect("cuda"));
        assert!(got_k == want_k, "{heads:?}: key cache differs from the host writes");
        assert!(got_v == want_v, "{heads:?}: value cache differs from the host writes");
    }
}

/// One batch's sequences: (positions already in the cache, new query tokens).
type Seqs<'a> = &'a [(usize, usize)];

/// Builds a paged cache for `seqs` on shuffled, non-contiguous blocks (unused rows NaN), writes
/// the new tokens' K/V with [`kv_write`], runs [`attention`] and compares with the CPU reference
/// over the same blocks.
fn check_attention(gpu: &Gpu, r: &mut ChaCha8Rng, heads: AttnHeads, seqs: Seqs<'_>, chunk: Option<usize>) {
    let AttnHeads { q_heads, kv_heads: kvh, head_dim: d } = heads;
    let what = format!("{heads:?} seqs {seqs:?} chunk {chunk:?}");
    let need: Vec<usize> = seqs.iter().map(|&(p0, n)| (p0 + n).div_ceil(BLOCK_TOKENS)).collect();
    let num_blocks = need.iter().sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(r);
    let mut tables = Vec::new();
    let mut next = 0;
    for &n in &need {
        tables.push(ids[next..next + n].to_vec());
        next += n;
    }

    // The full cache as the CPU sees it, and the device's copy holding only the old positions.
    let cache_len = num_blocks * kvh * BLOCK_TOKENS * d;
    let (mut keys, mut values) = (vec![f32::NAN; cache_len], vec![f32::NAN; cache_len]);
    let (mut new_k, mut new_v, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    let mut old_slots = Vec::new();
    for (&(p0, n), table) in seqs.iter().zip(&tables) {
        for p in 0..p0 + n {
            let slot = table[p / BLOCK_TOKENS] as usize * BLOCK_TOKENS + p % BLOCK_TOKENS;
            let (kr, vr) = (randn(r, kvh * d, 1.0), randn(r, kvh * d, 1.0));
            for g in 0..kvh {
                let o = cache_offset(slot, g, heads);
                keys[o..o + d].copy_from_slice(&kr[g * d..(g + 1) * d]);
                values[o..o + d].copy_from_slice(&vr[g * d..(g + 1) * d]);
            }
            if p < p0 {
                old_slots.push(slot);
            } else {
                new_k.extend_from_slice(&kr);
                new_v.extend_from_slice(&vr);
                slots.push(slot as i32);
            }
        }
    }
    let (mut dev_keys, mut dev_values) = (vec![f32::NAN; cache_len], vec![f32::NAN; cache_len]);
    for &slot in &old_slots {
        for g in 0..kvh {
            let o = cache_offset(slot, g, heads);
            dev_keys[o..o + d].copy_from_slice(&keys[o..o + d]);
            dev_values[o..o + d].copy_from_slice(&values[o..o + d]);
        }
    }

    let tokens: usize = seqs.iter().map(|s| s.1).sum();
    // Scale 2 makes some softmaxes peaky, so the running max matters.
    let q = randn(r, tokens * q_heads * d, 2.0);
    let scale = 1.0 / (d as f32).sqrt();
    let mask = chunk.map_or(AttnMask::Causal, |chunk| AttnMask::Chunked { chunk });
    let mut want = vec![0.0f32; q.len()];
    let mut t0 = 0;
    for (&(p0, n), table) in seqs.iter().zip(&tables) {
        if n == 0 {
            continue;
        }
        let kv = KvHistory {
            keys: &keys,
            values: &values,
            blocks: table,
            block_tokens: BLOCK_TOKENS,
            first_pos: 0,
            len: p0 + n,
            head_major: true,
        };
        let positions: Vec<usize> = (p0..p0 + n).collect();
        let rows = t0 * q_heads * d..(t0 + n) * q_heads * d;
        cpu_attention(&q[rows.clone()], &positions, kv, heads, scale, mask, &mut want[rows]);
        t0 += n;
    }

    let (mut kc, mut vc) = (gpu.upload(&dev_keys).expect("cuda"), gpu.upload(&dev_values).expect("cuda"));
    let (dk, dv, ds) =
        (gpu.upload(&new_k).expect("cuda"), gpu.upload(&new_v).expect("cuda"), gpu.upload(&slots).expect("cuda"));
    kv_write(gpu, &dk, &dv, &ds, &mut kc, &mut vc, kvh, d).expect("cuda");
    let q_lens: Vec<usize> = seqs.iter().map(|s| s.1).collect();
    let q_pos0: Vec<usize> = seqs.iter().map(|s| s.0).collect();
    let batch = AttnBatch::upload(gpu, &q_lens, &q_pos0, &tables).expect("cuda");
    assert_eq!((batch.seqs, batch.tokens), (seqs.len(), tokens));
    let dq = gpu.upload(&q).expect("cuda");
    let mut dout = gpu.upload(&vec![f32::NAN; q.len()]).expect("cuda");
    attention(gpu, &dq, &batch, &kc, &vc, heads, scale, chunk, &mut dout).expect("cuda");
    let got = gpu.download(&dout).expect("cuda");
    assert_close(&what, &got, &want, 1e-4, 1e-5);
}

#[test]
fn gpu_attention_decode_matches_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_attention_decode_matches_cpu") else { return };
    let mut r = rng("gpu_attention_decode");
    // Total lengths 1, 16 (a full block), 17, 65 (a chunk-64 start sees only itself), 300.
    let seqs = [(0, 1), (15, 1), (16, 1), (64, 1), (299, 1)];
    for heads in [MAVERICK, TINY, GOLDEN, GROUP8_D32, GROUP8_D256] {
        for chunk in [None, Some(64), Some(24)] {
            check_attention(&gpu, &mut r, heads, &seqs, chunk);
        }
    }
}

#[test]
fn gpu_attention_prefill_matches_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_attention_prefill_matches_cpu") else { return };
    let mut r = rng("gpu_attention_prefill");
    // A fresh prompt; a prefill continuing a history across the chunk-64 boundary; a sequence
    // with no new tokens (skipped by the token → sequence search); a decode in the same batch; a
    // long continuation ending in a partial block.
    let seqs = [(0, 37), (50, 30), (9, 0), (130, 1), (100, 141)];
    for heads in [MAVERICK, TINY, GOLDEN, GROUP8_D32, GROUP8_D256] {
        for chunk in [None, Some(64), Some(24), Some(8)] {
            check_attention(&gpu, &mut r, heads, &seqs, chunk);
        }
    }
    // A single sequence, the whole batch.
    check_attention(&gpu, &mut r, TINY, &[(0, 200)], Some(64));
}

#[test]
fn gpu_attention_rejects_bad_shapes() {
    let Some(gpu) = gpu_or_skip("gpu_attention_rejects_bad_shapes") else { return };
    // A table that does not reach the last query position.
    assert!(AttnBatch::upload(&gpu, &[2], &[15], &[vec![0]]).is_err());
    let batch = AttnBatch::upload(&gpu, &[1], &[0], &[vec![0]]).expect("cuda");
    let cache = gpu.zeros::<f32>(BLOCK_TOKENS * 64).expect("cuda");
    let q = gpu.zeros::<f32>(3 * 64).expect("cuda");
    let mut out = gpu.zeros::<f32>(3 * 64).expect("cuda");
    // 3 query heads over 2 kv heads do not group.
    let heads = AttnHeads { q_heads: 3, kv_heads: 2, head_dim: 32 };
    assert!(attention(&gpu, &q, &batch, &cache, &cache, heads, 1.0, None, &mut out).is_err());
    // head_dim not a multiple of 16.
    let heads = AttnHeads { q_heads: 3, kv_heads: 1, head_dim: 40 };
    assert!(attention(&gpu, &q, &batch, &cache, &cache, heads, 1.0, None, &mut out).is_err());
}

#[test]
fn gpu_attn_temperature_matches_host() {
    let Some(gpu) = gpu_or_skip("gpu_attn_temperature_matches_host") else { return };
    let mut r = rng("gpu_attn_temperature");
    let (tokens, q_heads, d) = (37, 40, 128);
    // Maverick's config: attn_scale 0.1, floor_scale 8192.
    let (attn_scale, floor_scale) = (0.1f32, 8192.0f32);
    let mut positions: Vec<i32> = (0..tokens).map(|_| r.random_range(0..300_000)).collect();
    positions[..4].copy_from_slice(&[0, 8190, 8191, 8192]);
    let q = randn(&mut r, tokens * q_heads * d, 2.0);
    let mut want = q.clone();
    for (row, &p) in want.chunks_exact_mut(q_heads * d).zip(&positions) {
        // As worker/src/model/text.rs computes it.
        let f = ((p as f32 + 1.0) / floor_scale).floor().ln_1p() * attn_scale + 1.0;
        row.iter_mut().for_each(|x| *x *= f);
    }
    let mut dq = gpu.upload(&q).expect("cuda");
    let dp = gpu.upload(&positions).expect("cuda");
    attn_temperature(&gpu, &mut dq, &dp, tokens, q_heads, d, attn_scale, floor_scale).expect("cuda");
    let got = gpu.download(&dq).expect("cuda");
    // log1pf on the device may differ from the host's by an ulp.
    assert_close("attn_temperature", &got, &want, 1e-6, 0.0);
}
