//! Quantized `x · Wᵀ` against bf16 on one Maverick expert projection (`[8192, 5120]`) and one
//! maverick-mini expert (`[256, 1024]`), for decode (m = 1) and a small batch (m = 16).
//!
//! `cargo bench -p herd-kernels --bench matmul_q`. Throughput is in weight elements, so the
//! three formats compare directly (decode is bound by weight bytes: 2, 1 and ~0.53 per element).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;
use herd_kernels::cpu::matmul::matmul_t;
use herd_kernels::quant::{int4_row_bytes, int4_row_groups, quantize_fp8, quantize_int4};
use herd_kernels::{Elems, MatRef};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut group = c.benchmark_group("matmul_t_quant");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for (label, n, k) in [("maverick_expert", 8192, 5120), ("mini_expert", 256, 1024)] {
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.02f32..0.02)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let (mut codes, mut s8) = (vec![0u8; n * k], vec![0f32; n]);
        quantize_fp8(&w, n, k, &mut codes, &mut s8).expect("fp8");
        let (mut packed, mut s4) = (vec![0u8; n * int4_row_bytes(k)], vec![0f32; n * int4_row_groups(k)]);
        quantize_int4(&w, n, k, &mut packed, &mut s4).expect("int4");
        drop(w);
        let formats = [
            ("bf16", Elems::Bf16(&wb)),
            ("fp8", Elems::F8E4M3 { codes: &codes, scales: &s8, row_len: k }),
            ("int4", Elems::Int4 { packed: &packed, scales: &s4, row_len: k }),
        ];
        for m in [1usize, 16] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let mut out = vec![0f32; m * n];
            group.throughput(Throughput::Elements((n * k) as u64));
            for (name, elems) in formats {
                let mat = MatRef::new(elems, n, k);
                group.bench_function(BenchmarkId::new(format!("{label}/m{m}"), name), |b| {
                    b.iter(|| matmul_t(black_box(&x), mat, &mut out))
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
