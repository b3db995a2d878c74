//! The small GPU kernels between a layer's matmuls (elementwise.cu, and RoPE at the tiny test
//! models' head_dim) against the CPU reference. Without a CUDA device every test prints
//! `SKIPPED <name>: <why>`; scripts/gpu-check.sh fails on any SKIPPED.
#![cfg(feature = "cuda")]

use herd_kernels::cpu::{activation, norm, rope};
use herd_kernels::cuda::elementwise::{self as ew, EmbedTable};
use herd_kernels::cuda::norm as gnorm;
use rand::Rng;

mod support;
use support::{assert_close, gpu_or_skip, nan, randn, rng};

#[test]
fn gpu_embedding_rows_match_the_table() {
    let Some(gpu) = gpu_or_skip("gpu_embedding_rows_match_the_table") else { return };
    let mut r = rng("gpu_embedding");
    let (vocab, hidden) = (300, 72);
    let table = randn(&mut r, vocab * hidden, 1.0);
    let bf16: Vec<u16> = table.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
    let ids: Vec<i32> = (0..9).map(|_| r.random_range(0..vocab as i32)).collect();
    let dids = gpu.upload(&ids).expect("cuda");
    let host = &table;
    for (name, t) in [
        ("f32", EmbedTable::F32(gpu.upload(&table).expect("cuda"))),
        ("bf16", EmbedTable::Bf16(gpu.upload(&bf16).expect("cuda"))),
    ] {
        let mut out = nan(&gpu, ids.len() * hidden);
        ew::embed_rows(&gpu, &t, &dids, hidden, &mut out).expect("cuda");
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| {
                (0..hidden).map(move |j| {
                    let v = host[i as usize * hidden + j];
                    if name == "bf16" { half::bf16::from_f32(v).to_f32() } else { v }
                })
            })
            .collect();
        assert_close(&format!("embed {name}"), &gpu.download(&out).expect("cuda"), &want, 0.0, 0.0);
    }
}

#[test]
fn gpu_swiglu_add_gather_scatter_match_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_swiglu_add_gather_scatter_match_cpu") else { return };
    let mut r = rng("gpu_swiglu_gather");
    let (rows, width) = (7, 300);
    let gu = randn(&mut r, rows * 2 * width, 4.0);
    let mut want = vec![0.0f32; rows * width];
    activation::swiglu_fused(&gu, width, &mut want);
    let mut out = nan(&gpu, rows * width);
    ew::swiglu_rows(&gpu, &gpu.upload(&gu).expect("cuda"), rows, width, &mut out).expect("cuda");
    assert_close("swiglu", &gpu.download(&out).expect("cuda"), &want, 1e-6, 1e-6);

    let (tokens, hidden) = (11, 96);
    let x = randn(&mut r, tokens * hidden, 2.0);
    let token: Vec<i32> = vec![3, 0, 10, 7];
    let score: Vec<f32> = (0..token.len()).map(|_| r.random::<f32>()).collect();
    let (dt, ds) = (gpu.upload(&token).expect("cuda"), gpu.upload(&score).expect("cuda"));
    let mut rows_out = nan(&gpu, token.len() * hidden);
    ew::gather_scaled_rows(&gpu, &gpu.upload(&x).expect("cuda"), &dt, &ds, hidden, &mut rows_out).expect("cuda");
    let gathered: Vec<f32> = token
        .iter()
        .zip(&score)
        .flat_map(|(&t, &s)| x[t as usize * hidden..(t as usize + 1) * hidden].iter().map(move |v| v * s))
        .collect();
    assert_close("gather", &gpu.download(&rows_out).expect("cuda"), &gathered, 0.0, 0.0);

    let mut acc = x.clone();
    for (k, &t) in token.iter().enumerate() {
        for j in 0..hidden {
            acc[t as usize * hidden + j] += gathered[k * hidden + j];
        }
    }
    let mut dacc = gpu.upload(&x).expect("cuda");
    ew::scatter_add_rows(&gpu, &rows_out, &dt, hidden, &mut dacc).expect("cuda");
    assert_close("scatter_add", &gpu.download(&dacc).expect("cuda"), &acc, 0.0, 0.0);

    let y = randn(&mut r, x.len(), 1.0);
    let mut dx = gpu.upload(&x).expect("cuda");
    ew::add_in_place(&gpu, &mut dx, &gpu.upload(&y).expect("cuda"), x.len()).expect("cuda");
    let sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    assert_close("add", &gpu.download(&dx).expect("cuda"), &sum, 0.0, 0.0);
}

#[test]
fn gpu_rope_qk_norm_matches_cpu_at_small_head_dims() {
    let Some(gpu) = gpu_or_skip("gpu_rope_qk_norm_matches_cpu_at_small_head_dims") else { return };
    let mut r = rng("gpu_rope_small");
    for d in [16usize, 32, 96] {
        let (tokens, heads, eps) = (6, 4, 1e-5);
        let freqs = rope::RopeFreqs::new(d, 500000.0, None);
        let positions: Vec<usize> = (0..tokens).map(|_| r.random_range(0..5000)).collect();
        let (cos, sin) = freqs.table(&positions);
        let (dc, dsn) = (gpu.upload(&cos).expect("cuda"), gpu.upload(&sin).expect("cuda"));
        for (use_rope, qk_norm) in [(true, false), (true, true), (false, true)] {
            let q = randn(&mut r, tokens * heads * d, 1.0);
            let mut want = q.clone();
            if use_rope {
                rope::apply_rope(&mut want, heads, d, &cos, &sin);
            }
            if qk_norm {
                norm::rms_norm_in_place(&mut want, d, eps);
            }
            let mut dq = gpu.upload(&q).expect("cuda");
            let table = use_rope.then_some((&dc, &dsn));
            gnorm::rope_qk_norm(&gpu, &mut dq, table, tokens, heads, d, qk_norm, eps).expect("cuda");
            let what = format!("rope d={d} rope={use_rope} qk_norm={qk_norm}");
            assert_close(&what, &gpu.download(&dq).expect("cuda"), &want, 1e-5, 1e-6);
        }
    }
}

#[test]
fn gpu_random_fills_are_finite_and_in_range() {
    let Some(gpu) = gpu_or_skip("gpu_random_fills_are_finite_and_in_range") else { return };
    let mut codes = gpu.zeros::<u8>(1 << 20).expect("cuda");
    ew::fill_random_e4m3(&gpu, &mut codes, 7).expect("cuda");
    let host = gpu.download(&codes).expect("cuda");
    assert!(host.iter().all(|&c| c & 0x7f != 0x7f), "NaN code");
    let distinct = host.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert!(distinct > 64, "only {distinct} distinct codes");
    let mut vals = gpu.zeros::<f32>(1 << 16).expect("cuda");
    ew::fill_random_f32(&gpu, &mut vals, 3, 0.5).expect("cuda");
    let host = gpu.download(&vals).expect("cuda");
    assert!(host.iter().all(|v| v.is_finite() && v.abs() <= 0.5));
    let mean = host.iter().sum::<f32>() / host.len() as f32;
    assert!(mean.abs() < 0.02, "mean {mean}");
}
