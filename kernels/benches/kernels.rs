//! Micro-benchmarks of every CPU kernel at maverick-mini's shapes (hidden 1024, 8 query and
//! 2 kv heads of 128, expert width 256, dense width 512, vocab 32768), bf16 weights.
//!
//! Run with `cargo bench -p herd-kernels` (threads: rayon's default, or RAYON_NUM_THREADS).
//! Throughput is reported in weight bytes for the matrix products (decode is bandwidth-bound)
//! and in elements elsewhere.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use herd_kernels::cpu::attention::{self, AttnHeads, AttnMask, KvHistory};
use herd_kernels::cpu::{activation, matmul, norm, rope};
use herd_kernels::{Elems, MatRef};
use std::hint::black_box;

fn values(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic spread in [-1, 1): the values do not affect the timing.
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 8_388_608.0 - 1.0)
        .collect()
}

fn bf16s(n: usize, seed: u32) -> Vec<bf16> {
    values(n, seed).into_iter().map(bf16::from_f32).collect()
}

/// `(name, n, k)` of the nn.Linear products of one token.
const LINEAR: [(&str, usize, usize); 4] = [
    ("q_o_1024x1024", 1024, 1024),
    ("kv_256x1024", 256, 1024),
    ("mlp_512x1024", 512, 1024),
    ("lm_head_32768x1024", 32768, 1024),
];

fn matmul_t(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_t_bf16");
    for (name, n, k) in LINEAR {
        let w = bf16s(n * k, 1);
        let wm = MatRef::new(Elems::Bf16(&w), n, k);
        for m in [1usize, 4, 64, 512] {
            if n == 32768 && m > 1 {
                continue;
            }
            let x = values(m * k, 2);
            let mut out = vec![0.0f32; m * n];
            g.throughput(Throughput::Bytes((n * k * 2) as u64));
            g.bench_function(BenchmarkId::new(name, m), |b| b.iter(|| matmul::matmul_t(black_box(&x), wm, &mut out)));
        }
    }
    g.finish();
}

/// One decoded token's nn.Linear weight stream at maverick-mini's shapes: for each of 12
/// layers q/k/v (one region), o, gate/up (one region) and down, every matrix distinct, 96 MiB in
/// all, so that (unlike the single-matrix benches above, which a large L3 may hold) every byte
/// comes from DRAM, and the fork/join and prefetch ramp-up of ~50 small products per token are
/// part of the figure. Throughput in GiB/s is directly comparable with `herd bench`'s bandwidth.
fn decode_stream(c: &mut Criterion) {
    fn m(w: &[bf16], n: usize, k: usize) -> MatRef<'_> {
        MatRef::new(Elems::Bf16(w), n, k)
    }
    let (h, qd, kvd, ff) = (1024usize, 1024usize, 256usize, 512usize);
    let layers: Vec<[Vec<bf16>; 7]> = (0..12)
        .map(|l| {
            let s = 100 + 10 * l;
            [
                bf16s(qd * h, s),
                bf16s(kvd * h, s + 1),
                bf16s(kvd * h, s + 2),
                bf16s(h * qd, s + 3),
                bf16s(ff * h, s + 4),
                bf16s(ff * h, s + 5),
                bf16s(h * ff, s + 6),
            ]
        })
        .collect();
    let bytes: usize = layers.iter().flatten().map(|w| w.len() * 2).sum();
    let x = values(h, 5);
    let (mut q, mut k, mut v, mut o) = (vec![0.0f32; qd], vec![0.0f32; kvd], vec![0.0f32; kvd], vec![0.0f32; h]);
    let (mut gate, mut up, mut down) = (vec![0.0f32; ff], vec![0.0f32; ff], vec![0.0f32; h]);
    let mut g = c.benchmark_group("decode_stream_bf16");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("12_layers_96MiB", |b| {
        b.iter(|| {
            for [wq, wk, wv, wo, wg, wu, wd] in &layers {
                matmul::matmul_t_many(
                    black_box(&x),
                    &mut [(m(wq, qd, h), &mut q), (m(wk, kvd, h), &mut k), (m(wv, kvd, h), &mut v)],
                );
                matmul::matmul_t(&q, m(wo, h, qd), &mut o);
                matmul::matmul_t_many(&o, &mut [(m(wg, ff, h), &mut gate), (m(wu, ff, h), &mut up)]);
                matmul::matmul_t(&gate, m(wd, h, ff), &mut down);
            }
        })
    });
    g.finish();
}

fn matmul_kn(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_kn_bf16");
    for (name, k, n) in [("expert_gate_up_1024x512", 1024usize, 512usize), ("expert_down_256x1024", 256, 1024)] {
        let w = bf16s(n * k, 3);
        let wm = MatRef::new(Elems::Bf16(&w), k, n);
        for m in [1usize, 4, 64] {
            let x = values(m * k, 4);
            let mut out = vec![0.0f32; m * n];
            g.throughput(Throughput::Bytes((n * k * 2) as u64));
            g.bench_function(BenchmarkId::new(name, m), |b| b.iter(|| matmul::matmul(black_box(&x), wm, &mut out)));
        }
    }
    g.finish();
}

fn matmul_f32(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul_t_f32");
    let (n, k) = (1024, 1024);
    let w = values(n * k, 5);
    let wm = MatRef::new(Elems::F32(&w), n, k);
    for m in [1usize, 64] {
        let x = values(m * k, 6);
        let mut out = vec![0.0f32; m * n];
        g.throughput(Throughput::Bytes((n * k * 4) as u64));
        g.bench_function(BenchmarkId::new("1024x1024", m), |b| {
            b.iter(|| matmul::matmul_t(black_box(&x), wm, &mut out))
        });
    }
    g.finish();
}

fn elementwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    let (tokens, h) = (64, 1024);
    let x = values(tokens * h, 7);
    let w = values(h, 8);
    let mut out = vec![0.0f32; tokens * h];
    g.throughput(Throughput::Elements((tokens * h) as u64));
    g.bench_function("rms_norm_64x1024", |b| b.iter(|| norm::rms_norm(black_box(&x), h, Some(&w), 1e-5, &mut out)));
    let gate_up = values(tokens * 512, 9);
    let mut act = vec![0.0f32; tokens * 256];
    g.bench_function("swiglu_fused_64x256", |b| {
        b.iter(|| activation::swiglu_fused(black_box(&gate_up), 256, &mut act))
    });
    let freqs = rope::RopeFreqs::new(128, 500_000.0, None);
    let positions: Vec<usize> = (0..tokens).collect();
    let (cos, sin) = freqs.table(&positions);
    let mut q = values(tokens * 8 * 128, 10);
    g.bench_function("rope_64x8x128", |b| b.iter(|| rope::apply_rope(black_box(&mut q), 8, 128, &cos, &sin)));
    g.finish();
}

fn attention_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    let heads = AttnHeads { q_heads: 8, kv_heads: 2, head_dim: 128 };
    let row = 2 * 128;
    for (name, tokens, history) in
        [("decode_1_of_512", 1usize, 512usize), ("prefill_128", 128, 128), ("prefill_512", 512, 512)]
    {
        let k = values(history * row, 11);
        let v = values(history * row, 12);
        let q = values(tokens * 8 * 128, 13);
        let positions: Vec<usize> = (history - tokens..history).collect();
        let mut out = vec![0.0f32; q.len()];
        g.throughput(Throughput::Elements(tokens as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let kv = KvHistory::contiguous(&k, &v, row, 0);
                attention::attention(black_box(&q), &positions, kv, heads, 0.088, AttnMask::Causal, &mut out)
            })
        });
    }
    // Decode as in a model: each layer's history was evicted by the weights streamed since
    // the last token, so 48 distinct 640-token histories (63 MiB, twice the L3) take turns.
    let (history, layers) = (640usize, 48usize);
    let k: Vec<Vec<f32>> = (0..layers).map(|l| values(history * row, 20 + l as u32)).collect();
    let v: Vec<Vec<f32>> = (0..layers).map(|l| values(history * row, 90 + l as u32)).collect();
    let q = values(8 * 128, 13);
    let mut out = vec![0.0f32; q.len()];
    let mut layer = 0;
    g.throughput(Throughput::Bytes((history * row * 2 * 4) as u64));
    g.bench_function("decode_cold_1_of_640", |b| {
        b.iter(|| {
            layer = (layer + 1) % layers;
            let kv = KvHistory::contiguous(&k[layer], &v[layer], row, 0);
            attention::attention(black_box(&q), &[history - 1], kv, heads, 0.088, AttnMask::Causal, &mut out)
        })
    });
    // The same rows as the KV cache pool keeps them: 16-token head-major blocks.
    let blocks: Vec<u32> = (0..(history / 16) as u32).collect();
    let paged = |x: &[f32]| -> Vec<f32> {
        let mut p = vec![0.0f32; x.len()];
        for (pos, r) in x.chunks_exact(row).enumerate() {
            for (kvh, src) in r.chunks_exact(128).enumerate() {
                let at = (((pos / 16) * 2 + kvh) * 16 + pos % 16) * 128;
                p[at..at + 128].copy_from_slice(src);
            }
        }
        p
    };
    let k: Vec<Vec<f32>> = k.iter().map(|x| paged(x)).collect();
    let v: Vec<Vec<f32>> = v.iter().map(|x| paged(x)).collect();
    g.bench_function("decode_cold_paged_1_of_640", |b| {
        b.iter(|| {
            layer = (layer + 1) % layers;
            let kv = KvHistory {
                keys: &k[layer],
                values: &v[layer],
                blocks: &blocks,
                block_tokens: 16,
                first_pos: 0,
                len: history,
                head_major: true,
            };
            attention::attention(black_box(&q), &[history - 1], kv, heads, 0.088, AttnMask::Causal, &mut out)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = decode_stream, matmul_t, matmul_kn, matmul_f32, elementwise, attention_bench
}
criterion_main!(benches);
